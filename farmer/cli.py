"""The ``farmer`` command: thin argument parsing over the library.

    farmer sample   [--checkpoint DIR] --n 64 --classes 0-9 --guidance 2.5 --out grid.png [--npz FILE]
    farmer train    --preset mnist --data mnist --out runs/NAME [--steps N ...] [--set key=value ...]
    farmer distill  --teacher DIR --out DIR [--steps N]
    farmer eval     bpd|fid|classifier|distill [--checkpoint DIR | --npz FILE] ...
    farmer analyze  separation|variance|logdet|unguided --checkpoint DIR --out DIR
    farmer data     prepare NAME
    farmer presets
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
import torch

from farmer.data import make_dataset

SHIPPED_CHECKPOINT = "checkpoints/mnist"


def shipped_checkpoint() -> Path:
    """The model the repository ships: ./checkpoints/mnist from a checkout, else the packaged copy."""
    local = Path(__file__).resolve().parent.parent / SHIPPED_CHECKPOINT
    if local.is_dir():
        return local
    packaged = Path(str(resources.files("farmer"))) / "assets" / "mnist"
    if packaged.is_dir():
        return packaged
    raise FileNotFoundError(f"no shipped checkpoint found at {local}; pass --checkpoint DIR")


def parse_classes(text: str | None, num_classes: int) -> list[int] | None:
    """'0-9', '3', '1,4,7' or '0-4,9' -> a list of class indices."""
    if text is None:
        return None
    classes: list[int] = []
    for part in text.split(","):
        lo, _, hi = part.strip().partition("-")
        try:
            classes.extend(range(int(lo), int(hi or lo) + 1))
        except ValueError:
            raise ValueError(f"--classes must look like 0-9 or 1,4,7, got {text!r}") from None
    bad = [c for c in classes if not 0 <= c < num_classes]
    if bad:
        raise ValueError(f"classes {bad} are out of range for a model with {num_classes} classes")
    return classes


def _parse_value(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def _overrides(pairs: list[str]) -> dict[str, Any]:
    result = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep:
            raise ValueError(f"--set takes key=value, got {pair!r}")
        result[key.replace("-", "_")] = _parse_value(value)
    return result


# Commands -----------------------------------------------------------------------------------------------
def cmd_presets(args: argparse.Namespace) -> None:
    from farmer import Farmer, FarmerConfig
    from farmer.config import PRESETS

    for name in PRESETS:
        cfg = FarmerConfig.preset(name)
        with torch.device("meta"):
            model = Farmer(cfg)
        flow = sum(p.numel() for p in model.flow.parameters())
        prior = sum(p.numel() for p in model.prior.parameters())
        print(f"{name:22s} {cfg.channels}×{cfg.image_size}² p={cfg.patch_size} N={cfg.num_tokens} "
              f"d={cfg.token_dim} d_I={cfg.informative_dim}  AF {flow / 1e6:8.2f}M  AR {prior / 1e6:8.2f}M  "
              f"total {(flow + prior) / 1e6:8.2f}M")


def cmd_data(args: argparse.Namespace) -> None:
    from farmer.data import prepare_dataset

    print(prepare_dataset(args.name, args.root))


def cmd_train(args: argparse.Namespace) -> None:
    from farmer import FarmerConfig
    from farmer.checkpoint import read_config
    from farmer.train import TrainConfig, train

    out = Path(args.out)
    if (out / "LATEST").is_file() and args.preset is None:
        # Resume with the stored configs; command-line training options still apply on top.
        stored = read_config(out)
        model_config = FarmerConfig.from_dict(stored["model"])
        train_config = TrainConfig.from_dict(stored["train"])
    else:
        preset = args.preset or "mnist"
        model_config = FarmerConfig.preset(preset)
        train_config = TrainConfig.preset(preset)
    model_config = model_config.replace(**_overrides(args.set))
    options = {"data": args.data, "data_root": args.data_root, "steps": args.steps, "batch_size": args.batch_size,
               "lr": args.lr, "warmup_steps": args.warmup_steps, "grad_accum": args.grad_accum, "seed": args.seed,
               "precision": args.precision, "compile": args.compile or None, "sharding": args.sharding,
               "num_workers": args.num_workers, "eval_every": args.eval_every, "sample_every": args.sample_every,
               "save_every": args.save_every, "ema_decay": args.ema_decay}
    train_config = dataclasses.replace(train_config, **{k: v for k, v in options.items() if v is not None})
    result = train(model_config, train_config, out, device=args.device, stop_at=args.stop_at)
    print(json.dumps(result, indent=2))


def cmd_distill(args: argparse.Namespace) -> None:
    from farmer import FarmerConfig
    from farmer.checkpoint import read_config
    from farmer.train import DISTILL_DEFAULTS, TrainConfig, train

    teacher = read_config(args.teacher)
    model_config = FarmerConfig.from_dict(teacher["model"]).replace(distilled_inverse=True)
    teacher_train = teacher.get("train", {})
    options = {"data": args.data or teacher_train.get("data", "mnist"),
               "data_root": args.data_root or teacher_train.get("data_root"), "steps": args.steps,
               "batch_size": args.batch_size, "lr": args.lr, "seed": args.seed, "teacher_weights": args.teacher_weights}
    train_config = TrainConfig(**{**DISTILL_DEFAULTS, "objective": "distill", "teacher": str(args.teacher),
                                  **{k: v for k, v in options.items() if v is not None}})
    result = train(model_config, train_config, args.out, device=args.device, stop_at=args.stop_at)
    print(json.dumps(result, indent=2))


def _guidance(args: argparse.Namespace):
    from farmer.guidance import NaiveGuidance, ResamplingGuidance

    if args.guidance is None or args.cfg == "none":
        return None
    if args.cfg == "naive":
        return NaiveGuidance(scale=args.guidance)
    return ResamplingGuidance(scale=args.guidance)


def _sampling_options(args: argparse.Namespace) -> dict[str, Any]:
    return {"guidance": _guidance(args), "variance_scale": args.variance_scale, "temperature": args.temperature,
            "inverse": args.inverse}


def _load(args: argparse.Namespace, ema: bool = True):
    from farmer.checkpoint import load_model

    checkpoint = Path(args.checkpoint) if args.checkpoint else shipped_checkpoint()
    return checkpoint, load_model(checkpoint, ema=ema, map_location=args.device or "cpu")


def cmd_sample(args: argparse.Namespace) -> None:
    from farmer.evaluation import generate
    from farmer.images import save_grid
    from farmer.metrics import save_npz_images

    checkpoint, model = _load(args)
    cfg = model.config
    if args.classes is not None and not cfg.conditional:
        raise ValueError("--classes given, but the model is unconditional")
    classes = parse_classes(args.classes, cfg.num_classes)
    if classes:
        per_class = max(1, args.n // len(classes))
        labels, nrow = torch.tensor(classes).repeat_interleave(per_class), per_class
    else:
        labels, nrow = (torch.arange(args.n) % cfg.num_classes if cfg.conditional else None), max(1, int(args.n**0.5))
    n = args.n if labels is None else len(labels)
    start = time.perf_counter()
    pixels = generate(model, n, labels, args.seed, args.batch_size, progress=True, **_sampling_options(args))
    elapsed = time.perf_counter() - start
    path = save_grid(pixels, args.out, nrow=nrow, scale=args.scale)
    print(f"wrote {path} ({n} images from {checkpoint}, {elapsed:.1f} s, {n / elapsed:.1f} img/s)")
    if args.npz:
        nhwc = pixels.permute(0, 2, 3, 1).numpy()
        print(f"wrote {save_npz_images(args.npz, nhwc, None if labels is None else labels.numpy())}")


def _samples_for_metrics(args: argparse.Namespace) -> tuple[torch.Tensor, torch.Tensor | None, str]:
    """uint8 NCHW samples and their labels: from --npz, or drawn from the checkpoint (class-balanced)."""
    from farmer.evaluation import balanced_labels, generate
    from farmer.metrics import load_npz_images

    if args.npz:
        images = torch.from_numpy(load_npz_images(args.npz)).permute(0, 3, 1, 2).contiguous()
        with np.load(args.npz) as data:
            labels = torch.from_numpy(data["labels"]) if "labels" in data.files else None
        return images, labels, str(args.npz)
    checkpoint, model = _load(args)
    labels = balanced_labels(model, args.n)
    images = generate(model, args.n, labels, args.seed, args.batch_size, progress=True, **_sampling_options(args))
    return images, labels, str(checkpoint)


def cmd_eval(args: argparse.Namespace) -> None:
    from farmer import evaluation

    result: dict[str, Any] = {"metric": args.metric, "data": args.data}
    if args.metric == "bpd":
        checkpoint, model = _load(args, ema=not args.raw_weights)
        dataset = make_dataset(args.data, args.split, args.data_root, model.config.image_size)
        result.update(checkpoint=str(checkpoint), split=args.split,
                      images=len(dataset) if args.max_images is None else min(args.max_images, len(dataset)),
                      bits_per_dim=evaluation.evaluate_bpd(model, dataset, args.batch_size, args.max_images,
                                                           progress=True))
    elif args.metric == "distill":
        checkpoint, model = _load(args)
        report = evaluation.compare_inverses(model, args.n, args.batch_size, args.seed, progress=True)
        images = report.pop("images")
        labels = report.pop("labels")
        result.update(checkpoint=str(checkpoint), **report)
        if args.data in ("mnist", "fashion-mnist"):
            from farmer.classifier import classifier_metrics

            result["classifier"] = {k: classifier_metrics(v, args.data, labels) for k, v in images.items()}
    else:
        images, labels, source = _samples_for_metrics(args)
        result["source"] = source
        if args.metric == "fid":
            result.update(evaluation.fid_report(images, args.data, args.split, args.reference_images,
                                                device=args.device, root=args.data_root))
        else:
            from farmer.classifier import classifier_metrics

            result.update(classifier_metrics(images, args.data, labels, reference=args.split))
    print(json.dumps(result, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")


def cmd_analyze(args: argparse.Namespace) -> None:
    from farmer.analysis import run_analysis

    checkpoint = Path(args.checkpoint) if args.checkpoint else shipped_checkpoint()
    result = run_analysis(args.name, checkpoint, args.out, data=args.data, num_images=args.num_images,
                          from_samples=args.from_samples, n_per_cell=args.n_per_cell, seed=args.seed,
                          device=args.device)
    print(json.dumps(result, indent=2, default=str))


def _add_sampling_arguments(p: argparse.ArgumentParser, n: int) -> None:
    p.add_argument("--checkpoint", default=None, help="run or step directory (default: the shipped model)")
    p.add_argument("--n", type=int, default=n, help="number of images")
    p.add_argument("--guidance", type=float, default=None, help="CFG scale w (paper: 2.5); omit for no CFG")
    p.add_argument("--cfg", choices=["resampling", "naive", "none"], default="resampling")
    p.add_argument("--variance-scale", type=float, default=1.0, help="unguided s (paper: 0.9)")
    p.add_argument("--temperature", type=float, default=1.0, help="unguided mixture-weight T (paper: 1.3)")
    p.add_argument("--inverse", choices=["exact", "distilled"], default="exact")
    p.add_argument("--batch-size", type=int, default=250)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default=None)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="farmer", description="FARMER: Flow AutoRegressive Transformer over Pixels")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("presets", help="list the named model sizes with their parameter counts")
    p.set_defaults(func=cmd_presets)

    p = sub.add_parser("data", help="fetch and verify a named dataset")
    p.add_argument("action", choices=["prepare"])
    p.add_argument("name", choices=["mnist", "fashion-mnist", "digits"])
    p.add_argument("--root", default=None, help="data directory (default: $FARMER_DATA or ~/.cache/farmer/data)")
    p.set_defaults(func=cmd_data)

    p = sub.add_parser("train", help="train a model (resumes if --out holds a checkpoint); use torchrun for DDP/FSDP")
    p.add_argument("--preset", default=None, help="model size preset (default mnist; omitted on resume)")
    p.add_argument("--data", default=None, help="mnist, fashion-mnist, digits, or an image-folder path")
    p.add_argument("--data-root", default=None)
    p.add_argument("--out", required=True, help="run directory (checkpoints, metrics.jsonl, samples/)")
    for flag, kind in (("--steps", int), ("--batch-size", int), ("--lr", float), ("--warmup-steps", int),
                       ("--grad-accum", int), ("--seed", int), ("--num-workers", int), ("--eval-every", int),
                       ("--sample-every", int), ("--save-every", int), ("--ema-decay", float),
                       ("--stop-at", int)):
        p.add_argument(flag, type=kind, default=None)
    p.add_argument("--precision", choices=["auto", "fp32", "bf16"], default=None)
    p.add_argument("--sharding", choices=["ddp", "fsdp"], default=None)
    p.add_argument("--compile", action="store_true")
    p.add_argument("--device", default=None)
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="model config override")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("distill", help="train the one-step student of the flow inverse (Algorithm 2)")
    p.add_argument("--teacher", required=True, help="trained checkpoint (run or step directory)")
    p.add_argument("--out", required=True, help="run directory of the distilled model")
    p.add_argument("--data", default=None, help="default: the teacher's training data")
    p.add_argument("--teacher-weights", choices=["ema", "raw"], default=None,
                   help="the teacher checkpoint's EMA (default) or raw weights")
    p.add_argument("--data-root", default=None)
    for flag, kind in (("--steps", int), ("--batch-size", int), ("--lr", float), ("--seed", int),
                       ("--stop-at", int)):
        p.add_argument(flag, type=kind, default=None)
    p.add_argument("--device", default=None)
    p.set_defaults(func=cmd_distill)

    p = sub.add_parser("sample", help="draw a PNG grid (and optionally an .npz) from a checkpoint")
    _add_sampling_arguments(p, n=64)
    p.add_argument("--classes", default=None, help="e.g. 0-9 or 1,4,7: one grid row per class")
    p.add_argument("--out", default="samples.png")
    p.add_argument("--npz", default=None, help="also write uint8 NHWC images under arr_0")
    p.add_argument("--scale", type=int, default=2, help="upscale the PNG grid by this factor")
    p.set_defaults(func=cmd_sample)

    p = sub.add_parser("eval", help="bpd: test bits/dim; fid: FID + precision/recall (Inception); classifier: "
                       "classifier score, Fréchet distance, class accuracy; distill: student vs exact inverse")
    p.add_argument("metric", choices=["bpd", "fid", "classifier", "distill"])
    _add_sampling_arguments(p, n=1000)
    p.add_argument("--npz", default=None, help="score these samples (arr_0, uint8 NHWC) instead of sampling")
    p.add_argument("--data", default="mnist")
    p.add_argument("--data-root", default=None)
    p.add_argument("--split", default="test", help="the data split scored or compared against")
    p.add_argument("--max-images", type=int, default=None, help="bpd: evaluate only the first N images")
    p.add_argument("--reference-images", type=int, default=10_000, help="fid: reference images for statistics")
    p.add_argument("--raw-weights", action="store_true", help="bpd: use the raw instead of the EMA weights")
    p.add_argument("--json", default=None, help="also write the result to this file")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("analyze", help="the paper's analyses as figures (spec §9)")
    p.add_argument("name", choices=["separation", "variance", "logdet", "unguided"])
    p.add_argument("--checkpoint", default=None)
    p.add_argument("--out", default="analysis")
    p.add_argument("--data", default=None)
    p.add_argument("--num-images", type=int, default=64)
    p.add_argument("--from-samples", action="store_true")
    p.add_argument("--n-per-cell", type=int, default=500)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default=None)
    p.set_defaults(func=cmd_analyze)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except (ValueError, FileNotFoundError, RuntimeError, TypeError) as err:
        print(f"farmer: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
