"""Runs: which W&B run a job writes to, the latest-state checkpoint, and resuming a run.
(Which folder a run or sweep writes to, and its guards: ``vaelab.folders``.)

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
(``logger.wandb.group``, by default the sweep folder; ``${vaelab.sweep_group:}``, registered
by ``vaelab.folders``).
"""

from __future__ import annotations

import contextlib
import copy
import logging
import os
import secrets
import string
import time
from pathlib import Path
from typing import Any
from weakref import proxy

import lightning.pytorch as pl
from lightning.pytorch.callbacks import ModelCheckpoint
from omegaconf import DictConfig, ListConfig, OmegaConf, open_dict

from vaelab.checkpoint_io import AtomicCheckpointIO, link_file
from vaelab.checkpoints import load_checkpoint, resolve_checkpoint
from vaelab.errors import ExplainedError
from vaelab.folders import in_multirun
from vaelab.options import DATA_READ_KEYS
from vaelab.validation import allowed_targets_of

log = logging.getLogger("vaelab")


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


# --- checkpoints ------------------------------------------------------------------------------
def link_checkpoint(trainer: pl.Trainer, source: str, path: str) -> None:
    """``path`` as a second name of the checkpoint file ``source`` (``vaelab.checkpoint_io.link_file``:
    a hard link, a copy where the file system has none), made by rank zero after the writes
    queued before it; every rank waits for it, as for a save."""
    if trainer.is_global_zero:
        io = trainer.strategy.checkpoint_io
        if isinstance(io, AtomicCheckpointIO):
            io.link_checkpoint(source, path)
        else:
            link_file(Path(source), Path(path))
    trainer.strategy.barrier("vaelab.link_checkpoint")


def moved_checkpoint_state(state_dict: dict[str, Any], dirpath: str | None) -> dict[str, Any]:
    """A ``ModelCheckpoint`` state saved with another ``dirpath`` (the run folder was moved or
    copied since), with its files' paths moved to ``dirpath``, as the run's config is
    (``continue_config``); unchanged where the folder is the same."""
    saved = state_dict.get("dirpath")
    if not dirpath or not saved or saved == dirpath:
        return state_dict
    old, new = str(saved), str(dirpath)
    moved = dict(_rebase(state_dict, old, new), dirpath=dirpath)
    if isinstance(moved.get("best_k_models"), dict):  # {path: score}: the paths are its keys
        moved["best_k_models"] = {_rebase(k, old, new): v for k, v in moved["best_k_models"].items()}
    return moved


