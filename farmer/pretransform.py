"""The logit pre-transform (docs/method.md §13): an elementwise bijection of the pixels before patchify.

With α ∈ (0, 1/2), a value x ∈ [-1, 1] maps to

    s = α + (1 − 2α)(1 + x)/2,   t = 1 − s = α + (1 − 2α)(1 − x)/2,   y = log s − log t,
    log|dy/dx| = log((1 − 2α)/2) − log s − log t,

and back by x = tanh(y/2)/(1 − 2α). The box [-1, 1] of the data becomes the whole real line, so the flow and its
Gaussian-mixture prior no longer have to fit the hard edges of the many pixels at exactly 0 or 255 (RealNVP's
preprocessing, Dinh et al. 2017, with α = 0.05; Glow and FFJORD use α = 1e-6). s and t are each computed from x,
never one as 1 minus the other, so neither loses precision near the edges.

Values outside [-1, 1] — only the Gaussian dequantisation noise of sample models puts any there — are reflected
back inside first: folded noise is still a density on [-1, 1], and data inside is untouched, so every likelihood
of data in [-1, 1] is exact.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def check_alpha(alpha: float) -> None:
    if not 0 < alpha < 0.5:
        raise ValueError(f"the logit pre-transform needs 0 < alpha < 0.5, got {alpha!r}")


def reflect_into_range(x: Tensor) -> Tensor:
    """x folded into [-1, 1] by reflection at ±1 (identity inside; one fold suffices for |x| ≤ 3)."""
    return torch.where(x < -1, -2 - x, torch.where(x > 1, 2 - x, x))


def logit_forward(x: Tensor, alpha: float) -> tuple[Tensor, Tensor]:
    """Images in [-1, 1] -> (logit values, elementwise log|dy/dx|), both shaped like x (module docstring)."""
    check_alpha(alpha)
    x = reflect_into_range(x)
    half_width = (1 - 2 * alpha) / 2
    s = alpha + half_width * (1 + x)
    t = alpha + half_width * (1 - x)
    log_s, log_t = torch.log(s), torch.log(t)
    return log_s - log_t, math.log(half_width) - log_s - log_t


def logit_inverse(y: Tensor, alpha: float) -> Tensor:
    """The inverse of :func:`logit_forward` on [-1, 1]: tanh(y/2)/(1 − 2α), finite for every finite or infinite y."""
    check_alpha(alpha)
    return torch.tanh(y / 2) / (1 - 2 * alpha)
