"""Environments: the Atari adapter's semantics, the pickup family, the entry point and its errors."""

from __future__ import annotations

from collections import deque

import gymnasium as gym
import numpy as np
import pytest
from gymnasium.utils.env_checker import check_env

from rim_agents.envs import make_vec_env
from rim_agents.envs.atari import AtariVecEnv
from rim_agents.envs.pickup import COLOURS, HELDOUT_PALETTE, PICKUP_IDS, TRAIN_PALETTE, TYPES, UNSEEN, PickupEnv
from rim_agents.envs.registration import register_envs
from rim_agents.errors import UsageError

register_envs()


# ------------------------------------------------------------------------------------- Atari
def _random_run(env, steps: int, seed: int = 0) -> tuple[list, list, list]:
    rng = np.random.default_rng(seed)
    n = env.num_envs
    env.reset()
    rewards, dones, infos = [], [], []
    for _ in range(steps):
        _, r, d, info = env.step(rng.integers(0, env.action_space.n, n))
        rewards.append(r)
        dones.append(d)
        infos.append(info)
    return rewards, dones, infos


def test_atari_vector_env_shapes_and_terminal_info() -> None:
    env = make_vec_env("BreakoutNoFrameskip-v4", n_envs=3, seed=0)
    assert isinstance(env, AtariVecEnv)
    assert env.observation_space.shape == (4, 84, 84) and env.observation_space.dtype == np.uint8
    obs = env.reset()
    assert obs.shape == (3, 4, 84, 84)
    _, dones, infos = _random_run(env, 400)
    n_done = 0
    for d, info in zip(dones, infos, strict=True):
        for i in np.flatnonzero(d):
            n_done += 1
            assert info[i]["terminal_observation"].shape == (4, 84, 84)
            assert info[i]["TimeLimit.truncated"] is False
        for i in np.flatnonzero(~d):
            assert "terminal_observation" not in info[i]
    assert n_done > 0  # a random Breakout agent loses lives within 400 steps
    env.close()


def test_atari_truncation_flag() -> None:
    env = AtariVecEnv("PongNoFrameskip-v4", 2, seed=0, max_episode_frames=400)
    _, dones, infos = _random_run(env, 120)
    truncated = [info[i] for d, info in zip(dones, infos, strict=True) for i in np.flatnonzero(d)]
    assert truncated and all(i["TimeLimit.truncated"] for i in truncated)
    # A truncated game is over: its return is reported, with its length in frames.
    assert all("episode" in i and i["episode"]["l"] <= 400 for i in truncated)
    env.close()


def test_atari_monitor_returns_are_unclipped_and_per_game() -> None:
    clipped = AtariVecEnv("BreakoutNoFrameskip-v4", 2, seed=3, clip_reward=True)
    raw = AtariVecEnv("BreakoutNoFrameskip-v4", 2, seed=3, clip_reward=False)
    r_clip, d_clip, i_clip = _random_run(clipped, 1500, seed=1)
    r_raw, d_raw, i_raw = _random_run(raw, 1500, seed=1)
    np.testing.assert_array_equal(np.array(d_clip), np.array(d_raw))
    np.testing.assert_array_equal(np.array(r_clip), np.sign(np.array(r_raw)))
    episodes_clip = [info[i]["episode"] for info in i_clip for i in range(2) if "episode" in info[i]]
    episodes_raw = [info[i]["episode"] for info in i_raw for i in range(2) if "episode" in info[i]]
    assert episodes_clip and [e["r"] for e in episodes_clip] == [e["r"] for e in episodes_raw]
    # Episodes are whole games (5 lives in Breakout), not lives: fewer episodes than life losses.
    assert len(episodes_clip) < int(np.array(d_clip).sum())
    # The monitor return is the game's unclipped score: the raw rewards summed since the last game.
    for i in range(2):
        since = 0.0
        for r, info in zip(r_raw, i_raw, strict=True):
            since += float(r[i])
            if "episode" in info[i]:
                assert info[i]["episode"]["r"] == since
                since = 0.0
    clipped.close()
    raw.close()


