"""Models from configs: the one env builder, a fresh model, and a checkpoint loaded without unpickling."""

from __future__ import annotations

import copy
import dataclasses
import io
import json
import pickle
import zipfile
from pathlib import Path
from typing import Any

import torch as th
from gymnasium import spaces
from stable_baselines3.common.utils import LinearSchedule
from stable_baselines3.common.vec_env import VecEnv

from rim_agents.config import ConfigError, TrainConfig
from rim_agents.envs import make_vec_env
from rim_agents.errors import UsageError
from rim_agents.extractors import EXTRACTOR_NAMES, auto_extractor, extractor_class
from rim_agents.normalization import return_moments_state
from rim_agents.policy import RIMPolicy
from rim_agents.ppo import RIMPPO
from rim_agents.runs import CONFIG_FILE
from rim_agents.shifts import ShiftSpec, shift_spec


class DamagedCheckpoint(UsageError):
    """A checkpoint file that cannot be read (truncated, not a zip, bad tensors)."""


def check_config(config: TrainConfig) -> None:
    """The config checks that need the rest of the package (after :func:`rim_agents.config.validate`):
    the extractor and the shifts evaluated during training (the RIM settings check themselves)."""
    if config.policy.features_extractor not in EXTRACTOR_NAMES:
        raise ConfigError(
            f"unknown policy.features_extractor {config.policy.features_extractor!r}: "
            f"choose one of {', '.join(EXTRACTOR_NAMES)}"
        )
    for shift in config.eval_shifts:
        shift_spec(config, shift)


def schedule(value: float | str) -> float | LinearSchedule:
    """``"lin_X"`` -> linear decay from X to 0 over training; a number -> constant."""
    if isinstance(value, str):
        return LinearSchedule(float(value[4:]), 0.0, 1.0)
    return float(value)


def policy_kwargs(config: TrainConfig, observation_space: spaces.Space | None = None) -> dict[str, Any]:
    """The policy's arguments; ``features_extractor: auto`` is resolved from ``observation_space``."""
    p = config.policy
    name, normalize = p.features_extractor, p.normalize_images
    if name == "auto":
        assert observation_space is not None, "features_extractor=auto needs the observation space"
        name = auto_extractor(observation_space)
        normalize = normalize or name == "nature_cnn"  # uint8 images are scaled to [0, 1]
    return {
        "core": config.core,
        "core_kwargs": dataclasses.asdict(config.rims) if config.core == "rims" else {},
        "lstm_hidden_size": p.lstm_hidden_size,
        "n_lstm_layers": p.n_lstm_layers,
        "enable_critic_lstm": p.enable_critic_lstm,
        "shared_lstm": p.shared_lstm,
        "ortho_init": p.ortho_init,
        "normalize_images": normalize,
        "normalize_observations": p.normalize_observations,
        "forget_bias": p.forget_bias,
        "token_readout": p.token_readout,
        "critic_shares_core": p.critic_shares_core,
        "cue_recall": p.cue_recall,
        "net_arch": list(p.net_arch),
        "features_extractor_class": extractor_class(name),
        "features_extractor_kwargs": dict(p.features_extractor_kwargs),
        "optimizer_kwargs": dict(p.optimizer_kwargs),
    }


def make_env(
    config: TrainConfig, n_envs: int | None = None, seed: int | None = None, shift: ShiftSpec | None = None
) -> VecEnv:
    """The run's env, for training and evaluation alike: ``n_envs`` copies (default the config's),
    seeded from ``seed`` (default the config's), with ``shift`` applied (its env settings, then its
    observation wrappers)."""
    options = dataclasses.asdict(config.env_options)
    if shift is not None:
        options["env_kwargs"] = {**options["env_kwargs"], **shift.env_kwargs}
    seed = config.seed if seed is None else seed
    venv = make_vec_env(config.env, n_envs or config.n_envs, seed, env_packages=config.env_packages, **options)
    return shift.wrap(venv, seed) if shift is not None else venv


