"""Unit conversions for reported numbers.

Every log-likelihood vaelab reports is in nats per example (summed over the dimensions of one
example). bits/dim divides by D · ln 2. For a continuous likelihood on quantized data scaled into
[0, 1], a density value converts to a probability of the discrete value by the bin width Δ
per dimension: −log P(k) ≈ −log p(x) − D · log Δ. With uniform dequantization
(``data.dequantize=true``) this is a bound (Theis et al. 2016) and comparable with the tables
of the papers; without it the conversion is an approximation (the run's summary records
``data.dequantize`` and ``data.bin_width`` beside the numbers). Binarized data (x ∈ {0, 1})
have Δ = 1.
"""

from __future__ import annotations

import math

import torch
from torchmetrics import Metric

from vaelab.attributes import PlainAttributes


def bits_per_dim(nll: torch.Tensor | float, num_dims: int, discrete: bool, bin_width: float) -> torch.Tensor | float:
    """bits/dim from a negative log-likelihood in nats per example.

    ``discrete``: the likelihood gives probabilities of the data values (Bernoulli on binary
    data), so no bin width enters. Otherwise the density is converted with ``bin_width``.
    """
    correction = 0.0 if discrete else -num_dims * math.log(bin_width)
    return (nll + correction) / (num_dims * math.log(2.0))


class SumMean(PlainAttributes, Metric):
    """The exact mean of a per-example quantity over all the examples seen (and over all
    processes under DDP): the running sum and count, reduced by summing.

    Updated with a batch's sum and its number of examples, so that one reduction of the
    stacked terms serves every term of a step (``VAEModule._step``) and the NaN guard too; a
    torchmetrics ``MeanMetric`` per term redoes the per-example work and costs about three
    times as much per update, on every training step.
    """

    full_state_update = False

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.add_state("total", default=torch.tensor(0.0), dist_reduce_fx="sum")
        self.add_state("count", default=torch.tensor(0.0), dist_reduce_fx="sum")

    #: set by torchmetrics' update wrapper on every update (three updates a training step)
    PLAIN_ATTRIBUTES = frozenset({"_computed", "_update_count"})

    def update(self, total: torch.Tensor, count: int) -> None:
        # in place: the same sums, without re-assigning the state attributes
        self.total.add_(total)
        self.count.add_(count)

    def compute(self) -> torch.Tensor:
        return self.total / self.count


class PendingSums:
    """The training terms' batch sums of the steps since the epoch means were last read, added
    up on the device in one ``[T]`` tensor: one in-place addition a step for all T terms,
    where a ``SumMean`` per term costs two additions and torchmetrics' update wrapper each
    (on a GPU six kernel launches and three wrapper calls become one launch). The
    ``PendingSumMean`` metrics it feeds fold it into their states before every ``compute()``,
    so what Lightning logs at an epoch's end, reduced across processes, is the same exact mean.
    The same running sums give the logged step values: ``interval()`` returns what was added
    since its previous call, so each logged point is the exact mean over every example of its
    logging interval, at no cost on the steps in between.
    """

    def __init__(self) -> None:
        self.metrics: list[SumMean] = []  # one per term, in the order of the sums
        self.sums: torch.Tensor | None = None
        self.count = 0
        # what ``interval()`` last returned up to, as (sums, count) relative to ``sums``: the
        # running sums at that read, or minus what was added after it once a flush has reset them
        self._mark: tuple[torch.Tensor | None, int] = (None, 0)

    def add(self, sums: torch.Tensor, count: int) -> None:
        """This step's sums ``[T]`` over ``count`` examples. The first after a flush is copied
        (once an epoch): a CUDA graph's output buffer, say, is overwritten by the next replay."""
        if self.sums is None:
            self.sums = sums.clone()
        else:
            self.sums.add_(sums)
        self.count += count

    def pending(self) -> int:
        """The number of examples added since ``interval()`` was last called."""
        return self.count - self._mark[1]

    def interval(self) -> tuple[torch.Tensor | None, int]:
        """The sums ``[T]`` and the number of examples added since the previous call (the
        first call: since the start), across flushes: the step values of a logging interval,
        ``sums / count`` its exact per-example means. No work on the steps in between: one
        subtraction and one copy per call. ``(None, 0)`` if nothing was added."""
        mark_sums, mark_count = self._mark
        current, count = self.sums, self.count - mark_count
        if current is None:
            sums = None if mark_sums is None else -mark_sums
        else:
            sums = current.clone() if mark_sums is None else current - mark_sums
        self._mark = (None if current is None else current.clone(), self.count)
        return (sums, count) if count else (None, 0)

    def flush(self) -> None:
        """Move what has been added since the last flush into the metrics' states."""
        if self.sums is None:
            return
        sums, count = self.sums, self.count
        self.sums, self.count = None, 0
        # the open interval keeps what it had: relative to the reset sums, its mark is minus that
        mark_sums, mark_count = self._mark
        carried = sums if mark_sums is None else sums - mark_sums
        self._mark = (-carried, mark_count - count)
        for metric, total in zip(self.metrics, sums.unbind(), strict=True):
            metric.update(total, count)


class PendingSumMean(SumMean):
    """A ``SumMean`` fed through a ``PendingSums``: ``compute()`` first folds the pending sums
    of every term into their metrics, then computes (and syncs across processes) as usual."""

    def __init__(self, pending: PendingSums, **kwargs):
        super().__init__(**kwargs)
        self.pending = pending
        pending.metrics.append(self)

    def _wrap_compute(self, compute):  # type: ignore[no-untyped-def]
        wrapped = super()._wrap_compute(compute)

        def fold_then_compute(*args, **kwargs):  # type: ignore[no-untyped-def]
            self.pending.flush()
            return wrapped(*args, **kwargs)

        return fold_then_compute
