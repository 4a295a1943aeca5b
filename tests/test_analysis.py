"""The analyses of docs/method.md §9 (farmer.analysis) and the ablation runner (farmer.ablation)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import random_images, random_model, small_config
from PIL import Image

from farmer.ablation import (
    BASELINE,
    AblationConfig,
    matched_flow_blocks,
    parameter_counts,
    run_ablation,
    variant_config,
)
from farmer.analysis import (
    information_separation,
    logdet_outliers,
    redundant_variance_sweep,
    run_analysis,
    unguided_grid,
)
from farmer.checkpoint import save_checkpoint
from farmer.config import FarmerConfig
from farmer.data import default_data_root
from farmer.pixels import model_to_pixels


def assert_png(path: Path, min_side: int = 100) -> None:
    with Image.open(path) as image:
        image.verify()
        assert image.format == "PNG" and min(image.size) >= min_side


@pytest.fixture(scope="module")
def model():
    return random_model()


# Information separation ----------------------------------------------------------------------------------
def test_information_separation_partial_noise_hurts_less_and_zero_noise_reconstructs(model, tmp_path):
    images = random_images(model.config, 12)
    out = tmp_path / "separation.png"
    result = information_separation(model, images, out, noise_levels=(0.0, 0.25, 0.5, 1.0), show=3)
    partial, full = result["partial_mse"], result["full_mse"]
    assert result["blocks"] == [1, 2]
    assert partial.shape == full.shape == (2, 4)
    # a = 0 leaves Z^t untouched: the exact inverse through blocks t..1 gives the images back.
    assert np.all(partial[:, 0] < 1e-10) and np.all(full[:, 0] < 1e-10)
    # Noise on 2 of 4 channels (the redundant ones) destroys less than the same noise on all 4.
    assert np.all(partial[:, 1:] < full[:, 1:])
    assert np.all(np.diff(full, axis=1) > 0)  # more noise, more error
    assert_png(out)


def test_information_separation_accepts_uint8_pixels(model, tmp_path):
    pixels = model_to_pixels(random_images(model.config, 4))
    result = information_separation(model, pixels, tmp_path / "s.png", noise_levels=(0.0,))
    assert np.all(result["full_mse"] < 1e-10)


def test_information_separation_rejects_bad_input(model, tmp_path):
    with pytest.raises(ValueError, match="redundant channels"):
        information_separation(
            random_model(small_config(informative_channels=None)), random_images(model.config, 2), tmp_path / "x.png"
        )
    with pytest.raises(ValueError, match="noise_levels"):
        information_separation(model, random_images(model.config, 2), tmp_path / "x.png", noise_levels=(1.5,))
    with pytest.raises(ValueError, match="shape"):
        information_separation(model, torch.zeros(2, 1, 5, 5), tmp_path / "x.png")
    with pytest.raises(ValueError, match=r"\[-1, 1\]"):
        information_separation(model, random_images(model.config, 2) * 255, tmp_path / "x.png")


# Redundant-variance sweep --------------------------------------------------------------------------------
def test_variance_sweep_more_variance_changes_images_more(model, tmp_path):
    out = tmp_path / "variance.png"
    result = redundant_variance_sweep(model, None, out, scales=(0, 1, 4), draws=4)
    std = result["pixel_std"]
    assert result["scales"] == [0.0, 1.0, 4.0] and std.shape == (3,)
    assert np.all(np.isfinite(std)) and std[0] < std[1] < std[2]
    assert_png(out)


def test_variance_sweep_scale_zero_is_the_component_mean(tmp_path):
    # One redundant component: at scale 0 every draw is that component's mean, so the draws coincide.
    model = random_model(small_config(redundant_components=1))
    result = redundant_variance_sweep(model, [3, 7], tmp_path / "v.png", scales=(0, 0.5), draws=3)
    assert result["pixel_std"][0] < 1e-6 < result["pixel_std"][1]


def test_variance_sweep_rejects_bad_input(model, tmp_path):
    with pytest.raises(ValueError, match="scales"):
        redundant_variance_sweep(model, None, tmp_path / "v.png", scales=(-1,))
    with pytest.raises(ValueError, match="labels"):
        redundant_variance_sweep(model, [0, 12], tmp_path / "v.png")
    with pytest.raises(ValueError, match="draws"):
        redundant_variance_sweep(model, None, tmp_path / "v.png", draws=1)


# Log-det outliers ----------------------------------------------------------------------------------------
def test_logdet_outliers_counts_every_image_and_finds_the_extremes(model, tmp_path):
    images = random_images(model.config, 20, seed=3)
    out = tmp_path / "logdet.png"
    result = logdet_outliers(model, images, out, k=3, bins=7, batch_size=6)  # batches of 6, 6, 6, 2
    logdet = result["logdet"]
    assert logdet.shape == (20,) and result["counts"].sum() == 20 and len(result["bin_edges"]) == 8
    with torch.no_grad():
        expected = model.encode(images)[2].double().numpy()
    np.testing.assert_allclose(logdet, expected, rtol=1e-5, atol=1e-4)
    order = np.argsort(expected)
    assert list(result["lowest"]) == list(order[:3])
    assert list(result["highest"]) == list(order[::-1][:3])
    assert_png(out)
    with pytest.raises(ValueError, match="empty batch"):
        logdet_outliers(model, images[:0], out)


# Unguided s × T grid -------------------------------------------------------------------------------------
def test_unguided_grid_calls_the_metric_on_every_cell(model, tmp_path):
    calls = []

    def metric(pixels, labels):
        calls.append((pixels.shape, pixels.dtype, labels.tolist()))
        return {"mean_pixel": pixels.float().mean().item(), "num_images": float(len(pixels))}

    out = tmp_path / "grid.png"
    result = unguided_grid(
        model, out, variance_scales=(0.5, 1.0), temperatures=(1.0, 2.0, 3.0), n_per_cell=12, metric_fn=metric
    )
    assert len(calls) == 6
    assert all(shape == (12, 1, 8, 8) and dtype == torch.uint8 for shape, dtype, _ in calls)
    assert calls[0][2] == [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 0, 1]  # class-balanced labels
    grid = result["metrics"]["mean_pixel"]
    assert set(result["metrics"]) == {"mean_pixel"} and grid.shape == (2, 3)
    assert np.all(np.isfinite(grid)) and len(np.unique(grid)) > 1  # s and T change the samples
    assert_png(out)


def test_unguided_grid_rejects_bad_input(model, tmp_path):
    with pytest.raises(ValueError, match="pass metric_fn"):  # an 8x8 model has no classifier
        unguided_grid(model, tmp_path / "g.png")
    with pytest.raises(ValueError, match="> 0"):
        unguided_grid(model, tmp_path / "g.png", variance_scales=(0.0,), metric_fn=lambda p, y: {"a": 1.0})


@pytest.mark.skipif(not (default_data_root() / "mnist").is_dir(), reason="MNIST not prepared")
def test_unguided_grid_default_classifier_metrics(tmp_path):
    model = random_model(small_config(image_size=28, patch_size=7))
    result = unguided_grid(model, tmp_path / "g.png", variance_scales=(1.0,), temperatures=(1.0,), n_per_cell=20)
    metrics = {k: float(v[0, 0]) for k, v in result["metrics"].items()}
    assert set(metrics) == {"classifier_score", "frechet_distance", "accuracy"}
    assert 1.0 <= metrics["classifier_score"] <= 10.0 and metrics["frechet_distance"] > 0
    assert 0.0 <= metrics["accuracy"] <= 1.0


# Checkpoint entry point ----------------------------------------------------------------------------------
def test_run_analysis_on_a_checkpoint_writes_png_and_json(model, tmp_path):
    run = tmp_path / "run"
    config = {"model": model.config.to_dict(), "train": {"data": "digits"}}
    save_checkpoint(run, 1, config, model.state_dict(), model.state_dict())
    record = run_analysis("logdet", run, tmp_path / "out", num_images=16)
    stored = json.loads((tmp_path / "out" / "logdet.json").read_text())
    assert stored == record and stored["data"] == "digits" and sum(stored["counts"]) == 16
    assert_png(tmp_path / "out" / "logdet.png")
    with pytest.raises(ValueError, match="unknown analysis"):
        run_analysis("fid", run, tmp_path / "out")


# Ablation ------------------------------------------------------------------------------------------------
def test_normal_prior_variant_matches_the_baseline_parameter_count():
    cfg = AblationConfig(preset="tiny")
    baseline, normal = variant_config(cfg, BASELINE), variant_config(cfg, "normal_prior")
    target = parameter_counts(baseline)["total"]
    counts = parameter_counts(normal)
    assert normal.prior == "normal" and counts["prior"] == 0 and normal.flow_blocks > baseline.flow_blocks
    # No other block count gets closer to the baseline's total.
    for blocks in (normal.flow_blocks - 1, normal.flow_blocks + 1):
        other = parameter_counts(normal.replace(flow_blocks=blocks))["total"]
        assert abs(other - target) >= abs(counts["total"] - target)
    assert matched_flow_blocks(baseline, normal) == normal
    assert variant_config(cfg, "no_dim_reduction").informative_dim == baseline.token_dim
    assert variant_config(cfg, "cfg_naive") == baseline


def test_ablation_smoke_writes_the_table_and_resumes(tmp_path):
    cfg = AblationConfig.smoke(guided_metrics=True)
    lines: list[str] = []
    results = run_ablation(cfg, tmp_path, log=lines.append)
    assert [r["variant"] for r in results] == [BASELINE, "no_final_permute"]
    assert all(np.isfinite(r["test_bpd"]) and r["test_bpd"] > 0 for r in results)
    # Guided samples carry the redundant pool's effective sample size, between 1 and the pool's size.
    pool = 10 * FarmerConfig.preset(cfg.preset).num_tokens  # the shared mixture's (s_c + s_u)·N candidates
    for r in results:
        assert r["redundant_ess"] is None and r["cfg_redundant_pool"] == pool
        assert 1 <= r["cfg_redundant_ess"] <= pool
    assert results[1]["model"]["final_permute"] is False and results[0]["model"]["final_permute"] is True
    table = (tmp_path / "results.md").read_text()
    assert "| farmer | baseline |" in table and "| no_final_permute |" in table
    assert json.loads((tmp_path / "results.json").read_text())["results"] == results
    for name in (BASELINE, "no_final_permute"):
        assert_png(tmp_path / name / "samples.png", min_side=40)  # 20 samples of 8x8, 10 per row

    # Resuming: finished variants are read back, nothing is trained again.
    lines.clear()
    assert run_ablation(cfg, tmp_path, log=lines.append) == results
    assert lines == [f"[{name}] done already: {tmp_path / name / 'result.json'}" for name in cfg.variants]
    with pytest.raises(ValueError, match="different budget"):
        run_ablation(AblationConfig.smoke(steps=5), tmp_path, log=lines.append)


def test_guided_metrics_skip_the_unguidable_standard_normal_prior(tmp_path):
    (result,) = run_ablation(AblationConfig.smoke(guided_metrics=True, variants=("normal_prior",)), tmp_path,
                             log=lambda _: None)
    assert result["guidance_scale"] is None and "cfg_accuracy" not in result
    assert np.isfinite(result["test_bpd"]) and result["stripe_ratio"] > 0


def test_ablation_config_rejects_unknown_variants():
    with pytest.raises(ValueError, match="unknown or no variants"):
        AblationConfig(variants=("farmer", "no_such_thing"))
