"""Runs and sweeps: which folder and which W&B run a job writes to, and resuming a run.

Resume (``ckpt_path``):

* ``ckpt_path=<run folder>`` (or a checkpoint in ``<run folder>/checkpoints/``) continues that
  run: in its folder, with its stored config (the one its checkpoint carries; overrides given on
  this command line, e.g. ``trainer.max_epochs=200``, apply on top, except those that change the
  model, the data set or the optimizer: ``FIXED_ON_RESUME``), in the same W&B run (the id
  is part of the stored config), from the training state of the checkpoint (mid-epoch too).
* ``ckpt_path=last`` continues the run of the current output folder from its
  ``checkpoints/last.ckpt``, e.g. ``hydra.run.dir=<run folder> ckpt_path=last``. Without a
  checkpoint there yet it starts from scratch, so one command serves a job's first start and
  every restart after a preemption (SLURM requeue).

Sweeps: every job of a Hydra multirun is its own W&B run in the group named after the sweep
(``logger.wandb.group``, by default the sweep folder; ``${vaelab.sweep_group:}``).
"""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
import string
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
from hydra.experimental.callback import Callback
from lightning.pytorch.callbacks import ModelCheckpoint
from omegaconf import DictConfig, ListConfig, OmegaConf, open_dict, read_write

from vaelab.checkpoint_io import AtomicCheckpointIO
from vaelab.checkpoints import load_checkpoint, resolve_checkpoint
from vaelab.report import run_order

log = logging.getLogger("vaelab")


# --- one writer per folder ---------------------------------------------------------------------
#: the lock file of a folder that a vaelab process writes into (removed when it is done)
LOCK_NAME = ".vaelab.lock"
_claims: dict[Path, tuple[int, bool]] = {}  # folder → (lock file descriptor, whether the claim made the folder)


def claim_folder(folder: str | Path) -> str | None:
    """Hold ``folder`` for this process with an exclusive ``flock`` on ``<folder>/.vaelab.lock``
    (released by the kernel however the process ends, SIGKILL too), so that two runs started
    in the same second (whose time-named folders are the same), or two resumes of one run, do
    not write into one folder. None once this process holds it, or where the file system cannot
    lock (nothing is held then, as before); else who holds it."""
    key = Path(folder).expanduser().resolve()  # one key for every path to it (symbolic links)
    if key in _claims:
        return None
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not on a POSIX system
        return None
    created = not key.exists()
    try:
        key.mkdir(parents=True, exist_ok=True)
        fd = os.open(key / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError:
        return None  # an unwritable folder is the config check's to report
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 200, 0).decode(errors="replace").strip()
        os.close(fd)
        return holder or "another process"
    except OSError:
        os.close(fd)
        return None
    import socket

    os.ftruncate(fd, 0)
    os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}, since {time.strftime('%Y-%m-%d %H:%M:%S')}\n".encode(), 0)
    _claims[key] = (fd, created)
    return None


def release_folder(folder: str | Path) -> None:
    """Give up this process's hold on ``folder`` (``claim_folder``) and remove its lock file,
    and the folder itself where the claim made it and nothing else was written there (a run
    refused before it started)."""
    key = Path(folder).expanduser().resolve()
    held = _claims.pop(key, None)
    if held is not None:
        fd, created = held
        with contextlib.suppress(OSError):
            (key / LOCK_NAME).unlink()
        os.close(fd)
        if created:
            with contextlib.suppress(OSError):
                key.rmdir()  # only if empty


@contextlib.contextmanager
def folder_claims() -> Iterator[None]:
    """Release on leaving the folders claimed inside (those claimed before stay held)."""
    before = set(_claims)
    try:
        yield
    finally:
        for key in set(_claims) - before:
            release_folder(key)


def _time_named(node: DictConfig, key: str) -> bool:
    """Whether ``node[key]`` is named after the time it started (``${now:...}``, Hydra's
    default), not a folder the user chose."""
    return "${now:" in str(OmegaConf.to_container(node, resolve=False).get(key, ""))


# --- sweeps -----------------------------------------------------------------------------------
def in_multirun() -> bool:
    """Whether this process runs one job of a Hydra multirun (a sweep)."""
    try:
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode
    except ImportError:  # pragma: no cover
        return False
    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


