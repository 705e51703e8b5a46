"""Entry points: ``python train.py ...`` / ``vaelab-train`` and ``python eval.py ...`` /
``vaelab-eval``; the jobs themselves are ``vaelab.jobs``.

Light on purpose: Hydra composes the config, its callback guards the run folder
(``vaelab.folders``) and the config is checked (``vaelab.validation``) before torch,
Lightning or W&B is imported, so that a refused command, ``--help`` or ``--cfg job`` ends in
about a second, not after the ~8 s of imports a run needs on the 2-core CPU machine
(``benchmarks/startup.py``). The process then ends without the interpreter's teardown
(``vaelab.exits``).
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

import hydra
from hydra.errors import CompactHydraException
from omegaconf import DictConfig

from vaelab.errors import ExplainedError
from vaelab.exits import exit_when_done
from vaelab.folders import (
    in_multirun,  # (importing it registers the ${vaelab.sweep_group:} resolver)
    job_failure,
    record_sweep_failure,
)
from vaelab.report import error_text, write_json
from vaelab.validation import launched_rank, validate_eval_config, validate_train_config

log = logging.getLogger("vaelab")


class _Explained(CompactHydraException):
    """An ``ExplainedError`` as Hydra reports it: its message alone, without a traceback (which
    ``HYDRA_FULL_ERROR=1`` shows, with the error itself as the cause)."""


def _explained(error: ExplainedError) -> _Explained:
    return _Explained(f"{type(error).__name__}: {error}")


def explained_in(error: BaseException) -> ExplainedError | None:
    """``error`` if it is an ``ExplainedError``, or the one that Hydra's ``instantiate`` wrapped
    (a ``SettingError`` raised while a data module or plugin is built reached the console as
    ``InstantiationException: Error in call to target ...: SettingError('...')``, its message
    quoted and escaped); else None."""
    from hydra.errors import InstantiationException

    while isinstance(error, InstantiationException) and error.__cause__ is not None:
        error = error.__cause__
    return error if isinstance(error, ExplainedError) else None


def _warn_of_a_search_without_multirun() -> None:
    """``hparams_search=optuna`` without ``-m`` ran one ordinary job with the config's own values
    and said nothing: Hydra's sweeper runs only in a multirun."""
    from hydra.core.hydra_config import HydraConfig

    choice = HydraConfig.get().runtime.choices.get("hparams_search") if HydraConfig.initialized() else None
    if choice and not in_multirun() and not launched_rank():  # (DDP's other ranks rerun a search's job)
        log.warning("vaelab: hparams_search=%s without -m runs one training job with the config's own values, not "
                    "a search: add -m (python train.py -m hparams_search=%s ...)", choice, choice)


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def train_main(cfg: DictConfig) -> float:
    try:
        _warn_of_a_search_without_multirun()
        validate_train_config(cfg)  # a refused run ends here, before the imports of vaelab.jobs
        from vaelab.jobs import train

        summary = train(cfg, checked=True)
    except Exception as error:
        explained = explained_in(error)
        if not in_multirun():  # a single run exits non-zero with the error
            if explained is not None:
                raise _explained(explained) from error
            raise
        # one job of a sweep: its W&B run is finished with exit code 1 and its summary.json says
        # failed (written here if the job stopped before training); the sweep goes on, Optuna
        # records a trial as bad as can be, and the sweep's end lists the failures (RunFolders)
        _say_the_job_failed("sweep job", explained)
        _write_failed_job_summary(cfg, explained or error)
        return float("-inf")
    best = summary.get("best_score", summary.get("best_val_elbo"))  # (a finished run's older summary)
    # returned to Hydra's sweepers: Optuna maximizes the checkpoint callback's monitor (val/elbo)
    return float(best) if best is not None and math.isfinite(best) else float("-inf")


def _say_the_job_failed(job: str, explained: ExplainedError | None) -> None:
    """A sweep's failed job, in its log (called while its error is handled): an explained
    error's message names the fix, with no traceback before it; any other error, its traceback."""
    if explained is not None:
        log.error("vaelab: this %s failed; the sweep continues with the next job\n%s: %s", job,
                  type(explained).__name__, explained)
    else:
        log.exception("vaelab: this %s failed; the sweep continues with the next job", job)


def _write_failed_job_summary(cfg: DictConfig, error: BaseException) -> None:
    """A ``summary.json`` saying ``failed``, with the error, for a sweep job that stopped before
    ``train`` wrote one (a bad value of this job's overrides), so that report.py lists it; an
    existing one (the job's own, or an earlier run's that the job refused to overwrite) stays."""
    from hydra.core.hydra_config import HydraConfig

    hydra_cfg = HydraConfig.get()
    output_dir = Path(hydra_cfg.runtime.output_dir)
    if not (output_dir / "summary.json").exists():
        write_json(output_dir / "summary.json", {
            "output_dir": str(output_dir), "failed": True, "error": error_text(error)})
    elif job_failure(output_dir) is None:  # (an earlier run's, kept: the sweep's end must still list this job)
        record_sweep_failure(Path(hydra_cfg.sweep.dir), output_dir, error_text(error))


@hydra.main(version_base="1.3", config_path="conf", config_name="eval")
def eval_main(cfg: DictConfig) -> None:
    try:
        validate_eval_config(cfg)  # a refused evaluation ends here, before the imports of vaelab.jobs
        from vaelab.jobs import evaluate

        evaluate(cfg, checked=True)
    except Exception as error:
        explained = explained_in(error)
        if not in_multirun():
            if explained is None:
                raise
            raise _explained(explained) from error
        # one job of an evaluation sweep, as a training sweep's: said in its log when it fails,
        # recorded in the sweep folder's failed_jobs.jsonl (an evaluation has no summary.json;
        # nothing is written into the job's folder, which a rerun of the sweep may then use),
        # and the sweep goes on; its end lists the failures and exits non-zero (RunFolders).
        # Hydra's own end raised the first job's error alone, and the others' were nowhere
        from hydra.core.hydra_config import HydraConfig

        _say_the_job_failed("evaluation job", explained)
        hydra_cfg = HydraConfig.get()
        record_sweep_failure(Path(hydra_cfg.sweep.dir), Path(hydra_cfg.runtime.output_dir),
                             error_text(explained or error))


def train_script() -> None:
    """``python train.py`` and ``vaelab-train``: ``train_main``, then the process ends with its
    exit status without Python's interpreter teardown (~2.5 s; ``vaelab.exits``)."""
    exit_when_done(train_main)


def eval_script() -> None:
    """``python eval.py`` and ``vaelab-eval``: ``eval_main``, ended as ``train_script``."""
    exit_when_done(eval_main)
