"""Checkpoints: safetensors weights + JSON beside them, written atomically, loaded with clear errors.

A run directory holds versioned checkpoints and a pointer to the newest one::

    runs/NAME/LATEST                   "step-00001000"  (replaced atomically with os.replace)
    runs/NAME/step-00001000/config.json      {"model": FarmerConfig, "train": TrainConfig, ...}
                            model.safetensors  ema.safetensors  [optimizer.safetensors  trainer.json]

A step directory is first written under a temporary name, flushed, then renamed into place, and only
then does LATEST move: a crash at any moment leaves the previous checkpoint intact and loadable. Nothing
is ever unpickled.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor

from farmer.config import FarmerConfig
from farmer.model import Farmer

FORMAT_VERSION = 1
LATEST = "LATEST"
CONFIG = "config.json"
MODEL_WEIGHTS = "model.safetensors"
EMA_WEIGHTS = "ema.safetensors"
OPTIMIZER = "optimizer.safetensors"
TRAINER = "trainer.json"


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_json_atomic(path: Path, data: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w") as f:
        json.dump(data, f, indent=2, sort_keys=True)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _contiguous(state: dict[str, Tensor]) -> dict[str, Tensor]:
    return {k: v.detach().to("cpu").contiguous() for k, v in state.items()}


def flatten_optimizer_state(state: dict[str, Any]) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """A torch optimizer state_dict as (tensors for safetensors, JSON-able rest)."""
    tensors: dict[str, Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for index, entry in state["state"].items():
        for key, value in entry.items():
            if isinstance(value, Tensor):
                tensors[f"{index}/{key}"] = value
            else:
                scalars.setdefault(str(index), {})[key] = value
    return _contiguous(tensors), {"param_groups": state["param_groups"], "scalars": scalars}


def _state_key(index: str) -> int | str:
    """Plain optimizers key their state by parameter index, FSDP's full state dicts by parameter name."""
    return int(index) if index.isdigit() else index


def unflatten_optimizer_state(tensors: dict[str, Tensor], meta: dict[str, Any]) -> dict[str, Any]:
    state: dict[int | str, dict[str, Any]] = {}
    for name, value in tensors.items():
        index, key = name.rsplit("/", 1)
        state.setdefault(_state_key(index), {})[key] = value
    for index, entry in meta["scalars"].items():
        state.setdefault(_state_key(index), {}).update(entry)
    return {"state": state, "param_groups": meta["param_groups"]}


def save_checkpoint(run_dir: str | Path, step: int, config: dict[str, Any], weights: dict[str, Tensor],
                    ema_weights: dict[str, Tensor] | None = None, optimizer: dict[str, Any] | None = None,
                    trainer: dict[str, Any] | None = None, keep: int = 2) -> Path:
    """Write ``run_dir/step-XXXXXXXX`` atomically, point LATEST at it, keep the newest ``keep`` steps.

    ``config`` must hold the model's FarmerConfig under "model"; extra keys (the training config,
    metrics) are stored as they are.
    """
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    name = f"step-{step:08d}"
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}.", dir=run_dir))
    try:
        with open(tmp / CONFIG, "w") as f:
            json.dump({"format": FORMAT_VERSION, "step": step, **config}, f, indent=2, sort_keys=True)
        save_file(_contiguous(weights), str(tmp / MODEL_WEIGHTS))
        if ema_weights is not None:
            save_file(_contiguous(ema_weights), str(tmp / EMA_WEIGHTS))
        if optimizer is not None:
            tensors, meta = flatten_optimizer_state(optimizer)
            save_file(tensors, str(tmp / OPTIMIZER))
            trainer = {**(trainer or {}), "optimizer": meta}
        if trainer is not None:
            with open(tmp / TRAINER, "w") as f:
                json.dump(trainer, f)
        for file in tmp.iterdir():
            with open(file, "rb") as f:
                os.fsync(f.fileno())
        _fsync_dir(tmp)
        final = run_dir / name
        if final.exists():  # re-saving the same step (e.g. after a resume) replaces it
            shutil.rmtree(final)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    (run_dir / f".{LATEST}.tmp").write_text(name + "\n")
    os.replace(run_dir / f".{LATEST}.tmp", run_dir / LATEST)
    _fsync_dir(run_dir)
    steps = sorted(p for p in run_dir.glob("step-*") if p.is_dir())
    for old in steps[:-keep] if keep > 0 else []:
        if old.name != name:
            shutil.rmtree(old, ignore_errors=True)
    return final


def resolve_checkpoint(path: str | Path) -> Path:
    """A step directory, or a run directory whose LATEST names one."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if (path / CONFIG).is_file():
        return path
    latest = path / LATEST
    if latest.is_file():
        step_dir = path / latest.read_text().strip()
        if not (step_dir / CONFIG).is_file():
            raise FileNotFoundError(f"{latest} points to {step_dir.name}, which has no {CONFIG}")
        return step_dir
    raise FileNotFoundError(f"{path} is not a checkpoint: it has neither {CONFIG} nor {LATEST}")


def read_config(path: str | Path) -> dict[str, Any]:
    step_dir = resolve_checkpoint(path)
    try:
        data = json.loads((step_dir / CONFIG).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:  # UnicodeDecodeError: binary garbage
        raise ValueError(f"{step_dir / CONFIG} is corrupt: {err}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{step_dir / CONFIG} is not a farmer checkpoint config (a JSON {type(data).__name__})")
    if data.get("format") != FORMAT_VERSION or "model" not in data:
        raise ValueError(f"{step_dir / CONFIG} is not a farmer checkpoint config (format {data.get('format')!r})")
    return data


def load_weights(file: Path) -> dict[str, Tensor]:
    if not file.is_file():
        raise FileNotFoundError(f"missing weights file: {file}")
    try:
        return load_file(str(file))
    except (SafetensorError, OSError) as err:
        raise ValueError(f"corrupt weights file {file}: {err}") from None


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


def load_model(path: str | Path, ema: bool = True, map_location: str | torch.device = "cpu",
               expected: FarmerConfig | None = None) -> Farmer:
    """Rebuild a Farmer from a checkpoint's config and load its (EMA, by default) weights.

    With ``expected`` the stored config must equal it; the error lists the fields that differ.
    """
    step_dir = resolve_checkpoint(path)
    config = FarmerConfig.from_dict(read_config(step_dir)["model"])
    if expected is not None and config != expected:
        diff = config.diff(expected)
        raise ValueError(f"checkpoint config does not match: {diff} (checkpoint, expected)")
    model = Farmer(config)
    file = step_dir / (EMA_WEIGHTS if ema and (step_dir / EMA_WEIGHTS).is_file() else MODEL_WEIGHTS)
    load_state_into(model, load_weights(file), file)
    return model.to(map_location).eval()
