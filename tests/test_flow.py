"""The autoregressive flow (docs/method.md §2): invertibility, exact log-det, causality, cached == uncached."""

import pytest
import torch
from helpers import randomize, small_config

from farmer import FarmerConfig
from farmer.flow import AutoregressiveFlow, FlowBlock


def random_flow(config: FarmerConfig, seed: int = 0, std: float = 0.05) -> AutoregressiveFlow:
    torch.manual_seed(seed)
    return randomize(AutoregressiveFlow(config), std, seed).eval()


def random_tokens(config: FarmerConfig, batch: int = 3, seed: int = 1) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(batch, config.num_tokens, config.token_dim, generator=generator)


@pytest.mark.parametrize("config", [
    small_config(),
    small_config(permutation="reverse", flow_blocks=3),
    small_config(image_size=12, channels=3, patch_size=4, flow_layers=2, flow_width=48),
    FarmerConfig.preset("mnist").replace(flow_blocks=2, flow_layers=1),
    small_config(channel_mixing=True),
    small_config(image_size=12, channels=3, patch_size=4, flow_width=48, channel_mixing=True),
], ids=["tiny", "reverse", "rgb", "mnist-shape", "mixing", "rgb-mixing"])
def test_inverse_recovers_tokens(config: FarmerConfig) -> None:
    flow = random_flow(config)
    tokens = random_tokens(config)
    z, _ = flow(tokens)
    assert (z - tokens).abs().max() > 1e-2, "weights are random: the flow must not be the identity"
    assert (flow.inverse(z) - tokens).abs().max() <= 1e-5


def test_new_blocks_start_as_identity() -> None:
    config = small_config()
    flow = AutoregressiveFlow(config)
    tokens = random_tokens(config)
    z, logdet = flow(tokens)
    torch.testing.assert_close(z, tokens)
    torch.testing.assert_close(logdet, torch.zeros(tokens.shape[0]))


@pytest.mark.parametrize("flip", [False, True])
@pytest.mark.parametrize("mixing", [False, True], ids=["plain", "mixing"])
def test_per_token_logdets_are_the_jacobians_diagonal_blocks(flip: bool, mixing: bool) -> None:
    """A block's Jacobian is block-triangular over tokens: its per-token log-dets are the slogdets of the d×d
    diagonal blocks ∂z_i^t/∂z_i^{t-1}, and they sum to the block's log-det."""
    config = small_config(channel_mixing=mixing)
    torch.manual_seed(0)
    block = randomize(FlowBlock(config, flip=flip), 0.2).double().eval()
    tokens = random_tokens(config, batch=1).double()
    _, token_logdets = block.forward_tokens(tokens)
    _, logdet = block(tokens)
    torch.testing.assert_close(token_logdets.sum(dim=1), logdet, rtol=0, atol=1e-10)
    n, d = config.num_tokens, config.token_dim
    jac = torch.autograd.functional.jacobian(lambda t: block(t.view(1, n, d))[0].flatten(), tokens.flatten())
    jac = jac.view(n, d, n, d)
    expected = torch.stack([torch.linalg.slogdet(jac[i, :, i, :])[1] for i in range(n)])
    torch.testing.assert_close(token_logdets[0], expected, rtol=0, atol=1e-8)
    assert expected.std() > 0.05, "equal per-token log-dets would not test the attribution"