def test_atari_same_seed_same_rollout() -> None:
    def observations(seed: int) -> np.ndarray:
        env = AtariVecEnv("BreakoutNoFrameskip-v4", 2, seed=seed)
        rng = np.random.default_rng(0)
        frames = [env.reset()]
        for _ in range(50):
            frames.append(env.step(rng.integers(0, 4, 2))[0])
        env.close()
        return np.stack(frames)

    a, b = observations(7), observations(7)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, observations(8))


def _noop_game_return(backend: str) -> float:
    env = make_vec_env("PongNoFrameskip-v4", n_envs=1, seed=0, backend=backend, terminal_on_life_loss=False)
    env.reset()
    for _ in range(5000):
        _, _, _, infos = env.step(np.zeros(1, dtype=np.int64))
        if "episode" in infos[0]:
            env.close()
            return float(infos[0]["episode"]["r"])
    raise AssertionError("no Pong game ended within 5000 steps")


def test_atari_backends_agree_on_a_deterministic_game() -> None:
    """Both backends score a no-op Pong game -21.

    Returns for an arbitrary action sequence differ between the backends even with the same seed:
    the C++ env presses FIRE once at reset, SB3's ``FireResetEnv`` presses FIRE then RIGHT, and the
    two draw their random no-op counts from different generators, so the emulators diverge from
    the first frames. A no-op policy loses Pong 0-21 whatever the start, which checks that both
    monitors count whole games with unclipped scores.
    """
    assert _noop_game_return("vector") == _noop_game_return("gym") == -21.0


def _noop_after_first_life_loss(backend: str, steps: int = 400) -> tuple[dict, np.ndarray, np.ndarray, int]:
    """No-op Breakout: the first life-loss done's info, the observations just before and at it,
    and the dones in the next ``steps`` no-op steps."""
    env = make_vec_env("BreakoutNoFrameskip-v4", n_envs=1, seed=0, backend=backend)
    before = env.reset()
    noop = np.zeros(1, dtype=np.int64)
    for _ in range(1000):
        obs, _, dones, infos = env.step(noop)
        if dones[0]:
            break
        before = obs
    assert dones[0] and "episode" not in infos[0], "expected a lost life (not a game over) first"
    n_dones = sum(int(env.step(noop)[2][0]) for _ in range(steps))
    env.close()
    return infos[0], before[0], obs[0], n_dones


@pytest.mark.parametrize("backend", ["vector", "gym"])
def test_atari_life_loss_fire_stack_and_terminal_frame(backend: str) -> None:
    """After a lost life the game is served again (FIRE), the stack restarts from zeros with the
    current frame last, and the terminal observation is the stack the game showed at the done."""
    info, before, after, n_dones = _noop_after_first_life_loss(backend)
    terminal = info["terminal_observation"]
    # The terminal stack continues the previous observation by one real frame.
    np.testing.assert_array_equal(terminal[:-1], before[1:])
    assert 20 < terminal[-1].mean() < 80  # a Breakout screen (about 42), not a stale buffer
    # The new episode's stack: zeros, then the newest frame.
    assert not after[:-1].any()
    assert 20 < after[-1].mean() < 80
    # Each life is served: a no-op agent keeps losing lives (one every ~25 steps when served,
    # none when the ball is never launched). The gym backend's FIRE sometimes falls in the
    # game's pause after a lost life, so it may lose fewer.
    assert n_dones >= (10 if backend == "vector" else 5)


def test_atari_settings_follow_the_id() -> None:
    v4 = AtariVecEnv("BreakoutNoFrameskip-v4", 1)
    v5 = AtariVecEnv("ALE/Breakout-v5", 1)
    assert v4.settings["repeat_action_probability"] == 0.0
    assert v5.settings["repeat_action_probability"] == 0.25
    assert v4.settings["game"] == v5.settings["game"] == "breakout"
    v4.close()
    v5.close()


