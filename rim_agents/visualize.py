"""Watch an agent and its RIMs: episode videos, activity rasters and per-RIM event statistics.

:func:`record_episode` runs one episode (Atari: one game) of a trained model on its env (or under a
shift) and keeps, for every step, what the user sees (the Atari screen the agent gets, or the
MiniGrid room with the agent's view beside what the agent observes), the action, the reward and,
for a RIM core, which RIMs were active, their input attention and what each read from the others.
:func:`write_video` renders it as an MP4 (OpenCV): the observation, a strip of the K RIMs (dormant
ones dark, active ones coloured by their attention to the input) and, for token input, each active
RIM's attention over the feature-map positions as a heat map over the frame; step, action, reward
and return written on the frame. :func:`activity_png` draws the RIMs x time raster with events
marked and the K x K communication attention averaged over the episode. :func:`event_summary`
gives each RIM's active fraction overall and on the steps of each event the env reports.
"""

from __future__ import annotations

import io
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch as th
from stable_baselines3.common.utils import set_random_seed
from stable_baselines3.common.vec_env import VecEnv

from rim_agents.config import TrainConfig, env_family
from rim_agents.envs.atari import action_set, ale_settings
from rim_agents.envs.pickup import COLOURS, TYPES
from rim_agents.rim import RIMCore

PANEL = 336  # the observation panel's height in pixels
STRIP = 28  # the height of one RIM's cell in the strip
FPS = 15


@dataclass
class Episode:
    """What one episode showed and what the core did, step by step."""

    frames: list[np.ndarray] = field(default_factory=list)  # (H, W, 3) uint8, what the user sees
    observations: list[Any] = field(default_factory=list)  # what the agent got (one env's batch of 1)
    missions: list[str] = field(default_factory=list)  # MiniGrid's mission text, else empty
    actions: list[Any] = field(default_factory=list)
    rewards: list[float] = field(default_factory=list)
    events: list[set[str]] = field(default_factory=list)  # per step: reward, life-lost, picked, ...
    masks: list[np.ndarray] = field(default_factory=list)  # (K,) bool, RIM cores only
    attention: list[np.ndarray] = field(default_factory=list)  # (K, N + 1), null first
    communication: list[np.ndarray] = field(default_factory=list)  # (K, K)
    token_grid: tuple[int, int] | None = None  # (rows, cols) of the token positions, token input only

    @property
    def length(self) -> int:
        return len(self.actions)

    @property
    def returns(self) -> np.ndarray:
        return np.cumsum(self.rewards)


