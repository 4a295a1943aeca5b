"""Checkpoints: round trip, atomic saves under simulated crashes, clear load errors, optimizer state."""

from __future__ import annotations

import errno
import json
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from helpers import random_model, small_config
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

import farmer.checkpoint as ckpt
from farmer.checkpoint import (
    OPTIMIZER,
    SHARDED_STATE,
    TRAINER,
    flatten_optimizer_state,
    is_sharded_checkpoint,
    load_sharded_weights,
    save_checkpoint,
    save_sharded_checkpoint,
    unflatten_optimizer_state,
)
from farmer.model import Farmer
from farmer.pretrained import CONFIG, EMA_WEIGHTS, LATEST, MODEL_WEIGHTS, load_weights, read_config, resolve_checkpoint

CONFIG_TINY = small_config()


def _weights(seed: int) -> dict[str, torch.Tensor]:
    return random_model(CONFIG_TINY, seed=seed).state_dict()


def _save(run: Path, step: int, seed: int, **kwargs: object) -> Path:
    """A checkpoint whose model weights come from ``seed`` and whose EMA weights from ``seed + 100``."""
    return save_checkpoint(run, step, {"model": CONFIG_TINY.to_dict()}, _weights(seed), _weights(seed + 100), **kwargs)


def _assert_same_weights(model: torch.nn.Module, expected: dict[str, torch.Tensor]) -> None:
    state = model.state_dict()
    assert state.keys() == expected.keys()
    for key, value in expected.items():
        assert torch.equal(state[key], value), key


def _visible_entries(run: Path) -> set[str]:
    return {p.name for p in run.iterdir()}


# Round trip and bookkeeping ---------------------------------------------------------------------------
def test_round_trip_loads_ema_by_default_and_model_on_request(tmp_path: Path) -> None:
    final = _save(tmp_path, 7, seed=1)
    assert final == tmp_path / "step-00000007"
    assert (tmp_path / LATEST).read_text().strip() == final.name
    assert read_config(tmp_path)["step"] == 7
    _assert_same_weights(Farmer.from_pretrained(tmp_path), _weights(101))
    _assert_same_weights(Farmer.from_pretrained(final, ema=False), _weights(1))
    assert not Farmer.from_pretrained(tmp_path).training  # loaded for inference


def test_keep_prunes_old_steps_and_latest_follows_newest(tmp_path: Path) -> None:
    for step in (1, 2, 3):
        _save(tmp_path, step, seed=step, keep=2)
    assert _visible_entries(tmp_path) == {LATEST, "step-00000002", "step-00000003"}
    _assert_same_weights(Farmer.from_pretrained(tmp_path, ema=False), _weights(3))


def test_resaving_a_step_replaces_it(tmp_path: Path) -> None:
    _save(tmp_path, 1, seed=1)
    _save(tmp_path, 1, seed=2)
    assert _visible_entries(tmp_path) == {LATEST, "step-00000001"}
    _assert_same_weights(Farmer.from_pretrained(tmp_path, ema=False), _weights(2))


# Atomic saves -------------------------------------------------------------------------------------------
def _assert_previous_checkpoint_intact(run: Path) -> None:
    """LATEST still names step 1, which loads with its own weights, and no temporary entry is left."""
    assert (run / LATEST).read_text().strip() == "step-00000001"
    _assert_same_weights(Farmer.from_pretrained(run), _weights(101))
    _assert_same_weights(Farmer.from_pretrained(run, ema=False), _weights(1))
    assert not [p.name for p in run.iterdir() if p.name.startswith(".step-")], "temporary step dir left behind"


@pytest.mark.parametrize("failing_file", [MODEL_WEIGHTS, EMA_WEIGHTS, OPTIMIZER])
def test_crash_while_writing_a_file_keeps_the_previous_checkpoint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, failing_file: str
) -> None:
    _save(tmp_path, 1, seed=1)

    def half_written_then_crash(tensors: dict[str, torch.Tensor], filename: str) -> None:
        if Path(filename).name == failing_file:
            Path(filename).write_bytes(b"partial")  # the crash leaves a truncated file
            raise OSError("simulated crash: disk full")
        save_file(tensors, filename)

    monkeypatch.setattr(ckpt, "save_file", half_written_then_crash)
    model = torch.nn.Linear(2, 2)
    opt = torch.optim.AdamW(model.parameters())
    model(torch.ones(1, 2)).sum().backward()
    opt.step()
    with pytest.raises(OSError, match="simulated crash"):
        _save(tmp_path, 2, seed=2, optimizer=opt.state_dict(), trainer={"step": 2})
    assert _visible_entries(tmp_path) == {LATEST, "step-00000001"}
    _assert_previous_checkpoint_intact(tmp_path)


