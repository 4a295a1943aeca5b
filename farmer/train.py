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
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.utils.data import DataLoader, Sampler
from tqdm import tqdm

from farmer.checkpoint import (
    CONFIG,
    EMA_WEIGHTS,
    LATEST,
    MODEL_WEIGHTS,
    OPTIMIZER,
    TRAINER,
    first_nonfinite,
    load_model,
    load_state_into,
    load_weights,
    lock_run_directory,
    read_config,
    resolve_checkpoint,
    save_checkpoint,
    unflatten_optimizer_state,
)
from farmer.config import FarmerConfig, check_dict, field_type_errors
from farmer.data import (
    DEFAULT_VAL_FRACTION,
    dataset_info,
    dequantize,
    gaussian_noise_std,
    make_dataset,
    model_to_pixels,
)
from farmer.distill import DistillationObjective
from farmer.evaluation import evaluate_bpd, student_psnr
from farmer.images import save_grid
from farmer.model import Farmer
from farmer.nn import autocast_dtype


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
    precision: str = "auto"  # auto: bf16 autocast on accelerators, fp32 on CPU; or "fp32", "bf16"
    compile: bool = False
    sharding: str = "ddp"  # under torchrun with several processes: "ddp" or "fsdp"
    # "likelihood": train the model by maximum likelihood (docs/method.md §5). "distill": train only the one-step
    # student of the flow inverse from the frozen checkpoint ``teacher`` (docs/method.md §7, Algorithm 2).
    objective: str = "likelihood"
    teacher: str | None = None
    teacher_weights: str = "ema"  # which of the teacher checkpoint's weights to distil: "ema" or "raw"
    num_workers: int = 0
    # Share of an image folder without train/val subfolders held out (fixed seed) for test bits/dim.
    val_fraction: float = DEFAULT_VAL_FRACTION
    log_every: int = 10
    eval_every: int = 500  # test bits/dim (uniform dequantisation, EMA weights)
    eval_images: int = 2_000
    sample_every: int = 1_000
    save_every: int = 500
    keep_checkpoints: int = 2

    def __post_init__(self) -> None:
        errors = field_type_errors(self)
        if errors:  # the checks below assume the types
            raise ValueError("invalid TrainConfig: " + "; ".join(errors))
        for key in ("steps", "batch_size", "grad_accum", "log_every", "eval_every", "eval_images", "sample_every",
                    "save_every"):
            if getattr(self, key) < 1:
                errors.append(f"{key} must be >= 1")
        for key in ("warmup_steps", "num_workers", "keep_checkpoints", "min_lr", "weight_decay"):
            if getattr(self, key) < 0:
                errors.append(f"{key} must be >= 0")
        if self.lr <= 0 or self.grad_clip <= 0:
            errors.append("lr and grad_clip must be > 0")
        if not (0 <= self.beta1 < 1 and 0 <= self.beta2 < 1):
            errors.append("beta1 and beta2 must be in [0, 1)")
        if not 0 < self.val_fraction < 1:
            errors.append("val_fraction must be in (0, 1)")
        if self.precision not in ("auto", "fp32", "bf16"):
            errors.append(f"precision must be auto, fp32 or bf16, got {self.precision!r}")
        if self.sharding not in ("ddp", "fsdp"):
            errors.append(f"sharding must be ddp or fsdp, got {self.sharding!r}")
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


TRAIN_PRESETS: dict[str, dict[str, Any]] = {
    "tiny": dict(data="digits", steps=300, batch_size=32, lr=2e-3, warmup_steps=20, ema_decay=0.99,
                 eval_every=100, eval_images=297, sample_every=300, save_every=100, log_every=10),
    # Small model, short CPU budget: a larger learning rate and a short warm-up than the paper's 1.1B runs.
    # EMA 0.995: with the noise annealed the weights move fast late in a short run, and a longer average
    # lags (the shipped run used 0.999: EMA 4.59 vs raw 2.20 test bits/dim at step 3,000).
    "mnist": dict(data="mnist", steps=3_000, batch_size=64, lr=1e-3, min_lr=1e-5, warmup_steps=200,
                  ema_decay=0.995, eval_every=500, eval_images=2_000, sample_every=500, save_every=250),
}