def sweep_group() -> str | None:
    """The sweep's name for the W&B group of its jobs: the sweep folder (relative to where the
    sweep was started when below it), e.g. ``outputs/train/multirun/2026-11-21/08-15-06``;
    None outside a sweep."""
    if not in_multirun():
        return None
    from hydra.core.hydra_config import HydraConfig

    hc = HydraConfig.get()
    sweep_dir = Path(str(hc.sweep.dir))
    try:
        sweep_dir = sweep_dir.resolve().relative_to(Path(hc.runtime.cwd).resolve())
    except ValueError:
        pass
    return str(sweep_dir)[-128:]  # W&B's limit on a group name


def register_resolvers() -> None:
    OmegaConf.register_new_resolver("vaelab.sweep_group", sweep_group, replace=True)


register_resolvers()


def job_failure(job: Path) -> str | None:
    """Why a sweep job failed (None if it did not): its ``summary.json`` says ``failed``, or it
    never wrote one (it stopped before training: a config the job alone could check)."""
    from vaelab.report import failure, read_summary

    try:
        why = failure(read_summary(job))
    except (OSError, ValueError) as err:
        return f"summary.json unreadable ({type(err).__name__})"
    return None if why is None else why or "failed"


def _config_problems(name: str, overrides: list[str]) -> list[str]:
    """``vaelab.validation.value_problems`` of the config that ``overrides`` compose, or why
    they do not compose (a config group option that does not exist, a key that is not there)."""
    from hydra import compose
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    from vaelab.validation import value_problems

    try:
        return value_problems(compose(config_name=name, overrides=overrides))
    except (HydraException, OmegaConfBaseException) as err:
        # Hydra's own message, which names the options there are (not where it searched for them)
        return [" ".join(str(err).split("Config search path")[0].split())]


def sweep_value_problems(config: DictConfig, max_jobs: int = 1000) -> list[str]:
    """Each job of a grid sweep (Hydra's basic sweeper) whose values fail
    ``vaelab.validation.value_problems`` or do not compose, as ``job N (its overrides):
    problems``; for a search that chooses its values as it goes (Optuna), each value of its
    search space that does, as ``key=value (of the search space): problems`` (every choice,
    both ends of an interval or a range; each with the sweep's fixed overrides). Found before the first job
    starts instead of when that job's turn comes (a trial that fails counts as -inf and the
    search goes on, spending its trials). Each job still checks its own values at its start."""
    sweeper = str(OmegaConf.select(config, "hydra.sweeper._target_", default="") or "")
    grid, search = sweeper.endswith("BasicSweeper"), sweeper.endswith("OptunaSweeper")
    if not (grid or search):
        return []
    from hydra.core.override_parser.overrides_parser import OverridesParser

    params = OmegaConf.select(config, "hydra.sweeper.params", default=None) or {}
    arguments = [f"{k}={v}" for k, v in params.items() if isinstance(v, str | int | float)]
    arguments += list(config.hydra.overrides.task)
    name = str(OmegaConf.select(config, "hydra.job.config_name", default=None) or "train")
    parsed = OverridesParser.create().parse_overrides(arguments)
    if grid:
        from hydra._internal.core_plugins.basic_sweeper import BasicSweeper

        jobs = [job for batch in BasicSweeper.split_arguments(parsed, None) for job in batch]
        if len(jobs) > max_jobs:
            return []  # composing each would take long; every job still checks its own at its start
        found = []
        for number, job in enumerate(jobs):
            problems = _config_problems(name, list(job))
            if problems:
                found.append(f"job {number} ({' '.join(job)}): {'; '.join(problems)}")
        return found
    from hydra.core.override_parser.types import IntervalSweep, RangeSweep

    # a key given on the command line replaces the search space's entry for it, as in the sweeper
    last = {o.get_key_element(): o for o in parsed}
    fixed = [o.input_line for o in last.values() if not o.is_sweep_override()]
    found = []
    for key, override in last.items():
        if not override.is_sweep_override():
            continue
        value = override.value()
        if isinstance(value, IntervalSweep):
            values = [str(value.start), str(value.end)]
        else:  # choice(...), a,b,c: each; range(...): its ends
            values = list(override.sweep_string_iterator())
            values = values[:1] + values[-1:] if isinstance(value, RangeSweep) and len(values) > 1 else values
        for one in values[:max_jobs]:
            problems = _config_problems(name, [*fixed, f"{key}={one}"])
            if problems:
                found.append(f"{key}={one} (of the search space {override.input_line}): {'; '.join(problems)}")
    return found


