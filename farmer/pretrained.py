"""Released models: where a checkpoint lives and how its files are read and written, in the Hugging Face Hub
layout (``config.json`` + ``model.safetensors``). Model-side: it imports no training code, so
:meth:`farmer.model.Farmer.from_pretrained` and :meth:`~farmer.model.Farmer.save_pretrained` build on it.

A checkpoint is named by a directory (a released model, a training step's directory, or a run directory whose
``LATEST`` names its newest step, see :mod:`farmer.checkpoint`), by the name of a model shipped in the package
(``farmer/checkpoints/NAME``, package data, so an installed wheel has them too), or by a Hub repository id
("owner/name", with the ``hub`` extra). Nothing is ever unpickled, and no tensor with a NaN or Inf is ever
written or loaded.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from safetensors.torch import save as safetensors_bytes
from torch import Tensor

from farmer.config import FARMER_FIELDS_ADDED_LATER, FarmerConfig, check_dict, warn_defaulted_fields
from farmer.io import write_atomic, write_json_atomic

FORMAT_VERSION = 1
LATEST = "LATEST"
CONFIG = "config.json"
MODEL_WEIGHTS = "model.safetensors"
EMA_WEIGHTS = "ema.safetensors"
SHARDED_STATE = "sharded"  # a sharded training step's torch.distributed.checkpoint shards (farmer.checkpoint)
SHIPPED_DIR = Path(__file__).resolve().parent / "checkpoints"
DEFAULT_SHIPPED = "mnist"
HUB_INSTALL = "pip install 'farmer-flow[hub]'"
ID2LABEL = "id2label"  # config.json's class names, {"0": "T-shirt/top", ...}, as in Hugging Face configs


def contiguous(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """Detached, contiguous CPU copies: what safetensors writes."""
    return {k: v.detach().to("cpu").contiguous() for k, v in state.items()}


def first_nonfinite(state: dict[str, Tensor]) -> str | None:
    """The name of the first floating-point tensor holding a NaN or Inf, or None."""
    return next((k for k, v in state.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())), None)


def shipped_models() -> list[str]:
    """Names of the models shipped in the package: every folder under farmer/checkpoints with a config."""
    if not SHIPPED_DIR.is_dir():
        return []
    return sorted(p.name for p in SHIPPED_DIR.iterdir() if (p / CONFIG).is_file())


def locate_checkpoint(path_or_name: str | Path) -> Path:
    """An existing path as it is; otherwise the shipped model of that name (a path wins over a name)."""
    path = Path(path_or_name)
    if path.exists():
        return path
    if path.name == str(path_or_name) and path.name in shipped_models():
        return SHIPPED_DIR / path.name
    shipped = ", ".join(shipped_models()) or "none"
    raise FileNotFoundError(f"checkpoint not found: {path} (not a directory, nor a shipped model: {shipped})")


def resolve_checkpoint(path: str | Path) -> Path:
    """A step directory, or a run directory whose LATEST names one; or a shipped model's name."""
    path = locate_checkpoint(path)
    if (path / CONFIG).is_file():
        return path
    latest = path / LATEST
    if latest.is_file():
        name = latest.read_text().strip()
        if not name:
            steps = sorted(p.name for p in path.glob("step-*") if (p / CONFIG).is_file())
            raise ValueError(f"{latest} is empty; write the name of a checkpoint into it ("
                             + (f"available: {', '.join(steps)}" if steps else "none is available") + ")")
        step_dir = path / name
        if not (step_dir / CONFIG).is_file():
            raise FileNotFoundError(f"{latest} points to {step_dir.name}, which has no {CONFIG}")
        return step_dir
    raise FileNotFoundError(f"{path} is not a checkpoint: it has neither {CONFIG} nor {LATEST}")


def read_config(path: str | Path) -> dict[str, Any]:
    """The checked config.json of a checkpoint (a step, run or shipped model's directory, or a shipped name)."""
    return read_step_config(resolve_checkpoint(path))[0]