# Algorithm 2 starts the student from the teacher, so it needs far fewer steps than the teacher did.
DISTILL_DEFAULTS: dict[str, Any] = dict(steps=1_000, batch_size=64, lr=3e-4, min_lr=1e-5, warmup_steps=50,
                                        ema_decay=0.995, eval_every=250, eval_images=1_000, sample_every=500,
                                        save_every=100)


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


# Distributed ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Runtime:
    rank: int
    world: int
    device: torch.device

    @property
    def main(self) -> bool:
        return self.rank == 0


def init_runtime(device: str | None = None) -> Runtime:
    """Single process, or the process group that ``torchrun`` describes in the environment."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    if world > 1:
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        if dev.type == "cuda":
            dev = torch.device("cuda", local_rank)
            torch.cuda.set_device(dev)
        if not dist.is_initialized():
            dist.init_process_group("nccl" if dev.type == "cuda" else "gloo")
        return Runtime(dist.get_rank(), world, dev)
    return Runtime(0, 1, dev)


def wrap_distributed(objective: nn.Module, model: Farmer, ema: Farmer, cfg: TrainConfig, rt: Runtime) -> nn.Module:
    """DDP replicates the objective; FSDP shards each flow (and student) block and prior layer of the model
    and its EMA, and the objective then runs on the sharded modules."""
    if rt.world == 1:
        return objective
    if cfg.sharding == "ddp":
        return nn.parallel.DistributedDataParallel(objective, device_ids=[rt.device] if rt.device.type == "cuda"
                                                   else None)
    from torch.distributed.fsdp import fully_shard

    for module in (model, ema):
        students = [] if module.student is None else list(module.student.blocks)
        for block in [*module.flow.blocks, *students]:
            fully_shard(block)
        if hasattr(module.prior, "transformer"):
            for layer in module.prior.transformer.layers:
                fully_shard(layer)
        fully_shard(module)
    return objective


def full_state(module: nn.Module, rt: Runtime, cfg: TrainConfig) -> dict[str, Tensor]:
    if rt.world > 1 and cfg.sharding == "fsdp":
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        return get_model_state_dict(module, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return {k: v.detach().cpu().clone() for k, v in module.state_dict().items()}


# Evaluation ----------------------------------------------------------------------------------------
def sample_grid(model: Farmer, path: Path, per_class: int = 8, seed: int = 0, **sample_kwargs: Any) -> Path:
    """A PNG grid of samples: one row per class (or 8 rows unconditional), fixed seed."""
    cfg = model.config
    rows = min(cfg.num_classes, 10) if cfg.conditional else 8
    labels = torch.arange(rows).repeat_interleave(per_class) if cfg.conditional else None
    device = model.device
    generator = torch.Generator(device).manual_seed(seed)
    images = model.sample(rows * per_class, None if labels is None else labels.to(device), generator,
                          **sample_kwargs)
    return save_grid(model_to_pixels(images), path, nrow=per_class, scale=2)


def start_student_from_teacher(model: Farmer, teacher_dir: str | Path, ema: bool = True) -> None:
    """Copy a trained teacher's (EMA or raw) weights into ``model`` and initialise its student from the
    teacher flow."""
    teacher = load_model(teacher_dir, ema=ema)
    if teacher.config.replace(distilled_inverse=True) != model.config:
        raise ValueError(f"teacher {teacher_dir} does not match the model config to distil")
    state = {k: v for k, v in teacher.state_dict().items() if not k.startswith("student.")}
    model.load_state_dict(state, strict=False)
    model.student.load_state_dict(teacher.flow.state_dict())


# Training ------------------------------------------------------------------------------------------
def _param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    # Decay matrices and embeddings; not biases and norm gains (nanoGPT's split).
    decay = [p for p in model.parameters() if p.requires_grad and p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.ndim < 2]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


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


def stored_configs(run_dir: str | Path) -> tuple[FarmerConfig, TrainConfig]:
    """The model and training configs of a run's newest checkpoint; errors name its config.json."""
    step_dir = resolve_checkpoint(run_dir)
    stored = read_config(step_dir)
    try:
        return FarmerConfig.from_dict(stored["model"]), TrainConfig.from_dict(stored.get("train", {}))
    except ValueError as err:
        raise ValueError(f"{step_dir / CONFIG}: {err}") from None


