"""``farmer data pack``: decode an image folder once into the uint8 shards of farmer/shards.py.

Several processes decode (``workers``), one shard each at a time. Crash safety: packing writes into
``DIR.partial``; each shard goes to temporary names, is renamed into place and then marked done. A rerun of
the same command skips the done shards (a changed source or size restarts); ``DIR`` appears, by one rename,
only when every shard is done.
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
import shutil
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from farmer.data import FOLDER_SPLITS, list_image_folder, load_rgb_crop
from farmer.io import fsync_directory, write_atomic, write_json_atomic
from farmer.shards import FLAT_SPLIT, FORMAT, FORMAT_VERSION, INDEX_NAME, is_packed

DEFAULT_SHARD_SIZE = 1024  # 201 MB per shard at 256², 1,252 shards for ImageNet's 1.28M training images
CROP = "adm-center-crop (guided-diffusion center_crop_arr); alpha composited onto white"

_PLAN_NAME = "plan.json"  # in DIR.partial: what is being packed, so a rerun knows whether it may resume
_DONE_SUFFIX = ".done.json"  # in DIR.partial: a finished shard's count and skipped files


def _stderr(message: str) -> None:
    print(message, file=sys.stderr)


@dataclass(frozen=True)
class _ShardTask:
    """One shard to write: its files and labels, in order."""

    directory: Path  # DIR.partial
    name: str
    files: tuple[str, ...]
    labels: tuple[int, ...]
    size: int


def _temporary(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp")


def _fsync(path: Path) -> None:
    with open(path, "rb") as handle:
        os.fsync(handle.fileno())


def _write_images(task: _ShardTask, path: Path) -> tuple[int, list[dict[str, str]]]:
    """Decode the shard's images into ``path`` (a .npy memmap); return (count, skipped files and why).

    Unreadable files are skipped, so the readable ones are stored contiguously and the file is cut to size.
    """
    shape = (len(task.files), task.size, task.size, 3)
    images = np.lib.format.open_memmap(path, mode="w+", dtype=np.uint8, shape=shape)
    count, skipped = 0, []
    for file in task.files:
        try:
            images[count] = load_rgb_crop(Path(file), task.size)
            count += 1
        except ValueError as err:
            skipped.append({"file": file, "error": str(err)})
    if count < len(task.files):  # rare: rewrite the readable prefix as a file of the right size
        short = path.with_name(path.name + ".short")
        with open(short, "wb") as handle:
            np.save(handle, images[:count])
        del images
        os.replace(short, path)
    else:
        images.flush()
        del images
    _fsync(path)
    return count, skipped


def _write_labels(path: Path, labels: np.ndarray) -> None:
    write_atomic(path, lambda handle: np.save(handle, labels))


def _pack_shard(task: _ShardTask) -> dict[str, Any]:
    """Write one shard: images and labels under temporary names, renamed into place, then the done marker."""
    images_path = task.directory / f"{task.name}.images.npy"
    temporary = _temporary(images_path)
    try:
        count, skipped = _write_images(task, temporary)
        unread = {entry["file"] for entry in skipped}
        kept = [label for file, label in zip(task.files, task.labels, strict=True) if file not in unread]
        labels = np.array(kept, dtype=np.int64)
        os.replace(temporary, images_path)
        _write_labels(task.directory / f"{task.name}.labels.npy", labels)
    except BaseException:
        temporary.unlink(missing_ok=True)
        temporary.with_name(temporary.name + ".short").unlink(missing_ok=True)
        raise
    record = {"name": task.name, "count": count, "skipped": skipped}
    write_json_atomic(task.directory / f"{task.name}{_DONE_SUFFIX}", record)
    return record


def _list_splits(source: Path) -> dict[str, tuple[list[str], list[tuple[Path, int]]]]:
    """Each split folder's (classes, samples), as ImageFolderDataset lists them (which warns of empty classes)."""
    present = [split for split in FOLDER_SPLITS if (source / split).is_dir()]
    folders = {split: source / split for split in present} or {FLAT_SPLIT: source}
    return {split: list_image_folder(folder) for split, folder in folders.items()}


def _plan(source: Path, size: int, shard_size: int, splits: dict[str, tuple[list[str], list[tuple[Path, int]]]],
          partial: Path) -> tuple[dict[str, Any], list[_ShardTask]]:
    """The shard tasks, and a description whose digest tells a rerun whether a partial pack is the same one."""
    tasks, description = [], {"source": str(source), "size": size, "shard_size": shard_size, "splits": {}}
    for split, (classes, samples) in splits.items():
        files, labels = [str(file) for file, _ in samples], [label for _, label in samples]
        description["splits"][split] = {"classes": classes, "files": files, "labels": labels}
        for number, start in enumerate(range(0, len(files), shard_size)):
            stop = start + shard_size
            tasks.append(_ShardTask(partial, f"{split}-{number:05d}", tuple(files[start:stop]),
                                    tuple(labels[start:stop]), size))
    digest = hashlib.sha256(json.dumps(description, sort_keys=True).encode()).hexdigest()
    return {"format": FORMAT, "version": FORMAT_VERSION, "digest": digest}, tasks


