"""Training and likelihood throughput, peak memory, and the fraction of this machine's matmul peak.

For each preset: a training step — ``farmer.train.train_step`` itself, set up as the trainer sets it up (the
preset's objective and its loss module, AdamW with the trainer's parameter groups, gradient clipping, the
trainer's autocast dtype, the EMA update), minus data loading and dequantisation — and the likelihood pass
(``log_prob``, no grad), in images/s; their FLOPs counted by ``torch.utils.flop_counter``; achieved GFLOP/s
over the best square matmul measured in the same run; and peak memory, read in a fresh subprocess per phase
(ru_maxrss on the CPU, the allocator's peak on accelerators). ``--compile`` also times the training step with
the loss module under ``torch.compile`` (``farmer train --compile``), in the same run as the eager step.
``--precisions fp32 bf16`` measures every preset under each precision policy (farmer.precision) in the same run,
and prints the training step's speed-up of each over the first.

    python -m benchmarks.bench_train --threads 1 --quick [--compile] [--precisions fp32 bf16]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils import flop_counter
from torch.utils.flop_counter import FlopCounterMode

from benchmarks.common import (
    MIB,
    REPO_ROOT,
    Repeats,
    add_common_args,
    cpu_usage,
    current_rss_bytes,
    matmul_peak,
    measure,
    peak_rss_bytes,
    percent,
    positive_int,
    repeats_for,
    resolve_device,
    save_benchmark,
    set_threads,
    subprocess_env,
    timed,
)
from farmer.config import FarmerConfig
from farmer.model import Farmer
from farmer.precision import PRECISIONS, autocast
from farmer.train import TrainConfig, amp_dtype, make_ema, make_objective, make_optimizer, train_step

PRESETS = ("tiny", "mnist")
PHASES = ("train", "log_prob")
PROBE_MARKER = "MEMORY_PROBE "


@dataclass
class Workload:
    """One preset's model, optimizer and EMA and a fixed random batch, ready to time."""

    model: Farmer
    optimizer: torch.optim.Optimizer
    images: Tensor
    labels: Tensor | None
    grad_clip: float
    amp: torch.dtype | None
    ema: Farmer
    ema_decay: float
    loss: nn.Module  # the objective's loss module over ``model`` (the model itself for the likelihood)

    def train_step(self) -> None:
        # The trainer's own step (farmer.train.train_step), one micro-batch (the presets' grad_accum is 1).
        train_step(self.model, self.optimizer, [(self.images, self.labels)], grad_clip=self.grad_clip,
                   ema=self.ema, ema_decay=self.ema_decay, amp=self.amp, loss=self.loss)

    def log_prob(self) -> None:
        self.model.eval()
        with torch.no_grad(), autocast(self.images.device, self.amp):
            self.model.log_prob(self.images, self.labels)

    def run(self, phase: str) -> Callable[[], None]:
        if phase not in PHASES:
            raise ValueError(f"phase must be one of {PHASES}, got {phase!r}")
        return self.train_step if phase == "train" else self.log_prob


def build_workload(preset: str, batch: int, device: torch.device, seed: int = 0, precision: str = "auto") -> Workload:
    """The preset's model as its training objective builds it (random initialisation), its EMA copy, AdamW with
    the trainer's settings and parameter groups, and a random batch in [-1, 1]; autocast as ``precision`` says."""
    if batch < 1:
        raise ValueError(f"batch size must be >= 1, got {batch}")
    config = FarmerConfig.preset(preset)
    train_config = dataclasses.replace(TrainConfig.preset(preset), precision=precision)
    objective = make_objective(train_config)
    torch.manual_seed(seed)
    model = objective.build_model(config, resuming=False).to(device)
    ema, optimizer = make_ema(model), make_optimizer(model, train_config)
    generator = torch.Generator().manual_seed(seed)
    shape = (batch, config.channels, config.image_size, config.image_size)
    images = (torch.rand(shape, generator=generator) * 2 - 1).to(device)
    labels = None
    if config.conditional:
        labels = torch.randint(0, config.num_classes, (batch,), generator=generator).to(device)
    # The EMA update costs the same at any decay: the steady-state one (the warm-up only lowers it early on).
    return Workload(model, optimizer, images, labels, train_config.grad_clip, amp_dtype(train_config, device),
                    ema, train_config.ema_decay, objective.loss_module(model))


# FLOPs -------------------------------------------------------------------------------------------------
def _sdpa_flops(query: Any, key: Any, value: Any, *args: Any, out_shape: Any = None, **kwargs: Any) -> int:
    return flop_counter.sdpa_flop_count(query, key, value)


def _sdpa_backward_flops(
    grad_out: Any, query: Any, key: Any, value: Any, *args: Any, out_shape: Any = None, **kwargs: Any
) -> int:
    return flop_counter.sdpa_backward_flop_count(grad_out, query, key, value)


# FlopCounterMode knows the CUDA attention kernels but not the CPU one, which would leave attention
# (~7% of the mnist step) uncounted on the CPU. Like torch's own formulas, these count full (non-causal)
# attention.
_CPU_ATTENTION = {
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _sdpa_flops,
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward: _sdpa_backward_flops,
}


