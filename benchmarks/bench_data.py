"""Input-pipeline throughput: packed uint8 shards (``farmer data pack``) against decoding the JPEG folder.

Makes a synthetic class-per-subfolder folder of 500×375 JPEGs (ImageNet's typical shape; smooth random
content plus mild noise, quality 90) in a temporary directory, packs it at each size, then times a
DataLoader (batch 64, random order, persistent workers, the way training reads) over each source with 1 and
2 workers. The figure of merit is images/s per worker: what one CPU core feeds, so the cores a GPU needs
follow. Both sources are read from a warm page cache (just written); a cold multi-terabyte ImageNet pack
also needs the disk to stream size²·3 bytes per image.

    OMP_NUM_THREADS=1 python -m benchmarks.bench_data --quick
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, RandomSampler

from benchmarks.common import add_common_args, cpu_usage, measure, positive_int, repeats_for, save_benchmark
from farmer.data import make_dataset
from farmer.packing import pack_image_folder

BATCH = 64
JPEG_SHAPE = (375, 500)  # height, width


def make_jpeg_folder(root: Path, images: int, classes: int, seed: int = 0) -> dict[str, Any]:
    """``images`` JPEGs spread over ``classes`` subfolders; returns their count and mean file size."""
    rng = np.random.default_rng(seed)
    height, width = JPEG_SHAPE
    total = 0
    for i in range(images):
        coarse = Image.fromarray(rng.integers(0, 256, size=(6, 8, 3), dtype=np.uint8))
        smooth = np.asarray(coarse.resize((width, height), Image.Resampling.BICUBIC), dtype=np.int16)
        noisy = np.clip(smooth + rng.normal(0, 6, size=smooth.shape), 0, 255).astype(np.uint8)
        path = root / f"class{i % classes:03d}" / f"{i:06d}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(noisy).save(path, quality=90)
        total += path.stat().st_size
    return {"images": images, "classes": classes, "shape_hw": list(JPEG_SHAPE), "mean_bytes": total / images}


def loader_rate(dataset: Dataset, workers: int, batches: int, quick: bool) -> dict[str, Any]:
    """Images/s of full passes of ``batches`` random batches through persistent workers (start-up excluded)."""
    sampler = RandomSampler(dataset, num_samples=batches * BATCH, generator=torch.Generator().manual_seed(0))
    loader = DataLoader(dataset, batch_size=BATCH, sampler=sampler, num_workers=workers, persistent_workers=True)
    timing = measure(lambda: sum(1 for _ in loader), torch.device("cpu"), repeats_for(quick))
    rate = batches * BATCH / timing.median
    return {"workers": workers, "images_per_s": rate, "images_per_s_per_worker": rate / workers,
            "timing": timing.to_dict()}


def bench_size(folder: Path, packed: Path, size: int, workers: list[int], batches: int,
               quick: bool) -> dict[str, Any]:
    """Both sources at one size: per worker count, the rates and the packed/folder ratio."""
    sources = {"jpeg_folder": make_dataset(str(folder), "train", image_size=size, val_fraction=0.01),
               "packed": make_dataset(str(packed), "train", image_size=size, val_fraction=0.01)}
    rows = []
    for count in workers:
        rates = {name: loader_rate(dataset, count, batches, quick) for name, dataset in sources.items()}
        ratio = rates["packed"]["images_per_s"] / rates["jpeg_folder"]["images_per_s"]
        rows.append({"workers": count, **rates, "packed_over_folder": ratio})
    return {"size": size, "rows": rows}


def run(args: argparse.Namespace) -> dict[str, Any]:
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="bench_data_") as tmp, cpu_usage() as usage:
        folder = Path(tmp) / "jpegs"
        source = make_jpeg_folder(folder, args.images, args.classes)
        results, packing = [], []
        for size in args.sizes:
            packed = Path(tmp) / f"packed{size}"
            start = time.perf_counter()
            pack_image_folder(folder, packed, size, workers=max(args.workers))
            seconds = time.perf_counter() - start
            packing.append({"size": size, "workers": max(args.workers), "seconds": seconds,
                            "images_per_s": args.images / seconds})
            results.append(bench_size(folder, packed, size, args.workers, args.batches, args.quick))
    print_table(results, packing)
    return save_benchmark("data", args, torch.device("cpu"), repeats_for(args.quick), usage, source=source,
                          batch_size=BATCH, batches_per_pass=args.batches, packing=packing, results=results,
                          load_average_before=list(load_before), load_average_after=list(os.getloadavg()))


def print_table(results: list[dict[str, Any]], packing: list[dict[str, Any]]) -> None:
    print(f"{'size':>5} {'workers':>7} {'JPEG img/s/worker':>18} {'packed img/s/worker':>20} {'packed/JPEG':>12}")
    for result in results:
        for row in result["rows"]:
            print(f"{result['size']:>5} {row['workers']:>7} {row['jpeg_folder']['images_per_s_per_worker']:>18.0f} "
                  f"{row['packed']['images_per_s_per_worker']:>20.0f} {row['packed_over_folder']:>11.1f}×")
    for entry in packing:
        print(f"packing at {entry['size']}: {entry['images_per_s']:.0f} images/s with {entry['workers']} workers")


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(parser)
    parser.add_argument("--images", type=positive_int, default=2000, help="synthetic JPEGs to make")
    parser.add_argument("--classes", type=positive_int, default=8)
    parser.add_argument("--sizes", type=positive_int, nargs="+", default=[256, 64])
    parser.add_argument("--workers", type=positive_int, nargs="+", default=[1, 2], help="DataLoader worker counts")
    parser.add_argument("--batches", type=positive_int, default=12, help="batches of 64 per timed pass")
    args = parser.parse_args(argv)
    if args.batches * BATCH > args.images:
        parser.error(f"--batches {args.batches} × {BATCH} exceeds --images {args.images}")
    return run(args)


if __name__ == "__main__":
    main()
