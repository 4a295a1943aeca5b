"""Diagonal Gaussian mixtures and the mixture head (docs/method.md §4)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import stats
from scipy.special import logsumexp

import farmer.mixture as mixture_module
from farmer.mixture import DiagonalMixture, MixtureHead, decoupled_knobs


def make_mixture(logits, means, scales) -> DiagonalMixture:
    return DiagonalMixture(torch.tensor(logits), torch.tensor(means), torch.tensor(scales))


def random_mixture(batch: tuple[int, ...], k: int, d: int, seed: int = 0) -> DiagonalMixture:
    g = torch.Generator().manual_seed(seed)
    return DiagonalMixture(
        torch.randn(*batch, k, generator=g),
        torch.randn(*batch, k, d, generator=g) * 2,
        torch.rand(*batch, k, d, generator=g) + 0.2,
    )


def mixture_moments(mix: DiagonalMixture) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Mean, variance and 4th central moment per channel of an unbatched mixture (analytic)."""
    pi = torch.softmax(mix.logits.double(), -1)[:, None]
    mu, sd = mix.means.double(), mix.scales.double()
    mean = (pi * mu).sum(0)
    a = mu - mean
    var = (pi * (sd**2 + a**2)).sum(0)
    m4 = (pi * (a**4 + 6 * a**2 * sd**2 + 3 * sd**4)).sum(0)
    return mean, var, m4


# Density ---------------------------------------------------------------------------------------------
def test_density_integrates_to_one_1d() -> None:
    mix = make_mixture([0.3, -0.2, 1.0], [[-2.0], [0.5], [3.0]], [[0.5], [1.0], [0.3]])
    x = torch.linspace(-15, 15, 30001)
    mass = torch.trapezoid(mix.log_prob(x[:, None]).exp().double(), x.double())
    assert abs(mass.item() - 1) < 1e-3


def test_density_integrates_to_one_2d() -> None:
    mix = make_mixture([0.0, 0.7], [[-1.0, 2.0], [1.5, -0.5]], [[0.6, 1.2], [1.0, 0.4]])
    x = torch.linspace(-10, 10, 801)
    grid = torch.stack(torch.meshgrid(x, x, indexing="ij"), -1)  # (801, 801, 2)
    density = mix.log_prob(grid).exp().double()
    mass = torch.trapezoid(torch.trapezoid(density, x.double(), dim=1), x.double())
    assert abs(mass.item() - 1) < 1e-3


def test_log_prob_matches_scipy() -> None:
    mix = random_mixture((3, 4), k=5, d=6)
    z = torch.randn(3, 4, 6, generator=torch.Generator().manual_seed(1)) * 2
    comp = stats.norm.logpdf(z.numpy()[..., None, :], mix.means.numpy(), mix.scales.numpy()).sum(-1)
    log_pi = mix.logits.numpy() - logsumexp(mix.logits.numpy(), axis=-1, keepdims=True)
    expected = logsumexp(log_pi + comp, axis=-1)
    np.testing.assert_allclose(mix.log_prob(z).numpy(), expected, rtol=1e-5, atol=1e-4)


def test_single_component_is_an_affine_flow_with_standard_normal_base() -> None:
    # Supplementary §9: with K = 1, log p(z) = log N((z − μ)/σ; 0, I) − Σ log σ.
    mix = random_mixture((7,), k=1, d=4)
    z = torch.randn(7, 4)
    u = (z - mix.means[:, 0]) / mix.scales[:, 0]
    expected = -0.5 * (u**2 + math.log(2 * math.pi)).sum(-1) - mix.scales[:, 0].log().sum(-1)
    torch.testing.assert_close(mix.log_prob(z), expected, rtol=1e-5, atol=1e-5)


def test_log_prob_stays_finite_far_from_every_component() -> None:
    mix = make_mixture([0.0, 0.0], [[0.0], [1.0]], [[0.01], [0.01]])
    lp = mix.log_prob(torch.tensor([[1e3]]))
    assert torch.isfinite(lp).all() and lp.item() < -1e9


