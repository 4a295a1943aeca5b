"""The paper's analyses as figures (docs/method.md §9): each function takes a model (+ data or labels), writes a PNG
with matplotlib and returns the numbers it plotted.

- :func:`information_separation`: noise on only the redundant channels of block-t latents vs on all channels.
- :func:`redundant_variance_sweep`: one Z^I per label, Z^R drawn with the shared mixture's variance scaled.
- :func:`logdet_outliers`: the distribution of per-image flow log-dets and its most extreme images.
- :func:`unguided_grid`: sample metrics over a grid of variance scale s and weight temperature T.

:func:`run_analysis` runs one of them on a checkpoint and also writes the numbers as JSON.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from farmer.classifier import CLASSIFIER_DATASETS, IMAGE_SHAPE, classifier_metrics
from farmer.data import make_dataset
from farmer.evaluation import balanced_labels, generate
from farmer.images import make_grid
from farmer.model import Farmer
from farmer.pixels import model_to_pixels, pixels_to_model
from farmer.pretrained import read_config
from farmer.sampling import SamplingOptions

ANALYSES = ("separation", "variance", "logdet", "unguided")
MetricFn = Callable[[Tensor, Tensor | None], dict[str, float]]


# Shared helpers ----------------------------------------------------------------------------------------
def _model_images(model: Farmer, images: Tensor) -> Tensor:
    """uint8 pixels or floats in [-1, 1] -> validated floats in [-1, 1] on the model's device."""
    if isinstance(images, Tensor) and images.dtype == torch.uint8:
        images = pixels_to_model(images)
    if isinstance(images, Tensor) and images.ndim == 4 and images.shape[0] == 0:
        raise ValueError("need at least one image, got an empty batch")
    model.check_images(images)
    return images.to(model.device)


def _require_redundant(model: Farmer, analysis: str) -> int:
    """d_I, after checking that the model has redundant channels at all (docs/method.md §3)."""
    cfg = model.config
    if cfg.redundant_dim == 0:
        raise ValueError(
            f"{analysis} needs redundant channels, but this model has none "
            f"(prior={cfg.prior!r}, informative_channels={cfg.informative_channels})"
        )
    return cfg.informative_dim


def _labels(model: Farmer, labels: Tensor | Sequence[int] | None, rows: int) -> Tensor:
    """Explicit labels, else one row per class (at most 10) for a conditional model, else ``rows`` null ones."""
    cfg = model.config
    if labels is None:
        if cfg.conditional:
            return torch.arange(min(cfg.num_classes, 10), device=model.device)
        if rows < 1:
            raise ValueError(f"rows must be >= 1, got {rows}")
        return model.check_labels(None, rows, model.device)
    labels = torch.as_tensor(labels, device=model.device)
    if labels.ndim != 1 or labels.shape[0] < 1:
        raise ValueError(f"labels must be a non-empty 1-D sequence, got shape {tuple(labels.shape)}")
    return model.check_labels(labels, labels.shape[0], labels.device)


def _figure(**kwargs: Any) -> Any:
    """A matplotlib Figure without pyplot (no global state, no display backend needed)."""
    try:
        from matplotlib.figure import Figure
    except ImportError as err:
        raise ImportError("the analysis figures need matplotlib: pip install matplotlib (in the 'all' extra)") from err
    return Figure(**kwargs)


def _save(fig: Any, out: str | Path) -> Path:
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    return out


def _show(ax: Any, pixels: Tensor, nrow: int, title: str = "") -> None:
    """Draw uint8 (k, C, H, W) images side by side on one axis."""
    grid = make_grid(pixels.cpu(), nrow=nrow)
    ax.imshow(grid[..., 0] if grid.shape[-1] == 1 else grid, cmap="gray", vmin=0, vmax=255, interpolation="nearest")
    ax.set_xticks([])
    ax.set_yticks([])
    if title:
        ax.set_title(title, fontsize=8)


