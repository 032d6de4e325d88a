"""The RIM core against docs/RIM_SPEC.md: a naive reference, invariants, ablations and errors."""

from __future__ import annotations

import math

import pytest
import torch as th
import torch.nn.functional as F

from rim_agents import RIMCore
from rim_agents.rim_step import dropout
from rim_agents.rim_unroll import in_graph, supported

D_IN = 12


def make_core(seed: int = 0, **kwargs: object) -> RIMCore:
    th.manual_seed(seed)
    defaults: dict[str, object] = {
        "num_units": 5,
        "k_active": 3,
        "unit_size": 8,
        "input_key_size": 6,
        "comm_key_size": 4,
        "comm_heads": 2,
    }
    defaults.update(kwargs)
    return RIMCore(D_IN, **defaults)


def random_state(core: RIMCore, batch: int, seed: int = 1) -> tuple[th.Tensor, th.Tensor]:
    g = th.Generator().manual_seed(seed)
    shape = (1, batch, core.hidden_size)
    return th.randn(shape, generator=g) * 0.5, th.randn(shape, generator=g) * 0.5


# ---------------------------------------------------------------------------------------------
# A deliberately naive transcription of docs/RIM_SPEC.md, one batch element and one RIM at a time.
# ---------------------------------------------------------------------------------------------
def reference_step(
    core: RIMCore, x: th.Tensor, h: th.Tensor, c: th.Tensor, given: th.Tensor | None = None
) -> tuple[th.Tensor, th.Tensor, th.Tensor]:
    """One step for one element. ``x``: ``(N, d_in)``; ``h``, ``c``: ``(K, d_h)``; ``given``: the
    active mask ``(K,)`` to use instead of the top-k (a sampled selection's draw).

    Returns the new ``h``, ``c`` and the active mask ``(K,)``.
    """
    cell = core.cell
    K, k, d_h = cell.num_units, cell.k_active, cell.unit_size
    H, d_k = cell.input_heads, cell.input_key_size
    d_v = cell.input_value_size // H
    Hc, ck, cv = cell.comm_heads, cell.comm_key_size, cell.comm_value_size

    if cell.input_attention:
        x_null = th.cat([th.zeros(1, x.shape[1]), x], dim=0)  # null token first
        keys = (x_null @ cell.input_key.weight.T).view(-1, H, d_k)
        values = (x_null @ cell.input_value.weight.T).view(-1, H, d_v)
        reads, null_att = [], []
        for i in range(K):
            q = h[i] @ cell.input_query[i]
            if cell.input_query_bias:
                q = q + cell.input_query_b[i, 0]
            q = q.view(H, d_k)
            probs = th.softmax(th.einsum("he,nhe->hn", q, keys) / math.sqrt(d_k), dim=-1)
            reads.append(th.einsum("hn,nhv->hv", probs, values).reshape(-1))
            null_att.append(probs[:, 0].mean())
        order = th.argsort(th.stack(null_att))
        active = th.zeros(K, dtype=th.bool)
        active[order[:k]] = True
        if given is not None:
            active = given
    else:
        reads = [x.mean(0)] * K
        active = th.ones(K, dtype=th.bool)

    h_new, c_new = [], []
    for i in range(K):
        gi = reads[i] @ cell.weight_ih[i] + cell.bias_ih[i, 0]
        gh = h[i] @ cell.weight_hh[i] + cell.bias_hh[i, 0]
        if cell.cell_type == "lstm":
            gates = gi + gh
            ig, fg, og = (th.sigmoid(gates[j * d_h : (j + 1) * d_h]) for j in range(3))
            gg = th.tanh(gates[3 * d_h :])
            cn = fg * c[i] + ig * gg
            h_new.append(og * th.tanh(cn))
            c_new.append(cn)
        else:
            r = th.sigmoid(gi[:d_h] + gh[:d_h])
            z = th.sigmoid(gi[d_h : 2 * d_h] + gh[d_h : 2 * d_h])
            n = th.tanh(gi[2 * d_h :] + r * gh[2 * d_h :])
            h_new.append((1 - z) * n + z * h[i])
            c_new.append(c[i])
    tent = [h_new[i] if active[i] else h[i] for i in range(K)]
    out_h = list(tent)
    if cell.communication:
        qkv = [tent[i] @ cell.comm_qkv[i] for i in range(K)]
        qs = [z[: Hc * ck].view(Hc, ck) for z in qkv]
        ks = [z[Hc * ck : 2 * Hc * ck].view(Hc, ck) for z in qkv]
        vs = [z[2 * Hc * ck :].view(Hc, cv) for z in qkv]
        for i in range(K):
            if not active[i]:
                continue
            scores = th.stack([(qs[i] * ks[j]).sum(-1) / math.sqrt(ck) for j in range(K)], dim=-1)  # (Hc, K)
            probs = th.softmax(scores, dim=-1)
            att = th.stack([sum(probs[hh, j] * vs[j][hh] for j in range(K)) for hh in range(Hc)]).reshape(-1)
            out = att @ cell.comm_out[i] + cell.comm_out_bias[i, 0]
            update = th.tanh(out)
            if cell.comm_gate:
                update = update * th.sigmoid(out @ cell.comm_gate_weight[i] + cell.comm_gate_bias[i, 0])
            out_h[i] = tent[i] + update
    h_t = th.stack([out_h[i] if active[i] else h[i] for i in range(K)])
    c_t = th.stack([c_new[i] if active[i] else c[i] for i in range(K)])
    return h_t, c_t, active


def reference_unroll(
    core: RIMCore, x: th.Tensor, state: tuple[th.Tensor, th.Tensor], given: th.Tensor | None = None
) -> tuple[th.Tensor, th.Tensor]:
    """``x``: ``(T, B, d_in)`` or ``(T, B, N, d_in)``; ``given``: active masks ``(T, B, K)`` to use
    instead of the top-k. Returns outputs ``(T, B, K*d_h)`` and masks."""
    K, d_h = core.cell.num_units, core.cell.unit_size
    T, B = x.shape[:2]
    outs = th.zeros(T, B, K * d_h)
    masks = th.zeros(T, B, K, dtype=th.bool)
    for b in range(B):
        h = state[0][0, b].view(K, d_h)
        c = state[1][0, b].view(K, d_h)
        for t in range(T):
            xt = x[t, b] if x.dim() == 4 else x[t, b].unsqueeze(0)
            h, c, masks[t, b] = reference_step(core, xt, h, c, None if given is None else given[t, b])
            outs[t, b] = h.reshape(-1)
    return outs, masks


