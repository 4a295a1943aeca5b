"""Farmer.from_pretrained / model.save_pretrained in the Hugging Face Hub layout, offline: a local directory, a shipped
model's name, and a Hub cache laid out by the test (the network is never touched)."""

import importlib.util
import sys

import pytest
import torch
from helpers import random_model
from safetensors.torch import load_file

from farmer import Farmer
from farmer.pretrained import EMA_WEIGHTS, SHIPPED_DIR, locate_checkpoint, shipped_models


def _same_weights(a: Farmer, b: Farmer) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values(), strict=True))


def test_save_pretrained_writes_the_hub_layout_and_loads_back(tmp_path) -> None:
    model = random_model()
    (tmp_path / "README.md").write_text("model card")  # other files in the directory stay
    assert model.save_pretrained(tmp_path) == tmp_path
    assert sorted(p.name for p in tmp_path.iterdir()) == ["README.md", "config.json", "model.safetensors"]
    loaded = Farmer.from_pretrained(tmp_path)
    assert loaded.config == model.config and _same_weights(model, loaded)
    x = torch.rand(2, 1, 8, 8) * 2 - 1
    torch.testing.assert_close(loaded.log_prob(x), model.log_prob(x))


def test_save_pretrained_refuses_a_training_checkpoint_and_nonfinite_weights(tmp_path) -> None:
    (tmp_path / EMA_WEIGHTS).write_bytes(b"")
    with pytest.raises(ValueError, match="training checkpoint"):
        random_model().save_pretrained(tmp_path)
    model = random_model()
    with torch.no_grad():
        next(model.parameters()).fill_(float("nan"))
    with pytest.raises(ValueError, match="NaN or Inf"):
        model.save_pretrained(tmp_path / "new")
    assert not (tmp_path / "new" / "config.json").exists()


def test_a_shipped_model_name_is_a_checkpoint(tmp_path, monkeypatch) -> None:
    assert "mnist" in shipped_models()
    assert locate_checkpoint("mnist") == SHIPPED_DIR / "mnist"
    monkeypatch.chdir(tmp_path)
    (tmp_path / "mnist").mkdir()  # a directory of that name wins over the shipped model
    assert locate_checkpoint("mnist").resolve() == (tmp_path / "mnist").resolve()
    with pytest.raises(FileNotFoundError, match=r"nor a shipped model: .*mnist"):
        locate_checkpoint("no-such-model")
    with pytest.raises(FileNotFoundError, match="Hub repository id"):
        Farmer.from_pretrained("no-such-model")


def test_repo_id_without_huggingface_hub_names_the_extra(monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)  # import fails as if not installed
    with pytest.raises(ImportError, match=r"farmer\[hub\]"):
        Farmer.from_pretrained("someone/farmer-tiny")


def test_repo_id_from_a_local_hub_cache_offline(tmp_path, monkeypatch) -> None:
    if importlib.util.find_spec("huggingface_hub") is None:
        pytest.skip("huggingface_hub is not installed (pip install 'farmer[hub]')")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "models--someone--farmer-tiny"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    model = random_model()
    model.save_pretrained(repo / "snapshots" / commit)
    loaded = Farmer.from_pretrained("someone/farmer-tiny", cache_dir=tmp_path / "hub", local_files_only=True)
    assert _same_weights(model, loaded)
    from huggingface_hub.errors import LocalEntryNotFoundError

    with pytest.raises(LocalEntryNotFoundError):  # not cached, and offline: an error, no download
        Farmer.from_pretrained("someone/other", cache_dir=tmp_path / "hub", local_files_only=True)


def test_half_precision_weights_load_into_a_float32_model(tmp_path) -> None:
    """Shipped models store float16 weights (save_pretrained(dtype=...), scripts/ship_checkpoint.py); they load
    as float32, rounded once; a weight that float16 cannot hold is refused, not written as inf."""
    model = random_model()
    model.save_pretrained(tmp_path, dtype=torch.float16)
    stored = load_file(str(tmp_path / "model.safetensors"))
    assert {v.dtype for v in stored.values() if v.is_floating_point()} == {torch.float16}
    loaded = Farmer.from_pretrained(tmp_path)
    for name, value in loaded.state_dict().items():
        assert value.dtype == model.state_dict()[name].dtype
        expected = model.state_dict()[name]
        expected = expected.half().to(expected.dtype) if expected.is_floating_point() else expected
        torch.testing.assert_close(value, expected, rtol=0, atol=0)
    with torch.no_grad():
        next(model.parameters()).fill_(1e6)  # beyond float16's 65504
    with pytest.raises(ValueError, match=r"NaN or Inf values in torch\.float16"):
        model.save_pretrained(tmp_path / "overflow", dtype=torch.float16)
    assert not (tmp_path / "overflow" / "model.safetensors").exists()
