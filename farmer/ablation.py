"""The paper's component ablation at small scale, with equal training budgets (docs/method.md §3, §4, §6).

Every trained variant gets the same data, steps, batch size, learning-rate schedule, EMA and seed; only
the model config differs from the baseline:

    farmer               the baseline (a preset, optionally shrunk with overrides for the budget)
    no_dim_reduction     informative_channels=None: the AR models every channel token by token (§3)
    no_condition_repeat  condition_repeat=1 (§4)
    no_final_permute     final_permute=False (§1 step 4)
    normal_prior         prior="normal" (a TARFlow-style flow) with flow blocks added to match the
                         baseline's parameter count
    cfg_naive            the baseline's weights sampled with JetFormer's naive CFG (§6)
    cfg_resampling       the baseline's weights sampled with resampling CFG (Algorithm 1), same w

The quality study of docs/quality.md adds arms over the project's own design axes (docs/method.md §10–11):
patch layout (raw / DCT), learned channel mixing, shared / per-token redundant mixture, d_I, and the
training dequantisation (Gaussian-annealed / uniform).

Each variant reports test bits/dim (uniform dequantisation), the stripe statistic of its samples (vertical
energy at the patch period over the test data's) and, for MNIST / Fashion-MNIST, classifier metrics of
class-balanced samples — unguided, and with resampling CFG when ``guided_metrics`` is set. Results go
to ``<out>/<variant>/result.json``; a variant whose result exists is skipped, and an interrupted training
run resumes from its checkpoint, so re-running the same command continues where it stopped.
``<out>/results.md`` and ``<out>/results.json`` collect everything.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from farmer.analysis import has_classifier
from farmer.classifier import classifier_metrics
from farmer.config import FarmerConfig
from farmer.data import make_dataset
from farmer.evaluation import balanced_labels, dataset_pixels, evaluate_bpd, generate
from farmer.guidance import RecordingGuidance, RedundantPoolStats, ResamplingGuidance
from farmer.images import save_grid
from farmer.io import count_parameters, write_json_atomic
from farmer.metrics import stripe_ratio
from farmer.model import Farmer
from farmer.sampling import SamplingOptions, make_guidance
from farmer.train import TrainConfig, train

BASELINE = "farmer"


@dataclass(frozen=True)
class Variant:
    name: str
    description: str
    changes: dict[str, Any] = field(default_factory=dict)  # FarmerConfig fields changed from the baseline
    guidance: str | None = None  # "naive" or "resampling": sample the baseline's weights with this CFG

    @property
    def trains(self) -> bool:
        return self.guidance is None


VARIANTS: dict[str, Variant] = {
    v.name: v
    for v in (
        Variant(BASELINE, "baseline"),
        Variant("no_dim_reduction", "no dimension reduction (d_I = d)", {"informative_channels": None}),
        Variant("no_condition_repeat", "no condition repeat (M = 1)", {"condition_repeat": 1}),
        Variant("no_final_permute", "no final permute", {"final_permute": False}),
        # Flow blocks are added by variant_config to match the baseline's parameter count.
        Variant(
            "normal_prior", "standard-normal prior (flow only, unconditional, params matched)", {"prior": "normal"}
        ),
        Variant("cfg_naive", "baseline + naive CFG", guidance="naive"),
        Variant("cfg_resampling", "baseline + resampling CFG", guidance="resampling"),
        *(
            Variant(name, description, changes)
            for name, description, changes in (
                ("dct", "DCT patch layout", {"patch_transform": "dct"}),
                ("mixing", "learned channel mixing", {"channel_mixing": True}),
                ("dct_mixing", "DCT + mixing", {"patch_transform": "dct", "channel_mixing": True}),
                ("per_token", "per-token Z^R mixture", {"redundant_mixture": "per_token"}),
                ("dct_per_token", "DCT + per-token Z^R", {"patch_transform": "dct", "redundant_mixture": "per_token"}),
                ("mixing_per_token", "mixing + per-token Z^R",
                 {"channel_mixing": True, "redundant_mixture": "per_token"}),
                ("dct_mixing_per_token", "DCT + mixing + per-token Z^R",
                 {"patch_transform": "dct", "channel_mixing": True, "redundant_mixture": "per_token"}),
                ("mixing_per_token_di4", "mixing + per-token Z^R, d_I = 4",
                 {"channel_mixing": True, "redundant_mixture": "per_token", "informative_channels": 4}),
                ("uniform", "uniform dequantisation", {"dequantization": "uniform"}),
                ("mixing_per_token_uniform", "mixing + per-token Z^R + uniform dequantisation",
                 {"channel_mixing": True, "redundant_mixture": "per_token", "dequantization": "uniform"}),
            )
        ),
    )
}


@dataclass(frozen=True)
class AblationConfig:
    """One budget for every variant. ``model_overrides`` shrink the preset for all variants alike."""

    data: str = "mnist"
    data_root: str | None = None
    preset: str = "mnist"
    model_overrides: dict[str, Any] = field(default_factory=dict)
    steps: int = 400
    batch_size: int = 32
    lr: float = 1e-3
    warmup_steps: int = 40
    # A short run: the EMA must forget the early weights within the budget (window ~1/(1 − decay) steps).
    ema_decay: float = 0.99
    seed: int = 0
    eval_images: int = 1000  # test images for bits/dim
    num_samples: int = 500  # class-balanced samples for the classifier metrics
    sample_batch: int = 250
    guidance_scale: float = 1.5  # w of both CFG variants
    guided_metrics: bool = False  # also score resampling-CFG samples (w = guidance_scale) of every variant
    variants: tuple[str, ...] = tuple(VARIANTS)

    def __post_init__(self) -> None:
        unknown = [v for v in self.variants if v not in VARIANTS]
        if unknown or not self.variants:
            raise ValueError(f"unknown or no variants {unknown}; choose from {', '.join(VARIANTS)}")
        for key in ("steps", "batch_size", "eval_images", "sample_batch"):
            if getattr(self, key) < 1:
                raise ValueError(f"{key} must be >= 1, got {getattr(self, key)}")
        if self.num_samples < 2:
            raise ValueError(f"num_samples must be >= 2, got {self.num_samples}")
        if not self.guidance_scale >= 0:
            raise ValueError(f"guidance_scale must be >= 0, got {self.guidance_scale}")

    @classmethod
    def smoke(cls, **changes: Any) -> AblationConfig:
        """A seconds-long run on the 8x8 digits with the tiny preset: two variants, a handful of steps."""
        base = dict(
            data="digits",
            preset="tiny",
            steps=4,
            batch_size=16,
            warmup_steps=2,
            eval_images=32,
            num_samples=20,
            variants=(BASELINE, "no_final_permute"),
        )
        return cls(**{**base, **changes})

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def budget(self) -> dict[str, Any]:
        """Everything a variant's result depends on (not which other variants run), JSON-shaped."""
        return json.loads(json.dumps({k: v for k, v in self.to_dict().items() if k != "variants"}))


