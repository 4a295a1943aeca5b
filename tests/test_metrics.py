"""Tests for farmer.metrics: bits/dim, Fréchet distance, precision/recall, Inception features, caches."""

from __future__ import annotations

import importlib.util
import math
import re

import numpy as np
import pytest
import scipy.linalg
import torch

from farmer import metrics
from farmer.data import load_arrays
from farmer.metrics import (
    InceptionFeatures,
    bits_per_dim,
    feature_statistics,
    fid_from_features,
    frechet_distance,
    legacy_resize_matrix,
    precision_recall,
    reference_features,
)

HAS_FID_PACKAGE = importlib.util.find_spec(metrics.FID_PACKAGE) is not None
needs_inception = pytest.mark.skipif(
    not HAS_FID_PACKAGE, reason=f"Inception weights absent: {metrics.FID_PACKAGE_INSTALL}"
)


def _arrays_or_skip(name: str, split: str) -> np.ndarray:
    try:
        return load_arrays(name, split)[0]
    except FileNotFoundError as err:
        pytest.skip(f"{name} data absent ({err})")


# ---------------------------------------------------------------------------------------------------
# bits/dim
# ---------------------------------------------------------------------------------------------------


def test_bits_per_dim_of_uniform_density_is_eight():
    # Uniform density on [-1, 1]^D is 2^-D, NLL = D ln 2 nats: exactly the 8 bits of a uniform byte.
    dims = 784
    nll = torch.tensor([dims * math.log(2.0), 0.0, -dims * math.log(2.0)])
    assert torch.allclose(bits_per_dim(nll, dims), torch.tensor([8.0, 7.0, 6.0]))


def test_bits_per_dim_rejects_bad_dims():
    with pytest.raises(ValueError, match="num_dims"):
        bits_per_dim(torch.zeros(2), 0)
    with pytest.raises(TypeError, match="Tensor"):
        bits_per_dim(np.zeros(2), 3)


# ---------------------------------------------------------------------------------------------------
# Fréchet distance
# ---------------------------------------------------------------------------------------------------


def test_feature_statistics_match_numpy():
    feats = np.random.default_rng(0).normal(size=(50, 7)).astype(np.float32)
    mu, sigma = feature_statistics(torch.from_numpy(feats))
    assert mu.dtype == np.float64 and sigma.shape == (7, 7)
    np.testing.assert_allclose(mu, feats.astype(np.float64).mean(0), rtol=1e-12)
    np.testing.assert_allclose(sigma, np.cov(feats.astype(np.float64), rowvar=False), rtol=1e-12)


@pytest.mark.parametrize(
    ("bad", "message"),
    [(np.zeros(5), "2-D"), (np.zeros((1, 3)), "at least 2"), (np.full((4, 2), np.nan), "NaN")],
)
def test_feature_statistics_rejects_bad_input(bad, message):
    with pytest.raises(ValueError, match=message):
        feature_statistics(bad)


@pytest.mark.parametrize("num", [500, 40])  # 40 < 64: a rank-deficient covariance
def test_fid_of_a_set_with_itself_is_zero(num):
    feats = np.random.default_rng(1).normal(size=(num, 64)) * np.linspace(0.1, 3.0, 64)
    assert fid_from_features(feats, feats) == pytest.approx(0.0, abs=1e-6)


def test_frechet_distance_diagonal_closed_form_and_rotation_invariance():
    rng = np.random.default_rng(2)
    mu1, mu2 = rng.normal(size=6), rng.normal(size=6)
    s1, s2 = rng.uniform(0.1, 4.0, size=6), rng.uniform(0.1, 4.0, size=6)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum(s1 + s2 - 2.0 * np.sqrt(s1 * s2))
    assert frechet_distance(mu1, np.diag(s1), mu2, np.diag(s2)) == pytest.approx(expected, rel=1e-10)
    # The same pair in a rotated basis: full covariances, same distance.
    rotation, _ = np.linalg.qr(rng.normal(size=(6, 6)))
    rotated = frechet_distance(
        rotation @ mu1,
        rotation @ np.diag(s1) @ rotation.T,
        rotation @ mu2,
        rotation @ np.diag(s2) @ rotation.T,
    )
    assert rotated == pytest.approx(expected, rel=1e-9)


def test_frechet_distance_matches_sqrtm_formula_for_full_covariances():
    rng = np.random.default_rng(3)
    a, b = rng.normal(size=(10, 10)), rng.normal(size=(10, 10))
    s1, s2 = a @ a.T + 0.1 * np.eye(10), b @ b.T + 0.1 * np.eye(10)
    mu1, mu2 = rng.normal(size=10), rng.normal(size=10)
    reference = np.sum((mu1 - mu2) ** 2) + np.trace(s1 + s2 - 2.0 * scipy.linalg.sqrtm(s1 @ s2).real)
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(reference, rel=1e-8)
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(frechet_distance(mu2, s2, mu1, s1), rel=1e-8)


