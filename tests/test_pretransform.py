"""The logit pre-transform (farmer.pretransform, docs/method.md §13): a bijection with an exact log-det."""

import math

import pytest
import torch
from helpers import random_images, random_model, small_config

from farmer.pretransform import logit_forward, logit_inverse, reflect_into_range


@pytest.mark.parametrize("alpha", [1e-6, 0.05])
def test_round_trip_and_logdet_against_autograd(alpha: float) -> None:
    x = (torch.rand(64, dtype=torch.float64) * 2 - 1)
    x[:4] = torch.tensor([-1.0, 1.0, -1 + 1e-9, 1 - 1e-9], dtype=torch.float64)  # the edges, where it matters
    y, logdet = logit_forward(x, alpha)
    torch.testing.assert_close(logit_inverse(y, alpha), x, rtol=0, atol=1e-12)
    # Elementwise: the Jacobian is diagonal, its entries dy_i/dx_i.
    slope = torch.autograd.functional.jacobian(lambda v: logit_forward(v, alpha)[0], x).diagonal()
    torch.testing.assert_close(logdet, slope.log(), rtol=0, atol=1e-9)
    assert torch.isfinite(y).all()
    torch.testing.assert_close(y[1], torch.tensor(math.log((1 - alpha) / alpha), dtype=torch.float64))  # x = 1


def test_edges_keep_their_precision_in_fp32() -> None:
    # 1 − s is computed from x, not from s: an fp32 value just below 1 keeps its distance to the edge.
    alpha = 1e-6
    x = torch.tensor([1 - 2**-20, -1 + 2**-20])
    y, _ = logit_forward(x, alpha)
    expected, _ = logit_forward(x.double(), alpha)
    torch.testing.assert_close(y.double(), expected, rtol=1e-6, atol=0)


def test_values_outside_the_range_are_reflected_inside() -> None:
    x = torch.tensor([-1.3, -1.0, 0.2, 1.0, 1.25])
    torch.testing.assert_close(reflect_into_range(x), torch.tensor([-0.7, -1.0, 0.2, 1.0, 0.75]))
    y, logdet = logit_forward(x, 0.05)
    assert torch.isfinite(y).all() and torch.isfinite(logdet).all()


def test_alpha_is_checked() -> None:
    for alpha in (0.0, 0.5, -0.1):
        with pytest.raises(ValueError, match=r"0 < alpha < 0\.5"):
            logit_forward(torch.zeros(1), alpha)


def test_model_likelihood_is_the_change_of_variables() -> None:
    # log p(x) of a logit model = log p_tokens(logit(x)) + Σ log|dy/dx|: the same weights without the transform,
    # scored on the transformed images (which a non-logit model takes as they are), differ by exactly the log-det.
    config = small_config(logit_alpha=0.05)
    model = random_model(config).double()
    plain = random_model(config.replace(logit_alpha=0.0)).double()
    plain.load_state_dict(model.state_dict())
    x = random_images(config, 3).double()
    y = torch.tensor([0, 1, 2])
    transformed, logdet = logit_forward(x, 0.05)
    inner = plain.prior.log_prob(*plain.encode(transformed)[:2], y) + plain.encode(transformed)[2]
    torch.testing.assert_close(model.log_prob(x, y), inner + logdet.sum(dim=(1, 2, 3)), rtol=0, atol=1e-9)
    assert logdet.sum().abs() > 1, "a trivial log-det would not test the change of variables"


def test_pre_transform_is_in_the_log_prob_terms_per_patch() -> None:
    config = small_config(logit_alpha=0.05)
    model = random_model(config)
    x = random_images(config, 2)
    _, logdet = logit_forward(x, 0.05)
    terms = model.log_prob_terms(x, torch.tensor([0, 1]))
    _, flow_tokens = model.flow.forward_tokens(model.to_tokens(x)[0])
    per_patch = model._patches(logdet).sum(dim=2)
    torch.testing.assert_close(terms.flow_logdet, flow_tokens + per_patch, rtol=1e-6, atol=1e-4)
    assert math.isclose(per_patch.sum().item(), logdet.sum().item(), rel_tol=1e-5)