class BestCheckpoint(ModelCheckpoint):
    """Lightning's ``ModelCheckpoint`` (the same arguments), with ``last.ckpt`` the state at
    its latest save point (an epoch's end, or a validation's where validations run within
    epochs), and each state written once:

    * ``last.ckpt`` follows the training, as before Lightning 2.6. Since 2.6 Lightning writes
      it only when it saves a best checkpoint (``save_last=true``), or links it to the best
      checkpoint saved last (``"link"``), so after the last improvement it stayed at that best
      state, epochs behind the training (found by helper 17). Here a save point without a new
      best checkpoint writes ``last.ckpt`` itself.
    * ``save_last="link"`` (callbacks/default.yaml) makes ``last.ckpt`` a hard link to the best
      checkpoint saved at the same step (``link_checkpoint``) rather than Lightning's symbolic
      link: the same bytes, not written again, surviving the removal of the best file it was
      made from, and read like any file (a copied folder included). ``save_last=true``
      writes a second copy.
    * the file saved at an epoch's end (``epoch_end_save``: the best checkpoint or
      ``last.ckpt``), so that ``LatestCheckpoint``, which saves right after it, can link to it
      rather than serialize the same state again.
    """

    #: (global step, epoch, file) of the checkpoint saved by this epoch's ``on_train_epoch_end``
    epoch_end_save: tuple[int, int, str] | None = None

    @property
    def state_key(self) -> str:
        # the key of Lightning's ModelCheckpoint with these settings, under which runs saved
        # before this class (train.py used ModelCheckpoint itself) hold its record of the best
        return "ModelCheckpoint" + super().state_key[len(type(self).__qualname__):]

    def _save_last_checkpoint(self, trainer: pl.Trainer, monitor_candidates: dict[str, Any]) -> None:
        if self._last_global_step_saved != trainer.global_step:  # no best checkpoint at this step:
            self._last_checkpoint_saved = ""  # last.ckpt written, not linked to an older best one
            self._unshare(trainer, self.format_checkpoint_name(monitor_candidates, self.CHECKPOINT_NAME_LAST))
        super()._save_last_checkpoint(trainer, monitor_candidates)

    @staticmethod
    def _unshare(trainer: pl.Trainer, path: str) -> None:
        """``last.ckpt`` about to be written while it is a hard link to the best checkpoint: a
        checkpoint IO other than vaelab's (``checkpoint_io=null``) may write into the file in
        place (Lightning's, where its temporary file is on another file system, copies into
        it), which would change the best checkpoint too. vaelab's writes a new file and renames
        it over the name; for any other, the name is removed first."""
        if not trainer.is_global_zero or isinstance(trainer.strategy.checkpoint_io, AtomicCheckpointIO):
            return
        with contextlib.suppress(OSError):
            if os.stat(path).st_nlink > 1:
                os.unlink(path)

    def _last_follows(self, trainer: pl.Trainer) -> None:
        # Lightning's hook saved neither a best checkpoint nor (save_last=true, or no best one
        # yet) last.ckpt at this save point
        if self.save_last and not self._should_skip_saving_checkpoint(trainer):
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_validation_end(trainer, pl_module)
        if not self._should_save_on_train_epoch_end(trainer):  # (Lightning's own condition: its save point)
            self._last_follows(trainer)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        before = self._last_global_step_saved
        super().on_train_epoch_end(trainer, pl_module)
        if self._should_save_on_train_epoch_end(trainer):
            self._last_follows(trainer)
        # (Lightning saves at most once a step: a save at this step now is one made by this call)
        saved = self._last_global_step_saved == trainer.global_step != before and self._last_checkpoint_saved
        self.epoch_end_save = (trainer.global_step, trainer.current_epoch, saved) if saved else None

    def _link_checkpoint(self, trainer: pl.Trainer, filepath: str, linkpath: str) -> None:  # type: ignore[override]
        link_checkpoint(trainer, filepath, linkpath)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Lightning's restore, in a run folder that was moved or copied too, and ``last.ckpt``
        taken back as this callback's own.

        A resumed run continues in its folder wherever it now is (``resolve_resume``), but
        Lightning restores the best score and the files' paths only where ``dirpath`` is the
        one saved, and the best file's path even where it is not: in a copied folder the run
        would then test the original folder's best checkpoint, and take any validation for a
        new best. The paths are moved to this ``dirpath`` first, as the config's are.

        A state saved at the first epoch's end records no ``last_model_path`` (the best
        checkpoint's state is collected before ``last.ckpt`` is linked to it); Lightning then
        takes the ``last.ckpt`` it finds for another run's and writes ``last-v1.ckpt``, leaving
        ``last.ckpt`` at the state before the resume. A run folder holds one run
        (``vaelab.folders``), so the ``last.ckpt`` in this ``dirpath`` is this run's."""
        super().load_state_dict(moved_checkpoint_state(state_dict, self.dirpath))
        if self.save_last and not self.last_model_path and self.dirpath:
            last = Path(self.dirpath) / f"{self.CHECKPOINT_NAME_LAST}{self.FILE_EXTENSION}"
            if last.is_file():
                self.last_model_path = str(last)


