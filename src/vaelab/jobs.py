"""Training and evaluation jobs: the Hydra config wired to objects and run by Lightning; no
math lives here. ``python train.py`` / ``eval.py`` (``vaelab.cli``) check the config before
importing this module, which imports torch, Lightning and W&B, and then call ``train`` /
``evaluate`` with ``checked=True``.
"""

from __future__ import annotations

import logging
import os
import time
import warnings
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from hydra.utils import get_class, instantiate
from lightning.pytorch.loggers import Logger, WandbLogger
from lightning.pytorch.utilities import rank_zero_only
from lightning.pytorch.utilities.exceptions import SIGTERMException
from omegaconf import DictConfig, OmegaConf, open_dict

from vaelab import dashboard
from vaelab.build import allowed_prefixes, check_targets, is_plateau_scheduler, keep_freed_memory
from vaelab.callbacks import ImageLogger
from vaelab.checkpoints import load_module
from vaelab.distributed import RandomStreams, job_scope
from vaelab.errors import SettingError, Terminated, epoch_label
from vaelab.folders import claim_folder, folder_claims, in_multirun
from vaelab.loggers import WandbLogger as BackgroundWandbLogger
from vaelab.module import VAEModule, check_evaluation
from vaelab.options import LEGACY_PRECISIONS, RUN_OWN_EVALUATION
from vaelab.profiling import default_profiler, skip_empty_batch_hooks
from vaelab.report import error_text, write_json
from vaelab.runs import (
    KILLED,
    UNKNOWN,
    CommandRecords,
    LatestCheckpoint,
    command_record,
    commands_of,
    ensure_wandb_id,
    finished_run,
    fit_limits,
    read_earlier_summary,
    resolve_resume,
    trained_so_far,
    utc_time,
)
from vaelab.validation import (
    ConfigError,
    allowed_targets_of,
    check_free_space,
    checkpoint_folders,
    command_line_overrides,
    launched_rank,
    plateau_problems,
    raise_problems,
    redact_secrets,
    validate_eval_config,
    validate_train_config,
)

log = logging.getLogger("vaelab")

# Lightning warns when an epoch has fewer batches than trainer.log_every_n_steps; VAEModule then
# logs once an epoch instead (VAEModule.on_train_start), so the warning would only be noise
# (the default digits data set has 20 batches an epoch, the default interval is 50 steps)
warnings.filterwarnings("ignore", message=r"The number of training batches \(\d+\) is smaller than the logging interval")
# torch 2.14 deprecates the LeafSpec that Lightning 2.6 builds when it moves a batch; nothing a
# user of train.py can act on, printed by every run
warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated", category=FutureWarning)
# and Lightning's advertisement for its own cloud logger, printed when a Trainer is built
logging.getLogger("lightning.pytorch.utilities.rank_zero").addFilter(lambda record: "litlogger" not in record.getMessage())


# --- pieces shared by train and eval ----------------------------------------------------------
def _not_lightning(record: logging.LogRecord) -> bool:
    return not (record.name == "lightning" or record.name.startswith("lightning."))


def one_line_per_record() -> None:
    """Each Lightning log line printed once. The ``lightning`` package's logger has a console
    handler of its own (stderr, "INFO: ..."), and its records also reach the root logger's
    handlers, which Hydra's job logging sets up (the console, stdout, and the job's log file),
    so every Lightning line came out twice. The root's console handlers now pass over
    Lightning's records, which Lightning's own handler prints; the log file keeps them."""
    if not any(type(h) is logging.StreamHandler for h in logging.getLogger("lightning").handlers):
        return  # (removed by the user: the root's handlers print them, once)
    for handler in logging.getLogger().handlers:
        if type(handler) is logging.StreamHandler and _not_lightning not in handler.filters:
            handler.addFilter(_not_lightning)


def resolve_data_options(cfg: DictConfig) -> None:
    """Resolve the data options that depend on the likelihood, so the logged config says what
    ran: ``binarize=auto`` is dynamic binarization for likelihoods that need binary data, else
    none; ``dequantize=auto`` is uniform dequantization exactly when the data stay intensities
    and the likelihood is a density (not one over 0 and 1 or over the integer levels,
    ``requires_binary``, ``requires_levels``). The likelihood's class is read for this, so its ``_target_`` is checked first: a plugin's
    module that is not there, or not allowed, is named with the fix, not imported or traced."""
    if "auto" not in (cfg.data.get("binarize"), cfg.data.get("dequantize")):
        return
    check_targets({"likelihood": cfg.likelihood}, allowed_prefixes(cfg))
    likelihood = get_class(cfg.likelihood._target_)
    needs_binary = bool(getattr(likelihood, "requires_binary", False))
    # a likelihood over the integer levels needs them as they are, not dequantized
    needs_levels = bool(getattr(likelihood, "requires_levels", False))
    with open_dict(cfg):
        if cfg.data.get("binarize") == "auto":
            cfg.data.binarize = "dynamic" if needs_binary else "none"
        if cfg.data.get("dequantize") == "auto":
            cfg.data.dequantize = cfg.data.get("binarize", "none") == "none" and not needs_levels and not needs_binary


