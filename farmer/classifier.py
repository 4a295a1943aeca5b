"""A small CNN classifier for 28x28 grayscale sets and the sample metrics it gives (Inception-Score and
FID analogues in its own feature space, label accuracy of class-conditional samples).

The Inception network is slow on CPUs and was never meant for 28x28 digits; this classifier scores
thousands of MNIST / Fashion-MNIST samples in seconds. Its weights ship in ``farmer/assets`` as
``classifier-<dataset>.safetensors`` with a JSON beside them (architecture, test accuracy, command).
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from collections.abc import Sequence
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors_bytes
from safetensors.torch import save as save_safetensors_bytes
from torch import Tensor, nn
from tqdm import tqdm

from farmer.data import load_arrays
from farmer.io import count_parameters, write_atomic
from farmer.metrics import check_uint8_images, feature_statistics, frechet_distance, reference_features
from farmer.pixels import pixels_to_model

CLASSIFIER_DATASETS = ("mnist", "fashion-mnist")
IMAGE_SHAPE = (1, 28, 28)


def _conv_block(in_channels: int, out_channels: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(),
        nn.MaxPool2d(2),
    )


class Classifier(nn.Module):
    """Three conv blocks (28 -> 14 -> 7 -> 3 pixels), a hidden layer (the features), a linear head.

    Input: float (B, 1, 28, 28) in [-1, 1] (``farmer.pixels.pixels_to_model`` of uint8 pixels).
    """

    def __init__(
        self,
        channels: Sequence[int] = (16, 32, 64),
        hidden: int = 256,
        num_classes: int = 10,
        dropout: float = 0.3,
    ) -> None:
        super().__init__()
        channels = [int(c) for c in channels]
        if len(channels) != 3 or min(channels) < 1:
            raise ValueError(f"channels must be 3 positive ints (one per conv block), got {channels}")
        if hidden < 1 or num_classes < 2:
            raise ValueError(f"need hidden >= 1 and num_classes >= 2, got hidden={hidden}, num_classes={num_classes}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        self.config = {"channels": channels, "hidden": hidden, "num_classes": num_classes, "dropout": dropout}
        self.convs = nn.Sequential(*(_conv_block(i, o) for i, o in zip([1, *channels[:-1]], channels, strict=True)))
        # Three 2x poolings floor 28 to 3 pixels per side.
        self.hidden = nn.Sequential(nn.Flatten(), nn.Linear(channels[-1] * 3 * 3, hidden), nn.ReLU())
        self.head = nn.Sequential(nn.Dropout(dropout), nn.Linear(hidden, num_classes))

    def features(self, x: Tensor) -> Tensor:
        """Penultimate activations (B, hidden): the space of the classifier Fréchet distance."""
        if not isinstance(x, Tensor) or not x.is_floating_point():
            raise ValueError(f"x must be a float tensor in [-1, 1], got {getattr(x, 'dtype', type(x).__name__)}")
        if x.ndim != 4 or tuple(x.shape[1:]) != IMAGE_SHAPE:
            raise ValueError(f"x must have shape (B, 1, 28, 28), got {tuple(x.shape)}")
        return self.hidden(self.convs(x))

    def forward(self, x: Tensor) -> Tensor:
        """Class logits (B, num_classes)."""
        return self.head(self.features(x))


# ---------------------------------------------------------------------------------------------------
# Shipped weights
# ---------------------------------------------------------------------------------------------------


def _check_dataset(dataset: str) -> None:
    if dataset not in CLASSIFIER_DATASETS:
        raise ValueError(f"no classifier for dataset {dataset!r}: supported are {', '.join(CLASSIFIER_DATASETS)}")


def _asset_name(dataset: str, suffix: str) -> str:
    return f"classifier-{dataset}.{suffix}"


def _read_asset(dataset: str, suffix: str) -> bytes:
    name = _asset_name(dataset, suffix)
    asset = resources.files("farmer").joinpath("assets").joinpath(name)
    if not asset.is_file():
        raise FileNotFoundError(
            f"classifier asset farmer/assets/{name} is missing; train it with "
            f"`python scripts/train_classifier.py --dataset {dataset}`"
        )
    return asset.read_bytes()


def classifier_info(dataset: str) -> dict[str, Any]:
    """The JSON shipped beside a classifier's weights (architecture, test accuracy, training command)."""
    _check_dataset(dataset)
    try:
        return json.loads(_read_asset(dataset, "json"))
    except json.JSONDecodeError as err:
        raise ValueError(f"farmer/assets/{_asset_name(dataset, 'json')} is not valid JSON: {err}") from err


