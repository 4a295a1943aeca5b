"""Classifier-free guidance for mixture priors (docs/method.md §6): resampling CFG (Algorithm 1) and naive CFG."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch
from helpers import randomize, small_config
from scipy import stats

from farmer.guidance import (
    NaiveGuidance,
    RecordingGuidance,
    RedundantPoolStats,
    ResamplingGuidance,
    _distinct_picks,
    effective_sample_size,
    naive_cfg_sample,
    resampling_cfg_sample,
    resampling_cfg_sample_shared,
)
from farmer.mixture import DiagonalMixture
from farmer.prior import ARPrior
from farmer.sampling import make_guidance

# (temperature_convention, std_convention, redundant_draw) of ResamplingGuidance(), chosen by measurement.
DEFAULT_READINGS = ("divide", "std", "with_replacement")


def make_mixture(logits, means, scales) -> DiagonalMixture:
    return DiagonalMixture(torch.tensor(logits), torch.tensor(means), torch.tensor(scales))


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def unit_guidance(scale: float, cond: int, uncond: int, **kw) -> ResamplingGuidance:
    """All temperatures 1: the resampler then targets p' = p_c^(1+w) p_u^(−w) exactly as the pool grows."""
    return ResamplingGuidance(
        scale=scale,
        proposal_weight_temperature=1.0,
        proposal_std_scale=1.0,
        cond_candidates=cond,
        uncond_candidates=uncond,
        eval_weight_temperature=1.0,
        eval_std_scale=1.0,
        resample_temperature=1.0,
        **kw,
    )


def target_log_density(
    cond: DiagonalMixture, uncond: DiagonalMixture, w: float, z: torch.Tensor
) -> torch.Tensor:
    return ((1 + w) * cond.log_prob(z) - w * uncond.log_prob(z)).double()


def gaussian_product(mu_c, sd_c, mu_u, sd_u, w):
    """N(μ_c, σ_c²)^(1+w) N(μ_u, σ_u²)^(−w) ∝ N(mean, var) with precision (1+w)/σ_c² − w/σ_u²."""
    precision = (1 + w) / sd_c**2 - w / sd_u**2
    mean = ((1 + w) * mu_c / sd_c**2 - w * mu_u / sd_u**2) / precision
    return mean, 1 / precision


def check_gaussian_draws(x: torch.Tensor, mean: torch.Tensor, var: torch.Tensor) -> None:
    """Per-channel mean and variance of n draws within 5 standard errors of the Gaussian's."""
    n = x.shape[0]
    x = x.double()
    assert ((x.mean(0) - mean).abs() < 5 * (var / n).sqrt()).all(), (x.mean(0), mean)
    assert ((x.var(0) - var).abs() < 5 * var * math.sqrt(2 / n)).all(), (x.var(0), var)


# (1) Large pools, unit temperatures: draws follow the normalised target ---------------------------------
COND_1D = ([0.0, 0.5, -0.3], [[-1.0], [0.8], [2.0]], [[0.5], [0.6], [0.4]])
UNCOND_1D = ([0.0, 0.0], [[-0.5], [1.0]], [[1.2], [1.5]])


def ks_distance(draws: torch.Tensor, x: torch.Tensor, density: torch.Tensor) -> float:
    """Kolmogorov–Smirnov distance between draws and a density tabulated on the grid x (trapezoid CDF)."""
    cdf = torch.cat([density.new_zeros(1), torch.cumulative_trapezoid(density, x)])
    cdf = cdf / cdf[-1]
    s = np.sort(draws.double().numpy())
    f = np.interp(s, x.numpy(), cdf.numpy())
    i = np.arange(1, len(s) + 1)
    return float(np.maximum(i / len(s) - f, f - (i - 1) / len(s)).max())


def test_resampling_matches_target_1d() -> None:
    cond, uncond, w, n = make_mixture(*COND_1D), make_mixture(*UNCOND_1D), 1.0, 2000
    draws = resampling_cfg_sample(
        cond.expand_tokens(n), uncond.expand_tokens(n), unit_guidance(w, 1000, 1000), gen(0)
    )[:, 0]
    x = torch.linspace(-12, 12, 48001, dtype=torch.float64)
    log_p = target_log_density(cond, uncond, w, x[:, None].float())
    critical = 1.949 / math.sqrt(n)  # KS critical value at α = 0.001
    assert ks_distance(draws, x, (log_p - log_p.max()).exp()) < critical
    # Power check: the same draws are far from the unguided conditional density.
    assert ks_distance(draws, x, cond.log_prob(x[:, None].float()).double().exp()) > 2 * critical