def test_crash_while_renaming_the_step_dir_keeps_the_previous_checkpoint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _save(tmp_path, 1, seed=1)
    real_replace = os.replace

    def crash_on_step_rename(src: str | Path, dst: str | Path) -> None:
        if Path(dst).name.startswith("step-"):
            raise OSError("simulated crash during rename")
        real_replace(src, dst)

    monkeypatch.setattr(ckpt.os, "replace", crash_on_step_rename)
    with pytest.raises(OSError, match="simulated crash"):
        _save(tmp_path, 2, seed=2)
    monkeypatch.undo()
    assert _visible_entries(tmp_path) == {LATEST, "step-00000001"}
    _assert_previous_checkpoint_intact(tmp_path)


def test_crash_before_latest_moves_keeps_pointing_at_the_previous_checkpoint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _save(tmp_path, 1, seed=1)
    real_replace = os.replace

    def crash_on_latest(src: str | Path, dst: str | Path) -> None:
        if Path(dst).name == LATEST:
            raise OSError("simulated crash before LATEST moved")
        real_replace(src, dst)

    monkeypatch.setattr(ckpt.os, "replace", crash_on_latest)
    with pytest.raises(OSError, match="simulated crash"):
        _save(tmp_path, 2, seed=2)
    monkeypatch.undo()
    # The new step dir is complete (it was renamed into place), but LATEST was never moved to it.
    _assert_previous_checkpoint_intact(tmp_path)
    _assert_same_weights(Farmer.from_pretrained(tmp_path / "step-00000002", ema=False), _weights(2))
    # The next save recovers: it rewrites step 2 and moves LATEST.
    _save(tmp_path, 2, seed=3)
    assert (tmp_path / LATEST).read_text().strip() == "step-00000002"
    _assert_same_weights(Farmer.from_pretrained(tmp_path, ema=False), _weights(3))


# Load errors --------------------------------------------------------------------------------------------
def test_missing_directory(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="is not a directory, a shipped model"):
        Farmer.from_pretrained(tmp_path / "nope")


def test_directory_without_config_or_latest(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=rf"neither {CONFIG} nor {LATEST}"):
        Farmer.from_pretrained(tmp_path)


def test_latest_pointing_at_a_missing_step(tmp_path: Path) -> None:
    _save(tmp_path, 1, seed=1)
    (tmp_path / LATEST).write_text("step-00000009\n")
    with pytest.raises(FileNotFoundError, match="step-00000009"):
        resolve_checkpoint(tmp_path)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b'{"format": 1, "model": {', "corrupt"),
        (b"\xff\xfe\x00garbage", "corrupt"),
        (b"[1, 2, 3]", "not a farmer checkpoint config"),
        (b'{"format": 99, "model": {}}', "not a farmer checkpoint config"),
        (b'{"format": 1}', "not a farmer checkpoint config"),
    ],
)
def test_corrupt_or_foreign_config(tmp_path: Path, content: bytes, message: str) -> None:
    step_dir = _save(tmp_path, 1, seed=1)
    (step_dir / CONFIG).write_bytes(content)
    with pytest.raises(ValueError, match=message) as info:
        Farmer.from_pretrained(tmp_path)
    assert CONFIG in str(info.value)  # the error names the file


def test_config_with_unknown_model_field(tmp_path: Path) -> None:
    step_dir = _save(tmp_path, 1, seed=1)
    data = json.loads((step_dir / CONFIG).read_text())
    data["model"]["wings"] = 2
    (step_dir / CONFIG).write_text(json.dumps(data))
    with pytest.raises(ValueError, match=r"unknown FarmerConfig field.*wings"):
        Farmer.from_pretrained(tmp_path)


