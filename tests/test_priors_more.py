"""The learned priors: learned Gaussian, mixture of Gaussians, VampPrior, normalizing flow.

Each density is checked against an independent computation (scipy, a hand-written
log-sum-exp, the VAE's own encoder, the change-of-variables formula with an autograd
Jacobian), and each prior is trained for a few steps through the composed config."""

from __future__ import annotations

import copy
import io
import math
import warnings
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_module
from omegaconf import OmegaConf
from scipy import stats
from torch.distributions import Independent, Normal

from vaelab.build import build_vae
from vaelab.jobs import build_datamodule, resolve_data_options
from vaelab.likelihoods import Bernoulli
from vaelab.module import VAEModule
from vaelab.networks import MLPDecoder, MLPEncoder
from vaelab.objectives import ELBO
from vaelab.posteriors import IAF, DiagonalGaussian
from vaelab.priors import Flow, LearnedGaussian, MixtureOfGaussians, Prior, VampPrior
from vaelab.vae import VAE, kl_or_monte_carlo

SHAPE = (1, 4, 4)
Z = 3
KINDS = ("learned_gaussian", "mog", "vamp", "flow")


def make_prior(kind: str, latent_dim: int = Z) -> Prior:
    if kind == "learned_gaussian":
        return LearnedGaussian(latent_dim)
    if kind == "mog":
        return MixtureOfGaussians(latent_dim, num_components=4)
    if kind == "vamp":
        return VampPrior(latent_dim, num_components=5, init_mean=0.5, init_std=0.2)
    if kind == "flow":
        return Flow(latent_dim, transforms=2, hidden_features=[16, 16])
    raise ValueError(kind)


def small_vae(prior: Prior) -> VAE:
    """A small VAE around ``prior``, bound to it the way ``build_vae`` does."""
    lik, post = Bernoulli(), DiagonalGaussian()
    enc = MLPEncoder(SHAPE, post.num_params(prior.latent_dim), hidden=[16])
    dec = MLPDecoder(prior.latent_dim, SHAPE, lik.num_params(SHAPE), hidden=[16])
    vae = VAE(enc, post, dec, lik, prior)
    prior.bind(vae, SHAPE)
    return vae


def bound_prior(kind: str, latent_dim: int = Z) -> tuple[Prior, VAE]:
    torch.manual_seed(0)
    prior = make_prior(kind, latent_dim)
    return prior, small_vae(prior)


# --- the contract, for all four -------------------------------------------------------------
@pytest.mark.parametrize("kind", KINDS)
def test_shapes_of_log_prob_and_samples(kind):
    prior, _ = bound_prior(kind)
    p = prior()
    assert tuple(p.event_shape) == (Z,) and tuple(p.batch_shape) == ()
    assert p.log_prob(torch.randn(7, 2, Z)).shape == (7, 2)  # [K, B, Z] as in log_likelihood
    assert p.log_prob(torch.randn(Z)).shape == ()
    assert p.sample((6,)).shape == (6, Z)
    assert p.sample().shape == (Z,)
    assert torch.isfinite(p.log_prob(p.sample((50,)))).all()


@pytest.mark.parametrize("kind", KINDS)
def test_parameters_are_trained_by_log_prob(kind):
    prior, _ = bound_prior(kind)
    params = dict(prior.named_parameters())
    assert params, "a learned prior has parameters"
    prior().log_prob(torch.randn(32, Z)).sum().backward()
    for name, param in params.items():
        assert param.grad is not None and param.grad.abs().sum() > 0, name


@pytest.mark.parametrize("kind", KINDS)
def test_vae_samples_and_importance_sampling_work_with_the_prior(kind):
    _, vae = bound_prior(kind)
    assert vae.sample(4).mean.shape == (4, *SHAPE)
    x = torch.rand(5, *SHAPE).round()
    ll = vae.log_likelihood(x, num_samples=7, chunk_size=3)
    assert ll.shape == (5,) and torch.isfinite(ll).all()
    out = ELBO(num_samples=2)(vae, x)
    assert torch.isfinite(out.loss)
    assert out.analytic_kl == (kind == "learned_gaussian")


@pytest.mark.parametrize("kind", KINDS)
def test_prior_moves_with_the_model(kind):
    """All the prior's tensors are registered, so ``.to`` / ``.double()`` / ``.cuda()`` move them."""
    prior, vae = bound_prior(kind)
    vae = vae.double()
    tensors = [*prior.parameters(), *prior.buffers()]
    floats = [t for t in tensors if t.is_floating_point()]  # (zuko keeps int orders, bool masks)
    assert floats and all(t.dtype == torch.float64 for t in floats)
    assert torch.isfinite(vae.prior_distribution().log_prob(torch.randn(4, Z, dtype=torch.float64))).all()
    if torch.cuda.is_available():
        vae = vae.float().cuda()
        p = vae.prior_distribution()
        z = p.sample((3,))
        assert z.device.type == "cuda" and p.log_prob(z).device.type == "cuda"


