"""Trainer: bitwise-exact resume, DDP and FSDP under torchrun (CPU, gloo), data order, LR schedule."""

from __future__ import annotations

import itertools
import json
import math
import os
import signal
import socket
import subprocess
import sys
from collections import Counter
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

import farmer.train as trainer
from farmer.checkpoint import (
    OPTIMIZER,
    SHARDED_STATE,
    TRAINER,
    is_sharded_checkpoint,
    load_sharded_weights,
    save_checkpoint,
)
from farmer.config import FarmerConfig
from farmer.model import Farmer
from farmer.pretrained import CONFIG, EMA_WEIGHTS, MODEL_WEIGHTS, read_config, resolve_checkpoint
from farmer.train import StepSampler, TrainConfig, learning_rate, train

REPO = Path(__file__).resolve().parents[1]
TINY = FarmerConfig.preset("tiny")


def tiny_train(**changes: Any) -> TrainConfig:
    """The tiny preset cut down to a few steps on a few images, every step logged."""
    base = {
        **TrainConfig.preset("tiny").to_dict(),
        "batch_size": 8,
        "warmup_steps": 3,
        "eval_images": 16,
        "log_every": 1,
    }
    return TrainConfig(**{**base, **changes})


pytestmark = pytest.mark.usefixtures("one_thread")


def run(model_config: FarmerConfig, cfg: TrainConfig, out: Path, stop_at: int | None = None) -> dict[str, Any]:
    return train(model_config, cfg, out, device="cpu", progress=False, log=lambda _: None, stop_at=stop_at)


# Checkpoint comparison helpers -------------------------------------------------------------------------------
def step_dirs(run_dir: Path) -> list[str]:
    return sorted(p.name for p in run_dir.glob("step-*") if p.is_dir())


def assert_bitwise_equal_checkpoints(a: Path, b: Path) -> None:
    """Same weights, EMA, optimizer tensors, trainer state (RNGs, optimizer scalars) and config."""
    for name in (MODEL_WEIGHTS, EMA_WEIGHTS, OPTIMIZER):
        ta, tb = load_file(a / name), load_file(b / name)
        assert ta.keys() == tb.keys(), name
        for key in ta:
            assert ta[key].dtype == tb[key].dtype and torch.equal(ta[key], tb[key]), f"{name}: {key} differs"
    for name in (TRAINER, CONFIG):
        assert json.loads((a / name).read_text()) == json.loads((b / name).read_text()), name


def metric_records(run_dir: Path) -> list[dict[str, Any]]:
    """metrics.jsonl without its wall-clock fields, sample paths reduced to file names."""
    records = []
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        record = {k: v for k, v in json.loads(line).items() if k not in ("time", "images_per_s")}
        if "samples" in record:
            record["samples"] = Path(record["samples"]).name
        records.append(record)
    return records


def assert_no_duplicate_steps(records: list[dict[str, Any]]) -> None:
    kinds = Counter(("train" if "loss" in r else "eval", r["step"]) for r in records)
    assert not [key for key, count in kinds.items() if count > 1], f"duplicate records: {kinds}"


# Exact resume ---------------------------------------------------------------------------------------------
# 8 steps; evaluation and saving every 3, sampling every 6. Label dropout and Gaussian dequantisation stay on:
# every random stream of training must survive the restart.
RESUME_CFG = tiny_train(steps=8, grad_accum=2, eval_every=3, save_every=3, sample_every=6)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("uninterrupted")
    run(TINY, RESUME_CFG, out)
    return out


def assert_same_as_uninterrupted(resumed: Path, reference: Path) -> None:
    assert step_dirs(resumed) == step_dirs(reference) == ["step-00000006", "step-00000008"]
    for name in step_dirs(reference):
        assert_bitwise_equal_checkpoints(resumed / name, reference / name)
    records = metric_records(resumed)
    assert_no_duplicate_steps(records)
    assert records == metric_records(reference)  # losses, grad norms, bits/dim: all bit for bit
    final = "samples/step-00000008.png"
    assert (resumed / final).read_bytes() == (reference / final).read_bytes()


