"""Distribution shifts: named, parametrised changes to an environment, composable with ``+``.

A shift either changes how the environment is built (``env_kwargs``: distractor palette and count,
view size, Atari mode, difficulty, sticky actions) or transforms observations (a ``VecEnv``
wrapper: flicker, occlusion, drawn distractors). ``flicker-0.5+occlusion-0.2`` applies both.

The catalogue below is generated from :data:`SHIFT_DEFS` (as are ``evaluate.py --help`` and the
README's table).
"""

from __future__ import annotations

import re
import textwrap
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import gymnasium as gym
import numpy as np
from stable_baselines3.common.vec_env import VecEnv, VecEnvWrapper
from stable_baselines3.common.vec_env.base_vec_env import VecEnvStepReturn

from rim_agents.config import TrainConfig, env_family
from rim_agents.errors import UsageError

FAMILIES = ("atari", "minigrid", "classic")
FAMILY_NAMES = {"atari": "an Atari", "minigrid": "a MiniGrid", "classic": "a non-Atari, non-MiniGrid"}
FrameTransform = Callable[[np.ndarray, np.random.Generator], np.ndarray]


@dataclass(frozen=True)
class ShiftDef:
    """A kind of shift: its name pattern, families, and how a parameter turns into changes."""

    name: str
    pattern: str  # regex with an optional group for the parameter
    families: tuple[str, ...]
    doc: str


SHIFT_DEFS: tuple[ShiftDef, ...] = (
    ShiftDef("none", r"none", FAMILIES, "nothing (in distribution)"),
    ShiftDef(
        "novel-distractors",
        r"novel-distractors",
        ("minigrid",),
        "distractors only from the held-out palette (every box; purple, yellow, grey objects), never seen in training",
    ),
    ShiftDef("more-distractors", r"more-distractors", ("minigrid",), "twice as many distractors"),
    ShiftDef("novel-and-more", r"novel-and-more", ("minigrid",), "both of the above"),
    ShiftDef("view-N", r"view-(\d+)", ("minigrid",), "an N x N view, N = 3, 5 or 7 (cells outside it read unseen)"),
    ShiftDef(
        "cue-N",
        r"cue-(\d+)",
        ("minigrid",),
        "memory variant only (an env with cue_steps, e.g. PickupCue): the target shown in the first N "
        "observations (cue-0: never)",
    ),
    ShiftDef(
        "flicker-p",
        r"flicker-([0-9.]+)",
        FAMILIES,
        "each observation blanked with probability p (Hausknecht & Stone 2015): Atari blanks each frame "
        "before stacking, MiniGrid the image (the target stays), any other env the whole observation "
        "(zeros; index 0 for a discrete one)",
    ),
    ShiftDef(
        "obs-noise-s",
        r"obs-noise-([0-9.]+)",
        ("classic",),
        "Gaussian noise of standard deviation s added to every (Box) observation",
    ),
    ShiftDef(
        "occlusion-f", r"occlusion-([0-9.]+)", ("atari",), "a fixed full-width band covering a fraction f of the screen"
    ),
    ShiftDef(
        "distractors-N",
        r"distractors(?:-(\d+))?",
        ("atari",),
        "N (default 3) novel moving bright squares drawn on every frame (after Gamrian & Goldberg 2019)",
    ),
    ShiftDef("sticky-p", r"sticky-([0-9.]+)", ("atari",), "repeat_action_probability p"),
    ShiftDef(
        "mode-M", r"mode-(\d+)", ("atari",), "ALE game mode M (Farebrother et al. 2018; Breakout 12 hides the bricks)"
    ),
    ShiftDef("difficulty-D", r"difficulty-(\d+)", ("atari",), "ALE game difficulty D"),
)


def _families(d: ShiftDef) -> str:
    return "all" if d.families == FAMILIES else ", ".join(d.families)


def shift_table(markdown: bool = False) -> str:
    """The catalogue: a Markdown table (the README's) or plain text (``--help``, this module's doc)."""
    if markdown:
        rows = ["| shift | families | what changes |", "|---|---|---|"]
        return "\n".join(rows + [f"| `{d.name}` | {_families(d)} | {d.doc} |" for d in SHIFT_DEFS])
    lines = []
    for d in SHIFT_DEFS:
        wrapped = textwrap.wrap(d.doc, 63) or [""]
        lines.append(f"  {d.name:<19}{_families(d):<16}{wrapped[0]}")
        lines += [" " * 37 + more for more in wrapped[1:]]
    return "\n".join(lines)