def build_datamodule(data_cfg: Any, config: dict[str, Any]) -> pl.LightningDataModule:
    check_targets({"data": data_cfg}, allowed_prefixes(config))
    return instantiate(data_cfg)


def prepare_data_first(datamodule: pl.LightningDataModule) -> None:
    """The data files found (or downloaded) before the loggers are built, so that missing or
    damaged files stop a run before it creates a W&B run; on the first process of each machine,
    as Lightning does (the others wait for it inside ``fit``)."""
    local_rank = os.environ.get("LOCAL_RANK", os.environ.get("SLURM_LOCALID", "0"))
    if str(local_rank) == "0":
        datamodule.prepare_data()


def build_each(group_cfg: Any, config: dict[str, Any]) -> list[Any]:
    """Instantiate every entry of a name → config mapping (the logger and callbacks groups),
    skipping entries set to null, each checked against the allowed targets first."""
    built: list[Any] = []
    for name, entry in (group_cfg or {}).items():
        if entry is None:
            continue
        check_targets({name: entry}, allowed_prefixes(config))
        built.append(instantiate(entry))
    return built


def build_loggers(logger_cfg: Any, config: dict[str, Any]) -> list[Logger]:
    return build_each(logger_cfg, config)


def build_callbacks(callbacks_cfg: Any, config: dict[str, Any]) -> list[pl.Callback]:
    """The run's callbacks; with ``trainer.enable_progress_bar=false``, without a progress bar
    (Lightning refuses one in the list then: a MisconfigurationException naming neither setting)."""
    from lightning.pytorch.callbacks.progress import ProgressBar as LightningProgressBar

    callbacks = build_each(callbacks_cfg, config)
    if (config.get("trainer") or {}).get("enable_progress_bar") is False:
        callbacks = [cb for cb in callbacks if not isinstance(cb, LightningProgressBar)]
    return callbacks


def finish_wandb(loggers: list[Logger], failed: bool) -> None:
    """Close the W&B run of this job, also when it failed, so a sweep's next job gets its own."""
    if not any(isinstance(lg, WandbLogger) for lg in loggers):
        return
    import wandb

    for lg in loggers:
        if isinstance(lg, BackgroundWandbLogger):
            try:
                lg.stop()  # the values still on their way (vaelab.loggers), then its thread ends
            except Exception as error:  # noqa: BLE001 - the run's results are kept; the gap is named
                log.warning("a W&B logging call failed, the W&B run misses what it carried: %s: %s",
                            type(error).__name__, error)
    if wandb.run is not None:
        wandb.finish(exit_code=1 if failed else 0)


def wandb_run_dir(loggers: list[Logger]) -> str | None:
    for lg in loggers:
        if isinstance(lg, WandbLogger) and lg._experiment is not None:
            return str(Path(lg.experiment.dir).parent)
    return None


def _wandb_line(run_dir: Path) -> str:
    """Where the offline W&B run is and the command that uploads it: a resumed run has a part
    (an ``offline-run-*-<id>`` folder) for each command, and uploading this command's alone
    left out the earlier parts' steps; ``wandb sync`` of the folder that holds them uploads all."""
    run_id = run_dir.name.rsplit("-", 1)[-1]
    parts = sorted(run_dir.parent.glob(f"offline-run-*-{run_id}")) if run_dir.name.startswith("offline-run-") else []
    if len(parts) > 1:
        return (f"  W&B run (offline) {run_dir} and {len(parts) - 1} earlier part{'s' if len(parts) > 2 else ''} "
                f"beside it   upload with: wandb sync {run_dir.parent}")
    return f"  W&B run (offline) {run_dir}   upload with: wandb sync {run_dir}"


def _as_float(value: Any) -> float:
    return float(value.item() if isinstance(value, torch.Tensor) else value)