# Configs and parameter counts ---------------------------------------------------------------------------
def parameter_counts(config: FarmerConfig) -> dict[str, int]:
    """Parameters of the flow (AF), the prior (AR) and in total. The ablation's models are small, so they are
    built on the CPU (the meta device's first use costs seconds of imports)."""
    model = Farmer(config)
    flow, prior = count_parameters(model.flow), count_parameters(model.prior)
    return {"flow": flow, "prior": prior, "total": flow + prior}


def baseline_config(cfg: AblationConfig) -> FarmerConfig:
    return FarmerConfig.preset(cfg.preset).replace(**cfg.model_overrides)


def matched_flow_blocks(baseline: FarmerConfig, config: FarmerConfig) -> FarmerConfig:
    """``config`` (a flow-only, prior="normal" variant) with as many flow blocks as bring its parameter count
    closest to the baseline's: the flow-only model gets the AR's parameters as extra flow depth."""
    target = parameter_counts(baseline)["total"]
    # The count is affine in the block count (identical blocks), so two counts give the best one directly.
    one = parameter_counts(config.replace(flow_blocks=1))["total"]
    per_block = parameter_counts(config.replace(flow_blocks=2))["total"] - one
    return config.replace(flow_blocks=max(1, 1 + round((target - one) / per_block)))


def variant_config(cfg: AblationConfig, name: str) -> FarmerConfig:
    baseline = baseline_config(cfg)
    config = baseline.replace(**VARIANTS[name].changes, name=f"ablation-{name}")
    return matched_flow_blocks(baseline, config) if config.prior == "normal" else config


