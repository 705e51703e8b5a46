"""Scale and sweeps: DDP (CPU processes standing in for GPUs), mixed precision over the plugin
matrix, Hydra multirun and Optuna sweeps, and resuming a killed run in the same W&B run.

Every test runs on CPU; the subprocess tests read back what a researcher would look at: run
folders, offline W&B runs, summary.json."""

from __future__ import annotations

import copy
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import REPO, check, run_cli, snapshot
from hydra import compose, initialize_config_module
from omegaconf import OmegaConf

from vaelab.jobs import resolve_data_options
from vaelab.wandb_offline import find_runs, read_run

SRC = str(REPO / "src")
FAST = ("evaluation.test_num_samples=5", "evaluation.val_num_samples=0", "callbacks.images.every_n_epochs=1000")


def _env(*extra: Path) -> dict[str, str]:
    paths = [SRC, *map(str, extra), os.environ.get("PYTHONPATH", "")]
    return {"PYTHONPATH": os.pathsep.join(p for p in paths if p)}


def _shared_run(tmp_path_factory: pytest.TempPathFactory, name: str, make) -> Path:
    """The folder of a run that ``make(folder)`` makes once a test session and that several tests
    compare with, also across pytest-xdist's processes (``make test`` runs the parametrized
    cases of one test in parallel): the first test to ask makes it, under a lock file in the
    session's temp folder that all of them share; the others wait for it and read it."""
    import fcntl

    base = tmp_path_factory.getbasetemp()
    root = base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base  # (xdist: <session>/popen-gwN)
    folder, done = root / name, root / f"{name}.done"
    with open(root / f"{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not done.exists():
            shutil.rmtree(folder, ignore_errors=True)
            make(folder)
            done.touch()
    return folder


def _run_group(wandb_file: Path) -> str:
    """The W&B group of an offline run, from its run record."""
    from wandb.proto import wandb_internal_pb2 as pb

    from vaelab.wandb_offline import iter_record_bytes

    for payload in iter_record_bytes(wandb_file):
        rec = pb.Record()
        rec.ParseFromString(payload)
        if rec.WhichOneof("record_type") == "run":
            return rec.run.run_group
    return ""


# --- DDP ----------------------------------------------------------------------------------------
@pytest.mark.slow
def test_ddp_sim_logs_once_and_matches_one_process(tmp_path):
    """2 CPU processes × batch 32 against 1 process × batch 64 (the same global batch, the same
    number of optimizer steps, the same seed), 2 epochs on digits.

    The two runs cannot agree exactly: the data order (DistributedSampler's permutation vs the
    RandomSampler's) and the noise (ε, dynamic binarization: different streams per rank) differ.
    What they must agree on is the optimization: the same number of steps of the same size on
    the same global batch. When this test was written the two landed at -27.65 (one process)
    and -27.53 nats (two), 0.12 apart. The 1-nat tolerance is a judgement, not a measured seed
    spread: it is about 8x that gap, and much smaller than the effect of a DDP bug that changes
    the step size or the data seen (gradients summed instead of averaged over ranks, both ranks
    on the same shard, a per-rank batch taken for the global one), which shows as a gap of
    several nats this early in training.
    """
    single, ddp = tmp_path / "single", tmp_path / "ddp"
    common = ("trainer.max_epochs=2", "data.test_size=359", "evaluation.test_num_samples=5",
              "evaluation.val_num_samples=0", "trainer.log_every_n_steps=1")
    check(run_cli("train.py", "data.batch_size=64", *common, f"hydra.run.dir={single}", cwd=tmp_path, env=_env()))
    check(run_cli("train.py", "trainer=ddp_sim", "data.batch_size=32", *common, f"hydra.run.dir={ddp}",
                  cwd=tmp_path, env=_env()))

    # one job: one run folder (nothing written where the command ran), one W&B run, no rows twice
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ddp", "single"]
    (run_file,) = find_runs(ddp)
    run = read_run(run_file)
    assert run.exit_code == 0
    # 1257 images / 2 ranks / 32 = 20 steps per epoch, each logged once (rank zero only)
    assert [int(r["trainer/global_step"]) for r in run.history if "train/loss" in r] == list(range(40))
    assert len(run.values("val/elbo")) == 2
    assert list(ddp.glob("*.log")) == [next(ddp.glob("*.log"))]  # rank zero's Hydra log only
    summary = json.loads((ddp / "summary.json").read_text())
    assert summary["world_size"] == 2 and not summary["failed"]

    # the test numbers: every one of the 359 test images once (DistributedSampler would pad to 360)
    assert summary["test"]["test/num_examples"] == 359
    assert read_run(find_runs(single)[0]).summary["test/num_examples"] == 359

    one = read_run(find_runs(single)[0]).values("val/elbo")
    two = run.values("val/elbo")
    assert two[-1] > two[0] and one[-1] > one[0]
    assert abs(one[-1] - two[-1]) < 1.0, (one, two)

    # eval.py with two processes: the second starts in the folder the first writes (a guard
    # against earlier evaluations there must let it), and every test image counts once
    proc = run_cli("eval.py", f"ckpt_path={ddp}", "trainer=ddp_sim", "evaluation.test_num_samples=5",
                   f"hydra.run.dir={tmp_path / 'eval'}", cwd=tmp_path, env=_env(), timeout=180)
    check(proc)
    assert "sync_dist=True" not in proc.stderr  # every test value is the whole split's on every rank
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())["metrics"]
    assert metrics["test/num_examples"] == 359
    assert metrics["test/nll"] == pytest.approx(summary["test"]["test/nll"], abs=0.5)  # K=5: Monte Carlo noise


def test_eval_shards_are_unpadded_and_cover_the_split():
    from lightning.pytorch.overrides.distributed import UnrepeatedDistributedSampler

    data = list(range(359))
    shards = [list(UnrepeatedDistributedSampler(data, num_replicas=2, rank=r, shuffle=False)) for r in (0, 1)]
    assert sorted(shards[0] + shards[1]) == data


def test_an_eval_split_smaller_than_the_processes_is_refused_with_the_fix(monkeypatch):
    """Under DDP a validation split of 1 example with 2 processes left one rank with none: a bare
    AssertionError in Lightning's sampler on that rank, a broken gloo connection on the other
    (found by helper 18). Every rank refuses it the same way, naming the fix."""
    from vaelab.distributed import eval_sampler
    from vaelab.errors import SettingError

    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.distributed, "get_world_size", lambda *a: 2)
    monkeypatch.setattr(torch.distributed, "get_rank", lambda *a: 1)
    with pytest.raises(SettingError, match="validation split holds 1 example, fewer than the 2 processes.*data.val_size"):
        eval_sampler(list(range(1)), "validation")
    with pytest.raises(SettingError, match="test split holds 1 example.*a larger test split"):
        eval_sampler(list(range(1)), "test")
    assert list(eval_sampler(list(range(3)), "test")) == [1]