def test_resampling_matches_target_2d() -> None:
    cond = make_mixture([0.0, 0.4], [[-1.0, 0.5], [1.0, -0.5]], [[0.6, 0.8], [0.7, 0.5]])
    uncond = make_mixture([0.0, 0.0], [[0.0, 0.0], [1.0, 1.0]], [[1.5, 1.5], [1.5, 1.5]])
    w, n, bins = 1.5, 2000, 5
    draws = resampling_cfg_sample(
        cond.expand_tokens(n), uncond.expand_tokens(n), unit_guidance(w, 1000, 1000), gen(1)
    ).numpy()
    # Quadrature: target mass of each cell of a 5×5 grid cut at the target's marginal quintiles.
    x = torch.linspace(-10, 10, 801)
    grid = torch.stack(torch.meshgrid(x, x, indexing="ij"), -1)
    log_p = target_log_density(cond, uncond, w, grid)
    p = (log_p - log_p.max()).exp().numpy()
    p /= p.sum()
    xs = x.numpy()
    edges = [np.interp(np.arange(1, bins) / bins, np.cumsum(p.sum(1 - a)), xs) for a in (0, 1)]
    cell_x, cell_y = np.digitize(xs, edges[0]), np.digitize(xs, edges[1])
    expected = np.zeros((bins, bins))
    np.add.at(expected, (cell_x[:, None], cell_y[None, :]), p)
    observed = np.zeros((bins, bins))
    np.add.at(observed, (np.digitize(draws[:, 0], edges[0]), np.digitize(draws[:, 1], edges[1])), 1)

    def chi_square(prob: np.ndarray) -> tuple[float, int]:
        e = prob * n
        keep = e >= 5  # the usual validity rule; the few sparse corner cells are left out
        return float(((observed - e) ** 2 / e)[keep].sum()), int(keep.sum()) - 1

    chi2, dof = chi_square(expected)
    critical = stats.chi2.ppf(0.999, dof)
    assert chi2 < critical
    # Power check: the unguided conditional density is rejected by the same statistic.
    pc = cond.log_prob(grid).double().exp().numpy()
    cond_cells = np.zeros((bins, bins))
    np.add.at(cond_cells, (cell_x[:, None], cell_y[None, :]), pc / pc.sum())
    assert chi_square(cond_cells)[0] > 5 * critical


def test_small_pools_move_the_mean_towards_the_target() -> None:
    # Paper pool sizes (5 + 5): the draws' mean rises monotonically with w, towards (never past) the target's.
    cond = make_mixture([0.0, 0.0], [[0.5], [1.5]], [[0.7], [0.7]])
    uncond = make_mixture([0.0], [[0.0]], [[1.5]])
    x = torch.linspace(-15, 15, 30001)
    n, previous = 20_000, -math.inf
    for seed, w in enumerate([0.0, 1.0, 2.0, 4.0]):
        draws = resampling_cfg_sample(
            cond.expand_tokens(n), uncond.expand_tokens(n), unit_guidance(w, 5, 5), gen(seed)
        )[:, 0].double()
        mean, se = draws.mean().item(), draws.std().item() / math.sqrt(n)
        log_p = target_log_density(cond, uncond, w, x[:, None])
        p = (log_p - log_p.max()).exp()
        target_mean = ((p * x.double()).sum() / p.sum()).item()
        assert mean > previous + 3 * se
        assert mean < target_mean + 5 * se
        previous = mean
    assert previous > 1.3  # well above the conditional mean 1.0


# (2) K = 1: the exact Gaussian product -----------------------------------------------------------------
MU_C, SD_C = torch.tensor([1.0, -0.5, 0.0]), torch.tensor([1.0, 0.5, 0.8])
MU_U, SD_U = torch.tensor([0.0, 0.0, 0.5]), torch.tensor([2.0, 1.0, 1.2])


def single_gaussians(n: int) -> tuple[DiagonalMixture, DiagonalMixture]:
    cond = DiagonalMixture(torch.zeros(n, 1), MU_C.expand(n, 1, 3), SD_C.expand(n, 1, 3))
    uncond = DiagonalMixture(torch.zeros(n, 1), MU_U.expand(n, 1, 3), SD_U.expand(n, 1, 3))
    return cond, uncond


def test_resampling_matches_gaussian_product() -> None:
    w, n = 1.5, 2000
    cond, uncond = single_gaussians(n)
    # Unequal branches: the joint normalisation of the pool must not depend on s_c : s_u.
    draws = resampling_cfg_sample(cond, uncond, unit_guidance(w, 1500, 500), gen(2))
    mean, var = gaussian_product(MU_C.double(), SD_C.double(), MU_U.double(), SD_U.double(), w)
    check_gaussian_draws(draws, mean, var)


def test_shared_pool_matches_gaussian_product() -> None:
    w, tokens = 1.0, 4000
    cond, uncond = single_gaussians(2)
    draws = resampling_cfg_sample_shared(
        cond, uncond, tokens, unit_guidance(w, 1, 1, redundant_pool=20_000), gen(3)
    )
    assert draws.shape == (2, tokens, 3)
    mean, var = gaussian_product(MU_C.double(), SD_C.double(), MU_U.double(), SD_U.double(), w)
    for image in draws:  # tokens of one image share a pool; 20 000 per branch keeps repeats rare
        check_gaussian_draws(image, mean, var)


def test_naive_matches_gaussian_product_exactly() -> None:
    w, n = 1.5, 100_000
    cond, uncond = single_gaussians(n)
    draws = naive_cfg_sample(cond, uncond, NaiveGuidance(w), gen(4))
    mean, var = gaussian_product(MU_C.double(), SD_C.double(), MU_U.double(), SD_U.double(), w)
    check_gaussian_draws(draws, mean, var)


