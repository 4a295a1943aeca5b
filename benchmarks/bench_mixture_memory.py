"""Peak memory and time of the shared redundant mixture's log-density, forward + backward (issue #25).

The paper's shared redundant mixture at patch size 16 (K_R = 200 components over d_R = 640 channels, one
mixture per image, scored on its N = 256 redundant vectors): ``DiagonalMixture.log_prob`` as the library
computes it (Σ z²/σ² − 2 Σ z·μ/σ² + Σ μ²/σ² as fp64 einsums, docs/method.md §4) against the direct form
through the (N, B, K, D) tensor of differences that it replaced, and against that expansion done in fp32
(to show why the library forms it in fp64). Each arm runs in its own interpreter (``--arm``), so that no arm
inherits another's allocator state; its peak is that of its first call (the resident memory it needed),
its time the median of later calls. Parameters and values are leaf tensors with gradients (the head's
Linear is left out: at p = 16 its weight alone is ~1 GB and would hide the mixture's own memory); stds lie
near the head's floor 1e-3 and every value near a component, where the expansion's terms cancel.

The error column is the largest |log p − exact| over the first tokens, exact = the direct form in fp64.

    OMP_NUM_THREADS=1 flock /tmp/farmer-heavy.lock python -m benchmarks.bench_mixture_memory --threads 1
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from benchmarks.common import (
    MIB,
    REPO_ROOT,
    add_common_args,
    cpu_usage,
    measure,
    peak_rss_delta,
    positive_int,
    repeats_for,
    resolve_device,
    save_benchmark,
    set_threads,
    subprocess_env,
    synchronize,
)
from farmer.mixture import LOG_2PI, DiagonalMixture, log_sum_exp

COMPONENTS, CHANNELS, TOKENS = 200, 640, 256  # K_R, d_R, N of the imagenet256 p = 16 presets
MIN_SCALE = 1e-3  # FarmerConfig.min_mixture_scale
ERROR_TOKENS = 16  # tokens scored against the fp64 direct form (its tensor is 8 bytes × N·B·K·D)


# The arms: log p of tokens (N, B, D) under one mixture per image, (N, B). ------------------------------
def _offset(mix: DiagonalMixture) -> Tensor:
    return F.log_softmax(mix.logits, dim=-1) - mix.scales.log().sum(dim=-1) - 0.5 * mix.dim * LOG_2PI


def _direct(mix: DiagonalMixture, tokens: Tensor) -> Tensor:
    """The replaced form: the (N, B, K, D) differences, squared and summed over D."""
    squares = ((tokens.unsqueeze(-2) - mix.means) / mix.scales).square().sum(dim=-1)
    return log_sum_exp(_offset(mix) - 0.5 * squares)


def _expanded_fp32(mix: DiagonalMixture, tokens: Tensor) -> Tensor:
    """The library's expansion without its fp64: what the cancellation costs in fp32."""
    inverse_variances = mix.scales.pow(-2)
    weighted_means = mix.means * inverse_variances
    squares = (torch.einsum("...d,...kd->...k", tokens.square(), inverse_variances)
               - 2 * torch.einsum("...d,...kd->...k", tokens, weighted_means)
               + (weighted_means * mix.means).sum(dim=-1))
    return log_sum_exp(_offset(mix) - 0.5 * squares)


ARMS: dict[str, Callable[[DiagonalMixture, Tensor], Tensor]] = {
    "direct": _direct,
    "library": DiagonalMixture.log_prob,
    "expanded_fp32": _expanded_fp32,
}


def make_inputs(batch: int, device: torch.device, seed: int = 0) -> tuple[list[Tensor], Tensor]:
    """Leaf parameters [logits (B, K), means (B, K, D), raw scales (B, K, D)] and tokens (N, B, D), each
    token within a few stds of a random component of its image's mixture."""
    g = torch.Generator(device).manual_seed(seed)
    logits = torch.randn(batch, COMPONENTS, generator=g, device=device)
    means = torch.randn(batch, COMPONENTS, CHANNELS, generator=g, device=device)
    raw_scales = torch.randn(batch, COMPONENTS, CHANNELS, generator=g, device=device) - 6  # softplus ≈ 2.5e-3
    scales = MIN_SCALE + F.softplus(raw_scales)
    pick = torch.randint(COMPONENTS, (TOKENS, batch), generator=g, device=device)
    rows = torch.arange(batch, device=device)
    tokens = means[rows, pick] + scales[rows, pick] * torch.randn(TOKENS, batch, CHANNELS, generator=g, device=device)
    return [t.requires_grad_() for t in (logits, means, raw_scales)], tokens.requires_grad_()


def forward_backward(arm: str, params: list[Tensor], tokens: Tensor) -> None:
    """The training step's share: log p of every token under its image's mixture, then the backward."""
    logits, means, raw_scales = params
    mix = DiagonalMixture(logits, means, MIN_SCALE + F.softplus(raw_scales))
    ARMS[arm](mix, tokens).sum().backward()
    for t in (*params, tokens):
        t.grad = None


