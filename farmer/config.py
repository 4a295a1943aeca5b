"""FarmerConfig: every size and switch of a FARMER model, validated, with JSON round-trip and named presets.

The config travels inside every checkpoint (``config.json``), so a model can always be rebuilt from its
weights' directory alone.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import math
import types
import typing
import warnings
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

PERMUTATIONS = ("alternate", "reverse")
PRIORS = ("ar", "normal")
PATCH_TRANSFORMS = ("none", "dct")
REDUNDANT_MIXTURES = ("shared", "per_token")
DEQUANTIZATIONS = ("gaussian", "uniform", "variational")

_TRUE_WORDS = ("true", "yes", "1")
_FALSE_WORDS = ("false", "no", "0")
_NONE_WORDS = ("none", "null")


# Typed fields, shared by FarmerConfig, farmer.train.TrainConfig and the guidance methods' knobs -------------
@functools.cache
def field_kinds(cls: type) -> dict[str, tuple[type, bool]]:
    """{field: (type, whether None is allowed)} of a dataclass, from its annotations (``int | None``,
    ``Literal["a", "b"]`` etc.)."""
    hints = typing.get_type_hints(cls)
    kinds = {}
    for f in dataclasses.fields(cls):
        hint = hints[f.name]
        members = typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, types.UnionType) else (hint,)
        concrete = [t for t in members if t is not type(None)]
        kinds[f.name] = (concrete[0], len(concrete) < len(members))
    return kinds


def _describe(kind: Any, optional: bool) -> str:
    if typing.get_origin(kind) is typing.Literal:
        text = "one of " + ", ".join(map(str, typing.get_args(kind)))
    else:
        text = {bool: "true or false (also yes/no, 1/0)", int: "an integer", float: "a finite number",
                str: "a string"}.get(kind, getattr(kind, "__name__", str(kind)))
    return text + (" or none" if optional else "")


def field_type_errors(instance: Any) -> list[str]:
    """Fields whose value does not have the annotated type (bool is no int, floats must be finite).

    Integers given for float fields (JSON writes 4.0 as 4 by hand) become floats in place, which is why
    this runs in ``__post_init__`` of a frozen dataclass.
    """
    errors = []
    for name, (kind, optional) in field_kinds(type(instance)).items():
        value = getattr(instance, name)
        if value is None and optional:
            continue
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
            object.__setattr__(instance, name, value)
        if not isinstance(value, kind) or (kind is not bool and isinstance(value, bool)):
            expected = kind.__name__ + (" or None" if optional else "")
            errors.append(f"{name} must be {expected}, got {value!r} ({type(value).__name__})")
        elif kind is float and not math.isfinite(value):
            errors.append(f"{name} must be finite, got {value!r}")
    return errors


def parse_field_value(cls: type, key: str, text: str, exclude: Iterable[str] = ()) -> Any:
    """A command-line string typed by the dataclass field ``key`` (bool, int, float, str or a Literal's choices,
    optionally None); ValueError names the field. Fields in ``exclude`` are not settable this way."""
    kinds = {name: kind for name, kind in field_kinds(cls).items() if name not in set(exclude)}
    if key not in kinds:
        raise ValueError(f"unknown {cls.__name__} field {key!r}; fields: {', '.join(kinds)}")
    kind, optional = kinds[key]
    word = text.strip().lower()
    if optional and word in _NONE_WORDS:
        return None
    value: Any = None
    if typing.get_origin(kind) is typing.Literal:
        value = text.strip() if text.strip() in typing.get_args(kind) else None
    elif kind is bool:
        value = True if word in _TRUE_WORDS else False if word in _FALSE_WORDS else None
    elif kind in (int, float):
        with contextlib.suppress(ValueError):
            value = kind(text)
        if kind is float and value is not None and not math.isfinite(value):
            value = None
    else:
        value = text
    if value is None:
        raise ValueError(f"{cls.__name__} field {key!r} must be {_describe(kind, optional)}, got {text!r}")
    return value


def parse_assignments(cls: type, pairs: Iterable[str], flag: str = "--set",
                      exclude: Iterable[str] = ()) -> dict[str, Any]:
    """``KEY=VALUE`` strings (``-`` in keys read as ``_``) -> {field: typed value} for dataclass ``cls``: the one
    parser of the command line's KEY=VALUE flags (--set, --train-set, --cfg-option). Range checks are the
    dataclass's own, when it is built; fields in ``exclude`` are refused as unknown."""
    result = {}
    for pair in pairs:
        key, sep, text = pair.partition("=")
        if not sep:
            raise ValueError(f"{flag} takes KEY=VALUE, got {pair!r}")
        key = key.strip().replace("-", "_")
        try:
            result[key] = parse_field_value(cls, key, text, exclude)
        except ValueError as err:
            raise ValueError(f"{flag} {pair}: {err}") from None
    return result


