"""The Trainer's profiler when none is asked for.

Lightning wraps every hook it calls (per callback, per step: some fifty a training step) in
``trainer.profiler.profile(name)``. Its default ``PassThroughProfiler`` inherits a
generator-based context manager that still creates and runs a generator each time (~1 µs).
``NoProfiler`` profiles nothing either, and returns one reusable null context instead.

``trainer.profiler=simple`` (or ``advanced``, ``pytorch``) still chooses a real profiler:
``vaelab.cli`` gives the Trainer ``NoProfiler`` only where the config names none.
"""

from __future__ import annotations

import contextlib
from typing import Any

from lightning.pytorch.profilers import PassThroughProfiler

_NULL = contextlib.nullcontext()


class NoProfiler(PassThroughProfiler):
    """``PassThroughProfiler`` whose ``profile()`` costs one method call."""

    def profile(self, action_name: str) -> Any:  # type: ignore[override]
        return _NULL


def default_profiler(trainer_cfg: Any) -> dict[str, Any]:
    """``{"profiler": NoProfiler()}`` for ``instantiate(cfg.trainer, **...)`` where the trainer
    config sets no profiler; else nothing, so the configured one is used."""
    return {} if trainer_cfg.get("profiler") else {"profiler": NoProfiler()}