__doc__ = f"{__doc__}\n{shift_table()}\n\nShifts compose with ``+``, e.g. ``flicker-0.5+occlusion-0.2``.\n"


#: The shifts ``--shifts all`` runs, per family.
DEFAULT_SHIFTS: dict[str, tuple[str, ...]] = {
    "minigrid": ("none", "novel-distractors", "more-distractors", "novel-and-more", "view-5", "view-3", "flicker-0.5"),
    "atari": ("none", "flicker-0.5", "occlusion-0.2", "distractors", "sticky-0.25"),
    "classic": ("none", "flicker-0.5"),
}


@dataclass
class ShiftSpec:
    """What a (composed) shift does to one environment."""

    name: str
    env_kwargs: dict[str, Any] = field(default_factory=dict)
    frame_transforms: list[tuple[str, FrameTransform]] = field(default_factory=list)  # Atari, per frame
    image_blank_p: float = 0.0  # MiniGrid flicker
    obs_blank_p: float = 0.0  # flicker of any other env
    obs_noise: float = 0.0  # Gaussian noise on Box observations

    def wrap(self, venv: VecEnv, seed: int = 0) -> VecEnv:
        """Apply the observation-level part of the shift to a ``VecEnv``."""
        if self.frame_transforms:
            venv = FrameShiftVecEnv(venv, [t for _, t in self.frame_transforms], seed)
        if self.image_blank_p > 0:
            venv = ImageFlickerVecEnv(venv, self.image_blank_p, seed)
        if self.obs_blank_p > 0 or self.obs_noise > 0:
            venv = ObservationShiftVecEnv(venv, self.obs_blank_p, self.obs_noise, seed)
        return venv


def shift_spec(config: TrainConfig, shift: str) -> ShiftSpec:
    """A shift for the env of ``config`` (its family, env id and env settings)."""
    return parse_shift(shift, env_family(config.env), config.env_options.env_kwargs, config.env)


def shift_names(family: str) -> list[str]:
    return [d.name for d in SHIFT_DEFS if family in d.families]


def _probability(value: str, what: str) -> float:
    try:
        p = float(value)
    except ValueError:
        raise UsageError(f"shift {what}: {value!r} is not a number (e.g. flicker-0.5)") from None
    if not 0.0 <= p <= 1.0:
        raise UsageError(f"shift {what}: {value} is not in [0, 1]")
    return p


def parse_shift(text: str, family: str, base_env_kwargs: dict[str, Any] | None = None, env_id: str = "") -> ShiftSpec:
    """Turn ``"flicker-0.5+occlusion-0.2"`` into a :class:`ShiftSpec` for ``family``.

    :param text: shift names joined by ``+``.
    :param family: ``atari``, ``minigrid`` or ``classic``.
    :param base_env_kwargs: the training env's ``env_kwargs`` (``more-distractors`` doubles their count).
    :param env_id: the training env id (its registered defaults count too).
    """
    base = dict(gym.spec(env_id).kwargs) if env_id and env_id in gym.registry else {}
    base.update(base_env_kwargs or {})
    spec = ShiftSpec(name=text)
    for part in text.split("+"):
        part = part.strip()
        match = None
        for d in SHIFT_DEFS:
            match = re.fullmatch(d.pattern, part)
            if match:
                break
        if match is None:
            raise UsageError(f"unknown shift {part!r}: valid shifts for {family} are {', '.join(shift_names(family))}")
        if family not in d.families:
            raise UsageError(
                f"shift {part!r} needs {' or '.join(FAMILY_NAMES[f] for f in d.families)} environment; "
                f"valid shifts for this {family} env are {', '.join(shift_names(family))}"
            )
        arg = match.group(1) if match.groups() else None
        _apply(spec, d.name, arg, part, base, family)
    return spec


