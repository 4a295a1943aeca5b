"""End-to-end: the `farmer` command as a user runs it (train -> eval -> distill -> sample)."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from farmer.cli import main, parse_classes, shipped_checkpoint


def test_train_writes_checkpoints_metrics_and_samples(trained_run: str) -> None:
    run = Path(trained_run)
    assert (run / "LATEST").read_text().strip() == "step-00000012"
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "test_bpd" in r] == [6, 12]
    assert Image.open(run / "samples" / "step-00000012.png").size[0] > 0
    config = json.loads((run / "step-00000012" / "config.json").read_text())
    assert config["model"]["name"] == "tiny" and config["train"]["steps"] == 12


def test_eval_bpd_reports_json(trained_run: str, capsys) -> None:
    assert main(["eval", "bpd", "--checkpoint", trained_run, "--data", "digits", "--max-images", "64"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["images"] == 64 and 0 < result["bits_per_dim"] < 12 and result["importance_samples"] == 1
    # docs/method.md §5: a conditional model's bits are of log p(x | c); those of the null class come beside them
    assert 0 < result["unconditional_bits_per_dim"] < 12
    assert result["unconditional_bits_per_dim"] != result["bits_per_dim"]
    assert main(["eval", "bpd", "--checkpoint", trained_run, "--data", "digits", "--max-images", "64",
                 "--importance-samples", "4"]) == 0
    tighter = json.loads(capsys.readouterr().out)
    assert tighter["importance_samples"] == 4 and tighter["bits_per_dim"] < result["bits_per_dim"]
    assert main(["eval", "bpd", "--checkpoint", trained_run, "--data", "digits", "--max-images", "64",
                 "--breakdown"]) == 0
    split = json.loads(capsys.readouterr().out)
    assert abs(split["bits_per_dim"] - result["bits_per_dim"]) < 1e-4  # the same dequantisation draws
    parts = ("bin_width", "informative", "redundant", "flow")
    assert abs(sum(split[f"{part}_bits_per_dim"] for part in parts) - split["bits_per_dim"]) < 1e-4
    assert main(["eval", "bpd", "--checkpoint", trained_run, "--data", "digits", "--breakdown",
                 "--importance-samples", "4"]) == 2


def test_sample_grid_and_npz(trained_run: str, tmp_path) -> None:
    grid, npz = tmp_path / "grid.png", tmp_path / "samples.npz"
    assert main(["sample", "--checkpoint", trained_run, "--n", "20", "--classes", "0-9", "--guidance", "2.5",
                 "--out", str(grid), "--npz", str(npz)]) == 0
    assert Image.open(grid).size[0] > 0
    data = np.load(npz)
    assert data["arr_0"].shape == (20, 8, 8, 1) and data["arr_0"].dtype == np.uint8
    assert data["labels"].tolist() == [c for c in range(10) for _ in range(2)]


def test_bare_sample_draws_the_guided_class_grid(trained_run: str, tmp_path, capsys) -> None:
    # No --classes, --n or --guidance: the README's recipe, one row per class 0-9, 10 each, resampling CFG w = 2.5,
    # which equals asking for it; --cfg none samples unguided.
    bare, recipe, unguided = (tmp_path / f"{name}.npz" for name in ("bare", "recipe", "unguided"))
    assert main(["sample", "--checkpoint", trained_run, "--npz", str(bare), "--precision", "fp32"]) == 0
    assert main(["sample", "--checkpoint", trained_run, "--npz", str(recipe), "--classes", "0-9", "--n", "100",
                 "--guidance", "2.5"]) == 0
    assert main(["sample", "--checkpoint", trained_run, "--npz", str(unguided), "--cfg", "none"]) == 0
    images, labels = np.load(bare)["arr_0"], np.load(bare)["labels"]
    assert images.shape[0] == 100 and labels.tolist() == [c for c in range(10) for _ in range(10)]
    assert np.array_equal(images, np.load(recipe)["arr_0"])
    assert not np.array_equal(images, np.load(unguided)["arr_0"])


def test_distill_then_sample_with_either_inverse(trained_run: str, tmp_path) -> None:
    out = tmp_path / "distilled"
    assert main(["distill", "--teacher", trained_run, "--out", str(out), "--steps", "4", "--batch-size", "16"]) == 0
    # The flow and prior keep the teacher's 12 steps of training; the 4 distillation steps train the student only.
    assert json.loads((out / "step-00000004" / "config.json").read_text())["pretrained_steps"] == 12
    for inverse in ("exact", "distilled"):
        path = tmp_path / f"{inverse}.npz"
        assert main(["sample", "--checkpoint", str(out), "--n", "4", "--out", str(tmp_path / "g.png"),
                     "--npz", str(path), "--inverse", inverse, "--seed", "1"]) == 0
    exact, distilled = np.load(tmp_path / "exact.npz")["arr_0"], np.load(tmp_path / "distilled.npz")["arr_0"]
    assert exact.shape == distilled.shape  # same latents, two inverses: close but not bit-equal images
    assert np.abs(exact.astype(int) - distilled.astype(int)).mean() < 64


def test_errors_are_reported_not_raised(tmp_path, capsys) -> None:
    assert main(["sample", "--checkpoint", str(tmp_path / "missing")]) == 2
    assert "checkpoint not found" in capsys.readouterr().err
    with pytest.raises(ValueError, match="out of range"):
        parse_classes("0-12", 10)
    assert parse_classes("1,4-6", 10) == [1, 4, 5, 6]


def test_shipped_model_is_package_data_and_samples_by_name(tmp_path) -> None:
    import farmer

    checkpoint = shipped_checkpoint()
    assert checkpoint.parent.parent == Path(farmer.__file__).parent  # farmer/checkpoints/mnist: in the wheel too
    torch.manual_seed(0)
    out = tmp_path / "grid.png"
    assert main(["sample", "--checkpoint", "mnist", "--n", "10", "--classes", "0-9", "--out", str(out)]) == 0
    assert Image.open(out).size[0] > 0


def test_eval_sub_commands_list_only_their_own_flags(capsys) -> None:
    helps = {}
    for metric in ("bpd", "fid", "classifier", "distill", "ood"):
        with pytest.raises(SystemExit):
            main(["eval", metric, "--help"])
        helps[metric] = capsys.readouterr().out
    assert "--guidance" not in helps["bpd"] and "--max-images" in helps["bpd"]
    assert "--ref-stats" in helps["fid"] and "--ref-stats" not in helps["classifier"]
    assert "--inverse" not in helps["distill"] and "--inverse" in helps["classifier"]
    assert "--ood-data" in helps["ood"] and "--npz" not in helps["ood"]


def test_train_and_distill_flags_are_train_config_fields() -> None:
    """The flags come from one table of TrainConfig field names, and each reaches its field."""
    import dataclasses

    from farmer.cli import _TRAIN_FIELD_FLAGS, DISTILL_FLAGS, TRAIN_FLAGS, _flag_values, build_parser
    from farmer.train import TrainConfig

    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    assert set(_TRAIN_FIELD_FLAGS) <= fields and set(TRAIN_FLAGS) | set(DISTILL_FLAGS) == set(_TRAIN_FIELD_FLAGS)
    args = build_parser().parse_args(["train", "--out", "x", "--lr", "0.5", "--warmup-steps", "3", "--compile",
                                      "--init-from", "mnist", "--precision", "bf16"])
    given = {k: v for k, v in _flag_values(args, TRAIN_FLAGS).items() if v is not None}
    assert given == {"lr": 0.5, "warmup_steps": 3, "compile": True, "init_from": "mnist", "precision": "bf16"}
    args = build_parser().parse_args(["distill", "--teacher", "t", "--out", "x", "--teacher-weights", "raw"])
    assert _flag_values(args, DISTILL_FLAGS)["teacher_weights"] == "raw"


def test_user_errors_are_one_line_and_bugs_keep_their_traceback(monkeypatch, capsys) -> None:
    import farmer.cli
    from farmer.io import FarmerError

    for error in (ValueError("bad input"), OSError("disk"), ImportError("pip install x"), FarmerError("busy")):
        monkeypatch.setattr(farmer.cli, "cmd_presets", lambda args, error=error: (_ for _ in ()).throw(error))
        assert main(["presets"]) == 2
        assert capsys.readouterr().err == f"farmer: error: {error}\n"
    for bug in (TypeError("a bug"), RuntimeError("another")):
        monkeypatch.setattr(farmer.cli, "cmd_presets", lambda args, bug=bug: (_ for _ in ()).throw(bug))
        with pytest.raises(type(bug)):
            main(["presets"])


def test_version_and_defaults_in_help(capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0 and capsys.readouterr().out.startswith("farmer ")
    with pytest.raises(SystemExit):
        main(["sample", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "(default: 0)" in text and "default: 250" in text and "(default: auto)" in text
