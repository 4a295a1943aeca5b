"""Diagonal Gaussian mixtures: the per-token densities of the AR prior (docs/method.md §4).

    p(z | h) = Σ_k π_k(h) N(z; μ_k(h), diag σ_k(h)²),    π = softmax(logits)

One joint mixture over the whole token vector (not channel by channel). All arithmetic is at least fp32 and
the log-density is a log-sum-exp over components, so it stays finite far from every component.
"""

from __future__ import annotations

import math
from contextlib import nullcontext
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

LOG_2PI = math.log(2 * math.pi)
# Largest (…, K, D) tensor of differences that log_prob forms directly when values broadcast over the mixtures.
# Measured on the CPU (a guidance pool of 10 candidates, K = 16, D = 8): the direct form 1.3× faster at batch 1 and
# 1.5× at batch 16; the fp64 expansion 1.2× faster from 164k elements (batch 100).
_DIRECT_ELEMENTS = 1 << 16


def _check_positive(name: str, value: float) -> None:
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"{name} must be a finite number > 0, got {value}")


def gumbel_noise(shape: tuple[int, ...], generator: torch.Generator | None = None,
                 device: torch.device | str | None = None) -> Tensor:
    """Standard Gumbel noise −log(−log U) (fp32): argmax(logits + G) over the last dim is a draw from
    softmax(logits) (the Gumbel-max trick). A draw is a few elementwise ops and an argmax, with none of
    ``torch.multinomial``'s per-call validation, which dominated the AR prior's per-token draw at batch 1.
    U = 0 is clamped to the smallest normal float so G stays finite."""
    uniform = torch.rand(shape, generator=generator, device=device)
    return uniform.clamp_min_(torch.finfo(torch.float32).tiny).log_().neg_().log_().neg_()


def log_sum_exp(x: Tensor) -> Tensor:
    """log Σ exp(x) over the last dim, as max(x) − max(log_softmax(x)): the log-softmax is largest at the same
    index as x and lies in [−log K, 0] there, so nothing cancels. Equal to ``torch.logsumexp`` for finite
    rows, at a fraction of its cost on the small (…, K) rows of sampling (measured on the CPU: a tenth at
    K = 16), where the AR prior evaluates mixtures once per token. A row of all −inf (a point too far from every
    component for fp32) gives −inf, as ``torch.logsumexp`` does: its log-softmax is NaN, read as 0; a NaN in x
    still gives NaN through the max."""
    return x.amax(dim=-1) - F.log_softmax(x, dim=-1).nan_to_num(nan=0.0).amax(dim=-1)


def _broadcast(a: torch.Size, b: torch.Size) -> torch.Size | None:
    """The NumPy broadcast of two shapes, or None where they do not broadcast (``torch.broadcast_shapes`` costs
    more than a sampler's whole mixture evaluation)."""
    if a == b:
        return a
    longer, shorter = (a, b) if len(a) >= len(b) else (b, a)
    shorter = (1,) * (len(longer) - len(shorter)) + tuple(shorter)
    out = []
    for x, y in zip(longer, shorter, strict=True):
        if x != y and 1 not in (x, y):
            return None
        out.append(y if x == 1 else x)
    return torch.Size(out)


def _squared_distances(z: Tensor, means: Tensor, scales: Tensor) -> Tensor:
    """Σ_d ((z_d − μ_kd) / σ_kd)² (…, K) of values z (…, D) from components (*batch, K, D), z's leading dims
    broadcast against *batch, without the (…, K, D) tensor of differences (docs/method.md §4).

    Expanded as Σ z²/σ² − 2 Σ z·μ/σ² + Σ μ²/σ²: the first two terms are einsums over d, in which z's extra
    dims (e.g. the N tokens that share one redundant mixture) are matmul rows, never copies of the parameters.
    The terms are each about Σ (|z|² + |μ|²)/σ², up to 1e6 · D at the scale floor 1e-3, while their sum is
    about D where z is near μ: fp32 would lose the whole result to rounding there, so they are formed in fp64
    (values and parameters of fp32 are exact in fp64) and only the sum is rounded to the parameters' dtype.
    """
    # Apple's MPS has no fp64: there the expansion runs in fp32, accurate only away from the scale floor.
    wide = torch.float32 if z.device.type == "mps" else torch.float64
    inverse_variances = scales.to(wide).pow(-2)
    means = means.to(wide)
    z = z.to(wide)
    weighted_means = means * inverse_variances
    squares = (torch.einsum("...d,...kd->...k", z.square(), inverse_variances)
               - 2 * torch.einsum("...d,...kd->...k", z, weighted_means)
               + (weighted_means * means).sum(dim=-1))
    return squares.to(scales.dtype)


