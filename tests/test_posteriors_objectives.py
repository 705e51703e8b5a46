"""The full-covariance Gaussian and IAF posteriors, the IWAE objective, KL warm-up and free
bits: densities against independent references, KLs against Monte Carlo, the bounds'
ordering, and a short training run of each through the LightningModule."""

from __future__ import annotations

import math
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from hydra import compose, initialize_config_module
from lightning.pytorch.loggers import CSVLogger
from omegaconf import OmegaConf
from scipy.stats import multivariate_normal
from torch.distributions import Independent, Laplace, MultivariateNormal, Normal, kl_divergence
from torch.utils.data import DataLoader, TensorDataset

from vaelab.jobs import build_datamodule, resolve_data_options
from vaelab.likelihoods import Bernoulli, Gaussian
from vaelab.module import VAEModule
from vaelab.networks import MLPDecoder, MLPEncoder
from vaelab.objectives import ELBO, IWAE, per_dimension_kl
from vaelab.posteriors import IAF, DiagonalGaussian, FullGaussian, IAFDistribution
from vaelab.priors import StandardNormal
from vaelab.vae import VAE, kl_or_monte_carlo

SHAPE = (1, 2, 2)
Z = 3


def small_vae(posterior, likelihood=None, latent_dim: int = Z) -> VAE:
    torch.manual_seed(1)
    lik = likelihood or Gaussian(sigma=0.5)
    enc = MLPEncoder(SHAPE, posterior.num_params(latent_dim), hidden=[16])
    dec = MLPDecoder(latent_dim, SHAPE, lik.num_params(SHAPE), hidden=[])
    return VAE(enc, posterior, dec, lik, StandardNormal(latent_dim))


# --- full-covariance Gaussian ---------------------------------------------------------------
def test_full_gaussian_layout_and_log_prob_match_scipy():
    post = FullGaussian(min_scale=1e-3)
    assert post.num_params(4) == 4 + 4 + 6 and post.latent_dim_of(14) == 4
    with pytest.raises(ValueError, match="2Z"):
        post.latent_dim_of(13)
    params = torch.randn(5, post.num_params(Z))
    q = post(params)
    assert q.batch_shape == (5,) and q.event_shape == (Z,)
    loc, tril = post.scale_tril(params)
    assert torch.all(torch.triu(tril, diagonal=1) == 0)
    assert torch.all(torch.diagonal(tril, dim1=-2, dim2=-1) > 1e-3)
    torch.testing.assert_close(loc, params[:, :Z])
    torch.testing.assert_close(
        torch.diagonal(tril, dim1=-2, dim2=-1), torch.nn.functional.softplus(params[:, Z:2 * Z]) + 1e-3
    )
    z = torch.randn(7, 5, Z)
    got = q.log_prob(z)
    for b in range(5):
        cov = (tril[b] @ tril[b].T).double().numpy()
        want = multivariate_normal(loc[b].double().numpy(), cov).logpdf(z[:, b].double().numpy())
        torch.testing.assert_close(got[:, b].double(), torch.as_tensor(want), atol=1e-4, rtol=1e-5)


def test_full_gaussian_samples_have_covariance_l_lt():
    post = FullGaussian()
    params = torch.tensor([[0.5, -1.0, 2.0, 0.3, -0.2, 0.8, 1.5, -0.7, 0.4]])
    q = post(params)
    _, tril = post.scale_tril(params)
    z = q.rsample((400_000,))[:, 0]
    cov = torch.cov(z.T)
    torch.testing.assert_close(cov, tril[0] @ tril[0].T, atol=0.02, rtol=0.02)
    torch.testing.assert_close(z.mean(0), params[0, :Z], atol=0.01, rtol=0)
    # reparameterized: gradients reach the off-diagonal entries
    params = params.clone().requires_grad_()
    (post(params).rsample((10,)) ** 2).sum().backward()
    assert params.grad[0, 2 * Z:].abs().min() > 0


@pytest.mark.parametrize("prior_kind", ["standard", "diagonal"])
def test_registered_kl_matches_monte_carlo_and_torch_mvn_kl(prior_kind):
    q = FullGaussian()(torch.randn(6, FullGaussian().num_params(Z)))
    if prior_kind == "standard":
        p = StandardNormal(Z)()
    else:  # a learned-looking diagonal prior with its own batch shape
        p = Independent(Normal(torch.randn(6, Z), torch.rand(6, Z) + 0.5), 1)
    kl, analytic = kl_or_monte_carlo(q, p)
    assert analytic and kl.shape == (6,)
    as_mvn = MultivariateNormal(p.base_dist.loc, scale_tril=torch.diag_embed(p.base_dist.scale))
    torch.testing.assert_close(kl, kl_divergence(q, as_mvn), atol=1e-5, rtol=1e-5)
    z = q.sample((400_000,))
    mc = (q.log_prob(z) - p.log_prob(z)).mean(0)
    torch.testing.assert_close(kl, mc, atol=0.03, rtol=0.01)