# --- training ---------------------------------------------------------------------------------
def train(cfg: DictConfig, checked: bool = False) -> dict[str, Any]:
    """Train (and test) one model; returns the summary, which holds ``best_score`` (of the
    checkpoint callback's ``best_monitor``, val/elbo by default) and ``best_val_elbo``.

    The config is checked first (every bad value, ``ckpt_path`` and unwritable folder, before
    anything runs; ``checked=True``: the caller has, as ``vaelab.cli`` does). ``ckpt_path``
    continues a run (``vaelab.runs.resolve_resume``: its folder, config and W&B run). The
    process is left as found (``job_scope``), so the next job of a sweep can start its own DDP
    process group."""
    started = time.time()
    if not checked:
        validate_train_config(cfg)
    one_line_per_record()
    with job_scope(), folder_claims():
        return _train(cfg, started)


def _train(cfg: DictConfig, started: float) -> dict[str, Any]:
    keep_freed_memory(cfg.get("malloc") or "tuned")  # glibc reuses a step's freed memory (vaelab.build)
    cfg, resume_ckpt = resolve_resume(cfg)
    done = finished_run(cfg, resume_ckpt) if resume_ckpt else None
    if done is not None:
        _print_finished(done, cfg)
        return done
    resolve_data_options(cfg)
    # (the config check knows torch's ReduceLROnPlateau by name; a subclass is known here)
    raise_problems(plateau_problems(cfg, plateau=is_plateau_scheduler(cfg.optim.get("scheduler"))))
    ensure_wandb_id(cfg)
    pl.seed_everything(int(cfg.seed), workers=True, verbose=False)
    config: dict[str, Any] = OmegaConf.to_container(cfg, resolve=True)  # type: ignore[assignment]
    config, redacted = redact_secrets(config)  # no secret env value reaches W&B or a checkpoint
    if redacted:
        log.warning("vaelab: redacted the value of a secret environment variable from %s", ", ".join(redacted))
    output_dir = Path(cfg.paths.output_dir)
    # one writer per run folder (vaelab.folders.claim_folder): also a resumed run's own folder, a
    # checkpoint folder set outside the run's, and a run started outside Hydra's entry point
    # (RunFolders holds Hydra's folder from the start)
    run_root = output_dir.expanduser().resolve()
    elsewhere = [d for d in (p.resolve() for p in checkpoint_folders(cfg)) if not d.is_relative_to(run_root)]
    held_here = [] if launched_rank() else [run_root, *elsewhere]  # ranks > 0 write in rank zero's
    for folder in held_here:
        holder = claim_folder(folder)
        if holder is not None:
            raise ConfigError(f"{folder} is being written by another run right now ({holder}): wait until it has "
                              "finished (to continue it: the same command then), or write elsewhere; nothing has run "
                              "yet")

    datamodule = build_datamodule(cfg.data, config)
    prepare_data_first(datamodule)
    module = VAEModule(config=config, data_info=datamodule.info)
    logger_cfg, log_model_by_hand = dashboard.wandb_logger_config(cfg)
    loggers = build_loggers(logger_cfg, config)
    callbacks = build_callbacks(cfg.get("callbacks"), config)
    callbacks.append(RandomStreams(int(cfg.seed)))  # different noise on every rank; continued on resume
    check_targets({"trainer": cfg.trainer}, allowed_prefixes(config))
    check_free_space(module, checkpoint_folders(cfg))
    check_targets({"checkpoint_io": cfg.get("checkpoint_io")}, allowed_prefixes(config))
    checkpoint_io = instantiate(cfg.checkpoint_io) if cfg.get("checkpoint_io") else None  # atomic saves
    if getattr(checkpoint_io, "background", False) and dashboard.reads_checkpoints_when_saved(logger_cfg, callbacks):
        checkpoint_io.background = False  # the logger reads each file right after its save: written by then
    trainer: pl.Trainer = instantiate(cfg.trainer, logger=loggers or False, callbacks=callbacks,
                                      plugins=[checkpoint_io] if checkpoint_io is not None else None,
                                      **default_profiler(cfg.trainer))
    skip_empty_batch_hooks(trainer.callbacks)  # Lightning's own callbacks included
    if trainer.world_size > 1 and module.nan_guard.policy == "skip":
        # (found here, in the process that launches the others: before any of them starts)
        raise SettingError(f"nan_policy=skip cannot run in {trainer.world_size} processes (DDP): Lightning cannot "
                           "skip a training step under DDP (every process's gradients join in each step), and the "
                           "first skipped step ended the run in a traceback. Use nan_policy=stop (the default: it "
                           "stops at the first non-finite step and names the last good checkpoint), or one process "
                           "(trainer.devices=1); nothing has run yet")
    for lg in loggers:
        lg.log_hyperparams(config)
    dashboard.define_metrics(loggers)

    failed = True
    # the commands that ran in this folder before (a resume's run), each with its own record
    earlier_summary, summary_read = read_earlier_summary(output_dir) if resume_ckpt else (None, True)
    earlier = commands_of(earlier_summary)
    # the records a checkpoint of this run folder carries are this run's; another folder's are not
    own = resume_ckpt is not None and resume_ckpt.resolve().is_relative_to(output_dir.resolve())
    summary: dict[str, Any] = {"output_dir": str(output_dir), "resumed_from": str(resume_ckpt) if resume_ckpt else None,
                               "world_size": trainer.world_size, "precision": str(trainer.precision),
                               "started_at": utc_time(started)}
    if resume_ckpt:  # (the run's .hydra/ files keep the command that started it: vaelab.folders)
        summary["resumed_with"] = [str(o.input_line) for o in command_line_overrides()]
    # this command's record, also in each checkpoint: a command killed before its summary is
    # then in the next one's list (vaelab.runs.CommandRecords)
    records = CommandRecords(command_record(summary), started, earlier,
                             note=(KILLED if summary_read else UNKNOWN) if own else None)
    trainer.callbacks.append(records)
    skip_empty_batch_hooks([records])  # (it has none: Lightning's loop need not call them)
    note = cpu_processes_note(cfg, trainer.world_size, type(trainer.accelerator).__name__)
    if note and trainer.is_global_zero:
        log.warning("vaelab: %s", note)
    asked = str(cfg.trainer.get("precision", trainer.precision))
    if str(trainer.precision) != LEGACY_PRECISIONS.get(asked, asked):  # (64 is 64-true's old name, not a swap)
        # Lightning swaps what a device lacks (16-mixed on a CPU runs as bf16-mixed): the stored
        # config keeps what was asked, summary.json and the W&B summary what ran
        log.warning("vaelab: trainer.precision=%s runs as %s on this machine; summary.json records %s",
                    cfg.trainer.precision, trainer.precision, trainer.precision)
    try:
        if cfg.get("train", True):
            trainer.fit(module, datamodule=datamodule, ckpt_path=str(resume_ckpt) if resume_ckpt else None,
                        weights_only=True)
            # where training ended, under which limits: a later resume of the finished run with
            # these has nothing to do (vaelab.runs.finished_run)
            summary["trained"] = trained_so_far(trainer)
        summary.update(_checkpoint_facts(trainer))
        best_path = summary["best_checkpoint"]
        if cfg.get("test", True):
            # the best checkpoint's path, which is what Lightning's "best" means here, given as
            # such: "best" warned on every run that the step checkpoint is a second callback
            results = trainer.test(module, datamodule=datamodule, ckpt_path=best_path,
                                   verbose=False)
            summary["test"] = {k: _as_float(v) for k, v in (results[0] if results else {}).items()}
            summary["tested_checkpoint"] = best_path or summary["last_checkpoint"]
            summary.update(dashboard.run_facts(module, datamodule.info))
            dashboard.update_wandb_summary(loggers, summary)
        if log_model_by_hand:
            dashboard.log_checkpoint_artifact(loggers, best_path, summary["last_checkpoint"])
        failed = False
    except BaseException as error:
        summary["error"] = error_text(error)  # for report.py and the sweep's end
        stop = stop_signal(error)
        if stop is not None:
            signal_name, by, code = stop
            message = _stopped_message(trainer, output_dir, cfg, by)
            summary["error"] = f"{signal_name}: {message}"
            log.error("vaelab: %s", message)
            raise Terminated(message, code=code) from error
        raise
    finally:
        if "trained" not in summary and trainer.global_step > 0:  # where a failed or stopped training got
            summary["trained"] = trained_so_far(trainer)
        if failed:
            _keep_earlier_results(summary, trainer, earlier_summary)
        summary["wandb_dir"] = wandb_run_dir(loggers)
        summary["wall_time_s"] = round(time.time() - started, 1)
        summary["failed"] = failed
        # this command's record after the earlier ones'; wall_time_s (report.py's column) is the
        # run's, over all of them
        summary["commands"] = [*records.known(), command_record(summary)]
        summary["wall_time_s"] = round(sum(c.get("wall_time_s") or 0.0 for c in summary["commands"]), 1)
        finish_wandb(loggers, failed)
        if trainer.is_global_zero:
            write_json(output_dir / "summary.json", summary)
    _print_summary(summary, evaluation=config.get("evaluation", {}), also=_allowed_override(cfg))
    return summary