# --- learned Gaussian -------------------------------------------------------------------------
def test_learned_gaussian_density_matches_scipy():
    prior = LearnedGaussian(Z)
    with torch.no_grad():
        prior.loc.copy_(torch.tensor([0.5, -1.0, 2.0]))
        prior.log_scale.copy_(torch.tensor([0.0, -0.7, 0.4]))
    z = torch.randn(10, Z, dtype=torch.float64)
    expected = stats.norm.logpdf(z.numpy(), loc=prior.loc.detach().numpy(),
                                 scale=prior.log_scale.exp().detach().numpy()).sum(1)
    torch.testing.assert_close(prior().log_prob(z.float()).double(), torch.from_numpy(expected),
                               atol=1e-5, rtol=1e-5)


def test_learned_gaussian_kl_is_analytic_and_matches_monte_carlo():
    torch.manual_seed(0)
    prior = LearnedGaussian(Z)
    with torch.no_grad():
        prior.loc.normal_()
        prior.log_scale.normal_(0.0, 0.3)
    q = DiagonalGaussian()(torch.randn(4, 2 * Z))
    kl, analytic = kl_or_monte_carlo(q, prior())
    assert analytic and kl.shape == (4,)
    z = q.sample((200_000,))
    torch.testing.assert_close(kl, (q.log_prob(z) - prior().log_prob(z)).mean(0), atol=0.03, rtol=0.01)


# --- mixture of Gaussians ---------------------------------------------------------------------
def mog_with_distinct_weights() -> MixtureOfGaussians:
    torch.manual_seed(0)
    prior = MixtureOfGaussians(Z, num_components=3, init_spread=2.0)
    with torch.no_grad():
        prior.logits.copy_(torch.tensor([0.0, 1.0, -0.5]))
        prior.log_scale.normal_(0.0, 0.3)
    return prior


def test_mog_density_is_the_log_sum_exp_over_components():
    prior = mog_with_distinct_weights()
    z = torch.randn(6, 2, Z)
    log_w = torch.log_softmax(prior.logits, 0)  # [K]
    mu, sigma = prior.loc, prior.log_scale.exp()  # [K, Z]
    zk = z.unsqueeze(-2)  # [6, 2, 1, Z]
    log_n = (-0.5 * ((zk - mu) / sigma) ** 2 - sigma.log() - 0.5 * math.log(2 * math.pi)).sum(-1)
    expected = torch.logsumexp(log_w + log_n, dim=-1)
    torch.testing.assert_close(prior().log_prob(z), expected)


def test_mog_samples_have_the_mixture_moments():
    prior = mog_with_distinct_weights()
    torch.manual_seed(1)
    with torch.no_grad():
        z = prior().sample((200_000,))
        w = torch.softmax(prior.logits, 0)
        mu, var = prior.loc, prior.log_scale.exp() ** 2
        mean = (w[:, None] * mu).sum(0)
        second = (w[:, None, None] * (torch.diag_embed(var) + mu[:, :, None] * mu[:, None, :])).sum(0)
        cov = second - mean[:, None] * mean[None, :]
    torch.testing.assert_close(z.mean(0), mean, atol=0.03, rtol=0)
    torch.testing.assert_close(torch.cov(z.T), cov, atol=0.06, rtol=0.02)


def test_mog_kl_falls_back_to_monte_carlo():
    prior = mog_with_distinct_weights()
    q = DiagonalGaussian()(torch.randn(4, 2 * Z))
    z = q.rsample((10,))
    kl, analytic = kl_or_monte_carlo(q, prior(), z)
    assert not analytic and kl.shape == (4,)
    torch.testing.assert_close(kl, (q.log_prob(z) - prior().log_prob(z)).mean(0))


# --- VampPrior --------------------------------------------------------------------------------
def test_vamp_density_is_the_mean_of_the_posteriors_at_the_pseudo_inputs():
    prior, vae = bound_prior("vamp")
    u = prior.pseudo_inputs
    assert u.shape == (5, *SHAPE) and u.min() >= 0 and u.max() <= 1
    q = vae.encode(u)  # the encoder and posterior, called by hand
    mu, sigma = q.mean, q.stddev  # [K, Z]
    z = torch.randn(4, 2, Z)
    log_n = Normal(mu, sigma).log_prob(z.unsqueeze(-2)).sum(-1)  # [4, 2, K]
    expected = torch.logsumexp(log_n, -1) - math.log(prior.num_components)
    torch.testing.assert_close(prior().log_prob(z), expected)