class RunFolders(Callback):
    """A Hydra callback (``hydra.callbacks`` in train.yaml) that guards run and sweep folders
    before Hydra writes into them, and closes a sweep with its failures:

    * a run (no ``ckpt_path``) into a folder that holds an earlier run, or a sweep into a sweep
      folder whose jobs hold earlier runs, is refused before Hydra saves its ``.hydra`` files
      there (``vaelab.validation.earlier_run_problem``; ``train()`` checks again itself);
    * the run or sweep folder is held for this process (``claim_folder``) until it ends: a
      time-named folder that a run or sweep of the same second holds becomes the next free name
      (``<folder>-2``, ...); a named one is refused while another process holds it;
    * after the last job of a sweep, the jobs that failed are listed with their errors and the
      sweep exits non-zero; the jobs that ran keep their results.

    With ``task: eval`` (eval.yaml) it guards eval.py's folder instead: one that holds an
    earlier run's or evaluation's config, metrics or pictures is refused before Hydra writes
    (``vaelab.validation.earlier_eval_problem``).

    Hydra turns an exception in a callback into a warning and goes on, so these print their
    message and stop the process with ``SystemExit(1)``.
    """

    def __init__(self, task: str = "train") -> None:
        if task not in ("train", "eval"):
            raise ValueError(f"RunFolders(task=...) is train or eval, got {task!r}")
        self.task = task
        self._held: Path | None = None  # the folder this process claimed (claim_folder)

    @staticmethod
    def _stop(message: str) -> None:
        print(f"vaelab: {message}", file=sys.stderr, flush=True)
        raise SystemExit(1)

    def _earlier(self, folder: Path, ckpt_path: Any = None) -> str | None:
        from vaelab.validation import earlier_eval_problem, earlier_run_problem

        if self.task == "eval":
            return earlier_eval_problem(folder)
        return earlier_run_problem(OmegaConf.create({"ckpt_path": ckpt_path, "paths": {"output_dir": str(folder)}}))

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        from vaelab.validation import launched_rank

        # a DDP job's other processes run in rank zero's folder, after rank zero wrote there
        # (vaelab.distributed: hydra.output_subdir=null; or a cluster's launcher)
        if launched_rank() or config.hydra.get("output_subdir") is None:
            return
        # the hold first: a run that started a moment ago in this folder is not an earlier one
        folder, renamed = self._hold(config.hydra.run, "run")
        if not renamed:
            problem = self._earlier(folder, config.get("ckpt_path"))
            if problem:
                release_folder(folder)
                self._stop(f"{problem}; nothing has run yet")
        self._held = folder

    def _hold(self, node: DictConfig, what: str) -> tuple[Path, bool]:
        """Claim the folder ``node.dir`` (``hydra.run`` or ``hydra.sweep``) for this process;
        (the folder held, whether it is another than the one asked for). Held by another
        process: refused where the user named it; where it is named after the second it started
        (Hydra's default), taken by a run or sweep of the same second (a loop of ``python
        train.py ... &``), the next free name instead."""
        folder = Path(str(node.dir))
        holder = claim_folder(folder)
        if holder is None:
            return folder, False
        key = f"hydra.{what}.dir"
        if not _time_named(node, "dir"):
            self._stop(f"{key}={folder} is being written by another {what} right now ({holder}): wait until it has "
                       f"finished, or give another {key}; nothing has run yet")
        other = self._next_free(folder)
        with read_write(node):
            node.dir = str(other)
        print(f"vaelab: {folder} is being written by another {what} started in the same second ({holder}); this one "
              f"writes to {other}", file=sys.stderr, flush=True)
        return other, True

    def _next_free(self, folder: Path) -> Path:
        for n in range(2, 1000):
            other = folder.with_name(f"{folder.name}-{n}")
            if claim_folder(other) is None:
                if self._earlier(other) is None:
                    return other
                release_folder(other)
        self._stop(f"{folder} and the 998 names after it are taken; give another folder")
        raise AssertionError  # (unreachable: _stop exits)

    def on_run_end(self, config: DictConfig, **kwargs: Any) -> None:
        if self._held is not None:
            release_folder(self._held)
            self._held = None

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        # the hold first: the jobs of a sweep that started a moment ago are not earlier ones
        sweep, renamed = self._hold(config.hydra.sweep, "sweep")
        if renamed:  # for the jobs too: Hydra composes each job's config again from the overrides
            from vaelab.distributed import quote_override

            with read_write(config.hydra):
                config.hydra.overrides.hydra.append(f"hydra.sweep.dir={quote_override(str(sweep))}")
        self._held = sweep
        try:
            self._check_sweep(config, sweep)
        except SystemExit:
            release_folder(sweep)  # a refused sweep leaves no lock file behind
            self._held = None
            raise

    def _check_sweep(self, config: DictConfig, sweep: Path) -> None:
        # e.g. -m ckpt_path=last ...: a requeued training sweep
        resumes = self.task == "train" and config.get("ckpt_path") not in (None, "")
        jobs = sorted(p for p in sweep.iterdir() if p.is_dir()) if sweep.is_dir() and not resumes else []
        held = [job.name for job in jobs if self._earlier(job)]
        if held:
            self._stop(f"hydra.sweep.dir={sweep} holds the runs of an earlier sweep (jobs {', '.join(held)}), which "
                       "this sweep would overwrite: give another hydra.sweep.dir; nothing has run yet")
        bad = sweep_value_problems(config) if self.task == "train" else []
        if bad:
            lines = "\n  ".join(bad)
            what = "the sweep's jobs" if bad[0].startswith("job ") else "the search space's values"
            self._stop(f"{len(bad)} of {what} would fail the config check; nothing has run yet (fix or "
                       f"drop those options):\n  {lines}")

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        if self._held is not None:
            release_folder(self._held)
            self._held = None
        if self.task == "eval":  # an evaluation writes no summary.json; a failed one stops the sweep
            return
        sweep = Path(str(config.hydra.sweep.dir))
        jobs = sorted((p for p in sweep.iterdir() if (p / ".hydra").is_dir()),
                      key=lambda p: run_order(p, sweep)) if sweep.is_dir() else []
        failed = [(job, why) for job in jobs if (why := job_failure(job))]
        if failed:
            lines = "\n  ".join(f"{job}: {why[:300]}" for job, why in failed)
            self._stop(f"{len(failed)} of {len(jobs)} sweep jobs failed (each folder's summary.json and log say "
                       f"more; vaelab-report {sweep} lists every job):\n  {lines}")


