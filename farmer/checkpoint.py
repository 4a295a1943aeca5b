"""Checkpoints: safetensors weights + JSON beside them, written atomically, loaded with clear errors.

A run directory holds versioned checkpoints and a pointer to the newest one::

    runs/NAME/LATEST                   "step-00001000"  (replaced atomically with os.replace)
    runs/NAME/step-00001000/config.json      {"model": FarmerConfig, "train": TrainConfig, ...}
                            model.safetensors  ema.safetensors  [optimizer.safetensors  trainer.json]

A step directory is first written under a temporary name, flushed, then renamed into place, and only
then does LATEST move: a crash at any moment leaves the previous checkpoint intact and loadable. Nothing
is ever unpickled (one exception below), and no tensor with a NaN or Inf is ever written or loaded: a diverged
run cannot overwrite (or rotate away) its last good checkpoint. A trainer holds ``.lock`` (``fcntl.flock``,
holding its pid) for as long as it writes the directory.

A sharded step (FSDP under ``torchrun``, :func:`save_sharded_checkpoint`) replaces model.safetensors and
optimizer.safetensors by ``sharded/``: each rank's shards of the weights, EMA and optimizer, written in parallel by
``torch.distributed.checkpoint`` (DCP), so that no rank ever holds the full training state (~18 GB for the 1.1B
model). Its ema.safetensors is kept (gathered on rank 0, as every evaluation does anyway): that is what
sampling, evaluation and :meth:`Farmer.from_pretrained` read, in safetensors like every other model. DCP's
``.metadata`` is a pickle: shards are read only to resume a run (the trainer's own directory, which it locks) or
by :func:`load_sharded_weights` on a run of your own; they are never uploaded or shipped.

A released model (the Hub layout, shipped models, reading configs and weights) is :mod:`farmer.pretrained`'s;
this module adds what training needs: run directories, optimizer state, the lock.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import re
import shutil
import tempfile
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from safetensors import SafetensorError
from safetensors.torch import save_file
from torch import Tensor

from farmer.config import FarmerConfig
from farmer.distributed import local_shards
from farmer.io import FarmerError, fsync_directory, write_atomic
from farmer.model import Farmer
from farmer.pretrained import (
    CONFIG,
    EMA_WEIGHTS,
    FORMAT_VERSION,
    LATEST,
    MODEL_WEIGHTS,
    SHARDED_STATE,
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
    files = {MODEL_WEIGHTS: contiguous(weights)}
    if ema_weights is not None:
        files[EMA_WEIGHTS] = contiguous(ema_weights)
    if optimizer is not None:
        files[OPTIMIZER], meta = flatten_optimizer_state(optimizer)
        trainer = {**(trainer or {}), "optimizer": meta}
    _refuse_nonfinite(step, files)
    tmp = begin_step(run_dir, step)
    with _publishing(Path(run_dir), tmp, step, keep):
        _write_step_files(tmp, step, config, files, trainer)
    return Path(run_dir) / _step_name(step)


def _step_name(step: int) -> str:
    return f"step-{step:08d}"


_STEP_NAME = re.compile(r"step-\d{8,}")  # exactly what _step_name writes


def _refuse_nonfinite(step: int, files: dict[str, dict[str, Tensor]]) -> None:
    for file, tensors in files.items():
        bad = first_nonfinite(tensors)
        if bad is not None:
            raise ValueError(f"refusing to save step {step}: tensor {bad!r} of {file} has NaN or Inf values")


def _write_step_files(tmp: Path, step: int, config: dict[str, Any], files: dict[str, dict[str, Tensor]],
                      trainer: dict[str, Any] | None) -> None:
    with open(tmp / CONFIG, "w") as f:
        json.dump({"format": FORMAT_VERSION, "step": step, **config}, f, indent=2, sort_keys=True)
    for file, tensors in files.items():
        save_file(tensors, str(tmp / file))
    if trainer is not None:
        with open(tmp / TRAINER, "w") as f:
            json.dump(trainer, f)


def begin_step(run_dir: str | Path, step: int) -> Path:
    """A new hidden temporary directory in ``run_dir`` (created if needed) for step ``step``'s files: what a
    killed save leaves behind there is removed by :func:`remove_stale_temporaries`."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f".{_step_name(step)}.", dir=run_dir))


def _fsync_tree(root: Path) -> None:
    for path in sorted(root.rglob("*"), reverse=True):  # files before the directories that hold them
        if path.is_dir():
            fsync_directory(path)
        else:
            with open(path, "rb") as f:
                os.fsync(f.fileno())
    fsync_directory(root)