@pytest.mark.parametrize("damage", ["truncated", "empty", "garbage"])
def test_corrupt_weights_file(tmp_path: Path, damage: str) -> None:
    step_dir = _save(tmp_path, 1, seed=1)
    file = step_dir / EMA_WEIGHTS
    data = file.read_bytes()
    file.write_bytes({"truncated": data[: len(data) // 2], "empty": b"", "garbage": b"\x07" * 64}[damage])
    with pytest.raises(ValueError, match=f"corrupt weights file.*{EMA_WEIGHTS}"):
        Farmer.from_pretrained(tmp_path)
    Farmer.from_pretrained(tmp_path, ema=False)  # the other file is untouched and still loads


def test_missing_weights_file(tmp_path: Path) -> None:
    step_dir = _save(tmp_path, 1, seed=1)
    (step_dir / MODEL_WEIGHTS).unlink()
    with pytest.raises(FileNotFoundError, match=f"missing weights file.*{MODEL_WEIGHTS}"):
        load_weights(step_dir / MODEL_WEIGHTS)
    with pytest.raises(FileNotFoundError, match=MODEL_WEIGHTS):
        Farmer.from_pretrained(tmp_path, ema=False)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"prior_width": 64}, "shape mismatch"),  # same tensors, other shapes
        ({"flow_blocks": 3}, "missing"),  # a block the weights do not have
        ({"flow_blocks": 1}, "unexpected"),  # weights of a block the config does not have
    ],
)
def test_config_edited_to_mismatch_the_weights(tmp_path: Path, change: dict[str, int], message: str) -> None:
    step_dir = _save(tmp_path, 1, seed=1)
    data = json.loads((step_dir / CONFIG).read_text())
    data["model"].update(change)
    (step_dir / CONFIG).write_text(json.dumps(data))
    with pytest.raises(ValueError, match=rf"does not match the model built from its config.*{message}"):
        Farmer.from_pretrained(tmp_path)


def test_expected_config_mismatch_lists_exactly_the_differing_fields(tmp_path: Path) -> None:
    _save(tmp_path, 1, seed=1)
    expected = CONFIG_TINY.replace(flow_width=64, noise_std_start=0.2)
    with pytest.raises(ValueError, match="does not match") as info:
        Farmer.from_pretrained(tmp_path, expected=expected)
    message = str(info.value)
    assert "flow_width" in message and "noise_std_start" in message
    assert "prior_width" not in message and "flow_blocks" not in message
    # The free-form name is provenance, not architecture: a different one still matches.
    assert isinstance(Farmer.from_pretrained(tmp_path, expected=CONFIG_TINY.replace(name="renamed")), Farmer)


# Optimizer state ------------------------------------------------------------------------------------------
def _trained_optimizer(seed: int) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.LayerNorm(4), torch.nn.Linear(4, 1))
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}], lr=1e-2
    )
    for _ in range(3):
        model(torch.randn(5, 3)).pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
    return model, opt


def test_optimizer_state_round_trips_through_safetensors_and_json(tmp_path: Path) -> None:
    model, opt = _trained_optimizer(seed=0)
    tensors, meta = flatten_optimizer_state(opt.state_dict())
    save_file(tensors, str(tmp_path / OPTIMIZER))
    (tmp_path / TRAINER).write_text(json.dumps(meta))
    meta = json.loads((tmp_path / TRAINER).read_text())
    restored = unflatten_optimizer_state(load_file(str(tmp_path / OPTIMIZER)), meta)

    original = opt.state_dict()
    # JSON turns the betas tuple into a list; AdamW reads either the same way (the next step below shows it).
    assert restored["param_groups"] == json.loads(json.dumps(original["param_groups"]))
    assert restored["state"].keys() == original["state"].keys()
    for index, entry in original["state"].items():
        assert restored["state"][index].keys() == entry.keys()
        for key, value in entry.items():
            assert torch.equal(restored["state"][index][key], value), (index, key)

    # A fresh optimizer loaded from the round trip takes the very same next step as the original.
    twin, twin_opt = _trained_optimizer(seed=1)
    twin.load_state_dict(model.state_dict())
    twin_opt.load_state_dict(restored)
    for m, o in ((model, opt), (twin, twin_opt)):
        torch.manual_seed(5)
        m(torch.randn(5, 3)).pow(2).mean().backward()
        o.step()
    for p, q in zip(model.parameters(), twin.parameters(), strict=True):
        assert torch.equal(p, q)


def test_optimizer_state_keeps_scalars_and_parameter_names() -> None:
    # Non-tensor entries go to JSON; FSDP's full state dicts key parameters by name rather than index.
    state = {
        "state": {"flow.blocks.0.pos": {"exp_avg": torch.ones(2), "step": 3}, 4: {"momentum": 0.5}},
        "param_groups": [{"lr": 0.1, "params": ["flow.blocks.0.pos", 4]}],
    }
    tensors, meta = flatten_optimizer_state(state)
    assert set(tensors) == {"flow.blocks.0.pos/exp_avg"}
    restored = unflatten_optimizer_state(tensors, json.loads(json.dumps(meta)))
    assert set(restored["state"]) == {"flow.blocks.0.pos", 4}
    assert restored["state"]["flow.blocks.0.pos"]["step"] == 3
    assert torch.equal(restored["state"]["flow.blocks.0.pos"]["exp_avg"], torch.ones(2))
    assert restored["state"][4] == {"momentum": 0.5}