def test_log_sum_exp_equals_torch_logsumexp_and_its_gradient_is_the_softmax() -> None:
    g = torch.Generator().manual_seed(3)
    x = (torch.randn(200, 16, generator=g, dtype=torch.float64) * 50).requires_grad_()
    out = mixture_module.log_sum_exp(x)
    torch.testing.assert_close(out, torch.logsumexp(x, dim=-1))
    (grad,) = torch.autograd.grad(out.sum(), x)
    torch.testing.assert_close(grad, torch.softmax(x, dim=-1))
    # Ties at the max, rows of one finite entry, of all −inf, and with a NaN.
    inf, nan = float("inf"), float("nan")
    rows = torch.tensor([[2.0, 2.0, -1.0], [-inf, 3.0, -inf], [-inf, -inf, -inf], [0.0, nan, 1.0]])
    expected = torch.logsumexp(rows, dim=-1)
    torch.testing.assert_close(mixture_module.log_sum_exp(rows), expected, equal_nan=True)


@pytest.mark.parametrize(("a", "b"),
                         [((5, 1, 3), (4, 1)), ((2,), (3,)), ((), (4, 2)), ((3, 1), (3, 1)), ((0, 2), (1,))])
def test_broadcast_shapes_as_torch(a: tuple[int, ...], b: tuple[int, ...]) -> None:
    try:
        expected = torch.broadcast_shapes(a, b)
    except RuntimeError:
        expected = None
    assert mixture_module._broadcast(torch.Size(a), torch.Size(b)) == expected


def test_log_prob_broadcasts_leading_sample_dims() -> None:
    mix = random_mixture((3, 2), k=4, d=5)
    z = torch.randn(6, 3, 2, 5)
    lp = mix.log_prob(z)
    assert lp.shape == (6, 3, 2)
    torch.testing.assert_close(lp, torch.stack([mix.log_prob(zs) for zs in z]))


def direct_log_prob(mix: DiagonalMixture, z: torch.Tensor) -> torch.Tensor:
    """Reference: log p(z) through the (…, K, D) tensor of differences, as the definition reads."""
    offset = torch.log_softmax(mix.logits, -1) - mix.scales.log().sum(-1) - 0.5 * mix.dim * math.log(2 * math.pi)
    squares = ((z.to(mix.means.dtype).unsqueeze(-2) - mix.means) / mix.scales).square().sum(-1)
    return torch.logsumexp(offset - 0.5 * squares, dim=-1)


def as_double(mix: DiagonalMixture) -> DiagonalMixture:
    return DiagonalMixture(mix.logits.double(), mix.means.double(), mix.scales.double())


# (batch shape of the mixture, shape of z): the shared redundant mixture (tokens on a leading sample dim), the
# same laid out as mix[:, None], a guidance pool against a cond/null pair, and per-token mixtures.
SHAPES = {
    "shared": ((3,), (7, 3)),
    "shared_as_batch": ((3, 1), (3, 7)),
    "pool": ((2, 3), (5, 1, 3)),
    "per_token": ((3, 7), (3, 7)),
}


def tight_mixture(batch: tuple[int, ...], k: int, d: int, z_shape: tuple[int, ...], seed: int = 0
                  ) -> tuple[DiagonalMixture, torch.Tensor]:
    """Spread means with stds in [1e-3, 2e-3) (the head's floor, FarmerConfig.min_mixture_scale), and values
    within a few stds of one of the components: where Σ z²/σ² and Σ μ²/σ² are ~1e6 · D and cancel."""
    g = torch.Generator().manual_seed(seed)
    mix = DiagonalMixture(torch.randn(*batch, k, generator=g), torch.randn(*batch, k, d, generator=g) * 3,
                          1e-3 * (1 + torch.rand(*batch, k, d, generator=g)))
    shape = torch.broadcast_shapes(z_shape, batch)
    pick = torch.randint(k, shape, generator=g)[..., None, None].expand(*shape, 1, d)
    near = lambda t: t.expand(*shape, k, d).gather(-2, pick).squeeze(-2)  # noqa: E731
    z = near(mix.means) + near(mix.scales) * torch.randn(*shape, d, generator=g) * 2
    # Where z has a size-1 dim against a mixture dim (a pool scored under a cond/null pair), keep the first.
    return mix, z[tuple(slice(0, 1) if size == 1 else slice(None) for size in z_shape)]