def pick_components(logits: Tensor, gumbel: Tensor) -> Tensor:
    """Component indices argmax(logits + gumbel) over the last dim: distributed as softmax(logits)."""
    return (logits + gumbel).argmax(dim=-1)



def decoupled_knobs(variance_scale: float = 1.0, temperature: float = 1.0) -> tuple[float, float]:
    """Decoupled unguided sampling (supplementary §7; paper: s = 0.9, T = 1.3) as (divisor of the logits, factor
    on every std) of :meth:`DiagonalMixture.tempered`: T divides the weight logits (T > 1 diversifies) and s
    multiplies the Gaussian VARIANCE (s < 1 sharpens), so the std by √s. The one definition of the two knobs:
    the sampler applies them to its noise (``ARPrior.sampling_noise``), the tests to the mixtures."""
    _check_positive("variance_scale", variance_scale)
    _check_positive("temperature", temperature)
    return temperature, math.sqrt(variance_scale)

@dataclass(frozen=True, eq=False)
class DiagonalMixture:
    """A batch of K-component diagonal Gaussian mixtures over D dims.

    logits (*batch, K) are unnormalised log mixture weights; means and scales (standard deviations, > 0)
    are (*batch, K, D). Floating inputs are stored as fp32, or all as fp64 where one of them is fp64. Values
    are not checked (that would force a device sync per AR step); :class:`MixtureHead` guarantees scales >= its
    floor.
    """

    logits: Tensor
    means: Tensor
    scales: Tensor

    def __post_init__(self) -> None:
        names = ("logits", "means", "scales")
        for name in names:
            t = getattr(self, name)
            if not isinstance(t, Tensor):
                raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
            if not t.is_floating_point():
                raise ValueError(f"{name} must be a floating-point tensor, got {t.dtype}")
        dtype = torch.float64 if any(getattr(self, name).dtype == torch.float64 for name in names) else torch.float32
        for name in names:
            object.__setattr__(self, name, getattr(self, name).to(dtype))
        if self.logits.ndim < 1:
            raise ValueError("logits must have shape (*batch, K), got a scalar")
        if self.means.shape != self.scales.shape:
            raise ValueError(f"means {tuple(self.means.shape)} and scales {tuple(self.scales.shape)} differ")
        if self.means.ndim != self.logits.ndim + 1 or self.means.shape[:-1] != self.logits.shape:
            raise ValueError(
                f"means must be (*batch, K, D) for logits (*batch, K) = {tuple(self.logits.shape)}, "
                f"got {tuple(self.means.shape)}"
            )
        if self.num_components < 1 or self.dim < 1:
            raise ValueError(f"need K >= 1 and D >= 1, got K={self.num_components}, D={self.dim}")
        if not (self.logits.device == self.means.device == self.scales.device):
            raise ValueError("logits, means and scales must be on one device")

    @classmethod
    def _derived(cls, logits: Tensor, means: Tensor, scales: Tensor) -> DiagonalMixture:
        """A mixture whose parameters come from a checked one (or a :class:`MixtureHead`) by arithmetic,
        slicing or broadcasting, so they pass the checks by construction: skips ``__post_init__``, which costs
        more than the arithmetic when guidance builds several mixtures per token."""
        mix = object.__new__(cls)
        for name, value in (("logits", logits), ("means", means), ("scales", scales)):
            object.__setattr__(mix, name, value)
        return mix

    @property
    def num_components(self) -> int:
        return self.logits.shape[-1]

    @property
    def dim(self) -> int:
        return self.means.shape[-1]

    @property
    def batch_shape(self) -> torch.Size:
        return self.logits.shape[:-1]

    # Density -----------------------------------------------------------------------------------------
    def log_prob(self, z: Tensor) -> Tensor:
        """log p(z) in nats, in the parameters' dtype (fp32, or fp64). z (..., D) broadcasts against batch_shape
        (right-aligned, as in NumPy), so extra leading dims are sample dims: z (S, *batch, D) -> (S, *batch)."""
        if z.ndim < 1 or z.shape[-1] != self.dim:
            raise ValueError(f"z must end with D={self.dim} channels, got shape {tuple(z.shape)}")
        out_shape = _broadcast(z.shape[:-1], self.batch_shape)
        if out_shape is None:
            raise ValueError(f"z {tuple(z.shape)} does not broadcast against batch shape {tuple(self.batch_shape)}")
        z = z.to(self.means.dtype)
        # Per-component constant: log π_k − Σ_d log σ_kd − D/2 log 2π.
        offset = F.log_softmax(self.logits, dim=-1) - self.scales.log().sum(dim=-1) - 0.5 * self.dim * LOG_2PI
        if out_shape == self.batch_shape or math.prod(out_shape) * self.num_components * self.dim <= _DIRECT_ELEMENTS:
            # One value per mixture (the per-token mixtures), or a small pool: the differences are no larger than
            # the means themselves, or small, and exact in the parameters' dtype.
            squares = ((z.unsqueeze(-2) - self.means) / self.scales).square().sum(dim=-1)
        else:
            # Values broadcast over a mixture (the shared redundant one, a candidate pool): the differences
            # would be |values| / |mixtures| times larger than the parameters (docs/method.md §4).
            squares = _squared_distances(z, self.means, self.scales)
        return log_sum_exp(offset - 0.5 * squares)

    # Sampling ----------------------------------------------------------------------------------------
    def sample(self, sample_shape: tuple[int, ...] = (), generator: torch.Generator | None = None) -> Tensor:
        """Draw (*sample_shape, *batch, D): a component from softmax(logits), then mean + scale · ε
        (:meth:`sample_with` of fresh Gumbel and Gaussian noise, drawn in that order).

        Finite whenever the parameters are: no rejection or redraw step is involved.
        """
        sample_shape = tuple(sample_shape)
        if any(int(s) < 0 for s in sample_shape):
            raise ValueError(f"sample_shape must be non-negative, got {sample_shape}")
        shape = (*sample_shape, *self.batch_shape)
        device = self.logits.device
        gumbel = gumbel_noise((*shape, self.num_components), generator, device)
        eps = torch.randn((*shape, self.dim), generator=generator, device=device)
        return self.sample_with(gumbel, eps)

    def sample_with(self, gumbel: Tensor, eps: Tensor) -> Tensor:
        """The draw as a function of its noise: component k = argmax(logits + gumbel) (Gumbel-max, so k ~
        softmax(logits) for standard Gumbel noise), then means[k] + scales[k] · eps.

        gumbel (*S, *batch, K) and eps (*S, *batch, D), S any sample dims -> (*S, *batch, D).
        """
        k, d = self.num_components, self.dim
        shape = eps.shape[:-1]
        if gumbel.shape != (*shape, k) or eps.shape[-1] != d:
            raise ValueError(f"noise (..., K={k}) and (..., D={d}) with equal leading dims expected, got "
                             f"{tuple(gumbel.shape)} and {tuple(eps.shape)}")
        index = pick_components(self.logits, gumbel)[..., None, None].expand(*shape, 1, d)
        # gather from broadcast views: the parameters may themselves be views (expand_tokens), never copied.
        mean = self.means.expand(*shape, k, d).gather(-2, index).squeeze(-2)
        scale = self.scales.expand(*shape, k, d).gather(-2, index).squeeze(-2)
        return mean + scale * eps

    def tempered(self, weight_temperature: float = 1.0, std_scale: float = 1.0) -> DiagonalMixture:
        """logits / weight_temperature (T > 1 flattens the weights), every std times std_scale. A factor of 1
        leaves its tensor as it is (no copy), as a sampler in its inner loop wants."""
        _check_positive("weight_temperature", weight_temperature)
        _check_positive("std_scale", std_scale)
        logits = self.logits if weight_temperature == 1 else self.logits / weight_temperature
        scales = self.scales if std_scale == 1 else self.scales * std_scale
        return DiagonalMixture._derived(logits, self.means, scales)

    # Batch manipulation ------------------------------------------------------------------------------
    def __getitem__(self, idx: object) -> DiagonalMixture:
        """Index the batch dims only (ints, slices, None, index tensors); K and D are never indexed."""
        items = idx if isinstance(idx, tuple) else (idx,)
        consumed = 0
        for item in items:
            if item is Ellipsis:
                raise IndexError("Ellipsis is ambiguous for a mixture (it could reach K and D)")
            if item is None:
                continue
            consumed += item.ndim if isinstance(item, Tensor) and item.dtype == torch.bool else 1
        if consumed > len(self.batch_shape):
            raise IndexError(f"{consumed} indices for a mixture with batch shape {tuple(self.batch_shape)}")
        return DiagonalMixture._derived(self.logits[idx], self.means[idx], self.scales[idx])

    def chunk(self, chunks: int, dim: int = 0) -> tuple[DiagonalMixture, ...]:
        """Split batch dim ``dim`` like Tensor.chunk (e.g. the conditional and null halves of a 2B batch)."""
        nb = len(self.batch_shape)
        if not -nb <= dim < nb:
            raise ValueError(f"dim {dim} is not a batch dim of batch shape {tuple(self.batch_shape)}")
        dim %= nb
        parts = zip(
            self.logits.chunk(chunks, dim),
            self.means.chunk(chunks, dim),
            self.scales.chunk(chunks, dim),
            strict=True,
        )
        return tuple(DiagonalMixture._derived(*p) for p in parts)

    def expand_tokens(self, num_tokens: int) -> DiagonalMixture:
        """(*batch) -> (*batch, num_tokens): one mixture shared by num_tokens tokens (a view, no copy), e.g.
        the shared redundant mixture of docs/method.md §3 laid out like the per-token ones."""
        if num_tokens < 1:
            raise ValueError(f"num_tokens must be >= 1, got {num_tokens}")
        nb = len(self.batch_shape)
        k, d = self.num_components, self.dim
        return DiagonalMixture._derived(
            self.logits.unsqueeze(nb).expand(*self.batch_shape, num_tokens, k),
            self.means.unsqueeze(nb).expand(*self.batch_shape, num_tokens, k, d),
            self.scales.unsqueeze(nb).expand(*self.batch_shape, num_tokens, k, d),
        )


