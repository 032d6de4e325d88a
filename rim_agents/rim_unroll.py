"""The RIM time loop as one autograd function with a hand-written backward pass.

Autograd records every small operator of every step (about 40 forward and 75 backward per step
for the Atari core) and forms each in-loop weight's gradient step by step, ``h_t^T g_t`` on ``B``
rows added to a running sum. :class:`HandwrittenUnroll` runs the forward loop without recording
(keeping what the backward pass needs), then the backward loop by hand: the same derivatives,
written once for the whole unroll, and each weight's gradient formed at the end as one product
over all ``T*B`` rows. It computes what :meth:`rim_agents.rim.RIMCell.step` computes (the same
operators in the same order, forward) for the common case: one input vector per step with one
attention head, the hard top-k (or all RIMs active), no dropout in force, no dormancy leak, and
nothing recorded (activity, balance loss, sampled choices); :func:`supported` says when.
``tests/test_rim.py`` checks outputs, states and every gradient against autograd's.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch as th
from torch.autograd.function import once_differentiable


class UnrollSpec(NamedTuple):
    """What the loop needs besides tensors."""

    cell: str  # "lstm" or "gru"
    k: int  # active RIMs per step (k == K: every RIM)
    comm_heads: int
    comm_key: int
    comm_value: int
    resets: tuple[bool, ...]  # per step: whether the state is multiplied by ``keep`` first


def supported(cell: Any, tokens: bool, x: th.Tensor, track: bool, balance: bool, request: Any) -> bool:
    """Whether an unroll of ``cell`` can run as :class:`HandwrittenUnroll` (see the module)."""
    dropout_off = not cell.training or (cell.input_dropout == 0 and cell.comm_dropout == 0)
    noise_off = not cell.training or cell.selection_noise == 0
    return (
        cell.handwritten_backward
        and th.is_grad_enabled()
        and cell.compile_mode == "off"
        and not x.is_cuda
        and not th.compiler.is_compiling()
        and not tokens
        and cell.input_attention
        and cell.input_heads == 1
        and cell.selection in ("hard", "sampled")
        and request is None
        and not track
        and not balance
        and cell.leak_now == 0
        and not cell.mask_output
        and dropout_off
        and noise_off
    )


def _sigmoid_grad(y: th.Tensor, grad: th.Tensor) -> th.Tensor:
    return grad * y * (1.0 - y)


def _tanh_grad(y: th.Tensor, grad: th.Tensor) -> th.Tensor:
    return grad * (1.0 - y * y)


class HandwrittenUnroll(th.autograd.Function):
    """``(outs (T, K, B, d_h), h_T, c_T)`` of the RIM loop over prepared one-head vector input.

    Inputs: ``spec`` (:class:`UnrollSpec`); ``keep`` ``(T, 1, B, 1)`` (ones where no episode
    starts) or None; the prepared terms ``score_proj`` ``(T, K, B, d_h)``, ``score_bias``
    ``(T, K, B, 1)`` or None, ``gate_proj`` ``(T, K, B, G)``, ``bias`` ``(K, B, G)``; the state
    ``h0``, ``c0`` ``(K, B, d_h)``; the weights ``weight_hh``, ``bias_hh`` (GRU; None for the LSTM,
    whose hidden bias is in ``bias``), ``comm_qkv``, ``comm_out``, ``comm_out_bias`` (None without
    communication), ``comm_gate_weight``, ``comm_gate_bias`` (None without the gate).
    """

    @staticmethod
    def forward(
        ctx: Any,
        spec: UnrollSpec,
        keep: th.Tensor | None,
        score_proj: th.Tensor,
        score_bias: th.Tensor | None,
        gate_proj: th.Tensor,
        bias: th.Tensor,
        h0: th.Tensor,
        c0: th.Tensor,
        weight_hh: th.Tensor,
        bias_hh: th.Tensor | None,
        comm_qkv: th.Tensor | None,
        comm_out: th.Tensor | None,
        comm_out_bias: th.Tensor | None,
        comm_gate_weight: th.Tensor | None,
        comm_gate_bias: th.Tensor | None,
    ) -> tuple[th.Tensor, th.Tensor, th.Tensor]:
        K, B, d = h0.shape
        T = score_proj.shape[0]
        lstm = spec.cell == "lstm"
        Hc, dk, dv = spec.comm_heads, spec.comm_key, spec.comm_value
        scale = dk**-0.5
        h, c = h0, c0
        saved: list[tuple[th.Tensor | None, ...]] = []
        outs = []
        for t in range(T):
            if spec.resets[t]:
                assert keep is not None
                h = h * keep[t]
                if lstm:
                    c = c * keep[t]
            # Input attention (RIMCell._vector_probs, _attend_vector).
            score = (h * score_proj[t]).sum(dim=-1, keepdim=True)
            if score_bias is not None:
                score = score + score_bias[t]
            p = th.sigmoid(score)  # (K, B, 1)
            gates_in = th.addcmul(bias, p, gate_proj[t])
            # The cells (RIMCell._cell).
            if lstm:
                gates = th.baddbmm(gates_in, h, weight_hh)
                i, f, o = th.sigmoid(gates[..., : 3 * d]).chunk(3, dim=-1)
                g = th.tanh(gates[..., 3 * d :])
                c_new = th.addcmul(f * c, i, g)
                tanh_c = th.tanh(c_new)
                h_new = o * tanh_c
                cell_saved: tuple[th.Tensor, ...] = (i, f, o, g, tanh_c)
            else:
                assert bias_hh is not None
                gh = th.baddbmm(bias_hh, h, weight_hh)
                r, z = th.sigmoid(gates_in[..., : 2 * d] + gh[..., : 2 * d]).chunk(2, dim=-1)
                gh_n = gh[..., 2 * d :]
                n = th.tanh(th.addcmul(gates_in[..., 2 * d :], r, gh_n))
                h_new = th.lerp(n, h, z)
                c_new = c
                cell_saved = (r, z, n, gh_n)
            # Top-k (RIMCell._top_k_mask) and the masked write.
            m = None
            if spec.k < K:
                idx = th.topk(1.0 - p.squeeze(-1), spec.k, dim=0, largest=False).indices
                m = th.zeros(K, B, dtype=th.bool, device=h.device).scatter_(0, idx, True).unsqueeze(-1)
                h_tent = th.where(m, h_new, h)
                c_out = th.where(m, c_new, c) if lstm else c_new
            else:
                h_tent, c_out = h_new, c_new
            # Communication (RIMCell._comm_update).
            comm_saved: tuple[th.Tensor | None, ...] = ()
            h_out = h_tent
            if comm_qkv is not None:
                assert comm_out is not None and comm_out_bias is not None
                q, k_, v = th.bmm(h_tent, comm_qkv).split([Hc * dk, Hc * dk, Hc * dv], dim=-1)
                q, k_, v = q.view(K, 1, B, Hc, dk), k_.view(1, K, B, Hc, dk), v.view(1, K, B, Hc, dv)
                scores = (q * k_).sum(dim=-1) * scale  # (K_query, K_key, B, Hc)
                probs = th.softmax(scores, dim=1)
                att = (probs.unsqueeze(-1) * v).sum(dim=1).view(K, B, Hc * dv)
                out = th.baddbmm(comm_out_bias, att, comm_out)
                update = th.tanh(out)
                gate = None
                if comm_gate_weight is not None:
                    assert comm_gate_bias is not None
                    gate = th.sigmoid(th.baddbmm(comm_gate_bias, out, comm_gate_weight))
                    tanh_out = update
                    update = update * gate
                else:
                    tanh_out = update
                h_out = h_tent + (update * m if m is not None else update)
                comm_saved = (q, k_, v, probs, att, out, tanh_out, gate)
            saved.append((h, c if lstm else None, p, m, h_tent, *cell_saved, *comm_saved))
            outs.append(h_out)
            h, c = h_out, c_out
        ctx.spec = spec
        ctx.steps = saved
        ctx.save_for_backward(
            keep, score_proj, score_bias, gate_proj, weight_hh, comm_qkv, comm_out, comm_gate_weight
        )  # fmt: skip
        ctx.shapes = (K, B, d, T)
        ctx.has = (score_bias is not None, bias_hh is not None, comm_out_bias is not None, comm_gate_bias is not None)
        return th.stack(outs), h, c if lstm else th.zeros_like(h)

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, d_outs: th.Tensor, d_h_last: th.Tensor, d_c_last: th.Tensor) -> tuple[th.Tensor | None, ...]:
        spec: UnrollSpec = ctx.spec
        keep, score_proj, score_bias, gate_proj, weight_hh, comm_qkv, comm_out, comm_gate_weight = ctx.saved_tensors
        K, B, _, T = ctx.shapes
        lstm = spec.cell == "lstm"
        Hc, dk, dv = spec.comm_heads, spec.comm_key, spec.comm_value
        scale = dk**-0.5
        d_score_proj = th.empty_like(score_proj)
        d_score_bias = th.empty_like(score_bias) if score_bias is not None else None
        d_gate_proj = th.empty_like(gate_proj)
        d_bias = th.zeros_like(gate_proj[0])
        # Per weight: the inputs and output gradients of its products, one product at the end.
        pairs: dict[str, tuple[list[th.Tensor], list[th.Tensor]]] = {n: ([], []) for n in ("hh", "qkv", "out", "gate")}
        d_bias_hh = th.zeros_like(gate_proj[0, :, :1]) if ctx.has[1] else None
        d_out_bias = th.zeros_like(d_outs[0, :, :1]) if ctx.has[2] else None
        d_gate_bias = th.zeros_like(d_outs[0, :, :1]) if ctx.has[3] else None
        dh = d_h_last.clone()
        dc = d_c_last.clone() if lstm else None
        for t in range(T - 1, -1, -1):
            h, c, p, m, h_tent, *rest = ctx.steps[t]
            dh = dh + d_outs[t]  # the gradient of this step's output h_out
            # h_out = h_tent + update (* m)
            d_h_tent = dh
            if comm_qkv is not None:
                q, k_, v, probs, att, out, tanh_out, gate = rest[-8:]
                d_update = dh * m if m is not None else dh
                if gate is not None:
                    d_gate_pre = _sigmoid_grad(gate, d_update * tanh_out)
                    d_out = _tanh_grad(tanh_out, d_update * gate)
                    d_out = th.baddbmm(d_out, d_gate_pre, comm_gate_weight.transpose(1, 2))
                    pairs["gate"][0].append(out)
                    pairs["gate"][1].append(d_gate_pre)
                    assert d_gate_bias is not None
                    d_gate_bias += d_gate_pre.sum(dim=1, keepdim=True)
                else:
                    d_out = _tanh_grad(tanh_out, d_update)
                pairs["out"][0].append(att)
                pairs["out"][1].append(d_out)
                if d_out_bias is not None:
                    d_out_bias += d_out.sum(dim=1, keepdim=True)
                d_att = th.bmm(d_out, comm_out.transpose(1, 2)).view(K, 1, B, Hc, dv)
                d_probs = (d_att * v).sum(dim=-1)  # (K, K, B, Hc)
                d_v = (probs.unsqueeze(-1) * d_att).sum(dim=0)  # (K, B, Hc, dv)
                d_scores = probs * (d_probs - (d_probs * probs).sum(dim=1, keepdim=True)) * scale
                d_q = (d_scores.unsqueeze(-1) * k_).sum(dim=1)  # (K, B, Hc, dk)
                d_k = (d_scores.unsqueeze(-1) * q).sum(dim=0)
                d_qkv = th.cat([d_q.reshape(K, B, -1), d_k.reshape(K, B, -1), d_v.reshape(K, B, -1)], dim=-1)
                pairs["qkv"][0].append(h_tent)
                pairs["qkv"][1].append(d_qkv)
                d_h_tent = th.baddbmm(dh, d_qkv, comm_qkv.transpose(1, 2))
            # The masked write: dormant RIMs pass their gradient to the previous state.
            if m is not None:
                d_h_new = d_h_tent * m
                dh_prev = d_h_tent * ~m
                if lstm:
                    assert dc is not None
                    dc_new = dc * m
                    dc_prev = dc * ~m
            else:
                d_h_new, dh_prev = d_h_tent, None
                if lstm:
                    dc_new, dc_prev = dc, None
            if lstm:
                i, f, o, g, tanh_c = rest[:5]
                dc_new = th.addcmul(dc_new, _tanh_grad(tanh_c, d_h_new), o)
                d_gates = th.cat(
                    [
                        _sigmoid_grad(i, dc_new * g),
                        _sigmoid_grad(f, dc_new * c),
                        _sigmoid_grad(o, d_h_new * tanh_c),
                        _tanh_grad(g, dc_new * i),
                    ],
                    dim=-1,
                )
                dc_cell = dc_new * f
                dc = dc_cell if dc_prev is None else dc_prev + dc_cell
                d_gates_in = d_gates
                d_gh = d_gates
            else:
                r, z, n, gh_n = rest[:4]
                d_n_pre = _tanh_grad(n, d_h_new * (1.0 - z))
                d_r = _sigmoid_grad(r, d_n_pre * gh_n)
                d_z = _sigmoid_grad(z, d_h_new * (h - n))
                d_gates_in = th.cat([d_r, d_z, d_n_pre], dim=-1)
                d_gh = th.cat([d_r, d_z, d_n_pre * r], dim=-1)
                dh_cell = d_h_new * z
                dh_prev = dh_cell if dh_prev is None else dh_prev + dh_cell
                assert d_bias_hh is not None
            pairs["hh"][0].append(h)
            pairs["hh"][1].append(d_gh)
            if d_bias_hh is not None:
                d_bias_hh = d_bias_hh + d_gh.sum(dim=1, keepdim=True)
            dh_prev = th.baddbmm(dh_prev, d_gh, weight_hh.transpose(1, 2)) if dh_prev is not None else (
                th.bmm(d_gh, weight_hh.transpose(1, 2))
            )  # fmt: skip
            # Input attention: gates_in = bias + p * gate_proj, p = sigmoid(h . score_proj (+ bias)).
            d_bias += d_gates_in
            th.mul(d_gates_in, p, out=d_gate_proj[t])
            d_score = _sigmoid_grad(p, (d_gates_in * gate_proj[t]).sum(dim=-1, keepdim=True))
            th.mul(d_score, h, out=d_score_proj[t])
            if d_score_bias is not None:
                d_score_bias[t] = d_score
            dh_prev = th.addcmul(dh_prev, d_score, score_proj[t])
            if spec.resets[t]:
                dh_prev = dh_prev * keep[t]
                if lstm:
                    dc = dc * keep[t]
            dh = dh_prev
        grads = {}
        for name, (inputs, outputs) in pairs.items():
            if inputs:
                grads[name] = th.bmm(th.cat(inputs, dim=1).transpose(1, 2), th.cat(outputs, dim=1))
        return (
            None,  # spec
            None,  # keep
            d_score_proj,
            d_score_bias,
            d_gate_proj,
            d_bias,
            dh,
            dc if lstm else None,
            grads["hh"],
            d_bias_hh,
            grads.get("qkv"),
            grads.get("out"),
            d_out_bias,
            grads.get("gate"),
            d_gate_bias,
        )
