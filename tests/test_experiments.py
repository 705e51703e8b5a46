"""The paper-reproduction experiments compose to the setups their papers describe."""

from __future__ import annotations

import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf
from test_config import compose_train

from vaelab.jobs import build_datamodule, resolve_data_options
from vaelab.module import VAEModule
from vaelab.schedules import Burda2015


def build(tmp_path, experiment, *overrides):
    cfg = compose_train(tmp_path, f"experiment={experiment}", *overrides)
    resolve_data_options(cfg)
    config = OmegaConf.to_container(cfg, resolve=True)
    return cfg, VAEModule(config=config, data_info=build_datamodule(cfg.data, config).info)


def test_burda_schedule_has_3280_passes_and_ten_fold_decay():
    s = Burda2015()
    stages = [s.stage(e) for e in range(3280)]
    assert [stages.count(i) for i in range(8)] == [3**i for i in range(8)]
    assert s(0) == 1.0 and s(3279) == pytest.approx(10 ** (-1)) and s(5000) == s(3279)


@pytest.mark.parametrize(("experiment", "objective", "k"), [("mnist_vae", "ELBO", 1), ("iwae_mnist", "IWAE", 5)])
def test_burda_vae_and_iwae(tmp_path, experiment, objective, k):
    cfg, module = build(tmp_path, experiment)
    assert cfg.data._target_.endswith(".MNIST") and cfg.data.binarize == "dynamic" and cfg.data.batch_size == 20
    assert type(module.objective).__name__ == objective and module.objective.num_samples == k
    linears = [m for m in module.vae.encoder.modules() if isinstance(m, torch.nn.Linear)]
    assert [m.out_features for m in linears] == [200, 200, 100]  # 2 × 50 for μ and σ
    assert any(isinstance(m, torch.nn.Tanh) for m in module.vae.encoder.modules())
    assert cfg.evaluation.test_num_samples == 5000 and cfg.trainer.max_epochs == 3280
    # the best checkpoint by the bound the model is trained on
    assert cfg.callbacks.model_checkpoint.monitor == ("val/iwae" if objective == "IWAE" else "val/elbo")
    # ... with the objective's k (it was mnist_vae's 10: IWAE_10 picked an IWAE_5 model; helper 19)
    assert cfg.evaluation.val_num_samples == (k if objective == "IWAE" else 10)
    opt = module.configure_optimizers()
    assert opt["optimizer"].defaults["eps"] == 1e-4
    sched = opt["lr_scheduler"]["scheduler"]
    assert isinstance(sched.lr_lambdas[0], Burda2015)
    cfg50, k50 = build(tmp_path, experiment, "objective.num_samples=50")
    assert k50.objective.num_samples == 50
    if objective == "IWAE":
        assert cfg50.evaluation.val_num_samples == 50


def test_vampprior_on_static_binarized_mnist(tmp_path):
    cfg, module = build(tmp_path, "vampprior_mnist")
    assert cfg.data._target_.endswith(".BinarizedMNIST")
    assert type(module.vae.prior).__name__ == "VampPrior" and module.vae.prior.num_components == 500
    assert module.vae.latent_dim == 40 and module.objective.warmup == 100 and module.objective.warmup_unit == "epochs"
    assert module.objective.effective_beta(step=0, epoch=0) == 0.0
    assert module.objective.effective_beta(step=0, epoch=50) == pytest.approx(0.5)
    # the paper's baseline, the same setup with the standard prior, composes too
    _, baseline = build(tmp_path, "vampprior_mnist", "prior=standard")
    assert type(baseline.vae.prior).__name__ == "StandardNormal" and baseline.vae.latent_dim == 40


def test_sigma_vae_on_cifar10(tmp_path):
    cfg, module = build(tmp_path, "sigma_vae_cifar10")
    assert module.data_info["shape"] == [3, 32, 32] and module.data_info["dequantize"] is True
    assert module.vae.likelihood.mode == "learned"
    assert module.data_info["bin_width"] == pytest.approx(1 / 256)
    x = torch.rand(2, 3, 32, 32)
    assert torch.isfinite(module(x).loss)
    assert instantiate(cfg.trainer, logger=False, enable_checkpointing=False).max_epochs == 100