class MixtureHead(nn.Module):
    """Linear head from a hidden state to a K-component mixture over ``dim`` channels (docs/method.md §4).

    One Linear(width, K·(2·dim + 1)) whose output is laid out [K logits | K·dim means | K·dim raw scales];
    scale = min_scale + softplus(raw).
    """

    def __init__(self, width: int, dim: int, components: int, min_scale: float = 1e-3) -> None:
        super().__init__()
        for name, value in (("width", width), ("dim", dim), ("components", components)):
            if value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        if not 0 < min_scale < 1:
            raise ValueError(f"min_scale must be in (0, 1) so the initial std can be 1, got {min_scale}")
        self.width, self.dim, self.components, self.min_scale = width, dim, components, min_scale
        self.proj = nn.Linear(width, components * (2 * dim + 1))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Zero weight, so the initial mixture is the same for every input (docs/method.md §4: zero-initialised head).

        Bias: logits 0 (equal weights); raw scales at softplus⁻¹(1 − min_scale) so every initial std is
        exactly 1; means drawn N(0, 1). The means must differ: with a zero weight, components with identical
        parameters receive identical gradients forever and the mixture could never separate them.
        """
        k, d = self.components, self.dim
        nn.init.zeros_(self.proj.weight)
        with torch.no_grad():
            bias = self.proj.bias
            bias[:k].zero_()
            bias[k : k + k * d].normal_()
            bias[k + k * d :].fill_(math.log(math.expm1(1.0 - self.min_scale)))  # softplus⁻¹(1 − min_scale)

    def forward(self, h: Tensor) -> DiagonalMixture:
        """h (*batch, width) -> mixture with batch shape *batch."""
        out = self._project(h)
        k, d = self.components, self.dim
        logits = out[..., :k]
        means = out[..., k : k + k * d].unflatten(-1, (k, d))
        scales = self.min_scale + F.softplus(out[..., k + k * d :].unflatten(-1, (k, d)))
        return DiagonalMixture._derived(logits, means, scales)

    def sample_with(self, h: Tensor, gumbel: Tensor, eps: Tensor) -> Tensor:
        """``self(h).sample_with(gumbel, eps)`` (batch dims only, no sample dims) without building the mixture:
        the component is picked from the logits, then only its mean and raw scale are read off the output."""
        out = self._project(h)
        k, d = self.components, self.dim
        index = pick_components(out[..., :k], gumbel)[..., None, None, None].expand(*h.shape[:-1], 2, 1, d)
        mean, raw_scale = out[..., k:].unflatten(-1, (2, k, d)).gather(-2, index).squeeze(-2).unbind(-2)
        return mean + (self.min_scale + F.softplus(raw_scale)) * eps

    def _project(self, h: Tensor) -> Tensor:
        """The output row [K logits | K·dim means | K·dim raw scales] of h (*batch, width), at least fp32."""
        if h.ndim < 1 or h.shape[-1] != self.width:
            raise ValueError(f"h must be (*batch, {self.width}), got shape {tuple(h.shape)}")
        # At least fp32 even under autocast (the model's dtype where wider: fp64 checks stay exact): bf16 would
        # quantise the means to ~3 significant digits, coarser than the small scales the mixtures learn; the head
        # is one small matmul (docs/method.md §4). Entering the autocast context costs as much as that matmul, so
        # it is entered only where autocast is on.
        device, dtype = h.device.type, torch.promote_types(self.proj.weight.dtype, torch.float32)
        with torch.autocast(device, enabled=False) if torch.is_autocast_enabled(device) else nullcontext():
            return F.linear(h.to(dtype), self.proj.weight.to(dtype), self.proj.bias.to(dtype))
