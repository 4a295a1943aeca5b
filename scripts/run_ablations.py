"""Run FARMER's component ablation (farmer.ablation) with one training budget for every variant.

python scripts/run_ablations.py --out runs/ablation --steps 400 --batch-size 32
python scripts/run_ablations.py --out /tmp/smoke --smoke          # seconds, on the 8x8 digits
Re-running the same command resumes: finished variants are skipped, interrupted training continues.
"""

from __future__ import annotations

import argparse
import json

import torch

from farmer.ablation import VARIANTS, AblationConfig, results_table, run_ablation
from farmer.config import FarmerConfig, parse_assignments


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="output directory (one subfolder per variant)")
    parser.add_argument("--smoke", action="store_true", help="tiny preset on digits, 2 variants, 4 steps")
    parser.add_argument("--data", default=None)
    parser.add_argument("--data-root", default=None)
    parser.add_argument("--preset", default=None, help="baseline model preset (default mnist)")
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="model config override applied to every variant, typed by the field, e.g. flow_width=64",
    )
    for flag, kind in (
        ("--steps", int),
        ("--batch-size", int),
        ("--lr", float),
        ("--warmup-steps", int),
        ("--ema-decay", float),
        ("--seed", int),
        ("--eval-images", int),
        ("--num-samples", int),
        ("--sample-batch", int),
        ("--guidance-scale", float),
    ):
        parser.add_argument(flag, type=kind, default=None)
    parser.add_argument("--guided-metrics", action="store_true", default=None,
                        help="also score resampling-CFG samples of every variant")
    parser.add_argument("--variants", default=None, help=f"comma-separated subset of {','.join(VARIANTS)}")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--device", default=None)
    args = parser.parse_args()

    if args.threads:
        torch.set_num_threads(args.threads)
    options = {
        key: value
        for key, value in vars(args).items()
        if value is not None and key in AblationConfig.__dataclass_fields__
    }
    if args.set:
        try:
            options["model_overrides"] = parse_assignments(FarmerConfig, args.set, "--set")
        except ValueError as err:
            parser.error(str(err))
    if args.variants:
        options["variants"] = tuple(v.strip() for v in args.variants.split(","))
    cfg = AblationConfig.smoke(**options) if args.smoke else AblationConfig(**options)
    print(json.dumps(cfg.to_dict()), flush=True)
    results = run_ablation(cfg, args.out, device=args.device, log=lambda line: print(line, flush=True))
    print(results_table(cfg, results))


if __name__ == "__main__":
    main()
