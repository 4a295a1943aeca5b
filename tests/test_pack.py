"""Packed image folders (farmer/packing.py, farmer/shards.py): the ADM crop, RGB conversion, packing, reading,
bad input, resume."""

from __future__ import annotations

import errno
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from farmer import packing
from farmer.cli import build_parser, cmd_data, main
from farmer.data import adm_center_crop, dataset_info, make_dataset, to_rgb
from farmer.packing import pack_image_folder
from farmer.shards import FLAT_SPLIT, INDEX_NAME, PackedDataset, read_index
from farmer.train import TrainConfig, loader_workers

SIZE = 8


def _smooth(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """Random smooth RGB content: a coarse random grid bicubic-upsampled (like photos, unlike white noise)."""
    coarse = rng.integers(0, 256, size=(3, 4, 3), dtype=np.uint8)
    return np.asarray(Image.fromarray(coarse).resize((width, height), Image.Resampling.BICUBIC))


def _save(path: Path, image: Image.Image) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)


def _folder(root: Path, splits: tuple[str, ...] = ("train", "val"), per_class: int = 5) -> Path:
    """Class-per-subfolder JPEGs and PNGs of assorted sizes (some smaller than SIZE) and modes."""
    rng = np.random.default_rng(0)
    shapes = [(12, 17), (40, 30), (6, 9), (33, 33), (20, 50)]
    for split in splits:
        base = root / split if split else root
        for cls in ("ant", "bee", "cat"):
            for i in range(per_class):
                image = Image.fromarray(_smooth(rng, *shapes[i % len(shapes)]))
                _save(base / cls / f"{i:02d}.{'jpg' if i % 2 else 'png'}", image)
        _save(base / "bee" / "grey.png", Image.fromarray(_smooth(rng, 14, 10)).convert("L"))
        _save(base / "cat" / "cmyk.jpg", Image.fromarray(_smooth(rng, 16, 12)).convert("CMYK"))
        rgba = Image.fromarray(_smooth(rng, 11, 15)).convert("RGBA")
        rgba.putalpha(Image.fromarray(rng.integers(0, 256, (11, 15), dtype=np.uint8)))
        _save(base / "cat" / "alpha.png", rgba)
    return root


def _items(dataset: Dataset) -> list[tuple[np.ndarray, int]]:
    return [(image.numpy(), label) for image, label in (dataset[i] for i in range(len(dataset)))]


def _assert_same(packed: Dataset, folder: Dataset) -> None:
    got, expected = _items(packed), _items(folder)
    assert len(got) == len(expected)
    for (image, label), (want_image, want_label) in zip(got, expected, strict=True):
        assert label == want_label and image.dtype == np.uint8 and image.shape == (3, SIZE, SIZE)
        np.testing.assert_array_equal(image, want_image)


# --- the crop and the colour conversion ---------------------------------------------------------------


def test_adm_crop_box_halves_while_twice_the_size_then_crops_the_centre() -> None:
    rng = np.random.default_rng(1)
    tiny = rng.integers(0, 256, size=(4, 6, 3), dtype=np.uint8)
    # 64×96 made of constant 16×16 blocks: BOX-halving it is exact, and it halves three times (64, 32 and
    # 16 are all >= 2·8), ending at 8×12 with the short side already 8, so the bicubic step is the identity.
    image = Image.fromarray(np.kron(tiny, np.ones((16, 16, 1), dtype=np.uint8)))
    expected = np.kron(tiny, np.ones((2, 2, 1), dtype=np.uint8))[:, 2:10]  # centre 8 of 12 columns
    np.testing.assert_array_equal(adm_center_crop(image, SIZE), expected)
    # Short side 15 < 16: no halving; bicubic to 8×round(20·8/15)=11, then the centre 8 columns.
    small = Image.fromarray(rng.integers(0, 256, size=(15, 20, 3), dtype=np.uint8))
    resized = np.asarray(small.resize((11, 8), Image.Resampling.BICUBIC))
    np.testing.assert_array_equal(adm_center_crop(small, SIZE), resized[:, 1:9])
    # Images smaller than the size are upsampled; a constant image stays constant at any scale.
    flat = adm_center_crop(Image.new("RGB", (5, 3), (9, 99, 199)), SIZE)
    assert flat.shape == (SIZE, SIZE, 3) and (flat == [9, 99, 199]).all()


