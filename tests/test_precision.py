"""Numerical precision of the flow: bf16 autocast, fp64 models, and non-finite values in the inverse."""

import pytest
import torch
import torch.nn.functional as F
from helpers import random_images, random_model, small_config

from farmer.flow import AutoregressiveFlow


def test_affine_parameters_are_fp32_projections_under_bf16_autocast() -> None:
    # μ and log σ must be the fp32 projection of the trunk's state, not its bf16 rounding (~3 significant
    # digits), or training would optimise a different function from the one sampling inverts.
    model = random_model()
    block = model.flow.blocks[0]
    x = model.patchify(random_images(model.config, 4))
    states = []
    block.transformer.register_forward_hook(lambda _module, _inputs, out: states.append(out))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mu, log_scale = block.affine_params(x)
    assert mu.dtype == log_scale.dtype == torch.float32
    out = F.linear(states[0].float(), block.proj_out.weight, block.proj_out.bias)
    expected_mu, a = out.chunk(2, dim=-1)
    c = block.log_scale_bound
    torch.testing.assert_close(mu, expected_mu, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(log_scale, c * torch.tanh(a / c), atol=1e-6, rtol=1e-6)


def test_bf16_forward_round_trips_through_the_inverse() -> None:
    # Training runs the forward under bf16 autocast; sampling inverts in fp32. The latent of a bf16 forward
    # must invert to the input at fp32 accuracy, and its log-det must be the fp32 forward's.
    model = random_model()
    tokens = model.patchify(random_images(model.config, 4))
    _, logdet32 = model.flow(tokens)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        z, logdet = model.flow(tokens)
    torch.testing.assert_close(model.flow.inverse(z), tokens, atol=1e-4, rtol=0)
    torch.testing.assert_close(logdet, logdet32, atol=1e-3, rtol=0)


def test_fp64_model_round_trips_and_samples() -> None:
    model = random_model().double()
    tokens = model.patchify(random_images(model.config, 4)).double()
    z, _ = model.flow(tokens)
    back = model.flow.inverse(z)
    assert back.dtype == torch.float64
    assert (back - tokens).abs().max() < 1e-12  # fp32 anywhere on the path would leave ~1e-6
    images = model.sample(4, torch.arange(4), torch.Generator().manual_seed(0))
    assert images.dtype == torch.float64 and images.shape == (4, 1, 8, 8) and torch.isfinite(images).all()


def test_inverse_overflow_raises_naming_the_block() -> None:
    # Each block's inverse may grow a value by e^c: with c = 50, two blocks reach e^100, past fp32's e^88.7.
    config = small_config(log_scale_bound=50.0)
    torch.manual_seed(0)
    flow = AutoregressiveFlow(config).eval()
    with torch.no_grad():
        for block in flow.blocks:
            block.proj_in.weight.zero_()  # the trunk ignores the (huge) tokens: only the affine map grows them
            block.proj_out.bias[config.token_dim:] = -1e4  # log σ = −c: the inverse multiplies by e^c
    z = torch.randn(2, config.num_tokens, config.token_dim)
    # The premise: block 2, inverted first, grows the tokens to ~e^50 and stays finite.
    assert torch.isfinite(flow.blocks[1].inverse(z, flow.allocate_cache(2, z.device))).all()
    with pytest.raises(FloatingPointError, match="flow block 1 of 2"):
        flow.inverse(z)
