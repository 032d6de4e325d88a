"""RIMPolicy and RIMPPO: tiny training runs, the core's use, sampling, save/load and determinism."""

from __future__ import annotations

import copy
import dataclasses

import gymnasium as gym
import numpy as np
import pytest
import torch as th
from sb3_contrib import RecurrentPPO
from sb3_contrib.common.recurrent.policies import RecurrentActorCriticPolicy
from sb3_contrib.common.recurrent.type_aliases import RNNStates
from stable_baselines3.common.envs import FakeImageEnv
from stable_baselines3.common.evaluation import evaluate_policy
from stable_baselines3.common.logger import KVWriter, Logger
from stable_baselines3.common.vec_env import DummyVecEnv

from rim_agents import RIMPPO, RIMCore, RIMPolicy
from rim_agents.config import RIMConfig
from rim_agents.cores import FeedForwardCore, GRUCore, add_forget_bias, unroll
from rim_agents.extractors import NatureCNNTokens
from rim_agents.policy import FoldedCritic, FoldedValueHead
from rim_agents.ppo import ChunkedRecurrentRolloutBuffer
from rim_agents.rim import SelectionRequest
from rim_agents.rim_unroll import in_graph

SMALL_RIMS = {"num_units": 4, "k_active": 2, "unit_size": 8, "input_key_size": 8, "comm_heads": 2, "comm_key_size": 4}
CRITIC_OPTIONS = {
    "critic-core": {"enable_critic_lstm": True},
    "shared-core": {"shared_lstm": True, "enable_critic_lstm": False},
    "no-critic-core": {"enable_critic_lstm": False},
}


def policy_kwargs(core: str, **extra: object) -> dict[str, object]:
    kwargs: dict[str, object] = {"core": core, "lstm_hidden_size": 16}
    if core == "rims":
        kwargs["core_kwargs"] = dict(SMALL_RIMS)
    kwargs.update(extra)
    return kwargs


def fake_image_env(n_envs: int = 2) -> DummyVecEnv:
    return DummyVecEnv([lambda: FakeImageEnv(screen_height=52, screen_width=52, n_channels=1, discrete=True)] * n_envs)


@pytest.mark.parametrize("critic", list(CRITIC_OPTIONS), ids=list(CRITIC_OPTIONS))
@pytest.mark.parametrize("core", ["rims", "lstm", "gru", "none"])
def test_tiny_run_cartpole(core: str, critic: str) -> None:
    model = RIMPPO(
        "MlpRIMPolicy",
        "CartPole-v1",
        n_steps=16,
        batch_size=16,
        seq_len=8,
        n_epochs=2,
        seed=0,
        policy_kwargs=policy_kwargs(core, **CRITIC_OPTIONS[critic]),
    )
    trained = model.policy.lstm_actor if core != "none" else model.policy.mlp_extractor
    before = [p.detach().clone() for p in trained.parameters()]
    model.learn(64)
    assert model.num_timesteps == 64
    after = list(trained.parameters())
    # The core is trained: the optimizer holds its parameters and they moved.
    assert any(not th.equal(a, b) for a, b in zip(after, before, strict=True))
    optimized = {id(p) for group in model.policy.optimizer.param_groups for p in group["params"]}
    assert all(id(p) in optimized for p in model.policy.parameters())


def _nan_gradients(model: RIMPPO, steps: set[int]) -> list[int]:
    """Make the gradient of one core weight NaN in the given backward passes (0-based); returns the
    list the passes are counted in."""
    seen: list[int] = []
    weight = next(model.policy.lstm_actor.parameters())

    def hook(grad: th.Tensor) -> th.Tensor:
        seen.append(len(seen))
        return grad * float("nan") if seen[-1] in steps else grad

    weight.register_hook(hook)
    return seen


def _adam_settings(model: RIMPPO) -> tuple[object, float, object]:
    group = model.policy.optimizer.param_groups[0]
    return group["fused"], group["eps"], group["foreach"]


def test_adam_is_fused_by_default_and_trains_as_the_per_tensor_adam(tmp_path) -> None:
    """The default optimizer is Adam (eps 1e-5) with the fused kernel; ``fused=False`` or a
    ``foreach`` choice is kept. Two updates give the per-tensor Adam's parameters to float rounding,
    and a saved model loads with the fused kernel again."""

    def trained(**optimizer_kwargs: object) -> RIMPPO:
        model = RIMPPO("MlpRIMPolicy", "CartPole-v1", n_steps=16, batch_size=16, seq_len=8, n_epochs=2, seed=0,
                       policy_kwargs=policy_kwargs("rims", optimizer_kwargs=optimizer_kwargs))  # fmt: skip
        model.learn(32)
        return model

    fused, plain, foreach = trained(), trained(fused=False), trained(foreach=True)
    assert _adam_settings(fused) == (True, 1e-5, None)
    assert _adam_settings(plain) == (False, 1e-5, None)
    assert _adam_settings(foreach) == (None, 1e-5, True)
    for a, b in zip(fused.policy.parameters(), plain.policy.parameters(), strict=True):
        th.testing.assert_close(a, b, rtol=0, atol=1e-5)
    fused.save(tmp_path / "model.zip")
    assert _adam_settings(RIMPPO.load(tmp_path / "model.zip")) == (True, 1e-5, None)


def test_a_step_with_nan_gradients_is_skipped_whole_and_counted() -> None:
    """One NaN gradient would make every parameter NaN through the clipping; the step is dropped
    instead (Adam's moments untouched), the other steps are applied, and the update logs the count."""
    model = RIMPPO("MlpRIMPolicy", "CartPole-v1", n_steps=16, batch_size=16, seq_len=8, n_epochs=2, seed=0,
                   policy_kwargs=policy_kwargs("rims"))  # fmt: skip
    seen = _nan_gradients(model, {2})  # one env: an update is one minibatch x 2 epochs; pass 2 opens the second
    model.learn(16)
    recorded: list[dict] = []

    class Capture(KVWriter):
        def write(self, key_values: dict, key_excluded: dict, step: int = 0) -> None:
            recorded.append(dict(key_values))

    model.set_logger(Logger(None, [Capture()]))
    weights = [p.detach().clone() for p in model.policy.parameters()]
    steps_before = {id(p): int(st["step"]) for p, st in model.policy.optimizer.state.items()}
    model.learn(32, reset_num_timesteps=False)  # two updates; the first one's record is written by the second
    assert len(seen) == 6 and all(th.isfinite(p).all() for p in model.policy.parameters())
    assert any(not th.equal(a, b) for a, b in zip(model.policy.parameters(), weights, strict=True))
    assert [row["train/nonfinite_steps"] for row in recorded if "train/nonfinite_steps" in row] == [1]
    # Adam counted the applied steps only: one of these two updates' four was dropped.
    steps_after = {id(p): int(st["step"]) for p, st in model.policy.optimizer.state.items()}
    assert {steps_after[k] - steps_before[k] for k in steps_before} == {3}


