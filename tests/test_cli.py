"""End to end, as a researcher runs it: `python train.py ...` and `python eval.py ...` in
subprocesses, then everything read back from disk (the offline W&B run, images, checkpoints)."""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path

import pytest
import torch
from conftest import REPO, check, poisoned_checkpoint, run_cli
from PIL import Image

from vaelab.build import UnsafeConfigError
from vaelab.checkpoints import CheckpointError, load_checkpoint, load_module
from vaelab.wandb_offline import find_runs, read_run

pytestmark = pytest.mark.slow

EPOCHS = 8


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """One short run of the default experiment (digits, Bernoulli, standard prior, W&B)."""
    out = tmp_path_factory.mktemp("train") / "run"
    proc = check(run_cli("train.py", "likelihood=bernoulli", "prior=standard", f"trainer.max_epochs={EPOCHS}",
                         "evaluation.test_num_samples=200", f"hydra.run.dir={out}", cwd=REPO))
    (out / "console.txt").write_text(proc.stdout + proc.stderr)
    return out


def test_training_raises_val_elbo_and_writes_checkpoints(trained):
    summary = json.loads((trained / "summary.json").read_text())
    assert not summary["failed"]
    run = read_run(find_runs(trained)[0])
    val = run.values("val/elbo")
    assert len(val) == EPOCHS
    assert max(val) > val[0] + 1.0, val  # nats per example
    assert summary["best_val_elbo"] == pytest.approx(max(val), abs=1e-4)
    assert summary["best_monitor"] == "val/elbo" and summary["best_score"] == summary["best_val_elbo"]
    assert Path(summary["best_checkpoint"]).is_file() and (trained / "checkpoints" / "last.ckpt").is_file()


def test_wandb_run_holds_the_elbo_terms_config_and_summary(trained):
    run = read_run(find_runs(trained)[0])
    assert run.exit_code == 0
    # digits has 20 steps an epoch, fewer than log_every_n_steps=50: step values once an epoch,
    # each the mean over the steps since the previous point, so here the epoch's mean
    console = (trained / "console.txt").read_text()
    assert "step values every 20 steps, once an epoch" in console
    assert "smaller than the logging interval" not in console  # Lightning's warning: moot, not shown
    assert "anonymous setting" not in console  # W&B's warning about the None Lightning passed
    assert "LeafSpec" not in console  # torch's deprecation of what Lightning uses: not the user's to fix
    assert "litlogger" not in console  # Lightning's advertisement
    # each Lightning line once (its own console handler and Hydra's both printed it), and in the job's log
    assert console.count("GPU available") == console.count("`Trainer.fit` stopped") == 1
    assert (trained / "cli.log").read_text().count("`Trainer.fit` stopped") == 1
    for key in ("train/elbo", "train/recon", "train/kl", "train/loss", "train/beta"):
        assert len(run.values(key)) == EPOCHS, key
    for term in ("elbo", "recon", "kl", "loss"):
        assert run.values(f"train/{term}") == pytest.approx(run.values(f"train/{term}_epoch"), abs=1e-3), term
    for key in ("train/elbo_epoch", "train/recon_epoch", "train/kl_epoch", "train/loss_epoch", "val/elbo",
                "val/recon", "val/kl", "val/iwae"):
        assert len(run.values(key)) == EPOCHS, key
    for elbo, recon, kl in zip(run.values("val/elbo"), run.values("val/recon"), run.values("val/kl"), strict=True):
        assert elbo == pytest.approx(recon - kl, abs=1e-3)
    for iwae, elbo in zip(run.values("val/iwae"), run.values("val/elbo"), strict=True):
        assert iwae >= elbo - 0.5  # K = 10 tightens the bound (up to sampling noise)
    for key in ("test/elbo", "test/nll", "test/bpd", "test/kl", "test/recon"):
        assert math.isfinite(run.summary[key]), key
    assert -run.summary["test/nll"] >= run.summary["test/elbo"] - 0.2
    assert run.summary["test/bpd"] == pytest.approx(run.summary["test/nll"] / (64 * math.log(2)), rel=1e-4)
    # the whole resolved config, binarization resolved
    assert run.config["likelihood"]["_target_"] == "vaelab.likelihoods.Bernoulli"
    assert run.config["data"]["binarize"] == "dynamic"
    assert run.config["latent_dim"] == 16 and run.config["trainer"]["max_epochs"] == EPOCHS


