"""The ``farmer`` command: thin argument parsing over the library.

    farmer sample   [--checkpoint DIR] --n 64 --classes 0-9 --guidance 2.5 --out grid.png [--npz FILE]
    farmer train    --preset mnist --data mnist --out runs/NAME [--steps N ...] [--set key=value ...]
                    [--train-set key=value ...]
    farmer distill  --teacher DIR --out DIR [--steps N]
    farmer eval     bpd|fid|classifier|distill [--checkpoint DIR | --npz FILE] ...
    farmer analyze  separation|variance|logdet|unguided --checkpoint DIR --out DIR
    farmer demo     [--checkpoint DIR] [--host 127.0.0.1] [--port 7860]
    farmer data     prepare NAME
    farmer presets
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import torch

from farmer.data import DEFAULT_VAL_FRACTION, make_dataset

if TYPE_CHECKING:
    from farmer.train import TrainConfig

SHIPPED_CHECKPOINT = "checkpoints/mnist"
DEFAULT_SAMPLES = 64  # farmer sample without --n


def shipped_checkpoint() -> Path:
    """The model the repository ships: ./checkpoints/mnist of a source checkout.

    The checkpoint is not part of the installed package (only the metric classifiers in farmer/assets are), so
    an installed copy without the checkout has none and must be given ``--checkpoint DIR``."""
    local = Path(__file__).resolve().parent.parent / SHIPPED_CHECKPOINT
    if local.is_dir():
        return local
    raise FileNotFoundError(f"no shipped checkpoint found at {local}; pass --checkpoint DIR")


def parse_classes(text: str | None, num_classes: int) -> list[int] | None:
    """'0-9', '3', '1,4,7' or '0-4,9' -> a list of class indices."""
    if text is None:
        return None
    classes: list[int] = []
    for part in text.split(","):
        match = re.fullmatch(r"(\d+)(?:-(\d+))?", part.strip())
        if match is None:
            raise ValueError(f"--classes must look like 0-9, 3 or 1,4-6, got {text!r}")
        lo, hi = int(match[1]), int(match[2] or match[1])
        if hi < lo:
            raise ValueError(f"--classes range {part.strip()!r} is descending; write {hi}-{lo}")
        classes.extend(range(lo, hi + 1))
    bad = [c for c in classes if not 0 <= c < num_classes]
    if bad:
        raise ValueError(f"classes {bad} are out of range for a model with {num_classes} classes")
    return classes


def _int_at_least(minimum: int) -> Callable[[str], int]:
    """An argparse type: integers >= ``minimum``, rejected while parsing with the flag named."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be >= {minimum}, got {value}")
        return value
    return parse


positive_int, non_negative_int = _int_at_least(1), _int_at_least(0)


def check_output_path(path: str | Path, flag: str, kind: Literal["file", "image", "directory"] = "file") -> Path:
    """Fail before any expensive work if ``path`` cannot be written: a file that is a directory, an image
    without a known extension (it picks the format), a directory that is a file, or a file as a parent."""
    from PIL import Image

    path = Path(path)
    if kind != "directory" and path.is_dir():
        raise ValueError(f"{flag} {path} is a directory; give a file name (e.g. {path / 'samples.png'})")
    if kind == "directory" and path.exists() and not path.is_dir():
        raise ValueError(f"{flag} {path} is a file, not a directory")
    if kind == "image" and path.suffix.lower() not in Image.registered_extensions():
        raise ValueError(f"{flag} {path} needs an image extension such as .png (the format follows it)")
    parent = next((p for p in path.parents if p.exists()), None)  # None only for '/' itself
    if parent is not None and not parent.is_dir():
        raise ValueError(f"{flag} {path} cannot be written: {parent} is a file, not a directory")
    return path


def _explicit_train_options(args: argparse.Namespace, flags: dict[str, Any]) -> dict[str, Any]:
    """TrainConfig values the user gave: flags (None = not given) and --train-set KEY=VALUE pairs."""
    from farmer.config import parse_assignments
    from farmer.train import TrainConfig

    given = {k: v for k, v in flags.items() if v is not None}
    assigned = parse_assignments(TrainConfig, args.train_set, "--train-set")
    clashes = sorted(k for k in given.keys() & assigned.keys() if given[k] != assigned[k])
    if clashes:
        raise ValueError(f"--train-set contradicts a flag for {', '.join(clashes)}")
    return {**given, **assigned}