def test_atari_mode_uses_gym_backend_and_reaches_the_emulator() -> None:
    plain = make_vec_env("BreakoutNoFrameskip-v4", n_envs=1, seed=0, backend="gym")
    hidden = make_vec_env("BreakoutNoFrameskip-v4", n_envs=1, seed=0, env_kwargs={"mode": 12})
    assert not isinstance(hidden, AtariVecEnv)
    assert hidden.observation_space == plain.observation_space
    # Mode 12 hides the bricks until they are hit: the first frames differ.
    assert not np.array_equal(plain.reset(), hidden.reset())
    plain.close()
    hidden.close()


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"mode": 3}, r"mode 3 is not a mode of breakout: valid modes are \[0, 4, 8"),
        ({"difficulty": 2}, r"difficulty 2 is not a difficulty of breakout: valid difficulties are \[0, 1\]"),
        ({"frameskip": 2}, "not supported"),
    ],
)
def test_atari_bad_flavours(kwargs: dict, match: str) -> None:
    with pytest.raises(UsageError, match=match):
        make_vec_env("BreakoutNoFrameskip-v4", n_envs=1, env_kwargs=kwargs)


def test_unknown_env_id_suggests() -> None:
    with pytest.raises(UsageError, match=r"unknown environment id 'BreakoutNoFrameskp-v4'.*BreakoutNoFrameskip-v4"):
        make_vec_env("BreakoutNoFrameskp-v4")


# ------------------------------------------------------------------------------------ pickup
@pytest.mark.parametrize("env_id", [*PICKUP_IDS, "RIMAgents/CartPoleNoVel-v1"])
def test_check_env(env_id: str) -> None:
    env = gym.make(env_id)
    check_env(env.unwrapped, skip_render_check=True)


def _rollout(env: PickupEnv, seed: int, steps: int = 60) -> list[np.ndarray]:
    obs, _ = env.reset(seed=seed)
    rng = np.random.default_rng(seed)
    frames = [obs["image"].copy()]
    for _ in range(steps):
        obs, _, term, trunc, _ = env.step(int(rng.integers(0, 4)))
        frames.append(obs["image"].copy())
        if term or trunc:
            obs, _ = env.reset()
    return frames


def test_pickup_same_seed_same_rollout() -> None:
    a = _rollout(PickupEnv(), 5)
    b = _rollout(PickupEnv(), 5)
    c = _rollout(PickupEnv(), 6)
    assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))
    assert not all(np.array_equal(x, y) for x, y in zip(a, c, strict=True))


def _objects(env: PickupEnv) -> list[tuple[tuple[int, int], tuple[str, str]]]:
    out = []
    for x in range(env.width):
        for y in range(env.height):
            cell = env.grid.get(x, y)
            if cell is not None and cell.type in TYPES:
                out.append(((x, y), (cell.type, cell.color)))
    return out


def _reachable(env: PickupEnv) -> bool:
    """Independent BFS: can the agent stand next to the target?"""
    start = tuple(int(v) for v in env.agent_pos)
    tx, ty = env.target_pos
    goals = {(tx + 1, ty), (tx - 1, ty), (tx, ty + 1), (tx, ty - 1)}
    seen, queue = {start}, deque([start])
    while queue:
        p = queue.popleft()
        if p in goals:
            return True
        for q in ((p[0] + 1, p[1]), (p[0] - 1, p[1]), (p[0], p[1] + 1), (p[0], p[1] - 1)):
            if q not in seen and env.grid.get(*q) is None:
                seen.add(q)
                queue.append(q)
    return False


