"""Classifier-free guidance for mixture priors, as pure functions of two mixtures (spec §6).

Target per token, with p_c = p(·|c), p_u = p(·|∅) and scale w:

    log p'(z) = log p_c(z) + w (log p_c(z) − log p_u(z)),   i.e.  p' ∝ p_c^(1+w) p_u^(−w)

p' is no mixture and has no direct sampler. Resampling CFG (supplementary §8, Algorithm 1) draws it by
importance resampling; naive CFG (JetFormer's) draws a per-component Gaussian version of it in closed form.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from farmer.mixture import DiagonalMixture

# Stand-in for ±inf log-weights: finite, so the softmax over a pool never sees inf − inf.
_LOG_WEIGHT_BOUND = 1e30


def _check_count(name: str, value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{name} must be an int >= 0, got {value!r}")


def _check_scale(scale: float) -> None:
    if not (math.isfinite(scale) and scale >= 0):
        raise ValueError(f"guidance scale must be a finite number >= 0, got {scale}")


@dataclass(frozen=True)
class ResamplingGuidance:
    """Knobs of resampling CFG; defaults are the paper's FARMER-1.1B/p16 settings (spec §6)."""

    scale: float = 2.5  # w
    proposal_weight_temperature: float = 1.0  # T_π: proposal logits / T_π
    proposal_std_scale: float = 0.9  # T_σ: multiplies the proposals' stds
    cond_candidates: int = 5  # s_c
    uncond_candidates: int = 5  # s_u
    eval_weight_temperature: float = 0.2  # T_π,v: logits / T_π,v of the mixtures that evaluate Δ
    eval_std_scale: float = 0.9  # T_σ,v
    resample_temperature: float = 1.1  # T_s: multiplies the log-weights
    # Candidates per branch in the one pool of the shared redundant mixture; None -> s_c·N and s_u·N.
    redundant_pool: int | None = None

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
            value = getattr(self, name)
            if not (math.isfinite(value) and value > 0):
                raise ValueError(f"{name} must be a finite number > 0, got {value}")


@dataclass(frozen=True)
class NaiveGuidance:
    """JetFormer's "naive" CFG (the paper's ablation baseline, FID 8.66 vs 5.67 for resampling CFG).

    Source: big_vision, ``models/proj/givt/parallel_decode.py::CFGDensity`` as called by
    ``trainers/proj/jetformer/predict_fns.py``. It draws one component index k from the CONDITIONAL weights,
    pairs the conditional and unconditional components with that same index, and samples each channel
    from p_c,k^(1+w) p_u,k^(−w). big_vision approximates that 1-D density by rejection sampling on a grid;
    for two Gaussians it is the Gaussian of precision λ = (1+w)/σ_c² − w/σ_u² and mean
    ((1+w) μ_c/σ_c² − w μ_u/σ_u²)/λ, which is drawn here exactly. Where it is improper (λ <= eps/σ_c², an
    unconditional std much smaller than the conditional one) the channel falls back to the conditional
    component, as big_vision falls back when its rejection sampler fails. Temperatures are the caller's:
    pass tempered mixtures (``DiagonalMixture.tempered``).
    """

    scale: float

    def __post_init__(self) -> None:
        _check_scale(self.scale)


def _check_pair(cond: DiagonalMixture, uncond: DiagonalMixture) -> None:
    if cond.batch_shape != uncond.batch_shape or cond.dim != uncond.dim:
        raise ValueError(
            f"cond (batch {tuple(cond.batch_shape)}, D={cond.dim}) and uncond "
            f"(batch {tuple(uncond.batch_shape)}, D={uncond.dim}) must have the same batch shape and D"
        )


