"""train.py and eval.py refuse a bad command before torch, Lightning or W&B is imported.

Each case runs the entry point as train.py does (``vaelab.cli.train_script``) in its own
process, and reads back which heavy modules that process had imported when it ended."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from vaelab import options
from vaelab.validation import lightning_precisions, value_problems

HEAVY = ("torch", "lightning", "wandb", "torchvision", "torchmetrics")

PROBE = """
import atexit, json, sys
atexit.register(lambda: print("HEAVY=" + json.dumps(sorted(m for m in {heavy!r} if m in sys.modules))))
sys.argv = [{script!r}, *{args!r}]
from vaelab.cli import {entry}
{entry}()
"""


def _entry(tmp_path: Path, script: str, *args: str) -> tuple[subprocess.CompletedProcess, list[str]]:
    entry = "eval_script" if script == "eval.py" else "train_script"
    code = textwrap.dedent(PROBE).format(heavy=HEAVY, script=script, args=list(args), entry=entry)
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("HEAVY=")]
    assert lines, (proc.stdout[-2000:], proc.stderr[-3000:])
    return proc, json.loads(lines[-1].removeprefix("HEAVY="))


#: what the installed Lightning's precision lists cost to read: Lightning and what it imports
LIGHTNING = {"lightning", "torch", "torchvision", "torchmetrics"}


@pytest.mark.parametrize(("args", "message", "allowed"), [
    (["latent_dim=0", "objective.beta=-1"], "latent_dim must be a positive integer, got 0", set()),  # the value check
    (["experiment=no_such_experiment"], "experiment/no_such_experiment", set()),  # Hydra: no such option
    # in no list: the installed Lightning's own lists are asked, so Lightning is imported
    (["trainer.precision=17-mixed"], "trainer.precision must be one of", LIGHTNING),
    (["+latent_dimm=8"], "did you mean latent_dim?", set()),  # an added key that is a typo
    # an interpolation that does not resolve: a traceback from the job's config (helper 19)
    (["latent_dim=${oops}"], "its interpolation does not resolve (Interpolation key 'oops' not found)", set()),
    (["prior=flow", "prior.flow=xyz"], "prior.flow must be one of maf, nsf, got 'xyz'", set()),  # a plugin's choice
    (["posterior=iaf", "posterior.hidden_features=[0]"], "posterior.hidden_features must be a list of positive", set()),
    (["callbacks.model_checkpoint.monitor=val/elob"], "did you mean callbacks.model_checkpoint.monitor=val/elbo?",
     set()),  # Lightning's own check comes at the end of the first epoch
])
def test_a_refused_run_imports_nothing_heavy(tmp_path, args, message, allowed):
    proc, heavy = _entry(tmp_path, "train.py", *args, f"hydra.run.dir={tmp_path / 'run'}")
    assert proc.returncode == 1
    assert message in proc.stderr
    assert set(heavy) <= allowed, heavy
    assert not (tmp_path / "run" / "summary.json").exists()


def test_a_run_into_an_earlier_runs_folder_is_refused_before_the_heavy_imports(tmp_path):
    earlier = tmp_path / "earlier"
    (earlier / "checkpoints").mkdir(parents=True)
    (earlier / "checkpoints" / "last.ckpt").write_bytes(b"an earlier run's checkpoint")
    proc, heavy = _entry(tmp_path, "train.py", f"hydra.run.dir={earlier}")
    assert proc.returncode == 1 and "holds an earlier run" in proc.stderr, proc.stderr[-2000:]
    assert heavy == []  # refused by the Hydra callback (vaelab.folders.RunFolders)
    assert (earlier / "checkpoints" / "last.ckpt").read_bytes() == b"an earlier run's checkpoint"


def test_an_evaluation_without_a_checkpoint_is_refused_before_the_heavy_imports(tmp_path):
    proc, heavy = _entry(tmp_path, "eval.py", f"hydra.run.dir={tmp_path / 'eval'}")
    assert proc.returncode == 1 and "give the checkpoint to evaluate: python eval.py ckpt_path=" in proc.stderr
    assert heavy == []


@pytest.mark.parametrize("args", [["--help"], ["--cfg", "job"]])
def test_help_and_the_composed_config_import_nothing_heavy(tmp_path, args):
    proc, heavy = _entry(tmp_path, "train.py", *args)
    assert proc.returncode == 0
    if args == ["--help"]:
        assert proc.stdout.startswith("train.py trains a VAE") and "Configuration groups" in proc.stdout
    else:
        assert "latent_dim: 16" in proc.stdout
    assert heavy == []


def test_the_precisions_accepted_without_lightning_are_lightnings():
    """options.PRECISIONS spares the config check Lightning's import; each of them must be one
    that the installed Lightning's Trainer accepts."""
    installed = lightning_precisions()
    assert installed, "Lightning keeps its precision lists elsewhere: update vaelab.validation.lightning_precisions"
    assert set(options.PRECISIONS) <= set(installed), set(options.PRECISIONS) - set(installed)
    assert value_problems({"trainer": {"precision": "bf16-mixed"}}) == []
    (problem,) = value_problems({"trainer": {"precision": "17-mixed"}})
    assert "bf16-mixed" in problem and "16-mixed" in problem
    # Lightning's, but the whole model in half precision: refused; float64 throughout runs
    # (transformer-engine's weights are bf16 or float16 too: it passed, then failed building the Trainer; helper 18)
    for whole_model in ("bf16-true", "16-true", "transformer-engine", "transformer-engine-float16"):
        (problem,) = value_problems({"trainer": {"precision": whole_model}})
        assert "not 16-true, bf16-true or transformer-engine's" in problem and "bf16-mixed" in problem
        assert "one of 16-mixed, bf16-mixed, 32-true, 64-true " in problem
    for full in ("64-true", "64", 64):
        assert value_problems({"trainer": {"precision": full}}) == []