def _image_table(
    cells: list[list[Tensor]], row_labels: Sequence[str], col_labels: Sequence[str], out: str | Path, title: str
) -> Path:
    """A table of image strips: cells[r][c] is uint8 (k, C, H, W), drawn as one row of k images."""
    rows, cols = len(cells), len(cells[0])
    k = cells[0][0].shape[0]
    fig = _figure(figsize=(max(4.0, cols * (0.9 * k + 0.3)), rows * 1.1 + 0.8), layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False)
    for r in range(rows):
        for c in range(cols):
            _show(axes[r][c], cells[r][c], nrow=k, title=col_labels[c] if r == 0 else "")
        axes[r][0].set_ylabel(row_labels[r], fontsize=8)
    fig.suptitle(title, fontsize=10)
    return _save(fig, out)


# 1. Information separation -----------------------------------------------------------------------------
@torch.no_grad()
def information_separation(
    model: Farmer,
    images: Tensor,
    out: str | Path,
    noise_levels: Sequence[float] = (0.25, 0.5, 0.75, 1.0),
    seed: int = 0,
    show: int = 4,
) -> dict[str, Any]:
    """Perturb block-t latents Z^t toward Gaussian noise, z' = (1 − a) z + a ε, on the redundant channels
    only ("partial") or on every channel ("full"), invert blocks t…1 exactly and compare with the images.

    Returns blocks (1…n), noise_levels, and partial_mse / full_mse arrays (blocks, levels): mean squared
    error in [-1, 1] pixel units over all ``images``. The figure shows the first ``show`` images.
    """
    d_i = _require_redundant(model, "information separation")
    levels = [float(a) for a in noise_levels]
    if not levels or any(not 0 <= a <= 1 for a in levels):
        raise ValueError(f"noise_levels must be a non-empty list of values in [0, 1], got {list(noise_levels)}")
    if show < 1:
        raise ValueError(f"show must be >= 1, got {show}")
    x = _model_images(model, images)
    flow = model.flow
    path, _ = flow.forward_path(model.to_tokens(x)[0])
    cache = flow.allocate_cache(x.shape[0], x.device)
    generator = torch.Generator(x.device).manual_seed(seed)
    num_blocks = len(flow.blocks)
    mse = {"partial": np.zeros((num_blocks, len(levels))), "full": np.zeros((num_blocks, len(levels)))}
    shown = x[:show]
    cells = []
    for t in range(1, num_blocks + 1):
        z = path[t]
        eps = torch.randn(z.shape, generator=generator, device=z.device, dtype=z.dtype)
        row = [model_to_pixels(shown)]
        for j, a in enumerate(levels):
            full = (1 - a) * z + a * eps
            # The split of docs/method.md §3 is by channel within each token: the final permute only reverses token
            # order, so the last d_R channels are the redundant ones in every block's latent as well.
            partial = torch.cat([z[..., :d_i], full[..., d_i:]], dim=-1)
            for kind, perturbed in (("partial", partial), ("full", full)):
                for block in reversed(flow.blocks[:t]):
                    perturbed = block.inverse(perturbed, cache)
                recon = model.from_tokens(perturbed).clamp(-1, 1)
                mse[kind][t - 1, j] = (recon - x).square().mean().item()
                row.append(model_to_pixels(recon[:show]))
        cells.append(row)
    columns = ["original"] + [f"{kind} a={a:g}" for a in levels for kind in ("redundant", "all")]
    _image_table(
        cells,
        [f"block {t}" for t in range(1, num_blocks + 1)],
        columns,
        out,
        "Noise on the redundant channels vs on all channels of Z^t, inverted through blocks t..1",
    )
    return {
        "blocks": list(range(1, num_blocks + 1)),
        "noise_levels": levels,
        "partial_mse": mse["partial"],
        "full_mse": mse["full"],
    }


