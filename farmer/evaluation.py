"""Evaluation loops over a model: bits/dim, samples for metrics, FID / precision / recall, classifier
metrics, and the distilled inverse against the exact one. The metric math itself lives in
``farmer.metrics`` and ``farmer.classifier``; this module only feeds them.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Subset
from tqdm import tqdm

from farmer.data import make_dataset
from farmer.dequantization import VariationalDequantizer
from farmer.images import load_image_folder, load_samples, png_bits_per_dim, save_samples
from farmer.metrics import BIN_WIDTH_BITS, auroc, bits_per_dim
from farmer.model import Farmer, LikelihoodTerms
from farmer.pixels import dequantize, model_to_pixels, pixels_to_model
from farmer.sampling import DEFAULT_SAMPLING, SamplingOptions, batch_generator

if TYPE_CHECKING:
    from farmer.config import FarmerConfig
    from farmer.distributed import Runtime
    from farmer.metrics import FeatureExtractor


def _first(dataset: Dataset, n: int | None, batch_size: int, seed: int) -> DataLoader:
    count = len(dataset) if n is None else min(n, len(dataset))
    # An explicit generator keeps DataLoader from drawing from (and so perturbing) the global RNG.
    return DataLoader(Subset(dataset, range(count)), batch_size=batch_size,
                      generator=torch.Generator().manual_seed(seed))


def dequantized_log_prob(log_prob: Callable[[Tensor], Tensor], pixels: Tensor, samples: int = 1,
                         generator: torch.Generator | None = None,
                         dequantizer: VariationalDequantizer | None = None) -> Tensor:
    """log (1/K) Σ_k p(x_k)/q(x_k) per image (nats) from K = ``samples`` dequantisations x_k ~ q of uint8 ``pixels``,
    ``log_prob`` mapping model inputs (on the dequantizer's device) to per-image log densities; q is uniform over
    each pixel's bin, or a learned ``dequantizer`` (docs/method.md §14). K = 1 is the usual dequantisation bound;
    K > 1 the importance-weighted bound (docs/method.md §5): still a lower bound on the discrete log-likelihood,
    tighter as K grows, exact in the limit."""
    if samples < 1:
        raise ValueError(f"samples must be >= 1, got {samples}")

    def draw() -> Tensor:
        if dequantizer is None:
            return log_prob(dequantize(pixels, "uniform", generator=generator))
        weight = next(dequantizer.parameters())
        centres = pixels_to_model(pixels).to(weight.device, weight.dtype)
        x, log_q = dequantizer(centres, generator)
        return log_prob(x) - log_q

    draws = torch.stack([draw() for _ in range(samples)])
    return torch.logsumexp(draws, dim=0) - math.log(samples)  # K = 1: the one draw, exactly


BOUNDS = ("uniform", "variational")


@torch.no_grad()
def evaluate_bpd(model: Farmer, dataset: Dataset, batch_size: int = 256, max_images: int | None = None,
                 seed: int = 0, progress: bool = False, importance_samples: int = 1,
                 bound: Literal["uniform", "variational"] = "uniform", conditional: bool = True) -> float:
    """Test bits/dim (docs/method.md §5), of log p(x | c) under each image's label when the model is conditional
    (``conditional=False``: of log p(x | ∅), the null class, for the unconditional figure): the bound with uniform
    U(0, 1/128) dequantisation, or with ``bound="variational"`` the one with the model's learned dequantisation
    (docs/method.md §14); ``importance_samples`` > 1 reports the tighter importance-weighted bound
    (:func:`dequantized_log_prob`). A fixed-seed generator keeps the number reproducible."""
    if bound not in BOUNDS:
        raise ValueError(f"bound must be one of {', '.join(BOUNDS)}, got {bound!r}")
    if bound == "variational" and model.dequantizer is None:
        raise ValueError("bound 'variational' needs a model trained with dequantization=variational")
    model.eval()
    total, count = 0.0, 0
    generator = torch.Generator().manual_seed(seed)
    dequantizer = model.dequantizer if bound == "variational" else None
    for pixels, labels in tqdm(_first(dataset, max_images, batch_size, seed), desc="bits/dim",
                               disable=not progress, leave=False):
        y = labels.to(model.device) if model.config.conditional and conditional else None
        log_p = dequantized_log_prob(lambda x, y=y: model.log_prob(x.to(model.device), y), pixels,
                                     importance_samples, generator, dequantizer)
        total += bits_per_dim(-log_p.cpu(), model.config.num_dims).sum().item()
        count += pixels.shape[0]
    return total / count


# bpd_breakdown's keys: each term's share of −log2 p(x) per dimension (the flow's is −log|det| / (D ln 2)).
_TERM_KEYS = {"informative": "informative", "redundant": "redundant", "flow_logdet": "flow"}


def blank_patches(pixels: Tensor, patch_size: int) -> Tensor:
    """(B, N) bool, patches in row-major order: True where every value of the patch is 0 (MNIST's background)."""
    b, c, h, w = pixels.shape
    blocks = pixels.reshape(b, c, h // patch_size, patch_size, w // patch_size, patch_size)
    return (blocks == 0).all(dim=5).all(dim=3).all(dim=1).reshape(b, -1)


@torch.no_grad()
def bpd_breakdown(model: Farmer, dataset: Dataset, batch_size: int = 256, max_images: int | None = None,
                  seed: int = 0, progress: bool = False) -> dict[str, Any]:
    """Where the test bits/dim go: :func:`evaluate_bpd`'s number (the same dequantisation draws) split into the
    terms of docs/method.md §5, each term's share of −log2 p(x) per image dimension — the AR prior's
    informative and redundant factors (negative where the prior's density exceeds 1) and the flow's −log|det|
    (negative where the flow expands) — which add up to it with the 7 bits/dim of the [-1, 1] bin width; and
    per patch position the bits/dim of each patch (an (H/p, W/p) map), also averaged over blank patches (all
    pixels 0) and over the rest."""
    model.eval()
    cfg = model.config
    generator = torch.Generator().manual_seed(seed)
    nats = dict.fromkeys(LikelihoodTerms._fields, 0.0)  # of −log p(x), summed over the images
    patch_nats = torch.zeros(cfg.num_tokens, dtype=torch.float64)
    blank_nats, blank_count, ink_nats, count = 0.0, 0, 0.0, 0
    for pixels, labels in tqdm(_first(dataset, max_images, batch_size, seed), desc="bits/dim breakdown",
                               disable=not progress, leave=False):
        y = labels.to(model.device) if cfg.conditional else None
        terms = model.log_prob_terms(dequantize(pixels, "uniform", generator=generator).to(model.device), y)
        for name in nats:
            nats[name] -= getattr(terms, name).double().sum().item()
        per_patch = -(terms.informative + terms.redundant + terms.flow_logdet).double().cpu()  # (B, N)
        blank = blank_patches(pixels, cfg.patch_size)
        patch_nats += per_patch.sum(dim=0)
        blank_nats += per_patch[blank].sum().item()
        ink_nats += per_patch[~blank].sum().item()
        blank_count += int(blank.sum())
        count += pixels.shape[0]

    def bpd(total_nats: float, dims: int) -> float:
        return bits_per_dim(torch.tensor(total_nats), dims).item() if dims else float("nan")

    side = cfg.image_size // cfg.patch_size
    terms_bpd = {f"{_TERM_KEYS[name]}_bits_per_dim": value / (count * cfg.num_dims * math.log(2))
                 for name, value in nats.items()}
    return {"bits_per_dim": bpd(sum(nats.values()), count * cfg.num_dims), "bin_width_bits_per_dim": BIN_WIDTH_BITS,
            **terms_bpd,
            "blank_patch_fraction": blank_count / (count * cfg.num_tokens),
            "blank_patch_bits_per_dim": bpd(blank_nats, blank_count * cfg.token_dim),
            "ink_patch_bits_per_dim": bpd(ink_nats, (count * cfg.num_tokens - blank_count) * cfg.token_dim),
            "patch_bits_per_dim": [[bpd(patch_nats[r * side + c].item(), count * cfg.token_dim) for c in range(side)]
                                   for r in range(side)]}


@torch.no_grad()
def class_log_likelihoods(model: Farmer, x: Tensor) -> Tensor:
    """log p(x | c) in nats, (B, K + 1): every class c, then the null class last (one column for an
    unconditional model). The flow is unconditional (docs/method.md §1), so x is encoded once and only the
    prior runs per class."""
    model.check_images(x)
    informative, redundant, logdet = model.encode(x.to(next(model.parameters()).dtype))
    classes = range(model.config.num_classes + 1)  # the null class is index K; K = 0 when unconditional
    return torch.stack([model.prior.log_prob(informative, redundant, torch.full_like(logdet, c, dtype=torch.long))
                        + logdet for c in classes], dim=1)


@torch.no_grad()
def score_images(model: Farmer, pixels: Tensor, labels: Tensor | None = None, batch_size: int = 256, seed: int = 0,
                 progress: bool = False) -> dict[str, np.ndarray]:
    """Per-image bits/dim of uint8 (N, C, H, W) images, uniformly dequantised with a fixed seed (as test
    bits/dim): ``bpd_unconditional`` (the null class); for a conditional model also ``best_class`` and
    ``bpd_best_class`` (the most likely class), and ``bpd_conditional`` under ``labels`` when given."""
    model.eval()
    cfg = model.config
    if labels is not None:
        labels = model.check_labels(labels, pixels.shape[0], torch.device("cpu"))
    generator = torch.Generator().manual_seed(seed)
    rows = []
    for lo in tqdm(range(0, pixels.shape[0], batch_size), desc="scoring", disable=not progress, leave=False):
        x = dequantize(pixels[lo:lo + batch_size], "uniform", generator=generator).to(model.device)
        rows.append(bits_per_dim(-class_log_likelihoods(model, x), cfg.num_dims).cpu())
    bpd = torch.cat(rows)
    scores = {"bpd_unconditional": bpd[:, -1]}
    if cfg.conditional:
        best = bpd[:, :-1].min(dim=1)
        scores.update(best_class=best.indices, bpd_best_class=best.values)
        if labels is not None:
            scores["bpd_conditional"] = bpd.gather(1, labels[:, None])[:, 0]
    return {key: value.numpy() for key, value in scores.items()}


def ood_scores(model: Farmer, pixels: Tensor, batch_size: int = 256, seed: int = 0,
               progress: bool = False) -> dict[str, np.ndarray]:
    """Out-of-distribution scores (higher = more unusual) of uint8 images, each in bits/dim:

    - ``bits_per_dim``: −log p(x), the raw likelihood, which flows are known to rank badly (Nalisnick et
      al., ICLR 2019: simpler images from another data set can score higher);
    - ``complexity_corrected``: −log p(x) − L(x) with L(x) the PNG size (Serrà et al., ICLR 2020);
    - ``class_ratio`` (conditional models): −[log p(x | ĉ) − log p(x | ∅)], ĉ the most likely class: how
      little the best class explains beyond the null class, a likelihood ratio in which the image
      statistics common to both cancel.
    """
    scores = score_images(model, pixels, None, batch_size, seed, progress)
    bpd = scores["bpd_unconditional"]
    result = {"bits_per_dim": bpd, "complexity_corrected": bpd - png_bits_per_dim(pixels)}
    if "bpd_best_class" in scores:
        result["class_ratio"] = scores["bpd_best_class"] - bpd
    return result


def ood_report(model: Farmer, in_pixels: Tensor, ood_pixels: Tensor, batch_size: int = 256, seed: int = 0,
               progress: bool = False) -> dict[str, Any]:
    """AUROC (out-of-distribution images positive) and the mean of each score of :func:`ood_scores`."""
    inside = ood_scores(model, in_pixels, batch_size, seed, progress)
    outside = ood_scores(model, ood_pixels, batch_size, seed, progress)
    return {name: {"auroc": auroc(inside[name], outside[name]), "mean_in": float(inside[name].mean()),
                   "mean_ood": float(outside[name].mean())} for name in inside}


def balanced_labels(model: Farmer, n: int) -> Tensor | None:
    """Class-conditional labels 0, 1, …, K−1, 0, 1, … of length n; None for an unconditional model."""
    cfg = model.config
    return torch.arange(n) % cfg.num_classes if cfg.conditional else None


def batch_ranges(n: int, batch_size: int, shard: tuple[int, int] = (0, 1)) -> list[tuple[int, int, int]]:
    """(batch index, first image, count) of the batches of an n-image set that rank ``shard[0]`` of
    ``shard[1]`` draws: a contiguous share, so the shards concatenated in rank order are the whole set."""
    rank, world = shard
    if not 0 <= rank < world:
        raise ValueError(f"shard rank must be in [0, {world}), got {rank}")
    starts = range(0, n, batch_size)
    share = range(len(starts) * rank // world, len(starts) * (rank + 1) // world)
    return [(b, starts[b], min(batch_size, n - starts[b])) for b in share]


def generate(model: Farmer, n: int, labels: Tensor | None, options: SamplingOptions = DEFAULT_SAMPLING,
             progress: bool = False, shard: tuple[int, int] = (0, 1)) -> Tensor:
    """Samples as uint8 pixels (count, C, H, W) on the CPU: all n, or with ``shard=(rank, world)`` only that
    rank's batches (:func:`batch_ranges`). Every batch has its own generator (:func:`batch_generator`), so the
    set does not depend on the sharding."""
    out = list(generate_batches(model, n, labels, options, progress, shard))
    cfg = model.config
    return torch.cat(out) if out else torch.empty(0, cfg.channels, cfg.image_size, cfg.image_size, dtype=torch.uint8)


def generate_batches(model: Farmer, n: int, labels: Tensor | None, options: SamplingOptions = DEFAULT_SAMPLING,
                     progress: bool = False, shard: tuple[int, int] = (0, 1)) -> Iterator[Tensor]:
    """:func:`generate`'s samples one uint8 CPU batch at a time, for sets too large to hold (a writer streams
    them to disk, :func:`farmer.images.stream_samples`)."""
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    device = model.device
    batches = batch_ranges(n, options.batch_size, shard)
    with tqdm(total=sum(count for *_, count in batches), desc="sampling", unit="img", disable=not progress) as bar:
        for b, lo, count in batches:
            y = None if labels is None else labels[lo:lo + count].to(device)
            yield model_to_pixels(options.sample(model, count, y, batch_generator(options.seed, b, device))).cpu()
            bar.update(count)


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
def compare_inverses(model: Farmer, n: int = 1000, options: SamplingOptions = DEFAULT_SAMPLING,
                     progress: bool = False) -> dict[str, Any]:
    """docs/method.md §7 check: latents drawn by the prior, inverted exactly and by the student.

    Returns PSNR / max error of the student's images against the exact ones, the time each inverse took,
    and both sets of uint8 samples (for sample-quality metrics side by side). ``options.inverse`` is unused:
    both inverses run; the exact images equal ``generate``'s with the same options.
    """
    if model.student is None:
        raise ValueError("the model has no distilled inverse; train one with `farmer distill`")
    model.eval()
    device = model.device
    labels = balanced_labels(model, n)
    squared, max_error, times = 0.0, 0.0, {"prior": 0.0, "exact": 0.0, "distilled": 0.0}
    images: dict[str, list[Tensor]] = {"exact": [], "distilled": []}
    for b, lo, count in tqdm(batch_ranges(n, options.batch_size), desc="inverses", disable=not progress):
        y = model.check_labels(None if labels is None else labels[lo:lo + count].to(device), count, device)
        start = time.perf_counter()
        zi, zr = options.sample_latents(model, y, batch_generator(options.seed, b, device))
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
    return labelled_dataset_pixels(data, split, n, image_size, root)[0]


def labelled_dataset_pixels(data: str, split: str, n: int | None, image_size: int,
                            root: str | None = None) -> tuple[Tensor, Tensor]:
    """The first n uint8 images of a dataset split, stacked, and their labels."""
    dataset = make_dataset(data, split, root, image_size)
    count = len(dataset) if n is None else min(n, len(dataset))
    items = [dataset[i] for i in range(count)]
    return torch.stack([image for image, _ in items]), torch.tensor([label for _, label in items])


def images_to_score(config: FarmerConfig, *, data: str | None = None, split: str = "test",
                    data_root: str | None = None, npz: str | Path | None = None, folder: str | Path | None = None,
                    max_images: int | None = None) -> tuple[Tensor, Tensor | None, list[str] | None]:
    """(uint8 NCHW images, their labels or None, their file names or None) to score with a model of ``config``:
    the first ``max_images`` of a data split, of an .npz of samples, or of a folder of image files (one source).
    Labels are kept for a class-conditional model only."""
    if sum(source is not None for source in (data, npz, folder)) != 1:
        raise ValueError("give one source of images: data, npz or folder")
    if data is not None:
        images, labels = labelled_dataset_pixels(data, split, max_images, config.image_size, data_root)
        return images, labels if config.conditional else None, None
    if npz is not None:
        images, labels = load_samples(npz, max_images)
        if not len(images):
            raise ValueError(f"{npz} holds no images (arr_0 has 0 of them)")
        return images, labels if config.conditional else None, None
    images, names = load_image_folder(folder, config.channels, config.image_size, max_images)
    return images, None, names


def gather_samples(pixels: Tensor, path: Path, rt: Runtime) -> Tensor | None:
    """Every rank's samples, joined in rank order on rank 0 (the whole set, as one process draws it; None on
    the other ranks): each rank writes its share beside ``path``, rank 0 reads and deletes them. Needs a file
    system all ranks share, as torchrun on one node has."""
    import torch.distributed as dist  # only under torchrun

    def shard(rank: int) -> Path:
        return path.with_name(f".{path.name}.shard-{rank}-of-{rt.world}.npz")

    save_samples(shard(rt.rank), pixels)
    dist.barrier()
    if not rt.main:
        return None
    parts = [load_samples(shard(rank))[0] for rank in range(rt.world)]
    for rank in range(rt.world):
        shard(rank).unlink()
    return torch.cat(parts)


def fid_report(images: Tensor | np.ndarray, data: str, split: str = "test", reference_images: int | None = 10_000,
               precision_recall_images: int = 2_000, device: str | None = None, root: str | None = None,
               progress: bool = True, ref_stats: str | Path | None = None,
               extractor: FeatureExtractor | None = None, real_vs_real: bool = True) -> dict[str, Any]:
    """FID and improved precision/recall (k = 3) of uint8 (N, C, H, W) samples.

    The reference is ``data``/``split`` (cached Inception statistics of its first ``reference_images``), or
    with ``ref_stats`` an ADM reference batch: its ``mu``/``sigma`` for FID and its ``arr_0`` images, when
    present, for precision/recall. Precision/recall compare the first ``precision_recall_images`` samples
    and reference images (ADM: all 50,000 samples against its 10,000 reference images).

    With ``real_vs_real`` (data-split references only), ``fid_real_vs_real`` is the FID of as many real images
    of the other split (train for a test reference, test otherwise) against the same reference: the floor the
    sample FID is read against, at the same counts.
    """
    from farmer.metrics import (
        InceptionFeatures,
        feature_statistics,
        frechet_distance,
        load_reference_statistics,
        precision_recall,
        reference_features,
    )

    images = torch.as_tensor(images)
    extractor = extractor or InceptionFeatures(device=device, progress=progress)
    k = min(precision_recall_images, len(images))
    real: np.ndarray | None = None  # reference features for precision/recall
    if ref_stats is not None:
        mu, sigma = load_reference_statistics(ref_stats)
        report: dict[str, Any] = {"reference": str(ref_stats)}
        pixels = _adm_reference_pixels(k, ref_stats) if k >= 4 else None
        real = None if pixels is None else extractor(pixels)
    else:
        features = reference_features(data, split, extractor, max_images=reference_images, root=root)
        mu, sigma = feature_statistics(features)
        report = {"reference": f"{data}/{split}", "reference_images": len(features)}
        if k >= 4:  # the cached reference features serve precision/recall too
            real = features[:k] if k <= len(features) else extractor(dataset_pixels(data, split, k,
                                                                                   images.shape[-1], root))
        if real_vs_real:
            other = "train" if split == "test" else "test"
            held = reference_features(data, other, extractor, max_images=len(images), root=root)
            report.update(fid_real_vs_real=frechet_distance(*feature_statistics(held), mu, sigma),
                          real_vs_real=f"{len(held)} {data}/{other} images")
    fake = extractor(images)
    report.update(fid=frechet_distance(*feature_statistics(fake), mu, sigma), num_images=len(images))
    if real is not None:
        report["precision"], report["recall"] = precision_recall(real, fake[:k], k=3)
        report["precision_recall_images"] = min(k, len(real))
    return report


def _adm_reference_pixels(k: int, ref_stats: str | Path) -> Tensor | None:
    """The first k images of an ADM reference batch's ``arr_0``, uint8 NCHW (None when it holds statistics
    only)."""
    with np.load(ref_stats, allow_pickle=False) as stored:
        if "arr_0" not in stored.files:
            return None
    return load_samples(ref_stats, k)[0]