def _checkpoint_facts(trainer: pl.Trainer) -> dict[str, Any]:
    """The run's best and last checkpoints, as its checkpoint callback knows them (restored
    with its state on a resume), and what "best" means: the callback's monitor (val/elbo;
    val/iwae for IWAE)."""
    ckpt_cb = trainer.checkpoint_callback
    best_score = getattr(ckpt_cb, "best_model_score", None)
    score = _as_float(best_score) if best_score is not None else None
    monitor = getattr(ckpt_cb, "monitor", None) if score is not None else None
    return {"best_score": score, "best_monitor": monitor, "best_val_elbo": score if monitor == "val/elbo" else None,
            "best_checkpoint": getattr(ckpt_cb, "best_model_path", "") or None,
            "last_checkpoint": getattr(ckpt_cb, "last_model_path", "") or None}


#: what a command that failed keeps of the run's summary before it: the test numbers, the
#: checkpoint they are of (still in the run's folder) and how they were obtained
EARLIER_RESULTS = ("test", "tested_checkpoint", "evaluation", "data", "diagnostics")


def _keep_earlier_results(summary: dict[str, Any], trainer: pl.Trainer, earlier: dict[str, Any] | None) -> None:
    """A failed command's summary names the run's checkpoints and keeps the test results the run
    had before it, where the checkpoint they are of is still its best: a continued run that
    failed (NaN, Ctrl-C, an error) replaced summary.json with one that had lost the finished
    run's test numbers and its best checkpoint."""
    earlier = earlier or {}
    for key, value in _checkpoint_facts(trainer).items():
        if summary.get(key) is None:
            summary[key] = value if value is not None else earlier.get(key)
    tested = earlier.get("tested_checkpoint")
    # the test numbers of the checkpoint that is still the run's best (a later best replaced it,
    # and save_top_k=1 deleted it: the numbers would stand beside another checkpoint's val/elbo)
    if "test" in summary or not tested or not Path(tested).is_file() or \
            summary.get("best_checkpoint") not in (None, tested):
        return
    for key in EARLIER_RESULTS:
        if earlier.get(key) is not None:
            summary[key] = earlier[key]


