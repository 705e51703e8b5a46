"""From config to objects: the one place where YAML meets the math.

The decoder's output width follows from the chosen likelihood
(``likelihood.num_params(data_shape) · C`` channels) and the encoder's from the posterior
(``posterior.num_params(latent_dim)`` features), so no config repeats them.

Only classes under the allowed module prefixes are instantiated. A checkpoint carries its
config, and rebuilding a model from it must not run whatever ``_target_`` someone wrote into
it (``os.system``, say): such a config is refused before anything is built.
"""

from __future__ import annotations

import ctypes
import importlib
import inspect
import os
import sys
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
from hydra.utils import get_class, instantiate

from vaelab.errors import ExplainedError, SettingError
from vaelab.options import (
    ALLOWED_TARGET_PREFIXES,
    MALLOC_CHOICES,  # the config check reads it too
    under_prefix,
)
from vaelab.vae import VAE
from vaelab.validation import allowed_targets_of, nearest


class UnsafeConfigError(ValueError, ExplainedError):
    """A config names a ``_target_`` outside the allowed modules."""


class ModelConfigError(ValueError, ExplainedError):
    """The model's parts do not fit each other or the data (shapes, latent sizes): the message
    says which, and what to change."""


def iter_targets(cfg: Any, path: str = "") -> Iterable[tuple[str, str]]:
    """Yield ``(key path, target)`` for every ``_target_`` in a nested config."""
    if isinstance(cfg, Mapping):
        for key, value in cfg.items():
            where = f"{path}.{key}" if path else str(key)
            if key == "_target_":
                yield path or "<root>", str(value)
            else:
                yield from iter_targets(value, where)
    elif isinstance(cfg, Sequence) and not isinstance(cfg, str | bytes):
        for i, value in enumerate(cfg):
            yield from iter_targets(value, f"{path}[{i}]")


def _defined_under(obj: Any, prefixes: Sequence[str]) -> bool:
    owner = getattr(obj, "__module__", None)
    if not isinstance(owner, str):
        return False
    name = f"{owner}.{getattr(obj, '__qualname__', '')}"
    return any(under_prefix(f"{owner}.", a) or under_prefix(name, a) for a in prefixes)


#: how ``target_problem`` begins where the name is allowed but nothing of that name exists
NOT_FOUND = ("no module", "its module cannot be imported", "it names nothing")
#: ``target_problem``'s answer where the text itself is outside the allowed prefixes
OUTSIDE = "outside the allowed modules"


def target_problem(target: str, allowed: Sequence[str]) -> str | None:
    """Why ``target`` may not be instantiated (None: it may). Its text must start with an allowed
    prefix, and what it names (Hydra follows attributes through modules, as this does) must
    be reached without passing through a module held as an attribute
    (``vaelab.checkpoint_io.shutil.copyfile`` is ``shutil.copyfile``) and be defined under an
    allowed prefix (``vaelab.build.instantiate`` is Hydra's); under vaelab's own prefixes,
    torch's and Lightning's (not a user's ``allowed_targets``) it must be a class: the model
    parts, data, callbacks, loggers and optimizers are, and a function such as
    ``vaelab.report.write_json`` would write where a stored config says."""
    if not any(under_prefix(target, a) for a in allowed):
        return OUTSIDE
    parts = target.split(".")
    for i in range(len(parts) - 1, 0, -1):  # the longest leading part that is a module
        try:
            obj: Any = importlib.import_module(".".join(parts[:i]))
        except ImportError:
            continue
        except Exception as err:  # noqa: BLE001 - a module that fails to import: named, not run further
            return f"its module cannot be imported ({type(err).__name__}: {err})"
        break
    else:
        return "no module of that name"
    for name in parts[i:]:
        if not hasattr(obj, name):
            return f"it names nothing: {getattr(obj, '__name__', obj)} has no {name!r}"
        obj = getattr(obj, name)
        if inspect.ismodule(obj):
            return f"it reaches the module {obj.__name__} through an attribute"
    user = tuple(a for a in allowed if a not in ALLOWED_TARGET_PREFIXES)
    if not _defined_under(obj, allowed):
        return f"it is {getattr(obj, '__module__', '?')}.{getattr(obj, '__qualname__', '?')}, defined elsewhere"
    if not inspect.isclass(obj) and not (user and _defined_under(obj, user)):
        return "it is not a class (vaelab, torch and Lightning parts are classes)"
    return None