def test_a_plugins_settings_are_checked_where_the_group_is_that_plugin():
    """prior.flow, prior.squash, posterior.num_transforms, ... are checked for vaelab's own
    plugins (the values its classes accept), and left alone for another plugin that gives the
    same name another meaning."""
    from vaelab.posteriors import IAF
    from vaelab.priors import Flow, VampPrior

    assert Flow.FLOWS == options.FLOW_PRIORS and VampPrior.SQUASHES == options.VAMP_SQUASHES
    assert VampPrior.COMPONENTS == options.VAMP_COMPONENTS
    flow = {"_target_": "vaelab.priors.Flow", "latent_dim": 2, "flow": "xyz", "transforms": 0}
    assert value_problems({"prior": flow}) == [
        "prior.flow must be one of maf, nsf, got 'xyz' (e.g. prior.flow=maf)",
        "prior.transforms must be an integer >= 1, got 0 (e.g. prior.transforms=3)"]
    assert value_problems({"prior": {**flow, "_target_": "mine.Prior"}}) == []
    assert value_problems({"prior": {**flow, "flow": "nsf", "transforms": 2}}) == []
    vamp = {"_target_": "vaelab.priors.VampPrior", "squash": "tanh", "init_std": -1, "components": "flow"}
    assert [p.split(" must")[0] for p in value_problems({"prior": vamp})] == ["prior.squash", "prior.init_std",
                                                                               "prior.components"]
    iaf = {"_target_": "vaelab.posteriors.IAF", "num_transforms": 0, "context_features": -1}
    assert [p.split(" must")[0] for p in value_problems({"posterior": iaf})] == [
        "posterior.num_transforms", "posterior.context_features"]
    with pytest.raises(ValueError, match="num_transforms"):  # what the check spares a run from
        IAF(latent_dim=2, num_transforms=0)


