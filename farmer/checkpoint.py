"""Checkpoints: safetensors weights + JSON beside them, written atomically, loaded with clear errors.

A run directory holds versioned checkpoints and a pointer to the newest one::

    runs/NAME/LATEST                   "step-00001000"  (replaced atomically with os.replace)
    runs/NAME/step-00001000/config.json      {"model": FarmerConfig, "train": TrainConfig, ...}
                            model.safetensors  ema.safetensors  [optimizer.safetensors  trainer.json]

A step directory is first written under a temporary name, flushed, then renamed into place, and only
then does LATEST move: a crash at any moment leaves the previous checkpoint intact and loadable. Nothing
is ever unpickled, and no tensor with a NaN or Inf is ever written or loaded: a diverged run cannot
overwrite (or rotate away) its last good checkpoint. A trainer holds ``.lock`` (``fcntl.flock``, holding
its pid) for as long as it writes the directory.

A released model is one directory in the Hugging Face Hub layout, ``config.json`` + ``model.safetensors``
(:func:`save_pretrained`, :func:`from_pretrained`). The package ships such directories under
``farmer/checkpoints/NAME``; wherever a checkpoint path is taken, a shipped model's NAME works too.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from safetensors.torch import save as safetensors_bytes
from torch import Tensor

from farmer.config import FarmerConfig, check_dict
from farmer.io import fsync_directory, write_atomic, write_json_atomic
from farmer.model import Farmer

FORMAT_VERSION = 1
LATEST = "LATEST"
CONFIG = "config.json"
MODEL_WEIGHTS = "model.safetensors"
EMA_WEIGHTS = "ema.safetensors"
OPTIMIZER = "optimizer.safetensors"
TRAINER = "trainer.json"
LOCK = ".lock"
# Released models that ship inside the package (package data, so an installed wheel has them too).
SHIPPED_DIR = Path(__file__).resolve().parent / "checkpoints"
DEFAULT_SHIPPED = "mnist"


def _contiguous(state: dict[str, Tensor]) -> dict[str, Tensor]:
    return {k: v.detach().to("cpu").contiguous() for k, v in state.items()}


def first_nonfinite(state: dict[str, Tensor]) -> str | None:
    """The name of the first floating-point tensor holding a NaN or Inf, or None."""
    return next((k for k, v in state.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())), None)


def _disk_full(err: BaseException) -> bool:
    # safetensors reports I/O errors as SafetensorError("... IoError(Os { code: 28, kind: StorageFull ...")
    return (isinstance(err, OSError) and err.errno == errno.ENOSPC) or (
        isinstance(err, SafetensorError) and ("StorageFull" in str(err) or "No space left" in str(err)))


def _latest_name(run_dir: Path) -> str | None:
    latest = run_dir / LATEST
    return (latest.read_text().strip() or None) if latest.is_file() else None


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
    files = {MODEL_WEIGHTS: _contiguous(weights)}
    if ema_weights is not None:
        files[EMA_WEIGHTS] = _contiguous(ema_weights)
    if optimizer is not None:
        files[OPTIMIZER], meta = flatten_optimizer_state(optimizer)
        trainer = {**(trainer or {}), "optimizer": meta}
    for file, tensors in files.items():
        bad = first_nonfinite(tensors)
        if bad is not None:
            raise ValueError(f"refusing to save step {step}: tensor {bad!r} of {file} has NaN or Inf values")
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}.", dir=run_dir))
    try:
        with open(tmp / CONFIG, "w") as f:
            json.dump({"format": FORMAT_VERSION, "step": step, **config}, f, indent=2, sort_keys=True)
        for file, tensors in files.items():
            save_file(tensors, str(tmp / file))
        if trainer is not None:
            with open(tmp / TRAINER, "w") as f:
                json.dump(trainer, f)
        for file in tmp.iterdir():
            with open(file, "rb") as f:
                os.fsync(f.fileno())
        fsync_directory(tmp)
        final = run_dir / name
        if final.exists():  # re-saving the same step (e.g. after a resume) replaces it
            shutil.rmtree(final)
        os.replace(tmp, final)
    except BaseException as err:
        shutil.rmtree(tmp, ignore_errors=True)
        if _disk_full(err):
            intact = _latest_name(run_dir)
            raise RuntimeError(f"no space left on device while saving step {step} in {run_dir}; "
                               + (f"{intact} is intact" if intact else "no earlier checkpoint exists")) from err
        raise
    write_atomic(run_dir / LATEST, name + "\n")
    steps = sorted(p for p in run_dir.glob("step-*") if p.is_dir())
    for old in steps[:-keep] if keep > 0 else []:
        if old.name != name:
            shutil.rmtree(old, ignore_errors=True)
    return final


def remove_stale_temporaries(run_dir: Path) -> list[Path]:
    """Delete what a save killed midway leaves behind (``.step-*`` directories, ``.LATEST.*.tmp``); only a
    holder of the run directory's lock may call this, or it would delete another trainer's save."""
    stale = [*run_dir.glob(".step-*"), *run_dir.glob(f".{LATEST}*.tmp")]
    for path in stale:
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
    return stale


@contextlib.contextmanager
def lock_run_directory(run_dir: str | Path) -> Iterator[None]:
    """Hold an exclusive lock on a run directory (created if needed) and clean its stale temporaries.

    ``flock`` is released by the kernel when the process dies, even by ``kill -9``, so a crashed run never
    leaves a lock behind; the file only names the last holder's pid for the error message.
    """
    run_dir = Path(run_dir)
    if run_dir.exists() and not run_dir.is_dir():
        raise ValueError(f"run directory {run_dir} is a file")
    run_dir.mkdir(parents=True, exist_ok=True)
    with open(run_dir / LOCK, "a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "unknown"
            raise RuntimeError(f"{run_dir} is in use by another trainer (pid {holder}); wait for it to end or "
                               "use another --out") from None
        handle.truncate(0)
        handle.write(f"{os.getpid()}\n")
        handle.flush()
        remove_stale_temporaries(run_dir)
        yield


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
    step_dir = resolve_checkpoint(path)
    try:
        data = json.loads((step_dir / CONFIG).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:  # UnicodeDecodeError: binary garbage
        raise ValueError(f"{step_dir / CONFIG} is corrupt: {err}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{step_dir / CONFIG} is not a farmer checkpoint config (a JSON {type(data).__name__})")
    if data.get("format") != FORMAT_VERSION or "model" not in data:
        raise ValueError(f"{step_dir / CONFIG} is not a farmer checkpoint config (format {data.get('format')!r})")
    try:
        FarmerConfig.from_dict(check_dict(data["model"], "'model'"))
        check_dict(data.get("train", {}), "'train'")
    except ValueError as err:
        raise ValueError(f"{step_dir / CONFIG}: {err}") from None
    return data


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


# Hub layout ---------------------------------------------------------------------------------------------
def save_pretrained(model: Farmer, directory: str | Path) -> Path:
    """Write ``model`` as ``directory/config.json`` + ``directory/model.safetensors`` (the Hugging Face Hub
    layout; other files in the directory are left alone). Each file is replaced atomically, the weights
    first: config.json marks a complete checkpoint."""
    directory = Path(directory)
    if directory.exists() and not directory.is_dir():
        raise ValueError(f"{directory} is a file, not a directory")
    weights = _contiguous(model.state_dict())
    bad = first_nonfinite(weights)
    if bad is not None:
        raise ValueError(f"refusing to save: tensor {bad!r} has NaN or Inf values")
    if (directory / EMA_WEIGHTS).exists():  # load_model prefers EMA weights: they would shadow these
        raise ValueError(f"{directory} holds {EMA_WEIGHTS} (a training checkpoint); save to another directory")
    directory.mkdir(parents=True, exist_ok=True)
    write_atomic(directory / MODEL_WEIGHTS, safetensors_bytes(weights))
    write_json_atomic(directory / CONFIG, {"format": FORMAT_VERSION, "model": model.config.to_dict()})
    return directory


HUB_INSTALL = "pip install 'farmer[hub]'"


def _hub_snapshot(repo_id: str, revision: str | None, cache_dir: str | Path | None, local_files_only: bool) -> Path:
    """The local folder of a Hub repository's config and weights (downloaded or from the Hub cache; the
    cache location and offline mode follow huggingface_hub's own HF_HUB_CACHE and HF_HUB_OFFLINE)."""
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise ImportError(f"{repo_id!r} is not a local directory nor a shipped model; loading it from the "
                          f"Hugging Face Hub needs huggingface_hub: {HUB_INSTALL}") from None
    return Path(snapshot_download(repo_id, revision=revision, cache_dir=cache_dir, local_files_only=local_files_only,
                                  allow_patterns=[CONFIG, "*.safetensors"]))


def from_pretrained(path_or_repo_id: str | Path, *, revision: str | None = None, ema: bool = True,
                    map_location: str | torch.device = "cpu", cache_dir: str | Path | None = None,
                    local_files_only: bool = False) -> Farmer:
    """A model from a local checkpoint directory, a shipped model's name (e.g. "mnist"), or a Hugging Face
    Hub repository id ("owner/name", needs the ``hub`` extra). Weights: EMA when present, like load_model."""
    path = Path(path_or_repo_id)
    if not path.exists() and str(path_or_repo_id) not in shipped_models():
        if str(path_or_repo_id).count("/") != 1 or path.is_absolute():
            raise FileNotFoundError(f"{path_or_repo_id} is not a directory, a shipped model "
                                    f"({', '.join(shipped_models()) or 'none'}) or a Hub repository id (owner/name)")
        path = _hub_snapshot(str(path_or_repo_id), revision, cache_dir, local_files_only)
    return load_model(path, ema=ema, map_location=map_location)
