"""Training: AdamW + warm-up/cosine schedule, gradient clipping, EMA, accumulation, bf16 autocast on
accelerators, DDP or FSDP under ``torchrun``, and checkpoints that resume bit for bit.

Determinism: every random draw of the training stream comes from state saved in the checkpoint — the
data order is a pure function of (seed, step), dequantisation noise has its own generator, label
dropout uses the global torch generator — while evaluation and sampling use their own fixed-seed
generators. Resuming at step k therefore continues exactly as if the run had never stopped (on CPU,
bitwise).
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import os
import signal
import threading
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, Sampler
from tqdm import tqdm

from farmer.checkpoint import (
    OPTIMIZER,
    TRAINER,
    is_sharded_checkpoint,
    load_sharded_state,
    lock_run_directory,
    save_checkpoint,
    save_sharded_checkpoint,
    unflatten_optimizer_state,
)
from farmer.config import FarmerConfig, check_dict, field_type_errors, warn_defaulted_fields
from farmer.data import DATASET_NAMES, DEFAULT_VAL_FRACTION, dataset_info, make_dataset
from farmer.distill import DistillationObjective
from farmer.distributed import (
    Runtime,
    full_optimizer_state,
    full_state,
    gather_objects,
    init_runtime,
    is_sharded,
    load_optimizer_state,
    load_sharded_into,
    local_shards,
    sharded_state,
    wrap_distributed,
)
from farmer.io import FarmerError, count_parameters, write_atomic
from farmer.model import Farmer
from farmer.objective import LikelihoodObjective, Objective
from farmer.pixels import dequantize, gaussian_noise_std
from farmer.precision import PRECISIONS, autocast, autocast_dtype, describe
from farmer.pretrained import (
    CONFIG,
    EMA_WEIGHTS,
    LATEST,
    MODEL_WEIGHTS,
    first_nonfinite,
    load_state_into,
    load_weights,
    read_config,
    resolve_checkpoint,
)
from farmer.sampling import SamplingOptions, sample_grid
from farmer.tracking import MetricsMirror, open_mirror


@dataclass(frozen=True)
class TrainConfig:
    data: str = "mnist"  # a dataset name (mnist, fashion-mnist, digits) or an image-folder path
    data_root: str | None = None
    steps: int = 10_000
    batch_size: int = 64  # global: over all ranks and accumulation micro-steps
    grad_accum: int = 1
    # Paper (docs/method.md §8): AdamW β=(0.9, 0.95), wd 0.03, lr 1e-4 cosine to 1e-6 after 5,000 warm-up steps.
    lr: float = 1e-4
    min_lr: float = 1e-6
    warmup_steps: int = 5_000
    weight_decay: float = 0.03
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    ema_decay: float = 0.9999
    seed: int = 0
    precision: str = "auto"  # farmer.precision: "auto" (bf16 on accelerators, fp32 on CPUs), "fp32" or "bf16"
    compile: bool = False
    # Recompute each transformer layer in the backward pass rather than hold its activations (farmer.nn.Transformer):
    # less memory for about one more forward pass of the trunks (`farmer plan` sizes both).
    activation_checkpointing: bool = False
    sharding: str = "ddp"  # under torchrun with several processes: "ddp" or "fsdp"
    # Under FSDP with several processes, "sharded": every rank writes its own shards of weights, EMA and optimizer
    # (torch.distributed.checkpoint) and rank 0 the gathered EMA as safetensors; "full": rank 0 gathers everything
    # into safetensors, as every other run does (farmer/checkpoint.py).
    checkpoint_format: str = "sharded"
    # "likelihood": train the model by maximum likelihood (docs/method.md §5). "distill": train only the one-step
    # student of the flow inverse from the frozen checkpoint ``teacher`` (docs/method.md §7, Algorithm 2).
    objective: str = "likelihood"
    teacher: str | None = None
    teacher_weights: str = "ema"  # which of the teacher checkpoint's weights to distil: "ema" or "raw"
    # A new run starts from these (EMA) weights instead of a random initialisation: a run, step or shipped
    # model whose model config equals this run's (a distilled student there is left behind). Fine-tuning.
    init_from: str | None = None
    # DataLoader workers per rank. None: min(8, CPUs per rank − 1) for an image folder or packed shards (decoding
    # and copying overlap the step), 0 for the in-memory named sets (indexing a tensor needs no worker).
    num_workers: int | None = None
    # Share of an image folder without train/val subfolders held out (fixed seed) for test bits/dim.
    val_fraction: float = DEFAULT_VAL_FRACTION
    log_every: int = 10
    eval_every: int = 500  # test bits/dim (uniform dequantisation, EMA weights)
    eval_images: int = 2_000
    sample_every: int = 1_000
    save_every: int = 500
    keep_checkpoints: int = 2
    # Extra save and evaluation points by wall-clock time (rank 0's, since the last one; 0: off), checked at
    # logging steps: steps take very different times on different GPUs and presets.
    save_every_minutes: float = 0.0
    eval_every_minutes: float = 0.0

    def __post_init__(self) -> None:
        errors = field_type_errors(self)
        if errors:  # the checks below assume the types
            raise ValueError("invalid TrainConfig: " + "; ".join(errors))
        for key in ("steps", "batch_size", "grad_accum", "log_every", "eval_every", "eval_images", "sample_every",
                    "save_every"):
            if getattr(self, key) < 1:
                errors.append(f"{key} must be >= 1")
        for key in ("warmup_steps", "num_workers", "keep_checkpoints", "min_lr", "weight_decay", "save_every_minutes",
                    "eval_every_minutes"):
            if (getattr(self, key) or 0) < 0:  # num_workers None: the default
                errors.append(f"{key} must be >= 0")
        if self.lr <= 0 or self.grad_clip <= 0:
            errors.append("lr and grad_clip must be > 0")
        if not (0 <= self.beta1 < 1 and 0 <= self.beta2 < 1):
            errors.append("beta1 and beta2 must be in [0, 1)")
        if not 0 < self.val_fraction < 1:
            errors.append("val_fraction must be in (0, 1)")
        if self.precision not in PRECISIONS:
            errors.append(f"precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")
        if self.sharding not in ("ddp", "fsdp"):
            errors.append(f"sharding must be ddp or fsdp, got {self.sharding!r}")
        if self.checkpoint_format not in ("full", "sharded"):
            errors.append(f"checkpoint_format must be full or sharded, got {self.checkpoint_format!r}")
        if self.objective not in ("likelihood", "distill"):
            errors.append(f"objective must be likelihood or distill, got {self.objective!r}")
        if self.teacher_weights not in ("ema", "raw"):
            errors.append(f"teacher_weights must be ema or raw, got {self.teacher_weights!r}")
        if (self.objective == "distill") != (self.teacher is not None):
            errors.append("a teacher checkpoint is needed for, and only for, objective='distill'")
        if not 0 <= self.ema_decay < 1:
            errors.append("ema_decay must be in [0, 1)")
        if errors:
            raise ValueError("invalid TrainConfig: " + "; ".join(errors))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        check_dict(data, "a TrainConfig")
        unknown = sorted(set(data) - {f.name for f in fields(cls)})
        if unknown:
            raise ValueError(f"unknown TrainConfig field(s): {', '.join(unknown)}")
        return cls(**data)

    @classmethod
    def preset(cls, name: str) -> TrainConfig:
        """Training defaults that fit a model preset; the paper's settings for everything else."""
        return cls(**TRAIN_PRESETS.get(name, {}))


