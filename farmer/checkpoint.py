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

A released model (the Hub layout, shipped models, reading configs and weights) is :mod:`farmer.pretrained`'s;
this module adds what training needs: run directories, optimizer state, the lock.
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
from safetensors.torch import save_file
from torch import Tensor

from farmer.config import FarmerConfig
from farmer.io import fsync_directory, write_atomic
from farmer.model import Farmer
from farmer.pretrained import (
    CONFIG,
    EMA_WEIGHTS,
    FORMAT_VERSION,
    LATEST,
    MODEL_WEIGHTS,
    contiguous,
    first_nonfinite,
    read_config,
    resolve_checkpoint,
)

OPTIMIZER = "optimizer.safetensors"
TRAINER = "trainer.json"
LOCK = ".lock"


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
    return contiguous(tensors), {"param_groups": state["param_groups"], "scalars": scalars}


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
    files = {MODEL_WEIGHTS: contiguous(weights)}
    if ema_weights is not None:
        files[EMA_WEIGHTS] = contiguous(ema_weights)
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


def load_model(path: str | Path, ema: bool = True, map_location: str | torch.device = "cpu",
               expected: FarmerConfig | None = None) -> Farmer:
    """:meth:`Farmer.from_pretrained` of a local checkpoint or shipped model (EMA weights by default).

    With ``expected`` the stored config must equal it; the error lists the fields that differ.
    """
    step_dir = resolve_checkpoint(path)
    config = FarmerConfig.from_dict(read_config(step_dir)["model"])
    if expected is not None and config != expected:
        diff = config.diff(expected)
        raise ValueError(f"checkpoint config does not match: {diff} (checkpoint, expected)")
    return Farmer.from_pretrained(step_dir, ema=ema, map_location=map_location)