def test_kl_to_a_non_normal_independent_falls_back_to_monte_carlo():
    q = FullGaussian()(torch.randn(2, FullGaussian().num_params(Z)))
    p = Independent(Laplace(torch.zeros(Z), torch.ones(Z)), 1)
    z = q.rsample((10,))
    kl, analytic = kl_or_monte_carlo(q, p, z)
    assert not analytic
    torch.testing.assert_close(kl, (q.log_prob(z) - p.log_prob(z)).mean(0))


# --- IAF -------------------------------------------------------------------------------------
def iaf_and_params(batch: int = 4, context: int = 5) -> tuple[IAF, torch.Tensor]:
    torch.manual_seed(2)
    post = IAF(Z, num_transforms=3, context_features=context, hidden_features=[16, 16])
    # non-trivial flow: move the MADE outputs away from their near-identity initialization
    with torch.no_grad():
        for prm in post.parameters():
            prm.add_(0.3 * torch.randn_like(prm))
    return post, torch.randn(batch, post.num_params(Z))


def test_iaf_log_prob_of_its_sample_is_the_change_of_variables():
    post, params = iaf_and_params(batch=1)
    q = post(params)
    assert isinstance(q, IAFDistribution) and q.event_shape == (Z,) and q.batch_shape == (1,)
    loc, raw = params[0, :Z], params[0, Z:2 * Z]
    scale = torch.nn.functional.softplus(raw) + post.min_scale
    eps = torch.randn(Z)
    q.base.rsample = lambda shape=(): (loc + scale * eps).expand(*shape, 1, Z)  # fix the noise
    z, log_q = q.rsample_and_log_prob()

    def sampling_map(e: torch.Tensor) -> torch.Tensor:  # ε ↦ z for this one example
        return q.transform.inv((loc + scale * e).unsqueeze(0))[0]

    jac = torch.autograd.functional.jacobian(sampling_map, eps)
    torch.testing.assert_close(z[0], sampling_map(eps))
    # autoregressive: triangular in the first step's order up to the reversals, never dense
    assert not torch.allclose(jac, torch.diag(torch.diagonal(jac)))
    expected = Normal(0.0, 1.0).log_prob(eps).sum() - torch.linalg.slogdet(jac).logabsdet
    torch.testing.assert_close(log_q[0], expected, atol=1e-4, rtol=1e-5)


def test_iaf_sampling_log_prob_matches_the_inverse_pass_and_is_one_pass():
    post, params = iaf_and_params(batch=4)
    q = post(params)
    calls = []
    hooks = [t.hyper.register_forward_hook(lambda *a: calls.append(1)) for t in post.flow.transforms]
    z, log_q = q.rsample_and_log_prob((6,))
    assert z.shape == (6, 4, Z) and log_q.shape == (6, 4)
    assert len(calls) == post.num_transforms  # one parallel pass per transform
    calls.clear()
    inverse = q.log_prob(z)  # zuko's log_prob: the sequential inverse
    assert len(calls) > post.num_transforms
    for h in hooks:
        h.remove()
    torch.testing.assert_close(log_q, inverse, atol=1e-4, rtol=1e-5)
    assert q.mean.shape == (4, Z)


def test_iaf_objectives_never_invert_the_flow_and_gradients_reach_the_encoder(monkeypatch):
    post, _ = iaf_and_params()
    vae = small_vae(post)

    def refuse(self, z):
        raise AssertionError("log_prob (the sequential inverse) was called")

    monkeypatch.setattr(IAFDistribution, "log_prob", refuse)
    x = torch.randn(8, *SHAPE)
    out = ELBO(num_samples=2)(vae, x)
    assert not out.analytic_kl
    torch.testing.assert_close(out.terms["elbo"], out.terms["recon"] - out.terms["kl"])
    out.loss.backward()
    last = vae.encoder.net[-1]
    assert last.weight.grad[2 * Z:].abs().sum() > 0  # the context rows h(x)
    assert last.weight.grad[:2 * Z].abs().sum() > 0  # μ, σ
    assert all(p.grad is not None for p in post.parameters())
    assert torch.isfinite(IWAE(num_samples=3)(vae, x).loss)
    assert torch.isfinite(vae.log_likelihood(x, num_samples=20, chunk_size=7)).all()


def test_iaf_latent_dim_must_match():
    with pytest.raises(ValueError, match="latent_dim"):
        IAF(3).num_params(4)


