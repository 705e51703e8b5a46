"""Laplace, categorical and discretized mixture of logistics: log_prob against independent
references (scipy, brute force in float64), normalization, sampling, shapes, autocast."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy import stats

from vaelab.likelihoods import Laplace

SHAPE = (2, 3, 4)  # C, H, W
D = math.prod(SHAPE)


# --- Laplace -----------------------------------------------------------------------------------
@pytest.mark.parametrize("scale", [0.05, 0.3, 2.0])
def test_laplace_fixed_scale_matches_scipy(scale):
    lik = Laplace(scale=scale)
    assert lik.num_params(SHAPE) == 1 and lik.scale.item() == pytest.approx(scale)
    mu, x = torch.rand(4, *SHAPE), torch.rand(4, *SHAPE)
    got = lik(mu).log_prob(x)
    ref = stats.laplace(mu.double().numpy(), scale).logpdf(x.double().numpy()).reshape(4, -1).sum(1)
    np.testing.assert_allclose(got.numpy(), ref, rtol=1e-5)


def test_laplace_learned_scale_is_one_trained_parameter_with_the_mle_optimum():
    lik = Laplace(scale="learned", init_scale=0.3, min_scale=1e-3)
    assert lik.num_params(SHAPE) == 1 and [n for n, _ in lik.named_parameters()] == ["raw_scale"]
    torch.testing.assert_close(lik.scale, torch.tensor(0.3))
    mu, x = torch.rand(3, *SHAPE), torch.rand(3, *SHAPE)
    ref = stats.laplace(mu.double().numpy(), 0.3).logpdf(x.double().numpy()).reshape(3, -1).sum(1)
    np.testing.assert_allclose(lik(mu).log_prob(x).detach().numpy(), ref, rtol=1e-5)
    opt = torch.optim.Adam(lik.parameters(), lr=0.05)
    for _ in range(400):
        opt.zero_grad()
        (-lik(mu).log_prob(x).sum()).backward()
        opt.step()
    # maximum likelihood: b = mean absolute error
    torch.testing.assert_close(lik.scale, (x - mu).abs().mean(), rtol=2e-2, atol=0)


def test_laplace_per_pixel_scale_comes_from_the_decoder():
    lik = Laplace(scale="per_pixel", min_scale=1e-3)
    assert lik.num_params(SHAPE) == 2 and lik.scale is None
    mu, raw, x = torch.randn(3, *SHAPE), torch.randn(3, *SHAPE), torch.randn(3, *SHAPE)
    b = 1e-3 + F.softplus(raw.double())
    ref = stats.laplace(mu.double().numpy(), b.numpy()).logpdf(x.double().numpy()).reshape(3, -1).sum(1)
    got = lik(torch.cat([mu, raw], dim=1)).log_prob(x)
    np.testing.assert_allclose(got.numpy(), ref, rtol=1e-5)


@pytest.mark.parametrize("bad", [0.0, -1.0, "wide"])
def test_laplace_refuses_bad_scale(bad):
    with pytest.raises(ValueError, match="likelihood.scale"):
        Laplace(scale=bad)