def test_rank_command_repeats_the_job_not_the_sweep(monkeypatch):
    """What a rank > 0 process runs: the job's overrides into the job's folder, whatever
    sys.argv held (a sweep's -m a=1,2, or submitit's own command)."""
    from types import SimpleNamespace

    from hydra.core.hydra_config import HydraConfig

    from vaelab import distributed

    hc = SimpleNamespace(
        job=SimpleNamespace(config_name="train", name="cli"),
        overrides=SimpleNamespace(task=["latent_dim=4", "trainer=ddp_sim"],
                                  hydra=["hydra.sweep.dir=/s", "hydra.mode=MULTIRUN", "hydra/launcher=joblib",
                                         "hydra.searchpath=[file:///my/conf]"]),
        runtime=SimpleNamespace(output_dir="/s/1"),
    )
    monkeypatch.setattr(HydraConfig, "get", staticmethod(lambda: hc))
    monkeypatch.setattr("hydra.utils.get_original_cwd", lambda: "/start")
    monkeypatch.setattr(sys, "argv", ["train.py", "-m", "latent_dim=2,4", "trainer=ddp_sim"])
    command, cwd, env = distributed.rank_command(1)
    assert command[1:3] == ["-c", "from vaelab.cli import train_script; train_script()"]
    assert "latent_dim=4" in command and "latent_dim=2,4" not in command and "-m" not in command
    assert "hydra.run.dir='/s/1'" in command and "hydra.output_subdir=null" in command
    assert "hydra.searchpath=[file:///my/conf]" in command
    assert not any(c.startswith(("hydra.sweep", "hydra.mode", "hydra/launcher")) for c in command)
    assert cwd == "/start" and SRC in env["PYTHONPATH"].split(os.pathsep)


# --- mixed precision over the plugin matrix -----------------------------------------------------
CONF = REPO / "src" / "vaelab" / "conf"
MATRIX = [
    (lik.stem, prior.stem, post.stem, obj.stem)
    for lik in sorted((CONF / "likelihood").glob("*.yaml"))
    for prior in sorted((CONF / "prior").glob("*.yaml"))
    for post in sorted((CONF / "posterior").glob("*.yaml"))
    for obj in sorted((CONF / "objective").glob("*.yaml"))
]


def _module(tmp_path: Path, *overrides: str):
    from vaelab.jobs import build_datamodule
    from vaelab.module import VAEModule

    with initialize_config_module(config_module="vaelab.conf", version_base="1.3"):
        cfg = compose("train", overrides=[f"paths.data_dir={tmp_path}", f"paths.output_dir={tmp_path}/out",
                                          "latent_dim=4", *overrides])
    resolve_data_options(cfg)
    config = OmegaConf.to_container(cfg, resolve=True)
    dm = build_datamodule(cfg.data, config)
    dm.setup("fit")
    return VAEModule(config=config, data_info=dm.info), dm


@pytest.mark.parametrize(("likelihood", "prior", "posterior", "objective"), MATRIX,
                         ids=["-".join(m) for m in MATRIX])
def test_bf16_mixed_stays_finite_over_the_plugin_matrix(tmp_path, likelihood, prior, posterior, objective):
    """What Lightning's bf16-mixed does on CPU (autocast to bfloat16 around the step, no scaler):
    a few optimizer steps, the loss, every logged term and every gradient finite, and the
    densities computed in float32 (the terms come out as float32)."""
    extra = ["data.binarize=none", "data.dequantize=false"] if likelihood in ("categorical", "discretized_logistic_mixture") else []
    extra += ["encoder.hidden=[32]", "decoder.hidden=[32]"]  # small nets: the matrix runs in seconds
    extra += ["prior.num_components=10"] if prior in ("vamp", "mog") else []
    module, dm = _module(tmp_path, f"likelihood={likelihood}", f"prior={prior}", f"posterior={posterior}",
                         f"objective={objective}", "objective.num_samples=2", *extra)
    opt = torch.optim.Adam(module.parameters(), lr=1e-3)
    images, _ = dm.train_set[list(range(16))]
    for _ in range(3):
        x = dm.to_float(images)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = module(x)
        assert torch.isfinite(out.loss), out.loss
        for name, term in out.terms.items():
            assert term.dtype == torch.float32, name
            assert torch.isfinite(term).all(), name
        opt.zero_grad()
        out.loss.backward()
        for name, p in module.named_parameters():
            if p.grad is not None:
                assert torch.isfinite(p.grad).all(), name
        opt.step()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        ll = module.vae.log_likelihood(dm.to_float(images[:4]), 8, 4)  # the IWAE logsumexp
    assert ll.dtype == torch.float32 and torch.isfinite(ll).all()


#: every plugin once, under float64
FLOAT64 = sorted({next(m for m in MATRIX if m[i] == choice) for i in range(4) for choice in {m[i] for m in MATRIX}})


@pytest.mark.parametrize(("likelihood", "prior", "posterior", "objective"), FLOAT64, ids=["-".join(m) for m in FLOAT64])
def test_64_true_keeps_every_density_in_float64(tmp_path, likelihood, prior, posterior, objective):
    """What Lightning's 64-true does (the module in float64, the batch converted): the loss,
    every term, the gradients and the IWAE bound come out in float64, and each density (p(x|z),
    p(z), q(z|x)) at the same z agrees with the float32 module's on the same weights."""
    from lightning.pytorch.plugins.precision import DoublePrecision

    extra = ["data.binarize=none", "data.dequantize=false"] if likelihood in ("categorical", "discretized_logistic_mixture") else []
    extra += ["encoder.hidden=[32]", "decoder.hidden=[32]"]
    extra += ["prior.num_components=10"] if prior in ("vamp", "mog") else []
    module, dm = _module(tmp_path, f"likelihood={likelihood}", f"prior={prior}", f"posterior={posterior}",
                         f"objective={objective}", "objective.num_samples=2", *extra)
    images, _ = dm.train_set[list(range(16))]
    x32 = dm.to_float(images)
    double = DoublePrecision()
    module64 = double.convert_module(copy.deepcopy(module))
    x64 = double.convert_input(x32)
    out64 = module64(x64)
    for name, term in {"loss": out64.loss, **out64.terms}.items():
        assert term.dtype == torch.float64 and torch.isfinite(term).all(), name
    out64.loss.backward()
    assert all(p.grad is None or (p.grad.dtype == torch.float64 and torch.isfinite(p.grad).all())
               for p in module64.parameters())
    # each density at the same z in float64 and float32: the same numbers but for float32's rounding
    z64 = torch.randn(16, 4, dtype=torch.float64)
    with torch.no_grad():
        ll = module64.vae.log_likelihood(x64, 8, 4)
        assert ll.dtype == torch.float64 and torch.isfinite(ll).all()
        for vae, x, z in ((module64.vae, x64, z64), (module.vae, x32, z64.float())):
            densities = torch.stack([vae.decode(z).log_prob(x), vae.prior_distribution().log_prob(z),
                                     vae.encode(x).log_prob(z)])
            assert densities.dtype == z.dtype
            if z.dtype == torch.float64:
                in_float64 = densities
    torch.testing.assert_close(densities.double(), in_float64, rtol=1e-4, atol=1e-3)


