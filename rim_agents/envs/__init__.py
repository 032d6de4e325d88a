"""Environments: one entry point, :func:`make_vec_env`, for every env family.

- ``atari``: ALE games (``BreakoutNoFrameskip-v4``, ``ALE/Breakout-v5``, ...), preprocessed as
  in the Nature DQN paper (SB3's ``AtariWrapper``) and frame-stacked.
- ``minigrid``: MiniGrid environments, among them our object-picking-with-distractors family.
- ``classic``: any other gymnasium id (``CartPole-v1``, ``RIMAgents/CartPoleNoVel-v1``, ...).

Every env is wrapped in SB3's ``Monitor``, so episode returns and lengths are logged (unclipped
for Atari: reward clipping is applied after the monitor).
"""

from __future__ import annotations

import difflib
from typing import Any

import gymnasium as gym
from stable_baselines3.common.env_util import make_atari_env
from stable_baselines3.common.env_util import make_vec_env as sb3_make_vec_env
from stable_baselines3.common.vec_env import DummyVecEnv, VecEnv, VecFrameStack

from rim_agents.config import env_family
from rim_agents.envs.registration import register_envs
from rim_agents.errors import UsageError

__all__ = ["check_env_id", "env_family", "make_vec_env"]


def check_env_id(env_id: str) -> None:
    """Raise :class:`UsageError` naming close matches when ``env_id`` is not registered."""
    register_envs()
    if env_id in gym.registry:
        return
    close = difflib.get_close_matches(env_id, list(gym.registry), n=3, cutoff=0.6)
    hint = f"; did you mean {', '.join(close)}?" if close else "; see gymnasium.registry for the registered ids"
    raise UsageError(f"unknown environment id {env_id!r}{hint}")


def make_vec_env(
    env_id: str,
    n_envs: int = 1,
    seed: int | None = None,
    frame_stack: int = 4,
    terminal_on_life_loss: bool = True,
    clip_reward: bool = True,
    env_kwargs: dict[str, Any] | None = None,
) -> VecEnv:
    """A monitored SB3 ``VecEnv`` of ``n_envs`` copies of ``env_id``.

    :param env_id: a registered gymnasium id.
    :param n_envs: number of environments.
    :param seed: seed of the first env (env ``i`` gets ``seed + i``).
    :param frame_stack: Atari: frames stacked.
    :param terminal_on_life_loss: Atari: a lost life ends the episode for training.
    :param clip_reward: Atari: train on the sign of the reward (returns logged unclipped).
    :param env_kwargs: keyword arguments of ``gymnasium.make`` (e.g. Atari ``mode``/``difficulty``,
        MiniGrid ``num_distractors``).
    """
    check_env_id(env_id)
    env_kwargs = dict(env_kwargs or {})
    family = env_family(env_id)
    try:
        if family == "atari":
            venv: VecEnv = make_atari_env(
                env_id,
                n_envs=n_envs,
                seed=seed,
                env_kwargs=env_kwargs,
                wrapper_kwargs={"terminal_on_life_loss": terminal_on_life_loss, "clip_reward": clip_reward},
                vec_env_cls=DummyVecEnv,
            )
            return VecFrameStack(venv, frame_stack) if frame_stack > 1 else venv
        return sb3_make_vec_env(env_id, n_envs=n_envs, seed=seed, env_kwargs=env_kwargs, vec_env_cls=DummyVecEnv)
    except (TypeError, ValueError, RuntimeError, gym.error.Error) as e:
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise UsageError(f"cannot create environment {env_id!r} with {env_kwargs}: {first}") from None