# --- resume -----------------------------------------------------------------------------------
class LatestCheckpoint(ModelCheckpoint):
    """The latest training state in one file, ``latest-step<N>.ckpt``, replaced at the end of
    every epoch and, within an epoch, once ``every_n_minutes`` have passed since the last save
    (wall clock), or every ``every_n_train_steps`` steps, whichever comes first (each trigger
    is off with ``null``). A run killed at any moment (SIGKILL mid-epoch included) loses at
    most that much. A run stopped by SIGTERM in one process saves the state of the step it
    stopped at, so it loses nothing. A save at a step after which a validation runs (the
    epoch's last, or ``val_check_interval``'s) is made again after it (at the epoch's end, or the
    next step): a resume from the state before a validation skips it, and so is not bit-exact.

    Time rather than steps by default, because a save costs what the state weighs (Lightning's
    collection, serialization and the write: ~10-50 ms for the benchmark's 1.4M-parameter MLP
    with Adam's moments, seconds for a large model), while a step takes anything from ~1 ms (a
    small model on a GPU) to seconds. Every 500 steps was a save a second on an H200 and ~1 %
    of the CPU benchmark's training time; every 5 minutes bounds both the work a kill loses and
    the cost (under 0.1 % for a save under 300 ms).

    One process reads the clock after every step (~0.1 µs). Under DDP every rank must save at
    the same step: rank 0 reads it every ``check_every_n_steps`` steps and broadcasts its
    verdict (Lightning's ``train_time_interval`` broadcasts after every step).

    ``last.ckpt`` (``BestCheckpoint``) cannot serve: it follows the validations, not the
    steps between them.

    At an epoch's end where the ``BestCheckpoint`` just before it in the callbacks saved a
    best checkpoint (the same state), the latest-state file is a hard link to that file
    (``link_checkpoint``) rather than a third serialization and write of it."""

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
        self._step_seen = 0  # the optimizer step count at the previous batch's end
        self._resave = False  # the latest save precedes a validation: saved again after it

    @property
    def state_key(self) -> str:
        # the key Lightning's own step trigger gave it, so that a run saved before the time
        # trigger existed (every_n_train_steps=500 in its stored config) resumes with its state
        return self._generate_state_key(monitor=self.monitor, mode=self.mode, every_n_train_steps=self.every_n_steps,
                                        every_n_epochs=self._every_n_epochs, train_time_interval=None)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(moved_checkpoint_state(state_dict, self.dirpath))  # (BestCheckpoint's)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_train_start(trainer, pl_module)
        self._last_save = time.monotonic()  # (a resumed run too: its clock starts now)
        self._step_seen = trainer.global_step

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        step = trainer.global_step
        stepped, self._step_seen = step != self._step_seen, step
        if not stepped:
            # inside a gradient accumulation (trainer.accumulate_grad_batches), or a step that
            # nan_policy=skip skipped: the gradients gathered so far are in no checkpoint, so a
            # save waits for the batch whose optimizer step takes them
            return
        # told to stop (a job's time limit, timeout, kill): Lightning raises its SIGTERMException
        # right after this hook (or cuts short the validation after it), so this step's state is
        # saved now. Under DDP the ranks learn of the signal at different steps, and a save needs
        # them all, so there the latest periodic save is what is kept.
        stopping = trainer.received_sigterm and trainer.world_size == 1
        periodic = self.every_n_steps > 0 and step % self.every_n_steps == 0
        if not periodic and self.interval_s is not None:
            if trainer.world_size == 1:
                periodic = time.monotonic() - self._last_save >= self.interval_s
            elif step % self.check_every_n_steps == 0:
                periodic = bool(trainer.strategy.broadcast(time.monotonic() - self._last_save >= self.interval_s,
                                                           src=0))
        if not (stopping or periodic or self._resave):
            return
        follows = self._validation_follows(trainer)
        if follows and not (stopping or periodic):
            # only the save again after a validation is due, and a validation follows this step
            # too: it waits for a step without one (val_check_interval=1: the periodic saves go on)
            return
        self._save_latest(trainer)
        # a state before a validation: a resume from it skips that validation (Lightning
        # fast-forwards past it), so its random draws and the rest of the run differ from the
        # uninterrupted run's. It is saved again after the validation, at the epoch's end or the
        # next step; this one keeps the training if the process stops before then (a SIGTERM
        # cuts a validation short).
        self._resave = follows

    @staticmethod
    def _validation_follows(trainer: pl.Trainer) -> bool:
        """Whether a validation runs after this batch: the epoch's last (where this epoch
        validates: ``check_val_every_n_epoch``, a validation set), or ``val_check_interval``'s.
        Lightning's own test, as its loop makes it right after this hook. Under DDP with a
        time-based ``val_check_interval`` each rank reads its own clock, and every rank must make
        the same saves: there, never (a save before such a validation is not made again)."""
        if trainer.world_size > 1 and getattr(trainer, "_val_check_time_interval", None) is not None:
            return False
        loop = trainer.fit_loop.epoch_loop
        return bool(loop._should_check_val_fx(trainer.fit_loop._data_fetcher))

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._resave and self._last_global_step_saved == trainer.global_step:
            self._last_global_step_saved = -1  # (saved at this step before its validation: now after it)
        self._save_latest(trainer)  # after this epoch's validation

    def saved_at(self, step: int) -> str | None:
        """The file this callback saved (or linked) at optimizer step ``step``, if it did."""
        return self._last_checkpoint_saved or None if self._last_global_step_saved == step else None

    @property
    def saved_before_validation(self) -> bool:
        """Whether the latest save holds a state before a validation (not saved again after
        it): a resume from it skips that validation."""
        return self._resave

    def _saved_just_before(self, trainer: pl.Trainer) -> str | None:
        """The file that the checkpoint callback right before this one saved in this epoch's
        ``on_train_epoch_end`` at this step (so: the same training state, the same weights),
        if it did; never for a save within an epoch (another step or epoch). Lightning runs
        the checkpoint callbacks last and one after another, so nothing else ran between that
        save and this one; what differs is the two callbacks' own record of their file names,
        which the linked file holds as of the first save."""
        callbacks = trainer.callbacks
        at = next((i for i, cb in enumerate(callbacks) if cb is self), 0)
        before = callbacks[at - 1] if at > 0 else None
        if isinstance(before, BestCheckpoint) and before.epoch_end_save:
            step, epoch, path = before.epoch_end_save
            if (step, epoch) == (trainer.global_step, trainer.current_epoch):
                return path
        return None

    def _save_latest(self, trainer: pl.Trainer) -> None:
        self._resave = False
        if not self._should_skip_saving_checkpoint(trainer):  # (not twice at one step, not while validating)
            self._save_topk_checkpoint(trainer, self._monitor_candidates(trainer))

    def _save_checkpoint(self, trainer: pl.Trainer, filepath: str) -> None:
        source = self._saved_just_before(trainer)
        if source:
            # the state of this moment is on disk (or queued) already: a second name, not a second copy
            link_checkpoint(trainer, source, filepath)
            self._last_global_step_saved = trainer.global_step
            self._last_checkpoint_saved = filepath
            if trainer.is_global_zero:
                for logger in trainer.loggers:
                    logger.after_save_checkpoint(proxy(self))
        else:
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
        found = sorted((output_dir / "checkpoints").glob("*.ckpt"))
        if ckpt is None and found:
            from vaelab.checkpoints import CheckpointError, archive_opens, other_copies

            unread = [p for p in found if p.name.startswith(("last", "latest-step"))]
            others, same = other_copies(unread, found)
            others = [p for p in others if archive_opens(p)]  # (one cut short too is no way out)
            afresh = "start afresh elsewhere (another hydra.run.dir)"
            if others:
                way = f"Continue from another one: ckpt_path=<file>, e.g. one of {', '.join(p.name for p in others[:3])}; or {afresh}"
            elif same:
                way = (f"{', '.join(p.name for p in same)} {'is' if len(same) == 1 else 'are'} the same file under "
                       f"another name (a hard link), damaged alike, and there is no other: {afresh}, or continue "
                       "from a copy of the run made before")
            else:
                way = afresh[0].upper() + afresh[1:]
            raise CheckpointError(
                f"ckpt_path=last: {output_dir / 'checkpoints'} holds checkpoints, but no last.ckpt or "
                f"latest-step*.ckpt there can be read (damaged or cut short; see the warnings above). {way}. "
                "Nothing has run yet.")
        if ckpt is None:
            if in_multirun():  # a requeued sweep's job that had not started: what ckpt_path=last is for
                log.info("vaelab: ckpt_path=last: %s has no checkpoint yet, so this job starts from scratch",
                         output_dir)
                return cfg, None
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
    # (its allowed_targets become this command's: a checkpoint cannot allow its own code)
    stored = load_checkpoint(ckpt, allowed_targets_of(cfg))["hyper_parameters"]["config"]
    resumed = continue_config(stored, cfg, run_dir, ckpt, command_dir=output_dir)
    if run_dir != output_dir.resolve():
        log.info("vaelab: continuing the run in %s (this command's Hydra files are in %s)", run_dir, output_dir)
    return resumed, ckpt


