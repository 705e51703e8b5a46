"""One validation pass over a run's config, before anything is built or written.

``validate_train_config`` (called first thing by ``vaelab.cli``, before torch and Lightning are
imported, and by ``vaelab.jobs.train``) collects *every* value out of range, the checkpoint
given to resume from, and the folders the run will write to, and raises one ``ConfigError``
listing each problem with its config key and the fix. The plugins' own checks
(``Gaussian(sigma=...)``, ``ELBO(beta=...)``, ...) stay as the second line of defence for code
that builds them without a config.

Also here: ``check_free_space`` (a disk that cannot hold the checkpoints fails before
training) and ``redact_secrets`` (no value of a secret environment variable reaches the logged
config, the W&B run or a checkpoint).
"""

from __future__ import annotations

import difflib
import math
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

# nothing here imports torch or Lightning at the top: the config check runs before either is
# imported, so that a refused command ends in about a second (vaelab.cli)
from vaelab.errors import ExplainedError
from vaelab.options import (
    ACTIVATIONS,
    DATA_READ_KEYS,
    FLOW_PRIORS,
    MALLOC_CHOICES,
    NAN_POLICIES,
    PLATEAU_SCHEDULERS,
    PRECISIONS,
    RUN_OWN_EVALUATION,
    TERMS,
    VAMP_COMPONENTS,
    VAMP_SQUASHES,
    WHOLE_MODEL_PRECISIONS,
    checkpoint_monitor,
    is_cuda_graph_choice,
)


class ConfigError(ValueError, ExplainedError):
    """The config cannot run; the message lists every problem with its key and fix."""


class OutputNotWritableError(ConfigError):
    """A folder the run writes to cannot be written (or the disk is too small)."""


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v: Any) -> bool:
    """A finite number: inf (``objective.beta=inf``, ``likelihood.sigma=inf``, ...) would end the
    run at its first step with a non-finite loss, blamed on the learning rate."""
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)


def _int_at_least(low: int) -> Callable[[Any], bool]:
    return lambda v: _is_int(v) and v >= low


def _positive(v: Any) -> bool:
    return _is_num(v) and v > 0


def _non_negative(v: Any) -> bool:
    return _is_num(v) and v >= 0


def _scale(v: Any) -> bool:
    return v in ("learned", "per_pixel") or _positive(v)


def lightning_precisions() -> tuple[Any, ...]:
    """What the installed Lightning's ``Trainer(precision=...)`` accepts (its own lists; empty
    if this Lightning keeps them elsewhere, and then Lightning's check stands alone). Imports
    Lightning: only for a value that ``vaelab.options.PRECISIONS`` lacks."""
    import typing

    try:
        from lightning.fabric import connector
    except ImportError:  # pragma: no cover
        return ()
    names = [getattr(connector, n, None) for n in ("_PRECISION_INPUT_STR", "_PRECISION_INPUT_STR_ALIAS",
                                                    "_PRECISION_INPUT_INT")]
    return tuple(v for n in names if n is not None for v in typing.get_args(n))


def _precision(v: Any) -> bool:
    if v in WHOLE_MODEL_PRECISIONS:
        return False
    if v is None or v in PRECISIONS:
        return True
    known = lightning_precisions()  # a value vaelab's list lacks: the installed Lightning decides
    return not known or v in known


def _cuda_missing(v: Any) -> bool:
    """An accelerator that needs a GPU on a machine without one (Lightning's ``gpu`` is CUDA or
    Apple's MPS, ``cuda`` only CUDA)."""
    if v not in ("gpu", "cuda"):
        return False
    import torch

    mps = v == "gpu" and getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()
    return not (torch.cuda.is_available() or mps)


def are_widths(v: Any) -> bool:
    """A list of layer widths (channels), each a positive integer (also vaelab.networks' check)."""
    return isinstance(v, Sequence) and not isinstance(v, str) and all(_int_at_least(1)(h) for h in v)


def _devices(v: Any) -> bool:
    """What Lightning's ``Trainer(devices=...)`` takes: auto, a count >= 1 or -1 (all), a list
    of device indices, or such a list as text ("0,1"). Whether the machine has them is checked
    once torch is loaded."""
    if v == "auto" or v == -1 or _int_at_least(1)(v):
        return True
    if isinstance(v, str):
        parts = [p.strip() for p in v.strip().strip(",").split(",")]
        if len(parts) == 1:
            return bool(re.fullmatch(r"-1|\d+", parts[0])) and int(parts[0]) != 0
        return all(p.isdigit() for p in parts)
    return isinstance(v, Sequence) and len(v) > 0 and all(_int_at_least(0)(d) for d in v)