def test_resample_temperature_multiplies_log_weights() -> None:
    # T_s -> 0 flattens the pool's weights: draws become an even mix of the two proposals (mean ≈ 0),
    # while T_s = 1 resamples towards the guided target (mean (1+w)·2 − w·(−2) = 2 + 4w for unit stds).
    n = 4000
    cond = DiagonalMixture(torch.zeros(n, 1), torch.full((n, 1, 1), 2.0), torch.ones(n, 1, 1))
    uncond = DiagonalMixture(torch.zeros(n, 1), torch.full((n, 1, 1), -2.0), torch.full((n, 1, 1), 1.0))
    flat = dataclasses.replace(unit_guidance(0.5, 50, 50), resample_temperature=1e-9)
    x = resampling_cfg_sample(cond, uncond, flat, gen(5)).double()
    assert abs(x.mean().item()) < 5 * math.sqrt(5 / n)  # even mix of N(±2, 1): var 5
    y = resampling_cfg_sample(cond, uncond, unit_guidance(0.5, 50, 50), gen(5)).double()
    assert y.mean().item() > 3.0  # target mean 4


# (3) Robustness and the shared pool ----------------------------------------------------------------------
def test_extreme_knobs_stay_finite() -> None:
    g = torch.Generator().manual_seed(6)
    b, k, d = 2000, 4, 8
    cond = DiagonalMixture(
        torch.randn(b, k, generator=g) * 5, torch.randn(b, k, d, generator=g) * 3, torch.rand(b, k, d) + 1e-3
    )
    uncond = DiagonalMixture(
        torch.randn(b, k, generator=g) * 5, torch.randn(b, k, d, generator=g) * 3, torch.rand(b, k, d) + 1e-3
    )
    extreme = ResamplingGuidance(
        scale=10.0,
        proposal_weight_temperature=3.0,
        proposal_std_scale=2.0,
        eval_weight_temperature=3.0,
        eval_std_scale=2.0,
        resample_temperature=3.0,
    )
    for guidance in (extreme, ResamplingGuidance(scale=10.0), NaiveGuidance(10.0)):
        out = guidance.draw_token(cond, uncond, g)
        assert out.shape == (b, d) and torch.isfinite(out).all()
    shared = resampling_cfg_sample_shared(cond[:8], uncond[:8], 64, extreme, g)
    assert shared.shape == (8, 64, d) and torch.isfinite(shared).all()


@pytest.mark.parametrize("w", [0.0, 2.5])
def test_underflowing_densities_are_handled(w: float) -> None:
    # p_u underflows to 0 at the conditional candidates (Δ = +inf) and p_c at the unconditional ones
    # (Δ = −inf): the draw must be a conditional candidate, finite, with no NaN from ∞ − ∞ or 0·∞.
    b = 500
    cond = DiagonalMixture(torch.zeros(b, 1), torch.zeros(b, 1, 2), torch.full((b, 1, 2), 1e-3))
    uncond = DiagonalMixture(torch.zeros(b, 1), torch.full((b, 1, 2), 1e19), torch.full((b, 1, 2), 1e-3))
    assert torch.isinf(uncond.log_prob(torch.zeros(2))).all()  # the premise
    out = resampling_cfg_sample(cond, uncond, ResamplingGuidance(scale=w), gen(7))
    assert torch.isfinite(out).all() and out.abs().max() < 1.0


def test_pool_where_both_densities_underflow_stays_finite() -> None:
    # Proposals far beyond both eval mixtures: log p_c = log p_u = −inf, Δ = NaN for every candidate.
    b = 300
    cond = DiagonalMixture(torch.zeros(b, 1), torch.zeros(b, 1, 2), torch.ones(b, 1, 2))
    uncond = DiagonalMixture(torch.zeros(b, 1), torch.ones(b, 1, 2), torch.ones(b, 1, 2))
    g = dataclasses.replace(ResamplingGuidance(), proposal_std_scale=1e25)
    out = resampling_cfg_sample(cond, uncond, g, gen(8))
    assert torch.isfinite(out).all()


def test_shared_pool_shapes_and_token_draws() -> None:
    b, tokens, d = 3, 50, 4
    cond = DiagonalMixture(torch.zeros(b, 2), torch.randn(b, 2, d), torch.ones(b, 2, d))
    uncond = DiagonalMixture(torch.zeros(b, 2), torch.randn(b, 2, d), torch.full((b, 2, d), 2.0))
    out = resampling_cfg_sample_shared(cond, uncond, tokens, ResamplingGuidance(), gen(9))
    assert out.shape == (b, tokens, d) and torch.isfinite(out).all()
    for image in out:  # default pool s_c·N + s_u·N: the tokens are distinct draws
        assert 1 < len(torch.unique(image, dim=0)) <= 10 * tokens
    # A pool of 2 + 2 per image: every token is one of at most 4 candidates, shared by the image's tokens.
    # (Near-equal mixtures keep the 4 weights comparable, so several candidates get picked.)
    close = DiagonalMixture(cond.logits, cond.means, cond.scales * 1.1)
    tiny_pool = unit_guidance(1.0, 1, 1, redundant_pool=2)
    tiny = resampling_cfg_sample_shared(cond, close, tokens, tiny_pool, gen(10))
    for image in tiny:
        assert 1 < len(torch.unique(image, dim=0)) <= 4
    assert not torch.equal(tiny[0, 0], tiny[1, 0])  # separate pools per image
    torch.testing.assert_close(
        tiny, resampling_cfg_sample_shared(cond, close, tokens, tiny_pool, gen(10)), rtol=0, atol=0
    )