def train_config(cfg: AblationConfig) -> TrainConfig:
    """The shared budget; evaluation and samples only at the end, a checkpoint every ~10 % for resuming."""
    return dataclasses.replace(
        TrainConfig.preset(cfg.preset),
        data=cfg.data,
        data_root=cfg.data_root,
        steps=cfg.steps,
        batch_size=cfg.batch_size,
        lr=cfg.lr,
        warmup_steps=min(cfg.warmup_steps, cfg.steps),
        ema_decay=cfg.ema_decay,
        seed=cfg.seed,
        eval_every=cfg.steps,
        eval_images=min(cfg.eval_images, 100),  # the trainer's own end-of-run check; run_variant reports the bpd
        sample_every=cfg.steps,
        save_every=max(1, cfg.steps // 10),
        log_every=max(1, min(50, cfg.steps)),
    )


# Running ------------------------------------------------------------------------------------------------
def run_variant(
    cfg: AblationConfig, name: str, out_dir: str | Path, device: str | None = None, log: Callable[[str], None] = print
) -> dict[str, Any]:
    """Train (or reuse the baseline for CFG variants), evaluate and write ``<out>/<name>/result.json``;
    return the stored result without any work when it already exists."""
    out_dir = Path(out_dir)
    result_file = out_dir / name / "result.json"
    budget = cfg.budget()
    if result_file.is_file():
        stored = json.loads(result_file.read_text())
        if stored.get("budget") != budget:
            raise ValueError(
                f"{result_file} was made with a different budget {stored.get('budget')} (now "
                f"{budget}); use a new output directory"
            )
        log(f"[{name}] done already: {result_file}")
        return stored
    variant = VARIANTS[name]
    model_config = variant_config(cfg, BASELINE if not variant.trains else name)
    run_dir = out_dir / (name if variant.trains else BASELINE)
    start = time.perf_counter()
    log(f"[{name}] {variant.description}: training {run_dir} ({cfg.steps} steps of {cfg.batch_size})")
    train(
        model_config,
        train_config(cfg),
        run_dir,
        device=device,
        progress=False,
        log=lambda line: log(f"[{name}] {line}"),
    )
    train_seconds = time.perf_counter() - start
    model = Farmer.from_pretrained(run_dir, map_location=device or "cpu")
    test_set = make_dataset(cfg.data, "test", cfg.data_root, model_config.image_size)
    bpd = evaluate_bpd(model, test_set, max_images=cfg.eval_images, seed=cfg.seed)
    log(f"[{name}] test bits/dim {bpd:.4f} on {min(cfg.eval_images, len(test_set))} images")

    start = time.perf_counter()
    reference = dataset_pixels(cfg.data, "test", cfg.num_samples, model_config.image_size, cfg.data_root)
    # The standard-normal prior ignores the class, so there is nothing to guide.
    guidable = model_config.conditional and model_config.prior == "ar"
    guided = variant.guidance or ("resampling" if cfg.guided_metrics and guidable else None)
    samples = {"": _sample_metrics(model, cfg, variant.guidance, reference, out_dir / name / "samples.png")}
    if guided and not variant.guidance:
        samples["cfg_"] = _sample_metrics(model, cfg, guided, reference, out_dir / name / "samples_cfg.png")
    result = {
        "variant": name,
        "budget": budget,
        "description": variant.description,
        "checkpoint": str(run_dir),
        "guidance": variant.guidance,
        "guidance_scale": cfg.guidance_scale if guided else None,
        "params": parameter_counts(model_config),
        "model": model_config.to_dict(),
        "test_bpd": bpd,
        "bpd_images": min(cfg.eval_images, len(test_set)),
        **{prefix + k: v for prefix, metrics in samples.items() for k, v in metrics.items()},
        "num_samples": cfg.num_samples,
        "train_seconds": round(train_seconds, 1),  # of this invocation (0 when the checkpoint was complete)
        "sample_seconds": round(time.perf_counter() - start, 1),
    }
    result_file.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(result_file, result)
    scores = ", ".join(f"{k} {v:.4g}" for k, v in result.items() if k.endswith(SAMPLE_METRICS) and v is not None)
    log(f"[{name}] samples in {result['sample_seconds']} s: {scores}")
    return result


SAMPLE_METRICS = ("classifier_score", "frechet_distance", "accuracy", "stripe_ratio", "redundant_ess")


def _sample_metrics(model: Farmer, cfg: AblationConfig, guidance: str | None, reference: Tensor,
                    grid: Path) -> dict[str, float | None]:
    """Classifier metrics (where a classifier exists) and the stripe statistic of class-balanced samples; under
    resampling CFG also the mean effective sample size of the redundant candidate pools and their size."""
    labels = balanced_labels(model, cfg.num_samples)
    pools = RedundantPoolStats()
    method = None if guidance is None else make_guidance(guidance, cfg.guidance_scale)
    if isinstance(method, ResamplingGuidance):
        method = RecordingGuidance(method, pools)
    options = SamplingOptions(guidance=method, batch_size=cfg.sample_batch, seed=cfg.seed)
    pixels = generate(model, cfg.num_samples, labels, options)
    # No classifier for e.g. the 8x8 digits: the samples still make the grid.
    metrics = classifier_metrics(pixels, cfg.data, labels) if has_classifier(model, cfg.data) else {}
    save_grid(pixels[:100], grid, nrow=10, scale=2)
    return {**{k: metrics.get(k) for k in SAMPLE_METRICS[:3]},
            "stripe_ratio": stripe_ratio(pixels, reference, model.config.patch_size),
            "redundant_ess": torch.cat(pools.ess).mean().item() if pools.ess else None,
            "redundant_pool": pools.pool_size}


def _cell(value: float | None, digits: int = 3) -> str:
    return "—" if value is None else f"{value:.{digits}f}"


def _pool_cell(result: dict[str, Any]) -> str:
    ess = result.get("cfg_redundant_ess", result.get("redundant_ess"))
    size = result.get("cfg_redundant_pool", result.get("redundant_pool"))
    return "—" if ess is None else f"{ess:.1f} / {size}"


def results_table(cfg: AblationConfig, results: list[dict[str, Any]]) -> str:
    """The markdown report: the shared budget, then one row per variant."""
    lines = [
        f"# FARMER ablation on {cfg.data} (preset {cfg.preset}"
        + (f", overrides {cfg.model_overrides}" if cfg.model_overrides else "")
        + ")",
        "",
        f"Equal budget for every trained variant: {cfg.steps} steps of batch {cfg.batch_size}, lr {cfg.lr:g} "
        f"(warm-up {cfg.warmup_steps}, cosine), EMA {cfg.ema_decay}, seed {cfg.seed}. Test bits/dim with "
        f"uniform dequantisation on {cfg.eval_images} test images; sample metrics from the data set's "
        f"classifier on {cfg.num_samples} class-balanced samples (s = T = 1 unless guided; CFG w = "
        f"{cfg.guidance_scale:g}). CFG rows reuse the baseline's weights.",
        "",
        "| variant | change | AF params | AR params | total | test bpd ↓ | classifier score ↑ "
        "| Fréchet dist. ↓ | accuracy ↑ | stripes (→ 1) | CFG: accuracy ↑ | CFG: Fréchet ↓ | CFG: stripes "
        "| CFG: Z^R pool ESS / size |",
        "|---|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|",
    ]
    for r in results:
        p = r["params"]
        lines.append(
            f"| {r['variant']} | {r['description']} | {p['flow']:,} | {p['prior']:,} | {p['total']:,} "
            f"| {_cell(r['test_bpd'], 4)} | {_cell(r['classifier_score'])} | {_cell(r['frechet_distance'], 2)} "
            f"| {_cell(r['accuracy'])} | {_cell(r.get('stripe_ratio'), 2)} | {_cell(r.get('cfg_accuracy'))} "
            f"| {_cell(r.get('cfg_frechet_distance'), 2)} | {_cell(r.get('cfg_stripe_ratio'), 2)} "
            f"| {_pool_cell(r)} |"
        )
    return "\n".join(lines) + "\n"


def run_ablation(
    cfg: AblationConfig, out_dir: str | Path, device: str | None = None, log: Callable[[str], None] = print
) -> list[dict[str, Any]]:
    """Run every variant of ``cfg`` (resumably) and write ``results.md`` and ``results.json`` to ``out_dir``."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    results = []
    for name in cfg.variants:
        results.append(run_variant(cfg, name, out_dir, device, log))
        # Rewritten after every variant, so a partial run already has a readable table.
        (out_dir / "results.md").write_text(results_table(cfg, results))
        write_json_atomic(out_dir / "results.json", {"config": cfg.to_dict(), "results": results})
    return results
