"""What Lightning's loop pays per hook call, cut where nothing is lost.

The profiler: Lightning wraps every hook it calls (per callback, per step: some fifty a
training step) in ``trainer.profiler.profile(name)``. Its default ``PassThroughProfiler``
inherits a generator-based context manager that still creates and runs a generator each time
(~1 µs). ``NoProfiler`` profiles nothing either, and returns one reusable null context instead.
``trainer.profiler=simple`` (or ``advanced``, ``pytorch``) still chooses a real profiler:
``vaelab.jobs`` gives the Trainer ``NoProfiler`` only where the config names none.

Empty hooks: Lightning calls each per-batch hook (``BATCH_HOOKS``) on every callback, whether
or not the callback's class overrides it; one that does not still costs the dispatch: the
attribute lookup, the hook's name formatted with the callback's ``state_key``
(``ModelCheckpoint`` builds it from a ``repr`` of its settings), the profiler context and the
call of an empty method. Lightning skips a callback attribute that is not callable
(``callable(fn)`` in ``lightning.pytorch.trainer.call._call_callback_hooks``) and never
inspects callbacks' hook signatures, so ``skip_empty_batch_hooks`` sets the hooks that a
callback inherits unchanged from ``Callback``, which do nothing, to ``None`` on that instance.
With ``train.py``'s seven callbacks: 6.3 µs a dispatch instead of 1.0 µs, six dispatches a
training step. Hooks a class overrides are left alone, with one exception whose inaction is
certain from the instance: ``ModelCheckpoint.on_train_batch_end`` on a checkpoint that saves
neither every N steps nor every T seconds. (Not on the LightningModule: Lightning inspects the
signatures of its evaluation batch hooks.)
"""

from __future__ import annotations

import contextlib
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.profilers import PassThroughProfiler

_NULL = contextlib.nullcontext()

#: the hooks Lightning calls once per batch on every callback
BATCH_HOOKS = (
    "on_train_batch_start",
    "on_train_batch_end",
    "on_before_backward",
    "on_after_backward",
    "on_before_optimizer_step",
    "on_before_zero_grad",
    "on_validation_batch_start",
    "on_validation_batch_end",
    "on_test_batch_start",
    "on_test_batch_end",
)


class NoProfiler(PassThroughProfiler):
    """``PassThroughProfiler`` whose ``profile()`` costs one method call."""

    def profile(self, action_name: str) -> Any:  # type: ignore[override]
        return _NULL


def default_profiler(trainer_cfg: Any) -> dict[str, Any]:
    """``{"profiler": NoProfiler()}`` for ``instantiate(cfg.trainer, **...)`` where the trainer
    config sets no profiler; else nothing, so the configured one is used."""
    return {} if trainer_cfg.get("profiler") else {"profiler": NoProfiler()}


def _idle(callback: pl.Callback, name: str) -> bool:
    """Whether ``callback``'s hook ``name`` does nothing, whatever the step: inherited
    unchanged from ``Callback`` (an empty method), or ``ModelCheckpoint``'s own
    ``on_train_batch_end`` on a checkpoint that saves neither every N training steps nor every
    T seconds (the best-``val/elbo`` one: that hook then only tests the trainer's state and
    returns, 2 µs a step, plus 1 µs of dispatch; small, and certain)."""
    method = getattr(type(callback), name, None)
    if method is getattr(pl.Callback, name):
        return True
    return (name == "on_train_batch_end" and method is ModelCheckpoint.on_train_batch_end
            and getattr(callback, "_every_n_train_steps", 1) < 1
            and getattr(callback, "_train_time_interval", 0) is None)


def skip_empty_batch_hooks(callbacks: list[pl.Callback]) -> dict[str, list[str]]:
    """Set each per-batch hook (``BATCH_HOOKS``) that does nothing on a callback (``_idle``:
    inherited unchanged from ``Callback``, or a checkpoint's per-step test on a checkpoint
    without a per-step trigger) to ``None`` on the instance, so Lightning's loop skips it
    instead of dispatching to it; see the module docstring. Returns the hooks skipped, by
    class name."""
    skipped: dict[str, list[str]] = {}
    for callback in callbacks:
        names = [name for name in BATCH_HOOKS if name not in vars(callback) and _idle(callback, name)]
        for name in names:
            setattr(callback, name, None)
        if names:
            skipped.setdefault(type(callback).__name__, []).extend(names)
    return skipped
