"""The precision policy: one switch, ``precision`` ∈ {"auto", "fp32", "bf16"}, for training, sampling and evaluation.

Under "bf16" the transformer trunks of the flow and the AR prior run their matmuls in bf16 autocast; everything
that sets the likelihood's value stays fp32 (or the model's dtype if wider): the flow's input projection, its
affine head (μ, log σ), the log σ bound, the affine maps and log-dets, the channel mixing, and the mixture heads
and densities (docs/method.md §12). "fp32" is the exact policy: no autocast anywhere, so a flow's forward and its
inverse are the same function to fp32 rounding (round trips, distillation targets). "auto" is bf16 on
accelerators and fp32 on CPUs (see :func:`autocast_dtype`).

Attention stays fp32 on CPUs even under bf16: the CPU's bf16 flash-attention
backward measured several times slower than fp32's (benchmarks/bench_train.py), which cancelled the matmuls' gain
(farmer.nn.attention applies it).
"""

from __future__ import annotations

import contextlib
import functools
import platform
import warnings
from pathlib import Path
from typing import Literal, get_args

import torch

Precision = Literal["auto", "fp32", "bf16"]
PRECISIONS: tuple[str, ...] = get_args(Precision)
ACCELERATORS = ("cuda", "xpu", "mps")


@functools.cache
def cpu_has_bf16_matmul() -> bool:
    """Whether this CPU multiplies bf16 natively (x86 AVX512-BF16 or AMX-BF16, Arm BF16), read from
    /proc/cpuinfo; False where it cannot be read. Without them bf16 matmuls are emulated and no faster."""
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    flags = {flag for line in info.splitlines() if line.startswith(("flags", "Features"))
             for flag in line.split(":", 1)[-1].split()}
    if platform.machine().lower() in ("aarch64", "arm64"):
        return "bf16" in flags
    return bool(flags & {"avx512_bf16", "amx_bf16"})


def check_precision(precision: str) -> None:
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype of ``precision`` on ``device`` (None: no autocast, fp32).

    "auto": bf16 on accelerators; fp32 on CPUs. "bf16" on a CPU without native bf16 matmuls runs (emulated, no
    faster than fp32) and says so once.
    """
    check_precision(precision)
    if precision == "fp32":
        return None
    if precision == "auto":
        return torch.bfloat16 if device.type in ACCELERATORS else None
    if device.type == "cpu" and not cpu_has_bf16_matmul():
        _warn_once("precision bf16 on a CPU without native bf16 matmuls (AVX512-BF16/AMX): they are emulated and "
                   "no faster than fp32")
    return torch.bfloat16


def describe(precision: str, device: torch.device) -> str:
    """One line on what ``precision`` means on ``device``, for the trainer's start-up log: on a CPU, whether bf16
    would pay (native bf16 matmuls) when "auto" keeps fp32."""
    dtype = autocast_dtype(precision, device)
    if dtype is not None:
        return "precision bf16 (bf16 trunks, fp32 likelihood; docs/method.md §12)"
    if precision == "auto" and device.type == "cpu":
        hint = ("this CPU has native bf16 matmuls: --precision bf16 trains faster" if cpu_has_bf16_matmul()
                else "this CPU has no native bf16 matmuls")
        return f"precision fp32 (auto on a CPU; {hint})"
    return "precision fp32"


@functools.cache
def _warn_once(message: str) -> None:
    warnings.warn(message, stacklevel=3)


def autocast(device: torch.device, dtype: torch.dtype | None) -> contextlib.AbstractContextManager[None]:
    """bf16 autocast on ``device`` for ``dtype`` bf16; for None, autocast off (the exact, fp32 policy)."""
    return torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None)


def full_precision(device_type: str) -> contextlib.AbstractContextManager[None]:
    """Autocast off for the likelihood's own arithmetic (affine maps, log-dets, mixture densities). Entering an
    autocast context costs as much as a small matmul, so it is entered only where autocast is on."""
    if torch.is_autocast_enabled(device_type):
        return torch.autocast(device_type, enabled=False)
    return contextlib.nullcontext()
