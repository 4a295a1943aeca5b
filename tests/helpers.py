"""Shared test utilities: small configs and randomised (non-identity) weights."""

from __future__ import annotations

import torch

from farmer import Farmer, FarmerConfig


def small_config(**changes: object) -> FarmerConfig:
    """A conditional model small enough for Jacobians: 4×4 tokens of 4 channels, 2 informative."""
    base = FarmerConfig.preset("tiny")
    return base.replace(**changes)


def randomize(module: torch.nn.Module, std: float = 0.1, seed: int = 0) -> torch.nn.Module:
    """Perturb every parameter so no block is the identity (zero-initialised heads would hide bugs)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn(p.shape, generator=generator) * std)
    return module


def random_model(config: FarmerConfig | None = None, seed: int = 0, std: float = 0.1) -> Farmer:
    torch.manual_seed(seed)
    return randomize(Farmer(config or small_config()), std, seed).eval()


def random_images(config: FarmerConfig, batch: int, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    shape = (batch, config.channels, config.image_size, config.image_size)
    return torch.rand(shape, generator=generator) * 2 - 1