def peak_bytes(fn: Callable[[], None], device: torch.device) -> int | None:
    """Peak memory of one call above the memory at entry: resident memory on the CPU, allocated memory of the
    accelerator elsewhere."""
    if device.type == "cpu":
        with peak_rss_delta() as mem:
            fn()
        return mem["peak_delta_bytes"]
    synchronize(device)
    torch.accelerator.reset_peak_memory_stats(device)
    start = torch.accelerator.memory_allocated(device)
    fn()
    synchronize(device)
    return torch.accelerator.max_memory_allocated(device) - start


def max_error(arm: str, batch: int, device: torch.device) -> float:
    """Largest |log p − exact| over the first ERROR_TOKENS tokens (no gradients)."""
    params, tokens = make_inputs(batch, device)
    with torch.no_grad():
        logits, means, raw_scales = params
        mix = DiagonalMixture(logits, means, MIN_SCALE + F.softplus(raw_scales))
        part = tokens[:ERROR_TOKENS]
        exact = _direct(DiagonalMixture(mix.logits.double(), mix.means.double(), mix.scales.double()), part.double())
        return (ARMS[arm](mix, part).double() - exact).abs().max().item()


def run_arm(arm: str, batch: int, device: torch.device, quick: bool) -> dict[str, Any]:
    """One arm in this (fresh) process: first-call peak, then the time per call, then the error."""
    params, tokens = make_inputs(batch, device)
    step = lambda: forward_backward(arm, params, tokens)  # noqa: E731
    peak = peak_bytes(step, device)
    timing = measure(step, device, repeats_for(quick))
    return {"arm": arm, "batch": batch, "peak_bytes": peak, "time": timing.to_dict(),
            "max_abs_error_nats": max_error(arm, batch, device)}


# The driver ----------------------------------------------------------------------------------------------
def arm_in_subprocess(arm: str, batch: int, args: argparse.Namespace) -> dict[str, Any]:
    command = [sys.executable, "-m", "benchmarks.bench_mixture_memory", "--arm", arm, "--batch", str(batch)]
    command += ["--quick"] if args.quick else []
    command += ["--threads", str(args.threads)] if args.threads is not None else []
    command += ["--device", args.device] if args.device is not None else []
    done = subprocess.run(command, cwd=REPO_ROOT, env=subprocess_env(), capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"arm {arm} at batch {batch} failed:\n{done.stderr}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _mib(value: int | None) -> str:
    return "n/a" if value is None else f"{value / MIB:9.1f}"


def print_table(rows: list[dict[str, Any]]) -> None:
    print(f"{'batch':>5} {'arm':>14} {'peak MiB':>9} {'÷ direct':>9} {'ms/call':>9} {'max |err| nats':>15}")
    for row in rows:
        ratio = row.get("direct_over_this")
        print(f"{row['batch']:>5} {row['arm']:>14} {_mib(row['peak_bytes'])} "
              f"{'n/a' if ratio is None else f'{ratio:8.1f}×':>9} {row['time']['median_s'] * 1e3:9.1f} "
              f"{row['max_abs_error_nats']:15.3g}")


def with_ratios(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each row with the direct form's peak over its own (same batch; both measured in this run)."""
    direct = {row["batch"]: row["peak_bytes"] for row in rows if row["arm"] == "direct"}
    for row in rows:
        base, peak = direct.get(row["batch"]), row["peak_bytes"]
        row["direct_over_this"] = base / peak if base and peak else None
    return rows


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(parser)
    parser.add_argument("--batch-sizes", type=positive_int, nargs="+", default=[2, 4], help="images per call")
    parser.add_argument("--arm", choices=sorted(ARMS), default=None, help=argparse.SUPPRESS)
    parser.add_argument("--batch", type=positive_int, default=None, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    set_threads(args.threads)
    device = resolve_device(args.device)
    if args.arm is not None:  # a child: one arm, its record as the last line of stdout
        if args.batch is None:
            raise ValueError("--arm needs --batch")
        result = run_arm(args.arm, args.batch, device, args.quick)
        print(json.dumps(result))
        return result
    print(f"shared redundant mixture, K={COMPONENTS}, D={CHANNELS}, N={TOKENS}, forward + backward, on {device}")
    with cpu_usage() as usage:
        rows = with_ratios([arm_in_subprocess(arm, batch, args) for batch in args.batch_sizes for arm in ARMS])
    print_table(rows)
    return save_benchmark("mixture_memory", args, device, repeats_for(args.quick), usage,
                          shape={"components": COMPONENTS, "channels": CHANNELS, "tokens": TOKENS,
                                 "min_scale": MIN_SCALE, "error_tokens": ERROR_TOKENS}, rows=rows)


if __name__ == "__main__":
    main()