def finished_run(cfg: DictConfig, ckpt: Path) -> dict[str, Any] | None:
    """The run's ``summary.json`` where continuing it from ``ckpt`` has nothing to do, else None.

    Nothing to do: the run's ``summary.json`` records a finished run (not failed; tested where
    this command tests) whose training ended at the checkpoint's step, and this command's
    ``trainer.max_epochs`` / ``max_steps`` are those it ended under or are reached by the
    checkpoint (as Lightning's fit loop judges it). A requeued sweep (``-m ckpt_path=last ...``)
    thus leaves its finished jobs as they are, instead of testing them again and replacing their
    summaries; a run killed after its training but before its summary is still tested."""
    import torch

    from vaelab.report import read_summary

    if not cfg.get("train", True):
        return None  # train=false: the command asks for the test
    run_dir = str(cfg.paths.output_dir)  # (resolve_resume's: the checkpoint's run, moved or copied too)
    try:
        summary = read_summary(Path(run_dir))
    except (OSError, ValueError):
        return None
    trained = (summary or {}).get("trained")
    if (not isinstance(trained, dict) or summary.get("failed") is not False
            or (cfg.get("test", True) and not summary.get("test"))):
        return None
    # (read whole and checked by resolve_resume already; memory-mapped, the loop counters only)
    state = torch.load(ckpt, map_location="cpu", weights_only=True, mmap=True)
    step = state.get("global_step")
    epochs = state.get("loops", {}).get("fit_loop", {}).get("epoch_progress", {}).get("current", {}).get("processed")
    if trained.get("global_step") != step or not isinstance(epochs, int):
        return None
    max_epochs, max_steps = fit_limits(cfg.trainer)
    reached = (max_steps != -1 and step >= max_steps) or (max_epochs != -1 and epochs >= max_epochs)
    same = (trained.get("max_epochs"), trained.get("max_steps")) == (max_epochs, max_steps)  # an early stop
    if not (reached or same):
        return None
    old_dir = summary.get("output_dir")
    return _rebase(summary, str(old_dir), run_dir) if old_dir else summary


