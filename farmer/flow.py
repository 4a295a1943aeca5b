"""The autoregressive flow (AF): n TARFlow-style causal-transformer blocks over patch tokens (docs/method.md §2).

Block t maps Z^{t-1} to Z^t. In the block's token order, token i is shifted and scaled with
parameters computed from tokens < i only:

    z_i^t = (z_i^{t-1} − μ_t(z_{<i}^{t-1})) ⊙ σ_t(z_{<i}^{t-1}),   z_1^t = z_1^{t-1}
    log|det ∂Z^t/∂Z^{t-1}| = Σ_i Σ_j log σ_t(z_{<i}^{t-1})_j

so the forward pass is one parallel causal pass and the inverse runs token by token through a KV cache.
With ``channel_mixing`` each block first mixes every token's channels by a learned invertible matrix
(:class:`farmer.channels.ChannelMixing`), which the AF alone never does.

Precision (farmer.precision, docs/method.md §12): under bf16 autocast only the blocks' transformer trunks run in
bf16; the input projection, the affine head, the affine maps and the log-dets stay (at least) fp32. The inverse,
exact or Jacobi, runs under the same policy as the forward. bf16 rounding depends on the matmul shapes, so under
bf16 the parallel forward and the token-by-token inverse are not the same function to fp32 accuracy; without
autocast (precision "fp32", the exact policy) they are.

Bound: log σ = c·tanh(a/c) keeps every scale in [e^{-c}, e^{c}], so one block's inverse grows a value by
at most e^c times plus |μ|; n blocks compound to e^{n·c}, which overflows fp32 (e^88.7) for the large
presets (28 blocks × c = 4). A trained flow stays far from that, and :meth:`AutoregressiveFlow.inverse`
raises a clear error naming the block rather than return non-finite images.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from farmer.channels import ChannelMixing
from farmer.config import FarmerConfig
from farmer.nn import KVCache, Transformer, transposed_weights
from farmer.precision import full_precision

# Jacobi stopping (docs/method.md §7): a sweep's largest change relative to the values' scale. fp32 rounding
# leaves a floor of a few ulps of max|x| times the trunk's amplification (measured: 1–3e-5 at |x| ≈ 43 on the
# TARFlow-sized flow, ~2e-7·|x| on the shipped mnist flow), which RTOL clears; a change that stops shrinking
# below STALL_RTOL · max|x| is that floor too.
JACOBI_RTOL = 1e-6
JACOBI_STALL_RTOL = 1e-4


def at_least_fp32(t: Tensor) -> Tensor:
    """Flow arithmetic never runs below fp32 (bf16 autocast outputs are promoted; fp64 stays fp64)."""
    return t.to(torch.promote_types(t.dtype, torch.float32))


class FlowBlock(nn.Module):
    def __init__(self, config: FarmerConfig, flip: bool, causal: bool = True) -> None:
        super().__init__()
        dim, width = config.token_dim, config.flow_width
        self.flip = flip  # this block sees the tokens in reversed order (docs/method.md §2)
        self.causal = causal  # False only for the distilled student (docs/method.md §7)
        self.log_scale_bound = config.log_scale_bound
        self.proj_in = nn.Linear(dim, width)
        self.pos = nn.Parameter(torch.randn(config.num_tokens, width) * 0.02)
        self.transformer = Transformer(width, config.flow_layers, config.head_dim, config.mlp_ratio,
                                       config.num_tokens)
        # Zero-initialised output: μ = 0, log σ = 0, so every block starts as the identity.
        self.proj_out = nn.Linear(width, 2 * dim)
        nn.init.zeros_(self.proj_out.weight)
        nn.init.zeros_(self.proj_out.bias)
        self.mixing = ChannelMixing(dim) if config.channel_mixing else None

    def permute(self, z: Tensor) -> Tensor:
        return z.flip(1) if self.flip else z

    def affine_params(self, x: Tensor, cache: KVCache | None = None) -> tuple[Tensor, Tensor]:
        """μ and log σ (fp32) predicted at each position of x (block order), before the one-token shift.

        The output at position i is meant for token i + 1. log σ = c·tanh(a/c) bounds every scale to
        [e^{-c}, e^{c}] (see the module docstring for what that bounds over n blocks).
        """
        start = 0 if cache is None else cache.length
        device = x.device.type
        # The precision policy (farmer.precision, docs/method.md §12): only the trunk follows autocast. The input
        # projection reads the raw tokens, and the head's μ and log σ set the likelihood directly: both (at least)
        # fp32, as are the affine maps and log-dets that use them.
        with full_precision(device):
            h = self.proj_in(at_least_fp32(x)) + self.pos[start:start + x.shape[1]]
        h = self.transformer(h, causal=self.causal, cache=cache)
        with full_precision(device):
            out = self.proj_out(at_least_fp32(h))
        return self._bounded(out)

    def _bounded(self, out: Tensor) -> tuple[Tensor, Tensor]:
        """The head's output (…, 2·dim) -> (μ, log σ = c·tanh(a/c))."""
        mu, a = out.chunk(2, dim=-1)
        c = self.log_scale_bound
        return mu, c * torch.tanh(a / c)

    def _shifted_params(self, x: Tensor) -> tuple[Tensor, Tensor]:
        # Shift right by one token: token i uses the output at i − 1; token 1 gets μ = 0, log σ = 0.
        mu, log_scale = self.affine_params(x)
        return F.pad(mu[:, :-1], (0, 0, 1, 0)), F.pad(log_scale[:, :-1], (0, 0, 1, 0))

    def forward(self, z: Tensor) -> tuple[Tensor, Tensor]:
        """Z^{t-1} -> (Z^t, log|det|) with the log-det per image (B,) in nats."""
        y, token_logdets = self.forward_tokens(z)
        return y, token_logdets.sum(dim=1)

    def forward_tokens(self, z: Tensor) -> tuple[Tensor, Tensor]:
        """Z^{t-1} -> (Z^t, log|det ∂z_i^t/∂z_i^{t-1}| per token (B, N)), tokens in Z^{t-1}'s order.

        The Jacobian is block-triangular over tokens (in the block's order), so its log-det is the sum of the
        diagonal blocks' log-dets, one per token: Σ_j log σ_ij, plus log|det W| with channel mixing.
        """
        z = at_least_fp32(z)
        if self.mixing is not None:
            z, _ = self.mixing(z)
        x = self.permute(z)
        mu, log_scale = self._shifted_params(x)
        y = (x - mu) * torch.exp(log_scale)
        token_logdets = self.permute(log_scale.sum(dim=2))
        if self.mixing is not None:
            token_logdets = token_logdets + self.mixing.token_logdet(z.dtype)
        return self.permute(y), token_logdets

    def unmix(self, z: Tensor) -> Tensor:
        return z if self.mixing is None else self.mixing.inverse(z)

    def inverse(self, z: Tensor, cache: KVCache) -> Tensor:
        """Z^t -> Z^{t-1}, sequential over tokens; ``cache`` is reset and refilled by this call.

        Hand-unrolled fast path: the mirror of the reference :meth:`affine_params` (one token at a time, through
        :meth:`farmer.nn.Decoder.step`) followed by the inverse of :meth:`forward_tokens`' affine map; change one,
        change both. tests/test_invertible.py (the flow-block and flow-exact cases: inverse ∘ forward = identity
        in fp64) and tests/test_flow.py::test_inverse_recovers_tokens hold them equal."""
        y = self.permute(at_least_fp32(z))
        x = torch.empty_like(y)
        x[:, 0] = y[:, 0]
        cache.length = 0
        decoder = self.transformer.decoder(self.proj_in, self.pos)
        out_weight, out_bias = transposed_weights(self.proj_out)
        # affine_params one token at a time through the Decoder's lean step, under the same precision policy. One
        # context object, re-entered at every token: the autocast state is read once per block, not per token.
        exact = full_precision(y.device.type)
        for i in range(1, y.shape[1]):
            with exact:
                h = decoder.embed(x[:, i - 1], i - 1)
            h = decoder.step(h, cache)
            with exact:
                mu, log_scale = self._bounded(torch.addmm(out_bias, at_least_fp32(h), out_weight))
                x[:, i] = torch.addcmul(mu, y[:, i], log_scale.neg_().exp_())
        return self.unmix(self.permute(x))

    def jacobi_inverse(self, z: Tensor, cache: KVCache, group_size: int, tol: float,
                       rtol: float = JACOBI_RTOL) -> tuple[Tensor, int]:
        """Z^t -> Z^{t-1} by Gauss–Seidel–Jacobi iteration (docs/method.md §7): groups of ``group_size``
        tokens in order; within a group every token is updated in parallel from the current guess,

            x_i <- y_i ⊘ σ(x_{<i}) + μ(x_{<i}),

        until the largest change is at most ``tol + rtol · max|x|`` over the group, or stops shrinking while
        already below :data:`JACOBI_STALL_RTOL` · max|x| (the fp32 noise floor, which an absolute tolerance
        alone never meets once |x| is large). The exact inverse is the fixed point: with the tokens before a
        group exact, k sweeps make its first k tokens exact, so a group of g tokens needs at most g sweeps
        (group_size 1 is the sequential inverse, group_size N plain Jacobi). Finished groups stay in the cache.
        Returns (Z^{t-1}, sweeps run).
        """
        y = self.permute(at_least_fp32(z))
        x = y.clone()  # the initial guess; token 1 is exact already (μ = 0, σ = 1)
        sweeps = 0
        for start in range(1, y.shape[1], group_size):
            end = min(start + group_size, y.shape[1])
            previous = float("inf")
            for _ in range(end - start):
                cache.length = start - 1  # rewrite this group's keys from the current guess
                mu, log_scale = self.affine_params(x[:, start - 1:end - 1], cache)
                update = y[:, start:end] * torch.exp(-log_scale) + mu
                # One device sync per sweep for both maxima.
                change, scale = torch.stack([(update - x[:, start:end]).abs().max(), update.abs().max()]).tolist()
                x[:, start:end] = update
                sweeps += 1
                if change <= tol + rtol * scale or previous <= change <= JACOBI_STALL_RTOL * scale:
                    break
                previous = change
        return self.unmix(self.permute(x)), sweeps

    def parallel_inverse(self, z: Tensor) -> Tensor:
        """One parallel pass approximating Z^t -> Z^{t-1} from Z^t itself (the distilled student, docs/method.md §7).

        Same parametrisation as the exact inverse, but μ and σ are read off the *output* tokens, which a
        bidirectional transformer (``causal=False``) is trained to make match the teacher's.
        """
        y = self.permute(at_least_fp32(z))
        mu, log_scale = self._shifted_params(y)
        return self.unmix(self.permute(y * torch.exp(-log_scale) + mu))


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
        """The whole path [Z^0, …, Z^n] in one parallel pass (teacher targets, docs/method.md §7) and the log-det."""
        path = [at_least_fp32(tokens)]
        logdet = path[0].new_zeros(tokens.shape[0])
        for block in self.blocks:
            z, block_logdet = block(path[-1])
            path.append(z)
            logdet = logdet + block_logdet
        return path, logdet

    def forward_tokens(self, tokens: Tensor) -> tuple[Tensor, Tensor]:
        """Tokens Z^0 -> (Z^n, each patch's share of the log-det (B, N)): the diagonal-block log-dets of every
        block (:meth:`FlowBlock.forward_tokens`), summed per patch position. They add up to the flow's log-det;
        the split is an attribution (the whole flow's Jacobian is not block-triangular: blocks alternate order)."""
        z = at_least_fp32(tokens)
        token_logdets = z.new_zeros(z.shape[:2])
        for block in self.blocks:
            z, block_logdets = block.forward_tokens(z)
            token_logdets = token_logdets + block_logdets
        return z, token_logdets

    def allocate_cache(self, batch: int, device: torch.device, dtype: torch.dtype = torch.float32) -> KVCache:
        """One cache serves every block in turn: all blocks share layer count and width."""
        return self.blocks[0].transformer.allocate_cache(batch, device, dtype)

    @torch.no_grad()
    def inverse(self, z: Tensor, cache: KVCache | None = None) -> Tensor:
        """Z^n -> Z^0 exactly: blocks in reverse order, each sequential over tokens.

        Raises FloatingPointError naming the block whose output is not finite (see the module docstring).
        """
        z = at_least_fp32(z)
        if cache is None:
            cache = self.allocate_cache(z.shape[0], z.device, self.blocks[0].pos.dtype)
        for index in reversed(range(len(self.blocks))):
            z = self.blocks[index].inverse(z, cache)
            check_finite(z, f"flow block {index + 1} of {len(self.blocks)} (inverse)")
        return z

    @torch.no_grad()
    def jacobi_inverse(self, z: Tensor, group_size: int | None = None, tol: float = 1e-5,
                       cache: KVCache | None = None, rtol: float = JACOBI_RTOL) -> tuple[Tensor, list[int]]:
        """Z^n -> Z^0 with :meth:`FlowBlock.jacobi_inverse` in every block (None: one group of all tokens).

        Returns Z^0 and the sweeps each block ran, in flow order (block 1 first). Equal to
        :meth:`inverse` up to differences of about ``tol + rtol · max|x|`` per block; faster where a parallel
        pass over a group costs little more than one token step (see :func:`choose_inverse`).
        """
        num_tokens = z.shape[1]
        group_size = num_tokens if group_size is None else group_size
        if group_size < 1 or not tol > 0 or not rtol >= 0:
            raise ValueError(f"group_size must be >= 1, tol > 0 and rtol >= 0, got {group_size}, {tol} and {rtol}")
        z = at_least_fp32(z)
        if cache is None:
            cache = self.allocate_cache(z.shape[0], z.device, self.blocks[0].pos.dtype)
        sweeps = [0] * len(self.blocks)
        for index in reversed(range(len(self.blocks))):
            z, sweeps[index] = self.blocks[index].jacobi_inverse(z, cache, group_size, tol, rtol)
            check_finite(z, f"flow block {index + 1} of {len(self.blocks)} (Jacobi inverse)")
        return z, sweeps


