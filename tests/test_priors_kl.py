"""Priors, posteriors, and the KL: analytic where torch has the pair, Monte Carlo otherwise."""

import math

import pytest
import torch
from torch.distributions import Categorical, Independent, MixtureSameFamily, Normal

from vaelab.posteriors import DiagonalGaussian
from vaelab.priors import StandardNormal
from vaelab.vae import kl_or_monte_carlo


def test_standard_prior_is_unit_gaussian_with_latent_event():
    p = StandardNormal(latent_dim=5)()
    assert p.event_shape == (5,) and p.batch_shape == ()
    z = torch.randn(10, 5)
    expected = -0.5 * (z**2).sum(1) - 2.5 * math.log(2 * math.pi)
    torch.testing.assert_close(p.log_prob(z), expected)


def test_diagonal_posterior_samples_match_its_moments():
    post = DiagonalGaussian()
    params = torch.tensor([[1.0, -2.0, 0.5, 0.0, -1.0, 2.0]])  # loc (3), raw scale (3)
    q = post(params)
    assert q.event_shape == (3,) and q.batch_shape == (1,)
    z = q.rsample((200_000,))
    torch.testing.assert_close(z.mean(0), q.mean, atol=0.01, rtol=0)
    torch.testing.assert_close(z.std(0), q.stddev, atol=0.01, rtol=0)
    expected_scale = torch.nn.functional.softplus(params[:, 3:]) + post.min_scale
    torch.testing.assert_close(q.stddev, expected_scale)


def test_reparameterized_samples_carry_gradients():
    params = torch.randn(4, 6, requires_grad=True)
    DiagonalGaussian()(params).rsample().sum().backward()
    assert params.grad is not None and params.grad.abs().sum() > 0


def test_analytic_kl_matches_monte_carlo_and_closed_form():
    q = DiagonalGaussian()(torch.randn(8, 2 * 4))
    p = StandardNormal(4)()
    kl, analytic = kl_or_monte_carlo(q, p)
    assert analytic and kl.shape == (8,)
    # closed form: ½ Σ (σ² + μ² − 1 − log σ²)
    mu, s = q.mean, q.stddev
    torch.testing.assert_close(kl, 0.5 * (s**2 + mu**2 - 1 - torch.log(s**2)).sum(1))
    z = q.sample((200_000,))
    mc = (q.log_prob(z) - p.log_prob(z)).mean(0)
    torch.testing.assert_close(kl, mc, atol=0.02, rtol=0.01)


def test_kl_without_closed_form_falls_back_to_monte_carlo():
    q = DiagonalGaussian()(torch.randn(3, 4))
    mix = MixtureSameFamily(Categorical(logits=torch.zeros(2)),
                            Independent(Normal(torch.tensor([[-1.0, 0.0], [1.0, 0.5]]), torch.ones(2, 2)), 1))
    z = q.rsample((100_000,))
    kl, analytic = kl_or_monte_carlo(q, mix, z)
    assert not analytic and kl.shape == (3,)
    expected = (q.log_prob(z) - mix.log_prob(z)).mean(0)
    torch.testing.assert_close(kl, expected)
    # a Monte Carlo KL is still close to the truth computed with fresh samples
    fresh = q.sample((100_000,))
    torch.testing.assert_close(kl, (q.log_prob(fresh) - mix.log_prob(fresh)).mean(0), atol=0.03, rtol=0)


def test_standard_normal_shortcuts_agree_with_torchs_general_normal():
    """The prior's own log-density and KL (no arithmetic with its zeros and ones) against
    torch's Independent(Normal(0, 1)) rules: the same values and gradients, batched."""
    from torch.distributions import kl_divergence

    ours = StandardNormal(6)()
    general = Independent(Normal(torch.zeros(6), torch.ones(6)), 1)
    z = torch.randn(3, 4, 6, dtype=torch.float64).float()
    torch.testing.assert_close(ours.log_prob(z), general.log_prob(z))
    with pytest.raises(ValueError, match="6 dimensions"):
        ours.log_prob(torch.zeros(4, 5))
    params = torch.randn(4, 12, requires_grad=True)
    q = DiagonalGaussian()(params)
    kl = kl_divergence(q, ours)
    (grad,) = torch.autograd.grad(kl.sum(), params, retain_graph=True)
    kl_general = kl_divergence(q, general)
    (grad_general,) = torch.autograd.grad(kl_general.sum(), params)
    torch.testing.assert_close(kl, kl_general)
    torch.testing.assert_close(grad, grad_general)
    # any other Independent q goes to torch's rule for the pair of base distributions:
    # KL(Laplace(0, 1) ‖ N(0, 1)) = E[log q − log p] = −log 2 − 1 + ½ log 2π + ½ E[z²], E z² = 2
    laplace = Independent(torch.distributions.Laplace(torch.zeros(3, 6), torch.ones(3, 6)), 1)
    kl_laplace, analytic = kl_or_monte_carlo(laplace, ours)
    exact = 6 * (-math.log(2) - 1 + 0.5 * math.log(2 * math.pi) + 1)
    assert analytic
    torch.testing.assert_close(kl_laplace, torch.full((3,), exact))
    # and a pair torch has no rule for is still a Monte Carlo estimate
    student = Independent(torch.distributions.StudentT(5.0, torch.zeros(6), torch.ones(6)), 1)
    z = student.sample((10,))
    _, analytic = kl_or_monte_carlo(student, ours, z)
    assert not analytic


def test_the_standard_prior_is_made_once_and_again_after_a_move():
    prior = StandardNormal(3)
    p = prior()
    assert prior() is p  # the same buffers: the same distribution
    prior.double()  # new buffers (as .to(device) makes): a new distribution on them
    q = prior()
    assert q is not p and q.base_dist.loc.dtype == torch.float64  # 64-true: densities in float64
    assert prior() is q
    prior.half()
    assert prior().base_dist.loc.dtype == torch.float32  # half precision: densities in float32