# what summary.json keeps of each command that trained the run (its "commands" list)
COMMAND_KEYS = ("started_at", "wall_time_s", "resumed_from", "resumed_with", "trained", "world_size", "precision",
                "failed", "error")


def trained_so_far(trainer: pl.Trainer) -> dict[str, int]:
    """Where training got (or ended), under which limits: ``summary.json``'s ``trained``, and a
    command's record in a checkpoint."""
    return {"epochs": trainer.fit_loop.epoch_progress.current.processed, "global_step": trainer.global_step,
            "max_epochs": trainer.max_epochs, "max_steps": trainer.max_steps}


def utc_time(seconds: float) -> str:
    """``time.time()`` as an ISO 8601 time in UTC, to the second."""
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(seconds))


def command_record(summary: dict[str, Any]) -> dict[str, Any]:
    """What ``summary.json`` keeps of the command that wrote ``summary``: when it started, how
    long it ran, what it resumed from and with, where its training ended, on what, and whether
    it failed (and why)."""
    return {k: summary[k] for k in COMMAND_KEYS if summary.get(k) is not None}


def read_earlier_summary(run_dir: Path) -> tuple[dict[str, Any] | None, bool]:
    """The ``summary.json`` in ``run_dir`` that a resume's command will replace (None where no
    command wrote one), its paths under the run's folder where the folder has moved since, and
    whether that file could be read (a missing one can)."""
    from vaelab.report import read_summary

    try:
        summary = read_summary(run_dir)
    except (OSError, ValueError) as err:
        log.warning("vaelab: %s cannot be read (%s), so the summary this run writes lists the earlier commands "
                    "only as its checkpoint recorded them", run_dir / "summary.json", type(err).__name__)
        return None, False
    if summary is None:
        return None, True  # killed before its first summary
    old = summary.get("output_dir")
    if isinstance(old, str) and old and old != str(run_dir):  # (the command records keep what they named)
        summary = {k: v if k == "commands" else _rebase(v, old, str(run_dir)) for k, v in summary.items()}
    return summary, True


def commands_of(summary: dict[str, Any] | None) -> list[dict[str, Any]]:
    """The records of the commands that trained a run before this one, from its earlier
    ``summary.json`` (one written before summaries kept the list is its one command). A resume
    writes a new ``summary.json``; without this, each replaced the one before, and the earlier
    commands' wall time, overrides and errors were lost."""
    if summary is None:
        return []
    commands = summary.get("commands")
    if isinstance(commands, list):
        return [c for c in commands if isinstance(c, dict)]
    return [command_record(summary)]