@contextlib.contextmanager
def _publishing(run_dir: Path, tmp: Path, step: int, keep: int) -> Iterator[None]:
    """Around the writing of ``tmp`` (from :func:`begin_step`): then flush it, rename it to its step directory,
    point LATEST at it and rotate; on any failure delete it (a full disk says which checkpoint is intact)."""
    name = _step_name(step)
    try:
        yield
        _fsync_tree(tmp)
        final = run_dir / name
        if final.exists():  # re-saving the same step (e.g. after a resume) replaces it
            shutil.rmtree(final)
        os.replace(tmp, final)
    except BaseException as err:
        shutil.rmtree(tmp, ignore_errors=True)
        if _disk_full(err):
            intact = _latest_name(run_dir)
            raise FarmerError(f"no space left on device while saving step {step} in {run_dir}; "
                               + (f"{intact} is intact" if intact else "no earlier checkpoint exists")) from err
        raise
    write_atomic(run_dir / LATEST, name + "\n")
    # Only the trainer's own names (step-%08d) rotate: a user's copy such as step-00000020-best is never touched.
    steps = sorted(p for p in run_dir.glob("step-*") if p.is_dir() and _STEP_NAME.fullmatch(p.name))
    for old in steps[:-keep] if keep > 0 else []:
        if old.name != name:
            shutil.rmtree(old, ignore_errors=True)


def save_sharded_checkpoint(run_dir: Path, step: int, config: dict[str, Any], state: dict[str, Any],
                            ema_weights: dict[str, Tensor], trainer: dict[str, Any], keep: int = 2) -> None:
    """A step directory whose resumable state (``state``: each rank's shards of model, EMA and optimizer, as
    :func:`farmer.distributed.sharded_state` gives them) is written by every rank in parallel with
    ``torch.distributed.checkpoint`` under ``SHARDED_STATE``, beside rank 0's config.json, trainer.json and
    ema.safetensors (the full EMA weights, gathered: what sampling and evaluation load, see
    docs/method.md §8). A collective: every rank calls it, with ``ema_weights`` empty except on rank 0; the
    directory is published atomically (as :func:`save_checkpoint`) once every rank's shards are on disk."""
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp

    main = dist.get_rank() == 0
    # Every rank checks what it holds and all agree (a rank raising alone would leave the others waiting).
    held = {"model shards": local_shards(state["model"]), "EMA shards": local_shards(state["ema"]),
            EMA_WEIGHTS: ema_weights}
    bad = [f"{name}: {key!r}" for name, tensors in held.items() if (key := first_nonfinite(tensors))]
    flags: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(flags, bool(bad))  # object collectives work on any backend's device
    if any(flags):
        raise ValueError(f"refusing to save step {step}: NaN or Inf values"
                         + (f" in {', '.join(bad)}" if bad else " on another rank"))
    names = [str(begin_step(run_dir, step)) if main else None]
    dist.broadcast_object_list(names, src=0)  # one temporary directory for all ranks
    tmp = Path(names[0])
    with _publishing(run_dir, tmp, step, keep) if main else contextlib.nullcontext():
        # Returns on every rank once the coordinator has written the metadata, i.e. after all shards.
        dcp.save(state, checkpoint_id=tmp / SHARDED_STATE)
        if main:
            _write_step_files(tmp, step, config, {EMA_WEIGHTS: contiguous(ema_weights)},
                              {**trainer, "checkpoint_format": "sharded"})


def is_sharded_checkpoint(step_dir: Path) -> bool:
    return (step_dir / SHARDED_STATE).is_dir()


def load_sharded_state(step_dir: Path, state: dict[str, Any]) -> None:
    """Fill ``state`` (the structure :func:`save_sharded_checkpoint` wrote, or a part of it: e.g. only
    "model") in place from ``step_dir``'s shards; with a process group each rank reads its own shards (any
    world size), without one a single process reads everything into plain tensors.

    DCP's metadata file (``.metadata``) is a pickle, unlike every other file farmer reads: load only shards
    that your own trainer wrote (the ``resolve_checkpoint`` of a run directory you made). Released models
    and the Hub carry safetensors only.
    """
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp

    shards = step_dir / SHARDED_STATE
    if not (shards / ".metadata").is_file():
        raise FileNotFoundError(f"{shards} holds no sharded checkpoint (no .metadata)")
    with warnings.catch_warnings():  # DCP warns that it "assumes" one process: here that is meant
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.load(state, checkpoint_id=shards, no_dist=not dist.is_initialized())


def load_sharded_weights(path: str | Path, ema: bool = False) -> dict[str, Tensor]:
    """The full (raw by default, or EMA) weights of a sharded checkpoint, read in this one process: a run
    directory of your own (see :func:`load_sharded_state` on trust) or one of its step directories."""
    step_dir = resolve_checkpoint(path)
    if not is_sharded_checkpoint(step_dir):
        raise ValueError(f"{step_dir} is not a sharded checkpoint (no {SHARDED_STATE}/)")
    model = Farmer(FarmerConfig.from_dict(read_config(step_dir)["model"]))
    key = "ema" if ema else "model"
    state = {key: model.state_dict()}
    load_sharded_state(step_dir, state)
    return state[key]


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
            raise FarmerError(f"{run_dir} is in use by another trainer (pid {holder}); wait for it to end or "
                               "use another --out") from None
        handle.truncate(0)
        handle.write(f"{os.getpid()}\n")
        handle.flush()
        remove_stale_temporaries(run_dir)
        yield
