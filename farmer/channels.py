"""Within-token channel transforms (docs/method.md §10).

The AF of docs/method.md §2 shifts and scales each channel of token i with parameters computed from tokens < i: it
never mixes the channels *within* a token. With raw (row, col, C) patch tokens the first d_I channels are
then just the top rows of every patch, and the redundant channels (the bottom rows) are as detailed as the
informative ones. Two exact, invertible transforms put a token's content where dimension reduction wants
it:

* :func:`dct_basis` — a fixed orthonormal 2-D DCT-II of every patch (per colour channel), coefficients in
  zig-zag order, so the first channels are the coarse structure. Orthonormal, so log|det| = 0.
* :class:`ChannelMixing` — a learned d×d matrix applied to every token, LU-parametrised as in Glow's
  invertible 1×1 convolution: W = L (U + diag(s)), L unit lower-triangular, U strictly upper-triangular,
  log|det| = N · Σ_j log|s_j| per image.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn


def dct_matrix(size: int, dtype: torch.dtype = torch.float64) -> Tensor:
    """The orthonormal 1-D DCT-II matrix C (size × size): coefficients = C @ signal."""
    n = torch.arange(size, dtype=dtype)
    k = n[:, None]
    c = torch.cos(math.pi * (2 * n[None, :] + 1) * k / (2 * size)) * math.sqrt(2 / size)
    c[0] /= math.sqrt(2)
    return c


def zigzag_order(size: int) -> list[tuple[int, int]]:
    """(row, col) frequency pairs in JPEG zig-zag order: by anti-diagonal u+v, alternating direction."""
    pairs = [(u, v) for u in range(size) for v in range(size)]
    return sorted(pairs, key=lambda uv: (uv[0] + uv[1], uv[0] if (uv[0] + uv[1]) % 2 else uv[1]))


def dct_basis(patch_size: int, channels: int) -> Tensor:
    """Orthonormal B (d × d, fp64) with coefficients = B @ token for tokens laid out (row, col, C).

    Output channel ``rank·C + c`` is the zig-zag frequency number ``rank`` of colour channel c, so the
    lowest frequencies of every colour come first.
    """
    c1 = dct_matrix(patch_size)
    d = channels * patch_size**2
    basis = torch.zeros(d, d, dtype=torch.float64)
    for rank, (u, v) in enumerate(zigzag_order(patch_size)):
        pattern = torch.outer(c1[u], c1[v]).reshape(-1)  # over (row, col)
        for ch in range(channels):
            basis[rank * channels + ch, ch::channels] = pattern
    return basis


class ChannelMixing(nn.Module):
    """Learned invertible mixing of a token's d channels: z -> z Wᵀ for every token, W = L (U + diag(s)).

    Starts as the identity (L = I, U = 0, s = 1). The sign of s is fixed at +1 (log s is learned), so W stays
    in the identity's connected component and log|det W| = Σ log s. The matrix and its solves run in at
    least fp32, outside autocast.
    """

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.lower = nn.Parameter(torch.zeros(dim, dim))
        self.upper = nn.Parameter(torch.zeros(dim, dim))
        self.log_scale = nn.Parameter(torch.zeros(dim))

    def _factors(self, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        eye = torch.eye(self.log_scale.shape[0], device=self.log_scale.device, dtype=dtype)
        lower = self.lower.to(dtype).tril(-1) + eye
        upper = self.upper.to(dtype).triu(1) + torch.diag(self.log_scale.to(dtype).exp())
        return lower, upper

    def weight(self, dtype: torch.dtype = torch.float32) -> Tensor:
        lower, upper = self._factors(dtype)
        return lower @ upper

    def token_logdet(self, dtype: torch.dtype = torch.float32) -> Tensor:
        """log|det W| = Σ log s: what the mixing adds to the log-det of every token (a scalar)."""
        return self.log_scale.to(dtype).sum()

    def forward(self, z: Tensor) -> tuple[Tensor, Tensor]:
        """Tokens (B, N, d) -> (mixed tokens, log|det| per image (B,))."""
        with torch.autocast(device_type=z.device.type, enabled=False):
            y = z @ self.weight(z.dtype).T
            logdet = z.shape[1] * self.token_logdet(z.dtype)
        return y, logdet.expand(z.shape[0])

    def inverse(self, y: Tensor) -> Tensor:
        """z = y W⁻ᵀ by two triangular solves (W zᵀ = yᵀ)."""
        with torch.autocast(device_type=y.device.type, enabled=False):
            lower, upper = self._factors(y.dtype)
            rows = y.reshape(-1, y.shape[-1]).T
            rows = torch.linalg.solve_triangular(lower, rows, upper=False, unitriangular=True)
            rows = torch.linalg.solve_triangular(upper, rows, upper=True)
        return rows.T.reshape(y.shape)
