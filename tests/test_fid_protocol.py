"""The ImageNet FID protocol's pieces: ADM reference batches, and `farmer sample --npz` sharded over torchrun."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import farmer.metrics as metrics
from farmer.cli import main
from farmer.evaluation import fid_report
from farmer.images import save_samples
from farmer.metrics import feature_statistics, load_reference_statistics

REPO = Path(__file__).resolve().parents[1]


class RowMeans:
    """A cheap stand-in for the Inception network: per-row mean intensities."""

    name = "row-means"

    def __init__(self, **_: object) -> None:
        pass

    def __call__(self, images: torch.Tensor) -> np.ndarray:
        return images.double().mean(dim=(1, 3)).numpy()


def _images(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, 8, 8, 1), dtype=np.uint8)


def _adm_batch(path: Path, images: np.ndarray, with_images: bool = True) -> Path:
    """An ADM-format reference batch: mu/sigma of the images' features, and the images as arr_0."""
    mu, sigma = feature_statistics(RowMeans()(torch.from_numpy(images).permute(0, 3, 1, 2)))
    np.savez(path, mu=mu, sigma=sigma, **({"arr_0": images} if with_images else {}))
    return path


def test_adm_reference_batch_gives_fid_and_precision_recall(tmp_path) -> None:
    reference = _images(40, 0)
    batch = _adm_batch(tmp_path / "ref.npz", reference)
    same = fid_report(torch.from_numpy(reference).permute(0, 3, 1, 2), "unused", ref_stats=batch,
                      extractor=RowMeans(), precision_recall_images=40)
    assert same["fid"] == pytest.approx(0, abs=1e-8) and same["precision"] == same["recall"] == 1.0
    assert same["reference"] == str(batch) and same["precision_recall_images"] == 40

    darker = torch.from_numpy(reference // 4).permute(0, 3, 1, 2)
    stats_only = fid_report(darker, "unused", ref_stats=_adm_batch(tmp_path / "stats.npz", reference, False),
                            extractor=RowMeans())
    assert stats_only["fid"] > 100 and "precision" not in stats_only


def test_reference_batch_errors(tmp_path) -> None:
    np.savez(tmp_path / "bad.npz", mu=np.zeros(3))
    with pytest.raises(ValueError, match="not an ADM reference batch: no sigma"):
        load_reference_statistics(tmp_path / "bad.npz")
    np.savez(tmp_path / "shape.npz", mu=np.zeros(3), sigma=np.zeros((2, 2)))
    with pytest.raises(ValueError, match=r"sigma \(D, D\)"):
        load_reference_statistics(tmp_path / "shape.npz")
    with pytest.raises(FileNotFoundError):
        load_reference_statistics(tmp_path / "missing.npz")


def test_eval_fid_cli_reads_ref_stats(tmp_path, monkeypatch, capsys) -> None:
    monkeypatch.setattr(metrics, "InceptionFeatures", RowMeans)
    reference, samples = _images(30, 0), _images(20, 1)
    batch = _adm_batch(tmp_path / "VIRTUAL_ref.npz", reference)
    save_samples(tmp_path / "samples.npz", torch.from_numpy(samples).permute(0, 3, 1, 2))
    assert main(["eval", "fid", "--npz", str(tmp_path / "samples.npz"), "--ref-stats", str(batch),
                 "--precision-recall-images", "10"]) == 0
    result = json.loads(capsys.readouterr().out)
    fake = RowMeans()(torch.from_numpy(samples).permute(0, 3, 1, 2))
    expected = metrics.frechet_distance(*feature_statistics(fake), *load_reference_statistics(batch))
    assert result["metric"] == "fid" and result["num_images"] == 20
    assert result["fid"] == pytest.approx(expected) and result["precision_recall_images"] == 10


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_sample_npz_sharded_over_torchrun_equals_one_process(trained_run: str, tmp_path) -> None:
    # "--" ends torchrun's own options: its parser would otherwise take --n for an abbreviation of --nnodes.
    single, sharded = tmp_path / "single.npz", tmp_path / "sharded.npz"
    flags = ["--checkpoint", trained_run, "--n", "10", "--batch-size", "3", "--seed", "4", "--guidance", "2"]
    assert main(["sample", *flags, "--npz", str(single)]) == 0
    assert not (tmp_path / "samples.png").exists()  # --npz alone builds no grid
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]))
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                             f"--master_port={free_port()}", "-m", "farmer.cli", "--", "sample", *flags,
                             "--npz", str(sharded), "--device", "cpu"],
                            env=env, cwd=tmp_path, capture_output=True, text=True, timeout=400)
    assert result.returncode == 0, result.stderr[-4000:]
    with np.load(single) as one, np.load(sharded) as two:
        assert one["arr_0"].shape == (10, 8, 8, 1)
        assert np.array_equal(one["arr_0"], two["arr_0"]) and np.array_equal(one["labels"], two["labels"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sharded.npz", "single.npz"]  # shards merged away
