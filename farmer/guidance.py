"""Classifier-free guidance for mixture priors, as pure functions of two mixtures (docs/guidance.md).

Target per token, with p_c = p(·|c), p_u = p(·|∅) and scale w:

    log p'(z) = log p_c(z) + w (log p_c(z) − log p_u(z)),   i.e.  p' ∝ p_c^(1+w) p_u^(−w)

p' is no mixture and has no direct sampler. Resampling CFG (supplementary §8, Algorithm 1) draws it by
importance resampling; naive CFG (JetFormer's) draws a per-component Gaussian version of it in closed form.
Both implement :class:`Guidance`, the one interface the AR prior samples through.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol, get_args, runtime_checkable

import torch
import torch.nn.functional as F
from torch import Tensor

from farmer.mixture import DiagonalMixture, gumbel_noise, pick_components

# Stand-in for ±inf log-weights: finite, so the softmax over a pool never sees inf − inf.
_LOG_WEIGHT_BOUND = 1e30

# How the weight temperatures T_π, T_π,v act on the logits, and how T_σ, T_σ,v act on a Gaussian
# (docs/guidance.md, "Conventions").
TemperatureConvention = Literal["divide", "multiply"]
StdConvention = Literal["std", "variance"]
RedundantDraw = Literal["with_replacement", "without_replacement"]


def _check_count(name: str, value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{name} must be an int >= 0, got {value!r}")


def _check_scale(scale: float) -> None:
    if not (math.isfinite(scale) and scale >= 0):
        raise ValueError(f"guidance scale must be a finite number >= 0, got {scale}")


def _check_positive(name: str, value: float) -> None:
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"{name} must be a finite number > 0, got {value}")


def _check_choice(name: str, value: str, kind: Any) -> None:
    if value not in get_args(kind):
        raise ValueError(f"{name} must be one of {', '.join(get_args(kind))}, got {value!r}")


def effective_sample_size(probs: Tensor) -> Tensor:
    """ESS = 1 / Σ p² of resampling probabilities (..., P) -> (...): P for uniform weights, 1 when one
    candidate holds all the mass. Resampling N tokens from a pool of ESS n yields at most about n distinct
    candidates that matter."""
    return probs.square().sum(dim=-1).reciprocal()


@runtime_checkable
class Guidance(Protocol):
    """A CFG method as ``ARPrior.sample`` uses it: draws of p' from a conditional mixture p_c and the null-class
    mixture p_u of the same batch shape (docs/method.md §6). The prior knows these two draws, not the method."""

    def draw_token(self, cond: DiagonalMixture, uncond: DiagonalMixture, generator: torch.Generator | None) -> Tensor:
        """One draw per batch element, (*batch, D): an informative token, or a redundant vector of a per-token
        redundant mixture, which is guided like the informative ones (docs/method.md §11)."""
        ...

    def draw_redundant(self, cond: DiagonalMixture, uncond: DiagonalMixture,
                       generator: torch.Generator | None) -> Tensor:
        """One redundant vector per batch element from a per-token redundant mixture, (*batch, D): guided like
        an informative token (docs/method.md §11), kept apart so that a method can watch its redundant pools."""
        ...

    def draw_shared(self, cond: DiagonalMixture, uncond: DiagonalMixture, num_tokens: int,
                    generator: torch.Generator | None) -> Tensor:
        """The num_tokens redundant vectors of each image from its one shared mixture (batch (B,)):
        (B, num_tokens, D) (docs/method.md §6, "shared redundant mixture")."""
        ...


@dataclass
class RedundantPoolStats:
    """Diversity of the redundant candidate pools, appended as they are drawn when a caller asks for it by
    sampling with a :class:`RecordingGuidance` that holds one. Each entry is (B,): per image for the shared
    mixture's one pool (N draws), per image and token for per-token mixtures (one draw from s_c + s_u
    candidates)."""

    ess: list[Tensor] = field(default_factory=list)  # effective sample size of each pool
    distinct: list[Tensor] = field(default_factory=list)  # distinct candidates among a shared pool's N draws
    pool_size: int | None = None  # candidates in each recorded pool (s_c + s_u per token, or the shared pool's)


@dataclass(frozen=True)
class ResamplingGuidance:
    """Knobs of resampling CFG (supplementary §8, Algorithm 1); the numbers are the paper's FARMER-1.1B/p16
    settings. How T_π, T_π,v and T_σ, T_σ,v act is set by the two conventions (see :meth:`temper`);
    the defaults are the readings that sampled better on the shipped model (docs/guidance.md).
    """

    scale: float = 2.5  # w
    proposal_weight_temperature: float = 1.0  # T_π, on the proposal mixtures' logits
    proposal_std_scale: float = 0.9  # T_σ, on the proposal mixtures' Gaussians
    cond_candidates: int = 5  # s_c
    uncond_candidates: int = 5  # s_u
    eval_weight_temperature: float = 0.2  # T_π,v, on the logits of the mixtures that evaluate Δ
    eval_std_scale: float = 0.9  # T_σ,v, on their Gaussians
    resample_temperature: float = 1.1  # T_s: multiplies the log-weights ("higher T_s emphasises high-weight")
    # "divide": logits / T (T > 1 flattens, as the unguided T); "multiply": logits × T, the appendix's
    # literal "applied multiplicatively to the mixture weights before normalization".
    temperature_convention: TemperatureConvention = "divide"
    # "std": every std × T_σ; "variance": every variance × T_σ (the appendix's "applied to the variance",
    # and how the unguided s acts).
    std_convention: StdConvention = "std"
    # Candidates per branch in the one pool of the shared redundant mixture; None -> s_c·N and s_u·N.
    redundant_pool: int | None = None
    # How the N redundant vectors of an image are drawn from its one pool: i.i.d. by the resampling
    # probabilities (Algorithm 1), or N distinct candidates (Gumbel-top-k on the same log-weights).
    redundant_draw: RedundantDraw = "with_replacement"

    def __post_init__(self) -> None:
        _check_scale(self.scale)
        _check_count("cond_candidates", self.cond_candidates)
        _check_count("uncond_candidates", self.uncond_candidates)
        if self.cond_candidates + self.uncond_candidates < 1:
            raise ValueError("resampling guidance needs at least one candidate (s_c + s_u >= 1)")
        if self.redundant_pool is not None:
            _check_count("redundant_pool", self.redundant_pool)
            if self.redundant_pool < 1:
                raise ValueError("redundant_pool must be >= 1 (or None)")
        for name in (
            "proposal_weight_temperature",
            "proposal_std_scale",
            "eval_weight_temperature",
            "eval_std_scale",
            "resample_temperature",
        ):
            _check_positive(name, getattr(self, name))
        _check_choice("temperature_convention", self.temperature_convention, TemperatureConvention)
        _check_choice("std_convention", self.std_convention, StdConvention)
        _check_choice("redundant_draw", self.redundant_draw, RedundantDraw)

    def temper(self, mix: DiagonalMixture, weight_temperature: float, std_temperature: float) -> DiagonalMixture:
        """``mix`` under one (T_π, T_σ) pair of Algorithm 1, read by this guidance's two conventions."""
        return mix.tempered(*self.temperings(weight_temperature, std_temperature))

    def temperings(self, weight_temperature: float, std_temperature: float) -> tuple[float, float]:
        """One (T_π, T_σ) pair as ``DiagonalMixture.tempered``'s (divisor of the logits, factor on every std)."""
        divisor = weight_temperature if self.temperature_convention == "divide" else 1 / weight_temperature
        std_scale = std_temperature if self.std_convention == "std" else math.sqrt(std_temperature)
        return divisor, std_scale

    def draw_token(self, cond: DiagonalMixture, uncond: DiagonalMixture, generator: torch.Generator | None) -> Tensor:
        return resampling_cfg_sample(cond, uncond, self, generator)

    draw_redundant = draw_token  # a RecordingGuidance watches the redundant pools

    def draw_shared(self, cond: DiagonalMixture, uncond: DiagonalMixture, num_tokens: int,
                    generator: torch.Generator | None) -> Tensor:
        # One larger pool per image, an index resampled per token (docs/guidance.md, "Diversity of the shared
        # redundant pool").
        return resampling_cfg_sample_shared(cond, uncond, num_tokens, self, generator)