def test_each_update_logs_the_gradient_norm_before_clipping(monkeypatch: pytest.MonkeyPatch) -> None:
    """``train/grad_norm`` and ``train/grad_norm_max``: the median and the largest global gradient
    norm of the update's minibatches as the clipping saw them, not as it left them."""
    model = RIMPPO("MlpRIMPolicy", "CartPole-v1", n_steps=16, batch_size=8, seq_len=8, n_epochs=3, seed=0,
                   max_grad_norm=1e-6, policy_kwargs=policy_kwargs("rims"))  # fmt: skip
    seen: list[float] = []
    clip = th.nn.utils.clip_grad_norm_

    def recording_clip(parameters, max_norm, *args, **kwargs):  # type: ignore[no-untyped-def]
        total = clip(parameters, max_norm, *args, **kwargs)
        seen.append(float(total))
        return total

    monkeypatch.setattr(th.nn.utils, "clip_grad_norm_", recording_clip)
    recorded: list[dict] = []

    class Capture(KVWriter):
        def write(self, key_values: dict, key_excluded: dict, step: int = 0) -> None:
            recorded.append(dict(key_values))

    model.set_logger(Logger(None, [Capture()]))
    model.learn(32)  # two updates; the first one's record is written by the second
    rows = [row for row in recorded if "train/grad_norm" in row]
    assert len(rows) == 1 and len(seen) == 12  # 2 minibatches x 3 epochs per update
    first = th.tensor(seen[:6])
    assert rows[0]["train/grad_norm"] == pytest.approx(float(first.median()), rel=1e-5)
    assert rows[0]["train/grad_norm_max"] == pytest.approx(float(first.max()), rel=1e-5)
    assert rows[0]["train/grad_norm"] > 1e-3  # before clipping to 1e-6
    assert model.last_grad_norms == pytest.approx(seen[6:], rel=1e-5)


def test_an_update_with_no_finite_step_is_an_error() -> None:
    model = RIMPPO("MlpRIMPolicy", "CartPole-v1", n_steps=16, batch_size=16, seq_len=8, n_epochs=1, seed=0,
                   policy_kwargs=policy_kwargs("rims"))  # fmt: skip
    _nan_gradients(model, set(range(1000)))
    before = [p.detach().clone() for p in model.policy.parameters()]
    with pytest.raises(ValueError, match=r"every gradient step of the update at step 16 had NaN or inf gradients"):
        model.learn(16)
    assert all(th.equal(a, b) for a, b in zip(model.policy.parameters(), before, strict=True))


@pytest.mark.parametrize("extractor", ["nature_cnn", "tokens"])
@pytest.mark.parametrize("core", ["rims", "lstm", "gru"])
def test_tiny_run_fake_images(core: str, extractor: str) -> None:
    extra = {"features_extractor_class": NatureCNNTokens} if extractor == "tokens" else {}
    model = RIMPPO(
        "CnnRIMPolicy",
        fake_image_env(),
        n_steps=16,
        batch_size=16,
        seq_len=8,
        n_epochs=1,
        seed=0,
        policy_kwargs=policy_kwargs(core, enable_critic_lstm=False, **extra),
    )
    if core == "rims" and extractor == "tokens":
        assert model.policy.core_input_shape == (9, 64)  # a 3x3 map of 64 channels from 52x52
    model.learn(32)
    assert model.num_timesteps == 32


@pytest.mark.parametrize("core", ["rims", "lstm"])
def test_works_with_stock_recurrent_ppo(core: str) -> None:
    model = RecurrentPPO(
        RIMPolicy, "CartPole-v1", n_steps=16, batch_size=16, n_epochs=1, seed=0, policy_kwargs=policy_kwargs(core)
    )
    model.learn(32)
    # sb3-contrib's own loop (predict with states) and ours give the same greedy actions.
    policy = model.policy.eval()
    obs = _obs_batch(model, 4).numpy()
    actions, _ = model.predict(obs, state=None, episode_start=np.ones(4, dtype=bool), deterministic=True)
    with th.no_grad():
        zeros = (th.zeros(1, 4, policy.lstm_actor.hidden_size),) * 2
        dist = policy.get_distribution(th.as_tensor(obs), zeros, th.ones(4))[0]
    np.testing.assert_array_equal(actions, dist.get_actions(deterministic=True).numpy())
    mean, _ = evaluate_policy(model, model.get_env(), n_eval_episodes=2)
    assert mean >= 8  # CartPole returns at least 8 for any policy; the call runs whole episodes


def test_auto_seq_len_refuses_to_fall_to_a_few_steps() -> None:
    assert (
        RIMPPO("MlpRIMPolicy", "CartPole-v1", n_steps=48, batch_size=96, policy_kwargs=policy_kwargs("lstm")).seq_len
        == 16
    )
    with pytest.raises(ValueError, match="seq_len='auto' resolves to 2"):
        RIMPPO("MlpRIMPolicy", "CartPole-v1", n_steps=18, batch_size=36, policy_kwargs=policy_kwargs("lstm"))
    assert RIMPPO("MlpRIMPolicy", "CartPole-v1", n_steps=18, batch_size=36, seq_len=2).seq_len == 2


def test_unknown_core_is_rejected() -> None:
    with pytest.raises(ValueError, match="unknown core 'transformer'"):
        RIMPPO("MlpRIMPolicy", "CartPole-v1", policy_kwargs={"core": "transformer"})


def _obs_batch(model: RIMPPO, n: int = 6) -> th.Tensor:
    return th.as_tensor(np.stack([model.observation_space.sample() for _ in range(n)])).float()


def _perturb(module: th.nn.Module) -> None:
    with th.no_grad():
        for p in module.parameters():
            p.add_(th.randn_like(p) * 0.5)


@pytest.mark.parametrize("core", ["rims", "lstm", "gru"])
def test_action_distribution_depends_on_the_core(core: str) -> None:
    model = RIMPPO(
        "MlpRIMPolicy",
        "CartPole-v1",
        n_steps=16,
        batch_size=16,
        seed=0,
        policy_kwargs=policy_kwargs(core, enable_critic_lstm=False),
    )
    policy = model.policy.eval()
    obs = _obs_batch(model)
    states = (th.zeros(1, 6, policy.lstm_actor.hidden_size),) * 2
    starts = th.zeros(6)
    with th.no_grad():
        before = policy.get_distribution(obs, states, starts)[0].distribution.probs.clone()
        values_before = policy.predict_values(obs, states, starts).clone()
        _perturb(policy.lstm_actor)
        after = policy.get_distribution(obs, states, starts)[0].distribution.probs
        values_after = policy.predict_values(obs, states, starts)
    assert not th.allclose(before, after)
    # Without a critic core, the critic does not read the actor's core.
    assert th.equal(values_before, values_after)


@pytest.mark.parametrize("core", ["rims", "lstm", "gru"])
def test_value_depends_on_the_critic_core(core: str) -> None:
    model = RIMPPO(
        "MlpRIMPolicy",
        "CartPole-v1",
        n_steps=16,
        batch_size=16,
        seed=0,
        policy_kwargs=policy_kwargs(core, enable_critic_lstm=True),
    )
    policy = model.policy.eval()
    assert type(policy.lstm_critic) is type(policy.lstm_actor)
    obs = _obs_batch(model)
    states = (th.zeros(1, 6, policy.lstm_critic.hidden_size),) * 2
    with th.no_grad():
        before = policy.predict_values(obs, states, th.zeros(6)).clone()
        _perturb(policy.lstm_critic)
        after = policy.predict_values(obs, states, th.zeros(6))
    assert not th.allclose(before, after)


