"""The pieces of one RIM step as plain tensor functions: the one home of each operator sequence.

:meth:`rim_agents.rim.RIMCell.step` composes them for every option (and autograd differentiates
them); :func:`rim_agents.rim_unroll.forward_step` composes them for the hand-written backward pass
and keeps what they return besides their outputs, the intermediates its backward pass reads. The
state is laid out RIM-first, ``(K, B, d_h)``; weights are ``(K, in, out)``, one ``bmm`` per map.
"""

from __future__ import annotations

from typing import NamedTuple

import torch as th
import torch.nn.functional as F


def dropout(x: th.Tensor, rate: float) -> tuple[th.Tensor, th.Tensor | None]:
    """``F.dropout(x, rate, training=True)`` and, on the CPU, its scaled mask (None for ``rate`` 0
    or off the CPU). On the CPU this is what ``F.dropout`` computes there (``bernoulli_`` on the same
    generator in the same order, divided by ``1 - rate``, multiplied): the same values; elsewhere it
    is ``F.dropout`` itself, whose fused kernel draws differently."""
    if rate == 0:
        return x, None
    if x.device.type != "cpu":
        return F.dropout(x, rate, training=True), None
    noise = th.empty_like(x).bernoulli_(1 - rate).div_(1 - rate)
    return x * noise, noise


def vector_attention(h: th.Tensor, score_proj: th.Tensor, score_bias: th.Tensor | None) -> th.Tensor:
    """``(K, B, H)`` attention on one input vector per head, one minus the null token's: the softmax
    over {null (score 0), input (score ``h . score_proj`` + bias)} is a sigmoid. ``score_proj`` is
    ``(K, B, d_h)`` for one head, ``(K, B, d_h, H)`` for ``H``. Broadcast products, not batched
    matmuls: the per-element matrices are ``1 x d_h``."""
    if score_proj.dim() == h.dim():
        score = (h * score_proj).sum(dim=-1, keepdim=True)  # (K, B, 1)
    else:
        score = (h.unsqueeze(-1) * score_proj).sum(dim=-2)  # (K, B, H)
    if score_bias is not None:
        score = score + score_bias
    return th.sigmoid(score)


class LSTMParts(NamedTuple):
    """What :func:`lstm_cell` computes on the way (its backward pass reads them)."""

    i: th.Tensor
    f: th.Tensor
    o: th.Tensor
    g: th.Tensor
    tanh_c: th.Tensor


def lstm_cell(
    gates_in: th.Tensor, h: th.Tensor, c: th.Tensor, weight_hh: th.Tensor
) -> tuple[th.Tensor, th.Tensor, LSTMParts]:
    """All K LSTM cells at once: ``(h_new, c_new, parts)``.

    :param gates_in: ``(K, B, 4*d_h)``, the input part of the gates with both biases.
    """
    d = h.shape[-1]
    gates = th.baddbmm(gates_in, h, weight_hh)
    i, f, o = th.sigmoid(gates[..., : 3 * d]).chunk(3, dim=-1)
    g = th.tanh(gates[..., 3 * d :])
    c_new = th.addcmul(f * c, i, g)
    tanh_c = th.tanh(c_new)
    return o * tanh_c, c_new, LSTMParts(i, f, o, g, tanh_c)


class GRUParts(NamedTuple):
    """What :func:`gru_cell` computes on the way (its backward pass reads them)."""

    r: th.Tensor
    z: th.Tensor
    n: th.Tensor
    gh_n: th.Tensor


def gru_cell(gates_in: th.Tensor, h: th.Tensor, weight_hh: th.Tensor, bias_hh: th.Tensor) -> tuple[th.Tensor, GRUParts]:
    """All K GRU cells at once: ``(h_new, parts)``.

    :param gates_in: ``(K, B, 3*d_h)``, the input part of the gates with the input bias.
    """
    d = h.shape[-1]
    gh = th.baddbmm(bias_hh, h, weight_hh)
    r, z = th.sigmoid(gates_in[..., : 2 * d] + gh[..., : 2 * d]).chunk(2, dim=-1)
    gh_n = gh[..., 2 * d :]
    n = th.tanh(th.addcmul(gates_in[..., 2 * d :], r, gh_n))
    return th.lerp(n, h, z), GRUParts(r, z, n, gh_n)


def top_k_mask(score: th.Tensor, k: int) -> th.Tensor:
    """``(K, B)`` bool mask of the ``k`` RIMs with the least ``score`` (attention on the null token)."""
    idx = th.topk(score, k, dim=0, largest=False).indices
    return th.zeros_like(score, dtype=th.bool).scatter_(0, idx, True)


def soft_mask(null_attention: th.Tensor, k: int, temperature: float) -> th.Tensor:
    """``(K, B)`` the straight-through selection's soft mask: a sigmoid of the distance below the
    threshold halfway between the k-th and (k+1)-th least null attention (which gets no gradient)."""
    with th.no_grad():
        least = th.topk(null_attention, k + 1, dim=0, largest=False).values
        threshold = 0.5 * (least[-2] + least[-1])  # (B,)
    return th.sigmoid((threshold - null_attention) / temperature)


class CommParts(NamedTuple):
    """What :func:`communication` computes on the way (its backward pass reads them)."""

    q: th.Tensor  # (K, 1, B, H, d_k)
    k: th.Tensor  # (1, K, B, H, d_k)
    v: th.Tensor  # (1, K, B, H, d_v)
    probs: th.Tensor  # (K_query, K_key, B, H), before dropout
    probs_dropped: th.Tensor
    noise: th.Tensor | None  # dropout's scaled mask on probs (CPU)
    att: th.Tensor  # (K, B, H*d_v)
    out: th.Tensor  # (K, B, d_h), before the tanh
    tanh_out: th.Tensor
    gate: th.Tensor | None  # the gate's sigmoid


def communication(
    h_tent: th.Tensor,
    qkv: th.Tensor,
    out_weight: th.Tensor,
    out_bias: th.Tensor,
    gate_weight: th.Tensor | None,
    gate_bias: th.Tensor | None,
    heads: int,
    d_k: int,
    d_v: int,
    dropout_rate: float,
) -> tuple[th.Tensor, CommParts]:
    """Every RIM reads from all RIMs' tentative states ``(K, B, d_h)`` by multi-head attention:
    ``(update, parts)``, the update ``tanh(out)`` (times the gate's sigmoid with a gate) for every
    RIM; the caller adds it where RIMs are active. With K of about 6 the K x K attention is
    cheapest as broadcast products in the RIM-first layout: no permutes."""
    K, B, _ = h_tent.shape
    q, k, v = th.bmm(h_tent, qkv).split([heads * d_k, heads * d_k, heads * d_v], dim=-1)
    q, k, v = q.view(K, 1, B, heads, d_k), k.view(1, K, B, heads, d_k), v.view(1, K, B, heads, d_v)
    scores = (q * k).sum(dim=-1) * (d_k**-0.5)  # (K_query, K_key, B, H)
    probs = th.softmax(scores, dim=1)
    probs_dropped, noise = dropout(probs, dropout_rate)
    att = (probs_dropped.unsqueeze(-1) * v).sum(dim=1).view(K, B, heads * d_v)
    out = th.baddbmm(out_bias, att, out_weight)
    update = tanh_out = th.tanh(out)
    gate = None
    if gate_weight is not None:
        assert gate_bias is not None
        gate = th.sigmoid(th.baddbmm(gate_bias, out, gate_weight))
        update = update * gate
    return update, CommParts(q, k, v, probs, probs_dropped, noise, att, out, tanh_out, gate)