def _settle_train_config(out: Path, fresh: TrainConfig, explicit: dict[str, Any]) -> TrainConfig:
    """A new run's training settings are ``fresh``; a resumed run keeps its stored ones. Explicit values
    apply on top either way, and each change to a stored setting is printed."""
    from farmer.train import stored_configs

    if not (out / "LATEST").is_file():
        return dataclasses.replace(fresh, **explicit)
    stored = stored_configs(out)[1]
    settled = dataclasses.replace(stored, **explicit)
    changes = [f"{key} {old!r} -> {getattr(settled, key)!r}" for key, old in stored.to_dict().items()
               if getattr(settled, key) != old]
    print(f"resuming {out} with its stored training settings"
          + (f"; changed on the command line: {', '.join(changes)}" if changes else ""))
    return settled


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
    from farmer.config import parse_assignments
    from farmer.train import TrainConfig, stored_configs, train

    out = check_output_path(args.out, "--out", "directory")
    # A resumed run keeps its stored model config; --preset or --set there must agree with it (train checks).
    preset = args.preset or (None if (out / "LATEST").is_file() else "mnist")
    model_config = FarmerConfig.preset(preset) if preset else stored_configs(out)[0]
    model_config = model_config.replace(**parse_assignments(FarmerConfig, args.set, "--set"))
    options = {"data": args.data, "data_root": args.data_root, "steps": args.steps, "batch_size": args.batch_size,
               "lr": args.lr, "warmup_steps": args.warmup_steps, "grad_accum": args.grad_accum, "seed": args.seed,
               "precision": args.precision, "compile": args.compile, "sharding": args.sharding,
               "num_workers": args.num_workers, "eval_every": args.eval_every, "sample_every": args.sample_every,
               "save_every": args.save_every, "ema_decay": args.ema_decay, "val_fraction": args.val_fraction}
    train_config = _settle_train_config(out, TrainConfig.preset(preset or "mnist"),
                                        _explicit_train_options(args, options))
    result = train(model_config, train_config, out, device=args.device, stop_at=args.stop_at)
    print(json.dumps(result, indent=2))


def cmd_distill(args: argparse.Namespace) -> None:
    from farmer import FarmerConfig
    from farmer.checkpoint import read_config
    from farmer.train import DISTILL_DEFAULTS, TrainConfig, train

    teacher = read_config(args.teacher)
    model_config = FarmerConfig.from_dict(teacher["model"]).replace(distilled_inverse=True)
    teacher_train = teacher.get("train", {})
    fresh = TrainConfig(**{**DISTILL_DEFAULTS, "objective": "distill", "teacher": str(args.teacher),
                           "data": teacher_train.get("data", "mnist"), "data_root": teacher_train.get("data_root")})
    options = {"data": args.data, "data_root": args.data_root, "steps": args.steps, "batch_size": args.batch_size,
               "lr": args.lr, "seed": args.seed, "teacher_weights": args.teacher_weights}
    out = check_output_path(args.out, "--out", "directory")
    train_config = _settle_train_config(out, fresh, _explicit_train_options(args, options))
    result = train(model_config, train_config, out, device=args.device, stop_at=args.stop_at)
    print(json.dumps(result, indent=2))