@pytest.mark.parametrize("shape", SHAPES)
def test_log_prob_equals_direct_form_in_fp64(shape: str) -> None:
    batch, z_shape = SHAPES[shape]
    mix = as_double(random_mixture(batch, k=5, d=6))
    z = torch.randn(*z_shape, 6, generator=torch.Generator().manual_seed(1), dtype=torch.float64) * 3
    lp = mix.log_prob(z)
    assert lp.dtype == torch.float64
    torch.testing.assert_close(lp, direct_log_prob(mix, z), rtol=1e-13, atol=1e-12)


@pytest.mark.parametrize("shape", ["shared", "pool", "per_token"])
def test_log_prob_near_a_tight_component_in_fp32(shape: str) -> None:
    # The expansion in fp32 would be off by ~100 nats here (Σ z²/σ² ≈ 1e9 at D = 640); formed in fp64 and
    # rounded once, the fp32 result is as close to the exact value as fp32 allows.
    batch, z_shape = SHAPES[shape]
    mix, z = tight_mixture(batch, k=8, d=640, z_shape=z_shape)
    expected = direct_log_prob(as_double(mix), z.double())
    lp = mix.log_prob(z)
    assert lp.dtype == torch.float32
    torch.testing.assert_close(lp.double(), expected, rtol=3e-7, atol=0)
    squares = mixture_module._squared_distances(z, mix.means, mix.scales).double()
    exact = mixture_module._squared_distances(z.double(), mix.means.double(), mix.scales.double())
    torch.testing.assert_close(squares, exact, rtol=1.2e-7, atol=0)  # one fp32 rounding
    assert exact.amin() < 10 * 640  # values within a few stds of a component, as intended


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_log_prob_far_from_every_component(dtype: torch.dtype) -> None:
    mix = random_mixture((3,), k=5, d=16).tempered(std_scale=0.01)
    mix = as_double(mix) if dtype == torch.float64 else mix
    z = torch.randn(4, 3, 16, generator=torch.Generator().manual_seed(2), dtype=dtype) * 1e3
    lp = mix.log_prob(z)
    assert torch.isfinite(lp).all() and lp.max() < -1e8
    torch.testing.assert_close(lp.double(), direct_log_prob(as_double(mix), z.double()), rtol=1e-6, atol=0)


@pytest.mark.parametrize("shape", SHAPES)
def test_log_prob_gradients_equal_direct_form_in_fp64(shape: str) -> None:
    batch, z_shape = SHAPES[shape]
    g = torch.Generator().manual_seed(3)
    base = as_double(random_mixture(batch, k=4, d=5, seed=4))
    params = [t.clone().requires_grad_() for t in (base.logits, base.means, base.scales)]
    z = (torch.randn(*z_shape, 5, generator=g, dtype=torch.float64) * 2).requires_grad_()
    mix = DiagonalMixture(*params)
    weights = torch.randn(torch.broadcast_shapes(z_shape, batch), generator=g, dtype=torch.float64)
    grads = torch.autograd.grad((mix.log_prob(z) * weights).sum(), [z, *params])
    expected = torch.autograd.grad((direct_log_prob(mix, z) * weights).sum(), [z, *params])
    for name, got, want in zip(("z", "logits", "means", "scales"), grads, expected, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-11, atol=1e-11, msg=lambda m, name=name: f"{name}: {m}")


