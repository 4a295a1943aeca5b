"""Pixels <-> model space and dequantization (docs/method.md §1): the pixel math that the model, training,
evaluation and the demo share.

Pixels stay uint8 (C, H, W) until the model needs them; the 8-bit value k occupies the bin
[k/128 - 1, (k+1)/128 - 1) of [-1, 1] (bin width 2/256 = 1/128).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from farmer.config import DEQUANTIZATIONS

# Largest uniform offset used: below 1 by 2^-16, so k - 128 + u (needing at most 8 + 16 significant bits)
# is exact in float32 and rounding can never push a value into bin k + 1.
_U_MAX = 1.0 - 2.0**-16


def _check_uint8(pixels: Tensor) -> None:
    if not isinstance(pixels, Tensor):
        raise TypeError(f"pixels must be a torch.Tensor, got {type(pixels).__name__}")
    if pixels.dtype != torch.uint8:
        raise ValueError(f"pixels must be uint8 (values 0..255), got dtype {pixels.dtype}")


def pixels_to_model(pixels: Tensor) -> Tensor:
    """uint8 pixels -> float32 bin centres (k + 0.5)/128 - 1 in [-1, 1]."""
    _check_uint8(pixels)
    return (pixels.to(torch.float32) - 127.5) / 128.0


def model_to_pixels(x: Tensor) -> Tensor:
    """Floats in [-1, 1] -> uint8 bin index floor((x + 1) * 128), clamped to 0..255."""
    if not isinstance(x, Tensor) or not x.is_floating_point():
        raise ValueError(f"x must be a floating-point tensor, got {getattr(x, 'dtype', type(x).__name__)}")
    if not bool(torch.isfinite(x).all()):
        raise ValueError("x contains NaN or infinite values; cannot convert to pixels")
    # Half types upcast (exactly) so the bin edges are resolved; float64 stays float64.
    x = x.to(torch.promote_types(x.dtype, torch.float32))
    return torch.floor((x + 1.0) * 128.0).clamp_(0, 255).to(torch.uint8)


def dequantize(
    pixels: Tensor, mode: str, noise_std: float = 0.0, generator: torch.Generator | None = None
) -> Tensor:
    """uint8 pixels -> float32 model input (docs/method.md §1).

    ``mode`` is a training dequantization (``farmer.config.DEQUANTIZATIONS``) or ``none``.
    ``uniform``: (k + U[0,1))/128 - 1, the TARFlow protocol under which bits/dim bounds the discrete data.
    ``gaussian``: bin centre + ``noise_std`` * N(0, 1) (generation models). ``none`` and ``variational``: the bin
    centre (a variational model draws its own offsets, farmer.dequantization). ``noise_std`` is used only by
    ``gaussian``.
    """
    _check_uint8(pixels)
    if mode != "none" and mode not in DEQUANTIZATIONS:
        raise ValueError(f"unknown dequantize mode {mode!r}: expected one of {', '.join(DEQUANTIZATIONS)}, none")
    if not math.isfinite(noise_std) or noise_std < 0:
        raise ValueError(f"noise_std must be finite and >= 0, got {noise_std}")
    k = pixels.to(torch.float32)
    if mode == "uniform":
        u = torch.rand(k.shape, generator=generator, device=k.device).clamp_(max=_U_MAX)
        return (k - 128.0 + u) / 128.0
    centre = (k - 127.5) / 128.0
    if mode == "gaussian" and noise_std > 0:
        return centre + noise_std * torch.randn(k.shape, generator=generator, device=k.device)
    return centre


def gaussian_noise_std(step: int, total_steps: int, start: float = 0.1, end: float = 0.005) -> float:
    """Cosine-annealed Gaussian dequantization std (docs/method.md §1): ``start`` at step 0, ``end`` from
    total_steps on."""
    if total_steps <= 0:
        raise ValueError(f"total_steps must be positive, got {total_steps}")
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    if not (start >= 0 and end >= 0 and math.isfinite(start) and math.isfinite(end)):
        raise ValueError(f"start and end must be finite and >= 0, got start={start}, end={end}")
    progress = min(step, total_steps) / total_steps
    return end + (start - end) * 0.5 * (1.0 + math.cos(math.pi * progress))
