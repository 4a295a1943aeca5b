"""Farmer end to end (docs/method.md §1, §5): likelihood units, K = 1 equivalence, learning, input checks."""

import math

import pytest
import torch
from helpers import random_images, random_model, randomize, small_config

from farmer import Farmer, FarmerConfig
from farmer.data import ArrayDataset, load_arrays
from farmer.evaluation import blank_patches, bpd_breakdown, dequantized_log_prob, evaluate_bpd
from farmer.pixels import pixels_to_model


def test_patchify_round_trip_and_layout() -> None:
    model = Farmer(small_config(image_size=12, channels=3, patch_size=4))
    x = random_images(model.config, 2)
    tokens = model.patchify(x)
    assert tokens.shape == (2, 9, 48)
    torch.testing.assert_close(model.unpatchify(tokens), x, rtol=0, atol=0)
    # token 1 is the top-middle patch: its first channel is pixel (row 0, col 4) of channel 0
    assert tokens[0, 1, 0] == x[0, 0, 0, 4]


@pytest.mark.parametrize("changes", [
    {}, {"final_permute": False}, {"condition_repeat": 1}, {"informative_channels": None},
    {"prior": "normal"}, {"num_classes": 0},
    {"patch_transform": "dct", "channel_mixing": True, "redundant_mixture": "per_token"}, {"logit_alpha": 0.05},
], ids=["default", "no-final-permute", "no-repeat", "no-dim-reduction", "normal-prior", "unconditional",
        "dct-mixing-per-token", "logit"])
def test_log_prob_matches_decoded_latents_and_sampling_inverts(changes: dict) -> None:
    config = small_config(**changes)
    model = random_model(config)
    x = random_images(config, 3)
    y = torch.tensor([1, 2, 3]) if config.conditional else None
    log_p = model.log_prob(x, y)
    assert log_p.shape == (3,) and torch.isfinite(log_p).all()
    zi, zr, _ = model.encode(x)
    assert zi.shape[-1] == config.informative_dim and zr.shape[-1] == config.redundant_dim
    torch.testing.assert_close(model.decode(zi, zr), x, atol=1e-5, rtol=0)
    images = model.sample(4, None if y is None else torch.tensor([0, 1, 2, 3]), torch.Generator().manual_seed(0))
    assert images.shape == (4, config.channels, config.image_size, config.image_size)
    assert images.min() >= -1 and images.max() <= 1


@pytest.mark.parametrize("changes", [
    {}, {"final_permute": False}, {"prior": "normal"}, {"num_classes": 0},
    {"channel_mixing": True, "redundant_mixture": "per_token"}, {"informative_channels": None},
    {"logit_alpha": 1e-6, "patch_transform": "dct"},
], ids=["default", "no-final-permute", "normal-prior", "unconditional", "mixing-per-token", "no-dim-reduction",
        "logit-dct"])
def test_log_prob_terms_add_up_to_log_prob(changes: dict) -> None:
    config = small_config(**changes)
    model = random_model(config)
    x = random_images(config, 3)
    y = torch.tensor([1, 2, 3]) if config.conditional else None
    terms = model.log_prob_terms(x, y)
    assert all(t.shape == (3, config.num_tokens) for t in terms)
    torch.testing.assert_close(terms.total(), model.log_prob(x, y), rtol=1e-5, atol=1e-3)
    _, _, logdet = model.encode(x)
    torch.testing.assert_close(terms.flow_logdet.sum(dim=1), logdet, rtol=1e-5, atol=1e-3)
    if config.redundant_dim == 0 or config.prior == "normal":
        assert (terms.redundant == 0).all()


@pytest.mark.parametrize("final_permute", [True, False])
def test_log_prob_terms_are_in_patch_order(final_permute: bool) -> None:
    """Identity flow (new blocks) and a random prior: changing patch j changes its own prior factor and those of
    the tokens after it in the prior's order, which with the final permute (reversed) are the patches before j."""
    config = small_config(final_permute=final_permute)  # 8 × 8 images, a 4 × 4 grid of 2 × 2 patches
    model = Farmer(config).eval()
    randomize(model.prior, 0.1)
    x = random_images(config, 1)
    changed = x.clone()
    changed[..., 2:4, 2:4] = -changed[..., 2:4, 2:4]  # patch j = 5: row 1, column 1 of the grid
    before, after = model.log_prob_terms(x), model.log_prob_terms(changed)
    assert (before.flow_logdet == 0).all()
    moved = ((before.informative - after.informative).abs() > 1e-6)[0]
    expected = torch.arange(config.num_tokens) <= 5 if final_permute else torch.arange(config.num_tokens) >= 5
    assert torch.equal(moved, expected), moved


def test_loss_is_nats_per_dimension() -> None:
    model = random_model()
    x = random_images(model.config, 4)
    y = torch.tensor([0, 1, 2, 3])
    loss, nll = model(x, y)  # eval mode: no label dropout
    torch.testing.assert_close(nll, -model.log_prob(x, y))
    torch.testing.assert_close(loss, nll.mean() / model.config.num_dims)