def check_targets(cfg: Any, allowed: Sequence[str] = ALLOWED_TARGET_PREFIXES) -> None:
    """Raise ``UnsafeConfigError`` if any ``_target_`` may not be instantiated (``target_problem``)."""
    bad = [(p, t, why) for p, t in iter_targets(cfg) if (why := target_problem(t, allowed))]
    missing = [(p, t, why) for p, t, why in bad if why.startswith(NOT_FOUND)]
    if missing and len(missing) == len(bad):  # allowed, but not there: a misspelt name, a missing install
        listing = ", ".join(f"{p}: {t} ({why})" for p, t, why in missing)
        raise SettingError(f"{listing}: no such class; check the name (or install the module, or put its folder on "
                           "PYTHONPATH)")
    if bad:
        listing = ", ".join(f"{p}: {t} ({why})" for p, t, why in bad)
        raise UnsafeConfigError(
            f"refusing to instantiate {listing}: only classes under {', '.join(allowed)} are "
            "allowed. If this is your own plugin, allow its module prefix: allowed_targets=[mylab.] "
            f"on the command line, or export {ALLOWED_TARGETS_ENV}=mylab."
        )


#: module prefixes of the user's own plugins, comma-separated, allowed in every command (e.g.
#: ``export VAELAB_ALLOWED_TARGETS=mylab.``): what ``allowed_targets=[mylab.]`` allows in one
ALLOWED_TARGETS_ENV = "VAELAB_ALLOWED_TARGETS"


def env_prefixes() -> tuple[str, ...]:
    return tuple(p.strip() for p in os.environ.get(ALLOWED_TARGETS_ENV, "").split(",") if p.strip())


def is_plateau_scheduler(schedule: Any) -> bool:
    """Whether ``optim.scheduler`` names a ReduceLROnPlateau, torch's or a subclass: a scheduler
    that steps on a validation number, not on the clock (``vaelab.module``)."""
    target = schedule.get("_target_") if hasattr(schedule, "get") else None
    try:
        return isinstance(target, str) and issubclass(get_class(target), torch.optim.lr_scheduler.ReduceLROnPlateau)
    except Exception:  # noqa: BLE001 - not a class: the targets' check names it
        return False


def allowed_prefixes(config: Mapping[str, Any]) -> tuple[str, ...]:
    """The ``_target_`` prefixes a config composed by this command may name: vaelab's, torch's and
    Lightning's (``ALLOWED_TARGET_PREFIXES``), ``$VAELAB_ALLOWED_TARGETS`` and its own
    ``allowed_targets``. Not for a config read from a checkpoint, which cannot allow its own
    code: ``vaelab.checkpoints.load_checkpoint`` takes the command's list."""
    return ALLOWED_TARGET_PREFIXES + env_prefixes() + tuple(allowed_targets_of(config))


FUSED_CHOICES = ("auto", True, False)


def fused_kernels_cover(params: Sequence[torch.Tensor]) -> bool:
    """Whether torch has fused optimizer kernels for every parameter (floating point, on a
    device with fused kernels: CPU, CUDA, ... as this torch build says)."""
    try:
        from torch.utils._foreach_utils import _get_fused_kernels_supported_devices

        devices = set(_get_fused_kernels_supported_devices())
    except ImportError:  # a torch that moved the helper: take the safe path
        return False
    return bool(params) and all(p.device.type in devices and torch.is_floating_point(p) for p in params)