def test_eval_takes_where_and_how_the_data_are_read_not_other_data(tmp_path):
    """eval.py's data.* overrides: where and how the stored data are read; a setting that
    would change the test split (split_seed, test_size, pad, binarize) is refused, a typo named."""
    proc, heavy = _entry(tmp_path, "eval.py", "ckpt_path=/nowhere.ckpt", "+data.split_seed=7", "+data.eval_batch_szie=10",
                         "data.num_workers=2", f"hydra.run.dir={tmp_path / 'eval'}")
    assert proc.returncode == 1 and heavy == []
    assert "data.split_seed cannot be set in eval.py: the test data are the run's" in proc.stderr
    assert "data.eval_batch_szie cannot be set in eval.py (did you mean data.eval_batch_size?)" in proc.stderr
    assert "data.num_workers cannot be set" not in proc.stderr and "2 problems" in proc.stderr


def test_the_networks_settings_are_checked_as_the_networks_check_them():
    """Layer widths, channels and activations of vaelab's networks (and the MLP widths of its
    flows) are refused before torch loads, in the terms of the networks' own checks."""
    from vaelab import networks
    from vaelab.errors import SettingError

    assert tuple(networks._ACTIVATIONS) == options.ACTIVATIONS
    mlp = {"_target_": "vaelab.networks.MLPEncoder", "hidden": [512, 0], "activation": "relu6"}
    conv = {"_target_": "vaelab.networks.ConvDecoder", "channels": [], "activation": "gelu"}
    assert value_problems({"encoder": mlp, "decoder": conv}) == [
        "encoder.hidden must be a list of positive layer widths, got [512, 0] (e.g. encoder.hidden=[512,512])",
        "decoder.channels must be a list of positive channel counts, one per convolution, got [] "
        "(e.g. decoder.channels=[128,64,32])",
        f"encoder.activation must be one of {', '.join(options.ACTIVATIONS)}, got 'relu6' (e.g. encoder.activation=relu)"]
    with pytest.raises(SettingError, match="encoder.hidden must be a list of positive layer widths"):
        networks.MLPEncoder(data_shape=(1, 8, 8), out_features=4, hidden=[512, 0])
    with pytest.raises(SettingError, match="decoder.channels needs at least one"):
        networks.ConvDecoder(latent_dim=2, data_shape=(1, 8, 8), out_channels=1, channels=[])
    with pytest.raises(SettingError, match="'relu6' is not known"):
        networks.activation("relu6")
    # an MLP without hidden layers is a linear map: allowed; another plugin's "hidden" is its own
    assert value_problems({"encoder": {**mlp, "hidden": [], "activation": "tanh"}}) == []
    assert value_problems({"encoder": {**mlp, "_target_": "mine.Encoder"}}) == []
    for group, target in (("posterior", "vaelab.posteriors.IAF"), ("prior", "vaelab.priors.Flow")):
        (problem,) = value_problems({group: {"_target_": target, "hidden_features": [0]}})
        assert problem.startswith(f"{group}.hidden_features must be a list of positive layer widths, got [0]")