def test_feed_forward_control_is_memoryless_and_shaped_like_sb3_ppo() -> None:
    """``none``: SB3 PPO's network (extractor, MLP heads, critic reading the features with
    gradient, no extra ``Linear``), and the action and value ignore the state and the history."""
    from stable_baselines3 import PPO

    model = RIMPPO("MlpRIMPolicy", "CartPole-v1", seed=0, policy_kwargs=policy_kwargs("none", net_arch=[32]))
    policy = model.policy.eval()
    assert isinstance(policy.lstm_actor, FeedForwardCore) and isinstance(policy.lstm_critic, FeedForwardCore)
    assert policy.critic is None and not any(isinstance(m, th.nn.LSTM) for m in policy.modules())
    assert policy.lstm_hidden_state_shape == (1, 1, 1)
    ff = PPO("MlpPolicy", "CartPole-v1", seed=0, policy_kwargs={"net_arch": [32]}).policy
    shapes = sorted(tuple(p.shape) for p in policy.parameters())
    assert shapes == sorted(tuple(p.shape) for p in ff.parameters())
    obs = _obs_batch(model)
    zero = (th.zeros(1, 6, 1),) * 2
    other = (th.randn(1, 6, 1),) * 2
    with th.no_grad():
        probs = [
            policy.get_distribution(obs, s, th.full((6,), f))[0].distribution.probs
            for s, f in ((zero, 1.0), (other, 0.0))
        ]
        values = [policy.predict_values(obs, s, th.full((6,), f)) for s, f in ((zero, 1.0), (other, 0.0))]
    assert th.equal(probs[0], probs[1]) and th.equal(values[0], values[1])
    # The value reads the extractor with gradient (as in feed-forward PPO).
    policy.train()
    policy.predict_values(obs, zero, th.zeros(6)).sum().backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in policy.mlp_extractor.value_net.parameters())


def test_core_types() -> None:
    types = {}
    for core in ("rims", "lstm", "gru", "none"):
        model = RIMPPO("MlpRIMPolicy", "CartPole-v1", policy_kwargs=policy_kwargs(core))
        types[core] = type(model.policy.lstm_actor)
        assert model.policy.lstm_hidden_state_shape[-1] == model.policy.lstm_actor.hidden_size
    assert types == {"rims": RIMCore, "lstm": th.nn.LSTM, "gru": GRUCore, "none": FeedForwardCore}


# ----------------------------------------------------------------------- sequences and resets
def _sequences_with_resets(n_seq: int = 3, T: int = 7) -> th.Tensor:
    starts = th.zeros(n_seq, T)
    starts[0, 0] = 1.0
    starts[1, 3] = 1.0
    starts[2, 2] = starts[2, 5] = 1.0
    return starts


@pytest.mark.parametrize("core", ["rims", "lstm", "gru"])
def test_unroll_equals_per_step_reset_loop(core: str) -> None:
    """One unroll with resets inside equals sb3-contrib's loop that resets one step at a time."""
    model = RIMPPO("MlpRIMPolicy", "CartPole-v1", policy_kwargs=policy_kwargs(core))
    net = model.policy.lstm_actor.eval()
    T, B = 7, 3
    x = th.randn(T, B, net.input_size)
    starts = _sequences_with_resets(B, T).T  # (T, B)
    state = (th.randn(1, B, net.hidden_size), th.randn(1, B, net.hidden_size))
    with th.no_grad():
        out, (h, c) = unroll(net, x, state, starts)
        hs, cs = state
        ref = []
        for t in range(T):
            keep = (1.0 - starts[t]).view(1, B, 1)
            o, (hs, cs) = net(x[t : t + 1], (hs * keep, cs * keep))
            ref.append(o[0])
    th.testing.assert_close(out, th.stack(ref), atol=1e-6, rtol=1e-6)
    th.testing.assert_close(h, hs, atol=1e-6, rtol=1e-6)
    th.testing.assert_close(c, cs, atol=1e-6, rtol=1e-6)


def test_lstm_core_matches_stock_policy() -> None:
    """core="lstm" computes exactly what sb3-contrib's policy computes, resets included."""
    env = DummyVecEnv([lambda: FakeImageEnv(screen_height=52, screen_width=52, n_channels=1, discrete=True)])
    ours = RIMPPO("CnnRIMPolicy", env, seed=0, policy_kwargs=policy_kwargs("lstm", enable_critic_lstm=True))
    stock = RecurrentActorCriticPolicy(
        ours.observation_space,
        ours.action_space,
        lambda _: 1e-3,
        features_extractor_class=ours.policy.features_extractor_class,
        lstm_hidden_size=16,
        net_arch=ours.policy.net_arch,
    )
    stock.load_state_dict(ours.policy.state_dict())
    n_seq, T = 3, 7
    obs = th.as_tensor(np.stack([ours.observation_space.sample() for _ in range(n_seq * T)])).float()
    starts = _sequences_with_resets(n_seq, T).flatten()
    s = (th.randn(1, n_seq, 16), th.randn(1, n_seq, 16))
    states = RNNStates(s, (s[0] * 0.5, s[1] * 0.5))
    actions = th.randint(0, ours.action_space.n, (n_seq * T,))
    ours.policy.eval()
    stock.eval()
    with th.no_grad():
        for a, b in zip(
            ours.policy.evaluate_actions(obs, actions, states, starts),
            stock.evaluate_actions(obs, actions, states, starts),
            strict=True,
        ):
            th.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("core", ["rims", "lstm"])
def test_critic_map_and_value_head_run_folded_as_sb3_contribs_two_maps(core: str) -> None:
    """Without a critic core or value layers (the Atari config), the critic's ``Linear(features,
    width)`` and the value head run as one product: values and every parameter's gradient are
    sb3-contrib's policy's with the same weights, and the parameters keep their names."""
    env = DummyVecEnv([lambda: FakeImageEnv(screen_height=52, screen_width=52, n_channels=1, discrete=True)])
    ours = RIMPPO("CnnRIMPolicy", env, seed=0, policy_kwargs=policy_kwargs(core, enable_critic_lstm=False))
    policy = ours.policy
    assert isinstance(policy.critic, FoldedCritic) and isinstance(policy.value_net, FoldedValueHead)
    width = policy.lstm_actor.hidden_size
    assert policy.critic.weight.shape == (width, policy.features_dim) and policy.value_net.weight.shape == (1, width)
    stock = RecurrentActorCriticPolicy(
        ours.observation_space,
        ours.action_space,
        lambda _: 1e-3,
        features_extractor_class=policy.features_extractor_class,
        lstm_hidden_size=width,
        enable_critic_lstm=False,
        net_arch=[],
    )
    assert type(stock.critic) is th.nn.Linear
    stock.lstm_actor = copy.deepcopy(policy.lstm_actor)  # the core is not under test here
    stock.load_state_dict(policy.state_dict())  # strict: the same names and shapes
    n_seq, T = 3, 7
    obs = th.as_tensor(np.stack([ours.observation_space.sample() for _ in range(n_seq * T)])).float()
    starts = _sequences_with_resets(n_seq, T).flatten()
    s = (th.randn(1, n_seq, width), th.randn(1, n_seq, width))
    states = RNNStates(s, s)
    actions = th.randint(0, ours.action_space.n, (n_seq * T,))
    projection = th.randn(3, n_seq * T)
    results = []
    for net in (policy, stock):
        net.zero_grad()
        values, log_prob, entropy = net.evaluate_actions(obs, actions, states, starts)
        (projection * th.stack([values.flatten(), log_prob, entropy.expand(n_seq * T)])).sum().backward()
        results.append((values, {n: p.grad for n, p in net.named_parameters()}))
    (ours_values, ours_grads), (stock_values, stock_grads) = results
    th.testing.assert_close(ours_values, stock_values, rtol=1e-5, atol=1e-6)
    assert ours_grads.keys() == stock_grads.keys() and ours_grads["critic.weight"].abs().sum() > 0
    for name, grad in ours_grads.items():
        th.testing.assert_close(grad, stock_grads[name], rtol=1e-4, atol=1e-6, msg=name)


