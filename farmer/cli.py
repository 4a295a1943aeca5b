"""The ``farmer`` command: thin argument parsing over the library.

    farmer sample   [--checkpoint NAME|DIR] --n 64 --classes 0-9 --guidance 2.5 [--out grid.png] [--npz FILE]
                    (under torchrun: each rank samples its share of --npz)
    farmer train    --preset mnist --data mnist --out runs/NAME [--steps N ...] [--set key=value ...]
                    [--train-set key=value ...]
    farmer distill  --teacher DIR --out DIR [--steps N]
    farmer eval     bpd|fid|classifier|distill|ood [--checkpoint NAME|DIR | --npz FILE] ...
    farmer score    [--checkpoint NAME|DIR] (--data NAME | --images DIR | --npz FILE) --out scores.csv
    farmer analyze  separation|variance|logdet|unguided --checkpoint DIR --out DIR
    farmer demo     [--checkpoint DIR] [--host 127.0.0.1] [--port 7860]
    farmer data     prepare NAME | pack SRC --out DIR --size 256 [--workers N]
    farmer presets
    farmer plan     --preset NAME | --all [--gpus 8 --gpu-memory 80] [--json FILE]
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import dataclasses
import importlib.util
import io
import json
import os
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from PIL import Image

# Modules whose functions tests replace (monkeypatch) are imported whole and called through their name.
from farmer import analysis, demo, evaluation, metrics
from farmer import plan as planning
from farmer.classifier import CLASSIFIER_DATASETS, classifier_metrics
from farmer.config import PRESETS, FarmerConfig, parse_assignments
from farmer.data import DATASET_NAMES, DEFAULT_VAL_FRACTION, make_dataset, prepare_dataset
from farmer.distill import DISTILL_DEFAULTS
from farmer.distributed import Runtime, init_runtime
from farmer.images import load_samples, save_grid, save_samples, stream_samples
from farmer.io import FarmerError, count_parameters, write_atomic, write_json_atomic
from farmer.model import Farmer
from farmer.packing import DEFAULT_SHARD_SIZE, pack_image_folder
from farmer.precision import PRECISIONS, autocast, autocast_dtype
from farmer.pretrained import DEFAULT_SHIPPED, locate_checkpoint, read_config, read_id2label
from farmer.sampling import SamplingOptions, make_guidance, parse_classes
from farmer.tracking import LOGGERS, TENSORBOARD_INSTALL
from farmer.train import TrainConfig, stored_configs, train

DEFAULT_SAMPLES = 64  # farmer sample --n without --classes, or of an unconditional model
# Bare `farmer sample` of a class-conditional model: the README's recipe, a 10 × 10 grid of classes 0-9 in rows
# under resampling CFG at the paper's w = 2.5 (`--cfg none` samples unguided).
DEFAULT_ROWS, DEFAULT_GUIDANCE = 10, 2.5


def shipped_checkpoint() -> Path:
    """The default model: farmer/checkpoints/mnist, package data, so installed wheels have it too."""
    return locate_checkpoint(DEFAULT_SHIPPED)


def checkpoint_path(args: argparse.Namespace) -> Path:
    """--checkpoint as a directory or a shipped model's name (farmer/checkpoints/NAME); the default model without it."""
    return locate_checkpoint(args.checkpoint) if args.checkpoint else shipped_checkpoint()


