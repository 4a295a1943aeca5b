"""One side of the A/B comparison in benchmarks/bench_compare.py: a long-lived process that times single calls.

Run as a script (``python benchmarks/ab_worker.py``) with PYTHONPATH pointing at the farmer tree to time, so
one file serves today's code and an older checkout alike: it imports only torch and the API both share
(``Farmer``, ``FarmerConfig``, ``ResamplingGuidance``, ``prior.sample``, ``decode``, ``TrainConfig``), plus the
loaded model, the trainer's optimizer and EMA, the untrained student and the
training step, each by whichever API the tree has (the step: ``farmer.train.train_step``, or in a tree older
than it, that tree's loop body, :func:`legacy_train_step`). Requests arrive one JSON object per stdin line; each
gets one JSON line on stdout, so the coordinator can alternate the two sides call by call.

    {"op": "sample", "model": "mnist", "batch": 1, "cfg": true}
        ->  {"wall": {"ar": s, "exact": s, ...}, "cpu": {...}, "sweeps": [Jacobi sweeps per block, block 1 first]}
    {"op": "train", "model": "tarflow", "batch": 64}  ->  {"wall": {"train": s}, "cpu": {"train": s}}

Wall seconds are what a user waits; CPU seconds of this process leave out the time other processes held
the core (on a shared machine the steadier of the two).
"""

from __future__ import annotations

import copy
import inspect
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

import farmer
import farmer.distill
import farmer.train
from farmer.config import FarmerConfig
from farmer.guidance import ResamplingGuidance
from farmer.model import Farmer
from farmer.train import TrainConfig

# Std of the random output heads given to the TARFlow-sized flow: its blocks start as the identity (zero
# heads), which the Jacobi inverse would invert in one sweep; with these heads it needs a few per block.
TARFLOW_HEAD_STD = 0.02


def build_model(name: str, checkpoint: str) -> Farmer:
    """"mnist": the shipped checkpoint (with its trained student). "tarflow": the mnist preset with
    4 flow blocks × 4 layers, width 128 (the issue's TARFlow-sized AF), seeded random weights, random flow
    heads and an untrained student (timing only)."""
    if name == "mnist":
        return load_shipped(checkpoint)
    config = train_config(name)
    torch.manual_seed(0)
    model = Farmer(config)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for block in model.flow.blocks:
            block.proj_out.weight.copy_(torch.randn(block.proj_out.weight.shape, generator=generator)
                                        * TARFLOW_HEAD_STD)
    return with_untrained_student(model).eval()


def load_shipped(checkpoint: str) -> Farmer:
    """The checkpoint's model in eval mode: ``Farmer.from_pretrained`` today, ``farmer.checkpoint.load_model`` in
    trees older than it."""
    if hasattr(Farmer, "from_pretrained"):
        return Farmer.from_pretrained(checkpoint).eval()
    from farmer.checkpoint import load_model  # an older tree only

    return load_model(checkpoint).eval()


def optimizer_and_ema(model: nn.Module, train_config: TrainConfig) -> tuple[torch.optim.Optimizer, nn.Module]:
    """The trainer's AdamW and EMA copy: ``make_optimizer`` and ``make_ema`` today; in trees older than them,
    AdamW over that tree's ``_param_groups`` and a frozen deep copy, as its trainer built them."""
    if hasattr(farmer.train, "make_optimizer"):
        return farmer.train.make_optimizer(model, train_config), farmer.train.make_ema(model)
    groups = farmer.train._param_groups(model, train_config.weight_decay)
    optimizer = torch.optim.AdamW(groups, lr=train_config.lr, betas=(train_config.beta1, train_config.beta2))
    return optimizer, copy.deepcopy(model).requires_grad_(False)


def with_untrained_student(model: Farmer) -> Farmer:
    """The flow copied into a student (timing only): ``attach_new_student`` today,
    ``DistilledInverse.from_teacher`` in older trees."""
    if hasattr(farmer.distill, "attach_new_student"):
        return farmer.distill.attach_new_student(model)
    model.student = farmer.distill.DistilledInverse.from_teacher(model.config, model.flow)
    return model


def train_config(name: str) -> FarmerConfig:
    config = FarmerConfig.preset("mnist")
    return config.replace(flow_layers=4) if name == "tarflow" else config


def inverses(model: Farmer) -> list[str]:
    """The inverses this side's ``decode`` offers (an older tree may lack "jacobi" and "auto")."""
    literal = str(inspect.signature(model.decode).parameters["inverse"].annotation)
    return [name for name in ("exact", "jacobi", "auto", "distilled")
            if f"'{name}'" in literal or f'"{name}"' in literal]


class Clock:
    """Wall and CPU seconds of named calls."""

    def __init__(self) -> None:
        self.wall: dict[str, float] = {}
        self.cpu: dict[str, float] = {}

    def time(self, name: str, fn: Callable[[], Any]) -> Any:
        wall, cpu = time.perf_counter(), time.process_time()
        result = fn()
        self.wall[name], self.cpu[name] = time.perf_counter() - wall, time.process_time() - cpu
        return result

    def reply(self, **extra: Any) -> dict[str, Any]:
        return {"wall": self.wall, "cpu": self.cpu, **extra}


