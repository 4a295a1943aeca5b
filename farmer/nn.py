"""Transformer parts shared by the flow blocks, the AR prior and the distilled student.

Attention goes through ``scaled_dot_product_attention``. Sequential decoding (the flow inverse, AR
sampling) uses a :class:`KVCache` that the caller preallocates and passes in: the modules hold no
decoding state, so one model can serve several samplers at once. One-token steps go through a
:class:`Decoder`, the same function with less work per step.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn


@dataclass
class KVCache:
    """Preallocated keys and values for every layer of one transformer: (layers, B, heads, max_len, head_dim).

    Positions ``[0, length)`` are filled; a step writes its keys/values at ``[length, length + T)`` and
    the caller advances ``length`` once all layers have run (:meth:`advance`).
    """

    keys: Tensor
    values: Tensor
    length: int = 0

    @classmethod
    def allocate(cls, layers: int, batch: int, heads: int, max_len: int, head_dim: int,
                 device: torch.device | str, dtype: torch.dtype) -> KVCache:
        shape = (layers, batch, heads, max_len, head_dim)
        return cls(torch.zeros(shape, device=device, dtype=dtype), torch.zeros(shape, device=device, dtype=dtype))

    @property
    def max_len(self) -> int:
        return self.keys.shape[3]

    def advance(self, steps: int) -> None:
        if self.length + steps > self.max_len:
            raise RuntimeError(f"KV cache overflow: {self.length} + {steps} > {self.max_len}")
        self.length += steps


class Attention(nn.Module):
    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)

    def forward(self, x: Tensor, causal: bool, cache: KVCache | None = None, layer: int = 0) -> Tensor:
        b, t, w = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, self.heads, w // self.heads).permute(2, 0, 3, 1, 4)
        if cache is None:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=causal)
        else:
            start = cache.length
            cache.keys[layer, :, :, start:start + t] = k
            cache.values[layer, :, :, start:start + t] = v
            k = cache.keys[layer, :, :, :start + t]
            v = cache.values[layer, :, :, :start + t]
            mask = None
            if causal and t > 1:
                # query at absolute position start+i sees keys at positions <= start+i
                q_pos = torch.arange(start, start + t, device=x.device)[:, None]
                mask = q_pos >= torch.arange(start + t, device=x.device)[None, :]
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.proj(out.transpose(1, 2).reshape(b, t, w))


class TransformerLayer(nn.Module):
    """Pre-norm attention + MLP (MLP ratio 4, docs/method.md §2)."""

    def __init__(self, width: int, heads: int, mlp_ratio: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(width)
        self.attn = Attention(width, heads)
        self.norm2 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(nn.Linear(width, mlp_ratio * width), nn.GELU(), nn.Linear(mlp_ratio * width, width))

    def forward(self, x: Tensor, causal: bool, cache: KVCache | None = None, layer: int = 0) -> Tensor:
        x = x + self.attn(self.norm1(x), causal, cache, layer)
        return x + self.mlp(self.norm2(x))


class Transformer(nn.Module):
    """A stack of layers with a final norm; causal or bidirectional, optionally decoding through a cache."""

    def __init__(self, width: int, layers: int, head_dim: int, mlp_ratio: int, max_len: int) -> None:
        super().__init__()
        self.heads = max(1, width // head_dim)
        self.width = width
        self.max_len = max_len
        self.layers = nn.ModuleList(TransformerLayer(width, self.heads, mlp_ratio) for _ in range(layers))
        self.norm = nn.LayerNorm(width)

    def forward(self, x: Tensor, causal: bool = True, cache: KVCache | None = None) -> Tensor:
        for i, layer in enumerate(self.layers):
            x = layer(x, causal, cache, i)
        if cache is not None:
            cache.advance(x.shape[1])
        return self.norm(x)

    def allocate_cache(self, batch: int, device: torch.device, dtype: torch.dtype) -> KVCache:
        return KVCache.allocate(len(self.layers), batch, self.heads, self.max_len, self.width // self.heads,
                                device, dtype)

    def decoder(self) -> Decoder:
        """A :class:`Decoder` of this transformer's current weights."""
        return Decoder(self)


@dataclass(frozen=True)
class _Affine:
    """A Linear's weight transposed once to a contiguous (in, out) matrix: one addmm per call on 2-D rows.

    Measured on the CPU at one row, ``F.linear`` on a 3-D input costs about 2.5× this (the transposed-weight
    GEMM path plus the reshapes), which is most of a decoding step at batch 1.
    """

    weight: Tensor
    bias: Tensor

    @classmethod
    def of(cls, linear: nn.Linear) -> _Affine:
        return cls(linear.weight.detach().t().contiguous(), linear.bias.detach())

    def __call__(self, x: Tensor) -> Tensor:
        return torch.addmm(self.bias, x, self.weight)


def _layer_norm(norm: nn.LayerNorm, x: Tensor) -> Tensor:
    return F.layer_norm(x, norm.normalized_shape, norm.weight, norm.bias, norm.eps)


@dataclass(frozen=True)
class _DecodeLayer:
    layer: TransformerLayer
    qkv: _Affine
    proj: _Affine
    fc1: _Affine
    fc2: _Affine

    @classmethod
    def of(cls, layer: TransformerLayer) -> _DecodeLayer:
        fc1, _, fc2 = layer.mlp
        return cls(layer, _Affine.of(layer.attn.qkv), _Affine.of(layer.attn.proj), _Affine.of(fc1), _Affine.of(fc2))


class Decoder:
    """One-token steps of a :class:`Transformer` through a :class:`KVCache`, for sampling (no autograd).

    ``step(x, cache)`` is ``transformer(x[:, None], cache=cache)[:, 0]`` (tests/test_prior.py and
    tests/test_flow.py compare them), with less work per step, which is what bounds sequential decoding at
    small batches: 2-D rows throughout, pre-transposed weights (:class:`_Affine`), no module dispatch, and the
    new key and value written into the cache by one copy each. Build it once per decoding loop: it holds
    copies of the weights, so it goes stale if they change.
    """

    def __init__(self, transformer: Transformer) -> None:
        self.transformer = transformer
        self.layers = [_DecodeLayer.of(layer) for layer in transformer.layers]

    @torch.no_grad()
    def step(self, x: Tensor, cache: KVCache) -> Tensor:
        """x (B, width), the next position's input -> its output (B, width); advances the cache by one."""
        b, w = x.shape
        heads = self.transformer.heads
        pos = cache.length
        for index, d in enumerate(self.layers):
            qkv = d.qkv(_layer_norm(d.layer.norm1, x)).view(b, 3, heads, w // heads)
            cache.keys[index, :, :, pos] = qkv[:, 1]
            cache.values[index, :, :, pos] = qkv[:, 2]
            k = cache.keys[index, :, :, : pos + 1]
            v = cache.values[index, :, :, : pos + 1]
            attended = F.scaled_dot_product_attention(qkv[:, 0, :, None], k, v)  # (B, heads, 1, head_dim)
            x = x + d.proj(attended.reshape(b, w))
            x = x + d.fc2(F.gelu(d.fc1(_layer_norm(d.layer.norm2, x))))
        cache.advance(1)
        return _layer_norm(self.transformer.norm, x)


def autocast_dtype(device: torch.device) -> torch.dtype | None:
    """bf16 autocast on accelerators only (CPU bf16 matmuls are slow and less accurate here)."""
    return torch.bfloat16 if device.type in ("cuda", "xpu", "mps") else None
