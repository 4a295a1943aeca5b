"""farmer plan: its counts against the built model, hand counts and real tensors; its memory arithmetic."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import farmer.plan
from farmer.cli import main
from farmer.config import FarmerConfig
from farmer.io import count_parameters
from farmer.model import Farmer
from farmer.nn import Transformer
from farmer.plan import (
    CPU_ATTENTION_FLOPS,
    STATE_BYTES_PER_PARAMETER,
    Cluster,
    at_depth,
    count_scaled_by_depth,
    count_training_step,
    forward_counting_saved,
    fsdp_units,
    largest_batch,
    per_gpu_state_bytes,
    plan,
    schedule_images,
)

TINY = FarmerConfig.preset("tiny")


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tiny_plan() -> dict[str, Any]:
    # Counted at full depth: the depth scaling has its own test, and a third of the counts keeps this in seconds.
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(farmer.plan, "count_scaled_by_depth", count_training_step)
        return plan("tiny", Cluster(gpus=4, gpu_memory_gib=0.01, headroom=0.1))


def test_parameters_and_fsdp_units_match_the_built_model(tiny_plan: dict[str, Any]) -> None:
    assert tiny_plan["parameters"] == count_parameters(Farmer(TINY))
    mnist = Farmer(FarmerConfig.preset("mnist"))
    units = fsdp_units(mnist)
    assert len(units) == mnist.config.flow_blocks + mnist.config.prior_layers + 1
    assert sum(units) == count_parameters(mnist)


def test_flops_are_linear_in_batch_and_count_every_matmul_and_attention() -> None:
    assert count_training_step(TINY, 3).flops == 3 * count_training_step(TINY, 1).flops
    # One transformer's forward by hand: per layer 24·B·T·W² for the four matmuls (qkv 3W, proj W, MLP 4W and back)
    # and 4·B·T²·W for attention's two products (counted without the causal half).
    batch, tokens, width, layers = 2, 16, 32, 3
    transformer = Transformer(width, layers, head_dim=16, mlp_ratio=4, max_len=tokens)
    with FlopCounterMode(display=False, custom_mapping=CPU_ATTENTION_FLOPS) as counter:
        transformer(torch.randn(batch, tokens, width))
    assert counter.get_total_flops() == layers * (24 * batch * tokens * width**2 + 4 * batch * tokens**2 * width)


@pytest.mark.parametrize("checkpointing", [False, True])
def test_counts_scaled_from_reduced_depth_equal_the_full_depth_counts(checkpointing: bool) -> None:
    config = at_depth(TINY, flow_blocks=3, prior_layers=3)
    assert count_scaled_by_depth(config, 2, "bf16", checkpointing) == count_training_step(config, 2, "bf16",
                                                                                          checkpointing)


@pytest.mark.parametrize(("precision", "checkpointing"), [("fp32", False), ("bf16", True)])
def test_the_fake_tensor_count_equals_the_count_on_real_tensors(precision: str, checkpointing: bool) -> None:
    torch.manual_seed(0)
    model = Farmer(TINY).set_activation_checkpointing(checkpointing).train()
    images = torch.rand(3, 1, 8, 8) * 2 - 1
    _, real = forward_counting_saved(model, images, torch.arange(3), precision)
    assert real == count_training_step(TINY, 3, precision, checkpointing).saved_bytes


def test_checkpointing_trades_saved_bytes_for_recompute_flops(tiny_plan: dict[str, Any]) -> None:
    plain, checkpointed = tiny_plan["no_checkpointing"], tiny_plan["checkpointing"]
    assert checkpointed["activation_bytes_per_image"] < plain["activation_bytes_per_image"]
    assert plain["flops_per_image"] < checkpointed["flops_per_image"] < 2 * plain["flops_per_image"]


def test_state_bytes_and_the_largest_batch_are_plain_arithmetic() -> None:
    params, units = 1000, [100, 300, 50]  # two sharded units, then the root
    assert per_gpu_state_bytes(params, units, 4, "ddp") == (20 + 4) * params
    assert per_gpu_state_bytes(params, units, 4, "fsdp") == 20 * params // 4 + 8 * (50 + 2 * 300)
    assert largest_batch(100.0, 20, 8) == 10
    assert largest_batch(100.0, 120, 8) == 0
    with pytest.raises(ValueError, match="sharding"):
        per_gpu_state_bytes(params, units, 4, "zero")


def test_the_plan_is_consistent(tiny_plan: dict[str, Any]) -> None:
    cluster = Cluster(gpus=4, gpu_memory_gib=0.01, headroom=0.1)
    assert tiny_plan["state_bytes"]["adam"] == STATE_BYTES_PER_PARAMETER["adam"] * tiny_plan["parameters"]
    assert tiny_plan["schedule_images"] == schedule_images("tiny")
    for entry in (tiny_plan["no_checkpointing"], tiny_plan["checkpointing"]):
        per_image = entry["activation_bytes_per_image"]
        for sharding in ("ddp", "fsdp"):
            fixed, batch = entry[sharding]["fixed_bytes"], entry[sharding]["max_batch"]
            assert fixed + batch * per_image <= cluster.usable_bytes < fixed + (batch + 1) * per_image
        assert entry["fsdp"]["max_batch"] >= entry["ddp"]["max_batch"]
        assert entry["images_per_s_per_gpu"] == pytest.approx(0.4 * 989e12 / entry["flops_per_image"])
        seconds = entry["days"] * 86_400
        assert math.isclose(seconds * entry["images_per_s_per_gpu"] * cluster.gpus, tiny_plan["schedule_images"])


def test_cluster_assumptions_are_checked() -> None:
    with pytest.raises(ValueError, match="mfu"):
        Cluster(mfu=1.5)
    with pytest.raises(ValueError, match="gpus"):
        Cluster(gpus=0)


def test_the_cli_prints_the_table_and_writes_json(tiny_plan: dict[str, Any], tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr(farmer.plan, "plan", lambda name, cluster: tiny_plan)  # counted once, by the fixture
    out = tmp_path / "plan.json"
    assert main(["plan", "--preset", "tiny", "--gpus", "4", "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "tiny" in printed and "40% MFU of 989 TFLOP/s" in printed
    written = json.loads(out.read_text())
    assert written["plans"] == [tiny_plan] and written["assumptions"]["gpus"] == 4
    assert main(["plan"]) == 2
    assert main(["plan", "--preset", "nope"]) == 2
    assert "unknown preset 'nope'" in capsys.readouterr().err
