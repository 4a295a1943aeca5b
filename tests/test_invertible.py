"""One invertibility test for every invertible piece (docs/method.md §1–2, §7, §10, §13), in fp64: the inverse
undoes the forward map, and the log-det the piece reports is log|det J| of the forward map, J by autograd.

Each case builds (forward, inverse, input): forward maps a batch to (output, log-det per sample (B,)), inverse
maps the output back. Pieces: the learned channel mixing, the DCT patch transform, one flow block (either token
order), the whole flow with its exact and its Jacobi inverse, and the logit pre-transform. The distilled
student is no exact inverse; a copy of the teacher starts close to it (the last test).
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from helpers import randomize, small_config
from torch import Tensor

from farmer.channels import ChannelMixing
from farmer.distill import attach_new_student
from farmer.flow import AutoregressiveFlow, FlowBlock
from farmer.model import Farmer
from farmer.pretransform import logit_forward, logit_inverse

Forward = Callable[[Tensor], tuple[Tensor, Tensor]]
Case = tuple[Forward, Callable[[Tensor], Tensor], Tensor]


def _tokens(config, batch: int = 2) -> Tensor:
    generator = torch.Generator().manual_seed(1)
    return torch.randn(batch, config.num_tokens, config.token_dim, generator=generator, dtype=torch.float64)


def channel_mixing() -> Case:
    torch.manual_seed(0)
    mixing = randomize(ChannelMixing(6), 0.3).double()
    x = torch.randn(2, 5, 6, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    return mixing, mixing.inverse, x


def dct_patches() -> Case:
    # 4×4 patches: a 2×2 DCT's entries are ±1/2, exact in any dtype, and would not show a basis built in fp32.
    model = Farmer(small_config(patch_transform="dct", patch_size=4)).double()
    x = torch.rand(2, 1, 8, 8, generator=torch.Generator().manual_seed(1), dtype=torch.float64) * 2 - 1

    def forward(images: Tensor) -> tuple[Tensor, Tensor]:
        return model.patchify(images), images.new_zeros(images.shape[0])  # orthonormal: log|det| = 0

    return forward, model.unpatchify, x


def flow_block(flip: bool, mixing: bool) -> Case:
    config = small_config(channel_mixing=mixing)
    torch.manual_seed(0)
    block = randomize(FlowBlock(config, flip=flip), 0.2).double().eval()
    cache = block.transformer.allocate_cache(2, torch.device("cpu"), torch.float64)
    return block, lambda z: block.inverse(z, cache), _tokens(config)


def flow(inverse: str, mixing: bool) -> Case:
    config = small_config(flow_blocks=3, channel_mixing=mixing)
    torch.manual_seed(0)
    # std 0.1: larger weights make the sequential inverse chaotic (errors grow token by token), ~1e-9 at 0.2.
    model = randomize(AutoregressiveFlow(config), 0.1).double().eval()
    if inverse == "exact":
        return model, model.inverse, _tokens(config)
    return model, lambda z: model.jacobi_inverse(z, tol=1e-13, rtol=0)[0], _tokens(config)


def logit(alpha: float) -> Case:
    x = torch.rand(2, 1, 4, 4, generator=torch.Generator().manual_seed(1), dtype=torch.float64) * 2 - 1
    x[0, 0, 0, :2] = torch.tensor([-1.0, 1.0], dtype=torch.float64)  # the edges, where it matters

    def forward(images: Tensor) -> tuple[Tensor, Tensor]:
        y, logdet = logit_forward(images, alpha)
        return y, logdet.flatten(1).sum(1)

    return forward, lambda y: logit_inverse(y, alpha), x


CASES: dict[str, Callable[[], Case]] = {
    "channel-mixing": channel_mixing,
    "dct-patches": dct_patches,
    "flow-block": lambda: flow_block(flip=False, mixing=False),
    "flow-block-flipped-mixing": lambda: flow_block(flip=True, mixing=True),
    "flow-exact": lambda: flow("exact", mixing=False),
    "flow-exact-mixing": lambda: flow("exact", mixing=True),
    "flow-jacobi": lambda: flow("jacobi", mixing=False),
    "flow-jacobi-mixing": lambda: flow("jacobi", mixing=True),
    "logit-1e-6": lambda: logit(1e-6),
    "logit-0.05": lambda: logit(0.05),
}


@pytest.mark.parametrize("name", CASES)
def test_round_trip_and_logdet_against_autograd(name: str) -> None:
    forward, inverse, x = CASES[name]()
    with torch.no_grad():
        y, logdet = forward(x)
        back = inverse(y)
    assert y.dtype == back.dtype == logdet.dtype == torch.float64, "fp64 all the way, or the check is not exact"
    assert (y.flatten(1) - x.flatten(1)).abs().max() > 1e-2, "random weights: the map must not be the identity"
    torch.testing.assert_close(back, x, atol=1e-10, rtol=0)
    for b in range(x.shape[0]):
        jac = torch.autograd.functional.jacobian(lambda v: forward(v.view(1, *x.shape[1:]))[0].flatten(),
                                                 x[b].flatten())
        sign, expected = torch.linalg.slogdet(jac)
        assert sign != 0
        torch.testing.assert_close(logdet[b], expected, atol=1e-9, rtol=0)
    if name != "dct-patches":  # the one volume-preserving piece; elsewhere 0 would not test the log-det
        assert logdet.abs().min() > 0.1


def test_a_new_student_starts_close_to_its_teachers_inverse() -> None:
    """Algorithm 2 starts the student as a copy of the teacher (docs/method.md §7): bidirectional attention
    instead of causal, so not the inverse, but far closer to it than the identity is."""
    config = small_config(flow_blocks=3)
    torch.manual_seed(0)
    model = Farmer(config)
    randomize(model.flow, 0.05).eval()
    model = attach_new_student(model).double()
    z = _tokens(config, batch=8)
    with torch.no_grad():
        exact = model.flow.inverse(z)
        student = model.student(z)
    miss, moved = (student - exact).norm(), (z - exact).norm()
    assert moved > 0.5, "the teacher must move its tokens for the comparison to mean anything"
    assert miss < 0.5 * moved, (miss, moved)


def test_an_fp64_model_computes_its_likelihood_in_fp64() -> None:
    """The DCT basis and the mixture heads follow the model's dtype (never below fp32), so fp64 checks are exact."""
    model = Farmer(small_config(patch_transform="dct", patch_size=4)).double()
    x = torch.rand(2, 1, 8, 8, generator=torch.Generator().manual_seed(1), dtype=torch.float64) * 2 - 1
    informative, _, _ = model.encode(x)
    mixture, _ = model.prior(informative, torch.tensor([1, 2]))
    assert model.patch_basis.dtype == mixture.means.dtype == model.log_prob(x).dtype == torch.float64