@pytest.mark.slow
def test_64_true_trains_and_evaluates_end_to_end(tmp_path):
    out = tmp_path / "run"
    # (64: 64-true's older name, not a precision the machine swapped: no "runs as" warning; helper 18)
    proc = check(run_cli("train.py", "trainer.precision=64", "trainer.max_epochs=1", "+trainer.limit_train_batches=5",
                         *FAST, "logger=none", f"hydra.run.dir={out}", cwd=tmp_path, env=_env()))
    assert "runs as" not in proc.stdout + proc.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert summary["precision"] == "64-true" and all(math.isfinite(v) for v in summary["test"].values())
    # reported in float64 too (torchmetrics' float32 states rounded every number; helper 18)
    rounded = {k: v for k, v in summary["test"].items() if float(np.float32(v)) == v and v != int(v)}
    assert not rounded, rounded
    state = torch.load(out / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)["state_dict"]
    assert {t.dtype for t in state.values() if t.is_floating_point()} == {torch.float64}
    for precision in ("64-true", "32-true"):
        ev = tmp_path / f"eval-{precision}"
        check(run_cli("eval.py", f"ckpt_path={out}", f"trainer.precision={precision}", "evaluation.test_num_samples=5",
                      f"hydra.run.dir={ev}", cwd=tmp_path, env=_env()))
        assert math.isfinite(json.loads((ev / "metrics.json").read_text())["metrics"]["test/nll"])


@pytest.mark.slow
def test_bf16_mixed_trains_end_to_end_under_lightning(tmp_path):
    out = tmp_path / "run"
    # (with gradient clipping, which Lightning refuses with the fused optimizer kernels under mixed precision)
    check(run_cli("train.py", "trainer.precision=bf16-mixed", "prior=vamp", "objective=iwae", "trainer.max_epochs=1",
                  "trainer.gradient_clip_val=0.5", "+trainer.limit_train_batches=5", *FAST, "logger=none",
                  f"hydra.run.dir={out}", cwd=tmp_path, env=_env()))
    summary = json.loads((out / "summary.json").read_text())
    assert all(math.isfinite(v) for v in summary["test"].values())
    assert summary["precision"] == "bf16-mixed"


@pytest.mark.slow
def test_fp16_on_a_cpu_is_recorded_as_the_bf16_that_ran(tmp_path):
    out = tmp_path / "run"
    proc = check(run_cli("train.py", "trainer.precision=16-mixed", "trainer.accelerator=cpu", "trainer.max_epochs=1",
                         "+trainer.limit_train_batches=3", *FAST, "logger=none", f"hydra.run.dir={out}",
                         cwd=tmp_path, env=_env()))
    assert "trainer.precision=16-mixed runs as bf16-mixed on this machine" in proc.stdout + proc.stderr
    assert json.loads((out / "summary.json").read_text())["precision"] == "bf16-mixed"


# --- sweeps -------------------------------------------------------------------------------------
BOOM = (
    "import lightning.pytorch as pl\n"
    "class Boom(pl.Callback):\n"
    "    def on_train_epoch_end(self, trainer, module):\n"
    "        if module.config['latent_dim'] == 2 and module.config['seed'] == 0:\n"
    "            raise RuntimeError('boom: injected failure')\n"
)


@pytest.mark.slow
def test_a_2x2_multirun_makes_4_runs_in_one_group_and_survives_a_failing_job(tmp_path):
    (tmp_path / "boom.py").write_text(BOOM)
    sweep = tmp_path / "sweep"
    proc = run_cli("train.py", "-m", "latent_dim=2,4", "seed=0,1", "allowed_targets=[boom.]",
                   "+callbacks.boom._target_=boom.Boom", "trainer.max_epochs=1", *FAST,
                   f"hydra.sweep.dir={sweep}", cwd=tmp_path, env=_env(tmp_path), timeout=400)
    assert "boom: injected failure" in proc.stderr + proc.stdout  # job #0 failed first ...
    # ... the sweep's end names it, and the sweep exits non-zero
    assert proc.returncode != 0 and "1 of 4 sweep jobs failed" in proc.stderr
    assert f"{sweep / '0'}: RuntimeError: boom: injected failure" in proc.stderr
    folders = sorted(p.name for p in sweep.iterdir() if p.is_dir())
    assert folders == ["0", "1", "2", "3"]  # ... and the sweep went on
    runs = {job: read_run(find_runs(sweep / job)[0]) for job in folders}
    assert all(len(find_runs(sweep / job)) == 1 for job in folders)
    assert len({r.run_id for r in runs.values()}) == 4
    groups = {_run_group(find_runs(sweep / job)[0]) for job in folders}
    assert groups == {"sweep"}  # the sweep folder, relative to where it was started
    assert [runs[j].exit_code for j in folders] == [1, 0, 0, 0]
    assert [json.loads((sweep / j / "summary.json").read_text())["failed"] for j in folders] == [True, False, False, False]


