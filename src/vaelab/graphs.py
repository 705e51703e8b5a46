"""The training step's forward and backward as two CUDA graphs (``model.cuda_graph``).

On a GPU a small VAE's training step is a few hundred small kernels, each launched by Python
one at a time: the host, not the device, sets the pace (README: Speed). ``StepGraph`` records
the step's forward (the objective: the loss and the batch sums of the logged terms) and its
backward (the gradient of every parameter) as two CUDA graphs, once, on a real batch, and
replays them for every later batch of the same shape: two launches where there were hundreds.

Everything else stays eager and exactly as without graphs: the optimizer step (fused Adam),
Lightning's gradient clipping and accumulation, the fp16 gradient scaler, the NaN guard (it
reads the graph's outputs before backward), logging, validation and test. The reparameterized
samples are fresh at every replay (PyTorch registers its CUDA generator with each graph).

What the recorded function must be (vaelab's objectives, posteriors, priors and likelihoods
are): device work only, no host reads (``.item()``, ``float(tensor)``, ``if tensor:``), no
Python decision that depends on tensor values, the same shapes every call. A plugin that breaks
this makes the capture fail; ``model.cuda_graph=auto`` then warns and trains eagerly.

Gradients leave the backward graph as one copy (``torch.cat``) of its static buffers, split
into views, one per parameter: autograd adopts a returned gradient as ``param.grad`` when that
is unset, and a static buffer adopted so would be overwritten by the next backward (gradient
accumulation would then count the second micro-batch twice and the first not at all).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch.autograd.function import once_differentiable

StepFunction = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


def graph_key(x: torch.Tensor) -> tuple[Any, ...]:
    """What a batch must share with the one a graph was recorded on to replay it: shape,
    dtype, device and the autocast state (mixed precision changes the kernels)."""
    kind = x.device.type
    autocast = torch.is_autocast_enabled(kind)
    return (tuple(x.shape), x.dtype, x.device, autocast, torch.get_autocast_dtype(kind) if autocast else None)


class _CUDARecorder:
    """Records work once as a CUDA graph (on ``stream``, into the shared memory ``pool``)."""

    def __init__(self, stream: Any, pool: Any):
        self.stream, self.pool = stream, pool
        self.graph = torch.cuda.CUDAGraph()

    def record(self, work: Callable[[], Any]) -> Any:
        with torch.cuda.graph(self.graph, pool=self.pool, stream=self.stream, capture_error_mode="thread_local"):
            return work()

    def replay(self) -> None:
        self.graph.replay()


class _EagerRecorder:
    """Stands in for a CUDA graph where there is none (the CPU tests of the code around
    the graphs): ``replay`` runs the work again and writes its results into the tensors the
    recording returned, as a graph's replay does."""

    def __init__(self) -> None:
        self.work: Callable[[], Any] | None = None
        self.outputs: Sequence[torch.Tensor | None] = ()

    def record(self, work: Callable[[], Any]) -> Any:
        self.work = work
        self.outputs = work()
        return self.outputs

    def replay(self) -> None:
        assert self.work is not None
        with torch.enable_grad():
            for static, new in zip(self.outputs, self.work(), strict=True):
                if static is not None:
                    static.detach().copy_(new.detach())


class StepGraph:
    """``fn(x) -> (loss, sums)`` and the gradients of ``loss`` by ``params``, recorded on
    ``sample_x``; ``step(x)`` replays them (``x`` of the same ``graph_key``) and returns
    ``(loss, sums)`` with ``loss`` differentiable by ``params``.

    The returned tensors are the graph's own output buffers (as with
    ``torch.cuda.make_graphed_callables``): read them before the next step, or copy them.
    ``emulate=True`` records nothing (``_EagerRecorder``): for tests on machines without CUDA.
    """

    def __init__(self, fn: StepFunction, params: Sequence[torch.nn.Parameter], sample_x: torch.Tensor,
                 *, warmup: int = 3, emulate: bool = False):
        self.fn = fn
        self.params = tuple(p for p in params if p.requires_grad)
        self.key = graph_key(sample_x)
        self.static_x = sample_x.detach().clone()
        self._live: tuple[torch.Tensor, torch.Tensor] | None = None
        if emulate:
            fwd, bwd = _EagerRecorder(), _EagerRecorder()
        else:
            # as torch.cuda.make_graphed_callables: warm up on the side stream the graphs are
            # recorded on (cuBLAS workspaces, cuDNN's choices, lazy initialization stay out of
            # the graphs), then record forward and backward into one memory pool
            stream = torch.cuda.Stream(device=sample_x.device)
            stream.wait_stream(torch.cuda.current_stream(sample_x.device))
            with torch.cuda.stream(stream):
                for _ in range(warmup):
                    loss, _ = fn(self.static_x)
                    torch.autograd.grad(loss, self.params, allow_unused=True)
                    del loss
            torch.cuda.synchronize(sample_x.device)
            pool = torch.cuda.graph_pool_handle()
            fwd, bwd = _CUDARecorder(stream, pool), _CUDARecorder(stream, pool)
        self.fwd, self.bwd = fwd, bwd
        self.loss, self.sums = fwd.record(self._forward)
        self.grad_loss = torch.ones_like(self.loss)
        self.grads: tuple[torch.Tensor | None, ...] = tuple(bwd.record(self._backward))
        # the recorded autograd graph is not needed again: a replay runs the recorded kernels
        self._live = None
        self.loss, self.sums = self.loss.detach(), self.sums.detach()
        self.replays = 0
        if not emulate:
            torch.cuda.synchronize(sample_x.device)

    def _forward(self) -> tuple[torch.Tensor, torch.Tensor]:
        self._live = self.fn(self.static_x)
        return self._live

    def _backward(self) -> tuple[torch.Tensor | None, ...]:
        assert self._live is not None
        return torch.autograd.grad(self._live[0], self.params, self.grad_loss, allow_unused=True)

    def matches(self, x: torch.Tensor) -> bool:
        return graph_key(x) == self.key

    def __call__(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self.replays += 1
        return _Replay.apply(self, x, *self.params)

    def gradients(self) -> tuple[torch.Tensor | None, ...]:
        """The last backward's gradients, copied out of the graph's buffers in one operation."""
        present = [g for g in self.grads if g is not None]
        if not present:
            return self.grads
        if all(g.dtype == present[0].dtype for g in present):
            flat = torch.cat([g.reshape(-1) for g in present])
            pieces = iter(flat.split([g.numel() for g in present]))
            return tuple(None if g is None else next(pieces).view_as(g) for g in self.grads)
        return tuple(None if g is None else g.clone() for g in self.grads)

    # a recorded graph is a property of this process's device memory: copies of a module
    # (deepcopy, pickling) carry no graph and record their own
    def __reduce__(self) -> Any:
        return (type(None), ())


class _Replay(torch.autograd.Function):
    """One replay of the forward graph; its backward replays the backward graph."""

    @staticmethod
    def forward(ctx: Any, step: StepGraph, x: torch.Tensor, *params: torch.Tensor) -> Any:
        ctx.step = step
        if x.data_ptr() != step.static_x.data_ptr():
            step.static_x.copy_(x)
        step.fwd.replay()
        sums = step.sums.detach()
        ctx.mark_non_differentiable(sums)
        return step.loss.detach(), sums

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad_loss: torch.Tensor, _grad_sums: Any) -> Any:
        step: StepGraph = ctx.step
        step.grad_loss.copy_(grad_loss)
        step.bwd.replay()
        return (None, None, *step.gradients())