def test_squared_distances_gradients_equal_direct_form_on_per_token_shapes() -> None:
    # log_prob of per-token mixtures differences directly; the expansion must still hold on those shapes.
    g = torch.Generator().manual_seed(5)
    z = torch.randn(3, 7, 6, generator=g, dtype=torch.float64).requires_grad_()
    means = torch.randn(3, 7, 4, 6, generator=g, dtype=torch.float64).requires_grad_()
    scales = (torch.rand(3, 7, 4, 6, generator=g, dtype=torch.float64) + 0.1).requires_grad_()
    weights = torch.randn(3, 7, 4, generator=g, dtype=torch.float64)
    got = mixture_module._squared_distances(z, means, scales)
    want = ((z.unsqueeze(-2) - means) / scales).square().sum(-1)
    torch.testing.assert_close(got, want, rtol=1e-13, atol=1e-12)
    for a, b in zip(torch.autograd.grad((got * weights).sum(), [z, means, scales]),
                    torch.autograd.grad((want * weights).sum(), [z, means, scales]), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-11, atol=1e-11)


@pytest.mark.parametrize(("shape", "k", "expanded"), [
    ("shared", 64, True), ("pool", 64, True), ("per_token", 64, False), ("shared", 2, False), ("pool", 2, False),
])
def test_log_prob_expands_only_where_values_broadcast_over_mixtures_at_size(
        shape: str, k: int, expanded: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    # The memory fix itself: a mixture shared by many values must not go through a large (values, K, D) tensor of
    # differences; small ones (a per-token guidance pool) are faster formed directly (mixture._DIRECT_ELEMENTS).
    calls = []
    original = mixture_module._squared_distances
    monkeypatch.setattr(mixture_module, "_squared_distances", lambda *a: calls.append(1) or original(*a))
    batch, z_shape = SHAPES[shape]
    random_mixture(batch, k=k, d=64).log_prob(torch.zeros(*z_shape, 64))
    assert bool(calls) == expanded


def test_fp64_parameters_keep_the_mixture_in_fp64() -> None:
    mix = DiagonalMixture(torch.zeros(2), torch.zeros(2, 3, dtype=torch.float64), torch.ones(2, 3))
    assert mix.logits.dtype == mix.means.dtype == mix.scales.dtype == torch.float64
    assert mix.log_prob(torch.zeros(4, 3)).dtype == torch.float64


def test_log_prob_of_tokens_sharing_one_mixture() -> None:
    # The shared redundant mixture: batch (B,) scored on tokens laid out (N, B, D) or via expand_tokens.
    mix = random_mixture((2,), k=3, d=4)
    tokens = torch.randn(2, 5, 4)  # (B, N, D)
    per_token = mix.expand_tokens(5).log_prob(tokens)
    assert per_token.shape == (2, 5)
    torch.testing.assert_close(per_token, mix.log_prob(tokens.transpose(0, 1)).T)
    torch.testing.assert_close(per_token, mix[:, None].log_prob(tokens))


# Sampling --------------------------------------------------------------------------------------------
def test_samples_match_analytic_mean_and_variance() -> None:
    mix = make_mixture(
        [0.2, -0.5, 0.9], [[-3.0, 1.0], [0.0, 0.0], [2.0, -2.0]], [[0.5, 1.0], [1.5, 0.3], [0.7, 0.8]]
    )
    n = 200_000
    x = mix.sample((n,), torch.Generator().manual_seed(0)).double()
    mean, var, m4 = mixture_moments(mix)
    # 5 standard errors: SE(mean) = sqrt(var/n), SE(var) ≈ sqrt((μ4 − var²)/n).
    assert ((x.mean(0) - mean).abs() < 5 * (var / n).sqrt()).all()
    assert ((x.var(0) - var).abs() < 5 * ((m4 - var**2) / n).sqrt()).all()


def test_sample_shapes_and_determinism() -> None:
    mix = random_mixture((4, 3), k=2, d=5)
    assert mix.sample().shape == (4, 3, 5)
    assert mix.sample((7,)).shape == (7, 4, 3, 5)
    assert mix.sample((2, 6)).shape == (2, 6, 4, 3, 5)
    assert mix.sample((0,)).shape == (0, 4, 3, 5)
    a = mix.sample((3,), torch.Generator().manual_seed(5))
    b = mix.sample((3,), torch.Generator().manual_seed(5))
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    unbatched = random_mixture((), k=3, d=2)
    assert unbatched.sample((9,)).shape == (9, 2)


def test_sample_picks_components_by_softmax_weights() -> None:
    # Well-separated components: the nearest mean identifies the component of each draw.
    logits = torch.tensor([1.0, 0.0, -1.0])
    mix = DiagonalMixture(logits, torch.tensor([[0.0], [100.0], [200.0]]), torch.ones(3, 1))
    n = 60_000
    x = mix.sample((n,), torch.Generator().manual_seed(1))[:, 0]
    freq = torch.bincount((x / 100).round().long(), minlength=3).double() / n
    p = torch.softmax(logits.double(), 0)
    assert ((freq - p).abs() < 5 * (p * (1 - p) / n).sqrt()).all()


def test_samples_are_drawn_per_batch_element() -> None:
    mix = DiagonalMixture(torch.zeros(2, 1), torch.tensor([[[-50.0]], [[50.0]]]), torch.ones(2, 1, 1))
    x = mix.sample((1000,), torch.Generator().manual_seed(2))
    assert (x[:, 0] < -40).all() and (x[:, 1] > 40).all()


def test_sample_from_expanded_mixture_without_copy() -> None:
    mix = random_mixture((2,), k=3, d=4)
    shared = mix.expand_tokens(6)
    assert shared.means.data_ptr() == mix.means.data_ptr()  # a view
    x = shared.sample((5,), torch.Generator().manual_seed(0))
    assert x.shape == (5, 2, 6, 4) and torch.isfinite(x).all()


def test_gumbel_max_picks_match_softmax_chi_square() -> None:
    # Gumbel-max: argmax(logits + G) ~ softmax(logits). Pearson's chi-square over 8 components, one row of
    # logits per batch element; a draw from the wrong weights (e.g. softmax(2·logits)) fails it at p ≪ 1e-3.
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 8, generator=generator) * 1.5
    n = 40_000
    picks = mixture_module.pick_components(logits, mixture_module.gumbel_noise((n, 3, 8), generator))
    expected = torch.softmax(logits.double(), -1) * n
    for row in range(3):
        counts = torch.bincount(picks[:, row], minlength=8).double()
        assert stats.chisquare(counts.numpy(), expected[row].numpy()).pvalue > 1e-3
    wrong = torch.softmax(2 * logits.double(), -1) * n
    counts = torch.bincount(picks[:, 0], minlength=8).double()
    assert stats.chisquare(counts.numpy(), wrong[0].numpy() * counts.sum().item() / n).pvalue < 1e-6


