"""Recurrent Independent Mechanisms (Goyal et al., ICLR 2021): a step module and a sequence module.

The computation follows ``docs/RIM_SPEC.md`` (in the repository) step by step:

1. **Input attention with a null token.** A zero token is prepended to the input tokens. Keys and
   values are bias-free linear maps, so the null token's key and value are exactly zero. Every RIM
   has its own query weights and reads ``A_i = sum_j p_ij value_j`` (heads concatenated).
2. **Top-k activation.** Per batch element the ``k`` RIMs with the *least* attention on the null
   token (averaged over heads) are active. The choice is a hard mask without gradient
   (``selection="hard"``, the paper's rule). Options that keep exactly ``k`` active per step and
   the dormant state bit for bit, but let the choice learn: ``selection="straight_through"`` (the
   forward pass is the hard rule's, the backward pass differentiates a soft mask around the k-th
   score), ``selection_noise`` (Gaussian noise on the scores in training mode only, as noisy top-k
   gating) and ``balance_coef`` (an auxiliary load-balancing loss, as in the Switch Transformer).
   ``selection="sampled"`` makes the choice a stochastic decision of the agent: where asked
   (:class:`SelectionRequest`), the k RIMs are drawn without replacement with probabilities
   ``softmax(-null / selection_temperature)`` (Gumbel top-k) and the draw's log-probability is
   returned, so that a policy-gradient method trains the choice as it trains actions; unasked, the
   top-k (the distribution's mode).
3. **Independent dynamics.** Every RIM has its own LSTM or GRU cell. All ``K`` cells run together
   as batched matrix products over the RIM axis (weights of shape ``(K, in, out)``).
4. **Communication.** Active RIMs read from all RIMs (dormant ones with their previous state) by
   multi-head attention with per-RIM query/key/value maps and a gated residual.
5. **Masked write.** Dormant RIMs keep ``h`` and ``c`` bit for bit (``torch.where``).
6. **Output.** The concatenation of all ``K`` states.

Internally the state is laid out RIM-first, ``(K, B, d_h)``, so every per-RIM map is one
``torch.bmm``. With a single input vector per step (the common case) every input-dependent
product is computed for the whole sequence before the time loop: the null token's key and value
are zero, so a RIM's read is its attention weight times the projected input, and the score
``q_i . k`` is ``h_i . (W_q,i k)``. Only state-dependent work stays inside the loop.
"""

from __future__ import annotations

import dataclasses
import math
import weakref
from collections.abc import Callable
from typing import Any, Literal, NamedTuple

import torch as th
from torch import nn

from rim_agents.config import RIMConfig
from rim_agents.cuda_graphs import UnrollGraphs
from rim_agents.rim_step import communication, dropout, gru_cell, lstm_cell, soft_mask, top_k_mask, vector_attention
from rim_agents.rim_unroll import HandwrittenUnroll, LoopWeights, StepSpec, supported

CellType = Literal["lstm", "gru"]
Selection = Literal["hard", "straight_through", "sampled"]
State = tuple[th.Tensor, th.Tensor]

__all__ = [
    "Activity", "DirectInput", "PreparedInput", "RIMCell", "RIMCore", "SampledSelection", "SelectionRequest",
    "StepOutput", "TokenInput", "VectorInput", "plackett_luce_log_prob",
]  # fmt: skip


#: Compiled step functions, kept beside (not inside) their cells so that a cell pickles and deep-copies
#: as a plain module.
_COMPILED: weakref.WeakKeyDictionary[RIMCell, Callable[..., StepOutput]] = weakref.WeakKeyDictionary()
#: Recorded CUDA graphs of whole unrolls (``cuda_graphs``), likewise beside their cores.
_GRAPHS: weakref.WeakKeyDictionary[RIMCore, UnrollGraphs] = weakref.WeakKeyDictionary()


def _uniform_(tensor: th.Tensor, fan_in: int) -> th.Tensor:
    """PyTorch's default ``nn.Linear``/``nn.LSTM`` initialisation: U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
    bound = 1.0 / math.sqrt(fan_in)
    with th.no_grad():
        return tensor.uniform_(-bound, bound)


class StepOutput(NamedTuple):
    """One step's results, on the internal layout."""

    h: th.Tensor  # (K, B, d_h), the new hidden state
    c: th.Tensor  # (K, B, d_h), the new cell state (the GRU returns its input unchanged)
    mask: th.Tensor | None  # (K, B) active RIMs; None when every RIM is active
    null_attention: th.Tensor | None  # (K, B) head-averaged attention on the null token
    token_attention: th.Tensor | None  # (K, B, N) on the real tokens; None for one input vector
    order: th.Tensor | None = None  # (k, B) the sampled (or given) active RIMs in draw order
    log_prob: th.Tensor | None = None  # (B,) the log-probability of ``order`` (``selection="sampled"``)


class SelectionRequest(NamedTuple):
    """What the next unroll of a ``selection="sampled"`` core does with its choice (see
    :attr:`RIMCore.selection_request`): draw it (``sample``), replay ``given`` orders ``(T, B, K)``
    (long, the draw order of the active RIMs, padded with -1), or neither (the top-k, the mode)."""

    sample: bool = False
    given: th.Tensor | None = None


class SampledSelection(NamedTuple):
    """The choices of an unroll that sampled or replayed them (``RIMCore.last_selection``)."""

    order: th.Tensor  # (T, B, K) long: the active RIMs in draw order, padded with -1
    log_prob: th.Tensor  # (T, B): their log-probability; 0 where every RIM was active


