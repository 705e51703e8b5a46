"""vaelab.loggers.WandbLogger: logging calls handed to a worker thread, in order, never lost,
never blocking the caller; whatever else reaches the run waits for them first."""

from __future__ import annotations

import logging
import pickle
import threading

import pytest
import torch

from vaelab.jobs import finish_wandb
from vaelab.loggers import OrderedWorker, WandbLogger


class FakeRun:
    """Stands in for a wandb Run: records each ``log`` with its thread; the first call can be
    held until the test releases it; a call can be made to fail."""

    def __init__(self, hold_first: bool = False, fail_on: str | None = None):
        self.logged: list[tuple[str, dict]] = []
        self.threads: list[threading.Thread] = []
        self.entered = threading.Event()
        self.release = threading.Event()
        if not hold_first:
            self.release.set()
        self.fail_on = fail_on
        self.config: dict = {}
        self.id, self.name = "fake0001", "fake-run"

    def log(self, data: dict) -> None:
        self.entered.set()
        assert self.release.wait(10), "the test never released the held call"
        if self.fail_on is not None and self.fail_on in data:
            raise OSError(f"cannot write {self.fail_on}")
        self.threads.append(threading.current_thread())
        self.logged.append((threading.current_thread().name, dict(data)))


def _logger(tmp_path, run: FakeRun, **kwargs) -> WandbLogger:
    logger = WandbLogger(save_dir=str(tmp_path), offline=True, **kwargs)
    logger._experiment = run  # the run Lightning's logger would create on first use
    return logger


def test_log_metrics_returns_before_wandb_is_done_and_keeps_the_order(tmp_path):
    run = FakeRun(hold_first=True)
    logger = _logger(tmp_path, run)
    logger.log_metrics({"train/elbo": -90.0}, step=10)
    # the held call has started on the worker, and log_metrics has already returned
    assert run.entered.wait(10)
    assert run.logged == []
    value = torch.tensor(-80.0)
    logger.log_metrics({"train/elbo": value}, step=20)
    value.fill_(123.0)  # the caller reuses its buffer before the worker gets to it
    logger.log_metrics({"train/elbo": -70.0}, step=30)
    run.release.set()
    logger.wait()
    assert [d["trainer/global_step"] for _, d in run.logged] == [10, 20, 30]
    assert [float(d["train/elbo"]) for _, d in run.logged] == [-90.0, -80.0, -70.0]
    assert all(name.startswith("vaelab-wandb-log_") for name, _ in run.logged)  # not this thread


def test_anything_else_reaching_the_run_waits_for_the_calls_before_it(tmp_path):
    run = FakeRun(hold_first=True)
    logger = _logger(tmp_path, run)
    logger.log_metrics({"a": 1.0}, step=1)
    assert run.entered.wait(10)
    got: list[int] = []
    reader = threading.Thread(target=lambda: got.append(len(logger.experiment.logged)))
    reader.start()
    reader.join(0.2)
    assert reader.is_alive() and got == []  # experiment is waiting for the held call
    run.release.set()
    reader.join(10)
    assert got == [1]  # and saw it done
    logger.log_hyperparams({"lr": 1e-3})  # through experiment.config, after the calls before it
    assert run.config["lr"] == 1e-3


def test_background_false_logs_on_the_calling_thread(tmp_path):
    run = FakeRun()
    logger = _logger(tmp_path, run, background=False)
    logger.log_metrics({"a": 1.0}, step=1)
    assert run.logged == [(threading.current_thread().name, {"a": 1.0, "trainer/global_step": 1})]


def test_a_failed_call_is_raised_on_the_training_thread(tmp_path):
    run = FakeRun(fail_on="bad")
    logger = _logger(tmp_path, run)
    logger.log_metrics({"bad": 1.0}, step=1)
    with pytest.raises(OSError, match="cannot write bad"):
        logger.wait()
    logger.log_metrics({"good": 2.0}, step=2)  # the logger goes on
    logger.wait()
    assert [d for _, d in run.logged] == [{"good": 2.0, "trainer/global_step": 2}]


