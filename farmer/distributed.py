"""Data-parallel training under ``torchrun``: the process group, DDP or FSDP wrapping, and what a checkpoint
stores: full weights and optimizer state gathered from sharded modules, or each rank's own shards (a sharded
checkpoint, :func:`farmer.checkpoint.save_sharded_checkpoint`), and every rank's RNG state.

One process without ``torchrun`` is the same code with ``world == 1``: every function here is then a no-op
or the plain single-process equivalent.
"""

from __future__ import annotations

import atexit
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from farmer.model import Farmer


@dataclass(frozen=True)
class Runtime:
    rank: int
    world: int
    device: torch.device

    @property
    def main(self) -> bool:
        return self.rank == 0


def init_runtime(device: str | None = None) -> Runtime:
    """Single process, or the process group that ``torchrun`` describes in the environment. A group created
    here is destroyed at interpreter exit (not when training returns: a caller may train again in it)."""
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
            atexit.register(shutdown)
        return Runtime(dist.get_rank(), world, dev)
    return Runtime(0, 1, dev)


def shutdown() -> None:
    """Destroy the process group if one is still up (a caller may have destroyed it already)."""
    if dist.is_initialized():
        dist.destroy_process_group()


def is_sharded(rt: Runtime, sharding: str) -> bool:
    return rt.world > 1 and sharding == "fsdp"


def wrap_distributed(loss: nn.Module, model: Farmer, ema: Farmer, sharding: str, rt: Runtime) -> nn.Module:
    """The module to call for the loss. DDP replicates ``loss`` (the objective's module over ``model``); FSDP
    shards each flow (and student) block and prior layer of the model and its EMA in place, and ``loss`` then
    runs on the sharded modules."""
    if rt.world == 1:
        return loss
    if sharding == "ddp":
        return nn.parallel.DistributedDataParallel(loss, device_ids=[rt.device] if rt.device.type == "cuda" else None)
    from torch.distributed.fsdp import fully_shard

    for module in (model, ema):
        students = [] if module.student is None else list(module.student.blocks)
        for block in [*module.flow.blocks, *students]:
            fully_shard(block)
        if hasattr(module.prior, "transformer"):
            for layer in module.prior.transformer.layers:
                fully_shard(layer)
        fully_shard(module)
    return loss


def full_state(module: nn.Module, rt: Runtime, sharding: str) -> dict[str, Tensor]:
    """A CPU copy of the module's full state dict; under FSDP every rank must call it (rank 0 gets the state)."""
    if is_sharded(rt, sharding):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        return get_model_state_dict(module, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return {k: v.detach().cpu().clone() for k, v in module.state_dict().items()}


def full_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer, rt: Runtime,
                         sharding: str) -> dict[str, Any]:
    """The optimizer's full state dict (FSDP: gathered, keyed by parameter name; every rank must call it)."""
    if is_sharded(rt, sharding):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        return get_optimizer_state_dict(model, optimizer,
                                        options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return optimizer.state_dict()


def load_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Any], rt: Runtime,
                         sharding: str) -> None:
    """Load a full optimizer state dict (as :func:`full_optimizer_state` returns) into a possibly sharded one."""
    if is_sharded(rt, sharding):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        set_optimizer_state_dict(model, optimizer, state, options=StateDictOptions(full_state_dict=True))
    else:
        optimizer.load_state_dict(state)


def sharded_state(model: nn.Module, ema: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """This rank's shards of the model, EMA and optimizer state (DTensors under FSDP, optimizer state keyed by
    parameter name), as ``torch.distributed.checkpoint`` saves and loads them in place."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    return {"model": get_model_state_dict(model), "ema": get_model_state_dict(ema),
            "optimizer": get_optimizer_state_dict(model, optimizer)}


def load_sharded_into(state: dict[str, Any], model: nn.Module, ema: nn.Module,
                      optimizer: torch.optim.Optimizer) -> None:
    """Load what :func:`sharded_state` returned (after ``torch.distributed.checkpoint`` filled it) back into the
    modules and the optimizer."""
    from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict

    set_model_state_dict(model, state["model"])
    set_model_state_dict(ema, state["ema"])
    set_optimizer_state_dict(model, optimizer, state["optimizer"])


def local_shards(state: dict[str, Any]) -> dict[str, Tensor]:
    """The part of each (possibly DTensor) tensor in ``state`` that this rank holds."""
    return {k: v.to_local() if hasattr(v, "to_local") else v for k, v in state.items() if isinstance(v, Tensor)}


def gather_objects(value: Any, rt: Runtime) -> list[Any]:
    """Every rank's ``value``, in rank order (a collective: every rank must call it)."""
    if rt.world == 1:
        return [value]
    values = [None] * rt.world
    dist.all_gather_object(values, value)
    return values