def _guidance(args: argparse.Namespace):
    from farmer.guidance import NaiveGuidance, ResamplingGuidance, guidance_options

    if args.guidance is None or args.cfg == "none":
        if args.cfg_option:
            raise ValueError("--cfg-option needs guidance: pass --guidance W (and not --cfg none)")
        return None
    kind = NaiveGuidance if args.cfg == "naive" else ResamplingGuidance
    return kind(scale=args.guidance, **guidance_options(kind, args.cfg_option))


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

    check_output_path(args.out, "--out", "image")
    if args.npz:
        check_output_path(args.npz, "--npz")
    checkpoint, model = _load(args)
    cfg = model.config
    if args.classes is not None and not cfg.conditional:
        raise ValueError("--classes given, but the model is unconditional")
    classes = parse_classes(args.classes, cfg.num_classes)
    if classes:
        # One grid row per class, all of one length.
        if args.n is not None and args.n % len(classes):
            raise ValueError(f"--n {args.n} is not a multiple of the {len(classes)} classes of --classes "
                             f"{args.classes} (one grid row of equal length per class)")
        per_class = max(1, DEFAULT_SAMPLES // len(classes)) if args.n is None else args.n // len(classes)
        labels, nrow = torch.tensor(classes).repeat_interleave(per_class), per_class
        n = len(labels)
    else:
        n = args.n or DEFAULT_SAMPLES
        labels, nrow = (torch.arange(n) % cfg.num_classes if cfg.conditional else None), max(1, int(n**0.5))
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

    if args.json:
        check_output_path(args.json, "--json")
    result: dict[str, Any] = {"metric": args.metric, "data": args.data}
    if args.metric == "bpd":
        checkpoint, model = _load(args, ema=not args.raw_weights)
        dataset = make_dataset(args.data, args.split, args.data_root, model.config.image_size, args.val_fraction)
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

    check_output_path(args.out, "--out", "directory")
    checkpoint = Path(args.checkpoint) if args.checkpoint else shipped_checkpoint()
    result = run_analysis(args.name, checkpoint, args.out, data=args.data, num_images=args.num_images,
                          from_samples=args.from_samples, n_per_cell=args.n_per_cell, seed=args.seed,
                          device=args.device)
    print(json.dumps(result, indent=2, default=str))


def cmd_demo(args: argparse.Namespace) -> None:
    from farmer.demo import serve

    serve(Path(args.checkpoint) if args.checkpoint else shipped_checkpoint(), args.host, args.port,
          args.device or "cpu")


def _add_sampling_arguments(p: argparse.ArgumentParser, n: int | None, n_help: str = "number of images") -> None:
    p.add_argument("--checkpoint", default=None, help="run or step directory (default: the shipped model)")
    p.add_argument("--n", type=positive_int, default=n, help=n_help)
    p.add_argument("--guidance", type=float, default=None, help="CFG scale w (paper: 2.5); omit for no CFG")
    p.add_argument("--cfg", choices=["resampling", "naive", "none"], default="resampling")
    p.add_argument("--cfg-option", action="append", default=[], metavar="KEY=VALUE",
                   help="a guidance knob, e.g. eval_weight_temperature=0.2 or temperature_convention=multiply "
                        "(repeatable; every knob and its default: docs/guidance.md)")
    p.add_argument("--variance-scale", type=float, default=1.0, help="unguided s (paper: 0.9)")
    p.add_argument("--temperature", type=float, default=1.0, help="unguided mixture-weight T (paper: 1.3)")
    p.add_argument("--inverse", choices=["exact", "jacobi", "distilled"], default="exact",
                   help="flow inverse: sequential, Jacobi-iterated (same result, parallel over tokens), or the student")
    p.add_argument("--batch-size", type=positive_int, default=250)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default=None)