def test_pictures_in_wandb_and_as_files(trained):
    run = read_run(find_runs(trained)[0])
    recon = run.values("val/reconstructions")
    samples = run.values("val/samples")
    assert len(recon) == EPOCHS and len(samples) == EPOCHS
    # 16 inputs over 16 reconstructions (means) over 16 samples, 8x8 upscaled to 32x32, 2-pixel padding
    expected = {"val/reconstructions": (16 * 34 + 2, 3 * 34 + 2), "val/samples": (8 * 34 + 2, 8 * 34 + 2)}
    for key, entries in (("val/reconstructions", recon), ("val/samples", samples)):
        media = run.files_dir / entries[-1]["filenames"][0]
        assert media.is_file(), media
        assert Image.open(media).size == expected[key]
        assert (entries[-1]["width"], entries[-1]["height"]) == expected[key]
        pngs = sorted((trained / "images" / key.split("/")[1]).glob("epoch=*.png"))
        assert len(pngs) == EPOCHS and Image.open(pngs[-1]).size == expected[key]
    # on W&B's step axis with the numbers of the validation they picture (the epoch's last step)

    def steps(key):
        return [row["trainer/global_step"] for row in run.history if key in row]

    assert steps("val/reconstructions") == steps("val/samples") == steps("val/elbo") == [20 * e + 19 for e in range(EPOCHS)]
    assert steps("test/reconstructions") == steps("test/nll")


def test_eval_reproduces_the_test_numbers(trained, tmp_path):
    summary = json.loads((trained / "summary.json").read_text())
    proc = check(run_cli("eval.py", f"ckpt_path={summary['best_checkpoint']}", "evaluation.test_num_samples=200",
                         f"hydra.run.dir={tmp_path}/eval", cwd=REPO))
    assert "test/nll" in proc.stdout and "nats/example" in proc.stdout
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())["metrics"]
    test = summary["test"]
    assert metrics["test/nll"] == pytest.approx(test["test/nll"], abs=0.15)
    assert metrics["test/elbo"] == pytest.approx(test["test/elbo"], abs=0.5)
    assert metrics["test/bpd"] == pytest.approx(metrics["test/nll"] / (64 * math.log(2)), rel=1e-4)
    # a run folder works as well as a file (it evaluates the checkpoint its summary was tested on)
    check(run_cli("eval.py", f"ckpt_path={trained}", "evaluation.test_num_samples=10",
                  f"hydra.run.dir={tmp_path}/eval2", cwd=REPO))


def test_checkpoint_rebuilds_without_the_command_line(trained):
    module = load_module(trained / "checkpoints" / "last.ckpt")
    x = torch.bernoulli(torch.full((4, 1, 8, 8), 0.3))
    assert module.vae.log_likelihood(x, 20).shape == (4,)
    assert module.config["likelihood"]["_target_"] == "vaelab.likelihoods.Bernoulli"


def test_checkpoint_naming_foreign_code_is_refused_and_runs_nothing(trained, tmp_path):
    bad, marker = poisoned_checkpoint(trained / "checkpoints" / "last.ckpt", tmp_path, "likelihood")
    with pytest.raises(UnsafeConfigError, match="os.system"):
        load_module(bad)
    proc = run_cli("eval.py", f"ckpt_path={bad}", f"hydra.run.dir={tmp_path}/e", cwd=REPO)
    assert proc.returncode != 0 and "os.system" in proc.stderr
    assert not marker.exists()