@dataclass(frozen=True)
class RecordingGuidance:
    """Resampling CFG by ``method`` that records the diversity of its redundant pools in ``stats`` (docs/guidance.md):
    a Guidance, passed wherever one goes, e.g. ``SamplingOptions(guidance=RecordingGuidance(method, stats))``. The
    knobs stay a plain value (``method``); the recorder is this separate object. Recording changes no draw."""

    method: ResamplingGuidance
    stats: RedundantPoolStats = field(default_factory=RedundantPoolStats)

    def draw_token(self, cond: DiagonalMixture, uncond: DiagonalMixture, generator: torch.Generator | None) -> Tensor:
        return resampling_cfg_sample(cond, uncond, self.method, generator)

    def draw_redundant(self, cond: DiagonalMixture, uncond: DiagonalMixture,
                       generator: torch.Generator | None) -> Tensor:
        return resampling_cfg_sample(cond, uncond, self.method, generator, self.stats)

    def draw_shared(self, cond: DiagonalMixture, uncond: DiagonalMixture, num_tokens: int,
                    generator: torch.Generator | None) -> Tensor:
        return resampling_cfg_sample_shared(cond, uncond, num_tokens, self.method, generator, self.stats)


@dataclass(frozen=True)
class NaiveGuidance:
    """JetFormer's "naive" CFG (the paper's ablation baseline, FID 8.66 vs 5.67 for resampling CFG).

    Source: big_vision, ``models/proj/givt/parallel_decode.py::CFGDensity`` as called by
    ``trainers/proj/jetformer/predict_fns.py``. It draws one component index k from the CONDITIONAL weights,
    pairs the conditional and unconditional components with that same index, and samples each channel
    from p_c,k^(1+w) p_u,k^(−w). big_vision approximates that 1-D density by rejection sampling with
    proposals around μ_c, so its draws stay where p_c,k has mass. For two Gaussians the density is the
    Gaussian of precision λ = (1+w)/σ_c² − w/σ_u² and mean μ_c + w (μ_c − μ_u)/(σ_u² λ), drawn here exactly
    except that both are bounded, which keeps the draw near μ_c in the same way:

    - λ is floored at ``min_precision_ratio``/σ_c², so the std is at most σ_c/√min_precision_ratio;
    - the mean's shift from μ_c is clamped to ±``max_mean_shift``·σ_c.

    Without the bounds the product diverges as λ → 0 (an unconditional std just below √(w/(1+w)) σ_c: at
    σ_c = 1, σ_u = 0.846, μ_u − μ_c = 0.5, w = 2.5 the exact draw has mean −250 and std 12) and is improper
    beyond. Both bounds are continuous in the parameters, so the draw moves smoothly across that boundary;
    they leave ordinary products (λ ≥ prec_c/4 and shifts under 3σ_c at the defaults) untouched.
    Temperatures are the caller's: pass tempered mixtures (``DiagonalMixture.tempered``).
    """

    scale: float
    min_precision_ratio: float = 0.25
    max_mean_shift: float = 3.0

    def __post_init__(self) -> None:
        _check_scale(self.scale)
        _check_positive("min_precision_ratio", self.min_precision_ratio)
        _check_positive("max_mean_shift", self.max_mean_shift)

    def draw_token(self, cond: DiagonalMixture, uncond: DiagonalMixture, generator: torch.Generator | None) -> Tensor:
        return naive_cfg_sample(cond, uncond, self, generator)

    draw_redundant = draw_token  # no pool to watch

    def draw_shared(self, cond: DiagonalMixture, uncond: DiagonalMixture, num_tokens: int,
                    generator: torch.Generator | None) -> Tensor:
        # No pool to share: each token's vector is its own guided draw of the shared mixture (docs/method.md §6).
        return naive_cfg_sample(cond.expand_tokens(num_tokens), uncond.expand_tokens(num_tokens), self, generator)