def _check_resume_config(run_dir: Path, model_config: FarmerConfig) -> None:
    stored = FarmerConfig.from_dict(read_config(run_dir)["model"])
    if stored != model_config:
        diff = stored.diff(model_config)
        raise ValueError(f"cannot resume {run_dir}: its model config differs in {diff} (stored, requested); "
                         "use a new --out directory")


class MetricsLog:
    """metrics.jsonl: one JSON object per line; on resume, lines past the checkpoint step are dropped."""

    def __init__(self, path: Path, resume_step: int, enabled: bool) -> None:
        self.path, self.enabled = path, enabled
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
            path.write_text("".join(line + "\n" for line in kept))

    def write(self, **record: Any) -> None:
        if self.enabled:
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")


class TrainingDiverged(RuntimeError):
    """The loss or the weights became NaN or Inf; nothing after the last finite checkpoint was saved."""


def train(model_config: FarmerConfig, cfg: TrainConfig, out_dir: str | Path, device: str | None = None,
          progress: bool = True, log: Callable[[str], None] = print, stop_at: int | None = None) -> dict[str, Any]:
    """Train (or resume, if ``out_dir`` holds a checkpoint) and return the last logged metrics.

    ``stop_at`` ends this invocation after that step (saving a checkpoint there) without changing the
    schedule, which stays defined by ``cfg.steps``: for time-boxed jobs that resume later.

    The main process holds the run directory's lock throughout (a second trainer fails at once). A NaN or
    Inf loss (or weights) raises TrainingDiverged at the next logging, evaluation or save step, before
    anything is evaluated or saved, so the last checkpoint stays the last finite one. The run stops rather
    than skipping bad steps: deciding to skip needs the loss on the host every step, a device sync.
    """
    rt = init_runtime(device)
    with lock_run_directory(out_dir) if rt.main else contextlib.nullcontext():
        return _train(rt, model_config, cfg, Path(out_dir), progress, log, stop_at)


