"""Image files: PNG grids, single images at a model's size, PNG-compressed size (Pillow), and .npz files of
samples (:func:`save_samples`, :func:`load_samples`)."""

from __future__ import annotations

import io
import zipfile
from collections.abc import Iterable
from pathlib import Path
from typing import BinaryIO

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from farmer.io import write_atomic


def make_grid(images: Tensor, nrow: int, padding: int = 2) -> np.ndarray:
    """uint8 (B, C, H, W) -> one uint8 (H', W', C) array with ``nrow`` images per row."""
    if images.dtype != torch.uint8 or images.ndim != 4:
        raise ValueError(f"images must be uint8 (B, C, H, W), got {images.dtype} {tuple(images.shape)}")
    b, c, h, w = images.shape
    ncol = max(1, nrow)
    rows = -(-b // ncol)
    grid = np.zeros((rows * (h + padding) + padding, ncol * (w + padding) + padding, c), dtype=np.uint8)
    array = images.permute(0, 2, 3, 1).cpu().numpy()
    for i in range(b):
        r, col = divmod(i, ncol)
        top, left = padding + r * (h + padding), padding + col * (w + padding)
        grid[top:top + h, left:left + w] = array[i]
    return grid


def save_grid(images: Tensor, path: str | Path, nrow: int, scale: int = 1) -> Path:
    """Write uint8 images as a PNG grid (or the format of the path's extension), optionally upscaled (nearest)
    so small digits stay visible; atomically, so a full disk never leaves a torn image."""
    grid = make_grid(images, nrow)
    image = Image.fromarray(grid[..., 0] if grid.shape[-1] == 1 else grid)
    if scale > 1:
        image = image.resize((image.width * scale, image.height * scale), Image.NEAREST)
    path = Path(path)
    image_format = Image.registered_extensions().get(path.suffix.lower())
    if image_format is None:
        raise ValueError(f"{path} needs an image extension such as .png (the format follows it)")
    path.parent.mkdir(parents=True, exist_ok=True)
    return write_atomic(path, lambda handle: image.save(handle, format=image_format))


# Pillow opens 16-bit greyscale files (PNG, TIFF) in these modes, and its own convert("L") clips them at 255
# instead of scaling them (16-bit colour PNGs it already opens as 8-bit RGB/RGBA).
_WIDE_GREY_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")
_ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")
_SIXTEEN_BIT_MAX = 65_535


def has_alpha(image: Image.Image) -> bool:
    """Whether ``image`` carries transparency: an alpha band or a palette/colour key with a transparent entry."""
    return image.mode in _ALPHA_MODES or "transparency" in image.info


def to_8bit(image: Image.Image, mode: str, background: int) -> Image.Image:
    """``image`` in Pillow ``mode`` "L" or "RGB" with 8 bits per channel: 16-bit greyscale scaled by 255/65535
    (not clipped at 255), transparent pixels composited onto the grey level ``background`` (0 black, 255 white)
    rather than showing whatever colour they happen to store. The one decode every image file goes through."""
    if mode not in ("L", "RGB"):
        raise ValueError(f"mode must be 'L' or 'RGB', got {mode!r}")
    if image.mode in _WIDE_GREY_MODES:
        values = np.clip(np.asarray(image, dtype=np.float64), 0, _SIXTEEN_BIT_MAX)
        image = Image.fromarray(np.rint(values * (255 / _SIXTEEN_BIT_MAX)).astype(np.uint8), "L")
    if has_alpha(image):
        rgba = image.convert("RGBA")
        image = Image.alpha_composite(Image.new("RGBA", rgba.size, (background,) * 3 + (255,)), rgba)
    return image.convert(mode)


def default_background(channels: int) -> int:
    """Where a file is transparent, the data's background: black for grey (MNIST-like: light ink on black)
    models, white for RGB ones (as an image folder is decoded for training, farmer.data.to_rgb)."""
    return 0 if channels == 1 else 255


# Sample files (.npz): the layout of ADM's evaluation suite and common FID tools, ``arr_0`` uint8 (N, H, W, C)
# and, for class-conditional samples, ``labels`` (N,). The API speaks the model's uint8 (N, C, H, W) tensors.
_SAMPLE_CHANNELS = (1, 3)


def _check_sample_pixels(pixels: Tensor, source: str) -> Tensor:
    if not isinstance(pixels, Tensor) or pixels.dtype != torch.uint8:
        raise ValueError(f"{source}: images must be uint8, got {getattr(pixels, 'dtype', type(pixels).__name__)}")
    if pixels.ndim != 4 or pixels.shape[1] not in _SAMPLE_CHANNELS:
        raise ValueError(f"{source}: images must be (N, C, H, W) with C in {_SAMPLE_CHANNELS}, got shape "
                         f"{tuple(pixels.shape)}")
    return pixels


def _write_samples(handle: BinaryIO, shape: tuple[int, int, int, int], batches: Iterable[Tensor],
                   labels: Tensor | None) -> None:
    """The .npz of samples (N, C, H, W) = ``shape``, written to ``handle`` batch by batch (np.savez's layout
    without holding every image)."""
    n, c, h, w = shape
    written = 0
    with zipfile.ZipFile(handle, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as archive:
        with archive.open("arr_0.npy", "w", force_zip64=True) as member:
            np.lib.format.write_array_header_2_0(member, {"descr": "|u1", "fortran_order": False,
                                                          "shape": (n, h, w, c)})
            for batch in batches:
                _check_sample_pixels(batch, "samples")
                if tuple(batch.shape[1:]) != (c, h, w):
                    raise ValueError(f"batches must be uint8 (B, {c}, {h}, {w}), got {tuple(batch.shape)}")
                member.write(np.ascontiguousarray(batch.permute(0, 2, 3, 1).cpu().numpy()).tobytes())
                written += len(batch)
        if written != n:
            raise ValueError(f"expected {n} images, the batches held {written}")
        if labels is not None:
            if labels.shape != (n,):
                raise ValueError(f"labels must be ({n},), one per image, got {tuple(labels.shape)}")
            with archive.open("labels.npy", "w", force_zip64=True) as member:
                np.lib.format.write_array(member, labels.cpu().numpy(), allow_pickle=False)


def stream_samples(path: str | Path, shape: tuple[int, int, int, int], batches: Iterable[Tensor],
                   labels: Tensor | None = None) -> Path:
    """Write uint8 (B, C, H, W) ``batches`` (together (N, C, H, W) = ``shape``) to the .npz ``path`` while they
    come, with their ``labels`` (N,) if any. Atomic: a failure or too few images leave no file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return write_atomic(path, lambda handle: _write_samples(handle, tuple(shape), batches, labels))


def save_samples(path: str | Path, pixels: Tensor, labels: Tensor | None = None) -> Path:
    """Write uint8 (N, C, H, W) ``pixels`` and their ``labels`` (N,) if any as an .npz of samples (atomic)."""
    return stream_samples(path, _check_sample_pixels(pixels, str(path)).shape, [pixels], labels)


def samples_bytes(pixels: Tensor, labels: Tensor | None = None) -> bytes:
    """The bytes of :func:`save_samples`'s file, for a download."""
    buffer = io.BytesIO()
    _write_samples(buffer, _check_sample_pixels(pixels, "samples").shape, [pixels], labels)
    return buffer.getvalue()


def _read_member(data: np.lib.npyio.NpzFile, key: str, path: Path) -> np.ndarray:
    try:
        return data[key]
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as err:
        raise ValueError(f"{path}: cannot read '{key}': {err}") from err


def load_samples(path: str | Path, max_images: int | None = None) -> tuple[Tensor, Tensor | None]:
    """(uint8 (N, C, H, W) pixels, int64 labels (N,) or None) from an .npz of samples (no pickle), the layout
    checked with the problem named; the first ``max_images`` only when given."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"image file not found: {path}")
    try:
        data = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError) as err:
        raise ValueError(f"{path} is not a readable .npz file: {err}") from err
    if not isinstance(data, np.lib.npyio.NpzFile):
        raise ValueError(f"{path} holds a single .npy array; expected an .npz with the images under 'arr_0'")
    with data:
        if "arr_0" not in data.files:
            raise ValueError(f"{path} has no 'arr_0' array (keys: {', '.join(data.files) or 'none'})")
        images, labels = (_read_member(data, key, path) if key in data.files else None for key in ("arr_0", "labels"))
    if images.dtype != np.uint8:
        raise ValueError(f"{path}: images must be uint8, got dtype {images.dtype}")
    if images.ndim != 4 or images.shape[-1] not in _SAMPLE_CHANNELS:
        raise ValueError(f"{path}: images must be (N, H, W, C) with C in {_SAMPLE_CHANNELS}, got shape "
                         f"{images.shape}")
    if labels is not None and (labels.shape != images.shape[:1] or labels.dtype.kind not in "iu"):
        raise ValueError(f"{path}: labels must be integers, one per image ({len(images)}), got {labels.dtype} "
                         f"{labels.shape}")
    pixels = torch.from_numpy(images[:max_images]).permute(0, 3, 1, 2).contiguous()
    return pixels, None if labels is None else torch.from_numpy(labels[:max_images].astype(np.int64))


class ImageTooLarge(ValueError):
    """An image file with more pixels than the caller allows (checked before decoding it)."""


def load_image(source: str | Path | BinaryIO, channels: int, size: int, max_pixels: int | None = None,
               background: int | None = None) -> Tensor:
    """An image file as uint8 (C, H, W) at ``size``: grey or RGB in 8 bits (:func:`to_8bit`; transparency onto
    ``background``, by default :func:`default_background`), centre square crop, bicubic resize (the image-folder
    data set's preprocessing). Unreadable files raise OSError (Pillow's own errors)."""
    with Image.open(source) as image:
        w, h = image.size
        if max_pixels is not None and w * h > max_pixels:
            raise ImageTooLarge(f"image is {w}×{h}; the limit is {max_pixels} pixels")
        image = to_8bit(image, "L" if channels == 1 else "RGB",
                        default_background(channels) if background is None else background)
        side = min(w, h)
        left, top = (w - side) // 2, (h - side) // 2
        image = image.crop((left, top, left + side, top + side))
        if side != size:
            image = image.resize((size, size), Image.Resampling.BICUBIC)
        array = np.asarray(image, dtype=np.uint8).reshape(size, size, -1)
    return torch.from_numpy(array.transpose(2, 0, 1).copy())


def load_image_folder(folder: str | Path, channels: int, size: int,
                      max_images: int | None = None) -> tuple[Tensor, list[str]]:
    """(uint8 (N, C, H, W), file names relative to ``folder``): the image files under ``folder`` at any depth, in
    name order, the first ``max_images`` only when given, each read by :func:`load_image`; an unreadable or
    truncated file is named (Pillow's own errors do not)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"image folder {folder} is not a directory")
    extensions = set(Image.registered_extensions())
    files = sorted(f for f in folder.rglob("*") if f.is_file() and f.suffix.lower() in extensions)[:max_images]
    if not files:
        raise ValueError(f"image folder {folder} holds no image files")
    images = []
    for file in files:
        try:
            images.append(load_image(file, channels, size))
        except (OSError, SyntaxError) as err:  # SyntaxError: Pillow's bad PNG chunks
            raise ValueError(f"image folder: cannot read {file}: {err}") from None
    return torch.stack(images), [str(f.relative_to(folder)) for f in files]


def png_bits_per_dim(images: Tensor) -> np.ndarray:
    """Bits per dimension of each uint8 (N, C, H, W) image as a maximally compressed PNG: the input
    complexity estimate L(x) of Serrà et al. (ICLR 2020) that corrects likelihoods for OOD detection."""
    if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f"images must be uint8 (N, C, H, W) with C in (1, 3), got {images.dtype} "
                         f"{tuple(images.shape)}")
    sizes = []
    for array in images.permute(0, 2, 3, 1).cpu().numpy():
        buffer = io.BytesIO()
        Image.fromarray(array[..., 0] if array.shape[-1] == 1 else array).save(buffer, "PNG", optimize=True)
        sizes.append(8 * buffer.tell())
    return np.asarray(sizes, dtype=np.float64) / images[0].numel()
