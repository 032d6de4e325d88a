"""Observation and reward normalisation that lives in the checkpoint, not in a pickled env wrapper.

SB3's ``VecNormalize`` keeps its statistics in the env and saves them with ``pickle``; every
evaluation path must then rebuild the same wrapper and load the file beside the model. Here:

- **observations** (``policy.normalize_observations``): :class:`NormalizedObservations` is a
  features extractor that standardises flat ``Box`` observations with running moments held as
  buffers of the policy, ``(x - mean) / sqrt(var + 1e-8)`` clipped to ``[-10, 10]``, and hands
  the result to the extractor the config names. The moments travel in the policy's ``state_dict``,
  so every path that loads a checkpoint (evaluation, shifts, videos, resume) normalises exactly as
  training did. They are updated from each rollout *after* the PPO update on it
  (:meth:`rim_agents.RIMPPO.train`), so the log-probabilities stored while collecting and those
  recomputed while training use the same statistics (updating while collecting, as ``VecNormalize``
  does, makes the first epoch's ratio differ from 1 by the drift). The first rollout is therefore
  seen unnormalised (mean 0, variance 1).
- **rewards** (``ppo.normalize_reward``): :class:`ScaleReward` divides the training rewards by the
  running standard deviation of the discounted return, ``VecNormalize``'s rule (no centring,
  clipped to ``[-10, 10]``); the monitor below it still logs raw returns, and evaluation never
  sees the scale. Its three numbers are saved in the checkpoint's JSON ``data``.
"""

from __future__ import annotations

from typing import Any

import gymnasium as gym
import numpy as np
import torch as th
from gymnasium import spaces
from stable_baselines3.common.preprocessing import is_image_space
from stable_baselines3.common.running_mean_std import RunningMeanStd
from stable_baselines3.common.torch_layers import BaseFeaturesExtractor
from stable_baselines3.common.vec_env import VecEnv, VecEnvWrapper
from stable_baselines3.common.vec_env.base_vec_env import VecEnvStepReturn
from torch import nn

CLIP = 10.0
EPSILON = 1e-8


class RunningMoments(nn.Module):
    """Running mean and variance of vectors of ``shape`` (Chan et al.'s parallel update, as SB3's
    ``RunningMeanStd``), kept in float64 buffers.

    :param shape: shape of one sample.
    """

    mean: th.Tensor
    var: th.Tensor
    count: th.Tensor

    def __init__(self, shape: tuple[int, ...]) -> None:
        super().__init__()
        self.register_buffer("mean", th.zeros(shape, dtype=th.float64))
        self.register_buffer("var", th.ones(shape, dtype=th.float64))
        self.register_buffer("count", th.tensor(1e-4, dtype=th.float64))

    @th.no_grad()
    def update(self, batch: th.Tensor | np.ndarray) -> None:
        """Fold a batch ``(n, *shape)`` into the moments."""
        x = th.as_tensor(batch, dtype=th.float64, device=self.mean.device).reshape(-1, *self.mean.shape)
        n = x.shape[0]
        if n == 0:
            return
        batch_mean, batch_var = x.mean(0), x.var(0, unbiased=False)
        delta = batch_mean - self.mean
        total = self.count + n
        m2 = self.var * self.count + batch_var * n + delta.square() * self.count * n / total
        self.mean += delta * n / total
        self.var.copy_(m2 / total)
        self.count.copy_(total)

    def normalize(self, x: th.Tensor) -> th.Tensor:
        """``(x - mean) / sqrt(var + eps)``, clipped to ``[-10, 10]``, in ``x``'s dtype."""
        mean, std = self.mean.to(x.dtype), th.sqrt(self.var + EPSILON).to(x.dtype)
        return ((x - mean) / std).clamp(-CLIP, CLIP)


def check_normalizable(observation_space: gym.Space) -> None:
    """Raise ``ValueError`` unless ``observation_space`` is a flat (non-image) ``Box``."""
    if not isinstance(observation_space, spaces.Box) or is_image_space(observation_space):
        kind = "image" if isinstance(observation_space, spaces.Box) else type(observation_space).__name__
        raise ValueError(
            f"policy.normalize_observations needs vector (Box, non-image) observations, not {kind} "
            "observations: set it to false for this env"
        )


class NormalizedObservations(BaseFeaturesExtractor):
    """Standardise observations with running moments, then apply ``extractor_class``.

    :param observation_space: a flat ``Box``.
    :param extractor_class: the extractor that reads the standardised observations.
    :param extractor_kwargs: its keyword arguments.
    """

    def __init__(
        self,
        observation_space: gym.Space,
        extractor_class: type[BaseFeaturesExtractor],
        extractor_kwargs: dict[str, Any] | None = None,
    ) -> None:
        check_normalizable(observation_space)
        inner = extractor_class(observation_space, **(extractor_kwargs or {}))
        super().__init__(observation_space, inner.features_dim)
        assert isinstance(observation_space, spaces.Box)
        self.moments = RunningMoments(observation_space.shape)
        self.inner = inner

    def forward(self, observations: th.Tensor) -> th.Tensor:
        return self.inner(self.moments.normalize(observations))


class ScaleReward(VecEnvWrapper):
    """Divide rewards by the running standard deviation of the discounted return (training only).

    ``VecNormalize(norm_obs=False)``'s reward rule, kept apart from it because ``VecNormalize``
    deep-copies every observation (and terminal observation) on every step even when it does not
    normalise them, and pickles its state; the statistics are SB3's ``RunningMeanStd``.

    :param venv: the (monitored) env.
    :param gamma: the discount of the return whose spread sets the scale (PPO's).
    """

    def __init__(self, venv: VecEnv, gamma: float) -> None:
        super().__init__(venv)
        self.gamma = gamma
        self.moments = RunningMeanStd(shape=())
        self.returns = np.zeros(self.num_envs)

    def reset(self) -> Any:
        self.returns = np.zeros(self.num_envs)
        return self.venv.reset()

    def step_wait(self) -> VecEnvStepReturn:
        obs, rewards, dones, infos = self.venv.step_wait()
        self.returns = self.returns * self.gamma + rewards
        self.moments.update(self.returns)
        scaled = np.clip(rewards / np.sqrt(self.moments.var + EPSILON), -CLIP, CLIP).astype(np.float32)
        self.returns[dones] = 0.0
        return obs, scaled, dones, infos

    @property
    def scale(self) -> float:
        """The current divisor of the rewards."""
        return float(np.sqrt(self.moments.var + EPSILON))

    def state(self) -> dict[str, float]:
        """The moments as plain numbers (saved in the checkpoint's JSON data)."""
        return {"mean": float(self.moments.mean), "var": float(self.moments.var), "count": float(self.moments.count)}

    def load_state(self, state: dict[str, float]) -> None:
        self.moments.mean = np.float64(state["mean"])
        self.moments.var = np.float64(state["var"])
        self.moments.count = float(state["count"])


def return_moments_state(data: dict[str, Any]) -> dict[str, float] | None:
    """The reward scaler's state from a checkpoint's JSON data, if it holds a valid one."""
    state = data.get("return_moments")
    if not isinstance(state, dict) or set(state) != {"mean", "var", "count"}:
        return None
    values = [state[k] for k in ("mean", "var", "count")]
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) and np.isfinite(v) for v in values):
        return None
    if state["var"] < 0 or state["count"] <= 0:
        return None
    return {k: float(state[k]) for k in ("mean", "var", "count")}
