"""One-step distillation of the flow inverse (docs/method.md §7, supplementary Algorithm 2).

The exact inverse is sequential over N tokens in each of n blocks. The teacher's *forward* pass already
gives the whole path Z^0 … Z^n in parallel, so a student — a copy of the teacher flow with bidirectional
attention, blocks applied in reverse order (:class:`farmer.flow.DistilledInverse`) — learns to map Z̃^t to
Z^{t−1} one parallel pass per block. This module holds the algorithm: the student's start, its loss, and
the training objective.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import Dataset

from farmer.config import FarmerConfig
from farmer.evaluation import student_psnr
from farmer.flow import AutoregressiveFlow, DistilledInverse
from farmer.model import Farmer
from farmer.objective import Objective

MAX_NOISE_SCALE = 0.3  # s ~ U[0, 0.3] (Algorithm 2)
# The training settings of `farmer distill` that differ from a TrainConfig's defaults. Algorithm 2 starts the
# student from the teacher, so it needs far fewer steps than the teacher did.
DISTILL_DEFAULTS: dict[str, Any] = dict(steps=1_000, batch_size=64, lr=3e-4, min_lr=1e-5, warmup_steps=50,
                                        ema_decay=0.995, eval_every=250, eval_images=1_000, sample_every=500,
                                        save_every=100)


def attach_new_student(teacher: Farmer) -> Farmer:
    """Attach Algorithm 2's starting student to ``teacher`` (replacing any) and return the teacher: each
    student block a copy of the teacher's block, so the student starts as a good guess of the inverse."""
    student = DistilledInverse(teacher.config)
    student.load_state_dict(teacher.flow.state_dict())
    return teacher.attach_student(student.to(next(teacher.flow.parameters())))


def distillation_loss(student: DistilledInverse, teacher: AutoregressiveFlow, tokens: Tensor,
                      generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
    """Algorithm 2 on a batch of patch tokens Z^0: (mean over blocks of the per-block MSE, per-block MSEs (n,)).

    Z̃^n = Z^n + s·ε with s ~ U[0, 0.3] per image; the teacher is frozen (no gradient reaches it).
    """
    with torch.no_grad():
        targets, _ = teacher.forward_path(tokens)
    z_n = targets[-1]
    scale = torch.rand(z_n.shape[0], 1, 1, generator=generator, device=z_n.device) * MAX_NOISE_SCALE
    noisy = z_n + scale * torch.randn(z_n.shape, generator=generator, device=z_n.device)
    outputs = student.path(noisy)
    # outputs[k] approximates Z^{n−1−k}
    per_block = torch.stack([(out - targets[-2 - k]).pow(2).mean() for k, out in enumerate(outputs)])
    return per_block.mean(), per_block


class DistillationLoss(nn.Module):
    """Algorithm 2 as a module, so DDP can wrap it: images -> (loss, per-block losses)."""

    def __init__(self, model: Farmer) -> None:
        super().__init__()
        if model.student is None:
            raise ValueError("the model has no student: build it with distilled_inverse=True")
        self.model = model

    def forward(self, x: Tensor, y: Tensor | None = None) -> tuple[Tensor, Tensor]:
        return distillation_loss(self.model.student, self.model.flow, self.model.to_tokens(x)[0])


@dataclass(frozen=True)
class DistillationObjective(Objective):
    """Train the student of a frozen teacher checkpoint (its EMA or raw weights); flow and prior stay fixed."""

    teacher: str | Path
    teacher_ema: bool = True

    eval_key, eval_label = "test_psnr_db", "student PSNR (dB)"
    sample_inverse = "distilled"

    def build_model(self, config: FarmerConfig, resuming: bool) -> Farmer:
        if not config.distilled_inverse:
            raise ValueError("objective='distill' needs a model config with distilled_inverse=True")
        model = Farmer(config) if resuming else self._teacher_with_new_student(config)
        # Algorithm 2: the teacher flow and the AR prior stay frozen; only the student learns.
        model.flow.requires_grad_(False)
        model.prior.requires_grad_(False)
        return model

    def _teacher_with_new_student(self, config: FarmerConfig) -> Farmer:
        teacher = Farmer.from_pretrained(self.teacher, ema=self.teacher_ema)
        if teacher.config.replace(distilled_inverse=True) != config:
            raise ValueError(f"teacher {self.teacher} does not match the model config to distil")
        return attach_new_student(teacher)

    def loss_module(self, model: Farmer) -> nn.Module:
        return DistillationLoss(model)

    def evaluate(self, model: Farmer, dataset: Dataset, max_images: int, seed: int) -> float:
        return student_psnr(model, dataset, max_images=max_images, seed=seed)