def test_sample_with_is_the_picked_component_shifted_by_its_scale() -> None:
    mix = random_mixture((2, 3), k=4, d=5)
    generator = torch.Generator().manual_seed(1)
    gumbel, eps = mixture_module.gumbel_noise((6, 2, 3, 4), generator), torch.randn(6, 2, 3, 5, generator=generator)
    x = mix.sample_with(gumbel, eps)
    k = (mix.logits + gumbel).argmax(-1)  # (6, 2, 3)
    for s, b, t in np.ndindex(6, 2, 3):
        c = k[s, b, t]
        torch.testing.assert_close(x[s, b, t], mix.means[b, t, c] + mix.scales[b, t, c] * eps[s, b, t])
    with pytest.raises(ValueError, match="noise"):
        mix.sample_with(gumbel[..., :3], eps)


def test_head_sample_with_equals_its_mixture_sample_with() -> None:
    # The AR sampling loop draws straight from the head's output; it must be the mixture's own draw.
    torch.manual_seed(0)
    head = MixtureHead(width=16, dim=3, components=6)
    with torch.no_grad():
        head.proj.weight.normal_()
    generator = torch.Generator().manual_seed(2)
    h = torch.randn(7, 16, generator=generator)
    gumbel, eps = mixture_module.gumbel_noise((7, 6), generator), torch.randn(7, 3, generator=generator)
    torch.testing.assert_close(head.sample_with(h, gumbel, eps), head(h).sample_with(gumbel, eps),
                               rtol=1e-6, atol=1e-6)  # softplus may round 1 ulp apart on different sizes