def test_truncated_or_missing_checkpoints_get_clear_errors(trained, tmp_path):
    data = (trained / "checkpoints" / "last.ckpt").read_bytes()
    cut = tmp_path / "cut.ckpt"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated"):
        load_checkpoint(cut)
    with pytest.raises(CheckpointError, match="no checkpoint at"):
        load_checkpoint(tmp_path / "nothing.ckpt")
    foreign = tmp_path / "foreign.ckpt"
    torch.save({"weights": torch.zeros(2)}, foreign)
    with pytest.raises(CheckpointError, match="not a vaelab checkpoint"):
        load_checkpoint(foreign)
    proc = run_cli("eval.py", f"ckpt_path={cut}", f"hydra.run.dir={tmp_path}/e", cwd=REPO)
    assert proc.returncode != 0 and "truncated" in proc.stderr


def test_gaussian_with_csv_logger_and_conv_nets(tmp_path):
    out = tmp_path / "run"
    check(run_cli("train.py", "likelihood=gaussian", "likelihood.sigma=learned", "prior=standard",
                  "encoder=conv", "decoder=conv", "logger=csv", "trainer.max_epochs=2",
                  "evaluation.test_num_samples=20", f"hydra.run.dir={out}", cwd=REPO))
    rows = (out / "csv" / "metrics.csv").read_text().splitlines()
    header = rows[0].split(",")
    for key in ("val/elbo", "train/elbo", "test/nll", "test/bpd"):
        assert key in header, key
    assert not find_runs(out)  # no W&B run when W&B is not chosen


def test_no_logger_still_trains_and_checkpoints(tmp_path):
    out = tmp_path / "run"
    proc = check(run_cli("train.py", "likelihood=continuous_bernoulli", "logger=none", "trainer.max_epochs=1",
                         "evaluation.test_num_samples=5", f"hydra.run.dir={out}", cwd=REPO))
    assert (out / "checkpoints" / "last.ckpt").is_file()
    assert "test/nll" in proc.stdout
    # output to a pipe: one readable line per epoch, no live-bar carriage returns
    assert "epoch 1/1  train/elbo_epoch" in proc.stdout and "\r" not in proc.stdout


def test_without_the_callbacks_group_the_run_still_ends_cleanly(tmp_path):
    """`~callbacks` leaves Lightning's default checkpoint callback, which monitors nothing: the
    run trains, tests the latest checkpoint and says so (it used to crash formatting a score)."""
    out = tmp_path / "run"
    proc = check(run_cli("train.py", "~callbacks", "logger=none", "trainer.max_epochs=1",
                         "evaluation.test_num_samples=5", f"hydra.run.dir={out}", cwd=REPO))
    summary = json.loads((out / "summary.json").read_text())
    assert not summary["failed"] and summary["best_val_elbo"] is None
    assert Path(summary["best_checkpoint"]).is_file() and "test/nll" in summary["test"]
    assert "the latest: no checkpoint callback monitors a metric" in proc.stdout and summary["best_score"] is None


def test_bernoulli_on_grey_levels_fails_before_training(tmp_path):
    out = tmp_path / "run"
    proc = run_cli("train.py", "likelihood=bernoulli", "data.binarize=none", f"hydra.run.dir={out}", cwd=REPO)
    assert proc.returncode != 0
    assert "data.binarize=dynamic" in proc.stderr and "continuous_bernoulli" in proc.stderr
    assert not (out / "checkpoints").exists()