def cpu_processes_note(cfg: DictConfig, world_size: int, accelerator: str) -> str | None:
    """What a run says where ``trainer.accelerator=auto`` found no GPU and ``trainer.devices``
    asked for several: Lightning then starts that many CPU processes (DDP over gloo), each with
    its own batch, and said nothing (``trainer=ddp_sim`` asks for it by name)."""
    if world_size <= 1 or accelerator != "CPUAccelerator" or str(cfg.trainer.get("accelerator")) != "auto":
        return None
    batch, accumulate = int(cfg.data.get("batch_size")), int(cfg.trainer.get("accumulate_grad_batches") or 1)
    return (f"trainer.devices={cfg.trainer.get('devices')} and no GPU: {world_size} CPU processes (DDP over gloo), "
            f"each with data.batch_size={batch}, {world_size * batch * accumulate} examples an optimizer step; "
            "trainer.devices=1 for one process (trainer=ddp_sim says this on purpose)")


#: how a run stopped by SIGTERM begins its message
SIGTERM_STOP = "stopped by SIGTERM (a job's time limit, timeout, kill)"
#: how a run stopped by Ctrl-C begins its message
SIGINT_STOP = "stopped by Ctrl-C (SIGINT)"


def stop_signal(error: BaseException) -> tuple[str, str, int] | None:
    """(the signal, how its message begins, the exit status) where ``error`` is how Lightning
    ends a process that was told to stop, else None: SIGTERM (its ``SIGTERMException``, a
    ``SystemExit`` without a code: status 0, as if it had finished), or Ctrl-C (its "graceful
    shutdown" ends in ``sys.exit(1)``, which said no more, and summary.json recorded
    "SystemExit: 1")."""
    if isinstance(error, SIGTERMException):
        return "SIGTERM", SIGTERM_STOP, 143
    if isinstance(error, SystemExit) and isinstance(error.__context__, KeyboardInterrupt):
        return "SIGINT", SIGINT_STOP, 130
    return None