def check_dict(data: Any, what: str) -> dict[str, Any]:
    """``data`` itself if it is a dict (a JSON object); else a ValueError naming ``what``."""
    if not isinstance(data, dict):
        raise ValueError(f"{what} must be an object/dict, got {type(data).__name__} {data!r:.60}")
    return data


def defaulted_fields(cls: type, data: dict[str, Any]) -> dict[str, Any]:
    """{field: default} of the fields of dataclass ``cls`` that ``data`` lacks: what loading it fills in."""
    return {f.name: f.default for f in dataclasses.fields(cls)
            if f.name not in data and f.default is not dataclasses.MISSING}


def warn_defaulted_fields(cls: type, data: dict[str, Any], source: str, added_later: Iterable[str] = ()) -> None:
    """A warning naming each field of ``cls`` that the stored ``data`` lacks and the default that fills it: a
    config.json edited by hand must not change a model silently. Fields ``added_later`` than the file's format,
    whose defaults reproduce the files written before them, are filled without one."""
    filled = {name: value for name, value in defaulted_fields(cls, data).items() if name not in set(added_later)}
    if filled:
        names = ", ".join(f"{name}={value!r}" for name, value in filled.items())
        warnings.warn(f"{source} lacks {cls.__name__} field(s) {names}: loaded with these defaults; if the model "
                      "was trained with other values, write them into the file", stacklevel=3)


# FarmerConfig fields added after checkpoint format 1, each defaulting to what models saved before it do (so a
# config.json without it loads unchanged, with no warning). A new field belongs here only if that holds.
FARMER_FIELDS_ADDED_LATER = ("logit_alpha",)

# Fields of FarmerConfig that shape how a model is trained, not its weights: a fine-tune (--init-from) may change
# them, e.g. to anneal the training noise from a lower start, or to turn a sampling model into a likelihood one.
TRAINING_RECIPE = ("dequantization", "noise_std_start", "noise_std_end", "label_dropout")


