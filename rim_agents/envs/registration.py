"""Registration of ALE's games and of this package's environments with gymnasium."""

from __future__ import annotations

import ale_py
import gymnasium as gym

from rim_agents.envs.pickup import PICKUP_IDS

_registered = False


def register_envs() -> None:
    """Register ALE's ids and ours (idempotent)."""
    global _registered
    if _registered:
        return
    gym.register_envs(ale_py)
    if "RIMAgents/CartPoleNoVel-v1" not in gym.registry:
        gym.register(
            "RIMAgents/CartPoleNoVel-v1",
            entry_point="rim_agents.envs.classic:CartPoleNoVelocity",
            max_episode_steps=500,
            reward_threshold=475.0,
        )
    if "RIMAgents/Repeat-v0" not in gym.registry:
        gym.register("RIMAgents/Repeat-v0", entry_point="rim_agents.envs.classic:RepeatEnv")
    for env_id, kwargs in PICKUP_IDS.items():
        if env_id not in gym.registry:
            gym.register(env_id, entry_point="rim_agents.envs.pickup:PickupEnv", kwargs=kwargs)
    _registered = True
