"""Run and sweep folders, before anything heavy is imported: one writer per folder, no run
written into an earlier one's folder, a sweep's jobs checked before the first starts and its
failures listed at its end (``RunFolders``, the Hydra callback in train.yaml and eval.yaml),
and the ``${vaelab.sweep_group:}`` resolver.

Hydra builds its callbacks before the task function runs, so this module imports no torch,
Lightning or W&B: a command refused here (a folder that holds an earlier run or that another
process is writing) ends in about a second (``vaelab.cli``).
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf, read_write

from vaelab.report import run_order


def quote_override(value: str) -> str:
    """A Hydra override value that may hold characters of the override grammar."""
    escaped = value.replace("\\", "\\\\").replace("'", "\\'")
    return f"'{escaped}'"


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
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}, since {time.strftime('%Y-%m-%d %H:%M:%S')}\n".encode(), 0)
    _claims[key] = (fd, created)
    return None


def writer(folder: str | Path) -> str | None:
    """The process writing into ``folder`` right now, as ``claim_folder`` wrote it in the lock
    file ("pid N on host, since ..."); None where there is none, or where its process on this
    machine has ended (a kill leaves the file). Read, not locked: a reader (report.py) never
    stands in the way of a run claiming the folder."""
    try:
        text = (Path(folder) / LOCK_NAME).read_text(errors="replace").strip()
    except OSError:
        return None
    words = text.split()
    if len(words) >= 4 and words[0] == "pid" and words[1].isdigit() and words[3].rstrip(",") == socket.gethostname():
        try:
            os.kill(int(words[1]), 0)
        except ProcessLookupError:
            return None
        except OSError:
            pass  # (another user's process: it exists)
    return text or None


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


def job_output_subdir(ckpt_path: Any = None) -> str | None:
    """``hydra.output_subdir`` of a training job (train.yaml): none where the job continues a
    run in its own folder (``ckpt_path`` given, the folder holds ``.hydra/``), so that those
    files keep the command that started the run, else ``.hydra``. Resolved by Hydra when it
    saves a job's files, once the job's folder is known; in a sweep (``-m ckpt_path=last ...``)
    that is before any callback of the job runs (``RunFolders.on_run_start`` says so for a
    single run)."""
    if ckpt_path in (None, ""):
        return ".hydra"
    from hydra.core.hydra_config import HydraConfig

    try:
        folder = HydraConfig.get().runtime.output_dir if HydraConfig.initialized() else None
    except Exception:  # noqa: BLE001 - not known yet (a callback reading the config early)
        folder = None
    return None if folder and (Path(str(folder)) / ".hydra").is_dir() else ".hydra"


def register_resolvers() -> None:
    OmegaConf.register_new_resolver("vaelab.sweep_group", sweep_group, replace=True)
    OmegaConf.register_new_resolver("vaelab.job_output_subdir", job_output_subdir, replace=True)


register_resolvers()


#: a sweep's record of its jobs that failed while their folder kept an earlier command's
#: summary.json (a requeued job whose resume was refused: the run in it is as it was), one JSON
#: line each; the sweep's end lists those of its own command with the other failures
SWEEP_FAILURES = "failed_jobs.jsonl"


def optuna_storage_problem(config: DictConfig, versions: dict[str, str] | None = None) -> str | None:
    """An Optuna search with a database storage (``hydra.sweeper.storage=sqlite:///optuna.db``)
    where the installed Optuna cannot open one: hydra-optuna-sweeper 1.3 needs Optuna 2, whose
    storages fail with SQLAlchemy 2 (an AssertionError from deep in Optuna, after the sweep had
    begun). ``versions``: the packages' versions (else read from the installed distributions)."""
    storage = OmegaConf.select(config, "hydra.sweeper.storage", default=None)
    if not storage or not str(OmegaConf.select(config, "hydra.sweeper._target_", default="")).endswith("OptunaSweeper"):
        return None
    if str(storage).startswith("redis"):  # (Optuna's RedisStorage: no SQLAlchemy)
        return None
    if versions is None:
        from importlib.metadata import PackageNotFoundError, version

        versions = {}
        for name in ("optuna", "sqlalchemy"):
            with contextlib.suppress(PackageNotFoundError):
                versions[name] = version(name)
    major = {k: int(str(v).split(".")[0]) for k, v in versions.items() if str(v).split(".")[0].isdigit()}
    if major.get("optuna", 3) < 3 and major.get("sqlalchemy", 1) >= 2:
        return (f"hydra.sweeper.storage={storage}: Optuna {versions['optuna']} (hydra-optuna-sweeper needs Optuna 2) "
                f"cannot open a database with SQLAlchemy {versions['sqlalchemy']}: pip install 'sqlalchemy<2' "
                "'alembic<1.14' into this environment, or leave hydra.sweeper.storage=null (the study in memory; a "
                "requeue with -m ckpt_path=last and the same seed and search space continues it); nothing has run yet")
    return None


#: what Hydra's Optuna sweeper writes at a search's end
OPTUNA_RESULTS = "optimization_results.yaml"


def record_sweep_failure(sweep: Path, job: Path, why: str) -> None:
    """Add a failed job of a sweep to ``SWEEP_FAILURES`` in its folder (one short append: the
    jobs of a parallel launcher can each add theirs)."""
    line = json.dumps({"job": str(job), "error": why, "at": time.time()}) + "\n"
    with contextlib.suppress(OSError), open(sweep / SWEEP_FAILURES, "a", encoding="utf-8") as f:
        f.write(line)


def sweep_failures(sweep: Path, since: float) -> list[tuple[Path, str]]:
    """The jobs ``record_sweep_failure`` added since ``since`` (the command's start), in order."""
    try:
        lines = (sweep / SWEEP_FAILURES).read_text(encoding="utf-8").splitlines()
    except OSError:
        return []
    found = []
    for line in lines:
        try:
            record = json.loads(line)
            if float(record["at"]) >= since:
                found.append((Path(record["job"]), str(record["error"])))
        except (ValueError, KeyError, TypeError):
            continue  # (a line cut short by a killed job)
    return found


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
    parser = OverridesParser.create()
    parsed = parser.parse_overrides(arguments)
    # the config folders the command line adds (a plugin's options: README, Adding a plugin), which
    # Hydra takes from its own overrides, not the task's: without them every such job was refused
    hydra_overrides = list(OmegaConf.select(config, "hydra.overrides.hydra", default=None) or [])
    searchpath = [o.input_line for o in parser.parse_overrides(hydra_overrides)
                  if o.get_key_element().lstrip("+") == "hydra.searchpath"]
    if grid:
        from hydra._internal.core_plugins.basic_sweeper import BasicSweeper

        jobs = [job for batch in BasicSweeper.split_arguments(parsed, None) for job in batch]
        if len(jobs) > max_jobs:
            return []  # composing each would take long; every job still checks its own at its start
        found = []
        for number, job in enumerate(jobs):
            problems = _config_problems(name, [*searchpath, *job])
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
            problems = _config_problems(name, [*searchpath, *fixed, f"{key}={one}"])
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
        self._multirun_yaml: bytes | None = None  # a continued sweep's multirun.yaml, as it started
        self._started = time.time()  # (the sweep command's start: its own record_sweep_failure lines)
        self._optuna_results: bytes | None = None  # a requeued search's optimization_results.yaml, as it was

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
        # (train.yaml's output_subdir is an interpolation, job_output_subdir: not resolved here)
        no_files = not OmegaConf.is_interpolation(config.hydra, "output_subdir") and config.hydra.output_subdir is None
        if launched_rank() or no_files:
            return
        # the hold first: a run that started a moment ago in this folder is not an earlier one
        folder, renamed = self._hold(config.hydra.run, "run")
        if not renamed:
            problem = self._earlier(folder, config.get("ckpt_path"))
            if problem:
                release_folder(folder)
                self._stop(f"{problem}; nothing has run yet")
        if self.task == "train" and config.get("ckpt_path") not in (None, "") and (folder / ".hydra").is_dir():
            # a run continued in its own folder (hydra.run.dir=<run> ckpt_path=last): its .hydra/
            # files, which record the command that started the run (and that report.py reads),
            # stay, also for a resume refused a moment later (train.yaml's hydra.output_subdir:
            # job_output_subdir); the resume's own overrides go to summary.json (resumed_with)
            print(f"vaelab: continuing the run in {folder}; its .hydra/ files keep the command that started it",
                  file=sys.stderr, flush=True)
        self._held = folder

    def _hold(self, node: DictConfig, what: str) -> tuple[Path, bool]:
        """Claim the folder ``node.dir`` (``hydra.run`` or ``hydra.sweep``) for this process;
        (the folder held, whether it is another than the one asked for). Held by another
        process: refused where the user named it; where it is named after the second it started
        (Hydra's default), taken by a run or sweep of the same second (a loop of ``python
        train.py ... &``), the next free name instead."""
        folder = Path(str(node.dir))
        key = f"hydra.{what}.dir"
        holder = claim_folder(folder)
        if holder is None:
            if not folder.is_dir():  # (claim_folder could not make it) Hydra would fail with a bare traceback
                try:
                    folder.mkdir(parents=True, exist_ok=True)
                except OSError as err:
                    self._stop(f"{key}={folder} cannot be made ({type(err).__name__}: {err.strerror or err}): give "
                               "a folder that can be written; nothing has run yet")
            return folder, False
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
            with read_write(config.hydra):
                config.hydra.overrides.hydra.append(f"hydra.sweep.dir={quote_override(str(sweep))}")
        self._held = sweep
        try:
            self._check_sweep(config, sweep)
        except SystemExit:
            release_folder(sweep)  # a refused sweep leaves no lock file behind
            self._held = None
            raise
        self._started = time.time()
        # a sweep continued in its folder (-m ckpt_path=last ...): Hydra's sweeper saves its
        # multirun.yaml again, with this command; the one of the command that started the sweep
        # is put back (at the first job's start, and at the sweep's end for launchers whose jobs
        # run elsewhere). Each job's .hydra/ files are kept by job_output_subdir
        started = sweep / "multirun.yaml"
        resumes = self.task == "train" and config.get("ckpt_path") not in (None, "")
        if resumes and not any((p / ".hydra").is_dir() for p in sweep.iterdir()):
            # (each job then says so in its log only: a requeue's job that had not started does too)
            print(f"vaelab: ckpt_path={config.get('ckpt_path')} in {sweep}, which holds no jobs of an earlier sweep: "
                  "each job starts from scratch. To continue a sweep, give its folder: hydra.sweep.dir=<sweep folder>",
                  file=sys.stderr, flush=True)
        self._multirun_yaml = started.read_bytes() if resumes and started.is_file() else None
        # a requeued Optuna search's results, kept where this command's trials were refused
        results = sweep / OPTUNA_RESULTS
        self._optuna_results = results.read_bytes() if resumes and results.is_file() else None

    def _keep_multirun_yaml(self) -> None:
        if self._multirun_yaml is not None and self._held is not None:
            path = self._held / "multirun.yaml"
            with contextlib.suppress(OSError):
                if not path.is_file() or path.read_bytes() != self._multirun_yaml:
                    path.write_bytes(self._multirun_yaml)

    def on_job_start(self, config: DictConfig, **kwargs: Any) -> None:
        self._keep_multirun_yaml()

    def _check_sweep(self, config: DictConfig, sweep: Path) -> None:
        storage = optuna_storage_problem(config)
        if storage:
            self._stop(storage)
        # e.g. -m ckpt_path=last ...: a requeued training sweep
        resumes = self.task == "train" and config.get("ckpt_path") not in (None, "")
        jobs = sorted(p for p in sweep.iterdir() if p.is_dir()) if sweep.is_dir() and not resumes else []
        held = [job.name for job in jobs if self._earlier(job)]
        if held:
            # (ckpt_path=last continues a training sweep; an evaluation sweep's swept key is ckpt_path)
            what, way = (("evaluations", " (to finish a sweep that stopped part way, run there only what its jobs "
                                         "without a metrics.json evaluated)") if self.task == "eval" else
                         ("runs", ", or continue that sweep with its command and -m ckpt_path=last"))
            self._stop(f"hydra.sweep.dir={sweep} holds the {what} of an earlier sweep (jobs {', '.join(held)}), which "
                       f"this sweep would overwrite: give another hydra.sweep.dir{way}; nothing has run yet")
        bad = sweep_value_problems(config) if self.task == "train" else []
        if bad:
            lines = "\n  ".join(bad)
            what = "the sweep's jobs" if bad[0].startswith("job ") else "the search space's values"
            self._stop(f"{len(bad)} of {what} would fail the config check; nothing has run yet (fix or "
                       f"drop those options):\n  {lines}")

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        self._keep_multirun_yaml()
        if self._held is not None:
            release_folder(self._held)
            self._held = None
        sweep = Path(str(config.hydra.sweep.dir))
        jobs = sorted((p for p in sweep.iterdir() if (p / ".hydra").is_dir()),
                      key=lambda p: run_order(p, sweep)) if sweep.is_dir() else []
        # a training job's summary.json says whether it failed; an evaluation writes none (its
        # failures, and a requeued training job refused before it ran, are in SWEEP_FAILURES)
        evaluations = self.task == "eval"
        failed = [] if evaluations else [(job, why) for job in jobs if (why := job_failure(job))]
        named = {job.resolve() for job, _ in failed}
        refused = sweep_failures(sweep, since=self._started)
        for job, why in refused:
            if job.resolve() not in named:
                failed.append((job, why))
                named.add(job.resolve())
        kept = self._keep_optuna_results(sweep) if refused else ""
        if failed:
            lines = "\n  ".join(f"{job}: {why[:300]}" for job, why in failed)
            what, more = (("evaluation jobs", "each job's log says more") if evaluations else
                          ("sweep jobs", "each folder's summary.json and log say more"))
            self._stop(f"{len(failed)} of {len(jobs)} {what} failed ({more}; vaelab-report {sweep} lists every "
                       f"job):\n  {lines}{kept}")

    def _keep_optuna_results(self, sweep: Path) -> str:
        """A requeued Optuna search whose trials were refused (the sampler proposed other values
        than the trials in their folders: another seed or search space) wrote results that
        count them as -inf, over the search's own: those are put back, and this command's kept
        beside them. Returns what the sweep's end says of it."""
        path = sweep / OPTUNA_RESULTS
        if self._optuna_results is None or not path.is_file() or path.read_bytes() == self._optuna_results:
            return ""
        aside = sweep / OPTUNA_RESULTS.replace(".yaml", ".refused.yaml")
        try:
            os.replace(path, aside)
            path.write_bytes(self._optuna_results)
        except OSError:
            return ""
        return (f"\n{path} is the search's as it was before this command; this command's, which counts its refused "
                f"trials as -inf, is {aside.name}")
