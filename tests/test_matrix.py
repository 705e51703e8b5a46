"""Every likelihood × prior × posterior × objective composes and trains: a few optimizer steps
on real digits with a finite loss that changes the parameters."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from test_config import CONF, compose_train

from vaelab.datamodules import Digits
from vaelab.jobs import build_datamodule, resolve_data_options
from vaelab.module import VAEModule

GROUPS = ("likelihood", "prior", "posterior", "objective")
OPTIONS = {g: sorted(p.stem for p in (CONF / g).glob("*.yaml")) for g in GROUPS}
MATRIX = list(itertools.product(*(OPTIONS[g] for g in GROUPS)))


@pytest.fixture(scope="module")
def digits():
    dm = Digits(binarize="none")
    dm.setup("fit")
    return dm.train_set.images[:32]


@pytest.fixture(autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models: threads cost more than they give
    yield
    torch.set_num_threads(before)


def test_the_matrix_covers_every_option():
    assert len(MATRIX) == 1 * len(OPTIONS["likelihood"]) * len(OPTIONS["prior"]) * len(OPTIONS["posterior"]) * len(OPTIONS["objective"])
    assert {"bernoulli", "gaussian", "categorical", "discretized_logistic_mixture"} <= set(OPTIONS["likelihood"])
    assert {"standard", "vamp", "flow"} <= set(OPTIONS["prior"]) and {"iaf", "full_gaussian"} <= set(OPTIONS["posterior"])


@pytest.mark.parametrize(GROUPS, MATRIX, ids=["-".join(c) for c in MATRIX])
def test_combination_trains(tmp_path: Path, digits, likelihood, prior, posterior, objective):
    cfg = compose_train(
        tmp_path, f"likelihood={likelihood}", f"prior={prior}", f"posterior={posterior}",
        f"objective={objective}", "latent_dim=4", "encoder.hidden=[32]", "decoder.hidden=[32]",
        "objective.num_samples=2", *(["prior.num_components=3"] if prior in ("vamp", "mog") else []),
    )
    resolve_data_options(cfg)
    config = OmegaConf.to_container(cfg, resolve=True)
    dm = build_datamodule(cfg.data, config)
    module = VAEModule(config=config, data_info=dm.info)
    x = dm.to_float(digits)
    opt = torch.optim.Adam(module.parameters(), lr=1e-2)
    before = [p.detach().clone() for p in module.parameters()]
    for step in range(3):
        out = module.objective(module.vae, x, step=step, epoch=0)
        assert torch.isfinite(out.loss), (step, out.terms)
        opt.zero_grad()
        out.loss.backward()
        opt.step()
    changed = sum(not torch.equal(a, b) for a, b in zip(before, module.parameters(), strict=True))
    assert changed == len(before)
    # the evaluation path works too: an importance-sampled log-likelihood, finite
    assert torch.isfinite(module.vae.log_likelihood(x[:4], num_samples=3, chunk_size=2)).all()


def test_iwae_bound_on_a_trained_model(tmp_path):
    """Train the default model briefly, then: IWAE_1 = ELBO (within Monte Carlo error) and
    IWAE_K is non-decreasing in K (averaged over the test split)."""
    cfg = compose_train(tmp_path)
    resolve_data_options(cfg)
    config = OmegaConf.to_container(cfg, resolve=True)
    dm = build_datamodule(cfg.data, config)
    dm.setup("fit")
    dm.setup("test")
    module = VAEModule(config=config, data_info=dm.info)
    opt = torch.optim.Adam(module.parameters(), lr=2e-3)
    train = dm.train_set.images
    first = None
    for _ in range(300):
        idx = torch.randint(len(train), (64,))
        loss = module.objective(module.vae, dm.to_float(train[idx])).loss
        first = loss.item() if first is None else first
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < first - 3  # it learned something
    x = dm.to_float(dm.test_set.images)
    with torch.no_grad():
        bounds = {k: torch.stack([module.vae.log_likelihood(x, k, 100) for _ in range(3)]).mean() for k in (1, 5, 50, 500)}
        draws = torch.stack([module.vae.log_likelihood(x, 1, 1).mean() for _ in range(200)])
        elbo = torch.stack([module.objective(module.vae, x).terms["elbo"].mean() for _ in range(200)]).mean()
    assert bounds[1] <= bounds[5] <= bounds[50] <= bounds[500] + 0.01, bounds
    assert bounds[500] > bounds[1] + 0.1  # and it does tighten
    stderr = draws.std() / len(draws) ** 0.5
    assert abs(draws.mean() - elbo) < 4 * stderr + 0.02, (draws.mean(), elbo, stderr)
