"""Image files (Pillow): PNG grids, single images at a model's size, PNG-compressed size."""

from __future__ import annotations

import io
from pathlib import Path
from typing import BinaryIO

import numpy as np
import torch
from PIL import Image
from torch import Tensor


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
    """Write uint8 images as a PNG grid, optionally upscaled (nearest) so small digits stay visible."""
    grid = make_grid(images, nrow)
    image = Image.fromarray(grid[..., 0] if grid.shape[-1] == 1 else grid)
    if scale > 1:
        image = image.resize((image.width * scale, image.height * scale), Image.NEAREST)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)
    return path


class ImageTooLarge(ValueError):
    """An image file with more pixels than the caller allows (checked before decoding it)."""


def load_image(source: str | Path | BinaryIO, channels: int, size: int, max_pixels: int | None = None) -> Tensor:
    """An image file as uint8 (C, H, W) at ``size``: grey or RGB, centre square crop, bicubic resize (the
    image-folder data set's preprocessing). Unreadable files raise OSError (Pillow's own errors)."""
    with Image.open(source) as image:
        w, h = image.size
        if max_pixels is not None and w * h > max_pixels:
            raise ImageTooLarge(f"image is {w}×{h}; the limit is {max_pixels} pixels")
        image = image.convert("L" if channels == 1 else "RGB")
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
