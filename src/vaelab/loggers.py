"""Lightning's W&B logger, with the logging calls off the training thread.

``wandb.Run.log`` hands every record to W&B's asyncio thread and waits for it
(``wandb.sdk.lib.asyncio_manager.AsyncioManager.run``). Alone that takes ~0.1 ms; inside a
training loop, where the step's own threads hold the cores, the wait for that thread to be
scheduled made a step's values take 0.92-1.03 ms (median) on this project's 2-core CPU
machine, and the first call 230 ms (W&B offline, the MLP VAE of benchmarks/throughput.py).

:class:`WandbLogger` hands ``log_metrics`` (and so ``log_image``, ``log_table``, ``log_text``,
which go through it) to one worker thread, in order, and returns (0.17 ms for the same call,
the first one included). Whatever else touches the run waits for the calls before it first:
``experiment`` (``log_hyperparams``, ``watch``, summary updates, artifacts), ``finalize``,
:meth:`WandbLogger.wait`, pickling for spawned processes (Lightning's ``__getstate__`` reads
``experiment``). So the run sees every call once, in the order they were made, from one thread
at a time; a failed call is raised on the training thread at the next call (or wait) after it.
W&B's own Python and process still take their CPU time (on 2 cores, from the step's threads).
"""

from __future__ import annotations

import csv
import threading
from collections import deque
from collections.abc import Callable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import torch
from lightning.fabric.loggers.logger import rank_zero_experiment
from lightning.pytorch.loggers import CSVLogger as LightningCSVLogger
from lightning.pytorch.loggers import WandbLogger as LightningWandbLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter
from lightning.pytorch.utilities import rank_zero_only


class OrderedWorker:
    """Calls run one at a time, in the order submitted, on one worker thread (started on the
    first call, stopped by :meth:`close`, started again by a later call). Its owner submits,
    waits and closes from one thread; the worker only runs the calls."""

    def __init__(self, name: str):
        self.name = name
        self._executor: ThreadPoolExecutor | None = None
        self._pending: deque[Future[Any]] = deque()

    def submit(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> None:
        self.raise_failures()
        if self._executor is None:
            self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=self.name)
        self._pending.append(self._executor.submit(fn, *args, **kwargs))

    def raise_failures(self) -> None:
        """Forget the calls that finished; raise the first that failed."""
        while self._pending and self._pending[0].done():
            self._pending.popleft().result()

    def wait(self) -> None:
        """Return once every call submitted so far has run (raising the first that failed).
        From the worker itself (a call that waits for its own queue) it returns at once."""
        if self.in_worker():
            return
        while self._pending:
            self._pending.popleft().result()

    def join(self) -> None:
        """Return once every call submitted so far has run, raising nothing: a failure stays
        for the next :meth:`submit`, :meth:`raise_failures` or :meth:`wait`."""
        if self.in_worker():
            return
        for future in list(self._pending):
            future.exception()

    def unfinished(self) -> int:
        """Calls submitted and not yet run (or running)."""
        return sum(not future.done() for future in self._pending)

    def close(self) -> None:
        try:
            self.wait()
        finally:
            executor, self._executor = self._executor, None
            self._pending.clear()
            if executor is not None:
                executor.shutdown(wait=True)

    def in_worker(self) -> bool:
        return threading.current_thread().name.startswith(self.name + "_")

    def __reduce__(self) -> tuple[Any, ...]:
        return OrderedWorker, (self.name,)  # a copy (a spawned process's) starts its own thread


def _snapshot(value: Any) -> Any:
    """A tensor as it is now (the caller may overwrite its buffer before the worker reads it)."""
    return value.detach().clone() if isinstance(value, torch.Tensor) else value


class WandbLogger(LightningWandbLogger):
    """``lightning.pytorch.loggers.WandbLogger`` (the same arguments), with ``background``:
    True (logger/wandb.yaml's default) logs from a worker thread, so that a training step never
    waits for W&B; False logs on the calling thread, as Lightning's logger does."""

    def __init__(self, *args: Any, background: bool = True, **kwargs: Any):
        super().__init__(*args, **kwargs)
        if self._wandb_init.get("anonymous") is None:
            # Lightning passes anonymous=None to wandb.init; W&B warns on every run that the
            # setting has no effect, whatever its value. Given only if set (then W&B's warning stands)
            self._wandb_init.pop("anonymous", None)
        self.background = bool(background)
        self._worker = OrderedWorker("vaelab-wandb-log")

    @property
    def experiment(self) -> Any:
        # everything that reaches the run through here comes after the calls already handed over
        self._worker.wait()
        return super().experiment

    @rank_zero_only
    def log_metrics(self, metrics: Mapping[str, Any], step: int | None = None) -> None:
        if not self.background or self._worker.in_worker():
            super().log_metrics(metrics, step)
            return
        if self._experiment is None:
            _ = self.experiment  # wandb.init on this thread, not the worker's
        self._worker.submit(super().log_metrics, {k: _snapshot(v) for k, v in metrics.items()}, step)

    def wait(self) -> None:
        """Return once every logging call made so far has reached W&B."""
        self._worker.wait()

    def stop(self) -> None:
        """:meth:`wait`, then end the worker thread (a later call starts another)."""
        self._worker.close()

    @rank_zero_only
    def finalize(self, status: str) -> None:
        self.stop()
        super().finalize(status)


class _KeptMetricsWriter(ExperimentWriter):
    """Lightning's CSV writer, without removing the ``metrics.csv`` it finds: its rows stay,
    and new rows are appended under the union of the columns."""

    def _check_log_dir_exists(self) -> None:
        if not self._fs.isfile(self.metrics_file_path):
            return
        with self._fs.open(self.metrics_file_path, "r", newline="") as file:
            header = next(csv.reader(file), [])
        # the file's columns, so that a row with other ones rewrites the file with all of them
        # (Lightning's ``save``) rather than with the new ones only
        self.metrics_keys = sorted(set(header))


class CSVLogger(LightningCSVLogger):
    """Lightning's CSV logger (``logger=csv``: ``<run folder>/csv/metrics.csv``), continued
    rather than replaced when a run is resumed in its folder. Lightning's writer removes a
    ``metrics.csv`` it finds (with a warning that previous logs will be deleted), so a resume
    lost every value logged before it. Here the file is kept and the resumed run's rows follow
    it; after a resume from a checkpoint saved within an epoch, the steps between that
    checkpoint and the kill appear twice, the killed run's rows first (the later row of a step
    is the one the run continued from). A run folder holds one run (``vaelab.folders``), so a
    ``metrics.csv`` found there is this run's."""

    @property
    @rank_zero_experiment
    def experiment(self) -> ExperimentWriter:
        if self._experiment is None:
            self._fs.makedirs(self.root_dir, exist_ok=True)
            self._experiment = _KeptMetricsWriter(log_dir=self.log_dir)
        return self._experiment
