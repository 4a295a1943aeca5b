"""`farmer train --log tensorboard`: metrics.jsonl records mirrored as TensorBoard scalars and sample images."""

import importlib.util
import sys

import numpy as np
import pytest
from PIL import Image

from farmer.tracking import open_mirror
from farmer.train import MetricsLog


def test_jsonl_needs_no_mirror_and_a_missing_tensorboard_names_the_extra(tmp_path, monkeypatch) -> None:
    assert open_mirror("jsonl", tmp_path, 0) is None
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)
    with pytest.raises(ImportError, match=r"farmer-flow\[tensorboard\]"):
        open_mirror("tensorboard", tmp_path, 0)


def test_tensorboard_mirrors_scalars_and_sample_grids(tmp_path) -> None:
    if importlib.util.find_spec("tensorboard") is None:
        pytest.skip("tensorboard is not installed (pip install 'farmer-flow[tensorboard]')")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    grid = tmp_path / "grid.png"
    Image.fromarray(np.arange(48, dtype=np.uint8).reshape(6, 8)).save(grid)
    log = MetricsLog(tmp_path / "metrics.jsonl", 0, True, open_mirror("tensorboard", tmp_path, 0))
    log.write(step=10, time=1.0, loss=1.5, train_bits=9.0)
    log.write(step=20, time=2.0, test_bpd=8.5, samples=str(grid))
    log.mirror.close()
    events = EventAccumulator(str(tmp_path / "tensorboard"), size_guidance={"images": 0}).Reload()
    assert sorted(events.Tags()["scalars"]) == ["loss", "test_bpd", "train_bits"]  # not step or time
    assert [(e.step, e.value) for e in events.Scalars("loss")] == [(10, 1.5)]
    [image] = events.Images("samples")
    assert (image.step, image.width, image.height) == (20, 8, 6)
    assert len((tmp_path / "metrics.jsonl").read_text().splitlines()) == 2  # the jsonl log is unchanged