@pytest.mark.parametrize(
    ("palette", "allowed", "n"),
    [("train", TRAIN_PALETTE, 3), ("heldout", HELDOUT_PALETTE, 3), ("heldout", HELDOUT_PALETTE, 12)],
)
def test_pickup_layouts_over_many_seeds(palette: str, allowed: tuple, n: int) -> None:
    env = PickupEnv(size=8, num_distractors=n, distractor_palette=palette)
    seen_pairs = set()
    for seed in range(150):
        obs, _ = env.reset(seed=seed)
        objects = _objects(env)
        assert len(objects) == n + 1
        targets = [pair for pos, pair in objects if pos == env.target_pos]
        assert targets == [env.target] and env.target in TRAIN_PALETTE
        distractors = [pair for pos, pair in objects if pos != env.target_pos]
        assert all(d != env.target for d in distractors)
        assert all(d in allowed for d in distractors)
        seen_pairs.update(distractors)
        assert _reachable(env)
        assert tuple(obs["target"]) == (TYPES.index(env.target[0]), COLOURS.index(env.target[1]))
        assert env.mission == f"pick up the {env.target[1]} {env.target[0]}"
    # Over many seeds every pair of the palette shows up as a distractor.
    assert seen_pairs == set(allowed)


def test_heldout_palette_is_disjoint_from_training() -> None:
    assert not set(TRAIN_PALETTE) & set(HELDOUT_PALETTE)
    assert {t for t, _ in HELDOUT_PALETTE} == set(TYPES) and "box" not in {t for t, _ in TRAIN_PALETTE}
    assert len(TRAIN_PALETTE) + len(HELDOUT_PALETTE) == len(TYPES) * len(COLOURS)


@pytest.mark.parametrize("view", [3, 5])
def test_view_masking_hides_exactly_the_outer_cells(view: int) -> None:
    full, small = PickupEnv(view_size=7), PickupEnv(view_size=view)
    half = view // 2
    for seed in range(20):
        a, _ = full.reset(seed=seed)
        b, _ = small.reset(seed=seed)
        for x in range(7):
            for y in range(7):
                inside = 3 - half <= x <= 3 + half and y >= 7 - view
                if inside:
                    assert np.array_equal(a["image"][x, y], b["image"][x, y])
                else:
                    assert tuple(b["image"][x, y]) == (UNSEEN, 0, 0)
    assert b["image"].shape == (7, 7, 3)


def _face(env: PickupEnv, target: tuple[int, int]) -> None:
    """Put the agent on a free cell next to ``target``, facing it."""
    for direction, (dx, dy) in enumerate(((1, 0), (0, 1), (-1, 0), (0, -1))):
        pos = (target[0] - dx, target[1] - dy)
        if env.grid.get(*pos) is None:
            env.agent_pos, env.agent_dir = pos, direction
            return
    raise AssertionError("no free cell next to the object")


def test_pickup_rewards_and_info() -> None:
    env = PickupEnv(size=8, num_distractors=3)
    env.reset(seed=0)
    env.step(0)
    env.step(0)
    _face(env, env.target_pos)
    _, reward, terminated, truncated, info = env.step(3)
    assert terminated and not truncated
    assert info["success"] and info["is_success"] and not info["picked_wrong"]
    assert reward == pytest.approx(1 - 0.9 * 3 / env.max_steps)
    env.reset(seed=0)
    wrong = next(pos for pos, _ in _objects(env) if pos != env.target_pos)
    _face(env, wrong)
    _, reward, terminated, _, info = env.step(3)
    assert terminated and reward == 0.0 and info["picked_wrong"] and not info["success"]