def _stopped_message(trainer: pl.Trainer, output_dir: Path, cfg: DictConfig, by: str = SIGTERM_STOP) -> str:
    """What a run stopped by SIGTERM (or ``by`` another signal) says: where it got, and the
    command that continues it (or, before its first checkpoint, that there is nothing to
    continue); a sweep's job, the command that continues the sweep."""
    from hydra.core.hydra_config import HydraConfig

    if trainer.state.fn == "test" or trainer.state.stage == "test":
        where = "during its test, after its training had finished"
    else:
        progress = trainer.fit_loop.epoch_progress.current
        if progress.ready and progress.completed == progress.ready:  # (after an epoch's end, before the next)
            where = (f"at step {trainer.global_step}, at the end of "
                     f"{epoch_label(trainer.current_epoch - 1, trainer.max_epochs)} of its training")
        else:
            where = f"at step {trainer.global_step} ({epoch_label(trainer.current_epoch, trainer.max_epochs)}) of its training"
    said = f"{by} {where}."
    also = _allowed_override(cfg)
    sweep = (f"the sweep's command again with -m hydra.sweep.dir={HydraConfig.get().sweep.dir} ckpt_path=last{also} "
             "(its finished jobs are left as they are)") if in_multirun() else None
    if not any(Path(d).is_dir() and any(Path(d).glob("*.ckpt")) for d in checkpoint_folders(cfg)):
        return (f"{said} No checkpoint had been saved yet (the first comes at the first epoch's end, or after "
                "callbacks.step_checkpoint.every_n_minutes): " + (
                    f"continue the sweep with {sweep}" if sweep else "run the command again, from the start"))
    latest = next((cb for cb in trainer.callbacks if isinstance(cb, LatestCheckpoint)), None)
    # (Lightning has cleared trainer.state.stage by now; its fn is kept)
    saved = latest.saved_at(trainer.global_step) if latest is not None and trainer.state.fn == "fit" else None
    if saved:
        skips = ", before the validation that followed it, which the resumed run skips" if (
            latest.saved_before_validation) else ""
        whence = f"Its state at that step is saved ({Path(saved).name}{skips}); continue it"
    else:  # (during a validation, inside a gradient accumulation, a step nan_policy=skip skipped, or under DDP)
        whence = f"Continue it from its latest checkpoint (saved at each epoch's end{_periodic_saves(latest)})"
    return f"{said} {whence}: " + (f"{sweep}" if sweep else f"python train.py ckpt_path={output_dir}{also}")


def _periodic_saves(latest: LatestCheckpoint | None) -> str:
    """``, and every N steps`` / ``every M minutes``: the step checkpoint's triggers, as set."""
    if latest is None:
        return ""
    every = []
    if latest.every_n_steps:
        every.append(f"every {latest.every_n_steps} steps (callbacks.step_checkpoint.every_n_train_steps)")
    if latest.interval_s is not None:
        every.append(f"every {latest.interval_s / 60:g} minutes (callbacks.step_checkpoint.every_n_minutes)")
    return f" and {' and '.join(every)}" if every else ""


def _allowed_override(cfg: DictConfig) -> str:
    """`` 'allowed_targets=[...]'`` where the run allowed plugins of its own: a command that
    reads its checkpoints (eval.py, a resume) is asked for them again."""
    allowed = allowed_targets_of(cfg)
    return f" 'allowed_targets=[{','.join(allowed)}]'" if allowed else ""


def _unit(key: str) -> str:
    if key.endswith("bpd"):
        return "bits/dim"
    if key.endswith("active_units"):
        return "latent dims"
    return "examples" if key.endswith("num_examples") else "nats/example"


def checkpoint_to_evaluate(summary: dict[str, Any]) -> str | None:
    """The checkpoint a run's closing lines tell eval.py to evaluate: the one its test used,
    else its best one, else (no validation picked a best one) its last one."""
    return summary.get("tested_checkpoint") or summary.get("best_checkpoint") or summary.get("last_checkpoint")


@rank_zero_only
def _print_summary(summary: dict[str, Any], evaluation: dict[str, Any], also: str = "") -> None:
    lines = ["", "vaelab: run finished", f"  output folder   {summary['output_dir']}"]
    if summary.get("best_checkpoint"):
        score, monitor = summary.get("best_score"), summary.get("best_monitor")
        # without a checkpoint callback that monitors a metric (callbacks overridden or removed),
        # Lightning's default one keeps the latest checkpoint and has no score
        unit = " nats" if str(monitor).startswith("val/") else ""
        why = f"{monitor} {score:.3f}{unit}" if score is not None else "the latest: no checkpoint callback monitors a metric"
        lines.append(f"  best checkpoint {summary['best_checkpoint']}  ({why})")
    if summary.get("last_checkpoint"):
        lines.append(f"  last checkpoint {summary['last_checkpoint']}")
    for key, value in sorted(summary.get("test", {}).items()):
        unit = _unit(key)
        lines.append(f"  {key:<15} {value:10.4f} {unit}")
    if "test/nll" in summary.get("test", {}):
        lines.append(f"                  (test/nll: importance sampling with K={evaluation.get('test_num_samples')})")
    if summary.get("wandb_dir"):
        lines.append(_wandb_line(Path(summary["wandb_dir"])))
    commands = summary.get("commands") or []
    if len(commands) > 1:
        lines.append(f"  wall time       {commands[-1]['wall_time_s']} s ({summary['wall_time_s']} s over the "
                     f"{len(commands)} commands that trained this run)")
    else:
        lines.append(f"  wall time       {summary['wall_time_s']} s")
    evaluated = checkpoint_to_evaluate(summary)
    if evaluated:
        again = " again" if summary.get("test") else ""  # (test=false: it has not been evaluated)
        lines.append(f"  evaluate{again}: python eval.py ckpt_path={evaluated}{also}")
    print("\n".join(lines), flush=True)


