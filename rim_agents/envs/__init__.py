"""Environments: one entry point, :func:`make_vec_env`, for every env family.

- ``atari``: ALE games (``BreakoutNoFrameskip-v4``, ``ALE/Breakout-v5``, ...), preprocessed as
  in the Nature DQN paper and frame-stacked, on ale-py's C++ vector env or on gymnasium + SB3's
  ``AtariWrapper`` (:mod:`rim_agents.envs.atari`).
- ``minigrid``: MiniGrid environments, among them our object-picking-with-distractors family.
- ``classic``: any other gymnasium id (``CartPole-v1``, ``RIMAgents/CartPoleNoVel-v1``, ...).

Every env is wrapped in SB3's ``Monitor``, so episode returns and lengths are logged (unclipped
for Atari: reward clipping is applied after the monitor).
"""

from __future__ import annotations

import difflib
import functools
from typing import Any

import gymnasium as gym
from stable_baselines3.common.env_util import make_vec_env as sb3_make_vec_env
from stable_baselines3.common.vec_env import DummyVecEnv, VecEnv

from rim_agents.config import env_family, import_env_packages
from rim_agents.envs.atari import make_atari_vec_env
from rim_agents.envs.registration import register_envs
from rim_agents.errors import UsageError

__all__ = ["check_env_id", "env_family", "make_vec_env"]


def _entry_module(spec: Any) -> str:
    entry = spec.entry_point
    return entry.split(":")[0] if isinstance(entry, str) else getattr(entry, "__module__", "")


def _renders_rgb(env_id: str) -> bool:
    """Whether the registered env declares ``rgb_array`` among its render modes."""
    entry = gym.spec(env_id).entry_point
    creator: Any = gym.envs.registration.load_env_creator(entry) if isinstance(entry, str) else entry
    modes = getattr(creator, "metadata", {}).get("render_modes", [])
    return "rgb_array" in modes


def check_env_id(env_id: str, packages: list[str] | None = None) -> None:
    """Raise :class:`UsageError` naming close matches when ``env_id`` is not registered (after
    the ``packages`` that register ids were imported)."""
    register_envs()
    if env_id in gym.registry:
        return
    close = difflib.get_close_matches(env_id, list(gym.registry), n=3, cutoff=0.6)
    if packages:  # ids from the packages named for this env first
        own = [i for i, spec in gym.registry.items() if _entry_module(spec).startswith(tuple(packages))]
        close = difflib.get_close_matches(env_id, own, n=3, cutoff=0.4) or close
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
    backend: str = "auto",
    env_packages: list[str] | None = None,
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
    :param backend: Atari: ``"auto"``, ``"vector"`` (ale-py's C++ vector env) or ``"gym"``
        (gymnasium + SB3's ``AtariWrapper``), see :mod:`rim_agents.envs.atari`.
    :param env_packages: modules to import first, which register ``env_id`` (another package's env).
    """
    import_env_packages(list(env_packages or []))
    check_env_id(env_id, env_packages)
    env_kwargs = dict(env_kwargs or {})
    family = env_family(env_id)
    try:
        if family == "atari":
            return make_atari_vec_env(
                env_id, n_envs, seed, frame_stack, terminal_on_life_loss, clip_reward, env_kwargs, backend
            )
        # SB3 asks a registered id for rgb_array rendering, which an env without it warns about:
        # such an env is made by a callable instead, with the user's kwargs only.
        target: Any = env_id if _renders_rgb(env_id) else functools.partial(gym.make, env_id)
        return sb3_make_vec_env(target, n_envs=n_envs, seed=seed, env_kwargs=env_kwargs, vec_env_cls=DummyVecEnv)
    except (TypeError, ValueError, RuntimeError, gym.error.Error) as e:
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise UsageError(f"cannot create environment {env_id!r} with {env_kwargs}: {first}") from None
