"""Observation and reward normalisation: the statistics, where they are applied, and that they
travel with the checkpoint (policy buffers, JSON data) into evaluation and resume."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch as th
from stable_baselines3.common.env_util import make_vec_env
from stable_baselines3.common.running_mean_std import RunningMeanStd
from stable_baselines3.common.vec_env import VecNormalize

from rim_agents import RIMPPO
from rim_agents.cli import train_main
from rim_agents.config import load_config
from rim_agents.models import build_model, load_model, make_env
from rim_agents.normalization import NormalizedObservations, RunningMoments, ScaleReward
from rim_agents.runs import FINAL_MODEL, latest_checkpoint, save_model
from rim_agents.training import train

TINY = ["n_envs=2", "ppo.n_steps=16", "ppo.batch_size=16", "ppo.seq_len=8", "ppo.n_epochs=1", "checkpoint_freq=32"]
NORMALIZED = ["policy.normalize_observations=true", "ppo.normalize_reward=true"]


def config(core: str = "lstm", total: int = 64, extra: list[str] | None = None):
    return load_config(
        "CartPole-v1", core, overrides=[*TINY, *NORMALIZED, *(extra or [])], flags={"total_timesteps": total}
    )


def test_running_moments_match_the_whole_batch() -> None:
    rng = np.random.default_rng(0)
    batches = [rng.normal(3.0, 2.0, size=(n, 4)) * [1, 10, 0.1, 1] for n in (5, 17, 1, 40)]
    moments, reference = RunningMoments((4,)), RunningMeanStd(shape=(4,))
    for batch in batches:
        moments.update(th.as_tensor(batch))
        reference.update(batch)
    whole = np.concatenate(batches)
    np.testing.assert_allclose(moments.mean.numpy(), whole.mean(0), rtol=1e-5)  # the 1e-4 prior count
    np.testing.assert_allclose(moments.mean.numpy(), reference.mean, rtol=1e-12)
    np.testing.assert_allclose(moments.var.numpy(), whole.var(0), rtol=1e-3)
    np.testing.assert_allclose(moments.var.numpy(), reference.var, rtol=1e-12)
    x = th.as_tensor(whole[:3], dtype=th.float32)
    expected = ((whole[:3] - whole.mean(0)) / np.sqrt(whole.var(0) + 1e-8)).clip(-10, 10)
    np.testing.assert_allclose(moments.normalize(x).numpy(), expected, rtol=1e-3, atol=1e-4)
    assert moments.normalize(th.full((1, 4), 1e6)).max().item() == 10.0


def test_scale_reward_is_vec_normalize_reward_rule() -> None:
    """Same rewards as SB3's VecNormalize(norm_obs=False) on the same episodes, dones included."""
    ours = ScaleReward(make_vec_env("CartPole-v1", n_envs=3, seed=5), gamma=0.9)
    theirs = VecNormalize(make_vec_env("CartPole-v1", n_envs=3, seed=5), norm_obs=False, gamma=0.9)
    ours.reset(), theirs.reset()
    rng = np.random.default_rng(1)
    dones_seen = 0
    for _ in range(200):
        actions = rng.integers(0, 2, size=3)
        _, r_ours, d_ours, _ = ours.step(actions)
        _, r_theirs, d_theirs, _ = theirs.step(actions)
        np.testing.assert_array_equal(d_ours, d_theirs)
        np.testing.assert_allclose(r_ours, r_theirs, rtol=1e-6)
        dones_seen += int(d_ours.sum())
    assert dones_seen > 3 and ours.scale > 1.5  # episodes ended, and the scale moved off 1


