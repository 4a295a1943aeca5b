"""Copy a trained run's newest checkpoint into a shippable directory: config.json + EMA weights only.

    python scripts/ship_checkpoint.py --run runs/mnist-distilled --teacher-run runs/mnist --out farmer/checkpoints/mnist

The optimizer and RNG state (only needed to resume training) and the raw weights are left behind; the EMA
weights are stored in float16 by default (loaded back into float32: MNIST test bits/dim moves by < 1e-4, while the
package's models stay small; `--dtype float32` keeps them exact). The
teacher run's training config and metrics log summary are recorded in provenance.json. Any folder under
farmer/checkpoints/ is package data and a shipped model: `--checkpoint NAME` and `Farmer.from_pretrained(NAME)`.
"""

import argparse
import json
import shutil
from pathlib import Path

import torch

from farmer.model import Farmer
from farmer.pretrained import (
    CONFIG,
    EMA_WEIGHTS,
    MODEL_WEIGHTS,
    load_weights,
    read_config,
    resolve_checkpoint,
    write_weights,
)


def last_record(run: Path, key: str) -> dict:
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return next((r for r in reversed(records) if key in r), {})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", required=True, help="run (or step) directory to ship")
    parser.add_argument("--teacher-run", default=None, help="for a distilled run: the teacher's run directory")
    parser.add_argument("--out", required=True)
    parser.add_argument("--dtype", choices=["float16", "float32"], default="float16", help="stored weights")
    args = parser.parse_args()

    step_dir = resolve_checkpoint(args.run)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(step_dir / CONFIG, out / CONFIG)
    # EMA weights ship under the plain name: Farmer.from_pretrained falls back to them when no ema file exists.
    write_weights(out / MODEL_WEIGHTS, load_weights(step_dir / EMA_WEIGHTS), getattr(torch, args.dtype))
    provenance = {"run": str(args.run), "step": read_config(step_dir)["step"], "weights": f"EMA, {args.dtype}",
                  "last_log": last_record(Path(args.run), "loss")}
    if args.teacher_run:
        teacher = read_config(args.teacher_run)
        provenance["teacher"] = {"run": str(args.teacher_run), "step": teacher["step"], "train": teacher["train"],
                                 "last_log": last_record(Path(args.teacher_run), "loss"),
                                 "last_eval": last_record(Path(args.teacher_run), "test_bpd")}
    (out / "provenance.json").write_text(json.dumps(provenance, indent=2) + "\n")
    Farmer.from_pretrained(out)  # the shipped directory must load on its own
    print(f"shipped {step_dir} -> {out} ({sum(f.stat().st_size for f in out.iterdir()) / 2**20:.1f} MiB)")


if __name__ == "__main__":
    main()