@rank_zero_only
def _print_finished(summary: dict[str, Any], cfg: DictConfig) -> None:
    print(finished_message(summary, cfg), flush=True)


def finished_message(summary: dict[str, Any], cfg: DictConfig) -> str:
    """What a resume of a finished run says (``vaelab.runs.finished_run``): where it got, the
    limit that ended it (the one to raise to train it longer), and whether it was tested."""
    trained = summary["trained"]
    run = cfg.paths.output_dir
    max_epochs, max_steps = fit_limits(cfg.trainer)
    steps_done = max_steps != -1 and trained["global_step"] >= max_steps
    epochs_done = max_epochs != -1 and trained["epochs"] >= max_epochs
    # (++: the trainer configs have no max_steps; a run given +trainer.max_steps has it stored)
    raise_ = []
    if steps_done:
        raise_.append(f"++trainer.max_steps=<more than {trained['global_step']}, or -1: no limit>")
    if epochs_done:
        raise_.append(f"trainer.max_epochs=<more than {trained['epochs']}>")
    limits = " and ".join(f"trainer.{k}={v}" for k, v, done in (("max_steps", max_steps, steps_done),
                                                                 ("max_epochs", max_epochs, epochs_done)) if done)
    why = f"({limits})" if limits else "(before its limits: an early stop, or trainer.max_time)"
    if not raise_:  # (a later limit: resumed, the run goes on until it stops again or reaches it)
        raise_.append(f"trainer.max_epochs=<more than {trained['epochs']}>")
        if cfg.trainer.get("max_time"):
            raise_.append("++trainer.max_time=<longer>")
    tested = checkpoint_to_evaluate(summary)
    lines = [
        "", f"vaelab: the run in {run} has finished: trained to epoch {trained['epochs']}, step "
        f"{trained['global_step']} {why}{', and tested' if summary.get('test') else ''}. Nothing ran; its folder "
        "is as it was, and its summary.json holds its numbers.",
    ]
    also = _allowed_override(cfg)
    if raise_:
        lines.append(f"  {'train it longer:':<17}python train.py ckpt_path={run} {' '.join(raise_)}{also}")
    if tested:
        label = "test it again:" if summary.get("test") else "test it:"
        lines.append(f"  {label:<17}python eval.py ckpt_path={tested}{also}")
    return "\n".join(lines)


# --- evaluation -------------------------------------------------------------------------------
#: the Trainer settings that only training uses: an evaluation's W&B config shows the run's
TRAINING_ONLY = frozenset({"max_epochs", "min_epochs", "max_steps", "min_steps", "max_time", "gradient_clip_val",
                           "gradient_clip_algorithm", "accumulate_grad_batches", "check_val_every_n_epoch",
                           "val_check_interval", "log_every_n_steps", "limit_train_batches", "limit_val_batches"})


