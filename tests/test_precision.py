"""The precision policy (farmer.precision): bf16 trunks, fp32 likelihood, fp64 models, non-finite inverses."""

import warnings

import pytest
import torch
import torch.nn.functional as F
from helpers import random_images, random_model, small_config

from farmer import Farmer
from farmer.flow import AutoregressiveFlow
from farmer.nn import attention
from farmer.precision import autocast, autocast_dtype, describe


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


def test_bf16_policy_runs_the_trunk_in_bf16_and_the_likelihood_in_fp32() -> None:
    # farmer.precision: under bf16 autocast the flow's trunk matmuls are bf16; its input projection, affine head,
    # log-dets and output stay fp32.
    model = random_model()
    block = model.flow.blocks[0]
    dtypes = {}
    for name, module in [("proj_in", block.proj_in), ("proj_out", block.proj_out),
                         ("trunk", block.transformer.layers[0].mlp[0])]:
        module.register_forward_hook(lambda _m, _i, out, name=name: dtypes.update({name: out.dtype}))
    tokens = model.patchify(random_images(model.config, 4))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        z, logdet = model.flow(tokens)
    assert dtypes == {"proj_in": torch.float32, "trunk": torch.bfloat16, "proj_out": torch.float32}
    assert z.dtype == logdet.dtype == torch.float32


def test_cpu_attention_stays_fp32_under_bf16_autocast() -> None:
    q, k, v = torch.randn(3, 2, 4, 7, 16).unbind(0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = attention(q.bfloat16(), k, v, is_causal=True)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q.bfloat16().float(), k, v, is_causal=True))


@pytest.mark.parametrize("inverse", ["exact", "jacobi"])
def test_inverse_runs_under_the_forwards_policy(inverse: str) -> None:
    # fp32 (the exact policy): forward and inverse are one function to fp32 rounding. bf16: the inverse under the
    # same policy undoes the bf16 forward up to the trunk's bf16 rounding, which depends on the matmul shapes
    # (parallel forward vs token steps), so only to bf16-sized errors; docs/method.md §12 measures it on a
    # trained model.
    model = random_model()
    tokens = model.patchify(random_images(model.config, 4))

    def round_trip_error(amp: torch.dtype | None) -> float:
        with autocast(tokens.device, amp):
            z, _ = model.flow(tokens)
            back = model.flow.inverse(z) if inverse == "exact" else model.flow.jacobi_inverse(z, tol=1e-6)[0]
        assert back.dtype == torch.float32
        return (back - tokens).abs().max().item()

    assert round_trip_error(None) < 1e-4
    assert 1e-4 < round_trip_error(torch.bfloat16) < 0.2  # bf16 trunk: rounding, not a wrong inverse


def test_bf16_training_loss_is_the_fp32_loss_to_bf16_rounding() -> None:
    model = random_model(small_config(flow_layers=2, prior_layers=2)).eval()
    x = random_images(model.config, 8)
    y = torch.arange(8) % model.config.num_classes
    fp32 = model(x, y)[0]
    with autocast(x.device, torch.bfloat16):
        bf16 = model(x, y)[0]
    assert bf16.dtype == torch.float32
    assert 1e-7 < abs(bf16.item() / fp32.item() - 1) < 1e-2


def test_precision_policy_resolves_per_device() -> None:
    cpu, gpu = torch.device("cpu"), torch.device("cuda")
    assert autocast_dtype("fp32", gpu) is None and autocast_dtype("auto", gpu) is torch.bfloat16
    assert autocast_dtype("auto", cpu) is None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a CPU without bf16 matmuls says so
        assert autocast_dtype("bf16", cpu) is torch.bfloat16
    with pytest.raises(ValueError, match="precision must be one of auto, fp32, bf16"):
        autocast_dtype("fp16", cpu)


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


def test_half_precision_weights_get_a_clear_error() -> None:
    model = random_model()
    for dtype in (torch.bfloat16, torch.float16):
        cast = random_model().to(dtype)
        with pytest.raises(TypeError, match=r"float32 .* weights.*precision=.bf16."):
            cast.sample(2, torch.arange(2))
        with pytest.raises(TypeError, match=r"float32 .* weights"):
            cast.log_prob(random_images(model.config, 2))
    with pytest.raises(TypeError, match=r"float32 .* weights"):
        Farmer.from_pretrained("mnist", torch_dtype=torch.bfloat16)
    assert Farmer.from_pretrained("mnist", torch_dtype=torch.float64).weight_dtype() == torch.float64


def test_describe_names_the_policy_and_whether_bf16_would_pay(monkeypatch: pytest.MonkeyPatch) -> None:
    cpu = torch.device("cpu")
    assert describe("fp32", cpu) == "precision fp32"
    assert describe("auto", torch.device("cuda")).startswith("precision bf16")
    for native, hint in ((True, "--precision bf16 trains faster"), (False, "no native bf16 matmuls")):
        monkeypatch.setattr("farmer.precision.cpu_has_bf16_matmul", lambda native=native: native)
        assert hint in describe("auto", cpu)
