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


PLATEAU = "optim.scheduler={_target_:torch.optim.lr_scheduler.ReduceLROnPlateau,patience:0,factor:0.5}"


@pytest.mark.parametrize(("objective", "monitor"), [("elbo", "val/elbo"), ("iwae", "val/iwae")])
def test_a_plateau_scheduler_steps_on_the_checkpoints_number_in_its_direction_after_each_validation(
        tmp_path, objective, monitor):
    """ReduceLROnPlateau's own default, mode=min, lowered the learning rate while val/elbo rose,
    and Lightning stopped the run at an epoch without validation: it takes the checkpoint
    callback's monitor and mode, and steps every check_val_every_n_epoch epochs."""
    from types import SimpleNamespace

    from test_likelihoods_more import _module

    module = _module(tmp_path, PLATEAU, f"objective={objective}", f"callbacks.model_checkpoint.monitor={monitor}")[2]()
    module._trainer = SimpleNamespace(precision_plugin=None, gradient_clip_val=None, check_val_every_n_epoch=2)
    schedule = module.configure_optimizers()["lr_scheduler"]
    assert (schedule["monitor"], schedule["frequency"], schedule["interval"]) == (monitor, 2, "epoch")
    scheduler, optimizer = schedule["scheduler"], schedule["scheduler"].optimizer
    for value in (-28.0, -27.6, -27.2):  # improving: the learning rate stays
        scheduler.step(value)
    assert optimizer.param_groups[0]["lr"] == 1e-3
    scheduler.step(-27.5)  # worse than the best, patience 0: halved
    assert optimizer.param_groups[0]["lr"] == 5e-4


@pytest.mark.slow
def test_a_plateau_scheduler_trains_with_validation_every_other_epoch(tmp_path):
    """And a user's subclass of it is checked as torch's class is, before the run starts (the
    config check, which imports nothing, knows torch's by name)."""
    import os

    from conftest import REPO, check, run_cli

    check(run_cli("train.py", PLATEAU, "trainer.max_epochs=3", "trainer.check_val_every_n_epoch=2", "logger=csv",
                  "test=false", "callbacks.images.every_n_epochs=1000", f"hydra.run.dir={tmp_path}/run", cwd=REPO))
    (tmp_path / "myplateau.py").write_text("from torch.optim.lr_scheduler import ReduceLROnPlateau\n"
                                           "class MyPlateau(ReduceLROnPlateau):\n    pass\n")
    env = {"PYTHONPATH": os.pathsep.join(p for p in (str(tmp_path), os.environ.get("PYTHONPATH", "")) if p)}
    proc = run_cli("train.py", "allowed_targets=[myplateau.]", "optim.scheduler={_target_:myplateau.MyPlateau,mode:min}",
                   "optim.scheduler_interval=step", f"hydra.run.dir={tmp_path}/mine", cwd=REPO, env=env)
    assert proc.returncode == 1 and "the config has 2 problems; nothing has run yet" in proc.stderr, proc.stderr[-2000:]
    assert "optim.scheduler_interval=step: MyPlateau steps on val/elbo" in proc.stderr
    assert "optim.scheduler.mode=min: MyPlateau would lower the learning rate" in proc.stderr
    assert not (tmp_path / "mine" / "checkpoints").exists()