def _train(rt: Runtime, model_config: FarmerConfig, cfg: TrainConfig, out: Path, progress: bool,
           log: Callable[[str], None], stop_at: int | None) -> dict[str, Any]:
    info = dataset_info(cfg.data, model_config.image_size)
    if (info.channels, info.image_size) != (model_config.channels, model_config.image_size):
        raise ValueError(f"data {cfg.data!r} has {info.channels}×{info.image_size}² images but the model expects "
                         f"{model_config.channels}×{model_config.image_size}²")
    if model_config.conditional and info.num_classes != model_config.num_classes:
        raise ValueError(f"data {cfg.data!r} has {info.num_classes} classes but the model has "
                         f"{model_config.num_classes}")
    train_set = make_dataset(cfg.data, "train", cfg.data_root, model_config.image_size, cfg.val_fraction)
    eval_set = make_dataset(cfg.data, "test", cfg.data_root, model_config.image_size, cfg.val_fraction)

    torch.manual_seed(cfg.seed)  # same initial weights on every rank
    model = Farmer(model_config).to(rt.device)
    distilling = cfg.objective == "distill"
    if distilling:
        if model.student is None:
            raise ValueError("objective='distill' needs a model config with distilled_inverse=True")
        if not (out / "LATEST").is_file():
            start_student_from_teacher(model, cfg.teacher, ema=cfg.teacher_weights == "ema")
        # Algorithm 2: the teacher flow and the AR prior stay frozen; only the student learns.
        model.flow.requires_grad_(False)
        model.prior.requires_grad_(False)
    ema = copy.deepcopy(model).requires_grad_(False)
    noise_generator = torch.Generator().manual_seed(cfg.seed * 7919 + rt.rank)
    torch.manual_seed(cfg.seed * 104_729 + rt.rank)  # label dropout differs across ranks, as data does

    start_step, trainer_state, step_dir = 0, None, None
    if (out / "LATEST").is_file():
        _check_resume_config(out, model_config)
        step_dir = resolve_checkpoint(out)
        load_state_into(model, load_weights(step_dir / MODEL_WEIGHTS), step_dir / MODEL_WEIGHTS)
        load_state_into(ema, load_weights(step_dir / EMA_WEIGHTS), step_dir / EMA_WEIGHTS)
        trainer_state = json.loads((step_dir / TRAINER).read_text())
        _set_rng_state(trainer_state["rng"][rt.rank], noise_generator)
        start_step = trainer_state["step"]
        if rt.main:
            log(f"resuming {out} from step {start_step}")

    net = wrap_distributed(DistillationObjective(model) if distilling else model, model, ema, cfg, rt)
    sharded = rt.world > 1 and cfg.sharding == "fsdp"
    # Created after wrapping: FSDP replaces the parameters with sharded ones.
    optimizer = torch.optim.AdamW(_param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=(cfg.beta1, cfg.beta2))
    if trainer_state is not None:
        optim_state = unflatten_optimizer_state(load_weights(step_dir / OPTIMIZER), trainer_state["optimizer"])
        if sharded:
            from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

            set_optimizer_state_dict(model, optimizer, optim_state, options=StateDictOptions(full_state_dict=True))
        else:
            optimizer.load_state_dict(optim_state)
    forward = torch.compile(net) if cfg.compile else net
    amp = autocast_dtype(rt.device) if cfg.precision == "auto" else (torch.bfloat16 if cfg.precision == "bf16"
                                                                      else None)
    # An explicit generator keeps DataLoader from drawing its worker seed from the global RNG.
    loader = DataLoader(train_set, batch_sampler=StepSampler(len(train_set), cfg, start_step, rt.rank, rt.world),
                        num_workers=cfg.num_workers, pin_memory=rt.device.type == "cuda",
                        generator=torch.Generator().manual_seed(cfg.seed))
    batches = iter(loader)
    metrics_log = MetricsLog(out / "metrics.jsonl", start_step, rt.main)
    config_record = {"model": model_config.to_dict(), "train": cfg.to_dict()}
    if rt.main:
        out.mkdir(parents=True, exist_ok=True)
        n_params = sum(p.numel() for p in model.parameters())
        log(f"model {model_config.name}: {n_params / 1e6:.2f}M parameters, {rt.world} process(es) on "
            f"{rt.device}, {len(train_set)} training images")

    def stop_if_diverged(step: int, *states: dict[str, Tensor]) -> None:
        # Called only where the loop syncs with the device anyway (logging, evaluation, saving). A NaN
        # gradient norm can poison the weights while the loss is still finite: saves also check the weights.
        if rt.world > 1:
            dist.all_reduce(first_nonfinite_step, op=dist.ReduceOp.MAX)
        bad = int(first_nonfinite_step) or next((step for state in states if first_nonfinite(state)), 0)
        if bad:
            kept = (out / LATEST).read_text().strip() if (out / LATEST).is_file() else None
            raise TrainingDiverged(
                f"training diverged by step {bad}: the loss or the weights became NaN or Inf. Stopped without "
                "saving: " + (f"{out / kept} holds the last finite weights" if kept else "no checkpoint exists")
                + "; lower --lr (or --train-set grad_clip=...) and run again to resume from it")

    def save(step: int) -> None:
        weights, ema_weights = full_state(model, rt, cfg), full_state(ema, rt, cfg)
        stop_if_diverged(step, weights, ema_weights)
        if sharded:
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

            optim_state = get_optimizer_state_dict(
                model, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        else:
            optim_state = optimizer.state_dict()
        rngs = [None] * rt.world
        if rt.world > 1:
            dist.all_gather_object(rngs, _rng_state(noise_generator))
        else:
            rngs = [_rng_state(noise_generator)]
        if rt.main:
            save_checkpoint(out, step, config_record, weights, ema_weights, optim_state,
                            {"step": step, "rng": rngs}, keep=cfg.keep_checkpoints)

    def evaluate(step: int) -> dict[str, Any]:
        stop_if_diverged(step)
        record: dict[str, Any] = {"step": step}
        judged = ema
        if sharded:
            # FSDP gathers a module's shards only around its forward(), but log_prob, sample and the flow
            # inverse enter through other methods: rank 0 judges a gathered copy (every rank joins the gather).
            weights = full_state(ema, rt, cfg)
            if rt.main:
                with torch.random.fork_rng(devices=[]):  # building it must not move the training RNG
                    judged = Farmer(model_config)
                judged.load_state_dict(weights)
                judged.to(rt.device)
        if rt.main:
            judged.eval()
            if distilling and (step % cfg.eval_every == 0 or step == cfg.steps):
                record["test_psnr_db"] = student_psnr(judged, eval_set, max_images=cfg.eval_images, seed=cfg.seed)
            elif step % cfg.eval_every == 0 or step == cfg.steps:
                record["test_bpd"] = evaluate_bpd(judged, eval_set, max_images=cfg.eval_images, seed=cfg.seed)
            if step % cfg.sample_every == 0 or step == cfg.steps:
                record["samples"] = str(sample_grid(judged, out / "samples" / f"step-{step:08d}.png",
                                                    seed=cfg.seed, inverse="distilled" if distilling else "exact"))
            metrics_log.write(time=time.time(), **record)
        return record

    bar = tqdm(total=cfg.steps, initial=start_step, disable=not (progress and rt.main), dynamic_ncols=True)
    micro = cfg.batch_size // (rt.world * cfg.grad_accum)
    last: dict[str, Any] = {}
    tick, tick_step = time.perf_counter(), start_step
    first_nonfinite_step = torch.zeros((), dtype=torch.long, device=rt.device)  # 0: none so far
    for step in range(start_step, cfg.steps):
        model.train()
        lr = learning_rate(step, cfg)
        for group in optimizer.param_groups:
            group["lr"] = lr
        noise_std = gaussian_noise_std(step, cfg.steps, model_config.noise_std_start, model_config.noise_std_end)
        loss_sum = torch.zeros((), device=rt.device)
        for m in range(cfg.grad_accum):
            pixels, labels = next(batches)
            x = dequantize(pixels, model_config.dequantization, noise_std, noise_generator).to(rt.device)
            y = labels.to(rt.device) if model_config.conditional else None
            sync = m == cfg.grad_accum - 1 or rt.world == 1 or cfg.sharding != "ddp"
            with (contextlib.nullcontext() if sync else net.no_sync()), \
                    torch.autocast(rt.device.type, dtype=amp or torch.float32, enabled=amp is not None):
                loss, _ = forward(x, y)
            (loss / cfg.grad_accum).backward()
            loss_sum += loss.detach() / cfg.grad_accum
        # Recorded on the device, without a sync; stop_if_diverged() reads it.
        first_nonfinite_step = torch.where((first_nonfinite_step == 0) & ~torch.isfinite(loss_sum), step + 1,
                                           first_nonfinite_step)
        grad_norm = nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        # EMA with warm-up: early on the average would otherwise be dominated by the initial weights.
        decay = min(cfg.ema_decay, (1 + step) / (10 + step))
        with torch.no_grad():
            for p_ema, p in zip(ema.parameters(), model.parameters(), strict=True):
                p_ema.lerp_(p, 1 - decay)
        done = step + 1
        bar.update(1)
        if done % cfg.log_every == 0 or done == cfg.steps:
            stop_if_diverged(done)
            if rt.world > 1:
                dist.all_reduce(loss_sum, op=dist.ReduceOp.AVG)
            now = time.perf_counter()
            rate = (done - tick_step) * micro * cfg.grad_accum * rt.world / (now - tick)
            tick, tick_step = now, done
            nats = loss_sum.item()
            last = {"step": done, "loss": nats, "lr": lr, "grad_norm": float(grad_norm), "images_per_s": rate}
            if not distilling:
                # The loss in bits/dim of 8-bit pixels (+7 = log2 of the 128 pixel bins per unit of [-1, 1]).
                # Not "bpd": under Gaussian dequantisation it is no bound on the discrete data's bits/dim; the
                # bound is test_bpd, with uniform noise.
                last["train_bits"] = nats / math.log(2) + 7
                if model_config.dequantization == "gaussian":
                    last["noise_std"] = noise_std
            bar.set_postfix(loss=f"{nats:.4f}", img_s=f"{rate:.0f}", **({} if distilling else
                                                                        {"train_bits": f"{last['train_bits']:.3f}"}))
            metrics_log.write(time=time.time(), **last)
        if done % cfg.eval_every == 0 or done % cfg.sample_every == 0 or done == cfg.steps:
            record = evaluate(done)
            for key, label in (("test_bpd", "test bits/dim"), ("test_psnr_db", "student PSNR (dB)")):
                if key in record:
                    last[key] = record[key]
                    bar.write(f"step {done}: {label} {record[key]:.4f}")
        stopping = stop_at is not None and done >= stop_at
        if done % cfg.save_every == 0 or done == cfg.steps or stopping:
            save(done)
        if rt.world > 1:
            dist.barrier()
        if stopping:
            break
    bar.close()
    return last