def skip_failing_nvml_probe() -> bool:
    """Stop Adam's every step from probing for NVML where it is not installed. True if changed.

    Lightning sets ``PYTORCH_NVML_BASED_CUDA_CHECK=1`` when imported. With it, torch's
    ``cuda.is_available()`` asks NVML first, and Adam/AdamW call it on every ``step()``
    (``_accelerator_graph_capture_health_check``). Without NVML (a CPU machine with torch's
    standard CUDA build) each call tries to load ``libnvidia-ml.so.1``, fails, is not cached,
    and falls back to the CUDA runtime's count: about 0.12 ms a call and 0.19 ms an Adam step
    on this project's CPU machine, 1-2% of the MLP VAE's step. Where the library cannot be
    loaded the NVML path always ends in that same fallback, so asking the runtime directly
    gives the same answer, without the failed load.
    """
    if os.environ.get("PYTORCH_NVML_BASED_CUDA_CHECK") != "1" or not torch.backends.cuda.is_built():
        return False
    try:
        ctypes.CDLL("libnvidia-ml.so.1")  # the name torch's NVML probe loads
    except OSError:
        os.environ["PYTORCH_NVML_BASED_CUDA_CHECK"] = "0"
        return True
    return False


_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4  # glibc's mallopt parameters (malloc.h)


def keep_freed_memory(mode: str = "tuned") -> bool:
    """Tune glibc's allocator so that a training step reuses the memory the previous step freed
    instead of returning it to the system and taking it back, page fault by page fault. True
    if set.

    A step allocates and frees the same large tensors every time (activations, their
    gradients: megabytes each). glibc's defaults serve them from fresh ``mmap`` pages or give
    the freed top of the heap back to the system once it exceeds a threshold that adapts as it
    goes, so whether a run lands on a pattern that keeps its memory or one that faults in every
    page of every activation, every step, depends on its history: on this project's 2-core
    CPU the conv benchmark model trained at 2,000-2,300 or at 2,800-3,300 images/s from run to
    run with the same code; with this setting vaelab ran at 3,000-3,200 in every run, and the
    benchmark's plain loop went from 2,190-2,340 to 3,200-3,320 images/s (a step of 20 tensors
    of 2 MiB faults in about 100 pages instead of 2,000-10,000, tested).

    ``mallopt`` turns off ``mmap`` for single allocations (``M_MMAP_MAX`` 0: every block comes
    from the heap and is reused, however large) and fixes the threshold for giving the heap's
    free top back to the system at 1 GiB. Before, blocks of 32 MiB and more (glibc's highest
    ``mmap`` threshold) still had pages of their own: an importance-sampled validation pass of
    the conv model (500 images × 10 samples: activations of 39-625 MiB) faulted in 1.8 GB of fresh
    pages each time. With such passes also bounded (``evaluation.pass_size``) it takes half the
    time (benchmarks/evaluation.py; the test uses 64 MiB blocks). The cost: the process
    keeps up to 1 GiB of freed memory instead of returning it (its peak use stays resident).
    Where glibc cannot grow the heap, it still maps the block. ``system``, other C libraries and
    other systems: nothing changes. From outside a process the same aim is reached with
    ``MALLOC_MMAP_MAX_`` and ``MALLOC_TRIM_THRESHOLD_`` in the environment at start-up, or
    jemalloc/tcmalloc preloaded (PyTorch's CPU performance guide); this needs neither.
    """
    if mode not in MALLOC_CHOICES:
        raise SettingError(f"malloc={mode!r} is not an option: choose one of {MALLOC_CHOICES}")
    if mode == "system" or not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):  # not glibc (musl, ...): its own defaults
        return False
    mmap_set = mallopt(_M_MMAP_MAX, 0)  # 1 on success
    trim_set = mallopt(_M_TRIM_THRESHOLD, 1 << 30)
    return bool(mmap_set and trim_set)