def test_batched_shapes_and_one_branch_pools() -> None:
    cond = DiagonalMixture(torch.zeros(2, 3, 4), torch.randn(2, 3, 4, 5), torch.ones(2, 3, 4, 5))
    uncond = DiagonalMixture(torch.zeros(2, 3, 4), torch.randn(2, 3, 4, 5), torch.ones(2, 3, 4, 5))
    for s_c, s_u in ((5, 5), (0, 3), (3, 0)):
        g = ResamplingGuidance(cond_candidates=s_c, uncond_candidates=s_u)
        assert resampling_cfg_sample(cond, uncond, g, gen(11)).shape == (2, 3, 5)


# (4) Naive CFG -------------------------------------------------------------------------------------------
def test_naive_picks_the_component_by_conditional_weights() -> None:
    # Components paired by index, chosen by π_c only: the unconditional weights (favouring the other
    # component) are ignored.
    n = 20_000
    means = torch.tensor([[-50.0], [50.0]]).expand(n, 2, 1)
    cond = DiagonalMixture(
        torch.tensor([math.log(0.8), math.log(0.2)]).expand(n, 2), means, torch.ones(n, 2, 1)
    )
    uncond = DiagonalMixture(torch.tensor([-5.0, 5.0]).expand(n, 2), means, torch.full((n, 2, 1), 2.0))
    x = naive_cfg_sample(cond, uncond, NaiveGuidance(1.0), gen(12))[:, 0]
    left = (x < 0).double().mean().item()
    assert abs(left - 0.8) < 5 * math.sqrt(0.16 / n)
    # Each component is the Gaussian product of its pair: mean ±50, var 1/(2 − 1/4).
    check_gaussian_draws(x[x < 0, None], torch.tensor([-50.0]).double(), torch.tensor([1 / 1.75]).double())


def test_naive_improper_product_is_bounded() -> None:
    # σ_u = 0.5 < σ_c = 1 with w = 1: precision 2 − 4 < 0 in channel 0, floored at σ_c^-2/4 (std 2), and the
    # shift w σ_u^-2 (μ_c − μ_u)/λ = 16 clamped to 3σ_c; channel 1 (σ_u = 2) is the exact product.
    n = 50_000
    cond = DiagonalMixture(torch.zeros(n, 1), torch.tensor([1.0, 1.0]).expand(n, 1, 2), torch.ones(n, 1, 2))
    uncond = DiagonalMixture(
        torch.zeros(n, 1), torch.zeros(n, 1, 2), torch.tensor([0.5, 2.0]).expand(n, 1, 2)
    )
    x = naive_cfg_sample(cond, uncond, NaiveGuidance(1.0), gen(13))
    mean1, var1 = gaussian_product(1.0, 1.0, 0.0, 2.0, 1.0)
    check_gaussian_draws(x, torch.tensor([4.0, mean1]).double(), torch.tensor([4.0, var1]).double())


def naive_boundary_draws(sd_u: torch.Tensor, seed: int, draws: int = 400) -> torch.Tensor:
    """(len(sd_u), draws): σ_c = 1, μ_c = 0, μ_u = 0.5, w = 2.5, the same noise for every σ_u. The product's
    precision 3.5 − 2.5/σ_u² crosses 0 at σ_u = √(5/7) ≈ 0.845."""
    rows = [
        naive_cfg_sample(
            DiagonalMixture(torch.zeros(draws, 1), torch.zeros(draws, 1, 1), torch.ones(draws, 1, 1)),
            DiagonalMixture(torch.zeros(draws, 1), torch.full((draws, 1, 1), 0.5), s.expand(draws, 1, 1)),
            NaiveGuidance(2.5),
            gen(seed),
        )[:, 0]
        for s in sd_u
    ]
    return torch.stack(rows)


def test_naive_is_bounded_at_and_across_the_improper_boundary() -> None:
    # Unbounded, σ_u = 0.846 gives mean −250 and std 12, and σ_u = 0.80 has no Gaussian at all.
    sd_u = torch.cat([torch.linspace(0.78, 0.95, 341), torch.tensor([0.80, 0.846])])
    x = naive_boundary_draws(sd_u, seed=20)
    # Within the bounds: |mean − μ_c| <= 3σ_c, std <= 2σ_c (the 400 draws of N(0, 1) stay within 4.5).
    assert x.abs().max() <= 3.0 + 2.0 * 4.5
    # Both sides of the boundary are drawn near μ_c: mean μ_c − 3σ_c (clamped shift), std 2σ_c (floor).
    for row in x[-2:]:
        assert abs(row.mean().item() + 3.0) < 5 * 2 / math.sqrt(len(row)) and abs(row.std().item() - 2.0) < 0.3
    # Continuous in σ_u: with the noise held fixed, a step of 5e-4 in σ_u moves no draw by more than 0.05.
    assert (x[:341].diff(dim=0).abs() < 0.05).all()
    # Far from the boundary the product is exact: σ_u = 0.95 -> precision 0.730, mean −1.90 (no bound hit).
    mean, var = gaussian_product(0.0, 1.0, 0.5, 0.95, 2.5)
    far = naive_boundary_draws(torch.tensor([0.95]), seed=21, draws=50_000)[0, :, None]
    check_gaussian_draws(far, torch.tensor([mean]).double(), torch.tensor([var]).double())


