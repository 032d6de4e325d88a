"""The RIM time loop as one autograd function with a hand-written backward pass.

Autograd records every small operator of every step (about 40 forward and 75 backward per step
for the Atari core) and forms each in-loop weight's gradient step by step, ``h_t^T g_t`` on ``B``
rows added to a running sum. :class:`HandwrittenUnroll` runs the forward loop without recording
(keeping what the backward pass needs), then the backward loop by hand: the same derivatives,
written once for the whole unroll, and each weight's gradient formed at the end as one product
over all ``T*B`` rows. Its forward step is :meth:`rim_agents.rim.RIMCell.step`'s, composed from
the same pieces (:mod:`rim_agents.rim_step`, which also return the intermediates kept here), for
the common case: one input vector per step with one attention head, the top-k (hard or
straight-through) or all RIMs active, no dormancy leak, on the CPU, and nothing recorded
(activity, balance loss, sampled choices); :func:`supported` says when. Dropout draws what
``F.dropout`` draws, from the same generator in the same order. ``tests/test_rim.py`` checks
outputs, states and every gradient against autograd's.

With ``rims.compile`` the per-step forward and backward functions (:func:`forward_step`,
:func:`backward_step`, plain tensor functions) are compiled with ``torch.compile``, which fuses
their element-wise work; the loop, the state and the weight gradients stay as here.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import torch as th
from torch.autograd.function import once_differentiable

from rim_agents.rim_step import (
    CommParts,
    GRUParts,
    LSTMParts,
    communication,
    dropout,
    gru_cell,
    lstm_cell,
    soft_mask,
    top_k_mask,
    vector_attention,
)


class StepSpec(NamedTuple):
    """What a step needs besides tensors (constants of a compiled step)."""

    cell: str  # "lstm" or "gru"
    k: int  # active RIMs per step (k == K: every RIM)
    comm_heads: int
    comm_key: int
    comm_value: int
    input_dropout: float  # in force: 0 outside training
    comm_dropout: float
    straight_through: bool  # selection="straight_through"
    st_temperature: float
    st_state_gradient: bool

    @classmethod
    def of(cls, cell: Any) -> StepSpec:
        """The spec of a :class:`rim_agents.rim.RIMCell` as it stands (its k and training mode)."""
        return cls(
            cell.cell_type, cell.k_now, cell.comm_heads, cell.comm_key_size, cell.comm_value_size,
            cell.input_dropout if cell.training else 0.0, cell.comm_dropout if cell.training else 0.0,
            cell.selection == "straight_through", cell.selection_temperature, cell.st_state_gradient,
        )  # fmt: skip


class LoopWeights(NamedTuple):
    """The weights the time loop multiplies by; None where the cell has no such part."""

    weight_hh: th.Tensor
    bias_hh: th.Tensor | None  # the GRU's (the LSTM's is in the prepared bias)
    comm_qkv: th.Tensor | None
    comm_out: th.Tensor | None
    comm_out_bias: th.Tensor | None
    comm_gate_weight: th.Tensor | None
    comm_gate_bias: th.Tensor | None

    @classmethod
    def of(cls, cell: Any) -> LoopWeights:
        comm, gate = cell.communication, cell.communication and cell.comm_gate
        return cls(
            cell.weight_hh, cell.bias_hh if cell.cell_type == "gru" else None,
            cell.comm_qkv if comm else None, cell.comm_out if comm else None, cell.comm_out_bias if comm else None,
            cell.comm_gate_weight if gate else None, cell.comm_gate_bias if gate else None,
        )  # fmt: skip


class StepSaved(NamedTuple):
    """What :func:`forward_step` keeps for :func:`backward_step` (None where a part is absent)."""

    h: th.Tensor  # the previous state, after any reset
    c: th.Tensor | None  # LSTM
    p: th.Tensor  # attention on the input (K, B, 1)
    input_noise: th.Tensor | None  # dropout's scaled mask on p
    p_dropped: th.Tensor
    m: th.Tensor | None  # (K, B, 1) active RIMs; None when all are
    h_tent: th.Tensor  # after the masked write, before communication
    cell: LSTMParts | GRUParts
    comm: CommParts | None  # None without communication
    # straight-through surrogate
    soft: th.Tensor | None = None
    diff_h: th.Tensor | None = None
    diff_c: th.Tensor | None = None


def supported(cell: Any, tokens: bool, x: th.Tensor, track: bool, balance: bool, request: Any) -> bool:
    """Whether an unroll of ``cell`` can run as :class:`HandwrittenUnroll` (see the module)."""
    noise_off = not cell.training or cell.selection_noise == 0
    return (
        cell.handwritten_backward
        and th.is_grad_enabled()
        and not x.is_cuda
        and not th.compiler.is_compiling()
        and not tokens
        and cell.input_attention
        and cell.input_heads == 1
        and cell.selection in ("hard", "sampled", "straight_through")
        and request is None
        and not track
        and not balance
        and cell.leak_now == 0
        and not cell.mask_output
        and noise_off
    )


def in_graph(t: th.Tensor) -> bool:
    """Whether the autograd graph of ``t`` holds a :class:`HandwrittenUnroll`: which backward pass
    trains it."""
    seen, stack = set(), [t.grad_fn]
    while stack:
        fn = stack.pop()
        if fn is None or fn in seen:
            continue
        seen.add(fn)
        if type(fn).__name__ == "HandwrittenUnrollBackward":
            return True
        stack.extend(f for f, _ in fn.next_functions)
    return False


def _sigmoid_grad(y: th.Tensor, grad: th.Tensor) -> th.Tensor:
    """``grad * y * (1 - y)`` for ``y = sigmoid(x)``, in one kernel (autograd's own)."""
    return th.ops.aten.sigmoid_backward(grad, y)


def _tanh_grad(y: th.Tensor, grad: th.Tensor) -> th.Tensor:
    """``grad * (1 - y^2)`` for ``y = tanh(x)``, in one kernel (autograd's own)."""
    return th.ops.aten.tanh_backward(grad, y)


def forward_step(
    spec: StepSpec,
    h: th.Tensor,
    c: th.Tensor,
    score_proj: th.Tensor,
    score_bias: th.Tensor | None,
    gate_proj: th.Tensor,
    bias: th.Tensor,
    w: LoopWeights,
) -> tuple[th.Tensor, th.Tensor, StepSaved]:
    """One step as :meth:`rim_agents.rim.RIMCell.step` composes it, from the same pieces
    (:mod:`rim_agents.rim_step`): the new ``h``, ``c`` ``(K, B, d_h)`` and what
    :func:`backward_step` needs."""
    K = h.shape[0]
    lstm = spec.cell == "lstm"
    # Input attention (RIMCell._attend_vector).
    p = vector_attention(h, score_proj, score_bias)  # (K, B, 1)
    p_dropped, input_noise = dropout(p, spec.input_dropout)
    gates_in = th.addcmul(bias, p_dropped, gate_proj)
    # The cells (RIMCell._cell).
    cell: LSTMParts | GRUParts
    if lstm:
        h_new, c_new, cell = lstm_cell(gates_in, h, c, w.weight_hh)
    else:
        assert w.bias_hh is not None
        h_new, cell = gru_cell(gates_in, h, w.weight_hh, w.bias_hh)
        c_new = c
    # Top-k (RIMCell._top_k_mask) and the masked write.
    m = soft = diff_h = diff_c = None
    if spec.k < K:
        null = 1.0 - p.squeeze(-1)
        m = top_k_mask(null, spec.k).unsqueeze(-1)
        h_tent = th.where(m, h_new, h)
        c_out = th.where(m, c_new, c) if lstm else c_new
        if spec.straight_through:
            # RIMCell._straight_through: the surrogate adds exactly zero forward; its backward
            # pass is backward_step's.
            soft = soft_mask(null, spec.k, spec.st_temperature).unsqueeze(-1)
            diff_h, diff_c = h_new - h, c_new - c if lstm else None
    else:
        h_tent, c_out = h_new, c_new
    # Communication (RIMCell._comm_update).
    h_out, comm = h_tent, None
    if w.comm_qkv is not None:
        assert w.comm_out is not None and w.comm_out_bias is not None
        update, comm = communication(
            h_tent, w.comm_qkv, w.comm_out, w.comm_out_bias, w.comm_gate_weight, w.comm_gate_bias,
            spec.comm_heads, spec.comm_key, spec.comm_value, spec.comm_dropout,
        )  # fmt: skip
        h_out = h_tent + (update * m if m is not None else update)
    saved = StepSaved(h, c if lstm else None, p, input_noise, p_dropped, m, h_tent, cell, comm, soft, diff_h, diff_c)
    return h_out, c_out, saved


def backward_step(
    spec: StepSpec, dh: th.Tensor, dc: th.Tensor | None, s: StepSaved, score_proj: th.Tensor, gate_proj: th.Tensor,
    w: LoopWeights,
) -> tuple[th.Tensor | None, ...]:  # fmt: skip
    """The gradients of one step from those of its ``h_out`` (``dh``) and ``c_out`` (``dc``, LSTM):
    ``(dh_prev, dc_prev, d_score (the score's, (K, B, 1)), d_gates_in (K, B, G), d_gh, d_qkv,
    d_out, d_gate_pre)``, the last four the gradients of the products with the in-loop weights
    (None where a product is absent). ``score_proj`` and ``gate_proj``'s gradients are
    ``d_score * h`` and ``d_gates_in * p`` (``p`` after dropout)."""
    lstm = spec.cell == "lstm"
    Hc, dk, dv = spec.comm_heads, spec.comm_key, spec.comm_value
    m = s.m
    K, B, _ = s.h.shape
    d_qkv = d_out = d_gate_pre = None
    # h_out = h_tent + update (* m)
    d_h_tent = dh
    comm = s.comm
    if comm is not None:
        assert w.comm_qkv is not None and w.comm_out is not None
        d_update = dh * m if m is not None else dh
        if comm.gate is not None:
            assert w.comm_gate_weight is not None
            d_gate_pre = _sigmoid_grad(comm.gate, d_update * comm.tanh_out)
            d_out = _tanh_grad(comm.tanh_out, d_update * comm.gate)
            d_out = th.baddbmm(d_out, d_gate_pre, w.comm_gate_weight.transpose(1, 2))
        else:
            d_out = _tanh_grad(comm.tanh_out, d_update)
        d_att = th.bmm(d_out, w.comm_out.transpose(1, 2)).view(K, 1, B, Hc, dv)
        d_probs = (d_att * comm.v).sum(dim=-1)  # (K, K, B, Hc)
        if comm.noise is not None:
            d_probs = d_probs * comm.noise
        d_v = (comm.probs_dropped.unsqueeze(-1) * d_att).sum(dim=0)  # (K, B, Hc, dv)
        # softmax's backward (autograd's own kernel): probs * (d_probs - sum(d_probs * probs)).
        d_scores = th.ops.aten._softmax_backward_data(d_probs, comm.probs, 1, comm.probs.dtype) * (dk**-0.5)
        d_q = (d_scores.unsqueeze(-1) * comm.k).sum(dim=1)  # (K, B, Hc, dk)
        d_k = (d_scores.unsqueeze(-1) * comm.q).sum(dim=0)
        d_qkv = th.cat([d_q.reshape(K, B, -1), d_k.reshape(K, B, -1), d_v.reshape(K, B, -1)], dim=-1)
        d_h_tent = th.baddbmm(dh, d_qkv, w.comm_qkv.transpose(1, 2))
    # The masked write: dormant RIMs pass their gradient to the previous state.
    dh_prev = dc_prev = None
    d_h_new, dc_new = d_h_tent, dc
    if m is not None:  # the dormant rows' gradient: what the mask leaves out (exactly)
        d_h_new = d_h_tent * m
        dh_prev = d_h_tent - d_h_new
        if lstm:
            assert dc is not None
            dc_new = dc * m
            dc_prev = dc - dc_new
    if lstm:
        assert isinstance(s.cell, LSTMParts) and s.c is not None and dc_new is not None
        i, f, o, g, tanh_c = s.cell
        dc_new = th.addcmul(dc_new, _tanh_grad(tanh_c, d_h_new), o)
        d_gh = d_gates_in = th.cat(
            [
                _sigmoid_grad(i, dc_new * g),
                _sigmoid_grad(f, dc_new * s.c),
                _sigmoid_grad(o, d_h_new * tanh_c),
                _tanh_grad(g, dc_new * i),
            ],
            dim=-1,
        )
        dc_cell = dc_new * f
        dc_prev = dc_cell if dc_prev is None else dc_prev + dc_cell
    else:
        assert isinstance(s.cell, GRUParts)
        r, z, n, gh_n = s.cell
        dh_cell = d_h_new * z  # h_new = n + z (h - n)
        d_n_pre = _tanh_grad(n, d_h_new - dh_cell)
        d_r = _sigmoid_grad(r, d_n_pre * gh_n)
        d_z = _sigmoid_grad(z, d_h_new * (s.h - n))
        d_gates_in = th.cat([d_r, d_z, d_n_pre], dim=-1)
        d_gh = th.cat([d_r, d_z, d_n_pre * r], dim=-1)
        dh_prev = dh_cell if dh_prev is None else dh_prev + dh_cell
    w_t = w.weight_hh.transpose(1, 2)
    dh_prev = th.bmm(d_gh, w_t) if dh_prev is None else th.baddbmm(dh_prev, d_gh, w_t)
    # Input attention: gates_in = bias + p * gate_proj, p = sigmoid(h . score_proj (+ bias)).
    d_p = (d_gates_in * gate_proj).sum(dim=-1, keepdim=True)
    d_score = d_score_h = _sigmoid_grad(s.p, d_p if s.input_noise is None else d_p * s.input_noise)
    if s.soft is not None:
        # The straight-through surrogate g = soft - sg(soft), soft = sigmoid((thr - null) / T),
        # null = 1 - p, added as g * (h_new - h) (and g * (c_new - c)): the gradient of the choice.
        assert s.diff_h is not None
        d_soft = (dh * s.diff_h).sum(dim=-1, keepdim=True)
        if s.diff_c is not None:
            assert dc is not None
            d_soft = d_soft + (dc * s.diff_c).sum(dim=-1, keepdim=True)
        d_score = d_score + _sigmoid_grad(s.p, _sigmoid_grad(s.soft, d_soft) / spec.st_temperature)
        if spec.st_state_gradient:  # else read from the detached state: no gradient into h
            d_score_h = d_score
    dh_prev = th.addcmul(dh_prev, d_score_h, score_proj)
    return dh_prev, dc_prev, d_score, d_gates_in, d_gh, d_qkv, d_out, d_gate_pre


#: ``torch.compile``d step functions, per mode.
_COMPILED: dict[str, tuple[Callable[..., Any], Callable[..., Any]]] = {}


def step_functions(mode: str) -> tuple[Callable[..., Any], Callable[..., Any]]:
    """:func:`forward_step` and :func:`backward_step`, compiled unless ``mode`` is ``"off"``."""
    if mode == "off":
        return forward_step, backward_step
    if mode not in _COMPILED:
        _COMPILED[mode] = (
            th.compile(forward_step, mode=mode, dynamic=False),
            th.compile(backward_step, mode=mode, dynamic=False),
        )
    return _COMPILED[mode]


class HandwrittenUnroll(th.autograd.Function):
    """``(outs (T, K, B, d_h), h_T, c_T)`` of the RIM loop over prepared one-head vector input.

    Inputs: ``spec`` (:class:`StepSpec`); ``compile_mode`` (``rims.compile``); ``resets`` (per step,
    whether the state is multiplied by ``keep`` first); ``keep`` ``(T, 1, B, 1)`` (ones where no
    episode starts) or None; the prepared terms ``score_proj`` ``(T, K, B, d_h)``, ``score_bias``
    ``(T, K, B, 1)`` or None, ``gate_proj`` ``(T, K, B, G)``, ``bias`` ``(K, B, G)``; the state
    ``h0``, ``c0`` ``(K, B, d_h)``; the weights ``weight_hh``, ``bias_hh`` (GRU; None for the LSTM,
    whose hidden bias is in ``bias``), ``comm_qkv``, ``comm_out``, ``comm_out_bias`` (None without
    communication), ``comm_gate_weight``, ``comm_gate_bias`` (None without the gate).
    """

    @staticmethod
    def forward(
        ctx: Any,
        spec: StepSpec,
        compile_mode: str,
        resets: tuple[bool, ...],
        keep: th.Tensor | None,
        score_proj: th.Tensor,
        score_bias: th.Tensor | None,
        gate_proj: th.Tensor,
        bias: th.Tensor,
        h0: th.Tensor,
        c0: th.Tensor,
        *weights: th.Tensor | None,
    ) -> tuple[th.Tensor, th.Tensor, th.Tensor]:
        step, _ = step_functions(compile_mode)
        w = LoopWeights(*weights)  # type: ignore[arg-type]  # weight_hh is always given
        lstm = spec.cell == "lstm"
        h, c = h0, c0
        steps: list[StepSaved] = []
        outs = []
        for t in range(score_proj.shape[0]):
            if resets[t]:
                assert keep is not None
                h = h * keep[t]
                if lstm:
                    c = c * keep[t]
            sb = score_bias[t] if score_bias is not None else None
            h, c, saved = step(spec, h, c, score_proj[t], sb, gate_proj[t], bias, w)
            steps.append(saved)
            outs.append(h)
        ctx.spec, ctx.compile_mode, ctx.resets, ctx.steps = spec, compile_mode, resets, steps
        ctx.has_score_bias = score_bias is not None
        ctx.save_for_backward(keep, score_proj, gate_proj, *weights)
        return th.stack(outs), h, c if lstm else th.zeros_like(h)

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, d_outs: th.Tensor, d_h_last: th.Tensor, d_c_last: th.Tensor) -> tuple[th.Tensor | None, ...]:
        spec: StepSpec = ctx.spec
        _, step = step_functions(ctx.compile_mode)
        keep, score_proj, gate_proj, *weights = ctx.saved_tensors
        w = LoopWeights(*weights)
        lstm = spec.cell == "lstm"
        T = score_proj.shape[0]
        d_score_proj = th.empty_like(score_proj)
        d_score_bias = th.empty_like(score_proj[..., :1]) if ctx.has_score_bias else None
        d_gate_proj = th.empty_like(gate_proj)
        d_bias = th.zeros_like(gate_proj[0])
        # Per in-loop product (recurrent, qkv, output, gate): its inputs and output gradients over
        # the steps, for one weight-gradient product at the end.
        products: list[tuple[list[th.Tensor], list[th.Tensor]]] = [([], []) for _ in range(4)]
        dh = d_h_last
        dc = d_c_last if lstm else None
        for t in range(T - 1, -1, -1):
            s: StepSaved = ctx.steps[t]
            dh_prev, dc_prev, d_score_t, d_gates_in, *d_products = step(
                spec, dh + d_outs[t], dc, s, score_proj[t], gate_proj[t], w
            )
            comm_in = (s.comm.att, s.comm.out) if s.comm is not None else (None, None)
            for (inputs, grads), x, g in zip(products, (s.h, s.h_tent, *comm_in), d_products, strict=True):
                if g is not None:
                    assert x is not None
                    inputs.append(x)
                    grads.append(g)
            d_bias += d_gates_in
            th.mul(d_gates_in, s.p_dropped, out=d_gate_proj[t])
            th.mul(d_score_t, s.h, out=d_score_proj[t])
            if d_score_bias is not None:
                d_score_bias[t] = d_score_t
            if ctx.resets[t]:
                dh_prev = dh_prev * keep[t]
                if lstm:
                    dc_prev = dc_prev * keep[t]
            dh, dc = dh_prev, dc_prev
        weight_grads: list[th.Tensor | None] = []
        bias_grads: list[th.Tensor | None] = []
        for (inputs, grads), b in zip(products, (w.bias_hh, None, w.comm_out_bias, w.comm_gate_bias), strict=True):
            if not inputs:
                weight_grads.append(None)
                bias_grads.append(None)
                continue
            g = th.cat(grads, dim=1)  # (K, T*B, out)
            weight_grads.append(th.bmm(th.cat(inputs, dim=1).transpose(1, 2), g))
            bias_grads.append(g.sum(dim=1, keepdim=True) if b is not None else None)
        return (
            None,  # spec
            None,  # compile_mode
            None,  # resets
            None,  # keep
            d_score_proj,
            d_score_bias,
            d_gate_proj,
            d_bias,
            dh,
            dc if lstm else None,
            weight_grads[0],
            bias_grads[0],
            weight_grads[1],
            weight_grads[2],
            bias_grads[2],
            weight_grads[3],
            bias_grads[3],
        )