@pytest.mark.parametrize("cue_steps", [0, 1, 3])
def test_pickup_cue_shows_the_target_for_cue_steps_only(cue_steps: int) -> None:
    env = PickupEnv(size=6, num_distractors=1, cue_steps=cue_steps)
    obs, _ = env.reset(seed=3)
    hidden = [len(TYPES), len(COLOURS)]
    shown = [TYPES.index(env.target[0]), COLOURS.index(env.target[1])]
    targets = [obs["target"].tolist()]
    images = [obs["image"]]
    missions = [env.mission]
    for _ in range(5):
        obs, _, terminated, truncated, _ = env.step(0)  # turning never ends the episode
        assert not (terminated or truncated)
        targets.append(obs["target"].tolist())
        images.append(obs["image"])
        missions.append(env.mission)
    assert targets == [shown] * cue_steps + [hidden] * (6 - cue_steps)
    # The room is dark exactly while the cue is shown.
    assert [bool((image[..., 0] == UNSEEN).all()) for image in images] == [True] * cue_steps + [False] * (6 - cue_steps)
    assert all(obs_target in env.observation_space["target"] for obs_target in np.array(targets))
    assert missions[cue_steps:] == ["pick up the object you were shown"] * (6 - cue_steps)
    # The task itself is unchanged: picking the target still succeeds after the cue is gone.
    _face(env, env.target_pos)
    _, reward, terminated, _, info = env.step(3)
    assert terminated and info["success"] and reward > 0


def test_pickup_cue_is_registered_and_validated() -> None:
    env = gym.make("RIMAgents/PickupCue-6x6-v0").unwrapped
    assert (env.cue_steps, env.num_distractors, env.width) == (1, 1, 6)
    assert PickupEnv(size=6).observation_space["target"].nvec.tolist() == [3, 6]
    with pytest.raises(ValueError, match="cue_steps=-1 is invalid"):
        PickupEnv(size=6, cue_steps=-1)


@pytest.mark.parametrize("delay", [0, 1, 4])
def test_repeat_env_scores_the_symbol_shown_delay_steps_ago(delay: int) -> None:
    env = gym.make("RIMAgents/Repeat-v0", delay=delay, length=12)
    for policy in ("perfect", "off-by-one"):
        obs, _ = env.reset(seed=delay)
        shown, total, rewards = [int(obs)], 0.0, []
        for t in range(12):
            back = delay if policy == "perfect" else delay + 1
            action = shown[t - back] if t >= back else 0
            obs, reward, terminated, truncated, info = env.step(action)
            shown.append(int(obs))
            rewards.append(reward)
            total += reward
            assert not terminated and truncated == (t == 11)
        assert rewards[:delay] == [0.0] * delay  # nothing is scored before the delay
        if policy == "perfect":
            assert total == pytest.approx(1.0) and info["is_success"]
        else:
            assert total < 1.0 and not info["is_success"]


def test_repeat_env_chance_and_bad_settings() -> None:
    env = gym.make("RIMAgents/Repeat-v0", delay=2, n_symbols=4, length=400)
    env.reset(seed=0)
    total = sum(env.step(0)[1] for _ in range(400))
    assert 0.15 < total < 0.35  # a memoryless policy is right one time in four
    with pytest.raises(ValueError, match="must exceed delay"):
        gym.make("RIMAgents/Repeat-v0", delay=5, length=5)
    with pytest.raises(ValueError, match="n_symbols=1 is invalid"):
        gym.make("RIMAgents/Repeat-v0", n_symbols=1)


def test_pickup_timeout_truncates() -> None:
    env = PickupEnv(size=6, num_distractors=1, max_steps=5)
    env.reset(seed=0)
    for _ in range(4):
        assert not env.step(0)[3]
    _, reward, terminated, truncated, info = env.step(0)
    assert truncated and not terminated and reward == 0.0 and info["is_success"] is False


