"""MiniGrid object picking with distractors, with palettes of distractors never seen in training."""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence
from typing import Any

import numpy as np
from gymnasium import spaces
from minigrid.core.constants import COLOR_TO_IDX, OBJECT_TO_IDX
from minigrid.core.grid import Grid
from minigrid.core.mission import MissionSpace
from minigrid.core.world_object import Ball, Box, Key
from minigrid.minigrid_env import MiniGridEnv

TYPES = ("key", "ball", "box")
COLOURS = tuple(sorted(COLOR_TO_IDX, key=COLOR_TO_IDX.__getitem__))  # red, green, blue, purple, yellow, grey
_OBJECTS: dict[str, Any] = {"key": Key, "ball": Ball, "box": Box}
Pair = tuple[str, str]
#: The memory variant's ``target`` once the cue is gone: one past the last type and colour.
HIDDEN_TARGET = (len(TYPES), len(COLOURS))


def target_hidden(target: Any) -> np.ndarray:
    """Which of a batch of ``target`` observations ``(..., 2)`` say "hidden" (:data:`HIDDEN_TARGET`)."""
    return np.all(np.asarray(target) == HIDDEN_TARGET, axis=-1)


def latch_shown_target(latch: np.ndarray, target: np.ndarray, episode_start: np.ndarray) -> None:
    """Update ``latch`` ``(n_envs, 2)``, the target each env's episode last showed, in place with one
    step's ``target`` observations: hidden again where an episode starts, the target where one is shown."""
    latch[episode_start] = HIDDEN_TARGET
    shown = ~target_hidden(target)
    latch[shown] = target[shown]


def recall_scored(target: Any, latch: Any) -> np.ndarray:
    """Where a recall of the latched target is asked for: the observed target hidden, the latched one not."""
    return target_hidden(target) & ~target_hidden(latch)


#: Targets and training distractors: keys and balls in red, green or blue.
TRAIN_PALETTE: tuple[Pair, ...] = tuple((t, c) for t in ("key", "ball") for c in ("red", "green", "blue"))
#: Never seen in training: every box, and every object in purple, yellow or grey.
HELDOUT_PALETTE: tuple[Pair, ...] = tuple((t, c) for t in TYPES for c in COLOURS if (t, c) not in TRAIN_PALETTE)
VIEW = 7  # the observation tensor is always VIEW x VIEW; smaller views hide the outer cells
UNSEEN = OBJECT_TO_IDX["unseen"]
_WALL = (OBJECT_TO_IDX["wall"], COLOR_TO_IDX["grey"], 0)
_EMPTY = (OBJECT_TO_IDX["empty"], 0, 0)
MAX_INDEX = max(OBJECT_TO_IDX.values())


def resolve_palette(palette: str | Sequence[Sequence[str]]) -> tuple[Pair, ...]:
    """``"train"``, ``"heldout"`` or a list of ``(type, colour)`` pairs, checked."""
    if isinstance(palette, str):
        if palette == "train":
            return TRAIN_PALETTE
        if palette == "heldout":
            return HELDOUT_PALETTE
        raise ValueError(f"distractor_palette {palette!r} is not 'train', 'heldout' or a list of (type, colour)")
    pairs = []
    for item in palette:
        if len(item) != 2 or item[0] not in TYPES or item[1] not in COLOURS:
            raise ValueError(
                f"distractor palette entry {item!r} is not a (type, colour) pair with type in {TYPES} "
                f"and colour in {COLOURS}"
            )
        pairs.append((str(item[0]), str(item[1])))
    return tuple(dict.fromkeys(pairs))