def test_vamp_trains_pseudo_inputs_and_encoder_through_the_prior():
    prior, vae = bound_prior("vamp")
    vae.zero_grad()
    prior().log_prob(torch.randn(16, Z)).sum().backward()
    assert prior.pseudo_inputs_raw.grad.abs().sum() > 0
    for name, param in vae.encoder.named_parameters():
        assert param.grad is not None and param.grad.abs().sum() > 0, name
    for param in vae.decoder.parameters():
        assert param.grad is None


def test_vamp_does_not_own_the_encoder():
    prior, vae = bound_prior("vamp")
    assert list(prior.modules()) == [prior]
    assert [n for n, _ in prior.named_parameters()] == ["pseudo_inputs_raw"]
    keys = list(vae.state_dict())
    assert [k for k in keys if k.startswith("prior.")] == ["prior.pseudo_inputs_raw"]
    names = [n for n, _ in vae.named_parameters(remove_duplicate=False)]
    assert len(names) == len(set(names)) and not any(n.startswith("prior.") and "encoder" in n for n in names)
    expected = sum(p.numel() for m in (vae.encoder, vae.decoder) for p in m.parameters())
    assert sum(p.numel() for p in vae.parameters()) == expected + prior.pseudo_inputs_raw.numel()


def test_vamp_copies_and_checkpoints_follow_their_own_encoder():
    prior, vae = bound_prior("vamp")
    twin = copy.deepcopy(vae)
    assert twin.prior._encode.__self__ is twin  # rebound to the copy, not the original
    with torch.no_grad():
        for p in twin.encoder.parameters():
            p.add_(0.5)
    z = torch.randn(3, Z)
    assert not torch.allclose(twin.prior_distribution().log_prob(z), vae.prior_distribution().log_prob(z))
    # a freshly built model loads the state dict (pseudo-inputs included) and gives the same p(z)
    torch.manual_seed(123)
    fresh = small_vae(make_prior("vamp"))
    buf = io.BytesIO()
    torch.save(vae.state_dict(), buf)
    buf.seek(0)
    fresh.load_state_dict(torch.load(buf, weights_only=True))
    torch.testing.assert_close(fresh.prior_distribution().log_prob(z), vae.prior_distribution().log_prob(z))


def test_unbound_vamp_prior_says_how_to_bind_it():
    with pytest.raises(RuntimeError, match="bind"):
        VampPrior(Z, num_components=3)()


def test_vamp_refuses_bad_settings():
    with pytest.raises(ValueError, match="squash"):
        VampPrior(Z, squash="tanh")
    with pytest.raises(ValueError, match="num_components"):
        VampPrior(Z, num_components=0)
    with pytest.raises(ValueError, match="components must be one of"):
        VampPrior(Z, components="flow")


def _iaf_vae(components: str) -> tuple[VampPrior, VAE]:
    torch.manual_seed(0)
    prior = VampPrior(Z, num_components=5, init_mean=0.5, init_std=0.2, components=components)
    lik, post = Bernoulli(), IAF(Z, num_transforms=2, context_features=4, hidden_features=[8])
    vae = VAE(MLPEncoder(SHAPE, post.num_params(Z), hidden=[16]), post,
              MLPDecoder(Z, SHAPE, lik.num_params(SHAPE), hidden=[16]), lik, prior)
    with torch.no_grad():  # move the flow away from its near-identity initialization
        for param in post.parameters():
            param.add_(0.3 * torch.randn_like(param))
    return prior, vae


def test_vamp_over_a_flow_posterior_mixes_its_densities_or_its_base_gaussians():
    """posterior=iaf: by default p(z) = 1/K Σ_k q(z|u_k), the flow's own densities at the
    pseudo-inputs (its inverse, sequential), with a warning of the cost that names
    prior.components=base; with base, 1/K Σ_k N(z; μ0(u_k), σ0²(u_k)), the flow's base
    Gaussians, which differ from the flow's densities, and no warning."""
    z = torch.randn(4, 2, Z)
    for components in VampPrior.COMPONENTS:
        prior, vae = _iaf_vae(components)
        if components == "posterior":
            with pytest.warns(UserWarning, match=r"over the IAF posterior.*K=5 pseudo-inputs.*prior.components=base"):
                prior.bind(vae, SHAPE)
        else:
            with warnings.catch_warnings():
                warnings.simplefilter("error")
                prior.bind(vae, SHAPE)
        q = vae.encode(prior.pseudo_inputs)  # the IAF posteriors at the pseudo-inputs, by hand
        flow = q.log_prob(z.unsqueeze(-2))  # [4, 2, K]
        base = Normal(q.base.mean, q.base.stddev).log_prob(z.unsqueeze(-2)).sum(-1)
        assert (flow - base).abs().max() > 0.1  # the two mixtures are different priors
        expected = torch.logsumexp(flow if components == "posterior" else base, -1) - math.log(5)
        torch.testing.assert_close(prior().log_prob(z), expected)
    prior = VampPrior(Z, num_components=5)  # a posterior that is not a flow: no warning, one pass either way
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        small_vae(prior)