KILLED = ("stopped without writing its summary (killed: SIGKILL, out of memory, a lost node?); its record is "
          "as of its last checkpoint")
#: a record only a checkpoint holds where the run's summary.json could not be read
UNKNOWN = "how it ended is not known (the run's summary.json could not be read); its record is as of its last checkpoint"


def merge_commands(summary: list[dict[str, Any]], checkpoint: list[dict[str, Any]], note: str = KILLED
                   ) -> list[dict[str, Any]]:
    """The records of summary.json and of a checkpoint as one list in order of start: a command
    in both is taken from the summary (whole; a checkpoint's is as of its save); one only the
    checkpoint has ended without a summary, and says so (``note``)."""
    merged: dict[tuple[Any, Any], dict[str, Any]] = {}
    for record in summary:
        merged.setdefault((record.get("started_at"), record.get("resumed_from")), record)
    for record in checkpoint:
        key = (record.get("started_at"), record.get("resumed_from"))
        if key not in merged:
            merged[key] = record if "failed" in record else {**record, "failed": True, "error": note}
    return sorted(merged.values(), key=lambda r: str(r.get("started_at") or ""))


class CommandRecords(pl.Callback):
    """Carries the records of the commands that trained the run in its checkpoints, so that a
    command killed before its ``summary.json`` (SIGKILL, out of memory) is still in the next
    one's ``commands``, with its wall time and step as of its last checkpoint.

    Each checkpoint holds the records known then (the run's ``summary.json``'s and the resumed
    checkpoint's) and this command's own as of the save; ``commands()`` merges them once the
    run ends (``merge_commands``: a summary's record wins over a checkpoint's)."""

    def __init__(self, record: dict[str, Any], started: float, earlier: list[dict[str, Any]],
                 note: str | None = KILLED):
        """``note``: what a record only the resumed checkpoint holds says (None: such records are
        not this run's, from a checkpoint of another run folder, and are left out)."""
        self.record, self.started, self.earlier, self.note = record, started, earlier, note
        self.from_checkpoint: list[dict[str, Any]] = []
        self._trainer: pl.Trainer | None = None

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._trainer = trainer

    def known(self) -> list[dict[str, Any]]:
        return merge_commands(self.earlier, self.from_checkpoint if self.note else [], self.note or KILLED)

    def state_dict(self) -> dict[str, Any]:
        mine = {k: v for k, v in self.record.items() if k != "failed"}  # (no "failed": it had not ended)
        mine["wall_time_s"] = round(time.time() - self.started, 1)
        if self._trainer is not None:
            mine["trained"] = trained_so_far(self._trainer)
        return {"commands": [*self.known(), mine]}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if self._trainer is not None and self._trainer.state.fn != "fit":
            return  # the test's checkpoint (this command's own best): its list is no news
        mine = (self.record.get("started_at"), self.record.get("resumed_from"))
        self.from_checkpoint = [c for c in state_dict.get("commands") or []
                                if isinstance(c, dict) and (c.get("started_at"), c.get("resumed_from")) != mine]


def fit_limits(trainer_cfg: Any) -> tuple[int, int]:
    """``(max_epochs, max_steps)`` as Lightning's Trainer resolves them (-1: no limit)."""
    max_steps = trainer_cfg.get("max_steps")
    max_steps = -1 if max_steps is None else int(max_steps)
    max_epochs = trainer_cfg.get("max_epochs")
    if max_epochs is None:
        max_epochs = 1000 if max_steps == -1 and trainer_cfg.get("max_time") is None else -1
    return int(max_epochs), max_steps


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
FREE_ON_RESUME = tuple(f"data.{key}" for key in DATA_READ_KEYS)


class ResumeConfigError(ValueError, ExplainedError):
    """A resumed run's command line changes what its checkpoint fixes."""


def _fixed_on_resume(key: str) -> bool:
    def under(prefix: str) -> bool:
        return key == prefix or key.startswith(prefix + ".")

    return any(under(p) for p in FIXED_ON_RESUME) and not any(under(p) for p in FREE_ON_RESUME)


