"""rims.cuda_graphs: a checked setting; off a GPU the eager loop runs; the replay bookkeeping (a training
unroll of one shape is not replayed again before its backward) on the CPU with the recording
replaced by the eager loop; and, where a GPU is present, graphed unrolls equal eager ones through
training steps, evaluation and a second call before the backward."""

from __future__ import annotations

import copy

import pytest
import torch as th

from rim_agents import RIMCore
from rim_agents.config import RIMConfig, load_config
from rim_agents.cuda_graphs import UnrollGraphs, _Graphed

CUDA = th.cuda.is_available()


def eager_recordings(core: RIMCore, monkeypatch: pytest.MonkeyPatch) -> UnrollGraphs:
    """UnrollGraphs of ``core`` whose "recordings" run the eager loop: its bookkeeping on the CPU."""

    def unroll(x: th.Tensor, h0: th.Tensor, c0: th.Tensor, starts: th.Tensor) -> tuple[th.Tensor, ...]:
        out, (h, c) = RIMCore.run(core.cell, x, (h0, c0), starts)
        return out, h, c

    graphs = UnrollGraphs(core.cell, unroll)
    monkeypatch.setattr(graphs, "_record", lambda args, grad, needs: _Graphed(unroll, with_grad=grad))
    return graphs


def test_cuda_graphs_is_a_checked_switch() -> None:
    assert RIMConfig().cuda_graphs is False
    assert load_config("CartPole-v1", "rims", overrides=["rims.cuda_graphs=true"]).rims.cuda_graphs is True
    with pytest.raises(ValueError, match="cuda_graphs='yes' is invalid: use true or false"):
        RIMConfig(cuda_graphs="yes")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="cuda_graphs=true and compile='default' are alternatives"):
        RIMConfig(cuda_graphs=True, compile="default")


def test_off_a_gpu_the_eager_loop_runs() -> None:
    th.manual_seed(0)
    plain = RIMCore(8, num_units=4, k_active=2, unit_size=4)
    graphed = RIMCore(8, num_units=4, k_active=2, unit_size=4, cuda_graphs=True)
    graphed.load_state_dict(plain.state_dict())
    x = th.randn(5, 3, 8)
    assert th.equal(plain(x)[0], graphed(x)[0])
    copy.deepcopy(graphed)  # still a plain module


def test_a_training_unroll_is_not_replayed_before_its_backward(monkeypatch: pytest.MonkeyPatch) -> None:
    """UnrollGraphs' bookkeeping with the recording replaced by the eager loop."""
    core = RIMCore(8, num_units=4, k_active=2, unit_size=4)
    graphs = eager_recordings(core, monkeypatch)
    h0, c0 = core.initial_state(3)
    x, starts = th.randn(5, 3, 8), th.zeros(5, 3)
    first = graphs(x, h0, c0, starts)
    assert first is not None
    assert graphs(x, h0, c0, starts) is None  # same shape, backward not run: eager
    assert graphs(th.randn(4, 3, 8), *core.initial_state(3), th.zeros(4, 3)) is not None  # another shape
    first[0].sum().backward()
    assert graphs(x, h0, c0, starts) is not None  # replayed again after the backward
    with th.no_grad():
        assert graphs(x, h0, c0, starts) is not None  # no-grad recordings have nothing pending
    assert len(graphs.graphs) == 3  # (5, 3) with and without gradients, (4, 3)


def test_release_lets_a_dropped_training_unroll_replay(monkeypatch: pytest.MonkeyPatch) -> None:
    """A training unroll dropped without its backward (PPO's target_kl stop) blocks its shape's
    replay until the trainer releases it; RIMPPO releases after every update."""
    core = RIMCore(8, num_units=4, k_active=2, unit_size=4)
    graphs = eager_recordings(core, monkeypatch)
    args = (th.randn(5, 3, 8), *core.initial_state(3), th.zeros(5, 3))
    assert graphs(*args) is not None
    assert graphs(*args) is None
    graphs.release()
    assert graphs(*args) is not None

    released = []
    monkeypatch.setattr(RIMCore, "release_graphs", lambda self: released.append(self))
    from rim_agents.models import build_model, make_env

    tiny = ["n_envs=2", "ppo.n_steps=16", "ppo.batch_size=16", "ppo.seq_len=8", "ppo.n_epochs=1", "checkpoint_freq=0"]
    config = load_config("CartPole-v1", "rims", overrides=tiny, flags={"total_timesteps": 64})
    model = build_model(config, make_env(config))
    model.learn(64)  # two updates
    cores = model.policy.rim_cores()
    assert len(cores) >= 1 and released == cores * 2


@pytest.mark.skipif(not CUDA, reason="needs a GPU")
@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_graphed_unrolls_equal_eager_ones_on_a_gpu(cell: str) -> None:
    th.manual_seed(0)
    dev = th.device("cuda")
    eager = RIMCore(16, num_units=4, k_active=3, unit_size=8, cell=cell).to(dev)
    graphed = copy.deepcopy(eager)
    graphed.cell.cuda_graphs = True
    opts = [th.optim.Adam(m.parameters(), lr=1e-2) for m in (eager, graphed)]
    T, B = 6, 5
    for step in range(4):  # the parameters change between replays, in place
        x = th.randn(T, B, 16, device=dev, requires_grad=True)
        starts = (th.rand(T, B, device=dev) < 0.2).float()
        state = tuple(th.randn(1, B, 32, device=dev) for _ in range(2))
        proj = th.randn(T, B, 32, device=dev)
        results = []
        for module, opt in zip((eager, graphed), opts, strict=True):
            opt.zero_grad()
            xi = x.detach().clone().requires_grad_(True)
            out, (h, _c) = module(xi, state, episode_starts=starts)
            ((out * proj).sum() + h.sum()).backward()
            results.append([out.detach(), h.detach(), xi.grad, *(p.grad for p in module.parameters())])
            opt.step()
        for a, b in zip(*results, strict=True):
            assert th.allclose(a, b, atol=1e-5, rtol=1e-5), step
        with th.no_grad():
            assert th.allclose(eager(x)[0], graphed(x)[0], atol=1e-5, rtol=1e-5)
    # A second call of the recorded shape before the backward runs eagerly and stays right.
    x = th.randn(T, B, 16, device=dev)
    outs = [graphed(x)[0], graphed(x)[0]]
    (outs[0].sum() + 2 * outs[1].sum()).backward()
    assert th.allclose(outs[0], eager(x)[0], atol=1e-5, rtol=1e-5)