def build_model(config: TrainConfig, env: VecEnv) -> RIMPPO:
    """A fresh model for ``config`` on ``env``; bad settings raise :class:`UsageError`."""
    ppo = config.ppo
    dict_ready = ("minigrid", "combined", "auto")
    if isinstance(env.observation_space, spaces.Dict) and config.policy.features_extractor not in dict_ready:
        raise UsageError(
            f"environment {config.env} has dict observations: set policy.features_extractor to one of "
            f"{', '.join(dict_ready)}"
        )
    try:
        return RIMPPO(
            RIMPolicy,
            env,
            seq_len=ppo.seq_len,
            normalize_reward=ppo.normalize_reward,
            n_steps=ppo.n_steps,
            batch_size=ppo.batch_size,
            n_epochs=ppo.n_epochs,
            learning_rate=schedule(ppo.learning_rate),
            clip_range=schedule(ppo.clip_range),
            ent_coef=ppo.ent_coef,
            vf_coef=ppo.vf_coef,
            gamma=ppo.gamma,
            gae_lambda=ppo.gae_lambda,
            max_grad_norm=ppo.max_grad_norm,
            normalize_advantage=ppo.normalize_advantage,
            target_kl=ppo.target_kl,
            policy_kwargs=policy_kwargs(config, env.observation_space),
            seed=config.seed,
            device=config.device,
            verbose=0,
        )
    except (ValueError, AssertionError, TypeError) as e:  # bad settings; a RuntimeError is a bug, not input
        raise UsageError(f"cannot build the model: {(str(e).splitlines() or [type(e).__name__])[0]}") from None
    except MemoryError:
        raise UsageError(
            f"cannot build the model: not enough memory for a rollout of {config.n_envs} envs x "
            f"{ppo.n_steps} steps; lower ppo.n_steps or n_envs"
        ) from None


#: Entries of SB3's ``data`` that resume needs, read as plain JSON numbers (never unpickled).
_RESUME_DATA = ("num_timesteps", "_n_updates", "_current_progress_remaining", "_episode_num")


def load_model(config: TrainConfig, checkpoint: Path, env: VecEnv | None = None, device: str | None = None) -> RIMPPO:
    """Load a checkpoint of a run without unpickling anything from it.

    SB3's ``load`` unpickles the ``data`` entry of the zip, which runs whatever code a crafted file
    holds. Here the model is rebuilt from the run's ``config.yaml`` (read as safe YAML), its
    tensors are read with ``torch.load(weights_only=True)``, and the step counter and schedule
    progress are read from ``data`` as plain JSON numbers.

    :param config: the run's config.
    :param checkpoint: a ``.zip`` written by this package (``save_model``).
    :param env: the env the model will run on (spaces must match the run's); one of the run's
        own is made and closed when None.
    :param device: overrides ``config.device``.
    """
    try:
        with zipfile.ZipFile(checkpoint) as archive:
            data = json.loads(archive.read("data"))
            tensors = {
                name: th.load(io.BytesIO(archive.read(f"{name}.pth")), map_location="cpu", weights_only=True)
                for name in ("policy", "policy.optimizer")
            }
    except (OSError, KeyError, ValueError, RuntimeError, zipfile.BadZipFile, pickle.UnpicklingError) as e:
        first = (str(e).splitlines() or [type(e).__name__])[0]
        raise DamagedCheckpoint(f"cannot load checkpoint {checkpoint}: {first}") from None
    config = copy.deepcopy(config)
    if device is not None:
        config.device = device
    if config.core == "rims" and not any(k.endswith("input_query_b") for k in tensors["policy"]):
        config.rims = dataclasses.replace(config.rims, input_query_bias=False)  # from before the query bias
    own_env = env is None
    env = make_env(config, n_envs=1) if env is None else env
    try:
        model = build_model(config, env)
    finally:
        if own_env:
            env.close()
    try:
        model.policy.load_state_dict(tensors["policy"])
        model.policy.optimizer.load_state_dict(tensors["policy.optimizer"])
    except (RuntimeError, ValueError, KeyError) as e:
        lines = [line.strip() for line in str(e).splitlines() if line.strip()]
        detail = next((line for line in lines if "size mismatch" in line or "key" in line.lower()), lines[0])
        raise UsageError(
            f"checkpoint {checkpoint} does not fit {config.env} as its run's {CONFIG_FILE} builds it: {detail[:200]}"
        ) from None
    for key in _RESUME_DATA:
        if isinstance(data.get(key), (int, float)) and not isinstance(data.get(key), bool):
            setattr(model, key, data[key])
    model.return_moments = return_moments_state(data)
    return model