def count_flops(fn: Callable[[], None]) -> int:
    """FLOPs of one call of ``fn`` (matmuls and attention; elementwise ops are not counted)."""
    counter = FlopCounterMode(display=False, custom_mapping=_CPU_ATTENTION)
    with counter:
        fn()
    return counter.get_total_flops()


# Memory ------------------------------------------------------------------------------------------------
def probe_memory(preset: str, batch: int, device: torch.device, phase: str, steps: int,
                 precision: str = "auto") -> dict[str, Any]:
    """Peak memory of ``steps`` calls of ``phase`` measured in *this* process (call it in a fresh one).

    On the CPU: peak RSS after the calls minus the RSS just before them (model, EMA, optimizer and batch already
    built); the first training step also allocates AdamW's moments. On accelerators: the allocator's peak.
    """
    workload = build_workload(preset, batch, device, precision=precision)
    fn = workload.run(phase)
    if device.type == "cpu":
        before = current_rss_bytes()
        for _ in range(steps):
            fn()
        peak = peak_rss_bytes()
        return {
            "kind": "cpu_peak_rss",
            "phase": phase,
            "steps": steps,
            "peak_mib": peak / MIB,
            "before_mib": None if before is None else before / MIB,
            "peak_delta_mib": None if before is None else (peak - before) / MIB,
        }
    torch.accelerator.synchronize(device)
    before = torch.accelerator.memory_allocated(device)
    torch.accelerator.reset_peak_memory_stats(device)
    for _ in range(steps):
        fn()
    torch.accelerator.synchronize(device)
    peak = torch.accelerator.max_memory_allocated(device)
    return {
        "kind": "accelerator_peak_allocated",
        "phase": phase,
        "steps": steps,
        "peak_mib": peak / MIB,
        "before_mib": before / MIB,
        "peak_delta_mib": (peak - before) / MIB,
    }


def memory_in_subprocess(
    preset: str, batch: int, device: torch.device, phase: str, steps: int, threads: int, precision: str = "auto"
) -> dict[str, Any]:
    """Run :func:`probe_memory` in a fresh interpreter: a process's peak RSS only ever grows."""
    command = [
        sys.executable,
        "-m",
        "benchmarks.bench_train",
        "--probe",
        phase,
        "--presets",
        preset,
        "--batch-size",
        str(batch),
        "--device",
        str(device),
        "--threads",
        str(threads),
        "--probe-steps",
        str(steps),
        "--precisions",
        precision,
    ]
    done = subprocess.run(command, cwd=REPO_ROOT, env=subprocess_env(), capture_output=True, text=True, check=False)
    lines = [line for line in done.stdout.splitlines() if line.startswith(PROBE_MARKER)]
    if done.returncode != 0 or not lines:
        raise RuntimeError(f"memory probe {phase} {preset} failed (exit {done.returncode}): {done.stderr[-2000:]}")
    return json.loads(lines[-1].removeprefix(PROBE_MARKER))


# Benchmark -----------------------------------------------------------------------------------------------
def bench_preset(
    preset: str,
    batch: int,
    device: torch.device,
    repeats: Repeats,
    peak: dict[str, Any],
    threads: int,
    probe_steps: int,
    compile_step: bool = False,
    precision: str = "auto",
) -> dict[str, Any]:
    """Both phases of one preset under ``precision``: timing, images/s, FLOPs, fraction of ``peak`` (from
    :func:`matmul_peak` in the step's matmul dtype), memory; with ``compile_step`` also the compiled training step
    (``train_compiled``, after the eager phases)."""
    workload = build_workload(preset, batch, device, precision=precision)
    config = workload.model.config
    result: dict[str, Any] = {
        "preset": preset,
        "batch": batch,
        "parameters": sum(p.numel() for p in workload.model.parameters()),
        "tokens": config.num_tokens,
        "token_dim": config.token_dim,
        "policy": precision,
        "precision": "fp32" if workload.amp is None else str(workload.amp).removeprefix("torch."),
    }
    for phase in PHASES:
        fn = workload.run(phase)
        flops = count_flops(fn)  # doubles as the first (untimed) warm-up call
        timing = measure(fn, device, Repeats(max(0, repeats.warmup - 1), repeats.repeats))
        achieved = flops / timing.median / 1e9
        # The same ratio in CPU seconds: insensitive to other processes taking the cores (CPU only).
        cpu_fraction = None
        if peak["cpu_gflops"] and timing.cpu_median > 0:
            cpu_fraction = flops / timing.cpu_median / 1e9 / peak["cpu_gflops"]
        result[phase] = {
            **timing.to_dict(),
            "images_per_s": batch / timing.median,
            "flops": flops,
            "achieved_gflops": achieved,
            "fraction_of_peak": achieved / peak["gflops"],
            "fraction_of_peak_cpu_time": cpu_fraction,
            "memory": memory_in_subprocess(preset, batch, device, phase, probe_steps, threads, precision),
        }
    if compile_step:
        result["train_compiled"] = time_compiled_train_step(workload, device, repeats, result["train"]["median_s"])
    return result