def test_naive_without_guidance_is_the_conditional_sample() -> None:
    cond = DiagonalMixture(torch.randn(6, 3), torch.randn(6, 3, 4), torch.rand(6, 3, 4) + 0.1)
    uncond = DiagonalMixture(torch.randn(6, 3), torch.randn(6, 3, 4), torch.rand(6, 3, 4) + 0.1)
    # Same generator stream: component index, then one ε per channel.
    torch.testing.assert_close(
        naive_cfg_sample(cond, uncond, NaiveGuidance(0.0), gen(14)), cond.sample((), gen(14))
    )


# API -----------------------------------------------------------------------------------------------------
def test_defaults_are_the_paper_settings() -> None:
    g = ResamplingGuidance()
    assert (g.scale, g.proposal_weight_temperature, g.proposal_std_scale) == (2.5, 1.0, 0.9)
    assert (g.cond_candidates, g.uncond_candidates) == (5, 5)
    assert (g.eval_weight_temperature, g.eval_std_scale, g.resample_temperature) == (0.2, 0.9, 1.1)
    # The readings measured best on the shipped model (docs/guidance.md).
    assert (g.temperature_convention, g.std_convention, g.redundant_draw) == DEFAULT_READINGS


# Conventions and command-line options ----------------------------------------------------------------------
def test_weight_and_std_temperature_conventions() -> None:
    mix = make_mixture([0.0, math.log(4.0)], [[0.0], [1.0]], [[2.0], [1.0]])
    for convention, std, ratio, scales in (
        ("divide", "std", 4.0**5, [1.8, 0.9]),  # logits / 0.2: the heavier component 4^5 times the other
        ("multiply", "variance", 4.0**0.2, [2 * math.sqrt(0.9), math.sqrt(0.9)]),  # logits × 0.2: flatter
    ):
        g = ResamplingGuidance(temperature_convention=convention, std_convention=std)
        tempered = g.temper(mix, 0.2, 0.9)
        probs = torch.softmax(tempered.logits, -1)
        assert (probs[1] / probs[0]).item() == pytest.approx(ratio, rel=1e-5)
        torch.testing.assert_close(tempered.scales[:, 0], torch.tensor(scales))
        torch.testing.assert_close(tempered.means, mix.means)


@pytest.mark.parametrize(("std_convention", "variance"), [("std", 0.25**2), ("variance", 0.25)])
def test_proposals_are_tempered_by_the_std_convention(std_convention: str, variance: float) -> None:
    # w = 0 and conditional candidates only: every log-weight is 0, so the draws are the proposals themselves.
    n = 20_000
    cond, uncond = single_gaussians(n)
    g = dataclasses.replace(unit_guidance(0.0, 3, 0), proposal_std_scale=0.25, std_convention=std_convention)
    draws = resampling_cfg_sample(cond, uncond, g, gen(16))
    check_gaussian_draws(draws, MU_C.double(), SD_C.double().square() * variance)


def test_guidance_options_are_typed_by_the_dataclass_fields() -> None:
    """--cfg-option KEY=VALUE goes through the one KEY=VALUE parser (farmer.config.parse_assignments)."""
    g = make_guidance("resampling", 2.0, ["eval_weight_temperature=0.5", "cond-candidates=3", "redundant_pool=none",
                                          "std_convention=variance"])
    assert g == ResamplingGuidance(scale=2.0, eval_weight_temperature=0.5, cond_candidates=3, redundant_pool=None,
                                   std_convention="variance")
    assert isinstance(g.eval_weight_temperature, float)
    assert make_guidance("resampling", 2.0, ["redundant_pool=64"]).redundant_pool == 64
    assert make_guidance("naive", 2.0, ["max_mean_shift=2"]) == NaiveGuidance(scale=2.0, max_mean_shift=2.0)
    for pairs, message in (
        (["bogus=1"], "unknown ResamplingGuidance field 'bogus'"),
        (["scale=2"], "unknown ResamplingGuidance field 'scale'"),  # --guidance sets the scale
        (["cond_candidates=2.5"], "cond_candidates"),
        (["eval_std_scale=hot"], "eval_std_scale"),
        (["temperature_convention=square"], "divide, multiply"),
        (["resample_temperature"], "KEY=VALUE"),
    ):
        with pytest.raises(ValueError, match=message):
            make_guidance("resampling", 2.0, pairs)
    with pytest.raises(ValueError, match="unknown NaiveGuidance field 'cond_candidates'"):
        make_guidance("naive", 2.0, ["cond_candidates=3"])


def test_cli_rejects_a_bad_guidance_option(capsys: pytest.CaptureFixture[str]) -> None:
    from farmer.cli import main

    assert main(["sample", "--n", "1", "--guidance", "2.5", "--cfg-option", "eval_std_scale=-1"]) == 2
    assert "eval_std_scale must be a finite number > 0" in capsys.readouterr().err
    # A bare `farmer sample` is guided (the README's grid); --cfg none turns guidance off, and its knobs with it.
    assert main(["sample", "--n", "1", "--cfg", "none", "--cfg-option", "eval_std_scale=0.5"]) == 2
    assert "--cfg-option needs guidance" in capsys.readouterr().err


