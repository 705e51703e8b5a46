"""Round trips on a tiny multirun, as a researcher runs them: `python train.py -m ...`, then
`python report.py <sweep>` and `python eval.py ckpt_path=<run folder>`; the pictures, diagnostics
and W&B summary read back from disk."""

from __future__ import annotations

import csv
import json
import math
import re
import shutil
from pathlib import Path

import pytest
from conftest import REPO, check, run_cli
from PIL import Image

from vaelab.wandb_offline import find_runs, iter_record_bytes, read_run

pytestmark = pytest.mark.slow

EPOCHS = 2
K = 20
LIKELIHOODS = ("bernoulli", "continuous_bernoulli")


@pytest.fixture(scope="module")
def sweep(tmp_path_factory) -> tuple[Path, str]:
    out = tmp_path_factory.mktemp("multirun") / "sweep"
    proc = check(run_cli("train.py", "-m", f"likelihood={','.join(LIKELIHOODS)}", f"trainer.max_epochs={EPOCHS}",
                         f"evaluation.test_num_samples={K}", "logger.wandb.log_model=true",
                         f"hydra.sweep.dir={out}", cwd=REPO))
    return out, proc.stdout + proc.stderr


def summary_of(run: Path) -> dict:
    return json.loads((run / "summary.json").read_text())


def test_report_has_one_row_per_run_with_its_overrides_and_numbers(sweep):
    folder, _ = sweep
    proc = check(run_cli("report.py", str(folder), cwd=REPO))
    assert "| run | likelihood |" in proc.stdout
    rows = list(csv.DictReader(open(folder / "report.csv")))
    assert [r["likelihood"] for r in rows] == list(LIKELIHOODS)
    assert all(r["trainer.max_epochs"] == str(EPOCHS) and r["evaluation.test_num_samples"] == str(K) for r in rows)
    for row in rows:
        s = summary_of(folder / row["run"])
        assert float(row["best val/elbo"]) == pytest.approx(s["best_val_elbo"], rel=1e-12)
        assert float(row["test/nll"]) == pytest.approx(s["test"]["test/nll"], rel=1e-12)
        assert float(row["test/bpd"]) == pytest.approx(s["test"]["test/bpd"], rel=1e-12)
        assert int(row["active units"]) == s["diagnostics"]["active_units"]
        assert float(row["wall time (s)"]) == s["wall_time_s"] > 0
        assert row["status"] == "ok"
    # the two runs differ (a Bernoulli and a continuous Bernoulli give different nats)
    assert rows[0]["test/nll"] != rows[1]["test/nll"]
    md = (folder / "report.md").read_text().splitlines()
    assert md == proc.stdout.splitlines()[: len(md)]
    assert md[2 + len(LIKELIHOODS):] == ["", "![the runs' validation bounds per epoch](report.png)"]
    assert "continuous_bernoulli" in md[3] and f"{summary_of(folder / '1')['test']['test/nll']:.4f}" in md[3]
    # report.png: the runs' val/elbo and val/iwae per epoch, read from their offline W&B runs
    from PIL import Image

    from vaelab.report import read_curves

    for row in rows:
        logged = read_run(find_runs(folder / row["run"])[0])
        curves = read_curves(folder / row["run"])
        assert sorted(curves) == ["val/elbo", "val/iwae"]
        assert curves["val/elbo"] == {int(r["epoch"]): r["val/elbo"] for r in logged.history if "val/elbo" in r}
        assert sorted(curves["val/elbo"]) == list(range(EPOCHS))
    assert Image.open(folder / "report.png").size == (1320, 462)  # two panels, 6 x 4.2 in each at 110 dpi