#: (config key, test, what it must be, an example of a fix); checked where the key exists
RULES: tuple[tuple[str, Callable[[Any], bool], str, str], ...] = (
    ("latent_dim", _int_at_least(1), "a positive integer", "latent_dim=16"),
    # (numpy's and so Lightning's seed_everything's range)
    ("seed", lambda v: _is_int(v) and 0 <= v <= 2**32 - 1, "an integer from 0 to 4294967295", "seed=0"),
    # a string would be read letter by letter: allowed_targets=mylab. allowed every target under "m"
    ("allowed_targets", lambda v: isinstance(v, Sequence) and not isinstance(v, str)
     and all(isinstance(a, str) and a.strip() for a in v), "a list of module prefixes", "'allowed_targets=[mylab.]'"),
    ("data.binarize", lambda v: v in ("auto", "none", "dynamic", "static"), "one of auto, none, dynamic, static",
     "data.binarize=auto"),
    ("data.dequantize", lambda v: v in ("auto", True, False), "auto, true or false", "data.dequantize=auto"),
    ("objective.warmup_unit", lambda v: v in ("steps", "epochs"), "steps or epochs", "objective.warmup_unit=epochs"),
    ("trainer.precision", _precision,
     f"one of {', '.join(str(p) for p in PRECISIONS if isinstance(p, str) and '-' in p and p not in WHOLE_MODEL_PRECISIONS)}"
     " (vaelab runs densities in at least float32: not 16-true, bf16-true or transformer-engine's half-precision "
     "weights)",
     "trainer.precision=bf16-mixed"),
    ("trainer.accumulate_grad_batches", _int_at_least(1), "an integer >= 1 (batches per optimizer step)",
     "trainer.accumulate_grad_batches=1"),
    ("trainer.gradient_clip_val", lambda v: v is None or _non_negative(v), "null or a norm >= 0",
     "trainer.gradient_clip_val=1.0"),
    ("trainer.accelerator", lambda v: not _cuda_missing(v),
     "an accelerator this machine has: it needs a GPU, and torch sees none", "trainer=default (auto) or trainer=cpu"),
    ("model.compile", lambda v: isinstance(v, bool), "true or false", "model.compile=true"),
    ("model.cuda_graph", is_cuda_graph_choice, "true, false or auto", "model.cuda_graph=auto"),
    ("trainer.devices", _devices, "auto, a number of devices >= 1, -1 (all) or a list of device indices",
     "trainer.devices=1"),
    ("data.batch_size", _int_at_least(1), "a positive integer", "data.batch_size=64"),
    ("data.num_workers", _int_at_least(0), "an integer >= 0 (loader processes; 0: the main process)",
     "data.num_workers=0"),
    ("data.split_seed", _int_at_least(0), "an integer >= 0 (the seed that draws the data splits)", "data.split_seed=0"),
    ("data.download", lambda v: isinstance(v, bool), "true or false", "data.download=true"),
    # (0 or 1 read as true or false let train=0 test=0 run nothing and exit 0; "maybe" trained)
    ("train", lambda v: isinstance(v, bool), "true or false", "train=true"),
    ("test", lambda v: isinstance(v, bool), "true or false", "test=true"),
    ("data.val_size", lambda v: _int_at_least(1)(v) or (_is_num(v) and 0 < v < 1),
     "a number of images >= 1 or a fraction of the training files between 0 and 1", "data.val_size=0.1"),
    ("data.eval_batch_size", lambda v: v is None or _int_at_least(1)(v), "null or a positive integer",
     "data.eval_batch_size=500"),
    ("optim.optimizer.lr", _positive, "a learning rate > 0", "optim.optimizer.lr=1e-3"),
    ("optim.scheduler", lambda v: v is None or (isinstance(v, Mapping) and "_target_" in v),
     "null or a scheduler's config with its _target_",
     "'optim.scheduler={_target_:torch.optim.lr_scheduler.CosineAnnealingLR,T_max:100}'"),
    ("optim.scheduler_interval", lambda v: v in ("epoch", "step"), "epoch or step (when the scheduler steps)",
     "optim.scheduler_interval=epoch"),
    ("optim.optimizer.weight_decay", _non_negative, ">= 0", "optim.optimizer.weight_decay=0"),
    ("optim.optimizer.fused", lambda v: v in ("auto", True, False), "auto, true or false",
     "optim.optimizer.fused=auto"),
    ("objective.num_samples", _int_at_least(1), "an integer K >= 1", "objective.num_samples=1"),
    ("objective.beta", _non_negative, "a KL weight >= 0", "objective.beta=1.0"),
    ("objective.warmup", _int_at_least(0), "an integer >= 0", "objective.warmup=0"),
    ("objective.free_bits", _non_negative, ">= 0 nats", "objective.free_bits=0"),
    ("likelihood.sigma", _scale, "a σ > 0, learned or per_pixel", "likelihood.sigma=0.1"),
    ("likelihood.min_sigma", _positive, "> 0", "likelihood.min_sigma=1e-3"),
    ("likelihood.init_sigma", _positive, "> 0", "likelihood.init_sigma=0.1"),
    ("likelihood.scale", _scale, "a scale b > 0, learned or per_pixel", "likelihood.scale=0.1"),
    ("likelihood.min_scale", _positive, "> 0", "likelihood.min_scale=1e-3"),
    ("likelihood.init_scale", _positive, "> 0", "likelihood.init_scale=0.1"),
    ("likelihood.num_mixtures", _int_at_least(1), "an integer >= 1", "likelihood.num_mixtures=10"),
    ("prior.num_components", _int_at_least(1), "an integer >= 1", "prior.num_components=10"),
    # > 0: softplus(raw) underflows to 0 below raw ≈ −104, and a zero σ makes log q(z|x) and the KL infinite
    ("posterior.min_scale", _positive, "> 0", "posterior.min_scale=1e-4"),
    ("trainer.max_epochs", lambda v: v is None or v == -1 or _int_at_least(1)(v), "an integer >= 1 (or -1)",
     "trainer.max_epochs=100"),
    ("evaluation.val_num_samples", _int_at_least(0), "an integer >= 0 (0: off)", "evaluation.val_num_samples=10"),
    ("evaluation.test_num_samples", _int_at_least(1), "an integer >= 1", "evaluation.test_num_samples=1000"),
    ("evaluation.chunk_size", _int_at_least(1), "an integer >= 1", "evaluation.chunk_size=100"),
    ("evaluation.pass_size", lambda v: v in ("auto", None) or _int_at_least(1)(v), "auto, null or an integer >= 1",
     "evaluation.pass_size=auto"),
    ("nan_policy", lambda v: v in NAN_POLICIES, f"one of {', '.join(NAN_POLICIES)}", "nan_policy=stop"),
    ("max_skipped_steps", lambda v: v is None or _int_at_least(0)(v), "null or an integer >= 0",
     "max_skipped_steps=100"),
    ("malloc", lambda v: v in MALLOC_CHOICES, f"one of {', '.join(MALLOC_CHOICES)}", "malloc=tuned"),
    ("logger.wandb.background", lambda v: isinstance(v, bool), "true or false", "logger.wandb.background=true"),
    ("checkpoint_io.background", lambda v: isinstance(v, bool), "true or false", "checkpoint_io.background=true"),
    ("checkpoint_io.max_pending_mib", _non_negative, ">= 0 MiB", "checkpoint_io.max_pending_mib=256"),
)

