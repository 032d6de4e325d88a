"""benchmarks/cue_under_shift.py: the recall error is read against the target each episode showed,
at the steps where it is hidden, with blanked and seen frames apart."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch as th
from stable_baselines3.common.preprocessing import preprocess_obs

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
from cue_under_shift import measure

from rim_agents.config import load_config
from rim_agents.models import build_model, make_env
from rim_agents.shifts import shift_spec


class TrueTarget(th.nn.Module):
    """A read-out whose query is the embedding of each env's true target (from the env itself), or zero."""

    def __init__(self, env, policy, zero: bool = False) -> None:
        super().__init__()
        base = env
        while hasattr(base, "venv"):
            base = base.venv
        self.envs, self.zero = base.envs, zero
        self.space, self.embed = policy.observation_space["target"], policy.pi_features_extractor.target_embedding

    def forward(self, out: th.Tensor) -> th.Tensor:
        targets = np.stack([e.unwrapped._target_obs for e in self.envs])
        cue = self.embed(preprocess_obs(th.as_tensor(targets), self.space))
        return th.zeros_like(cue) if self.zero else cue


def test_errors_are_zero_for_the_true_target_one_for_none_and_split_by_blanking() -> None:
    paper_rule = ["rims.num_units=4", "rims.k_active=2", "rims.selection=hard", "rims.k_anneal=0.0"]
    overrides = ["policy.token_readout=true", "policy.cue_recall=1.0", "rims.unit_size=8", *paper_rule]
    config = load_config(env="RIMAgents/PickupCue-6x6-v0", core="rims", overrides=overrides)
    env = make_env(config, 3, 7, shift_spec(config, "flicker-0.5"))
    model = build_model(config, env)
    policy = model.policy
    policy.readout_actor = TrueTarget(env, policy)
    exact = measure(model, env, episodes=6)
    assert exact.episodes == 6 and len(exact.error_seen) > 10 and len(exact.error_blank) > 10
    assert max(exact.error_seen + exact.error_blank) < 1e-10  # the latch is each episode's target
    policy.readout_actor = TrueTarget(env, policy, zero=True)
    lost = measure(model, env, episodes=3)
    assert np.allclose(lost.error_seen + lost.error_blank, 1.0)
    # The RIM masks are read at the same steps: k of K active at each.
    masks = np.array(lost.active_seen + lost.active_blank)
    assert masks.shape == (len(lost.error_seen) + len(lost.error_blank), 4) and (masks.sum(1) == 2).all()
    # A switch is read against the step before in the same episode; a fresh core's near-even choice switches.
    assert 0 < len(lost.switched) <= len(masks) and any(lost.switched)
    env.close()

    unshifted = make_env(config, 3, 7)
    policy.readout_actor = TrueTarget(unshifted, policy)
    plain = measure(model, unshifted, episodes=3)
    assert plain.error_blank == [] and len(plain.error_seen) > 0 and max(plain.error_seen) < 1e-10
    unshifted.close()


def test_all_active_rims_never_switch() -> None:
    overrides = [
        "policy.token_readout=true",
        "policy.cue_recall=1.0",
        "rims.unit_size=8",
        "rims.num_units=4",
        "rims.k_active=4",
    ]
    config = load_config(env="RIMAgents/PickupCue-6x6-v0", core="rims", overrides=overrides)
    env = make_env(config, 2, 3)
    result = measure(build_model(config, env), env, episodes=2)
    assert len(result.switched) > 0 and not any(result.switched)
    assert np.allclose(np.mean(result.active_seen, axis=0), 1.0)
    assert np.allclose(np.mean(result.active_cue, axis=0), 1.0) and len(result.active_cue) >= 2
    env.close()
