"""The model card the demo page shows: what the model is, how it was trained, and what it measured.

Everything comes from the checkpoint directory: ``config.json`` always, ``metrics.json`` (test bits/dim,
sample metrics) and ``provenance.json`` (the teacher of a distilled model) when present.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, get_args, get_type_hints

from torch import nn

from farmer.io import count_parameters
from farmer.model import Farmer
from farmer.pretrained import SHIPPED_DIR, locate_checkpoint, read_config, read_id2label, resolve_checkpoint

NO_REFERENCE = "no reference range (the checkpoint has no metrics.json with test bits/dim)"


@dataclass(frozen=True)
class Limits:
    """Bounds on what one request may cost: the page runs on the user's CPU, one job at a time."""

    max_images: int = 100
    max_upload_bytes: int = 4 * 2**20
    max_upload_pixels: int = 4096 * 4096
    max_json_bytes: int = 64 * 2**10
    max_guidance: float = 20.0
    max_scale: float = 10.0  # s and T
    socket_timeout_s: float = 30.0  # a connection idle this long (e.g. headers never finished) is closed


def available_inverses(model: Farmer) -> tuple[str, ...]:
    """The flow inverses ``Farmer.sample`` accepts (read from its signature, so a new one shows up on the page
    by itself), less the distilled one when the checkpoint has no student."""
    names = get_args(get_type_hints(Farmer.sample)["inverse"])
    return tuple(name for name in names if name != "distilled" or model.student is not None)


def _millions(module: nn.Module) -> str:
    return f"{count_parameters(module) / 1e6:.2f}M"


def _count(value: Any) -> str:
    """3000 -> '3,000'; anything else (a hand-written config) as it is."""
    return f"{value:,}" if isinstance(value, int) else str(value)


def _optional_json(directories: list[Path], name: str) -> dict[str, Any]:
    """The first readable ``name`` among ``directories``; a missing or broken file just leaves rows out."""
    for directory in directories:
        try:
            data = json.loads((directory / name).read_text())
        except (OSError, ValueError):
            continue
        if isinstance(data, dict):
            return data
    return {}


@dataclass(frozen=True)
class ScoreReference:
    """What an image's bits/dim is compared with: the test set's mean (metrics.json ``test_bits_per_dim``) and,
    when the checkpoint was evaluated for out-of-distribution detection, the other data set's mean."""

    test_mean: float
    ood_data: str | None = None
    ood_mean: float | None = None

    def describe(self) -> str:
        other = f"; {self.ood_data} images {self.ood_mean:.2f}" if self.ood_mean is not None else ""
        return f"test images average {self.test_mean:.2f} bits/dim{other}"

    def compare(self, bpd: float) -> str:
        """Where one score lies: nearer the test set's mean or the other data set's, else how far off it is."""
        gap = bpd - self.test_mean
        if self.ood_mean is not None and abs(bpd - self.ood_mean) < abs(gap):
            return (f"unlike the training data: nearer the {self.ood_data} mean ({self.ood_mean:.2f}) than the "
                    f"test-set mean ({self.test_mean:.2f})")
        side = "above" if gap > 0 else "below"
        return f"{abs(gap):.2f} bits/dim {side} the test-set mean ({self.test_mean:.2f})"


def score_reference(metrics: dict[str, Any]) -> ScoreReference | None:
    """The test set's mean bits/dim from metrics.json, with the OOD evaluation's other set when recorded."""
    test = metrics.get("test_bits_per_dim")
    if isinstance(test, bool) or not isinstance(test, float | int):
        return None
    evaluations = metrics.get("evaluations")
    ood = evaluations.get("ood") if isinstance(evaluations, dict) else None
    try:
        return ScoreReference(float(test), str(ood["ood_data"]), float(ood["scores"]["bits_per_dim"]["mean_ood"]))
    except (KeyError, TypeError, ValueError):  # no OOD evaluation, or a foreign one
        return ScoreReference(float(test))


def _metrics_places(checkpoint: Path) -> list[Path]:
    """Where a checkpoint's metrics.json and provenance.json may be: beside the run or the step."""
    return [checkpoint, resolve_checkpoint(checkpoint)]


def checkpoint_reference(checkpoint: Path) -> ScoreReference | None:
    return score_reference(_optional_json(_metrics_places(checkpoint), "metrics.json"))


def _classes(num_classes: int, names: list[str] | None) -> str:
    """'10, class-conditional', with the names when they are more than the indices."""
    if names is None or names == [str(index) for index in range(num_classes)]:
        return f"{num_classes}, class-conditional"
    shown = ", ".join(f"{index} {name}" for index, name in enumerate(names[:20]))
    return f"{num_classes}, class-conditional: {shown}" + (", ..." if num_classes > 20 else "")


def _checkpoint_name(checkpoint: Path) -> str:
    """'shipped model mnist' for a model shipped in the package, else the path as given."""
    if locate_checkpoint(checkpoint).resolve().parent == SHIPPED_DIR.resolve():
        return f"shipped model {checkpoint.name}"
    return str(checkpoint)