MLP_NETWORKS = ("vaelab.networks.MLPEncoder", "vaelab.networks.MLPDecoder")
CONV_NETWORKS = ("vaelab.networks.ConvEncoder", "vaelab.networks.ConvDecoder")
#: (group, the plugin's ``_target_`` (or a tuple of them), its setting, test, what it must be, an
#: example of a fix): settings of one plugin, checked where the group is that plugin (another
#: plugin may give the same name another meaning)
PLUGIN_RULES: tuple[tuple[str, str | tuple[str, ...], str, Callable[[Any], bool], str, str], ...] = (
    *((net, MLP_NETWORKS, "hidden", are_widths, "a list of positive layer widths", f"{net}.hidden=[512,512]")
      for net in ("encoder", "decoder")),
    *((net, CONV_NETWORKS, "channels", lambda v: are_widths(v) and len(v) > 0,
       "a list of positive channel counts, one per convolution", f"{net}.channels={example}")
      for net, example in (("encoder", "[32,64,128]"), ("decoder", "[128,64,32]"))),
    *((net, (*MLP_NETWORKS, *CONV_NETWORKS), "activation", lambda v: v in ACTIVATIONS,
       f"one of {', '.join(ACTIVATIONS)}", f"{net}.activation=relu") for net in ("encoder", "decoder")),
    ("prior", "vaelab.priors.Flow", "hidden_features", are_widths, "a list of positive layer widths",
     "prior.hidden_features=[64,64]"),
    ("prior", "vaelab.priors.Flow", "flow", lambda v: v in FLOW_PRIORS, f"one of {', '.join(FLOW_PRIORS)}",
     "prior.flow=maf"),
    ("prior", "vaelab.priors.Flow", "transforms", _int_at_least(1), "an integer >= 1", "prior.transforms=3"),
    ("prior", "vaelab.priors.VampPrior", "squash", lambda v: v in VAMP_SQUASHES,
     f"one of {', '.join(VAMP_SQUASHES)}", "prior.squash=hardtanh"),
    ("prior", "vaelab.priors.VampPrior", "init_std", _non_negative, ">= 0", "prior.init_std=0.01"),
    ("prior", "vaelab.priors.VampPrior", "components", lambda v: v in VAMP_COMPONENTS,
     f"one of {', '.join(VAMP_COMPONENTS)}", "prior.components=posterior"),
    ("prior", "vaelab.priors.MixtureOfGaussians", "init_spread", _non_negative, ">= 0", "prior.init_spread=1.0"),
    ("posterior", "vaelab.posteriors.IAF", "num_transforms", _int_at_least(1), "an integer >= 1",
     "posterior.num_transforms=2"),
    ("posterior", "vaelab.posteriors.IAF", "context_features", _int_at_least(0), "an integer >= 0",
     "posterior.context_features=32"),
    ("posterior", "vaelab.posteriors.IAF", "hidden_features", are_widths, "a list of positive layer widths",
     "posterior.hidden_features=[64,64]"),
)

_MISSING = object()


def value_problems(cfg: DictConfig | Mapping[str, Any]) -> list[str]:
    """One line per value out of range: ``key must be ..., got value (e.g. fix)``."""
    if not isinstance(cfg, DictConfig):
        cfg = OmegaConf.create(dict(cfg))
    plugins = [(f"{group}.{name}", ok, what, fix) for group, targets, name, ok, what, fix in PLUGIN_RULES
               if _select(cfg, f"{group}._target_") in ((targets,) if isinstance(targets, str) else targets)]
    problems = []
    for key, ok, what, fix in (*RULES, *plugins):
        value = _select(cfg, key)
        if value is not _MISSING and not ok(value):
            problems.append(f"{key} must be {what}, got {value!r} (e.g. {fix})")
    return problems + monitor_problems(cfg) + plateau_problems(cfg)