def evaluate(cfg: DictConfig, checked: bool = False) -> dict[str, float]:
    """Evaluate a checkpoint on its data set's test split: test/elbo, test/nll, test/bpd.
    The config is checked first (``checked=True``: the caller has, as ``vaelab.cli`` does)."""
    if not checked:
        validate_eval_config(cfg)
    one_line_per_record()
    keep_freed_memory(cfg.get("malloc") or "tuned")
    pl.seed_everything(int(cfg.seed), workers=True, verbose=False)
    ckpt = dashboard.resolve_run_checkpoint(cfg.ckpt_path)
    # under 64-true the weights are loaded as float64 (a 64-true run's stay as they were saved)
    module = load_module(ckpt, dtype=torch.float64 if str(cfg.trainer.get("precision")) in ("64-true", "64") else None,
                         allowed_targets=allowed_targets_of(cfg))
    # K and the chunk size left null are the run's own (its test's numbers, reproduced up to the
    # sampling noise; a preset's K = 5000 and memory-bounding chunk were replaced by 1000 and 100)
    given = OmegaConf.to_container(cfg.evaluation, resolve=True)
    module.evaluation = check_evaluation({**module.evaluation, **{k: v for k, v in given.items()
                                                                  if v is not None or k not in RUN_OWN_EVALUATION}})
    stored = module.config
    data_cfg = dict(stored["data"])
    data_cfg.update({k: v for k, v in OmegaConf.to_container(cfg.data, resolve=True).items() if v is not None})
    datamodule = build_datamodule(data_cfg, stored)
    prepare_data_first(datamodule)
    # the bin width as this vaelab computes it (checkpoints from before 2026-11-28 stored
    # 1/(L−1) for binarized data, where it is 1: their test/bpd comes out right here)
    module.data_info = {**module.data_info, "bin_width": datamodule.info["bin_width"]}
    loggers = build_loggers(cfg.get("logger"), stored)
    # the evaluation's W&B run (logger=wandb) says what it evaluated: the run's stored config
    # (the same keys as the training runs', to compare them), with this command's settings on top
    here = OmegaConf.to_container(cfg, resolve=True)
    # the Trainer's settings of training itself are the run's (eval.yaml's defaults, max_epochs
    # 100 and the rest, were logged as if the run had had them); how this one runs is its own
    trainer_cfg = {**{k: v for k, v in here.get("trainer", {}).items() if k not in TRAINING_ONLY},
                   **{k: v for k, v in (stored.get("trainer") or {}).items() if k in TRAINING_ONLY}}
    evaluated, _ = redact_secrets({**stored, **{k: here[k] for k in ("task_name", "seed", "logger", "paths")
                                                if k in here}, "trainer": trainer_cfg,
                                   "ckpt_path": str(ckpt), "evaluation": module.evaluation, "data": data_cfg})
    for lg in loggers:
        lg.log_hyperparams(evaluated)
    check_targets({"trainer": cfg.trainer}, allowed_prefixes(stored))
    pictures = ImageLogger(save_dir=str(Path(cfg.paths.output_dir) / "images"), num_samples=0)
    # (no checkpoint callback: an evaluation saves nothing, and Lightning's default one printed
    # an advertisement for its model registry)
    trainer: pl.Trainer = instantiate(cfg.trainer, logger=loggers or False, callbacks=[pictures],
                                      enable_checkpointing=False, **default_profiler(cfg.trainer))
    skip_empty_batch_hooks(trainer.callbacks)
    dashboard.define_metrics(loggers)
    failed = True
    try:
        results = trainer.test(module, datamodule=datamodule, verbose=False)
        facts = dashboard.run_facts(module, datamodule.info)
        dashboard.update_wandb_summary(loggers, facts)
        failed = False
    except BaseException as error:
        stop = stop_signal(error)
        if stop is None:
            raise
        again = ("run the command again" if not in_multirun() else
                 "run what this job and the sweep's later ones evaluate again, with another hydra.sweep.dir (this "
                 "one keeps the finished jobs' metrics.json and refuses a sweep that would overwrite them)")
        message = f"{stop[1]} during the evaluation of {ckpt}: no metrics.json was written; {again}"
        log.error("vaelab: %s", message)
        raise Terminated(message, code=stop[2]) from error
    finally:
        finish_wandb(loggers, failed)
    metrics = {k: _as_float(v) for k, v in results[0].items()}
    out = {
        "checkpoint": str(ckpt),
        "test_num_samples": module.evaluation["test_num_samples"],
        "data": datamodule.info,
        "metrics": metrics,
        "evaluation": facts["evaluation"],
        "diagnostics": facts["diagnostics"],
    }
    if trainer.is_global_zero:
        write_json(Path(cfg.paths.output_dir) / "metrics.json", out)
        _print_eval(out, Path(cfg.paths.output_dir) / "metrics.json")
    return metrics


def _print_eval(out: dict[str, Any], path: Path) -> None:
    info = out["data"]
    lines = [
        "",
        f"vaelab eval: {out['checkpoint']}",
        f"  data {info['name']} test split, binarize={info['binarize']}, dequantize={info['dequantize']}",
    ]
    for key, value in sorted(out["metrics"].items()):
        unit = _unit(key)
        lines.append(f"  {key:<17} {value:10.4f} {unit}")
    lines.append(f"  (test/nll = −log p(x) by importance sampling, K={out['test_num_samples']}; "
                 "test/elbo is the bound it tightens)")
    lines.append(f"  written to {path}")
    print("\n".join(lines), flush=True)