def test_frechet_distance_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="means"):
        frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))
    with pytest.raises(ValueError, match="sigma2"):
        frechet_distance(np.zeros(3), np.eye(3), np.zeros(3), np.eye(2))
    with pytest.raises(ValueError, match="NaN"):
        frechet_distance(np.zeros(2), np.eye(2), np.array([0.0, np.nan]), np.eye(2))


# ---------------------------------------------------------------------------------------------------
# Precision / recall
# ---------------------------------------------------------------------------------------------------


def _naive_precision_recall(real: np.ndarray, fake: np.ndarray, k: int) -> tuple[float, float]:
    def radii(x):
        d = np.linalg.norm(x[:, None] - x[None], axis=-1)
        return np.sort(d, axis=1)[:, k]

    def covered(queries, centres, r):
        d = np.linalg.norm(queries[:, None] - centres[None], axis=-1)
        return float((d <= r[None]).any(axis=1).mean())

    return covered(fake, real, radii(real)), covered(real, fake, radii(fake))


def test_precision_recall_identical_sets_are_one_and_far_sets_zero():
    feats = torch.randn(200, 16, generator=torch.Generator().manual_seed(4))
    assert precision_recall(feats, feats.clone()) == (1.0, 1.0)
    assert precision_recall(feats, feats + 100.0) == (0.0, 0.0)


def test_precision_recall_of_a_mode_dropping_generator():
    # Real data: two far clusters; "generated": exactly the points of one. All fakes are realistic
    # (precision 1) but only half of the real data is covered (recall 1/2).
    rng = np.random.default_rng(5)
    cluster_a, cluster_b = rng.normal(size=(100, 8)), rng.normal(size=(100, 8)) + 50.0
    precision, recall = precision_recall(np.concatenate([cluster_a, cluster_b]), cluster_a)
    assert precision == 1.0
    assert recall == 0.5


def test_precision_recall_chunked_equals_naive(monkeypatch):
    rng = np.random.default_rng(6)
    real, fake = rng.normal(size=(120, 5)), rng.normal(size=(90, 5)) * 1.3 + 0.4
    expected = _naive_precision_recall(real, fake, k=4)
    monkeypatch.setattr(metrics, "_DISTANCE_BLOCK", 1000)  # forces ~8-row blocks
    assert precision_recall(real, fake, k=4) == pytest.approx(expected, abs=1e-12)
    assert 0.0 < expected[0] < 1.0 and 0.0 < expected[1] < 1.0  # a case where both counts matter


def test_precision_recall_rejects_bad_input():
    feats = torch.randn(10, 4)
    with pytest.raises(ValueError, match="feature sizes"):
        precision_recall(feats, torch.randn(10, 3))
    with pytest.raises(ValueError, match="more than k"):
        precision_recall(feats, torch.randn(3, 4), k=3)
    with pytest.raises(ValueError, match="k must"):
        precision_recall(feats, feats, k=0)


# ---------------------------------------------------------------------------------------------------
# Inception features
# ---------------------------------------------------------------------------------------------------


def test_legacy_resize_matrix_small_case():
    # 2 -> 4: output j samples input j/2 (TF1 legacy, no half-pixel shift), the last clamped.
    expected = torch.tensor([[1.0, 0.0], [0.5, 0.5], [0.0, 1.0], [0.0, 1.0]])
    assert torch.equal(legacy_resize_matrix(2, 4), expected)


def test_legacy_resize_matches_grid_sample_formulation():
    # The same resize written as grid_sample with the output grid shifted so that output pixel j lands
    # on input position j * in / out (border padding clamps the right edge).
    x = torch.rand(2, 3, 28, 28) * 255
    size_in, size_out = 28, 299
    theta = torch.tensor([[[1.0, 0.0, 1 / size_in - 1 / size_out], [0.0, 1.0, 1 / size_in - 1 / size_out]]])
    grid = torch.nn.functional.affine_grid(theta.expand(2, 2, 3), [2, 3, size_out, size_out], align_corners=False)
    reference = torch.nn.functional.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
    matrix = legacy_resize_matrix(size_in, size_out)
    ours = torch.einsum("oh,nchw,pw->ncop", matrix, x, matrix)
    assert torch.allclose(ours, reference, atol=1e-3)
    assert torch.allclose(matrix.sum(dim=1), torch.ones(size_out))


def test_missing_fid_package_gives_install_hint(monkeypatch):
    monkeypatch.setattr(metrics.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ModuleNotFoundError, match=re.escape(metrics.FID_PACKAGE_INSTALL)):
        InceptionFeatures()


@pytest.fixture(scope="module")
def inception() -> InceptionFeatures:
    if not HAS_FID_PACKAGE:
        pytest.skip(f"Inception weights absent: {metrics.FID_PACKAGE_INSTALL}")
    return InceptionFeatures(batch_size=2)