def plateau_problems(cfg: DictConfig, plateau: bool | None = None) -> list[str]:
    """A scheduler that steps on a validation number (ReduceLROnPlateau: the checkpoint
    callback's monitor, in its mode; ``vaelab.module``) where that number is not there when it
    steps, or with the opposite direction (Lightning stopped the run at the first step or
    epoch's end, or the learning rate fell while val/elbo rose). Whether ``optim.scheduler`` is
    one: ``plateau``, or by its name here, where nothing is imported (a subclass of a user's
    own is checked by ``vaelab.jobs.train``, which imports it)."""
    schedule = _select(cfg, "optim.scheduler")
    if not isinstance(schedule, Mapping):
        return []
    if not (schedule.get("_target_") in PLATEAU_SCHEDULERS if plateau is None else plateau):
        return []
    name = str(schedule["_target_"]).rsplit(".", 1)[-1]
    monitor, mode = checkpoint_monitor(cfg)
    problems = []
    if _select(cfg, "optim.scheduler_interval") == "step":
        problems.append(f"optim.scheduler_interval=step: {name} steps on {monitor}, which a validation gives, not a "
                        "training step (e.g. optim.scheduler_interval=epoch)")
    given = schedule.get("mode", mode)
    if given != mode:
        problems.append(f"optim.scheduler.mode={given}: {name} would lower the learning rate while {monitor} improves "
                        f"(callbacks.model_checkpoint.mode={mode}); leave it out (it then takes the checkpoint's mode) "
                        f"or set optim.scheduler.mode={mode}")
    trainer = _select(cfg, "trainer")
    if isinstance(trainer, Mapping) and "check_val_every_n_epoch" in trainer and trainer["check_val_every_n_epoch"] is None:
        problems.append(f"trainer.check_val_every_n_epoch=null: {name} steps at an epoch's end on {monitor}, which "
                        "validation by steps does not give at each epoch's end (e.g. trainer.check_val_every_n_epoch=1)")
    if isinstance(trainer, Mapping) and trainer.get("limit_val_batches") in (0, 0.0):
        problems.append(f"trainer.limit_val_batches=0: {name} steps on {monitor}, which needs validation (e.g. "
                        "trainer.limit_val_batches=1.0, or another optim.scheduler)")
    return problems


#: names a user may expect for vaelab's validation metrics (``val/iwae``: the importance-weighted
#: bound on log p(x), the validation estimate of -NLL; ``val/elbo``: what training maximizes)
_MONITOR_HINTS = {"val/nll": "val/iwae", "val/ll": "val/iwae", "val/loss": "val/elbo"}


def monitor_problems(cfg: DictConfig) -> list[str]:
    """A callback's ``monitor`` (a checkpoint's, an early stop's) that names a validation metric
    vaelab does not log: Lightning finds out only at the end of the first epoch. Names outside
    ``val/`` may come from a user's own code, and pass."""
    val_num_samples = _select(cfg, "evaluation.val_num_samples")
    logged = [f"val/{term}" for term in TERMS] + ["val/iwae"]
    callbacks = _select(cfg, "callbacks")
    problems = []
    for name, entry in callbacks.items() if isinstance(callbacks, Mapping) else ():
        monitor = entry.get("monitor") if isinstance(entry, Mapping) else None
        key = f"callbacks.{name}.monitor"
        if not isinstance(monitor, str) or not monitor.startswith("val/"):
            continue
        if monitor not in logged:
            near = _MONITOR_HINTS.get(monitor) or nearest(monitor, logged)
            problems.append(f"{key}={monitor} is not a metric vaelab logs in validation "
                            f"({', '.join(logged)}){f'; did you mean {key}={near}?' if near else ''}"
                            f"{' (a bound on log p(x): higher is better, mode=max)' if near == 'val/iwae' else ''}")
        elif monitor == "val/iwae" and _is_int(val_num_samples) and val_num_samples == 0:
            problems.append(f"{key}=val/iwae is logged only with evaluation.val_num_samples > 0, got 0 (e.g. "
                            "evaluation.val_num_samples=10)")
    return problems


def allowed_targets_of(config: Any) -> list[str]:
    """A config's ``allowed_targets`` as a list of strings (none: an empty list). A string is not
    a list (read letter by letter, "mylab." allowed every target under "m"): none, and the
    config check refuses it (``RULES``)."""
    value = config.get("allowed_targets") or ()
    return [] if isinstance(value, str) else [str(a) for a in value]


def nearest(name: str, names: Iterable[str]) -> str | None:
    """The one of ``names`` that ``name`` most likely misspells (difflib's closest), else None."""
    near = difflib.get_close_matches(str(name), list(names), n=1)
    return near[0] if near else None


def _select(cfg: DictConfig, key: str) -> Any:
    """The value at ``key``; ``_MISSING`` where there is none, or where it is an interpolation
    this context cannot resolve (``${hydra:...}``: the job checks it)."""
    try:
        return OmegaConf.select(cfg, key, default=_MISSING, throw_on_missing=False)
    except Exception:  # noqa: BLE001 - see above
        return _MISSING