@pytest.mark.slow
def test_a_sweep_with_bad_jobs_is_refused_before_any_or_reported_and_its_folder_not_reused(tmp_path):
    # a value of a grid's option that fails the config check: refused before any job runs
    sweep = tmp_path / "refused"
    proc = run_cli("train.py", "-m", "latent_dim=4,-3", "trainer.max_epochs=1", "logger=none", *FAST,
                   f"hydra.sweep.dir={sweep}", cwd=tmp_path, env=_env(), timeout=400)
    assert proc.returncode != 0 and "1 of the sweep's jobs would fail the config check; nothing has run" in proc.stderr
    assert "job 1 (latent_dim=-3 " in proc.stderr and "latent_dim must be a positive integer, got -3" in proc.stderr
    assert not sweep.exists() or not any(sweep.iterdir())
    # a config group option that does not exist (a typo), likewise (before: a warning that this check itself
    # failed, then Hydra's error, and multirun.yaml left in the folder)
    proc = run_cli("train.py", "-m", "likelihood=bernoulli,gausian", "trainer.max_epochs=1", "logger=none", *FAST,
                   f"hydra.sweep.dir={sweep}", cwd=tmp_path, env=_env(), timeout=400)
    assert proc.returncode != 0 and "1 of the sweep's jobs would fail the config check" in proc.stderr
    assert "job 1 (likelihood=gausian " in proc.stderr and "likelihood/gausian" in proc.stderr, proc.stderr[-2000:]
    assert not sweep.exists() or not any(sweep.iterdir())
    # Optuna's search space: every choice and both ends of each interval, before the first trial
    # (a trial that fails counts as -inf and the search goes on, spending its trials)
    proc = run_cli("train.py", "-m", "hparams_search=optuna", "latent_dim=choice(8,0)",
                   "likelihood=choice(bernoulli,gausian)", "optim.optimizer.lr=interval(-1.0,0.001)", "trainer.max_epochs=1",
                   "logger=none", *FAST, f"hydra.sweep.dir={sweep}", cwd=tmp_path, env=_env(), timeout=400)
    assert proc.returncode != 0 and "3 of the search space's values would fail the config check" in proc.stderr
    assert "latent_dim=0 (of the search space latent_dim=choice(8,0)): latent_dim must be a positive" in proc.stderr
    assert "likelihood=gausian (of the search space" in proc.stderr and "optim.optimizer.lr=-1.0 (" in proc.stderr
    assert "latent_dim=8 (" not in proc.stderr and "optim.optimizer.lr=0.001 (" not in proc.stderr
    assert not sweep.exists() or not any(sweep.iterdir())
    # a job that fails its own check when it starts (its checkpoint is missing): the others run,
    # its summary.json says why, the report lists it, and the sweep exits non-zero naming it
    sweep = tmp_path / "sweep"
    missing = tmp_path / "missing.ckpt"
    proc = run_cli("train.py", "-m", f"ckpt_path=null,{missing}", "trainer.max_epochs=1", "logger=none", *FAST,
                   f"hydra.sweep.dir={sweep}", cwd=tmp_path, env=_env(), timeout=400)
    assert proc.returncode != 0 and "1 of 2 sweep jobs failed" in proc.stderr and f"no checkpoint at {missing}" in proc.stderr
    assert "Traceback" not in proc.stdout + proc.stderr  # an explained error: its message alone, as a single run prints it
    summaries = [json.loads((sweep / j / "summary.json").read_text()) for j in ("0", "1")]
    assert [s["failed"] for s in summaries] == [False, True]
    assert f"no checkpoint at {missing}" in summaries[1]["error"]
    report = check(run_cli("report.py", str(sweep), cwd=tmp_path, env=_env()))
    rows = [line for line in report.stdout.splitlines() if line.startswith("| 0 ") or line.startswith("| 1 ")]
    assert len(rows) == 2 and rows[0].endswith("| ok |") and "failed: ConfigError" in rows[1], report.stdout
    assert f"no checkpoint at {missing}" in rows[1]  # the problem itself, not only the error's first line
    # the same sweep again into its folder: refused before any job, nothing of the first touched
    before = snapshot(sweep)
    again = run_cli("train.py", "-m", f"ckpt_path=null,{missing}", "trainer.max_epochs=1", "logger=none", *FAST,
                    f"hydra.sweep.dir={sweep}", cwd=tmp_path, env=_env(), timeout=400)
    assert again.returncode != 0 and f"hydra.sweep.dir={sweep} holds the runs of an earlier sweep" in again.stderr
    assert snapshot(sweep) == before


@pytest.mark.slow
def test_a_requeued_sweep_continues_its_jobs_in_its_folder(tmp_path):
    sweep = tmp_path / "sweep"
    args = ("-m", "ckpt_path=last", "latent_dim=4,8", "logger=none", *FAST, f"hydra.sweep.dir={sweep}")
    proc = check(run_cli("train.py", *args, "trainer.max_epochs=1", cwd=tmp_path, env=_env(), timeout=400))
    # a new folder: said once, for the sweep (a forgotten hydra.sweep.dir), not warned by each job
    assert proc.stderr.count("holds no jobs of an earlier sweep: each job starts from scratch") == 1
    started = {p: p.read_bytes() for p in [sweep / "multirun.yaml", *sweep.glob("0/.hydra/*")]}
    assert len(started) == 4
    shutil.rmtree(sweep / "1")  # a job that never ran before the requeue
    # the same command after a requeue (one more epoch): each job continues its own run, and the
    # files of the command that started the sweep stay as they were (Hydra rewrote them)
    proc = check(run_cli("train.py", *args, "trainer.max_epochs=2", cwd=tmp_path, env=_env(), timeout=400))
    assert {p: p.read_bytes() for p in started} == started
    # the job that had not started starts afresh, as ckpt_path=last in a sweep means: no warning (helper 27)
    assert "has no checkpoints/last.ckpt yet" not in proc.stdout + proc.stderr and "holds no jobs" not in proc.stderr
    assert f"ckpt_path=last: {sweep / '1'} has no checkpoint yet, so this job starts from scratch" in \
        (sweep / "1" / "cli.log").read_text()
    summary = json.loads((sweep / "0" / "summary.json").read_text())
    assert summary["resumed_from"] and not summary["failed"] and summary["trained"]["epochs"] == 2
    assert "ckpt_path=last" in summary["resumed_with"]
    fresh = json.loads((sweep / "1" / "summary.json").read_text())  # from scratch: with its own Hydra files
    assert not fresh["resumed_from"] and (sweep / "1" / ".hydra" / "overrides.yaml").is_file()
    # requeued with the values swapped: each job's resume is refused, its run left as it was, and
    # the sweep lists both and exits non-zero (it exited 0: each job's folder kept a finished
    # run's summary.json, where the sweep's end looked for failures; helper 27)
    kept = {p: p.read_bytes() for p in sweep.glob("*/summary.json")}
    swapped = [a if a != "latent_dim=4,8" else "latent_dim=8,4" for a in args]
    proc = run_cli("train.py", *swapped, "trainer.max_epochs=2", cwd=tmp_path, env=_env(), timeout=400)
    assert proc.returncode != 0 and "2 of 2 sweep jobs failed" in proc.stderr, proc.stderr[-3000:]
    assert proc.stderr.count("ResumeConfigError") >= 2 and f"{sweep / '0'}: ResumeConfigError" in proc.stderr
    assert {p: p.read_bytes() for p in kept} == kept and len(kept) == 2