def _int_at_least(minimum: int, maximum: int | None = None) -> Callable[[str], int]:
    """An argparse type: integers >= ``minimum`` (and <= ``maximum``), rejected while parsing with the flag named."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be >= {minimum}, got {value}")
        if maximum is not None and value > maximum:
            raise argparse.ArgumentTypeError(f"must be <= {maximum}, got {value}")
        return value
    return parse


positive_int, non_negative_int = _int_at_least(1), _int_at_least(0)
# torch seeds are unsigned 64-bit. The trainer derives per-rank and per-epoch seeds as multiples of its seed
# (farmer/train.py), so a training seed is kept to 32 bits, far from overflowing them.
seed_int, train_seed_int = _int_at_least(0, 2**64 - 1), _int_at_least(0, 2**32 - 1)


# The file name a directory given for a file flag is told to add (e.g. --npz DIR -> DIR/samples.npz).
_EXAMPLE_FILES = {"--npz": "samples.npz", "--json": "result.json"}


def check_output_path(path: str | Path, flag: str, kind: Literal["file", "image", "directory"] = "file",
                      example: str | None = None) -> Path:
    """Fail before any expensive work if ``path`` cannot be written: a file that is a directory (``example``
    names a file to give instead), an image without a known extension (it picks the format), a directory that
    is a file, a file as a parent, or a directory that refuses a new file (read-only, full)."""
    path = Path(path)
    if kind != "directory" and path.is_dir():
        example = example or ("samples.png" if kind == "image" else _EXAMPLE_FILES.get(flag, "output"))
        raise ValueError(f"{flag} {path} is a directory; give a file name (e.g. {path / example})")
    if kind == "directory" and path.exists() and not path.is_dir():
        raise ValueError(f"{flag} {path} is a file, not a directory")
    if kind == "image" and path.suffix.lower() not in Image.registered_extensions():
        raise ValueError(f"{flag} {path} needs an image extension such as .png (the format follows it)")
    parent = next((p for p in path.parents if p.exists()), None)  # None only for '/' itself
    if parent is not None and not parent.is_dir():
        raise ValueError(f"{flag} {path} cannot be written: {parent} is a file, not a directory")
    if parent is not None:
        _probe_writable(parent if kind != "directory" or not path.is_dir() else path, flag, path)
    return path


def _probe_writable(directory: Path, flag: str, path: Path) -> None:
    """Create and delete a file in ``directory``: a read-only or full target fails now, not after the work.
    (A real write, not os.access, which answers yes to root on a read-only mount.)"""
    try:
        with tempfile.TemporaryFile(dir=directory, prefix=".farmer-probe-"):
            pass
    except OSError as err:
        raise ValueError(f"{flag} {path} cannot be written: {directory}: {err.strerror or err}") from None


# TrainConfig fields that `farmer train` and `farmer distill` take as flags (--field-name), with their argparse
# settings: the one list from which both the parsers and the values handed to TrainConfig come. Every default is
# None, "not given": a resumed run keeps its stored value of each option not given.
_TRAIN_FIELD_FLAGS: dict[str, dict[str, Any]] = {
    "data": {"help": "mnist, fashion-mnist, digits, or an image-folder path"},
    "data_root": {},
    "init_from": {"metavar": "CHECKPOINT",
                  "help": "start a new run from these weights (a run, step or shipped model, e.g. mnist); its model "
                          "config is used unless --preset is given; --set may change its training recipe "
                          "(dequantization, noise_std_start/end, label_dropout), not its architecture"},
    "teacher_weights": {"choices": ["ema", "raw"], "help": "the teacher checkpoint's EMA (default) or raw weights"},
    "steps": {"type": positive_int},
    "batch_size": {"type": positive_int},
    "lr": {"type": float},
    "warmup_steps": {"type": non_negative_int},
    "grad_accum": {"type": positive_int},
    "seed": {"type": train_seed_int},
    "num_workers": {"type": non_negative_int},
    "eval_every": {"type": positive_int},
    "sample_every": {"type": positive_int},
    "save_every": {"type": positive_int},
    "ema_decay": {"type": float},
    "val_fraction": {"type": float, "help": "share of an image folder without train/val subfolders held out for test "
                                            f"bits/dim (fixed seed; default {DEFAULT_VAL_FRACTION})"},
    "precision": {"choices": ["auto", "fp32", "bf16"]},
    "sharding": {"choices": ["ddp", "fsdp"]},
    "compile": {"action": "store_true"},
}
TRAIN_FLAGS = ("data", "data_root", "init_from", "steps", "batch_size", "lr", "warmup_steps", "grad_accum", "seed",
               "num_workers", "eval_every", "sample_every", "save_every", "ema_decay", "val_fraction", "precision",
               "sharding", "compile")
DISTILL_FLAGS = ("data", "data_root", "teacher_weights", "steps", "batch_size", "lr", "seed")


def _add_train_field_flags(p: argparse.ArgumentParser, fields: tuple[str, ...], **helps: str) -> None:
    """--field-name flags for these TrainConfig ``fields`` (``helps`` replaces a field's help text)."""
    for name in fields:
        settings = {**_TRAIN_FIELD_FLAGS[name], **({"help": helps[name]} if name in helps else {})}
        p.add_argument("--" + name.replace("_", "-"), dest=name, default=None, **settings)


def _flag_values(args: argparse.Namespace, fields: tuple[str, ...]) -> dict[str, Any]:
    """{field: the flag's value or None (not given)} of these TrainConfig fields."""
    return {name: getattr(args, name) for name in fields}


def _explicit_train_options(args: argparse.Namespace, flags: dict[str, Any]) -> dict[str, Any]:
    """TrainConfig values the user gave: flags (None = not given) and --train-set KEY=VALUE pairs."""
    given = {k: v for k, v in flags.items() if v is not None}
    assigned = parse_assignments(TrainConfig, args.train_set, "--train-set")
    clashes = sorted(k for k in given.keys() & assigned.keys() if given[k] != assigned[k])
    if clashes:
        raise ValueError(f"--train-set contradicts a flag for {', '.join(clashes)}")
    return {**given, **assigned}


def _settle_train_config(out: Path, fresh: TrainConfig, explicit: dict[str, Any]) -> TrainConfig:
    """A new run's training settings are ``fresh``; a resumed run keeps its stored ones. Explicit values
    apply on top either way, and each change to a stored setting is printed."""
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
    for name in PRESETS:
        cfg = FarmerConfig.preset(name)
        with torch.device("meta"):
            model = Farmer(cfg)
        flow, prior = count_parameters(model.flow), count_parameters(model.prior)
        print(f"{name:22s} {cfg.channels}×{cfg.image_size}² p={cfg.patch_size} N={cfg.num_tokens} "
              f"d={cfg.token_dim} d_I={cfg.informative_dim}  AF {flow / 1e6:8.2f}M  AR {prior / 1e6:8.2f}M  "
              f"total {(flow + prior) / 1e6:8.2f}M")


def cmd_plan(args: argparse.Namespace) -> None:
    if (args.preset is None) == (not args.all):
        raise ValueError("give one --preset NAME or --all (every ImageNet preset)")
    if args.preset is not None and args.preset not in PRESETS:
        raise ValueError(f"unknown preset {args.preset!r}; choose from {', '.join(PRESETS)}")
    cluster = planning.Cluster(gpus=args.gpus, gpu_memory_gib=args.gpu_memory, mfu=args.mfu, headroom=args.headroom)
    path = None if args.json is None else check_output_path(args.json, "--json")
    plans = [planning.plan(name, cluster) for name in (planning.IMAGENET_PRESETS if args.all else [args.preset])]
    print(planning.format_table(plans, cluster))
    if path is not None:
        path.write_text(json.dumps({"assumptions": planning.assumptions(cluster), "plans": plans}, indent=2) + "\n")
        print(f"wrote {path}")


def cmd_data(args: argparse.Namespace) -> None:
    print(prepare_dataset(args.name, args.root))


def cmd_pack(args: argparse.Namespace) -> None:
    index = pack_image_folder(args.source, args.out, args.size, args.workers, args.shard_size, progress=True)
    counts = ", ".join(f"{split} {entry['count']} images ({len(entry['skipped'])} unreadable, skipped)"
                       for split, entry in index["splits"].items())
    print(f"packed {args.source} at {args.size}×{args.size} into {args.out}: {counts}")


def cmd_train(args: argparse.Namespace) -> None:
    out = check_output_path(args.out, "--out", "directory")
    # A resumed run keeps its stored model config; --preset or --set there must agree with it (train checks).
    resuming = (out / "LATEST").is_file()
    preset = args.preset or (None if resuming or args.init_from else "mnist")
    if preset:
        model_config = FarmerConfig.preset(preset)
    elif resuming:
        model_config = stored_configs(out)[0]
    else:  # --init-from without --preset: the starting checkpoint's model (its student is distilled anew)
        model_config = FarmerConfig.from_dict(read_config(args.init_from)["model"]).replace(distilled_inverse=False)
    model_config = model_config.replace(**parse_assignments(FarmerConfig, args.set, "--set"))
    train_config = _settle_train_config(out, TrainConfig.preset(preset or "mnist"),
                                        _explicit_train_options(args, _flag_values(args, TRAIN_FLAGS)))
    _run_training(args, model_config, train_config, out)


def _run_training(args: argparse.Namespace, model_config: FarmerConfig, train_config: TrainConfig, out: Path) -> None:
    """Train or resume, after the checks that need no model: optional packages, and a resume with steps left."""
    require_extras([train_config.data], args.log)
    if (out / "LATEST").is_file():
        step = read_config(out).get("step", 0)
        if step > train_config.steps:
            raise ValueError(f"{out} is at step {step}, past --steps {train_config.steps}: nothing to do (give "
                             f"--steps above {step} to train on)")
        if step == train_config.steps:
            print(f"{out} is already trained to step {step} of {train_config.steps}: nothing to do", file=sys.stderr)
            return
    result = train(model_config, train_config, out, device=args.device, stop_at=args.stop_at, logger=args.log)
    print(json.dumps(result, indent=2))


def cmd_distill(args: argparse.Namespace) -> None:
    teacher = read_config(args.teacher)
    model_config = FarmerConfig.from_dict(teacher["model"]).replace(distilled_inverse=True)
    teacher_train = teacher.get("train", {})
    fresh = TrainConfig(**{**DISTILL_DEFAULTS, "objective": "distill", "teacher": str(args.teacher),
                           "data": teacher_train.get("data", "mnist"), "data_root": teacher_train.get("data_root")})
    out = check_output_path(args.out, "--out", "directory")
    explicit = _explicit_train_options(args, _flag_values(args, DISTILL_FLAGS))
    train_config = _settle_train_config(out, fresh, explicit)
    _run_training(args, model_config, train_config, out)


def sampling_options(args: argparse.Namespace) -> SamplingOptions:
    """The sampling flags as one validated SamplingOptions (the one place the CLI builds them)."""
    guidance = None
    if args.guidance is not None and args.cfg != "none":
        guidance = make_guidance(args.cfg, args.guidance, args.cfg_option)
    elif args.cfg_option:
        raise ValueError("--cfg-option needs guidance: pass --guidance W (and not --cfg none)")
    return SamplingOptions(guidance=guidance, variance_scale=args.variance_scale, temperature=args.temperature,
                           inverse=getattr(args, "inverse", "auto"), batch_size=args.batch_size, seed=args.seed)


def _load(args: argparse.Namespace, ema: bool = True, device: torch.device | str | None = None) -> tuple[Path, Farmer]:
    checkpoint = checkpoint_path(args)
    device = device or args.device or default_device()
    return checkpoint, Farmer.from_pretrained(checkpoint, ema=ema, map_location=device)


def default_device() -> torch.device:
    """Where commands run without --device: the accelerator when torch sees one, as training does; else the CPU."""
    return torch.accelerator.current_accelerator() or torch.device("cpu")


def _sample_layout(args: argparse.Namespace, cfg: FarmerConfig) -> tuple[int, torch.Tensor | None, int]:
    """(n, labels, images per grid row) of `farmer sample`: one row per class of --classes, or balanced labels."""
    if args.classes is not None and not cfg.conditional:
        raise ValueError("--classes given, but the model is unconditional")
    # read_id2label: class names, which --classes may use
    classes = parse_classes(args.classes, cfg.num_classes, read_id2label(checkpoint_path(args)))
    if classes is None and cfg.conditional and args.n is None:  # the default grid: a row for each first class
        classes, args.n = list(range(min(DEFAULT_ROWS, cfg.num_classes))), DEFAULT_ROWS * min(DEFAULT_ROWS,
                                                                                              cfg.num_classes)
    if classes:
        # One grid row per class, all of one length.
        if args.n is not None and args.n % len(classes):
            raise ValueError(f"--n {args.n} is not a multiple of the {len(classes)} classes of --classes "
                             f"{args.classes} (one grid row of equal length per class)")
        per_class = max(1, DEFAULT_SAMPLES // len(classes)) if args.n is None else args.n // len(classes)
        labels = torch.tensor(classes).repeat_interleave(per_class)
        return len(labels), labels, per_class
    n = args.n or DEFAULT_SAMPLES
    return n, (torch.arange(n) % cfg.num_classes if cfg.conditional else None), max(1, int(n**0.5))


def _torchrun_runtime(device: str | None) -> Runtime | None:
    """The process group when launched by torchrun with several processes; None for a plain process."""
    if int(os.environ.get("WORLD_SIZE", "1")) == 1:
        return None
    return init_runtime(device)


def cmd_sample(args: argparse.Namespace) -> None:
    # A grid unless only --npz is asked for: a 50,000-image FID set needs none.
    out = args.out if args.out is not None or args.npz else "samples.png"
    if out is not None:
        check_output_path(out, "--out", "image")
    if args.npz:
        check_output_path(args.npz, "--npz")
    rt = _torchrun_runtime(args.device)
    if rt is not None and not args.npz:
        raise ValueError("under torchrun, give --npz FILE: each rank samples its share of it")
    checkpoint, model = _load(args, device=None if rt is None else rt.device)
    if args.guidance is None and args.cfg != "none" and model.config.conditional:
        args.guidance = DEFAULT_GUIDANCE
    n, labels, nrow = _sample_layout(args, model.config)
    shard = (0, 1) if rt is None else (rt.rank, rt.world)
    start = time.perf_counter()
    if rt is None and out is None:  # only --npz: streamed batch by batch, so that millions of images fit
        _stream_samples(args, model, n, labels)
        elapsed = time.perf_counter() - start
        print(f"sampled {n} images from {checkpoint} in {elapsed:.1f} s ({n / elapsed:.1f} img/s); wrote {args.npz}")
        return
    pixels = evaluation.generate(model, n, labels, sampling_options(args), progress=shard[0] == 0, shard=shard)
    if rt is not None:
        pixels = evaluation.gather_samples(pixels, Path(args.npz), rt)
        if pixels is None:  # not rank 0: its share is written
            return
    elapsed = time.perf_counter() - start
    workers = "" if rt is None else f" over {rt.world} processes"
    print(f"sampled {n} images from {checkpoint} in {elapsed:.1f} s ({n / elapsed:.1f} img/s{workers})")
    if out is not None:
        print(f"wrote {save_grid(pixels, out, nrow=nrow, scale=args.scale)}")
    if args.npz:
        print(f"wrote {save_samples(args.npz, pixels, labels)}")


def _stream_samples(args: argparse.Namespace, model: Farmer, n: int, labels: torch.Tensor | None) -> None:
    """Draw the samples of `farmer sample --npz` and write each batch to the file as it comes."""
    cfg = model.config
    batches = evaluation.generate_batches(model, n, labels, sampling_options(args), progress=True)
    stream_samples(args.npz, (n, cfg.channels, cfg.image_size, cfg.image_size), batches, labels)


def _samples_for_metrics(args: argparse.Namespace) -> tuple[torch.Tensor, torch.Tensor | None, str, int | None]:
    """uint8 NCHW samples, their labels, their source and the model's patch size (None for --npz): from --npz,
    or drawn from the checkpoint (class-balanced)."""
    if args.npz:
        images, labels = load_samples(args.npz)
        return images, labels, str(args.npz), None
    checkpoint, model = _load(args)
    labels = evaluation.balanced_labels(model, args.n)
    start = time.perf_counter()
    images = evaluation.generate(model, args.n, labels, sampling_options(args), progress=True)
    _keep_samples(args, images, labels, time.perf_counter() - start)
    return images, labels, str(checkpoint), model.config.patch_size


LONG_SAMPLING_SECONDS = 60.0  # samples that took longer are kept in an .npz even without --keep-samples


def _keep_samples(args: argparse.Namespace, images: torch.Tensor, labels: torch.Tensor | None,
                  seconds: float) -> None:
    """Write the samples an evaluation drew to --keep-samples, or after a long sampling to
    eval-METRIC-samples.npz, before the metric runs: a failure there must not cost the sampling."""
    keep = args.keep_samples or (f"eval-{args.metric}-samples.npz" if seconds >= LONG_SAMPLING_SECONDS else None)
    if keep is None:
        return
    try:
        save_samples(keep, images, labels)
    except OSError as err:
        if args.keep_samples:
            raise
        print(f"farmer: warning: could not keep the samples in {keep}: {err}", file=sys.stderr)
        return
    print(f"kept the {len(images)} samples in {keep} (score them again with --npz {keep})", file=sys.stderr)


def _report(args: argparse.Namespace, result: dict[str, Any]) -> None:
    """Print an evaluation's JSON, and write it to --json when given."""
    print(json.dumps(result, indent=2))
    if args.json:
        write_json_atomic(args.json, result)


def _eval_command(run: Callable[[argparse.Namespace], dict[str, Any]]) -> Callable[[argparse.Namespace], None]:
    """A `farmer eval` sub-command: checks --json and settles the data before the work, reports the result after
    it."""
    def command(args: argparse.Namespace) -> None:
        if args.json:
            check_output_path(args.json, "--json")
        if getattr(args, "keep_samples", None):
            check_output_path(args.keep_samples, "--keep-samples", example="samples.npz")
        _settle_eval_data(args)
        _report(args, {"metric": args.metric, **run(args)})
    return command


# eval ood without --ood-data: the other one of the two look-alike sets.
_OOD_PARTNERS = {"mnist": "fashion-mnist", "fashion-mnist": "mnist"}


def trained_on(checkpoint: Path) -> str | None:
    """The data a checkpoint was trained on, as its config.json records it (None if it does not)."""
    return read_config(checkpoint).get("train", {}).get("data")


def data_for(given: str | None, checkpoint: Path | None, flag: str = "--data") -> str | None:
    """The data to judge a model on: ``given``, else what ``checkpoint`` was trained on (None if neither is
    known). Data other than the model's own is said in one line on stderr: its numbers mean something else."""
    trained = None if checkpoint is None else trained_on(checkpoint)
    if given is not None and trained is not None and given != trained:
        print(f"farmer: note: scoring {trained}'s model on {given} ({flag})", file=sys.stderr)
    return given if given is not None else trained


def _settle_eval_data(args: argparse.Namespace) -> None:
    """Fill --data (--in-data and --ood-data for ood) from the checkpoint's config.json when not given, so that
    a model is scored on its own data by default; --npz samples without --checkpoint record no data."""
    from_npz = getattr(args, "npz", None) and not args.checkpoint
    checkpoint = None if from_npz else checkpoint_path(args)
    if args.metric == "ood":
        args.in_data = data_for(args.in_data, checkpoint, "--in-data")
        args.ood_data = args.ood_data or _OOD_PARTNERS.get(args.in_data)
        if args.ood_data is None:
            raise ValueError(f"give --ood-data: there is no default out-of-distribution set for {args.in_data}")
        require_extras([args.in_data, args.ood_data])
        return
    args.data = data_for(args.data, checkpoint)
    require_extras([args.data])
    needs_data = not (args.metric == "fid" and args.ref_stats) and args.metric != "distill"
    if args.data is None and needs_data:
        raise ValueError(f"give --data: {'an .npz of samples' if from_npz else checkpoint} does not record the "
                         "data it comes from")


def eval_bpd(args: argparse.Namespace) -> dict[str, Any]:
    if args.breakdown and args.importance_samples > 1:
        raise ValueError("--breakdown splits the one-sample bound; drop --importance-samples")
    checkpoint, model = _load(args, ema=not args.raw_weights)
    dataset = make_dataset(args.data, args.split, args.data_root, model.config.image_size, args.val_fraction)
    header = {"data": args.data, "checkpoint": str(checkpoint), "split": args.split,
              "images": len(dataset) if args.max_images is None else min(args.max_images, len(dataset)),
              "importance_samples": args.importance_samples}
    if args.breakdown:
        return {**header, **evaluation.bpd_breakdown(model, dataset, args.batch_size, args.max_images, progress=True)}
    result = {**header, "bits_per_dim": evaluation.evaluate_bpd(model, dataset, args.batch_size, args.max_images,
                                                                progress=True,
                                                                importance_samples=args.importance_samples)}
    if model.config.conditional:  # docs/method.md §5: bits of log p(x | c); log p(x | ∅) beside them
        result["unconditional_bits_per_dim"] = evaluation.evaluate_bpd(
            model, dataset, args.batch_size, args.max_images, progress=True,
            importance_samples=args.importance_samples, conditional=False)
    if model.dequantizer is not None:  # its learned dequantisation's bound beside the uniform one, never instead
        result["variational_bits_per_dim"] = evaluation.evaluate_bpd(
            model, dataset, args.batch_size, args.max_images, progress=True,
            importance_samples=args.importance_samples, bound="variational")
    return result


def eval_fid(args: argparse.Namespace) -> dict[str, Any]:
    # Every dependency before the sampling: the Inception weights, and the reference statistics or data.
    extractor = metrics.InceptionFeatures(device=args.device, progress=True)
    if args.ref_stats:
        metrics.load_reference_statistics(args.ref_stats)
    elif args.data in DATASET_NAMES:  # an image folder is read lazily; its size is the samples'
        make_dataset(args.data, args.split, args.data_root)
    images, _, source, _ = _samples_for_metrics(args)
    return {"data": args.data, "source": source,
            **evaluation.fid_report(images, args.data, args.split, args.reference_images, args.precision_recall_images,
                         device=args.device, root=args.data_root, ref_stats=args.ref_stats,
                         real_vs_real=not args.no_real_vs_real, extractor=extractor)}


def _check_classifier_fits(data: str, channels: int, size: int, what: str) -> None:
    """Refuse, before any sampling, data or images that no shipped classifier reads."""
    if data not in CLASSIFIER_DATASETS:
        raise ValueError(f"eval classifier: no shipped classifier for {data}; there are classifiers for "
                         f"{', '.join(CLASSIFIER_DATASETS)} only")
    if (channels, size) != (1, 28):
        raise ValueError(f"eval classifier: {what} has {channels}×{size}² images; the shipped classifiers read "
                         "1×28² (MNIST, Fashion-MNIST)")


def eval_classifier(args: argparse.Namespace) -> dict[str, Any]:
    if not args.npz:
        model = FarmerConfig.from_dict(read_config(checkpoint_path(args))["model"])
        _check_classifier_fits(args.data, model.channels, model.image_size, "the model")
    images, labels, source, patch_size = _samples_for_metrics(args)
    _check_classifier_fits(args.data, images.shape[1], images.shape[-1], source)
    result = {"data": args.data, "source": source,
              **classifier_metrics(images, args.data, labels, reference=args.split)}
    if patch_size is not None:  # the stripe statistic at the model's patch period (docs/quality.md)
        reference = evaluation.dataset_pixels(args.data, args.split, len(images), images.shape[-1], args.data_root)
        result["stripe_ratio"] = metrics.stripe_ratio(images, reference, patch_size)
    return result


def eval_distill(args: argparse.Namespace) -> dict[str, Any]:
    checkpoint, model = _load(args)
    report = evaluation.compare_inverses(model, args.n, sampling_options(args), progress=True)
    images, labels = report.pop("images"), report.pop("labels")
    result = {"data": args.data, "checkpoint": str(checkpoint), **report}
    if args.data in CLASSIFIER_DATASETS:
        result["classifier"] = {k: classifier_metrics(v, args.data, labels) for k, v in images.items()}
    return result


def eval_ood(args: argparse.Namespace) -> dict[str, Any]:
    checkpoint, model = _load(args)
    size = model.config.image_size
    inside, outside = (evaluation.dataset_pixels(data, args.split, args.n, size, args.data_root)
                       for data in (args.in_data, args.ood_data))
    return {"checkpoint": str(checkpoint), "in_data": args.in_data, "ood_data": args.ood_data, "split": args.split,
            "images": {"in": len(inside), "ood": len(outside)},
            "scores": evaluation.ood_report(model, inside, outside, args.batch_size, args.seed, progress=True)}


def cmd_score(args: argparse.Namespace) -> None:
    out = check_output_path(args.out, "--out", example="scores.csv")
    if args.data:
        data_for(args.data, checkpoint_path(args))
    checkpoint, model = _load(args)
    images, labels, names = evaluation.images_to_score(
        model.config, data=args.data, split=args.split, data_root=args.data_root, npz=args.npz, folder=args.images,
        max_images=args.max_images)
    scores = evaluation.score_images(model, images, labels, args.batch_size, args.seed, progress=True)
    columns = {"index": np.arange(len(images)), **({"file": np.array(names)} if names else {}),
               **({"label": labels.numpy()} if labels is not None else {}), **scores}
    table = io.StringIO()
    writer = csv.writer(table)
    writer.writerow(columns)
    writer.writerows(zip(*(np.round(v, 5) if v.dtype.kind == "f" else v for v in columns.values()), strict=True))
    write_atomic(out, table.getvalue())
    means = ", ".join(f"{k} {v.mean():.4f}" for k, v in scores.items() if k.startswith("bpd"))
    print(f"wrote {out}: {len(images)} images scored by {checkpoint}; mean bits/dim: {means}")


def cmd_analyze(args: argparse.Namespace) -> None:
    check_output_path(args.out, "--out", "directory")
    checkpoint = checkpoint_path(args)
    result = analysis.run_analysis(args.name, checkpoint, args.out, data=args.data, num_images=args.num_images,
                                   from_samples=args.from_samples, n_per_cell=args.n_per_cell, seed=args.seed,
                                   device=args.device)
    print(json.dumps(result, indent=2, default=str))


def cmd_demo(args: argparse.Namespace) -> None:
    demo.serve(checkpoint_path(args), args.host, args.port, str(args.device or default_device()))


CHECKPOINT_HELP = "run or step directory, or a shipped model's name (default: the shipped mnist)"


def _add_model_arguments(p: argparse.ArgumentParser, batch_size: int = 250) -> None:
    p.add_argument("--checkpoint", default=None, help=CHECKPOINT_HELP)
    p.add_argument("--batch-size", type=positive_int, default=batch_size)
    p.add_argument("--seed", type=seed_int, default=0, help="0 to 2^64 - 1")
    p.add_argument("--device", default=None, help="default: the accelerator torch sees, else the CPU")
    p.add_argument("--precision", choices=PRECISIONS, default="auto", dest="inference_precision",
                   help="farmer.precision: auto = bf16 trunks on accelerators, fp32 on CPUs (where bf16 sampling "
                        "measured slower); fp32 = the exact policy")


def _add_sampling_arguments(p: argparse.ArgumentParser, n: int | None, n_help: str = "number of images",
                            inverse: bool = True) -> None:
    _add_model_arguments(p)
    p.add_argument("--n", type=positive_int, default=n, help=n_help)
    p.add_argument("--guidance", type=float, default=None,
                   help="CFG scale w (paper: 2.5). Without it `farmer sample` of a class-conditional model uses "
                        "2.5 unless --cfg none; every other command samples unguided")
    p.add_argument("--cfg", choices=["resampling", "naive", "none"], default="resampling")
    p.add_argument("--cfg-option", action="append", default=[], metavar="KEY=VALUE",
                   help="a guidance knob, e.g. eval_weight_temperature=0.2 or temperature_convention=multiply "
                        "(repeatable; every knob and its default: docs/guidance.md)")
    p.add_argument("--variance-scale", type=float, default=1.0, help="unguided s (paper: 0.9)")
    p.add_argument("--temperature", type=float, default=1.0, help="unguided mixture-weight T (paper: 1.3)")
    if inverse:
        p.add_argument("--inverse", choices=["auto", "exact", "jacobi", "distilled"], default="auto",
                       help="flow inverse: sequential, Jacobi-iterated (same result, parallel over tokens), the "
                            "student, or auto: exact or Jacobi, whichever is faster at the batch size (default)")


def _add_data_arguments(p: argparse.ArgumentParser, what: str = "the data") -> None:
    p.add_argument("--data", default=None, help=f"{what}: mnist, fashion-mnist, digits or an image folder (default: "
                   "the data the checkpoint was trained on, from its config.json; another is noted on stderr)")
    p.add_argument("--data-root", default=None)
    p.add_argument("--split", default="test", help="the data split")


def _add_keep_samples_argument(p: argparse.ArgumentParser) -> None:
    p.add_argument("--keep-samples", default=None, metavar="FILE",
                   help="write the drawn samples to this .npz before scoring them (without it, a sampling of more "
                        f"than {LONG_SAMPLING_SECONDS:.0f} s is kept in eval-METRIC-samples.npz)")


def _add_log_argument(p: argparse.ArgumentParser) -> None:
    p.add_argument("--log", choices=LOGGERS, default="jsonl",
                   help="tensorboard: also mirror metrics.jsonl and the sample grids to OUT/tensorboard "
                        "(needs the tensorboard extra)")


def _add_train_set_argument(p: argparse.ArgumentParser) -> None:
    p.add_argument("--train-set", action="append", default=[], metavar="KEY=VALUE",
                   help="any TrainConfig field, e.g. weight_decay=0.01, min_lr=1e-6, grad_clip=0.5, ema_decay=0.999 "
                        "(repeatable; on resume, like every flag, it overrides the stored value)")


def _add_training_commands(sub: argparse._SubParsersAction) -> None:
    """The train and distill commands."""
    p = sub.add_parser("train", help="train a model (resumes if --out holds a checkpoint); use torchrun for DDP/FSDP")
    p.add_argument("--preset", default=None, help="model size preset (default mnist; omitted on resume)")
    p.add_argument("--out", required=True, help="run directory (checkpoints, metrics.jsonl, samples/)")
    _add_train_field_flags(p, TRAIN_FLAGS)
    p.add_argument("--stop-at", type=positive_int, default=None)
    p.add_argument("--device", default=None)
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="model config override, typed by the field (e.g. final_permute=false, informative_channels=4)")
    _add_train_set_argument(p)
    _add_log_argument(p)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("distill", help="train the one-step student of the flow inverse (Algorithm 2)")
    p.add_argument("--teacher", required=True, help="trained checkpoint (run or step directory)")
    p.add_argument("--out", required=True, help="run directory of the distilled model")
    _add_train_field_flags(p, DISTILL_FLAGS, data="default: the teacher's training data")
    p.add_argument("--stop-at", type=positive_int, default=None)
    p.add_argument("--device", default=None)
    _add_train_set_argument(p)
    _add_log_argument(p)
    p.set_defaults(func=cmd_distill)


def _add_sampling_commands(sub: argparse._SubParsersAction) -> None:
    """The sample and score commands."""
    p = sub.add_parser("sample", help="draw a PNG grid and/or an .npz from a checkpoint (sharded under torchrun)")
    _add_sampling_arguments(p, n=None, n_help=f"number of images; with --classes a multiple of the class count "
                            f"(default {DEFAULT_SAMPLES} // classes per class). Default: a {DEFAULT_ROWS} × "
                            f"{DEFAULT_ROWS} grid of the first classes of a conditional model, {DEFAULT_SAMPLES} "
                            "images of an unconditional one")
    p.add_argument("--classes", default=None, help="e.g. 0-9, 1,4,7 or class names from the checkpoint's "
                   "config.json id2label (sandal,sneaker for fashion-mnist): one grid row per class")
    p.add_argument("--out", default=None, help="the PNG (or other image format, by extension) grid (default "
                   "samples.png; none when only --npz is given)")
    p.add_argument("--npz", default=None, help="write uint8 NHWC images under arr_0 and labels under labels (the "
                   "layout FID suites read); without --out it is streamed batch by batch (millions fit); under "
                   "torchrun each rank samples its share")
    p.add_argument("--scale", type=positive_int, default=2, help="upscale the PNG grid by this factor")
    p.set_defaults(func=cmd_sample)

    p = sub.add_parser("score", help="per-image bits/dim (exact likelihood) of a data split, image folder or .npz")
    _add_model_arguments(p, batch_size=256)
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--data", default=None, help="a named data set or an image folder with class subfolders")
    source.add_argument("--images", default=None, help="a folder of image files (any depth), scored without labels")
    source.add_argument("--npz", default=None, help="uint8 NHWC images under arr_0 (labels, if any, under labels)")
    p.add_argument("--data-root", default=None)
    p.add_argument("--split", default="test", help="with --data: the split")
    p.add_argument("--max-images", type=positive_int, default=None, help="score only the first N images")
    p.add_argument("--out", default="scores.csv", help="the CSV: index, file or label when known, bpd_unconditional "
                   "(null class), bpd_conditional (under the label), best_class and bpd_best_class")
    p.set_defaults(func=cmd_score)


def _add_eval_commands(sub: argparse._SubParsersAction) -> None:
    """The eval command and its sub-commands."""
    p = sub.add_parser("eval", help="evaluate a checkpoint or a sample file (sub-commands: bpd, fid, classifier, "
                       "distill, ood)")
    metrics = p.add_subparsers(dest="metric", required=True)

    q = metrics.add_parser("bpd", help="test bits/dim, uniform dequantisation, EMA weights; of log p(x | c) "
                           "for a conditional model, with log p(x | null class)'s beside it")
    _add_model_arguments(q)
    _add_data_arguments(q)
    q.add_argument("--max-images", type=positive_int, default=None, help="evaluate only the first N images")
    q.add_argument("--val-fraction", type=float, default=DEFAULT_VAL_FRACTION,
                   help="an image folder without train/val subfolders: the held-out share, as in training")
    q.add_argument("--raw-weights", action="store_true", help="use the raw instead of the EMA weights")
    q.add_argument("--importance-samples", type=positive_int, default=1, metavar="K",
                   help="K dequantisations per image, importance-weighted: a tighter bound on the discrete data's "
                        "bits (1, the default, is the standard bound published flows report)")
    q.add_argument("--breakdown", action="store_true",
                   help="also split the bits/dim into the prior's informative and redundant factors and the flow's "
                        "log-det, and per patch (a map, and blank vs ink patches)")
    q.set_defaults(run=eval_bpd)

    q = metrics.add_parser("fid", help="FID and improved precision/recall (TF-Inception) against a data split or an "
                           "ADM reference batch")
    _add_sampling_arguments(q, n=1000, n_help="samples to draw (the paper's protocol: 50,000)")
    q.add_argument("--npz", default=None, help="score these samples (arr_0, uint8 NHWC) instead of sampling")
    _add_keep_samples_argument(q)
    _add_data_arguments(q, what="the reference data (without --ref-stats)")
    q.add_argument("--reference-images", type=positive_int, default=10_000,
                   help="reference images for the statistics of --data")
    q.add_argument("--ref-stats", default=None, help="an ADM reference batch .npz (mu, sigma; arr_0 reference images "
                   "for precision/recall), e.g. VIRTUAL_imagenet256_labeled.npz")
    q.add_argument("--precision-recall-images", type=positive_int, default=2_000,
                   help="samples and reference images for precision/recall (k = 3)")
    q.add_argument("--no-real-vs-real", action="store_true",
                   help="skip the FID of as many real images of the other split against the same reference")
    q.set_defaults(run=eval_fid)

    q = metrics.add_parser("classifier", help="classifier score, Fréchet distance in the shipped classifier's "
                           "features, class accuracy (MNIST, Fashion-MNIST)")
    _add_sampling_arguments(q, n=1000)
    q.add_argument("--npz", default=None, help="score these samples (arr_0, uint8 NHWC; labels) instead of sampling")
    _add_keep_samples_argument(q)
    _add_data_arguments(q, what="the classifier's data")
    q.set_defaults(run=eval_classifier)

    q = metrics.add_parser("distill", help="the distilled inverse against the exact one on the same prior latents")
    _add_sampling_arguments(q, n=1000, inverse=False)
    q.add_argument("--data", default=None, help="mnist or fashion-mnist: also classifier metrics of both inverses "
                   "(default: the checkpoint's training data)")
    q.set_defaults(run=eval_distill)

    q = metrics.add_parser("ood", help="out-of-distribution detection by likelihood: AUROC of −log p(x) and of "
                           "corrected scores")
    _add_model_arguments(q, batch_size=256)
    q.add_argument("--in-data", default=None, help="the in-distribution data (default: the model's training data, "
                   "from its config.json)")
    q.add_argument("--ood-data", default=None, help="the out-of-distribution data (default: fashion-mnist for an "
                   "mnist model, mnist for a fashion-mnist one)")
    q.add_argument("--data-root", default=None)
    q.add_argument("--split", default="test", help="the split of both data sets")
    q.add_argument("--n", type=positive_int, default=2_000, help="images per side")
    q.set_defaults(run=eval_ood)

    for q in metrics.choices.values():
        q.add_argument("--json", default=None, help="also write the result to this file")
        q.set_defaults(func=_eval_command(q.get_default("run")))


def _add_data_commands(sub: argparse._SubParsersAction) -> None:
    """The presets and data commands."""
    p = sub.add_parser("presets", help="list the named model sizes with their parameter counts")
    p.set_defaults(func=cmd_presets)

    p = sub.add_parser("plan", help="what training a preset takes on GPUs: FLOPs, memory, batch that fits, days")
    p.add_argument("--preset", default=None, help="a preset name (farmer presets)")
    p.add_argument("--all", action="store_true", help="every ImageNet preset")
    p.add_argument("--gpus", type=positive_int, default=8)
    p.add_argument("--gpu-memory", type=float, default=80.0, help="GiB per GPU (default 80, an H100)")
    p.add_argument("--mfu", type=float, default=0.4, help="assumed share of the 989 TFLOP/s bf16 peak (default 0.4)")
    p.add_argument("--headroom", type=float, default=0.15, help="share of GPU memory left free (default 0.15)")
    p.add_argument("--json", default=None, help="also write the plans and assumptions to this file")
    p.set_defaults(func=cmd_plan)

    p = sub.add_parser("data", help="fetch and verify a named dataset, or pack an image folder into shards")
    actions = p.add_subparsers(dest="action", required=True)
    q = actions.add_parser("prepare", help="fetch and verify a named dataset")
    q.add_argument("name", choices=["mnist", "fashion-mnist", "digits"])
    q.add_argument("--root", default=None, help="data directory (default: $FARMER_DATA or ~/.cache/farmer/data)")
    q.set_defaults(func=cmd_data)
    q = actions.add_parser("pack", help="decode and ADM-centre-crop an image folder once into uint8 shards that "
                                        "--data DIR trains from (farmer/packing.py)")
    q.add_argument("source", help="class-per-subfolder image folder, optionally under train/val/test")
    q.add_argument("--out", required=True, help="new directory for the shards (resumes DIR.partial if present)")
    q.add_argument("--size", type=positive_int, required=True, help="image side after the crop, e.g. 256")
    q.add_argument("--workers", type=positive_int, default=min(8, os.cpu_count() or 1),
                   help="decoding processes (default: min(8, CPUs))")
    q.add_argument("--shard-size", type=positive_int, default=DEFAULT_SHARD_SIZE, help="images per shard")
    q.set_defaults(func=cmd_pack)


def _add_tool_commands(sub: argparse._SubParsersAction) -> None:
    """The analyze and demo commands."""
    p = sub.add_parser("analyze", help="the paper's analyses as figures (docs/method.md §9)")
    p.add_argument("name", choices=["separation", "variance", "logdet", "unguided"])
    p.add_argument("--checkpoint", default=None)
    p.add_argument("--out", default="analysis")
    p.add_argument("--data", default=None)
    p.add_argument("--num-images", type=positive_int, default=64)
    p.add_argument("--from-samples", action="store_true")
    p.add_argument("--n-per-cell", type=positive_int, default=500)
    p.add_argument("--seed", type=seed_int, default=0)
    p.add_argument("--device", default=None)
    p.set_defaults(func=cmd_analyze)

    p = sub.add_parser("demo", help="a local web page to sample, guide and score images")
    p.add_argument("--checkpoint", default=None, help="run or step directory (default: the shipped model)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default loopback only)")
    p.add_argument("--port", type=int, default=7860)
    p.add_argument("--device", default=None)
    p.set_defaults(func=cmd_demo)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="farmer", description="FARMER: Flow AutoRegressive Transformer over Pixels")
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()} (torch {torch.__version__})")
    sub = parser.add_subparsers(dest="command", required=True)
    for add_commands in (_add_data_commands, _add_training_commands, _add_sampling_commands, _add_eval_commands,
                         _add_tool_commands):
        add_commands(sub)
    _show_defaults(parser)
    return parser


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("farmer-flow")
    except PackageNotFoundError:  # a source tree on the path, not installed
        return "unknown (not installed)"


