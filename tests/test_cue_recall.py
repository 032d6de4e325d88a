"""The cue-recall loss (``policy.cue_recall``): what RIMPPO stores, the loss's value and gradient,
and what is refused."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch as th
from stable_baselines3.common.callbacks import CallbackList
from test_policy import _cue_env, _minigrid_kwargs, policy_kwargs

from rim_agents import RIMPPO, RIMPolicy
from rim_agents.ppo import SelectionStates

HIDDEN = np.array([3, 6])  # PickupCue's target indices meaning "hidden" (type, colour)


def _model(core: str = "lstm", n_envs: int = 4, coef: float = 0.5, **extra: object) -> RIMPPO:
    kwargs = _minigrid_kwargs(core, token_readout=True, cue_recall=coef, **extra)
    return RIMPPO(RIMPolicy, _cue_env(n_envs), n_steps=32, batch_size=64, seq_len=16, policy_kwargs=kwargs, seed=0)


def _rollout(model: RIMPPO) -> dict[str, np.ndarray]:
    callback = CallbackList([])
    callback.init_callback(model)
    model.collect_rollouts(model.env, callback, model.rollout_buffer, n_rollout_steps=model.n_steps)
    buffer = model.rollout_buffer
    return {  # (n_steps, n_envs, ...), before the sampler flattens them
        "target": buffer.observations["target"].copy(),
        "starts": buffer.episode_starts.copy().astype(bool),
        "cues": buffer.cues.copy(),
        "scored": buffer.cue_scored.copy(),
    }


def test_the_buffer_stores_the_target_last_shown_in_the_episode_across_rollouts() -> None:
    model = _model()
    model._setup_learn(10_000, CallbackList([]))
    first, second = _rollout(model), _rollout(model)
    target = np.concatenate([first["target"], second["target"]])
    starts = np.concatenate([first["starts"], second["starts"]])
    hidden = (target == HIDDEN).all(axis=-1)
    assert hidden.any() and (~hidden).any() and starts[1:].any()
    assert not (hidden & starts).any()  # PickupCue shows the cue at every episode's first step
    expected_cue = np.zeros_like(target)
    expected_scored = np.zeros(hidden.shape, dtype=bool)
    for env in range(target.shape[1]):  # the latch, written out step by step
        last = None
        for t in range(target.shape[0]):
            if starts[t, env]:
                last = None
            if not hidden[t, env]:
                last = target[t, env]
            if last is not None:
                expected_cue[t, env] = last
                expected_scored[t, env] = hidden[t, env]
    cues = np.concatenate([first["cues"], second["cues"]])
    scored = np.concatenate([first["scored"], second["scored"]])
    assert np.array_equal(scored, expected_scored)
    assert np.array_equal(cues[scored], expected_cue[scored])
    # Some episode spans the two rollouts: the second one scores steps with the first one's cue.
    carried = second["scored"] & ~np.maximum.accumulate(second["starts"], axis=0)
    carried &= ~np.maximum.accumulate(~(second["target"] == HIDDEN).all(axis=-1), axis=0)
    assert carried.any()


def test_the_loss_is_the_scored_steps_mean_squared_distance_to_the_cue_embedding() -> None:
    """With PPO's own loss multiplied by zero, the gradient that reaches the actor's query and core
    is exactly that of ``cue_recall * mean over scored steps of |W o - embed(cue)|^2``."""
    coef = 0.5
    model = _model(coef=coef)
    policy = model.policy
    model._setup_learn(10_000, CallbackList([]))
    _rollout(model)
    batch = next(model.rollout_buffer.get(model.batch_size))
    states = batch.lstm_states
    assert isinstance(states, SelectionStates) and states.cue is not None
    one_hot, scored = states.cue
    assert one_hot.shape == (64, 4 + 7) and scored.dtype == th.bool and scored.any() and not scored.all()
    policy.set_training_mode(True)
    actions = batch.actions.long().flatten()

    def actor_grads(loss: th.Tensor) -> list[th.Tensor]:
        params = [policy.readout_actor.weight, *policy.lstm_actor.parameters()]
        return list(th.autograd.grad(loss, params, allow_unused=True))

    values, log_prob, _ = policy.evaluate_actions(batch.observations, actions, states, batch.episode_starts)
    got = actor_grads(0.0 * (log_prob.sum() + values.sum()))
    assert policy.recall_errors and len(policy.recall_errors) == 2  # the actor's and the critic's read-out

    plain = SelectionStates(states.pi, states.vf)  # no cue: no auxiliary loss
    policy.cue_recall, saved = 0.0, policy.cue_recall
    features = policy.extract_features(batch.observations, policy.pi_features_extractor)
    latent, _ = policy._process_sequence(features, plain.pi, batch.episode_starts, policy.lstm_actor)
    policy.cue_recall = saved
    core_out = latent[:, : policy.lstm_actor.hidden_size]
    query = policy.readout_actor(core_out)
    with th.no_grad():
        cue = policy.pi_features_extractor.target_embedding(one_hot)
    error = ((query - cue) ** 2).sum(dim=-1)
    w = scored.float()
    expected = actor_grads(coef * (error * w).sum() / w.sum())
    for g, e in zip(got, expected, strict=True):
        th.testing.assert_close(g, e, atol=1e-6, rtol=1e-4)
    assert expected[0].abs().sum() > 0
    relative = float((error.detach() * w).sum() / ((cue**2).sum(dim=-1) * w).sum())
    assert policy.recall_errors[0].item() == pytest.approx(relative, rel=1e-5)


def test_training_logs_the_recall_error_and_evaluation_is_unchanged() -> None:
    """The loss only trains: collecting and predicting ignore ``cue_recall``, so a model with it and
    one without, from the same weights, act alike; learning logs the relative recall error."""
    model = _model(n_envs=2)
    other = _model(n_envs=2, coef=0.0)
    other.policy.load_state_dict(model.policy.state_dict())
    obs = model.env.reset()
    a, _ = model.policy.predict(obs, deterministic=True)
    b, _ = other.policy.predict(obs, deterministic=True)
    assert np.array_equal(a, b)
    model.learn(64)
    logged = model.logger.name_to_value
    assert "train/cue_recall_error" in logged and logged["train/cue_recall_error"] > 0
    assert not model.policy.recall_errors  # cleared once logged


@pytest.mark.parametrize("core", ["rims", "gru"])
def test_every_recurrent_core_trains_its_query_with_the_loss(core: str) -> None:
    """The same seed without the loss ends elsewhere: the loss's gradient reached the query. (Each
    model is built and trained before the next: building reseeds the global generators.)"""
    model = _model(core, n_envs=2)
    before = model.policy.readout_actor.weight.detach().clone()
    model.learn(64)
    plain = _model(core, n_envs=2, coef=0.0)
    assert th.equal(before, plain.policy.readout_actor.weight)
    plain.learn(64)
    assert not th.equal(before, model.policy.readout_actor.weight)
    assert not th.allclose(model.policy.readout_actor.weight, plain.policy.readout_actor.weight)
    assert model.logger.name_to_value["train/cue_recall_error"] > 0


def test_cue_recall_round_trips_and_refuses_what_it_cannot_recall(tmp_path) -> None:
    model = _model(n_envs=2)
    params = model.policy._get_constructor_parameters()
    assert params["cue_recall"] == 0.5
    clone = RIMPolicy(**copy.deepcopy(params))
    assert clone.cue_recall == 0.5
    model.save(tmp_path / "m.zip")
    assert RIMPPO.load(tmp_path / "m.zip", env=_cue_env(2)).policy.cue_recall == 0.5
    with pytest.raises(ValueError, match="cue_recall teaches the read-out's query"):
        RIMPPO(RIMPolicy, _cue_env(), policy_kwargs=_minigrid_kwargs("lstm", cue_recall=1.0))
    with pytest.raises(ValueError, match="cue_recall needs a 'target'"):
        RIMPPO("MlpRIMPolicy", "CartPole-v1", policy_kwargs=policy_kwargs("lstm", cue_recall=1.0, token_readout=True))
    with pytest.raises(ValueError, match="must be >= 0"):
        _model(coef=-1.0)
    with pytest.raises(ValueError, match="cue_recall needs RIMPPO's chunk sampler"):
        RIMPPO(
            RIMPolicy,
            _cue_env(),
            n_steps=32,
            batch_size=64,
            seq_len=None,
            policy_kwargs=_minigrid_kwargs("lstm", token_readout=True, cue_recall=1.0),
        )
    with pytest.raises(ValueError, match="cue_recall needs an extractor that embeds the target"):
        kwargs = _minigrid_kwargs("lstm", token_readout=True, cue_recall=1.0)
        kwargs["features_extractor_kwargs"] = {"features_dim": 32}
        RIMPPO(RIMPolicy, _cue_env(), policy_kwargs=kwargs)
