"""What goes into the W&B run and the summary files beside the logged curves: run naming, metric
definitions, the evaluation settings and posterior diagnostics in the summary, and the
checkpoint as an artifact. Every W&B call here runs on the rank-zero process only.
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
from pathlib import Path
from typing import Any

from lightning.pytorch.loggers import Logger, WandbLogger
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig, OmegaConf

from vaelab.checkpoints import CheckpointError, resolve_checkpoint

log = logging.getLogger("vaelab")


def _is_wandb(lg_cfg: Any) -> bool:
    return isinstance(lg_cfg, dict) and str(lg_cfg.get("_target_", "")).endswith("WandbLogger")


def reads_checkpoints_when_saved(logger_cfg: dict[str, Any], callbacks: list[Any]) -> bool:
    """Whether a W&B logger reads every checkpoint file as soon as it is saved: Lightning's
    WandbLogger does with ``log_model: all``, and with ``log_model: true`` for a checkpoint
    callback that keeps every file (``save_top_k: -1``); otherwise it reads them at the end."""
    keeps_all = any(getattr(cb, "save_top_k", None) == -1 for cb in callbacks)
    return any(_is_wandb(lg) and (lg.get("log_model") == "all" or (lg.get("log_model") is True and keeps_all))
               for lg in logger_cfg.values())


def wandb_logger_config(cfg: DictConfig) -> tuple[dict[str, Any], bool]:
    """The logger configs to instantiate, and whether the checkpoint is to be logged by hand.

    * In a multirun, a W&B logger without ``group`` gets the sweep folder as its group (so the
      jobs of one sweep are grouped in W&B), and one without ``name`` the job's overrides.
    * Lightning's WandbLogger refuses ``log_model`` together with ``offline=True``; then the
      logger is built without it and ``log_checkpoint_artifact`` logs the checkpoints when
      training ends (the returned flag). Online, WandbLogger does it itself.
    """
    logger_cfg = cfg.get("logger")
    loggers = copy.deepcopy(OmegaConf.to_container(logger_cfg, resolve=True) or {}) if logger_cfg else {}
    log_model = False
    run_name, group = _multirun_name_and_group()
    for lg in loggers.values():
        if not _is_wandb(lg):
            continue
        if lg.get("group") is None and group:
            lg["group"] = group
        if lg.get("name") is None and run_name:
            lg["name"] = run_name
        if lg.get("offline") and lg.get("log_model"):
            log_model = True
            lg["log_model"] = False
    return loggers, log_model


def _multirun_name_and_group() -> tuple[str | None, str | None]:
    try:
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode

        if not HydraConfig.initialized():
            return None, None
        hc = HydraConfig.get()
        if hc.mode != RunMode.MULTIRUN:
            return None, None
        group = str(hc.sweep.dir)[-128:]
        name = _job_name(hc) or f"job{hc.job.num}"
        return f"{hc.job.num}:{name}"[:128], group
    except Exception:  # noqa: BLE001 - naming is a convenience, never a reason to fail
        return None, None


def _job_name(hc: Any) -> str:
    """A sweep job's overrides as Hydra's ``override_dirname`` lists them (``key=value``,
    sorted, joined by commas), with the settings the sweep varies first: W&B keeps 128
    characters of a name, and a long command line cut there dropped the very setting that
    tells the sweep's runs apart."""
    items = sorted(str(o) for o in hc.overrides.task)
    swept = _swept_keys(hc)
    return ",".join(sorted(items, key=lambda item: item.split("=", 1)[0].lstrip("+~") not in swept))


def _swept_keys(hc: Any) -> set[str]:
    """The keys a sweep varies: its sweeper's search space (``hydra.sweeper.params``) and the
    command line's sweep overrides (``a=1,2``, ``range(...)``), read from the sweep folder's
    ``multirun.yaml``, which the launcher writes before the first job."""
    keys = {str(k) for k in (hc.sweeper.get("params") or {})}
    with contextlib.suppress(Exception):
        from hydra.core.override_parser.overrides_parser import OverridesParser

        task = OmegaConf.load(Path(str(hc.sweep.dir)) / "multirun.yaml").hydra.overrides.task
        keys |= {o.key_or_group for o in OverridesParser.create().parse_overrides(list(task)) if o.is_sweep_override()}
    return keys


def _wandb_loggers(loggers: list[Logger]) -> list[WandbLogger]:
    return [lg for lg in loggers if isinstance(lg, WandbLogger)]


@rank_zero_only
def define_metrics(loggers: list[Logger]) -> None:
    """The summary of ``val/elbo`` is its best (max) value, not the last epoch's; the test
    numbers (``test/nll``, ...) are logged once, so their summary is that final value.
    ``val/elbo`` is plotted against the trainer's step as every other value is (Lightning's
    ``define_metric("*", step_metric=...)``): W&B applies a glob only to a name not defined on
    its own, so it is given here too (else its chart's x-axis was W&B's count of log calls)."""
    for lg in _wandb_loggers(loggers):
        lg.experiment.define_metric("val/elbo", summary="max", step_metric="trainer/global_step", step_sync=True)