def output_folders(cfg: DictConfig) -> dict[str, str]:
    """The folders a training run writes to, by config key."""
    found: dict[str, str] = {}
    if OmegaConf.select(cfg, "paths.output_dir") is not None:
        found["paths.output_dir"] = str(cfg.paths.output_dir)
    for group, keys in (("callbacks", ("dirpath", "save_dir")), ("logger", ("save_dir",))):
        for name, sub in (cfg.get(group) or {}).items():
            for k in keys:
                if isinstance(sub, Mapping) and sub.get(k):
                    found[f"{group}.{name}.{k}"] = str(sub[k])
    return found


def checkpoint_folders(cfg: DictConfig) -> list[Path]:
    """The checkpoint folders a training run's callbacks write to (their ``dirpath``)."""
    return [Path(f).expanduser() for k, f in output_folders(cfg).items() if k.endswith(".dirpath")]


def folder_problem(folder: str | os.PathLike) -> str | None:
    """Why ``folder`` cannot be written (None if it can), without creating it: the deepest
    existing ancestor must be a folder in which a file can be created."""
    p = Path(folder).expanduser().absolute()
    probe = p
    while not probe.exists():
        if probe.parent == probe:
            return "no part of the path exists"
        probe = probe.parent
    if not probe.is_dir():
        return f"{probe} is a file, not a folder"
    try:
        with tempfile.NamedTemporaryFile(dir=probe, prefix=".vaelab-write-test-"):
            pass
    except OSError as err:
        return f"cannot create a file in {probe} ({err.strerror or err})"
    return None


def folder_problems(folders: Mapping[str, str]) -> list[str]:
    problems = []
    for key, folder in folders.items():
        why = folder_problem(folder)
        if why:
            problems.append(f"{key}={folder}: not writable: {why}; choose a writable folder "
                            f"(e.g. {key}=/a/writable/path, or hydra.run.dir=...)")
    return problems


def checkpoint_problem(ckpt_path: Any, allowed_targets: Sequence[str] = ()) -> str | None:
    """A ``ckpt_path`` to resume from must be a readable vaelab checkpoint naming only targets
    this command allows (``allowed_targets``; not the checkpoint's own): checked with
    ``torch.load(weights_only=True)`` before anything is built."""
    if ckpt_path in (None, "last"):
        return None  # "last": the run's own last checkpoint (resume semantics: vaelab.runs.resolve_resume)
    from vaelab.build import UnsafeConfigError
    from vaelab.checkpoints import CheckpointError, load_checkpoint

    try:
        load_checkpoint(ckpt_path, allowed_targets)
    except (CheckpointError, UnsafeConfigError) as err:
        return f"ckpt_path={ckpt_path}: {err}"
    return None


def earlier_run_problem(cfg: DictConfig) -> str | None:
    """A new run (no ``ckpt_path``) must not write into a folder that holds an earlier run: its
    summary, logs and ``latest-step`` checkpoint would be replaced and its pictures mixed with
    the new ones (a job script with a fixed ``hydra.run.dir``, a sweep run again into its folder)."""
    if cfg.get("ckpt_path") not in (None, ""):
        return None
    out = OmegaConf.select(cfg, "paths.output_dir", default=None)
    if out is None:
        return None
    folder = Path(str(out)).expanduser()
    # checkpoints: in the run folder, and in any checkpoint folder set elsewhere
    ckpt_dirs = [folder / "checkpoints", *checkpoint_folders(cfg)]
    ckpts = sorted({p for d in ckpt_dirs for p in d.glob("*.ckpt")})
    summary = folder / "summary.json"
    # a summary of a run that failed before any checkpoint (a bad value, a kill) has nothing to lose
    finished = summary.is_file() and not (_failed(folder) and not ckpts)
    if not ckpts and not finished:
        if (folder / "metrics.json").is_file():  # eval.py's: its config and pictures would be replaced
            return (f"paths.output_dir={folder} holds an earlier evaluation (metrics.json), which a new run there "
                    "would overwrite: write this run elsewhere (another hydra.run.dir, or hydra.sweep.dir for a sweep)")
        return None
    found = (["summary.json"] if finished else []) + [str(p) for p in ckpts[:3]]
    where = f"continue it with ckpt_path={folder}" if (folder / "checkpoints").is_dir() else "continue it with ckpt_path=<its checkpoint>"
    return (f"paths.output_dir={folder} holds an earlier run ({', '.join(found)}), which a new run there would "
            f"overwrite: {where}, or write this run elsewhere (another hydra.run.dir or checkpoint dirpath, or "
            "hydra.sweep.dir for a sweep)")


def launched_rank() -> int:
    """This process's global rank as the launcher of a multi-process job set it in the
    environment (Lightning's keys, in Lightning's order); 0 for a process on its own."""
    for key in ("RANK", "LOCAL_RANK", "SLURM_PROCID", "JSM_NAMESPACE_RANK"):
        value = os.environ.get(key)
        if value not in (None, ""):
            try:
                return int(value)
            except ValueError:
                return 0
    return 0