# The largest batch at which the Jacobi inverse beats the sequential one (docs/method.md §7). Jacobi runs ~5–11
# parallel sweeps over all N tokens per block where the exact inverse runs N − 1 one-token steps, so it wins where a
# step costs its launch overhead, not its arithmetic. CPU, one thread, measured (exact / Jacobi time): the mnist
# flow 2.42× at batch 1, 1.68× at 2, 1.18× at 4, 0.81× at 8; the TARFlow-sized flow (4 × 4 layers) 1.25×, 1.09×,
# 0.76×. Accelerators: not measured yet (a GPU's token step is launch-bound until B·N rows fill it); a guess.
JACOBI_MAX_BATCH = {"cpu": 2}
JACOBI_MAX_BATCH_ACCELERATOR = 64


def auto_inverse(batch: int, device: torch.device) -> str:
    """The faster exact-to-fp32 inverse for ``batch`` images on ``device``: "jacobi" or "exact" (``inverse="auto"``)."""
    limit = JACOBI_MAX_BATCH.get(device.type, JACOBI_MAX_BATCH_ACCELERATOR)
    return "jacobi" if batch <= limit else "exact"


def check_finite(z: Tensor, where: str) -> None:
    """Sampling is finite by construction up to the bound in the module docstring; past it, say where."""
    if not torch.isfinite(z).all():
        raise FloatingPointError(f"non-finite values after {where}: the latents or the weights are out of the "
                                 "range this flow can invert in its precision")


class DistilledInverse(nn.Module):
    """The one-step student of the flow inverse (docs/method.md §7): g_{θ_1} ∘ … ∘ g_{θ_n}, FlowBlocks with
    bidirectional attention. Block t maps Z̃^t to Z̃^{t−1} in one parallel pass; ``blocks[t-1]`` mirrors the
    teacher's block t (same flip, same parameter names), so it can start as a copy of the teacher
    (:func:`farmer.distill.attach_new_student`). Trained by Algorithm 2 (:mod:`farmer.distill`)."""

    def __init__(self, config: FarmerConfig) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(FlowBlock(config, flip, causal=False) for flip in block_flips(config))

    def path(self, z: Tensor) -> list[Tensor]:
        """[Z̃^{n−1}, …, Z̃^0]: each block consumes the previous student block's output."""
        outputs = []
        for block in reversed(self.blocks):
            z = block.parallel_inverse(z)
            outputs.append(z)
        return outputs

    def forward(self, z: Tensor) -> Tensor:
        """Z^n -> Z^0 in n parallel passes."""
        return self.path(z)[-1]