def test_observations_are_standardised_inside_the_policy() -> None:
    model = build_model(config(), make_env(config()))
    extractor = model.policy.features_extractor
    assert isinstance(extractor, NormalizedObservations)
    assert any(k.endswith("moments.mean") for k in model.policy.state_dict())
    extractor.moments.update(th.tensor([[1.0, 2.0, 3.0, 40.0], [3.0, 0.0, 1.0, 0.0]]))
    # mean (2, 1, 2, 20), standard deviation (1, 1, 1, 20): the flattened extractor shows z-scores
    obs = th.tensor([[2.0, 1.0, 4.0, -20.0]])
    assert th.allclose(extractor(obs), th.tensor([[0.0, 0.0, 2.0, -2.0]]), atol=1e-3)


def test_moments_are_frozen_while_collecting_and_updated_after_the_update() -> None:
    """Collecting and training one rollout use the same statistics; the rollout joins them after."""
    model = build_model(config(), make_env(config()))
    moments = model.policy.features_extractor.moments
    seen: list[np.ndarray] = []
    collect = model.collect_rollouts

    def spy(*args, **kwargs):
        before = moments.mean.clone()
        out = collect(*args, **kwargs)
        assert th.equal(before, moments.mean), "the moments changed while collecting"
        seen.append(model.rollout_buffer.observations.copy())
        return out

    model.collect_rollouts = spy
    model.learn(64)
    rollouts = np.concatenate([o.reshape(-1, 4) for o in seen])
    assert len(seen) == 2
    np.testing.assert_allclose(moments.mean.numpy(), rollouts.mean(0), rtol=1e-5, atol=1e-6)
    assert moments.count.item() == pytest.approx(len(rollouts), abs=1e-3)


def test_checkpoint_carries_both_normalisers(tmp_path: Path) -> None:
    run = train(config(total=64), tmp_path / "run")
    cfg = config(total=64)
    loaded = load_model(cfg, run / FINAL_MODEL)
    moments = loaded.policy.features_extractor.moments
    assert moments.count.item() == pytest.approx(64, abs=1e-3)  # two rollouts of 32 observations
    assert moments.var.min().item() > 0 and not th.equal(moments.mean, th.zeros(4, dtype=th.float64))
    state = loaded.return_moments
    assert state is not None and state["count"] == pytest.approx(64, abs=1e-3) and state["var"] > 0
    # SB3's own loader (for trusted files) restores both as well.
    trusted = RIMPPO.load(run / FINAL_MODEL)
    assert th.equal(trusted.policy.features_extractor.moments.var, moments.var)
    assert trusted.normalize_reward and trusted.return_moments == state
    # Resuming goes on from the saved scale, not from a fresh one.
    resumed = load_model(cfg, latest_checkpoint(run))
    resumed.learn(32, reset_num_timesteps=False)
    assert isinstance(resumed.env, ScaleReward)
    assert resumed.env.moments.count == pytest.approx(state["count"] + 32, abs=1e-3)


def test_a_loaded_model_acts_as_the_trained_one(tmp_path: Path) -> None:
    cfg = config()
    model = build_model(cfg, make_env(cfg))
    model.learn(64)
    save_model(model, tmp_path / "model.zip")
    loaded = load_model(cfg, tmp_path / "model.zip")
    obs = th.tensor([[0.05, 1.5, -0.1, -2.0]])

    def logits(m) -> th.Tensor:
        state = (th.zeros(1, 1, 64), th.zeros(1, 1, 64))
        with th.no_grad():
            return m.policy.get_distribution(obs, state, th.ones(1))[0].distribution.logits

    assert th.equal(logits(model), logits(loaded))
    loaded.policy.features_extractor.moments.mean.zero_()
    loaded.policy.features_extractor.moments.var.fill_(1.0)
    assert not th.allclose(logits(model), logits(loaded)), "the moments must matter"


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ("RIMAgents/Repeat-v0", "normalize_observations needs vector (Box, non-image) observations, not Discrete"),
        ("RIMAgents/Pickup-6x6-v0", "not Dict observations"),
    ],
)
def test_observation_normalisation_refuses_other_spaces(
    env: str, message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = train_main(["--env", env, "policy.normalize_observations=true", "--run-dir", str(tmp_path / "run")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and message in err[0]
    assert not (tmp_path / "run").exists()
