"""Evaluation loops over a model: bits/dim, samples for metrics, FID / precision / recall, classifier
metrics, and the distilled inverse against the exact one. The metric math itself lives in
``farmer.metrics`` and ``farmer.classifier``; this module only feeds them.
"""

from __future__ import annotations

import math
import time
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Subset
from tqdm import tqdm

from farmer.data import dequantize, make_dataset, model_to_pixels, pixels_to_model
from farmer.metrics import bits_per_dim
from farmer.model import Farmer


def _first(dataset: Dataset, n: int | None, batch_size: int, seed: int) -> DataLoader:
    count = len(dataset) if n is None else min(n, len(dataset))
    # An explicit generator keeps DataLoader from drawing from (and so perturbing) the global RNG.
    return DataLoader(Subset(dataset, range(count)), batch_size=batch_size,
                      generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def evaluate_bpd(model: Farmer, dataset: Dataset, batch_size: int = 256, max_images: int | None = None,
                 seed: int = 0, progress: bool = False) -> float:
    """Test bits/dim with uniform U(0, 1/128) dequantisation (docs/method.md §5), labels included when the model
    is conditional. A fixed-seed generator keeps the number reproducible."""
    model.eval()
    total, count = 0.0, 0
    generator = torch.Generator().manual_seed(seed)
    for pixels, labels in tqdm(_first(dataset, max_images, batch_size, seed), desc="bits/dim",
                               disable=not progress, leave=False):
        x = dequantize(pixels, "uniform", generator=generator).to(model.device)
        y = labels.to(x.device) if model.config.conditional else None
        total += bits_per_dim(-model.log_prob(x, y), model.config.num_dims).sum().item()
        count += x.shape[0]
    return total / count


def balanced_labels(model: Farmer, n: int) -> Tensor | None:
    """Class-conditional labels 0, 1, …, K−1, 0, 1, … of length n; None for an unconditional model."""
    cfg = model.config
    return torch.arange(n) % cfg.num_classes if cfg.conditional else None


def generate(model: Farmer, n: int, labels: Tensor | None, seed: int = 0, batch_size: int = 250,
             progress: bool = False, **sample_kwargs: Any) -> Tensor:
    """n samples as uint8 pixels (n, C, H, W) on the CPU, in batches from one fixed-seed generator."""
    if n < 1 or batch_size < 1:
        raise ValueError(f"n and batch_size must be >= 1, got n={n}, batch_size={batch_size}")
    device = model.device
    generator = torch.Generator(device).manual_seed(seed)
    out = []
    with tqdm(total=n, desc="sampling", unit="img", disable=not progress) as bar:
        for lo in range(0, n, batch_size):
            count = min(batch_size, n - lo)
            y = None if labels is None else labels[lo:lo + count].to(device)
            out.append(model_to_pixels(model.sample(count, y, generator, **sample_kwargs)).cpu())
            bar.update(count)
    return torch.cat(out)


@torch.no_grad()
def student_psnr(model: Farmer, dataset: Dataset, max_images: int = 1000, seed: int = 0,
                 batch_size: int = 256) -> float:
    """PSNR (dB; images in [-1, 1], so the peak-to-peak range is 2) of the student inverse on test images
    encoded by the teacher flow."""
    model.eval()
    squared, count = 0.0, 0
    for pixels, _ in _first(dataset, max_images, batch_size, seed):
        x = pixels_to_model(pixels).to(model.device)
        zi, zr, _ = model.encode(x)
        squared += (model.decode(zi, zr, inverse="distilled") - x).pow(2).sum().item()
        count += x.numel()
    return psnr(squared / count)


def psnr(mse: float) -> float:
    return 10 * math.log10(4.0 / max(mse, 1e-20))


@torch.no_grad()
def compare_inverses(model: Farmer, n: int = 1000, batch_size: int = 250, seed: int = 0,
                     progress: bool = False, **sample_kwargs: Any) -> dict[str, Any]:
    """docs/method.md §7 check: latents drawn by the prior, inverted exactly and by the student.

    Returns PSNR / max error of the student's images against the exact ones, the time each inverse took,
    and both sets of uint8 samples (for sample-quality metrics side by side).
    """
    if model.student is None:
        raise ValueError("the model has no distilled inverse; train one with `farmer distill`")
    model.eval()
    device = model.device
    generator = torch.Generator(device).manual_seed(seed)
    labels = balanced_labels(model, n)
    squared, max_error, times = 0.0, 0.0, {"prior": 0.0, "exact": 0.0, "distilled": 0.0}
    images: dict[str, list[Tensor]] = {"exact": [], "distilled": []}
    for lo in tqdm(range(0, n, batch_size), desc="inverses", disable=not progress):
        count = min(batch_size, n - lo)
        y = model.check_labels(None if labels is None else labels[lo:lo + count].to(device), count, device)
        start = time.perf_counter()
        zi, zr = model.prior.sample(y, generator, **sample_kwargs)
        times["prior"] += time.perf_counter() - start
        decoded = {}
        for inverse in ("exact", "distilled"):
            start = time.perf_counter()
            decoded[inverse] = model.decode(zi, zr, inverse=inverse).clamp(-1, 1)
            times[inverse] += time.perf_counter() - start
            images[inverse].append(model_to_pixels(decoded[inverse]).cpu())
        diff = decoded["distilled"] - decoded["exact"]
        squared += diff.pow(2).sum().item()
        max_error = max(max_error, diff.abs().max().item())
    mse = squared / (n * model.config.num_dims)
    return {"n": n, "psnr_db": psnr(mse), "max_abs_error": max_error, "mse": mse,
            "seconds": times, "inverse_speedup": times["exact"] / max(times["distilled"], 1e-12),
            "images": {k: torch.cat(v) for k, v in images.items()}, "labels": labels}


def dataset_pixels(data: str, split: str, n: int | None, image_size: int, root: str | None = None) -> Tensor:
    """The first n uint8 images of a dataset split, stacked."""
    dataset = make_dataset(data, split, root, image_size)
    count = len(dataset) if n is None else min(n, len(dataset))
    return torch.stack([dataset[i][0] for i in range(count)])


def fid_report(images: Tensor | np.ndarray, data: str, split: str = "test", reference_images: int | None = 10_000,
               precision_recall_images: int = 2_000, device: str | None = None, root: str | None = None,
               progress: bool = True) -> dict[str, float]:
    """FID against the cached Inception statistics of ``data``/``split``, and improved precision/recall
    (k = 3) against the features of the first ``precision_recall_images`` reference images."""
    from farmer.metrics import (
        InceptionFeatures,
        feature_statistics,
        frechet_distance,
        precision_recall,
        reference_statistics,
    )

    images = torch.as_tensor(images)
    extractor = InceptionFeatures(device=device, progress=progress)
    fake = extractor(images)
    mu, sigma = reference_statistics(data, split, extractor, max_images=reference_images, root=root)
    report = {"fid": frechet_distance(*feature_statistics(fake), mu, sigma), "num_images": float(len(images))}
    k = min(precision_recall_images, len(images))
    if k >= 4:
        real = extractor(dataset_pixels(data, split, k, images.shape[-1], root))
        report["precision"], report["recall"] = precision_recall(real, fake[:k], k=3)
    return report
