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

#: of those, the ones that run the whole model in one dtype other than float32 ("64" is
#: "64-true"): vaelab's densities and KLs take float32 (in a mixed precision the networks run
#: in half precision and the densities in float32), so these stop at the first step with a
#: dtype mismatch; refused before the run instead
WHOLE_MODEL_PRECISIONS = ("16-true", "bf16-true", "64-true", "64", 64)


def is_cuda_graph_choice(value: Any) -> bool:
    """``model.cuda_graph``: false (eager), true (graphs, and an error where they cannot
    work), auto (graphs where they work: one CUDA device, no torch.compile). Not 0 or 1,
    which compare equal to False and True."""
    return value is True or value is False or value == "auto"