# --- IWAE ------------------------------------------------------------------------------------
def test_iwae_terms_and_loss():
    vae = small_vae(DiagonalGaussian())
    x = torch.randn(5, *SHAPE)
    out = IWAE(num_samples=4)(vae, x)
    for term in ("elbo", "iwae", "recon", "kl"):
        assert out.terms[term].shape == (5,)
    assert out.analytic_kl and out.scalars["beta"] == 1.0
    torch.testing.assert_close(out.terms["elbo"], out.terms["recon"] - out.terms["kl"])
    torch.testing.assert_close(out.loss, -out.terms["iwae"].mean())
    # with a Monte Carlo KL the logged elbo is exactly the mean of log w_k
    vae = small_vae(FullGaussian())
    vae.prior = _LaplacePrior(Z)
    torch.manual_seed(3)
    out = IWAE(num_samples=4)(vae, x)
    torch.manual_seed(3)
    log_w = vae.log_importance_weights(x, 4)
    assert not out.analytic_kl
    torch.testing.assert_close(out.terms["elbo"], log_w.mean(0))
    torch.testing.assert_close(out.terms["iwae"], torch.logsumexp(log_w, 0) - math.log(4))


class _LaplacePrior(StandardNormal):
    def forward(self):
        return Independent(Laplace(self.loc, self.scale), 1)


def test_iwae_with_one_sample_is_the_elbo_in_expectation():
    vae = small_vae(DiagonalGaussian())
    x = torch.randn(8, *SHAPE)
    n = 4000
    with torch.no_grad():
        draws = IWAE(num_samples=1)(vae, x.repeat(n, 1, 1, 1)).terms["iwae"].view(n, 8)
        elbo = ELBO(num_samples=20_000)(vae, x).terms["elbo"]  # analytic KL, many samples
    iwae1, stderr = draws.mean(0), draws.std(0) / math.sqrt(n)
    assert torch.all((iwae1 - elbo).abs() < 4 * stderr + 0.01), (iwae1, elbo, stderr)


def test_iwae_is_non_decreasing_in_k_and_its_gradients_are_finite():
    vae = small_vae(DiagonalGaussian())
    x = torch.randn(6, *SHAPE)
    reps = 400
    with torch.no_grad():
        means = [IWAE(num_samples=k)(vae, x.repeat(reps, 1, 1, 1)).terms["iwae"].mean().item()
                 for k in (1, 2, 10, 50)]
    assert all(a < b for a, b in zip(means, means[1:], strict=False)), means
    out = IWAE(num_samples=5, beta=0.5, free_bits=0.1)(vae, x)
    out.loss.backward()
    grads = [p.grad for p in vae.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)


def test_iwae_beta_weighs_the_log_ratio_inside_the_weights():
    vae = small_vae(DiagonalGaussian())
    x = torch.randn(5, *SHAPE)
    torch.manual_seed(4)
    out = IWAE(num_samples=3, beta=0.0)(vae, x)
    torch.manual_seed(4)
    q = vae.encode(x)
    z = q.rsample((3,))
    log_px_z = vae.decode(z).log_prob(x)
    torch.testing.assert_close(out.loss, -(torch.logsumexp(log_px_z, 0) - math.log(3)).mean())


# --- warm-up and free bits -------------------------------------------------------------------
@pytest.mark.parametrize("objective", [ELBO, IWAE])
def test_warmup_ramps_beta_linearly(objective):
    obj = objective(beta=2.0, warmup=10)
    assert [obj.effective_beta(s) for s in (0, 5, 10, 30)] == [0.0, 1.0, 2.0, 2.0]
    assert obj.effective_beta() == 2.0  # outside training: warm-up is over
    by_epoch = objective(beta=1.0, warmup=4, warmup_unit="epochs")
    assert by_epoch.effective_beta(step=1000, epoch=0) == 0.0
    assert by_epoch.effective_beta(step=0, epoch=2) == 0.5
    assert objective(beta=3.0).effective_beta(0) == 3.0
    vae = small_vae(DiagonalGaussian())
    x = torch.randn(4, *SHAPE)
    out = obj(vae, x, step=5)
    assert out.scalars["beta"] == 1.0
    if objective is ELBO:
        torch.testing.assert_close(out.loss, -(out.terms["recon"] - out.terms["kl"]).mean())
    # the logged terms are the true bounds whatever β
    torch.testing.assert_close(out.terms["elbo"], out.terms["recon"] - out.terms["kl"])
    for bad in (dict(warmup=-1), dict(warmup=1.5), dict(warmup_unit="batches"), dict(free_bits=-0.1)):
        with pytest.raises(ValueError):
            objective(**bad)