@pytest.mark.parametrize("stop_at", [4, 6], ids=["between-boundaries", "on-eval-sample-save-step"])
def test_stop_and_resume_is_bitwise_exact(uninterrupted: Path, tmp_path: Path, stop_at: int) -> None:
    run(TINY, RESUME_CFG, tmp_path, stop_at=stop_at)
    assert (tmp_path / "LATEST").read_text().strip() == f"step-{stop_at:08d}"
    run(TINY, RESUME_CFG, tmp_path)
    assert_same_as_uninterrupted(tmp_path, uninterrupted)


def sigterm_at_step(monkeypatch: pytest.MonkeyPatch, step: int) -> None:
    """The process receives SIGTERM while step ``step`` is being logged (a preemption in the middle of a run)."""
    log_step = trainer._Session._log_step

    def logging_then_sigterm(self: Any, done: int, *args: Any) -> dict[str, Any]:
        if done == step:
            signal.raise_signal(signal.SIGTERM)
        return log_step(self, done, *args)

    monkeypatch.setattr(trainer._Session, "_log_step", logging_then_sigterm)


def test_sigterm_saves_the_step_and_resume_is_bitwise_exact(uninterrupted: Path, tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    before = signal.getsignal(signal.SIGTERM)
    sigterm_at_step(monkeypatch, 4)
    with pytest.raises(trainer.TrainingInterrupted, match="SIGTERM after step 4") as stopped:
        run(TINY, RESUME_CFG, tmp_path)
    assert stopped.value.exit_status == 143
    assert signal.getsignal(signal.SIGTERM) == before  # the trainer's handler is gone with it
    assert (tmp_path / "LATEST").read_text().strip() == "step-00000004"
    monkeypatch.undo()
    run(TINY, RESUME_CFG, tmp_path)
    assert_same_as_uninterrupted(tmp_path, uninterrupted)


def test_the_cli_exits_143_after_a_sigterm_and_resumes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    from farmer.cli import main

    command = ["train", "--preset", "tiny", "--data", "digits", "--out", str(tmp_path), "--steps", "12",
               "--eval-every", "100", "--sample-every", "100", "--save-every", "100"]
    sigterm_at_step(monkeypatch, 10)  # the tiny preset logs every 10 steps
    assert main(command) == 143
    assert "SIGTERM after step 10" in capsys.readouterr().err
    assert (tmp_path / "LATEST").read_text().strip() == "step-00000010"
    monkeypatch.undo()
    assert main(command) == 0
    assert (tmp_path / "LATEST").read_text().strip() == "step-00000012"


def test_resume_after_a_crash_drops_the_lost_steps_metrics(
    uninterrupted: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def crash_in_step_5(step: int, cfg: TrainConfig) -> float:
        if step == 4:
            raise RuntimeError("simulated crash")
        return learning_rate(step, cfg)

    monkeypatch.setattr(trainer, "learning_rate", crash_in_step_5)
    with pytest.raises(RuntimeError, match="simulated crash"):
        run(TINY, RESUME_CFG, tmp_path)
    monkeypatch.undo()
    # Step 4 was trained and logged, but the last checkpoint is step 3: its metrics must not survive twice.
    assert (tmp_path / "LATEST").read_text().strip() == "step-00000003"
    assert max(r["step"] for r in metric_records(tmp_path)) == 4
    run(TINY, RESUME_CFG, tmp_path)
    assert_same_as_uninterrupted(tmp_path, uninterrupted)


def test_resume_with_another_model_config_is_refused(tmp_path: Path) -> None:
    save_checkpoint(tmp_path, 1, {"model": TINY.to_dict()}, Farmer(TINY).state_dict())
    with pytest.raises(ValueError, match=r"cannot resume .*prior_layers"):
        run(TINY.replace(prior_layers=2), RESUME_CFG, tmp_path)


def test_init_from_starts_a_new_run_from_a_checkpoints_weights(uninterrupted: Path, tmp_path: Path) -> None:
    """Fine-tuning: the new run starts from the source's EMA weights."""
    source = Farmer.from_pretrained(uninterrupted)
    cfg = replace(RESUME_CFG, init_from=str(uninterrupted), steps=1, save_every=1, eval_every=1, sample_every=1,
                  lr=1e-12, min_lr=0.0, warmup_steps=1)
    run(TINY, cfg, tmp_path / "fine-tuned")
    tuned = Farmer.from_pretrained(tmp_path / "fine-tuned", ema=False)
    # The steps behind the weights add up along a chain of fine-tunes: 8 + 1, then 9 + 1.
    assert read_config(resolve_checkpoint(tmp_path / "fine-tuned"))["pretrained_steps"] == RESUME_CFG.steps
    run(TINY, replace(cfg, init_from=str(tmp_path / "fine-tuned")), tmp_path / "twice")
    assert read_config(resolve_checkpoint(tmp_path / "twice"))["pretrained_steps"] == RESUME_CFG.steps + 1
    for name, value in source.state_dict().items():  # one step at lr 1e-12 moves nothing measurable
        torch.testing.assert_close(tuned.state_dict()[name], value, rtol=0, atol=1e-9, msg=name)
    with pytest.raises(ValueError, match=r"--init-from .*prior_layers"):
        run(TINY.replace(prior_layers=2), cfg, tmp_path / "mismatch")
    # The training recipe is not the architecture: a fine-tune may change it and starts from the same weights.
    recipe = TINY.replace(dequantization="uniform", noise_std_start=0.02, label_dropout=0.2)
    run(recipe, cfg, tmp_path / "new-recipe")
    retuned = Farmer.from_pretrained(tmp_path / "new-recipe", ema=False)
    assert retuned.config == recipe
    for name, value in source.state_dict().items():
        torch.testing.assert_close(retuned.state_dict()[name], value, rtol=0, atol=1e-9, msg=name)


# DDP and FSDP under torchrun ------------------------------------------------------------------------------------
DRIVER = '''\
"""torchrun driver: train (stopping and resuming as told), then write this rank's final weights."""
import json
import signal
import sys
from pathlib import Path

import torch.distributed as dist
from safetensors.torch import save_file

import farmer.train as trainer
from farmer.config import FarmerConfig

spec = json.loads(Path(sys.argv[1]).read_text())
captured = []
gather = trainer.full_state


def capture(module, rt, cfg):
    # Every rank gathers the model, then the EMA, for each checkpoint: keep this rank's copies.
    state = gather(module, rt, cfg)
    captured.append(state)
    return state


trainer.full_state = capture
sigterm = spec.get("sigterm")  # {"rank": r, "step": s}: rank r alone gets SIGTERM while logging step s, once
log_step = trainer._Session._log_step


def logging_then_sigterm(self, done, *args):
    if sigterm and dist.get_rank() == sigterm["rank"] and done == sigterm["step"]:
        sigterm.clear()
        signal.raise_signal(signal.SIGTERM)
    return log_step(self, done, *args)


trainer._Session._log_step = logging_then_sigterm
for out, stop_at in [(spec["out"], stop) for stop in spec["stops"]] + spec["then"]:
    try:
        trainer.train(FarmerConfig.from_dict(spec["model"]), trainer.TrainConfig.from_dict(spec["train"]),
                      out, device="cpu", progress=False, log=lambda _: None, stop_at=stop_at)
    except trainer.TrainingInterrupted as stopped:
        print(f"rank {dist.get_rank()}: {stopped}", flush=True)
model, ema = captured[-2:] if spec["capture"] else ({}, {})
if model:  # FSDP gathers full state on rank 0 only
    tensors = {**{"model." + k: v for k, v in model.items()}, **{"ema." + k: v for k, v in ema.items()}}
    save_file({k: v.contiguous() for k, v in tensors.items()}, f"{spec['out']}/rank{dist.get_rank()}.safetensors")
dist.destroy_process_group()
'''

# The 1-process and 2-process runs see the same global batches (StepSampler gives rank r the r-th strided
# share; DDP averages gradients) but not the same random draws: label dropout uses the global RNG and the
# dequantisation noise a generator, both seeded per rank, so the single process draws other masks and
# noise. Label dropout is therefore off, and the noise std is 1e-6 (1/7800 of a pixel bin), so the noise
# moves the weights by ~1e-7 in 4 steps. The rest of the difference is float summation order (~1e-7).
DIST_MODEL = TINY.replace(label_dropout=0.0, noise_std_start=1e-6, noise_std_end=1e-6)
DIST_STEPS = 4
DIST_ATOL = 1e-5  # vs. a training movement of ~5e-3 per weight (checked below)
DIST_CFG = tiny_train(steps=DIST_STEPS, batch_size=16, warmup_steps=2, eval_every=100, sample_every=100, save_every=100)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(tmp_path: Path, cfg: TrainConfig, stops: list[int | None],
             sigterm: dict[str, int] | None = None, capture: bool = True,
             then: list[tuple[str, int | None]] = ()) -> tuple[Path, str]:
    """Two CPU processes (gloo) training ``cfg`` into tmp_path/run; returns the run dir and their output.
    ``capture``: each rank writes the full model and EMA state of its last full save (rank{r}.safetensors).
    ``then``: afterwards, in the same processes, train into tmp_path/NAME up to each (NAME, stop_at)."""
    out = tmp_path / "run"
    driver, spec = tmp_path / "driver.py", tmp_path / "spec.json"
    driver.write_text(DRIVER)
    spec.write_text(json.dumps({"model": DIST_MODEL.to_dict(), "train": cfg.to_dict(), "out": str(out),
                                "stops": stops, "sigterm": sigterm, "capture": capture,
                                "then": [(str(tmp_path / name), stop) for name, stop in then]}))
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
    }
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]))
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node=2",
            f"--master_port={free_port()}",
            str(driver),
            str(spec),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=400,
    )
    assert result.returncode == 0, f"torchrun failed:\n{result.stdout[-3000:]}\n{result.stderr[-6000:]}"
    return out, result.stdout