def earlier_eval_problem(folder: str | Path, hydra_files: bool = True) -> str | None:
    """eval.py writes its config (``.hydra/``), ``metrics.json`` and its pictures
    (``images/*.png``, the names a training run's test pictures have) into its folder: one where
    any of these already is (an earlier evaluation, or a training run: ``python eval.py
    ckpt_path=R hydra.run.dir=R``) is refused, not overwritten. ``hydra_files``: count
    ``.hydra/`` too (not once this job's Hydra has written its own there). A folder with Hydra's
    files and nothing else is a command that stopped before it wrote anything (a missing
    checkpoint, a bad value): nothing to protect there, as for a training run."""
    folder = Path(str(folder)).expanduser()
    pictures = sorted((folder / "images").glob("*.png"))
    results = [p for p in ("metrics.json", "summary.json", "checkpoints") if (folder / p).exists()] or pictures
    found = [".hydra/config.yaml"] if hydra_files and results and (folder / ".hydra" / "config.yaml").is_file() else []
    found += ["metrics.json"] if (folder / "metrics.json").is_file() else []
    found += [f"images/{p.name}" for p in pictures[:3]] + (["..."] if len(pictures) > 3 else [])
    if not found:
        return None
    return (f"the output folder {folder} holds an earlier run's or evaluation's {', '.join(found)}, which this "
            "evaluation would overwrite: leave hydra.run.dir and paths.output_dir unset (each evaluation gets a new "
            "folder under outputs/eval/) or give a new folder")


def _failed(folder: Path) -> bool:
    from vaelab.report import read_summary

    try:
        return bool((read_summary(folder) or {}).get("failed"))
    except (OSError, ValueError):
        return False


def command_line_overrides() -> list[Any]:
    """This process's command-line overrides as Hydra parses them (``Override`` objects); none
    outside a Hydra app."""
    try:
        from hydra.core.hydra_config import HydraConfig
        from hydra.core.override_parser.overrides_parser import OverridesParser
    except ImportError:  # pragma: no cover
        return []
    if not HydraConfig.initialized():
        return []
    # as written: reading the list's items resolved an interpolation among them (latent_dim=${oops}
    # was an InterpolationKeyError traceback here)
    task = OmegaConf.to_container(HydraConfig.get().overrides.task, resolve=False)
    return OverridesParser.create().parse_overrides([str(o) for o in task])  # type: ignore[union-attr]


def top_level_names(primary: str) -> set[str]:
    """The settings of ``train.py`` / ``eval.py`` (``primary`` = train | eval): the keys of its
    YAML file and the config groups of its defaults list."""
    from importlib.resources import files

    node = OmegaConf.load(str(files("vaelab.conf").joinpath(f"{primary}.yaml")))
    names = {str(k) for k in node if k not in ("defaults", "hydra")}
    for entry in node.get("defaults") or []:
        if isinstance(entry, str):
            names.add(entry)
        else:
            names.update(str(k).split("@")[0].removeprefix("override ").strip("/") for k in entry)
    return names - {"_self_"}


def added_key_problems(primary: str, cfg: DictConfig | None = None) -> list[str]:
    """A ``+key=value`` on the command line adds a key that no file defines. Hydra suggests the
    ``+`` for any unknown key, so a misspelled setting (``+latent_dimm=8``) or a training option
    given to eval.py (``+likelihood=gaussian``) would run and be silently ignored. Refused:
    additions whose top-level name is a near miss of a setting, and for eval.py the training
    options. Other additions (``+note=...``, ``+trainer.limit_val_batches=...``) go through.
    Below the top level (with the composed ``cfg``): an addition to a part that vaelab, torch or
    Lightning builds (a node with a ``_target_``) must be an argument of that class
    (``+trainer.max_epoch=3`` failed inside Lightning's Trainer, ``+optim.optimizer.lrr`` left a
    traceback), and one to any other node a near miss of its keys is refused."""
    overrides = command_line_overrides()
    if not overrides:
        return []
    known = top_level_names(primary)
    training = top_level_names("train") if primary == "eval" else set()
    script = f"{primary}.py"
    problems = []
    for override in overrides:
        if not (override.is_add() or override.is_force_add()):
            continue
        key = override.key_or_group.replace("/", ".")
        top = key.split(".")[0]
        if top in known:
            # (eval.py's data.* additions: eval_data_problems names each)
            nested = cfg is not None and "." in key and not (primary == "eval" and top == "data")
            problem = _nested_added_key_problem(key, cfg) if nested else None
            if problem:
                problems.append(problem)
            continue
        near = _typo_of(top, known)
        if near:
            problems.append(f"+{key}: {top} is not a setting of {script}; did you mean {near}? (without +: "
                            f"{key.replace(top, near, 1)}=...; the + only adds a key that nothing reads)")
        elif top in training:
            problems.append(f"+{key}: {top} is a training setting; eval.py evaluates the checkpoint's model as it "
                            f"was trained (its overrides: evaluation.*, {', '.join(f'data.{k}' for k in DATA_READ_KEYS)}, "
                            "trainer, logger)")
    return problems


