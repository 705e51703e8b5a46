"""The values some settings allow, importing nothing: the config check
(``vaelab.validation``) reads them before torch or Lightning is imported, so that a refused
command ends in about a second (``vaelab.cli``); the modules that act on them import them
from here.
"""

from __future__ import annotations

from typing import Any

#: ``malloc`` (top-level config key): ``tuned`` keeps freed memory in the process for reuse
#: (glibc on Linux; ``vaelab.build.keep_freed_memory``), ``system`` leaves the C library's defaults
MALLOC_CHOICES = ("tuned", "system")

#: ``nan_policy``: a non-finite loss stops the run, or its step is skipped (``vaelab.guards``)
NAN_POLICIES = ("stop", "skip")

#: ``prior.flow`` of ``prior=flow`` (``vaelab.priors.Flow``): zuko's masked autoregressive
#: flow or its neural spline flow
FLOW_PRIORS = ("maf", "nsf")

#: ``prior.squash`` of ``prior=vamp`` (``vaelab.priors.VampPrior``): what maps the learned
#: pseudo-inputs into the data's range
VAMP_SQUASHES = ("hardtanh", "sigmoid", "none")

#: ``prior.components`` of ``prior=vamp``: the mixture's components are q(z|u_k) itself, or,
#: for a flow posterior (z = g(z0)), its base distribution q0(z|u_k)
VAMP_COMPONENTS = ("posterior", "base")

#: the data settings that say where and how the data are read, not which data: free on resume
#: (``vaelab.runs.FREE_ON_RESUME``) and the only ones eval.py takes (the test split is the run's)
DATA_READ_KEYS = ("root", "download", "num_workers", "pin_memory", "on_device", "eval_batch_size")

#: the ELBO's terms, logged in validation as ``val/<term>`` and in testing as ``test/<term>``
#: (``vaelab.module``); the names a checkpoint callback may monitor (``val/elbo``)
TERMS = ("elbo", "recon", "kl")

#: ``encoder.activation`` / ``decoder.activation`` of the networks in ``vaelab.networks``
ACTIVATIONS = ("relu", "elu", "gelu", "silu", "tanh", "leaky_relu", "softplus")

#: ``trainer.precision``: what Lightning 2's ``Trainer(precision=...)`` accepts
#: (``lightning.fabric.connector``'s lists; a test compares them). A value not here is looked up
#: in the installed Lightning's own lists, which decide (``vaelab.validation``)
PRECISIONS = ("transformer-engine", "transformer-engine-float16", "16-true", "16-mixed", "bf16-true",
              "bf16-mixed", "32-true", "64-true", "64", "32", "16", "bf16", 64, 32, 16)

#: of those, the ones that run the whole model in half precision (Transformer Engine's too: its
#: weights in bf16 or float16, on NVIDIA's library): refused before the run. The
#: data would be half precision too (bf16 holds 8 bits of a value: not the 256 levels of an
#: 8-bit image, which a discretized likelihood reads back), and so would the densities, which
#: vaelab computes in at least float32 (``vaelab.precision``). The mixed precisions run the
#: networks in half precision and the densities in float32; 64-true runs everything in float64.
WHOLE_MODEL_PRECISIONS = ("16-true", "bf16-true", "transformer-engine", "transformer-engine-float16")

#: eval.py's evaluation settings that, left null (eval.yaml), are the evaluated run's own
RUN_OWN_EVALUATION = ("test_num_samples", "chunk_size")

#: Lightning's older names of its precisions, and what it runs for each
LEGACY_PRECISIONS = {"64": "64-true", "32": "32-true", "16": "16-mixed", "bf16": "bf16-mixed"}


def is_cuda_graph_choice(value: Any) -> bool:
    """``model.cuda_graph``: false (eager), true (graphs, and an error where they cannot
    work), auto (graphs where they work: one CUDA device, no torch.compile). Not 0 or 1,
    which compare equal to False and True."""
    return value is True or value is False or value == "auto"


#: module prefixes whose classes and functions a config may name in ``_target_``
ALLOWED_TARGET_PREFIXES: tuple[str, ...] = (
    "vaelab.",
    "torch.optim.",
    "torch.nn.",
    "torch.distributions.",
    "lightning.pytorch.callbacks.",
    "lightning.pytorch.loggers.",
    "lightning.pytorch.Trainer",
    "lightning.pytorch.trainer.",
    "lightning.pytorch.strategies.",
    "lightning.pytorch.plugins.",
)


def under_prefix(name: str, prefix: str) -> bool:
    """Whether the dotted ``name`` is under ``prefix``: ``mylab.`` (a module's contents) or
    ``mylab`` (the same: a module name, not the text's start, so not ``mylab_evil.pwn``)."""
    return name.startswith(prefix) if prefix.endswith(".") else f"{name}.".startswith(f"{prefix}.")


#: the learning-rate schedulers that step on a validation number (``optim.scheduler``), not on
#: the clock: vaelab hands them the checkpoint callback's monitor and mode (``vaelab.module``)
PLATEAU_SCHEDULERS = ("torch.optim.lr_scheduler.ReduceLROnPlateau",)


def checkpoint_monitor(config: Any) -> tuple[str, str]:
    """What "better" means in a run: its checkpoint callback's ``monitor`` and ``mode``
    (val/elbo, max; val/iwae under ``experiment=iwae_mnist``), which also pick the best
    checkpoint; val/elbo and max where the config has no checkpoint callback."""
    callbacks = config.get("callbacks") if hasattr(config, "get") else None
    entry = callbacks.get("model_checkpoint") if hasattr(callbacks, "get") else None
    entry = entry if hasattr(entry, "get") else {}
    return str(entry.get("monitor") or "val/elbo"), str(entry.get("mode") or "max")