# 2. Redundant-variance sweep ---------------------------------------------------------------------------
@torch.no_grad()
def redundant_variance_sweep(
    model: Farmer,
    labels: Tensor | Sequence[int] | None,
    out: str | Path,
    scales: Sequence[float] = (0, 0.5, 1, 2, 4),
    draws: int = 4,
    seed: int = 0,
    rows: int = 8,
) -> dict[str, Any]:
    """Sample Z^I once per label, then Z^R from the shared redundant mixture with every Gaussian variance
    times each factor in ``scales`` (0: the chosen components' means) and decode.

    ``draws`` redundant draws per label share their component choices and noise ε across the scales, so only
    the variance changes along a row. labels=None: one row per class (conditional models) or ``rows``
    unconditional rows. Returns scales and pixel_std (per scale): the std over the draws of each pixel in
    [-1, 1] units, averaged over pixels and labels — how much Z^R alone changes the image.
    """
    d_i = _require_redundant(model, "the redundant-variance sweep")
    scales = [float(s) for s in scales]
    if not scales or any(not (math.isfinite(s) and s >= 0) for s in scales):
        raise ValueError(f"scales must be a non-empty list of finite values >= 0, got {scales}")
    if draws < 2:
        raise ValueError(f"draws must be >= 2 (the std is over draws), got {draws}")
    y = _labels(model, labels, rows)
    device, n_tokens = y.device, model.config.num_tokens
    generator = torch.Generator(device).manual_seed(seed)
    informative, _ = model.prior.sample(y, generator)
    _, redundant_mix = model.prior(informative, y)  # one shared mixture per label (batch (B,))
    b, d_r = y.shape[0], model.config.token_dim - d_i
    comp = torch.multinomial(
        torch.softmax(redundant_mix.logits, dim=-1), draws * n_tokens, replacement=True, generator=generator
    )  # (B, R·N)
    index = comp[..., None].expand(b, draws * n_tokens, d_r)
    means = redundant_mix.means.gather(1, index).view(b * draws, n_tokens, d_r)
    stds = redundant_mix.scales.gather(1, index).view(b * draws, n_tokens, d_r)
    eps = torch.randn(means.shape, generator=generator, device=device)
    informative = informative.repeat_interleave(draws, dim=0)
    pixel_std, columns = [], []
    for s in scales:
        images = model.decode(informative, means + math.sqrt(s) * stds * eps).clamp(-1, 1)
        pixel_std.append(images.view(b, draws, -1).std(dim=1).mean().item())
        columns.append(model_to_pixels(images).view(b, draws, *images.shape[1:]))
    cells = [[col[r] for col in columns] for r in range(b)]
    row_labels = [f"class {int(c)}" if model.config.conditional else f"sample {i}" for i, c in enumerate(y)]
    _image_table(
        cells,
        row_labels,
        [f"variance x{s:g}" for s in scales],
        out,
        f"Z^I fixed per row; Z^R redrawn ({draws} draws) with the shared mixture's variance scaled",
    )
    return {"scales": scales, "pixel_std": np.array(pixel_std)}


