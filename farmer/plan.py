"""``farmer plan``: what training a preset takes on GPUs, counted rather than guessed (docs/method.md §8).

For a preset: its parameters; the training FLOPs per image (forward + backward, ``FlopCounterMode``); the activation
bytes per image (tensors saved for backward, ``saved_tensors_hooks``, de-duplicated by storage) under the bf16
policy, with and without activation checkpointing; the bytes of the fp32 training state; the largest per-GPU batch
that fits under DDP and under FSDP; and the days of the preset's training schedule at an assumed MFU.

How it counts: training steps on fake CPU tensors (``FakeTensorMode``: shapes, dtypes and storages, no data and
no arithmetic), so the count is device-independent and costs seconds. Per-image numbers are half the difference of
batches 4 and 2, which drops what does not grow with the batch (the bf16 weight copies autocast keeps for
backward). Depth is reduced: one and two flow blocks, one and two prior layers, scaled linearly to the preset's
depth (both counts are exactly linear in depth: tests/test_plan.py checks the scaled count against full depth).

Under the bf16 policy on a CPU, attention runs in fp32 (farmer.precision), so the activation count is an upper
bound for accelerators, whose attention also runs in bf16. The memory model is plain arithmetic, stated in
:func:`per_gpu_state_bytes`; ``benchmarks/bench_memory.py`` compares it with peak memory measured on the CPU.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count

from farmer.config import FarmerConfig
from farmer.io import count_parameters
from farmer.model import Farmer
from farmer.nn import TransformerLayer
from farmer.precision import autocast

GIB = 2**30
# fp32 master weights, their gradients, AdamW's two moments and the EMA copy, per parameter.
STATE_BYTES_PER_PARAMETER = {"weights": 4, "grads": 4, "adam": 8, "ema": 4}
# DDP (gradient_as_bucket_view off, torch's default) all-reduces through its own fp32 copy of every gradient.
DDP_BUCKET_BYTES_PER_PARAMETER = 4
IMAGENET_PRESETS = ("imagenet256-1.1b-p16", "imagenet256-1.1b-p8", "imagenet256-1.9b-p16", "imagenet256-1.9b-p8",
                    "imagenet64-556m")

# torch's FLOP formulas cover the accelerators' attention kernels; the CPU's flash attention counts the same.
CPU_ATTENTION_FLOPS = {
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu:
        lambda q, k, v, *args, out_shape=None, **kwargs: sdpa_flop_count(q, k, v),
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward:
        lambda grad, q, k, v, *args, out_shape=None, **kwargs: sdpa_backward_flop_count(grad, q, k, v),
}


@dataclass(frozen=True)
class Cluster:
    """The GPUs a plan is for, and the assumptions it makes about them."""

    gpus: int = 8
    gpu_memory_gib: float = 80.0
    peak_tflops: float = 989.0  # an H100 SXM's dense bf16 peak
    mfu: float = 0.40  # assumed share of that peak a training step achieves
    # Share of GPU memory left free: the CUDA context, the allocator's fragmentation, kernel workspaces and the
    # transient buffers of the backward pass (activation gradients, the mixture heads' outputs).
    headroom: float = 0.15

    def __post_init__(self) -> None:
        if self.gpus < 1 or self.gpu_memory_gib <= 0 or self.peak_tflops <= 0:
            raise ValueError(f"gpus must be >= 1 and gpu_memory_gib, peak_tflops > 0, got {self}")
        if not (0 < self.mfu <= 1 and 0 <= self.headroom < 1):
            raise ValueError(f"mfu must be in (0, 1] and headroom in [0, 1), got {self.mfu} and {self.headroom}")

    @property
    def usable_bytes(self) -> float:
        return self.gpu_memory_gib * GIB * (1 - self.headroom)


@dataclass(frozen=True)
class StepCount:
    """One training step's (forward + backward) FLOPs and bytes of tensors saved for backward."""

    flops: int
    saved_bytes: int

    def __sub__(self, other: StepCount) -> StepCount:
        return StepCount(self.flops - other.flops, self.saved_bytes - other.saved_bytes)

    def __add__(self, other: StepCount) -> StepCount:
        return StepCount(self.flops + other.flops, self.saved_bytes + other.saved_bytes)

    def __mul__(self, factor: int) -> StepCount:
        return StepCount(self.flops * factor, self.saved_bytes * factor)


class SavedStorages:
    """Bytes of the storages held for backward, each counted once; parameters are not activations. Every
    transformer layer's input is held too: saved by its first norm, or, under activation checkpointing, kept by
    the checkpoint that recomputes the layer (whose own saved tensors the outer hooks never see)."""

    def __init__(self, model: nn.Module) -> None:
        self.parameters = {self.key(p) for p in model.parameters()}
        self.bytes: dict[int, int] = {}
        self.hooks = [module.register_forward_pre_hook(self._hold_input) for module in model.modules()
                      if isinstance(module, TransformerLayer)]

    def remove_hooks(self) -> None:
        for hook in self.hooks:
            hook.remove()

    def _hold_input(self, module: nn.Module, inputs: tuple[Any, ...]) -> None:
        self.add(inputs[0])

    @staticmethod
    def key(t: Tensor) -> int:
        return t.untyped_storage()._cdata

    def add(self, t: Tensor) -> Tensor:
        key = self.key(t)
        if key not in self.parameters:
            self.bytes[key] = t.untyped_storage().nbytes()
        return t

    @property
    def total(self) -> int:
        return sum(self.bytes.values())