# --- W&B run identity ---------------------------------------------------------------------------
def ensure_wandb_id(cfg: DictConfig) -> None:
    """Fix the W&B run id before anything is logged, so that it is stored with the config in
    every checkpoint and a resumed run continues the same W&B run."""
    wandb_cfg = (cfg.get("logger") or {}).get("wandb") if cfg.get("logger") else None
    if not wandb_cfg or wandb_cfg.get("id"):
        return
    alphabet = string.ascii_lowercase + string.digits  # W&B's own id alphabet and length
    with open_dict(cfg):
        cfg.logger.wandb.id = "".join(secrets.choice(alphabet) for _ in range(8))


# --- resume -----------------------------------------------------------------------------------
class LatestCheckpoint(ModelCheckpoint):
    """The latest training state in one file, ``latest-step<N>.ckpt``, replaced at the end of
    every epoch and, within an epoch, once ``every_n_minutes`` have passed since the last save
    (wall clock), or every ``every_n_train_steps`` steps, whichever comes first (each trigger
    is off with ``null``). A run killed at any moment (SIGKILL mid-epoch included) loses at
    most that much.

    Time rather than steps by default, because a save costs what the state weighs (Lightning's
    collection, serialization and the write: ~10-50 ms for the benchmark's 1.4M-parameter MLP
    with Adam's moments, seconds for a large model), while a step takes anything from ~1 ms (a
    small model on a GPU) to seconds. Every 500 steps was a save a second on an H200 and ~1 %
    of the CPU benchmark's training time; every 5 minutes bounds both the work a kill loses and
    the cost (under 0.1 % for a save under 300 ms).

    One process reads the clock after every step (~0.1 µs). Under DDP every rank must save at
    the same step: rank 0 reads it every ``check_every_n_steps`` steps and broadcasts its
    verdict (Lightning's ``train_time_interval`` broadcasts after every step).

    Lightning's ``last.ckpt`` cannot serve: since Lightning 2.6 it is written only when a
    top-k (best) checkpoint is, so it can be epochs behind the training."""

    def __init__(self, dirpath: str, every_n_minutes: float | None = 5.0, every_n_train_steps: int | None = None,
                 check_every_n_steps: int = 50, filename: str = "latest-step{step}"):
        where = "callbacks.step_checkpoint"
        if every_n_minutes is not None and not float(every_n_minutes) > 0:
            raise ValueError(f"{where}.every_n_minutes={every_n_minutes}: give a number of minutes > 0, or null "
                             "for no time trigger")
        if every_n_train_steps is not None and int(every_n_train_steps) < 0:
            raise ValueError(f"{where}.every_n_train_steps={every_n_train_steps}: give a number of steps >= 1, or "
                             "null (or 0) for no step trigger")
        if int(check_every_n_steps) < 1:
            raise ValueError(f"{where}.check_every_n_steps={check_every_n_steps}: give a number of steps >= 1")
        # Lightning's own step and time triggers off (and with them its per-step broadcast)
        super().__init__(dirpath=dirpath, filename=filename, auto_insert_metric_name=False, monitor=None,
                         save_top_k=1, save_last=False, every_n_train_steps=0)
        self.every_n_steps = int(every_n_train_steps or 0)
        self.interval_s = None if every_n_minutes is None else 60.0 * float(every_n_minutes)
        self.check_every_n_steps = int(check_every_n_steps)
        self._last_save = time.monotonic()

    @property
    def state_key(self) -> str:
        # the key Lightning's own step trigger gave it, so that a run saved before the time
        # trigger existed (every_n_train_steps=500 in its stored config) resumes with its state
        return self._generate_state_key(monitor=self.monitor, mode=self.mode, every_n_train_steps=self.every_n_steps,
                                        every_n_epochs=self._every_n_epochs, train_time_interval=None)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_train_start(trainer, pl_module)
        self._last_save = time.monotonic()  # (a resumed run too: its clock starts now)

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        step = trainer.global_step
        due = self.every_n_steps > 0 and step % self.every_n_steps == 0
        if not due and self.interval_s is not None:
            if trainer.world_size == 1:
                due = time.monotonic() - self._last_save >= self.interval_s
            elif step % self.check_every_n_steps == 0:
                due = bool(trainer.strategy.broadcast(time.monotonic() - self._last_save >= self.interval_s, src=0))
        if due:
            self._save_latest(trainer)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._save_latest(trainer)  # after this epoch's validation

    def _save_latest(self, trainer: pl.Trainer) -> None:
        if not self._should_skip_saving_checkpoint(trainer):  # (not twice at one step, not while validating)
            self._save_topk_checkpoint(trainer, self._monitor_candidates(trainer))

    def _save_checkpoint(self, trainer: pl.Trainer, filepath: str) -> None:
        super()._save_checkpoint(trainer, filepath)
        self._last_save = time.monotonic()  # the next time trigger counts from here, an epoch's end included
        # one file: also the one a resumed run started from (its stored state names an older one)
        if trainer.is_global_zero and self.dirpath and self.filename:
            folder, prefix, keep = Path(self.dirpath), self.filename.split("{")[0], Path(filepath).resolve()

            def remove_older() -> None:
                for old in folder.glob(f"{prefix}*.ckpt"):
                    if old.resolve() != keep:
                        old.unlink(missing_ok=True)

            # with writes in the background: once the new file is on disk, and not if it failed
            io = trainer.strategy.checkpoint_io
            if isinstance(io, AtomicCheckpointIO):
                io.after_writes(remove_older)
            else:
                remove_older()