# ------------------------------------------------------------------------------------ frames
def _grey_to_rgb(frame: np.ndarray, height: int) -> np.ndarray:
    frame = cv2.resize(frame, (height * frame.shape[1] // frame.shape[0], height), interpolation=cv2.INTER_NEAREST)
    return np.repeat(frame[..., None], 3, axis=2)


def _minigrid_frame(env: Any, obs_image: np.ndarray) -> np.ndarray:
    """The room (the agent's view highlighted) beside what the agent observes (shift included)."""
    from minigrid.core.grid import Grid

    room = env.get_frame(highlight=True, tile_size=32)
    grid, _ = Grid.decode(obs_image)
    pov = grid.render(32, agent_pos=(obs_image.shape[0] // 2, obs_image.shape[1] - 1), agent_dir=3)
    room = cv2.resize(room, (PANEL * room.shape[1] // room.shape[0], PANEL), interpolation=cv2.INTER_AREA)
    pov = cv2.resize(pov, (PANEL * pov.shape[1] // pov.shape[0], PANEL), interpolation=cv2.INTER_AREA)
    gap = np.full((PANEL, 8, 3), 255, dtype=np.uint8)
    return np.concatenate([room, gap, pov], axis=1)


def observation_frame(config: TrainConfig, env: VecEnv, obs: Any) -> np.ndarray:
    """What the user sees at this step, as an RGB image ``PANEL`` pixels high."""
    family = env_family(config.env)
    if family == "atari":
        return _grey_to_rgb(np.asarray(obs)[0, -1], PANEL)  # the newest frame the agent gets
    if family == "minigrid":
        inner = env.envs[0].unwrapped  # type: ignore[attr-defined]
        return _minigrid_frame(inner, np.asarray(obs["image"])[0])
    try:
        image = env.envs[0].render()  # type: ignore[attr-defined]
    except Exception:  # an env without rgb rendering: a blank panel, the text still says what happens
        image = None
    if isinstance(image, np.ndarray) and image.ndim == 3:
        return cv2.resize(image, (PANEL * image.shape[1] // image.shape[0], PANEL))
    return np.full((PANEL, PANEL, 3), 40, dtype=np.uint8)


# ------------------------------------------------------------------------------------ record
def _mission(env: VecEnv) -> str:
    """MiniGrid's mission text (what the agent is asked); empty for other envs."""
    envs = getattr(env, "envs", None)
    return str(getattr(envs[0].unwrapped, "mission", "")) if envs else ""


def _events(
    family: str, info: dict[str, Any], reward: float, done: bool, seen: Any, lives: int | None, cue: bool
) -> set[str]:
    """The events of one step: what the step brought (reward, lost life, pickup, done) and, on the
    memory variant, whether the observation the agent acted on (``seen``) showed the cue."""
    events = set()
    if reward != 0:
        events.add("reward")
    if family == "atari" and lives is not None and info.get("lives", lives) < lives:
        events.add("life-lost")
    if info.get("success"):
        events.add("picked-target")
    if info.get("picked_wrong"):
        events.add("picked-other")
    if isinstance(seen, dict) and "target" in seen and cue:
        # The memory variant hides the target with indices one past the last.
        hidden = bool(np.all(np.asarray(seen["target"])[0] >= [len(TYPES), len(COLOURS)]))
        events.add("target-hidden" if hidden else "target-shown")
    if done:
        events.add("done")
    return events


def record_episode(model: Any, config: TrainConfig, env: VecEnv, seed: int = 0, max_steps: int = 5000) -> Episode:
    """One episode (Atari: one game) of ``model`` on a one-env ``env``, stochastic actions as in
    training; the core state is reset at every done (a lost life included)."""
    set_random_seed(seed)
    policy = model.policy
    policy.set_training_mode(False)
    core = policy.lstm_actor
    rim = core if isinstance(core, RIMCore) else None
    if rim is not None:
        rim.track_activity = True
    token_shape = getattr(policy.pi_features_extractor, "token_shape", None)
    family = env_family(config.env)
    episode = Episode()
    if rim is not None and token_shape is not None and config.core == "rims":
        side = round(float(np.sqrt(token_shape[0])))
        episode.token_grid = (side, token_shape[0] // side)
    target_space = getattr(env.observation_space, "spaces", {}).get("target")
    cue = target_space is not None and int(target_space.nvec[0]) > len(TYPES)  # the memory variant's hidden index
    env.seed(seed)
    obs = env.reset()
    shape = (core.num_layers, 1, core.hidden_size)
    state = (th.zeros(shape, device=policy.device), th.zeros(shape, device=policy.device))
    start = np.ones(1, dtype=bool)
    lives: int | None = None
    try:
        for _ in range(max_steps):
            episode.frames.append(observation_frame(config, env, obs))
            episode.observations.append(obs)
            episode.missions.append(_mission(env))
            with th.no_grad():
                obs_tensor, _ = policy.obs_to_tensor(obs)
                starts = th.as_tensor(start, dtype=th.float32, device=policy.device)
                dist, state = policy.get_distribution(obs_tensor, state, starts)
                action = dist.get_actions().cpu().numpy()
            if rim is not None:
                activity = rim.last_activity
                assert activity is not None
                episode.masks.append(activity.mask[0, 0].cpu().numpy())
                if activity.input_attention is not None:
                    episode.attention.append(activity.input_attention[0, 0].cpu().numpy())
                if activity.communication is not None:
                    episode.communication.append(activity.communication[0, 0].cpu().numpy())
            seen = obs  # the cue events describe what the agent acted on
            obs, rewards, dones, infos = env.step(action)
            reward = float(rewards[0])
            episode.actions.append(action[0])
            episode.rewards.append(reward)  # Atari: the clipped reward the agent trains on
            episode.events.append(_events(family, infos[0], reward, bool(dones[0]), seen, lives, cue))
            lives = infos[0].get("lives", lives)
            start = dones
            if "episode" in infos[0]:  # the game is over (a lost life is a done, not the end)
                break
    finally:
        if rim is not None:
            rim.track_activity = False
            rim.last_activity = None
    return episode


# ------------------------------------------------------------------------------------ render
def _colour(value: float) -> tuple[int, int, int]:
    """Input attention in [0, 1] -> a BGR colour of OpenCV's viridis map."""
    level = np.uint8(np.clip(value, 0.0, 1.0) * 255)
    bgr = cv2.applyColorMap(np.array([[level]], dtype=np.uint8), cv2.COLORMAP_VIRIDIS)[0, 0]
    return int(bgr[0]), int(bgr[1]), int(bgr[2])


def rim_strip(mask: np.ndarray, attention: np.ndarray | None, width: int) -> np.ndarray:
    """One row of K cells: dormant dark grey, active coloured by their attention to the input."""
    K = len(mask)
    strip = np.full((STRIP + 16, width, 3), 20, dtype=np.uint8)
    cell = width // K
    for i in range(K):
        x0, x1 = i * cell + 2, (i + 1) * cell - 2
        if mask[i]:
            value = 1.0 - float(attention[i, 0]) if attention is not None else 1.0
            cv2.rectangle(strip, (x0, 2), (x1, STRIP), _colour(value), thickness=-1)
        else:
            cv2.rectangle(strip, (x0, 2), (x1, STRIP), (70, 70, 70), thickness=1)
        cv2.putText(strip, f"{i}", (x0 + 3, STRIP + 13), cv2.FONT_HERSHEY_SIMPLEX, 0.4, (220, 220, 220), 1)
    return strip


def token_heatmaps(
    frame: np.ndarray, mask: np.ndarray, attention: np.ndarray, grid: tuple[int, int], width: int
) -> np.ndarray:
    """Each active RIM's attention over the token positions as a heat map over the frame, three to
    a row, ``width`` pixels wide."""
    size = width // 3
    small = cv2.resize(frame, (size, size))
    tiles = []
    for i in np.flatnonzero(mask):
        heat = token_heat(attention[i], grid)
        heat_img = cv2.applyColorMap(
            cv2.resize((heat / max(heat.max(), 1e-8) * 255).astype(np.uint8), (size, size)), cv2.COLORMAP_JET
        )
        tile = cv2.addWeighted(small, 0.55, heat_img[..., ::-1], 0.45, 0)
        cv2.putText(tile, f"RIM {i}", (4, 14), cv2.FONT_HERSHEY_SIMPLEX, 0.45, (255, 255, 255), 1)
        tiles.append(tile)
    while len(tiles) % 3:
        tiles.append(np.zeros((size, size, 3), dtype=np.uint8))
    rows = [np.concatenate(tiles[r : r + 3], axis=1) for r in range(0, len(tiles), 3)]
    heat_rows = np.concatenate(rows, axis=0) if rows else np.zeros((0, 3 * size, 3), dtype=np.uint8)
    return np.pad(heat_rows, ((0, 0), (0, width - heat_rows.shape[1]), (0, 0)))


def token_heat(attention_row: np.ndarray, grid: tuple[int, int]) -> np.ndarray:
    """One RIM's attention on the real tokens (null excluded) as a ``grid`` array; it sums to the
    RIM's attention away from the null token."""
    return np.asarray(attention_row[1:], dtype=float).reshape(grid)


def compose_frame(episode: Episode, t: int, action_names: list[str] | None = None) -> np.ndarray:
    """Frame ``t`` of the video: observation, text, RIM strip and token heat maps."""
    frame = episode.frames[t]
    width = max(frame.shape[1], 480)
    canvas = [np.pad(frame, ((0, 0), (0, width - frame.shape[1]), (0, 0)))]
    action = episode.actions[t]
    name = action_names[int(action)] if action_names and np.ndim(action) == 0 else str(action)
    text = np.full((26, width, 3), 255, dtype=np.uint8)
    line = (
        f"step {t + 1}/{episode.length}  action {name}  reward {episode.rewards[t]:+.2f}  "
        f"return {episode.returns[t]:.2f}"
    )
    cv2.putText(text, line, (6, 18), cv2.FONT_HERSHEY_SIMPLEX, 0.5, (0, 0, 0), 1)
    canvas.append(text)
    if episode.missions and episode.missions[t]:
        mission = np.full((24, width, 3), 255, dtype=np.uint8)
        cv2.putText(mission, episode.missions[t], (6, 17), cv2.FONT_HERSHEY_SIMPLEX, 0.5, (0, 0, 160), 1)
        canvas.append(mission)
    if episode.masks:
        attention = episode.attention[t] if episode.attention else None
        canvas.append(rim_strip(episode.masks[t], attention, width))
        if episode.token_grid is not None and attention is not None:
            canvas.append(token_heatmaps(frame, episode.masks[t], attention, episode.token_grid, width))
    return np.concatenate(canvas, axis=0)


def write_video(episode: Episode, path: Path, action_names: list[str] | None = None) -> Path:
    """The episode as an MP4 (mp4v), one video frame per env step."""
    first = compose_frame(episode, 0, action_names)
    h, w = first.shape[:2]
    tmp = path.with_name(f".{path.name}.tmp.mp4")
    writer = cv2.VideoWriter(str(tmp), cv2.VideoWriter_fourcc(*"mp4v"), FPS, (w, h))  # type: ignore[attr-defined]
    if not writer.isOpened():
        raise OSError(f"OpenCV cannot write an MP4 to {tmp}")
    try:
        for t in range(episode.length):
            frame = first if t == 0 else compose_frame(episode, t, action_names)
            writer.write(np.ascontiguousarray(frame[..., ::-1]))  # RGB -> BGR
    finally:
        writer.release()
    tmp.replace(path)
    return path


def activity_png(episode: Episode, title: str = "") -> bytes:
    """The RIMs x time raster (active cells coloured by input attention, events marked) and the
    K x K communication attention averaged over the episode."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    masks = np.array(episode.masks, dtype=float).T  # (K, T)
    values = raster(episode)
    fig, axes = plt.subplots(1, 2, figsize=(12, 2.8), gridspec_kw={"width_ratios": [4, 1]})
    ax = axes[0]
    ax.imshow(values, aspect="auto", cmap="viridis", vmin=0, vmax=1, interpolation="nearest")
    marks = {"reward": ("|", "tab:red"), "life-lost": ("v", "black"), "picked-target": ("*", "tab:green"),
             "picked-other": ("x", "tab:red"), "done": ("|", "grey")}  # fmt: skip
    for name, (marker, colour) in marks.items():
        steps = [t for t, ev in enumerate(episode.events) if name in ev]
        if steps:
            ax.scatter(steps, [-0.9] * len(steps), marker=marker, color=colour, s=25, label=name, clip_on=False)
    hidden = [t for t, ev in enumerate(episode.events) if "target-hidden" in ev]
    if hidden:
        ax.axvspan(hidden[0] - 0.5, hidden[-1] + 0.5, color="grey", alpha=0.12, label="target hidden")
    ax.set_ylim(masks.shape[0] - 0.5, -1.3)
    ax.set_yticks(range(masks.shape[0]))
    ax.set_ylabel("RIM")
    ax.set_xlabel("step (coloured: active, by attention to the input)")
    ax.set_title(title or "RIM activity")
    if ax.get_legend_handles_labels()[0]:
        ax.legend(loc="upper right", fontsize=7, ncol=6, bbox_to_anchor=(1.0, 1.32))
    ax = axes[1]
    if episode.communication:
        comm = np.array(episode.communication)  # (T, K, K)
        active = np.array(episode.masks, dtype=float)[:, :, None]  # rows of active RIMs only
        mean = (comm * active).sum(0) / np.maximum(active.sum(0), 1)
        ax.imshow(mean, cmap="magma", vmin=0, vmax=max(mean.max(), 1e-6))
        ax.set_title("reads from (mean)", fontsize=9)
        ax.set_xlabel("RIM read")
        ax.set_ylabel("RIM reading")
    else:
        ax.axis("off")
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=90)
    plt.close(fig)
    return buffer.getvalue()


def raster(episode: Episode) -> np.ndarray:
    """``(K, T)``: NaN where a RIM was dormant, else its attention to the input (1 where unknown)."""
    masks = np.array(episode.masks, dtype=bool).T
    attention = 1.0 - np.array(episode.attention)[:, :, 0].T if episode.attention else np.ones(masks.shape)
    return np.where(masks, attention, np.nan)


def event_summary(episodes: list[Episode]) -> dict[str, list[float]]:
    """Per event (and ``all`` steps): each RIM's active fraction on the steps of that event."""
    masks = np.concatenate([np.array(e.masks, dtype=float) for e in episodes if e.masks])
    events = [ev for e in episodes if e.masks for ev in e.events]
    out = {"all": masks.mean(0).tolist()}
    for name in sorted({n for ev in events for n in ev}):
        rows = [i for i, ev in enumerate(events) if name in ev]
        out[f"{name} ({len(rows)} steps)"] = masks[rows].mean(0).tolist()
    return out


def gif_bytes(episode: Episode, action_names: list[str] | None = None, every: int = 2, scale: float = 0.5) -> bytes:
    """The video as an animated GIF (for TensorBoard's image panel), every ``every`` steps."""
    from PIL import Image

    frames = []
    for t in range(0, episode.length, every):
        frame = compose_frame(episode, t, action_names)
        frame = cv2.resize(frame, (int(frame.shape[1] * scale), int(frame.shape[0] * scale)))
        frames.append(Image.fromarray(frame))
    buffer = io.BytesIO()
    frames[0].save(buffer, format="GIF", save_all=True, append_images=frames[1:], duration=1000 // FPS * every, loop=0)
    return buffer.getvalue()


def write_tensorboard_gif(log_dir: Path, tag: str, gif: bytes, height: int, width: int, step: int) -> None:
    """An animated GIF as an image summary (TensorBoard plays it in the Images tab)."""
    from tensorboard.compat.proto.summary_pb2 import Summary
    from torch.utils.tensorboard import SummaryWriter

    image = Summary.Image(height=height, width=width, colorspace=3, encoded_image_string=gif)
    writer = SummaryWriter(str(log_dir))
    writer._get_file_writer().add_summary(Summary(value=[Summary.Value(tag=tag, image=image)]), step)
    writer.close()


def action_names(config: TrainConfig) -> list[str] | None:
    """Names of the discrete actions, where known."""
    family = env_family(config.env)
    if family == "atari":
        settings = ale_settings(config.env)
        return action_set(settings["game"], settings["full_action_space"])
    if config.env.startswith("RIMAgents/Pickup"):
        return ["left", "right", "forward", "pickup"]
    return None