def test_the_folded_value_head_follows_every_change_of_its_parameters() -> None:
    """The folded map follows its parameters through an optimizer step (fused Adam, which does not
    bump version counters), a loaded state dict and a copy: never a stale value."""
    model = RIMPPO(
        "MlpRIMPolicy",
        "CartPole-v1",
        seed=0,
        policy_kwargs=policy_kwargs("rims", net_arch=[], enable_critic_lstm=False),
    )
    policy = model.policy
    obs = _obs_batch(model)
    states = (th.zeros(1, 6, policy.lstm_actor.hidden_size),) * 2
    starts = th.zeros(6)

    def two_maps(net: RIMPolicy) -> th.Tensor:  # sb3-contrib's computation
        with th.no_grad():
            latent = th.nn.functional.linear(net.extract_features(obs), net.critic.weight, net.critic.bias)
            return th.nn.functional.linear(latent, net.value_net.weight, net.value_net.bias)

    with th.no_grad():
        th.testing.assert_close(policy.predict_values(obs, states, starts), two_maps(policy))
    assert policy.optimizer.defaults["fused"]
    policy.predict_values(obs, states, starts).pow(2).sum().backward()
    policy.optimizer.step()
    with th.no_grad():
        th.testing.assert_close(policy.predict_values(obs, states, starts), two_maps(policy))
    other = copy.deepcopy(policy)
    assert other.value_net._critic[0] is other.critic
    _perturb(other.critic)
    with th.no_grad():
        th.testing.assert_close(other.predict_values(obs, states, starts), two_maps(other))
        policy.load_state_dict(other.state_dict())
        th.testing.assert_close(policy.predict_values(obs, states, starts), two_maps(other))


def test_ppo_minibatches_train_through_the_handwritten_backward_with_autograds_gradients() -> None:
    """A PPO minibatch of the RIM policy (episode starts inside it) is unrolled by the hand-written
    backward pass (rim_agents.rim_unroll): the same values and log-probabilities as autograd's
    step-by-step unroll, and every gradient within float rounding of it."""
    model = RIMPPO(
        "MlpRIMPolicy", "CartPole-v1", n_steps=64, batch_size=64, seq_len=8, seed=0,
        policy_kwargs=policy_kwargs("rims", enable_critic_lstm=True),
    )  # fmt: skip
    model.learn(128)
    batch = next(iter(model.rollout_buffer.get(model.batch_size)))
    assert batch.episode_starts.sum() > 0
    results = []
    for handwritten in (True, False):
        for core in model.policy.rim_cores():
            core.cell.handwritten_backward = handwritten
        model.policy.zero_grad()
        values, log_prob, entropy = model.policy.evaluate_actions(
            batch.observations, batch.actions.long().flatten(), batch.lstm_states, batch.episode_starts
        )
        g = th.Generator().manual_seed(1)
        loss = (values.flatten() * th.randn(values.numel(), generator=g)).sum()
        (loss + (log_prob * th.randn(log_prob.numel(), generator=g)).sum() + entropy.sum()).backward()
        used = in_graph(values)
        grads = {n: p.grad.clone() for n, p in model.policy.named_parameters() if p.grad is not None}
        results.append((values.detach(), log_prob.detach(), grads, used))
    (v1, l1, g1, used1), (v2, l2, g2, used2) = results
    assert used1 and not used2
    th.testing.assert_close(v1, v2, rtol=0, atol=1e-6)
    th.testing.assert_close(l1, l2, rtol=0, atol=1e-6)
    assert g1.keys() == g2.keys() and any(n.startswith("lstm_actor.") for n in g1)
    for name, grad in g2.items():
        th.testing.assert_close(g1[name], grad, rtol=1e-4, atol=1e-6, msg=name)


def test_cnn_policy_has_sb3s_default_heads_for_the_nature_cnn() -> None:
    """SB3 gives its NatureCNN no MLP layers by default (net_arch []), recognising the class by
    identity; the package's channels-last NatureCNN gets the same default."""
    env = fake_image_env(1)
    ours = RIMPPO("CnnRIMPolicy", env, seed=0, policy_kwargs={"core": "lstm"}).policy
    stock = RecurrentPPO("CnnLstmPolicy", env, seed=0).policy
    assert ours.net_arch == stock.net_arch == []
    assert len(ours.mlp_extractor.policy_net) == len(ours.mlp_extractor.value_net) == 0
    given = RIMPPO("CnnRIMPolicy", env, seed=0, policy_kwargs={"core": "lstm", "net_arch": [8]}).policy
    assert given.net_arch == [8]


def test_value_layers_keep_sb3_contribs_critic_map() -> None:
    model = RIMPPO(
        "MlpRIMPolicy",
        "CartPole-v1",
        seed=0,
        policy_kwargs=policy_kwargs("rims", net_arch=[8], enable_critic_lstm=False),
    )
    assert type(model.policy.critic) is th.nn.Linear and type(model.policy.value_net) is th.nn.Linear


# ------------------------------------------------------------------------------------ sampler
def test_chunked_buffer_covers_every_transition_once() -> None:
    from gymnasium import spaces

    n_steps, n_envs, seq_len, hidden = 8, 3, 4, 5
    buf = ChunkedRecurrentRolloutBuffer(
        n_steps,
        spaces.Box(-1, 1, (2,)),
        spaces.Discrete(2),
        (n_steps, 1, n_envs, hidden),
        "cpu",
        n_envs=n_envs,
        seq_len=seq_len,
    )
    buf.reset()
    for t in range(n_steps):
        # Observation encodes (env, step); the stored state encodes it too.
        obs = np.array([[e, t] for e in range(n_envs)], dtype=np.float32)
        state = th.tensor([[e * 100 + t] * hidden for e in range(n_envs)], dtype=th.float32).view(1, n_envs, hidden)
        starts = np.array([t == 5 and e == 1 for e in range(n_envs)], dtype=np.float32)
        buf.add(
            obs,
            np.zeros((n_envs, 1)),
            np.zeros(n_envs),
            starts,
            th.zeros(n_envs),
            th.zeros(n_envs),
            lstm_states=RNNStates((state, state), (state, state)),
        )
    buf.compute_returns_and_advantage(th.zeros(n_envs), np.zeros(n_envs))
    seen = []
    for batch in buf.get(batch_size=8):
        assert batch.observations.shape == (8, 2)
        assert th.all(batch.mask == 1)
        chunks = batch.observations.view(-1, seq_len, 2)
        for i, chunk in enumerate(chunks):
            env, t0 = int(chunk[0, 0]), int(chunk[0, 1])
            # A chunk is one env's consecutive steps, aligned on seq_len.
            assert th.all(chunk[:, 0] == env) and t0 % seq_len == 0
            assert th.equal(chunk[:, 1], th.arange(t0, t0 + seq_len, dtype=th.float32))
            # It starts from the core state stored at its first step.
            assert th.all(batch.lstm_states.pi[0][0, i] == env * 100 + t0)
            starts = batch.episode_starts.view(-1, seq_len)[i]
            assert th.equal(starts, th.tensor([float(env == 1 and t == 5) for t in range(t0, t0 + seq_len)]))
            seen += [(env, t) for t in range(t0, t0 + seq_len)]
    assert sorted(seen) == [(e, t) for e in range(n_envs) for t in range(n_steps)]