def resolve_resume(cfg: DictConfig) -> tuple[DictConfig, Path | None]:
    """The config to run and the checkpoint to resume from (None: start from scratch)."""
    ckpt_path = cfg.get("ckpt_path")
    if ckpt_path in (None, ""):
        return cfg, None
    output_dir = Path(str(cfg.paths.output_dir))
    if str(ckpt_path) == "last":
        ckpt = newest_checkpoint(output_dir)
        others = sorted((output_dir / "checkpoints").glob("*.ckpt"))
        if ckpt is None and others:
            from vaelab.checkpoints import CheckpointError

            raise CheckpointError(
                f"ckpt_path=last: {output_dir / 'checkpoints'} holds checkpoints, but no last.ckpt or "
                f"latest-step*.ckpt there can be read (damaged or cut short; see the warnings above). Continue "
                f"from another one: ckpt_path=<file>, e.g. one of {', '.join(p.name for p in others[:3])}; or "
                "start afresh elsewhere (another hydra.run.dir). Nothing has run yet.")
        if ckpt is None:
            log.warning(
                "ckpt_path=last: %s has no checkpoints/last.ckpt yet, so training starts from scratch "
                "here. To continue an earlier run, name its folder: ckpt_path=<run folder>, or "
                "hydra.run.dir=<run folder> ckpt_path=last.", output_dir,
            )
            return cfg, None
    elif Path(str(ckpt_path)).expanduser().is_dir():
        ckpt = newest_checkpoint(Path(str(ckpt_path)).expanduser()) or resolve_checkpoint(ckpt_path)
    else:
        ckpt = resolve_checkpoint(ckpt_path)
    ckpt = ckpt.resolve()
    run_dir = ckpt.parent.parent if ckpt.parent.name == "checkpoints" else output_dir.resolve()
    stored = load_checkpoint(ckpt)["hyper_parameters"]["config"]
    resumed = continue_config(stored, cfg, run_dir, ckpt)
    if run_dir != output_dir.resolve():
        log.info("vaelab: continuing the run in %s (this command's Hydra files are in %s)", run_dir, output_dir)
    return resumed, ckpt