def _check_pair(cond: DiagonalMixture, uncond: DiagonalMixture) -> None:
    if cond.batch_shape != uncond.batch_shape or cond.dim != uncond.dim:
        raise ValueError(
            f"cond (batch {tuple(cond.batch_shape)}, D={cond.dim}) and uncond "
            f"(batch {tuple(uncond.batch_shape)}, D={uncond.dim}) must have the same batch shape and D"
        )


def _joint(cond: DiagonalMixture, uncond: DiagonalMixture) -> tuple[Tensor, Tensor]:
    """p_c and p_u as one mixture of batch (2, *batch), so that each step of Algorithm 1 runs once for both
    branches: logits (2, *batch, K) and [means, scales] (2, 2, *batch, K, D), branch first, stacked by one kernel
    each. A branch with fewer components is padded with components of weight zero (logit −inf), which are
    never drawn and add nothing to its density."""
    k = max(cond.num_components, uncond.num_components)
    (c_logits, c_means, c_scales), (u_logits, u_means, u_scales) = (_padded(mix, k) for mix in (cond, uncond))
    params = torch.stack([c_means, c_scales, u_means, u_scales]).unflatten(0, (2, 2))
    return torch.stack([c_logits, u_logits]), params


def _padded(mix: DiagonalMixture, k: int) -> tuple[Tensor, Tensor, Tensor]:
    pad = k - mix.num_components
    if pad == 0:
        return mix.logits, mix.means, mix.scales
    return (F.pad(mix.logits, (0, pad), value=-math.inf), F.pad(mix.means, (0, 0, 0, pad)),
            F.pad(mix.scales, (0, 0, 0, pad), value=1.0))