def test_wandb_file_reader_handles_records_across_blocks(tmp_path):
    """A record longer than a 32 KiB block is split FIRST/MIDDLE/LAST; the reader rejoins it."""
    from wandb.proto import wandb_internal_pb2 as pb

    from vaelab.wandb_offline import BLOCK_SIZE, iter_record_bytes

    rec = pb.Record()
    item = rec.history.item.add()
    item.key, item.value_json = "big", json.dumps("x" * 80_000)
    payload = rec.SerializeToString()
    out = bytearray(b":W&B" + struct.pack("<HB", 0xBEE1, 0))
    chunks, rest, first = [], payload, True
    while rest:
        room = BLOCK_SIZE - len(out) % BLOCK_SIZE - 7
        piece, rest = rest[:room], rest[room:]
        kind = (1 if not rest else 2) if first else (4 if not rest else 3)
        out += struct.pack("<IHB", 0, len(piece), kind) + piece
        chunks.append(kind)
        first = False
    path = tmp_path / "run-x.wandb"
    path.write_bytes(bytes(out))
    assert chunks[0] == 2 and chunks[-1] == 4 and 3 in chunks
    (got,) = list(iter_record_bytes(path))
    assert got == payload


def test_a_failing_job_finishes_its_wandb_run_and_keeps_its_checkpoints(tmp_path, monkeypatch):
    """A user's callback (allowed through allowed_targets) raises after the first epoch."""
    monkeypatch.syspath_prepend(str(tmp_path))  # (its plugin: the checkpoint's check imports what it names)
    (tmp_path / "boom.py").write_text(
        "import lightning.pytorch as pl\n"
        "class Boom(pl.Callback):\n"
        "    def on_train_epoch_end(self, trainer, module):\n"
        "        if trainer.current_epoch == 1:\n"
        "            raise RuntimeError('boom: injected failure')\n"
    )
    out = tmp_path / "run"
    proc = run_cli("train.py", "allowed_targets=[boom.]", "+callbacks.boom._target_=boom.Boom",
                   "trainer.max_epochs=5", f"hydra.run.dir={out}", cwd=REPO, env={"PYTHONPATH": str(tmp_path)})
    assert proc.returncode != 0 and "boom: injected failure" in proc.stderr
    run = read_run(find_runs(out)[0])
    # Lightning validates before on_train_epoch_end: epochs 0 and 1 were validated
    assert run.exit_code == 1 and len(run.values("val/elbo")) == 2
    assert (out / "checkpoints" / "last.ckpt").is_file()
    assert json.loads((out / "summary.json").read_text())["failed"] is True
    load_module(out / "checkpoints" / "last.ckpt", allowed_targets=["boom."])  # what was written is intact


def test_bad_evaluation_settings_fail_before_training(tmp_path):
    out = tmp_path / "run"
    proc = run_cli("train.py", "evaluation.test_num_samples=0", f"hydra.run.dir={out}", cwd=REPO)
    assert proc.returncode != 0 and "evaluation.test_num_samples must be an integer >= 1" in proc.stderr
    assert not (out / "checkpoints").exists() and not find_runs(out)


def test_evaluation_pass_size_is_checked_and_auto_bounds_passes_on_a_cpu_only():
    from vaelab.module import CPU_PASS_SIZE, check_evaluation, pass_size_for
    from vaelab.validation import value_problems

    assert value_problems({"evaluation": {"pass_size": 0}}) == [
        "evaluation.pass_size must be auto, null or an integer >= 1, got 0 (e.g. evaluation.pass_size=auto)"]
    assert value_problems({"evaluation": {"pass_size": None}}) == value_problems({"evaluation": {"pass_size": 512}}) == []
    settings = {"val_num_samples": 10, "test_num_samples": 1000, "chunk_size": 100}
    with pytest.raises(ValueError, match="evaluation.pass_size must be auto, null or an integer >= 1, got 'big'"):
        check_evaluation({**settings, "pass_size": "big"})
    assert pass_size_for("auto", torch.device("cpu")) == CPU_PASS_SIZE
    assert pass_size_for("auto", torch.device("cuda", 0)) is None  # (no GPU needed to name one)
    assert pass_size_for(None, torch.device("cpu")) is None and pass_size_for(300, torch.device("cuda")) == 300


