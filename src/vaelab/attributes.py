"""Attributes set on every training step, stored without ``nn.Module.__setattr__``'s checks.

``nn.Module.__setattr__`` tests every value against Parameter, Buffer and Module (metaclass
isinstance checks, ~0.9 µs) before it stores a plain value in the instance dict. Some
attributes are set dozens of times a step and are never any of those: Lightning's
``_current_fx_name`` around every hook call (``VAEModule``), torchmetrics' ``_computed`` and
``_update_count`` on every update (``SumMean``). For the names a class lists in
``PLAIN_ATTRIBUTES``, ``PlainAttributes`` stores the value in the instance dict directly, which
is where nn.Module would have put it (~0.1 µs); every other name takes the usual path.
"""

from __future__ import annotations

from typing import Any


class PlainAttributes:
    """Mixin, listed before the ``nn.Module`` base: ``PLAIN_ATTRIBUTES`` names attributes that
    only ever hold plain values (no Parameter, Buffer or Module) and are no parameter's,
    buffer's or submodule's name."""

    PLAIN_ATTRIBUTES: frozenset[str] = frozenset()

    def __setattr__(self, name: str, value: Any) -> None:
        if name in self.PLAIN_ATTRIBUTES:
            object.__setattr__(self, name, value)
        else:
            super().__setattr__(name, value)