# Temperatures ----------------------------------------------------------------------------------------
def test_large_weight_temperature_gives_uniform_weights() -> None:
    logits = torch.tensor([4.0, 0.0, -4.0])
    mix = DiagonalMixture(logits, torch.tensor([[0.0], [100.0], [200.0]]), torch.ones(3, 1))
    hot = mix.tempered(weight_temperature=1e6)
    torch.testing.assert_close(torch.softmax(hot.logits, -1), torch.full((3,), 1 / 3))
    n = 30_000
    x = hot.sample((n,), torch.Generator().manual_seed(3))[:, 0]
    freq = torch.bincount((x / 100).round().long(), minlength=3).double() / n
    assert ((freq - 1 / 3).abs() < 5 * math.sqrt(2 / 9 / n)).all()
    # T < 1 sharpens: almost all mass on the largest logit.
    assert torch.softmax(mix.tempered(weight_temperature=0.1).logits, -1)[0] > 0.999


def test_std_scale_and_decoupled_variance_scale() -> None:
    mix = DiagonalMixture(torch.zeros(1), torch.zeros(1, 1), torch.full((1, 1), 2.0))  # var 4
    n = 100_000
    se = math.sqrt(2 / n)  # relative SE of a Gaussian sample variance
    x = mix.tempered(std_scale=0.5).sample((n,), torch.Generator().manual_seed(4))
    assert abs(x.var().item() / 1.0 - 1) < 5 * se  # std × 0.5 -> var × 0.25
    # Decoupled sampling (supplementary §7): s multiplies the VARIANCE, T divides the logits.
    y = mix.tempered(*decoupled_knobs(variance_scale=0.5, temperature=1.3))
    y = y.sample((n,), torch.Generator().manual_seed(5))
    assert abs(y.var().item() / 2.0 - 1) < 5 * se
    wide = random_mixture((2,), k=3, d=2)
    dec = wide.tempered(*decoupled_knobs(variance_scale=0.81, temperature=1.3))
    torch.testing.assert_close(dec.logits, wide.logits / 1.3)
    torch.testing.assert_close(dec.scales, wide.scales * 0.9)
    torch.testing.assert_close(dec.means, wide.means)


# Batch manipulation ----------------------------------------------------------------------------------
def test_indexing_chunk_and_expand_act_on_batch_dims() -> None:
    mix = random_mixture((4, 3), k=2, d=5)
    z = torch.randn(4, 3, 5)
    full = mix.log_prob(z)
    torch.testing.assert_close(mix[1].log_prob(z[1]), full[1])
    torch.testing.assert_close(mix[:, 2].log_prob(z[:, 2]), full[:, 2])
    torch.testing.assert_close(mix[torch.tensor([3, 0])].log_prob(z[[3, 0]]), full[[3, 0]])
    first, second = mix.chunk(2)
    assert first.batch_shape == second.batch_shape == (2, 3)
    torch.testing.assert_close(second.log_prob(z[2:]), full[2:])
    assert [m.batch_shape[1] for m in mix.chunk(3, dim=-1)] == [1, 1, 1]
    assert mix.expand_tokens(7).batch_shape == (4, 3, 7)


# Head ------------------------------------------------------------------------------------------------
def test_head_initial_mixture_ignores_input_has_unit_std_and_distinct_means() -> None:
    torch.manual_seed(0)
    head = MixtureHead(width=16, dim=3, components=4, min_scale=1e-3)
    a, b = head(torch.randn(5, 16)), head(torch.randn(5, 16) * 10)
    for name in ("logits", "means", "scales"):
        torch.testing.assert_close(getattr(a, name), getattr(b, name), rtol=0, atol=0)
    torch.testing.assert_close(a.scales, torch.ones(5, 4, 3), rtol=0, atol=1e-6)
    torch.testing.assert_close(a.logits, torch.zeros(5, 4), rtol=0, atol=0)
    means = a.means[0]  # (K, D)
    assert torch.cdist(means, means).add(torch.eye(4) * 1e9).min() > 1e-3


