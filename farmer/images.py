"""Image files (Pillow): PNG grids, single images at a model's size, PNG-compressed size."""

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


def stream_npz_images(path: str | Path, shape: tuple[int, int, int, int], batches: Iterable[np.ndarray],
                      labels: np.ndarray | None = None) -> Path:
    """Write uint8 NHWC ``batches`` (together ``shape``) as ``arr_0`` of an .npz while they come, and ``labels``
    as ``labels``: the file np.savez writes (farmer.metrics.save_npz_images), without holding every image. Atomic:
    a failure or too few images leave no file."""
    def write(handle: BinaryIO) -> None:
        written = 0
        with zipfile.ZipFile(handle, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as archive:
            with archive.open("arr_0.npy", "w", force_zip64=True) as member:
                np.lib.format.write_array_header_2_0(member, {"descr": "|u1", "fortran_order": False,
                                                              "shape": tuple(shape)})
                for batch in batches:
                    batch = np.ascontiguousarray(batch)
                    if batch.dtype != np.uint8 or batch.shape[1:] != tuple(shape[1:]):
                        raise ValueError(f"batches must be uint8 (B, {', '.join(map(str, shape[1:]))}), got "
                                         f"{batch.dtype} {batch.shape}")
                    member.write(batch.tobytes())
                    written += len(batch)
            if written != shape[0]:
                raise ValueError(f"expected {shape[0]} images, the batches held {written}")
            if labels is not None:
                with archive.open("labels.npy", "w", force_zip64=True) as member:
                    np.lib.format.write_array(member, np.asarray(labels), allow_pickle=False)

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return write_atomic(path, write)


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