def _resample(
    cond: DiagonalMixture,
    uncond: DiagonalMixture,
    num_cond: int,
    num_uncond: int,
    num_draws: int,
    g: ResamplingGuidance,
    generator: torch.Generator | None,
) -> Tensor:
    """Algorithm 1 on one pool per batch element: (*batch, num_draws, D), draws with replacement."""
    _check_pair(cond, uncond)
    # 1. Propose from the proposal-tempered mixtures.
    proposals = [
        mix.tempered(g.proposal_weight_temperature, g.proposal_std_scale).sample((n,), generator)
        for mix, n in ((cond, num_cond), (uncond, num_uncond))
        if n > 0
    ]
    pool = torch.cat(proposals)  # (P, *batch, D)
    # 2. Weigh. Δ uses the eval-tempered mixtures. A candidate from p_c has importance weight
    # p'/p_c = e^{wΔ}, one from p_u has p'/p_u = e^{(w+1)Δ}; under its own proposal each has mean
    # Z' = ∫ p_c^(1+w) p_u^(−w), so the weights of both branches are on one scale and are normalised by ONE
    # softmax over the joint pool (spec §6 "normalise over the pool"): self-normalised importance
    # resampling, exact as the pool grows when every temperature is 1, and the better-matched branch wins
    # more draws (normalising per branch would fix the split at s_c : s_u). T_s multiplies the
    # log-weights before that softmax.
    cond_v = cond.tempered(g.eval_weight_temperature, g.eval_std_scale)
    uncond_v = uncond.tempered(g.eval_weight_temperature, g.eval_std_scale)
    delta = cond_v.log_prob(pool) - uncond_v.log_prob(pool)  # (P, *batch)
    coef = torch.cat(
        [delta.new_full((num_cond,), g.scale), delta.new_full((num_uncond,), g.scale + 1.0)]
    ).view(-1, *([1] * (delta.ndim - 1)))
    # 0·Δ is exactly 0 even where Δ = ±inf (w = 0 leaves conditional candidates unweighted).
    log_w = torch.where(coef == 0, 0.0, coef * delta) * g.resample_temperature
    # Δ = +inf (p_u underflows) -> bound, always preferred; NaN (both underflow, inf − inf) and −inf ->
    # −bound, never preferred unless the whole pool is so, then uniform. The pool stays finite either way.
    log_w = torch.nan_to_num(log_w, nan=-_LOG_WEIGHT_BOUND).clamp(-_LOG_WEIGHT_BOUND, _LOG_WEIGHT_BOUND)
    # 3. Resample: categorical over the pool, per batch element.
    rows, pool_size, d = math.prod(cond.batch_shape), pool.shape[0], cond.dim
    probs = torch.softmax(log_w.reshape(pool_size, rows).T, dim=-1)  # (rows, P)
    pick = torch.multinomial(probs, num_draws, replacement=True, generator=generator)  # (rows, num_draws)
    candidates = pool.reshape(pool_size, rows, d).transpose(0, 1)  # (rows, P, D)
    drawn = candidates.gather(1, pick.unsqueeze(-1).expand(rows, num_draws, d))
    return drawn.reshape(*cond.batch_shape, num_draws, d)


def resampling_cfg_sample(
    cond: DiagonalMixture,
    uncond: DiagonalMixture,
    g: ResamplingGuidance,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Resampling CFG (supplementary §8, Algorithm 1): one draw per batch element, (*batch, D).

    A pool of s_c candidates from p_c and s_u from p_u per element, weighted towards p' and resampled once.
    """
    return _resample(cond, uncond, g.cond_candidates, g.uncond_candidates, 1, g, generator).squeeze(-2)


def resampling_cfg_sample_shared(
    cond: DiagonalMixture,
    uncond: DiagonalMixture,
    num_tokens: int,
    g: ResamplingGuidance,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Resampling CFG for the shared redundant mixture (spec §6 step 3): one pool per image (batch (B,)),
    then an index resampled for each of the num_tokens tokens -> (B, num_tokens, D).

    Pool per branch: g.redundant_pool candidates, or s_c·num_tokens and s_u·num_tokens when it is None.
    """
    if num_tokens < 1:
        raise ValueError(f"num_tokens must be >= 1, got {num_tokens}")
    if g.redundant_pool is None:
        num_cond, num_uncond = g.cond_candidates * num_tokens, g.uncond_candidates * num_tokens
    else:
        num_cond = g.redundant_pool if g.cond_candidates > 0 else 0
        num_uncond = g.redundant_pool if g.uncond_candidates > 0 else 0
    return _resample(cond, uncond, num_cond, num_uncond, num_tokens, g, generator)


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
            f"naive CFG pairs components by index: cond has K={cond.num_components}, "
            f"uncond K={uncond.num_components}"
        )
    batch, rows, d = cond.batch_shape, math.prod(cond.batch_shape), cond.dim
    if rows == 0:
        return cond.means.new_zeros(*batch, d)
    probs = torch.softmax(cond.logits, dim=-1).reshape(rows, cond.num_components)
    pick = torch.multinomial(probs, 1, replacement=True, generator=generator)
    index = pick.view(*batch, 1, 1).expand(*batch, 1, d)

    def component(t: Tensor) -> Tensor:
        # gather, not reshape: a mixture from expand_tokens is a broadcast view and must not be copied.
        return t.gather(-2, index).squeeze(-2)  # (*batch, D)

    mu_c, mu_u = component(cond.means), component(uncond.means)
    prec_c, prec_u = component(cond.scales).pow(-2), component(uncond.scales).pow(-2)
    w = g.scale
    precision = (1 + w) * prec_c - w * prec_u
    proper = precision > torch.finfo(precision.dtype).eps * prec_c
    safe = torch.where(proper, precision, prec_c)
    mean = torch.where(proper, ((1 + w) * mu_c * prec_c - w * mu_u * prec_u) / safe, mu_c)
    eps = torch.randn(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)
    return mean + safe.rsqrt() * eps


def guided_sample(
    cond: DiagonalMixture,
    uncond: DiagonalMixture,
    guidance: ResamplingGuidance | NaiveGuidance,
    generator: torch.Generator | None = None,
) -> Tensor:
    """One guided draw per batch element, (*batch, D), by the method ``guidance`` names."""
    if isinstance(guidance, ResamplingGuidance):
        return resampling_cfg_sample(cond, uncond, guidance, generator)
    if isinstance(guidance, NaiveGuidance):
        return naive_cfg_sample(cond, uncond, guidance, generator)
    raise TypeError(f"guidance must be ResamplingGuidance or NaiveGuidance, got {type(guidance).__name__}")