def _add_train_set_argument(p: argparse.ArgumentParser) -> None:
    p.add_argument("--train-set", action="append", default=[], metavar="KEY=VALUE",
                   help="any TrainConfig field, e.g. weight_decay=0.01, min_lr=1e-6, grad_clip=0.5, ema_decay=0.999 "
                        "(repeatable; on resume, like every flag, it overrides the stored value)")


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
    # Every default is None, "not given": a resumed run keeps its stored value of each option not given.
    for flag, kind in (("--steps", positive_int), ("--batch-size", positive_int), ("--lr", float),
                       ("--warmup-steps", non_negative_int), ("--grad-accum", positive_int), ("--seed", int),
                       ("--num-workers", non_negative_int), ("--eval-every", positive_int),
                       ("--sample-every", positive_int), ("--save-every", positive_int), ("--ema-decay", float),
                       ("--stop-at", positive_int)):
        p.add_argument(flag, type=kind, default=None)
    p.add_argument("--val-fraction", type=float, default=None,
                   help="share of an image folder without train/val subfolders held out for test bits/dim "
                        f"(fixed seed; default {DEFAULT_VAL_FRACTION})")
    p.add_argument("--precision", choices=["auto", "fp32", "bf16"], default=None)
    p.add_argument("--sharding", choices=["ddp", "fsdp"], default=None)
    p.add_argument("--compile", action="store_true", default=None)
    p.add_argument("--device", default=None)
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="model config override, typed by the field (e.g. final_permute=false, informative_channels=4)")
    _add_train_set_argument(p)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("distill", help="train the one-step student of the flow inverse (Algorithm 2)")
    p.add_argument("--teacher", required=True, help="trained checkpoint (run or step directory)")
    p.add_argument("--out", required=True, help="run directory of the distilled model")
    p.add_argument("--data", default=None, help="default: the teacher's training data")
    p.add_argument("--teacher-weights", choices=["ema", "raw"], default=None,
                   help="the teacher checkpoint's EMA (default) or raw weights")
    p.add_argument("--data-root", default=None)
    for flag, kind in (("--steps", positive_int), ("--batch-size", positive_int), ("--lr", float), ("--seed", int),
                       ("--stop-at", positive_int)):
        p.add_argument(flag, type=kind, default=None)
    p.add_argument("--device", default=None)
    _add_train_set_argument(p)
    p.set_defaults(func=cmd_distill)

    p = sub.add_parser("sample", help="draw a PNG grid (and optionally an .npz) from a checkpoint")
    _add_sampling_arguments(p, n=None, n_help=f"number of images (default {DEFAULT_SAMPLES}); with --classes a "
                            f"multiple of the class count (default {DEFAULT_SAMPLES} // classes per class)")
    p.add_argument("--classes", default=None, help="e.g. 0-9 or 1,4,7: one grid row per class")
    p.add_argument("--out", default="samples.png", help="the PNG (or other image format, by extension) grid")
    p.add_argument("--npz", default=None, help="also write uint8 NHWC images under arr_0")
    p.add_argument("--scale", type=positive_int, default=2, help="upscale the PNG grid by this factor")
    p.set_defaults(func=cmd_sample)

    p = sub.add_parser("eval", help="bpd: test bits/dim; fid: FID + precision/recall (Inception); classifier: "
                       "classifier score, Fréchet distance, class accuracy; distill: student vs exact inverse")
    p.add_argument("metric", choices=["bpd", "fid", "classifier", "distill"])
    _add_sampling_arguments(p, n=1000)
    p.add_argument("--npz", default=None, help="score these samples (arr_0, uint8 NHWC) instead of sampling")
    p.add_argument("--data", default="mnist")
    p.add_argument("--data-root", default=None)
    p.add_argument("--split", default="test", help="the data split scored or compared against")
    p.add_argument("--max-images", type=positive_int, default=None, help="bpd: evaluate only the first N images")
    p.add_argument("--val-fraction", type=float, default=DEFAULT_VAL_FRACTION,
                   help="bpd on an image folder without train/val subfolders: the held-out share, as in training")
    p.add_argument("--reference-images", type=positive_int, default=10_000,
                   help="fid: reference images for statistics")
    p.add_argument("--raw-weights", action="store_true", help="bpd: use the raw instead of the EMA weights")
    p.add_argument("--json", default=None, help="also write the result to this file")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("analyze", help="the paper's analyses as figures (docs/method.md §9)")
    p.add_argument("name", choices=["separation", "variance", "logdet", "unguided"])
    p.add_argument("--checkpoint", default=None)
    p.add_argument("--out", default="analysis")
    p.add_argument("--data", default=None)
    p.add_argument("--num-images", type=positive_int, default=64)
    p.add_argument("--from-samples", action="store_true")
    p.add_argument("--n-per-cell", type=positive_int, default=500)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default=None)
    p.set_defaults(func=cmd_analyze)

    p = sub.add_parser("demo", help="a local web page to sample, guide and score images")
    p.add_argument("--checkpoint", default=None, help="run or step directory (default: the shipped model)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default loopback only)")
    p.add_argument("--port", type=int, default=7860)
    p.add_argument("--device", default=None)
    p.set_defaults(func=cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except (ValueError, OSError, RuntimeError, TypeError) as err:  # OSError: unwritable paths and the like
        print(f"farmer: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