def plackett_luce_log_prob(logits: th.Tensor, order: th.Tensor) -> th.Tensor:
    """Log-probability of drawing ``order`` ``(k, B)`` (indices into dim 0 of ``logits`` ``(K, B)``,
    first draw first) without replacement, each draw with probability ``softmax(logits)`` over
    the RIMs not drawn yet (the Plackett-Luce model; Gumbel top-k samples it exactly). ``(B,)``."""
    log_prob = logits.gather(0, order).sum(dim=0)
    drawn = th.zeros_like(logits, dtype=th.bool)
    for j in range(order.shape[0]):
        log_prob = log_prob - th.logsumexp(logits.masked_fill(drawn, float("-inf")), dim=0)
        drawn = drawn.scatter(0, order[j : j + 1], True)
    return log_prob


class Activity(NamedTuple):
    """What a tracked unroll did (see ``RIMCore.track_activity``)."""

    mask: th.Tensor  # (T, B, K) bool: the active RIMs
    input_attention: th.Tensor | None  # (T, B, K, N + 1) head-averaged, null token first; None without attention
    # (T, B, K, K): row i is what RIM i read from each RIM, head-averaged (rows of dormant RIMs
    # are computed but unused); None without communication
    communication: th.Tensor | None


class AddAuxiliaryLoss(th.autograd.Function):
    """``y = x`` in the forward pass; the backward pass also sends gradient 1 into ``loss``.

    Any loss computed from ``y`` is thereby trained as ``loss_main + loss``, whatever optimises it
    (sb3-contrib's PPO loss, a supervised loss), with no change to the trainer.
    """

    @staticmethod
    def forward(ctx: Any, x: th.Tensor, loss: th.Tensor) -> th.Tensor:
        ctx.loss_shape = loss.shape
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, grad: th.Tensor) -> tuple[th.Tensor, th.Tensor]:
        return grad, grad.new_ones(ctx.loss_shape)


def _unbind(t: th.Tensor | None, steps: int) -> list[th.Tensor | None]:
    """Per-step views of a time-first tensor (``unbind``, not indexing, keeps the backward pass
    linear in ``T``: an indexed slice's gradient fills a buffer of the whole sequence at every step)."""
    return list(t.unbind(0)) if t is not None else [None] * steps


class DirectInput(NamedTuple):
    """No input attention (the ablation): the input (the mean of the tokens for token input)
    mapped by every RIM's cell input weights, bias included: ``(*L, K, B, G*d_h)``, with ``L`` the
    time steps (none for one step) and ``G*d_h`` the width of all gates of a cell."""

    gate_proj: th.Tensor

    def unbind(self) -> list[DirectInput]:
        return [DirectInput(g) for g in self.gate_proj.unbind(0)]


class VectorInput(NamedTuple):
    """Input attention over one vector per step (and the null token), folded before the loop.

    * ``score_proj``: ``W_q,i k_h / sqrt(d_k)``, so that RIM ``i``'s score for head ``h`` is
      ``h_i . score_proj[i, :, :, h] + score_bias[i, :, h]``: ``(*L, K, B, d_h)`` for one head, else
      ``(*L, K, B, d_h, H)``.
    * ``score_bias``: ``b_q,i . k_h / sqrt(d_k)``, the query bias's part of the score,
      ``(*L, K, B, H)``; None without a query bias.
    * ``gate_proj``: head ``h``'s value mapped by RIM ``i``'s cell input weights, so that the cell's
      input is ``sum_h p_ih gate_proj[i, :, h]``: ``(*L, K, B, G*d_h)`` for one head, else
      ``(*L, K, B, H, G*d_h)``.
    * ``bias``: ``(K, B, G*d_h)``, the cell's input bias, broadcast once per call (not per step).
    """

    score_proj: th.Tensor
    score_bias: th.Tensor | None
    gate_proj: th.Tensor
    bias: th.Tensor

    def unbind(self) -> list[VectorInput]:
        T = self.score_proj.shape[0]
        steps = zip(self.score_proj.unbind(0), _unbind(self.score_bias, T), self.gate_proj.unbind(0), strict=True)
        return [VectorInput(sp, sb, gp, self.bias) for sp, sb, gp in steps]


class TokenInput(NamedTuple):
    """Input attention over a set of tokens per step (spatial attention): ``keys``
    ``(*L, B, N, H, d_k)``, ``values`` ``(*L, B, N, H, d_v)``, and the cell's input ``bias``
    ``(K, B, G*d_h)``."""

    keys: th.Tensor
    values: th.Tensor
    bias: th.Tensor

    def unbind(self) -> list[TokenInput]:
        return [TokenInput(k, v, self.bias) for k, v in zip(self.keys.unbind(0), self.values.unbind(0), strict=True)]


#: What :meth:`RIMCell.prepare` makes and :meth:`RIMCell.step` consumes, one type per input kind.
PreparedInput = DirectInput | VectorInput | TokenInput


