"""Training memory: activation bytes counted for every preset, and peak resident memory measured on the CPU.

Counted (farmer.plan, device-independent): the bytes of tensors saved for backward per image and the part that
does not grow with the batch, for every preset, under fp32 and the bf16 policy, with and without activation
checkpointing: counted on fake tensors at one and two flow blocks / prior layers and scaled by depth. The scaling is
checked against a full-depth count of ``--depth-check`` (default imagenet256-1.1b-p16).

Measured: for each of ``--measure`` × ``--batches`` × ``--precisions`` × {off, on}, a fresh subprocess builds the
model (random weights), then runs one training forward + backward inside ``peak_rss_delta()``: the process's peak
resident memory above its memory before the pass (weights excluded; gradients, activations and every transient
included). Beside it, the prediction ``farmer plan`` makes of that pass: the saved bytes counted on fake tensors at
full depth plus the fp32 gradients (4 bytes per parameter), and the saved bytes counted on the real pass itself.
Each subprocess runs under ``flock LOCK`` (a 1.1B step at fp32 needs over 10 GB), and a case whose predicted
memory exceeds what the machine has available is skipped and recorded as such.

    python -m benchmarks.bench_memory --threads 1
    python -m benchmarks.bench_memory --measure imagenet64-556m --batches 1 --precisions fp32   # one quick case
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch

from benchmarks.common import (
    Repeats,
    add_common_args,
    cpu_usage,
    peak_rss_delta,
    positive_int,
    save_benchmark,
    set_threads,
    subprocess_env,
)
from farmer.config import PRESETS, FarmerConfig
from farmer.io import count_parameters
from farmer.model import Farmer
from farmer.plan import GIB, PerImage, count_scaled_by_depth, count_training_step, forward_counting_saved

MEASURED = ("imagenet64-556m", "imagenet256-1.1b-p16")
GRAD_BYTES_PER_PARAMETER = 4  # fp32 gradients of fp32 weights, under either precision
LOCK = Path("/tmp/farmer-heavy.lock")
HEAVY_BYTES = 3 * 10**9  # a subprocess that may need more waits for LOCK: one heavy job at a time on the machine


def counted(presets: list[str]) -> list[dict[str, Any]]:
    """Per-image and batch-independent saved bytes (and FLOPs) of every preset, precision and checkpointing."""
    rows = []
    for preset in presets:
        config = FarmerConfig.preset(preset)
        for precision in ("fp32", "bf16"):
            for checkpointing in (False, True):
                cost = PerImage.count(config, precision, checkpointing)
                rows.append({"preset": preset, "precision": precision, "checkpointing": checkpointing,
                             "activation_bytes_per_image": cost.activation_bytes,
                             "batch_independent_bytes": cost.fixed_bytes, "flops_per_image": cost.flops})
                print(f"counted {preset} {precision} checkpointing={checkpointing}: "
                      f"{cost.activation_bytes / GIB:.3f} GiB/image", flush=True)
    return rows


def depth_check(preset: str) -> dict[str, Any]:
    """The full-depth count of one preset (bf16, batch 2) against the count scaled from reduced depth."""
    config = FarmerConfig.preset(preset)
    full, scaled = count_training_step(config, 2), count_scaled_by_depth(config, 2)
    return {"preset": preset, "batch": 2, "precision": "bf16", "full_depth": vars(full), "scaled": vars(scaled),
            "equal": full == scaled}


# The measuring subprocess ----------------------------------------------------------------------------------
def measure_in_this_process(preset: str, batch: int, precision: str, checkpointing: bool) -> dict[str, Any]:
    """One training forward + backward with random weights; the weights are built before the reading starts."""
    config = FarmerConfig.preset(preset)
    torch.manual_seed(0)
    model = Farmer(config).set_activation_checkpointing(checkpointing).train()
    images = torch.rand(batch, config.channels, config.image_size, config.image_size) * 2 - 1
    labels = torch.zeros(batch, dtype=torch.long) if config.conditional else None
    with cpu_usage() as usage, peak_rss_delta() as memory:
        loss, saved_bytes = forward_counting_saved(model, images, labels, precision)
        loss.backward()
    return {"peak_delta_bytes": memory["peak_delta_bytes"], "real_saved_bytes": saved_bytes,
            "loss": float(loss), "cpu_usage": usage}


def memory_available_bytes() -> int | None:
    """MemAvailable of /proc/meminfo, or None where it cannot be read."""
    try:
        match = re.search(r"^MemAvailable:\s*(\d+)\s*kB", Path("/proc/meminfo").read_text(), flags=re.MULTILINE)
    except OSError:
        return None
    return int(match.group(1)) * 1024 if match else None


def measure_case(preset: str, batch: int, precision: str, checkpointing: bool, threads: int) -> dict[str, Any]:
    """A measured case in a fresh subprocess under the heavy-job lock, with the plan's prediction beside it."""
    config = FarmerConfig.preset(preset)
    with torch.device("meta"):
        parameters = count_parameters(Farmer(config))
    predicted_saved = count_scaled_by_depth(config, batch, precision, checkpointing).saved_bytes
    predicted = predicted_saved + GRAD_BYTES_PER_PARAMETER * parameters
    case = {"preset": preset, "batch": batch, "precision": precision, "checkpointing": checkpointing,
            "parameters": parameters, "predicted_saved_bytes": predicted_saved, "predicted_peak_delta_bytes": predicted}
    command = [sys.executable, "-m", "benchmarks.bench_memory", "--worker", preset, str(batch), precision,
               str(checkpointing), "--threads", str(threads)]
    needed = predicted + 4 * parameters  # plus the weights, built before the reading
    if needed > HEAVY_BYTES and shutil.which("flock"):
        command = ["flock", str(LOCK), *command]
    # Checked before the lock is ours, this only keeps a run from starting blind.
    available = memory_available_bytes()
    if available is not None and needed > 0.8 * available:
        print(f"skipped {preset} batch {batch} {precision} checkpointing={checkpointing}: needs about "
              f"{needed / GIB:.1f} GiB, {available / GIB:.1f} GiB available", flush=True)
        return {**case, "skipped": f"needs about {needed / GIB:.1f} GiB, {available / GIB:.1f} GiB available"}
    out = subprocess.run(command, capture_output=True, text=True, env=subprocess_env(), check=False)
    if out.returncode:
        raise RuntimeError(f"{' '.join(command)} failed ({out.returncode}): {out.stderr[-2000:]}")
    result = {**case, **json.loads(out.stdout.strip().splitlines()[-1])}
    print(f"measured {preset} batch {batch} {precision} checkpointing={checkpointing}: "
          f"{result['peak_delta_bytes'] / GIB:.2f} GiB (predicted {predicted / GIB:.2f})", flush=True)
    return result