def test_label_dropout_uses_the_null_class_in_training_only() -> None:
    model = random_model(small_config(label_dropout=0.5))
    x = random_images(model.config, 64)
    y = torch.randint(0, 10, (64,), generator=torch.Generator().manual_seed(0))
    cond, null = model.log_prob(x, y), model.log_prob(x)
    model.train()
    torch.manual_seed(0)
    _, nll = model(x, y)
    dropped = torch.isclose(-nll, null, atol=1e-5) & ~torch.isclose(-nll, cond, atol=1e-5)
    kept = torch.isclose(-nll, cond, atol=1e-5)
    assert (dropped | kept).all() and 16 <= dropped.sum() <= 48


def test_k1_farmer_equals_flow_with_one_more_affine_block() -> None:
    """Supplementary §9: with one mixture component the AR is one more affine AF block with N(0, I) base."""
    config = small_config(informative_components=1, informative_channels=None, num_classes=0, condition_repeat=1)
    model = random_model(config)
    x = random_images(config, 3)
    labels = torch.full((3,), config.num_classes)
    z, _, flow_logdet = model.encode(x)

    def extra_block(z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """z_i -> (z_i − μ(z_<i)) / σ(z_<i): the K = 1 prior read as an autoregressive affine flow block."""
        mix, _ = model.prior(z, labels)
        mu, sigma = mix.means[..., 0, :], mix.scales[..., 0, :]
        return (z - mu) / sigma, -sigma.log().sum(dim=(1, 2))

    u, extra_logdet = extra_block(z)
    standard_normal = -0.5 * (u.pow(2) + math.log(2 * math.pi)).sum(dim=(1, 2))
    flow_with_extra_block = standard_normal + extra_logdet + flow_logdet
    torch.testing.assert_close(model.log_prob(x), flow_with_extra_block, atol=1e-4, rtol=1e-6)
    # ... and that block is invertible token by token, as an AF block must be
    recovered = torch.zeros_like(z)
    for i in range(config.num_tokens):
        mix, _ = model.prior(recovered, labels)
        recovered[:, i] = u[:, i] * mix.scales[:, i, 0] + mix.means[:, i, 0]
    torch.testing.assert_close(recovered, z, atol=1e-5, rtol=0)


def test_bits_per_dim_equals_analytic_value_on_known_density() -> None:
    """Identity flow (zero-initialised blocks) + N(0, I) prior: the density is exactly Gaussian, so the
    expected bits/dim of uniformly dequantised 8-bit data has a closed form."""
    config = small_config(prior="normal")
    model = Farmer(config).eval()
    generator = torch.Generator().manual_seed(0)
    pixels = torch.randint(0, 256, (256, 1, 8, 8), generator=generator, dtype=torch.uint8)
    dataset = ArrayDataset(pixels.numpy(), torch.zeros(256, dtype=torch.long).numpy())
    a = pixels.double() / 128 - 1  # bin lower edge; x = a + u, u ~ U(0, 1/128)
    second_moment = a**2 + a / 128 + 1 / (3 * 128**2)
    nats_per_dim = (0.5 * second_moment + 0.5 * math.log(2 * math.pi)).mean().item()
    expected = nats_per_dim / math.log(2) + 7
    measured = evaluate_bpd(model, dataset, batch_size=64)
    assert abs(measured - expected) < 2e-3, (measured, expected)
    # The density is flat across a bin here (σ = 1 against a 1/128 bin), so the importance-weighted bound agrees.
    assert abs(evaluate_bpd(model, dataset, batch_size=64, importance_samples=4) - expected) < 2e-3
    # The breakdown: the same number, all of it the prior's (informative: every channel), none the flow's.
    split = bpd_breakdown(model, dataset, batch_size=64)
    assert abs(split["bits_per_dim"] - measured) < 1e-5
    assert abs(split["informative_bits_per_dim"] - (expected - 7)) < 2e-3
    assert split["redundant_bits_per_dim"] == 0 and split["flow_bits_per_dim"] == 0
    per_patch = torch.tensor(split["patch_bits_per_dim"])
    assert per_patch.shape == (4, 4) and abs(per_patch.mean().item() - measured) < 1e-4


def test_blank_patches_flags_all_zero_patches() -> None:
    pixels = torch.zeros(2, 3, 4, 4, dtype=torch.uint8)
    pixels[0, 2, 3, 0] = 1  # image 0: one channel of one pixel in the bottom-left 2 × 2 patch
    pixels[1, :, :2, :] = 255  # image 1: the top row of patches
    assert blank_patches(pixels, 2).tolist() == [[True, True, False, True], [False, False, True, True]]


def test_importance_weighted_bound_rises_to_the_discrete_likelihood() -> None:
    """A Gaussian half a bin wide over one-pixel images has exact bin probabilities (Φ differences). Uniform
    dequantisation bounds their logs from below with a wide gap; the K-sample importance-weighted bound closes it
    as K grows, from below (docs/method.md §5)."""
    bin_width = 1 / 128  # in model units, [-1, 1]
    mean, std = (100 - 127.5 + 0.3) * bin_width, 0.5 * bin_width
    density = torch.distributions.Normal(mean, std)
    pixels = torch.tensor([98, 99, 100, 101, 102] * 400, dtype=torch.uint8).view(-1, 1, 1, 1)
    lower = (pixels.double() - 128) * bin_width
    exact = torch.log(density.cdf(lower + bin_width) - density.cdf(lower)).mean().item()

    def bound(samples: int) -> float:
        generator = torch.Generator().manual_seed(samples)
        log_p = dequantized_log_prob(lambda x: density.log_prob(x.double()).sum(dim=(1, 2, 3)), pixels, samples,
                                     generator)
        return log_p.mean().item() + math.log(bin_width)  # density × bin width: the bin's probability

    one, sixteen, many = bound(1), bound(16), bound(1024)
    assert one < sixteen < many <= exact + 1e-3, (one, sixteen, many, exact)
    assert exact - one > 0.2 and exact - many < 0.02, (one, many, exact)


def test_tiny_overfits_digits_and_log_prob_agrees_with_loss() -> None:
    pixels, labels = load_arrays("digits", "train")
    x = pixels_to_model(torch.from_numpy(pixels[:128].copy()))
    y = torch.from_numpy(labels[:128].copy())
    torch.manual_seed(0)
    model = Farmer(FarmerConfig.preset("tiny").replace(label_dropout=0.0))
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    start = model(x, y)[0].item()
    for _ in range(250):
        loss, _ = model(x, y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    end, nll = model(x, y)
    assert end.item() < start - 1.0, (start, end.item())  # nats/dim: more than 1.4 bits/dim lower
    torch.testing.assert_close(-model.log_prob(x, y), nll)


def test_paper_preset_parameter_counts() -> None:
    """Counted on the meta device (no weights allocated) against docs/method.md §8 / supplementary Tab. 6."""
    def count(name: str) -> tuple[float, float]:
        with torch.device("meta"):
            model = Farmer(FarmerConfig.preset(name))
        af = sum(p.numel() for p in model.flow.parameters())
        ar = sum(p.numel() for p in model.prior.parameters())
        print(f"{name}: AF {af / 1e6:.1f}M AR {ar / 1e6:.1f}M total {(af + ar) / 1e6:.1f}M")
        return af, ar

    af, ar = count("imagenet256-1.1b-p16")
    assert abs(af / 828e6 - 1) < 0.1 and abs(ar / 295e6 - 1) < 0.1
    af, ar = count("imagenet256-1.9b-p16")
    assert abs((af + ar) / 1.9e9 - 1) < 0.1 and abs(af / 1.4e9 - 1) < 0.1
    af, ar = count("imagenet64-556m")
    assert abs((af + ar) / 556e6 - 1) < 0.1
    for name in ("imagenet256-1.1b-p8", "imagenet256-1.9b-p8"):
        count(name)


@pytest.mark.parametrize(("make_input", "message"), [
    (lambda c: torch.zeros(2, c.channels, c.image_size), "shape"),
    (lambda c: torch.zeros(2, c.channels + 2, c.image_size, c.image_size), "shape"),
    (lambda c: torch.zeros(2, c.channels, c.image_size + 4, c.image_size + 4), "shape"),
    (lambda c: torch.zeros(2, c.channels, c.image_size, c.image_size, dtype=torch.uint8), "floating point"),
    (lambda c: torch.full((2, c.channels, c.image_size, c.image_size), float("nan")), "NaN"),
    (lambda c: torch.full((2, c.channels, c.image_size, c.image_size), 200.0), r"\[-1, 1\]"),
], ids=["rank", "channels", "size", "dtype", "nan", "range"])
def test_bad_images_raise_clear_errors(make_input, message: str) -> None:
    model = Farmer(small_config())
    with pytest.raises((ValueError, TypeError), match=message):
        model.log_prob(make_input(model.config))


def test_bad_labels_raise_clear_errors() -> None:
    model = Farmer(small_config())
    x = random_images(model.config, 2)
    with pytest.raises(ValueError, match=r"labels must be in \[0, 9\]"):
        model.log_prob(x, torch.tensor([0, 10]))
    with pytest.raises(ValueError, match="shape"):
        model.log_prob(x, torch.tensor([0, 1, 2]))
    with pytest.raises(TypeError, match="integers"):
        model.log_prob(x, torch.tensor([0.0, 1.0]))
    with pytest.raises(ValueError, match="unconditional"):
        Farmer(small_config(num_classes=0)).log_prob(x, torch.tensor([0, 1]))


def test_sampling_is_seeded_and_decoupled_knobs_apply() -> None:
    model = random_model()
    y = torch.arange(4)
    a = model.sample(4, y, torch.Generator().manual_seed(3))
    b = model.sample(4, y, torch.Generator().manual_seed(3))
    assert torch.equal(a, b)
    c = model.sample(4, y, torch.Generator().manual_seed(3), variance_scale=0.5, temperature=2.0)
    assert not torch.equal(a, c)
    with pytest.raises(ValueError, match="variance_scale"):
        model.sample(2, variance_scale=0.0)
