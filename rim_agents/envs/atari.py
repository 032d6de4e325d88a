"""Atari: an SB3 ``VecEnv`` over ale-py's C++ vector env, and the gymnasium + ``AtariWrapper`` backend.

Both backends give the same observations ``(n_envs, frame_stack, 84, 84)`` uint8 (channel first,
grey, max-pooled over the last two of 4 skipped frames, 30 random no-ops and FIRE at reset) and the
same semantics:

- ``dones = terminated | truncated``; with ``terminal_on_life_loss`` a lost life ends the
  training episode while the game goes on (as SB3's ``EpisodicLifeEnv``), and in games with a
  FIRE action the new life is started with FIRE (as SB3's ``FireResetEnv`` does on every reset);
- the frame stack starts from zeros with the newest frame last after every done, a lost life
  included (as SB3's ``VecFrameStack``);
- ``infos[i]["terminal_observation"]`` (the stack the game showed at the done, newest frame last)
  and ``infos[i]["TimeLimit.truncated"]`` on done envs;
- ``infos[i]["episode"] = {"r", "l", "t"}`` once per *game*: unclipped return, length in emulator
  frames (as SB3's ``Monitor`` under ``AtariWrapper``), seconds since start;
- rewards clipped to their sign for training when ``clip_reward``, after the returns are counted.

The C++ backend (``backend="vector"``) steps all envs in threads. It cannot select game modes or
difficulties; those go through ``backend="gym"`` (chosen automatically by ``backend="auto"``).
It cannot step one env alone, so after a lost life the FIRE that SB3 presses inside ``reset``
replaces the agent's action at the new life's first step (that action has no effect, whatever it
is); the frame stack is kept here, not in C++, because C++ keeps it across a lost life.
"""

from __future__ import annotations

import time
from functools import cache
from typing import Any

import gymnasium as gym
import numpy as np
from stable_baselines3.common.env_util import make_atari_env
from stable_baselines3.common.vec_env import DummyVecEnv, VecEnv, VecFrameStack, VecTransposeImage
from stable_baselines3.common.vec_env.base_vec_env import VecEnvIndices, VecEnvObs, VecEnvStepReturn

from rim_agents.errors import UsageError

FRAME_SKIP = 4
BACKENDS = ("auto", "vector", "gym")


@cache
def _ale(game: str) -> Any:
    """An emulator with ``game`` loaded, for static facts about the game."""
    from ale_py import ALEInterface, LoggerMode, roms

    ALEInterface.setLoggerMode(LoggerMode.Error)
    ale = ALEInterface()
    rom = roms.get_rom_path(game)
    if rom is None:
        raise UsageError(f"no ROM for the Atari game {game!r} in ale-py")
    ale.loadROM(rom)
    return ale


def action_set(game: str, full_action_space: bool = False) -> list[str]:
    """The names of the game's actions, in the order of the env's action indices."""
    ale = _ale(game)
    return [a.name for a in (ale.getLegalActionSet() if full_action_space else ale.getMinimalActionSet())]


def fire_action(game: str, full_action_space: bool = False) -> int | None:
    """Index of FIRE in the game's action set, or None for games without it."""
    actions = action_set(game, full_action_space)
    return actions.index("FIRE") if "FIRE" in actions else None


@cache
def game_flavours(game: str) -> tuple[list[int], list[int]]:
    """The valid modes and difficulties of an ALE game."""
    ale = _ale(game)
    return [int(m) for m in ale.getAvailableModes()], [int(d) for d in ale.getAvailableDifficulties()]


def ale_settings(env_id: str) -> dict[str, Any]:
    """Game name and emulator settings of a registered ALE id (sticky actions, action set)."""
    kwargs = gym.spec(env_id).kwargs
    return {
        "game": kwargs["game"],
        "repeat_action_probability": float(kwargs.get("repeat_action_probability", 0.0)),
        "full_action_space": bool(kwargs.get("full_action_space", False)),
        "max_num_frames_per_episode": int(kwargs.get("max_num_frames_per_episode", 108_000)),
    }


def check_flavour(env_id: str, env_kwargs: dict[str, Any]) -> None:
    """Raise :class:`UsageError` listing the valid values for a bad ``mode`` or ``difficulty``."""
    game = ale_settings(env_id)["game"]
    modes, difficulties = game_flavours(game)
    mode, difficulty = env_kwargs.get("mode"), env_kwargs.get("difficulty")
    if mode is not None and mode not in modes:
        raise UsageError(f"mode {mode} is not a mode of {game}: valid modes are {modes}")
    if difficulty is not None and difficulty not in difficulties:
        raise UsageError(
            f"difficulty {difficulty} is not a difficulty of {game}: valid difficulties are {difficulties}"
        )