# 3. Log-det outliers -----------------------------------------------------------------------------------
@torch.no_grad()
def logdet_outliers(
    model: Farmer, images: Tensor, out: str | Path, k: int = 8, bins: int = 40, batch_size: int = 256
) -> dict[str, Any]:
    """Histogram of the per-image flow log-det log|det ∂Z^n/∂Z^0| (nats) of ``images`` (data or samples),
    with the k lowest and k highest images: abnormal log-dets mark blurred or broken images (docs/method.md §9).

    Returns logdet (N,), the histogram counts and bin_edges, and the indices lowest / highest (most extreme
    first).
    """
    if k < 1 or bins < 1 or batch_size < 1:
        raise ValueError(f"k, bins and batch_size must be >= 1, got k={k}, bins={bins}, batch_size={batch_size}")
    x = _model_images(model, images)
    logdet = torch.cat([model.encode(x[lo : lo + batch_size])[2] for lo in range(0, x.shape[0], batch_size)])
    values = logdet.cpu().double().numpy()
    counts, edges = np.histogram(values, bins=bins)
    order = np.argsort(values, kind="stable")
    k = min(k, len(values))
    lowest, highest = order[:k], order[::-1][:k]
    fig = _figure(figsize=(max(6.0, 0.9 * k), 6.0), layout="constrained")
    hist_ax, low_ax, high_ax = fig.subplots(3, 1, height_ratios=(3, 1, 1))
    hist_ax.stairs(counts, edges, fill=True)
    hist_ax.set_xlabel("flow log-det (nats per image)")
    hist_ax.set_ylabel("images")
    hist_ax.set_title(f"{len(values)} images; mean {values.mean():.1f}, std {values.std():.1f}", fontsize=9)
    pixels = model_to_pixels(x.clamp(-1, 1))
    _show(low_ax, pixels[torch.as_tensor(lowest.copy())], nrow=k, title=f"{k} lowest log-det")
    _show(high_ax, pixels[torch.as_tensor(highest.copy())], nrow=k, title=f"{k} highest log-det")
    _save(fig, out)
    return {"logdet": values, "counts": counts, "bin_edges": edges, "lowest": lowest, "highest": highest}


# 4. Unguided s × T grid --------------------------------------------------------------------------------
def has_classifier(model: Farmer, dataset: str) -> bool:
    """Whether farmer.classifier can score this model's samples: a 1x28x28 model of MNIST or Fashion-MNIST."""
    shape = (model.config.channels, model.config.image_size, model.config.image_size)
    return shape == IMAGE_SHAPE and dataset in CLASSIFIER_DATASETS


def classifier_metric_fn(model: Farmer, dataset: str) -> MetricFn:
    """The default metric of :func:`unguided_grid`: farmer.classifier's metrics for MNIST-shaped models."""
    if not has_classifier(model, dataset):
        cfg = model.config
        raise ValueError(
            f"classifier metrics need a 1x28x28 model of mnist or fashion-mnist; got a "
            f"{cfg.channels}x{cfg.image_size}x{cfg.image_size} model and dataset {dataset!r}: pass metric_fn"
        )
    return lambda pixels, labels: classifier_metrics(pixels, dataset, labels)


@torch.no_grad()
def unguided_grid(
    model: Farmer,
    out: str | Path,
    variance_scales: Sequence[float] = (0.7, 0.8, 0.9, 1.0),
    temperatures: Sequence[float] = (1.0, 1.3, 1.6),
    n_per_cell: int = 500,
    metric_fn: MetricFn | None = None,
    dataset: str = "mnist",
    seed: int = 0,
    batch_size: int = 250,
) -> dict[str, Any]:
    """Sample metrics over the decoupled unguided knobs (supplementary §7): variance scale s × weight
    temperature T, as one heat map per metric.

    Every cell draws ``n_per_cell`` class-balanced samples with the same seed (common random numbers, so
    differences come from s and T). ``metric_fn(uint8 pixels, labels or None) -> {name: value}``; the
    default is :func:`classifier_metric_fn` for ``dataset``. Returns variance_scales, temperatures and
    metrics: {name: array (len(s), len(T))}.
    """
    s_values, t_values = [float(s) for s in variance_scales], [float(t) for t in temperatures]
    if not s_values or not t_values or min(s_values + t_values) <= 0:
        raise ValueError(f"variance_scales and temperatures must be non-empty and > 0, got {s_values}, {t_values}")
    if n_per_cell < 2:
        raise ValueError(f"n_per_cell must be >= 2, got {n_per_cell}")
    metric_fn = metric_fn or classifier_metric_fn(model, dataset)
    labels = balanced_labels(model, n_per_cell)
    metrics: dict[str, np.ndarray] = {}
    for i, s in enumerate(s_values):
        for j, t in enumerate(t_values):
            options = SamplingOptions(variance_scale=s, temperature=t, batch_size=batch_size, seed=seed)
            pixels = generate(model, n_per_cell, labels, options)
            for name, value in metric_fn(pixels, labels).items():
                metrics.setdefault(name, np.full((len(s_values), len(t_values)), np.nan))[i, j] = value
    metrics.pop("num_images", None)  # constant by construction; nothing to map
    if not metrics:
        raise ValueError("metric_fn returned no metrics")
    fig = _figure(figsize=(3.2 * len(metrics) + 0.5, 0.45 * len(s_values) + 2.2), layout="constrained")
    for ax, (name, grid) in zip(fig.subplots(1, len(metrics), squeeze=False)[0], metrics.items(), strict=True):
        mesh = ax.imshow(grid, cmap="viridis", aspect="auto")
        fig.colorbar(mesh, ax=ax, shrink=0.8)
        ax.set_xticks(range(len(t_values)), [f"{t:g}" for t in t_values])
        ax.set_yticks(range(len(s_values)), [f"{s:g}" for s in s_values])
        ax.set_xlabel("weight temperature T")
        ax.set_ylabel("variance scale s")
        ax.set_title(name.replace("_", " "), fontsize=9)
        middle = np.nanmean(grid)
        for (r, c), value in np.ndenumerate(grid):
            # Dark text on the bright (high) end of viridis, light text on the dark end.
            color = "black" if value > middle else "white"
            ax.text(c, r, f"{value:.3g}", ha="center", va="center", fontsize=7, color=color)
    fig.suptitle(f"Unguided sampling over s x T ({n_per_cell} samples per cell)", fontsize=10)
    _save(fig, out)
    return {"variance_scales": s_values, "temperatures": t_values, "metrics": metrics}


