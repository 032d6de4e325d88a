"""Whole-unroll CUDA graphs for the RIM core (``rims.cuda_graphs=true``).

On a GPU the eager RIM core is bound by launching its kernels (about 37 forward and 74 backward
per step, each a few microseconds of GPU work behind tens of microseconds of host dispatch), not
by arithmetic. This captures the whole time loop of one input shape, forward and backward, as
CUDA graphs (``torch.cuda.make_graphed_callables``; a plain graph when gradients are off) and
replays them: one launch per unroll instead of one per kernel. The numbers are those of the eager
loop: the same kernels run on the same data.

A graph is kept per (shapes, dtype, device, grad mode, which inputs need gradients, train/eval
mode, number of active RIMs); the first call of each records it (three warm-up runs, then the
capture). PPO's fixed-length training chunks and its rollout step give two shapes per run.

The graph's buffers are reused by every replay, so a graphed training unroll must be
back-propagated before the same shape runs again with gradients: until the gradient reaches its
outputs, another call of that shape runs eagerly (correct, only slower). A trainer that drops an
unroll without its backward (PPO's ``target_kl`` stop) calls :meth:`UnrollGraphs.release` once
that unroll can no longer be back-propagated (``RIMPPO`` does after every update). Outputs are copies, so
the caller may keep them. Activity tracking and the balance loss (Python-side bookkeeping per
step) always run eagerly, and so does anything not on a CUDA device.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch as th
from torch import nn

Unroll = Callable[[th.Tensor, th.Tensor, th.Tensor, th.Tensor], tuple[th.Tensor, th.Tensor, th.Tensor]]

WARMUP = 3  # make_graphed_callables's default


class _UnrollModule(nn.Module):
    """The time loop as a module of the cell's parameters, as ``make_graphed_callables`` takes it."""

    def __init__(self, cell: nn.Module, unroll: Unroll) -> None:
        super().__init__()
        self.cell = cell
        self.unroll = unroll

    def forward(self, x: th.Tensor, h0: th.Tensor, c0: th.Tensor, starts: th.Tensor) -> Any:
        return self.unroll(x, h0, c0, starts)


class _Graphed:
    """One recorded unroll: its replay and, for a training unroll, whether its backward is due."""

    def __init__(self, fn: Callable[..., Any], with_grad: bool) -> None:
        self.fn = fn
        self.with_grad = with_grad
        self.pending = False

    def _done(self, grad: th.Tensor) -> th.Tensor:
        self.pending = False
        return grad


class UnrollGraphs:
    """The recorded unrolls of one cell, keyed by everything a recording depends on.

    :param cell: the :class:`~rim_agents.rim.RIMCell` (its parameters, ``training`` and ``k_now``).
    :param unroll: ``(x, h0, c0, starts) -> (out, h, c)``, the eager time loop.
    """

    def __init__(self, cell: Any, unroll: Unroll) -> None:
        self.cell = cell
        self.unroll = unroll
        self.graphs: dict[tuple, _Graphed] = {}

    def __call__(self, x: th.Tensor, h0: th.Tensor, c0: th.Tensor, starts: th.Tensor) -> tuple[th.Tensor, ...] | None:
        """The unroll's ``(out, h, c)`` from a graph; None when this call must run eagerly."""
        args = (x, h0, c0, starts)
        grad = th.is_grad_enabled()
        needs = tuple(grad and t.requires_grad for t in args)
        key = (
            tuple(tuple(t.shape) for t in args), x.dtype, x.device, grad, needs, self.cell.training,
            self.cell.k_now,
        )  # fmt: skip
        graphed = self.graphs.get(key)
        if graphed is None:
            graphed = self._record(args, grad, needs)
            self.graphs[key] = graphed
        if not graphed.with_grad:
            return graphed.fn(*args)
        if graphed.pending:
            return None
        out, h, c = graphed.fn(*args)
        graphed.pending = True
        for t in (out, h, c):
            if t.requires_grad:
                t.register_hook(graphed._done)
        return out.clone(), h.clone(), c.clone()

    def release(self) -> None:
        """Declare every earlier training unroll finished (back-propagated or dropped)."""
        for graphed in self.graphs.values():
            graphed.pending = False

    def _record(self, args: tuple[th.Tensor, ...], grad: bool, needs: tuple[bool, ...]) -> _Graphed:
        if grad:
            module = _UnrollModule(self.cell, self.unroll).train(self.cell.training)
            sample = tuple(t.detach().clone().requires_grad_(n) for t, n in zip(args, needs, strict=True))
            graphed_module = th.cuda.make_graphed_callables(module, sample, allow_unused_input=True)
            return _Graphed(graphed_module, with_grad=True)
        static_in = [t.detach().clone() for t in args]
        stream = th.cuda.Stream(device=args[0].device)
        stream.wait_stream(th.cuda.current_stream(args[0].device))
        with th.cuda.stream(stream):
            for _ in range(WARMUP):
                self.unroll(*static_in)
        th.cuda.current_stream(args[0].device).wait_stream(stream)
        graph = th.cuda.CUDAGraph()
        with th.cuda.graph(graph):
            static_out = self.unroll(*static_in)

        def replay(*inputs: th.Tensor) -> tuple[th.Tensor, ...]:
            for buffer, t in zip(static_in, inputs, strict=True):
                buffer.copy_(t)
            graph.replay()
            return tuple(o.clone() for o in static_out)

        return _Graphed(replay, with_grad=False)