def _training(stored: dict[str, Any], provenance: dict[str, Any]) -> str:
    """Steps and batch over the whole ``--init-from`` chain: ``pretrained_steps`` (the runs a checkpoint was
    initialised from, or a distilled model's teacher) plus this run's ``step``, when recorded."""
    train = stored.get("train", {})
    step, batch = stored.get("step", "?"), train.get("batch_size", "?")
    earlier = stored.get("pretrained_steps")
    if train.get("objective") != "distill":
        if earlier and isinstance(step, int) and isinstance(earlier, int):
            return (f"{_count(earlier + step)} steps in all: {_count(step)} of batch {batch}, after "
                    f"{_count(earlier)} in the runs it started from (--init-from)")
        return f"{_count(step)} steps of batch {batch}"
    teacher = provenance.get("teacher", {})
    if earlier or "step" in teacher:
        teacher_batch = teacher.get("train", {}).get("batch_size", "?")
        return (f"{_count(earlier or teacher['step'])} steps of batch {teacher_batch}; "
                f"inverse distilled for {step} steps")
    return f"inverse distilled for {step} steps from {train.get('teacher', 'a teacher')}"


def _test_bpd(metrics: dict[str, Any], run_dir: Path) -> str | None:
    """metrics.json's number, else the last test evaluation in a training run's metrics.jsonl."""
    if isinstance(metrics.get("test_bits_per_dim"), float | int):
        return f"{metrics['test_bits_per_dim']:.3f}"
    try:
        lines = (run_dir / "metrics.jsonl").read_text().splitlines()
        last = [r["test_bpd"] for r in map(json.loads, lines) if "test_bpd" in r][-1]
        return f"{last:.3f} (last evaluation during training)"
    except (OSError, ValueError, IndexError, TypeError):  # no run log, or not one of ours
        return None


def _metric_row(name: str, entry: dict[str, Any]) -> list[str] | None:
    images = f" ({entry['num_images']:,.0f} images)" if "num_images" in entry else ""
    if "classifier_score" in entry:
        return [name, f"classifier score {entry['classifier_score']:.2f}, Fréchet {entry['frechet_distance']:.1f}, "
                      f"class accuracy {entry['accuracy']:.1%}{images}"]
    if "fid" in entry:
        return [name, f"FID {entry['fid']:.1f}{images}"]
    if "psnr_db" in entry:
        return [name, f"distilled vs exact inverse: PSNR {entry['psnr_db']:.1f} dB"]
    return None


def _sample_metrics(metrics: dict[str, Any]) -> list[list[str]]:
    evaluations = metrics.get("evaluations")
    rows = []
    for name, entry in sorted(evaluations.items() if isinstance(evaluations, dict) else []):
        try:
            row = _metric_row(name, entry)
        except (KeyError, TypeError, ValueError):  # a hand-edited or foreign entry: leave it out
            continue
        if row is not None:
            rows.append(row)
    return rows


def model_card(model: Farmer, checkpoint: Path, limits: Limits) -> dict[str, Any]:
    """Rows of (label, value) for the page, and the facts its form needs (classes, inverses, limits)."""
    cfg = model.config
    step_dir = resolve_checkpoint(checkpoint)
    stored = read_config(step_dir)
    places = _metrics_places(checkpoint)
    metrics, provenance = _optional_json(places, "metrics.json"), _optional_json(places, "provenance.json")
    names = read_id2label(step_dir)
    parts = [f"flow {_millions(model.flow)}", f"AR prior {_millions(model.prior)}"]
    if model.student is not None:
        parts.append(f"distilled inverse {_millions(model.student)}")
    rows = [
        ["checkpoint", _checkpoint_name(checkpoint)],
        ["preset", cfg.name],
        ["parameters", f"{_millions(model)} ({', '.join(parts)})"],
        ["images", f"{cfg.channels}×{cfg.image_size}×{cfg.image_size}: {cfg.num_tokens} tokens × "
                   f"{cfg.token_dim} channels ({cfg.informative_dim} informative)"],
        ["classes", _classes(cfg.num_classes, names) if cfg.conditional else "unconditional"],
        ["training data", str(stored.get("train", {}).get("data", "not recorded"))],
        ["training", _training(stored, provenance)],
    ]
    test_bpd = _test_bpd(metrics, step_dir.parent)
    if test_bpd is not None:
        rows.append(["test bits/dim", test_bpd])
    rows += _sample_metrics(metrics)
    reference = score_reference(metrics)
    if reference is not None:
        rows.append(["typical bits/dim", reference.describe()])
    return {
        "reference": reference.describe() if reference else NO_REFERENCE,
        "rows": rows,
        "preset": cfg.name,
        "num_classes": cfg.num_classes,
        "class_names": names or [str(index) for index in range(cfg.num_classes)],
        "image_size": cfg.image_size,
        "channels": cfg.channels,
        "num_tokens": cfg.num_tokens,
        "inverses": list(available_inverses(model)),
        "limits": {"max_images": limits.max_images, "max_upload_bytes": limits.max_upload_bytes,
                   "max_guidance": limits.max_guidance, "max_scale": limits.max_scale},
    }
