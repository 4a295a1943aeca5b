"""Farmer.from_pretrained / model.save_pretrained in the Hugging Face Hub layout, offline: a local directory, a shipped
model's name, and a Hub cache laid out by the test (the network is never touched)."""

import importlib.util
import json
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any, ClassVar

import pytest
import torch
from helpers import random_model
from safetensors.torch import load_file

from farmer import Farmer
from farmer.hub import push_directory
from farmer.pretrained import EMA_WEIGHTS, SHIPPED_DIR, locate_checkpoint, read_id2label, shipped_models

NAMES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]


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
    with pytest.raises(ImportError, match=r"farmer-flow\[hub\]"):
        Farmer.from_pretrained("someone/farmer-tiny")


def test_repo_id_from_a_local_hub_cache_offline(tmp_path, monkeypatch) -> None:
    if importlib.util.find_spec("huggingface_hub") is None:
        pytest.skip("huggingface_hub is not installed (pip install 'farmer-flow[hub]')")
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


# Sharing: push_to_hub, the model card, class names ---------------------------------------------------------
class FakeHub:
    """huggingface_hub.HfApi as push_directory uses it, recording the calls and the uploaded bytes."""

    calls: ClassVar[list[tuple[str, Any]]] = []
    files: ClassVar[dict[str, bytes]] = {}

    def __init__(self, token: str | None = None) -> None:
        FakeHub.calls, FakeHub.files = [("token", token)], {}

    def create_repo(self, repo_id: str, **kwargs: Any) -> None:
        FakeHub.calls.append(("create_repo", (repo_id, kwargs)))

    def create_commit(self, repo_id: str, operations: list[Any], **kwargs: Any) -> Any:
        FakeHub.calls.append(("create_commit", (repo_id, kwargs)))
        for op in operations:  # read now: push_to_hub's temporary directory is gone once it returns
            source = op.path_or_fileobj
            FakeHub.files[op.path_in_repo] = source if isinstance(source, bytes) else Path(source).read_bytes()
        return SimpleNamespace(commit_url=f"https://huggingface.co/{repo_id}/commit/1")


@pytest.fixture
def fake_hub(monkeypatch) -> type[FakeHub]:
    hub = pytest.importorskip("huggingface_hub", reason="huggingface_hub is not installed (pip install -e '.[dev]')")
    monkeypatch.setattr(hub, "HfApi", FakeHub)
    return FakeHub


def test_push_to_hub_uploads_what_from_pretrained_loads_with_a_model_card(fake_hub, tmp_path) -> None:
    model = random_model()
    url = model.push_to_hub("someone/farmer-tiny", id2label=NAMES, token="secret", private=True)
    assert url == "https://huggingface.co/someone/farmer-tiny/commit/1"
    assert fake_hub.calls[:2] == [("token", "secret"),
                                  ("create_repo", ("someone/farmer-tiny", {"private": True, "exist_ok": True}))]
    assert [name for name, _ in fake_hub.calls].count("create_commit") == 1  # everything in one commit
    assert sorted(fake_hub.files) == ["README.md", "config.json", "model.safetensors"]
    for name in ("config.json", "model.safetensors"):  # the repository as a Hub snapshot would hold it
        (tmp_path / name).write_bytes(fake_hub.files[name])
    assert _same_weights(model, Farmer.from_pretrained(tmp_path)) and read_id2label(tmp_path) == NAMES
    card = fake_hub.files["README.md"].decode()
    assert "# someone/farmer-tiny" in card and 'Farmer.from_pretrained("someone/farmer-tiny")' in card
    assert "- classes: 10, class-conditional: 0 zero, 1 one," in card and "- training steps: not recorded" in card


@pytest.mark.parametrize(("name", "lines"), [
    ("fashion-mnist", ["- training data: fashion-mnist", "- training steps: 2,200, batch", "- test bits/dim: 3.9362",
                       "5 Sandal", "- ood: images.in 2,000, images.ood 2,000, scores.bits_per_dim.auroc 0.1313"]),
    ("mnist-likelihood", ["- training steps: 2,500 (1,000 in the runs it was initialised from, then 1,500)"]),
    ("mnist", ["- training steps: 13,100 (the teacher's), then 300 distilling the one-step inverse"]),
])
def test_a_trained_checkpoint_is_pushed_with_its_steps_and_metrics(fake_hub, name: str, lines: list[str]) -> None:
    push_directory(SHIPPED_DIR / name, "someone/farmer-shipped")
    assert sorted(fake_hub.files) == ["README.md", "config.json", "metrics.json", "model.safetensors"]
    assert fake_hub.files["metrics.json"] == (SHIPPED_DIR / name / "metrics.json").read_bytes()
    card = fake_hub.files["README.md"].decode()
    assert all(line in card for line in lines), card


def test_push_without_huggingface_hub_names_the_extra(monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)
    with pytest.raises(ImportError, match=r"pip install 'farmer-flow\[hub\]'"):
        random_model().push_to_hub("someone/farmer-tiny")


def test_class_names_are_stored_read_back_and_checked(tmp_path) -> None:
    model = random_model()
    model.save_pretrained(tmp_path, id2label=NAMES)
    stored = json.loads((tmp_path / "config.json").read_text())
    assert stored["id2label"] == {str(index): name for index, name in enumerate(NAMES)}
    assert read_id2label(tmp_path) == NAMES
    model.save_pretrained(tmp_path / "plain")
    assert read_id2label(tmp_path / "plain") is None
    with pytest.raises(ValueError, match="id2label must be 10 non-empty class names"):
        model.save_pretrained(tmp_path / "short", id2label=NAMES[:9])
    stored["id2label"].pop("9")
    (tmp_path / "config.json").write_text(json.dumps(stored))
    with pytest.raises(ValueError, match=r'id2label must map each class index "0".."9"'):
        read_id2label(tmp_path)
    # The shipped models carry their data set's class names.
    assert read_id2label("fashion-mnist")[5] == "Sandal" and read_id2label("mnist") == [str(i) for i in range(10)]