def _prepare_partial(partial: Path, plan: dict[str, Any], log: Callable[[str], None]) -> None:
    """Keep a partial pack of the same plan (resume); remove one of another plan; never touch other folders."""
    plan_path = partial / _PLAN_NAME
    if partial.exists():
        try:
            previous = json.loads(plan_path.read_text())
        except (OSError, json.JSONDecodeError) as err:
            raise ValueError(f"{partial} exists but is not a partial pack ({err}); move or delete it") from err
        if previous == plan:
            log(f"resuming the partial pack in {partial}")
            return
        log(f"{partial} is a partial pack of other files or another size; starting again")
        shutil.rmtree(partial)
    partial.mkdir(parents=True)
    write_json_atomic(plan_path, plan)


def _done_records(partial: Path) -> dict[str, dict[str, Any]]:
    records = (json.loads(path.read_text()) for path in partial.glob(f"*{_DONE_SUFFIX}"))
    return {record["name"]: record for record in records}


def _run_tasks(tasks: list[_ShardTask], workers: int, progress: bool) -> None:
    bar = tqdm(total=len(tasks), unit="shard", disable=not progress, dynamic_ncols=True)
    with bar:
        if workers == 1 or len(tasks) <= 1:
            for task in tasks:
                _pack_shard(task)
                bar.update(1)
            return
        with multiprocessing.get_context().Pool(min(workers, len(tasks))) as pool:
            for _ in pool.imap_unordered(_pack_shard, tasks):
                bar.update(1)


def _index(source: Path, size: int, splits: dict[str, tuple[list[str], list[tuple[Path, int]]]],
           tasks: list[_ShardTask], records: dict[str, dict[str, Any]]) -> dict[str, Any]:
    entries = {}
    for split, (classes, _) in splits.items():
        shards = [records[task.name] for task in tasks if task.name.startswith(f"{split}-")]
        entries[split] = {
            "classes": classes,
            "count": sum(shard["count"] for shard in shards),
            "shards": [{"name": shard["name"], "count": shard["count"]} for shard in shards],
            "skipped": [entry for shard in shards for entry in shard["skipped"]],
        }
        if entries[split]["count"] == 0:
            raise ValueError(f"no image of split {split!r} in {source} could be read "
                             f"(first error: {entries[split]['skipped'][0]['error']})")
    return {"format": FORMAT, "version": FORMAT_VERSION, "image_size": size, "source": str(source), "crop": CROP,
            "classes": next(iter(entries.values()))["classes"], "splits": entries}


def _check_output(out: Path) -> None:
    if is_packed(out):
        raise ValueError(f"{out} is already a packed folder; delete it to pack again")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ValueError(f"--out {out} exists and is not an empty directory")


def pack_image_folder(source: Path | str, out: Path | str, size: int, workers: int = 1,
                      shard_size: int = DEFAULT_SHARD_SIZE, log: Callable[[str], None] = _stderr,
                      progress: bool = False) -> dict[str, Any]:
    """Pack the class-per-subfolder image folder ``source`` (optionally under train/val/test) into ``out``.

    Returns the index. Unreadable images are skipped and named (``log``); a failure (a full disk, say) leaves
    ``out`` absent and the finished shards in ``out.partial``, where the same call resumes.
    """
    source, out = Path(source).expanduser().resolve(), Path(out).expanduser().resolve()
    for name, value in (("size", size), ("workers", workers), ("shard_size", shard_size)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    if not source.is_dir():
        raise FileNotFoundError(f"image folder not found: {source}")
    _check_output(out)
    splits = _list_splits(source)
    partial = out.with_name(out.name + ".partial")
    plan, tasks = _plan(source, size, shard_size, splits, partial)
    _prepare_partial(partial, plan, log)
    todo = [task for task in tasks if task.name not in _done_records(partial)]
    try:
        _run_tasks(todo, workers, progress)
    except BaseException as err:
        for leftover in partial.glob(".*.tmp*"):  # a pool terminated mid-shard leaves its temporaries
            leftover.unlink(missing_ok=True)
        if isinstance(err, OSError):
            raise OSError(err.errno, f"packing {source} failed ({err}); finished shards are kept in {partial}: "
                                     "free the space (or fix the cause) and run the same command to resume") from err
        raise
    records = _done_records(partial)
    for entry in (entry for record in records.values() for entry in record["skipped"]):
        log(f"warning: skipped {entry['error']}")
    index = _index(source, size, splits, tasks, records)
    write_json_atomic(partial / INDEX_NAME, index)
    if out.exists():
        out.rmdir()  # checked empty above
    os.replace(partial, out)
    fsync_directory(out.parent)
    for path in [out / _PLAN_NAME, *out.glob(f"*{_DONE_SUFFIX}")]:  # after the rename: a kill here is harmless
        path.unlink()
    return index


__all__ = ["DEFAULT_SHARD_SIZE", "pack_image_folder"]