def test_the_trainer_data_optimizer_and_monitor_settings_are_checked_before_torch_loads():
    ok = {"trainer": {"devices": "auto"}, "data": {"val_size": 0.1}, "optim": {"scheduler": None}}
    assert value_problems(ok) == []
    for devices in (1, 4, -1, "-1", "2", "0,1", [0, 1], "auto"):
        assert value_problems({"trainer": {"devices": devices}}) == [], devices
    for devices in (0, "0", [], [-1], "a", True, "0,-1"):
        (problem,) = value_problems({"trainer": {"devices": devices}})
        assert problem.startswith("trainer.devices must be auto, a number of devices >= 1"), devices
    for val_size in (1, 5000, 0.5):
        assert value_problems({"data": {"val_size": val_size}}) == []
    for val_size in (0, 1.0, 1.5, -3, "all"):
        (problem,) = value_problems({"data": {"val_size": val_size}})
        assert problem.startswith("data.val_size must be a number of images >= 1 or a fraction"), val_size
    cosine = {"_target_": "torch.optim.lr_scheduler.CosineAnnealingLR", "T_max": 100}
    assert value_problems({"optim": {"scheduler": cosine, "scheduler_interval": "step"}}) == []
    problems = value_problems({"optim": {"scheduler": "cosine", "scheduler_interval": "batch"}})
    assert [p.split(" must")[0] for p in problems] == ["optim.scheduler", "optim.scheduler_interval"]
    assert "'optim.scheduler={_target_:torch.optim.lr_scheduler.CosineAnnealingLR,T_max:100}'" in problems[0]
    # a scheduler that steps on the checkpoint's number (ReduceLROnPlateau): where it is, in its direction
    plateau = {"_target_": "torch.optim.lr_scheduler.ReduceLROnPlateau"}
    assert value_problems({"optim": {"scheduler": plateau, "scheduler_interval": "epoch"},
                           "trainer": {"check_val_every_n_epoch": 2}}) == []
    assert value_problems({"optim": {"scheduler": {**plateau, "mode": "min"}},
                           "callbacks": {"model_checkpoint": {"monitor": "train/kl_epoch", "mode": "min"}}}) == []
    problems = value_problems({"optim": {"scheduler": {**plateau, "mode": "min"}, "scheduler_interval": "step"},
                               "trainer": {"check_val_every_n_epoch": None, "limit_val_batches": 0}})
    assert [p.split(":")[0] for p in problems] == ["optim.scheduler_interval=step", "optim.scheduler.mode=min",
                                                   "trainer.check_val_every_n_epoch=null", "trainer.limit_val_batches=0"]
    assert "ReduceLROnPlateau would lower the learning rate while val/elbo improves (callbacks.model_checkpoint." \
           "mode=max); leave it out (it then takes the checkpoint's mode) or set optim.scheduler.mode=max" in problems[1]

    def monitor(name: str, val_num_samples: int = 10) -> list[str]:
        return value_problems({"evaluation": {"val_num_samples": val_num_samples},
                               "callbacks": {"model_checkpoint": {"monitor": name}, "images": {"num_images": 4}}})

    for fine in ("val/elbo", "val/kl", "val/recon", "val/iwae", "train/elbo_epoch", "my/metric"):
        assert monitor(fine) == [], fine
    (typo,) = monitor("val/elob")
    assert typo.endswith("did you mean callbacks.model_checkpoint.monitor=val/elbo?")
    (nll,) = monitor("val/nll")
    assert "did you mean callbacks.model_checkpoint.monitor=val/iwae? (a bound on log p(x): higher is better" in nll
    (off,) = monitor("val/iwae", val_num_samples=0)
    assert "logged only with evaluation.val_num_samples > 0" in off


def test_a_number_must_be_finite():
    """inf passes ">= 0" and "> 0"; as objective.beta or likelihood.sigma it would end the run
    at its first step with a non-finite loss, whose message blames the learning rate."""
    problems = value_problems({"objective": {"beta": float("inf")}, "likelihood": {"sigma": float("inf")},
                               "optim": {"optimizer": {"lr": float("nan")}}})
    assert [p.split(" must")[0] for p in problems] == ["optim.optimizer.lr", "objective.beta", "likelihood.sigma"]
    assert value_problems({"objective": {"beta": 1e30}, "likelihood": {"sigma": "learned"}}) == []


def test_epochs_in_messages_are_counted_as_the_console_lines_count_them():
    """The stop and NaN messages name Lightning's 0-based epoch as the per-epoch console lines
    do ("epoch 2/6" for the second of six): "at step 502 (epoch 1)" read as the first epoch lost.
    Without a bound on the epochs (trainer.max_epochs=-1 with max_steps) no "/-1"."""
    from vaelab.errors import epoch_label

    assert [epoch_label(e, 6) for e in (0, 1, 5)] == ["epoch 1/6", "epoch 2/6", "epoch 6/6"]
    assert epoch_label(1, -1) == epoch_label(1, None) == "epoch 2"