def build_optimizer(optimizer_cfg: Mapping[str, Any], params: Iterable[torch.nn.Parameter],
                    clipped_in_mixed_precision: bool = False) -> torch.optim.Optimizer:
    """The optimizer of ``optim.optimizer`` over ``params``.

    ``fused``: ``auto`` (the default in optim/adam.yaml and optim/adamw.yaml) takes torch's
    fused kernel, one kernel for all parameters instead of a loop of small operations per
    tensor, wherever the optimizer has one (``fused`` in its signature) and torch has one for
    the parameters' device; ``true`` insists on it, ``false`` uses torch's default. Fused Adam
    computes the same update: on this project's CPU benchmark it takes 0.5 ms a step instead of
    3.4 ms for the 1.4M parameters of the MLP VAE (benchmarks/throughput.py).

    ``clipped_in_mixed_precision``: gradients clipped (``trainer.gradient_clip_val``) under a
    mixed precision, where Lightning clips the unscaled gradients itself and refuses an
    optimizer that unscales them inside its step, as the fused kernels do: ``auto`` takes
    torch's default kernel, and ``true`` is refused with the fix (it stopped at the first step).
    """
    skip_failing_nvml_probe()
    cfg = dict(optimizer_cfg)
    params = list(params)
    fused = cfg.pop("fused", None)
    if fused not in (*FUSED_CHOICES, None):
        raise SettingError(f"optim.optimizer.fused must be auto, true or false, got {fused!r}")
    if fused is True and clipped_in_mixed_precision:
        raise SettingError(
            "optim.optimizer.fused=true with trainer.gradient_clip_val under mixed precision: the fused kernel "
            "unscales the gradients inside its step, after Lightning would clip them, and Lightning refuses "
            "it. Give optim.optimizer.fused=auto (or false), or drop trainer.gradient_clip_val."
        )
    if fused == "auto":
        takes_fused = "fused" in inspect.signature(get_class(cfg["_target_"])).parameters
        # an explicit foreach=true is the user's choice of kernel (torch refuses both at once)
        fused = (True if takes_fused and not cfg.get("foreach") and not clipped_in_mixed_precision
                 and fused_kernels_cover(params) else None)
    if fused is not None:
        cfg["fused"] = fused
    return instantiate(cfg, _partial_=True)(params=params)


def build_vae(config: Mapping[str, Any], data_shape: Sequence[int], num_levels: int | None = None) -> VAE:
    """Build the VAE from the resolved config's model groups and the data shape (C, H, W).

    ``num_levels``: the data's intensity levels, for likelihoods over them whose config leaves
    their count null (``likelihood=categorical``, ``discretized_logistic_mixture``)."""
    parts = {k: config[k] for k in ("encoder", "decoder", "posterior", "likelihood", "prior")}
    check_targets(parts, allowed_prefixes(config))
    unknown = [problem for group, part in parts.items() for problem in _unknown_settings(group, part)]
    if unknown:
        raise ModelConfigError("; ".join(unknown))
    data_shape = tuple(int(s) for s in data_shape)
    latent_dim = int(config["latent_dim"])
    if latent_dim <= 0:
        raise ModelConfigError(f"latent_dim must be a positive integer, got {latent_dim}")

    likelihood = _of_base("likelihood", instantiate(parts["likelihood"]), "vaelab.likelihoods", "Likelihood")
    likelihood.set_num_levels(num_levels)
    posterior = _of_base("posterior", instantiate(parts["posterior"]), "vaelab.posteriors", "Posterior")
    prior = _of_base("prior", instantiate(parts["prior"]), "vaelab.priors", "Prior")
    if prior.latent_dim != latent_dim:
        raise ModelConfigError(f"prior.latent_dim={prior.latent_dim} differs from latent_dim={latent_dim}")
    encoder = instantiate(parts["encoder"], _partial_=True)(
        data_shape=data_shape, out_features=posterior.num_params(latent_dim)
    )
    out_channels = likelihood.num_params(data_shape) * data_shape[0]
    decoder = instantiate(parts["decoder"], _partial_=True)(
        latent_dim=latent_dim, data_shape=data_shape, out_channels=out_channels
    )
    vae = VAE(encoder=encoder, posterior=posterior, decoder=decoder, likelihood=likelihood, prior=prior)
    # priors that depend on the rest of the model (the VampPrior encodes pseudo-inputs of the
    # data's shape with the encoder) are bound to it now; for the others this is a no-op
    bind = getattr(prior, "bind", None)
    if callable(bind):
        bind(vae, data_shape)
    _check_shapes(vae, data_shape, out_channels)
    return vae


