"""Learned dequantisation (farmer.dequantization, docs/method.md §14): a normalised q(u | x) whose bound never
exceeds the discrete log-likelihood."""

import math

import torch
from helpers import randomize

from farmer import Farmer, FarmerConfig
from farmer.data import ArrayDataset
from farmer.dequantization import VariationalDequantizer
from farmer.evaluation import dequantized_log_prob, evaluate_bpd
from farmer.pixels import model_to_pixels, pixels_to_model

# Four pixels, one channel each: small enough to integrate p over a pixel bin numerically.
FOUR_PIXELS = FarmerConfig(image_size=2, channels=1, patch_size=1, num_classes=0, flow_blocks=1, flow_layers=1,
                           flow_width=16, prior_layers=1, prior_width=16, informative_components=2,
                           redundant_components=2, condition_repeat=1, head_dim=16, dequantization="variational")


def random_pixels(batch: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 256, (batch, 1, 2, 2), generator=torch.Generator().manual_seed(seed), dtype=torch.uint8)


def test_starts_as_uniform_dequantization_inside_each_bin() -> None:
    dequantizer = VariationalDequantizer(FOUR_PIXELS)
    pixels = random_pixels(64)
    x, log_q = dequantizer(pixels_to_model(pixels), torch.Generator().manual_seed(0))
    assert torch.equal(log_q, torch.zeros(64))  # sigmoid of a standard logistic is uniform
    assert torch.equal(model_to_pixels(x), pixels)  # every draw stays in its pixel's bin


def test_q_is_a_normalised_density_and_forward_reports_it() -> None:
    torch.manual_seed(0)
    dequantizer = randomize(VariationalDequantizer(FOUR_PIXELS.replace(image_size=1)), 0.05).double()
    centres = pixels_to_model(torch.tensor([[[[3]]], [[[200]]]], dtype=torch.uint8)).double()
    # ∫ q(u) du over (0, 1) as ∫ q(sigmoid(a)) sigmoid'(a) da (smooth even where q piles up at an edge).
    a = torch.linspace(-30, 30, 200_001, dtype=torch.float64)
    u, slope = torch.sigmoid(a), torch.sigmoid(a) * torch.sigmoid(-a)
    for centre in centres:
        with torch.no_grad():
            density = dequantizer.log_density(centre.expand(len(u), 1, 1, 1), u.view(-1, 1, 1, 1)).exp()
        assert abs(torch.trapezoid(density * slope, a).item() - 1) < 1e-6
        assert density.max() > 1.5, "a near-uniform q would not test the normalisation"
    x, log_q = dequantizer(centres, torch.Generator().manual_seed(1))
    lower = centres - 0.5 / 128
    torch.testing.assert_close(log_q, dequantizer.log_density(centres, (x - lower) * 128))


def test_bound_is_below_the_discrete_log_likelihood() -> None:
    torch.manual_seed(0)
    model = randomize(Farmer(FOUR_PIXELS), 0.5).double().eval()
    randomize(model.dequantizer, 1.0, seed=1)
    pixels = random_pixels(3, seed=2)
    centres = pixels_to_model(pixels).double()
    # log P(k) = log ∫_bin p(x) dx by a midpoint rule on a 6⁴ grid of each 4-pixel bin (p is smooth within it).
    grid = (torch.arange(6, dtype=torch.float64) + 0.5) / 6
    offsets = torch.cartesian_prod(grid, grid, grid, grid).view(-1, 1, 2, 2)
    exact = []
    for centre in centres:
        x = centre - 0.5 / 128 + offsets / 128
        exact.append(torch.logsumexp(model.log_prob(x), 0) - math.log(len(x)) - 4 * math.log(128))
    exact = torch.stack(exact)
    generator = torch.Generator().manual_seed(3)

    def log_prob(x: torch.Tensor) -> torch.Tensor:
        return model.log_prob(x)

    repeated = pixels.repeat(2000, 1, 1, 1)
    with torch.no_grad():
        one_sample = dequantized_log_prob(log_prob, repeated, 1, generator, model.dequantizer.double())
        importance = dequantized_log_prob(log_prob, repeated[:3 * 200], 64, generator, model.dequantizer)
    bound = one_sample.view(2000, 3).mean(0) - 4 * math.log(128)
    tighter = importance.view(200, 3).mean(0) - 4 * math.log(128)
    assert (bound < exact).all() and (exact - bound > 0.05).all(), (bound, exact)  # a far-from-optimal q: a gap
    assert (tighter <= exact + 1e-3).all() and (tighter > bound).all(), (tighter, exact)


def test_variational_loss_trains_the_dequantizer_and_evaluates_both_bounds() -> None:
    torch.manual_seed(0)
    model = Farmer(FOUR_PIXELS.replace(num_classes=3))
    pixels = random_pixels(16)
    loss, nll = model(pixels_to_model(pixels), torch.arange(16) % 3)
    loss.backward()
    assert torch.isfinite(nll).all() and model.dequantizer.net[-1].weight.grad.abs().sum() > 0
    dataset = ArrayDataset(pixels.numpy(), (torch.arange(16) % 3).numpy())
    # At initialisation q is uniform: both bounds are the same number (the same noise draws).
    uniform = evaluate_bpd(model, dataset, batch_size=8)
    variational = evaluate_bpd(model, dataset, batch_size=8, bound="variational")
    assert math.isfinite(uniform) and abs(uniform - variational) < 0.05