def test_a_requeued_search_whose_trials_were_refused_keeps_its_results(tmp_path, capsys):
    """A requeued Optuna search whose sampler proposed other values (another seed or search
    space) has each trial's resume refused: the sweep's end lists them from the sweep's record
    (each folder keeps its finished run's summary.json), puts the search's
    optimization_results.yaml back (it was replaced by one with best_value -inf) and keeps this
    command's beside it; a record from an earlier command is not this one's (helper 27)."""
    import time

    from omegaconf import OmegaConf

    from vaelab.folders import RunFolders, record_sweep_failure

    sweep = tmp_path / "sweep"
    for job in ("0", "1"):
        (sweep / job / ".hydra").mkdir(parents=True)
        (sweep / job / "summary.json").write_text(json.dumps({"failed": False, "best_score": -20.0}))
    record_sweep_failure(sweep, sweep / "1", "ResumeConfigError: an older command's")
    folders = RunFolders()
    folders._started = time.time() + 1e-3
    time.sleep(0.01)
    folders._optuna_results = b"best_value: -20.0\n"
    (sweep / "optimization_results.yaml").write_text("best_value: -.inf\n")
    record_sweep_failure(sweep, sweep / "0", "ResumeConfigError: latent_dim: 8 -> 16")
    config = OmegaConf.create({"hydra": {"sweep": {"dir": str(sweep)}}})
    with pytest.raises(SystemExit):
        folders.on_multirun_end(config)
    said = capsys.readouterr().err
    assert "1 of 2 sweep jobs failed" in said and f"{sweep / '0'}: ResumeConfigError: latent_dim: 8 -> 16" in said
    assert "an older command's" not in said
    assert (sweep / "optimization_results.yaml").read_text() == "best_value: -20.0\n"
    assert (sweep / "optimization_results.refused.yaml").read_text() == "best_value: -.inf\n"
    assert "optimization_results.refused.yaml" in said


def test_an_optuna_storage_the_installed_optuna_cannot_open_is_refused_with_the_fix():
    """hydra.sweeper.storage=sqlite:///... with Optuna 2 (hydra-optuna-sweeper 1.3's) and
    SQLAlchemy 2 stopped in an AssertionError deep in Optuna (helper 27)."""
    from omegaconf import OmegaConf

    from vaelab.folders import optuna_storage_problem

    config = OmegaConf.create({"hydra": {"sweeper": {"_target_": "hydra_plugins.hydra_optuna_sweeper.optuna_sweeper."
                                                                 "OptunaSweeper", "storage": "sqlite:///optuna.db"}}})
    said = optuna_storage_problem(config, {"optuna": "2.10.1", "sqlalchemy": "2.1.9"})
    assert said.startswith("hydra.sweeper.storage=sqlite:///optuna.db: Optuna 2.10.1 (hydra-optuna-sweeper needs "
                           "Optuna 2) cannot open a database with SQLAlchemy 2.1.9: pip install 'sqlalchemy<2' "
                           "'alembic<1.14'")
    assert optuna_storage_problem(config, {"optuna": "2.10.1", "sqlalchemy": "1.4.54"}) is None
    assert optuna_storage_problem(config, {"optuna": "4.1.0", "sqlalchemy": "2.1.9"}) is None
    for storage in (None, "redis://localhost:6379"):  # (Optuna's RedisStorage needs no SQLAlchemy)
        config.hydra.sweeper.storage = storage
        assert optuna_storage_problem(config, {"optuna": "2.10.1", "sqlalchemy": "2.1.9"}) is None


def test_a_single_run_that_fails_still_exits_nonzero(tmp_path):
    proc = run_cli("train.py", "objective.beta=-1", f"hydra.run.dir={tmp_path}/run", cwd=tmp_path, env=_env())
    assert proc.returncode != 0 and "beta" in proc.stderr


def test_sweep_group_is_null_outside_a_sweep(tmp_path):
    with initialize_config_module(config_module="vaelab.conf", version_base="1.3"):
        cfg = compose("train", overrides=[f"paths.output_dir={tmp_path}"])
    assert cfg.logger.wandb.group is None and cfg.logger.wandb.resume == "allow"


def test_the_optuna_search_composes(tmp_path):
    with initialize_config_module(config_module="vaelab.conf", version_base="1.3"):
        cfg = compose("train", overrides=["hparams_search=optuna"], return_hydra_config=True)
    sweeper = cfg.hydra.sweeper
    assert sweeper.direction == "maximize" and "optim.optimizer.lr" in sweeper.params
    assert "latent_dim" in sweeper.params


def test_the_optuna_search_space_is_checked_at_its_ends_and_choices():
    """sweep_value_problems for Optuna: each choice, both ends of an interval or a range (not
    every value in between), the command line's entry for a key in place of the config's."""
    from omegaconf import open_dict, read_write

    from vaelab.folders import sweep_value_problems

    with initialize_config_module(config_module="vaelab.conf", version_base="1.3"):
        cfg = compose("train", overrides=["hparams_search=optuna"], return_hydra_config=True)
        assert sweep_value_problems(cfg) == []  # the search space as shipped
        with read_write(cfg), open_dict(cfg):
            cfg.hydra.sweeper.params.latent_dim = "choice(0,8)"  # replaced by the command line's range
            cfg.hydra.overrides.task = ["hparams_search=optuna", "latent_dim=range(0,40)", "seed=range(-2,5)",
                                        "data.batch_size=choice(32,0,64)", "optim.optimizer.lr=interval(0.001,0.01)"]
        problems = sweep_value_problems(cfg)
    # (seeds are numpy's: 0 to 2^32-1)
    assert [p.split(" (")[0] for p in problems] == ["latent_dim=0", "seed=-2", "data.batch_size=0"], problems
    assert "(of the search space latent_dim=range(0,40))" in problems[0]


@pytest.mark.parametrize("search", [False, True])
def test_a_sweep_over_a_plugin_in_a_searchpath_folder_is_checked_with_that_folder(tmp_path, search):
    """hydra.searchpath=[file://myconf] (README: Adding a plugin) is one of Hydra's own overrides,
    not the task's: the sweep's up-front check composed each job without it, so every job of a
    sweep (or every value of a search) over a plugin's option was refused as 'Could not find
    likelihood/my_laplace' (found by helper 19). Its jobs compose with it, and a bad value in
    them is still found."""
    from omegaconf import open_dict, read_write

    from vaelab.folders import sweep_value_problems

    (tmp_path / "likelihood").mkdir()
    (tmp_path / "likelihood" / "my_laplace.yaml").write_text("_target_: vaelab.likelihoods.Laplace\n")
    searchpath = f"hydra.searchpath=[file://{tmp_path}]"
    task = ["likelihood=my_laplace", "seed=0,1", "latent_dim=8,0"]
    with initialize_config_module(config_module="vaelab.conf", version_base="1.3"):
        cfg = compose("train", overrides=[*(["hparams_search=optuna"] if search else []), searchpath],
                      return_hydra_config=True)
        with read_write(cfg), open_dict(cfg):
            if search:
                cfg.hydra.sweeper.params = {"latent_dim": "choice(8,0)"}
                task = ["hparams_search=optuna", "likelihood=my_laplace"]
            cfg.hydra.overrides.task = task
            cfg.hydra.overrides.hydra = [searchpath]
        problems = sweep_value_problems(cfg)
    assert not [p for p in problems if "Could not find" in p], problems
    if search:
        assert [p.split(" (")[0] for p in problems] == ["latent_dim=0"], problems
    else:
        assert [p.split(" (")[0] for p in problems] == ["job 1", "job 3"], problems