def newest_checkpoint(run_dir: Path) -> Path | None:
    """The run's latest training state: of ``checkpoints/last.ckpt`` (end of a validation
    epoch) and ``checkpoints/latest-step*.ckpt`` (every N steps), the one furthest on."""
    import torch

    found = []
    for path in sorted((run_dir / "checkpoints").glob("*.ckpt")):
        if path.name.startswith(("last", "latest-step")):
            try:  # memory-mapped: reads two numbers, not the weights
                ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
                found.append(((int(ckpt.get("global_step", -1)), path.stat().st_mtime), path))
            except Exception as err:  # a damaged file: the other candidate may do
                log.warning("vaelab: skipping %s, which cannot be read (%s)", path, type(err).__name__)
    return max(found)[1] if found else None


#: what a resumed run keeps from its checkpoint: the model its weights belong to, the data set
#: and batches its loops' state counts, and the optimizer whose state Lightning restores (an
#: override of optim.* would be stored in the config but not applied)
FIXED_ON_RESUME = ("latent_dim", "encoder", "decoder", "posterior", "likelihood", "prior", "optim", "data")
#: ... except where the data are read from and how they are loaded
FREE_ON_RESUME = ("data.root", "data.download", "data.num_workers", "data.pin_memory", "data.on_device",
                  "data.eval_batch_size")


class ResumeConfigError(ValueError):
    """A resumed run's command line changes what its checkpoint fixes."""


def _fixed_on_resume(key: str) -> bool:
    def under(prefix: str) -> bool:
        return key == prefix or key.startswith(prefix + ".")

    return any(under(p) for p in FIXED_ON_RESUME) and not any(under(p) for p in FREE_ON_RESUME)