# Output ----------------------------------------------------------------------------------------------------
def measured_table(rows: list[dict[str, Any]]) -> str:
    lines = [f"{'preset':22s} {'B':>2s} {'prec':>4s} {'ckpt':>4s} {'measured':>9s} {'predicted':>9s} {'ratio':>5s} "
             f"{'saved (fake)':>12s} {'saved (real)':>12s}"]
    for r in rows:
        head = f"{r['preset']:22s} {r['batch']:2d} {r['precision']:>4s} {'yes' if r['checkpointing'] else 'no':>4s}"
        if "skipped" in r:
            lines.append(f"{head} skipped: {r['skipped']}")
            continue
        lines.append(f"{head} {r['peak_delta_bytes'] / GIB:8.2f}G {r['predicted_peak_delta_bytes'] / GIB:8.2f}G "
                     f"{r['peak_delta_bytes'] / r['predicted_peak_delta_bytes']:5.2f} "
                     f"{r['predicted_saved_bytes'] / GIB:11.2f}G {r['real_saved_bytes'] / GIB:11.2f}G")
    return "\n".join(lines)


def counted_table(rows: list[dict[str, Any]]) -> str:
    lines = [f"{'preset':22s} {'prec':>4s} {'ckpt':>4s} {'GiB/image':>9s} {'fixed GiB':>9s} {'TFLOP/image':>11s}"]
    lines += [f"{r['preset']:22s} {r['precision']:>4s} {'yes' if r['checkpointing'] else 'no':>4s} "
              f"{r['activation_bytes_per_image'] / GIB:9.3f} {r['batch_independent_bytes'] / GIB:9.3f} "
              f"{r['flops_per_image'] / 1e12:11.4f}" for r in rows]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(parser)
    parser.add_argument("--worker", nargs=4, metavar=("PRESET", "BATCH", "PRECISION", "CHECKPOINTING"),
                        help=argparse.SUPPRESS)
    parser.add_argument("--count", nargs="*", default=list(PRESETS), help="presets to count (default: all)")
    parser.add_argument("--depth-check", default="imagenet256-1.1b-p16",
                        help="preset counted at full depth too ('' for none)")
    parser.add_argument("--measure", nargs="*", default=list(MEASURED), help="presets to measure on the CPU")
    parser.add_argument("--batches", nargs="+", type=positive_int, default=[1, 2])
    parser.add_argument("--precisions", nargs="+", choices=["fp32", "bf16"], default=["fp32", "bf16"])
    parser.add_argument("--name", default="memory", help="result file name under --out (default memory)")
    args = parser.parse_args(argv)
    threads = set_threads(args.threads)
    if args.worker:
        preset, batch, precision, checkpointing = args.worker
        print(json.dumps(measure_in_this_process(preset, int(batch), precision, checkpointing == "True")))
        return
    with cpu_usage() as usage:
        counts = counted(args.count)
        check = depth_check(args.depth_check) if args.depth_check else None
        measured = [measure_case(preset, batch, precision, checkpointing, threads) for preset in args.measure
                    for precision in args.precisions for checkpointing in (False, True) for batch in args.batches]
    print(counted_table(counts))
    if check is not None:
        print(f"depth scaling, {check['preset']} bf16 batch 2: full depth {check['full_depth']}, scaled "
              f"{check['scaled']}, equal: {check['equal']}")
    print(measured_table(measured))
    save_benchmark(args.name, args, torch.device("cpu"), Repeats(warmup=0, repeats=1), usage, counted=counts,
                   depth_check=check, measured=measured)


if __name__ == "__main__":
    main()