def _apply(spec: ShiftSpec, kind: str, arg: str | None, text: str, base: dict[str, Any], family: str) -> None:
    kw = spec.env_kwargs
    n_base = int(base.get("num_distractors", 3))
    if kind in ("novel-distractors", "novel-and-more"):
        kw["distractor_palette"] = "heldout"
    if kind in ("more-distractors", "novel-and-more"):
        kw["num_distractors"] = 2 * n_base
    elif kind == "view-N":
        assert arg is not None
        if int(arg) not in (3, 5, 7):
            raise UsageError(f"shift {text}: the view size must be 3, 5 or 7")
        kw["view_size"] = int(arg)
    elif kind == "cue-N":
        assert arg is not None
        if base.get("cue_steps") is None:
            raise UsageError(
                f"shift {text} needs the memory variant of the pickup task (an env with cue_steps, "
                "e.g. RIMAgents/PickupCue-6x6-v0)"
            )
        kw["cue_steps"] = int(arg)
    elif kind == "flicker-p":
        assert arg is not None
        p = _probability(arg, text)
        if family == "atari":
            spec.frame_transforms.append((text, flicker(p)))
        elif family == "minigrid":
            spec.image_blank_p = p
        else:
            spec.obs_blank_p = p
    elif kind == "obs-noise-s":
        assert arg is not None
        try:
            spec.obs_noise = float(arg)
        except ValueError:
            raise UsageError(f"shift {text}: {arg!r} is not a number (e.g. obs-noise-0.1)") from None
    elif kind == "occlusion-f":
        assert arg is not None
        spec.frame_transforms.append((text, occlusion(_probability(arg, text))))
    elif kind == "distractors-N":
        spec.frame_transforms.append((text, MovingSquares(int(arg) if arg else 3)))
    elif kind == "sticky-p":
        assert arg is not None
        kw["repeat_action_probability"] = _probability(arg, text)
    elif kind == "mode-M":
        assert arg is not None
        kw["mode"] = int(arg)
    elif kind == "difficulty-D":
        assert arg is not None
        kw["difficulty"] = int(arg)


