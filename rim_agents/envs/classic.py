"""Small memory tasks for tests and quick comparisons."""

from __future__ import annotations

from typing import Any

import gymnasium as gym
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


class RepeatEnv(gym.Env[np.int64, np.int64]):
    """Repeat the symbol shown ``delay`` steps ago.

    ## Description
    Each step shows a random symbol out of ``n_symbols``. From step ``delay`` on, the action is
    scored against the symbol shown ``delay`` steps earlier: a memory task whose span is one
    number. A memoryless policy is right by chance (``1 / n_symbols``); a policy that remembers
    ``delay`` symbols is always right.

    ## Observation and action
    ``Discrete(n_symbols)`` each.

    ## Reward
    ``1 / (length - delay)`` for each correct answer (a perfect episode returns 1.0), 0 otherwise;
    no reward in the first ``delay`` steps.

    ## Episode
    ``length`` steps (truncated, not terminated: nothing ends it early). ``info["is_success"]`` at
    the end: every scored answer was right.

    ## Registered ids
    ``RIMAgents/Repeat-v0`` (``delay=4``, ``n_symbols=4``, ``length=24``); every argument is a
    ``gymnasium.make`` keyword.
    """

    def __init__(self, delay: int = 4, n_symbols: int = 4, length: int = 24) -> None:
        for name, value, low in (("delay", delay, 0), ("n_symbols", n_symbols, 2), ("length", length, 1)):
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise ValueError(f"{name}={value!r} is invalid: use an integer >= {low}")
        if length <= delay:
            raise ValueError(f"length={length} must exceed delay={delay}: no answer would be scored")
        self.delay, self.n_symbols, self.length = delay, n_symbols, length
        self.observation_space = spaces.Discrete(n_symbols)
        self.action_space = spaces.Discrete(n_symbols)
        self.shown: list[int] = []
        self.correct = 0

    def _show(self) -> np.int64:
        self.shown.append(int(self.np_random.integers(self.n_symbols)))
        return np.int64(self.shown[-1])

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None) -> tuple[np.int64, dict]:
        super().reset(seed=seed)
        self.shown, self.correct = [], 0
        return self._show(), {}

    def step(self, action: Any) -> tuple[np.int64, float, bool, bool, dict[str, Any]]:
        t = len(self.shown) - 1  # the step whose symbol the agent has just seen
        reward = 0.0
        if t >= self.delay and int(action) == self.shown[t - self.delay]:
            reward = 1.0 / (self.length - self.delay)
            self.correct += 1
        truncated = t + 1 >= self.length
        info: dict[str, Any] = {}
        if truncated:
            info["is_success"] = self.correct == self.length - self.delay
        return self._show(), reward, False, truncated, info