def test_eval_of_each_run_of_a_sweep_goes_under_outputs_eval(sweep, tmp_path):
    """``eval.py -m ckpt_path=<sweep>/0,<sweep>/1`` (the command a sweep folder's refusal gives)
    writes one folder per evaluation under outputs/eval/multirun/<date>/<time>/<n>, as train.py's
    sweeps do under outputs/train/; it wrote to Hydra's default ./multirun/ in the working
    directory (inside the repository when run from there)."""
    from vaelab.report import collect

    folder, _ = sweep
    cut = tmp_path / "cut.ckpt"  # a checkpoint cut short, and one that is not there, between them
    cut.write_bytes((folder / "0" / "checkpoints" / "last.ckpt").read_bytes()[:5000])
    proc = run_cli("eval.py", "-m", f"ckpt_path={folder}/0,{cut},{tmp_path}/nowhere.ckpt,{folder}/1",
                   "evaluation.test_num_samples=5", "logger=none", cwd=tmp_path)
    assert not (tmp_path / "multirun").exists()
    written = sorted(tmp_path.glob("outputs/eval/multirun/*/*/*/metrics.json"))
    assert [p.parent.name for p in written] == ["0", "3"], proc.stdout[-2000:]
    assert [json.loads(p.read_text())["checkpoint"] for p in written] == [
        summary_of(folder / run)["tested_checkpoint"] for run in ("0", "1")]
    # the failed jobs go on to the next, each said in its log, and the sweep's end lists them all
    # and exits non-zero (only the first one's error was shown, at the end; the others' nowhere)
    sweep_dir = written[0].parent.parent
    assert proc.returncode == 1 and "2 of 4 evaluation jobs failed" in proc.stderr, proc.stderr[-3000:]
    for job, said in (("1", f"CheckpointError: {cut}"), ("2", f"CheckpointError: no checkpoint at {tmp_path}/nowhere.ckpt")):
        assert f"{sweep_dir / job}: {said}" in proc.stderr
        assert "this evaluation job failed; the sweep continues with the next job" in (sweep_dir / job / "cli.log").read_text()
    assert "Traceback" not in proc.stderr
    _, rows = collect(sweep_dir)
    assert [r["status"] for r in rows][0::3] == ["ok (eval.py)", "ok (eval.py)"]
    assert rows[1]["status"].startswith(f"failed: CheckpointError: {cut}")
    assert rows[2]["status"].startswith(f"failed: CheckpointError: no checkpoint at {tmp_path}/nowhere.ckpt: ")
    # the sweep again into its folder: refused with advice for an evaluation (it gave training's
    # "-m ckpt_path=last", which evaluates nothing and was refused the same way)
    again = run_cli("eval.py", "-m", f"ckpt_path={folder}/0", f"hydra.sweep.dir={sweep_dir}", cwd=tmp_path)
    assert again.returncode == 1 and (f"hydra.sweep.dir={sweep_dir} holds the evaluations of an earlier sweep (jobs 0, 3), "
                                      "which this sweep would overwrite: give another hydra.sweep.dir") in again.stderr
    assert "ckpt_path=last" not in again.stderr


def test_eval_on_a_run_folder_reproduces_its_numbers(sweep, tmp_path):
    folder, _ = sweep
    run = folder / "0"
    s = summary_of(run)
    proc = check(run_cli("eval.py", f"ckpt_path={run}", f"evaluation.test_num_samples={K}", "logger=wandb",
                         f"hydra.run.dir={tmp_path}/eval", cwd=REPO))
    out = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert out["checkpoint"] == s["tested_checkpoint"] == s["best_checkpoint"]  # not last.ckpt
    # its W&B run says what it evaluated: the checkpoint, the run's model and data, its own K
    config = read_run(find_runs(tmp_path / "eval")[0]).config
    assert config["ckpt_path"] == out["checkpoint"] and config["task_name"] == "eval"
    assert config["latent_dim"] == 16 and config["likelihood"]["_target_"].endswith("Bernoulli")
    assert config["evaluation"]["test_num_samples"] == K and config["data"]["binarize"] == "dynamic"
    # the trainer's training settings are the run's (eval.yaml's max_epochs 100 was shown), its
    # precision and devices the evaluation's own
    assert config["trainer"]["max_epochs"] == EPOCHS and config["trainer"]["precision"] == "32-true"
    assert str(s["best_checkpoint"]) in proc.stdout
    assert "litmodels" not in proc.stdout + proc.stderr  # (Lightning's default checkpoint callback's advertisement)
    assert (proc.stdout + proc.stderr).count("GPU available") == 1
    m, t = out["metrics"], s["test"]
    assert m["test/nll"] == pytest.approx(t["test/nll"], abs=0.2)  # K=20, 360 examples: MC noise only
    assert m["test/elbo"] == pytest.approx(t["test/elbo"], abs=0.3)
    assert m["test/gap"] == pytest.approx(t["test/gap"], abs=0.3)
    # the encoder is deterministic: the diagnostics are the same numbers
    assert m["test/active_units"] == t["test/active_units"] == s["diagnostics"]["active_units"]
    assert out["diagnostics"]["kl_per_dim"] == pytest.approx(s["diagnostics"]["kl_per_dim"], abs=1e-5)
    assert out["evaluation"]["test_num_samples"] == K and out["data"]["binarize"] == "dynamic"
    assert (tmp_path / "eval" / "images" / "traversals.png").is_file()


def test_summaries_hold_gap_diagnostics_and_how_the_numbers_were_obtained(sweep):
    folder, log = sweep
    for i, lik in enumerate(LIKELIHOODS):
        s = summary_of(folder / str(i))
        t = s["test"]
        assert t["test/gap"] == pytest.approx(-t["test/nll"] - t["test/elbo"], abs=1e-3)
        assert t["test/gap"] > -0.1  # log p̂(x) ≥ ELBO up to noise
        assert s["evaluation"] == {"test_num_samples": K, "val_num_samples": 10, "chunk_size": 100, "pass_size": "auto"}
        assert s["data"]["binarize"] == ("dynamic" if lik == "bernoulli" else "none")
        # dequantize=auto: the continuous Bernoulli's density on dequantized data, so test/bpd bounds the levels'
        assert s["data"]["dequantize"] is (lik != "bernoulli")
        assert s["data"]["bin_width"] == (1 / 17 if lik != "bernoulli" else 1.0)
        d = s["diagnostics"]
        assert d["num_examples"] == 360 and len(d["kl_per_dim"]) == 16
        assert sum(d["kl_per_dim"]) == pytest.approx(t["test/kl"], abs=1e-3)  # analytic KL splits exactly
        assert d["active_units"] == sum(v > 0.01 for v in d["variance_of_means"])
        if d["active_units"] == 0:  # two epochs on digits: often none active, and the log says so
            assert ("posterior collapse" if t["test/kl"] < 0.1 else "no active latent dimensions") in log
        rows = list(csv.DictReader(open(folder / str(i) / "images" / "kl_per_dim.csv")))
        assert [float(r["kl"]) for r in rows] == pytest.approx(d["kl_per_dim"], rel=1e-9)