@pytest.mark.parametrize(
    ("n_steps", "batch_size", "seq_len", "match"),
    [
        (16, 16, 5, "seq_len=5 must be a positive divisor of n_steps=16"),
        (16, 10, 4, "batch_size=10 must be a multiple of seq_len=4"),
        (16, 16, 0, "seq_len=0 must be a positive divisor"),
    ],
)
def test_seq_len_must_divide(n_steps: int, batch_size: int, seq_len: int, match: str) -> None:
    """Each of the sampler's conditions on its own (n_steps, then batch_size, then positivity)."""
    with pytest.raises(ValueError, match=match):
        RIMPPO("MlpRIMPolicy", "CartPole-v1", n_steps=n_steps, batch_size=batch_size, seq_len=seq_len)


# ---------------------------------------------------------------------- save, load, determinism
def _predict_sequence(model: RecurrentPPO | RIMPPO, obs_seq: np.ndarray) -> list[np.ndarray]:
    state, starts, actions = None, np.ones(obs_seq.shape[1], dtype=bool), []
    for obs in obs_seq:
        action, state = model.predict(obs, state=state, episode_start=starts, deterministic=True)
        actions.append(action)
        starts = np.zeros_like(starts)
    assert state is not None
    return [*actions, state[0]]


@pytest.mark.parametrize("core", ["rims", "gru"])
def test_save_load_round_trip(core: str, tmp_path) -> None:
    model = RIMPPO(
        "MlpRIMPolicy",
        "CartPole-v1",
        n_steps=16,
        batch_size=16,
        seq_len=8,
        n_epochs=1,
        seed=0,
        policy_kwargs=policy_kwargs(core, enable_critic_lstm=True),
    )
    model.learn(32)
    obs_seq = np.random.default_rng(0).normal(size=(10, 3, 4)).astype(np.float32)
    expected = _predict_sequence(model, obs_seq)
    model.save(tmp_path / "model.zip")
    for loader in (RIMPPO, RecurrentPPO):
        loaded = loader.load(tmp_path / "model.zip")
        assert type(loaded.policy.lstm_actor) is type(model.policy.lstm_actor)
        for a, b in zip(_predict_sequence(loaded, obs_seq), expected, strict=True):
            np.testing.assert_array_equal(a, b)
    model.policy.save(tmp_path / "policy.pt")
    policy = RIMPolicy.load(tmp_path / "policy.pt")
    assert policy.core_name == core and policy.core_kwargs == model.policy.core_kwargs
    for a, b in zip(policy.state_dict().values(), model.policy.state_dict().values(), strict=True):
        assert th.equal(a, b)


def test_checkpoint_from_before_the_query_bias_loads(tmp_path) -> None:
    """A RIM model saved without ``input_query_bias`` in its settings (as before the option existed)
    is rebuilt without the bias, loads, and acts as it did; a new one keeps its bias."""
    kwargs = policy_kwargs("rims")
    kwargs["core_kwargs"] = {**SMALL_RIMS, "input_query_bias": False}
    model = RIMPPO("MlpRIMPolicy", "CartPole-v1", n_steps=16, batch_size=16, seq_len=8, seed=0, policy_kwargs=kwargs)
    assert model.policy_kwargs["core_kwargs"]["input_query_bias"] is False
    model.policy_kwargs["core_kwargs"] = dict(SMALL_RIMS)  # what an old checkpoint stored
    obs_seq = np.random.default_rng(0).normal(size=(6, 2, 4)).astype(np.float32)
    expected = _predict_sequence(model, obs_seq)
    model.save(tmp_path / "old.zip")
    loaded = RIMPPO.load(tmp_path / "old.zip")
    assert not hasattr(loaded.policy.lstm_actor.cell, "input_query_b")
    for a, b in zip(_predict_sequence(loaded, obs_seq), expected, strict=True):
        np.testing.assert_array_equal(a, b)

    new = RIMPPO("MlpRIMPolicy", "CartPole-v1", n_steps=16, seed=0, policy_kwargs=policy_kwargs("rims"))
    assert new.policy_kwargs["core_kwargs"]["input_query_bias"] is True
    new.save(tmp_path / "new.zip")
    assert RIMPPO.load(tmp_path / "new.zip").policy.lstm_actor.cell.input_query_bias


def test_stock_recurrent_ppo_model_loads_with_rimppo(tmp_path) -> None:
    model = RecurrentPPO("MlpLstmPolicy", "CartPole-v1", n_steps=16, seed=0, policy_kwargs={"lstm_hidden_size": 8})
    obs_seq = np.random.default_rng(0).normal(size=(5, 2, 4)).astype(np.float32)
    expected = _predict_sequence(model, obs_seq)
    model.save(tmp_path / "stock.zip")
    loaded = RIMPPO.load(tmp_path / "stock.zip")
    assert type(loaded.policy) is type(model.policy)
    for a, b in zip(_predict_sequence(loaded, obs_seq), expected, strict=True):
        np.testing.assert_array_equal(a, b)


def test_same_seed_same_training() -> None:
    def run() -> tuple[list[th.Tensor], np.ndarray]:
        model = RIMPPO(
            "MlpRIMPolicy",
            "CartPole-v1",
            n_steps=16,
            batch_size=16,
            seq_len=8,
            n_epochs=2,
            seed=3,
            policy_kwargs=policy_kwargs("rims", core_kwargs={**SMALL_RIMS, "input_dropout": 0.1}),
        )
        model.learn(64)
        obs = np.random.default_rng(1).normal(size=(8, 4)).astype(np.float32)
        actions, _ = model.predict(obs, deterministic=False)
        return [p.detach().clone() for p in model.policy.parameters()], actions

    p1, a1 = run()
    p2, a2 = run()
    assert all(th.equal(a, b) for a, b in zip(p1, p2, strict=True))
    np.testing.assert_array_equal(a1, a2)


def test_policy_constructor_parameters_round_trip() -> None:
    model = RIMPPO("MlpRIMPolicy", "CartPole-v1", policy_kwargs=policy_kwargs("rims", enable_critic_lstm=False))
    params = model.policy._get_constructor_parameters()
    # Every RIM setting is resolved and saved (RIMConfig's defaults: query bias on, no dropout).
    resolved = dataclasses.asdict(RIMConfig(**SMALL_RIMS))
    assert params["core"] == "rims" and params["core_kwargs"] == resolved
    assert resolved["input_query_bias"] is True and resolved["input_dropout"] == resolved["comm_dropout"] == 0.0
    assert params["enable_critic_lstm"] is False
    clone = RIMPolicy(**copy.deepcopy(params))
    assert clone.lstm_actor.hidden_size == model.policy.lstm_actor.hidden_size


