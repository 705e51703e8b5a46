"""The composed model: shapes through the data flow, the ELBO's terms, and the importance-
sampled log p(x) on a linear-Gaussian VAE whose log p(x) is known in closed form."""

import math

import pytest
import torch
from torch.distributions import MultivariateNormal

from vaelab.likelihoods import Bernoulli, Gaussian
from vaelab.networks import MLPDecoder, MLPEncoder
from vaelab.objectives import ELBO
from vaelab.posteriors import DiagonalGaussian
from vaelab.priors import StandardNormal
from vaelab.vae import VAE, largest_pass

SHAPE = (1, 2, 2)
D = 4
Z = 2


def linear_gaussian_vae(sigma: float = 0.5) -> VAE:
    """p(z) = N(0, I), p(x|z) = N(Wz + b, σ²I): then p(x) = N(b, WWᵀ + σ²I) exactly."""
    torch.manual_seed(1)
    lik = Gaussian(sigma=sigma)
    post = DiagonalGaussian()
    enc = MLPEncoder(SHAPE, post.num_params(Z), hidden=[16])
    dec = MLPDecoder(Z, SHAPE, lik.num_params(SHAPE), hidden=[])  # one Linear: Wz + b
    return VAE(enc, post, dec, lik, StandardNormal(Z))


def exact_log_px(vae: VAE, x: torch.Tensor) -> torch.Tensor:
    lin = vae.decoder.net[0]
    W, b = lin.weight.double(), lin.bias.double()
    cov = W @ W.T + vae.likelihood.fixed_sigma**2 * torch.eye(D, dtype=torch.float64)
    return MultivariateNormal(b, cov).log_prob(x.flatten(1).double()).float()


def exact_posterior(vae: VAE, x: torch.Tensor) -> MultivariateNormal:
    """p(z|x) = N(S Wᵀ(x − b)/σ², S), S = (I + WᵀW/σ²)⁻¹: the target q(z|x) approximates."""
    lin = vae.decoder.net[0]
    W, b = lin.weight.double(), lin.bias.double()
    s2 = vae.likelihood.fixed_sigma**2
    S = torch.linalg.inv(torch.eye(Z, dtype=torch.float64) + W.T @ W / s2)
    m = (x.flatten(1).double() - b) @ W @ S / s2
    return MultivariateNormal(m, S.expand(len(x), Z, Z))


def test_objective_terms_and_shapes():
    vae = linear_gaussian_vae()
    x = torch.randn(5, *SHAPE)
    out = ELBO(num_samples=3, beta=2.0)(vae, x)
    for term in ("elbo", "recon", "kl"):
        assert out.terms[term].shape == (5,)
    torch.testing.assert_close(out.terms["elbo"], out.terms["recon"] - out.terms["kl"])
    torch.testing.assert_close(out.loss, -(out.terms["recon"] - 2.0 * out.terms["kl"]).mean())
    assert out.analytic_kl and out.scalars["beta"] == 2.0


@pytest.mark.parametrize("pass_size", [None, 1500], ids=["one-pass", "passes-of-2-examples"])
def test_importance_sampled_log_likelihood_recovers_exact_log_px(pass_size):
    vae = linear_gaussian_vae()
    # fit q a little so the estimate is not driven by a hopeless proposal
    opt = torch.optim.Adam(vae.encoder.parameters(), lr=1e-2)
    data = torch.randn(256, *SHAPE)
    for _ in range(300):
        opt.zero_grad()
        ELBO()(vae, data).loss.backward()
        opt.step()
    x = torch.randn(16, *SHAPE)
    exact = exact_log_px(vae, x)
    torch.manual_seed(0)
    # chunks of unequal size; with pass_size the 16 examples go through two at a time
    est = vae.log_likelihood(x, num_samples=5000, chunk_size=700, pass_size=pass_size)
    elbo = ELBO(num_samples=20_000)(vae, x).terms["elbo"].detach()
    assert torch.all(elbo <= est + 1e-4)
    assert torch.all(est <= exact + 0.02)
    torch.testing.assert_close(est, exact, atol=0.03, rtol=0)
    # test/gap = log p̂(x) − ELBO(x) is KL(q(z|x) ‖ p(z|x)) ≥ 0, known here in closed form
    q = vae.encode(x)
    q_mvn = MultivariateNormal(q.mean.double(), torch.diag_embed(q.variance.double()))
    exact_gap = torch.distributions.kl_divergence(q_mvn, exact_posterior(vae, x)).float()
    torch.testing.assert_close(exact - elbo, exact_gap, atol=0.03, rtol=0)  # the ELBO's own identity
    gap = est - elbo
    assert torch.all(gap >= -0.03) and exact_gap.mean() > 0.05  # a real gap, and the estimate sees it
    torch.testing.assert_close(gap, exact_gap, atol=0.04, rtol=0)
    # the bound tightens with K (averaged over examples and repeats)
    gaps = [
        (exact - torch.stack([vae.log_likelihood(x, k, 100) for _ in range(20)]).mean(0)).mean().item()
        for k in (1, 10, 100)
    ]
    assert gaps[0] > gaps[1] > gaps[2] > -0.01