def count_training_step(config: FarmerConfig, batch: int, precision: str = "bf16",
                        checkpointing: bool = False) -> StepCount:
    """FLOPs and saved bytes of one training step (train mode, loss backward) of ``config`` at ``batch`` on fake
    CPU tensors; ``precision`` "bf16" (the trunks in bf16 autocast, farmer.precision) or "fp32"."""
    if precision not in ("bf16", "fp32"):
        raise ValueError(f"precision must be bf16 or fp32, got {precision!r}")
    if batch < 1:
        raise ValueError(f"batch must be >= 1, got {batch}")
    with torch.random.fork_rng(devices=[]), FakeTensorMode():
        model = Farmer(config).set_activation_checkpointing(checkpointing).train()
        images = torch.empty(batch, config.channels, config.image_size, config.image_size)
        labels = torch.zeros(batch, dtype=torch.long) if config.conditional else None
        with FlopCounterMode(display=False, custom_mapping=CPU_ATTENTION_FLOPS) as flops:
            loss, saved_bytes = forward_counting_saved(model, images, labels, precision)
            loss.backward()
    return StepCount(flops.get_total_flops(), saved_bytes)


def forward_counting_saved(model: Farmer, images: Tensor, labels: Tensor | None,
                           precision: str) -> tuple[Tensor, int]:
    """The training loss of ``model`` (CPU, under ``precision``'s autocast) and the bytes it saved for backward."""
    saved = SavedStorages(model)
    amp = torch.bfloat16 if precision == "bf16" else None
    with autocast(torch.device("cpu"), amp), torch.autograd.graph.saved_tensors_hooks(saved.add, _unpack):
        loss, _ = model(images, labels)
    saved.remove_hooks()
    return loss, saved.total


def _unpack(t: Tensor) -> Tensor:
    return t


def at_depth(config: FarmerConfig, flow_blocks: int, prior_layers: int) -> FarmerConfig:
    return config.replace(flow_blocks=flow_blocks, prior_layers=prior_layers)


def count_scaled_by_depth(config: FarmerConfig, batch: int, precision: str = "bf16",
                          checkpointing: bool = False) -> StepCount:
    """:func:`count_training_step` of ``config`` from counts at one and two flow blocks and prior layers: every
    flow block (and every prior layer) adds the same FLOPs and saved bytes."""
    def count(blocks: int, layers: int) -> StepCount:
        return count_training_step(at_depth(config, blocks, layers), batch, precision, checkpointing)

    base = count(1, 1)
    per_block, per_layer = count(2, 1) - base, count(1, 2) - base
    return base + per_block * (config.flow_blocks - 1) + per_layer * (config.prior_layers - 1)