def test_finishing_the_run_waits_for_the_calls_and_names_a_failure(tmp_path, caplog):
    run = FakeRun(hold_first=True, fail_on="bad")
    logger = _logger(tmp_path, run)
    logger.log_metrics({"good": 1.0}, step=1)
    logger.log_metrics({"bad": 1.0}, step=2)
    run.release.set()
    with caplog.at_level(logging.WARNING, logger="vaelab"):
        finish_wandb([logger], failed=False)  # does not raise: the run's results are kept
    assert [d["trainer/global_step"] for _, d in run.logged] == [1]
    assert "a W&B logging call failed" in caplog.text and "cannot write bad" in caplog.text
    assert not run.threads[0].is_alive()  # and its worker thread has ended


def test_finalize_stops_the_worker_and_a_later_call_starts_it_again(tmp_path):
    run = FakeRun()
    logger = _logger(tmp_path, run)
    logger.log_metrics({"fit": 1.0}, step=1)
    logger.finalize("success")  # Lightning, at the end of fit: every call has run
    assert len(run.logged) == 1
    assert not run.threads[0].is_alive()  # the worker thread has ended
    logger.log_metrics({"test": 2.0}, step=1)  # the test stage logs again
    logger.finalize("success")
    assert [next(iter(d)) for _, d in run.logged] == ["fit", "test"]


def test_the_logger_pickles_for_spawned_processes_after_its_calls(tmp_path, monkeypatch):
    import wandb

    monkeypatch.setattr(wandb, "require", lambda *a, **k: None)
    run = FakeRun(hold_first=True)
    logger = _logger(tmp_path, run)
    logger.log_metrics({"a": 1.0}, step=1)
    run.release.set()
    copy = pickle.loads(pickle.dumps(logger))
    assert len(run.logged) == 1  # pickling waited for the call
    assert copy.background and copy._worker is not logger._worker


def test_ordered_worker_runs_calls_in_order_on_one_thread():
    worker = OrderedWorker("test-worker")
    seen: list[tuple[int, str]] = []
    for i in range(50):
        worker.submit(lambda i=i: seen.append((i, threading.current_thread().name)))
    worker.wait()
    assert [i for i, _ in seen] == list(range(50))
    assert len({name for _, name in seen}) == 1 and seen[0][1].startswith("test-worker_")
    worker.submit(worker.wait)  # waiting from the worker itself returns (no deadlock)
    worker.close()


def test_a_bad_background_value_is_refused():
    from vaelab.validation import value_problems

    assert value_problems({"logger": {"wandb": {"background": "yes"}}}) == [
        "logger.wandb.background must be true or false, got 'yes' (e.g. logger.wandb.background=true)"]
    assert value_problems({"logger": {"wandb": {"background": False}}}) == []


def test_checkpoints_are_written_on_the_training_thread_only_where_wandb_reads_each_as_saved():
    """Lightning's WandbLogger reads every checkpoint file right after its save with
    log_model=all (or true with save_top_k=-1): the CLI then writes them before the save returns."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    from vaelab.dashboard import reads_checkpoints_when_saved

    def wandb(**settings):
        return {"wandb": {"_target_": "vaelab.loggers.WandbLogger", **settings}}

    best, every = [ModelCheckpoint(save_top_k=1)], [ModelCheckpoint(save_top_k=1), ModelCheckpoint(save_top_k=-1)]
    assert reads_checkpoints_when_saved(wandb(log_model="all"), best)
    assert reads_checkpoints_when_saved(wandb(log_model=True), every)
    assert not reads_checkpoints_when_saved(wandb(log_model=True), best)  # read at the end of training
    assert not reads_checkpoints_when_saved(wandb(log_model=False), every)
    assert not reads_checkpoints_when_saved({"csv": {"_target_": "lightning.pytorch.loggers.CSVLogger",
                                                     "log_model": "all"}}, every)
