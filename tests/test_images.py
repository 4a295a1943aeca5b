"""The .npz of samples (farmer.images): one writer and one reader, NCHW tensors at the API and ADM's NHWC
``arr_0`` + ``labels`` in the file."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from farmer.images import load_samples, samples_bytes, save_samples, stream_samples


def _pixels(n: int, channels: int = 3) -> torch.Tensor:
    return torch.randint(0, 256, (n, channels, 8, 6), dtype=torch.uint8, generator=torch.Generator().manual_seed(n))


def test_samples_round_trip_in_the_adm_layout(tmp_path: Path) -> None:
    pixels, labels = _pixels(5), torch.tensor([3, 1, 4, 1, 5])
    path = save_samples(tmp_path / "samples.npz", pixels, labels)
    with np.load(path) as data:  # the layout other FID suites read: NHWC under arr_0
        assert sorted(data.files) == ["arr_0", "labels"]
        np.testing.assert_array_equal(data["arr_0"], pixels.permute(0, 2, 3, 1).numpy())
    loaded, loaded_labels = load_samples(path)
    assert torch.equal(loaded, pixels) and torch.equal(loaded_labels, labels)
    first, first_labels = load_samples(path, 2)
    assert torch.equal(first, pixels[:2]) and torch.equal(first_labels, labels[:2])
    unlabelled = save_samples(tmp_path / "grey.npz", _pixels(3, 1))
    assert load_samples(unlabelled)[1] is None and torch.equal(load_samples(unlabelled)[0], _pixels(3, 1))


def test_the_writers_agree_and_np_savez_files_read(tmp_path: Path) -> None:
    pixels, labels = _pixels(6), torch.arange(6)
    whole = save_samples(tmp_path / "whole.npz", pixels, labels)
    streamed = stream_samples(tmp_path / "streamed.npz", pixels.shape, pixels.split(4), labels)
    assert whole.read_bytes() == streamed.read_bytes() == samples_bytes(pixels, labels)
    np.savez(tmp_path / "savez.npz", arr_0=pixels.permute(0, 2, 3, 1).numpy(), labels=labels.numpy())
    loaded, loaded_labels = load_samples(tmp_path / "savez.npz")
    assert torch.equal(loaded, pixels) and torch.equal(loaded_labels, labels)


def test_stream_leaves_no_file_when_the_batches_fall_short(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="expected 3 images, the batches held 2"):
        stream_samples(tmp_path / "s.npz", (3, 1, 2, 2), [torch.zeros((2, 1, 2, 2), dtype=torch.uint8)])
    assert list(tmp_path.iterdir()) == []


def test_bad_sample_files_are_named(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        load_samples(tmp_path / "missing.npz")
    garbage = tmp_path / "garbage.npz"
    garbage.write_bytes(b"definitely not numpy")
    with pytest.raises(ValueError, match="not a readable"):
        load_samples(garbage)
    single = tmp_path / "single.npy"
    np.save(single, np.zeros((2, 4, 4, 3), np.uint8))
    with pytest.raises(ValueError, match=r"single \.npy"):
        load_samples(single)
    cases = {
        "no_key.npz": ({"images": np.zeros((2, 4, 4, 3), np.uint8)}, "arr_0"),
        "float.npz": ({"arr_0": np.zeros((2, 4, 4, 3), np.float32)}, "uint8"),
        "nchw.npz": ({"arr_0": np.zeros((2, 3, 4, 4), np.uint8)}, r"\(N, H, W, C\)"),
        "objects.npz": ({"arr_0": np.array([None, 1], dtype=object)}, "arr_0"),
        "labels.npz": ({"arr_0": np.zeros((2, 4, 4, 3), np.uint8), "labels": np.zeros(3, np.int64)}, "labels"),
    }
    for name, (arrays, message) in cases.items():
        np.savez(tmp_path / name, **arrays)
        with pytest.raises(ValueError, match=message):
            load_samples(tmp_path / name)
    with pytest.raises(ValueError, match="uint8"):
        save_samples(tmp_path / "out.npz", torch.zeros((2, 3, 4, 4), dtype=torch.int64))
    with pytest.raises(ValueError, match="one per image"):
        save_samples(tmp_path / "out.npz", _pixels(2), torch.arange(3))