# Diversity of the shared redundant pool ---------------------------------------------------------------------
def test_effective_sample_size() -> None:
    probs = torch.tensor([[0.25, 0.25, 0.25, 0.25], [1.0, 0.0, 0.0, 0.0], [0.5, 0.5, 0.0, 0.0]])
    torch.testing.assert_close(effective_sample_size(probs), torch.tensor([4.0, 1.0, 2.0]))


def issue_case(seed: int) -> tuple[DiagonalMixture, DiagonalMixture]:
    """K = 16, D = 640, unconditional means shifted by 0.05: a pool whose weights concentrate on a few."""
    g = gen(seed)
    cond = DiagonalMixture(torch.zeros(2, 16), torch.randn(2, 16, 640, generator=g), torch.ones(2, 16, 640))
    return cond, DiagonalMixture(cond.logits, cond.means + 0.05, cond.scales)


def test_shared_pool_with_replacement_repeats_candidates_and_records_them() -> None:
    pool_stats, tokens = RedundantPoolStats(), 256
    cond, uncond = issue_case(17)
    g = ResamplingGuidance(redundant_draw="with_replacement")
    out = resampling_cfg_sample_shared(cond, uncond, tokens, g, gen(18), pool_stats)
    (ess,), (distinct,) = pool_stats.ess, pool_stats.distinct
    assert ess.shape == distinct.shape == (2,)
    for image, n_distinct, n_eff in zip(out, distinct, ess, strict=True):
        assert len(torch.unique(image, dim=0)) == n_distinct < tokens / 4  # few candidates, many repeats
        assert 1 <= n_eff < tokens / 4
    # Recording changes nothing about the draws.
    torch.testing.assert_close(
        out, resampling_cfg_sample_shared(cond, uncond, tokens, g, gen(18))
    )


def test_shared_pool_with_replacement_resamples_by_the_importance_weights() -> None:
    # One image, 5 conditional candidates (w = 1, unit temperatures): each token is candidate j with
    # probability softmax(w Δ)_j, Δ = log p_c − log p_u at the candidate.
    tokens = 20_000
    cond = make_mixture([[0.0]], [[[0.0, 0.0]]], [[[1.0, 1.0]]])
    uncond = make_mixture([[0.0]], [[[0.5, -0.5]]], [[[1.5, 1.5]]])
    g = unit_guidance(1.0, 1, 0, redundant_pool=5)
    out = resampling_cfg_sample_shared(cond, uncond, tokens, g, gen(19))[0]
    pool, counts = torch.unique(out, dim=0, return_counts=True)
    assert len(pool) == 5
    expected = torch.softmax(cond[0].log_prob(pool) - uncond[0].log_prob(pool), dim=0).double() * tokens
    chi2 = ((counts - expected) ** 2 / expected).sum().item()
    assert chi2 < stats.chi2.ppf(0.999, 4)


@pytest.mark.parametrize("redundant_mixture", ["shared", "per_token"])
def test_the_recorder_sees_only_redundant_pools(redundant_mixture: str) -> None:
    torch.manual_seed(0)
    prior = randomize(ARPrior(small_config(redundant_mixture=redundant_mixture))).eval()
    labels, pool_stats = torch.tensor([1, 4, 9]), RedundantPoolStats()
    g = ResamplingGuidance()
    latents = prior.sample(labels, gen(3), RecordingGuidance(g, pool_stats))
    per_token, pool = redundant_mixture == "per_token", g.cond_candidates + g.uncond_candidates
    # One pool per image and token (per-token mixtures), or one per image of (s_c + s_u)·N candidates.
    assert len(pool_stats.ess) == (prior.num_tokens if per_token else 1)
    assert len(pool_stats.distinct) == (0 if per_token else 1)
    assert pool_stats.pool_size == (pool if per_token else pool * prior.num_tokens)
    for ess in pool_stats.ess:
        assert ess.shape == (3,) and (ess >= 1 - 1e-5).all()
        assert (ess <= pool_stats.pool_size + 1e-4).all()
    # Recording changes nothing about the draws.
    for a, b in zip(latents, prior.sample(labels, gen(3), g), strict=True):
        torch.testing.assert_close(a, b)


def test_shared_pool_without_replacement_draws_distinct_candidates() -> None:
    tokens, pool_stats = 256, RedundantPoolStats()
    cond, uncond = issue_case(17)
    g = ResamplingGuidance(redundant_draw="without_replacement")
    out = resampling_cfg_sample_shared(cond, uncond, tokens, g, gen(18), pool_stats)
    assert out.shape == (2, tokens, 640)
    for image in out:
        assert len(torch.unique(image, dim=0)) == tokens
    assert (pool_stats.distinct[0] == tokens).all()
    with pytest.raises(ValueError, match="distinct"):  # a pool of 2 + 2 cannot give 256 distinct vectors
        resampling_cfg_sample_shared(cond, uncond, tokens, dataclasses.replace(g, redundant_pool=2))