class RIMCell(nn.Module):
    """One step of Recurrent Independent Mechanisms.

    ``RIMCell(input_size, config=None, **settings)``: the settings are
    :class:`rim_agents.config.RIMConfig`'s fields (documented there), given as a ``RIMConfig``, as
    keywords, or both (keywords win); unset ones take ``RIMConfig``'s defaults.

    :param input_size: width ``d_in`` of the input vector or of each input token.
    :param config: the settings.
    :param settings: settings by name, over ``config``.
    """

    def __init__(self, input_size: int, config: RIMConfig | None = None, **settings: Any) -> None:
        super().__init__()
        if not isinstance(input_size, int) or isinstance(input_size, bool) or input_size < 1:
            raise ValueError(f"RIM setting input_size={input_size!r} is invalid: it must be a positive integer")
        unknown = set(settings) - {f.name for f in dataclasses.fields(RIMConfig)}
        if unknown:
            raise TypeError(f"unknown RIM settings {sorted(unknown)}: see rim_agents.config.RIMConfig")
        config = dataclasses.replace(config or RIMConfig(), **settings)
        self.config = config
        c = config
        self.input_size = input_size
        self.num_units = c.num_units
        self.k_active = c.k_active if c.input_attention else c.num_units
        self.k_anneal = float(c.k_anneal)
        self.k_now = self.k_active  # the k in force (see set_progress)
        self.anneal = c.anneal
        self.leak_now = 0.0  # the share of its update a dormant RIM takes (anneal="leak"; see set_progress)
        self.unit_size = c.unit_size
        self.cell_type: CellType = c.cell  # type: ignore[assignment]
        self.input_heads = c.input_heads
        self.input_key_size = c.input_key_size
        self.input_value_size = c.value_width
        self.input_query_bias = c.input_query_bias and c.input_attention
        self.comm_heads = c.comm_heads
        self.comm_key_size = c.comm_key_size
        self.comm_value_size = c.comm_value_size if c.comm_value_size is not None else c.comm_key_size
        self.input_attention = c.input_attention
        self.communication = c.communication
        self.comm_gate = c.comm_gate
        self.comm_zero_init = c.comm_zero_init
        self.input_dropout = float(c.input_dropout)
        self.comm_dropout = float(c.comm_dropout)
        self.mask_output = c.mask_output
        self.selection: Selection = c.selection  # type: ignore[assignment]
        self.selection_temperature = float(c.selection_temperature)
        self.st_state_gradient = bool(c.st_state_gradient)
        self.selection_noise = float(c.selection_noise)
        self.balance_coef = float(c.balance_coef)
        self.compile_mode = c.compile
        self.cuda_graphs = c.cuda_graphs
        #: Train the common case's unroll with the hand-written backward pass
        #: (:mod:`rim_agents.rim_unroll`); False: autograd's (the same numbers, to float rounding).
        self.handwritten_backward = True
        # Set by RIMCore while it tracks activity: the last communication attention (B, K, K).
        self.record_communication = False
        self.last_communication: th.Tensor | None = None

        K, d_h, cell = self.num_units, self.unit_size, self.cell_type
        H, d_k, value_width = self.input_heads, self.input_key_size, self.input_value_size
        Hc, ck, cv = self.comm_heads, self.comm_key_size, self.comm_value_size
        n_gates = 4 if cell == "lstm" else 3
        self.n_gates = n_gates
        if self.input_attention:
            # Shared, bias-free key and value maps: the null token's key and value are exactly zero.
            self.input_key = nn.Linear(input_size, H * d_k, bias=False)
            self.input_value = nn.Linear(input_size, value_width, bias=False)
            # Per-RIM queries from the previous state.
            self.input_query = nn.Parameter(th.empty(K, d_h, H * d_k))
            if self.input_query_bias:
                self.input_query_b = nn.Parameter(th.empty(K, 1, H * d_k))
            cell_in = value_width
        else:
            cell_in = input_size
        # Per-RIM recurrent cells. Gate blocks: LSTM (i, f, o, g), GRU (r, z, n) as in nn.GRU.
        self.weight_ih = nn.Parameter(th.empty(K, cell_in, n_gates * d_h))
        self.weight_hh = nn.Parameter(th.empty(K, d_h, n_gates * d_h))
        self.bias_ih = nn.Parameter(th.empty(K, 1, n_gates * d_h))
        self.bias_hh = nn.Parameter(th.empty(K, 1, n_gates * d_h))
        if self.communication:
            qkv_width = Hc * (2 * ck + cv)
            self.comm_qkv = nn.Parameter(th.empty(K, d_h, qkv_width))
            self.comm_out = nn.Parameter(th.empty(K, Hc * cv, d_h))
            self.comm_out_bias = nn.Parameter(th.empty(K, 1, d_h))
            if self.comm_gate:
                self.comm_gate_weight = nn.Parameter(th.empty(K, d_h, d_h))
                self.comm_gate_bias = nn.Parameter(th.empty(K, 1, d_h))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Initialise every weight as PyTorch initialises the corresponding dense layer (the
        communication's output map at zero with ``comm_zero_init``)."""
        d_h = self.unit_size
        if self.input_attention:
            self.input_key.reset_parameters()
            self.input_value.reset_parameters()
            _uniform_(self.input_query, d_h)
            if self.input_query_bias:
                _uniform_(self.input_query_b, d_h)
        # nn.LSTM / nn.GRU: every weight and bias U(-1/sqrt(d_h), 1/sqrt(d_h)).
        for p in (self.weight_ih, self.weight_hh, self.bias_ih, self.bias_hh):
            _uniform_(p, d_h)
        if self.communication:
            _uniform_(self.comm_qkv, d_h)
            fan_out_in = self.comm_heads * self.comm_value_size
            for weight in (self.comm_out, self.comm_out_bias):
                if self.comm_zero_init:
                    nn.init.zeros_(weight)
                else:
                    _uniform_(weight, fan_out_in)
            if self.comm_gate:
                _uniform_(self.comm_gate_weight, d_h)
                _uniform_(self.comm_gate_bias, d_h)

    def set_progress(self, fraction_done: float) -> int:
        """Set the annealing schedule at ``fraction_done`` of training (see ``k_anneal`` and
        ``anneal``): the number of active RIMs, returned, or the dormant RIMs' leak."""
        K, k = self.num_units, self.k_active
        if self.k_anneal > 0:
            left = 1.0 - min(1.0, max(0.0, fraction_done) / self.k_anneal)
            if self.anneal == "leak":
                self.leak_now = left
            else:
                self.k_now = round(K - (K - k) * (1.0 - left))
        return self.k_now

    @property
    def hidden_size(self) -> int:
        """Width of the flat state and of the output: ``K * d_h``."""
        return self.num_units * self.unit_size

    def extra_repr(self) -> str:
        return (
            f"input_size={self.input_size}, num_units={self.num_units}, k_active={self.k_active}, "
            f"unit_size={self.unit_size}, cell={self.cell_type!r}, input_attention={self.input_attention}, "
            f"communication={self.communication}"
        )

    # ------------------------------------------------------------------ input terms
    def prepare(self, x: th.Tensor, tokens: bool) -> PreparedInput:
        """Compute the input-dependent terms of every step in one batch of matrix products.

        :param x: ``(T, B, d_in)`` (one vector per step) or ``(T, B, N, d_in)`` (tokens).
        :param tokens: whether ``x`` holds tokens.
        :return: the terms the step consumes (:class:`DirectInput`, :class:`VectorInput` or
            :class:`TokenInput`); every tensor is contiguous in the layout the step reads.
        """
        H, K, B = self.input_heads, self.num_units, x.shape[1]
        bias = self.bias_ih if self.cell_type == "gru" else self.bias_ih + self.bias_hh
        if not self.input_attention:
            inp = x.mean(dim=-2) if tokens else x
            # (T, B, d_in) x (K, d_in, G*d_h) -> (T, K, B, G*d_h), bias folded in.
            gate_proj = th.einsum("tbi,kig->tkbg", inp, self.weight_ih) + bias
            return DirectInput(gate_proj.contiguous())
        bias = bias.expand(K, B, bias.shape[-1]).contiguous()
        keys = self.input_key(x).unflatten(-1, (H, self.input_key_size))
        values = self.input_value(x).unflatten(-1, (H, self.input_value_size // H))
        if tokens:
            return TokenInput(keys, values, bias)
        # Fold each RIM's query map into the keys: score_ih = h_i . (W_q,i[:, h] k_h) / sqrt(d_k).
        scale = self.input_key_size**-0.5
        score_bias = None
        if self.input_query_bias:
            b_q = self.input_query_b.view(K, H, self.input_key_size) * scale
            score_bias = th.einsum("tbhe,khe->tkbh", keys, b_q).contiguous()
        if H == 1:
            # One head: batched products against the weights as stored, (K, d_in, d_out). einsum would
            # permute (copy) the whole weight first, which costs more than the product when T*B is
            # small (one rollout step).
            T = x.shape[0]
            keys_2d, values_2d = keys.reshape(T * B, -1), values.reshape(T * B, -1)
            w_q = self.input_query.transpose(1, 2)  # (K, d_k, d_h), a view
            score_proj = th.bmm((keys_2d * scale).expand(K, -1, -1), w_q)  # (K, T*B, d_h)
            gate_proj = th.bmm(values_2d.expand(K, -1, -1), self.weight_ih)  # (K, T*B, G*d_h)
            score_proj = score_proj.view(K, T, B, -1).transpose(0, 1)
            gate_proj = gate_proj.view(K, T, B, -1).transpose(0, 1)
            return VectorInput(score_proj.contiguous(), score_bias, gate_proj.contiguous(), bias)
        w_q = self.input_query.unflatten(-1, (H, self.input_key_size)) * scale
        score_proj = th.einsum("tbhe,kdhe->tkbdh", keys, w_q)
        # Fold each RIM's cell input weights into the values: W_ih,i A_i = sum_h p_ih (W_ih,i[h] v_h).
        w_ih = self.weight_ih.unflatten(1, (H, self.input_value_size // H))
        gate_proj = th.einsum("tbhv,khvg->tkbhg", values, w_ih)
        return VectorInput(score_proj.contiguous(), score_bias, gate_proj.contiguous(), bias)

    # ------------------------------------------------------------------ one step
    def _token_probs(self, inp: TokenInput, h: th.Tensor) -> th.Tensor:
        """``(K, B, H, N + 1)`` input-attention probabilities per head, the null token first."""
        K, B = h.shape[0], h.shape[1]
        H, d_k = self.input_heads, self.input_key_size
        if self.input_query_bias:
            q = th.baddbmm(self.input_query_b, h, self.input_query).view(K, B, H, d_k)
        else:
            q = th.bmm(h, self.input_query).view(K, B, H, d_k)
        scores = th.einsum("kbhe,bnhe->kbhn", q, inp.keys) * (d_k**-0.5)
        # The null token's key is zero, so its score is exactly zero.
        scores = th.cat([scores.new_zeros(K, B, H, 1), scores], dim=-1)
        return th.softmax(scores, dim=-1)

    def _vector_probs(self, inp: VectorInput, h: th.Tensor) -> th.Tensor:
        """``(K, B, H)`` attention on the input vector per head (one minus the null's)."""
        return vector_attention(h, inp.score_proj, inp.score_bias)

    def _null_attention(self, inp: TokenInput | VectorInput, h: th.Tensor) -> th.Tensor:
        """``(K, B)`` attention on the null token, averaged over heads (what the top-k ranks)."""
        if isinstance(inp, TokenInput):
            return self._token_probs(inp, h)[..., 0].mean(dim=-1)
        return 1.0 - self._vector_probs(inp, h).mean(dim=-1)

    def _attend_tokens(self, inp: TokenInput, h: th.Tensor) -> tuple[th.Tensor, th.Tensor, th.Tensor | None]:
        """Input attention over tokens for one step.

        :param h: previous state ``(K, B, d_h)``.
        :return: the cell's input pre-activation ``(K, B, G*d_h)`` (input bias included), the
            attention on the null token averaged over heads ``(K, B)``, and the head-averaged
            attention on the real tokens ``(K, B, N)``.
        """
        probs = self._token_probs(inp, h)
        mean_probs = probs.mean(dim=2)
        probs = dropout(probs, self._rate(self.input_dropout))[0]
        # The null token's value is zero: only the real tokens contribute to the read.
        read = th.einsum("kbhn,bnhv->kbhv", probs[..., 1:], inp.values).reshape(h.shape[0], h.shape[1], -1)
        return th.baddbmm(inp.bias, read, self.weight_ih), mean_probs[..., 0], mean_probs[..., 1:]

    def _attend_vector(self, inp: VectorInput, h: th.Tensor) -> tuple[th.Tensor, th.Tensor, None]:
        """Input attention over one vector for one step: as :meth:`_attend_tokens`, with no
        attention on tokens returned (it is one minus the null attention)."""
        p = self._vector_probs(inp, h)
        if self.input_heads == 1:  # a view, not a reduction, in the common case
            null_att = 1.0 - p.squeeze(-1)
            p = dropout(p, self._rate(self.input_dropout))[0]
            return th.addcmul(inp.bias, p, inp.gate_proj), null_att, None
        null_att = 1.0 - p.mean(dim=-1)
        p = dropout(p, self._rate(self.input_dropout))[0]
        return inp.bias + (p.unsqueeze(-1) * inp.gate_proj).sum(dim=-2), null_att, None

    def _rate(self, rate: float) -> float:
        """A dropout rate in force: ``rate`` in training mode, 0 otherwise."""
        return rate if self.training else 0.0

    def _top_k_mask(self, null_attention: th.Tensor) -> th.Tensor:
        """``(K, B)`` bool mask of the ``k`` RIMs with the least attention on the null token (plus
        ``selection_noise`` in training mode)."""
        with th.no_grad():
            score = null_attention
            if self.selection_noise > 0 and self.training:
                score = score + self.selection_noise * th.randn_like(score)
            return top_k_mask(score, self.k_now)

    def _straight_through(self, null_attention: th.Tensor) -> th.Tensor:
        """``s - sg(s)`` for the soft mask ``s`` (see ``selection``): zero, with the soft mask's gradient."""
        soft = soft_mask(null_attention, self.k_now, self.selection_temperature)
        return soft - soft.detach()

    def _cell(self, gates_in: th.Tensor, h: th.Tensor, c: th.Tensor) -> State:
        """All K cells at once.

        :param gates_in: ``(K, B, G*d_h)``, the input part of the gates with the input bias (and, for
            the LSTM, the hidden bias).
        :param h: ``(K, B, d_h)``.
        :param c: ``(K, B, d_h)``; unused by the GRU.
        """
        if self.cell_type == "lstm":
            h_new, c_new, _ = lstm_cell(gates_in, h, c, self.weight_hh)
            return h_new, c_new
        return gru_cell(gates_in, h, self.weight_hh, self.bias_hh)[0], c

    def _communicate(self, h_tent: th.Tensor) -> th.Tensor:
        """``h^ = h_tent + update`` for every RIM (all are active)."""
        return h_tent + self._comm_update(h_tent)

    def _comm_update(self, h_tent: th.Tensor) -> th.Tensor:
        """Every RIM reads from all RIMs' tentative states ``(K, B, d_h)``; returns the gated update.

        Rows of dormant RIMs are computed too and discarded by the masked write.
        """
        update, parts = communication(
            h_tent, self.comm_qkv, self.comm_out, self.comm_out_bias,
            self.comm_gate_weight if self.comm_gate else None, self.comm_gate_bias if self.comm_gate else None,
            self.comm_heads, self.comm_key_size, self.comm_value_size, self._rate(self.comm_dropout),
        )  # fmt: skip
        if self.record_communication:
            # (K_query, K_key, B, Hc) -> (B, K_query, K_key), averaged over heads
            self.last_communication = parts.probs.mean(dim=-1).permute(2, 0, 1).detach()
        return update

    def _sampled_mask(
        self, null_attention: th.Tensor, given: th.Tensor | None
    ) -> tuple[th.Tensor, th.Tensor, th.Tensor]:
        """``selection="sampled"``: the ``(K, B)`` mask of ``k`` RIMs drawn (or ``given`` ``(k, B)``)
        with probabilities ``softmax(-null / T)`` without replacement, the draw order ``(k, B)``
        and its log-probability ``(B,)``, which carries the gradient of the choice."""
        logits = -null_attention / self.selection_temperature
        if given is None:
            with th.no_grad():  # Gumbel top-k: -log(E) with E ~ Exp(1) is Gumbel-distributed
                noise = -th.empty_like(logits).exponential_().log()
                order = th.topk(logits + noise, self.k_now, dim=0).indices
        else:
            order = given
        mask = th.zeros_like(null_attention, dtype=th.bool).scatter_(0, order, True)
        return mask, order, plackett_luce_log_prob(logits, order)

    def step(
        self,
        inp: PreparedInput,
        h: th.Tensor,
        c: th.Tensor,
        sample: bool = False,
        given: th.Tensor | None = None,
    ) -> StepOutput:
        """One step on the internal layout.

        :param inp: the step's input terms (see :meth:`prepare`).
        :param h: previous hidden state ``(K, B, d_h)``.
        :param c: previous cell state ``(K, B, d_h)`` (ignored and returned unchanged by the GRU).
        :param sample: ``selection="sampled"``: draw the active RIMs (else the top-k unless ``given``).
        :param given: ``selection="sampled"``: the active RIMs ``(k, B)`` in draw order, to replay.
        """
        null_att: th.Tensor | None = None
        token_att: th.Tensor | None = None
        if isinstance(inp, TokenInput):
            gates_in, null_att, token_att = self._attend_tokens(inp, h)
        elif isinstance(inp, VectorInput):
            gates_in, null_att, token_att = self._attend_vector(inp, h)
        else:
            gates_in = inp.gate_proj
        h_new, c_new = self._cell(gates_in, h, c)
        mask = order = log_prob = None
        if null_att is not None and self.k_now < self.num_units:
            if self.selection == "sampled" and (sample or given is not None):
                mask, order, log_prob = self._sampled_mask(null_att, given)
            else:
                mask = self._top_k_mask(null_att)
        if mask is None:
            h_out = self._communicate(h_new) if self.communication else h_new
            return StepOutput(h_out, c_new, mask, null_att, token_att)
        m = mask.unsqueeze(-1)
        leak = self.leak_now
        # Masked write. A dormant RIM's tentative state is its previous state, copied exactly (or,
        # while dormancy is annealed in, moved a fraction ``leak`` of the way to its new state).
        h_tent = th.where(m, h_new, h if leak == 0 else th.lerp(h, h_new, leak))
        if self.communication:
            # h^ = h_tent + update for active RIMs; dormant RIMs add exactly zero, so their state is
            # still the previous one bit for bit, and the update gets no gradient from them.
            share = m if leak == 0 else th.where(m, 1.0, leak)
            h_tent = h_tent + self._comm_update(h_tent) * share
        c_out = c_new  # the GRU's c is unused
        if self.cell_type == "lstm":
            c_out = th.where(m, c_new, c if leak == 0 else th.lerp(c, c_new, leak))
        if self.selection == "straight_through" and th.is_grad_enabled():
            assert null_att is not None and not isinstance(inp, DirectInput)
            # Exactly zero forward (so the state is the hard rule's); the gradient of the choice.
            # It reaches the queries and the input, not the previous state (unless
            # st_state_gradient): through the state the surrogate's Jacobian would join the
            # backward recurrence, which the forward pass never damps, and it explodes.
            if not self.st_state_gradient:
                null_att = self._null_attention(inp, h.detach())
            g = self._straight_through(null_att).unsqueeze(-1)
            h_tent = h_tent + g * (h_new - h)
            if self.cell_type == "lstm":
                c_out = c_out + g * (c_new - c)
        return StepOutput(h_tent, c_out, mask, null_att, token_att, order, log_prob)

    def balance_loss_on(self) -> bool:
        """Whether an unroll now adds the balance loss: a coefficient, dormant RIMs and gradients."""
        return self.balance_coef > 0 and self.k_now < self.num_units and th.is_grad_enabled()

    def step_function(self) -> Callable[..., StepOutput]:
        """:meth:`step`, compiled with ``torch.compile`` once per cell when ``compile`` is a mode."""
        if self.compile_mode == "off":
            return self.step
        compiled = _COMPILED.get(self)
        if compiled is None:
            compiled = th.compile(self.step, mode=self.compile_mode, dynamic=False)
            _COMPILED[self] = compiled
        return compiled

    def initial_state(self, batch_size: int, device: th.device | str | None = None) -> State:
        """Zero state ``(h, c)``, each ``(1, batch_size, K * d_h)``."""
        dtype = self.weight_hh.dtype
        device = self.weight_hh.device if device is None else device
        h = th.zeros(1, batch_size, self.hidden_size, dtype=dtype, device=device)
        return h, th.zeros_like(h)

    def to_internal(self, flat: th.Tensor) -> th.Tensor:
        """``(1, B, K*d_h)`` -> ``(K, B, d_h)``."""
        B = flat.shape[1]
        return flat.view(B, self.num_units, self.unit_size).transpose(0, 1)

    def to_flat(self, internal: th.Tensor) -> th.Tensor:
        """``(K, B, d_h)`` -> ``(1, B, K*d_h)``."""
        return internal.transpose(0, 1).reshape(1, internal.shape[1], self.hidden_size)

    def forward(self, x: th.Tensor, state: State | None = None) -> tuple[th.Tensor, State]:
        """One step on the public layout.

        :param x: ``(B, d_in)`` or ``(B, N, d_in)`` tokens.
        :param state: ``(h, c)``, each ``(1, B, K*d_h)``; zeros when None.
        :return: ``out`` of shape ``(B, K*d_h)`` and the new state.
        """
        out, new_state = RIMCore.run(self, x.unsqueeze(0), state, None)
        return out[0], new_state


class RIMCore(nn.Module):
    """A RIM sequence module with ``nn.LSTM``'s calling convention (time-first, one layer).

    ``out, (h, c) = core(x, (h0, c0), episode_starts=None)`` with ``x`` of shape ``(T, B, d_in)``
    or ``(T, B, N, d_in)`` (tokens, for spatial attention), states of shape ``(1, B, K*d_h)`` and
    ``out`` of shape ``(T, B, K*d_h)``. ``episode_starts`` ``(T, B)`` zeroes an element's state at
    the step where its episode starts. The GRU variant returns a zero ``c``.

    Set ``core.track_activity = True`` to keep, after each call, ``core.last_activity``, an
    :class:`Activity` (None otherwise; nothing is computed for it then).

    With ``selection="sampled"``, set ``core.selection_request`` (a :class:`SelectionRequest`)
    before a call to draw or replay the choice; that call consumes it and leaves the choices and
    their log-probabilities in ``core.last_selection`` (a :class:`SampledSelection`). A call
    without a request takes the top-k.

    Keyword arguments are those of :class:`RIMCell`.
    """

    num_layers = 1

    def __init__(self, input_size: int, config: RIMConfig | None = None, **settings: Any) -> None:
        super().__init__()
        self.cell = RIMCell(input_size, config, **settings)
        self.track_activity = False
        self.last_activity: Activity | None = None
        # Balance-loss values of the training unrolls since the trainer last read them.
        self.balance_losses: list[th.Tensor] = []
        self.selection_request: SelectionRequest | None = None
        self.last_selection: SampledSelection | None = None

    @property
    def input_size(self) -> int:
        return self.cell.input_size

    @property
    def hidden_size(self) -> int:
        return self.cell.hidden_size

    def initial_state(self, batch_size: int, device: th.device | str | None = None) -> State:
        """Zero state ``(h, c)``, each ``(1, batch_size, K * d_h)``."""
        return self.cell.initial_state(batch_size, device)

    def forward(
        self,
        x: th.Tensor,
        state: State | None = None,
        episode_starts: th.Tensor | None = None,
    ) -> tuple[th.Tensor, State]:
        """Unroll over time.

        :param x: ``(T, B, input_size)`` or ``(T, B, N, input_size)``.
        :param state: ``(h0, c0)``, each ``(1, B, K*d_h)``; zeros when None.
        :param episode_starts: ``(T, B)``, nonzero where an episode starts (state zeroed there).
        :return: ``out`` ``(T, B, K*d_h)`` and the final ``(h, c)``.
        """
        request, self.selection_request = self.selection_request, None
        if request is not None and self.cell.selection != "sampled":
            raise ValueError(f"a selection request needs selection='sampled', not {self.cell.selection!r}")
        eager_only = self.track_activity or self.cell.balance_loss_on() or request is not None
        if self.cell.cuda_graphs and x.is_cuda and not eager_only:
            graphed = self._graphed(x, state, episode_starts)
            if graphed is not None:
                return graphed
        out, new_state = self.run(self.cell, x, state, episode_starts, self, request)
        return out, new_state

    def _graphed(
        self, x: th.Tensor, state: State | None, episode_starts: th.Tensor | None
    ) -> tuple[th.Tensor, State] | None:
        """The unroll replayed from a CUDA graph (see :mod:`rim_agents.cuda_graphs`); None when it
        must run eagerly. Absent state and starts become zeros, which the loop treats exactly as
        their absence."""
        if x.dim() != 3:
            return None
        T, B = x.shape[0], x.shape[1]
        h0, c0 = self.initial_state(B, x.device) if state is None else state
        starts = x.new_zeros(T, B) if episode_starts is None else episode_starts.to(x.dtype)
        graphs = _GRAPHS.get(self)
        if graphs is None:
            cell = self.cell

            def unroll(
                x: th.Tensor, h0: th.Tensor, c0: th.Tensor, starts: th.Tensor
            ) -> tuple[th.Tensor, th.Tensor, th.Tensor]:
                out, (h, c) = RIMCore.run(cell, x, (h0, c0), starts)
                return out, h, c

            graphs = _GRAPHS[self] = UnrollGraphs(cell, unroll)
        result = graphs(x, h0, c0, starts)
        if result is None:
            return None
        out, h, c = result
        return out, (h, c)

    def release_graphs(self) -> None:
        """Let recorded training unrolls replay again: every unroll so far has been back-propagated
        or dropped (see :meth:`rim_agents.cuda_graphs.UnrollGraphs.release`)."""
        graphs = _GRAPHS.get(self)
        if graphs is not None:
            graphs.release()

    def _apply(self, fn: Any, *args: Any, **kwargs: Any) -> RIMCore:
        # Moving or casting the parameters invalidates recorded graphs (they hold the old tensors).
        _GRAPHS.pop(self, None)
        return super()._apply(fn, *args, **kwargs)

    @staticmethod
    def run(
        cell: RIMCell,
        x: th.Tensor,
        state: State | None,
        episode_starts: th.Tensor | None,
        tracker: RIMCore | None = None,
        request: SelectionRequest | None = None,
    ) -> tuple[th.Tensor, State]:
        """The time loop shared by :class:`RIMCore` and :meth:`RIMCell.forward`; the sampled
        choices of a ``request`` go to ``tracker.last_selection``."""
        if x.dim() not in (3, 4) or x.shape[-1] != cell.input_size:
            raise ValueError(
                f"RIM input has shape {tuple(x.shape)}: expected (T, B, {cell.input_size}) or "
                f"(T, B, N, {cell.input_size}) with input_size={cell.input_size} last"
            )
        T, B = x.shape[0], x.shape[1]
        tokens = x.dim() == 4
        if state is None:
            state = cell.initial_state(B, x.device)
        h0, c0 = state
        expected = (1, B, cell.hidden_size)
        for name, s in (("h0", h0), ("c0", c0)):
            if tuple(s.shape) != expected:
                raise ValueError(
                    f"RIM state {name} has shape {tuple(s.shape)}: expected {expected} "
                    f"(1, batch, num_units * unit_size)"
                )
        reset_steps: list[bool] = [False] * T
        keep: th.Tensor | None = None
        if episode_starts is not None:
            if tuple(episode_starts.shape) != (T, B):
                raise ValueError(f"episode_starts has shape {tuple(episode_starts.shape)}: expected (T, B) = {(T, B)}")
            starts = episode_starts.bool()
            # On the CPU, steps without a start skip the reset; on a GPU every step multiplies by
            # ``keep`` (ones where nothing starts) rather than read the starts back to the host.
            reset_steps = [True] * T if x.is_cuda else starts.any(dim=1).tolist()
            keep = (~starts).to(x.dtype).view(T, 1, B, 1)

        inputs = cell.prepare(x, tokens)
        # Contiguous from the first step on: every step sees one layout (a compiled step is one
        # graph, not one for the first step's transposed view and another for the rest).
        h = cell.to_internal(h0).contiguous()
        c = cell.to_internal(c0).contiguous() if cell.cell_type == "lstm" else th.zeros_like(h)
        track = tracker is not None and tracker.track_activity
        balance = cell.balance_loss_on()
        if isinstance(inputs, VectorInput) and supported(cell, tokens, x, track, balance, request):
            outs_t, h, c = HandwrittenUnroll.apply(
                StepSpec.of(cell), cell.compile_mode, tuple(reset_steps), keep, inputs.score_proj, inputs.score_bias,
                inputs.gate_proj, inputs.bias, h, c, *LoopWeights.of(cell),
            )  # fmt: skip
            out = outs_t.transpose(1, 2).reshape(T, B, cell.hidden_size)
            return out, (cell.to_flat(h), cell.to_flat(c))
        outs: list[th.Tensor] = []
        masks: list[th.Tensor] = []
        attentions: list[th.Tensor] = []
        communications: list[th.Tensor] = []
        cell.record_communication = track and cell.communication
        selected: list[th.Tensor] = []  # (K, B) masks, for the balance loss
        shares: list[th.Tensor] = []  # (K, B) input-attention shares, for the balance loss
        step_inputs: list[PreparedInput] = list(inputs.unbind())
        step = cell.step_function()
        sample = request is not None and request.sample
        given: list[th.Tensor | None] = [None] * T
        if request is not None and request.given is not None:
            if tuple(request.given.shape) != (T, B, cell.num_units):
                raise ValueError(
                    f"given selection has shape {tuple(request.given.shape)}: expected (T, B, K) = "
                    f"{(T, B, cell.num_units)}"
                )
            if cell.k_now < cell.num_units:  # (T, B, K) -> per step (k, B), the draw order
                given = list(request.given[..., : cell.k_now].permute(0, 2, 1).unbind(0))
        orders: list[th.Tensor] = []  # (k, B) per step, for a request with dormant RIMs
        log_probs: list[th.Tensor] = []
        for t, step_input in enumerate(step_inputs):
            if reset_steps[t]:
                assert keep is not None
                h = h * keep[t]
                if cell.cell_type == "lstm":
                    c = c * keep[t]
            h, c, mask, null_att, token_att, order, log_prob = step(step_input, h, c, sample, given[t])
            if order is not None and log_prob is not None:
                orders.append(order)
                log_probs.append(log_prob)
            outs.append(h * mask.unsqueeze(-1) if cell.mask_output and mask is not None else h)
            if balance and mask is not None and null_att is not None:
                selected.append(mask)
                attention = 1.0 - null_att
                shares.append(attention / attention.sum(dim=0, keepdim=True))
            if track:
                masks.append(th.ones(h.shape[:2], dtype=th.bool, device=h.device) if mask is None else mask)
                if null_att is not None:
                    token_att = (1.0 - null_att).unsqueeze(-1) if token_att is None else token_att
                    attentions.append(th.cat([null_att.unsqueeze(-1), token_att], dim=-1).detach())
                if cell.last_communication is not None:
                    communications.append(cell.last_communication)
                    cell.last_communication = None
        # (T, K, B, d_h) -> (T, B, K*d_h)
        out = th.stack(outs).transpose(1, 2).reshape(T, B, cell.hidden_size)
        if selected:
            fraction = th.stack(selected).to(out.dtype).mean(dim=(0, 2))  # (K,), no gradient
            share = th.stack(shares).mean(dim=(0, 2))  # (K,)
            loss = (cell.num_units / cell.k_now) * (fraction * share).sum()
            out = AddAuxiliaryLoss.apply(out, cell.balance_coef * loss)
            if tracker is not None:
                tracker.balance_losses.append(loss.detach())
        if request is not None and tracker is not None:
            # (T, B, K) draw orders padded with -1; no draw (every RIM active) has probability 1.
            padded = th.full((T, B, cell.num_units), -1, dtype=th.long, device=h.device)
            if orders:
                padded[..., : cell.k_now] = th.stack(orders).transpose(1, 2)
            chosen = th.stack(log_probs) if log_probs else h.new_zeros(T, B)
            tracker.last_selection = SampledSelection(padded, chosen)
        if track:
            assert tracker is not None
            cell.record_communication = False
            tracker.last_activity = Activity(
                th.stack(masks).transpose(1, 2),
                th.stack(attentions).transpose(1, 2) if attentions else None,
                th.stack(communications) if len(communications) == T else None,
            )
        return out, (cell.to_flat(h), cell.to_flat(c))