@pytest.fixture(scope="module")
def single_process(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The 1-process reference: same global batch size (16), grad_accum 1."""
    out = tmp_path_factory.mktemp("single")
    run(DIST_MODEL, DIST_CFG, out)
    return out


def optimizer_by_position(step_dir: Path) -> dict[str, torch.Tensor]:
    """Optimizer tensors keyed by their parameter's position: plain runs key them by index, FSDP by name."""
    groups = json.loads((step_dir / TRAINER).read_text())["optimizer"]["param_groups"]
    position = {str(key): i for i, key in enumerate(itertools.chain.from_iterable(g["params"] for g in groups))}
    tensors = {}
    for name, value in load_file(step_dir / OPTIMIZER).items():
        key, kind = name.rsplit("/", 1)
        tensors[f"{position[key]}/{kind}"] = value
    return tensors


def assert_matches_single_process(weights: dict[str, torch.Tensor], out: Path, single: Path) -> None:
    """Final model and EMA weights within DIST_ATOL of the 1-process run, optimizer moments within 1e-7."""
    torch.manual_seed(DIST_CFG.seed)  # the trainer's initial weights
    initial = Farmer(DIST_MODEL).state_dict()
    final = f"step-{DIST_STEPS:08d}"
    optim, reference_optim = optimizer_by_position(out / final), optimizer_by_position(single / final)
    assert optim.keys() == reference_optim.keys()
    for key, value in reference_optim.items():  # moments are ~1e-2 (exp_avg) and ~1e-3 (exp_avg_sq)
        torch.testing.assert_close(optim[key], value, rtol=1e-4, atol=1e-7, msg=lambda m, k=key: f"{k}: {m}")
    for prefix, file in (("model.", MODEL_WEIGHTS), ("ema.", EMA_WEIGHTS)):
        reference = load_file(single / final / file)
        assert {prefix + k for k in reference} == {k for k in weights if k.startswith(prefix)}
        moved = max((reference[k] - initial[k]).abs().max().item() for k in reference)
        assert moved > 100 * DIST_ATOL, f"{file}: training moved the weights by only {moved:.2g}"
        worst = max((weights[prefix + k] - v).abs().max().item() for k, v in reference.items())
        assert worst < DIST_ATOL, f"{file}: 2 processes differ from 1 by {worst:.3g}"


def logged_losses(run_dir: Path) -> list[float]:
    return [r["loss"] for r in metric_records(run_dir) if "loss" in r]


def test_ddp_two_processes_agree_with_each_other_and_with_one_process(tmp_path: Path, single_process: Path) -> None:
    # grad_accum 2 (micro-batches of 4 per rank) also exercises no_sync; stopping at step 1 and resuming
    # exercises restoring each rank's own RNG state. A SIGTERM to rank 1 alone at step 2 stops both ranks there.
    out, output = torchrun(tmp_path, replace(DIST_CFG, grad_accum=2), stops=[1, None, None],
                           sigterm={"rank": 1, "step": 2})
    assert all(f"rank {r}: stopped by SIGTERM after step 2" in output for r in (0, 1)), output
    ranks = [load_file(out / f"rank{r}.safetensors") for r in (0, 1)]
    assert ranks[0].keys() == ranks[1].keys()
    for key in ranks[0]:
        assert torch.equal(ranks[0][key], ranks[1][key]), f"ranks disagree on {key}"
    # What rank 0 saved is what both ranks hold.
    final = out / f"step-{DIST_STEPS:08d}"
    for key, value in load_file(final / MODEL_WEIGHTS).items():
        assert torch.equal(ranks[0]["model." + key], value)
    assert_matches_single_process(ranks[0], out, single_process)
    assert logged_losses(out) == pytest.approx(logged_losses(single_process), rel=1e-5)


def test_fsdp_trains_saves_a_plain_checkpoint_and_resumes(tmp_path: Path, single_process: Path) -> None:
    # Stop at step 2 and resume: evaluation at step 3 (then training goes on) and at the end, with samples.
    out, _ = torchrun(tmp_path, replace(DIST_CFG, sharding="fsdp", checkpoint_format="full", eval_every=3),
                      stops=[2, None])
    model = Farmer.from_pretrained(out, ema=False)  # a plain, unsharded Farmer
    ema = Farmer.from_pretrained(out)
    weights = {
        **{"model." + k: v for k, v in model.state_dict().items()},
        **{"ema." + k: v for k, v in ema.state_dict().items()},
    }
    rank0 = load_file(out / "rank0.safetensors")
    assert all(torch.equal(rank0[k], v) for k, v in weights.items())
    assert_matches_single_process(weights, out, single_process)
    assert logged_losses(out) == pytest.approx(logged_losses(single_process), rel=1e-5)
    assert (out / f"samples/step-{DIST_STEPS:08d}.png").is_file()


def test_fsdp_sharded_checkpoints_resume_exactly_and_load_as_a_plain_model(tmp_path: Path) -> None:
    # Each rank writes its own shards; stopping at step 2 and resuming must end where an uninterrupted run ends.
    cfg = replace(DIST_CFG, sharding="fsdp", checkpoint_format="sharded", eval_every=3)
    resumed, _ = torchrun(tmp_path, cfg, stops=[2, None], capture=False, then=[("straight", None), ("half", 2)])
    straight = tmp_path / "straight"
    final = resumed / f"step-{DIST_STEPS:08d}"
    assert is_sharded_checkpoint(final) and not (final / MODEL_WEIGHTS).exists()
    assert not (final / OPTIMIZER).exists()
    assert {p.name for p in (final / SHARDED_STATE).glob("*.distcp")} == {"__0_0.distcp", "__1_0.distcp"}
    for ema in (False, True):
        ours, reference = load_sharded_weights(resumed, ema=ema), load_sharded_weights(straight, ema=ema)
        assert ours.keys() == reference.keys()
        for key, value in reference.items():
            assert torch.equal(ours[key], value), f"{'ema' if ema else 'model'} {key} differs after the resume"
    assert logged_losses(resumed) == logged_losses(straight)
    # One process resumes the 2 processes' shards (its data noise differs, as in the tests above: DIST_ATOL).
    run(DIST_MODEL, cfg, tmp_path / "half")
    alone = Farmer.from_pretrained(tmp_path / "half", ema=False).state_dict()
    torch.manual_seed(DIST_CFG.seed)
    initial = Farmer(DIST_MODEL).state_dict()
    reference = load_sharded_weights(straight)
    assert max((reference[k] - initial[k]).abs().max().item() for k in reference) > 100 * DIST_ATOL
    assert max((alone[k] - v).abs().max().item() for k, v in reference.items()) < DIST_ATOL
    # A plain model comes out of the run directory: its EMA weights, the same as the shards hold.
    model = Farmer.from_pretrained(resumed)
    for key, value in load_sharded_weights(resumed, ema=True).items():
        assert torch.equal(model.state_dict()[key], value), key
    with pytest.raises(FileNotFoundError, match="sharded training checkpoint"):
        Farmer.from_pretrained(resumed, ema=False)
    from farmer.cli import main

    assert main(["sample", "--checkpoint", str(resumed), "--n", "4", "--out", str(tmp_path / "grid.png")]) == 0
    assert (tmp_path / "grid.png").is_file()


def test_saves_and_evaluations_by_the_clock_are_extra_points_of_an_exact_run(uninterrupted: Path,
                                                                             tmp_path: Path) -> None:
    # A clock that is always due: a save and a test evaluation at every (logging) step.
    cfg = replace(RESUME_CFG, save_every_minutes=1e-9, eval_every_minutes=1e-9)
    run(TINY, cfg, tmp_path, stop_at=4)
    assert step_dirs(tmp_path) == ["step-00000003", "step-00000004"]
    run(TINY, cfg, tmp_path)
    assert step_dirs(tmp_path) == ["step-00000007", "step-00000008"]
    final = "step-00000008"
    for name in (MODEL_WEIGHTS, EMA_WEIGHTS, OPTIMIZER):
        ours, reference = load_file(tmp_path / final / name), load_file(uninterrupted / final / name)
        assert all(torch.equal(ours[k], v) for k, v in reference.items()), name
    assert json.loads((tmp_path / final / TRAINER).read_text()) == json.loads(
        (uninterrupted / final / TRAINER).read_text())
    evaluated = [r["step"] for r in metric_records(tmp_path) if "test_bpd" in r]
    assert evaluated == list(range(1, 9))


# Data order ----------------------------------------------------------------------------------------------------
def batches(size: int, cfg: TrainConfig, start: int = 0, rank: int = 0, world: int = 1) -> list[list[int]]:
    return list(StepSampler(size, cfg, start, rank, world))


def test_step_sampler_is_a_pure_function_of_seed_and_step() -> None:
    cfg = tiny_train(steps=12, batch_size=6, grad_accum=2)
    full = batches(20, cfg)  # 3 steps per epoch: crosses 3 epoch boundaries
    assert len(full) == len(StepSampler(20, cfg, 0)) == 12 * 2
    for start in (1, 3, 7):
        assert batches(20, cfg, start) == full[start * 2 :], f"resuming at step {start} changes the data order"
    assert batches(20, cfg) == full
    assert batches(20, replace(cfg, seed=1)) != full


def test_step_sampler_epochs_are_permutations() -> None:
    cfg = tiny_train(steps=6, batch_size=5)
    indices = [i for b in batches(10, cfg) for i in b]
    for epoch in range(3):
        assert sorted(indices[epoch * 10 : (epoch + 1) * 10]) == list(range(10))
    assert indices[:10] != indices[10:20]  # a fresh permutation per epoch


@pytest.mark.parametrize(("world", "grad_accum"), [(2, 1), (2, 2), (4, 1)])
def test_rank_shares_partition_the_global_batch(world: int, grad_accum: int) -> None:
    cfg = tiny_train(steps=5, batch_size=8, grad_accum=grad_accum)
    micro = 8 // (world * grad_accum)
    global_batches = batches(40, replace(cfg, grad_accum=1))
    shares = [batches(40, cfg, 0, rank, world) for rank in range(world)]
    for step in range(cfg.steps):
        per_rank = [s[step * grad_accum : (step + 1) * grad_accum] for s in shares]
        assert all(len(chunk) == micro for chunks in per_rank for chunk in chunks)
        union = [i for chunks in per_rank for chunk in chunks for i in chunk]
        assert sorted(union) == sorted(global_batches[step])  # disjoint and complete


def test_step_sampler_rejects_bad_sizes() -> None:
    with pytest.raises(ValueError, match="divisible by world size"):
        StepSampler(100, tiny_train(batch_size=6), 0, 0, world=4)
    with pytest.raises(ValueError, match="fewer than one batch"):
        StepSampler(7, tiny_train(batch_size=8), 0)


# Learning-rate schedule ------------------------------------------------------------------------------------------
def test_learning_rate_warms_up_linearly_then_follows_a_cosine_to_min_lr() -> None:
    cfg = tiny_train(steps=110, warmup_steps=10, lr=1e-3, min_lr=1e-5)
    lrs = [learning_rate(s, cfg) for s in range(cfg.steps + 1)]
    assert lrs[:10] == pytest.approx([1e-3 * (s + 1) / 10 for s in range(10)])
    assert lrs[10] == pytest.approx(1e-3)  # the peak, right after warm-up
    assert lrs[60] == pytest.approx((1e-3 + 1e-5) / 2)  # half way through the cosine
    assert lrs[35] == pytest.approx(1e-5 + (1e-3 - 1e-5) * (1 + math.cos(math.pi / 4)) / 2)
    assert lrs[110] == pytest.approx(1e-5)  # min_lr at the end
    assert learning_rate(500, cfg) == pytest.approx(1e-5)  # and after it
    assert all(a >= b for a, b in itertools.pairwise(lrs[10:]))


@pytest.mark.parametrize("dequantization", ["gaussian", "uniform"])
def test_training_log_names_the_loss_bits_apart_from_the_test_bound(tmp_path: Path, dequantization: str) -> None:
    # The training loss in bits is no bits/dim bound under Gaussian noise: it is logged as train_bits, and
    # only the uniform-dequantised test evaluation is test_bpd. The noise level exists only for Gaussian noise.
    model_config = TINY.replace(dequantization=dequantization)
    run(model_config, tiny_train(steps=2, eval_every=2, sample_every=100, save_every=100), tmp_path)
    records = metric_records(tmp_path)
    train_records = [r for r in records if "loss" in r]
    assert len(train_records) == 2 and not any("bpd" in r for r in records)
    for r in train_records:
        assert r["train_bits"] == pytest.approx(r["loss"] / math.log(2) + 7)
        assert ("noise_std" in r) == (dequantization == "gaussian")
    assert [r["step"] for r in records if "test_bpd" in r] == [2]


def test_the_compiled_loss_equals_the_eager_one_in_value_and_gradient() -> None:
    # What `farmer train --compile` runs: torch.compile over the loss module (here the model) must compute the
    # same loss and gradients. Eval mode: no label dropout, so both calls see the same labels.
    torch.manual_seed(0)
    model = Farmer(FarmerConfig.preset("tiny")).eval()
    cfg = model.config
    images = torch.rand(4, cfg.channels, cfg.image_size, cfg.image_size) * 2 - 1
    labels = torch.arange(4) % cfg.num_classes
    params = [p for p in model.parameters() if p.requires_grad]
    eager_loss, _ = model(images, labels)
    compiled_loss, _ = torch.compile(model)(images, labels)
    eager_grads = torch.autograd.grad(eager_loss, params)
    compiled_grads = torch.autograd.grad(compiled_loss, params)
    torch.testing.assert_close(compiled_loss, eager_loss, rtol=1e-5, atol=1e-5)
    for compiled, eager in zip(compiled_grads, eager_grads, strict=True):
        torch.testing.assert_close(compiled, eager, rtol=1e-4, atol=1e-5)


def test_the_optimizer_decays_matrices_only_and_the_ema_starts_as_a_frozen_copy() -> None:
    """make_optimizer/make_ema: the set-up the trainer and benchmarks/bench_train.py share. Matrices and embeddings
    are decayed (the channel mixing's L and U too), vectors (biases, norm gains, the mixing's log s) are not."""
    model = Farmer(FarmerConfig.preset("tiny").replace(channel_mixing=True))
    cfg = TrainConfig.preset("tiny")
    decayed, plain = trainer.make_optimizer(model, cfg).param_groups
    assert decayed["weight_decay"] == cfg.weight_decay and plain["weight_decay"] == 0.0
    assert decayed["lr"] == cfg.lr and decayed["betas"] == (cfg.beta1, cfg.beta2)
    names = {id(p): name for name, p in model.named_parameters()}
    assert {names[id(p)].rsplit(".", 1)[-1] for p in decayed["params"]} >= {"lower", "upper", "weight"}
    assert all(p.ndim < 2 for p in plain["params"]) and any(names[id(p)].endswith("log_scale") for p in plain["params"])
    assert len(decayed["params"]) + len(plain["params"]) == len(list(model.parameters()))
    ema = trainer.make_ema(model)
    assert not any(p.requires_grad for p in ema.parameters())
    assert all(torch.equal(a, b) for a, b in zip(ema.state_dict().values(), model.state_dict().values(), strict=True))