IMAGENET_TRAIN_IMAGES = 1_281_167
# The paper's ImageNet runs (docs/method.md §8): its optimiser (the TrainConfig defaults) for 320 epochs. It reports
# no batch size: 256 global is our choice, so 320 epochs are 1,601,458 steps. Saves and evaluations follow GPU time
# (every 30 and 60 minutes); the step-based points are only a backstop. --data names the image folder. On 8 GPUs
# the batch is 32 per GPU; where the memory plan (farmer plan) says that does not fit, raise grad_accum.
_IMAGENET_TRAIN: dict[str, Any] = dict(
    batch_size=256, steps=320 * IMAGENET_TRAIN_IMAGES // 256, log_every=100, save_every=50_000, eval_every=50_000,
    sample_every=50_000, eval_images=2_000, save_every_minutes=30.0, eval_every_minutes=60.0, sharding="fsdp")

TRAIN_PRESETS: dict[str, dict[str, Any]] = {
    "tiny": dict(data="digits", steps=300, batch_size=32, lr=2e-3, warmup_steps=20, ema_decay=0.99,
                 eval_every=100, eval_images=297, sample_every=300, save_every=100, log_every=10),
    # Small model, short CPU budget: a larger learning rate and a short warm-up than the paper's 1.1B runs.
    # EMA 0.995: with the noise annealed the weights move fast late in a short run, and a longer average
    # lags (the shipped run used 0.999: EMA 4.59 vs raw 2.20 test bits/dim at step 3,000).
    "mnist": dict(data="mnist", steps=3_000, batch_size=64, lr=1e-3, min_lr=1e-5, warmup_steps=200,
                  ema_decay=0.995, eval_every=500, eval_images=2_000, sample_every=500, save_every=250),
    **dict.fromkeys(("imagenet256-1.1b-p16", "imagenet256-1.1b-p8", "imagenet256-1.9b-p16", "imagenet256-1.9b-p8",
                     "imagenet64-556m"), _IMAGENET_TRAIN),
}