def test_distinct_picks_follow_sequential_sampling_without_replacement() -> None:
    rows, p = 40_000, torch.tensor([0.6, 0.3, 0.1])
    log_w = p.log().expand(rows, 3)
    # One draw: the categorical itself.
    first = torch.bincount(_distinct_picks(log_w, 1, gen(22))[:, 0], minlength=3).double() / rows
    assert (first - p).abs().max() < 5 * math.sqrt(0.25 / rows)
    # Two draws: candidate i is left out with probability Σ_{j≠i} p_j p_k / (1 − p_j), {i, j, k} = {0, 1, 2}.
    picks = _distinct_picks(log_w, 2, gen(23))
    assert (picks[:, 0] != picks[:, 1]).all()
    left_out = 3 - picks.sum(dim=1)
    observed = torch.bincount(left_out, minlength=3).double() / rows
    expected = [sum(p[j] * p[3 - i - j] / (1 - p[j]) for j in range(3) if j != i).item() for i in range(3)]
    assert (observed - torch.tensor(expected).double()).abs().max() < 5 * math.sqrt(0.25 / rows)
    # Positions are in random order, not by decreasing key: the heaviest candidate is first only about
    # as often as second.
    assert abs((picks[:, 0] == 0).double().mean() - (picks[:, 1] == 0).double().mean()) < 0.02


def test_each_method_implements_the_guidance_interface() -> None:
    cond, uncond = single_gaussians(4)
    resampling, naive = ResamplingGuidance(), NaiveGuidance(2.0)
    torch.testing.assert_close(
        resampling.draw_token(cond, uncond, gen(15)), resampling_cfg_sample(cond, uncond, resampling, gen(15))
    )
    torch.testing.assert_close(naive.draw_token(cond, uncond, gen(15)), naive_cfg_sample(cond, uncond, naive, gen(15)))
    torch.testing.assert_close(
        resampling.draw_shared(cond, uncond, 6, gen(16)),
        resampling_cfg_sample_shared(cond, uncond, 6, resampling, gen(16)),
    )
    # Naive CFG has no pool: the shared mixture's 6 vectors of an image are 6 independent guided draws.
    shared = naive.draw_shared(cond, uncond, 6, gen(16))
    assert shared.shape == (4, 6, 3)
    assert all(len(torch.unique(image, dim=0)) == 6 for image in shared)


class ConstantGuidance:
    """A Guidance that is neither shipped method: constant draws, and a record of the mixtures it was given."""

    def __init__(self) -> None:
        self.token_pairs: list[tuple[DiagonalMixture, DiagonalMixture]] = []
        self.redundant_draws = 0
        self.shared_tokens: list[int] = []

    def draw_token(self, cond: DiagonalMixture, uncond: DiagonalMixture,
                   generator: torch.Generator | None) -> torch.Tensor:
        self.token_pairs.append((cond, uncond))
        return torch.full((*cond.batch_shape, cond.dim), 7.0)

    def draw_redundant(self, cond: DiagonalMixture, uncond: DiagonalMixture,
                       generator: torch.Generator | None) -> torch.Tensor:
        self.redundant_draws += 1
        return torch.full((*cond.batch_shape, cond.dim), 5.0)

    def draw_shared(self, cond: DiagonalMixture, uncond: DiagonalMixture, num_tokens: int,
                    generator: torch.Generator | None) -> torch.Tensor:
        self.shared_tokens.append(num_tokens)
        return torch.full((*cond.batch_shape, num_tokens, cond.dim), -3.0)


@pytest.mark.parametrize("redundant_mixture", ["shared", "per_token"])
def test_the_prior_samples_through_any_guidance(redundant_mixture: str) -> None:
    torch.manual_seed(0)
    prior = randomize(ARPrior(small_config(redundant_mixture=redundant_mixture))).eval()
    labels, guidance, n = torch.tensor([1, 4, 9]), ConstantGuidance(), prior.num_tokens
    zi, zr = prior.sample(labels, gen(0), guidance)
    # The guidance's draws are the latents: one draw_token per token, plus one draw_redundant per token with
    # per-token redundant mixtures (docs/method.md §11) or one draw_shared of all N redundant vectors.
    per_token = redundant_mixture == "per_token"
    assert zi.shape == (3, n, prior.informative_dim) and (zi == 7.0).all()
    assert zr.shape == (3, n, prior.redundant_dim) and (zr == (5.0 if per_token else -3.0)).all()
    assert len(guidance.token_pairs) == n
    assert guidance.redundant_draws == (n if per_token else 0)
    assert guidance.shared_tokens == ([] if per_token else [n])
    # The first pair is token 1's mixture under the labels (p_c) and under the null class (p_u).
    cond, uncond = guidance.token_pairs[0]
    for mix, y in ((cond, labels), (uncond, torch.full_like(labels, prior.null_class))):
        expected = prior(zi, y)[0][:, 0]
        torch.testing.assert_close(mix.logits, expected.logits)
        torch.testing.assert_close(mix.means, expected.means)