@dataclass(frozen=True)
class FarmerConfig:
    # Data (docs/method.md §1): images C×H×W in [-1, 1], cut into p×p patches -> N tokens of d = C·p² channels.
    image_size: int = 28
    channels: int = 1
    patch_size: int = 4
    num_classes: int = 0  # 0 = unconditional
    # Fixed orthonormal map of every token right after patchify (docs/method.md §10):
    # "dct" = 2-D DCT-II of each patch per colour channel, lowest frequencies first, so the first d_I
    # channels hold a patch's coarse structure; "none" = raw (row, col, C) pixels, as in the paper.
    patch_transform: str = "none"
    # The logit pre-transform y = logit(α + (1 − 2α)(x + 1)/2) of every pixel before patchify, its log-det counted
    # in the likelihood (docs/method.md §13); 0 = off (the paper's layout).
    logit_alpha: float = 0.0
    # Dequantisation used for training (docs/method.md §1): "gaussian", "uniform", or "variational" (a learned
    # q(u | x) trained with the model, docs/method.md §14). Bits/dim is always evaluated with uniform noise too.
    dequantization: str = "gaussian"
    noise_std_start: float = 0.1
    noise_std_end: float = 0.005

    # Autoregressive flow (docs/method.md §2).
    flow_blocks: int = 2
    flow_layers: int = 1
    flow_width: int = 64
    permutation: str = "alternate"  # "alternate": identity / flip per block (TARFlow); "reverse": flip in every block
    log_scale_bound: float = 4.0  # log σ = c·tanh(a/c): bounded scales make every inverse finite
    # A learned invertible d×d channel mixing (LU-parametrised, Glow's 1×1 convolution) before every AF
    # block: the AF itself never mixes channels within a token.
    channel_mixing: bool = False

    # AR prior (docs/method.md §3–4). prior="normal" replaces it by a standard normal: a plain TARFlow-style flow.
    prior: str = "ar"
    prior_layers: int = 1
    prior_width: int = 64
    informative_channels: int | None = None  # d_I; None = d (no dimension reduction)
    informative_components: int = 4  # K_I
    redundant_components: int = 4  # K_R
    condition_repeat: int = 4  # M
    final_permute: bool = True
    # "shared": one mixture for every z_i^R, predicted after z_N^I (the paper). "per_token": each z_i^R gets
    # its own mixture P(z_i^R | z_{≤i}^I, c), predicted from the AR state right after z_i^I.
    redundant_mixture: str = "shared"
    label_dropout: float = 0.1  # drop to the null class, enables classifier-free guidance
    min_mixture_scale: float = 1e-3

    # Shared transformer shape.
    head_dim: int = 64
    mlp_ratio: int = 4

    # Stored with the model: whether a distilled one-step inverse (docs/method.md §7) is attached.
    distilled_inverse: bool = False

    # Free-form provenance (preset name, notes); not used by the model.
    name: str = field(default="custom", compare=False)

    def __post_init__(self) -> None:
        errors = field_type_errors(self)
        if errors:  # the checks below assume the types
            raise ValueError("invalid FarmerConfig: " + "; ".join(errors))
        for key in ("image_size", "channels", "patch_size", "flow_blocks", "flow_layers", "flow_width",
                    "prior_layers", "prior_width", "informative_components", "redundant_components",
                    "condition_repeat", "head_dim", "mlp_ratio"):
            if getattr(self, key) < 1:
                errors.append(f"{key} must be a positive integer, got {getattr(self, key)!r}")
        if self.num_classes < 0:
            errors.append(f"num_classes must be an integer >= 0, got {self.num_classes!r}")
        if not errors and self.image_size % self.patch_size:
            errors.append(f"image_size {self.image_size} is not divisible by patch_size {self.patch_size}")
        for key, allowed in (("permutation", PERMUTATIONS), ("prior", PRIORS),
                             ("dequantization", DEQUANTIZATIONS), ("patch_transform", PATCH_TRANSFORMS),
                             ("redundant_mixture", REDUNDANT_MIXTURES)):
            if getattr(self, key) not in allowed:
                errors.append(f"{key} must be one of {allowed}, got {getattr(self, key)!r}")
        if not errors:
            d = self.token_dim
            if self.informative_channels is not None and not 1 <= self.informative_channels <= d:
                errors.append(f"informative_channels must be in [1, {d}] (token_dim), got {self.informative_channels}")
            for key in ("flow_width", "prior_width"):
                if getattr(self, key) % min(self.head_dim, getattr(self, key)):
                    errors.append(f"{key} {getattr(self, key)} must be a multiple of head_dim {self.head_dim}")
        if not 0.0 <= self.label_dropout < 1.0:
            errors.append(f"label_dropout must be in [0, 1), got {self.label_dropout}")
        if not 0 <= self.logit_alpha < 0.5:
            errors.append(f"logit_alpha must be in [0, 0.5) (0 = no logit pre-transform), got {self.logit_alpha}")
        if self.log_scale_bound <= 0 or self.min_mixture_scale <= 0:
            errors.append("log_scale_bound and min_mixture_scale must be > 0")
        if not 0 < self.noise_std_end <= self.noise_std_start:
            errors.append("noise stds must satisfy 0 < noise_std_end <= noise_std_start")
        if errors:
            raise ValueError("invalid FarmerConfig: " + "; ".join(errors))

    # Derived sizes -------------------------------------------------------------------------------
    @property
    def num_tokens(self) -> int:
        """N = (H/p)·(W/p)."""
        return (self.image_size // self.patch_size) ** 2

    @property
    def token_dim(self) -> int:
        """d = C·p²."""
        return self.channels * self.patch_size**2

    @property
    def num_dims(self) -> int:
        """Data dimensions per image, N·d = C·H·W (the loss divides by it, docs/method.md §5)."""
        return self.num_tokens * self.token_dim

    @property
    def informative_dim(self) -> int:
        """d_I: the channels the AR models token by token (all of them for the normal prior)."""
        if self.prior == "normal" or self.informative_channels is None:
            return self.token_dim
        return self.informative_channels

    @property
    def redundant_dim(self) -> int:
        """d_R = d − d_I: the redundant channels, modelled by one mixture shared by all tokens or one per token
        (``redundant_mixture``; docs/method.md §3)."""
        return self.token_dim - self.informative_dim

    @property
    def conditional(self) -> bool:
        return self.num_classes > 0

    # Serialisation -------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> FarmerConfig:
        check_dict(data, "a FarmerConfig")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown FarmerConfig field(s): {', '.join(unknown)}")
        return cls(**data)

    def to_json(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n")

    @classmethod
    def from_json(cls, path: str | Path) -> FarmerConfig:
        try:
            data = json.loads(Path(path).read_text())
        except FileNotFoundError:
            raise FileNotFoundError(f"config file not found: {path}") from None
        except json.JSONDecodeError as err:
            raise ValueError(f"config file {path} is not valid JSON: {err}") from None
        return cls.from_dict(data)

    def diff(self, other: FarmerConfig) -> dict[str, tuple[Any, Any]]:
        """Fields that differ, as {field: (self's value, other's value)}; the free-form name is ignored."""
        theirs = other.to_dict()
        return {k: (v, theirs[k]) for k, v in self.to_dict().items() if k != "name" and theirs[k] != v}

    def replace(self, **changes: Any) -> FarmerConfig:
        return dataclasses.replace(self, **changes)

    def architecture(self) -> FarmerConfig:
        """This config with the training recipe (dequantisation, its noise schedule, label dropout) and the
        student flag at their defaults: two configs whose architectures agree hold interchangeable weights."""
        recipe = {name: FarmerConfig.__dataclass_fields__[name].default for name in TRAINING_RECIPE}
        return self.replace(distilled_inverse=False, **recipe)

    @classmethod
    def preset(cls, name: str) -> FarmerConfig:
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; choose from {', '.join(PRESETS)}")
        return cls(**PRESETS[name], name=name)


# The paper's ImageNet-256 settings (docs/method.md §3, §8): d_I=128 of d=768 at p=16, K_I=64, K_R=200, M=64.
# For p=8 (d=192) the paper does not say how the channels split; we keep its ratio d_I/d = 1/6, so
# d_I = 32 of 192 (and d_I = 2 of 12 for the p=2 ImageNet-64 model).
_IMAGENET256 = dict(image_size=256, channels=3, num_classes=1000, informative_components=64,
                    redundant_components=200, condition_repeat=64, head_dim=64, flow_width=768)

PRESETS: dict[str, dict[str, Any]] = {
    # Runs a training step in a fraction of a second on a laptop CPU; for tests and smoke runs.
    "tiny": dict(image_size=8, channels=1, patch_size=2, num_classes=10, flow_blocks=2, flow_layers=1,
                 flow_width=32, prior_layers=1, prior_width=32, informative_channels=2,
                 informative_components=4, redundant_components=4, condition_repeat=2, head_dim=16),
    # Class-conditional MNIST sized for 2 CPU cores: 7×7 tokens of 16 channels, 8 informative.
    "mnist": dict(image_size=28, channels=1, patch_size=4, num_classes=10, flow_blocks=4, flow_layers=2,
                  flow_width=128, prior_layers=4, prior_width=128, informative_channels=8,
                  informative_components=16, redundant_components=32, condition_repeat=8, head_dim=32),
    "imagenet256-1.1b-p16": dict(_IMAGENET256, patch_size=16, flow_blocks=28, flow_layers=4,
                                 prior_layers=12, prior_width=768, informative_channels=128),
    "imagenet256-1.1b-p8": dict(_IMAGENET256, patch_size=8, flow_blocks=28, flow_layers=4,
                                prior_layers=12, prior_width=768, informative_channels=32),
    "imagenet256-1.9b-p16": dict(_IMAGENET256, patch_size=16, flow_blocks=32, flow_layers=6,
                                 prior_layers=24, prior_width=1024, informative_channels=128),
    "imagenet256-1.9b-p8": dict(_IMAGENET256, patch_size=8, flow_blocks=32, flow_layers=6,
                                prior_layers=24, prior_width=1024, informative_channels=32),
    # Unconditional ImageNet-64 likelihood model (supplementary Tab. 6): uniform dequantisation.
    "imagenet64-556m": dict(image_size=64, channels=3, patch_size=2, num_classes=0, dequantization="uniform",
                            flow_blocks=16, flow_layers=4, flow_width=768, prior_layers=12, prior_width=768,
                            informative_channels=2, informative_components=64, redundant_components=200,
                            condition_repeat=64, head_dim=64),
}