def test_a_search_without_multirun_says_it_is_one_job(tmp_path):
    """hparams_search=optuna without -m ran one ordinary job, silently (found by helper 19)."""
    proc = run_cli("train.py", "hparams_search=optuna", "latent_dim=0", f"hydra.run.dir={tmp_path / 'run'}",
                   cwd=tmp_path, env=_env())
    assert proc.returncode != 0 and "latent_dim must be a positive integer" in proc.stderr  # (refused: quick)
    assert ("hparams_search=optuna without -m runs one training job with the config's own values, not a search: "
            "add -m") in proc.stdout + proc.stderr


@pytest.mark.slow
def test_optuna_search_with_submitit_local_runs_two_trials(tmp_path):
    sweep = tmp_path / "sweep"
    proc = check(run_cli("train.py", "-m", "hparams_search=optuna", "hydra.sweeper.n_trials=2",
                         "hydra/launcher=submitit_local", "hydra.launcher.timeout_min=10", "trainer.max_epochs=1",
                         "+trainer.limit_train_batches=5", *FAST, f"hydra.sweep.dir={sweep}", cwd=tmp_path, env=_env(),
                         timeout=400))
    assert "alembic" not in proc.stdout + proc.stderr  # Optuna's storages' "setup plugin alembic..." lines
    result = OmegaConf.load(sweep / "optimization_results.yaml")
    assert math.isfinite(result.best_value) and result.best_value < 0  # val/elbo, nats
    assert set(result.best_params) == {"optim.optimizer.lr", "latent_dim"}
    summaries = [json.loads(p.read_text()) for p in sweep.glob("*/summary.json")]
    assert len(summaries) == 2 and max(s["best_val_elbo"] for s in summaries) == pytest.approx(result.best_value)
    assert len(find_runs(sweep)) == 2


# --- resume -------------------------------------------------------------------------------------
def test_random_streams_continue_from_a_checkpoint_or_are_seeded_afresh_with_a_warning():
    """The state a checkpoint holds is set again at the resumed run's start; one from another
    number of processes (or none, from an older checkpoint) cannot be, and each process is
    seeded from the seed, its rank and the step: not the run's start's draws again."""
    from types import SimpleNamespace

    from vaelab.distributed import RandomStreams

    def trainer(world_size=1, rank=0, ckpt_path="x.ckpt"):
        return SimpleNamespace(world_size=world_size, global_rank=rank, ckpt_path=ckpt_path, global_step=28,
                               strategy=SimpleNamespace(root_device=torch.device("cpu")))

    torch.manual_seed(5)
    streams = RandomStreams(seed=5)
    streams.setup(trainer(), None, "fit")
    saved = streams.state_dict()
    assert len(saved["ranks"]) == 1
    want = torch.rand(4)
    torch.manual_seed(5)  # what the resumed run's own seeding gives: the run's first draws
    first_draws = torch.rand(4)
    resumed = RandomStreams(seed=5)
    resumed.load_state_dict(saved)
    resumed.on_train_start(trainer(), None)
    assert torch.equal(torch.rand(4), want)
    for state, why in (({"ranks": saved["ranks"] * 2}, "of 2 processes, this run has 1"), (None, "saved before")):
        fresh = RandomStreams(seed=5)
        if state is not None:
            fresh.load_state_dict(state)
        torch.manual_seed(5)
        with pytest.warns(UserWarning, match=rf"{why}.*seeded from seed=5, its rank and the step \(28\)"):
            fresh.on_train_start(trainer(), None)
        got = torch.rand(4)
        assert not torch.equal(got, first_draws) and not torch.equal(got, want)
    torch.manual_seed(5)
    RandomStreams(seed=5).on_train_start(trainer(ckpt_path=None), None)  # a fresh run: left alone
    assert torch.equal(torch.rand(4), first_draws)


@pytest.mark.slow
@pytest.mark.parametrize(("processes", "stop", "at"),
                         [("one", "error", 31), ("ddp_sim", "error", 31), ("one", "sigterm", 31), ("one", "sigterm", 19)])