@needs_inception
def test_inception_features_shape_grayscale_and_batching(inception):
    images = torch.randint(0, 256, (3, 1, 28, 28), dtype=torch.uint8, generator=torch.Generator().manual_seed(7))
    feats = inception(images)  # batches of 2 and 1
    assert feats.shape == (3, 2048) and feats.dtype == np.float32 and np.isfinite(feats).all()
    assert (feats >= 0).all()  # pool3 averages ReLU outputs
    rgb = inception(images.expand(-1, 3, -1, -1).numpy())
    np.testing.assert_allclose(feats, rgb, rtol=1e-5, atol=1e-5)
    single = inception(images[1:2])
    np.testing.assert_allclose(feats[1:2], single, rtol=1e-4, atol=1e-4)
    assert not np.allclose(feats[0], feats[1])


@needs_inception
def test_inception_rejects_bad_images(inception):
    with pytest.raises(ValueError, match="uint8"):
        inception(torch.zeros(2, 3, 28, 28))
    with pytest.raises(ValueError, match="C in"):
        inception(torch.zeros(2, 2, 28, 28, dtype=torch.uint8))


@needs_inception
def test_inception_fid_separates_datasets(inception):
    # Few images, so both numbers carry a large small-sample bias; the gap between them is what counts.
    count = 64  # ~200 Inception passes: about a minute on 2 CPU cores
    mnist_train = inception(_arrays_or_skip("mnist", "train")[:count])
    mnist_test = inception(_arrays_or_skip("mnist", "test")[:count])
    fashion = inception(_arrays_or_skip("fashion-mnist", "test")[:count])
    same = fid_from_features(mnist_train, mnist_test)
    different = fid_from_features(mnist_train, fashion)
    # Measured here: 35 and 225 with 200 images each; 62 and 250 with 64 (small samples inflate both).
    assert same < 100.0
    assert different > 3.0 * same


# ---------------------------------------------------------------------------------------------------
# Reference statistics
# ---------------------------------------------------------------------------------------------------


class _CountingExtractor:
    """Mean pixel rows as features; counts how often it is asked."""

    name = "row-means"

    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, images: torch.Tensor) -> np.ndarray:
        self.calls += 1
        return images.double().mean(dim=(1, 3)).numpy()


def reference_statistics(*args, **kwargs):
    return feature_statistics(reference_features(*args, **kwargs))


def test_reference_features_are_cached(tmp_path):
    extractor = _CountingExtractor()
    mu, sigma = reference_statistics("digits", "test", extractor, cache_dir=tmp_path, max_images=100)
    images = load_arrays("digits", "test")[0][:100]
    expected_mu, expected_sigma = feature_statistics(images.astype(np.float64).mean(axis=(1, 3)))
    np.testing.assert_allclose(mu, expected_mu)
    np.testing.assert_allclose(sigma, expected_sigma)
    cache = tmp_path / "digits-test-row-means-100.npz"
    assert cache.is_file() and extractor.calls == 1

    again = reference_statistics("digits", "test", extractor, cache_dir=tmp_path, max_images=100)
    assert extractor.calls == 1
    np.testing.assert_array_equal(again[0], mu)

    reference_statistics("digits", "test", extractor, cache_dir=tmp_path)  # all 297: another key
    assert extractor.calls == 2 and (tmp_path / "digits-test-row-means-297.npz").is_file()

    cache.write_bytes(b"not a zip file")  # a corrupt cache is recomputed, not trusted
    recomputed = reference_statistics("digits", "test", extractor, cache_dir=tmp_path, max_images=100)
    assert extractor.calls == 3
    np.testing.assert_allclose(recomputed[1], sigma)


def test_fid_report_takes_precision_recall_references_from_the_cached_features(tmp_path, monkeypatch):
    """One pass over the reference split serves FID and precision/recall; later reports featurise only samples."""
    from farmer.evaluation import fid_report

    monkeypatch.setenv("FARMER_DATA", str(tmp_path))  # the default cache lives under the data root
    extractor = _CountingExtractor()
    real = torch.from_numpy(np.array(load_arrays("digits", "test")[0][:100]))  # uint8 NCHW
    first = fid_report(real, "digits", reference_images=100, precision_recall_images=100, extractor=extractor,
                       progress=False)
    assert extractor.calls == 3  # the reference split once, the real-vs-real split once, the samples once
    again = fid_report(real, "digits", reference_images=100, precision_recall_images=100, extractor=extractor,
                       progress=False)
    assert extractor.calls == 4 and again == first
    assert first["fid_real_vs_real"] > 1e-3 and first["real_vs_real"] == "100 digits/train images"
    assert abs(first["fid"]) < 1e-6 and first["precision"] == first["recall"] == 1.0  # the reference itself
    assert first["reference_images"] == 100


def test_reference_features_rejects_bad_count(tmp_path):
    with pytest.raises(ValueError, match="max_images"):
        reference_statistics("digits", "test", _CountingExtractor(), cache_dir=tmp_path, max_images=1)
