"""The RIM time loop as one autograd function with a hand-written backward pass.

Autograd records every small operator of every step (about 40 forward and 75 backward per step
for the Atari core) and forms each in-loop weight's gradient step by step, ``h_t^T g_t`` on ``B``
rows added to a running sum. :class:`HandwrittenUnroll` runs the forward loop without recording
(keeping what the backward pass needs), then the backward loop by hand: the same derivatives,
written once for the whole unroll, and each weight's gradient formed at the end as one product
over all ``T*B`` rows. It computes what :meth:`rim_agents.rim.RIMCell.step` computes (the same
operators in the same order, forward) for the common case: one input vector per step with one
attention head, the top-k (hard or straight-through) or all RIMs active, no dormancy leak, on the CPU, and nothing
recorded (activity, balance loss, sampled choices); :func:`supported` says when. Dropout draws
what ``F.dropout`` draws, from the same generator in the same order. ``tests/test_rim.py`` checks
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


def _sigmoid_grad(y: th.Tensor, grad: th.Tensor) -> th.Tensor:
    """``grad * y * (1 - y)`` for ``y = sigmoid(x)``, in one kernel (autograd's own)."""
    return th.ops.aten.sigmoid_backward(grad, y)


def _tanh_grad(y: th.Tensor, grad: th.Tensor) -> th.Tensor:
    """``grad * (1 - y^2)`` for ``y = tanh(x)``, in one kernel (autograd's own)."""
    return th.ops.aten.tanh_backward(grad, y)


Saved = tuple[th.Tensor | None, ...]
# Where forward_step keeps what backward_step and the unroll's weight gradients read.
H, P_DROPPED, H_TENT, ATT, OUT = 0, 4, 6, 18, 19


def _dropout(x: th.Tensor, rate: float) -> tuple[th.Tensor, th.Tensor | None]:
    """``F.dropout(x, rate, training=True)`` on the CPU (the same draw from the same generator) and
    its scaled mask (None for ``rate`` 0)."""
    if rate == 0:
        return x, None
    noise = th.empty_like(x).bernoulli_(1 - rate).div_(1 - rate)
    return x * noise, noise


def forward_step(
    spec: StepSpec,
    h: th.Tensor,
    c: th.Tensor,
    score_proj: th.Tensor,
    score_bias: th.Tensor | None,
    gate_proj: th.Tensor,
    bias: th.Tensor,
    weight_hh: th.Tensor,
    bias_hh: th.Tensor | None,
    comm_qkv: th.Tensor | None,
    comm_out: th.Tensor | None,
    comm_out_bias: th.Tensor | None,
    comm_gate_weight: th.Tensor | None,
    comm_gate_bias: th.Tensor | None,
) -> tuple[th.Tensor, th.Tensor, Saved]:
    """One step, the operators of :meth:`rim_agents.rim.RIMCell.step` in its order: the new
    ``h``, ``c`` ``(K, B, d_h)`` and what :func:`backward_step` needs."""
    K, B, d = h.shape
    lstm = spec.cell == "lstm"
    Hc, dk, dv = spec.comm_heads, spec.comm_key, spec.comm_value
    # Input attention (RIMCell._vector_probs, _attend_vector).
    score = (h * score_proj).sum(dim=-1, keepdim=True)
    if score_bias is not None:
        score = score + score_bias
    p = th.sigmoid(score)  # (K, B, 1)
    p_dropped, input_noise = _dropout(p, spec.input_dropout)
    gates_in = th.addcmul(bias, p_dropped, gate_proj)
    # The cells (RIMCell._cell).
    if lstm:
        gates = th.baddbmm(gates_in, h, weight_hh)
        i, f, o = th.sigmoid(gates[..., : 3 * d]).chunk(3, dim=-1)
        g = th.tanh(gates[..., 3 * d :])
        c_new = th.addcmul(f * c, i, g)
        tanh_c = th.tanh(c_new)
        h_new = o * tanh_c
        cell_saved: Saved = (i, f, o, g, tanh_c)
    else:
        assert bias_hh is not None
        gh = th.baddbmm(bias_hh, h, weight_hh)
        r, z = th.sigmoid(gates_in[..., : 2 * d] + gh[..., : 2 * d]).chunk(2, dim=-1)
        gh_n = gh[..., 2 * d :]
        n = th.tanh(th.addcmul(gates_in[..., 2 * d :], r, gh_n))
        h_new = th.lerp(n, h, z)
        c_new = c
        cell_saved = (r, z, n, gh_n, None)
    # Top-k (RIMCell._top_k_mask) and the masked write.
    m = None
    if spec.k < K:
        idx = th.topk(1.0 - p.squeeze(-1), spec.k, dim=0, largest=False).indices
        m = th.zeros(K, B, dtype=th.bool, device=h.device).scatter_(0, idx, True).unsqueeze(-1)
        h_tent = th.where(m, h_new, h)
        c_out = th.where(m, c_new, c) if lstm else c_new
    else:
        h_tent, c_out = h_new, c_new
    st_saved: Saved = (None, None, None)
    if spec.straight_through and m is not None:
        # RIMCell._straight_through: the surrogate adds exactly zero forward; its backward pass is
        # backward_step's.
        null = 1.0 - p.squeeze(-1)
        least = th.topk(null, spec.k + 1, dim=0, largest=False).values
        soft = th.sigmoid((0.5 * (least[-2] + least[-1]) - null) / spec.st_temperature)
        st_saved = (soft.unsqueeze(-1), h_new - h, c_new - c if lstm else None)
    # Communication (RIMCell._comm_update).
    comm_saved: Saved = (None,) * 10
    h_out = h_tent
    if comm_qkv is not None:
        assert comm_out is not None and comm_out_bias is not None
        q, k_, v = th.bmm(h_tent, comm_qkv).split([Hc * dk, Hc * dk, Hc * dv], dim=-1)
        q, k_, v = q.view(K, 1, B, Hc, dk), k_.view(1, K, B, Hc, dk), v.view(1, K, B, Hc, dv)
        scores = (q * k_).sum(dim=-1) * (dk**-0.5)  # (K_query, K_key, B, Hc)
        probs = th.softmax(scores, dim=1)
        probs_dropped, comm_noise = _dropout(probs, spec.comm_dropout)
        att = (probs_dropped.unsqueeze(-1) * v).sum(dim=1).view(K, B, Hc * dv)
        out = th.baddbmm(comm_out_bias, att, comm_out)
        update = tanh_out = th.tanh(out)
        gate = None
        if comm_gate_weight is not None:
            assert comm_gate_bias is not None
            gate = th.sigmoid(th.baddbmm(comm_gate_bias, out, comm_gate_weight))
            update = update * gate
        h_out = h_tent + (update * m if m is not None else update)
        comm_saved = (q, k_, v, probs, probs_dropped, comm_noise, att, out, tanh_out, gate)
    saved = (h, c if lstm else None, p, input_noise, p_dropped, m, h_tent, *cell_saved, *comm_saved, *st_saved)
    return h_out, c_out, saved


def backward_step(
    spec: StepSpec,
    dh: th.Tensor,
    dc: th.Tensor | None,
    saved: Saved,
    score_proj: th.Tensor,
    gate_proj: th.Tensor,
    weight_hh: th.Tensor,
    comm_qkv: th.Tensor | None,
    comm_out: th.Tensor | None,
    comm_gate_weight: th.Tensor | None,
) -> tuple[th.Tensor | None, ...]:
    """The gradients of one step from those of its ``h_out`` (``dh``) and ``c_out`` (``dc``, LSTM):
    ``(dh_prev, dc_prev, d_score (the score's, (K, B, 1)), d_gates_in (K, B, G), d_gh, d_qkv,
    d_out, d_gate_pre)``, the last four the gradients of the products with the in-loop weights
    (None where a product is absent). ``score_proj`` and ``gate_proj``'s gradients are
    ``d_score * h`` and ``d_gates_in * p`` (``p`` after dropout)."""
    lstm = spec.cell == "lstm"
    Hc, dk, dv = spec.comm_heads, spec.comm_key, spec.comm_value
    h, c, p, input_noise, _, m, h_tent, *rest = saved
    assert h is not None and p is not None and h_tent is not None
    K, B, _ = h.shape
    d_qkv = d_out = d_gate_pre = None
    # h_out = h_tent + update (* m)
    d_h_tent = dh
    if comm_qkv is not None:
        assert comm_out is not None
        q, k_, v, probs, probs_dropped, comm_noise, _, _, tanh_out, gate = rest[5:15]  # _: see HandwrittenUnroll
        assert q is not None and k_ is not None and v is not None and probs is not None and tanh_out is not None
        assert probs_dropped is not None
        d_update = dh * m if m is not None else dh
        if gate is not None:
            assert comm_gate_weight is not None
            d_gate_pre = _sigmoid_grad(gate, d_update * tanh_out)
            d_out = _tanh_grad(tanh_out, d_update * gate)
            d_out = th.baddbmm(d_out, d_gate_pre, comm_gate_weight.transpose(1, 2))
        else:
            d_out = _tanh_grad(tanh_out, d_update)
        d_att = th.bmm(d_out, comm_out.transpose(1, 2)).view(K, 1, B, Hc, dv)
        d_probs = (d_att * v).sum(dim=-1)  # (K, K, B, Hc)
        if comm_noise is not None:
            d_probs = d_probs * comm_noise
        d_v = (probs_dropped.unsqueeze(-1) * d_att).sum(dim=0)  # (K, B, Hc, dv)
        d_scores = probs * (d_probs - (d_probs * probs).sum(dim=1, keepdim=True)) * (dk**-0.5)
        d_q = (d_scores.unsqueeze(-1) * k_).sum(dim=1)  # (K, B, Hc, dk)
        d_k = (d_scores.unsqueeze(-1) * q).sum(dim=0)
        d_qkv = th.cat([d_q.reshape(K, B, -1), d_k.reshape(K, B, -1), d_v.reshape(K, B, -1)], dim=-1)
        d_h_tent = th.baddbmm(dh, d_qkv, comm_qkv.transpose(1, 2))
    # The masked write: dormant RIMs pass their gradient to the previous state.
    dh_prev = dc_prev = None
    d_h_new, dc_new = d_h_tent, dc
    if m is not None:
        d_h_new, dh_prev = d_h_tent * m, d_h_tent * ~m
        if lstm:
            assert dc is not None
            dc_new, dc_prev = dc * m, dc * ~m
    if lstm:
        i, f, o, g, tanh_c = rest[:5]
        assert i is not None and f is not None and o is not None and g is not None and tanh_c is not None
        assert c is not None and dc_new is not None
        dc_new = th.addcmul(dc_new, _tanh_grad(tanh_c, d_h_new), o)
        d_gh = d_gates_in = th.cat(
            [
                _sigmoid_grad(i, dc_new * g),
                _sigmoid_grad(f, dc_new * c),
                _sigmoid_grad(o, d_h_new * tanh_c),
                _tanh_grad(g, dc_new * i),
            ],
            dim=-1,
        )
        dc_cell = dc_new * f
        dc_prev = dc_cell if dc_prev is None else dc_prev + dc_cell
    else:
        r, z, n, gh_n = rest[:4]
        assert r is not None and z is not None and n is not None and gh_n is not None
        d_n_pre = _tanh_grad(n, d_h_new * (1.0 - z))
        d_r = _sigmoid_grad(r, d_n_pre * gh_n)
        d_z = _sigmoid_grad(z, d_h_new * (h - n))
        d_gates_in = th.cat([d_r, d_z, d_n_pre], dim=-1)
        d_gh = th.cat([d_r, d_z, d_n_pre * r], dim=-1)
        dh_cell = d_h_new * z
        dh_prev = dh_cell if dh_prev is None else dh_prev + dh_cell
    w_t = weight_hh.transpose(1, 2)
    dh_prev = th.bmm(d_gh, w_t) if dh_prev is None else th.baddbmm(dh_prev, d_gh, w_t)
    # Input attention: gates_in = bias + p * gate_proj, p = sigmoid(h . score_proj (+ bias)).
    d_p = (d_gates_in * gate_proj).sum(dim=-1, keepdim=True)
    d_score = d_score_h = _sigmoid_grad(p, d_p if input_noise is None else d_p * input_noise)
    soft, diff_h, diff_c = rest[15:18]
    if soft is not None:
        # The straight-through surrogate g = soft - sg(soft), soft = sigmoid((thr - null) / T),
        # null = 1 - p, added as g * (h_new - h) (and g * (c_new - c)): the gradient of the choice.
        assert diff_h is not None
        d_soft = (dh * diff_h).sum(dim=-1, keepdim=True)
        if diff_c is not None:
            assert dc is not None
            d_soft = d_soft + (dc * diff_c).sum(dim=-1, keepdim=True)
        d_score_st = _sigmoid_grad(p, _sigmoid_grad(soft, d_soft) / spec.st_temperature)
        d_score = d_score + d_score_st
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
        lstm = spec.cell == "lstm"
        h, c = h0, c0
        steps: list[Saved] = []
        outs = []
        for t in range(score_proj.shape[0]):
            if resets[t]:
                assert keep is not None
                h = h * keep[t]
                if lstm:
                    c = c * keep[t]
            sb = score_bias[t] if score_bias is not None else None
            h, c, saved = step(spec, h, c, score_proj[t], sb, gate_proj[t], bias, *weights)
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
        weight_hh, bias_hh, comm_qkv, comm_out, comm_out_bias, comm_gate_weight, comm_gate_bias = weights
        lstm = spec.cell == "lstm"
        T = score_proj.shape[0]
        d_score_proj = th.empty_like(score_proj)
        d_score = th.empty_like(score_proj[..., :1])
        d_gate_proj = th.empty_like(gate_proj)
        d_bias = th.zeros_like(gate_proj[0])
        # Per in-loop weight: the inputs and output gradients of its products, one product at the end.
        products: list[tuple[list[th.Tensor], list[th.Tensor]]] = [([], []) for _ in range(4)]
        dh = d_h_last
        dc = d_c_last if lstm else None
        for t in range(T - 1, -1, -1):
            saved = ctx.steps[t]
            h, p, h_tent, att, out = saved[H], saved[P_DROPPED], saved[H_TENT], saved[ATT], saved[OUT]
            dh_prev, dc_prev, d_score_t, d_gates_in, d_gh, d_qkv, d_out, d_gate_pre = step(
                spec, dh + d_outs[t], dc, saved, score_proj[t], gate_proj[t], weight_hh, comm_qkv, comm_out,
                comm_gate_weight,
            )  # fmt: skip
            for (inputs, grads), x, g in zip(
                products, (h, h_tent, att, out), (d_gh, d_qkv, d_out, d_gate_pre), strict=True
            ):
                if g is not None:
                    inputs.append(x)
                    grads.append(g)
            d_bias += d_gates_in
            th.mul(d_gates_in, p, out=d_gate_proj[t])
            th.mul(d_score_t, h, out=d_score_proj[t])
            d_score[t] = d_score_t
            if ctx.resets[t]:
                dh_prev = dh_prev * keep[t]
                if lstm:
                    dc_prev = dc_prev * keep[t]
            dh, dc = dh_prev, dc_prev
        weight_grads = [
            th.bmm(th.cat(inputs, dim=1).transpose(1, 2), th.cat(grads, dim=1)) if inputs else None
            for inputs, grads in products
        ]
        bias_grads = [
            th.cat(grads, dim=1).sum(dim=1, keepdim=True) if grads and b is not None else None
            for (_, grads), b in zip(products, (bias_hh, None, comm_out_bias, comm_gate_bias), strict=True)
        ]
        return (
            None,  # spec
            None,  # compile_mode
            None,  # resets
            None,  # keep
            d_score_proj,
            d_score if ctx.has_score_bias else None,
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