def test_a_run_stopped_inside_an_epoch_and_resumed_ends_with_the_uninterrupted_runs_weights(tmp_path, processes,
                                                                                             stop, at,
                                                                                             tmp_path_factory):
    """Stopped by an error at step 31 of 60 (20 a epoch, a step checkpoint every 7), resumed
    with ``ckpt_path=<run folder>`` from step 28: the rest of epoch 1 takes that epoch's order
    (the training loader's place) and every process draws what the uninterrupted run drew (its
    random streams), so the final weights are the uninterrupted run's bit for bit, and so are
    the validation and test numbers. Under DDP (two CPU processes) each rank continues its own
    shard and its own streams. Stopped by SIGTERM during step 31 instead, the run saves the
    state after that step and exits 143; resumed from step 32, it too ends bit for bit as the
    uninterrupted run. So does one stopped during step 19, an epoch's last, resumed from its
    latest-step20.ckpt: a save at a step after which a validation runs is made again after that
    validation (which, of one batch here, the stop does not cut short). On one process also a run trained for 2 epochs and resumed from its end with
    trainer.max_epochs=3 ends as the 3-epoch run."""
    how = "raise RuntimeError('stopped on purpose')" if stop == "error" else "os.kill(os.getpid(), signal.SIGTERM)"
    (tmp_path / "stop.py").write_text(
        "import os, signal\nfrom pathlib import Path\nimport lightning.pytorch as pl\n"
        "class StopOnce(pl.Callback):\n"
        "    def __init__(self, step, marker):\n        self.step, self.marker = step, Path(marker)\n"
        "    def on_train_batch_start(self, trainer, *args):\n"
        "        if trainer.global_step == self.step and not self.marker.exists():\n"
        f"            self.marker.touch()\n            {how}\n"
    )
    common = ["trainer.max_epochs=3", "callbacks.step_checkpoint.every_n_train_steps=7", "logger=csv", *FAST]
    if processes == "ddp_sim":
        common += ["trainer=ddp_sim", "data.batch_size=32"]
    cut = tmp_path / "cut"
    # the uninterrupted run, made once for the cases of each number of processes
    whole = _shared_run(tmp_path_factory, f"whole-{processes}", lambda folder: check(run_cli(
        "train.py", *common, f"hydra.run.dir={folder}", cwd=folder.parent, env=_env())))
    stopped = run_cli("train.py", *common, "allowed_targets=[stop.]", "+callbacks.stop._target_=stop.StopOnce",
                      f"+callbacks.stop.step={at}", f"+callbacks.stop.marker={tmp_path / 'stopped'}",
                      f"hydra.run.dir={cut}", cwd=tmp_path, env=_env(tmp_path))
    saved = 28 if stop == "error" else at + 1  # the latest step save; SIGTERM: the step it stopped after
    if stop == "error":
        assert stopped.returncode != 0 and "stopped on purpose" in stopped.stderr
    else:
        assert stopped.returncode == 143, stopped.stderr[-2000:]
        # (epochs counted from 1, as the console's epoch lines: step 32 is in the second of three;
        # step 20, the first's last, is stopped after that epoch's end)
        where = f"(epoch {saved // 20 + 1}/3)" if saved % 20 else f", at the end of epoch {saved // 20}/3"
        assert (f"at step {saved}{' ' if saved % 20 else ''}{where} of its training. Its state at that step is saved "
                f"(latest-step{saved}.ckpt); continue it: python train.py ckpt_path={cut}") in stopped.stdout + stopped.stderr
    assert sorted(p.name for p in (cut / "checkpoints").glob("latest-step*.ckpt")) == [f"latest-step{saved}.ckpt"]
    source = cut
    if saved % 20 == 0:
        # an epoch's last step: saved after that epoch's validation, at its end (the same state as
        # the best checkpoint of that epoch: one file); from a save before the validation, Lightning's
        # resume skipped the validation and the run drew other random numbers from there on
        latest = cut / "checkpoints" / f"latest-step{saved}.ckpt"
        assert latest.samefile(cut / "checkpoints" / f"best-epoch{saved // 20 - 1:03d}-step{saved}.ckpt")
        source = latest
    resumed = check(run_cli("train.py", f"ckpt_path={source}", "allowed_targets=[stop.]",
                            f"hydra.run.dir={tmp_path / 'resume'}", cwd=tmp_path, env=_env(tmp_path)))
    assert "not resumable" not in resumed.stderr and "random streams" not in resumed.stderr

    def final(run):
        summary = json.loads((run / "summary.json").read_text())
        weights = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)["state_dict"]
        return summary, weights

    (a, weights_a), (b, weights_b) = final(whole), final(cut)
    assert Path(b["resumed_from"]).name == f"latest-step{saved}.ckpt" and not b["failed"]
    assert weights_a.keys() == weights_b.keys()
    assert all(torch.equal(weights_a[k], weights_b[k]) for k in weights_a)
    assert b["best_val_elbo"] == a["best_val_elbo"] and b["test"] == a["test"]
    if processes == "one" and stop == "error":
        # "train longer" (README): 2 epochs, then resumed from the end with trainer.max_epochs=3
        longer = tmp_path / "longer"
        check(run_cli("train.py", *common, "trainer.max_epochs=2", f"hydra.run.dir={longer}", cwd=tmp_path,
                      env=_env(tmp_path)))
        check(run_cli("train.py", f"ckpt_path={longer}", "trainer.max_epochs=3", f"hydra.run.dir={tmp_path / 'r2'}",
                      cwd=tmp_path, env=_env(tmp_path)))
        c, weights_c = final(longer)
        assert Path(c["resumed_from"]).name == "latest-step40.ckpt"
        assert all(torch.equal(weights_a[k], weights_c[k]) for k in weights_a)
        assert c["best_val_elbo"] == a["best_val_elbo"] and c["test"] == a["test"]