CONFIGS = [
    {},
    {"cell": "gru"},
    {"input_heads": 2, "input_value_size": 16},
    {"input_heads": 3, "input_value_size": 12, "cell": "gru"},
    {"communication": False},
    {"comm_gate": False},
    {"input_attention": False},
    {"k_active": 5},
    {"k_active": 1},
    {"input_query_bias": False},
    {"input_query_bias": False, "input_heads": 2, "input_value_size": 16},
]


@pytest.mark.parametrize("kwargs", CONFIGS, ids=lambda kw: ",".join(f"{k}={v}" for k, v in kw.items()) or "default")
@pytest.mark.parametrize("tokens", [False, True], ids=["vector", "tokens"])
def test_matches_naive_reference(kwargs: dict[str, object], tokens: bool) -> None:
    core = make_core(**kwargs).eval()
    core.track_activity = True
    th.manual_seed(3)
    x = th.randn(6, 4, 5, D_IN) if tokens else th.randn(6, 4, D_IN)
    state = random_state(core, 4)
    with th.no_grad():
        out, (h, c) = core(x, state)
        ref_out, ref_masks = reference_unroll(core, x, state)
    th.testing.assert_close(out, ref_out, atol=1e-5, rtol=1e-5)
    th.testing.assert_close(h[0], ref_out[-1], atol=1e-5, rtol=1e-5)
    assert th.equal(core.last_activity.mask, ref_masks)
    if core.cell.cell_type == "gru":
        assert th.count_nonzero(c) == 0


@pytest.mark.parametrize("tokens", [False, True])
@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_exactly_k_active_and_least_null_attention(tokens: bool, cell: str) -> None:
    core = make_core(cell=cell, k_active=2, input_heads=2, input_value_size=16).eval()
    core.track_activity = True
    x = th.randn(9, 7, 4, D_IN) if tokens else th.randn(9, 7, D_IN)
    core(x)
    mask, att = core.last_activity.mask, core.last_activity.input_attention
    assert mask.shape == (9, 7, 5) and mask.dtype == th.bool
    assert att.shape == (9, 7, 5, (4 if tokens else 1) + 1)
    assert th.all(mask.sum(-1) == 2)
    th.testing.assert_close(att.sum(-1), th.ones(9, 7, 5))
    null = att[..., 0]
    # Every active RIM attends less to the null token than every dormant one.
    max_active = null.masked_fill(~mask, -1.0).amax(-1)
    min_dormant = null.masked_fill(mask, 2.0).amin(-1)
    assert th.all(max_active <= min_dormant)


@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_dormant_state_carried_bit_for_bit(cell: str) -> None:
    core = make_core(cell=cell, input_dropout=0.1, comm_dropout=0.1).train()  # dropout: still no change to dormant RIMs
    core.track_activity = True
    K, d_h = core.cell.num_units, core.cell.unit_size
    h, c = random_state(core, 6)
    x = th.randn(8, 6, D_IN)
    dormant_seen = 0
    for t in range(8):
        h_new, c_new = core(x[t : t + 1], (h, c))[1]
        dormant = ~core.last_activity.mask[0]  # (B, K)
        prev_h, next_h = h[0].view(6, K, d_h), h_new[0].view(6, K, d_h)
        assert th.equal(next_h[dormant], prev_h[dormant])
        assert not th.equal(next_h[~dormant], prev_h[~dormant])
        if cell == "lstm":
            assert th.equal(c_new[0].view(6, K, d_h)[dormant], c[0].view(6, K, d_h)[dormant])
        dormant_seen += int(dormant.sum())
        h, c = h_new, c_new
    assert dormant_seen == 8 * 6 * (K - core.cell.k_active)