class AtariVecEnv(VecEnv):
    """SB3 ``VecEnv`` over ``ale_py.vector_env.AtariVectorEnv`` (see the module docstring).

    :param env_id: a registered ALE id (its game, sticky-action probability and action set are used).
    :param n_envs: number of environments.
    :param seed: seed of env 0 (env ``i`` gets ``seed + i``).
    :param frame_stack: frames stacked per observation.
    :param terminal_on_life_loss: end the training episode on a lost life.
    :param clip_reward: train on the sign of the reward.
    :param repeat_action_probability: overrides the id's sticky-action probability when given.
    :param num_threads: emulator threads (0: one per env, up to the cores).
    :param max_episode_frames: truncate games after this many emulator frames (default: the id's,
        108,000 frames = 30 minutes).
    :param noop_max: at most this many no-op actions at the start of a game.
    """

    def __init__(
        self,
        env_id: str,
        n_envs: int,
        seed: int | None = None,
        frame_stack: int = 4,
        terminal_on_life_loss: bool = True,
        clip_reward: bool = True,
        repeat_action_probability: float | None = None,
        num_threads: int = 0,
        max_episode_frames: int | None = None,
        noop_max: int = 30,
    ) -> None:
        from ale_py.vector_env import AtariVectorEnv

        settings = ale_settings(env_id)
        if repeat_action_probability is not None:
            settings["repeat_action_probability"] = float(repeat_action_probability)
        if max_episode_frames is not None:
            settings["max_num_frames_per_episode"] = int(max_episode_frames)
        self.settings = settings
        self.env = AtariVectorEnv(
            settings["game"],
            n_envs,
            num_threads=num_threads,
            max_num_frames_per_episode=settings["max_num_frames_per_episode"],
            repeat_action_probability=settings["repeat_action_probability"],
            full_action_space=settings["full_action_space"],
            autoreset_mode="SameStep",
            stack_num=1,  # stacked here: C++ would keep the stack across a lost life
            frameskip=FRAME_SKIP,
            noop_max=noop_max,
            episodic_life=False,
            life_loss_info=terminal_on_life_loss,
            reward_clipping=False,
            use_fire_reset=True,
        )
        frame_shape = self.env.single_observation_space.shape
        assert frame_shape is not None
        obs_space = gym.spaces.Box(0, 255, (frame_stack, *frame_shape[1:]), dtype=np.uint8)
        super().__init__(n_envs, obs_space, self.env.single_action_space)
        self.stack = np.zeros((n_envs, frame_stack, *frame_shape[1:]), dtype=np.uint8)
        self.terminal_on_life_loss = terminal_on_life_loss
        self.fire = fire_action(settings["game"], settings["full_action_space"]) if terminal_on_life_loss else None
        self._fire_next = np.zeros(n_envs, dtype=bool)  # a life was lost: FIRE at the next step
        self.clip_reward = clip_reward
        if seed is not None:
            self.seed(seed)
        self._actions: np.ndarray | None = None
        self._returns = np.zeros(n_envs)
        self._lengths = np.zeros(n_envs, dtype=np.int64)
        self._frame_numbers = np.zeros(n_envs, dtype=np.int64)
        self._start = time.time()

    def reset(self) -> VecEnvObs:
        # Seeds set by seed() apply to this reset only, as in SB3's VecEnvs.
        seeds = None if self._seeds[0] is None else np.asarray(self._seeds, dtype=np.int64)
        obs, info = self.env.reset(seed=seeds)
        self._reset_seeds()
        self._returns[:] = 0
        self._lengths[:] = 0
        self._frame_numbers = np.asarray(info["episode_frame_number"], dtype=np.int64)
        self._fire_next[:] = False
        self.reset_infos = [{} for _ in range(self.num_envs)]
        self.stack[:] = 0
        self.stack[:, -1] = obs[:, 0]
        return self.stack.copy()

    def step_async(self, actions: np.ndarray) -> None:
        self._actions = np.asarray(actions, dtype=np.int64).reshape(self.num_envs)

    def step_wait(self) -> VecEnvStepReturn:
        assert self._actions is not None, "step_async must come before step_wait"
        actions = self._actions
        if self.fire is not None and self._fire_next.any():
            actions = np.where(self._fire_next, self.fire, actions)
        obs, rewards, terminated, truncated, info = self.env.step(actions)
        rewards = np.asarray(rewards, dtype=np.float64)
        self._returns += rewards
        self._lengths += 1
        frames = np.asarray(info["episode_frame_number"], dtype=np.int64)
        dones = np.logical_or(terminated, truncated)
        # A new game restarts the frame count; a lost life does not.
        game_over = dones & (truncated | (frames < self._frame_numbers))
        self._frame_numbers = frames
        self._fire_next = dones & ~game_over  # the C++ env presses FIRE itself after a real reset
        # The frame the game showed: after a game over obs is already the next game's first frame.
        self.stack[:, :-1] = self.stack[:, 1:]
        self.stack[:, -1] = obs[:, 0]
        for i in np.flatnonzero(game_over):
            self.stack[i, -1] = info["final_obs"][i][0]
        infos: list[dict[str, Any]] = [{"lives": int(info["lives"][i])} for i in range(self.num_envs)]
        elapsed = round(time.time() - self._start, 6)
        for i in np.flatnonzero(dones):
            infos[i]["terminal_observation"] = self.stack[i].copy()
            infos[i]["TimeLimit.truncated"] = bool(truncated[i] and not terminated[i])
            self.stack[i] = 0
            self.stack[i, -1] = obs[i, 0]
            if game_over[i]:
                length = int(self._lengths[i]) * FRAME_SKIP
                infos[i]["episode"] = {"r": float(self._returns[i]), "l": length, "t": elapsed}
                self._returns[i] = 0.0
                self._lengths[i] = 0
        train_rewards = np.sign(rewards) if self.clip_reward else rewards
        return self.stack.copy(), train_rewards.astype(np.float32), dones, infos

    def close(self) -> None:
        self.env.close()

    # SB3's VecEnv interface for per-env attributes and methods; the C++ env has neither.
    def get_attr(self, attr_name: str, indices: VecEnvIndices = None) -> list[Any]:
        if attr_name == "render_mode":
            return [None] * len(list(self._get_indices(indices)))
        raise AttributeError(f"AtariVecEnv has no per-env attribute {attr_name!r}")

    def set_attr(self, attr_name: str, value: Any, indices: VecEnvIndices = None) -> None:
        raise AttributeError(f"AtariVecEnv cannot set per-env attribute {attr_name!r}")

    def env_method(self, method_name: str, *args: Any, indices: VecEnvIndices = None, **kwargs: Any) -> list[Any]:
        raise AttributeError(f"AtariVecEnv has no per-env method {method_name!r}")

    def env_is_wrapped(self, wrapper_class: type[gym.Wrapper], indices: VecEnvIndices = None) -> list[bool]:
        return [False] * len(list(self._get_indices(indices)))

    def get_images(self) -> list[np.ndarray]:
        raise NotImplementedError("AtariVecEnv does not render; use backend='gym' to render")


