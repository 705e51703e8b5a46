"""The dtype densities are computed in.

Under mixed precision (``bf16-mixed``, ``16-mixed``) the networks run in half precision and
hand half-precision parameters to the distributions; log-densities, KLs and the bounds built
from them are computed in float32 instead, where a sum over 784 pixels or a log-sum-exp over K
importance samples keeps its digits. Under ``64-true`` everything stays in float64.
"""

from __future__ import annotations

import torch

_HALF = (torch.float16, torch.bfloat16)


def upcast(t: torch.Tensor) -> torch.Tensor:
    """``t`` in float32 if it is in half precision, else as it is (float32, float64, integers)."""
    return t.float() if t.dtype in _HALF else t
