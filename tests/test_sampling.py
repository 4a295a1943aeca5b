"""Sampling is finite by construction (docs/method.md §6): extreme knobs on untrained and trained models."""

import pytest
import torch
from helpers import random_model

from farmer import Farmer
from farmer.flow import JACOBI_MAX_BATCH, auto_inverse
from farmer.guidance import NaiveGuidance, ResamplingGuidance

EXTREME = [
    dict(variance_scale=2.0, temperature=3.0),
    dict(guidance=ResamplingGuidance(scale=10.0, proposal_weight_temperature=3.0, proposal_std_scale=2 ** 0.5)),
    dict(guidance=NaiveGuidance(scale=10.0)),
]


@pytest.mark.parametrize("knobs", EXTREME, ids=["s2-T3", "resampling-w10", "naive-w10"])
def test_extreme_knobs_stay_finite(knobs: dict, trained_run: str) -> None:
    generator = torch.Generator().manual_seed(0)
    for model in (random_model(std=0.3), Farmer.from_pretrained(trained_run)):
        labels = torch.arange(2000) % 10
        images = model.sample(2000, labels, generator, **knobs)
        assert torch.isfinite(images).all()
        assert images.std() > 0.01, "samples collapsed"


@pytest.fixture(scope="module")
def shipped_latents() -> tuple[Farmer, torch.Tensor]:
    """The shipped mnist model and a batch of 64 of its unguided prior draws, as the flow inverse sees them."""
    model = Farmer.from_pretrained("mnist")
    labels = torch.arange(64) % 10
    with torch.no_grad():
        informative, redundant = model.prior.sample(labels, torch.Generator().manual_seed(0))
    z = torch.cat([informative, redundant], dim=-1)
    return model, z.flip(1) if model.config.final_permute else z


def test_jacobi_on_the_shipped_model_is_the_sequential_inverse_in_few_sweeps(shipped_latents) -> None:
    """docs/method.md §7: the relative stopping test ends each block at its fp32 floor, ~5-7 sweeps of 48 on the
    shipped flow at batch 64 (an absolute tolerance alone ran 34-46 on the TARFlow-sized flow)."""
    model, z = shipped_latents
    x, sweeps = model.flow.jacobi_inverse(z)
    torch.testing.assert_close(x, model.flow.inverse(z), atol=1e-4, rtol=0)
    assert len(sweeps) == model.config.flow_blocks and all(1 <= s <= 12 for s in sweeps), sweeps


def test_auto_inverse_is_jacobi_for_small_batches_on_the_cpu(shipped_latents) -> None:
    cpu = torch.device("cpu")
    assert [auto_inverse(b, cpu) for b in (1, JACOBI_MAX_BATCH["cpu"], JACOBI_MAX_BATCH["cpu"] + 1, 100)] == \
        ["jacobi", "jacobi", "exact", "exact"]
    model, z = shipped_latents
    d_i = model.config.informative_dim
    for batch, chosen in ((1, "jacobi"), (JACOBI_MAX_BATCH["cpu"] + 1, "exact")):
        latents = (z[:batch].flip(1) if model.config.final_permute else z[:batch]).split(
            [d_i, z.shape[-1] - d_i], dim=-1)
        assert torch.equal(model.decode(*latents), model.decode(*latents, inverse=chosen))