# Schedule ------------------------------------------------------------------------------------------
def learning_rate(step: int, cfg: TrainConfig) -> float:
    """Linear warm-up to ``lr``, then cosine decay to ``min_lr`` at ``steps``."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = min(1.0, (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps))
    return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1 + math.cos(math.pi * progress))


# Data order ----------------------------------------------------------------------------------------
class StepSampler(Sampler[list[int]]):
    """Index lists of micro-batches, a pure function of (seed, step): resuming at any step is exact.

    Each epoch is a fresh permutation; step s takes the s-th global batch of it, rank r its r-th strided
    share, split into ``grad_accum`` micro-batches.
    """

    def __init__(self, size: int, cfg: TrainConfig, start_step: int, rank: int = 0, world: int = 1) -> None:
        if cfg.batch_size % (world * cfg.grad_accum):
            raise ValueError(f"batch_size {cfg.batch_size} must be divisible by world size {world} × "
                             f"grad_accum {cfg.grad_accum}")
        if size < cfg.batch_size:
            raise ValueError(f"the dataset has {size} images, fewer than one batch of {cfg.batch_size}")
        self.size, self.cfg, self.start, self.rank, self.world = size, cfg, start_step, rank, world

    def __len__(self) -> int:
        return (self.cfg.steps - self.start) * self.cfg.grad_accum

    def __iter__(self) -> Iterator[list[int]]:
        batch, per_epoch = self.cfg.batch_size, self.size // self.cfg.batch_size
        perm, perm_epoch = None, -1
        for step in range(self.start, self.cfg.steps):
            epoch, index = divmod(step, per_epoch)
            if epoch != perm_epoch:
                generator = torch.Generator().manual_seed(self.cfg.seed * 1_000_003 + epoch)
                perm, perm_epoch = torch.randperm(self.size, generator=generator), epoch
            local = perm[index * batch:(index + 1) * batch][self.rank::self.world]
            yield from (chunk.tolist() for chunk in local.chunk(self.cfg.grad_accum))


def loader_workers(cfg: TrainConfig) -> int:
    """``cfg.num_workers``, or its default: 0 for in-memory named sets, else min(8, CPUs per rank − 1)."""
    if cfg.num_workers is not None:
        return cfg.num_workers
    if cfg.data in DATASET_NAMES:
        return 0
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    per_rank = cpus // int(os.environ.get("LOCAL_WORLD_SIZE", "1"))  # torchrun's processes on this node
    return max(0, min(8, per_rank - 1))


# Training ------------------------------------------------------------------------------------------
def make_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.AdamW:
    """The trainer's optimizer: AdamW at ``cfg``'s learning rate, betas and weight decay over ``model``'s
    trainable parameters (matrices and embeddings decayed; biases and norm gains not). Under FSDP, build it
    after wrapping: FSDP replaces the parameters with sharded ones."""
    # Decay matrices and embeddings; not biases and norm gains (nanoGPT's split). The learned channel mixing
    # (farmer.channels.ChannelMixing, docs/method.md §10) is decayed too, on purpose: its L and U factors are
    # matrices and shrink toward W = diag(s), the identity it starts from, never toward a singular W, since log s
    # is a vector and undecayed. docs/quality.md found the mixing neutral, so the recipe it was measured under
    # stays.
    decay = [p for p in model.parameters() if p.requires_grad and p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.ndim < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2))


def make_ema(model: nn.Module) -> nn.Module:
    """The trainer's EMA of ``model``: a frozen copy of it, which :func:`train_step` moves toward the model."""
    return copy.deepcopy(model).requires_grad_(False)


def _rng_state(generator: torch.Generator) -> dict[str, list[int]]:
    state = {"torch": torch.get_rng_state().tolist(), "noise": generator.get_state().tolist()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state().tolist()
    return state


def _set_rng_state(state: dict[str, list[int]], generator: torch.Generator) -> None:
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
    generator.set_state(torch.tensor(state["noise"], dtype=torch.uint8))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(torch.tensor(state["cuda"], dtype=torch.uint8))


# TrainConfig fields added after checkpoint format 1, each defaulting to what runs saved before it did (off, or the
# equivalent): a run resumed without them needs no warning (farmer.config.warn_defaulted_fields).
TRAIN_FIELDS_ADDED_LATER = ("checkpoint_format", "save_every_minutes", "eval_every_minutes", "activation_checkpointing")


def read_trainer_state(step_dir: Path) -> dict[str, Any]:
    """A checkpoint's trainer.json: an error naming the file if it is torn or has no integer ``step``."""
    path = step_dir / TRAINER
    try:
        state = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{path} is corrupt ({err}); resume from an earlier step by writing its name into "
                         f"{step_dir.parent / LATEST}") from None
    if not isinstance(state, dict) or not isinstance(state.get("step"), int):
        raise ValueError(f"{path} is not a trainer state: it needs an integer 'step'")
    return state


def restore_rng_state(state: dict[str, Any], rank: int, generator: torch.Generator, source: Path) -> None:
    """Rank ``rank``'s RNG states from a trainer state; without them (an edited file, another world size) a
    warning says the run goes on from the seeded generators, no longer bit-exact."""
    rngs = state.get("rng")
    try:
        _set_rng_state(rngs[rank], generator)
    except (TypeError, IndexError, KeyError, ValueError, RuntimeError):
        warnings.warn(f"{source} holds no usable RNG state for rank {rank}: resuming with freshly seeded random "
                      "generators (the run is no longer bit-identical to an uninterrupted one)", stacklevel=2)


def stored_configs(run_dir: str | Path) -> tuple[FarmerConfig, TrainConfig]:
    """The model and training configs of a run's newest checkpoint; errors name its config.json."""
    step_dir = resolve_checkpoint(run_dir)
    stored = read_config(step_dir)
    try:
        configs = FarmerConfig.from_dict(stored["model"]), TrainConfig.from_dict(stored.get("train", {}))
    except ValueError as err:
        raise ValueError(f"{step_dir / CONFIG}: {err}") from None
    warn_defaulted_fields(TrainConfig, stored.get("train", {}), str(step_dir / CONFIG), TRAIN_FIELDS_ADDED_LATER)
    return configs