def continue_config(stored: dict[str, Any], cfg: DictConfig, run_dir: Path, ckpt: Path,
                    command_dir: Path | None = None) -> DictConfig:
    """The stored (resolved) config of the run, moved to ``run_dir`` if the folder moved, with
    this command line's overrides on top. An override that changes the model, the data set or
    the optimizer (``FIXED_ON_RESUME``) is refused: the checkpoint's weights and optimizer
    state belong to the stored ones (repeating a stored value is fine). An override's paths
    under this command's own folder (``command_dir``: ``logger=csv`` given again puts its
    files under ``${paths.output_dir}``) are moved to ``run_dir`` too: the run's files stay
    in the run's folder."""
    old_dir = (stored.get("paths") or {}).get("output_dir")
    config = _rebase(stored, str(old_dir), str(run_dir)) if old_dir else dict(stored)
    new = OmegaConf.create(config)
    changed: list[str] = []
    given = _command_line_keys()
    for key, delete in given:
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
            if in_multirun():
                continue  # (a requeued sweep repeats its command; a search's sets up the sweeper)
            log.warning("vaelab: %s=... is not applied when a run is resumed: the run continues with the config "
                        "stored in its checkpoint (give the settings you may change, e.g. trainer.max_epochs, "
                        "on the command line)", key)
            continue
        if value is None and before is None:
            continue  # a group that is no key of the config
        if isinstance(value, DictConfig | ListConfig):
            value = OmegaConf.to_container(value, resolve=True)
        if command_dir is not None:
            value = _rebase(value, str(command_dir), str(run_dir))
        if _fixed_on_resume(key) and _comparable(key, _resolved_auto(key, value, before)) != _comparable(key, before):
            changed.append(_describe_change(key, _comparable(key, before), _comparable(key, value)))
            continue
        if isinstance(value, dict) and isinstance(before, dict):  # a group given again (trainer=cpu)
            # (data=... given again: its binarize/dequantize=auto resolve to the stored choices)
            value = _regiven_group(key, before, _resolved_auto(key, value, before), {k for k, _ in given})
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


def _flat(value: Any, prefix: str) -> dict[str, Any]:
    if isinstance(value, dict) and value:
        return {k: v for key, sub in value.items() for k, v in _flat(sub, f"{prefix}.{key}").items()}
    return {prefix: value}


def _regiven_group(key: str, stored: dict[str, Any], value: dict[str, Any], given: set[str]) -> dict[str, Any]:
    """A config group given again on a resumed run's command line (``trainer=ddp_sim``,
    ``logger=[wandb,csv]``, as a requeued job repeats its command) is composed afresh from its
    option's file, so the stored run's own settings in it are replaced by the option's
    defaults. The W&B run id, which the run drew when it started, is kept (a new one split the
    run in two); any other stored setting this replaces, and this command line does not give
    itself, is named with the fix (trainer.max_epochs=3 became the file's 100 unsaid)."""
    value = copy.deepcopy(value)
    wandb_before, wandb_now = (stored.get("wandb"), value.get("wandb")) if key == "logger" else (None, None)
    if isinstance(wandb_before, dict) and isinstance(wandb_now, dict) and wandb_before.get("id") \
            and not wandb_now.get("id") and f"{key}.wandb.id" not in given:
        wandb_now["id"] = wandb_before["id"]
    old, new = _flat(stored, key), _flat(value, key)

    def replaced(k: str) -> bool:  # a setting of a node both have (not a logger turned off)
        if k in new:
            return old[k] != new[k]
        parent = k.rpartition(".")[0]
        return any(n.startswith(parent + ".") for n in new)

    lost = [k for k in old if replaced(k) and not any(k == g or k.startswith(g + ".") for g in given if g != key)]
    if lost:
        log.warning(
            "vaelab: %s=... on this resumed run's command line composes %s afresh from its option's file, which "
            "replaces the run's stored %s. To keep any of them, give it too: %s",
            key, key, ", ".join(f"{k}={old[k]!r} (now {new[k]!r})" if k in new else f"{k}={old[k]!r} (now unset)"
                                for k in lost),
            " ".join(f"{'' if k in new else '+'}{k}={_override_text(old[k])}" for k in lost))
    return value


def _override_text(value: Any) -> str:
    """``value`` as a command-line override's value."""
    return "null" if value is None else str(value).lower() if isinstance(value, bool) else str(value)


def _resolved_auto(key: str, value: Any, stored: Any) -> Any:
    """``value`` with ``data.binarize`` / ``data.dequantize`` = auto read as the stored run's
    choice: auto is resolved from the likelihood (``vaelab.jobs.resolve_data_options``), which a
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