def _propose(logits: Tensor, params: Tensor, num_cond: int, num_uncond: int, g: ResamplingGuidance,
             generator: torch.Generator | None) -> Tensor:
    """Step 1 of Algorithm 1: ``DiagonalMixture.sample`` of the proposal-tempered joint mixture, max(s_c, s_u)
    draws per branch (the same noise, drawn in the same order), the first s_c conditional and s_u unconditional
    ones kept -> pool (P, *batch, D). Fused: one gather reads a component's mean and scale together, and only
    the drawn scales are tempered."""
    divisor, std_scale = g.temperings(g.proposal_weight_temperature, g.proposal_std_scale)
    n, batch, (k, d) = max(num_cond, num_uncond), logits.shape[1:-1], params.shape[-2:]
    gumbel = gumbel_noise((n, 2, *batch, k), generator, logits.device)
    eps = torch.randn((n, 2, *batch, d), generator=generator, device=logits.device)
    pick = pick_components(logits if divisor == 1 else logits / divisor, gumbel)  # (n, 2, *batch)
    index = pick[:, :, None, ..., None, None].expand(n, 2, 2, *batch, 1, d)
    mean, scale = params.expand(n, *params.shape).gather(-2, index).squeeze(-2).unbind(2)
    drawn = mean + (scale if std_scale == 1 else scale * std_scale) * eps  # (n, 2, *batch, D)
    return torch.cat([drawn[:num_cond, 0], drawn[:num_uncond, 1]])


def _pool_log_probs(logits: Tensor, params: Tensor, pool: Tensor, g: ResamplingGuidance) -> Tensor:
    """log p_c and log p_u of the eval-tempered mixtures (T_π,v, T_σ,v) at every candidate: pool (P, *batch, D)
    -> (P, 2, *batch). ``DiagonalMixture.log_prob`` picks its form by size: direct for the small per-token pools,
    the fp64 expansion for the shared redundant pool (docs/method.md §4)."""
    divisor, std_scale = g.temperings(g.eval_weight_temperature, g.eval_std_scale)
    mix = DiagonalMixture._derived(logits, params[:, 0], params[:, 1]).tempered(divisor, std_scale)
    return mix.log_prob(pool.unsqueeze(1))  # (P, 1, *batch, D)