class Worker:
    def __init__(self, checkpoint: str) -> None:
        self.checkpoint = checkpoint
        self.models: dict[str, Farmer] = {}
        self.trainers: dict[tuple[str, int], Callable[[], None]] = {}

    def model(self, name: str) -> Farmer:
        if name not in self.models:
            self.models[name] = build_model(name, self.checkpoint)
        return self.models[name]

    @torch.no_grad()
    def sample(self, name: str, batch: int, cfg: bool, seed: int) -> dict[str, Any]:
        """One full draw: the AR prior's latents, then each inverse decoding those latents."""
        model = self.model(name)
        labels = torch.arange(batch) % model.config.num_classes
        generator = torch.Generator().manual_seed(seed)
        guidance = ResamplingGuidance() if cfg else None
        clock = Clock()
        informative, redundant = clock.time("ar", lambda: model.prior.sample(labels, generator, guidance))
        for inverse in inverses(model):
            clock.time(inverse, lambda inverse=inverse: model.decode(informative, redundant, inverse=inverse))
        if "jacobi" not in clock.wall:
            return clock.reply()
        z = torch.cat([informative, redundant], dim=-1)
        return clock.reply(sweeps=model.flow.jacobi_inverse(z.flip(1) if model.config.final_permute else z)[1])

    def train(self, name: str, batch: int) -> dict[str, Any]:
        key = (name, batch)
        if key not in self.trainers:
            self.trainers[key] = train_step(train_config(name), batch)
        clock = Clock()
        clock.time("train", self.trainers[key])
        return clock.reply()


def train_step(config: FarmerConfig, batch: int) -> Callable[[], None]:
    """The trainer's step on a random-initialised model and a fixed random batch, set up as the trainer sets it
    up for the mnist training preset (AdamW with its parameter groups and settings, gradient clipping, the EMA
    update, the autocast dtype of precision "auto" on the CPU: none); no data loading. Today's tree runs
    ``farmer.train.train_step`` with the likelihood objective's model and loss module; a tree without it, its
    own loop body (:func:`legacy_train_step`)."""
    train_config = TrainConfig.preset("mnist")
    amp = None  # precision "auto" on the CPU (bench_compare times the CPU only): fp32, in every tree
    generator = torch.Generator().manual_seed(0)
    images = torch.rand(batch, config.channels, config.image_size, config.image_size, generator=generator) * 2 - 1
    labels: Tensor = torch.randint(0, config.num_classes, (batch,), generator=generator)
    step = getattr(farmer.train, "train_step", None)
    if step is None:
        return legacy_train_step(config, train_config, images, labels, amp)
    objective = farmer.train.make_objective(train_config)
    torch.manual_seed(0)
    model = objective.build_model(config, resuming=False)
    optimizer, ema = optimizer_and_ema(model, train_config)
    loss = objective.loss_module(model)
    return lambda: step(model, optimizer, [(images, labels)], grad_clip=train_config.grad_clip, ema=ema,
                        ema_decay=train_config.ema_decay, amp=amp, loss=loss)


def legacy_train_step(config: FarmerConfig, train_config: TrainConfig, images: Tensor, labels: Tensor,
                      amp: torch.dtype | None) -> Callable[[], None]:
    """BASELINE ONLY: the step of a tree older than ``farmer.train.train_step`` (e.g. 0a6217a), where the step
    lived inline in ``farmer.train.train``'s loop and cannot be called. This copies that loop body (farmer/train.py
    at 0a6217a, one micro-batch, one process) minus the learning-rate schedule and data loading, as today's
    side leaves them out too: forward under the trainer's autocast, backward, gradient clipping, AdamW step, and
    the EMA update over every parameter. Today's tree never comes here."""
    torch.manual_seed(0)
    model = Farmer(config)  # the old trainer's likelihood model, trained by calling it directly
    optimizer, ema = optimizer_and_ema(model, train_config)

    def step() -> None:
        model.train()
        with torch.autocast("cpu", dtype=amp or torch.float32, enabled=amp is not None):
            loss, _ = model(images, labels)
        loss.backward()  # one micro-batch, as on today's side
        nn.utils.clip_grad_norm_(model.parameters(), train_config.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        with torch.no_grad():
            for p_ema, p in zip(ema.parameters(), model.parameters(), strict=True):
                p_ema.lerp_(p, 1 - train_config.ema_decay)

    return step


def main() -> None:
    threads = int(sys.argv[1])
    torch.set_num_threads(threads)
    worker = Worker(sys.argv[2])
    print(json.dumps({"ready": str(Path(farmer.__file__).resolve().parent)}), flush=True)
    for line in sys.stdin:
        request = json.loads(line)
        if request["op"] == "sample":
            reply = worker.sample(request["model"], request["batch"], request["cfg"], request.get("seed", 0))
        elif request["op"] == "train":
            reply = worker.train(request["model"], request["batch"])
        else:
            raise ValueError(f"unknown request {request!r}")
        print(json.dumps(reply), flush=True)


if __name__ == "__main__":
    main()