# Reliability (issue #12) --------------------------------------------------------------------------------
@pytest.mark.parametrize(("edit", "message"), [
    (lambda data: data.update(model="tiny"), r"config\.json: 'model' must be an object/dict"),
    (lambda data: data["model"].update(final_permute="False"), "final_permute must be bool"),
    (lambda data: data["model"].update(log_scale_bound=float("nan")), "log_scale_bound must be finite"),
    (lambda data: data["model"].update(informative_channels="2"), "informative_channels must be int or None"),
    (lambda data: data.update(train=[1]), r"config\.json: 'train' must be an object/dict"),
])
def test_edited_config_json_is_type_checked_and_names_the_file(tmp_path: Path, edit, message: str) -> None:
    step_dir = _save(tmp_path, 1, seed=1)
    data = json.loads((step_dir / CONFIG).read_text())
    edit(data)
    (step_dir / CONFIG).write_text(json.dumps(data))  # json writes NaN as NaN, which it also reads
    with pytest.raises(ValueError, match=message) as info:
        Farmer.from_pretrained(tmp_path)
    assert str(step_dir / CONFIG) in str(info.value)


@pytest.mark.parametrize("which", ["weights", "ema", "optimizer"])
def test_non_finite_tensors_are_never_saved(tmp_path: Path, which: str) -> None:
    _save(tmp_path, 1, seed=1)
    weights, ema, optimizer = _weights(2), _weights(3), {"state": {0: {"exp_avg": torch.ones(3)}},
                                                         "param_groups": [{"params": [0]}]}
    poisoned = {"weights": weights, "ema": ema, "optimizer": optimizer["state"][0]}[which]
    key = next(iter(poisoned))
    poisoned[key] = torch.full_like(poisoned[key], float("nan"))
    with pytest.raises(ValueError, match=f"refusing to save step 2: tensor '.*{key.split('.')[-1]}'"):
        save_checkpoint(tmp_path, 2, {"model": CONFIG_TINY.to_dict()}, weights, ema, optimizer, keep=1)
    assert (tmp_path / LATEST).read_text().strip() == "step-00000001"  # nothing rotated away
    assert _visible_entries(tmp_path) == {LATEST, "step-00000001"}


def test_non_finite_weights_on_load_name_the_tensor(tmp_path: Path) -> None:
    step_dir = _save(tmp_path, 1, seed=1)
    state = load_file(step_dir / EMA_WEIGHTS)
    name = sorted(state)[3]
    state[name].view(-1)[0] = float("nan")  # a bit flip
    save_file(state, step_dir / EMA_WEIGHTS)
    with pytest.raises(ValueError, match=f"{EMA_WEIGHTS}: tensor '{name}' has NaN or Inf"):
        Farmer.from_pretrained(tmp_path)
    assert Farmer.from_pretrained(tmp_path, ema=False) is not None  # the raw weights are intact


def test_empty_latest_lists_the_available_steps(tmp_path: Path) -> None:
    _save(tmp_path, 1, seed=1)
    _save(tmp_path, 2, seed=2)
    (tmp_path / LATEST).write_text("\n")
    with pytest.raises(ValueError, match=r"LATEST is empty.*available: step-00000001, step-00000002"):
        Farmer.from_pretrained(tmp_path)


@pytest.mark.parametrize("error", [
    OSError(errno.ENOSPC, "No space left on device"),
    SafetensorError('Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: "No space left '
                    'on device" })'),
])
def test_full_disk_while_saving_says_which_step_is_intact(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                           error: Exception) -> None:
    _save(tmp_path, 1, seed=1)

    def full(tensors: dict, path: str) -> None:
        raise error

    monkeypatch.setattr(ckpt, "save_file", full)
    with pytest.raises(RuntimeError, match=r"no space left on device while saving step 2 .*step-00000001 is intact"):
        _save(tmp_path, 2, seed=2)
    assert _visible_entries(tmp_path) == {LATEST, "step-00000001"}  # no temporary left behind
    monkeypatch.undo()
    _assert_same_weights(Farmer.from_pretrained(tmp_path), _weights(101))


