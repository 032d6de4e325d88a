"""Recurrent cores by name, and one way to unroll any of them across episode starts.

Every core follows ``nn.LSTM``'s calling convention, which is what sb3-contrib relies on:
attributes ``input_size``, ``hidden_size``, ``num_layers`` and
``out, (h, c) = core(x, (h0, c0))`` with time-first ``x``.

- ``rims``: :class:`rim_agents.rim.RIMCore`, which resets states inside its own time loop.
- ``lstm``: sb3-contrib's own ``nn.LSTM``, untouched (the baseline).
- ``gru``: ``nn.GRU`` behind :class:`GRUCore`, which returns a zero cell state.
- ``none``: :class:`FeedForwardCore`, the memoryless control: the features pass through unchanged
  and the (one-wide, always zero) state is carried untouched, so the policy is the same extractor
  and heads as the others with no memory at all.
"""

from __future__ import annotations

import itertools
from typing import Any

import torch as th
from torch import nn

from rim_agents.config import CORES, RIMConfig
from rim_agents.rim import RIMCore

__all__ = ["CORES", "FeedForwardCore", "GRUCore", "add_forget_bias", "build_core", "core_hidden_size", "unroll"]

State = tuple[th.Tensor, th.Tensor]


class GRUCore(nn.Module):
    """``nn.GRU`` with ``nn.LSTM``'s ``(h, c)`` state convention; ``c`` is always zero.

    :param input_size: input width.
    :param hidden_size: hidden width.
    :param num_layers: stacked layers.
    """

    def __init__(self, input_size: int, hidden_size: int, num_layers: int = 1, **kwargs: Any) -> None:
        super().__init__()
        self.gru = nn.GRU(input_size, hidden_size, num_layers=num_layers, **kwargs)
        self.input_size, self.hidden_size, self.num_layers = input_size, hidden_size, num_layers

    def forward(self, x: th.Tensor, state: State | None = None) -> tuple[th.Tensor, State]:
        h0 = None if state is None else state[0]
        out, h = self.gru(x, h0)
        return out, (h, th.zeros_like(h))


class FeedForwardCore(nn.Module):
    """No memory: ``out = x``; the state is carried unchanged.

    The state is one unit wide (``hidden_size == 1``) so that the rollout buffer stores almost
    nothing; the output keeps the input's width (``output_size``).

    :param input_size: input (and output) width.
    """

    num_layers = 1
    hidden_size = 1

    def __init__(self, input_size: int) -> None:
        super().__init__()
        self.input_size = self.output_size = input_size

    def forward(self, x: th.Tensor, state: State | None = None) -> tuple[th.Tensor, State]:
        if state is None:
            h = x.new_zeros(1, x.shape[1], 1)
            state = (h, h)
        return x, state


def core_hidden_size(core: str, lstm_hidden_size: int, core_kwargs: dict[str, Any]) -> int:
    """Width of the core's flat state (and output, except for ``none``, whose state is one wide)."""
    if core == "none":
        return FeedForwardCore.hidden_size
    if core == "rims":
        settings = RIMConfig(**core_kwargs)
        return settings.num_units * settings.unit_size
    return lstm_hidden_size


def build_core(
    core: str, input_size: int, lstm_hidden_size: int, n_layers: int, core_kwargs: dict[str, Any]
) -> nn.Module:
    """A recurrent core by name.

    :param core: ``"rims"``, ``"lstm"``, ``"gru"`` or ``"none"``.
    :param input_size: width of the input vector (or of each token for ``rims`` with tokens).
    :param lstm_hidden_size: hidden width of ``lstm`` and ``gru``.
    :param n_layers: layers of ``lstm`` and ``gru`` (``rims`` has one).
    :param core_kwargs: keyword arguments of the core's constructor.
    """
    if core == "rims":
        if n_layers != 1:
            raise ValueError(f"n_lstm_layers={n_layers} is not supported by the rims core: it has one layer")
        return RIMCore(input_size, **core_kwargs)
    if core == "lstm":
        return nn.LSTM(input_size, lstm_hidden_size, num_layers=n_layers, **core_kwargs)
    if core == "gru":
        return GRUCore(input_size, lstm_hidden_size, num_layers=n_layers, **core_kwargs)
    if core == "none":
        return FeedForwardCore(input_size)
    raise ValueError(f"unknown core {core!r}: choose one of {', '.join(CORES)}")


def add_forget_bias(core: nn.Module, value: float) -> None:
    """Add ``value`` to the bias of the gate that keeps each cell's state, in place, at
    initialisation: the LSTM's forget gate, the GRU's update gate ``z`` (``h' = (1 - z) n + z h``).

    PyTorch initialises these biases around 0, so a fresh cell keeps about half of its state per
    step and what it saw ten steps ago is scaled by about ``0.5 ** 10``: the gradient that would
    teach it to remember an early cue vanishes. A bias of 1 (Gers et al. 2000; Jozefowicz et al.
    2015) keeps ``sigmoid(1) = 0.73`` per step. The keep gate is the second block of every cell's
    gates here (``nn.LSTM`` i, f, g, o; ``nn.GRU`` and the RIM GRU cell r, z, n; the RIM LSTM cell
    i, f, o, g); only the input-side bias is changed (the two biases are summed). The feed-forward
    core has no gate and is left as it is.
    """
    if value == 0 or isinstance(core, FeedForwardCore):
        return
    if isinstance(core, RIMCore):
        d_h = core.cell.unit_size
        biases = [(core.cell.bias_ih, d_h)]  # (K, 1, G * d_h)
    else:
        rnn = core.gru if isinstance(core, GRUCore) else core
        if not isinstance(rnn, (nn.LSTM, nn.GRU)):
            raise TypeError(f"add_forget_bias does not know the gates of {type(core).__name__}")
        biases = [(getattr(rnn, f"bias_ih_l{layer}"), rnn.hidden_size) for layer in range(rnn.num_layers)]
    with th.no_grad():
        for bias, width in biases:
            bias[..., width : 2 * width] += value


def unroll(core: nn.Module, x: th.Tensor, state: State, episode_starts: th.Tensor) -> tuple[th.Tensor, State]:
    """Run ``core`` over ``x`` ``(T, B, ...)``, zeroing an element's state where its episode starts.

    :class:`RIMCore` handles ``episode_starts`` ``(T, B)`` inside its own loop. Other cores run one
    fused call per stretch of time without a reset (one call when no element resets after t=0),
    instead of sb3-contrib's call per step.
    """
    if isinstance(core, RIMCore):
        return core(x, state, episode_starts=episode_starts)
    if isinstance(core, FeedForwardCore):
        return x, state
    starts = episode_starts.bool()
    any_start = starts.any(dim=1)
    boundaries = [0, *(th.nonzero(any_start[1:]).flatten() + 1).tolist(), x.shape[0]]
    outs = []
    h, c = state
    for t0, t1 in itertools.pairwise(boundaries):
        keep = (~starts[t0]).to(h.dtype).view(1, -1, 1)
        out, (h, c) = core(x[t0:t1], (h * keep, c * keep))
        outs.append(out)
    return th.cat(outs) if len(outs) > 1 else outs[0], (h, c)
