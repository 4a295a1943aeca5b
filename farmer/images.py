"""Image grids as PNG files (Pillow)."""

from __future__ import annotations

from pathlib import Path

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