# Checkpoint entry point --------------------------------------------------------------------------------
def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, Tensor):
        value = value.detach().cpu().numpy()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value.item() if isinstance(value, np.generic) else value


def run_analysis(
    name: str,
    checkpoint: str | Path,
    out_dir: str | Path,
    *,
    data: str | None = None,
    data_root: str | None = None,
    num_images: int = 64,
    from_samples: bool = False,
    n_per_cell: int = 500,
    seed: int = 0,
    device: str | None = None,
) -> dict[str, Any]:
    """Run analysis ``name`` (one of ANALYSES) on a checkpoint; write ``out_dir/<name>.png`` and ``.json``.

    Images (separation, logdet) are the first ``num_images`` test images of ``data`` (default: the
    checkpoint's training data) or, with ``from_samples``, that many class-balanced samples. The unguided
    grid scores ``n_per_cell`` samples per cell with the classifier of ``data``.
    """
    if name not in ANALYSES:
        raise ValueError(f"unknown analysis {name!r}; choose from {', '.join(ANALYSES)}")
    if num_images < 1:
        raise ValueError(f"num_images must be >= 1, got {num_images}")
    model = Farmer.from_pretrained(checkpoint, map_location=device or "cpu")
    data = data or read_config(checkpoint).get("train", {}).get("data", "mnist")
    out_dir = Path(out_dir)
    png = out_dir / f"{name}.png"
    if name == "variance":
        result = redundant_variance_sweep(model, None, png, seed=seed)
    elif name == "unguided":
        result = unguided_grid(model, png, n_per_cell=n_per_cell, dataset=data, seed=seed)
    else:
        if from_samples:
            images = generate(model, num_images, balanced_labels(model, num_images), SamplingOptions(seed=seed))
        else:
            test = make_dataset(data, "test", data_root, model.config.image_size)
            images = torch.stack([test[i][0] for i in range(min(num_images, len(test)))])
        analysis = information_separation if name == "separation" else logdet_outliers
        result = analysis(model, images, png)
    record = {"analysis": name, "checkpoint": str(checkpoint), "data": data, "figure": str(png), **_jsonable(result)}
    (out_dir / f"{name}.json").write_text(json.dumps(record, indent=2) + "\n")
    return record