def _check_resume_config(run_dir: Path, model_config: FarmerConfig) -> None:
    stored = FarmerConfig.from_dict(read_config(run_dir)["model"])
    if stored != model_config:
        diff = stored.diff(model_config)
        raise ValueError(f"cannot resume {run_dir}: its model config differs in {diff} (stored, requested); "
                         "use a new --out directory")


class MetricsLog:
    """metrics.jsonl: one JSON object per line; on resume, lines past the checkpoint step are dropped."""

    def __init__(self, path: Path, resume_step: int, enabled: bool, mirror: MetricsMirror | None = None) -> None:
        self.path, self.enabled, self.mirror = path, enabled, mirror  # mirror: e.g. TensorBoard (farmer.tracking)
        if enabled and path.exists():
            lines = [line for line in path.read_text().splitlines() if line.strip()]
            kept = []
            for number, line in enumerate(lines, 1):
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:
                    if number == len(lines):  # a kill mid-write tears only the last line: drop it
                        continue
                    raise ValueError(f"{path}: line {number} is not JSON; fix or delete that line") from None
                if record.get("step", 0) <= resume_step:
                    kept.append(line)
            # Atomically: a kill during a rewrite in place would leave the whole history at 0 bytes.
            write_atomic(path, "".join(line + "\n" for line in kept))

    def write(self, **record: Any) -> None:
        if self.enabled:
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")
            if self.mirror is not None:
                self.mirror.write(record)


class TrainingDiverged(FarmerError):
    """The loss or the weights became NaN or Inf; nothing after the last finite checkpoint was saved."""


class TrainingInterrupted(FarmerError):
    """A SIGTERM (a cluster's preemption or ``kill``) or a SIGINT (Ctrl-C) stopped training after saving its step;
    it resumes exactly."""

    def __init__(self, message: str, signum: int = signal.SIGTERM) -> None:
        super().__init__(message)
        # The CLI's exit status, as for a process killed by the signal (143 for SIGTERM: schedulers may requeue
        # it; 130 for Ctrl-C).
        self.exit_status = 128 + int(signum)


class StopRequest(threading.Event):
    """Set by the first SIGTERM or SIGINT; ``signum`` is that signal (None while clear)."""

    signum: int | None = None


@contextlib.contextmanager
def _termination_requests() -> Iterator[StopRequest]:
    """An event set by SIGTERM or SIGINT (Ctrl-C) while the block runs (in the main thread; elsewhere signals
    cannot be caught and the event stays clear). A second Ctrl-C interrupts at once (KeyboardInterrupt), for a
    user who will not wait for the save. The previous handlers are restored afterwards."""
    requested = StopRequest()
    if threading.current_thread() is not threading.main_thread():
        yield requested
        return

    def request(signum: int, frame: object) -> None:
        if requested.is_set() and signum == signal.SIGINT and requested.signum == signal.SIGINT:
            raise KeyboardInterrupt
        if not requested.is_set():
            requested.signum = signum
            requested.set()

    previous = {signum: signal.signal(signum, request) for signum in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield requested
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


# Objectives and the step ---------------------------------------------------------------------------
def make_objective(cfg: TrainConfig) -> Objective:
    """``cfg.objective`` as an :class:`~farmer.objective.Objective`."""
    if cfg.objective == "distill":
        return DistillationObjective(cfg.teacher, teacher_ema=cfg.teacher_weights == "ema")
    return LikelihoodObjective()


def amp_dtype(cfg: TrainConfig, device: torch.device) -> torch.dtype | None:
    """The autocast dtype of ``cfg.precision`` on ``device`` (farmer.precision)."""
    return autocast_dtype(cfg.precision, device)


def ema_decay_at(step: int, cfg: TrainConfig) -> float:
    """The EMA decay at ``step``, warmed up: early on, the average would be dominated by the initial weights."""
    return min(cfg.ema_decay, (1 + step) / (10 + step))


@dataclass(frozen=True)
class StepResult:
    """One step's logged numbers, left on the device: reading one (``.item()``, ``float()``) syncs."""

    loss: Tensor  # the loss averaged over the micro-batches (detached; this rank's)
    grad_norm: Tensor  # the total gradient norm before clipping


def _accumulating(net: Callable[..., Any], last: bool) -> contextlib.AbstractContextManager[Any]:
    # DDP all-reduces gradients in every backward unless told not to: only the last micro-batch needs it.
    ddp = getattr(net, "_orig_mod", net)  # under torch.compile
    if last or not isinstance(ddp, nn.parallel.DistributedDataParallel):
        return contextlib.nullcontext()
    return ddp.no_sync()


@torch.no_grad()
def _update_ema(ema: nn.Module, model: nn.Module, decay: float) -> None:
    # Frozen weights are skipped: their average is the weights themselves.
    for p_ema, p in zip(ema.parameters(), model.parameters(), strict=True):
        if p.requires_grad:
            p_ema.lerp_(p, 1 - decay)


def train_step(model: nn.Module, optimizer: torch.optim.Optimizer,
               micro_batches: Sequence[tuple[Tensor, Tensor | None]], *, grad_clip: float,
               ema: nn.Module | None = None, ema_decay: float = 0.0, amp: torch.dtype | None = None,
               loss: Callable[[Tensor, Tensor | None], tuple[Tensor, Any]] | None = None) -> StepResult:
    """One optimisation step as the trainer runs it: forward and backward of each (images, labels) micro-batch
    (gradients accumulate; each loss weighs 1/len(micro_batches)), gradient clipping to ``grad_clip``, the
    optimizer step at the learning rate its groups hold, and the EMA update ``ema ← ema + (1 − ema_decay)·(model
    − ema)`` when an ``ema`` (a copy of ``model``) is given. Nothing here syncs with the device.

    ``model``: the module whose trainable (``requires_grad``) parameters the optimizer steps. ``loss``: what maps
    (images, labels) to (loss, …): the objective's module over ``model``, DDP-wrapped and/or compiled (only the
    last micro-batch all-reduces); default ``model`` itself (the likelihood, docs/method.md §5). ``amp``: the
    autocast dtype (None: no autocast)."""
    net = model if loss is None else loss
    model.train()
    total = torch.zeros((), device=micro_batches[0][0].device)
    for index, (x, y) in enumerate(micro_batches):
        with _accumulating(net, index == len(micro_batches) - 1), autocast(x.device, amp):
            value, _ = net(x, y)
        (value / len(micro_batches)).backward()
        total += value.detach() / len(micro_batches)
    grad_norm = nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], grad_clip)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    if ema is not None:
        _update_ema(ema, model, ema_decay)
    return StepResult(total, grad_norm)