def _arguments_of(target: str) -> set[str] | None:
    """The keyword arguments the class ``target`` takes (for vaelab's data modules, through the
    ``**kwargs`` they pass to their base); None where that cannot be told: not a class under
    vaelab's, torch's or Lightning's prefixes, not importable, or ``**kwargs`` that go elsewhere."""
    import inspect

    from hydra.utils import get_class

    from vaelab.options import ALLOWED_TARGET_PREFIXES, under_prefix

    if not any(under_prefix(target, a) for a in ALLOWED_TARGET_PREFIXES):
        return None  # (a user's plugin: not imported before the targets' check)
    try:
        cls = get_class(target)
    except Exception:  # noqa: BLE001 - the targets' check names it
        return None
    names: set[str] = set()
    for klass in cls.__mro__:
        if "__init__" not in vars(klass):
            continue
        try:
            params = inspect.signature(klass.__init__).parameters.values()
        except (TypeError, ValueError):
            return None
        names.update(p.name for p in params if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD))
        if not any(p.kind is p.VAR_KEYWORD for p in params):
            return names - {"self"}
        # **kwargs: vaelab's data modules pass them to their base; elsewhere they may go anywhere
        # (the flow prior's to zuko, DDPStrategy's to DistributedDataParallel): not told
        if klass.__module__ != "vaelab.datamodules":
            return None
    return None


def _nested_added_key_problem(key: str, cfg: DictConfig) -> str | None:
    """``+a.b.leaf``: refused where ``a.b`` is built from a class that takes no ``leaf`` (with
    the nearest argument it takes), or, for a plain node, where ``leaf`` is a near miss of its keys."""
    parent, _, leaf = key.rpartition(".")
    node = OmegaConf.select(cfg, parent, default=None)
    if not isinstance(node, DictConfig):
        return None
    target = node.get("_target_")
    if isinstance(target, str):
        takes = _arguments_of(target)
        if takes is None or leaf in takes:
            return None
        near = difflib.get_close_matches(leaf, sorted(takes), n=1, cutoff=0.6)
        hint = ""
        if near:
            hint = f"; did you mean {near[0]}? ({'' if near[0] in node else '+'}{parent}.{near[0]}=...)"
        return f"+{key}: {target.rsplit('.', 1)[-1]} ({parent}) takes no argument {leaf}{hint}"
    if any(isinstance(v, DictConfig) and "_target_" in v for k, v in node.items_ex(resolve=False) if k != leaf):
        return None  # a collection of parts (callbacks, logger): an added entry is built as the others
    near = _typo_of(leaf, {str(k) for k in node if str(k) != leaf})  # (the composed node holds the added key)
    if near:
        return (f"+{key}: {leaf} is not a setting of {parent}; did you mean {near}? (without +: "
                f"{parent}.{near}=...; the + only adds a key that nothing reads)")
    return None


def _typo_of(name: str, names: Iterable[str]) -> str | None:
    """The one of ``names`` that ``name`` misspells by one or two letters (latent_dimm,
    likelihod), else None: experiment_name is a new key, not a typo of one."""
    near = [n for n in difflib.get_close_matches(name, sorted(names), n=3, cutoff=0.6) if _edits(name, n) <= 2]
    return near[0] if near else None


def _edits(a: str, b: str) -> int:
    """Levenshtein distance: insertions, deletions and substitutions from a to b."""
    row = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        prev, row[0] = row[0], i
        for j, cb in enumerate(b, 1):
            prev, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, prev + (ca != cb))
    return row[-1]


def interpolation_problems(cfg: DictConfig) -> list[str]:
    """An interpolation that does not resolve (``latent_dim=${oops}``, ``${oc.env:UNSET}``),
    which the value checks pass over (they leave interpolations to the job) and the job met as
    a traceback when it resolved its config."""
    from omegaconf.errors import InterpolationResolutionError

    try:
        OmegaConf.to_container(cfg, resolve=True)
    except InterpolationResolutionError as err:
        key = getattr(err, "full_key", None) or "a setting"
        first = (str(err).splitlines() or [""])[0]
        return [f"{key}: its interpolation does not resolve ({first}); give a value, or interpolate a key the "
                "config has (e.g. ${latent_dim}) or an environment variable that is set"]
    return []


def validate_train_config(cfg: DictConfig) -> None:
    """Every problem of a training config at once, before anything runs (``ConfigError``)."""
    problems = value_problems(cfg) + interpolation_problems(cfg)
    ckpt = checkpoint_problem(cfg.get("ckpt_path"), allowed_targets_of(cfg))
    if ckpt:
        problems.append(ckpt)
    elif cfg.get("train", True) is False and cfg.get("ckpt_path") not in (None, ""):
        # (it tested the model as built, untrained, and wrote that over the run's summary.json)
        problems.append(f"train=false with ckpt_path={cfg.ckpt_path}: to test a checkpoint, python eval.py "
                        f"ckpt_path={cfg.ckpt_path} (it writes metrics.json in a folder of its own and leaves "
                        "the run's summary.json as it is)")
    if cfg.get("train", True) is False and cfg.get("test", True) is False:
        problems.append("train=false with test=false: nothing would run (train=false tests the model as built, "
                        "untrained; drop test=false)")
    limit = OmegaConf.select(cfg, "trainer.limit_train_batches", default=None)
    if cfg.get("train", True) is not False and _is_num(limit) and limit == 0:
        problems.append("trainer.limit_train_batches=0 trains nothing: for the untrained model's test numbers, "
                        "train=false")
    earlier = earlier_run_problem(cfg)
    if earlier:
        problems.append(earlier)
    problems += added_key_problems("train", cfg)
    problems += folder_problems(output_folders(cfg))
    raise_problems(problems)