def test_free_bits_clamp_the_per_dimension_kl():
    vae = small_vae(DiagonalGaussian())
    x = torch.randn(16, *SHAPE)
    q, p = vae.encode(x), vae.prior_distribution()
    mu, s = q.mean, q.stddev
    per_dim = (0.5 * (s**2 + mu**2 - 1 - torch.log(s**2))).mean(0)  # by hand, [Z]
    torch.testing.assert_close(per_dimension_kl(q, p).mean(0), per_dim)
    lam = per_dim.median().item()  # some dimensions below λ, some above
    assert (per_dim < lam).any() and (per_dim > lam).any()
    torch.manual_seed(5)
    out = ELBO(beta=0.7, free_bits=lam)(vae, x)
    want = 0.7 * torch.clamp(per_dim, min=lam).sum()
    torch.testing.assert_close(out.loss + out.terms["recon"].mean(), want)
    # λ = 0: the plain ELBO loss, bit for bit
    torch.manual_seed(5)
    plain = ELBO(beta=0.7)(vae, x)
    torch.manual_seed(5)
    zero = ELBO(beta=0.7, free_bits=0.0)(vae, x)
    assert torch.equal(plain.loss, zero.loss)
    # IWAE: −IWAE_K + β Σ_d max(0, λ − KL̄_d)
    torch.manual_seed(6)
    out = IWAE(num_samples=3, free_bits=lam)(vae, x)
    torch.testing.assert_close(out.loss, -out.terms["iwae"].mean() + torch.clamp(lam - per_dim, min=0).sum())


def test_free_bits_without_per_dimension_kl_clamp_the_total():
    vae = small_vae(FullGaussian())
    x = torch.randn(16, *SHAPE)
    q, p = vae.encode(x), vae.prior_distribution()
    assert per_dimension_kl(q, p) is None
    kl = kl_divergence(q, p).mean()
    for lam in (kl.item() / Z / 2, 2 * kl.item() / Z):
        out = ELBO(free_bits=lam)(vae, x)
        torch.testing.assert_close(out.loss + out.terms["recon"].mean(), torch.clamp(kl, min=lam * Z))


# --- through the config and the LightningModule ----------------------------------------------
def compose_train(tmp_path: Path, *overrides: str):
    with initialize_config_module(config_module="vaelab.conf", version_base="1.3"):
        return compose("train", overrides=[f"paths.data_dir={tmp_path}/data",
                                           f"paths.output_dir={tmp_path}/out", *overrides])


class Record(pl.Callback):
    def __init__(self):
        self.losses, self.betas = [], []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.losses.append(float(outputs["loss"]))
        self.betas.append(float(trainer.logged_metrics["train/beta"]))


@pytest.fixture
def one_thread():
    """Tiny networks: threads only contend with each other (and with the other test runs)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.mark.parametrize(
    ("posterior", "objective"),
    [("full_gaussian", "elbo"), ("iaf", "elbo"), ("gaussian", "iwae"), ("iaf", "iwae")],
)
def test_short_training_run(tmp_path, one_thread, posterior, objective):
    cfg = compose_train(
        tmp_path, f"posterior={posterior}", f"objective={objective}", "latent_dim=4",
        "encoder.hidden=[64]", "decoder.hidden=[64]", "optim.optimizer.lr=3e-3",
        "objective.warmup=10", "objective.free_bits=0.05",
    )
    resolve_data_options(cfg)
    config = OmegaConf.to_container(cfg, resolve=True)
    module = VAEModule(config=config, data_info=build_datamodule(cfg.data, config).info)
    assert Bernoulli is type(module.vae.likelihood)
    gen = torch.Generator().manual_seed(0)
    probs = torch.where(torch.rand(1, 1, 8, 8, generator=gen) < 0.5, 0.1, 0.9)
    x = torch.bernoulli(probs.expand(20 * 32, 1, 8, 8), generator=gen)
    loader = DataLoader(TensorDataset(x, torch.zeros(len(x))), batch_size=32)
    record = Record()
    trainer = pl.Trainer(max_steps=20, logger=CSVLogger(tmp_path), enable_checkpointing=False, callbacks=[record],
                         enable_progress_bar=False, enable_model_summary=False, accelerator="cpu",
                         default_root_dir=tmp_path, log_every_n_steps=1)  # train/beta on every step
    trainer.fit(module, train_dataloaders=loader)
    assert len(record.losses) == 20 and all(math.isfinite(v) for v in record.losses)
    assert sum(record.losses[-3:]) < sum(record.losses[:3]), record.losses
    # train/beta is the effective β: 0 at step 0, linear, the target after the warm-up
    assert record.betas[0] == 0.0 and record.betas[5] == pytest.approx(0.5) and record.betas[-1] == 1.0