# ----------------------------------------------------------------------- MiniGrid extractor
@pytest.mark.parametrize("env_id", ["RIMAgents/Pickup-6x6-v0", "RIMAgents/PickupCue-6x6-v0"])
def test_target_match_embeds_the_target_like_its_cell(env_id: str) -> None:
    """The target's embedding is the target object's cell embedding less its state row, so the
    match channels single out the target cell; a hidden target embeds to zero."""
    import gymnasium as gym
    from stable_baselines3.common.preprocessing import preprocess_obs

    from rim_agents.envs.registration import register_envs
    from rim_agents.extractors import MiniGridExtractor

    register_envs()
    env = gym.make(env_id).unwrapped
    obs, _ = env.reset(seed=1)
    extractor = MiniGridExtractor(env.observation_space, target_match=True)
    batch = preprocess_obs({k: th.as_tensor(v)[None] for k, v in obs.items()}, env.observation_space)
    x, y = env.target_pos
    cell = th.as_tensor(env.grid.get(x, y).encode()).long()  # (object, colour, state)
    rows = cell + th.arange(3) * extractor.max_index
    with th.no_grad():
        expected = extractor.embed(rows[:2]).sum(dim=0)
        np.testing.assert_allclose(extractor.target_embedding(batch["target"])[0], expected, rtol=1e-6)
        assert extractor(batch).shape == (1, 128)
        # A given embedding replaces the observation's target in the match channels, and only there.
        own = extractor.target_embedding(batch["target"])
        assert th.equal(extractor(batch, target_embedding=own), extractor(batch))
        assert not th.allclose(extractor(batch, target_embedding=own + 1.0), extractor(batch))
    if env_id.startswith("RIMAgents/PickupCue"):
        hidden, *_ = env.step(0)
        batch = preprocess_obs({k: th.as_tensor(v)[None] for k, v in hidden.items()}, env.observation_space)
        assert not extractor.target_embedding(batch["target"]).any()


def test_rim_selection_options_in_ppo() -> None:
    """The balance loss reaches TensorBoard as rims/balance_loss; noisy selection and dropout, which
    would make PPO compare two different networks, are refused or off in the policy."""
    from stable_baselines3.common.logger import KVWriter, Logger

    class Capture(KVWriter):
        def __init__(self) -> None:
            self.rows: list[dict] = []

        def write(self, key_values: dict, key_excluded: dict, step: int = 0) -> None:
            self.rows.append(dict(key_values))

    core_kwargs = {**SMALL_RIMS, "balance_coef": 0.1, "selection": "straight_through"}
    model = RIMPPO(
        "MlpRIMPolicy", "CartPole-v1", n_steps=16, batch_size=16, seq_len=8, n_epochs=1, seed=0,
        policy_kwargs=policy_kwargs("rims", core_kwargs=core_kwargs),
    )  # fmt: skip
    capture = Capture()
    model.set_logger(Logger(None, [capture]))
    model.learn(48)
    logged = [row["rims/balance_loss"] for row in capture.rows if "rims/balance_loss" in row]
    assert logged and all(np.isfinite(v) and v > 0 for v in logged)
    cell = model.policy.lstm_actor.cell
    assert cell.input_dropout == 0.0 and cell.comm_dropout == 0.0 and cell.selection == "straight_through"
    with pytest.raises(ValueError, match="selection_noise > 0 cannot train a PPO policy"):
        RIMPPO("MlpRIMPolicy", "CartPole-v1", policy_kwargs=policy_kwargs("rims", core_kwargs={"selection_noise": 0.1}))


# ----------------------------------------------------------------------- forget-gate bias
@pytest.mark.parametrize("core", ["lstm", "gru", "rims-lstm", "rims-gru"])
def test_forget_bias_opens_the_keep_gate(core: str) -> None:
    """With every weight zero, a core whose keep-gate bias is large carries its state through a
    step of zero input unchanged (LSTM: c; GRU: h); with the bias on another gate it would not."""
    name, _, cell = core.partition("-")
    core_kwargs = {**SMALL_RIMS, "k_active": SMALL_RIMS["num_units"], "cell": cell} if cell else None
    net = RIMPPO("MlpRIMPolicy", "CartPole-v1", policy_kwargs=policy_kwargs(name, core_kwargs=core_kwargs))
    net = net.policy.lstm_actor
    with th.no_grad():
        for p in net.parameters():
            p.zero_()
    add_forget_bias(net, 30.0)
    B = 3
    h0, c0 = th.randn(1, B, net.hidden_size), th.randn(1, B, net.hidden_size)
    with th.no_grad():
        _, (h1, c1) = net(th.zeros(1, B, net.input_size), (h0, c0))
    kept, other = (c1, h1) if "gru" not in core else (h1, c1)
    th.testing.assert_close(kept, c0 if "gru" not in core else h0)
    if "gru" not in core:  # zero weights: o = 1/2, so h = tanh(c) / 2
        th.testing.assert_close(other, th.tanh(c0) / 2)


@pytest.mark.parametrize("core", ["rims", "lstm", "gru", "none"])
def test_forget_bias_changes_only_the_keep_gate_of_both_cores(core: str) -> None:
    params = {}
    for bias in (0.0, 1.5):
        th.manual_seed(0)
        spaces = gym.make("CartPole-v1")
        policy = RIMPolicy(
            spaces.observation_space, spaces.action_space, lambda _: 1e-3, **policy_kwargs(core, forget_bias=bias)
        )
        params[bias] = dict(policy.named_parameters())
        assert policy._get_constructor_parameters()["forget_bias"] == bias
    changed = {k for k, v in params[0.0].items() if not th.equal(v, params[1.5][k])}
    if core == "none":
        assert not changed
        return
    assert changed == {k for k in params[0.0] if "bias_ih" in k and k.startswith(("lstm_actor", "lstm_critic"))}
    for k in changed:
        diff = params[1.5][k] - params[0.0][k]
        width = diff.shape[-1] // (4 if core in ("lstm", "rims") else 3)
        th.testing.assert_close(diff[..., width : 2 * width], th.full_like(diff[..., width : 2 * width], 1.5))
        assert not diff[..., :width].any() and not diff[..., 2 * width :].any()


# ----------------------------------------------------------------------- token read-out
def _cue_env(n_envs: int = 2) -> DummyVecEnv:
    from rim_agents.envs.registration import register_envs

    register_envs()
    return DummyVecEnv([lambda: gym.make("RIMAgents/PickupCue-6x6-v0")] * n_envs)


def _minigrid_kwargs(core: str, **extra: object) -> dict[str, object]:
    from rim_agents.extractors import MiniGridExtractor

    settings: dict[str, object] = {
        "features_extractor_class": MiniGridExtractor,
        "features_extractor_kwargs": {"features_dim": 32, "target_match": True},
        "normalize_images": False,
        "net_arch": [16],
    }
    return policy_kwargs(core, **{**settings, **extra})