def test_flow_per_token_logdets_sum_to_its_logdet() -> None:
    config = small_config(flow_blocks=3, channel_mixing=True)
    flow = random_flow(config, std=0.2)
    tokens = random_tokens(config)
    z, logdet = flow(tokens)
    z_tokens, token_logdets = flow.forward_tokens(tokens)
    torch.testing.assert_close(z_tokens, z, rtol=0, atol=0)
    torch.testing.assert_close(token_logdets.sum(dim=1), logdet, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("flip", [False, True])
@pytest.mark.parametrize("mixing", [False, True], ids=["plain", "mixing"])
def test_block_is_causal_in_its_token_order(flip: bool, mixing: bool) -> None:
    config = small_config(channel_mixing=mixing)
    torch.manual_seed(0)
    block = randomize(FlowBlock(config, flip=flip), 0.2).eval()
    tokens = random_tokens(config, batch=1)
    out, _ = block(tokens)
    n = config.num_tokens
    for j in range(n):
        perturbed = tokens.clone()
        perturbed[:, j] += 1.0
        changed = (block(perturbed)[0] - out).abs().amax(dim=(0, 2)) > 1e-6
        # in the block's order token j is position j (identity) or n-1-j (flip): earlier positions are untouched
        order = torch.arange(n).flip(0) if flip else torch.arange(n)
        position = order.tolist().index(j)
        earlier = order[:position]
        assert not changed[earlier].any(), f"token {j} influenced tokens before it"
        assert changed[j], "a token's own output must depend on it"
        if position + 1 < n:
            assert changed[order[position + 1:]].any(), "later tokens should depend on earlier ones"


def test_cached_block_pass_equals_parallel() -> None:
    config = small_config(flow_layers=2)
    torch.manual_seed(0)
    block = randomize(FlowBlock(config, flip=False), 0.2).eval()
    x = random_tokens(config, batch=2)
    mu, log_scale = block.affine_params(x)
    cache = block.transformer.allocate_cache(2, x.device, torch.float32)
    steps = [block.affine_params(x[:, i:i + 1], cache) for i in range(config.num_tokens)]
    torch.testing.assert_close(torch.cat([s[0] for s in steps], 1), mu, atol=1e-5, rtol=0)
    torch.testing.assert_close(torch.cat([s[1] for s in steps], 1), log_scale, atol=1e-5, rtol=0)
    # a multi-token prefill through the cache agrees as well
    cache.length = 0
    head = block.affine_params(x[:, :5], cache)
    tail = block.affine_params(x[:, 5:], cache)
    torch.testing.assert_close(torch.cat([head[0], tail[0]], 1), mu, atol=1e-5, rtol=0)


def test_scales_are_bounded_so_inverse_stays_finite() -> None:
    config = small_config(log_scale_bound=2.0)
    flow = random_flow(config, std=3.0)  # huge weights: unbounded exp() would overflow
    tokens = random_tokens(config) * 50
    z, logdet = flow(tokens)
    per_block_bound = 2.0 * config.num_tokens * config.token_dim
    assert torch.isfinite(z).all() and (logdet.abs() <= per_block_bound * config.flow_blocks + 1e-3).all()
    assert torch.isfinite(flow.inverse(torch.randn_like(z) * 1e3)).all()


def test_flow_math_is_fp32_under_bf16_autocast() -> None:
    config = small_config()
    flow = random_flow(config)
    tokens = random_tokens(config)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        z, logdet = flow(tokens)
    assert z.dtype == torch.float32 and logdet.dtype == torch.float32


@pytest.mark.parametrize("group_size", [None, 1, 5], ids=["jacobi", "sequential", "gs-jacobi"])
@pytest.mark.parametrize("mixing", [False, True], ids=["plain", "mixing"])
def test_jacobi_inverse_converges_to_the_sequential_inverse(group_size: int | None, mixing: bool) -> None:
    config = small_config(flow_blocks=3, channel_mixing=mixing)
    flow = random_flow(config, std=0.1)
    tokens = random_tokens(config)
    z, _ = flow(tokens)
    x, sweeps = flow.jacobi_inverse(z, group_size, tol=1e-7)
    torch.testing.assert_close(x, flow.inverse(z), atol=1e-4, rtol=0)
    torch.testing.assert_close(x, tokens, atol=1e-4, rtol=0)
    n = config.num_tokens
    assert len(sweeps) == config.flow_blocks and all(1 <= s <= n - 1 for s in sweeps)
    if group_size == 1:  # one sweep per token is the sequential inverse
        assert sweeps == [n - 1] * config.flow_blocks


def test_jacobi_stops_at_the_fp32_noise_floor_of_large_values() -> None:
    """At |x| ~ 1e3 fp32 rounding leaves sweep-to-sweep changes far above an absolute 1e-9, which the iteration
    never meets: it must stop where the change stops shrinking (or falls below rtol · max|x|), not run every
    sweep, and still be the sequential inverse to fp32 accuracy relative to the values."""
    config = small_config(flow_blocks=2)
    flow = random_flow(config, std=0.02)
    z, _ = flow(random_tokens(config) * 1e3)
    exact = flow.inverse(z)
    limit = config.num_tokens - 1
    stalled, stalled_sweeps = flow.jacobi_inverse(z, tol=1e-9, rtol=0)  # only the stagnation test can stop it
    relative, relative_sweeps = flow.jacobi_inverse(z, tol=1e-9)
    assert all(s < limit - 3 for s in stalled_sweeps), stalled_sweeps
    assert all(r <= s for r, s in zip(relative_sweeps, stalled_sweeps, strict=True))
    for x in (stalled, relative):
        assert (x - exact).abs().max() <= 1e-6 * exact.abs().max()


def test_jacobi_stops_early_only_at_its_tolerance() -> None:
    config = small_config(flow_blocks=1)
    flow = random_flow(config, std=0.05)
    z, _ = flow(random_tokens(config))
    loose, loose_sweeps = flow.jacobi_inverse(z, tol=1e-2)
    exact, exact_sweeps = flow.jacobi_inverse(z, tol=1e-9)
    assert loose_sweeps[0] < exact_sweeps[0] <= config.num_tokens - 1
    assert (loose - exact).abs().max() > 1e-6, "a loose tolerance must stop before the fixed point"
