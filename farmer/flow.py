"""The autoregressive flow (AF): n TARFlow-style causal-transformer blocks over patch tokens (spec §2).

Block t maps Z^{t-1} to Z^t. In the block's token order, token i is shifted and scaled with
parameters computed from tokens < i only:

    z_i^t = (z_i^{t-1} − μ_t(z_{<i}^{t-1})) ⊙ σ_t(z_{<i}^{t-1}),   z_1^t = z_1^{t-1}
    log|det ∂Z^t/∂Z^{t-1}| = Σ_i Σ_j log σ_t(z_{<i}^{t-1})_j

so the forward pass is one parallel causal pass and the inverse runs token by token through a KV cache.
The flow's arithmetic (affine maps, log-dets) is fp32 even under bf16 autocast.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from farmer.config import FarmerConfig
from farmer.nn import KVCache, Transformer


def at_least_fp32(t: Tensor) -> Tensor:
    """Flow arithmetic never runs below fp32 (bf16 autocast outputs are promoted; fp64 stays fp64)."""
    return t.to(torch.promote_types(t.dtype, torch.float32))


class FlowBlock(nn.Module):
    def __init__(self, config: FarmerConfig, flip: bool, causal: bool = True) -> None:
        super().__init__()
        dim, width = config.token_dim, config.flow_width
        self.flip = flip  # this block sees the tokens in reversed order (spec §2: per-block permutation)
        self.causal = causal  # False only for the distilled student (spec §7)
        self.log_scale_bound = config.log_scale_bound
        self.proj_in = nn.Linear(dim, width)
        self.pos = nn.Parameter(torch.randn(config.num_tokens, width) * 0.02)
        self.transformer = Transformer(width, config.flow_layers, config.head_dim, config.mlp_ratio,
                                       config.num_tokens)
        # Zero-initialised output: μ = 0, log σ = 0, so every block starts as the identity.
        self.proj_out = nn.Linear(width, 2 * dim)
        nn.init.zeros_(self.proj_out.weight)
        nn.init.zeros_(self.proj_out.bias)

    def permute(self, z: Tensor) -> Tensor:
        return z.flip(1) if self.flip else z

    def affine_params(self, x: Tensor, cache: KVCache | None = None) -> tuple[Tensor, Tensor]:
        """μ and log σ (fp32) predicted at each position of x (block order), before the one-token shift.

        The output at position i is meant for token i + 1. log σ = c·tanh(a/c) keeps every scale in
        [e^{-c}, e^{c}], so the inverse can never overflow into Inf/NaN (spec §2 decision).
        """
        start = 0 if cache is None else cache.length
        h = self.proj_in(x) + self.pos[start:start + x.shape[1]]
        out = at_least_fp32(self.proj_out(self.transformer(h, causal=self.causal, cache=cache)))
        mu, a = out.chunk(2, dim=-1)
        c = self.log_scale_bound
        return mu, c * torch.tanh(a / c)

    def _shifted_params(self, x: Tensor) -> tuple[Tensor, Tensor]:
        # Shift right by one token: token i uses the output at i − 1; token 1 gets μ = 0, log σ = 0.
        mu, log_scale = self.affine_params(x)
        return F.pad(mu[:, :-1], (0, 0, 1, 0)), F.pad(log_scale[:, :-1], (0, 0, 1, 0))

    def forward(self, z: Tensor) -> tuple[Tensor, Tensor]:
        """Z^{t-1} -> (Z^t, log|det|) with the log-det per image (B,) in nats."""
        x = self.permute(at_least_fp32(z))
        mu, log_scale = self._shifted_params(x)
        y = (x - mu) * torch.exp(log_scale)
        return self.permute(y), log_scale.sum(dim=(1, 2))

    def inverse(self, z: Tensor, cache: KVCache) -> Tensor:
        """Z^t -> Z^{t-1}, sequential over tokens; ``cache`` is reset and refilled by this call."""
        y = self.permute(at_least_fp32(z))
        x = torch.empty_like(y)
        x[:, 0] = y[:, 0]
        cache.length = 0
        for i in range(1, y.shape[1]):
            mu, log_scale = self.affine_params(x[:, i - 1:i], cache)
            x[:, i] = y[:, i] * torch.exp(-log_scale[:, 0]) + mu[:, 0]
        return self.permute(x)

    def parallel_inverse(self, z: Tensor) -> Tensor:
        """One parallel pass approximating Z^t -> Z^{t-1} from Z^t itself (the distilled student, spec §7).

        Same parametrisation as the exact inverse, but μ and σ are read off the *output* tokens, which a
        bidirectional transformer (``causal=False``) is trained to make match the teacher's.
        """
        y = self.permute(at_least_fp32(z))
        mu, log_scale = self._shifted_params(y)
        return self.permute(y * torch.exp(-log_scale) + mu)


def block_flips(config: FarmerConfig) -> list[bool]:
    """Which blocks see the reversed token order. "alternate": identity / flip as TARFlow does;
    "reverse": every block sees the reversed order."""
    return [config.permutation == "reverse" or i % 2 == 1 for i in range(config.flow_blocks)]


class AutoregressiveFlow(nn.Module):
    """F = f_n ∘ … ∘ f_1 over tokens (B, N, d)."""

    def __init__(self, config: FarmerConfig) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(FlowBlock(config, flip) for flip in block_flips(config))

    def forward(self, tokens: Tensor) -> tuple[Tensor, Tensor]:
        """Tokens Z^0 -> (Z^n, log|det ∂Z^n/∂Z^0|) with the log-det per image (B,) in nats."""
        path, logdet = self.forward_path(tokens)
        return path[-1], logdet

    def forward_path(self, tokens: Tensor) -> tuple[list[Tensor], Tensor]:
        """The whole path [Z^0, …, Z^n] in one parallel pass (the teacher targets of spec §7) and the log-det."""
        path = [at_least_fp32(tokens)]
        logdet = path[0].new_zeros(tokens.shape[0])
        for block in self.blocks:
            z, block_logdet = block(path[-1])
            path.append(z)
            logdet = logdet + block_logdet
        return path, logdet

    def allocate_cache(self, batch: int, device: torch.device) -> KVCache:
        """One cache serves every block in turn: all blocks share layer count and width."""
        return self.blocks[0].transformer.allocate_cache(batch, device, torch.float32)

    @torch.no_grad()
    def inverse(self, z: Tensor, cache: KVCache | None = None) -> Tensor:
        """Z^n -> Z^0 exactly: blocks in reverse order, each sequential over tokens."""
        if cache is None:
            cache = self.allocate_cache(z.shape[0], z.device)
        for block in reversed(self.blocks):
            z = block.inverse(z, cache)
        return z
