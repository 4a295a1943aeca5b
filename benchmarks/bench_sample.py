"""Sampling speed, split like the paper's Table 5: AR prior time, flow (AF) inverse time, total, per image.

For each batch size, without and with resampling CFG (farmer.guidance.ResamplingGuidance()): every repeat
draws latents with ``model.prior.sample`` and decodes *those* latents with the exact, the Jacobi and the "auto"
inverse (the default: exact or Jacobi by batch size), and — when the model has a student, or with ``--distilled``
— with the one-step distilled inverse (docs/method.md §7); the Jacobi sweeps per block are recorded. The
speed-ups are medians of per-repeat ratios, so both sides of a ratio ran back to back on the same input.

Random-initialised weights by default (timing depends on the architecture, not the weights); with
``--checkpoint DIR`` the checkpoint's model. ``--distilled`` without a trained student builds one with
``farmer.distill.attach_new_student``: an untrained student, valid for timing only.

    python -m benchmarks.bench_sample --threads 1 --quick --distilled
"""

from __future__ import annotations

import argparse
import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from benchmarks.common import (
    Repeats,
    Timing,
    add_common_args,
    cpu_usage,
    positive_int,
    repeats_for,
    resolve_device,
    save_benchmark,
    set_threads,
    timed,
)
from farmer.config import FarmerConfig
from farmer.distill import attach_new_student
from farmer.guidance import ResamplingGuidance
from farmer.model import Farmer

BATCHES = (1, 64)


def build_model(
    preset: str, checkpoint: Path | None, distilled: bool, device: torch.device, seed: int = 0
) -> tuple[Farmer, dict[str, Any]]:
    """The model to time and a record of where it came from (weights, student)."""
    if checkpoint is not None:
        model = Farmer.from_pretrained(checkpoint, map_location=device)
        source = f"checkpoint {checkpoint}"
    else:
        torch.manual_seed(seed)
        model = Farmer(FarmerConfig.preset(preset)).to(device).eval()
        source = f"random init, preset {preset}"
    student = None
    if model.student is not None:
        student = "trained (checkpoint)" if checkpoint is not None else "random init"
    elif distilled:
        attach_new_student(model).eval()
        student = "copy of the flow (untrained; timing only)"
    info = {
        "source": source,
        "config": model.config.to_dict(),
        "student": student,
        "parameters": sum(p.numel() for p in model.parameters()),
    }
    return model, info


def _median_ratio(numerators: Sequence[float], denominators: Sequence[float]) -> float:
    return statistics.median(n / d for n, d in zip(numerators, denominators, strict=True))


@torch.no_grad()
def bench_case(
    model: Farmer,
    batch: int,
    guidance: ResamplingGuidance | None,
    device: torch.device,
    repeats: Repeats,
    seed: int = 0,
) -> dict[str, Any]:
    """AR time, exact (and distilled) inverse time, totals and speed-ups for one batch size / guidance."""
    config = model.config
    y = torch.arange(batch, device=device) % config.num_classes if config.conditional else None
    labels = model.check_labels(y, batch, device)
    generator = torch.Generator(device).manual_seed(seed)
    inverses = ["exact", "jacobi", "auto"] + (["distilled"] if model.student is not None else [])
    sweeps: list[int] = []
    laps: dict[str, list[tuple[float, float]]] = {"ar": [], **{name: [] for name in inverses}}

    def one_pass(record: bool) -> None:
        (informative, redundant), *ar_lap = timed(lambda: model.prior.sample(labels, generator, guidance), device)
        if record:
            laps["ar"].append(tuple(ar_lap))
            z = torch.cat([informative, redundant], dim=-1)
            sweeps[:] = model.flow.jacobi_inverse(z.flip(1) if config.final_permute else z)[1]
        for name in inverses:
            _, *lap = timed(lambda name=name: model.decode(informative, redundant, inverse=name), device)
            if record:
                laps[name].append(tuple(lap))

    for _ in range(repeats.warmup):
        one_pass(record=False)
    for _ in range(repeats.repeats):
        one_pass(record=True)

    timings = {name: Timing.from_laps(value) for name, value in laps.items()}
    # Per-repeat totals: this repeat's AR time plus its inverse time on the latents that AR drew.
    totals = {name: [a + b for a, b in zip(timings["ar"].wall, timings[name].wall, strict=True)] for name in inverses}
    row: dict[str, Any] = {
        "batch": batch,
        "guidance": "none" if guidance is None else "resampling",
        "ar": timings["ar"].to_dict(),
        "jacobi_sweeps": sweeps,
    }
    for name in inverses:
        total = statistics.median(totals[name])
        row[name] = {
            "inverse": timings[name].to_dict(),
            "total_median_s": total,
            "per_image_s": total / batch,
            "images_per_s": batch / total,
        }
    if "distilled" in inverses:
        row["inverse_speedup"] = _median_ratio(timings["exact"].wall, timings["distilled"].wall)
        row["total_speedup"] = _median_ratio(totals["exact"], totals["distilled"])
    return row


def _print_row(row: dict[str, Any]) -> None:
    head = f"batch {row['batch']:>3} cfg {row['guidance']:>10}: AR {row['ar']['median_s'] * 1e3:8.1f} ms"
    for name in ("exact", "jacobi", "auto", "distilled"):
        if name in row:
            r = row[name]
            head += (
                f" | {name} inverse {r['inverse']['median_s'] * 1e3:8.1f} ms, total "
                f"{r['total_median_s'] * 1e3:8.1f} ms, {r['per_image_s'] * 1e3:7.2f} ms/img"
            )
    if "inverse_speedup" in row:
        head += f" | speed-up inverse {row['inverse_speedup']:.1f}×, total {row['total_speedup']:.2f}×"
    head += f" | Jacobi sweeps/block {','.join(map(str, row['jacobi_sweeps']))}"
    print(head)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(parser)
    parser.add_argument("--preset", default="mnist", help="model preset (ignored with --checkpoint)")
    parser.add_argument("--checkpoint", type=Path, default=None, help="run or step directory to load")
    parser.add_argument(
        "--distilled",
        action="store_true",
        help="time the distilled inverse too, building a student from the flow if the model has none",
    )
    parser.add_argument("--batch-sizes", type=positive_int, nargs="+", default=list(BATCHES))
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    threads = set_threads(args.threads)
    device = resolve_device(args.device)
    repeats = repeats_for(args.quick)
    model, info = build_model(args.preset, args.checkpoint, args.distilled, device)
    print(
        f"model: {info['source']}, {info['parameters'] / 1e6:.2f}M parameters, student: {info['student']}, "
        f"{threads} threads on {device}"
    )
    guidances = [None, ResamplingGuidance()] if model.config.conditional else [None]
    rows = []
    with cpu_usage() as usage:
        for batch in args.batch_sizes:
            for guidance in guidances:
                rows.append(bench_case(model, batch, guidance, device, repeats))
                _print_row(rows[-1])
    return save_benchmark("sample", args, device, repeats, usage, model=info, rows=rows)


if __name__ == "__main__":
    main()
