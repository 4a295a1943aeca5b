"""Activation checkpointing (farmer.nn.Transformer): the same loss, gradients, randomness and training run as
without it, while the layers really are recomputed in the backward pass."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file
from torch import Tensor

import farmer.nn
from farmer.config import parse_assignments
from farmer.distill import attach_new_student, distillation_loss
from farmer.model import Farmer
from farmer.nn import Transformer, TransformerLayer
from farmer.pretrained import MODEL_WEIGHTS, resolve_checkpoint
from farmer.train import TrainConfig, train, train_step
from tests.helpers import random_images, random_model, small_config


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def recomputes(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Counts the calls of torch.utils.checkpoint.checkpoint made by farmer.nn (one per layer and forward)."""
    calls = [0]
    original = farmer.nn.checkpoint

    def counting(*args: Any, **kwargs: Any) -> Tensor:
        calls[0] += 1
        return original(*args, **kwargs)

    monkeypatch.setattr(farmer.nn, "checkpoint", counting)
    return calls


def layer_forwards(model: torch.nn.Module) -> list[int]:
    """A counter of TransformerLayer forward calls in ``model`` (hooks stay for the model's life)."""
    calls = [0]

    def count(*_: Any) -> None:
        calls[0] += 1

    for module in model.modules():
        if isinstance(module, TransformerLayer):
            module.register_forward_pre_hook(count)
    return calls


def loss_and_grads(model: Farmer, enabled: bool, amp: torch.dtype | None, seed: int = 3) -> tuple[Tensor, dict]:
    """The training loss (label dropout on: train mode) and every gradient, from the same global RNG state."""
    model.set_activation_checkpointing(enabled).train().zero_grad(set_to_none=True)
    x = random_images(model.config, 6)
    y = torch.arange(6) % model.config.num_classes
    torch.manual_seed(seed)
    with torch.autocast("cpu", dtype=amp or torch.float32, enabled=amp is not None):
        loss, _ = model(x, y)
    loss.backward()
    return loss.detach(), {name: p.grad.clone() for name, p in model.named_parameters()}


@pytest.mark.parametrize("amp", [None, torch.bfloat16], ids=["fp32", "bf16-autocast"])
def test_checkpointing_gives_the_same_loss_and_gradients(amp: torch.dtype | None) -> None:
    # label_dropout 0.5: the drop mask is drawn from the global RNG, so a recompute that moved it would show.
    model = random_model(small_config(label_dropout=0.5, flow_layers=2, prior_layers=2))
    calls = layer_forwards(model)
    loss, grads = loss_and_grads(model, False, amp)
    plain_calls = calls[0]
    checkpointed_loss, checkpointed_grads = loss_and_grads(model, True, amp)
    # Every layer ran once more, in the backward pass: the flag did something.
    assert calls[0] - plain_calls == 2 * plain_calls
    assert torch.equal(loss, checkpointed_loss)
    assert grads.keys() == checkpointed_grads.keys()
    for name, grad in grads.items():
        torch.testing.assert_close(checkpointed_grads[name], grad, rtol=0, atol=0, msg=name)


def test_checkpointing_keeps_fewer_tensors_for_backward() -> None:
    model = random_model(small_config(flow_layers=3, prior_layers=3))
    x = random_images(model.config, 4)

    def saved_bytes(enabled: bool) -> int:
        model.set_activation_checkpointing(enabled)
        storages: dict[int, int] = {}

        def pack(t: Tensor) -> Tensor:
            storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            model(x)
        return sum(storages.values())

    assert saved_bytes(True) < 0.7 * saved_bytes(False)


def test_the_students_gradients_are_the_same_with_checkpointing() -> None:
    teacher = attach_new_student(random_model())
    tokens = teacher.patchify(random_images(teacher.config, 4))

    def grads(enabled: bool) -> tuple[Tensor, list[Tensor]]:
        teacher.set_activation_checkpointing(enabled)
        teacher.student.zero_grad(set_to_none=True)
        loss, _ = distillation_loss(teacher.student, teacher.flow, tokens, torch.Generator().manual_seed(0))
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in teacher.student.parameters()]

    loss, plain = grads(False)
    checkpointed_loss, checkpointed = grads(True)
    assert torch.equal(loss, checkpointed_loss)
    assert all(torch.equal(a, b) for a, b in zip(plain, checkpointed, strict=True))


def test_sampling_and_no_grad_passes_ignore_the_switch(recomputes: list[int]) -> None:
    model = random_model()
    plain = model.sample(4, torch.arange(4), torch.Generator().manual_seed(1))
    model.set_activation_checkpointing(True)
    assert all(t.activation_checkpointing for t in model.modules() if isinstance(t, Transformer))
    assert torch.equal(model.sample(4, torch.arange(4), torch.Generator().manual_seed(1)), plain)
    with torch.no_grad():
        model(random_images(model.config, 2))
    assert recomputes[0] == 0


def test_train_steps_with_checkpointing_give_the_same_weights() -> None:
    config = small_config(label_dropout=0.3)

    def trained(enabled: bool) -> dict[str, Tensor]:
        model = random_model(config).set_activation_checkpointing(enabled)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
        torch.manual_seed(7)
        for step in range(3):
            x, y = random_images(config, 4, seed=step), torch.arange(4) % config.num_classes
            train_step(model, optimizer, [(x, y), (x.flip(0), y)], grad_clip=1.0)
        return model.state_dict()

    plain, checkpointed = trained(False), trained(True)
    assert all(torch.equal(plain[key], checkpointed[key]) for key in plain)


def test_the_trainer_applies_the_flag_from_train_set(tmp_path: Path, recomputes: list[int]) -> None:
    assert parse_assignments(TrainConfig, ["activation-checkpointing=true"]) == {"activation_checkpointing": True}
    base = dict(TrainConfig.preset("tiny").to_dict(), steps=2, batch_size=8, warmup_steps=1, eval_images=16)

    def run(enabled: bool, out: Path) -> dict[str, Tensor]:
        train(small_config(), TrainConfig(**{**base, "activation_checkpointing": enabled}), out, device="cpu",
              progress=False, log=lambda _: None)
        return load_file(resolve_checkpoint(out) / MODEL_WEIGHTS)

    plain = run(False, tmp_path / "plain")
    assert recomputes[0] == 0
    checkpointed = run(True, tmp_path / "checkpointed")
    assert recomputes[0] > 0
    assert all(torch.equal(plain[key], checkpointed[key]) for key in plain)

