"""Sharing a model on the Hugging Face Hub: upload a saved model directory (``config.json`` +
``model.safetensors``, and its ``metrics.json`` when present) with a generated model card, in one commit.

Model-side like :mod:`farmer.pretrained`: it imports no training code. :meth:`farmer.model.Farmer.push_to_hub`
saves the model to a temporary directory and uploads that.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from farmer.config import FarmerConfig
from farmer.pretrained import (
    CONFIG,
    HUB_INSTALL,
    ID2LABEL,
    MODEL_WEIGHTS,
    read_config,
    resolve_checkpoint,
    weights_file,
)

METRICS = "metrics.json"
MODEL_CARD = "README.md"
DISTRIBUTION = "farmer-flow"  # the package on PyPI; it is imported as `farmer`


def _steps(stored: dict[str, Any]) -> str:
    """Training steps over the whole --init-from chain (config.json ``pretrained_steps`` + ``step``); a distilled
    model's ``pretrained_steps`` are its teacher's, and its own steps trained only the one-step inverse."""
    step, earlier = stored.get("step"), stored.get("pretrained_steps") or 0
    if not isinstance(step, int) or not isinstance(earlier, int):
        return "not recorded (saved with save_pretrained, not by `farmer train`)"
    if stored.get("train", {}).get("objective") == "distill":
        return f"{earlier:,} (the teacher's), then {step:,} distilling the one-step inverse"
    if earlier:
        return f"{earlier + step:,} ({earlier:,} in the runs it was initialised from, then {step:,})"
    return f"{step:,}"


def _flatten(entry: dict[str, Any], prefix: str = "") -> list[tuple[str, float | int]]:
    """The numbers of a (nested) metrics entry, keyed by dotted path: scores.bits_per_dim.auroc."""
    numbers: list[tuple[str, float | int]] = []
    for key, value in entry.items():
        if isinstance(value, dict):
            numbers += _flatten(value, f"{prefix}{key}.")
        elif isinstance(value, float | int) and not isinstance(value, bool):
            numbers.append((f"{prefix}{key}", value))
    return numbers


def _number(value: float | int) -> str:
    """10000.0 -> '10,000'; 0.65123 -> '0.6512'."""
    return f"{int(value):,}" if float(value).is_integer() else f"{value:.4g}"


def _metric_lines(metrics: dict[str, Any]) -> list[str]:
    """metrics.json's numbers as a list: test bits/dim, then each evaluation's scalar results."""
    lines = []
    if isinstance(metrics.get("test_bits_per_dim"), float | int):
        lines.append(f"- test bits/dim: {metrics['test_bits_per_dim']:.4f}")
    evaluations = metrics.get("evaluations")
    for name, entry in sorted(evaluations.items() if isinstance(evaluations, dict) else []):
        if not isinstance(entry, dict):
            continue
        numbers = [f"{key} {_number(value)}" for key, value in _flatten(entry)]
        if numbers:
            lines.append(f"- {name}: {', '.join(numbers)}")
    return lines or ["- none recorded (no metrics.json beside the model)"]


def model_card(directory: str | Path, repo_id: str) -> str:
    """The Hub model card (README.md) of a saved model: what it is, its training data and steps, its
    metrics.json numbers, and how to load and sample it."""
    step_dir = resolve_checkpoint(directory)
    stored = read_config(step_dir)
    cfg = FarmerConfig.from_dict(stored["model"])
    train = stored.get("train", {})
    try:
        metrics = json.loads((step_dir / METRICS).read_text())
    except (OSError, ValueError):
        metrics = {}
    names = stored.get(ID2LABEL)
    classes = f"{cfg.num_classes}, class-conditional" if cfg.conditional else "unconditional"
    if isinstance(names, dict):
        classes += ": " + ", ".join(f"{key} {value}" for key, value in names.items())
    labels = "torch.arange(8) % 10" if cfg.conditional else "None"
    return "\n".join([
        "---", "library_name: farmer", "tags:", "- farmer", "- normalizing-flow", "- autoregressive",
        "- image-generation", "---", "",
        f"# {repo_id}", "",
        "A FARMER model (Flow AutoRegressive Transformer over Pixels, arXiv 2510.23588): an invertible "
        "autoregressive flow over image patches and a causal transformer prior with Gaussian-mixture heads, "
        f"trained jointly by maximum likelihood. Made with the `{DISTRIBUTION}` package.", "",
        f"- images: {cfg.channels}×{cfg.image_size}×{cfg.image_size} ({cfg.num_tokens} tokens of "
        f"{cfg.token_dim} channels), preset `{cfg.name}`",
        f"- classes: {classes}",
        f"- training data: {train.get('data', 'not recorded')}",
        f"- training steps: {_steps(stored)}" + (f", batch {train['batch_size']}" if "batch_size" in train else ""),
        "", "## Metrics", "", *_metric_lines(metrics), "",
        "## Sampling", "", "```python",
        f"# pip install '{DISTRIBUTION}[hub]'",
        "import torch", "from farmer import Farmer", "",
        f'model = Farmer.from_pretrained("{repo_id}")',
        f"images = model.sample(8, {labels}, torch.Generator().manual_seed(0))  # in [-1, 1]", "```", "",
    ])


def push_directory(directory: str | Path, repo_id: str, *, token: str | None = None, private: bool = False,
                   revision: str | None = None, commit_message: str = "Upload FARMER model") -> str:
    """Upload a saved model (or a training step: its EMA weights, the ones loading prefers) to the Hub
    repository ``repo_id`` (created if missing) in one commit: config.json, model.safetensors, metrics.json when
    present, and a README.md model card (the directory's own, else :func:`model_card`). Returns the commit's
    URL."""
    try:
        from huggingface_hub import CommitOperationAdd, HfApi
    except ImportError:
        raise ImportError(f"pushing to the Hugging Face Hub needs huggingface_hub: {HUB_INSTALL}") from None
    step_dir = resolve_checkpoint(directory)
    weights = weights_file(step_dir)
    if not weights.is_file():
        raise FileNotFoundError(f"{step_dir} has no {MODEL_WEIGHTS}; save the model with save_pretrained first")
    card = step_dir / MODEL_CARD
    files = {CONFIG: step_dir / CONFIG, MODEL_WEIGHTS: weights, METRICS: step_dir / METRICS,
             MODEL_CARD: card.read_bytes() if card.is_file() else model_card(step_dir, repo_id).encode()}
    operations = [CommitOperationAdd(path_in_repo=name, path_or_fileobj=source if isinstance(source, bytes)
                                     else str(source))
                  for name, source in files.items() if isinstance(source, bytes) or source.is_file()]
    api = HfApi(token=token)
    api.create_repo(repo_id, private=private, exist_ok=True)
    commit = api.create_commit(repo_id, operations, commit_message=commit_message, revision=revision)
    return str(getattr(commit, "commit_url", commit))