def test_make_kwargs_of_registered_id() -> None:
    env = gym.make(
        "RIMAgents/Pickup-8x8-v0", size=6, num_distractors=2, distractor_palette=[["box", "grey"]], view_size=5
    ).unwrapped
    assert (env.width, env.num_distractors, env.palette, env.view_size) == (6, 2, (("box", "grey"),), 5)
    assert gym.make("RIMAgents/Pickup-8x8-Novel-v0").unwrapped.palette == HELDOUT_PALETTE


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"view_size": 4}, "view_size=4 is invalid: use an odd number from 3 to 7"),
        ({"view_size": 9}, "view_size=9 is invalid"),
        ({"view_size": 1}, "view_size=1 is invalid"),
        ({"distractor_palette": [["ball", "red"]]}, "leaves no possible distractor for the target red ball"),
        ({"distractor_palette": []}, "leaves no possible distractor"),
        ({"distractor_palette": [["hat", "red"]]}, "is not a (type, colour) pair"),
        ({"distractor_palette": "novel"}, "is not 'train', 'heldout'"),
        ({"num_distractors": 40}, "num_distractors=40 is invalid"),
    ],
)
def test_pickup_bad_settings(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match.replace("(", r"\(").replace(")", r"\)")):
        PickupEnv(**kwargs)


def test_make_vec_env_reports_bad_pickup_settings_as_usage_errors() -> None:
    with pytest.raises(UsageError, match="view_size=4 is invalid"):
        make_vec_env("RIMAgents/Pickup-8x8-v0", n_envs=1, env_kwargs={"view_size": 4})


def test_pickup_vec_env_logs_success() -> None:
    env = make_vec_env("RIMAgents/Pickup-6x6-v0", n_envs=4, seed=0)
    env.reset()
    rng = np.random.default_rng(0)
    episodes = []
    for _ in range(300):
        _, _, _, infos = env.step(rng.integers(0, 4, 4))
        episodes += [info for info in infos if "episode" in info]
    assert episodes and all("is_success" in info for info in episodes)


def test_fast_view_equals_minigrid_gen_obs() -> None:
    """The array-slicing view equals MiniGrid's own ``gen_obs`` image, pickups included."""
    from minigrid.minigrid_env import MiniGridEnv

    env = PickupEnv(size=8, num_distractors=4)
    checked = pickups = 0
    for seed in range(40):
        env.reset(seed=seed)
        rng = np.random.default_rng(seed)
        for _ in range(100):
            np.testing.assert_array_equal(env.egocentric_view(), MiniGridEnv.gen_obs(env)["image"])
            checked += 1
            _, _, term, trunc, _ = env.step(int(rng.choice(4, p=[0.25, 0.25, 0.3, 0.2])))
            if term or trunc:
                pickups += int(env.carrying is not None)
                np.testing.assert_array_equal(env.egocentric_view(), MiniGridEnv.gen_obs(env)["image"])
                break
    assert checked > 1000 and pickups > 10


@pytest.mark.parametrize(
    "code",
    [
        "import gymnasium, rim_agents; gymnasium.make('RIMAgents/Pickup-8x8-v0')",
        "import gymnasium; gymnasium.make('rim_agents:RIMAgents/PickupCue-6x6-v0')",
        "import gymnasium, rim_agents; gymnasium.make('RIMAgents/Repeat-v0'); gymnasium.make('BreakoutNoFrameskip-v4')",
    ],
)
def test_importing_the_package_registers_its_envs(code: str) -> None:
    import subprocess
    import sys

    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-500:]


@pytest.mark.parametrize(
    ("env_id", "render_mode"),
    [
        ("RIMAgents/Repeat-v0", None),
        ("RIMAgents/CartPoleNoVel-v1", "rgb_array"),
        ("RIMAgents/Pickup-6x6-v0", "rgb_array"),
    ],
)
def test_vec_env_asks_for_rgb_rendering_only_where_the_env_has_it(env_id: str, render_mode: str | None) -> None:
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # gymnasium warns when a render mode the env lacks is asked for
        venv = make_vec_env(env_id, n_envs=1, seed=0)
    assert venv.envs[0].unwrapped.render_mode == render_mode  # type: ignore[attr-defined]
    assert venv.num_envs == 1 and venv.reset() is not None
    venv.close()
