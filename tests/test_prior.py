"""The AR prior (docs/method.md §3–4): causality, cached == uncached, shared redundant mixture, sampling."""

import math

import pytest
import torch
from helpers import randomize, small_config

from farmer.guidance import ResamplingGuidance
from farmer.mixture import decoupled_knobs
from farmer.prior import ARPrior


def random_prior(seed: int = 0, **changes: object) -> ARPrior:
    torch.manual_seed(seed)
    return randomize(ARPrior(small_config(**changes)), 0.1, seed).eval()


def latents(prior: ARPrior, batch: int = 2, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    n = prior.num_tokens
    return (torch.randn(batch, n, prior.informative_dim, generator=generator),
            torch.randn(batch, n, prior.redundant_dim, generator=generator))


def test_prior_is_causal_over_informative_tokens() -> None:
    prior = random_prior()
    zi, _ = latents(prior, batch=1)
    labels = torch.tensor([3])
    base, base_red = prior(zi, labels)
    for j in range(prior.num_tokens):
        perturbed = zi.clone()
        perturbed[:, j] += 1.0
        mix, red = prior(perturbed, labels)
        changed = (mix.means - base.means).abs().amax(dim=(0, 2, 3)) > 1e-6
        # G_i predicts token i from tokens < i: mixtures of tokens 0..j must not move
        assert not changed[: j + 1].any(), f"perturbing token {j} changed an earlier prediction"
        if j + 1 < prior.num_tokens:
            assert changed[j + 1], "the next token's mixture must depend on token j"
        # the shared redundant mixture sees every informative token
        assert (red.means - base_red.means).abs().max() > 1e-6


def test_class_condition_reaches_every_prediction() -> None:
    prior = random_prior()
    zi, _ = latents(prior, batch=1)
    a, ra = prior(zi, torch.tensor([1]))
    b, rb = prior(zi, torch.tensor([2]))
    assert ((a.means - b.means).abs().amax(dim=(0, 2, 3)) > 1e-6).all()
    assert (ra.means - rb.means).abs().max() > 1e-6


def test_cached_pass_equals_parallel_pass() -> None:
    prior = random_prior(prior_layers=2)
    zi, _ = latents(prior, batch=2)
    labels = torch.tensor([0, 7])
    parallel, parallel_red = prior(zi, labels)
    cache = prior.transformer.allocate_cache(2, zi.device, torch.float32)
    decoder = prior.transformer.decoder(prior.proj_in, prior.pos)  # the one-token steps sampling runs
    h = prior.transformer(prior._condition(labels), causal=True, cache=cache)[:, -1]
    for i in range(prior.num_tokens):
        step = prior.informative_head(h)
        torch.testing.assert_close(step.means, parallel.means[:, i], atol=1e-5, rtol=0)
        torch.testing.assert_close(step.logits, parallel.logits[:, i], atol=1e-5, rtol=0)
        h = decoder.embed_step(zi[:, i], prior.repeat + i, cache)
    torch.testing.assert_close(prior.redundant_head(h).scales, parallel_red.scales, atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="go together"):
        prior.transformer.decoder(prior.proj_in)
    with pytest.raises(ValueError, match="without an embedding"):
        prior.transformer.decoder().embed_step(zi[:, 0], 0, cache)


@pytest.mark.parametrize("redundant_mixture", ["shared", "per_token"])
def test_log_prob_is_chain_rule(redundant_mixture: str) -> None:
    """Π_i P(z_i^I | z_{<i}^I, c) times one shared P(z_i^R | Z^I, c), or per token P(z_i^R | z_{≤i}^I, c)."""
    prior = random_prior(redundant_mixture=redundant_mixture)
    zi, zr = latents(prior)
    labels = torch.tensor([1, 2])
    mix, red = prior(zi, labels)
    expected = torch.zeros(2)
    for b in range(2):
        for i in range(prior.num_tokens):
            redundant = red[b, i] if redundant_mixture == "per_token" else red[b]
            expected[b] += mix[b, i].log_prob(zi[b, i]) + redundant.log_prob(zr[b, i])
    torch.testing.assert_close(prior.log_prob(zi, zr, labels), expected, atol=1e-4, rtol=1e-5)


def _reference_sample(prior: ARPrior, labels: torch.Tensor, seed: int, variance_scale: float = 1.0,
                      temperature: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Token by token without a cache: rerun the whole sequence each step and draw each token from the
    decoupled mixture (supplementary §7) with the noise the sampler draws up front."""
    noise = prior.sampling_noise(labels.shape[0], torch.Generator().manual_seed(seed))
    knobs = decoupled_knobs(variance_scale, temperature)
    zi = torch.zeros(labels.shape[0], prior.num_tokens, prior.informative_dim)
    for i in range(prior.num_tokens):
        mix, _ = prior(zi, labels)
        zi[:, i] = mix[:, i].tempered(*knobs).sample_with(*noise.informative(i))
    _, red = prior(zi, labels)
    zr = red.tempered(*knobs).sample_with(noise.redundant_gumbel, noise.redundant_eps)
    return zi, zr.transpose(0, 1)


@pytest.mark.parametrize("variance_scale, temperature", [(1.0, 1.0), (0.5, 2.0)])
def test_cached_sampling_equals_uncached_reference(variance_scale: float, temperature: float) -> None:
    prior = random_prior()
    labels = torch.tensor([0, 5, 9])
    zi, zr = prior.sample(labels, torch.Generator().manual_seed(4), variance_scale=variance_scale,
                          temperature=temperature)
    ref_i, ref_r = _reference_sample(prior, labels, 4, variance_scale, temperature)
    torch.testing.assert_close(zi, ref_i, atol=1e-5, rtol=0)
    torch.testing.assert_close(zr, ref_r, atol=1e-5, rtol=0)


def test_sampling_noise_is_tempered_standard_noise() -> None:
    # T·G for standard Gumbel G (mean T·γ, variance T²π²/6) and √s·ε: the decoupled knobs act on the noise.
    prior = random_prior()
    noise = prior.sampling_noise(4000, torch.Generator().manual_seed(0), variance_scale=0.25, temperature=2.0)
    gumbel, eps = noise.informative_gumbel.double(), noise.informative_eps.double()
    assert abs(gumbel.mean().item() - 2.0 * 0.5772) < 0.02
    assert abs(gumbel.var().item() - 4.0 * math.pi**2 / 6) < 0.1
    assert abs(eps.std().item() - 0.5) < 0.005


def test_guided_sampling_is_seeded_and_finite() -> None:
    prior = random_prior()
    labels = torch.tensor([0, 5])
    g = ResamplingGuidance(scale=10.0, proposal_weight_temperature=3.0)
    a = prior.sample(labels, torch.Generator().manual_seed(1), guidance=g)
    b = prior.sample(labels, torch.Generator().manual_seed(1), guidance=g)
    for x, y in zip(a, b, strict=True):
        assert torch.equal(x, y) and torch.isfinite(x).all()


def test_per_token_redundant_mixture_sees_its_own_and_earlier_informative_tokens_only() -> None:
    prior = random_prior(redundant_mixture="per_token")
    zi, _ = latents(prior, batch=1)
    labels = torch.tensor([3])
    _, base = prior(zi, labels)
    assert base.batch_shape == (1, prior.num_tokens)
    for j in range(prior.num_tokens):
        perturbed = zi.clone()
        perturbed[:, j] += 1.0
        _, red = prior(perturbed, labels)
        changed = (red.means - base.means).abs().amax(dim=(0, 2, 3)) > 1e-6
        # P(z_i^R | z_{≤i}^I, c): perturbing z_j^I moves the mixtures of tokens j, j+1, … and no earlier one
        assert not changed[:j].any(), f"z_{j}^I changed the redundant mixture of an earlier token"
        assert changed[j:].all()


def test_per_token_cached_sampling_equals_uncached_reference() -> None:
    prior = random_prior(redundant_mixture="per_token")
    labels = torch.tensor([0, 5, 9])
    zi, zr = prior.sample(labels, torch.Generator().manual_seed(4))
    # Reference: rerun the whole sequence each step; draw z_i^I, then z_i^R, with the sampler's noise.
    noise = prior.sampling_noise(labels.shape[0], torch.Generator().manual_seed(4))
    ref_i = torch.zeros_like(zi)
    ref_r = torch.zeros_like(zr)
    for i in range(prior.num_tokens):
        mix, _ = prior(ref_i, labels)
        ref_i[:, i] = mix[:, i].sample_with(*noise.informative(i))
        _, red = prior(ref_i, labels)
        ref_r[:, i] = red[:, i].sample_with(*noise.redundant(i))
    torch.testing.assert_close(zi, ref_i, atol=1e-5, rtol=0)
    torch.testing.assert_close(zr, ref_r, atol=1e-5, rtol=0)
    assert zr.abs().sum() > 0