def test_readout_tokens_are_the_cell_embeddings() -> None:
    from stable_baselines3.common.preprocessing import preprocess_obs

    from rim_agents.extractors import MiniGridExtractor

    env = _cue_env(1)
    space = env.observation_space
    plain = MiniGridExtractor(space, features_dim=32)
    th.manual_seed(0)
    with_tokens = MiniGridExtractor(space, features_dim=32, readout_tokens=True)
    assert plain.readout_shape is None and with_tokens.readout_shape == (49, 16)
    assert with_tokens.features_dim == 32 + 49 * 16
    obs = env.reset()
    batch = preprocess_obs({k: th.as_tensor(v) for k, v in obs.items()}, space)
    with th.no_grad():
        out = with_tokens(batch)
        idx = th.as_tensor(obs["image"]).long() + th.arange(3) * with_tokens.max_index  # (1, 7, 7, 3)
        cells = with_tokens.embed(idx).sum(dim=3)  # (1, 7, 7, E)
    th.testing.assert_close(out[:, 32:].view(1, 49, 16), cells.flatten(1, 2))
    with_tokens.readout_shape = None  # the same weights without the tokens give the first 32 values
    with th.no_grad():
        th.testing.assert_close(with_tokens(batch), out[:, :32])


@pytest.mark.parametrize("core", ["rims", "lstm", "gru", "none"])
def test_token_readout_scores_each_token_against_the_core_query(core: str) -> None:
    """The heads read ``[o, tokens . W o / sqrt(E)]``: the core sees the features without the
    tokens, actor and critic have their own query, and every new weight is trained."""
    model = RIMPPO(
        RIMPolicy, _cue_env(), n_steps=16, batch_size=32, n_epochs=1, seq_len=8,
        policy_kwargs=_minigrid_kwargs(core, token_readout=True),
    )  # fmt: skip
    policy = model.policy
    assert policy.readout_shape == (49, 16) and policy.core_input_shape == (32,)
    core_width = 32 if core == "none" else policy.lstm_actor.hidden_size
    assert policy.mlp_extractor.policy_net[0].in_features == core_width + 49
    obs, _ = policy.obs_to_tensor(model.env.reset())
    features = policy.extract_features(obs, policy.pi_features_extractor)
    tokens = features[:, 32:].view(-1, 49, 16)
    zeros = th.zeros(policy.lstm_hidden_state_shape[0], 2, policy.lstm_hidden_state_shape[2])
    starts = th.ones(2)
    with th.no_grad():
        latent, _ = policy._process_sequence(features, (zeros, zeros), starts, policy.lstm_actor)
        core_out = latent[:, :core_width]
        query = policy.readout_actor(core_out)
        expected = (tokens @ query.unsqueeze(-1)).squeeze(-1) / 4.0
        th.testing.assert_close(latent[:, core_width:], expected)
        critic_latent, _ = policy._process_sequence(features, (zeros, zeros), starts, policy.lstm_critic)
        critic_query = policy.readout_critic(critic_latent[:, :core_width])
        th.testing.assert_close(critic_latent[:, core_width:], (tokens @ critic_query.unsqueeze(-1)).squeeze(-1) / 4.0)
    before = {n: p.detach().clone() for n, p in policy.named_parameters() if n.startswith("readout_")}
    assert set(before) == {"readout_actor.weight", "readout_actor.bias", "readout_critic.weight", "readout_critic.bias"}
    model.learn(32)
    assert all(not th.equal(p, before[n]) for n, p in policy.named_parameters() if n in before)


def test_token_readout_round_trips_and_refuses_what_it_cannot_read(tmp_path) -> None:
    model = RIMPPO(
        RIMPolicy,
        _cue_env(),
        n_steps=16,
        batch_size=32,
        seq_len=8,
        policy_kwargs=_minigrid_kwargs("lstm", token_readout=True),
    )
    params = model.policy._get_constructor_parameters()
    assert params["token_readout"] is True and "readout_tokens" not in params["features_extractor_kwargs"]
    clone = RIMPolicy(**copy.deepcopy(params))
    clone.load_state_dict(model.policy.state_dict())
    model.save(tmp_path / "m.zip")
    loaded = RIMPPO.load(tmp_path / "m.zip", env=_cue_env())
    obs = model.env.reset()
    for other in (clone, loaded.policy):
        a = model.policy.predict(obs, deterministic=True)[0]
        assert np.array_equal(a, other.predict(obs, deterministic=True)[0])
    with pytest.raises(ValueError, match="token_readout needs an extractor"):
        RIMPPO("MlpRIMPolicy", "CartPole-v1", policy_kwargs=policy_kwargs("lstm", token_readout=True))
    with pytest.raises(ValueError, match="token_readout needs a critic"):
        RIMPPO(
            RIMPolicy, _cue_env(), policy_kwargs=_minigrid_kwargs("lstm", token_readout=True, enable_critic_lstm=False)
        )


def test_minigrid_tokens_are_per_cell_and_feed_the_rim_attention() -> None:
    """With ``tokens`` the extractor gives one token per cell: changing one cell changes only the
    tokens within two 3x3 convolutions of it; the RIM core reads the tokens, the LSTM their flattening."""
    from stable_baselines3.common.preprocessing import preprocess_obs

    from rim_agents.extractors import MiniGridExtractor

    env = _cue_env(1)
    space = env.observation_space
    extractor = MiniGridExtractor(space, tokens=True)
    assert extractor.token_shape == (49, 64) and extractor.features_dim == 49 * 64
    obs = env.reset()
    obs["image"][0] = 1  # an empty room everywhere
    changed = {k: v.copy() for k, v in obs.items()}
    changed["image"][0, 1, 2] = (5, 0, 0)  # a key at x = 1, y = 2
    with th.no_grad():
        a, b = (extractor(preprocess_obs({k: th.as_tensor(v) for k, v in o.items()}, space)) for o in (obs, changed))
    moved = (a - b).view(7, 7, 64).abs().amax(-1) > 0  # [x, y]
    xs, ys = np.nonzero(moved.numpy())
    assert moved[1, 2] and (np.abs(xs - 1) <= 2).all() and (np.abs(ys - 2) <= 2).all()
    with pytest.raises(ValueError, match="alternatives"):
        MiniGridExtractor(space, tokens=True, readout_tokens=True)
    kwargs = {"features_extractor_kwargs": {"tokens": True, "target_match": True}}
    rims = RIMPPO(
        RIMPolicy, _cue_env(), n_steps=16, batch_size=32, seq_len=8, policy_kwargs=_minigrid_kwargs("rims", **kwargs)
    )
    lstm = RIMPPO(
        RIMPolicy, _cue_env(), n_steps=16, batch_size=32, seq_len=8, policy_kwargs=_minigrid_kwargs("lstm", **kwargs)
    )
    assert rims.policy.core_input_shape == (49, 64) and lstm.policy.core_input_shape == (49 * 64,)
    assert lstm.policy.lstm_actor.input_size == 49 * 64
    rims.learn(32)