class _DefaultsHelpFormatter(argparse.HelpFormatter):
    """Every option's help ends with its default, except where that says nothing (None, False, an empty list)."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        if "%(default)" in text or not action.option_strings or _says_nothing(action.default):
            return text
        return f"{text} (default: %(default)s)".strip()


def _says_nothing(default: Any) -> bool:
    # By identity: 0 and 0.0 are defaults worth showing, though they equal False.
    return default is None or default is False or default is argparse.SUPPRESS or default == []


def _show_defaults(parser: argparse.ArgumentParser) -> None:
    """_DefaultsHelpFormatter for ``parser`` and all its sub-command parsers; options without help get one that
    names their default (argparse prints no help line for them otherwise)."""
    parser.formatter_class = _DefaultsHelpFormatter
    for action in parser._actions:
        if action.help is None and action.option_strings and not _says_nothing(action.default):
            action.help = "default: %(default)s"
        if isinstance(action, argparse._SubParsersAction):
            for child in action.choices.values():
                _show_defaults(child)


def check_device(name: str | None) -> None:
    """--device names a device this torch build has (torch's own answer for CUDA is an AssertionError)."""
    if name is None:
        return
    try:
        device = torch.device(name)
    except RuntimeError as err:
        raise ValueError(f"--device {name!r} is not a device name: {err}") from None
    backend = getattr(torch, device.type, None)
    if device.type != "cpu" and backend is not None and hasattr(backend, "is_available"):
        if not backend.is_available():
            cpu_build = device.type == "cuda" and torch.version.cuda is None and torch.version.hip is None
            build = f" (this torch {torch.__version__} is built without CUDA)" if cpu_build else ""
            raise ValueError(f"--device {name}: no {device.type} device is available{build}; use --device cpu")
        count = backend.device_count() if hasattr(backend, "device_count") else None
        if device.index is not None and count is not None and device.index >= count:
            raise ValueError(f"--device {name}: there are only {count} {device.type} device(s)")


def require_extras(datasets: list[str | None], log: str | None = None, fid: bool = False) -> None:
    """ImportError naming the optional package (pyproject extra) to install, for what these arguments will need:
    checked before any work, never a traceback once the model is built."""
    installs = {"sklearn": "the 'digits' data set needs scikit-learn: pip install 'farmer-flow[all]'",
                "tensorboard": f"--log tensorboard needs tensorboard: {TENSORBOARD_INSTALL}"}
    needed = (["sklearn"] if "digits" in datasets else []) + (["tensorboard"] if log == "tensorboard" else [])
    for module in needed:
        if importlib.util.find_spec(module) is None:
            raise ImportError(installs[module])
    if fid:
        metrics.inception_weights_path()


def _show_warning(message: Warning | str, category: type[Warning], filename: str, lineno: int,
                  file: Any = None, line: str | None = None) -> None:
    """farmer's own warnings as one 'farmer: warning:' line on stderr; others in Python's format."""
    if Path(filename).resolve().is_relative_to(Path(__file__).resolve().parent):
        print(f"farmer: warning: {message}", file=sys.stderr)
    else:
        print(warnings.formatwarning(message, category, filename, lineno, line), end="", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    with warnings.catch_warnings():
        warnings.showwarning = _show_warning
        return _run(argv)


def _inference_precision(args: argparse.Namespace) -> contextlib.AbstractContextManager[None]:
    """The autocast of --precision for the commands that load a model to sample or score (training has its own)."""
    precision = getattr(args, "inference_precision", None)
    if precision is None:
        return contextlib.nullcontext()
    device = torch.device(args.device) if args.device else default_device()
    return autocast(device, autocast_dtype(precision, device))


def _run(argv: list[str] | None) -> int:
    args = build_parser().parse_args(argv)
    try:
        check_device(getattr(args, "device", None))
        require_extras([getattr(args, key, None) for key in ("data", "in_data", "ood_data")],
                       getattr(args, "log", None), getattr(args, "metric", None) == "fid")
        with _inference_precision(args):
            args.func(args)
    # User errors, said in one line: bad input (ValueError), unwritable paths and the like (OSError), a missing
    # optional package named by the message (ImportError), the failures farmer raises for the user to act on
    # (FarmerError) and running out of device memory. Anything else is a bug and keeps its traceback.
    except (ValueError, OSError, ImportError, FarmerError, torch.OutOfMemoryError) as err:
        print(f"farmer: error: {err}", file=sys.stderr)
        return getattr(err, "exit_status", 2)  # e.g. 143 for training stopped by SIGTERM, 130 by Ctrl-C
    except KeyboardInterrupt:  # Ctrl-C outside a training loop (which saves first, above): nothing to save
        print("farmer: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
