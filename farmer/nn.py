"""Transformer parts shared by the flow blocks, the AR prior and the distilled student.

Attention goes through ``scaled_dot_product_attention``. Sequential decoding (the flow inverse, AR
sampling) uses a :class:`KVCache` that the caller preallocates and passes in: the modules hold no
decoding state, so one model can serve several samplers at once. One-token steps go through a
:class:`Decoder`, the same function with less work per step.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint


@dataclass
class KVCache:
    """Preallocated keys and values for every layer of one transformer, in one tensor
    (layers, 2, B, heads, max_len, head_dim): index 0 holds the keys, 1 the values, so a decoding step writes
    both with one copy.

    Positions ``[0, length)`` are filled; a step writes its keys/values at ``[length, length + T)`` and
    the caller advances ``length`` once all layers have run (:meth:`advance`).
    """

    kv: Tensor
    length: int = 0

    @classmethod
    def allocate(cls, layers: int, batch: int, heads: int, max_len: int, head_dim: int,
                 device: torch.device | str, dtype: torch.dtype) -> KVCache:
        return cls(torch.zeros(layers, 2, batch, heads, max_len, head_dim, device=device, dtype=dtype))

    @property
    def keys(self) -> Tensor:
        """(layers, B, heads, max_len, head_dim), a view."""
        return self.kv[:, 0]

    @property
    def values(self) -> Tensor:
        return self.kv[:, 1]

    @property
    def max_len(self) -> int:
        return self.kv.shape[4]

    def advance(self, steps: int) -> None:
        if self.length + steps > self.max_len:
            raise RuntimeError(f"KV cache overflow: {self.length} + {steps} > {self.max_len}")
        self.length += steps


def attention(q: Tensor, k: Tensor, v: Tensor, **kwargs: object) -> Tensor:
    """``scaled_dot_product_attention``, in fp32 on CPUs even under bf16 autocast (farmer.precision: the CPU's bf16
    attention backward is several times slower than fp32's); on accelerators it follows autocast."""
    if q.device.type == "cpu" and torch.is_autocast_enabled("cpu"):
        wide = torch.promote_types(q.dtype, torch.float32)
        with torch.autocast("cpu", enabled=False):
            return F.scaled_dot_product_attention(q.to(wide), k.to(wide), v.to(wide), **kwargs)
    return F.scaled_dot_product_attention(q, k, v, **kwargs)


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
            out = attention(q, k, v, is_causal=causal)
        else:
            start = cache.length
            kv = cache.kv[layer]
            kv[0, :, :, start:start + t] = k
            kv[1, :, :, start:start + t] = v
            k, v = kv[0, :, :, :start + t], kv[1, :, :, :start + t]
            mask = None
            if causal and t > 1:
                # query at absolute position start+i sees keys at positions <= start+i
                q_pos = torch.arange(start, start + t, device=x.device)[:, None]
                mask = q_pos >= torch.arange(start + t, device=x.device)[None, :]
            out = attention(q, k, v, attn_mask=mask)
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
    """A stack of layers with a final norm; causal or bidirectional, optionally decoding through a cache.

    ``activation_checkpointing``: a training switch, not architecture (never saved). When on, a forward that
    builds a graph keeps only each layer's input and recomputes the layer in the backward pass (one more forward
    of the trunk for a layer's activations held once instead of for every layer). The recompute replays the same
    autocast state and RNG state, so the loss and gradients are those without it (tests/test_nn.py).
    """

    def __init__(self, width: int, layers: int, head_dim: int, mlp_ratio: int, max_len: int) -> None:
        super().__init__()
        self.activation_checkpointing = False
        self.heads = max(1, width // head_dim)
        self.width = width
        self.max_len = max_len
        self.layers = nn.ModuleList(TransformerLayer(width, self.heads, mlp_ratio) for _ in range(layers))
        self.norm = nn.LayerNorm(width)

    def forward(self, x: Tensor, causal: bool = True, cache: KVCache | None = None) -> Tensor:
        recompute = self.activation_checkpointing and cache is None and torch.is_grad_enabled()
        for i, layer in enumerate(self.layers):
            x = checkpoint(layer, x, causal, use_reentrant=False) if recompute else layer(x, causal, cache, i)
        if cache is not None:
            cache.advance(x.shape[1])
        return self.norm(x)

    def allocate_cache(self, batch: int, device: torch.device, dtype: torch.dtype) -> KVCache:
        return KVCache.allocate(len(self.layers), batch, self.heads, self.max_len, self.width // self.heads,
                                device, dtype)

    def decoder(self, embed: nn.Linear | None = None, positions: Tensor | None = None) -> Decoder:
        """A :class:`Decoder` of this transformer's current weights; with the model's input projection
        ``embed`` and position table ``positions`` (L, width) it also embeds tokens (:meth:`Decoder.embed_step`)."""
        return Decoder(self, embed, positions)


def transposed_weights(linear: nn.Linear) -> tuple[Tensor, Tensor]:
    """A Linear's (weight transposed once to a contiguous (in, out) matrix, bias): one ``addmm`` per call on
    2-D rows. Measured on the CPU at one row, ``F.linear`` on a 3-D input costs about 2.5× that (the
    transposed-weight GEMM path plus the reshapes), which is most of a decoding step at batch 1."""
    return linear.weight.detach().t().contiguous(), linear.bias.detach()


class _DecodeLayer(NamedTuple):
    """One layer's weights as plain tensors: a step reads them with no module attribute lookups."""

    norm1_weight: Tensor
    norm1_bias: Tensor
    qkv_weight: Tensor
    qkv_bias: Tensor
    proj_weight: Tensor
    proj_bias: Tensor
    norm2_weight: Tensor
    norm2_bias: Tensor
    fc1_weight: Tensor
    fc1_bias: Tensor
    fc2_weight: Tensor
    fc2_bias: Tensor

    @classmethod
    def of(cls, layer: TransformerLayer) -> _DecodeLayer:
        fc1, _, fc2 = layer.mlp
        return cls(layer.norm1.weight.detach(), layer.norm1.bias.detach(), *transposed_weights(layer.attn.qkv),
                   *transposed_weights(layer.attn.proj), layer.norm2.weight.detach(), layer.norm2.bias.detach(),
                   *transposed_weights(fc1), *transposed_weights(fc2))


class Decoder:
    """One-token steps of a :class:`Transformer` through a :class:`KVCache`, for sampling (no autograd).

    ``step(x, cache)`` is ``transformer(x[:, None], cache=cache)[:, 0]`` (tests/test_prior.py and
    tests/test_flow.py compare them), with less work per step, which is what bounds sequential decoding at
    small batches: 2-D rows throughout, pre-transposed weights held as plain tensors (:class:`_DecodeLayer`),
    no module dispatch, and the new key and value written into the cache by one copy. Build it once per decoding
    loop: it holds copies of the weights, so it goes stale if they change. All layer norms of a transformer
    share one width and eps.
    """

    def __init__(self, transformer: Transformer, embed: nn.Linear | None = None,
                 positions: Tensor | None = None) -> None:
        self.heads = transformer.heads
        self.layers = [_DecodeLayer.of(layer) for layer in transformer.layers]
        self.norm_shape, self.eps = transformer.norm.normalized_shape, transformer.norm.eps
        self.norm_weight, self.norm_bias = transformer.norm.weight.detach(), transformer.norm.bias.detach()
        if (embed is None) != (positions is None):
            raise ValueError("a Decoder's embed and positions go together")
        # (in, width) weight and (L, width) bias of the embedding at each position, or None
        self.embedding = None
        if embed is not None and positions is not None:
            weight, bias = transposed_weights(embed)
            self.embedding = weight, bias + positions.detach()

    @torch.no_grad()
    def embed(self, token: Tensor, position: int) -> Tensor:
        """``embed(token) + positions[position]`` for token (B, in): the embedding's bias and the position folded
        into one ``addmm``."""
        if self.embedding is None:
            raise ValueError("this Decoder was built without an embedding (Transformer.decoder(embed, positions))")
        weight, bias = self.embedding
        return torch.addmm(bias[position], token, weight)

    @torch.no_grad()
    def embed_step(self, token: Tensor, position: int, cache: KVCache) -> Tensor:
        """``step(embed(token, position), cache)``."""
        return self.step(self.embed(token, position), cache)

    @torch.no_grad()
    def step(self, x: Tensor, cache: KVCache) -> Tensor:
        """x (B, width), the next position's input -> its output (B, width); advances the cache by one.

        Hand-unrolled fast path: the mirror of the reference ``Transformer.forward(x[:, None], cache=cache)[:, 0]``
        (its ``Block.forward`` layer by layer: pre-norm attention over the cache, then the pre-norm MLP); change
        one, change both. tests/test_prior.py::test_cached_pass_equals_parallel_pass holds them equal (and
        tests/test_flow.py's inverse tests through :meth:`farmer.flow.FlowBlock.inverse`)."""
        b, w = x.shape
        heads, shape, eps, pos = self.heads, self.norm_shape, self.eps, cache.length
        for d, kv in zip(self.layers, cache.kv, strict=True):
            qkv = torch.addmm(d.qkv_bias, F.layer_norm(x, shape, d.norm1_weight, d.norm1_bias, eps), d.qkv_weight)
            qkv = qkv.view(b, 3, heads, w // heads)
            kv.select(3, pos).copy_(qkv[:, 1:].transpose(0, 1))
            past = kv[:, :, :, : pos + 1]
            attended = attention(qkv[:, 0, :, None], past[0], past[1])  # (B, heads, 1, hd)
            x = x + torch.addmm(d.proj_bias, attended.reshape(b, w), d.proj_weight)
            hidden = F.gelu(torch.addmm(d.fc1_bias, F.layer_norm(x, shape, d.norm2_weight, d.norm2_bias, eps),
                                        d.fc1_weight))
            x = x + torch.addmm(d.fc2_bias, hidden, d.fc2_weight)
        cache.advance(1)
        return F.layer_norm(x, shape, self.norm_weight, self.norm_bias, eps)
