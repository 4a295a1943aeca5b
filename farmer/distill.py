"""One-step distillation of the flow inverse (docs/method.md §7, supplementary Algorithm 2).

The exact inverse is sequential over N tokens in each of n blocks. The teacher's *forward* pass already
gives the whole path Z^0 … Z^n in parallel, so a student — a copy of the teacher flow with bidirectional
attention, blocks applied in reverse order — learns to map Z̃^t to Z^{t−1} one parallel pass per block.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from farmer.config import FarmerConfig
from farmer.flow import AutoregressiveFlow, FlowBlock, block_flips

if TYPE_CHECKING:
    from farmer.model import Farmer

MAX_NOISE_SCALE = 0.3  # s ~ U[0, 0.3] (Algorithm 2)


class DistilledInverse(nn.Module):
    """g_{θ_1} ∘ … ∘ g_{θ_n}: block t maps Z̃^t to Z̃^{t−1}; ``blocks[t-1]`` mirrors the teacher's block t."""

    def __init__(self, config: FarmerConfig) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(FlowBlock(config, flip, causal=False) for flip in block_flips(config))

    @classmethod
    def from_teacher(cls, config: FarmerConfig, teacher: AutoregressiveFlow) -> DistilledInverse:
        """Initialise from the teacher's weights: the student starts as a good guess of the inverse."""
        student = cls(config)
        student.load_state_dict(teacher.state_dict())
        return student

    def path(self, z: Tensor) -> list[Tensor]:
        """[Z̃^{n−1}, …, Z̃^0]: each block consumes the previous student block's output."""
        outputs = []
        for block in reversed(self.blocks):
            z = block.parallel_inverse(z)
            outputs.append(z)
        return outputs

    def forward(self, z: Tensor) -> Tensor:
        """Z^n -> Z^0 in n parallel passes."""
        return self.path(z)[-1]


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


class DistillationObjective(nn.Module):
    """Algorithm 2 as a module, so DDP can wrap it: images -> (loss, per-block losses)."""

    def __init__(self, model: Farmer) -> None:
        super().__init__()
        if model.student is None:
            raise ValueError("the model has no student: build it with distilled_inverse=True")
        self.model = model

    def forward(self, x: Tensor, y: Tensor | None = None) -> tuple[Tensor, Tensor]:
        return distillation_loss(self.model.student, self.model.flow, self.model.patchify(x))
