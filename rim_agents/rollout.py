"""Running whole episodes of a recurrent policy on a vectorised env, as in training."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch as th
from stable_baselines3.common.base_class import BaseAlgorithm
from stable_baselines3.common.vec_env import VecEnv


@dataclass
class Episodes:
    returns: list[float] = field(default_factory=list)
    lengths: list[int] = field(default_factory=list)
    successes: list[bool] = field(default_factory=list)


def run_episodes(
    model: BaseAlgorithm,
    env: VecEnv,
    n_episodes: int,
    deterministic: bool = False,
    on_episode: Callable[[], None] | None = None,
) -> Episodes:
    """Run ``n_episodes`` complete episodes (Atari: whole games) on a ``VecEnv``.

    The result is the first ``n_episodes`` episodes to *start*, each run to its end: which episodes
    count is fixed before their outcome is known, so short episodes are not over-represented (the
    bias of keeping the first episodes to *finish*). An env that finishes an episode starts the
    next counted one while fewer than ``n_episodes`` have started, and idles otherwise, so the
    run ends with the longest remaining episode rather than the slowest env's whole share. The
    recurrent state is carried and reset wherever the env reports ``done`` (a lost life ends a
    training episode, not a game).
    """
    n_envs = env.num_envs
    counting = np.arange(n_envs) < n_episodes  # env i's current episode is one of the counted ones
    started = int(counting.sum())
    out = Episodes()
    obs = env.reset()
    policy: Any = model.policy
    policy.set_training_mode(False)
    # The actor's core state stays a tensor between steps (model.predict round-trips it through numpy).
    shape = (policy.lstm_actor.num_layers, n_envs, policy.lstm_actor.hidden_size)
    state = (th.zeros(shape, device=policy.device), th.zeros(shape, device=policy.device))
    starts = np.ones(n_envs, dtype=bool)
    while counting.any():
        with th.no_grad():
            obs_tensor, _ = policy.obs_to_tensor(obs)
            starts_tensor = th.as_tensor(starts, dtype=th.float32, device=policy.device)
            dist, state = policy.get_distribution(obs_tensor, state, starts_tensor)
            actions = dist.get_actions(deterministic=deterministic).cpu().numpy()
        obs, _, dones, infos = env.step(actions)
        starts = dones
        for i, info in enumerate(infos):
            if "episode" not in info or not counting[i]:
                continue
            out.returns.append(float(info["episode"]["r"]))
            out.lengths.append(int(info["episode"]["l"]))
            if "is_success" in info:
                out.successes.append(bool(info["is_success"]))
            if on_episode is not None:
                on_episode()
            counting[i] = started < n_episodes
            started += int(counting[i])
    return out