def continue_config(stored: dict[str, Any], cfg: DictConfig, run_dir: Path, ckpt: Path) -> DictConfig:
    """The stored (resolved) config of the run, moved to ``run_dir`` if the folder moved, with
    this command line's overrides on top. An override that changes the model, the data set or
    the optimizer (``FIXED_ON_RESUME``) is refused: the checkpoint's weights and optimizer
    state belong to the stored ones (repeating a stored value is fine)."""
    old_dir = (stored.get("paths") or {}).get("output_dir")
    config = _rebase(stored, str(old_dir), str(run_dir)) if old_dir else dict(stored)
    new = OmegaConf.create(config)
    changed: list[str] = []
    for key, delete in _command_line_keys():
        if key in ("ckpt_path",) or key.startswith("hydra"):
            continue
        before = OmegaConf.select(new, key, default=None)
        if isinstance(before, DictConfig | ListConfig):
            before = OmegaConf.to_container(before, resolve=True)
        if delete:
            if _fixed_on_resume(key) and before is not None:
                changed.append(f"~{key} (stored: {before!r})")
                continue
            parent, _, leaf = key.rpartition(".")
            node = OmegaConf.select(new, parent) if parent else new
            if isinstance(node, DictConfig) and leaf in node:
                del node[leaf]
            continue
        value = OmegaConf.select(cfg, key, default=None)
        if key in ("experiment", "hparams_search"):
            log.warning("vaelab: %s=... is not applied when a run is resumed: the run continues with the config "
                        "stored in its checkpoint (give the settings you may change, e.g. trainer.max_epochs, "
                        "on the command line)", key)
            continue
        if value is None and before is None:
            continue  # a group that is no key of the config
        if isinstance(value, DictConfig | ListConfig):
            value = OmegaConf.to_container(value, resolve=True)
        if _fixed_on_resume(key) and _comparable(key, _resolved_auto(key, value, before)) != _comparable(key, before):
            changed.append(_describe_change(key, _comparable(key, before), _comparable(key, value)))
            continue
        OmegaConf.update(new, key, value, merge=False, force_add=True)
    if changed:
        raise ResumeConfigError(
            f"ckpt_path continues the run in {run_dir} from {ckpt.name}, whose weights, data and optimizer "
            f"state belong to its stored config; this command line changes it: {'; '.join(changed)}. "
            "A resumed run keeps its model (latent_dim, encoder, decoder, posterior, likelihood, prior), its "
            "data set and batches (data.*, but for where and how they are read) and its optimizer (optim.*). "
            "To train another configuration start a new run: drop ckpt_path (and give another hydra.run.dir). "
            "Nothing has run yet."
        )
    with open_dict(new):
        new.paths.output_dir = str(run_dir)
        new.ckpt_path = str(ckpt)
    return new


def _resolved_auto(key: str, value: Any, stored: Any) -> Any:
    """``value`` with ``data.binarize`` / ``data.dequantize`` = auto read as the stored run's
    choice: auto is resolved from the likelihood (``vaelab.cli.resolve_data_options``), which a
    resume keeps, so it resolves to what is stored."""
    auto_keys = ("binarize", "dequantize")
    if key == "data" and isinstance(value, dict) and isinstance(stored, dict):
        return {k: stored.get(k) if k in auto_keys and v == "auto" else v for k, v in value.items()}
    if key in ("data.binarize", "data.dequantize") and value == "auto":
        return stored
    return value


def _comparable(key: str, value: Any) -> Any:
    """A group's settings without those free on resume (``data=mnist`` given again from another
    folder: its ``data.root`` may differ)."""
    if isinstance(value, dict):
        return {k: v for k, v in value.items() if not any(f == f"{key}.{k}" for f in FREE_ON_RESUME)}
    return value


def _describe_change(key: str, before: Any, value: Any) -> str:
    """``key: stored → given``, for a group the options' targets (``likelihood: Bernoulli →
    Gaussian``) and otherwise the values that differ."""
    if isinstance(before, dict) and isinstance(value, dict):
        if before.get("_target_") != value.get("_target_"):
            def name(d: dict[str, Any]) -> str:
                return str(d.get("_target_", "?")).rsplit(".", 1)[-1]

            return f"{key}: {name(before)} → {name(value)}"
        diffs = [f"{key}.{k}: {before.get(k)!r} → {value.get(k)!r}" for k in sorted(set(before) | set(value))
                 if before.get(k) != value.get(k)]
        return ", ".join(diffs[:4]) + (", …" if len(diffs) > 4 else "")
    return f"{key}: {before!r} → {value!r}"


def _command_line_keys() -> list[tuple[str, bool]]:
    """The keys this command line overrides (``a.b=1``, ``+a.b=1``, ``~a.b``, ``group=option``)."""
    from vaelab.validation import command_line_overrides

    return [(o.key_or_group.replace("/", "."), o.is_delete()) for o in command_line_overrides()]


def _rebase(value: Any, old: str, new: str) -> Any:
    """Every string under the run's old folder, moved to the new one."""
    if isinstance(value, dict):
        return {k: _rebase(v, old, new) for k, v in value.items()}
    if isinstance(value, list):
        return [_rebase(v, old, new) for v in value]
    if isinstance(value, str) and (value == old or value.startswith(old.rstrip("/") + "/")):
        return new + value[len(old.rstrip("/")):] if value != old else new
    return value