def train(model_config: FarmerConfig, cfg: TrainConfig, out_dir: str | Path, device: str | None = None,
          progress: bool = True, log: Callable[[str], None] = print, stop_at: int | None = None,
          logger: str = "jsonl") -> dict[str, Any]:
    """Train (or resume, if ``out_dir`` holds a checkpoint) and return the last logged metrics.

    ``stop_at`` ends this invocation after that step (saving a checkpoint there) without changing the
    schedule, which stays defined by ``cfg.steps``: for time-boxed jobs that resume later. ``logger``
    "tensorboard" mirrors metrics.jsonl and the sample grids to ``out_dir/tensorboard`` (farmer.tracking).

    The main process holds the run directory's lock throughout (a second trainer fails at once). A NaN or
    Inf loss (or weights) raises TrainingDiverged at the next logging, evaluation or save step, before
    anything is evaluated or saved, so the last checkpoint stays the last finite one. The run stops rather
    than skipping bad steps: deciding to skip needs the loss on the host every step, a device sync.

    A SIGTERM (preemption, ``scancel``, ``kill``; torchrun forwards it to every rank) stops the run at its next
    logging step, which is saved like any checkpoint; then TrainingInterrupted is raised. Running the same command
    again resumes exactly.
    """
    rt = init_runtime(device)
    with lock_run_directory(out_dir) if rt.main else contextlib.nullcontext():
        return _train(rt, model_config, cfg, Path(out_dir), progress, log, stop_at, logger)


def _datasets(model_config: FarmerConfig, cfg: TrainConfig) -> tuple[Dataset, Dataset]:
    """The training and test sets of ``cfg.data``, checked against the model's image shape and classes."""
    info = dataset_info(cfg.data, model_config.image_size)
    if (info.channels, info.image_size) != (model_config.channels, model_config.image_size):
        raise ValueError(f"data {cfg.data!r} has {info.channels}×{info.image_size}² images but the model expects "
                         f"{model_config.channels}×{model_config.image_size}²")
    if model_config.conditional and info.num_classes != model_config.num_classes:
        raise ValueError(f"data {cfg.data!r} has {info.num_classes} classes but the model has "
                         f"{model_config.num_classes}")
    train_set = make_dataset(cfg.data, "train", cfg.data_root, model_config.image_size, cfg.val_fraction)
    return train_set, make_dataset(cfg.data, "test", cfg.data_root, model_config.image_size, cfg.val_fraction)


def _train(rt: Runtime, model_config: FarmerConfig, cfg: TrainConfig, out: Path, progress: bool,
           log: Callable[[str], None], stop_at: int | None, logger: str = "jsonl") -> dict[str, Any]:
    train_set, eval_set = _datasets(model_config, cfg)
    session = _Session(rt, model_config, cfg, out, eval_set, log, logger)
    if rt.main:
        out.mkdir(parents=True, exist_ok=True)
        log(f"model {model_config.name}: {count_parameters(session.model) / 1e6:.2f}M parameters, {rt.world} "
            f"process(es) on {rt.device}, {len(train_set)} training images, {describe(cfg.precision, rt.device)}")
    return session.run(train_set, progress, stop_at)


def initialise_from(model: Farmer, checkpoint: str) -> None:
    """Copy the flow and prior (EMA) weights of ``checkpoint`` into ``model``; their architectures must agree
    (:meth:`FarmerConfig.architecture`: the training recipe may change, and a student there is not copied: it
    must be distilled again for the new weights)."""
    source = Farmer.from_pretrained(checkpoint)
    differences = source.config.architecture().diff(model.config.architecture())
    if differences:
        raise ValueError(f"--init-from {checkpoint}: its model config differs from this run's: "
                         f"{differences} (checkpoint, run)")
    model.flow.load_state_dict(source.flow.state_dict())
    model.prior.load_state_dict(source.prior.state_dict())