def test_iwae_with_one_sample_is_the_elbo_in_expectation():
    vae = linear_gaussian_vae()
    x = torch.randn(8, *SHAPE)
    draws = torch.stack([vae.log_likelihood(x, 1, 1) for _ in range(4000)])
    iwae1, stderr = draws.mean(0), draws.std(0) / math.sqrt(len(draws))
    elbo = ELBO(num_samples=20_000)(vae, x).terms["elbo"].detach()  # analytic KL, many samples
    assert torch.all((iwae1 - elbo).abs() < 4 * stderr + 0.01), (iwae1, elbo, stderr)


def test_memory_does_not_grow_with_k_when_chunked():
    vae = linear_gaussian_vae()
    x = torch.randn(3, *SHAPE)
    seen = []
    real = vae._log_weights

    def spy(q, x, k):
        seen.append(k)
        return real(q, x, k)

    vae._log_weights = spy
    vae.log_likelihood(x, num_samples=1050, chunk_size=200)
    assert max(seen) == 200 and sum(seen) == 1050


@pytest.mark.parametrize("batch, k, chunk, pass_size, passes", [
    (16, 10, 100, 64, [60, 60, 40]),  # 6 examples x 10 samples a pass
    (3, 1050, 200, 50, [50] * 21 * 3),  # a chunk larger than the pass: one example, 50 samples at a time
    (4, 10, 100, 1000, [40]),  # the whole batch fits: one pass, as without a bound
])
def test_memory_does_not_grow_with_the_batch_when_passes_are_bounded(batch, k, chunk, pass_size, passes):
    """pass_size bounds the samples of one forward pass over all the examples together (the
    conv model's validation batch of 500 x 10 samples made decoder activations of up to 625 MiB)."""
    vae = linear_gaussian_vae()
    x = torch.randn(batch, *SHAPE)
    seen = []
    real = vae._log_weights

    def spy(q, x, k):
        seen.append(x.shape[:-3].numel() * k)  # (one example [C, H, W]: k)
        return real(q, x, k)

    vae._log_weights = spy
    calls = []  # ``between``: before each pass, where a run told to stop stops
    assert vae.log_likelihood(x, num_samples=k, chunk_size=chunk, pass_size=pass_size,
                              between=lambda: calls.append(len(seen))).shape == (batch,)
    assert seen == passes and sum(seen) == batch * k and calls == list(range(len(passes)))

    class Stop(Exception):
        pass

    def stop_at_the_second_pass():
        if seen:
            raise Stop

    seen.clear()
    if len(passes) > 1:
        with pytest.raises(Stop):
            vae.log_likelihood(x, num_samples=k, chunk_size=chunk, pass_size=pass_size, between=stop_at_the_second_pass)
        assert len(seen) == 1
    seen.clear()
    # what VAEModule reports (and halves) when a pass runs out of memory: the largest pass made
    assert largest_pass(x.shape, k, chunk, pass_size) == max(passes)
    seen.clear()
    vae.log_likelihood(x[0], num_samples=k, chunk_size=chunk, pass_size=pass_size)  # one example: bounded too
    assert max(seen) == largest_pass(x[0].shape, k, chunk, pass_size) == min(k, chunk, pass_size)
    with pytest.raises(ValueError, match="pass_size >= 1"):
        vae.log_likelihood(x, num_samples=k, chunk_size=chunk, pass_size=0)


def test_sample_and_reconstruct_give_data_shaped_distributions():
    lik = Bernoulli()
    post = DiagonalGaussian()
    vae = VAE(MLPEncoder(SHAPE, post.num_params(Z)), post, MLPDecoder(Z, SHAPE, 1), lik, StandardNormal(Z))
    assert vae.sample(6).mean.shape == (6, *SHAPE)
    assert vae.reconstruct(torch.rand(4, *SHAPE)).mean.shape == (4, *SHAPE)


def test_bad_k_is_refused():
    with pytest.raises(ValueError, match="num_samples"):
        linear_gaussian_vae().log_likelihood(torch.zeros(1, *SHAPE), num_samples=0)
    with pytest.raises(ValueError, match="num_samples"):
        ELBO(num_samples=0)
    with pytest.raises(ValueError, match="beta"):
        ELBO(beta=-1)
    assert math.isfinite(ELBO(beta=0.0).beta)