# ------------------------------------------------------------------------------ frame transforms
def flicker(p: float) -> FrameTransform:
    """Blank each frame (all pixels 0) with probability ``p``."""

    def apply(frames: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        blank = rng.random(frames.shape[0]) < p
        frames[blank] = 0
        return frames

    return apply


def occlusion(fraction: float) -> FrameTransform:
    """Black out a fixed full-width band, centred vertically, covering ``fraction`` of the screen."""

    def apply(frames: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        height = frames.shape[-2]
        rows = round(fraction * height)
        top = (height - rows) // 2
        frames[..., top : top + rows, :] = 0
        return frames

    return apply


class MovingSquares:
    """``n`` bright 6x6 squares per env moving at constant speed and bouncing off the edges.

    Called once per new frame (all envs at once); positions persist across calls.
    """

    def __init__(self, n: int, size: int = 6) -> None:
        self.n, self.size = n, size
        self.pos: np.ndarray | None = None
        self.vel: np.ndarray | None = None
        self.shade: np.ndarray | None = None

    def __call__(self, frames: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        n_envs, height, width = frames.shape[0], frames.shape[-2], frames.shape[-1]
        limit = np.array([height - self.size, width - self.size], dtype=float)
        if self.pos is None or self.pos.shape[0] != n_envs:
            self.pos = rng.random((n_envs, self.n, 2)) * limit
            self.vel = rng.uniform(-3, 3, (n_envs, self.n, 2))
            self.shade = rng.integers(150, 256, (n_envs, self.n))
        assert self.vel is not None and self.shade is not None
        self.pos = self.pos + self.vel
        bounce = (self.pos < 0) | (self.pos > limit)
        self.vel[bounce] *= -1
        self.pos = np.clip(self.pos, 0, limit)
        for e in range(n_envs):
            for j in range(self.n):
                y, x = self.pos[e, j].astype(int)
                frames[e, ..., y : y + self.size, x : x + self.size] = self.shade[e, j]
        return frames


class FrameShiftVecEnv(VecEnvWrapper):
    """Apply per-frame transforms to channel-first stacked frames ``(n_envs, stack, H, W)``.

    The wrapper keeps its own frame stack: each new frame (the newest of the env's stack) is
    transformed once, so a frame blanked at step t stays blanked while it is in the stack. After a
    reset, the env's initial stack is transformed frame by frame.
    """

    def __init__(self, venv: VecEnv, transforms: list[FrameTransform], seed: int = 0) -> None:
        super().__init__(venv)
        shape = venv.observation_space.shape
        if shape is None or len(shape) != 3:
            raise UsageError(f"frame shifts need stacked frames (stack, H, W), got observations of shape {shape}")
        self.transforms = transforms
        self.rng = np.random.default_rng(seed)
        self.stack: np.ndarray | None = None

    def _transform(self, frames: np.ndarray) -> np.ndarray:
        frames = frames.copy()
        for t in self.transforms:
            frames = t(frames, self.rng)
        return frames

    def _fresh_stack(self, obs: np.ndarray) -> np.ndarray:
        # Transform every frame of a new stack, frame index by frame index.
        out = np.empty_like(obs)
        for k in range(obs.shape[1]):
            out[:, k] = self._transform(obs[:, k])
        return out

    def reset(self) -> np.ndarray:
        obs = self.venv.reset()
        assert isinstance(obs, np.ndarray)
        self.stack = self._fresh_stack(obs)
        return self.stack.copy()

    def step_wait(self) -> VecEnvStepReturn:
        obs, rewards, dones, infos = self.venv.step_wait()
        assert isinstance(obs, np.ndarray) and self.stack is not None
        newest = self._transform(obs[:, -1])
        rolled = np.concatenate([self.stack[:, 1:], newest[:, None]], axis=1)
        for i in np.flatnonzero(dones):
            if "terminal_observation" in infos[i]:
                infos[i]["terminal_observation"] = rolled[i].copy()
            rolled[i] = self._fresh_stack(obs[i : i + 1])[0]
        self.stack = rolled
        return self.stack.copy(), rewards, dones, infos


class ImageFlickerVecEnv(VecEnvWrapper):
    """MiniGrid: blank the ``image`` of each observation (all cells "unseen") with probability ``p``."""

    def __init__(self, venv: VecEnv, p: float, seed: int = 0) -> None:
        super().__init__(venv)
        self.p = p
        self.rng = np.random.default_rng(seed)

    def _blank(self, obs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        obs = {k: v.copy() for k, v in obs.items()}
        blank = self.rng.random(obs["image"].shape[0]) < self.p
        obs["image"][blank] = 0
        return obs

    def reset(self) -> Any:
        return self._blank(self.venv.reset())  # type: ignore[arg-type]

    def step_wait(self) -> VecEnvStepReturn:
        obs, rewards, dones, infos = self.venv.step_wait()
        return self._blank(obs), rewards, dones, infos  # type: ignore[arg-type]


class ObservationShiftVecEnv(VecEnvWrapper):
    """Any env: blank each observation with probability ``blank_p`` (zeros) and add Gaussian noise of
    std ``noise`` to Box observations."""

    def __init__(self, venv: VecEnv, blank_p: float, noise: float, seed: int = 0) -> None:
        super().__init__(venv)
        space = venv.observation_space
        if noise > 0 and not isinstance(space, gym.spaces.Box):
            raise UsageError(f"shift obs-noise needs Box observations; this env observes {space}")
        if not isinstance(
            space, (gym.spaces.Box, gym.spaces.Discrete, gym.spaces.MultiDiscrete, gym.spaces.MultiBinary)
        ):
            raise UsageError(f"flicker needs an array observation; this env observes {space}")
        self.blank_p, self.noise = blank_p, noise
        self.rng = np.random.default_rng(seed)

    def _shift(self, obs: np.ndarray) -> np.ndarray:
        obs = np.array(obs, copy=True)
        if self.noise > 0:
            obs = (obs + self.rng.normal(0.0, self.noise, obs.shape)).astype(obs.dtype)
        if self.blank_p > 0:
            obs[self.rng.random(obs.shape[0]) < self.blank_p] = 0
        return obs

    def reset(self) -> Any:
        return self._shift(self.venv.reset())  # type: ignore[arg-type]

    def step_wait(self) -> VecEnvStepReturn:
        obs, rewards, dones, infos = self.venv.step_wait()
        return self._shift(obs), rewards, dones, infos  # type: ignore[arg-type]