def test_wandb_run_names_summary_and_checkpoint_artifact(sweep):
    from wandb.proto import wandb_internal_pb2 as pb

    folder, _ = sweep
    for i, lik in enumerate(LIKELIHOODS):
        path = find_runs(folder / str(i))[0]
        run = read_run(path)
        s = summary_of(folder / str(i))
        # define_metric: the summary holds the best val/elbo, the final test numbers
        assert run.summary["val/elbo"]["max"] == pytest.approx(s["best_val_elbo"], abs=1e-4)
        assert run.summary["val/elbo"]["max"] == pytest.approx(max(run.values("val/elbo")), abs=1e-6)
        # and is plotted against the trainer's step as every other value (it had W&B's _step)
        assert run.metrics["val/elbo"] == {"step_metric": "trainer/global_step", "summary": ["max"]}
        assert run.metrics["*"]["step_metric"] == "trainer/global_step"
        assert run.summary["test/nll"] == pytest.approx(s["test"]["test/nll"], abs=1e-4)
        assert run.summary["test/gap"] == pytest.approx(s["test"]["test/gap"], abs=1e-4)
        assert run.summary["evaluation/test_num_samples"] == K and run.summary["evaluation/chunk_size"] == 100
        assert run.summary["data/binarize"] == s["data"]["binarize"]
        assert run.summary["data/dequantize"] is s["data"]["dequantize"]
        assert run.summary["diagnostics/active_units"] == s["diagnostics"]["active_units"]
        records = []
        for payload in iter_record_bytes(path):
            rec = pb.Record()
            rec.ParseFromString(payload)
            records.append(rec)
        (info,) = [r.run for r in records if r.WhichOneof("record_type") == "run"]
        assert info.run_group == str(folder) and info.job_type == "train"
        # the swept setting first (W&B keeps 128 characters of a name), then the others, sorted
        assert info.display_name.startswith(f"{i}:likelihood={lik},evaluation.test_num_samples={K},"), info.display_name
        rest = info.display_name.split(",")[1:]
        assert rest == sorted(rest) and rest[-1] == f"trainer.max_epochs={EPOCHS}"
        models = [r.artifact for r in records if r.WhichOneof("record_type") == "artifact" and r.artifact.type == "model"]
        assert {a for m in models for a in m.aliases} == {"best", "latest"}
        assert all(m.manifest.contents[0].path == "model.ckpt" for m in models)


def test_pictures_in_wandb_and_as_files_with_their_sizes(sweep):
    folder, _ = sweep
    run_dir = folder / "0"
    run = read_run(find_runs(run_dir)[0])
    side = 34  # an 8x8 digit upscaled to 32x32 plus 2 pixels of padding
    expected = {
        "val/reconstructions": (16 * side + 2, 3 * side + 2),   # inputs, means, samples
        "test/reconstructions": (16 * side + 2, 3 * side + 2),
        "test/traversals": (9 * side + 2, 8 * side + 2),        # 8 most active dims x 9 steps
        "test/interpolations": (10 * side + 2, 4 * side + 2),   # 4 pairs: x_a, 8 steps, x_b
        "test/latent_space": (640, 480),
        "test/kl_per_dim": (640, 480),
        "val/rate_distortion": (640, 480),
    }
    for key, size in expected.items():
        entries = run.values(key)
        assert len(entries) == (EPOCHS if key == "val/reconstructions" else 1), key
        media = run.files_dir / entries[-1]["filenames"][0]
        assert Image.open(media).size == size, key
        name = key.split("/")[1]
        if key.startswith("val/") and key != "val/rate_distortion":
            f = sorted((run_dir / "images" / name).glob("epoch=*.png"))[-1]
        else:
            f = run_dir / "images" / f"{name}.png"
        assert Image.open(f).size == size, f
    # the middle row of the reconstructions is the mean of p(x|z), the bottom a binary sample
    grid = Image.open(sorted((run_dir / "images" / "reconstructions").glob("*.png"))[-1]).convert("L")
    sample_pixels = {grid.getpixel((2 + 34 * j + 16, 2 * side + 2 + 16)) for j in range(16)}
    assert sample_pixels <= {0, 255}
    # rate–distortion: one point per epoch, the logged val/kl and val/recon
    rd = list(csv.DictReader(open(run_dir / "images" / "rate_distortion.csv")))
    assert [int(r["epoch"]) for r in rd] == list(range(EPOCHS))
    assert [float(r["val/kl"]) for r in rd] == pytest.approx(run.values("val/kl"), abs=1e-5)
    assert [float(r["val/recon"]) for r in rd] == pytest.approx(run.values("val/recon"), abs=1e-5)
    assert math.isfinite(run.summary["test/active_units"])
    table = run.values("test/kl_per_dim_table")
    assert len(table) == 1 and table[0]["nrows"] == 16


