"""What the bf16 precision policy (farmer.precision, docs/method.md §12) does to a trained model, against fp32.

For one checkpoint, each number under both policies in the same run: the flow's round trip on test images (encode,
then the exact inverse), test bits/dim (uniform dequantisation, the same draws), and sample quality — resampling-CFG
samples drawn from the same seeds, scored by the shipped classifier (accuracy, Fréchet distance) — with the
sampling time. A bf16 policy is worth keeping where bits/dim move by well under 0.02 and accuracy by under a point.

    python -m benchmarks.bench_precision --checkpoint mnist-likelihood --threads 1 [--bpd-images 10000] [--samples 1000]
"""

from __future__ import annotations

import argparse
import time
from typing import Any

import torch

from benchmarks.common import Repeats, add_common_args, cpu_usage, resolve_device, save_benchmark, set_threads
from farmer.classifier import classifier_metrics
from farmer.data import make_dataset
from farmer.evaluation import balanced_labels, evaluate_bpd, generate
from farmer.guidance import ResamplingGuidance
from farmer.model import Farmer
from farmer.pixels import dequantize
from farmer.precision import PRECISIONS, autocast, autocast_dtype
from farmer.sampling import SamplingOptions


def round_trip(model: Farmer, pixels: torch.Tensor, amp: torch.dtype | None) -> dict[str, float]:
    """encode then decode (exact inverse) under one policy: the largest and mean error in [-1, 1] units, and the
    share of pixels whose uint8 value changes."""
    x = dequantize(pixels, "uniform", generator=torch.Generator().manual_seed(0)).to(model.device)
    with torch.no_grad(), autocast(model.device, amp):
        back = model.decode(*model.encode(x)[:2])
    error = (back - x).abs()
    moved = ((back.clamp(-1, 1) + 1) * 127.5).round() != ((x + 1) * 127.5).round()
    return {"max_abs_error": error.max().item(), "mean_abs_error": error.mean().item(),
            "pixels_changed": moved.double().mean().item()}


def sample_quality(model: Farmer, data: str, n: int, guidance: float, amp: torch.dtype | None) -> dict[str, float]:
    options = SamplingOptions(guidance=ResamplingGuidance(guidance) if guidance else None, batch_size=100)
    labels = balanced_labels(model, n)
    start = time.perf_counter()
    with autocast(model.device, amp):
        images = generate(model, n, labels, options)
    seconds = time.perf_counter() - start
    return {**classifier_metrics(images, data, labels), "sampling_s": seconds}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(parser)
    parser.add_argument("--checkpoint", default="mnist-likelihood", help="a shipped model's name or a run directory")
    parser.add_argument("--data", default="mnist")
    parser.add_argument("--bpd-images", type=int, default=10_000, help="test images for bits/dim (all: 10,000)")
    parser.add_argument("--round-trip-images", type=int, default=256)
    parser.add_argument("--samples", type=int, default=1_000, help="CFG samples for the classifier metrics")
    parser.add_argument("--guidance", type=float, default=2.5)
    parser.add_argument("--precisions", nargs="+", choices=PRECISIONS, default=["fp32", "bf16"])
    args = parser.parse_args(argv)
    threads = set_threads(args.threads)
    device = resolve_device(args.device)
    model = Farmer.from_pretrained(args.checkpoint).to(device).eval()
    test = make_dataset(args.data, "test", None, model.config.image_size)
    pixels = torch.stack([test[i][0] for i in range(args.round_trip_images)])
    rows = {}
    with cpu_usage() as usage:
        for precision in args.precisions:
            amp = autocast_dtype(precision, device)
            with autocast(device, amp):
                bpd = evaluate_bpd(model, test, max_images=args.bpd_images)
            rows[precision] = {"round_trip": round_trip(model, pixels, amp), "bits_per_dim": bpd,
                               "samples": sample_quality(model, args.data, args.samples, args.guidance, amp)}
            r = rows[precision]
            print(f"{precision:>5}: bits/dim {bpd:.4f}  round trip max {r['round_trip']['max_abs_error']:.2e} "
                  f"mean {r['round_trip']['mean_abs_error']:.2e} ({100 * r['round_trip']['pixels_changed']:.2f}% "
                  f"of uint8 pixels change)  CFG accuracy {100 * r['samples']['accuracy']:.1f}%  Fréchet "
                  f"{r['samples']['frechet_distance']:.1f}  sampling {r['samples']['sampling_s']:.1f} s")
    if len(rows) > 1:
        base, *others = args.precisions
        for other in others:
            print(f"{other} vs {base}: bits/dim {rows[other]['bits_per_dim'] - rows[base]['bits_per_dim']:+.4f}, "
                  f"accuracy {100 * (rows[other]['samples']['accuracy'] - rows[base]['samples']['accuracy']):+.1f} "
                  f"points, sampling {rows[base]['samples']['sampling_s'] / rows[other]['samples']['sampling_s']:.2f}×")
    return save_benchmark(f"precision-{args.checkpoint.replace('/', '_')}", args, device, Repeats(0, 1), usage,
                          threads=threads, policies=rows)


if __name__ == "__main__":
    main()
