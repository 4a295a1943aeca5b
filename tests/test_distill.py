"""One-step distillation (docs/method.md §7, Algorithm 2): block order, shapes, training lowers every block's loss."""

import pytest
import torch
from helpers import randomize, small_config

from farmer.distill import attach_new_student, distillation_loss
from farmer.model import Farmer


def teacher_and_tokens(blocks: int = 3, mixing: bool = False) -> tuple:
    """The config, a random model with a new student attached, and a batch of tokens."""
    config = small_config(flow_blocks=blocks, channel_mixing=mixing)
    torch.manual_seed(0)
    model = Farmer(config)
    randomize(model.flow, 0.05).eval().requires_grad_(False)
    tokens = torch.randn(16, config.num_tokens, config.token_dim, generator=torch.Generator().manual_seed(1))
    return config, attach_new_student(model), tokens


@pytest.mark.parametrize("mixing", [False, True], ids=["plain", "mixing"])
def test_student_blocks_mirror_the_teacher_in_reverse_order(mixing: bool) -> None:
    config, model, tokens = teacher_and_tokens(mixing=mixing)
    teacher, student = model.flow, model.student
    path, _ = teacher.forward_path(tokens)
    # With causal attention restored, the student's blocks are the teacher's: running their exact inverses in
    # the order `path` uses must walk the teacher path backwards, Z^n -> Z^{n-1} -> ... -> Z^0.
    for block in student.blocks:
        block.causal = True
    cache = teacher.allocate_cache(tokens.shape[0], tokens.device)
    z = path[-1]
    for k, block in enumerate(reversed(student.blocks)):
        z = block.inverse(z, cache)
        torch.testing.assert_close(z, path[-2 - k], atol=1e-5, rtol=0)
    for block in student.blocks:
        block.causal = False

    order = []
    for index, block in enumerate(student.blocks):
        block.parallel_inverse = (lambda f, i: lambda z: (order.append(i), f(z))[1])(block.parallel_inverse, index)
    outputs = student.path(path[-1])
    assert order == [2, 1, 0]
    assert len(outputs) == config.flow_blocks and all(o.shape == tokens.shape for o in outputs)


@pytest.mark.parametrize("mixing", [False, True], ids=["plain", "mixing"])
def test_distillation_lowers_every_blocks_loss_on_a_fixed_batch(mixing: bool) -> None:
    config, model, tokens = teacher_and_tokens(mixing=mixing)
    teacher, student = model.flow, model.student
    optimizer = torch.optim.Adam(student.parameters(), lr=3e-3)

    def loss() -> tuple[torch.Tensor, torch.Tensor]:
        return distillation_loss(student, teacher, tokens, generator=torch.Generator().manual_seed(2))

    before = loss()[1].detach()
    for _ in range(30):
        total, _ = loss()
        optimizer.zero_grad()
        total.backward()
        optimizer.step()
    after = loss()[1].detach()
    assert before.shape == (config.flow_blocks,)
    assert (after < 0.7 * before).all(), (before, after)
    assert all(p.grad is None for p in teacher.parameters()), "the teacher must stay frozen"


def test_attaching_a_student_marks_the_config_and_keeps_checkpoint_names() -> None:
    config = small_config(flow_blocks=2)
    model = attach_new_student(Farmer(config))
    assert model.config == config.replace(distilled_inverse=True)
    # The names a distilled checkpoint stores: the same as a model built with distilled_inverse=True.
    assert model.state_dict().keys() == Farmer(model.config).state_dict().keys()
    for name, value in model.flow.state_dict().items():
        assert torch.equal(model.student.state_dict()[name], value)
    assert model.sample(2, torch.tensor([0, 1]), torch.Generator().manual_seed(0), inverse="distilled").shape == (
        2, config.channels, config.image_size, config.image_size)
    with pytest.raises(ValueError, match="blocks"):
        Farmer(small_config(flow_blocks=3)).attach_student(model.student)
