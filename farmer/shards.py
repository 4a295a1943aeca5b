"""Packed image folders, the format and its reader: every image decoded, converted to RGB and ADM-centre-cropped
once (:func:`farmer.data.load_rgb_crop`) and stored as uint8 shards that training memory-maps.

Decoding a JPEG costs milliseconds; reading a packed image is a memory copy, so a few DataLoader workers per
GPU keep up, and no training rank lists the source files. ``farmer data pack SRC --out DIR --size S``
(farmer/packing.py) writes::

    DIR/index.json                  format, version, image size, source, and per split its class names,
                                    shard names and counts, and the files that could not be read
    DIR/<split>-00000.images.npy    uint8 (n, S, S, 3), numpy's .npy format (memory-mapped when read)
    DIR/<split>-00000.labels.npy    int64 (n,)

``<split>`` is train/val/test when SRC has those subfolders, else ``all`` (and make_dataset holds out a
fixed-seed share as it does for the folder). Images keep the folder's order (class, then path), so a packed
split yields exactly what :class:`farmer.data.ImageFolderDataset` yields, minus unreadable files: those are
skipped, named on stderr and listed in the index. A ``DIR`` with an index is always complete (the packer
renames it into place last).
"""

from __future__ import annotations

import bisect
import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

INDEX_NAME = "index.json"
FORMAT = "farmer-shards"
FORMAT_VERSION = 1
FLAT_SPLIT = "all"  # the one split of a source without train/val/test subfolders


def is_packed(path: Path) -> bool:
    """Whether ``path`` is a packed folder (it holds the index file)."""
    return (path / INDEX_NAME).is_file()


def read_index(directory: Path) -> dict[str, Any]:
    """The checked index of a packed folder; ValueError names the file and the problem."""
    path = directory / INDEX_NAME
    try:
        index = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ValueError(f"cannot read packed-data index {path}: {err}") from err
    if not isinstance(index, dict) or index.get("format") != FORMAT:
        raise ValueError(f"{path} is not a farmer packed-data index (no \"format\": \"{FORMAT}\")")
    if index.get("version") != FORMAT_VERSION:
        raise ValueError(f"{path} has format version {index.get('version')!r}; this farmer reads version "
                         f"{FORMAT_VERSION}: pack the images again with `farmer data pack`")
    missing = sorted({"image_size", "classes", "splits"} - index.keys())
    if missing:
        raise ValueError(f"{path} lacks {', '.join(missing)}")
    return index


def check_packed_size(directory: Path, index: dict[str, Any], image_size: int | None) -> None:
    """A packed folder serves only the size it was packed at."""
    if image_size is not None and image_size != index["image_size"]:
        raise ValueError(f"{directory} was packed at {index['image_size']}×{index['image_size']}; the model needs "
                         f"{image_size}×{image_size}: run `farmer data pack SRC --out DIR --size {image_size}`")


class PackedDataset(Dataset):
    """One split of a packed folder as (uint8 tensor (3, S, S), int label), read from memory-mapped shards.

    The shards are opened on first access in each process, so the dataset pickles (into DataLoader workers)
    as a list of file names.
    """

    def __init__(self, directory: Path, split: str, index: dict[str, Any]) -> None:
        if split not in index["splits"]:
            raise ValueError(f"{directory / INDEX_NAME} has no split {split!r} (it has {sorted(index['splits'])})")
        entry = index["splits"][split]
        self.directory, self.split = directory, split
        self.image_size: int = index["image_size"]
        self.classes: list[str] = entry["classes"]
        self.shards: list[tuple[str, int]] = [(shard["name"], shard["count"]) for shard in entry["shards"]]
        self._ends = np.cumsum([count for _, count in self.shards]).tolist()
        self._opened: list[tuple[np.ndarray, np.ndarray]] | None = None

    def __len__(self) -> int:
        return self._ends[-1] if self._ends else 0

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_opened": None}  # workers map the files themselves

    def _open_shard(self, name: str, count: int) -> tuple[np.ndarray, np.ndarray]:
        size = self.image_size
        images_path, labels_path = (self.directory / f"{name}.{kind}.npy" for kind in ("images", "labels"))
        images = np.load(images_path, mmap_mode="r")
        labels = np.load(labels_path)
        if images.dtype != np.uint8 or images.shape != (count, size, size, 3):
            raise ValueError(f"{images_path} holds {images.dtype} {images.shape}; its index says uint8 "
                             f"{(count, size, size, 3)}: pack the images again")
        if labels.shape != (count,):
            raise ValueError(f"{labels_path} holds {labels.shape} labels; its index says {count}")
        return images, labels.astype(np.int64)

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} packed images")
        if self._opened is None:
            self._opened = [self._open_shard(name, count) for name, count in self.shards]
        shard = bisect.bisect_right(self._ends, index)
        local = index - (self._ends[shard - 1] if shard else 0)
        images, labels = self._opened[shard]
        return torch.from_numpy(np.ascontiguousarray(images[local].transpose(2, 0, 1))), int(labels[local])




__all__ = ["FLAT_SPLIT", "FORMAT", "FORMAT_VERSION", "INDEX_NAME", "PackedDataset", "check_packed_size", "is_packed",
           "read_index"]
