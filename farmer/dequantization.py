"""Learned (variational) dequantisation (docs/method.md §14; Ho et al. 2019, Flow++): a conditional density
q(u | x) over the offsets u ∈ (0, 1)^D of each pixel inside its bin, trained jointly with the model.

For 8-bit pixels k with bin lower edges x₀ = k/128 − 1 in [-1, 1], Jensen's inequality gives for any q

    log P(k) ≥ E_{u ~ q(·|k)} [ log p(x₀ + u/128) − log q(u | k) ] − D log 128,

a lower bound on the discrete log-likelihood that is tight when q(u | k) ∝ p(x₀ + u/128). Uniform
dequantisation is the special case q = 1. Bits/dim of this bound use the same arithmetic as the uniform one
(farmer.metrics.bits_per_dim of −(log p − log q)); both bounds are reported, never one in place of the other.

q here is a one-layer conditional flow with a logistic base: v ~ Logistic(0, 1), a = μ(k) + σ(k)·v, u = sigmoid(a),
with (μ, log σ) per pixel from a small convolutional net of the bin centres. Its zero-initialised output starts q
exactly at the uniform distribution (sigmoid of a standard logistic is uniform), so training can only move the
bound from the uniform one.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from farmer.config import FarmerConfig
from farmer.precision import full_precision

BINS_PER_UNIT = 128.0  # 256 bins over [-1, 1]


def logistic_log_density(v: Tensor) -> Tensor:
    """log of the standard logistic density at v: log sigmoid(v) + log sigmoid(−v)."""
    return F.logsigmoid(v) + F.logsigmoid(-v)


class VariationalDequantizer(nn.Module):
    def __init__(self, config: FarmerConfig, width: int = 32) -> None:
        super().__init__()
        channels = config.channels
        self.net = nn.Sequential(nn.Conv2d(channels, width, 3, padding=1), nn.GELU(),
                                 nn.Conv2d(width, width, 3, padding=1), nn.GELU(),
                                 nn.Conv2d(width, 2 * channels, 3, padding=1))
        nn.init.zeros_(self.net[-1].weight)
        nn.init.zeros_(self.net[-1].bias)

    def offset_params(self, centres: Tensor) -> tuple[Tensor, Tensor]:
        """(μ, log σ), each shaped like the bin centres (B, C, H, W); fp32 under any autocast, since log q is a term
        of the bound (docs/method.md §12)."""
        with full_precision(centres.device.type):
            mu, log_scale = self.net(centres).chunk(2, dim=1)
        return mu, log_scale

    def forward(self, centres: Tensor, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        """Bin centres (k + 0.5)/128 − 1 -> (dequantised images x₀ + u/128 with u ~ q(·|k), log q(u | k) (B,))."""
        mu, log_scale = self.offset_params(centres)
        # Drawn where the generator lives (evaluation seeds a CPU one), then moved.
        device = centres.device if generator is None else generator.device
        uniform = torch.rand(centres.shape, generator=generator, device=device, dtype=centres.dtype)
        uniform = uniform.to(centres.device).clamp(1e-6, 1 - 1e-6)  # a finite logistic draw
        v = torch.log(uniform) - torch.log1p(-uniform)
        a = mu + torch.exp(log_scale) * v
        u = torch.sigmoid(a)
        # log q(u) = log p(v) − log|du/dv|, du/dv = σ · sigmoid'(a) and log sigmoid'(a) = its logistic log-density.
        log_q = logistic_log_density(v) - log_scale - logistic_log_density(a)
        lower_edges = centres - 0.5 / BINS_PER_UNIT
        return lower_edges + u / BINS_PER_UNIT, log_q.flatten(1).sum(dim=1)

    def log_density(self, centres: Tensor, u: Tensor) -> Tensor:
        """log q(u | k) per image (B,) of offsets u ∈ (0, 1) shaped like the centres (for tests and analysis)."""
        mu, log_scale = self.offset_params(centres)
        a = torch.log(u) - torch.log1p(-u)
        v = (a - mu) * torch.exp(-log_scale)
        return (logistic_log_density(v) - log_scale - logistic_log_density(a)).flatten(1).sum(dim=1)