def _resample(
    cond: DiagonalMixture,
    uncond: DiagonalMixture,
    num_cond: int,
    num_uncond: int,
    num_draws: int,
    g: ResamplingGuidance,
    generator: torch.Generator | None,
    distinct: bool = False,
    stats: RedundantPoolStats | None = None,
) -> Tensor:
    """Algorithm 1 on one pool per batch element: (*batch, num_draws, D), drawn with replacement, or as
    num_draws distinct candidates when ``distinct``. ``stats``, when given, records the pool's diversity
    (a redundant pool's, :class:`RecordingGuidance`)."""
    _check_pair(cond, uncond)
    logits, params = _joint(cond, uncond)
    # 1. Propose from the proposal-tempered mixtures.
    pool = _propose(logits, params, num_cond, num_uncond, g, generator)  # (P, *batch, D)
    # 2. Weigh. Δ uses the eval-tempered mixtures. A candidate from p_c has importance weight
    # p'/p_c = e^{wΔ}, one from p_u has p'/p_u = e^{(w+1)Δ}; under its own proposal each has mean
    # Z' = ∫ p_c^(1+w) p_u^(−w), so the weights of both branches are on one scale and are normalised by ONE
    # softmax over the joint pool: self-normalised importance resampling, exact as the pool grows when every
    # temperature is 1, and the better-matched branch wins more draws (normalising per branch would fix the
    # split at s_c : s_u). T_s multiplies the log-weights before that softmax.
    log_p = _pool_log_probs(logits, params, pool, g)  # (P, 2, *batch)
    delta = log_p[:, 0] - log_p[:, 1]  # (P, *batch)
    # w = 0 leaves conditional candidates unweighted: exactly 0, even where Δ = ±inf.
    log_w = delta * g.scale if g.scale else torch.zeros_like(delta)
    log_w[num_cond:] += delta[num_cond:]
    if g.resample_temperature != 1:
        log_w *= g.resample_temperature
    # Δ = +inf (p_u underflows) -> bound, always preferred; NaN (both underflow, inf − inf) and −inf ->
    # −bound, never preferred unless the whole pool is so, then uniform. The pool stays finite either way.
    log_w = torch.nan_to_num(log_w, nan=-_LOG_WEIGHT_BOUND).clamp_(-_LOG_WEIGHT_BOUND, _LOG_WEIGHT_BOUND)
    # 3. Resample, per batch element. Shifted so that every row's largest log-weight is 0: the Gumbel noise
    # then also breaks ties between candidates at the bound.
    rows, pool_size, d = math.prod(cond.batch_shape), pool.shape[0], cond.dim
    log_w = log_w.reshape(pool_size, rows).T  # (rows, P)
    log_w = log_w - log_w.amax(dim=-1, keepdim=True)
    if distinct:
        pick = _distinct_picks(log_w, num_draws, generator)  # (rows, num_draws)
    else:  # Gumbel-max: num_draws i.i.d. indices from softmax(log_w), without multinomial's per-call checks
        pick = pick_components(log_w[:, None, :], gumbel_noise((rows, num_draws, pool_size), generator, log_w.device))
    if stats is not None:
        stats.pool_size = pool_size
        stats.ess.append(effective_sample_size(torch.softmax(log_w, dim=-1)).reshape(cond.batch_shape))
        if num_draws > 1:
            distinct_picks = (pick.sort(dim=-1).values.diff(dim=-1) != 0).sum(dim=-1) + 1
            stats.distinct.append(distinct_picks.reshape(cond.batch_shape))
    candidates = pool.reshape(pool_size, rows, d).transpose(0, 1)  # (rows, P, D)
    drawn = candidates.gather(1, pick.unsqueeze(-1).expand(rows, num_draws, d))
    return drawn.reshape(*cond.batch_shape, num_draws, d)


def _distinct_picks(log_w: Tensor, num_draws: int, generator: torch.Generator | None) -> Tensor:
    """num_draws distinct indices per row of log_w (rows, P), drawn sequentially without replacement with
    probabilities ∝ e^{log_w} among those left (Gumbel-top-k), in random order: top-k returns them by
    decreasing key, and the key order must not become a token order."""
    keys = log_w + gumbel_noise(log_w.shape, generator, log_w.device)
    top = keys.topk(num_draws, dim=-1).indices
    order = torch.rand(top.shape, generator=generator, device=top.device).argsort(dim=-1)
    return top.gather(-1, order)


