"""Small memory tasks for tests and quick comparisons."""

from __future__ import annotations

from typing import Any

import numpy as np
from gymnasium import spaces
from gymnasium.envs.classic_control.cartpole import CartPoleEnv


class CartPoleNoVelocity(CartPoleEnv):
    """CartPole observing only the cart position and the pole angle.

    ## Description
    The classic CartPole task with the two velocities removed from the observation, so that a
    policy must infer them from the history: a small memory task on which a memoryless policy
    stays far below the recurrent ones.

    ## Observation
    ``Box(2,)``: cart position, pole angle.

    ## Registered ids
    ``RIMAgents/CartPoleNoVel-v1`` (500 steps at most).
    """

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        assert isinstance(self.observation_space, spaces.Box)
        high = self.observation_space.high[[0, 2]]
        self.observation_space = spaces.Box(-high, high, dtype=np.float32)

    def step(self, action: Any) -> tuple[np.ndarray, float, bool, bool, dict[str, Any]]:
        obs, reward, terminated, truncated, info = super().step(action)
        return obs[[0, 2]], float(reward), terminated, truncated, info

    def reset(self, **kwargs: Any) -> tuple[np.ndarray, dict[str, Any]]:
        obs, info = super().reset(**kwargs)
        return obs[[0, 2]], info