def _unknown_settings(group: str, part: Mapping[str, Any]) -> list[str]:
    """Settings of a plugin's config that its class does not take (``+encoder.hiddn=[64]``),
    each with the names it does take: otherwise a TypeError from deep inside the build."""
    try:
        cls = get_class(part["_target_"])
        params = inspect.signature(cls.__init__).parameters
    except Exception:  # noqa: BLE001 - not a class with a signature: instantiate will say what is wrong
        return []
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return []
    known = [name for name in params if name != "self"]
    problems = []
    for key in part:
        if str(key).startswith("_") or key in known:
            continue
        near = nearest(key, known)
        problems.append(f"{group}.{key} is not a setting of {part['_target_']}"
                        f"{f'; did you mean {group}.{near}?' if near else ''} (its settings: {', '.join(known)})")
    return problems


def _of_base(group: str, part: Any, module: str, name: str) -> Any:
    """``part`` if it is a ``module.name`` (the base class whose methods the model calls: a
    plugin that only returned the right distribution failed with an AttributeError)."""
    base = getattr(importlib.import_module(module), name)
    if not isinstance(part, base):
        raise ModelConfigError(f"the {group} {type(part).__module__}.{type(part).__qualname__} is not a {module}.{name}: "
                               f"subclass it (class {type(part).__name__}({name}), from {module} import {name}); the "
                               "README's 'Adding a plugin' gives the contract")
    return part


def _check_shapes(vae: VAE, data_shape: tuple[int, ...], out_channels: int) -> None:
    """Push one example through, so a mismatch is an error now, not at step 1 of a sweep: the
    encoder's features, the decoder's output for z with leading sample dimensions (the
    objectives decode [S, N, latent_dim]), the likelihood's and the prior's event shapes."""
    from torch.distributions import Distribution

    with torch.no_grad():
        x = torch.zeros(2, *data_shape)
        try:
            h = vae.encoder(x)
        except RuntimeError as err:
            raise ModelConfigError(f"the encoder cannot take data of shape {data_shape}: {err}") from err
        params = vae.decoder(torch.zeros(2, vae.latent_dim))
        want = (2, out_channels, *data_shape[1:])
        if tuple(params.shape) != want:
            raise ModelConfigError(
                f"the decoder produces {tuple(params.shape[1:])} per example but the likelihood "
                f"needs {want[1:]} for data of shape {data_shape}: choose a decoder for this "
                "image size (decoder=mlp works for any size)"
            )
        try:
            sampled = tuple(vae.decoder(torch.zeros(3, 2, vae.latent_dim)).shape)
        except RuntimeError as err:
            sampled = f"an error ({err})"  # type: ignore[assignment]
        if sampled != (3, *want):
            raise ModelConfigError(
                f"the decoder {type(vae.decoder).__name__} maps z of shape (3, 2, latent_dim) to {sampled}, not "
                f"{(3, *want)}: a decoder keeps z's leading dimensions (the objectives decode K samples of each "
                "example at once), e.g. flatten them and view the output as (*z.shape[:-1], C, H, W)")
        px = vae.likelihood(params)
        if not isinstance(px, Distribution) or tuple(px.event_shape) != tuple(data_shape) or \
                tuple(px.batch_shape) != (2,):
            got = (f"event shape {tuple(px.event_shape)} and batch shape {tuple(px.batch_shape)}"
                   if isinstance(px, Distribution) else f"a {type(px).__name__}, not a torch.distributions.Distribution")
            raise ModelConfigError(
                f"the likelihood {type(vae.likelihood).__name__} gives {got} for 2 examples of shape {data_shape}: "
                f"it must give a distribution whose event shape is the data's (e.g. Independent(Laplace(loc, "
                f"scale), {len(data_shape)})), so that log p(x|z) is one number an example, summed over its values")
    with torch.no_grad():
        event_shape = tuple(vae.prior_distribution().event_shape)
    if event_shape != (vae.latent_dim,):
        raise ModelConfigError(f"the prior {type(vae.prior).__name__} gives event shape {event_shape}, "
                         f"not (latent_dim,) = ({vae.latent_dim},)")
    if h.shape[-1] != vae.posterior.num_params(vae.latent_dim):
        raise ModelConfigError(f"the encoder gives {h.shape[-1]} features, the posterior needs "
                         f"{vae.posterior.num_params(vae.latent_dim)}")