def test_eval_on_a_copied_run_folder_uses_the_copy_s_own_checkpoint(sweep, tmp_path):
    """summary.json records absolute paths; a copy of the run folder still names the original's
    checkpoint there, and ``ckpt_path=<copy>`` must evaluate the copy's file, not that one."""
    folder, _ = sweep
    copy = tmp_path / "copy"
    shutil.copytree(folder / "0", copy)
    recorded = Path(summary_of(copy)["tested_checkpoint"])
    assert recorded.is_file() and recorded.parent == folder / "0" / "checkpoints"
    own = copy / "checkpoints" / recorded.name
    # (no evaluation.test_num_samples: the run's own K, not eval.yaml's 1000, found by helper 17)
    proc = check(run_cli("eval.py", f"ckpt_path={copy}", f"hydra.run.dir={tmp_path}/eval", cwd=REPO))
    out = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert out["checkpoint"] == str(own), proc.stdout
    assert out["evaluation"]["test_num_samples"] == K and out["evaluation"]["chunk_size"] == 100
    # cut the copy's checkpoint short: the evaluation stops, naming that file (the original's
    # intact one is not a stand-in), and writes no numbers
    own.write_bytes(own.read_bytes()[: own.stat().st_size // 2])
    proc = run_cli("eval.py", f"ckpt_path={copy}", f"evaluation.test_num_samples={K}",
                   f"hydra.run.dir={tmp_path}/eval2", cwd=REPO)
    assert proc.returncode != 0, proc.stdout
    assert str(own) in proc.stdout + proc.stderr and "truncated" in proc.stdout + proc.stderr
    assert not (tmp_path / "eval2" / "metrics.json").exists()


def _run_folder(folder: Path, recorded: Path | None, files: tuple[str, ...] = ()) -> Path:
    """A run folder whose summary.json names ``recorded`` as its tested and best checkpoint,
    holding empty stand-ins for ``files`` under checkpoints/ (the resolver only looks for them)."""
    (folder / "checkpoints").mkdir(parents=True, exist_ok=True)
    for name in files:
        (folder / "checkpoints" / name).write_bytes(b"")
    s = {"tested_checkpoint": str(recorded), "best_checkpoint": str(recorded)} if recorded else {}
    (folder / "summary.json").write_text(json.dumps(s))
    return folder


def test_a_run_folder_resolves_to_the_checkpoint_inside_it(tmp_path, caplog):
    from vaelab.dashboard import resolve_run_checkpoint

    best = "best-epoch=001-val_elbo=-40.0000.ckpt"
    base = _run_folder(tmp_path / "base", tmp_path / "base" / "checkpoints" / best, (best, "last.ckpt"))
    # the folder itself: the recorded file, as recorded (eval's metrics.json names what summary.json does)
    assert resolve_run_checkpoint(base) == base / "checkpoints" / best
    # a copy (or a moved run) names the original's file: its own file of that name is taken
    copy = tmp_path / "copy"
    shutil.copytree(base, copy)
    assert resolve_run_checkpoint(copy) == copy / "checkpoints" / best
    assert resolve_run_checkpoint(str(copy)) == copy / "checkpoints" / best
    # a copy without that file but with checkpoints of its own: its last.ckpt, not the original's
    # best, and the log says so, naming both
    (copy / "checkpoints" / best).unlink()
    with caplog.at_level("WARNING", logger="vaelab"):
        assert resolve_run_checkpoint(copy) == copy / "checkpoints" / "last.ckpt"
    assert best in caplog.text and str(base / "checkpoints" / best) in caplog.text and "last.ckpt" in caplog.text
    # a run that kept its checkpoints elsewhere (a checkpoint dirpath outside the folder): the
    # recorded file is used, and the log says it lies outside the folder
    caplog.clear()
    elsewhere = _run_folder(tmp_path / "elsewhere", base / "checkpoints" / best)
    with caplog.at_level("WARNING", logger="vaelab"):
        assert resolve_run_checkpoint(elsewhere) == base / "checkpoints" / best
    assert "outside" in caplog.text and str(base / "checkpoints" / best) in caplog.text
    # checkpoints of its own, but neither the named one nor a last.ckpt: refused, naming both
    from vaelab.checkpoints import CheckpointError

    (copy / "checkpoints" / "last.ckpt").rename(copy / "checkpoints" / "other.ckpt")
    with pytest.raises(CheckpointError, match=f"has no {re.escape(best)}.*other\\.ckpt"):
        resolve_run_checkpoint(copy)
    (copy / "checkpoints" / "other.ckpt").rename(copy / "checkpoints" / "last.ckpt")
    # a summary.json that cannot be read: the folder's last.ckpt, and the log names the file
    caplog.clear()
    (copy / "summary.json").write_text('{"tested_checkpoint": "/x/che')
    with caplog.at_level("WARNING", logger="vaelab"):
        assert resolve_run_checkpoint(copy) == copy / "checkpoints" / "last.ckpt"
    assert str(copy / "summary.json") in caplog.text
    # a checkpoint file is taken as it is
    assert resolve_run_checkpoint(base / "checkpoints" / "last.ckpt") == base / "checkpoints" / "last.ckpt"


def test_report_tells_a_running_an_evaluated_and_a_killed_job_from_one_that_failed(tmp_path):
    """Jobs without summary.json: one running now (its lock file names a live process), one of an
    eval.py sweep (metrics.json, whose numbers are shown), one killed after its first checkpoint
    (continue it), one that stopped before training; a lock file left by a killed process is
    not a running job."""
    import os
    import socket

    from vaelab.report import collect

    sweep = tmp_path / "sweep"
    (sweep).mkdir()
    (sweep / "multirun.yaml").write_text("{}")
    for job in "01234":
        (sweep / job / ".hydra").mkdir(parents=True)
        (sweep / job / ".hydra" / "overrides.yaml").write_text(f"- seed={job}\n")
    host = socket.gethostname()
    (sweep / "0" / ".vaelab.lock").write_text(f"pid {os.getpid()} on {host}, since 2026-11-28 10:00:00\n")
    (sweep / "1" / "metrics.json").write_text(json.dumps(
        {"metrics": {"test/nll": 25.5, "test/bpd": 0.57}, "diagnostics": {"active_units": 7}}))
    (sweep / "2" / "checkpoints").mkdir()
    (sweep / "2" / "checkpoints" / "latest-step40.ckpt").write_bytes(b"state")
    dead = 2**22 + 12345  # above Linux's pid limit: no such process
    (sweep / "2" / ".vaelab.lock").write_text(f"pid {dead} on {host}, since 2026-11-28 10:00:00\n")
    _, rows = collect(sweep)
    status = {r["run"]: r["status"] for r in rows}
    assert status["0"] == f"running (pid {os.getpid()} on {host}, since 2026-11-28 10:00:00)"
    assert status["1"] == "ok (eval.py)"
    assert [rows[1][k] for k in ("test/nll", "test/bpd", "active units")] == [25.5, 0.57, 7]
    assert status["2"].startswith("failed: stopped after its training began") and f"ckpt_path={sweep / '2'}" in status["2"]
    assert status["3"] == status["4"] == "failed: no summary.json: it stopped before training (see its log)"
    # an evaluation job without metrics.json: not "before training"; one the sweep recorded as failed: its error
    (sweep / "3" / ".hydra" / "config.yaml").write_text("task_name: eval\nseed: 3\n")
    (sweep / "failed_jobs.jsonl").write_text(json.dumps({"job": str(sweep / "4"), "error": "CheckpointError: cut\n short",
                                                         "at": 1.0}) + "\n")
    status = {r["run"]: r["status"] for r in collect(sweep)[1]}
    assert status["3"] == "failed: no metrics.json: the evaluation stopped before writing it (killed? see its log)"
    assert status["4"] == "failed: CheckpointError: cut short"


def test_report_shows_the_settings_the_numbers_came_from_and_an_optuna_searchs_killed_job(tmp_path):
    """A run continued with trainer.max_epochs=3 showed the 2 it started with (its .hydra files
    keep the starting command; found by helper 19): each resume's overrides apply on top, as
    they did to the run, but for its ckpt_path and what a resume does not apply. A job of an
    Optuna search (which writes no multirun.yaml) killed before its summary.json was left out
    of the table; its hydra.yaml says it is a sweep's job."""
    from vaelab.report import collect, write_json

    run = tmp_path / "runs" / "longer"
    (run / ".hydra").mkdir(parents=True)
    # (started by a requeued sweep's ckpt_path=last, before it had a checkpoint: a fresh run)
    (run / ".hydra" / "overrides.yaml").write_text("- ckpt_path=last\n- trainer.max_epochs=2\n- seed=4\n- +note=x\n")
    write_json(run / "summary.json", {"failed": False, "best_val_elbo": -20.0, "commands": [
        {"started_at": "a"},
        {"resumed_with": [f"ckpt_path={run}", "trainer.max_epochs=3", "experiment=mnist_vae", "~note"]},
        {"resumed_with": ["ckpt_path=last", "hydra.run.dir=x", "+trainer.max_steps=100"]}]})
    columns, rows = collect(tmp_path / "runs")
    assert rows[0]["trainer.max_epochs"] == "3" and rows[0]["seed"] == "4" and rows[0]["trainer.max_steps"] == "100"
    assert "note" not in columns and "experiment" not in columns and "ckpt_path" not in columns
    search = tmp_path / "search"
    for job in "01":
        (search / job / ".hydra").mkdir(parents=True)
        (search / job / ".hydra" / "overrides.yaml").write_text(f"- latent_dim={8 + int(job)}\n")
        (search / job / ".hydra" / "hydra.yaml").write_text("hydra:\n  mode: MULTIRUN\n")
    write_json(search / "0" / "summary.json", {"failed": False, "best_val_elbo": -21.0})
    # an evaluation sweep's rows differ by their ckpt_path: shown (helper 32)
    for job in "01":
        (tmp_path / "evals" / job / ".hydra").mkdir(parents=True)
        (tmp_path / "evals" / job / ".hydra" / "overrides.yaml").write_text(f"- ckpt_path=/runs/{job}\n")
        write_json(tmp_path / "evals" / job / "metrics.json", {"metrics": {"test/nll": 20.0 + int(job)}})
    columns, rows = collect(tmp_path / "evals")
    assert "ckpt_path" in columns and [r["ckpt_path"] for r in rows] == ["/runs/0", "/runs/1"]
    _, rows = collect(search)
    assert [(r["run"], r["status"]) for r in rows] == [
        ("0", "ok"), ("1", "failed: no summary.json: it stopped before training (see its log)")]


def test_report_shows_the_best_val_iwae_of_runs_that_monitor_it(tmp_path):
    from vaelab.report import collect, write_json

    for run, monitor, score in (("elbo", "val/elbo", -90.5), ("iwae", "val/iwae", -88.25)):
        write_json(tmp_path / run / "summary.json", {"failed": False, "best_score": score, "best_monitor": monitor,
                                                      "best_val_elbo": score if monitor == "val/elbo" else None})
    columns, rows = collect(tmp_path)
    assert [(r["best val/elbo"], r["best val/iwae"]) for r in rows] == [(-90.5, None), (None, -88.25)]
    (tmp_path / "iwae" / "summary.json").unlink()
    columns, rows = collect(tmp_path)
    assert "best val/iwae" not in columns and "best val/iwae" not in rows[0]  # no empty column


def test_report_over_seed_gives_mean_and_sd_per_setting_of_the_finished_runs(tmp_path, capsys):
    """``--over seed``: one row per setting of the other overrides, each number's mean and sample
    sd (n − 1) over that setting's finished runs; a failed run is named, not averaged; one run
    has no sd; a NaN shows in its group's mean. Each asserted against numbers computed here."""
    import csv
    import statistics

    from vaelab.report import main, write_json

    sweep = tmp_path / "sweep"
    nll = {("bernoulli", 0): 90.5, ("bernoulli", 1): 91.25, ("bernoulli", 2): 89.0, ("gaussian", 0): 80.0,
           ("gaussian", 1): None, ("normal", 0): float("nan"), ("normal", 1): 70.0}
    for job, ((lik, seed), value) in enumerate(nll.items()):
        run = sweep / str(job)
        (run / ".hydra").mkdir(parents=True)
        (run / ".hydra" / "overrides.yaml").write_text(f"- likelihood={lik}\n- seed={seed}\n")
        if value is None:  # failed
            write_json(run / "summary.json", {"failed": True, "error": "RuntimeError: boom"})
        else:
            write_json(run / "summary.json", {"failed": False, "best_val_elbo": -value - 1, "test": {"test/nll": value},
                                              "wall_time_s": 10.0 + job})
    (sweep / "multirun.yaml").write_text("{}")
    assert main([str(sweep), "--over", "seed"]) == 0
    out = capsys.readouterr().out
    b = [90.5, 91.25, 89.0]
    cell = f"{statistics.fmean(b):.4f} ± {statistics.stdev(b):.4f}"
    assert f"| bernoulli | 3 | {-statistics.fmean(b) - 1:.4f} ± {statistics.stdev(b):.4f} | {cell} |" in out, out
    assert "| gaussian | 1 | -81.0000 | 80.0000 |" in out and "| 3 | 4 |" in out  # no sd of one run; 4 failed
    assert "| normal | 2 | nan ± nan | nan ± nan |" in out  # the NaN run's group is not quietly the other run's
    with open(sweep / "report-over-seed.csv", newline="") as f:
        rows = {r["likelihood"]: r for r in csv.DictReader(f)}
    assert float(rows["bernoulli"]["test/nll mean"]) == statistics.fmean(b)
    assert float(rows["bernoulli"]["test/nll sd"]) == statistics.stdev(b)
    assert rows["bernoulli"]["runs"] == "0, 1, 2" and rows["gaussian"]["not ok"] == "4"
    assert rows["gaussian"]["test/nll sd"] == "" and rows["gaussian"]["n"] == "1"
    assert float(rows["bernoulli"]["wall time (s) mean"]) == 11.0
    assert "mean ± sd over seed" in (sweep / "report.md").read_text()
    # a key no run overrides: named, with the nearest one
    assert main([str(sweep), "--over", "sed"]) == 1
    assert "--over sed: no run overrides it (did you mean --over seed?); the overridden keys are likelihood, seed" in (
        capsys.readouterr().err)


def test_report_draws_each_runs_curve_and_with_over_each_groups_mean_and_band(tmp_path):
    """report.png from csv/metrics.csv (a resumed run's repeated epoch: the later value); with
    --over, one line per group at the mean of its runs, in a band of ± one sd; a run that
    logged nothing is left out, and with no curve at all no picture is drawn (an earlier
    report's is removed)."""
    import statistics

    import numpy as np
    from PIL import Image

    from vaelab.report import curve_lines, draw_curves, read_curves, write_json, write_report

    sweep = tmp_path / "sweep"
    for job, (z, seed) in enumerate([(2, 0), (2, 1), (16, 0), (16, 1)]):
        run = sweep / str(job)
        (run / ".hydra").mkdir(parents=True)
        (run / ".hydra" / "overrides.yaml").write_text(f"- latent_dim={z}\n- seed={seed}\n")
        write_json(run / "summary.json", {"failed": False, "best_val_elbo": -80.0})
        (run / "csv").mkdir()
        rows = ["epoch,step,train/elbo,val/elbo"]
        rows += [f"{e},{e * 10 + 9},-99.0," for e in range(3)]  # step rows: no val/elbo
        rows += [f"{e},{e * 10 + 9},,{-100.0 + 10 * e + (5.0 if z == 16 else 0.0) + seed}" for e in range(3)]
        rows += [f"1,19,,{-50.0 + seed}"] if job == 0 else []  # resumed: epoch 1 again, later
        (run / "csv" / "metrics.csv").write_text("\n".join(rows) + "\n")
    assert read_curves(sweep / "0") == {"val/elbo": {0: -100.0, 1: -50.0, 2: -80.0}}
    assert read_curves(sweep / "3") == {"val/elbo": {0: -94.0, 1: -84.0, 2: -74.0}}
    (sweep / "2" / "csv" / "metrics.csv").write_text("not,a\ncsv")  # unreadable: that run has no curve
    assert read_curves(sweep / "2") == {}

    write_report(sweep, over=["seed"])
    picture = np.asarray(Image.open(sweep / "report.png").convert("RGB")).astype(int)
    assert picture.shape == (462, 660, 3)  # one panel: no run logged val/iwae
    blue, orange = np.array([31, 119, 180]), np.array([255, 127, 14])  # matplotlib's first two colours
    assert (np.abs(picture - blue).sum(-1) < 30).sum() > 200 and (np.abs(picture - orange).sum(-1) < 30).sum() > 200

    # the groups' lines: latent_dim=2's mean and sd of runs 0 and 1, latent_dim=16's of run 3 alone
    curves = {r: read_curves(sweep / r) for r in "0123"}
    groups = {"latent_dim=2": ["0", "1"], "latent_dim=16": ["2", "3"]}
    lines = curve_lines(curves, "val/elbo", groups)
    pairs = [(-100.0, -99.0), (-50.0, -89.0), (-80.0, -79.0)]
    assert lines["latent_dim=2"] == ([0, 1, 2], [statistics.fmean(p) for p in pairs], [statistics.stdev(p) for p in pairs])
    assert lines["latent_dim=16"] == ([0, 1, 2], [-94.0, -84.0, -74.0], [0.0, 0.0, 0.0])
    assert curve_lines(curves, "val/elbo")["0"] == ([0, 1, 2], [-100.0, -50.0, -80.0], [0.0, 0.0, 0.0])
    assert draw_curves(tmp_path / "g.png", curves, groups)
    assert not draw_curves(tmp_path / "none.png", {"2": {}}) and not (tmp_path / "none.png").exists()
    # a run that logged only val/elbo beside one that logged both: each keeps its colour in both panels
    assert draw_curves(tmp_path / "two.png", {"0": {"val/elbo": {0: -30.0, 1: -28.0}},
                                              "1": {"val/elbo": {0: -29.0, 1: -27.0}, "val/iwae": {0: -28.5, 1: -26.5}}})
    right = np.asarray(Image.open(tmp_path / "two.png").convert("RGB")).astype(int)[:, 660:]
    near = lambda colour: (np.abs(right - colour).sum(-1) < 30).sum()  # noqa: E731
    assert near(orange) > 300 and near(blue) < 100  # run 1's line (the legend's blue mark is all of run 0)
    for run in "0123":
        (sweep / run / "csv" / "metrics.csv").unlink()
    write_report(sweep)
    assert not (sweep / "report.png").exists() and "report.png" not in (sweep / "report.md").read_text()


def test_report_piped_into_head_ends_quietly(tmp_path):
    """``report.py <sweep> | head -3``: the reader closes the pipe early; the report's files are
    written and the command ends with no BrokenPipeError traceback."""
    import subprocess
    import sys

    from vaelab.report import write_json

    for job in range(40):  # a table longer than the pipe's first read
        run = tmp_path / "sweep" / str(job)
        (run / ".hydra").mkdir(parents=True)
        (run / ".hydra" / "overrides.yaml").write_text(f"- seed={job}\n- +note={'x' * 4000}{job}\n")
        write_json(run / "summary.json", {"failed": False, "best_val_elbo": -80.0 - job})
    proc = subprocess.run(f"set -o pipefail; {sys.executable} report.py {tmp_path / 'sweep'} | head -3", shell=True,
                          executable="/bin/bash", cwd=REPO, capture_output=True, text=True, check=False)
    assert proc.returncode == 0 and "Traceback" not in proc.stderr and "BrokenPipe" not in proc.stderr, proc.stderr
    assert len(proc.stdout.splitlines()) == 3 and (tmp_path / "sweep" / "report.csv").is_file()


def test_report_on_a_path_that_is_no_folder_says_so(tmp_path, capsys):
    from vaelab.report import main

    (tmp_path / "summary.json").write_text("{}")
    for path, what in ((tmp_path / "missing", "does not exist"), (tmp_path / "summary.json", "is a file")):
        assert main([str(path)]) == 1
        assert f"vaelab report: {path} {what}: give the folder of a sweep" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert main([str(tmp_path / "empty")]) == 1
    assert "no runs under" in capsys.readouterr().err


def test_report_marks_a_damaged_summary_and_still_lists_every_other_run(sweep, tmp_path):
    """A truncated summary.json is that job's row, failed with the file named; the other rows
    stay, NaN and ±inf (which Python's json writes) are printed as such, seconds as seconds."""
    folder, _ = sweep
    copy = tmp_path / "sweep"
    shutil.copytree(folder, copy, ignore=shutil.ignore_patterns("*.ckpt", "wandb", "images", "report.*"))
    s0 = summary_of(copy / "0")
    s0["best_val_elbo"] = float("-inf")
    s0["test"]["test/nll"] = float("nan")
    s0["test"]["test/bpd"] = float("inf")
    s0["wall_time_s"] = 2.1
    (copy / "0" / "summary.json").write_text(json.dumps(s0))  # NaN, -Infinity, Infinity
    text = (copy / "1" / "summary.json").read_text()
    (copy / "1" / "summary.json").write_text(text[: len(text) // 2])
    proc = check(run_cli("report.py", str(copy), cwd=REPO))  # failed jobs are rows, not an error
    assert "Traceback" not in proc.stderr
    md = proc.stdout.splitlines()
    row0, row1 = md[2], md[3]
    cells0 = [c.strip() for c in row0.strip("|").split("|")]
    assert cells0[0] == "0" and "bernoulli" in cells0
    assert cells0[-6:] == ["-inf", "nan", "inf", str(s0["diagnostics"]["active_units"]), "2.1", "ok"], row0
    assert row1.startswith("| 1 |") and "continuous_bernoulli" in row1
    assert "failed" in row1 and str(Path("1") / "summary.json") in row1 and "JSONDecodeError" in row1, row1
    rows = list(csv.DictReader(open(copy / "report.csv")))
    assert [r["run"] for r in rows] == ["0", "1"]
    # a damaged overrides.yaml: that row's settings are blank and its status says why
    (copy / "0" / ".hydra" / "overrides.yaml").write_text("- likelihood=bern\n- [unclosed")
    check(run_cli("report.py", str(copy), cwd=REPO))
    (row0,) = [r for r in csv.DictReader(open(copy / "report.csv")) if r["run"] == "0"]
    assert row0["status"].startswith("ok; ") and "0/.hydra/overrides.yaml cannot be read" in row0["status"]
    assert math.isnan(float(row0["test/nll"]))  # its numbers are still there
    assert math.isinf(float(rows[0]["best val/elbo"])) and math.isnan(float(rows[0]["test/nll"]))
    assert rows[0]["status"] == "ok" and rows[1]["status"].startswith("failed")
    assert rows[1]["test/nll"] == "" and rows[1]["wall time (s)"] == ""
    # JSON of the wrong shape is that row's too (report.py stopped with an AttributeError), and an
    # evaluation's cut-short metrics.json is named as such, not as a job stopped before training
    from vaelab.report import collect

    (copy / "2").mkdir()
    (copy / "2" / "summary.json").write_text('{"test": "oops", "best_val_elbo": 1}')
    (copy / "ev").mkdir()
    (copy / "ev" / "metrics.json").write_text('{"metrics": {"test/nll": 3')
    status = {r["run"]: r["status"] for r in collect(copy)[1]}
    assert status["2"] == "failed: 2/summary.json cannot be read (ValueError: its 'test' is a JSON str, not an object)"
    assert status["ev"] == "failed: metrics.json cannot be read (JSONDecodeError): cut short, or not JSON; evaluate again"
    assert status["0"].startswith("ok")