def test_to_rgb_composites_alpha_onto_white_and_converts_other_modes() -> None:
    rgba = Image.fromarray(np.array([[[200, 10, 50, 0], [200, 10, 50, 255], [0, 0, 0, 128]]], dtype=np.uint8))
    got = np.asarray(to_rgb(rgba)).astype(int)
    assert got[0, 0].tolist() == [255, 255, 255] and got[0, 1].tolist() == [200, 10, 50]
    assert np.abs(got[0, 2] - 127).max() <= 1  # half-transparent black over white
    la = Image.fromarray(np.array([[[40, 0]]], dtype=np.uint8), mode="LA")
    assert np.asarray(to_rgb(la)).tolist() == [[[255, 255, 255]]]
    palette = Image.new("P", (2, 1))
    palette.putpalette([0, 255, 0, 255, 0, 0])
    palette.putpixel((1, 0), 1)
    palette.info["transparency"] = 1  # palette entry 1 (red) is transparent
    assert np.asarray(to_rgb(palette)).tolist() == [[[0, 255, 0], [255, 255, 255]]]
    assert np.asarray(to_rgb(Image.new("L", (1, 1), 77))).tolist() == [[[77, 77, 77]]]
    assert np.asarray(to_rgb(Image.new("CMYK", (1, 1), (255, 0, 0, 0)))).tolist() == [[[0, 255, 255]]]


# --- packing and reading -----------------------------------------------------------------------------


def test_packed_splits_equal_the_folder_pixel_for_pixel(tmp_path: Path) -> None:
    source = _folder(tmp_path / "src")
    index = pack_image_folder(source, tmp_path / "packed", SIZE, workers=2, shard_size=4)
    packed = str(tmp_path / "packed")
    assert index == read_index(tmp_path / "packed")
    assert index["image_size"] == SIZE and index["classes"] == ["ant", "bee", "cat"]
    assert set(index["splits"]) == {"train", "val"} and index["source"] == str(source.resolve())
    train = index["splits"]["train"]
    assert train["count"] == 18 and [s["count"] for s in train["shards"]] == [4, 4, 4, 4, 2]
    for split in ("train", "val", "test"):  # test is served by val, as for the folder
        from_shards = make_dataset(packed, split, image_size=SIZE)
        assert isinstance(from_shards, PackedDataset) and from_shards.classes == ["ant", "bee", "cat"]
        _assert_same(from_shards, make_dataset(str(source), split, image_size=SIZE))
    info = dataset_info(packed)
    assert (info.channels, info.image_size, info.num_classes) == (3, SIZE, 3)
    assert dataset_info(packed, SIZE) == info
    with pytest.raises(ValueError, match=rf"packed at {SIZE}×{SIZE}; the model needs 16×16.*--size 16"):
        make_dataset(packed, "train", image_size=16)


def test_flat_packed_folder_holds_out_the_same_share(tmp_path: Path) -> None:
    source = _folder(tmp_path / "src", splits=("",), per_class=4)
    pack_image_folder(source, tmp_path / "packed", SIZE, shard_size=5)
    assert set(read_index(tmp_path / "packed")["splits"]) == {FLAT_SPLIT}
    for split in ("train", "test"):
        _assert_same(make_dataset(str(tmp_path / "packed"), split, image_size=SIZE, val_fraction=0.25),
                     make_dataset(str(source), split, image_size=SIZE, val_fraction=0.25))


def test_dataloader_workers_yield_the_folder_batches(tmp_path: Path) -> None:
    source = _folder(tmp_path / "src", splits=("train",))
    pack_image_folder(source, tmp_path / "packed", SIZE, shard_size=7)
    packed = make_dataset(str(tmp_path / "packed"), "train", image_size=SIZE)
    folder = make_dataset(str(source), "train", image_size=SIZE)
    order = [[5, 0, 17], [3, 9, 12, 1], [16, 2]]  # a batch sampler across shard boundaries
    loader = DataLoader(packed, batch_sampler=order, num_workers=2, persistent_workers=True)
    batches = list(loader)
    assert packed._opened is None  # the workers opened their own memory maps
    for (images, labels), indices in zip(batches, order, strict=True):
        assert labels.tolist() == [folder[i][1] for i in indices]
        assert torch.equal(images, torch.stack([folder[i][0] for i in indices]))