def resampling_cfg_sample(
    cond: DiagonalMixture,
    uncond: DiagonalMixture,
    g: ResamplingGuidance,
    generator: torch.Generator | None = None,
    stats: RedundantPoolStats | None = None,
) -> Tensor:
    """Resampling CFG (supplementary §8, Algorithm 1): one draw per batch element, (*batch, D).

    A pool of s_c candidates from p_c and s_u from p_u per element, weighted towards p' and resampled once.
    ``stats``, when given, records the pools' diversity.
    """
    return _resample(cond, uncond, g.cond_candidates, g.uncond_candidates, 1, g, generator,
                     stats=stats).squeeze(-2)


def resampling_cfg_sample_shared(
    cond: DiagonalMixture,
    uncond: DiagonalMixture,
    num_tokens: int,
    g: ResamplingGuidance,
    generator: torch.Generator | None = None,
    stats: RedundantPoolStats | None = None,
) -> Tensor:
    """Resampling CFG for the shared redundant mixture (Algorithm 1, step 3): one pool per image (batch
    (B,)), then an index resampled for each of the num_tokens tokens -> (B, num_tokens, D).

    Pool per branch: g.redundant_pool candidates, or s_c·num_tokens and s_u·num_tokens when it is None.
    ``g.redundant_draw`` says whether tokens may share a candidate; ``stats``, when given, records the pool's
    effective sample size and the number of distinct candidates drawn.
    """
    if num_tokens < 1:
        raise ValueError(f"num_tokens must be >= 1, got {num_tokens}")
    if g.redundant_pool is None:
        num_cond, num_uncond = g.cond_candidates * num_tokens, g.uncond_candidates * num_tokens
    else:
        num_cond = g.redundant_pool if g.cond_candidates > 0 else 0
        num_uncond = g.redundant_pool if g.uncond_candidates > 0 else 0
    distinct = g.redundant_draw == "without_replacement"
    if distinct and num_cond + num_uncond < num_tokens:
        raise ValueError(
            f"drawing {num_tokens} distinct redundant vectors needs a pool of at least as many "
            f"candidates, got {num_cond + num_uncond}"
        )
    return _resample(cond, uncond, num_cond, num_uncond, num_tokens, g, generator, distinct, stats)


def naive_cfg_sample(
    cond: DiagonalMixture,
    uncond: DiagonalMixture,
    g: NaiveGuidance,
    generator: torch.Generator | None = None,
) -> Tensor:
    """JetFormer's naive CFG (see :class:`NaiveGuidance`): one draw per batch element, (*batch, D)."""
    _check_pair(cond, uncond)
    if cond.num_components != uncond.num_components:
        raise ValueError(
            f"naive CFG pairs components by index: cond has K={cond.num_components}, uncond K={uncond.num_components}"
        )
    batch, rows, d = cond.batch_shape, math.prod(cond.batch_shape), cond.dim
    if rows == 0:
        return cond.means.new_zeros(*batch, d)
    # The component draw of DiagonalMixture.sample (Gumbel-max), so w = 0 is exactly cond.sample().
    pick = pick_components(cond.logits, gumbel_noise(cond.logits.shape, generator, cond.logits.device))
    index = pick.view(*batch, 1, 1).expand(*batch, 1, d)

    def component(t: Tensor) -> Tensor:
        # gather, not reshape: a mixture from expand_tokens is a broadcast view and must not be copied.
        return t.gather(-2, index).squeeze(-2)  # (*batch, D)

    mu_c, mu_u = component(cond.means), component(uncond.means)
    sd_c, prec_u = component(cond.scales), component(uncond.scales).pow(-2)
    prec_c, w = sd_c.pow(-2), g.scale
    precision = torch.maximum((1 + w) * prec_c - w * prec_u, g.min_precision_ratio * prec_c)
    limit = g.max_mean_shift * sd_c
    mean = mu_c + (w * prec_u * (mu_c - mu_u) / precision).clamp(-limit, limit)
    eps = torch.randn(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)
    return mean + precision.rsqrt() * eps
