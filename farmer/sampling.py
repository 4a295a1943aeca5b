"""Sampling settings as one typed, validated value that goes from the command line to the model.

Guidance (docs/method.md §6, conventions in docs/guidance.md), the unguided decoupled knobs s and T
(docs/method.md §6), the flow inverse (§2, §7), and the batching and seed of a sample set.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal, get_args

import numpy as np
import torch
from torch import Tensor

from farmer.config import parse_assignments
from farmer.guidance import Guidance, NaiveGuidance, ResamplingGuidance
from farmer.images import save_grid
from farmer.pixels import model_to_pixels

if TYPE_CHECKING:
    from farmer.model import Farmer

Inverse = Literal["exact", "jacobi", "distilled", "auto"]
INVERSES: tuple[str, ...] = get_args(Inverse)
GUIDANCE_METHODS = {"resampling": ResamplingGuidance, "naive": NaiveGuidance}


def make_guidance(method: str, scale: float, options: Sequence[str] = ()) -> ResamplingGuidance | NaiveGuidance:
    """CFG by ``method`` ("resampling": Algorithm 1; "naive": JetFormer's) at scale w, with KEY=VALUE knobs
    typed by the guidance dataclass (docs/guidance.md)."""
    if method not in GUIDANCE_METHODS:
        raise ValueError(f"guidance method must be one of {', '.join(GUIDANCE_METHODS)}, got {method!r}")
    kind = GUIDANCE_METHODS[method]
    # --guidance sets the scale; every other field is a knob.
    return kind(scale=scale, **parse_assignments(kind, options, "--cfg-option", exclude=("scale",)))


@dataclass(frozen=True)
class SamplingOptions:
    guidance: Guidance | None = None  # None: no CFG; ResamplingGuidance, NaiveGuidance or any Guidance
    variance_scale: float = 1.0  # unguided s: multiplies the mixtures' variances (paper: 0.9)
    temperature: float = 1.0  # unguided T: divides the mixture logits (paper: 1.3)
    # The flow inverse: sequential, Jacobi-iterated, the distilled student, or "auto": exact or Jacobi, whichever is
    # faster at the batch size on the device (docs/method.md §7).
    inverse: Inverse = "auto"
    batch_size: int = 250
    seed: int = 0

    def __post_init__(self) -> None:
        errors = []
        if self.guidance is not None and not isinstance(self.guidance, Guidance):
            errors.append("guidance must implement farmer.guidance.Guidance (draw_token, draw_redundant, "
                          f"draw_shared) or be None, got {self.guidance!r}")
        for key in ("variance_scale", "temperature"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) or value <= 0:
                errors.append(f"{key} must be a finite number > 0, got {value!r}")
        if self.inverse not in INVERSES:
            errors.append(f"inverse must be one of {', '.join(INVERSES)}, got {self.inverse!r}")
        for key, minimum in (("batch_size", 1), ("seed", -(2**63))):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
                errors.append(f"{key} must be an int >= {minimum}, got {value!r}")
        if errors:
            raise ValueError("invalid SamplingOptions: " + "; ".join(errors))

    def sample(self, model: Farmer, n: int, labels: Tensor | None, generator: torch.Generator,
               progress: Callable[[int], None] | None = None) -> Tensor:
        """``model.sample`` with these settings: n images in [-1, 1]."""
        return model.sample(n, labels, generator, guidance=self.guidance, variance_scale=self.variance_scale,
                            temperature=self.temperature, inverse=self.inverse, progress=progress)

    def sample_latents(self, model: Farmer, labels: Tensor, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        """The prior's (Z^I, Z^R) with these settings, before any flow inverse."""
        return model.prior.sample(labels, generator, self.guidance, self.variance_scale, self.temperature)


def batch_generator(seed: int, batch: int, device: torch.device | str = "cpu") -> torch.Generator:
    """The generator of batch ``batch`` of a sample set.

    Each batch has its own stream, a function of (seed, batch): a sample set depends on its seed and batch
    size only, not on how its batches are split over torchrun ranks. Batch 0 uses the seed itself, so a
    one-batch set equals ``model.sample(..., torch.Generator().manual_seed(seed))`` (the demo relies on it).
    """
    if batch == 0:
        return torch.Generator(device).manual_seed(seed)
    state = np.random.SeedSequence([seed % 2**64, batch]).generate_state(1, np.uint64)[0]
    return torch.Generator(device).manual_seed(int(state))


DEFAULT_SAMPLING = SamplingOptions()  # frozen, so one shared default is safe


def sample_grid(model: Farmer, path: Path, per_class: int = 8,
                options: SamplingOptions = DEFAULT_SAMPLING) -> Path:
    """A PNG grid of samples: one row per class (or 8 rows unconditional), one batch seeded by ``options.seed``."""
    cfg = model.config
    rows = min(cfg.num_classes, 10) if cfg.conditional else 8
    labels = torch.arange(rows).repeat_interleave(per_class) if cfg.conditional else None
    device = model.device
    images = options.sample(model, rows * per_class, None if labels is None else labels.to(device),
                            batch_generator(options.seed, 0, device))
    return save_grid(model_to_pixels(images), path, nrow=per_class, scale=2)


def _quoted(text: str, limit: int = 40) -> str:
    """``text`` as repr, cut to ``limit`` characters: an error message stays short whatever was typed."""
    return repr(text) if len(text) <= limit else repr(text[:limit]) + f"... ({len(text):,} characters)"


def parse_classes(text: str | None, num_classes: int, names: Sequence[str] | None = None) -> list[int] | None:
    """'0-9', '3', '1,4,7' or '0-4,9' -> a list of class indices; with the model's class ``names`` (its
    config.json ``id2label``), a part may also be a name, e.g. 'sandal,sneaker' (case-insensitive; a number is
    always an index).

    Each range is checked against ``num_classes`` before it is expanded, so a huge one ("0-99999999999") is
    refused at once, and every message names the first bad part only.
    """
    if text is None:
        return None
    by_name = {name.strip().lower(): index for index, name in enumerate(names or ())}
    classes: list[int] = []
    for part in (piece.strip() for piece in text.split(",")):
        match = re.fullmatch(r"(\d+)(?:-(\d+))?", part)
        if match is None:
            if part.lower() in by_name:
                classes.append(by_name[part.lower()])
                continue
            names = list(names or ())
            shown = ", ".join(names[:10]) + (f", ... ({len(names)} names)" if len(names) > 10 else "")
            known = f", or class names ({shown})" if names else ""
            raise ValueError(f"--classes must look like 0-9, 3 or 1,4-6{known}; {_quoted(part)} in "
                             f"{_quoted(text)} is not")
        lo, hi = int(match[1]), int(match[2] or match[1])
        if hi < lo:
            raise ValueError(f"--classes range {_quoted(part)} is descending; write {hi}-{lo}")
        if hi >= num_classes:
            raise ValueError(f"--classes {_quoted(part)} is out of range for a model with {num_classes} classes "
                             f"(0-{num_classes - 1})" if num_classes else "the model has no classes")
        classes.extend(range(lo, hi + 1))
    return classes