def time_compiled_train_step(workload: Workload, device: torch.device, repeats: Repeats,
                             eager_median_s: float) -> dict[str, Any]:
    """The training step with ``workload``'s loss module compiled, as ``farmer train --compile`` runs it: the
    first call (the compilation) timed on its own, then the steady state, and its speed-up over the eager step."""
    workload.loss = torch.compile(workload.loss)
    _, compile_s, _ = timed(workload.train_step, device)
    timing = measure(workload.train_step, device, repeats)
    return {**timing.to_dict(), "images_per_s": workload.images.shape[0] / timing.median, "compile_s": compile_s,
            "speedup": eager_median_s / timing.median}


def _print_row(row: dict[str, Any]) -> None:
    for phase in PHASES:
        r = row[phase]
        print(
            f"{row['preset']:>6} {row['precision']:>8} {phase:>8} batch {row['batch']:>3}: "
            f"{r['images_per_s']:9.1f} img/s  "
            f"{r['median_s'] * 1e3:8.1f} ms/step  {r['flops'] / 1e9:7.2f} GFLOP  "
            f"{r['achieved_gflops']:6.1f} GFLOP/s = {100 * r['fraction_of_peak']:5.1f}% of peak "
            f"({percent(r['fraction_of_peak_cpu_time'])} by CPU time)  "
            f"peak mem +{r['memory']['peak_delta_mib'] or 0:.0f} MiB ({r['memory']['peak_mib']:.0f} MiB total)"
        )
    if "train_compiled" in row:
        c = row["train_compiled"]
        print(f"{row['preset']:>6} compiled train: {c['images_per_s']:9.1f} img/s  {c['median_s'] * 1e3:8.1f} ms/step  "
              f"{c['speedup']:.2f}× the eager step (compilation {c['compile_s']:.0f} s)")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(parser)
    parser.add_argument("--presets", nargs="+", default=list(PRESETS), help="model presets to measure")
    parser.add_argument("--batch-size", type=positive_int, default=64)
    parser.add_argument("--compile", action="store_true", help="also time the train step under torch.compile")
    parser.add_argument("--precisions", nargs="+", choices=PRECISIONS, default=["auto"],
                        help="precision policies to measure, each in this run (speed-ups are against the first)")
    parser.add_argument("--probe", choices=PHASES, default=None, help=argparse.SUPPRESS)  # memory subprocess
    parser.add_argument("--probe-steps", type=positive_int, default=None, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, Any] | None:
    args = parse_args(argv)
    for preset in args.presets:
        FarmerConfig.preset(preset)  # fail on a typo before minutes of measuring
    threads = set_threads(args.threads)
    device = resolve_device(args.device)
    repeats = repeats_for(args.quick)
    if args.probe is not None:
        print(
            PROBE_MARKER
            + json.dumps(probe_memory(args.presets[0], args.batch_size, device, args.probe, args.probe_steps or 1,
                                      args.precisions[0]))
        )
        return None

    with cpu_usage() as usage:
        peaks = {}  # the matmul peak in each compute dtype the steps run in
        for precision in args.precisions:
            dtype = amp_dtype(TrainConfig(precision=precision), device) or torch.float32
            if dtype not in peaks:
                peaks[dtype] = matmul_peak(device, dtype, repeats=5 if args.quick else 10)
                print(f"matmul peak ({peaks[dtype]['size']}², {peaks[dtype]['dtype']}, {threads} threads): "
                      f"{peaks[dtype]['gflops']:.1f} GFLOP/s")
        rows = []
        for preset in args.presets:
            for precision in args.precisions:
                dtype = amp_dtype(TrainConfig(precision=precision), device) or torch.float32
                rows.append(bench_preset(preset, args.batch_size, device, repeats, peaks[dtype], threads,
                                         probe_steps=1 if args.quick else 2, compile_step=args.compile,
                                         precision=precision))
                _print_row(rows[-1])
        speedups = _precision_speedups(rows, args.precisions)
    return save_benchmark("train", args, device, repeats, usage, matmul_peak=list(peaks.values()), presets=rows,
                          precision_speedups=speedups)


def _precision_speedups(rows: list[dict[str, Any]], precisions: list[str]) -> list[dict[str, Any]]:
    """Each preset's training step under every precision against the first, from the rows of one run; printed."""
    speedups = []
    for preset in dict.fromkeys(row["preset"] for row in rows):
        base = next(row for row in rows if row["preset"] == preset and row["policy"] == precisions[0])
        for row in rows:
            if row["preset"] == preset and row is not base:
                ratio = base["train"]["median_s"] / row["train"]["median_s"]
                speedups.append({"preset": preset, "precision": row["policy"], "against": precisions[0],
                                 "train_speedup": ratio})
                print(f"{preset}: train step under {row['policy']} {ratio:.2f}× {precisions[0]}'s")
    return speedups


if __name__ == "__main__":
    main()