def test_run_directory_lock_is_exclusive_and_cleans_stale_saves(tmp_path: Path) -> None:
    _save(tmp_path, 1, seed=1)
    (tmp_path / ".step-00000002.k1ll3d").mkdir()  # what a kill during a save leaves
    (tmp_path / ".step-00000002.k1ll3d" / MODEL_WEIGHTS).write_bytes(b"half")
    (tmp_path / f".{LATEST}.tmp").write_text("step-00000002")
    with ckpt.lock_run_directory(tmp_path):
        assert _visible_entries(tmp_path) == {LATEST, "step-00000001", ckpt.LOCK}
        assert (tmp_path / ckpt.LOCK).read_text().strip() == str(os.getpid())
        with pytest.raises(RuntimeError, match=f"in use by another trainer \\(pid {os.getpid()}\\)"), \
                ckpt.lock_run_directory(tmp_path):
            pass
    with ckpt.lock_run_directory(tmp_path):  # released on exit
        pass
    (tmp_path / "file").write_text("")
    with pytest.raises(ValueError, match="is a file"), ckpt.lock_run_directory(tmp_path / "file"):
        pass


# Sharded (FSDP) checkpoints -----------------------------------------------------------------------------
@pytest.fixture
def one_process_group() -> Iterator[None]:
    """A one-process gloo group: save_sharded_checkpoint is a collective (tests/test_train.py runs two ranks)."""
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def _save_sharded(run: Path, step: int, seed: int, keep: int = 2) -> None:
    """Like _save: model weights from ``seed``, EMA from ``seed + 100``; the 'shards' are the whole tensors."""
    state = {"model": _weights(seed), "ema": _weights(seed + 100), "optimizer": {"state": {}, "param_groups": []}}
    save_sharded_checkpoint(run, step, {"model": CONFIG_TINY.to_dict()}, state, _weights(seed + 100),
                            {"step": step, "rng": []}, keep=keep)


def test_sharded_step_holds_shards_and_the_ema_as_safetensors(tmp_path: Path, one_process_group: None) -> None:
    _save(tmp_path, 1, seed=1)
    with pytest.raises(ValueError, match="not a sharded checkpoint"):
        load_sharded_weights(tmp_path / "step-00000001")
    for step in (2, 3):
        _save_sharded(tmp_path, step, seed=step)
    assert _visible_entries(tmp_path) == {LATEST, "step-00000002", "step-00000003"}  # rotated as full saves are
    final = resolve_checkpoint(tmp_path)
    assert final.name == "step-00000003" and is_sharded_checkpoint(final)
    assert {p.name for p in final.iterdir()} == {CONFIG, TRAINER, EMA_WEIGHTS, SHARDED_STATE}
    assert json.loads((final / TRAINER).read_text())["checkpoint_format"] == "sharded"
    _assert_same_weights(Farmer.from_pretrained(tmp_path), _weights(103))  # a plain model, from safetensors
    for ema, seed in ((False, 3), (True, 103)):
        loaded = load_sharded_weights(tmp_path, ema=ema)
        assert loaded.keys() == _weights(seed).keys()
        assert all(torch.equal(loaded[k], v) for k, v in _weights(seed).items())
    with pytest.raises(FileNotFoundError, match=r"sharded training checkpoint.*load_sharded_weights"):
        Farmer.from_pretrained(tmp_path, ema=False)


def test_crash_while_writing_shards_keeps_the_previous_checkpoint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, one_process_group: None
) -> None:
    import torch.distributed.checkpoint as dcp

    _save(tmp_path, 1, seed=1)

    def half_written_then_crash(state: dict[str, object], checkpoint_id: Path) -> None:
        Path(checkpoint_id).mkdir()
        (Path(checkpoint_id) / "__0_0.distcp").write_bytes(b"partial")
        raise OSError("simulated crash while writing shards")

    monkeypatch.setattr(dcp, "save", half_written_then_crash)
    with pytest.raises(OSError, match="simulated crash"):
        _save_sharded(tmp_path, 2, seed=2)
    assert _visible_entries(tmp_path) == {LATEST, "step-00000001"}
    _assert_previous_checkpoint_intact(tmp_path)


def test_non_finite_shards_are_never_saved(tmp_path: Path, one_process_group: None) -> None:
    _save(tmp_path, 1, seed=1)
    weights = _weights(2)
    name = next(iter(weights))
    weights[name][...] = float("nan")
    state = {"model": weights, "ema": _weights(102), "optimizer": {"state": {}, "param_groups": []}}
    with pytest.raises(ValueError, match=rf"refusing to save step 2: .*model shards: '{name}'"):
        save_sharded_checkpoint(tmp_path, 2, {"model": CONFIG_TINY.to_dict()}, state, _weights(102), {"step": 2})
    _assert_previous_checkpoint_intact(tmp_path)
