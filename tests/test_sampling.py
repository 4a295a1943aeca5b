"""Sampling is finite by construction (docs/method.md §6): extreme knobs on untrained and trained models."""

import pytest
import torch
from helpers import random_model

from farmer.checkpoint import load_model
from farmer.guidance import NaiveGuidance, ResamplingGuidance

EXTREME = [
    dict(variance_scale=2.0, temperature=3.0),
    dict(guidance=ResamplingGuidance(scale=10.0, proposal_weight_temperature=3.0, proposal_std_scale=2 ** 0.5)),
    dict(guidance=NaiveGuidance(scale=10.0)),
]


@pytest.mark.parametrize("knobs", EXTREME, ids=["s2-T3", "resampling-w10", "naive-w10"])
def test_extreme_knobs_stay_finite(knobs: dict, trained_run: str) -> None:
    generator = torch.Generator().manual_seed(0)
    for model in (random_model(std=0.3), load_model(trained_run)):
        labels = torch.arange(2000) % 10
        images = model.sample(2000, labels, generator, **knobs)
        assert torch.isfinite(images).all()
        assert images.std() > 0.01, "samples collapsed"
