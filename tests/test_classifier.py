"""Tests for farmer.classifier: the network, the shipped weights, and the classifier sample metrics."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from farmer import classifier as classifier_module
from farmer.classifier import (
    CLASSIFIER_DATASETS,
    Classifier,
    classifier_info,
    classifier_metrics,
    classifier_score,
    load_classifier,
    train_classifier,
)
from farmer.data import load_arrays
from farmer.pixels import pixels_to_model

SUBSET = 1000


def _test_subset(dataset: str) -> tuple[torch.Tensor, torch.Tensor]:
    try:
        images, labels = load_arrays(dataset, "test")
    except FileNotFoundError as err:
        pytest.skip(f"{dataset} data absent ({err})")
    return torch.from_numpy(np.array(images[:SUBSET])), torch.from_numpy(np.array(labels[:SUBSET]))


@pytest.fixture(scope="module")
def stats_dir(tmp_path_factory):
    """One cache of reference statistics for the whole module (computed once per dataset)."""
    return tmp_path_factory.mktemp("classifier-stats")


def test_classifier_shapes_and_size():
    model = Classifier()
    x = torch.rand(5, 1, 28, 28) * 2 - 1
    assert model(x).shape == (5, 10)
    assert model.features(x).shape == (5, model.config["hidden"])
    assert 100_000 <= sum(p.numel() for p in model.parameters()) <= 300_000


def test_classifier_rejects_bad_input():
    model = Classifier()
    with pytest.raises(ValueError, match=r"\(B, 1, 28, 28\)"):
        model(torch.zeros(2, 3, 28, 28))
    with pytest.raises(ValueError, match="float"):
        model(torch.zeros(2, 1, 28, 28, dtype=torch.uint8))
    with pytest.raises(ValueError, match="channels"):
        Classifier(channels=(8, 16))


def test_classifier_score_extremes():
    # The same prediction for every image: p(y|x) = p(y), KL 0, score 1.
    same = torch.randn(1, 10).expand(50, 10)
    assert classifier_score(same) == pytest.approx(1.0, abs=1e-9)
    # Confident and balanced over 10 classes: KL = log 10 for every image, score 10.
    confident = 50.0 * torch.eye(10).repeat(5, 1)
    assert classifier_score(confident) == pytest.approx(10.0, rel=1e-6)
    # Confident but only two classes used: score 2.
    assert classifier_score(confident[:, :2][torch.tensor([0, 1] * 10)]) == pytest.approx(2.0, rel=1e-6)


@pytest.mark.parametrize("dataset", CLASSIFIER_DATASETS)
def test_shipped_weights_reach_recorded_accuracy(dataset):
    info = classifier_info(dataset)
    model = load_classifier(dataset)
    assert not model.training
    assert model.config == info["architecture"]
    assert info["test_accuracy"] >= (0.99 if dataset == "mnist" else 0.90)
    images, labels = _test_subset(dataset)
    with torch.inference_mode():
        accuracy = float((model(pixels_to_model(images)).argmax(1) == labels).double().mean())
    # A 1000-image subset of the 10000 the JSON was measured on: within a few standard errors.
    standard_error = math.sqrt(info["test_accuracy"] * (1 - info["test_accuracy"]) / SUBSET)
    assert accuracy == pytest.approx(info["test_accuracy"], abs=max(4 * standard_error, 0.005))


def test_metrics_on_real_mnist(stats_dir):
    images, labels = _test_subset("mnist")
    result = classifier_metrics(images, "mnist", labels=labels, cache_dir=stats_dir)
    assert result["classifier_score"] > 9.0
    assert result["accuracy"] >= 0.98
    assert result["num_images"] == SUBSET
    # A subset of the reference split itself: only the small-sample error separates the statistics.
    assert result["frechet_distance"] < 15.0

    shuffled = labels[torch.randperm(SUBSET, generator=torch.Generator().manual_seed(0))]
    chance = classifier_metrics(images, "mnist", labels=shuffled, cache_dir=stats_dir)["accuracy"]
    assert chance == pytest.approx(0.1, abs=0.04)

    repeated = classifier_metrics(images[:1].expand(200, -1, -1, -1), "mnist", cache_dir=stats_dir)
    assert repeated["classifier_score"] == pytest.approx(1.0, abs=1e-6)
    assert "accuracy" not in repeated


def test_frechet_distance_sees_the_wrong_dataset(stats_dir):
    mnist, _ = _test_subset("mnist")
    fashion, _ = _test_subset("fashion-mnist")
    real = classifier_metrics(mnist, "mnist", cache_dir=stats_dir)["frechet_distance"]
    wrong = classifier_metrics(fashion, "mnist", cache_dir=stats_dir)["frechet_distance"]
    assert wrong > 20 * real


def test_metrics_reject_bad_input(stats_dir):
    images = torch.zeros(4, 1, 28, 28, dtype=torch.uint8)
    with pytest.raises(ValueError, match="no classifier"):
        classifier_metrics(images, "digits")
    with pytest.raises(ValueError, match="uint8"):
        classifier_metrics(images.float(), "mnist")
    with pytest.raises(ValueError, match="at least 2"):
        classifier_metrics(images[:1], "mnist")
    with pytest.raises(ValueError, match="labels must be integers"):
        classifier_metrics(images, "mnist", labels=torch.zeros(3, dtype=torch.long), cache_dir=stats_dir)
    with pytest.raises(ValueError, match=r"labels must be in 0\.\.9"):
        classifier_metrics(images, "mnist", labels=torch.full((4,), 10), cache_dir=stats_dir)


def test_corrupt_weights_give_clear_error(monkeypatch):
    real_read = classifier_module._read_asset

    def read(dataset: str, suffix: str) -> bytes:
        # An 8-byte header length followed by a header that is not JSON.
        garbage = b"\x08\x00\x00\x00\x00\x00\x00\x00garbage!"
        return garbage if suffix == "safetensors" else real_read(dataset, suffix)

    monkeypatch.setattr(classifier_module, "_read_asset", read)
    with pytest.raises(ValueError, match="corrupt"):
        load_classifier("mnist")


def test_train_classifier_validates_arguments(tmp_path):
    with pytest.raises(ValueError, match="epochs"):
        train_classifier("mnist", tmp_path, epochs=0)
    with pytest.raises(ValueError, match="no classifier"):
        train_classifier("digits", tmp_path)


@pytest.mark.slow
def test_train_classifier_one_epoch(tmp_path):
    _test_subset("mnist")
    record = train_classifier("mnist", tmp_path, epochs=1, progress=False, command="pytest")
    assert record["test_accuracy"] > 0.97 and record["command"] == "pytest"
    model = Classifier(**record["architecture"])
    model.load_state_dict(load_file(tmp_path / "classifier-mnist.safetensors"))
    assert (tmp_path / "classifier-mnist.json").is_file()