@pytest.mark.parametrize("cell", ["lstm", "gru"])
@pytest.mark.parametrize("tokens", [False, True])
def test_sequence_equals_repeated_single_steps(cell: str, tokens: bool) -> None:
    core = make_core(cell=cell).eval()
    x = th.randn(7, 3, 4, D_IN) if tokens else th.randn(7, 3, D_IN)
    state = random_state(core, 3)
    with th.no_grad():
        out, final = core(x, state)
        s = state
        step_outs, step_states = [], []
        for t in range(7):
            o, s = core(x[t : t + 1], s)
            step_outs.append(o[0])
            step_states.append(s)
        # The step module gives the same as the sequence module.
        o_cell, s_cell = core.cell(x[0], state)
    th.testing.assert_close(out, th.stack(step_outs), atol=1e-6, rtol=1e-6)
    th.testing.assert_close(final[0], s[0], atol=1e-6, rtol=1e-6)
    th.testing.assert_close(final[1], s[1], atol=1e-6, rtol=1e-6)
    th.testing.assert_close(o_cell, out[0], atol=1e-6, rtol=1e-6)
    th.testing.assert_close(s_cell[0], step_states[0][0], atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_reset_equals_fresh_unroll(cell: str) -> None:
    core = make_core(cell=cell).eval()
    T, B, s = 10, 3, 4
    x = th.randn(T, B, D_IN)
    state = random_state(core, B)
    starts = th.zeros(T, B)
    starts[s, 1] = 1.0
    with th.no_grad():
        out, _ = core(x, state, episode_starts=starts)
        fresh, _ = core(x[s:, 1:2])  # zero initial state
        no_reset, _ = core(x, state)
    th.testing.assert_close(out[s:, 1], fresh[:, 0], atol=1e-6, rtol=1e-6)
    # Before the reset, and for the other elements, nothing changes.
    assert th.equal(out[:s], no_reset[:s])
    assert th.equal(out[:, [0, 2]], no_reset[:, [0, 2]])
    # A reset at t=0 equals a zero initial state.
    starts0 = th.zeros(T, B)
    starts0[0] = 1.0
    with th.no_grad():
        th.testing.assert_close(core(x, state, episode_starts=starts0)[0], core(x)[0], atol=0, rtol=0)


def test_batch_elements_do_not_interact() -> None:
    core = make_core().eval()
    x = th.randn(6, 4, D_IN)
    state = random_state(core, 4)
    x2, h2 = x.clone(), state[0].clone()
    x2[:, 2] = th.randn(6, D_IN) * 5
    h2[0, 2] = 3.0
    with th.no_grad():
        a, _ = core(x, state)
        b, _ = core(x2, (h2, state[1]))
    th.testing.assert_close(a[:, [0, 1, 3]], b[:, [0, 1, 3]], atol=1e-6, rtol=0)
    assert not th.allclose(a[:, 2], b[:, 2])


@pytest.mark.parametrize("kwargs", [{}, {"cell": "gru"}, {"input_heads": 2, "input_value_size": 16}])
@pytest.mark.parametrize("tokens", [False, True])
def test_gradients_reach_every_parameter(kwargs: dict[str, object], tokens: bool) -> None:
    core = make_core(**kwargs).train()
    x = th.randn(12, 4, 3, D_IN) if tokens else th.randn(12, 4, D_IN)
    out, _ = core(x)
    (out * th.randn_like(out)).sum().backward()
    for name, p in core.named_parameters():
        assert p.grad is not None, name
        assert th.count_nonzero(p.grad) > 0, name


@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_rim_dormant_for_every_element_gets_no_cell_gradient(cell: str) -> None:
    core = make_core(cell=cell, k_active=2).eval()
    core.track_activity = True
    cell_params = ["weight_ih", "weight_hh", "bias_ih", "bias_hh", "input_query", "input_query_b"]
    found = False
    for seed in range(50):
        th.manual_seed(seed)
        x = th.randn(1, 2, D_IN)
        state = random_state(core, 2, seed=seed)
        core.zero_grad()
        out, _ = core(x, state)
        mask = core.last_activity.mask[0]  # (B, K)
        always_dormant = (~mask).all(0)
        if not always_dormant.any():
            continue
        found = True
        (out * th.randn_like(out)).sum().backward()
        for name in cell_params:
            grad = getattr(core.cell, name).grad
            assert grad is not None
            assert th.count_nonzero(grad[always_dormant]) == 0, name
            assert th.count_nonzero(grad[mask.any(0)]) > 0, name
        break
    assert found, "no input left a RIM dormant for both elements"


def test_no_gradient_through_the_selection() -> None:
    """The hard top-k's gradients equal those of the same unroll with its masks fed in as constants."""
    core = make_core(input_dropout=0.0, comm_dropout=0.0)
    x = th.randn(5, 3, D_IN)
    proj = th.randn(5, 3, core.hidden_size)
    recorded: list[th.Tensor] = []
    choose = core.cell._top_k_mask

    def record(null_attention: th.Tensor) -> th.Tensor:
        recorded.append(choose(null_attention))
        return recorded[-1]

    grads = []
    for select in (record, lambda null_attention: recorded.pop(0).detach()):
        core.zero_grad()
        core.cell._top_k_mask = select  # type: ignore[method-assign]
        out, _ = core(x)
        (out * proj).sum().backward()
        grads.append(th.cat([p.grad.flatten() for p in core.parameters()]))
    assert not recorded
    th.testing.assert_close(grads[0], grads[1], rtol=0, atol=0)


def test_null_token_key_and_value_are_zero() -> None:
    core = make_core()
    assert core.cell.input_key.bias is None and core.cell.input_value.bias is None
    z = th.zeros(1, D_IN)
    assert th.count_nonzero(core.cell.input_key(z)) == 0
    assert th.count_nonzero(core.cell.input_value(z)) == 0


@pytest.mark.parametrize("tokens", [False, True])
def test_zero_state_selection_depends_on_the_input(tokens: bool) -> None:
    """At an episode start every state is zero. With the query bias the RIMs still attend to the
    input differently, so which RIMs start depends on the input; without it they all tie at the
    same null attention and the tie-break (torch.topk's, not the input) picks one fixed set."""
    th.manual_seed(0)
    x = th.randn(1, 64, 3, D_IN) if tokens else th.randn(1, 64, D_IN)
    chosen = {}
    for bias in (True, False):
        core = make_core(input_query_bias=bias, k_active=2).eval()
        core.track_activity = True
        core(x)
        null = core.last_activity.input_attention[0, ..., 0]  # (B, K)
        chosen[bias] = {tuple(row.nonzero().flatten().tolist()) for row in core.last_activity.mask[0]}
        if not bias:
            assert th.equal(null, null[:1, :1].expand_as(null))  # one value for every RIM and input
            assert len(chosen[bias]) == 1
    assert len(chosen[True]) > 1


def test_query_bias_leaves_the_null_score_zero() -> None:
    """The bias enters the score only through the input's key: an all-zero input (the null token's
    twin, key zero) gets score 0 like the null token, so every RIM attends half to each."""
    core = make_core(k_active=2).eval()
    core.track_activity = True
    core(th.zeros(1, 5, D_IN))
    th.testing.assert_close(core.last_activity.input_attention[..., 0], th.full((1, 5, core.cell.num_units), 0.5))


def test_a_zero_initialised_communication_starts_closed_and_learns() -> None:
    """``comm_zero_init``: a fresh core computes exactly what the core without communication does
    (sparse or not), its output map gets a gradient at once, and one step opens the branch."""
    x = th.randn(5, 3, D_IN)
    for k in (2, 5):
        closed = make_core(k_active=k, comm_zero_init=True)  # every make_core starts from seed 0
        ablated = make_core(k_active=k, communication=False)
        default = make_core(k_active=k)
        out = closed(x)[0]
        assert th.equal(out, ablated(x)[0]) and not th.allclose(out, default(x)[0])
        loss = (out * th.randn_like(out)).sum()
        loss.backward()
        grad = closed.cell.comm_out.grad
        assert grad is not None and grad.abs().max() > 0
        with th.no_grad():
            closed.cell.comm_out -= 0.1 * grad
        assert not th.allclose(closed(x)[0], ablated(x)[0])


def test_initial_state_is_zero() -> None:
    core = make_core()
    h, c = core.initial_state(3)
    assert h.shape == c.shape == (1, 3, core.hidden_size)
    assert th.count_nonzero(h) == 0 and th.count_nonzero(c) == 0
    x = th.randn(4, 3, D_IN)
    th.testing.assert_close(core.eval()(x)[0], core(x, (h, c))[0], atol=0, rtol=0)


def test_nn_lstm_calling_convention() -> None:
    core = make_core()
    assert core.input_size == D_IN
    assert core.hidden_size == 5 * 8
    assert core.num_layers == 1
    out, (h, c) = core(th.randn(3, 2, D_IN), core.initial_state(2))
    assert out.shape == (3, 2, 40) and h.shape == c.shape == (1, 2, 40)


# ------------------------------------------------------------------------------------ ablations
def test_ablation_no_input_attention_reads_input_and_all_active() -> None:
    core = make_core(input_attention=False).eval()
    core.track_activity = True
    assert not hasattr(core.cell, "input_query") and not hasattr(core.cell, "input_key")
    x = th.randn(5, 3, D_IN)
    core(x)
    assert core.last_activity.mask.all()
    assert core.last_activity.input_attention is None
    # Every RIM's cell reads the raw input: changing RIM 2's input weights changes RIM 2's state
    # from the first step (no communication here, so only RIM 2's).
    isolated = make_core(input_attention=False, communication=False).eval()
    x1 = th.randn(1, 3, D_IN)
    with th.no_grad():
        before = isolated(x1)[0].view(3, 5, 8)
        isolated.cell.weight_ih[2].mul_(2.0)
        after = isolated(x1)[0].view(3, 5, 8)
    assert not th.allclose(before[:, 2], after[:, 2])
    assert th.equal(before[:, [0, 1, 3, 4]], after[:, [0, 1, 3, 4]])


def test_ablation_k_equals_k_all_active() -> None:
    core = make_core(k_active=5).eval()
    core.track_activity = True
    core(th.randn(4, 3, D_IN))
    assert core.last_activity.mask.all()


def test_ablation_no_communication_isolates_rims() -> None:
    """Without communication (and all RIMs active) a RIM's state depends on itself and the input only."""
    K, d_h = 5, 8
    for communication in (False, True):
        core = make_core(k_active=K, communication=communication).eval()
        assert hasattr(core.cell, "comm_qkv") == communication
        x = th.randn(3, 2, D_IN)
        h, c = random_state(core, 2)
        h2 = h.clone().view(1, 2, K, d_h)
        h2[:, :, 1] += 1.0
        with th.no_grad():
            a = core(x, (h, c))[0].view(3, 2, K, d_h)
            b = core(x, (h2.view(1, 2, K * d_h), c))[0].view(3, 2, K, d_h)
        others = [0, 2, 3, 4]
        assert not th.allclose(a[:, :, 1], b[:, :, 1])
        if communication:
            assert not th.allclose(a[:, :, others], b[:, :, others])
        else:
            assert th.equal(a[:, :, others], b[:, :, others])


def test_gru_cell_shapes_and_zero_c() -> None:
    core = make_core(cell="gru")
    assert core.cell.weight_hh.shape == (5, 8, 3 * 8)
    _, (h, c) = core(th.randn(3, 2, D_IN), random_state(core, 2))
    assert th.count_nonzero(c) == 0 and th.count_nonzero(h) > 0


def test_mask_output_zeroes_dormant_rims_in_output_only() -> None:
    core = make_core(mask_output=True).eval()
    core.track_activity = True
    out, (h, _) = core(th.randn(1, 4, D_IN), random_state(core, 4))
    mask = core.last_activity.mask[0]
    out = out[0].view(4, 5, 8)
    assert th.count_nonzero(out[~mask]) == 0
    assert th.count_nonzero(h[0].view(4, 5, 8)[~mask]) > 0


def test_same_seed_same_output_with_dropout() -> None:
    results = []
    for _ in range(2):
        core = make_core(seed=7, input_dropout=0.1, comm_dropout=0.1).train()
        th.manual_seed(11)
        x = th.randn(6, 3, D_IN)
        results.append(core(x)[0])
    assert th.equal(results[0], results[1])
    core = make_core(seed=8, input_dropout=0.1, comm_dropout=0.1).train()
    th.manual_seed(11)
    assert not th.equal(core(th.randn(6, 3, D_IN))[0], results[0])


@pytest.mark.parametrize("rate", [0.1, 0.5])
def test_the_steps_dropout_is_f_dropout_on_the_cpu(rate: float) -> None:
    """``rim_step.dropout`` (every step's and the hand-written pass's) draws and computes what
    ``F.dropout`` does on the CPU, bit for bit, and returns the scaled mask it applied."""
    x = th.randn(6, 8, 17, requires_grad=True)
    th.manual_seed(5)
    expected = F.dropout(x, rate, training=True)
    th.manual_seed(5)
    got, noise = dropout(x, rate)
    assert noise is not None and th.equal(got, expected) and th.equal(got, x * noise)
    assert ((noise == 0) | (noise == th.tensor(1 / (1 - rate)))).all() and (noise == 0).any()
    got.sum().backward()
    assert x.grad is not None and th.equal(x.grad, noise)
    same, none = dropout(x, 0.0)
    assert same is x and none is None


def test_activity_not_kept_unless_asked() -> None:
    core = make_core()
    core(th.randn(2, 2, D_IN))
    assert core.last_activity is None


# --------------------------------------------------------------------------------------- errors
@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"k_active": 0}, "k_active=0"),
        ({"k_active": 6}, "k_active=6"),
        ({"num_units": 0}, "num_units=0"),
        ({"unit_size": -3}, "unit_size=-3"),
        ({"input_heads": 3, "input_value_size": 16}, "input_value_size=16 is not divisible by input_heads=3"),
        ({"comm_key_size": 0}, "comm_key_size=0"),
        ({"cell": "rnn"}, "cell='rnn'"),
        ({"input_dropout": 1.0}, "input_dropout=1.0"),
    ],
)
def test_bad_settings_raise(kwargs: dict[str, object], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        make_core(**kwargs)


def test_bad_shapes_raise() -> None:
    core = make_core()
    with pytest.raises(ValueError, match=r"input has shape \(3, 2, 7\)"):
        core(th.randn(3, 2, 7))
    with pytest.raises(ValueError, match=r"input has shape \(2, 12\)"):
        core(th.randn(2, D_IN))
    with pytest.raises(ValueError, match=r"h0 has shape \(1, 2, 39\)"):
        core(th.randn(3, 2, D_IN), (th.zeros(1, 2, 39), th.zeros(1, 2, 40)))
    with pytest.raises(ValueError, match=r"episode_starts has shape \(3,\)"):
        core(th.randn(3, 2, D_IN), None, th.zeros(3))


# ------------------------------------------------------------------------- selection options
NO_DROPOUT = {"input_dropout": 0.0, "comm_dropout": 0.0}
SELECTION_OPTIONS = [
    {"selection": "straight_through"},
    {"balance_coef": 0.5},
    {"selection": "straight_through", "balance_coef": 0.5, "selection_temperature": 0.2},
    {"selection": "sampled"},  # asked for no draw: the top-k, the draw's mode
]


@pytest.mark.parametrize("options", SELECTION_OPTIONS, ids=lambda kw: ",".join(f"{k}={v}" for k, v in kw.items()))
@pytest.mark.parametrize("cell", ["lstm", "gru"])
@pytest.mark.parametrize("tokens", [False, True], ids=["vector", "tokens"])
def test_selection_options_keep_the_hard_rule_forward(options: dict, cell: str, tokens: bool) -> None:
    """With gradients on (training), every option's states and choices are the paper's rule's bit
    for bit, and match the naive reference."""
    hard = make_core(cell=cell, **NO_DROPOUT).train()
    other = make_core(cell=cell, **NO_DROPOUT, **options).train()
    hard.track_activity = other.track_activity = True
    th.manual_seed(5)
    x = th.randn(6, 3, 4, D_IN) if tokens else th.randn(6, 3, D_IN)
    state = random_state(hard, 3)
    out_h, (h_h, c_h) = hard(x, state)
    out_o, (h_o, c_o) = other(x, state)
    assert out_o.requires_grad
    assert th.equal(out_o, out_h) and th.equal(h_o, h_h) and th.equal(c_o, c_h)
    assert th.equal(other.last_activity.mask, hard.last_activity.mask)
    with th.no_grad():
        ref_out, ref_masks = reference_unroll(other, x, state)
    th.testing.assert_close(out_o.detach(), ref_out, atol=1e-5, rtol=1e-5)
    assert th.equal(other.last_activity.mask, ref_masks)


def _always_dormant_case(core: RIMCore) -> tuple[th.Tensor, tuple[th.Tensor, th.Tensor], th.Tensor]:
    """An input and state (T=1, B=2) that leave some RIM dormant for both elements."""
    core.track_activity = True
    for seed in range(50):
        th.manual_seed(seed)
        x = th.randn(1, 2, D_IN)
        state = random_state(core, 2, seed=seed)
        with th.no_grad():
            core(x, state)
        always_dormant = (~core.last_activity.mask[0]).all(0)
        if always_dormant.any():
            return x, state, always_dormant
    raise AssertionError("no input left a RIM dormant for both elements")


@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_straight_through_trains_the_choice_not_the_dormant_cell(cell: str) -> None:
    grads = {}
    for selection in ("hard", "straight_through"):
        core = make_core(cell=cell, k_active=2, selection=selection, **NO_DROPOUT)
        x, state, always_dormant = _always_dormant_case(core)
        out, _ = core(x, state)
        (out * th.randn(out.shape, generator=th.Generator().manual_seed(0))).sum().backward()
        grads[selection] = {n: p.grad for n, p in core.cell.named_parameters()}
        for name in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"):
            assert th.count_nonzero(grads[selection][name][always_dormant]) == 0, (selection, name)
    for name in ("input_query", "input_query_b"):
        assert th.count_nonzero(grads["hard"][name][always_dormant]) == 0
        assert th.count_nonzero(grads["straight_through"][name][always_dormant]) > 0, name


@pytest.mark.parametrize("cell", ["lstm", "gru"])
@pytest.mark.parametrize("tokens", [False, True], ids=["vector", "tokens"])
def test_the_straight_through_gradient_stays_out_of_the_state(cell: str, tokens: bool) -> None:
    """The surrogate is zero forward, so through the state it would add to the backward recurrence
    a term the forward pass never has. Detached (the default), every gradient but the selection's
    own (queries, keys, input) is the hard rule's exactly; with ``st_state_gradient`` the initial
    state's gradient differs too."""
    th.manual_seed(3)
    x = th.randn(8, 3, 4, D_IN) if tokens else th.randn(8, 3, D_IN)
    state = random_state(make_core(), 3)
    weights = th.randn(8, 3, 5 * 8, generator=th.Generator().manual_seed(0))
    grads = {}
    for name, options in (
        ("hard", {}),
        ("st", {"selection": "straight_through"}),
        ("st_state", {"selection": "straight_through", "st_state_gradient": True}),
    ):
        core = make_core(cell=cell, **NO_DROPOUT, **options)
        core.cell.handwritten_backward = False  # bit for bit: autograd's hard rule, as the options use
        h0, c0 = (s.clone().requires_grad_() for s in state)
        xg = x.clone().requires_grad_()
        out, _ = core(xg, (h0, c0))
        (out * weights).sum().backward()
        grads[name] = {
            "h0": h0.grad,
            "c0": c0.grad,
            "x": xg.grad,
            **{n: p.grad for n, p in core.cell.named_parameters()},
        }
    selection_own = {"input_query", "input_query_b", "input_key.weight", "x"}
    for key, hard in grads["hard"].items():
        if hard is None:  # the GRU's c
            assert grads["st"][key] is None, key
        elif key in selection_own:
            assert not th.equal(grads["st"][key], hard), key
        else:
            assert th.equal(grads["st"][key], hard), key
    assert not th.allclose(grads["st_state"]["h0"], grads["hard"]["h0"])


def test_selection_noise_acts_in_training_mode_only() -> None:
    core = make_core(k_active=2, selection_noise=0.3, **NO_DROPOUT)
    hard = make_core(k_active=2, **NO_DROPOUT)
    core.track_activity = hard.track_activity = True
    x = th.randn(20, 8, D_IN)
    with th.no_grad():
        core.eval()(x)
        hard.eval()(x)
        assert th.equal(core.last_activity.mask, hard.last_activity.mask)
        h, c = random_state(core, 8)
        K, d_h = core.cell.num_units, core.cell.unit_size
        changed = 0
        hard_masks = []
        for t in range(20):
            hard.eval()(x[t : t + 1], (h, c))
            hard_masks.append(hard.last_activity.mask[0])
            h_new, c_new = core.train()(x[t : t + 1], (h, c))[1]
            mask = core.last_activity.mask[0]
            assert th.all(mask.sum(-1) == 2)
            dormant = ~mask
            assert th.equal(h_new[0].view(8, K, d_h)[dormant], h[0].view(8, K, d_h)[dormant])
            assert th.equal(c_new[0].view(8, K, d_h)[dormant], c[0].view(8, K, d_h)[dormant])
            changed += int((mask != hard_masks[-1]).any(-1).sum())
            h, c = h_new, c_new
    assert changed > 0  # the noise changed some choices (with std 0.3 on attentions in [0, 1])


def test_balance_loss_value_and_gradient() -> None:
    """The logged loss is (K/k) sum_i f_i P_i of the recorded choices and attentions; its gradient is
    added, with weight balance_coef, to that of whatever loss is computed from the output."""
    coef = 0.7
    x = th.randn(7, 4, D_IN)
    state = random_state(make_core(), 4)
    proj = th.randn(7, 4, 5 * 8)
    grads = []
    for balance, scale in ((coef, 1.0), (0.0, 1.0), (coef, 0.0)):
        core = make_core(balance_coef=balance, **NO_DROPOUT)
        core.track_activity = True
        out, _ = core(x, state)
        (out * proj * scale).sum().backward()
        grads.append(th.cat([p.grad.flatten() for p in core.parameters()]))
        if balance:
            mask = core.last_activity.mask.float()  # (T, B, K)
            att = 1.0 - core.last_activity.input_attention[..., 0]
            share = att / att.sum(-1, keepdim=True)
            expected = 5 / 3 * (mask.mean(dim=(0, 1)) * share.mean(dim=(0, 1))).sum()
            th.testing.assert_close(core.balance_losses[-1], expected)
    th.testing.assert_close(grads[0], grads[1] + grads[2])
    assert grads[2].abs().sum() > 0
    # Nothing is added without gradients, or when every RIM is active.
    core = make_core(balance_coef=coef)
    with th.no_grad():
        core(x, state)
    all_active = make_core(balance_coef=coef, k_active=5)
    all_active(x, state)
    assert core.balance_losses == [] and all_active.balance_losses == []


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"selection": "soft"}, "selection='soft' is invalid: use one of hard, straight_through, sampled"),
        ({"selection_temperature": 0.0}, "selection_temperature"),
        ({"selection_noise": -1.0}, "selection_noise"),
        ({"balance_coef": -0.1}, "balance_coef"),
    ],
)
def test_bad_selection_settings_raise(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        make_core(**kwargs)


def test_communication_attention_is_tracked_only_when_asked() -> None:
    core = make_core().eval()
    x = th.randn(4, 3, D_IN)
    core(x)
    assert core.last_activity is None
    core.track_activity = True
    core(x)
    comm = core.last_activity.communication
    assert comm.shape == (4, 3, 5, 5)
    th.testing.assert_close(comm.sum(-1), th.ones(4, 3, 5))
    quiet = make_core(communication=False).eval()
    quiet.track_activity = True
    quiet(x)
    assert quiet.last_activity.communication is None and quiet.last_activity.mask is not None


def test_annealed_k_schedule_and_exactly_k_now_active() -> None:
    core = make_core(k_active=2, k_anneal=0.5)
    cell = core.cell
    assert cell.k_now == 2  # without progress reports: the paper's fixed k
    assert [cell.set_progress(f) for f in (0.0, 0.1, 0.25, 0.4, 0.5, 0.9)] == [5, 4, 4, 3, 2, 2]
    core.track_activity = True
    for fraction, k in ((0.0, 5), (0.3, 3), (1.0, 2)):
        cell.set_progress(fraction)
        core(th.randn(3, 4, D_IN))
        assert th.all(core.last_activity.mask.sum(-1) == k)
    assert make_core(k_active=2).cell.set_progress(0.0) == 2  # no annealing
    with pytest.raises(ValueError, match=r"k_anneal=1\.5"):
        make_core(k_anneal=1.5)


def test_one_set_of_rim_settings() -> None:
    """RIMCell's settings are RIMConfig's: a config, keywords over it, and the same defaults."""
    from rim_agents.config import RIMConfig

    settings = RIMConfig(num_units=5, k_active=3, unit_size=8, input_key_size=6, comm_key_size=4, comm_heads=2)
    by_config = RIMCore(D_IN, settings).cell
    by_keywords = make_core().cell
    assert by_config.config == by_keywords.config == settings
    assert RIMCore(D_IN, settings, k_active=2).cell.k_active == 2
    assert RIMCore(D_IN).cell.config == RIMConfig()
    with pytest.raises(ValueError, match="k_active=9"):  # checked when made
        RIMConfig(k_active=9)
    with pytest.raises(TypeError, match=r"unknown RIM settings \['bogus'\]"):
        make_core(bogus=1)


# ------------------------------------------------------------------------- sampled selection
def _naive_plackett_luce(logits: list[float], order: list[int]) -> float:
    """The probability of drawing ``order`` without replacement, each draw by softmax over the rest."""
    p, left = 1.0, list(range(len(logits)))
    for i in order:
        p *= math.exp(logits[i]) / sum(math.exp(logits[j]) for j in left)
        left.remove(i)
    return p


@pytest.mark.parametrize("cell", ["lstm", "gru"])
@pytest.mark.parametrize("tokens", [False, True], ids=["vector", "tokens"])
def test_sampled_selection_draws_k_and_matches_the_reference(cell: str, tokens: bool) -> None:
    """A drawn choice activates exactly k distinct RIMs per step and element, the unroll is the naive
    reference's with those RIMs active (dormant ones kept bit for bit there too), and the draw's
    log-probability is the Plackett-Luce probability of its order under softmax(-null / T)."""
    from rim_agents.rim import SelectionRequest

    core = make_core(cell=cell, k_active=2, selection="sampled", selection_temperature=0.1, **NO_DROPOUT)
    core.track_activity = True
    th.manual_seed(7)
    x = th.randn(6, 3, 4, D_IN) if tokens else th.randn(6, 3, D_IN)
    state = random_state(core, 3)
    core.selection_request = SelectionRequest(sample=True)
    with th.no_grad():
        out, _ = core(x, state)
    assert core.selection_request is None  # consumed by the call
    order, log_prob = core.last_selection
    K, k = 5, 2
    assert order.shape == (6, 3, K) and (order[..., k:] == -1).all()
    drawn = th.zeros(6, 3, K, dtype=th.bool).scatter_(2, order[..., :k], True)
    assert (drawn.sum(-1) == k).all()  # k distinct RIMs
    assert th.equal(core.last_activity.mask, drawn)
    top_k = make_core(cell=cell, k_active=2, **NO_DROPOUT)
    top_k.track_activity = True
    top_k(x, state)
    assert not th.equal(top_k.last_activity.mask, drawn)  # a draw, not the top-k
    with th.no_grad():
        ref_out, _ = reference_unroll(core, x, state, given=drawn)
    th.testing.assert_close(out, ref_out, atol=1e-5, rtol=1e-5)
    null = core.last_activity.input_attention[..., 0]  # (T, B, K)
    for t in range(6):
        for b in range(3):
            logits = (-null[t, b] / 0.1).tolist()
            expected = _naive_plackett_luce(logits, order[t, b, :k].tolist())
            assert math.isclose(log_prob[t, b].exp().item(), expected, rel_tol=1e-4)


def test_a_replayed_draw_gives_the_same_unroll_and_trains_the_choice() -> None:
    from rim_agents.rim import SelectionRequest

    core = make_core(k_active=2, selection="sampled", **NO_DROPOUT)
    x = th.randn(8, 4, D_IN)
    state = random_state(core, 4)
    core.selection_request = SelectionRequest(sample=True)
    with th.no_grad():
        out, (h, c) = core(x, state)
    drawn = core.last_selection
    core.selection_request = SelectionRequest(given=drawn.order)
    out2, (h2, c2) = core(x, state)
    assert th.equal(out2, out) and th.equal(h2, h) and th.equal(c2, c)
    assert th.equal(core.last_selection.order, drawn.order)
    th.testing.assert_close(core.last_selection.log_prob.detach(), drawn.log_prob, atol=0, rtol=0)
    # The policy gradient of the draw reaches every RIM's query, dormant ones included.
    core.last_selection.log_prob.sum().backward()
    assert all(th.count_nonzero(g) > 0 for g in core.cell.input_query.grad)
    # A request is refused by a core that does not sample, and a wrongly shaped draw is refused.
    with pytest.raises(ValueError, match="selection='sampled'"):
        hard = make_core(k_active=2)
        hard.selection_request = SelectionRequest(sample=True)
        hard(x, state)
    core.selection_request = SelectionRequest(given=drawn.order[:, :2])
    with pytest.raises(ValueError, match=r"given selection has shape \(8, 2, 5\)"):
        core(x, state)


def test_draws_follow_the_plackett_luce_probabilities() -> None:
    """Gumbel top-k draws each ordered choice as often as its Plackett-Luce probability says."""
    import itertools

    from rim_agents.rim import plackett_luce_log_prob

    cell = make_core(num_units=3, k_active=2, selection="sampled", selection_temperature=0.1).cell
    null = th.tensor([0.40, 0.45, 0.55]).unsqueeze(1).expand(3, 40_000).contiguous()
    th.manual_seed(0)
    mask, order, log_prob = cell._sampled_mask(null, None)
    assert (mask.sum(0) == 2).all()
    th.testing.assert_close(log_prob, plackett_luce_log_prob(null / -0.1, order))
    logits = (-null[:, 0] / 0.1).tolist()
    total = 0.0
    for pair in itertools.permutations(range(3), 2):
        p = _naive_plackett_luce(logits, list(pair))
        total += p
        hits = ((order[0] == pair[0]) & (order[1] == pair[1])).float().mean().item()
        assert abs(hits - p) < 0.01, (pair, hits, p)  # 40k draws: standard error < 0.0025
        one = plackett_luce_log_prob(null[:, :1] / -0.1, th.tensor(pair).view(2, 1)).exp().item()
        assert math.isclose(one, p, rel_tol=1e-5)
    assert math.isclose(total, 1.0, rel_tol=1e-6)


def test_leak_anneal_sets_dormancy_in_gradually() -> None:
    """``anneal="leak"``: k RIMs are chosen from the start; a dormant RIM moves ``leak`` of the way to
    its new state, leak falling from 1 (every RIM updates: the all-active core) to 0 (the paper's
    rule, dormant states bit for bit)."""
    core = make_core(k_active=2, k_anneal=0.5, anneal="leak", **NO_DROPOUT)
    cell = core.cell
    assert cell.leak_now == 0.0  # without progress reports: the paper's rule
    assert [cell.set_progress(f) for f in (0.0, 0.25, 1.0)] == [2, 2, 2]  # k never changes
    leaks = []
    for fraction in (0.0, 0.1, 0.25, 0.5, 0.9):
        cell.set_progress(fraction)
        leaks.append(cell.leak_now)
    assert leaks == pytest.approx([1.0, 0.8, 0.5, 0.0, 0.0])
    x, state = th.randn(5, 3, D_IN), random_state(core, 3)
    all_active = make_core(k_active=5, **NO_DROPOUT)
    hard = make_core(k_active=2, **NO_DROPOUT)
    cell.set_progress(0.0)
    th.testing.assert_close(core(x, state)[0], all_active(x, state)[0], atol=1e-6, rtol=0)
    cell.set_progress(0.7)
    assert th.equal(core(x, state)[0], hard(x, state)[0])
    # In between, without communication (to isolate the write): dormant h and c are interpolated.
    quiet = make_core(k_active=2, k_anneal=0.5, anneal="leak", communication=False, **NO_DROPOUT)
    quiet.track_activity = True
    quiet.cell.set_progress(0.35)  # leak 0.3
    x1 = x[:1]
    (h, c) = quiet(x1, state)[1]
    new_h, new_c = make_core(k_active=5, communication=False, **NO_DROPOUT)(x1, state)[1]
    active = quiet.last_activity.mask[0].repeat_interleave(8, dim=-1)  # (B, K*d_h)
    th.testing.assert_close(h[0], th.where(active, new_h[0], state[0][0] + 0.3 * (new_h[0] - state[0][0])))
    th.testing.assert_close(c[0], th.where(active, new_c[0], state[1][0] + 0.3 * (new_c[0] - state[1][0])))
    assert not active.all() and active.any()
    with pytest.raises(ValueError, match="anneal='soft' is invalid"):
        make_core(anneal="soft")
    with pytest.raises(ValueError, match="anneal=leak changes the step"):
        make_core(k_anneal=0.5, anneal="leak", compile="default")


@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_forward_does_exactly_the_matrix_arithmetic_of_its_cost_model(cell: str) -> None:
    """Every matrix product of a forward pass, counted by torch's flop counter, is one the cost
    model in benchmarks/results/README.md names (input terms once per sequence, four state-dependent
    products per step): no product is computed twice, per head or per dormant RIM."""
    from torch.utils.flop_counter import FlopCounterMode

    K, d_h, d_k, value, Hc, ck = 4, 6, 5, 12, 2, 3
    core = make_core(
        num_units=K, k_active=3, unit_size=d_h, cell=cell, input_heads=1, input_key_size=d_k,
        input_value_size=value, comm_heads=Hc, comm_key_size=ck, comm_gate=True, input_query_bias=True,
    )  # fmt: skip
    T, B = 7, 3
    x = th.randn(T, B, D_IN)
    state = random_state(core, B)
    with FlopCounterMode(display=False) as counter:
        core(x, state, th.zeros(T, B))
    G = (4 if cell == "lstm" else 3) * d_h
    per_sample = 2 * (
        D_IN * d_k + D_IN * value  # shared key and value maps
        + K * d_k * d_h + K * d_k  # each RIM's query folded into the key, and its bias
        + K * value * G  # each RIM's cell input map folded into the value
        + K * d_h * G  # the recurrent map
        + K * d_h * Hc * 3 * ck + K * Hc * ck * d_h + K * d_h * d_h  # communication: qkv, output, gate
    )  # fmt: skip
    assert counter.get_total_flops() == per_sample * T * B


# ------------------------------------------------------------------- the hand-written backward
def _train_once(core: RIMCore, x: th.Tensor, state: tuple[th.Tensor, th.Tensor], starts: th.Tensor):
    """Outputs, final state and the gradients of every parameter, the input and the initial state
    under a fixed random projection of all three outputs."""
    h0, c0 = (s.detach().requires_grad_() for s in state)
    x = x.detach().requires_grad_()
    core.zero_grad()
    th.manual_seed(11)  # the same dropout draws
    out, (h, c) = core(x, (h0, c0), starts)
    g = th.Generator().manual_seed(7)
    loss = sum((t * th.randn(t.shape, generator=g)).sum() for t in (out, h, c))
    loss.backward()
    grads = {n: p.grad for n, p in core.named_parameters()}
    grads.update(x=x.grad, h0=h0.grad, c0=c0.grad)
    return (out, h, c), grads, in_graph(out)


HANDWRITTEN_CONFIGS = [
    {},
    {"k_active": 5},
    {"k_active": 1},
    {"communication": False},
    {"comm_gate": False},
    {"input_query_bias": False},
    {"comm_heads": 1, "comm_key_size": 5, "comm_value_size": 3},
    {"input_dropout": 0.2, "comm_dropout": 0.3},
    {"selection": "straight_through"},
    {"selection": "straight_through", "st_state_gradient": True, "selection_temperature": 0.3},
]


@pytest.mark.parametrize(
    "kwargs", HANDWRITTEN_CONFIGS, ids=lambda kw: ",".join(f"{k}={v}" for k, v in kw.items()) or "default"
)
@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_the_handwritten_backward_gives_autograds_gradients(cell: str, kwargs: dict[str, object]) -> None:
    """The common case trains through rim_unroll.HandwrittenUnroll: the same outputs and state as
    the step-by-step autograd unroll, and the same gradient for every parameter, the input and the
    initial state, episode starts inside the batch included; with dropout, the same draws."""
    core = make_core(cell=cell, **kwargs).train()
    with th.no_grad():  # every path away from its zero initialisation, so that each one counts
        for p in core.parameters():
            p.add_(0.3 * th.randn_like(p))
    x = th.randn(9, 4, D_IN)
    starts = th.zeros(9, 4)
    starts[3, 1] = starts[6, 0] = starts[6, 2] = 1.0
    state = random_state(core, 4)
    fast, fast_grads, used = _train_once(core, x, state, starts)
    assert used
    core.cell.handwritten_backward = False
    slow, slow_grads, used = _train_once(core, x, state, starts)
    assert not used
    for a, b in zip(fast, slow, strict=True):
        th.testing.assert_close(a, b, rtol=0, atol=1e-6)
    assert fast_grads.keys() == slow_grads.keys()
    for name, grad in slow_grads.items():
        if grad is None:
            assert fast_grads[name] is None or th.count_nonzero(fast_grads[name]) == 0, name
        else:
            assert th.count_nonzero(grad) > 0 or name == "c0", name
            th.testing.assert_close(fast_grads[name], grad, rtol=1e-4, atol=1e-5, msg=name)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"input_heads": 2, "input_value_size": 16},
        {"input_attention": False},
        {"balance_coef": 0.1},
        {"selection_noise": 0.5},
        {"mask_output": True},
        {"k_anneal": 0.5, "anneal": "leak"},
    ],
    ids=lambda kw: ",".join(f"{k}={v}" for k, v in kw.items()),
)
def test_every_other_case_trains_through_autograd(kwargs: dict[str, object]) -> None:
    core = make_core(**kwargs).train()
    core.cell.set_progress(0.0)
    out, _ = core(th.randn(5, 3, D_IN), random_state(core, 3))
    assert out.requires_grad and not in_graph(out)


def test_the_handwritten_backward_leaves_tokens_tracking_and_inference_to_the_step() -> None:
    core = make_core().train()
    out, _ = core(th.randn(5, 3, 4, D_IN))  # tokens
    assert not in_graph(out)
    core.track_activity = True
    out, _ = core(th.randn(5, 3, D_IN))
    assert not in_graph(out) and core.last_activity is not None
    core.track_activity = False
    out, _ = core(th.randn(5, 3, D_IN))
    assert in_graph(out)
    x = th.randn(5, 3, D_IN)
    with th.no_grad():  # collecting: the step, no graph
        assert not supported(core.cell, False, x, False, False, None)
