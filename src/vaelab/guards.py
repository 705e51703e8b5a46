"""The NaN/Inf guard of a training step.

``nan_policy`` (top-level config key):

* ``stop`` (default): the first step whose loss or ELBO terms are NaN or Inf stops the run
  before the optimizer applies it, with ``NonFiniteLossError`` naming the step, the term
  (``recon``, ``kl``, ... or the data batch itself) and the last good checkpoint. Nothing of
  the bad step is written: checkpoints on disk stay the last good ones.
* ``skip``: the step is skipped (``training_step`` returns ``None``: no backward, no optimizer
  step) and counted in ``train/skipped_steps``; after ``max_skipped_steps`` skips (null: no
  limit) the run stops as with ``stop``, so a diverged run does not spin all night.

Cost: one scalar device→host read per step (``float(...)``, tested by ``math.isfinite``) of
values already computed, about 30 µs on a CPU. It is the training step's only per-step sync (the
epoch means skip torchmetrics' per-update NaN scan, and step values are read on logging
steps only), and only a per-step decision can keep a NaN update out of the weights (``skip``
needs the decision before backward anyway). The diagnosis (which term, whether the data are
finite) runs only after a failure.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from vaelab.errors import ExplainedError, epoch_label
from vaelab.options import NAN_POLICIES  # the config check reads it too


class NonFiniteLossError(FloatingPointError, ExplainedError):
    """A training step produced a NaN or Inf loss (``nan_policy=stop``)."""


class NonFiniteValidationError(NonFiniteLossError):
    """A validation pass gave a NaN or Inf ``val/elbo``: the model diverged (any ``nan_policy``)."""


#: what to change when a run's numbers stop being finite
FIXES = ("a lower optim.optimizer.lr, trainer.gradient_clip_val=1.0, a larger likelihood.min_sigma / min_scale "
         "or posterior.min_scale, objective.warmup>0")


def _last_good_checkpoint(module: Any) -> str:
    trainer = getattr(module, "_trainer", None)
    ckpt_cb = getattr(trainer, "checkpoint_callback", None) if trainer is not None else None
    last = getattr(ckpt_cb, "last_model_path", "") or getattr(ckpt_cb, "best_model_path", "") or ""
    return (f"The last good checkpoint is {last}; nothing from this step on was saved."
            if last else "No checkpoint had been written yet.")


def _describe(name: str, value: torch.Tensor) -> str | None:
    value = value.detach()
    if bool(torch.isfinite(value).all()):
        return None
    kinds = [k for k, bad in (("NaN", torch.isnan(value).any()), ("Inf", torch.isinf(value).any())) if bool(bad)]
    if value.dim() == 0 or value.numel() == 1:
        return f"{name} is {'/'.join(kinds)}"
    # examples along the first dimension (a data batch's values are counted by example, not by pixel)
    bad = (~torch.isfinite(value)).reshape(value.shape[0], -1).any(dim=1)
    values = f" ({int((~torch.isfinite(value)).sum())} values)" if value.dim() > 1 else ""
    return f"{name} is {'/'.join(kinds)} for {int(bad.sum())} of {value.shape[0]} examples{values}"


class NaNGuard:
    """Per-step check of a training step's loss and terms; see the module docstring."""

    def __init__(self, policy: str = "stop", max_skipped_steps: int | None = 100):
        if policy not in NAN_POLICIES:
            raise ValueError(f"nan_policy={policy!r} is not an option: choose one of {NAN_POLICIES}")
        if max_skipped_steps is not None and (not isinstance(max_skipped_steps, int) or max_skipped_steps < 0):
            raise ValueError(f"max_skipped_steps must be null or an integer >= 0, got {max_skipped_steps!r}")
        self.policy = policy
        self.max_skipped_steps = max_skipped_steps
        self.skipped = 0
        self.warned_guessing = False  # (check_against_guessing warns once a run)

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> NaNGuard:
        return cls(config.get("nan_policy", "stop") or "stop", config.get("max_skipped_steps", 100))

    def bad_step(self, module: Any, x: torch.Tensor, out: Any, term_sums: torch.Tensor | None = None,
                 sums_include_loss: bool = False) -> bool:
        """True if this step must be skipped; raises ``NonFiniteLossError`` if it must stop.

        ``term_sums``: the batch sums of the terms, where the caller has them (a sum is finite
        exactly when every value in it is, short of float overflow); else the terms are read.
        ``sums_include_loss``: one of ``term_sums`` is the loss's (``VAEModule._term_sums``
        with the loss), which then needs no reading of its own."""
        if term_sums is not None:
            # one number, finite exactly when the loss and every sum are (short of a float
            # overflow, at ~3e38 nats), read as a Python float and tested on the host: one or
            # three operations and the read (torch.isfinite on one number is four more kernels on a GPU)
            total = term_sums.sum() if sums_include_loss else term_sums.sum() + out.loss.detach()
        else:
            values = [out.loss.detach().reshape(-1).float()] + [t.detach().reshape(-1).float() for t in out.terms.values()]
            total = torch.where(torch.isfinite(torch.cat(values)).all(), 0.0, float("nan"))
        trainer = getattr(module, "_trainer", None)
        processes = int(getattr(trainer, "world_size", 1) or 1)
        others: list[int] = []
        if processes > 1:
            # under DDP every process decides alike, from every process's number: a NaN on one process alone (its data shard, its noise) stopped
            # that one while the others went on into the gradients' all-reduce, which failed with
            # a gloo/NCCL "connection closed" that summary.json then recorded instead of the NaN.
            # A NaN or infinity carries through a sum: one all-reduce of one number a batch, and
            # which process had it is gathered only when one did (all of them are there then)
            finite = math.isfinite(float(_sum_over_processes(trainer, total)))
            if not finite:
                each = trainer.strategy.all_gather(total.reshape(1)).reshape(-1).tolist()
                others = [rank for rank, v in enumerate(each) if not math.isfinite(v) and rank != trainer.global_rank]
        else:
            finite = math.isfinite(float(total))
        if finite:
            return False  # (VAEModule logs train/skipped_steps with the other step values)
        problems = [p for p in (_describe(f"train/{k}", v) for k, v in out.terms.items()) if p]
        if not problems and not math.isfinite(float(total)):  # (this process's own loss)
            problems = [_describe("train/loss", out.loss) or "train/loss is not finite"]
        data = _describe("the data batch x", x)
        if data:
            problems.insert(0, data + " (your data set or its transform produces non-finite values)")
        if others:
            problems.append(f"the loss is not finite on process{'es' if len(others) > 1 else ''} "
                            f"{', '.join(map(str, others))} of {processes} (its own message names its term)")
        where = f"step {module.global_step} ({_epoch(module)})"
        if self.policy == "skip":
            self.skipped += 1
            if self.max_skipped_steps is None or self.skipped <= self.max_skipped_steps:
                module.print(f"vaelab: skipped {where}: {'; '.join(problems)} "
                             f"({self.skipped} skipped so far, nan_policy=skip)")
                return True
        kept = _last_good_checkpoint(module)
        why = (f"{self.skipped} steps skipped, more than max_skipped_steps={self.max_skipped_steps}"
               if self.policy == "skip" else "nan_policy=stop")
        skipping = ("a larger max_skipped_steps (or null: never stop) to skip more of them"
                    if self.policy == "skip" else "nan_policy=skip to skip such steps and count them "
                    "(train/skipped_steps)")
        if processes > 1 and self.policy == "stop":
            skipping = ""  # (nan_policy=skip cannot run under DDP: vaelab.jobs refuses it)
        raise NonFiniteLossError(
            f"non-finite training loss at {where}: {'; '.join(problems)}. Stopped ({why}). {kept} "
            f"Fixes: {FIXES}" + (f"; or {skipping}." if skipping else ".")
        )

    def check_validation(self, module: Any, elbo: float) -> None:
        """Stop the run if a validation pass's ``val/elbo`` (the mean over the whole split,
        reduced across processes: the same verdict on every rank) is not finite, whatever
        ``nan_policy`` says: the model itself gives non-finite bounds, which no skipped step
        mends (e.g. one finite step at a huge learning rate, then only skipped ones). Called at
        the validation epoch's end, before that epoch's checkpoints are saved."""
        if math.isfinite(elbo):
            return
        where = f"step {module.global_step} ({_epoch(module)})"
        skipped = (f"; {self.skipped} training steps were skipped so far (nan_policy=skip)"
                   if self.policy == "skip" and self.skipped else "")
        raise NonFiniteValidationError(
            f"val/elbo is {elbo} at {where}: the model's bound on the validation data is not finite, so the "
            f"model has diverged{skipped}. Stopped before this epoch's checkpoints were saved. "
            f"{_last_good_checkpoint(module)} Fixes: {FIXES}."
        )

    def check_against_guessing(self, module: Any, recon: float, uniform: float | None) -> None:
        """Warn, once a command, where a validation's ``val/recon`` (E_q[log p(x|z)], nats per
        example) is below twice the log-likelihood of a model that gives every pixel the uniform
        distribution over its values (``uniform``; None where the likelihood is a density): the
        model has diverged though its numbers are finite (a learning rate of 200 on the digits:
        val/recon -812 and val/kl 6e6 nats after 3 epochs, where guessing scores -44), and
        training on would not mend it. At initialization a decoder is close to that model; twice
        as far is no early epoch. The reconstruction term, not the ELBO: with β < 1 (or during a
        KL warm-up) a model that trains well may have a large KL, and so a low ELBO."""
        if uniform is None or self.warned_guessing or not math.isfinite(recon) or recon >= 2 * uniform:
            return
        self.warned_guessing = True
        from lightning.pytorch.utilities import rank_zero_warn

        rank_zero_warn(
            f"vaelab: val/recon is {recon:.6g} nats per example at step {module.global_step} ({_epoch(module)}), "
            f"more than twice as low as a model that gives every pixel the uniform distribution over its values "
            f"scores ({uniform:.4g}): the model has diverged, though its numbers are finite. Fixes: {FIXES}."
        )


def _sum_over_processes(trainer: Any, value: torch.Tensor) -> torch.Tensor:
    """``value`` summed over the processes: ``torch.distributed.all_reduce`` itself (Lightning's
    ``strategy.reduce`` adds a barrier before it), else the strategy's reduce."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        value = value.detach().reshape(1).clone()
        torch.distributed.all_reduce(value)
        return value
    return trainer.strategy.reduce(value, reduce_op="sum")


def _epoch(module: Any) -> str:
    trainer = getattr(module, "_trainer", None)
    return epoch_label(module.current_epoch, trainer.max_epochs if trainer is not None else None)