def view_mask(view_size: int) -> np.ndarray:
    """``(VIEW, VIEW)`` bool mask, indexed ``[x, y]`` as MiniGrid's encoding, of the cells a
    ``view_size`` view keeps: the agent sits at ``x = VIEW // 2``, ``y = VIEW - 1``."""
    mask = np.zeros((VIEW, VIEW), dtype=bool)
    half = view_size // 2
    mask[VIEW // 2 - half : VIEW // 2 + half + 1, VIEW - view_size :] = True
    return mask


class PickupEnv(MiniGridEnv):
    """
    ## Description

    A room with one target object and ``num_distractors`` other objects. The agent must pick up
    the target. Targets are keys or balls in red, green or blue (the training palette).
    Distractors come from a palette of ``(type, colour)`` pairs: the training palette by default,
    or a held-out palette (every box, and anything purple, yellow or grey) that a policy trained
    on the default never saw. A distractor is never identical to the target, and the target can
    always be reached (a free cell beside it is connected to the agent).

    ## Mission Space

    "pick up the {colour} {type}"; the same information is in the observation as numbers.

    ## Memory variant

    With ``cue_steps=N`` the target is shown (in ``target`` and in the mission) only in the first
    ``N`` observations of an episode (the one from ``reset`` and ``N - 1`` more), during which the
    room is dark (every cell "unseen"), and hidden afterwards: ``target`` reads ``(3, 6)``, one past
    the last type and colour, and the mission "pick up the object you were shown". The objects are
    then visible, so an agent must remember which one it was asked for; a memoryless policy is left
    with a guess among the objects it sees. (With the room visible during the cue, feed-forward PPO
    reached up to 0.79 training success over 100 episodes, at 308k steps, against a chance of 0.5:
    the cue can steer the first action towards the target.)
    ``cue_steps=None`` (the default) shows the target throughout.

    ## Observation Space

    ``Dict``: ``image`` ``(7, 7, 3)`` uint8 egocentric view of (object, colour, state) indices as
    in MiniGrid, with the agent at the bottom centre; with ``view_size`` ``v < 7`` the cells
    outside the ``v x v`` view are "unseen", so one network runs on every view size.
    ``target``: ``MultiDiscrete([3, 6])``, indices into ``TYPES`` and ``COLOURS``
    (``MultiDiscrete([4, 7])`` with ``cue_steps``, the last index of each meaning "hidden").

    ## Action Space

    | Num | Name    | Action            |
    |-----|---------|-------------------|
    | 0   | left    | Turn left         |
    | 1   | right   | Turn right        |
    | 2   | forward | Move forward      |
    | 3   | pickup  | Pick up an object |

    ## Rewards

    ``1 - 0.9 * (step_count / max_steps)`` for picking up the target, ``0`` otherwise.

    ## Termination

    The episode terminates when the agent picks up any object (``info["success"]`` or
    ``info["picked_wrong"]``), and is truncated after ``max_steps`` steps (default ``5 * size**2``).
    The last step's info also holds ``is_success``, which SB3 logs as ``rollout/success_rate``.

    ## Registered ids

    - ``RIMAgents/Pickup-8x8-v0``: training setting (3 distractors, training palette, full view).
    - ``RIMAgents/Pickup-8x8-Novel-v0``: distractors from the held-out palette.
    - ``RIMAgents/Pickup-8x8-More-v0``: 6 distractors from the training palette.
    - ``RIMAgents/Pickup-8x8-NovelMore-v0``: 6 held-out distractors.
    - ``RIMAgents/Pickup-8x8-View5-v0``, ``RIMAgents/Pickup-8x8-View3-v0``: smaller views.
    - ``RIMAgents/Pickup-6x6-v0``: a 6x6 room with 2 distractors, for quick runs.
    - ``RIMAgents/PickupCue-6x6-v0``: the memory variant, a 6x6 room with 1 distractor and the
      target shown in the first observation only (``cue_steps=1``).

    Every id accepts ``size``, ``num_distractors``, ``distractor_palette``, ``view_size`` and
    ``cue_steps``.
    """

    def __init__(
        self,
        size: int = 8,
        num_distractors: int = 3,
        distractor_palette: str | Sequence[Sequence[str]] = "train",
        view_size: int = 7,
        max_steps: int | None = None,
        cue_steps: int | None = None,
        **kwargs: Any,
    ) -> None:
        if cue_steps is not None and (not isinstance(cue_steps, int) or isinstance(cue_steps, bool) or cue_steps < 0):
            raise ValueError(f"cue_steps={cue_steps!r} is invalid: use a number of steps >= 0, or None (always shown)")
        self.cue_steps = cue_steps
        if not isinstance(view_size, int) or view_size % 2 == 0 or not 3 <= view_size <= VIEW:
            raise ValueError(f"view_size={view_size!r} is invalid: use an odd number from 3 to {VIEW}")
        if not isinstance(size, int) or size < 4:
            raise ValueError(f"size={size!r} is invalid: the room needs size >= 4 (walls included)")
        free_cells = (size - 2) ** 2
        if not isinstance(num_distractors, int) or not 0 <= num_distractors <= free_cells - 3:
            raise ValueError(
                f"num_distractors={num_distractors!r} is invalid: use 0 to {free_cells - 3} in a {size}x{size} room"
            )
        self.palette = resolve_palette(distractor_palette)
        if num_distractors > 0:
            for target in TRAIN_PALETTE:
                if not [p for p in self.palette if p != target]:
                    raise ValueError(
                        f"distractor palette {list(self.palette)} leaves no possible distractor for the target "
                        f"{target[1]} {target[0]}: add pairs that differ from every target"
                    )
        self.num_distractors = num_distractors
        self.view_size = view_size
        self._hidden = ~view_mask(view_size)
        self.target: Pair = TRAIN_PALETTE[0]
        self.target_pos: tuple[int, int] = (0, 0)
        self._world: np.ndarray | None = None
        self._target_obs = np.zeros(2, dtype=np.int64)
        mission_space = MissionSpace(
            mission_func=lambda colour, kind: f"pick up the {colour} {kind}",
            ordered_placeholders=[list(COLOURS), list(TYPES)],
        )
        super().__init__(
            mission_space=mission_space,
            width=size,
            height=size,
            max_steps=max_steps if max_steps is not None else 5 * size**2,
            see_through_walls=True,
            agent_view_size=VIEW,
            **kwargs,
        )
        self.action_space = spaces.Discrete(4)
        self.observation_space = spaces.Dict(
            {
                "image": spaces.Box(0, MAX_INDEX, (VIEW, VIEW, 3), dtype=np.uint8),
                "target": spaces.MultiDiscrete(
                    [len(TYPES), len(COLOURS)] if cue_steps is None else [len(TYPES) + 1, len(COLOURS) + 1]
                ),
            }
        )

    # -------------------------------------------------------------------------------- layout
    def _gen_grid(self, width: int, height: int) -> None:
        for _ in range(100):
            self.grid = Grid(width, height)
            self.grid.wall_rect(0, 0, width, height)
            self.target = self._rand_elem(TRAIN_PALETTE)
            pool = [p for p in self.palette if p != self.target]
            objects = [self.target] + [self._rand_elem(pool) for _ in range(self.num_distractors)]
            for i, (kind, colour) in enumerate(objects):
                pos = self.place_obj(_OBJECTS[kind](colour))
                if i == 0:
                    self.target_pos = (int(pos[0]), int(pos[1]))
            self.place_agent()
            if self.target_reachable():
                break
        else:  # pragma: no cover - a 100-fold failure needs a room crammed with objects
            raise RuntimeError("could not place a reachable target in 100 tries: use fewer distractors")
        self.mission = f"pick up the {self.target[1]} {self.target[0]}"
        self._target_obs = np.array([TYPES.index(self.target[0]), COLOURS.index(self.target[1])], dtype=np.int64)
        self._world = None

    def target_reachable(self) -> bool:
        """Whether a free cell next to the target can be walked to from the agent."""
        start = tuple(int(v) for v in self.agent_pos)
        seen = {start}
        queue = deque([start])
        goals = {(self.target_pos[0] + dx, self.target_pos[1] + dy) for dx, dy in ((1, 0), (-1, 0), (0, 1), (0, -1))}
        while queue:
            x, y = queue.popleft()
            if (x, y) in goals:
                return True
            for nx, ny in ((x + 1, y), (x - 1, y), (x, y + 1), (x, y - 1)):
                if (nx, ny) not in seen and self.grid.get(nx, ny) is None:
                    seen.add((nx, ny))
                    queue.append((nx, ny))
        return False

    # ------------------------------------------------------------------------- observations
    def _encode_world(self) -> np.ndarray:
        """The whole grid encoded once, padded with walls by ``VIEW`` cells on every side."""
        padded = np.empty((self.width + 2 * VIEW, self.height + 2 * VIEW, 3), dtype=np.uint8)
        padded[...] = _WALL
        padded[VIEW:-VIEW, VIEW:-VIEW] = self.grid.encode()
        return padded

    def egocentric_view(self) -> np.ndarray:
        """MiniGrid's ``gen_obs()["image"]`` (with ``see_through_walls``) by array slicing: the grid only
        changes when an object is picked up, so it is encoded once per layout, not every step."""
        if self._world is None or self.carrying is not None:
            self._world = self._encode_world()
        x, y = int(self.agent_pos[0]), int(self.agent_pos[1])
        half = VIEW // 2
        top_x, top_y = ((x, y - half), (x - half, y), (x - VIEW + 1, y - half), (x - half, y - VIEW + 1))[
            self.agent_dir
        ]
        window = self._world[top_x + VIEW : top_x + 2 * VIEW, top_y + VIEW : top_y + 2 * VIEW]
        # MiniGrid rotates the window left (agent_dir + 1) times so that the agent faces up.
        image = np.ascontiguousarray(np.rot90(window, k=-(self.agent_dir + 1), axes=(0, 1)))
        image[half, VIEW - 1] = self.carrying.encode() if self.carrying is not None else _EMPTY
        return image

    @property
    def cue_shown(self) -> bool:
        """Whether the current observation shows the target (always, without ``cue_steps``)."""
        return self.cue_steps is None or self.step_count < self.cue_steps

    def gen_obs(self) -> dict[str, Any]:
        image = self.egocentric_view()
        if self.view_size < VIEW:
            image[self._hidden] = (UNSEEN, 0, 0)
        if self.cue_steps is not None and self.cue_shown:
            # The room is dark while the cue is shown: a memoryless agent cannot use the cue to
            # turn towards the target and then pick up whatever is in front of it.
            image[...] = (UNSEEN, 0, 0)
        if self.cue_shown:
            target = self._target_obs.copy()
            self.mission = f"pick up the {self.target[1]} {self.target[0]}"
        else:
            target = np.array(HIDDEN_TARGET, dtype=np.int64)
            self.mission = "pick up the object you were shown"
        return {"image": image, "target": target}

    def step(self, action: Any) -> tuple[Any, float, bool, bool, dict[str, Any]]:
        obs, reward, terminated, truncated, info = super().step(action)
        info = {"success": False, "picked_wrong": False}
        if self.carrying is not None:
            terminated = True
            picked = (self.carrying.type, self.carrying.color)
            if picked == self.target:
                reward = self._reward()
                info["success"] = True
            else:
                reward = 0.0
                info["picked_wrong"] = True
        if terminated or truncated:
            info["is_success"] = info["success"]  # SB3 logs rollout/success_rate from this key
        return obs, float(reward), terminated, truncated, info

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None) -> tuple[Any, dict[str, Any]]:
        obs, _ = super().reset(seed=seed, options=options)
        return obs, {"success": False, "picked_wrong": False}


PICKUP_IDS: dict[str, dict[str, Any]] = {
    "RIMAgents/Pickup-8x8-v0": {},
    "RIMAgents/Pickup-8x8-Novel-v0": {"distractor_palette": "heldout"},
    "RIMAgents/Pickup-8x8-More-v0": {"num_distractors": 6},
    "RIMAgents/Pickup-8x8-NovelMore-v0": {"distractor_palette": "heldout", "num_distractors": 6},
    "RIMAgents/Pickup-8x8-View5-v0": {"view_size": 5},
    "RIMAgents/Pickup-8x8-View3-v0": {"view_size": 3},
    "RIMAgents/Pickup-6x6-v0": {"size": 6, "num_distractors": 2},
    "RIMAgents/PickupCue-6x6-v0": {"size": 6, "num_distractors": 1, "cue_steps": 1},
}

# Colour indices are MiniGrid's; keep them aligned with COLOURS so "target" is unambiguous.
assert all(COLOR_TO_IDX[c] == i for i, c in enumerate(COLOURS))
