"""The shipped mnist model's samples for a fixed seed are pinned: refactors must leave sampling bit-identical.

The digests are of the uint8 pixels of 10 draws (one per class, seed 0, exact inverse), with and without
guidance. A deliberate change to sampling updates them (run this file and copy the printed digests).
"""

import hashlib

import pytest
import torch

from farmer import Farmer
from farmer.guidance import ResamplingGuidance
from farmer.pixels import model_to_pixels

PINNED = {
    "plain": "eca419df1640715f4a83fe43f994720e8f408f4a9e79b9ca79641c9ba1af7d1a",
    "guided": "2c8ace1fade748c464afe898912f1612eb5b2e4c811f1be08dfda9d7bdfd5141",
}


@pytest.mark.parametrize("name", sorted(PINNED))
def test_shipped_mnist_samples_are_pinned(name: str) -> None:
    knobs = {"guided": {"guidance": ResamplingGuidance(scale=2.0)}, "plain": {}}[name]
    model = Farmer.from_pretrained("mnist")
    images = model.sample(10, torch.arange(10), torch.Generator().manual_seed(0), inverse="exact", **knobs)
    digest = hashlib.sha256(model_to_pixels(images).numpy().tobytes()).hexdigest()
    assert digest == PINNED[name], f"{name} samples changed: {digest}"