@dataclass(frozen=True)
class PerImage:
    """What a training step costs per image, and what it holds whatever the batch (bf16 weight copies)."""

    flops: int
    activation_bytes: int
    fixed_bytes: int

    @classmethod
    def count(cls, config: FarmerConfig, precision: str = "bf16", checkpointing: bool = False) -> PerImage:
        # Batches 2 and 4, not 1: at batch 1 some reshapes are views that copy at larger batches.
        two, four = (count_scaled_by_depth(config, batch, precision, checkpointing) for batch in (2, 4))
        step = four - two
        return cls(step.flops // 2, step.saved_bytes // 2, two.saved_bytes - step.saved_bytes)


def fsdp_units(model: Farmer) -> list[int]:
    """Parameters of each unit farmer.distributed shards separately (flow and student blocks, prior layers) and,
    last, of the root unit that holds the rest (embeddings, mixture heads)."""
    units = [*model.flow.blocks, *(model.student.blocks if model.student is not None else ())]
    units += list(model.prior.transformer.layers) if hasattr(model.prior, "transformer") else []
    sizes = [count_parameters(unit) for unit in units]
    return [*sizes, count_parameters(model) - sum(sizes)]


def per_gpu_state_bytes(parameters: int, units: list[int], gpus: int, sharding: str) -> int:
    """Bytes per GPU of the fp32 training state (:data:`STATE_BYTES_PER_PARAMETER`). DDP: all of it on every GPU,
    plus its gradient buckets. FSDP: sharded over ``gpus``, plus the gathered fp32 weights and unsharded grads of
    the root unit and of two blocks in flight (the current one and the prefetched next)."""
    state = sum(STATE_BYTES_PER_PARAMETER.values()) * parameters
    if sharding == "ddp":
        return state + DDP_BUCKET_BYTES_PER_PARAMETER * parameters
    if sharding == "fsdp":
        gathered = units[-1] + 2 * max(units[:-1], default=0)
        return math.ceil(state / gpus) + (STATE_BYTES_PER_PARAMETER["weights"] + STATE_BYTES_PER_PARAMETER["grads"]) \
            * gathered
    raise ValueError(f"sharding must be ddp or fsdp, got {sharding!r}")


def largest_batch(usable_bytes: float, fixed_bytes: int, activation_bytes_per_image: int) -> int:
    """The largest per-GPU micro-batch whose activations fit beside ``fixed_bytes`` (0: not even one image)."""
    return max(0, math.floor((usable_bytes - fixed_bytes) / activation_bytes_per_image))


def schedule_images(preset: str) -> int:
    """Images the preset's training schedule processes (farmer.train.TRAIN_PRESETS: steps × global batch)."""
    from farmer.train import TrainConfig

    train = TrainConfig.preset(preset)
    return train.steps * train.batch_size


def plan(preset: str, cluster: Cluster = Cluster()) -> dict[str, Any]:
    """The plan of one preset on ``cluster`` as a JSON-ready dict (sizes in bytes, FLOPs per image)."""
    config = FarmerConfig.preset(preset)
    with torch.device("meta"):
        model = Farmer(config)
    parameters, units = count_parameters(model), fsdp_units(model)
    images = schedule_images(preset)
    result: dict[str, Any] = {"preset": preset, "parameters": parameters, "schedule_images": images,
                              "state_bytes": {k: v * parameters for k, v in STATE_BYTES_PER_PARAMETER.items()}}
    for checkpointing in (False, True):
        cost = PerImage.count(config, "bf16", checkpointing)
        images_per_s = cluster.mfu * cluster.peak_tflops * 1e12 / cost.flops
        entry: dict[str, Any] = {
            "flops_per_image": cost.flops, "activation_bytes_per_image": cost.activation_bytes,
            "batch_independent_saved_bytes": cost.fixed_bytes, "images_per_s_per_gpu": images_per_s,
            "days": images / (images_per_s * cluster.gpus) / 86_400}
        for sharding in ("ddp", "fsdp"):
            fixed = per_gpu_state_bytes(parameters, units, cluster.gpus, sharding) + cost.fixed_bytes
            entry[sharding] = {"fixed_bytes": fixed,
                               "max_batch": largest_batch(cluster.usable_bytes, fixed, cost.activation_bytes)}
        result["checkpointing" if checkpointing else "no_checkpointing"] = entry
    return result


def assumptions(cluster: Cluster) -> dict[str, Any]:
    return {**asdict(cluster), "precision": "bf16 policy (farmer.precision); attention counted in fp32 as on CPUs, "
            "an upper bound for accelerators", "flops": "FlopCounterMode, forward + backward (+ recompute under "
            "checkpointing), attention counted without the causal half",
            "counted_at": "fake CPU tensors, (batch 4 − batch 2) / 2, 1 and 2 flow blocks / prior layers scaled "
            "linearly to full depth"}


def _row(p: dict[str, Any], key: str) -> list[str]:
    e = p[key]
    return [p["preset"], f"{p['parameters'] / 1e6:,.0f}M", "yes" if key == "checkpointing" else "no",
            f"{e['flops_per_image'] / 1e12:.2f}", f"{e['activation_bytes_per_image'] / GIB:.2f}",
            f"{e['ddp']['fixed_bytes'] / GIB:.1f}", str(e["ddp"]["max_batch"]), f"{e['fsdp']['fixed_bytes'] / GIB:.1f}",
            str(e["fsdp"]["max_batch"]), f"{e['images_per_s_per_gpu']:.0f}", f"{e['days']:.1f}"]


def format_table(plans: list[dict[str, Any]], cluster: Cluster) -> str:
    """A table with one row per preset and checkpointing setting, then the assumptions."""
    header = ["preset", "params", "ckpt", "TFLOP/img", "act GiB/img", "DDP fixed GiB", "DDP max B",
              "FSDP fixed GiB", "FSDP max B", "img/s/GPU", "days"]
    rows = [header] + [_row(p, key) for p in plans for key in ("no_checkpointing", "checkpointing")]
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(w) if i == 0 else cell.rjust(w)
                       for i, (cell, w) in enumerate(zip(row, widths, strict=True))) for row in rows]
    lines.insert(1, "-" * len(lines[0]))
    lines.append(f"assumed: {cluster.gpus} GPUs of {cluster.gpu_memory_gib:g} GiB, {cluster.headroom:.0%} of it left "
                 f"free; {cluster.mfu:.0%} MFU of {cluster.peak_tflops:g} TFLOP/s (H100 dense bf16); fp32 weights, "
                 "grads, AdamW moments and EMA (20 B/param; DDP +4 B/param buckets; FSDP sharded + gathered units); "
                 "days for the preset's schedule (steps × global batch) on all GPUs; activations under the bf16 "
                 "policy with attention in fp32 (the CPU policy: an upper bound for GPUs)")
    return "\n".join(lines)