def steps_behind(checkpoint: str | None) -> int:
    """Training steps behind the flow and prior weights of ``checkpoint`` (0 for None): those of the runs it
    started from (its config.json ``pretrained_steps``) plus its own run's, unless that run was a distillation,
    which trains only the student."""
    if checkpoint is None:
        return 0
    stored = read_config(resolve_checkpoint(checkpoint))
    own = 0 if stored.get("train", {}).get("objective") == "distill" else int(stored.get("step", 0))
    return int(stored.get("pretrained_steps", 0)) + own


class _Session:
    """One invocation of the trainer: the model, its EMA and optimizer (new, or restored from the newest
    checkpoint), the loop (:meth:`run`), and what it logs, evaluates and saves. Whatever depends on the
    objective is asked of ``self.objective``."""

    def __init__(self, rt: Runtime, model_config: FarmerConfig, cfg: TrainConfig, out: Path, eval_set: Dataset,
                 log: Callable[[str], None], logger: str) -> None:
        self.rt, self.model_config, self.cfg, self.out, self.eval_set = rt, model_config, cfg, out, eval_set
        self.objective = make_objective(cfg)
        resuming = (out / LATEST).is_file()
        torch.manual_seed(cfg.seed)  # same initial weights on every rank
        self.model = self.objective.build_model(model_config, resuming).to(rt.device)
        self.model.set_activation_checkpointing(cfg.activation_checkpointing)
        self.ema = make_ema(self.model)
        self.noise_generator = torch.Generator().manual_seed(cfg.seed * 7919 + rt.rank)
        torch.manual_seed(cfg.seed * 104_729 + rt.rank)  # label dropout differs across ranks, as data does
        restored = self._restore(log) if resuming else None
        # Steps of earlier runs behind the starting flow and prior (an --init-from chain, or a distillation's
        # teacher), recorded in every checkpoint so that a model card can count them.
        pretrained_steps = (steps_behind(cfg.init_from or cfg.teacher) if restored is None
                            else int(read_config(restored[1]).get("pretrained_steps", 0)))
        if restored is None and cfg.init_from is not None:
            initialise_from(self.model, cfg.init_from)
            self.ema.load_state_dict(self.model.state_dict())
            if rt.main:
                behind = f" ({pretrained_steps:,} steps of training behind it)" if pretrained_steps else ""
                log(f"initialised from {cfg.init_from}{behind}")
        self.start_step = 0 if restored is None else restored[0]["step"]
        self.net = wrap_distributed(self.objective.loss_module(self.model), self.model, self.ema, cfg.sharding, rt)
        # Created after wrapping: FSDP replaces the parameters with sharded ones.
        self.optimizer = make_optimizer(self.model, cfg)
        if restored is not None and is_sharded_checkpoint(restored[1]):  # any world size, sharded or not now
            state = sharded_state(self.model, self.ema, self.optimizer)
            load_sharded_state(restored[1], state)
            load_sharded_into(state, self.model, self.ema, self.optimizer)
        elif restored is not None:
            trainer_state, step_dir = restored
            optim_state = unflatten_optimizer_state(load_weights(step_dir / OPTIMIZER), trainer_state["optimizer"])
            load_optimizer_state(self.model, self.optimizer, optim_state, rt, cfg.sharding)
        self.forward = torch.compile(self.net) if cfg.compile else self.net
        self.amp = amp_dtype(cfg, rt.device)
        self.metrics_log = MetricsLog(out / "metrics.jsonl", self.start_step, rt.main,
                                      open_mirror(logger, out, self.start_step) if rt.main else None)
        self.config_record = {"model": model_config.to_dict(), "train": cfg.to_dict()}
        if pretrained_steps:
            self.config_record["pretrained_steps"] = pretrained_steps
        # The first (1-based) step whose loss was NaN or Inf, 0 if none: kept on the device, so recording it
        # costs no sync; _stop_if_diverged() reads it where the loop syncs anyway.
        self.first_nonfinite_step = torch.zeros((), dtype=torch.long, device=rt.device)
        self.tick = (time.perf_counter(), self.start_step)  # throughput since the last logging step
        self.last_save = self.last_eval = time.monotonic()  # for cfg.save_every_minutes, eval_every_minutes

    def _restore(self, log: Callable[[str], None]) -> tuple[dict[str, Any], Path]:
        """Load the newest checkpoint's weights, EMA and RNG states; return its trainer state and directory."""
        _check_resume_config(self.out, self.model_config)
        step_dir = resolve_checkpoint(self.out)
        if not is_sharded_checkpoint(step_dir):  # shards load once the modules are wrapped (__init__)
            load_state_into(self.model, load_weights(step_dir / MODEL_WEIGHTS), step_dir / MODEL_WEIGHTS)
            load_state_into(self.ema, load_weights(step_dir / EMA_WEIGHTS), step_dir / EMA_WEIGHTS)
        trainer_state = read_trainer_state(step_dir)
        restore_rng_state(trainer_state, self.rt.rank, self.noise_generator, step_dir / TRAINER)
        if self.rt.main:
            log(f"resuming {self.out} from step {trainer_state['step']}")
        return trainer_state, step_dir

    def run(self, train_set: Dataset, progress: bool, stop_at: int | None) -> dict[str, Any]:
        """Train from ``start_step`` to ``cfg.steps`` (or ``stop_at``); return the last logged metrics."""
        cfg, rt = self.cfg, self.rt
        # An explicit generator keeps DataLoader from drawing its worker seed from the global RNG.
        # Workers keep the order (each batch is one StepSampler entry), so they never change what a step sees.
        workers = loader_workers(cfg)
        loader = DataLoader(train_set, batch_sampler=StepSampler(len(train_set), cfg, self.start_step, rt.rank,
                                                                 rt.world),
                            num_workers=workers, persistent_workers=workers > 0, pin_memory=rt.device.type == "cuda",
                            generator=torch.Generator().manual_seed(cfg.seed))
        batches = iter(loader)
        bar = tqdm(total=cfg.steps, initial=self.start_step, disable=not (progress and rt.main), dynamic_ncols=True)
        last: dict[str, Any] = {}
        terminated = False
        with _termination_requests() as requested:
            for step in range(self.start_step, cfg.steps):
                result, lr, noise_std = self._step(step, batches)
                done = step + 1
                bar.update(1)
                logged = done % cfg.log_every == 0 or done == cfg.steps
                terminated = save_due = eval_due = False
                if logged:
                    last = self._log_step(done, result, lr, noise_std, bar)
                    terminated, save_due, eval_due = self._due(requested)
                if eval_due or done % cfg.eval_every == 0 or done % cfg.sample_every == 0 or done == cfg.steps:
                    record, key = self._evaluate(done, eval_due), self.objective.eval_key
                    if key in record:
                        last[key] = record[key]
                        bar.write(f"step {done}: {self.objective.eval_label} {record[key]:.4f}")
                stopping = terminated or (stop_at is not None and done >= stop_at)
                if save_due or done % cfg.save_every == 0 or done == cfg.steps or stopping:
                    self._save(done)
                if rt.world > 1:
                    dist.barrier()
                if stopping:
                    break
        bar.close()
        if self.metrics_log.mirror is not None:
            self.metrics_log.mirror.close()
        if terminated:
            signum = requested.signum or signal.SIGTERM  # a rank stopped by another's signal: as SIGTERM
            raise TrainingInterrupted(f"stopped by {signal.Signals(signum).name} after step {done}, saved in "
                                      f"{self.out}; run the same command again to resume it exactly", signum)
        return last

    def _any_rank(self, *flags: bool) -> list[bool]:
        """Each flag, true if it is true on any rank (one collective)."""
        if self.rt.world == 1:
            return list(flags)
        values = torch.tensor([float(flag) for flag in flags], device=self.rt.device)
        dist.all_reduce(values, op=dist.ReduceOp.MAX)
        return [bool(value) for value in values.tolist()]

    def _due(self, requested: threading.Event) -> tuple[bool, bool, bool]:
        """At a logging step, where the loop syncs anyway, whether to stop (a SIGTERM to any rank), save, and
        evaluate by the clock: rank 0's clock, so that every rank agrees (under FSDP a save is a collective)."""
        now, cfg = time.monotonic(), self.cfg
        clock = self.rt.main and cfg.save_every_minutes > 0 and now - self.last_save >= 60 * cfg.save_every_minutes
        timed_eval = (self.rt.main and cfg.eval_every_minutes > 0
                      and now - self.last_eval >= 60 * cfg.eval_every_minutes)
        terminated, save_due, eval_due = self._any_rank(requested.is_set(), clock, timed_eval)
        return terminated, save_due, eval_due

    def _step(self, step: int, batches: Iterator[list[Tensor]]) -> tuple[StepResult, float, float]:
        """Step ``step`` (0-based) at its learning rate and dequantisation noise: (result, lr, noise std)."""
        cfg, model_config = self.cfg, self.model_config
        lr = learning_rate(step, cfg)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        noise_std = gaussian_noise_std(step, cfg.steps, model_config.noise_std_start, model_config.noise_std_end)
        micro_batches = [self._micro_batch(next(batches), noise_std) for _ in range(cfg.grad_accum)]
        result = train_step(self.model, self.optimizer, micro_batches, grad_clip=cfg.grad_clip, ema=self.ema,
                            ema_decay=ema_decay_at(step, cfg), amp=self.amp, loss=self.forward)
        self.first_nonfinite_step = torch.where((self.first_nonfinite_step == 0) & ~torch.isfinite(result.loss),
                                                step + 1, self.first_nonfinite_step)
        return result, lr, noise_std

    def _micro_batch(self, batch: list[Tensor], noise_std: float) -> tuple[Tensor, Tensor | None]:
        """Dequantised images (docs/method.md §1) and labels (None if unconditional) on the device."""
        pixels, labels = batch
        x = dequantize(pixels, self.model_config.dequantization, noise_std, self.noise_generator).to(self.rt.device)
        return x, labels.to(self.rt.device) if self.model_config.conditional else None

    def _log_step(self, done: int, result: StepResult, lr: float, noise_std: float, bar: tqdm) -> dict[str, Any]:
        """The logging step's record (the loss averaged over ranks), written to metrics.jsonl and the bar."""
        self._stop_if_diverged(done)
        if self.rt.world > 1:
            dist.all_reduce(result.loss, op=dist.ReduceOp.AVG)
        now, (tick, tick_step) = time.perf_counter(), self.tick
        rate = (done - tick_step) * self.cfg.batch_size / (now - tick)
        self.tick = (now, done)
        nats = result.loss.item()
        last = {"step": done, "loss": nats, "lr": lr, "grad_norm": float(result.grad_norm), "images_per_s": rate,
                **self.objective.log_fields(nats, noise_std, self.model_config)}
        bar.set_postfix(loss=f"{nats:.4f}", img_s=f"{rate:.0f}",
                        **{key: f"{last[key]:.3f}" for key in self.objective.progress_fields})
        self.metrics_log.write(time=time.time(), **last)
        return last

    def _stop_if_diverged(self, step: int, *states: dict[str, Tensor]) -> None:
        # Called only where the loop syncs with the device anyway (logging, evaluation, saving). A NaN
        # gradient norm can poison the weights while the loss is still finite: saves also check the weights.
        if self.rt.world > 1:
            dist.all_reduce(self.first_nonfinite_step, op=dist.ReduceOp.MAX)
        # Every rank checks what it holds (rank 0 a gathered state, or each rank its shards) and all agree.
        nonfinite = bool(states) and self._any_rank(any(first_nonfinite(state) for state in states))[0]
        bad = int(self.first_nonfinite_step) or (step if nonfinite else 0)
        if bad:
            out = self.out
            kept = (out / LATEST).read_text().strip() if (out / LATEST).is_file() else None
            raise TrainingDiverged(
                f"training diverged by step {bad}: the loss or the weights became NaN or Inf. Stopped without "
                "saving: " + (f"{out / kept} holds the last finite weights" if kept else "no checkpoint exists")
                + "; lower --lr (or --train-set grad_clip=...) and run again to resume from it")

    def _save(self, step: int) -> None:
        rt, sharding = self.rt, self.cfg.sharding
        if is_sharded(rt, sharding) and self.cfg.checkpoint_format == "sharded":
            self._save_shards(step)
        else:
            weights, ema_weights = full_state(self.model, rt, sharding), full_state(self.ema, rt, sharding)
            self._stop_if_diverged(step, weights, ema_weights)
            optim_state = full_optimizer_state(self.model, self.optimizer, rt, sharding)
            rngs = gather_objects(_rng_state(self.noise_generator), rt)
            if rt.main:
                save_checkpoint(self.out, step, self.config_record, weights, ema_weights, optim_state,
                                {"step": step, "rng": rngs}, keep=self.cfg.keep_checkpoints)
        self.last_save = time.monotonic()

    def _save_shards(self, step: int) -> None:
        """A sharded checkpoint: no rank gathers the weights or the optimizer, only the EMA weights (rank 0, as
        for an evaluation), which make the step directory loadable as a plain model (docs/method.md §8)."""
        state = sharded_state(self.model, self.ema, self.optimizer)
        self._stop_if_diverged(step, local_shards(state["model"]), local_shards(state["ema"]))
        ema_weights = full_state(self.ema, self.rt, self.cfg.sharding)
        rngs = gather_objects(_rng_state(self.noise_generator), self.rt)
        save_sharded_checkpoint(self.out, step, self.config_record, state, ema_weights, {"step": step, "rng": rngs},
                                keep=self.cfg.keep_checkpoints)

    def _evaluate(self, step: int, timed: bool = False) -> dict[str, Any]:
        """The objective's test metric (due at ``step``, or by the clock if ``timed``) and a sample grid as due at
        ``step``, of the EMA weights (rank 0)."""
        self._stop_if_diverged(step)
        cfg, record = self.cfg, {"step": step}
        judged = self._gathered_ema()
        if self.rt.main:
            judged.eval()
            if timed or step % cfg.eval_every == 0 or step == cfg.steps:
                record[self.objective.eval_key] = self.objective.evaluate(judged, self.eval_set, cfg.eval_images,
                                                                          cfg.seed)
                self.last_eval = time.monotonic()
            if step % cfg.sample_every == 0 or step == cfg.steps:
                options = SamplingOptions(seed=cfg.seed, inverse=self.objective.sample_inverse)
                record["samples"] = str(sample_grid(judged, self.out / "samples" / f"step-{step:08d}.png",
                                                    options=options))
            self.metrics_log.write(time=time.time(), **record)
        return record

    def _gathered_ema(self) -> Farmer:
        """The EMA model to judge. FSDP gathers a module's shards only around its forward(), but log_prob, sample
        and the flow inverse enter through other methods: rank 0 judges a gathered copy (every rank joins the
        gather)."""
        if not is_sharded(self.rt, self.cfg.sharding):
            return self.ema
        weights = full_state(self.ema, self.rt, self.cfg.sharding)
        if not self.rt.main:
            return self.ema
        with torch.random.fork_rng(devices=[]):  # building it must not move the training RNG
            judged = Farmer(self.model_config)
        judged.load_state_dict(weights)
        return judged.to(self.rt.device)
