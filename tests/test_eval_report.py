"""Round trips on a tiny multirun, as a researcher runs them: `python train.py -m ...`, then
`python report.py <sweep>` and `python eval.py ckpt_path=<run folder>`; the pictures, diagnostics
and W&B summary read back from disk."""

from __future__ import annotations

import csv
import json
import math
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
    assert len(md) == 2 + len(LIKELIHOODS) and md == proc.stdout.splitlines()[: len(md)]
    assert "continuous_bernoulli" in md[3] and f"{summary_of(folder / '1')['test']['test/nll']:.4f}" in md[3]


def test_eval_on_a_run_folder_reproduces_its_numbers(sweep, tmp_path):
    folder, _ = sweep
    run = folder / "0"
    s = summary_of(run)
    proc = check(run_cli("eval.py", f"ckpt_path={run}", f"evaluation.test_num_samples={K}",
                         f"hydra.run.dir={tmp_path}/eval", cwd=REPO))
    out = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert out["checkpoint"] == s["tested_checkpoint"] == s["best_checkpoint"]  # not last.ckpt
    assert str(s["best_checkpoint"]) in proc.stdout
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
        assert s["data"]["dequantize"] is False
        d = s["diagnostics"]
        assert d["num_examples"] == 360 and len(d["kl_per_dim"]) == 16
        assert sum(d["kl_per_dim"]) == pytest.approx(t["test/kl"], abs=1e-3)  # analytic KL splits exactly
        assert d["active_units"] == sum(v > 0.01 for v in d["variance_of_means"])
        if d["active_units"] == 0:  # two epochs on digits: typically collapsed, and the log says so
            assert "posterior collapse" in log
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
        assert run.summary["test/nll"] == pytest.approx(s["test"]["test/nll"], abs=1e-4)
        assert run.summary["test/gap"] == pytest.approx(s["test"]["test/gap"], abs=1e-4)
        assert run.summary["evaluation/test_num_samples"] == K and run.summary["evaluation/chunk_size"] == 100
        assert run.summary["data/binarize"] == s["data"]["binarize"] and run.summary["data/dequantize"] is False
        assert run.summary["diagnostics/active_units"] == s["diagnostics"]["active_units"]
        records = []
        for payload in iter_record_bytes(path):
            rec = pb.Record()
            rec.ParseFromString(payload)
            records.append(rec)
        (info,) = [r.run for r in records if r.WhichOneof("record_type") == "run"]
        assert info.run_group == str(folder) and info.job_type == "train"
        assert info.display_name.startswith(f"{i}:") and f"likelihood={lik}" in info.display_name
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