def validate_eval_config(cfg: DictConfig) -> None:
    if cfg.get("ckpt_path") in (None, "???"):
        raise ConfigError("give the checkpoint to evaluate: python eval.py ckpt_path=<run>/checkpoints/last.ckpt")
    checked = OmegaConf.masked_copy(cfg, ["evaluation", "trainer", "seed", "data", "malloc", "allowed_targets"])
    for key in RUN_OWN_EVALUATION:  # null: the run's own (vaelab.jobs.evaluate)
        if OmegaConf.select(checked, f"evaluation.{key}", default=0) is None:
            del checked.evaluation[key]
    for key in [k for k, v in (checked.get("data") or {}).items() if v is None]:  # null: as the run stored it
        del checked.data[key]
    problems = value_problems(checked) + interpolation_problems(cfg)
    problems += eval_data_problems(cfg.get("data"))
    problems += folder_problems({"paths.output_dir": str(cfg.paths.output_dir)})
    # Hydra's own files are checked before it writes them (vaelab.folders.RunFolders); the rest here,
    # also where paths.output_dir is not Hydra's folder
    earlier = None if launched_rank() else earlier_eval_problem(cfg.paths.output_dir, hydra_files=False)
    if earlier:  # (ranks > 0 write nothing; they start once rank zero has begun writing)
        problems.append(earlier)
    problems += added_key_problems("eval", cfg)
    raise_problems(problems)


def eval_data_problems(data: Any) -> list[str]:
    """eval.py's ``data.*`` overrides other than where and how the data are read
    (``DATA_READ_KEYS``): the test split, its size, binarization, padding, ... are the run's,
    stored in its checkpoint (``+data.split_seed=7`` drew another test split, with training
    images in it; ``+data.pad=2`` failed inside the model)."""
    problems = []
    for key in data or {}:
        if key in DATA_READ_KEYS:
            continue
        near = nearest(key, DATA_READ_KEYS)
        hint = f" (did you mean data.{near}?)" if near else ""
        problems.append(f"data.{key} cannot be set in eval.py{hint}: the test data are the run's, as its checkpoint "
                        f"stores them (eval.py takes {', '.join(f'data.{k}' for k in DATA_READ_KEYS)}); to test on "
                        "other data, train a run on them")
    return problems


def raise_problems(problems: list[str]) -> None:
    if not problems:
        return
    cls = OutputNotWritableError if all(": not writable:" in p for p in problems) else ConfigError
    n = len(problems)
    raise cls(f"the config has {n} problem{'s' * (n != 1)}; nothing has run yet:\n  "
              + "\n  ".join(problems))


# --- disk space -------------------------------------------------------------------------------
def checkpoint_bytes(module: Any) -> int:
    """About the size of one checkpoint: the weights and two Adam moments per weight."""
    weights = sum(t.numel() * t.element_size() for t in module.state_dict().values())
    return 3 * weights + (1 << 16)


def check_free_space(module: Any, folders: Iterable[str | Path], copies: int = 3) -> None:
    """Refuse to start when a checkpoint folder cannot hold ``copies`` checkpoints (last, best,
    and the temporary file of an atomic save)."""
    need = copies * checkpoint_bytes(module)
    for folder in folders:
        probe = Path(folder).expanduser().absolute()
        while not probe.exists() and probe.parent != probe:
            probe = probe.parent
        free = shutil.disk_usage(probe).free
        if free < need:
            raise OutputNotWritableError(
                f"{folder} has {free / 2**20:.1f} MiB free, but the checkpoints of this model need "
                f"about {need / 2**20:.1f} MiB ({copies} copies of {need / copies / 2**20:.1f} MiB): free "
                "space there, or write the run elsewhere (hydra.run.dir=..., or "
                "callbacks.model_checkpoint.dirpath=...); nothing has run yet"
            )


# --- secrets ----------------------------------------------------------------------------------
SECRET_NAME = re.compile(r"KEY|TOKEN|SECRET|PASSWORD|PASSWD|CREDENTIAL|AUTH", re.IGNORECASE)


def secret_values(environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """``{value: name}`` of environment variables that look like secrets (W&B API key, tokens)."""
    env = os.environ if environ is None else environ
    # paths (SSH_AUTH_SOCK, XAUTHORITY) and short flags are not secrets, and would match far too much
    return {v: k for k, v in env.items()
            if SECRET_NAME.search(k) and len(v) >= 8 and not v.startswith(("/", "~", "."))}


def redact_secrets(config: Any, secrets: Mapping[str, str] | None = None) -> tuple[Any, list[str]]:
    """A copy of a plain config with every string holding a secret's value replaced by
    ``<redacted $NAME>``; also the keys that were redacted."""
    secrets = secret_values() if secrets is None else secrets
    hits: list[str] = []

    def walk(node: Any, path: str) -> Any:
        if isinstance(node, Mapping):
            return {k: walk(v, f"{path}.{k}" if path else str(k)) for k, v in node.items()}
        if isinstance(node, list | tuple):
            return type(node)(walk(v, f"{path}[{i}]") for i, v in enumerate(node))
        if isinstance(node, str):
            for value, name in secrets.items():
                if value in node:
                    hits.append(path)
                    node = node.replace(value, f"<redacted ${name}>")
        return node

    return walk(config, ""), hits