def _load(dataset: str) -> tuple[Classifier, str]:
    """The shipped classifier (eval mode) and a digest of its weights (keys cached reference statistics)."""
    info = classifier_info(dataset)
    weights_name = _asset_name(dataset, "safetensors")
    raw = _read_asset(dataset, "safetensors")
    try:
        state = load_safetensors_bytes(raw)
    except SafetensorError as err:
        raise ValueError(f"farmer/assets/{weights_name} is corrupt: {err}") from err
    try:
        model = Classifier(**info["architecture"])
        model.load_state_dict(state)
    except (KeyError, TypeError, RuntimeError) as err:
        raise ValueError(f"farmer/assets/{weights_name} does not match its JSON architecture: {err}") from err
    return model.eval(), hashlib.sha256(raw).hexdigest()[:12]


def load_classifier(dataset: str) -> Classifier:
    """The shipped classifier for ``mnist`` or ``fashion-mnist``, in eval mode on the CPU."""
    return _load(dataset)[0]


# ---------------------------------------------------------------------------------------------------
# Metrics
# ---------------------------------------------------------------------------------------------------


class ClassifierFeatures:
    """A :class:`farmer.metrics.FeatureExtractor` over the classifier: features and logits of uint8 images."""

    def __init__(
        self,
        classifier: Classifier,
        name: str,
        device: torch.device | str | None = None,
        batch_size: int = 1000,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        self.device = torch.device(device if device is not None else "cpu")
        self.classifier = classifier.to(self.device).eval()
        self.name = name
        self.batch_size = batch_size

    @torch.inference_mode()
    def features_and_logits(self, images: Tensor) -> tuple[Tensor, Tensor]:
        """(N, hidden) features and (N, classes) logits, float32 on the CPU."""
        images = check_uint8_images(images, IMAGE_SHAPE)
        feats, logits = [], []
        for start in range(0, images.shape[0], self.batch_size):
            x = pixels_to_model(images[start : start + self.batch_size].to(self.device))
            f = self.classifier.features(x)
            feats.append(f.float().cpu())
            logits.append(self.classifier.head(f).float().cpu())
        return torch.cat(feats), torch.cat(logits)

    def __call__(self, images: Tensor) -> np.ndarray:
        return self.features_and_logits(images)[0].numpy()


def classifier_score(logits: Tensor) -> float:
    """exp(E_x KL(p(y|x) || p(y))) with p(y) the mean prediction: the Inception Score's formula.

    1 when every image gets the same prediction; the number of classes for confident, balanced ones.
    """
    log_p = F.log_softmax(logits.double(), dim=1)
    log_marginal = torch.logsumexp(log_p, dim=0) - math.log(log_p.shape[0])
    kl = (log_p.exp() * (log_p - log_marginal)).sum(dim=1)
    return float(kl.mean().exp())


def classifier_metrics(
    images_uint8: Tensor,
    dataset: str,
    labels: Tensor | None = None,
    reference: str = "test",
    device: torch.device | str | None = None,
    cache_dir: Path | str | None = None,
) -> dict[str, float]:
    """Sample quality in the classifier's eyes, for uint8 (N, 1, 28, 28) images of ``dataset``.

    ``classifier_score``: exp(E KL(p(y|x) || p(y))) (Inception-Score analogue, at most 10);
    ``frechet_distance``: Fréchet distance of hidden features to the ``reference`` split (statistics
    cached like FID's); ``accuracy`` (only with ``labels``): share classified as the requested label.
    """
    _check_dataset(dataset)
    images = check_uint8_images(images_uint8, IMAGE_SHAPE)
    if images.shape[0] < 2:
        raise ValueError(f"need at least 2 images for the metrics, got {images.shape[0]}")
    classifier, digest = _load(dataset)
    extractor = ClassifierFeatures(classifier, f"classifier-{dataset}-{digest}", device)
    feats, logits = extractor.features_and_logits(images)
    reference_mu, reference_sigma = feature_statistics(reference_features(dataset, reference, extractor,
                                                                         cache_dir=cache_dir))
    result = {
        "classifier_score": classifier_score(logits),
        "frechet_distance": frechet_distance(*feature_statistics(feats), reference_mu, reference_sigma),
        "num_images": float(images.shape[0]),
    }
    if labels is not None:
        labels = torch.as_tensor(labels)
        num_classes = classifier.config["num_classes"]
        if labels.shape != (images.shape[0],) or labels.is_floating_point() or labels.dtype == torch.bool:
            raise ValueError(
                f"labels must be integers of shape ({len(images)},), got {labels.dtype} {tuple(labels.shape)}"
            )
        if labels.min() < 0 or labels.max() >= num_classes:
            raise ValueError(f"labels must be in 0..{num_classes - 1}, got {int(labels.min())}..{int(labels.max())}")
        result["accuracy"] = float((logits.argmax(dim=1) == labels.cpu()).double().mean())
    return result


# ---------------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------------


@torch.inference_mode()
def _accuracy(model: Classifier, images: Tensor, labels: Tensor, device: torch.device) -> float:
    model.eval()
    correct, chunk = 0, 1000
    for start in range(0, images.shape[0], chunk):
        x = pixels_to_model(images[start : start + chunk].to(device))
        correct += int((model(x).argmax(dim=1).cpu() == labels[start : start + chunk]).sum())
    return correct / images.shape[0]


def train_classifier(
    dataset: str,
    out_dir: Path | str,
    epochs: int = 4,
    batch_size: int = 128,
    lr: float = 2e-3,
    seed: int = 0,
    device: torch.device | str | None = None,
    root: Path | str | None = None,
    command: str = "",
    progress: bool = True,
) -> dict[str, Any]:
    """Train a :class:`Classifier` on the full train split with Adam (cosine-decayed learning rate),
    measure test accuracy, and write ``classifier-<dataset>.safetensors`` + ``.json`` to ``out_dir``.

    Returns the JSON record. ``command`` is stored in it as the way to reproduce the weights.
    """
    _check_dataset(dataset)
    if epochs < 1 or batch_size < 1 or not lr > 0:
        raise ValueError(f"need epochs >= 1, batch_size >= 1, lr > 0; got {epochs}, {batch_size}, {lr}")
    device = torch.device(device if device is not None else "cpu")
    train_x, train_y = (torch.from_numpy(np.array(a)) for a in load_arrays(dataset, "train", root))
    test_x, test_y = (torch.from_numpy(np.array(a)) for a in load_arrays(dataset, "test", root))

    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    model = Classifier().to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    steps_per_epoch = math.ceil(train_x.shape[0] / batch_size)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=epochs * steps_per_epoch)
    started = time.perf_counter()
    for epoch in range(epochs):
        model.train()
        order = torch.randperm(train_x.shape[0], generator=generator)
        bar = tqdm(range(steps_per_epoch), desc=f"{dataset} epoch {epoch + 1}/{epochs}", disable=not progress)
        for step in bar:
            index = order[step * batch_size : (step + 1) * batch_size]
            x = pixels_to_model(train_x[index].to(device))
            loss = F.cross_entropy(model(x), train_y[index].to(device))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            if step % 50 == 0:
                bar.set_postfix(loss=f"{loss.item():.4f}")
    seconds = time.perf_counter() - started
    accuracy = _accuracy(model, test_x, test_y, device)

    record = {
        "dataset": dataset,
        "architecture": model.config,
        "parameters": count_parameters(model),
        "input": "farmer.pixels.pixels_to_model(uint8 pixels) = (k + 0.5) / 128 - 1",
        "test_accuracy": accuracy,
        "test_images": int(test_x.shape[0]),
        "train_images": int(train_x.shape[0]),
        "epochs": epochs,
        "batch_size": batch_size,
        "lr": lr,
        "seed": seed,
        "train_seconds": round(seconds, 1),
        "torch": torch.__version__,
        "command": command,
    }
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    write_atomic(out_dir / _asset_name(dataset, "safetensors"), save_safetensors_bytes(state))
    write_atomic(out_dir / _asset_name(dataset, "json"), json.dumps(record, indent=2) + "\n")
    return record
