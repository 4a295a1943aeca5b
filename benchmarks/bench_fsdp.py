"""FSDP with sharded checkpoints on a real preset, on the CPU: each rank's peak memory against one process's,
and an exact resume from a sharded checkpoint.

Four runs, each a fresh process (tree), so that every peak is its own; every run saves after each step:

    sharded-stop      torchrun, 2 processes, FSDP, 1 image per rank: step 1, a sharded save, exit
    sharded-resume    the same command again: it resumes from those shards and trains step 2
    sharded-straight  2 processes, steps 1 and 2 without stopping: the reference for the resume
    single            one process, 1 image, steps 1 and 2 (full safetensors checkpoints)

The resume is exact when step 2's raw and EMA weights (read back from the shards) equal the reference's bit for
bit. The data is a folder of synthetic 64×64 RGB PNGs (unconditional, as the ImageNet-64 preset is).

    flock /tmp/farmer-heavy.lock python -m benchmarks.bench_fsdp [--preset imagenet64-556m] [--set flow_blocks=8]
        [--memory-only]

writes benchmarks/results/fsdp-PRESET[-CHANGES].json and prints a table.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from benchmarks.common import RESULTS_DIR, environment, peak_rss_bytes, subprocess_env, write_result
from farmer.checkpoint import load_sharded_weights
from farmer.config import FarmerConfig, parse_assignments
from farmer.io import count_parameters
from farmer.model import Farmer

GIB = 2**30


def synthetic_images(folder: Path, count: int, size: int) -> Path:
    """``count`` smooth random RGB PNGs of ``size``² in ``folder/synthetic`` (one class: unconditional data)."""
    images = folder / "synthetic"
    images.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for index in range(count):
        coarse = rng.integers(0, 256, (size // 8, size // 8, 3), dtype=np.uint8)
        Image.fromarray(coarse).resize((size, size), Image.BILINEAR).save(images / f"{index:03d}.png")
    return folder


def worker(spec_file: Path) -> None:
    """One rank of a run (or the single process): train as the spec says, then record this process's peak."""
    from farmer.train import TrainConfig, train

    spec = json.loads(spec_file.read_text())
    torch.set_num_threads(1)
    start = time.perf_counter()
    train(FarmerConfig.from_dict(spec["model"]), TrainConfig.from_dict(spec["train"]), spec["out"], device="cpu",
          progress=False, log=print, stop_at=spec["stop_at"])
    rank = int(os.environ.get("RANK", "0"))
    record = {"rank": rank, "peak_rss_bytes": peak_rss_bytes(), "seconds": time.perf_counter() - start}
    Path(f"{spec['result']}.rank{rank}.json").write_text(json.dumps(record))


def launch(name: str, processes: int, spec: dict[str, Any], work: Path) -> list[dict[str, Any]]:
    """Run the worker in ``processes`` processes (torchrun when more than one); their records, by rank."""
    spec = {**spec, "result": str(work / name)}
    spec_file = work / f"{name}.json"
    spec_file.write_text(json.dumps(spec))
    command = [sys.executable, str(Path(__file__).resolve()), "--worker", str(spec_file)]
    if processes > 1:
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}",
                   *command[1:]]
    env = {**subprocess_env(), "OMP_NUM_THREADS": "1"}
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    print(f"{name}: {' '.join(command[-4:])}", flush=True)
    subprocess.run(command, env=env, check=True)
    return [json.loads((work / f"{name}.rank{rank}.json").read_text()) for rank in range(processes)]


def weights_equal(a: Path, b: Path) -> bool:
    """Raw and EMA weights of two sharded runs' newest checkpoints equal bit for bit."""
    for ema in (False, True):
        ours, reference = load_sharded_weights(a, ema=ema), load_sharded_weights(b, ema=ema)
        if ours.keys() != reference.keys() or not all(torch.equal(ours[k], v) for k, v in reference.items()):
            return False
    return True


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--worker", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--preset", default="imagenet64-556m")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="change a field of the preset (e.g. flow_blocks=8 where the preset does not fit)")
    parser.add_argument("--images", type=int, default=32)
    parser.add_argument("--memory-only", action="store_true",
                        help="only the sharded-stop and single runs: the memory figures, no resume check")
    parser.add_argument("--out", type=Path, default=RESULTS_DIR)
    args = parser.parse_args()
    if args.worker is not None:
        worker(args.worker)
        return
    from farmer.train import TrainConfig

    model_config = FarmerConfig.preset(args.preset).replace(**parse_assignments(FarmerConfig, args.set, "--set"))
    if model_config.conditional:
        raise ValueError(f"{args.preset} is class-conditional; this benchmark's synthetic data has no classes")
    with torch.device("meta"):
        parameters = count_parameters(Farmer(model_config))
    with tempfile.TemporaryDirectory(prefix="farmer-fsdp-") as tmp:
        work = Path(tmp)
        data = synthetic_images(work / "images", args.images, model_config.image_size)
        base = TrainConfig.preset(args.preset).to_dict()
        train = {**base, "data": str(data), "steps": 10, "warmup_steps": 1, "log_every": 1, "save_every": 1,
                 "eval_images": 2, "sharding": "fsdp", "checkpoint_format": "sharded"}
        spec = {"model": model_config.to_dict()}
        sharded = {**spec, "train": {**train, "batch_size": 2}, "out": str(work / "sharded")}
        runs = {"sharded-stop": launch("sharded-stop", 2, {**sharded, "stop_at": 1}, work)}
        if not args.memory_only:
            runs["sharded-resume"] = launch("sharded-resume", 2, {**sharded, "stop_at": 2}, work)
            runs["sharded-straight"] = launch("sharded-straight", 2, {**sharded, "out": str(work / "straight"),
                                                                      "stop_at": 2}, work)
        runs["single"] = launch("single", 1, {**spec, "train": {**train, "batch_size": 1},
                                              "out": str(work / "single"), "stop_at": 2}, work)
        exact = None if args.memory_only else weights_equal(work / "sharded", work / "straight")
    result = {"name": "fsdp", "environment": environment(torch.device("cpu")), "preset": args.preset,
              "changes": args.set, "parameters": parameters, "runs": runs, "exact_resume": exact}
    name = "fsdp-" + "-".join([args.preset, *args.set]).replace("=", "")
    print(f"wrote {write_result(name, result, args.out)}")
    print(f"\n{args.preset} {' '.join(args.set)}: {parameters / 1e6:.0f}M parameters, 1 image per process")
    print(f"{'run':18s} {'rank':>4s} {'peak RSS':>10s} {'wall':>8s}")
    for name, records in runs.items():
        for record in records:
            print(f"{name:18s} {record['rank']:4d} {record['peak_rss_bytes'] / GIB:8.2f} G {record['seconds']:7.0f} s")
    if exact is not None:
        print(f"resume from shards exact (raw and EMA weights at step 2, bit for bit): {exact}")
    if exact is False:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