def run_facts(module: Any, data_info: dict[str, Any]) -> dict[str, Any]:
    """How the test numbers were obtained: K, chunk size, binarization, and the diagnostics."""
    ev = module.evaluation
    return {
        "evaluation": {k: ev.get(k) for k in ("test_num_samples", "val_num_samples", "chunk_size", "pass_size")},
        "data": {k: data_info.get(k) for k in ("name", "binarize", "dequantize", "num_levels", "bin_width")},
        "diagnostics": dict(getattr(module, "test_diagnostics", {}) or {}),
    }


@rank_zero_only
def update_wandb_summary(loggers: list[Logger], facts: dict[str, Any]) -> None:
    """Put K, the chunk size, the data's binarization/dequantization and the per-dimension
    diagnostics into the W&B run's summary (``evaluation/*``, ``data/*``, ``diagnostics/*``)."""
    flat: dict[str, Any] = {"precision": facts["precision"]} if facts.get("precision") else {}
    for group in ("evaluation", "data"):
        flat.update({f"{group}/{k}": v for k, v in facts.get(group, {}).items()})
    diag = facts.get("diagnostics") or {}
    for key in ("kl_per_dim", "variance_of_means", "active_units", "total_kl"):
        if diag.get(key) is not None:
            flat[f"diagnostics/{key}"] = diag[key]
    for lg in _wandb_loggers(loggers):
        lg.experiment.summary.update(flat)


@rank_zero_only
def log_checkpoint_artifact(loggers: list[Logger], best: str | None, last: str | None) -> None:
    """The checkpoints as a W&B artifact of type ``model`` (aliases ``best`` and ``latest``)."""
    import wandb

    for lg in _wandb_loggers(loggers):
        run = lg.experiment
        files = {}
        for path, alias in ((best, "best"), (last, "latest")):
            if path and Path(path).is_file():
                files.setdefault(str(Path(path).resolve()), []).append(alias)
        for path, aliases in files.items():
            artifact = wandb.Artifact(name=f"model-{run.id}", type="model",
                                      metadata={"original_filename": Path(path).name})
            artifact.add_file(path, name="model.ckpt")
            run.log_artifact(artifact, aliases=aliases)
            log.info("logged %s to W&B as artifact model-%s (%s)", path, run.id, ", ".join(aliases))


def resolve_run_checkpoint(path: str | Path) -> Path:
    """A checkpoint file as it is; a run folder: the checkpoint its test numbers came from
    (``tested_checkpoint`` / ``best_checkpoint`` in its summary.json), else
    ``checkpoints/last.ckpt``.

    summary.json records absolute paths, and a copied (or moved) run folder still names the
    original folder's files there. A folder is taken to mean *its* checkpoints: the recorded
    file's name is looked up in ``<folder>/checkpoints/`` (its own copy, damaged or not), and the
    recorded path itself only where it lies inside the folder. A recorded file outside the
    folder is used only when the folder holds no checkpoint at all (a run whose checkpoint
    ``dirpath`` was elsewhere), with a warning naming it; a folder that has checkpoints of its own,
    but not the named one, gives its ``last.ckpt`` with a warning instead: the original's file
    may have been replaced since (a resumed run), and silently evaluating another folder's
    weights is how a copy's damaged or deleted checkpoint went unnoticed.
    """
    p = Path(path).expanduser()
    summary_file = p / "summary.json"
    if not (p.is_dir() and summary_file.is_file()):
        return resolve_checkpoint(p)
    try:
        summary = json.loads(summary_file.read_text())
        if not isinstance(summary, dict):
            raise ValueError("not a JSON object")
    except (OSError, ValueError) as err:
        log.warning("vaelab: %s cannot be read (%s: %s), so the checkpoint its test numbers came from is not "
                    "known: evaluating the folder's last checkpoint; give the .ckpt file to evaluate another one",
                    summary_file, type(err).__name__, str(err)[:200])
        return resolve_checkpoint(p)
    names = [Path(str(summary[key])) for key in ("tested_checkpoint", "best_checkpoint") if summary.get(key)]
    if not names:  # a run that failed before its first checkpoint
        return resolve_checkpoint(p)
    folder = p.resolve()
    for recorded in names:
        inside = p / "checkpoints" / recorded.name
        if recorded.is_file() and recorded.resolve().is_relative_to(folder):
            return recorded  # the run folder itself: the path as summary.json (and eval's metrics.json) name it
        if inside.is_file():
            return inside
    elsewhere = [r for r in names if r.is_absolute() and r.is_file()]
    if elsewhere and not any(p.rglob("*.ckpt")):
        log.warning("vaelab: %s holds no checkpoint; its summary.json names %s, outside the folder (the run kept "
                    "its checkpoints elsewhere, or this is a copy without them), which is evaluated", p, elsewhere[0])
        return elsewhere[0]
    also = (f"; {elsewhere[0]}, outside the folder, is not used (give it as ckpt_path to evaluate it)"
            if elsewhere else "")
    missing = f"{p / 'checkpoints'} has no {names[0].name}, the checkpoint its summary.json says its test numbers came from"
    try:
        ckpt = resolve_checkpoint(p)  # its last.ckpt
    except CheckpointError as err:
        raise CheckpointError(f"{missing}{also}; and {err}") from err
    log.warning("vaelab: %s: evaluating %s instead%s", missing, ckpt, also)
    return ckpt
