"""benchmarks/memory_probe.py: the linear probe separates a state that holds the target from one that does not."""

from __future__ import annotations

import itertools
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
from memory_probe import collect, probe_accuracy


def test_probe_reads_a_linear_code_and_not_noise() -> None:
    rng = np.random.default_rng(0)
    y = rng.integers(0, 6, 900)
    codes = rng.normal(size=(6, 32))
    held = codes[y] + 0.5 * rng.normal(size=(900, 32))  # the target, linearly coded, plus noise
    forgotten = rng.normal(size=(900, 32))  # nothing about the target
    assert probe_accuracy(held, y)[0] > 0.95
    accuracy, n_classes = probe_accuracy(forgotten, y)
    assert n_classes == 6 and accuracy < 1 / 6 + 0.1


def test_collect_labels_each_state_with_its_episode_target(tmp_path) -> None:
    from rim_agents.config import load_config
    from rim_agents.models import build_model, make_env

    config = load_config(env="RIMAgents/PickupCue-6x6-v0", core="lstm", overrides=["policy.lstm_hidden_size=8"])
    env = make_env(config, n_envs=3, seed=5)
    model = build_model(config, env)
    rollout = collect(model, env, 60)
    assert rollout.states.shape == (180, 8) and rollout.targets.shape == rollout.ages.shape == (180,)
    # Targets only change where an episode begins (age 0).
    per_env_y, per_env_age = rollout.targets.reshape(60, 3), rollout.ages.reshape(60, 3)
    changed = per_env_y[1:] != per_env_y[:-1]
    assert not (changed & (per_env_age[1:] != 0)).any()
    # Nothing is "in front" while the cue is shown (the first observation), and pickup is a probability.
    assert (rollout.facing[rollout.ages == 0] == -1).all()
    assert set(np.unique(rollout.facing)) <= {-1, 0, 1} and ((rollout.pickup > 0) & (rollout.pickup < 1)).all()
    assert 0.0 <= rollout.success <= 1.0 or np.isnan(rollout.success)


def test_cue_gradient_ratio_grows_with_the_forget_bias() -> None:
    """The gradient reaching the cue through a fresh LSTM fades with t, and less with a larger
    forget-gate bias (the same weights otherwise)."""
    from memory_probe import cue_gradient_ratio

    from rim_agents.config import load_config
    from rim_agents.models import build_model, make_env

    ratios = {}
    for bias in (0.0, 3.0):
        config = load_config(env="RIMAgents/PickupCue-6x6-v0", core="lstm", overrides=[f"policy.forget_bias={bias}"])
        env = make_env(config, n_envs=1, seed=3)
        ratios[bias] = cue_gradient_ratio(build_model(config, env), env, steps=(1, 10))
    assert ratios[0.0][1] < ratios[0.0][0] and ratios[3.0][1] < ratios[3.0][0]
    assert ratios[3.0][1] > 3 * ratios[0.0][1]


def test_all_checkpoints_are_probed_in_step_order(tmp_path) -> None:
    import torch as th
    import yaml
    from memory_probe import models_to_probe

    from rim_agents.config import load_config
    from rim_agents.models import build_model, make_env
    from rim_agents.runs import checkpoint_path, save_model

    config = load_config(env="RIMAgents/PickupCue-6x6-v0", core="lstm", overrides=["policy.lstm_hidden_size=8"])
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text(yaml.safe_dump(config.to_dict()))
    env = make_env(config, n_envs=2, seed=0)
    model = build_model(config, env)
    for steps in (2_000, 1_000, 10_000):  # written out of order
        model.num_timesteps = steps
        with th.no_grad():
            next(model.policy.parameters()).fill_(steps)
        save_model(model, checkpoint_path(run, steps))
    models = models_to_probe(run, config, env, all_checkpoints=True)
    assert list(models) == ["untrained", "at 1,000 steps", "at 2,000 steps", "at 10,000 steps"]
    for steps in (1_000, 2_000, 10_000):
        assert (next(models[f"at {steps:,} steps"].policy.parameters()) == steps).all()
    newest = models_to_probe(run, config, env)
    assert list(newest) == ["trained", "untrained"]
    assert (next(newest["trained"].policy.parameters()) == 10_000).all()


def test_cue_in_chunk_counts_pickups_whose_episode_starts_in_their_chunk() -> None:
    from cue_in_chunk import in_same_chunk, pickups

    assert in_same_chunk([(0, 31), (30, 33), (64, 100)], 32) == 1 / 3
    assert in_same_chunk([(0, 31), (30, 33), (64, 100)], 128) == 1.0
    found, lengths = pickups("RIMAgents/PickupCue-6x6-v0", 2_000)
    assert found and all(0 <= e - s < 2_000 for s, e in found)
    # Episodes follow each other: the next pickup's episode starts after this one ended.
    assert all(s2 > e1 for (_, e1), (s2, _) in itertools.pairwise(found))
    assert sum(lengths) <= 2_000 and len(found) <= len(lengths)
