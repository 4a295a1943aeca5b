"""Within-token channel transforms (docs/method.md §10): the DCT patch basis and the LU channel mixing."""

import math

import pytest
import torch
from helpers import random_images, random_model, randomize, small_config

from farmer.channels import ChannelMixing, dct_basis, dct_matrix, zigzag_order


@pytest.mark.parametrize("patch_size, channels", [(2, 1), (4, 1), (4, 3), (8, 3)])
def test_dct_basis_is_orthonormal(patch_size: int, channels: int) -> None:
    basis = dct_basis(patch_size, channels)
    d = channels * patch_size**2
    torch.testing.assert_close(basis @ basis.T, torch.eye(d, dtype=torch.float64), atol=1e-12, rtol=0)


def test_dct_matches_the_cosine_sum_definition() -> None:
    # Orthonormal DCT-II: X_k = a_k Σ_n x_n cos(π (2n+1) k / 2N), a_0 = √(1/N), a_k = √(2/N).
    n = 5
    x = torch.randn(n, dtype=torch.float64)
    expected = torch.tensor([
        (math.sqrt(1 / n) if k == 0 else math.sqrt(2 / n))
        * sum(x[i].item() * math.cos(math.pi * (2 * i + 1) * k / (2 * n)) for i in range(n))
        for k in range(n)
    ], dtype=torch.float64)
    torch.testing.assert_close(dct_matrix(n) @ x, expected, atol=1e-12, rtol=0)


def test_zigzag_is_jpeg_order_and_low_frequencies_first() -> None:
    assert zigzag_order(4)[:6] == [(0, 0), (0, 1), (1, 0), (2, 0), (1, 1), (0, 2)]
    assert sorted(zigzag_order(4)) == [(u, v) for u in range(4) for v in range(4)]
    # a constant patch has all its energy in the first (DC) coefficient of each colour channel
    basis = dct_basis(4, 3)
    token = torch.tensor([0.3, -0.2, 0.7], dtype=torch.float64).repeat(16)  # (row, col, C) layout
    coefficients = basis @ token
    assert coefficients[3:].abs().max() < 1e-12
    torch.testing.assert_close(coefficients[:3], 4 * torch.tensor([0.3, -0.2, 0.7], dtype=torch.float64))


def random_mixing(dim: int, seed: int = 0) -> ChannelMixing:
    torch.manual_seed(seed)
    return randomize(ChannelMixing(dim), 0.3, seed).double()


def test_mixing_starts_as_identity() -> None:
    mixing = ChannelMixing(6)
    z = torch.randn(2, 5, 6)
    y, logdet = mixing(z)
    torch.testing.assert_close(y, z)
    assert torch.equal(logdet, torch.zeros(2))


def test_mixing_mixes_channels_within_a_token_only() -> None:
    mixing = random_mixing(4)
    z = torch.randn(1, 3, 4, dtype=torch.float64)
    perturbed = z.clone()
    perturbed[0, 1, 2] += 1.0
    changed = (mixing(perturbed)[0] - mixing(z)[0]).abs() > 1e-12
    assert not changed[0, [0, 2]].any() and changed[0, 1].sum() > 1


@pytest.mark.parametrize("changes", [
    dict(channel_mixing=True),
    dict(patch_transform="dct"),
    dict(patch_transform="dct", channel_mixing=True, redundant_mixture="per_token"),
], ids=["mixing", "dct", "all"])
def test_encode_logdet_matches_autograd_jacobian_of_pixels_to_latents(changes: dict) -> None:
    config = small_config(flow_blocks=2, **changes)
    model = random_model(config, std=0.2).double()
    x = random_images(config, 1).double()

    def encode(flat: torch.Tensor) -> torch.Tensor:
        zi, zr, _ = model.encode(flat.view_as(x))
        return torch.cat([zi, zr], dim=-1).flatten()

    jac = torch.autograd.functional.jacobian(encode, x.flatten())
    _, expected = torch.linalg.slogdet(jac)
    _, _, logdet = model.encode(x)
    assert abs(expected.item()) > 0.1
    assert abs(logdet.item() - expected.item()) <= 1e-8


@pytest.mark.parametrize("changes", [dict(patch_transform="dct"), dict(channel_mixing=True)], ids=["dct", "mixing"])
def test_decode_inverts_encode(changes: dict) -> None:
    config = small_config(**changes)
    model = random_model(config, std=0.1).double()
    x = random_images(config, 3).double()
    zi, zr, _ = model.encode(x)
    torch.testing.assert_close(model.decode(zi, zr), x, atol=1e-10, rtol=0)