def read_step_config(step_dir: Path) -> tuple[dict[str, Any], FarmerConfig]:
    """(the checked config.json, its model config) of a step directory (:func:`resolve_checkpoint`'s answer):
    the one place a checkpoint's config is parsed."""
    try:
        data = json.loads((step_dir / CONFIG).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:  # UnicodeDecodeError: binary garbage
        raise ValueError(f"{step_dir / CONFIG} is corrupt: {err}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{step_dir / CONFIG} is not a farmer checkpoint config (a JSON {type(data).__name__})")
    if data.get("format") != FORMAT_VERSION or "model" not in data:
        raise ValueError(f"{step_dir / CONFIG} is not a farmer checkpoint config (format {data.get('format')!r})")
    try:
        config = FarmerConfig.from_dict(check_dict(data["model"], "'model'"))
        check_dict(data.get("train", {}), "'train'")
    except ValueError as err:
        raise ValueError(f"{step_dir / CONFIG}: {err}") from None
    warn_defaulted_fields(FarmerConfig, data["model"], str(step_dir / CONFIG), FARMER_FIELDS_ADDED_LATER)
    return data, config


def load_weights(file: Path) -> dict[str, Tensor]:
    if not file.is_file():
        raise FileNotFoundError(f"missing weights file: {file}")
    try:
        state = load_file(str(file))
    except (SafetensorError, OSError) as err:
        raise ValueError(f"corrupt weights file {file}: {err}") from None
    bad = first_nonfinite(state)
    if bad is not None:
        raise ValueError(f"corrupt weights file {file}: tensor {bad!r} has NaN or Inf values")
    return state


def load_state_into(module: torch.nn.Module, state: dict[str, Tensor], source: Path) -> None:
    """load_state_dict with an error that says which tensors are missing, unexpected or mis-shaped."""
    own = module.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shapes = [f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
              for k in own if k in state and state[k].shape != own[k].shape]
    if missing or unexpected or shapes:
        parts = []
        if missing:
            parts.append(f"missing {len(missing)} tensor(s), e.g. {missing[:3]}")
        if unexpected:
            parts.append(f"unexpected {len(unexpected)} tensor(s), e.g. {unexpected[:3]}")
        if shapes:
            parts.append(f"shape mismatch: {shapes[:3]}")
        raise ValueError(f"{source} does not match the model built from its config: " + "; ".join(parts))
    module.load_state_dict(state)


def weights_file(step_dir: Path, ema: bool = True) -> Path:
    """The weights to load from a checkpoint directory: the EMA weights when asked for and present."""
    file = step_dir / (EMA_WEIGHTS if ema and (step_dir / EMA_WEIGHTS).is_file() else MODEL_WEIGHTS)
    if not file.is_file() and (step_dir / SHARDED_STATE).is_dir():
        # A sharded (FSDP) training step keeps only its EMA weights as safetensors (farmer.checkpoint).
        raise FileNotFoundError(f"{step_dir} is a sharded training checkpoint: it holds the EMA weights only; its "
                                "raw weights are shards, read by farmer.checkpoint.load_sharded_weights")
    return file


def _hub_snapshot(repo_id: str, revision: str | None, cache_dir: str | Path | None, local_files_only: bool) -> Path:
    """The local folder of a Hub repository's config and weights (downloaded or from the Hub cache; the
    cache location and offline mode follow huggingface_hub's own HF_HUB_CACHE and HF_HUB_OFFLINE)."""
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise ImportError(f"{repo_id!r} is not a local directory nor a shipped model; loading it from the "
                          f"Hugging Face Hub needs huggingface_hub: {HUB_INSTALL}") from None
    try:
        return Path(snapshot_download(repo_id, revision=revision, cache_dir=cache_dir,
                                      local_files_only=local_files_only, allow_patterns=[CONFIG, "*.safetensors"]))
    except Exception as err:  # the Hub's many error classes (offline, no such repository, HTTP, ...)
        # "checkpoints/mnist" is also a mistyped local path: the error says both where it was looked for.
        raise _restated(err, f"{repo_id!r} is not a local directory ({Path(repo_id).absolute()} does not exist) "
                             f"nor a shipped model ({', '.join(shipped_models()) or 'none'}), and as a Hugging Face "
                             f"Hub repository id: {err}") from None


def _restated(err: Exception, message: str) -> Exception:
    """``err`` saying ``message`` instead, kept of its own class so that callers may still catch the Hub's
    errors by class; a FileNotFoundError when its class does not print its arguments."""
    err.args = (message,)
    return err if str(err) == message else FileNotFoundError(message)


def checkpoint_directory(path_or_repo_id: str | Path, *, revision: str | None = None,
                         cache_dir: str | Path | None = None, local_files_only: bool = False) -> Path:
    """The step directory of a local checkpoint, a shipped model's name, or a Hub repository id."""
    path = Path(path_or_repo_id)
    if not path.exists() and str(path_or_repo_id) not in shipped_models():
        if str(path_or_repo_id).count("/") != 1 or path.is_absolute():
            raise FileNotFoundError(f"{path_or_repo_id} is not a directory, a shipped model "
                                    f"({', '.join(shipped_models()) or 'none'}) or a Hub repository id (owner/name)")
        path = _hub_snapshot(str(path_or_repo_id), revision, cache_dir, local_files_only)
    return resolve_checkpoint(path)


def write_weights(file: Path, weights: dict[str, Tensor], dtype: torch.dtype | None = None) -> Path:
    """Write ``weights`` (floating-point ones cast to ``dtype`` when given) to a safetensors ``file``, atomically;
    a NaN or Inf — also one that the cast creates by overflow — is refused before anything is written."""
    weights = {k: v.to(dtype) if dtype is not None and v.is_floating_point() else v
               for k, v in contiguous(weights).items()}
    bad = first_nonfinite(weights)
    if bad is not None:
        raise ValueError(f"refusing to save: tensor {bad!r} has NaN or Inf values"
                         + (f" in {dtype}" if dtype is not None else ""))
    return write_atomic(file, safetensors_bytes(weights))


def id2label_json(names: list[str] | tuple[str, ...], num_classes: int) -> dict[str, str]:
    """Class names in config.json's form, {"0": name, ...}, checked to name every class once."""
    if len(names) != num_classes or not all(isinstance(name, str) and name.strip() for name in names):
        raise ValueError(f"id2label must be {num_classes} non-empty class names (one per class), got "
                         f"{len(names)}: {names[:3]!r}...")
    return {str(index): name for index, name in enumerate(names)}


def read_id2label(path: str | Path) -> list[str] | None:
    """A checkpoint's class names in class order (config.json ``id2label``), or None when it records none."""
    data = read_config(path)
    stored = data.get(ID2LABEL)
    if stored is None:
        return None
    num_classes = FarmerConfig.from_dict(data["model"]).num_classes
    if not isinstance(stored, dict) or set(stored) != {str(index) for index in range(num_classes)}:
        raise ValueError(f"{resolve_checkpoint(path) / CONFIG}: {ID2LABEL} must map each class index "
                         f'"0".."{num_classes - 1}" to its name')
    names = [stored[str(index)] for index in range(num_classes)]
    id2label_json(names, num_classes)  # every name a non-empty string
    return names


def write_pretrained(directory: str | Path, config: FarmerConfig, weights: dict[str, Tensor],
                     dtype: torch.dtype | None = None, id2label: list[str] | tuple[str, ...] | None = None) -> Path:
    """Write a model as ``directory/config.json`` + ``directory/model.safetensors`` (the Hugging Face Hub
    layout; other files in the directory are left alone), the weights in ``dtype`` when given (float16 halves
    the files; loading casts back to the model's float32), the class names ``id2label`` (in class order) when
    given. Each file is replaced atomically, the weights first: config.json marks a complete checkpoint."""
    labels = None if id2label is None else id2label_json(list(id2label), config.num_classes)
    directory = Path(directory)
    if directory.exists() and not directory.is_dir():
        raise ValueError(f"{directory} is a file, not a directory")
    if (directory / EMA_WEIGHTS).exists():  # from_pretrained prefers EMA weights: they would shadow these
        raise ValueError(f"{directory} holds {EMA_WEIGHTS} (a training checkpoint); save to another directory")
    directory.mkdir(parents=True, exist_ok=True)
    write_weights(directory / MODEL_WEIGHTS, weights, dtype)
    write_json_atomic(directory / CONFIG, {"format": FORMAT_VERSION, "model": config.to_dict(),
                                           **({ID2LABEL: labels} if labels else {})})
    return directory