@pytest.mark.parametrize("core", ["rims", "lstm", "gru"])
def test_critic_sharing_the_core_trains_it_with_the_value_loss(core: str) -> None:
    """With ``critic_shares_core`` the critic's core and read-out are the actor's modules, the
    value's gradient reaches them (sb3-contrib's ``shared_lstm`` detaches it), the optimizer holds
    each parameter once, a forget bias is added once, and the critic's state stays the actor's."""
    kwargs = _minigrid_kwargs(core, token_readout=True, critic_shares_core=True, forget_bias=2.0)
    model = RIMPPO(RIMPolicy, _cue_env(), n_steps=16, batch_size=32, seq_len=8, policy_kwargs=kwargs)
    policy = model.policy
    assert policy.lstm_critic is policy.lstm_actor and policy.readout_critic is policy.readout_actor
    assert len(policy.rim_cores()) == (1 if core == "rims" else 0)
    n_params = sum(1 for _ in policy.parameters())
    assert sum(len(g["params"]) for g in policy.optimizer.param_groups) == n_params
    bias = (
        policy.lstm_actor.cell.bias_ih
        if core == "rims"
        else getattr(policy.lstm_actor, "gru", policy.lstm_actor).bias_ih_l0
    )
    width = bias.shape[-1] // (3 if core == "gru" else 4)
    assert bias[..., width : 2 * width].mean().item() == pytest.approx(2.0, abs=0.2)  # not 4: added once
    obs, _ = policy.obs_to_tensor(model.env.reset())
    zeros = th.zeros(policy.lstm_hidden_state_shape[0], 2, policy.lstm_hidden_state_shape[2])
    policy.zero_grad()
    policy.predict_values(obs, (zeros, zeros), th.ones(2)).sum().backward()
    core_grads = [p.grad for p in policy.lstm_actor.parameters()]
    assert any(g is not None and g.abs().sum() > 0 for g in core_grads)
    assert policy.readout_actor.weight.grad is not None and policy.readout_actor.weight.grad.abs().sum() > 0
    model.learn(32)
    states = model._last_lstm_states
    th.testing.assert_close(states.pi[0], states.vf[0])
    with pytest.raises(ValueError, match="alternatives"):
        RIMPolicy(
            model.observation_space, model.action_space, lambda _: 1e-3,
            **_minigrid_kwargs(core, critic_shares_core=True, shared_lstm=True, enable_critic_lstm=False),
        )  # fmt: skip


@pytest.mark.parametrize("core", ["rims", "lstm", "none", "rims-sampled"])
def test_training_replays_the_collected_rollout_exactly(core: str) -> None:
    """Before any update, every minibatch of a fresh rollout (chunks restarted from their stored
    states, episode starts inside) gives back the log-probabilities and values it was collected with.
    ``rims-sampled``: the log-probabilities include the drawn choice of RIMs, replayed from the buffer."""
    from stable_baselines3.common.callbacks import CallbackList

    kwargs = _minigrid_kwargs(core.removesuffix("-sampled"))
    if core == "rims-sampled":
        kwargs["core_kwargs"] = {**SMALL_RIMS, "selection": "sampled"}
    model = RIMPPO(RIMPolicy, _cue_env(4), n_steps=32, batch_size=64, seq_len=16, policy_kwargs=kwargs, seed=0)
    model._setup_learn(10_000, CallbackList([]))
    callback = CallbackList([])
    callback.init_callback(model)
    model.collect_rollouts(model.env, callback, model.rollout_buffer, n_rollout_steps=model.n_steps)
    assert model.rollout_buffer.episode_starts[1:].any()  # resets inside the rollout
    model.policy.set_training_mode(True)
    for batch in model.rollout_buffer.get(model.batch_size):
        with th.no_grad():
            values, log_prob, _ = model.policy.evaluate_actions(
                batch.observations, batch.actions.long().flatten(), batch.lstm_states, batch.episode_starts
            )
        th.testing.assert_close(log_prob, batch.old_log_prob, atol=1e-5, rtol=0)
        th.testing.assert_close(values.flatten(), batch.old_values, atol=1e-5, rtol=0)


def test_sampled_selection_is_part_of_the_action() -> None:
    """Collecting draws the choice of RIMs and stores it (k distinct RIMs per step, -1 padded); the
    stored log-probability is the action's plus the draw's; evaluation takes the top-k."""
    from stable_baselines3.common.callbacks import CallbackList

    kwargs = _minigrid_kwargs("rims", core_kwargs={**SMALL_RIMS, "selection": "sampled"})
    model = RIMPPO(RIMPolicy, _cue_env(4), n_steps=16, batch_size=32, seq_len=8, policy_kwargs=kwargs, seed=3)
    model._setup_learn(10_000, CallbackList([]))
    callback = CallbackList([])
    callback.init_callback(model)
    model.collect_rollouts(model.env, callback, model.rollout_buffer, n_rollout_steps=model.n_steps)
    buffer = model.rollout_buffer
    selections = buffer.selections  # (n_steps, n_envs, K)
    assert selections.shape == (16, 4, 4) and (selections[..., 2:] == -1).all()
    assert all(len(set(row)) == 2 and min(row) >= 0 for row in selections[..., :2].reshape(-1, 2).tolist())
    policy = model.policy
    core = policy.sampled_core()
    assert core is policy.lstm_actor and policy.lstm_critic.selection_request is None
    # The stored log-probability of step 0 is the action's plus the draw's.
    obs = {key: th.as_tensor(value[0]) for key, value in buffer.observations.items()}
    zeros = th.zeros(1, 4, policy.lstm_actor.hidden_size)
    states = RNNStates((zeros, zeros), (zeros, zeros))
    starts = th.ones(4)
    with th.no_grad():
        core.selection_request = SelectionRequest(given=th.as_tensor(selections[:1]))
        dist, _ = policy.get_distribution(obs, states.pi, starts)
        action_lp = dist.log_prob(th.as_tensor(buffer.actions[0]).long().flatten())
    draw_lp = core.last_selection.log_prob[0]
    assert (draw_lp < 0).all()
    th.testing.assert_close(th.as_tensor(buffer.log_probs[0]), action_lp + draw_lp, atol=1e-5, rtol=0)
    # Without a request (evaluation, predict) the actor takes the top-k: no draw is recorded.
    core.last_selection = None
    with th.no_grad():
        policy.get_distribution(obs, states.pi, starts)
    assert core.last_selection is None


@pytest.mark.parametrize(
    ("extra", "match"),
    [
        ({"policy_kwargs": {"critic_shares_core": True}}, "selection='sampled' cannot go with critic_shares_core"),
        ({"seq_len": None}, "needs RIMPPO's chunk sampler"),
    ],
    ids=["shared-critic-core", "padded-sampler"],
)
def test_sampled_selection_refuses_what_cannot_replay_it(extra: dict, match: str) -> None:
    policy_extra = extra.get("policy_kwargs", {})
    settings = {k: v for k, v in extra.items() if k != "policy_kwargs"}
    kwargs = _minigrid_kwargs("rims", core_kwargs={**SMALL_RIMS, "selection": "sampled"}, **policy_extra)
    with pytest.raises(ValueError, match=match):
        RIMPPO(RIMPolicy, _cue_env(2), n_steps=16, batch_size=32, policy_kwargs=kwargs, **settings)


def test_a_loaded_sampled_model_goes_on_storing_its_draws(tmp_path) -> None:
    kwargs = _minigrid_kwargs("rims", core_kwargs={**SMALL_RIMS, "selection": "sampled"})
    model = RIMPPO(RIMPolicy, _cue_env(2), n_steps=16, batch_size=32, seq_len=8, policy_kwargs=kwargs, seed=0)
    model.learn(32)
    model.save(tmp_path / "model.zip")
    loaded = RIMPPO.load(tmp_path / "model.zip", env=_cue_env(2))
    assert loaded.policy.sampled_core() is loaded.policy.lstm_actor
    loaded.learn(32, reset_num_timesteps=False)
    selections = loaded.rollout_buffer.selections  # flattened by the update: (n_envs * n_steps, K)
    assert selections.shape == (32, 4) and (selections[:, :2] >= 0).all() and (selections[:, 2:] == -1).all()