@pytest.mark.data
def test_train_on_real_mnist_through_torchvision(tmp_path):
    from conftest import shared_copy

    root = shared_copy("MNIST", tmp_path / "data")
    out = tmp_path / "run"
    proc = check(run_cli("train.py", "data=mnist", f"data.root={root}", "encoder=conv", "decoder=conv",
                         "trainer.max_epochs=1", "+trainer.limit_train_batches=30", "+trainer.limit_val_batches=2",
                         "+trainer.limit_test_batches=1", "evaluation.test_num_samples=5", "logger=none",
                         f"hydra.run.dir={out}", cwd=REPO))
    summary = json.loads((out / "summary.json").read_text())
    assert math.isfinite(summary["test"]["test/nll"]) and "epoch 1/1" in proc.stdout
    # Bernoulli on MNIST: binarize=auto resolved to dynamic; bits/dim over 784 binary pixels
    assert summary["test"]["test/bpd"] == pytest.approx(summary["test"]["test/nll"] / (784 * math.log(2)), rel=1e-4)


def _three_digits_epochs(out: Path, log_every_n_steps: int):
    """Three epochs on digits (20 steps an epoch: 19 batches of 64 and one of 41), same seed."""
    check(run_cli("train.py", "trainer.max_epochs=3", f"trainer.log_every_n_steps={log_every_n_steps}", "test=false",
                  "evaluation.val_num_samples=0", f"hydra.run.dir={out}", cwd=REPO))
    return read_run(find_runs(out)[0])


@pytest.fixture(scope="module")
def every_step(tmp_path_factory):
    """A run that logs every step: each logged value is that step's batch mean."""
    return _three_digits_epochs(tmp_path_factory.mktemp("every_step") / "run", 1)


BATCH_SIZES = torch.tensor(([64.0] * 19 + [41.0]) * 3, dtype=torch.float64)  # the 60 steps of 3 epochs


def test_epoch_means_are_exact_and_reset_every_epoch(every_step):
    """train/elbo_epoch (and train/loss_epoch) is the mean over the epoch's examples: the
    batch-size-weighted mean of that epoch's step values."""
    for term in ("elbo", "loss"):
        steps = torch.tensor(every_step.values(f"train/{term}"), dtype=torch.float64)
        epochs = every_step.values(f"train/{term}_epoch")
        assert len(steps) == 60 and len(epochs) == 3
        for e in range(3):
            window = slice(20 * e, 20 * (e + 1))
            expected = float((steps[window] * BATCH_SIZES[window]).sum() / BATCH_SIZES[window].sum())
            assert epochs[e] == pytest.approx(expected, abs=1e-4), (term, e, epochs[e], expected)


def test_step_values_are_means_over_their_logging_interval(every_step, tmp_path):
    """With log_every_n_steps=7 the same training (same seed) logs at steps 6, 13, 20, ..., 55,
    and at each epoch's last step (19, 39, 59) the steps since the previous point; each value is
    the example-weighted mean of the every-step run's values over its steps: no step is left
    out (an epoch's last ones, training's last ones), and no point mixes two epochs."""
    sparse = _three_digits_epochs(tmp_path / "run", 7)
    logged = [r for r in sparse.history if "train/elbo" in r]
    at = [int(r["trainer/global_step"]) for r in logged]
    assert at == sorted([*range(6, 60, 7), 19, 39, 59])
    assert [int(r["epoch"]) for r in logged] == [s // 20 for s in at]
    for term in ("elbo", "recon", "kl", "loss"):
        steps = torch.tensor(every_step.values(f"train/{term}"), dtype=torch.float64)
        for r, start in zip(logged, [0, *(s + 1 for s in at[:-1])], strict=True):
            window = slice(start, int(r["trainer/global_step"]) + 1)
            expected = float((steps[window] * BATCH_SIZES[window]).sum() / BATCH_SIZES[window].sum())
            assert r[f"train/{term}"] == pytest.approx(expected, abs=1e-3), (term, r["trainer/global_step"])
