"""Each likelihood's log_prob against its closed form or an independent reference (scipy)."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy import integrate, stats

from vaelab.likelihoods import Bernoulli, ContinuousBernoulli, Gaussian

SHAPE = (2, 3, 4)  # C, H, W
D = math.prod(SHAPE)


def test_gaussian_sigma_one_is_mse_with_its_constant():
    lik = Gaussian(sigma=1.0)
    mu = torch.randn(5, *SHAPE)
    x = torch.randn(5, *SHAPE)
    px = lik(mu)
    assert px.event_shape == SHAPE and px.batch_shape == (5,)
    expected = -0.5 * ((x - mu) ** 2).flatten(1).sum(1) - D / 2 * math.log(2 * math.pi)
    torch.testing.assert_close(px.log_prob(x), expected)


@pytest.mark.parametrize("sigma", [0.05, 0.3, 2.0])
def test_gaussian_fixed_sigma_matches_scipy(sigma):
    mu = torch.rand(4, *SHAPE)
    x = torch.rand(4, *SHAPE)
    got = Gaussian(sigma=sigma)(mu).log_prob(x)
    ref = stats.norm(mu.double().numpy(), sigma).logpdf(x.double().numpy()).reshape(4, -1).sum(1)
    np.testing.assert_allclose(got.numpy(), ref, rtol=1e-5)


def test_gaussian_learned_sigma_is_one_trained_parameter():
    lik = Gaussian(sigma="learned", init_sigma=0.3, min_sigma=1e-3)
    assert lik.num_params(SHAPE) == 1
    torch.testing.assert_close(lik.sigma, torch.tensor(0.3))
    mu, x = torch.rand(3, *SHAPE), torch.rand(3, *SHAPE)
    ref = stats.norm(mu.double().numpy(), 0.3).logpdf(x.double().numpy()).reshape(3, -1).sum(1)
    np.testing.assert_allclose(lik(mu).log_prob(x).detach().numpy(), ref, rtol=1e-5)
    # the σ-VAE optimum: maximizing over σ gives σ² = mean squared error
    opt = torch.optim.Adam(lik.parameters(), lr=0.05)
    for _ in range(600):
        opt.zero_grad()
        (-lik(mu).log_prob(x).sum()).backward()
        opt.step()
    mse = ((x - mu) ** 2).mean()
    torch.testing.assert_close(lik.sigma**2, mse, rtol=2e-2, atol=0)


def test_gaussian_per_pixel_sigma_comes_from_the_decoder():
    lik = Gaussian(sigma="per_pixel", min_sigma=1e-3)
    assert lik.num_params(SHAPE) == 2
    mu, raw = torch.randn(3, *SHAPE), torch.randn(3, *SHAPE)
    x = torch.randn(3, *SHAPE)
    sigma = 1e-3 + F.softplus(raw)
    ref = stats.norm(mu.double().numpy(), sigma.double().numpy()).logpdf(x.double().numpy()).reshape(3, -1).sum(1)
    got = lik(torch.cat([mu, raw], dim=1)).log_prob(x)
    np.testing.assert_allclose(got.numpy(), ref, rtol=1e-5)


@pytest.mark.parametrize("bad", [0.0, -1.0, "wide"])
def test_gaussian_refuses_bad_sigma(bad):
    with pytest.raises(ValueError, match="sigma"):
        Gaussian(sigma=bad)


def test_bernoulli_is_minus_summed_bce():
    logits = torch.randn(6, *SHAPE) * 3
    x = torch.bernoulli(torch.full((6, *SHAPE), 0.4))
    px = Bernoulli()(logits)
    assert px.event_shape == SHAPE
    bce = F.binary_cross_entropy_with_logits(logits, x, reduction="none").flatten(1).sum(1)
    torch.testing.assert_close(px.log_prob(x), -bce)
    assert Bernoulli.discrete and Bernoulli.requires_binary


def test_cpu_bce_matches_float64_and_torchs_gradients():
    """vaelab's CPU BCE-with-logits (log where torch uses log1p) against the float64 value, to
    float32 precision, from tiny to saturated logits; its gradients are torch's."""
    from vaelab.likelihoods import binary_cross_entropy_with_logits

    logits = torch.cat([torch.randn(64, 200) * 4, torch.tensor([-100.0, -30.0, -1e-4, 0.0, 1e-4, 30.0, 100.0]).expand(64, 7)], 1)
    x = torch.bernoulli(torch.full_like(logits, 0.3))
    ours = binary_cross_entropy_with_logits(logits, x)
    exact = F.binary_cross_entropy_with_logits(logits.double(), x.double(), reduction="none")
    torch.testing.assert_close(ours.double(), exact, rtol=2e-7, atol=1e-7)
    a, b = logits.clone().requires_grad_(), logits.clone().requires_grad_()
    t1, t2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    w = torch.rand_like(logits)  # a non-uniform upstream gradient
    (binary_cross_entropy_with_logits(a, t1) * w).sum().backward()
    (F.binary_cross_entropy_with_logits(b, t2, reduction="none") * w).sum().backward()
    torch.testing.assert_close(a.grad, b.grad, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(t1.grad, t2.grad, rtol=1e-6, atol=1e-7)


def test_bce_off_the_cpu_is_torchs_fused_kernel(monkeypatch):
    from vaelab import likelihoods

    calls = []
    monkeypatch.setattr(likelihoods.F, "binary_cross_entropy_with_logits",
                        lambda logits, target, reduction: calls.append(reduction) or logits)
    likelihoods.binary_cross_entropy_with_logits(torch.zeros(2, 3, device="meta"), torch.zeros(2, 3, device="meta"))
    assert calls == ["none"]


def test_continuous_bernoulli_has_its_normalizing_constant():
    logits = torch.randn(4, *SHAPE) * 2
    x = torch.rand(4, *SHAPE)
    lam = torch.sigmoid(logits.double())
    # C(λ) = 2 artanh(1 − 2λ) / (1 − 2λ)  (Loaiza-Ganem & Cunningham 2019, eq. 7)
    log_c = torch.log(2 * torch.atanh(1 - 2 * lam) / (1 - 2 * lam))
    x = x.double()
    expected = (log_c + x * torch.log(lam) + (1 - x) * torch.log1p(-lam)).flatten(1).sum(1)
    got = ContinuousBernoulli()(logits).log_prob(x.float())
    torch.testing.assert_close(got, expected.float(), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("logit", [-3.0, -0.4, 0.7, 2.5])
def test_continuous_bernoulli_integrates_to_one(logit):
    lik = ContinuousBernoulli()
    dist = lik(torch.full((1, 1, 1), logit))
    total, _ = integrate.quad(lambda v: dist.log_prob(torch.tensor([[[v]]])).exp().item(), 0, 1)
    assert total == pytest.approx(1.0, abs=1e-4)


# torch clamps λ to [ε, 1 − ε] (|logit| ≤ 15.9 in float32): its log C stuck at 2.769 beyond
@pytest.mark.parametrize("logit", [-200.0, -100.0, -30.0, -17.0, 17.0, 30.0, 100.0])
def test_continuous_bernoulli_is_exact_at_large_logits(logit):
    lik = ContinuousBernoulli()
    x = torch.tensor([0.0, 0.001, 0.3, 0.999, 1.0])
    got = lik(torch.full((5, 1, 1, 1), logit)).log_prob(x.view(5, 1, 1, 1))
    # an independent float64 reference: the unnormalized density's integral by quadrature, in
    # the log domain (u(v) = exp(l·v − max(l, 0)) never overflows)
    shift = max(logit, 0.0)
    norm, _ = integrate.quad(lambda v: math.exp(logit * v - shift), 0, 1, points=[0.5], epsabs=0, epsrel=1e-12)
    expected = logit * x.double() - shift - math.log(norm)
    torch.testing.assert_close(got.double(), expected, rtol=1e-6, atol=2e-5)


def test_continuous_bernoulli_keeps_its_gradient_at_large_logits():
    # d log C / dl = 1/l − 1/sinh(l): −0.05 at l = −20, where the clamped constant gave 0
    logits = torch.tensor([-20.0, -100.0, 20.0], requires_grad=True)
    lik = ContinuousBernoulli()
    lik(logits.view(3, 1, 1, 1)).base_dist._cont_bern_log_norm().sum().backward()
    l64 = logits.detach().double()
    torch.testing.assert_close(logits.grad.double(), 1 / l64 - 1 / torch.sinh(l64), rtol=1e-5, atol=1e-9)


def test_continuous_bernoulli_moments_cdf_and_samples_from_the_logits():
    logits = torch.tensor([-300.0, -60.0, -8.0, -0.3, -1e-3, 0.0, 1e-8, 0.2, 1.0, 5.0, 60.0, 300.0])
    dist = ContinuousBernoulli()(logits.view(-1, 1, 1, 1)).base_dist

    def moment(logit: float, k: int) -> float:  # E[x^k] by quadrature of exp(l·v), in float64
        shift, hint = max(logit, 0.0), [min(0.5, 10 / abs(logit)), max(0.5, 1 - 10 / abs(logit))] if logit else None
        norm = integrate.quad(lambda v: math.exp(logit * v - shift), 0, 1, points=hint, epsabs=0, epsrel=1e-12)[0]
        return integrate.quad(lambda v: v**k * math.exp(logit * v - shift), 0, 1, points=hint, epsabs=0,
                              epsrel=1e-12)[0] / norm

    mean = torch.tensor([moment(v, 1) for v in logits.tolist()], dtype=torch.float64)
    var = torch.tensor([moment(v, 2) for v in logits.tolist()], dtype=torch.float64) - mean**2
    # the series near 0 and the closed forms elsewhere, against quadrature
    torch.testing.assert_close(dist.mean.flatten().double(), mean, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(dist.variance.flatten().double(), var, rtol=1e-4, atol=1e-8)
    # F(F⁻¹(u)) = u, and F agrees with the density's integral
    u = torch.full_like(dist.logits, 0.3)
    torch.testing.assert_close(dist.cdf(dist.icdf(u)), u, rtol=0, atol=1e-5)
    for i in (2, 3, 7, 9):
        x = 0.4
        total, _ = integrate.quad(lambda v, i=i: dist.log_prob(torch.full_like(dist.logits, v))[i].exp().item(), 0, x)
        assert dist.cdf(torch.full_like(dist.logits, x)).flatten()[i].item() == pytest.approx(total, abs=1e-5)
    # samples: their mean is the mean, and they stay in [0, 1]
    torch.manual_seed(0)
    draws = dist.expand(torch.Size([20_000, len(logits), 1, 1, 1])).sample()
    assert draws.min() >= 0 and draws.max() <= 1
    stderr = (var.sqrt() / math.sqrt(20_000)).float()
    assert ((draws.mean(0).flatten() - mean.float()).abs() <= 5 * stderr + 1e-6).all()
    # the entropy: −E[log p(x)] by Monte Carlo
    mc = -dist.expand(torch.Size([20_000, len(logits), 1, 1, 1])).log_prob(draws).mean(0).flatten()
    torch.testing.assert_close(dist.entropy().flatten(), mc, rtol=0, atol=0.03)


def test_continuous_bernoulli_fits_a_black_background():
    # dequantized black pixels, x ~ U[0, 1/256): the maximum-likelihood logit is about −512
    # (where the mean, ≈ 1/|l|, is the data's mean, 1/512). With torch's clamped constant the
    # gradient vanished at −15.9 and the fit stopped there, ~2.4 nats a pixel short
    torch.manual_seed(0)
    x = torch.rand(4096, 1, 1, 1) / 256
    logit = torch.zeros(1, 1, 1, 1, requires_grad=True)
    opt = torch.optim.Adam([logit], lr=1.0)
    lik = ContinuousBernoulli()
    for _ in range(1500):
        opt.zero_grad()
        loss = -lik(logit.expand(4096, 1, 1, 1)).log_prob(x).mean()
        loss.backward()
        opt.step()
    assert logit.item() < -200
    assert -loss.item() > 4.5  # nats a pixel; 2.75 where the fit stopped at −15.9


def test_leading_sample_dimensions_broadcast_against_the_data():
    lik = Gaussian(sigma=0.5)
    params = torch.randn(7, 3, *SHAPE)  # [S, B, ...]
    x = torch.randn(3, *SHAPE)
    lp = lik(params).log_prob(x)
    assert lp.shape == (7, 3)
    torch.testing.assert_close(lp[4], lik(params[4]).log_prob(x))


def test_densities_stay_float32_under_autocast():
    lik = Bernoulli()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        dist = lik(torch.randn(2, *SHAPE, dtype=torch.bfloat16))
        lp = dist.log_prob(torch.ones(2, *SHAPE))
    assert lp.dtype == torch.float32


def test_decoder_width_mismatch_is_a_clear_error():
    with pytest.raises(ValueError, match="parameters per value"):
        Gaussian(sigma="per_pixel")(torch.randn(2, 3, 4, 4))