@pytest.mark.slow
def test_a_run_killed_mid_epoch_resumes_in_the_same_wandb_run(tmp_path):
    """SIGKILL once a step checkpoint exists (mid-epoch: 20 steps per epoch, one every 7), then
    ``ckpt_path=<run folder>``: the same W&B run id, the training steps continue after the
    checkpoint's step with none repeated or skipped, and training ends at the right epoch."""
    run_dir = tmp_path / "run"
    epochs = 4
    # 50 ms a step, so that the kill lands where it is aimed whatever the machine's load
    (tmp_path / "slow.py").write_text(
        "import time\nimport lightning.pytorch as pl\n"
        "class Slow(pl.Callback):\n"
        "    def on_train_batch_end(self, *args):\n        time.sleep(0.05)\n"
    )
    args = [sys.executable, str(REPO / "train.py"), f"trainer.max_epochs={epochs}", "trainer.log_every_n_steps=1",
            "callbacks.step_checkpoint.every_n_train_steps=7", "allowed_targets=[slow.]",
            "+callbacks.slow._target_=slow.Slow", *FAST, f"hydra.run.dir={run_dir}"]
    env = {**os.environ, **_env(tmp_path), "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(args, cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 240
        target = None
        while time.time() < deadline and proc.poll() is None:
            steps = [int(p.stem.removeprefix("latest-step")) for p in (run_dir / "checkpoints").glob("latest-step*.ckpt")]
            if steps and max(steps) >= 21:  # in epoch 2, mid-epoch (steps 21, 28 or 35)
                target = max(steps)
                break
            time.sleep(0.05)
        assert proc.poll() is None and target is not None, "the run finished or stalled before a step checkpoint"
        time.sleep(0.15)  # a few steps past the checkpoint: those are lost and done again
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert not (run_dir / "summary.json").exists()  # killed before the end

    (first_file,) = find_runs(run_dir)
    first = read_run(first_file)
    resumed = check(run_cli("train.py", f"ckpt_path={run_dir}", "allowed_targets=[slow.]",
                            f"hydra.run.dir={tmp_path}/resume", cwd=tmp_path, env=_env(tmp_path)))

    files = find_runs(run_dir)
    assert len(files) == 2
    # the upload command covers both parts (it named this command's part alone)
    assert (f"W&B run (offline) {files[1].parent} and 1 earlier part beside it   upload with: wandb sync "
            f"{run_dir / 'wandb'}\n") in resumed.stdout + resumed.stderr
    second = read_run(next(f for f in files if f != first_file))
    # W&B's offline writer fills 32 KiB blocks before they reach the disk: a SIGKILL can take the
    # last rows of the killed part (here, a short run, all of them: the file may be its header
    # only). The run id is also in the folder name, offline-run-<time>-<id>.
    first_id = first.run_id or first_file.parent.name.rsplit("-", 1)[1]
    assert second.run_id == first_id and second.exit_code == 0

    summary = json.loads((run_dir / "summary.json").read_text())
    assert Path(summary["resumed_from"]).name.startswith("latest-step")
    # the killed command, which wrote no summary, is in the list, as of the checkpoint resumed from
    killed, resumed = summary["commands"]
    assert killed["failed"] and killed["error"].startswith("stopped without writing its summary (killed")
    assert killed["trained"]["global_step"] == int(Path(summary["resumed_from"]).stem.removeprefix("latest-step"))
    assert killed["wall_time_s"] > 0 and killed["started_at"] < resumed["started_at"] and not resumed["failed"]
    assert summary["wall_time_s"] == pytest.approx(killed["wall_time_s"] + resumed["wall_time_s"], abs=0.051)

    def train_steps(run):
        return [int(r["trainer/global_step"]) for r in run.history if "train/loss" in r]

    # train/loss of step s is logged with trainer/global_step = s (0-based, before the update)
    before, after = train_steps(first), train_steps(second)
    assert before == list(range(len(before)))  # what reached the disk before the kill
    resumed_step = after[0]
    # from the newest step checkpoint (every 7 steps, mid-epoch: epochs have 20), none older
    assert resumed_step >= target and resumed_step % 7 == 0 and resumed_step % 20 != 0
    assert after == list(range(resumed_step, epochs * 20))  # no repeats, nothing lost
    # the resumed part finishes the interrupted epoch and the rest: one validation each
    assert max(r["epoch"] for r in second.history if "train/loss" in r) == epochs - 1
    assert len(second.values("val/elbo")) == epochs - resumed_step // 20
    assert [p.name for p in (run_dir / "checkpoints").glob("latest-step*.ckpt")] == [f"latest-step{epochs * 20}.ckpt"]
    assert summary["best_checkpoint"] and not summary["failed"]
    # the interrupted epoch, which Lightning resumes without its on_train_epoch_start: its means
    # (over the steps trained since the resume) and its throughput, timed from the resume
    resumed_epoch = resumed_step // 20
    assert [int(r["epoch"]) for r in second.history if "train/elbo_epoch" in r] == list(range(resumed_epoch, epochs))
    figures = json.loads((run_dir / "throughput.json").read_text())["epochs"]
    # the killed command's whole epochs too (the file is written after each epoch)
    assert [e["epoch"] for e in figures] == list(range(epochs))
    first_figure, left = figures[resumed_epoch], 20 * (resumed_epoch + 1) - resumed_step  # batches left in that epoch
    # those steps' images: the rest of the epoch's order, 64 a batch and 41 in its last
    assert first_figure["images"] == (left - 1) * 64 + 1257 - 19 * 64, (first_figure, left)
    assert 0 < first_figure["seconds"] < 60 and first_figure["images_per_sec"] > 10, first_figure


def test_a_sigterm_during_the_tests_only_batch_stops_the_importance_sampling(tmp_path):
    """SIGTERM as the test's one batch starts (the digits' test split is one batch; any split's
    last batch is the same case): the importance sampling stops at its next forward pass and the
    run exits 143, saying it stopped during its test. Lightning checks only between evaluation
    batches, and not after the last, so the test ran on to its end (K = 1000: minutes on a real
    split, past a job's time limit) and the run exited 0."""
    run_dir = tmp_path / "run"
    (tmp_path / "term.py").write_text(
        "import os, signal\nimport lightning.pytorch as pl\n"
        "class TermAtTest(pl.Callback):\n"
        "    def on_test_batch_start(self, *args):\n        os.kill(os.getpid(), signal.SIGTERM)\n"
    )
    proc = run_cli("train.py", "trainer.max_epochs=1", "logger=csv", "allowed_targets=[term.]",
                   "+callbacks.term._target_=term.TermAtTest", "evaluation.test_num_samples=100000",
                   "evaluation.chunk_size=100", "callbacks.images.every_n_epochs=1000", f"hydra.run.dir={run_dir}",
                   cwd=tmp_path, env=_env(tmp_path))
    assert proc.returncode == 143, (proc.returncode, proc.stderr[-2000:])
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["failed"] and summary["error"].startswith(
        "SIGTERM: stopped by SIGTERM (a job's time limit, timeout, kill) during its test, after its training had finished")
    assert "test" not in summary and summary["trained"]["epochs"] == 1


@pytest.mark.slow
def test_a_run_stopped_by_sigterm_exits_143_naming_where_it_got_and_continues(tmp_path):
    """SIGTERM (a SLURM time limit, ``timeout``, ``kill``) mid-training: exit status 143, not
    the 0 that Lightning's SIGTERMException (a SystemExit without a code) gave, so a job script
    and a requeue see a stopped run; the log and summary.json say where training got and name
    the command that continues it, which then finishes the run keeping the stopped command's
    record."""
    run_dir = tmp_path / "run"
    (tmp_path / "slow.py").write_text(
        "import time\nimport lightning.pytorch as pl\n"
        "class Slow(pl.Callback):\n"
        "    def on_train_batch_end(self, *args):\n        time.sleep(0.05)\n"
    )
    args = [sys.executable, str(REPO / "train.py"), "trainer.max_epochs=4", "logger=csv", "allowed_targets=[slow.]",
            "+callbacks.slow._target_=slow.Slow", *FAST, f"hydra.run.dir={run_dir}"]
    env = {**os.environ, **_env(tmp_path), "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(args, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 240
        while time.time() < deadline and proc.poll() is None and not list((run_dir / "checkpoints").glob("latest-*")):
            time.sleep(0.05)
        assert proc.poll() is None, "the run finished before its first checkpoint"
        time.sleep(0.3)  # into the next epoch
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 143, (proc.returncode, err[-2000:])
    summary = json.loads((run_dir / "summary.json").read_text())
    step = summary["trained"]["global_step"]
    assert summary["failed"] and 20 <= step < 80 and summary["trained"]["max_epochs"] == 4
    where = f" (epoch {step // 20 + 1}/4)" if step % 20 else f", at the end of epoch {step // 20}/4"
    said = f"stopped by SIGTERM (a job's time limit, timeout, kill) at step {step}{where} of its training. "
    # stopped during a step: that step's state is saved; during a validation: the latest save is named
    saved = (run_dir / "checkpoints" / f"latest-step{step}.ckpt").is_file()
    said += (f"Its state at that step is saved (latest-step{step}.ckpt" if saved
             else "Continue it from its latest checkpoint")
    assert said in out + err and summary["error"].startswith(f"SIGTERM: {said}")
    assert f"python train.py ckpt_path={run_dir} 'allowed_targets=[slow.]'" in summary["error"]

    check(run_cli("train.py", f"ckpt_path={run_dir}", "allowed_targets=[slow.]", f"hydra.run.dir={tmp_path}/resume",
                  cwd=tmp_path, env=_env(tmp_path)))
    summary = json.loads((run_dir / "summary.json").read_text())
    assert not summary["failed"] and summary["trained"]["epochs"] == 4 and summary["test"]
    first, second = summary["commands"]
    assert first["failed"] and first["error"].startswith("SIGTERM: stopped by SIGTERM") and first["trained"]["global_step"] == step
    assert not second["failed"] and second["trained"]["global_step"] == 80