def test_bad_inputs_raise() -> None:
    for kwargs in (
        dict(cond_candidates=0, uncond_candidates=0),
        dict(cond_candidates=-1),
        dict(uncond_candidates=2.5),
        dict(scale=-0.1),
        dict(scale=float("inf")),
        dict(proposal_std_scale=0.0),
        dict(eval_weight_temperature=-1.0),
        dict(resample_temperature=float("nan")),
        dict(redundant_pool=0),
    ):
        with pytest.raises(ValueError):
            ResamplingGuidance(**kwargs)
    with pytest.raises(ValueError, match="scale"):
        NaiveGuidance(-1.0)
    cond, uncond = single_gaussians(4)
    with pytest.raises(ValueError, match="batch shape"):
        resampling_cfg_sample(cond, uncond[:2], ResamplingGuidance())
    with pytest.raises(ValueError, match="batch shape"):
        naive_cfg_sample(
            cond,
            DiagonalMixture(torch.zeros(4, 1), torch.zeros(4, 1, 2), torch.ones(4, 1, 2)),
            NaiveGuidance(1.0),
        )
    with pytest.raises(ValueError, match="K="):
        naive_cfg_sample(
            cond,
            DiagonalMixture(torch.zeros(4, 2), torch.zeros(4, 2, 3), torch.ones(4, 2, 3)),
            NaiveGuidance(1.0),
        )
    with pytest.raises(ValueError, match="num_tokens"):
        resampling_cfg_sample_shared(cond, uncond, 0, ResamplingGuidance())


def unfused_resampling_draw(cond: DiagonalMixture, uncond: DiagonalMixture, g: ResamplingGuidance,
                            generator: torch.Generator) -> torch.Tensor:
    """Algorithm 1 for one draw per element, step by step through the DiagonalMixture API (the computation that
    farmer.guidance fuses): the reference its fused path must equal bit for bit."""
    k = max(cond.num_components, uncond.num_components)

    def padded(mix: DiagonalMixture) -> list[torch.Tensor]:
        pad = k - mix.num_components
        return [torch.nn.functional.pad(mix.logits, (0, pad), value=-math.inf),
                torch.nn.functional.pad(mix.means, (0, 0, 0, pad)),
                torch.nn.functional.pad(mix.scales, (0, 0, 0, pad), value=1.0)]

    both = DiagonalMixture(*(torch.stack(pair) for pair in zip(padded(cond), padded(uncond), strict=True)))
    s_c, s_u = g.cond_candidates, g.uncond_candidates
    drawn = g.temper(both, g.proposal_weight_temperature, g.proposal_std_scale).sample((max(s_c, s_u),), generator)
    pool = torch.cat([drawn[:s_c, 0], drawn[:s_u, 1]])
    evaluate = g.temper(both, g.eval_weight_temperature, g.eval_std_scale)
    log_p = evaluate.log_prob(pool.unsqueeze(1))
    delta = log_p[:, 0] - log_p[:, 1]
    log_w = delta * g.scale
    log_w[s_c:] = log_w[s_c:] + delta[s_c:]
    log_w = (log_w * g.resample_temperature).nan_to_num(nan=-1e30).clamp(-1e30, 1e30)
    rows, size = math.prod(cond.batch_shape), pool.shape[0]
    log_w = log_w.reshape(size, rows).T
    log_w = log_w - log_w.amax(dim=-1, keepdim=True)
    uniform = torch.rand((rows, 1, size), generator=generator).clamp_min(torch.finfo(torch.float32).tiny)
    pick = (log_w[:, None, :] - uniform.log().neg().log()).argmax(dim=-1)
    out = pool.reshape(size, rows, cond.dim).transpose(0, 1).gather(1, pick[..., None].expand(rows, 1, cond.dim))
    return out.reshape(*cond.batch_shape, cond.dim)


@pytest.mark.parametrize("knobs, k_u, batch", [
    (dict(), 6, (5,)),
    (dict(cond_candidates=3, uncond_candidates=7, proposal_weight_temperature=1.3, resample_temperature=1.0), 6,
     (2, 3)),
    (dict(uncond_candidates=0, temperature_convention="multiply", std_convention="variance"), 4, (4,)),
    (dict(scale=7.0, eval_std_scale=0.5, cond_candidates=1), 6, (1,)),
    (dict(), 6, (300,)),
], ids=["defaults", "uneven-pool", "cond-only-padded", "one-cond-candidate", "large-pool"])
def test_fused_resampling_equals_the_unfused_reference_exactly(knobs: dict, k_u: int, batch: tuple) -> None:
    """The fused pool (one gather per draw, tempering only the drawn scales, the direct log-density of small pools,
    the expanded one of large pools) must reproduce Algorithm 1 step by step exactly: same noise, same arithmetic,
    same draws, bit for bit."""
    g = ResamplingGuidance(**knobs)
    torch.manual_seed(3)
    d, k_c = 5, 6

    def mixture(k: int) -> DiagonalMixture:
        return DiagonalMixture(torch.randn(*batch, k) * 2, torch.randn(*batch, k, d) * 3,
                               torch.rand(*batch, k, d) + 0.05)

    cond, uncond = mixture(k_c), mixture(k_u)
    for seed in range(5):
        fused = resampling_cfg_sample(cond, uncond, g, gen(seed))
        reference = unfused_resampling_draw(cond, uncond, g, gen(seed))
        assert fused.shape == (*batch, d)
        assert torch.equal(fused, reference)
