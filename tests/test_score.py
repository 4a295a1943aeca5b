"""Likelihood as a feature: per-image bits/dim (`farmer score`), AUROC, and OOD detection (`farmer eval ood`)."""

import csv
import json

import numpy as np
import pytest
import torch
from helpers import random_model
from PIL import Image

from farmer.cli import main
from farmer.data import make_dataset
from farmer.evaluation import class_log_likelihoods, ood_scores, score_images
from farmer.images import png_bits_per_dim
from farmer.metrics import auroc
from farmer.pixels import dequantize


def test_auroc_counts_ordered_pairs_and_half_ties() -> None:
    assert auroc([0.0, 1.0], [2.0, 3.0]) == 1.0
    assert auroc([2.0, 3.0], [0.0, 1.0]) == 0.0
    assert auroc([0.0, 2.0], [1.0, 3.0]) == 0.75  # 3 of the 4 (negative, positive) pairs are ordered
    assert auroc([1.0, 1.0], [1.0]) == 0.5
    rng = np.random.default_rng(0)
    neg, pos = rng.normal(size=300), rng.normal(0.5, size=200).round(1)  # rounding makes ties
    pairs = (pos[:, None] > neg[None]).mean() + 0.5 * (pos[:, None] == neg[None]).mean()
    assert auroc(neg, pos) == pytest.approx(pairs, abs=1e-12)
    with pytest.raises(ValueError, match="non-empty"):
        auroc([], [1.0])


def test_class_log_likelihoods_are_log_prob_under_each_class_then_the_null_class() -> None:
    model = random_model()
    x = torch.rand(3, 1, 8, 8) * 2 - 1
    table = class_log_likelihoods(model, x)
    assert table.shape == (3, model.config.num_classes + 1)
    for c in range(model.config.num_classes):
        torch.testing.assert_close(table[:, c], model.log_prob(x, torch.full((3,), c)))
    torch.testing.assert_close(table[:, -1], model.log_prob(x))


def test_score_images_matches_log_prob_under_the_same_noise() -> None:
    model = random_model()
    pixels = torch.randint(0, 256, (5, 1, 8, 8), dtype=torch.uint8)
    labels = torch.tensor([0, 1, 2, 3, 4])
    scores = score_images(model, pixels, labels, batch_size=2, seed=3)
    x = torch.cat([dequantize(pixels[lo:lo + 2], "uniform", generator=g)
                   for g in [torch.Generator().manual_seed(3)] for lo in range(0, 5, 2)])
    nats = -model.log_prob(x, labels).detach()
    np.testing.assert_allclose(scores["bpd_conditional"], (nats / (64 * np.log(2)) + 7).numpy(), rtol=1e-5)
    assert (scores["bpd_best_class"] <= scores["bpd_conditional"] + 1e-6).all()
    assert set(scores) == {"bpd_unconditional", "bpd_conditional", "best_class", "bpd_best_class"}


def test_png_complexity_orders_flat_below_noisy_images() -> None:
    flat = torch.full((1, 1, 28, 28), 128, dtype=torch.uint8)
    noisy = torch.randint(0, 256, (1, 1, 28, 28), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    assert png_bits_per_dim(flat)[0] < 1 < 7 < png_bits_per_dim(noisy)[0]


def test_ood_scores_correct_the_likelihood() -> None:
    model = random_model()
    pixels = torch.randint(0, 256, (4, 1, 8, 8), dtype=torch.uint8)
    scores = ood_scores(model, pixels)
    raw = score_images(model, pixels)
    np.testing.assert_allclose(scores["complexity_corrected"], raw["bpd_unconditional"] - png_bits_per_dim(pixels))
    np.testing.assert_allclose(scores["class_ratio"], raw["bpd_best_class"] - raw["bpd_unconditional"])


def _read_csv(path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_score_cli_data_images_and_npz_agree(trained_run: str, tmp_path) -> None:
    by_data = tmp_path / "data.csv"
    assert main(["score", "--checkpoint", trained_run, "--data", "digits", "--max-images", "6", "--out",
                 str(by_data)]) == 0
    rows = _read_csv(by_data)
    assert len(rows) == 6 and list(rows[0]) == ["index", "label", "bpd_unconditional", "best_class",
                                                "bpd_best_class", "bpd_conditional"]
    dataset = make_dataset("digits", "test", None, 8)
    assert [int(r["label"]) for r in rows] == [dataset[i][1] for i in range(6)]

    folder = tmp_path / "images"
    folder.mkdir()
    for i in range(6):  # 8x8 grey PNGs: loaded back unchanged, so the same pixels and the same noise
        Image.fromarray(dataset[i][0][0].numpy()).save(folder / f"{i:02d}.png")
    by_files = tmp_path / "files.csv"
    assert main(["score", "--checkpoint", trained_run, "--images", str(folder), "--out", str(by_files)]) == 0
    files = _read_csv(by_files)
    assert [r["file"] for r in files] == [f"{i:02d}.png" for i in range(6)] and "label" not in files[0]
    assert [r["bpd_unconditional"] for r in files] == [r["bpd_unconditional"] for r in rows]


def test_eval_ood_cli_reports_auroc(trained_run: str, tmp_path, capsys) -> None:
    # The same images on both sides, with the same dequantisation noise: every score ties, AUROC 0.5.
    out = tmp_path / "ood.json"
    assert main(["eval", "ood", "--checkpoint", trained_run, "--in-data", "digits", "--ood-data", "digits",
                 "--n", "12", "--json", str(out)]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result == json.loads(out.read_text())
    assert result["metric"] == "ood" and result["images"] == {"in": 12, "ood": 12}
    assert set(result["scores"]) == {"bits_per_dim", "complexity_corrected", "class_ratio"}
    assert all(s["auroc"] == 0.5 for s in result["scores"].values())