def test_head_output_layout_and_scale_floor() -> None:
    k, d = 2, 3
    head = MixtureHead(width=4, dim=d, components=k, min_scale=0.05)
    with torch.no_grad():
        head.proj.bias.copy_(torch.arange(k * (2 * d + 1), dtype=torch.float32))
        head.proj.bias[k + k * d :] = -1e4  # raw scale -> -inf: scale hits the floor
    mix = head(torch.zeros(4))
    torch.testing.assert_close(mix.logits, torch.tensor([0.0, 1.0]))
    torch.testing.assert_close(mix.means, torch.arange(k, k + k * d, dtype=torch.float32).view(k, d))
    torch.testing.assert_close(mix.scales, torch.full((k, d), 0.05))


def test_head_gradients_reach_weight_and_bias() -> None:
    head = MixtureHead(width=8, dim=2, components=3)
    h = torch.randn(6, 8, requires_grad=True)
    loss = -head(h).log_prob(torch.randn(6, 2)).mean()
    loss.backward()
    assert head.proj.weight.grad.abs().sum() > 0
    assert head.proj.bias.grad.abs().sum() > 0
    assert h.grad is not None and torch.isfinite(h.grad).all()
    # Distinct means: the components' mean gradients differ, so they can separate.
    gm = head.proj.bias.grad[3 : 3 + 6].view(3, 2)
    assert torch.cdist(gm, gm).add(torch.eye(3) * 1e9).min() > 0


def test_head_is_fp32_under_bf16_autocast() -> None:
    head = MixtureHead(width=8, dim=2, components=3)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mix = head(torch.randn(4, 8).bfloat16())
        lp = mix.log_prob(torch.randn(4, 2).bfloat16())
    assert mix.logits.dtype == mix.means.dtype == mix.scales.dtype == torch.float32
    assert lp.dtype == torch.float32
    # Constructor casts half-precision parameters up as well.
    half = DiagonalMixture(torch.zeros(2, dtype=torch.bfloat16), torch.zeros(2, 1), torch.ones(2, 1))
    assert half.logits.dtype == torch.float32


# Bad input -------------------------------------------------------------------------------------------
def test_bad_inputs_raise() -> None:
    with pytest.raises(ValueError, match="means"):
        DiagonalMixture(torch.zeros(3), torch.zeros(4, 2), torch.ones(4, 2))
    with pytest.raises(ValueError, match="scales"):
        DiagonalMixture(torch.zeros(3), torch.zeros(3, 2), torch.ones(3, 3))
    with pytest.raises(ValueError, match="floating"):
        DiagonalMixture(torch.zeros(3, dtype=torch.long), torch.zeros(3, 2), torch.ones(3, 2))
    with pytest.raises(ValueError, match="scalar"):
        DiagonalMixture(torch.tensor(0.0), torch.zeros(1), torch.ones(1))
    with pytest.raises(TypeError):
        DiagonalMixture([0.0], torch.zeros(1, 1), torch.ones(1, 1))
    mix = random_mixture((4,), k=2, d=3)
    with pytest.raises(ValueError, match="D=3"):
        mix.log_prob(torch.zeros(4, 2))
    with pytest.raises(ValueError, match="broadcast"):
        mix.log_prob(torch.zeros(5, 3))
    with pytest.raises(ValueError, match="weight_temperature"):
        mix.tempered(weight_temperature=0.0)
    with pytest.raises(ValueError, match="std_scale"):
        mix.tempered(std_scale=-1.0)
    with pytest.raises(ValueError, match="variance_scale"):
        decoupled_knobs(variance_scale=float("nan"))
    with pytest.raises(ValueError, match="sample_shape"):
        mix.sample((-1,))
    with pytest.raises(IndexError, match="Ellipsis"):
        mix[..., 0]
    with pytest.raises(IndexError, match="batch shape"):
        mix[0, 1]
    with pytest.raises(ValueError, match="batch dim"):
        mix.chunk(2, dim=1)
    with pytest.raises(ValueError, match="width"):
        MixtureHead(width=0, dim=2, components=2)
    with pytest.raises(ValueError, match="min_scale"):
        MixtureHead(width=4, dim=2, components=2, min_scale=1.0)
    with pytest.raises(ValueError, match=r"\(\*batch, 8\)"):
        MixtureHead(width=8, dim=2, components=2)(torch.zeros(3, 7))