# --- flow -------------------------------------------------------------------------------------
def test_flow_density_is_the_change_of_variables_formula():
    torch.manual_seed(0)
    prior = Flow(Z, transforms=2, hidden_features=[16, 16])
    with torch.no_grad():  # move away from the near-identity initialization
        for p in prior.parameters():
            p.add_(0.3 * torch.randn_like(p))
    p = prior()
    f = p.transform  # z -> ε, the density direction
    base = Independent(Normal(torch.zeros(Z), torch.ones(Z)), 1)
    for _ in range(4):
        z = torch.randn(Z)
        jac = torch.autograd.functional.jacobian(lambda v: f(v), z)
        expected = base.log_prob(f(z)) + torch.linalg.slogdet(jac).logabsdet
        torch.testing.assert_close(p.log_prob(z), expected, atol=1e-4, rtol=1e-4)
    assert torch.isfinite(p.log_prob(p.sample((100,)))).all()


def test_flow_density_normalizes_on_a_grid():
    torch.manual_seed(0)
    prior = Flow(2, transforms=2, hidden_features=[16, 16])
    with torch.no_grad():
        for p in prior.parameters():
            p.add_(0.3 * torch.randn_like(p))
    side = torch.linspace(-10, 10, 401)
    grid = torch.stack(torch.meshgrid(side, side, indexing="ij"), -1).reshape(-1, 2)
    with torch.no_grad():
        mass = prior().log_prob(grid).exp().sum() * (side[1] - side[0]) ** 2
    assert abs(mass.item() - 1.0) < 0.02


def test_flow_refuses_unknown_kind():
    with pytest.raises(ValueError, match="maf"):
        Flow(Z, flow="glow")


# --- through the config ---------------------------------------------------------------------
def compose_train(tmp_path: Path, *overrides: str):
    with initialize_config_module(config_module="vaelab.conf", version_base="1.3"):
        return compose(
            "train",
            overrides=[f"paths.data_dir={tmp_path}/data", f"paths.output_dir={tmp_path}/out", *overrides],
        )


@pytest.mark.parametrize("kind", KINDS)
def test_a_few_adam_steps_lower_the_loss(tmp_path, kind):
    cfg = compose_train(tmp_path, f"prior={kind}", "latent_dim=4", "encoder.hidden=[32]",
                        "decoder.hidden=[32]", "logger=none")
    resolve_data_options(cfg)
    config = OmegaConf.to_container(cfg, resolve=True)
    torch.manual_seed(0)
    module = VAEModule(config=config, data_info=build_datamodule(cfg.data, config).info)
    assert type(module.vae.prior).__name__ == {"learned_gaussian": "LearnedGaussian", "mog": "MixtureOfGaussians",
                                               "vamp": "VampPrior", "flow": "Flow"}[kind]
    optimizer = torch.optim.Adam(module.parameters(), lr=3e-3)
    # random binary images drawn from 8 random patterns: learnable structure in 20 steps
    patterns = torch.rand(8, *module.data_info["shape"]).round()
    x = patterns[torch.randint(0, 8, (64,))]
    before = [p.detach().clone() for p in module.vae.prior.parameters()]
    losses = []
    for _ in range(20):
        optimizer.zero_grad()
        loss = module(x).loss
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert all(math.isfinite(v) for v in losses)
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 - 1.0
    after = list(module.vae.prior.parameters())
    assert all(not torch.equal(a, b) for a, b in zip(after, before, strict=True))  # the prior learns


def test_build_vae_binds_the_vamp_prior(tmp_path):
    cfg = compose_train(tmp_path, "prior=vamp", "prior.num_components=7")
    resolve_data_options(cfg)
    config = OmegaConf.to_container(cfg, resolve=True)
    shape = build_datamodule(cfg.data, config).data_shape
    vae = build_vae(config, shape)
    assert vae.prior.pseudo_inputs.shape == (7, *shape)
    assert vae.prior._encode.__self__ is vae