def test_default_loader_workers(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("os.sched_getaffinity", lambda _: set(range(32)), raising=False)
    assert loader_workers(TrainConfig(data="mnist")) == 0  # in memory: no workers
    assert loader_workers(TrainConfig(data="/data/imagenet-256")) == 8
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")  # 4 CPUs per rank: 3 workers and the training process
    assert loader_workers(TrainConfig(data="/data/imagenet-256")) == 3
    assert loader_workers(TrainConfig(data="/data/imagenet-256", num_workers=1)) == 1
    with pytest.raises(ValueError, match="num_workers must be >= 0"):
        TrainConfig(num_workers=-1)


def test_cli_packs_and_still_prepares(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    source = _folder(tmp_path / "src", splits=("train",), per_class=2)
    out = tmp_path / "packed"
    assert main(["data", "pack", str(source), "--out", str(out), "--size", str(SIZE), "--workers", "1"]) == 0
    assert "train 9 images (0 unreadable, skipped)" in capsys.readouterr().out
    assert (out / INDEX_NAME).is_file() and sorted(p.name for p in out.iterdir()) == [
        INDEX_NAME, "train-00000.images.npy", "train-00000.labels.npy"]
    assert main(["data", "pack", str(source), "--out", str(out), "--size", str(SIZE)]) == 2  # already packed
    assert "already a packed folder" in capsys.readouterr().err
    prepare = build_parser().parse_args(["data", "prepare", "mnist", "--root", str(tmp_path)])
    assert (prepare.func, prepare.name, prepare.root) == (cmd_data, "mnist", str(tmp_path))


# --- bad input ---------------------------------------------------------------------------------------


def test_unreadable_images_are_skipped_named_and_counted(tmp_path: Path) -> None:
    source = _folder(tmp_path / "src", splits=("train",))
    good = (source / "train" / "bee" / "01.jpg").read_bytes()
    (source / "train" / "bee" / "truncated.jpg").write_bytes(good[: len(good) // 2])
    (source / "train" / "ant" / "zzz.png").write_bytes(b"not a png")
    messages: list[str] = []
    index = pack_image_folder(source, tmp_path / "packed", SIZE, shard_size=4, log=messages.append)
    skipped = [entry["file"] for entry in index["splits"]["train"]["skipped"]]
    assert sorted(Path(f).name for f in skipped) == ["truncated.jpg", "zzz.png"]
    assert index["splits"]["train"]["count"] == 18
    assert sum("truncated.jpg" in m for m in messages) == 1 and sum("zzz.png" in m for m in messages) == 1
    for path in skipped:
        Path(path).unlink()  # the folder without them is what the shards hold
    _assert_same(make_dataset(str(tmp_path / "packed"), "train", image_size=SIZE),
                 make_dataset(str(source), "train", image_size=SIZE))


def test_empty_class_folder_is_named_and_keeps_its_label(tmp_path: Path) -> None:
    source = _folder(tmp_path / "src", splits=("train",), per_class=2)
    (source / "train" / "aardvark").mkdir()
    with pytest.warns(UserWarning, match=r"src/train: class folder\(s\) aardvark hold no images"):
        index = pack_image_folder(source, tmp_path / "packed", SIZE)
    assert index["classes"] == ["aardvark", "ant", "bee", "cat"]
    with pytest.warns(UserWarning, match="aardvark"):
        folder = make_dataset(str(source), "train", image_size=SIZE)
    _assert_same(make_dataset(str(tmp_path / "packed"), "train", image_size=SIZE), folder)


@pytest.mark.parametrize("workers", [1, 2])
@pytest.mark.parametrize("failing", ["_write_images", "_write_labels"])
def test_a_full_disk_leaves_nothing_half_written_and_a_rerun_resumes(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, failing: str, workers: int) -> None:
    source = _folder(tmp_path / "src", splits=("train",))
    out, partial = tmp_path / "packed", tmp_path / "packed.partial"
    original = getattr(packing, failing)

    def fill_the_disk(*args: object) -> object:
        result = original(*args)  # the file is written (a temporary, or already renamed), then the disk is full
        if "train-00001" in repr(args):
            raise OSError(errno.ENOSPC, "No space left on device")
        return result

    monkeypatch.setattr(packing, failing, fill_the_disk)  # before the pool forks: its workers see it too
    with pytest.raises(OSError, match=r"No space left on device.*kept in .*packed\.partial.*resume") as err:
        pack_image_folder(source, out, SIZE, workers=workers, shard_size=4)
    assert err.value.errno == errno.ENOSPC
    assert not out.exists() and not list(partial.glob(".*"))  # no index, no temporaries
    done = sorted(p.name.removesuffix(".done.json") for p in partial.glob("*.done.json"))
    assert "train-00001" not in done and (workers > 1 or done == ["train-00000"])

    monkeypatch.setattr(packing, failing, original)
    packed_shards: list[str] = []
    pack_one = packing._pack_shard
    monkeypatch.setattr(packing, "_pack_shard", lambda task: packed_shards.append(task.name) or pack_one(task))
    index = pack_image_folder(source, out, SIZE, shard_size=4)
    assert packed_shards == [f"train-{i:05d}" for i in range(5) if f"train-{i:05d}" not in done]  # done ones kept
    assert not partial.exists() and index["splits"]["train"]["count"] == 18
    _assert_same(make_dataset(str(out), "train", image_size=SIZE), make_dataset(str(source), "train", image_size=SIZE))


def test_a_partial_pack_of_other_settings_restarts(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    source = _folder(tmp_path / "src", splits=("train",), per_class=2)
    out, partial = tmp_path / "packed", tmp_path / "packed.partial"
    monkeypatch.setattr(packing, "_run_tasks", lambda *args: (_ for _ in ()).throw(KeyboardInterrupt))
    with pytest.raises(KeyboardInterrupt):
        pack_image_folder(source, out, 16)
    monkeypatch.undo()
    messages: list[str] = []
    pack_image_folder(source, out, SIZE, log=messages.append)
    assert any("another size; starting again" in m for m in messages)
    assert read_index(out)["image_size"] == SIZE and not partial.exists()


def test_output_and_index_errors(tmp_path: Path) -> None:
    source = _folder(tmp_path / "src", splits=("train",), per_class=2)
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "file").write_text("x")
    with pytest.raises(ValueError, match="busy exists and is not an empty directory"):
        pack_image_folder(source, tmp_path / "busy", SIZE)
    (tmp_path / "other.partial").mkdir()
    with pytest.raises(ValueError, match=r"other\.partial exists but is not a partial pack"):
        pack_image_folder(source, tmp_path / "other", SIZE)
    with pytest.raises(FileNotFoundError, match="image folder not found"):
        pack_image_folder(tmp_path / "missing", tmp_path / "x", SIZE)
    with pytest.raises(ValueError, match="size must be a positive int"):
        pack_image_folder(source, tmp_path / "x", 0)
    broken = tmp_path / "broken" / "cls" / "only.jpg"
    broken.parent.mkdir(parents=True)
    broken.write_bytes(b"\xff\xd8 not a jpeg")
    with pytest.raises(ValueError, match=r"no image of split 'all' .* could be read .*only\.jpg"):
        pack_image_folder(tmp_path / "broken", tmp_path / "x", SIZE)

    out = tmp_path / "packed"
    pack_image_folder(source, out, SIZE)
    index_path = out / INDEX_NAME
    index = json.loads(index_path.read_text())
    np.save(out / "train-00000.labels.npy", np.zeros(3, dtype=np.int64))
    with pytest.raises(ValueError, match=r"train-00000\.labels\.npy holds \(3,\) labels; its index says 9"):
        make_dataset(str(out), "train", image_size=SIZE)[0]
    index_path.write_text(json.dumps({**index, "version": 99}))
    with pytest.raises(ValueError, match="format version 99"):
        make_dataset(str(out), "train", image_size=SIZE)
    index_path.write_text("{")
    with pytest.raises(ValueError, match=rf"cannot read packed-data index {index_path}"):
        dataset_info(str(out))


def test_training_on_shards_with_workers_sees_the_same_steps_and_resumes(tmp_path: Path) -> None:
    from farmer.config import FarmerConfig
    from farmer.train import train

    source = _folder(tmp_path / "src", splits=("train", "val"), per_class=4)
    pack_image_folder(source, tmp_path / "packed", SIZE, shard_size=5)
    model = FarmerConfig.preset("tiny").replace(channels=3, num_classes=3)
    cfg = {**TrainConfig.preset("tiny").to_dict(), "data": str(tmp_path / "packed"), "steps": 4, "batch_size": 4,
           "warmup_steps": 2, "eval_every": 2, "eval_images": 4, "save_every": 2, "sample_every": 4, "log_every": 1}

    def losses(out: Path) -> list[tuple[int, float]]:
        records = (json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines())
        return [(r["step"], r["loss"]) for r in records if "loss" in r]

    quiet = {"progress": False, "log": lambda _: None}
    train(model, TrainConfig(**{**cfg, "num_workers": 0}), tmp_path / "straight", **quiet)
    resumed = TrainConfig(**{**cfg, "num_workers": 2})
    train(model, resumed, tmp_path / "resumed", stop_at=2, **quiet)
    train(model, resumed, tmp_path / "resumed", **quiet)
    assert losses(tmp_path / "resumed") == losses(tmp_path / "straight") and len(losses(tmp_path / "straight")) == 4


def test_the_data_benchmark_compares_both_sources_per_worker(tmp_path: Path) -> None:
    from benchmarks import bench_data

    result = bench_data.main(["--quick", "--images", "70", "--classes", "2", "--batches", "1", "--sizes", str(SIZE),
                              "--workers", "1", "--out", str(tmp_path)])
    (row,) = result["results"][0]["rows"]
    assert row["packed_over_folder"] == row["packed"]["images_per_s"] / row["jpeg_folder"]["images_per_s"]
    assert row["packed"]["images_per_s_per_worker"] == row["packed"]["images_per_s"]  # one worker
    assert json.loads((tmp_path / "data.json").read_text())["source"]["images"] == 70
