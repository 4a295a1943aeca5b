"""What a training run optimises. The trainer (farmer.train) runs one loop for every objective and asks the
objective, never a flag, for what differs: how the model is built, which of its weights learn, the module DDP
wraps, what is logged beside the loss, the test metric, and the flow inverse of the sample grids.

Objectives: :class:`LikelihoodObjective` (maximum likelihood, docs/method.md §5) here, and
:class:`farmer.distill.DistillationObjective` (the one-step inverse, docs/method.md §7, Algorithm 2).
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from typing import ClassVar

from torch import nn
from torch.utils.data import Dataset

from farmer.config import FarmerConfig
from farmer.evaluation import evaluate_bpd
from farmer.metrics import BIN_WIDTH_BITS
from farmer.model import Farmer
from farmer.sampling import Inverse


class Objective(ABC):
    eval_key: ClassVar[str]  # the test metric's key in metrics.jsonl
    eval_label: ClassVar[str]  # ... and its name in the progress output
    progress_fields: ClassVar[tuple[str, ...]] = ()  # logged fields the progress bar shows beside the loss
    sample_inverse: ClassVar[Inverse] = "exact"  # the flow inverse the training-time sample grids decode with

    @abstractmethod
    def build_model(self, config: FarmerConfig, resuming: bool) -> Farmer:
        """The model to train, on the CPU, with the weights this objective does not train frozen
        (``requires_grad`` False). When ``resuming``, a checkpoint's weights replace these at once."""

    def loss_module(self, model: Farmer) -> nn.Module:
        """(images, labels) -> (loss, …) over ``model``: what DDP wraps and ``torch.compile`` compiles."""
        return model

    def log_fields(self, loss: float, noise_std: float, config: FarmerConfig) -> dict[str, float]:
        """Numbers logged beside the loss (nats) at a logging step; ``noise_std``: this step's dequantisation."""
        return {}

    @abstractmethod
    def evaluate(self, model: Farmer, dataset: Dataset, max_images: int, seed: int) -> float:
        """The test metric (``eval_key``) of ``model``, the EMA weights in eval mode."""


class LikelihoodObjective(Objective):
    """Flow and AR prior trained together by maximum likelihood (docs/method.md §5): every weight learns."""

    eval_key, eval_label = "test_bpd", "test bits/dim"
    progress_fields = ("train_bits",)

    def build_model(self, config: FarmerConfig, resuming: bool) -> Farmer:
        return Farmer(config)

    def log_fields(self, loss: float, noise_std: float, config: FarmerConfig) -> dict[str, float]:
        # The loss in bits/dim of 8-bit pixels (+ log2 of the 128 pixel bins per unit of [-1, 1]). Not
        # "bpd": under Gaussian dequantisation it is no bound on the discrete data's bits/dim; the bound is
        # test_bpd, with uniform noise.
        fields = {"train_bits": loss / math.log(2) + BIN_WIDTH_BITS}
        if config.dequantization == "gaussian":
            fields["noise_std"] = noise_std
        return fields

    def evaluate(self, model: Farmer, dataset: Dataset, max_images: int, seed: int) -> float:
        return evaluate_bpd(model, dataset, max_images=max_images, seed=seed)