def make_atari_vec_env(
    env_id: str,
    n_envs: int,
    seed: int | None = None,
    frame_stack: int = 4,
    terminal_on_life_loss: bool = True,
    clip_reward: bool = True,
    env_kwargs: dict[str, Any] | None = None,
    backend: str = "auto",
) -> VecEnv:
    """An Atari ``VecEnv`` of either backend (see the module docstring).

    :param env_kwargs: ``mode``, ``difficulty`` and ``repeat_action_probability``; ``mode`` and
        ``difficulty`` need the gym backend.
    :param backend: ``"auto"`` (C++ unless a mode or difficulty is asked for), ``"vector"`` or ``"gym"``.
    """
    env_kwargs = dict(env_kwargs or {})
    if backend not in BACKENDS:
        raise UsageError(f"unknown Atari backend {backend!r}: choose one of {', '.join(BACKENDS)}")
    check_flavour(env_id, env_kwargs)
    flavoured = bool({"mode", "difficulty"} & set(env_kwargs))
    unknown = set(env_kwargs) - {"mode", "difficulty", "repeat_action_probability"}
    if unknown:
        raise UsageError(
            f"Atari env_kwargs {sorted(unknown)} are not supported: use mode, difficulty, repeat_action_probability"
        )
    if backend == "vector" and flavoured:
        raise UsageError("the C++ Atari backend has no game modes or difficulties: use backend=gym (or auto)")
    if backend == "vector" or (backend == "auto" and not flavoured):
        return AtariVecEnv(
            env_id,
            n_envs,
            seed=seed,
            frame_stack=frame_stack,
            terminal_on_life_loss=terminal_on_life_loss,
            clip_reward=clip_reward,
            repeat_action_probability=env_kwargs.get("repeat_action_probability"),
        )
    # gymnasium backend: the raw emulator (frameskip 1) under SB3's AtariWrapper (skip 4, max-pool).
    venv = make_atari_env(
        env_id,
        n_envs=n_envs,
        seed=seed,
        env_kwargs={**env_kwargs, "frameskip": 1},
        wrapper_kwargs={"terminal_on_life_loss": terminal_on_life_loss, "clip_reward": clip_reward},
        vec_env_cls=DummyVecEnv,
    )
    # Channel first, like the C++ backend: (n_envs, frame_stack, 84, 84).
    return VecTransposeImage(VecFrameStack(venv, frame_stack))
