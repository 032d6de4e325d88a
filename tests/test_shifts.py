"""Each shift changes exactly what it claims, and nothing else."""

from __future__ import annotations

import numpy as np
import pytest

from rim_agents.config import load_config
from rim_agents.envs.pickup import HELDOUT_PALETTE, TRAIN_PALETTE, TYPES, UNSEEN
from rim_agents.errors import UsageError
from rim_agents.models import make_env
from rim_agents.shifts import parse_shift, shift_spec

ATARI = load_config("BreakoutNoFrameskip-v4", "rims", overrides=["n_envs=2"])
PICKUP = load_config("RIMAgents/Pickup-8x8-v0", "rims")


def binomial_bounds(n: int, p: float, z: float = 4.0) -> tuple[float, float]:
    sd = np.sqrt(n * p * (1 - p))
    return n * p - z * sd, n * p + z * sd


def atari_run(shift: str, steps: int = 200, seed: int = 0, actions_seed: int = 0) -> tuple[list, list, list]:
    env = make_env(ATARI, 2, seed, shift_spec(ATARI, shift))
    rng = np.random.default_rng(actions_seed)
    obs = [env.reset()]
    rewards, dones = [], []
    for _ in range(steps):
        o, r, d, _ = env.step(rng.integers(0, 4, 2))
        obs.append(o)
        rewards.append(r)
        dones.append(d)
    env.close()
    return obs, rewards, dones


def test_atari_flicker_blanks_about_p_of_frames_and_nothing_else() -> None:
    base_obs, base_r, base_d = atari_run("none", steps=300)
    obs, r, d = atari_run("flicker-0.3", steps=300)
    np.testing.assert_array_equal(np.array(r), np.array(base_r))  # the game itself is untouched
    np.testing.assert_array_equal(np.array(d), np.array(base_d))
    newest = np.stack([o[:, -1] for o in obs[1:]])  # (T, n_envs, 84, 84)
    base_newest = np.stack([o[:, -1] for o in base_obs[1:]])
    blank = ~newest.reshape(*newest.shape[:2], -1).any(-1)
    lo, hi = binomial_bounds(blank.size, 0.3)
    assert lo <= blank.sum() <= hi
    np.testing.assert_array_equal(newest[~blank], base_newest[~blank])
    # A frame keeps its state while it moves down the stack.
    for t in range(1, len(obs) - 1):
        same_episode = ~np.array(d[t])
        np.testing.assert_array_equal(obs[t + 1][same_episode, :-1], obs[t][same_episode, 1:])


def test_atari_occlusion_blacks_out_a_band_only() -> None:
    base_obs, _, _ = atari_run("none", steps=50)
    obs, _, _ = atari_run("occlusion-0.25", steps=50)
    rows = round(0.25 * 84)
    top = (84 - rows) // 2
    for a, b in zip(obs, base_obs, strict=True):
        assert not a[..., top : top + rows, :].any()
        np.testing.assert_array_equal(a[..., :top, :], b[..., :top, :])
        np.testing.assert_array_equal(a[..., top + rows :, :], b[..., top + rows :, :])


def test_atari_distractors_draw_at_most_n_squares() -> None:
    base_obs, _, _ = atari_run("none", steps=40)
    obs, _, _ = atari_run("distractors-2", steps=40)
    changed_frames = 0
    for a, b in zip(obs[1:], base_obs[1:], strict=True):
        diff = (a[:, -1] != b[:, -1]).reshape(2, -1).sum(-1)
        assert (diff <= 2 * 36).all()
        changed_frames += int((diff > 0).sum())
    assert changed_frames > 0.9 * 2 * 40  # drawn on (nearly) every frame


def test_sticky_reaches_the_emulator() -> None:
    """With every action repeated (p = 1) the game ignores the agent: two action sequences give
    identical frames; without sticky actions they differ."""

    def frames(shift: str, actions_seed: int) -> np.ndarray:
        return np.stack(atari_run(shift, steps=60, actions_seed=actions_seed)[0])

    assert np.array_equal(frames("sticky-1.0", 1), frames("sticky-1.0", 2))
    assert not np.array_equal(frames("sticky-0.0", 1), frames("sticky-0.0", 2))
    env = make_env(ATARI, 1, 0, shift_spec(ATARI, "sticky-0.25"))
    assert env.settings["repeat_action_probability"] == 0.25  # type: ignore[attr-defined]
    env.close()


def test_mode_reaches_the_emulator() -> None:
    plain = np.stack(atari_run("none", steps=5)[0])
    hidden = np.stack(atari_run("mode-12", steps=5)[0])
    assert plain.shape == hidden.shape and not np.array_equal(plain, hidden)
    assert parse_shift("mode-12+difficulty-1", "atari").env_kwargs == {"mode": 12, "difficulty": 1}


# ---------------------------------------------------------------------------------- MiniGrid
def pickup_envs(shift: str, n: int = 4, seed: int = 0):
    env = make_env(PICKUP, n, seed, shift_spec(PICKUP, shift))
    return env, [e.unwrapped for e in env.envs]  # type: ignore[attr-defined]


def _distractors(env) -> list[tuple[str, str]]:
    out = []
    for x in range(env.width):
        for y in range(env.height):
            cell = env.grid.get(x, y)
            if cell is not None and cell.type in TYPES and (x, y) != env.target_pos:
                out.append((cell.type, cell.color))
    return out


@pytest.mark.parametrize(
    ("shift", "palette", "count"),
    [
        ("none", TRAIN_PALETTE, 3),
        ("novel-distractors", HELDOUT_PALETTE, 3),
        ("more-distractors", TRAIN_PALETTE, 6),
        ("novel-and-more", HELDOUT_PALETTE, 6),
    ],
)
def test_distractor_shifts(shift: str, palette: tuple, count: int) -> None:
    env, raw = pickup_envs(shift)
    rng = np.random.default_rng(0)
    env.reset()
    for _ in range(200):
        for e in raw:
            distractors = _distractors(e)
            if e.carrying is None:
                assert len(distractors) == count
            assert all(d in palette for d in distractors)
            assert e.target in TRAIN_PALETTE and e.view_size == 7
        env.step(rng.integers(0, 4, 4))
    env.close()


def test_view_3_hides_exactly_the_cells_outside() -> None:
    full, _ = pickup_envs("none", n=2, seed=3)
    small, _ = pickup_envs("view-3", n=2, seed=3)
    a, b = full.reset(), small.reset()
    inside = np.zeros((7, 7), dtype=bool)
    inside[2:5, 4:7] = True
    np.testing.assert_array_equal(a["image"][:, inside], b["image"][:, inside])
    assert (b["image"][:, ~inside] == np.array([UNSEEN, 0, 0])).all()


def test_minigrid_flicker_blanks_images_only() -> None:
    base, _ = pickup_envs("none", seed=1)
    env, _ = pickup_envs("flicker-0.4", seed=1)
    rng = np.random.default_rng(0)
    obs, base_obs = env.reset(), base.reset()
    blanks, total = 0, 0
    for _ in range(250):
        actions = rng.integers(0, 4, 4)
        obs, r, d, _ = env.step(actions)
        base_obs, base_r, base_d = base.step(actions)[:3]
        np.testing.assert_array_equal(r, base_r)
        np.testing.assert_array_equal(d, base_d)
        np.testing.assert_array_equal(obs["target"], base_obs["target"])
        blank = ~obs["image"].reshape(4, -1).any(-1)
        np.testing.assert_array_equal(obs["image"][~blank], base_obs["image"][~blank])
        blanks += int(blank.sum())
        total += 4
    lo, hi = binomial_bounds(total, 0.4)
    assert lo <= blanks <= hi


# ------------------------------------------------------------------------------------- errors
@pytest.mark.parametrize(
    ("text", "family", "match"),
    [
        ("bogus", "minigrid", "unknown shift 'bogus': valid shifts for minigrid are none, novel-distractors"),
        ("occlusion-0.2", "minigrid", "shift 'occlusion-0.2' needs an Atari environment"),
        ("view-3", "atari", "shift 'view-3' needs a MiniGrid environment"),
        ("obs-noise-0.1", "minigrid", "shift 'obs-noise-0.1' needs a non-Atari, non-MiniGrid environment"),
        ("obs-noise-x", "classic", "unknown shift"),
        ("flicker-1.5", "atari", r"flicker-1.5: 1.5 is not in \[0, 1\]"),
        ("view-4", "minigrid", "the view size must be 3, 5 or 7"),
        ("none+bogus", "atari", "unknown shift 'bogus'"),
    ],
)
def test_bad_shifts(text: str, family: str, match: str) -> None:
    with pytest.raises(UsageError, match=match):
        parse_shift(text, family)


def test_cue_shift_sets_cue_steps_on_the_memory_variant_only() -> None:
    spec = parse_shift("cue-0", "minigrid", {}, "RIMAgents/PickupCue-6x6-v0")
    assert spec.env_kwargs == {"cue_steps": 0}
    with pytest.raises(UsageError, match="needs the memory variant"):
        parse_shift("cue-0", "minigrid", {}, "RIMAgents/Pickup-6x6-v0")


def test_composition_merges_both() -> None:
    spec = parse_shift("novel-distractors+view-5+flicker-0.2", "minigrid", {"num_distractors": 4})
    assert spec.env_kwargs == {"distractor_palette": "heldout", "view_size": 5}
    assert spec.image_blank_p == 0.2
    assert parse_shift("more-distractors", "minigrid", {"num_distractors": 4}).env_kwargs["num_distractors"] == 8
    atari = parse_shift("flicker-0.5+occlusion-0.2+distractors", "atari")
    assert [name for name, _ in atari.frame_transforms] == ["flicker-0.5", "occlusion-0.2", "distractors"]


def test_shift_catalogue_is_one_registry() -> None:
    """The README's table, this module's doc and evaluate.py --help come from SHIFT_DEFS."""
    from pathlib import Path

    from rim_agents.cli import evaluate_parser
    from rim_agents.shifts import SHIFT_DEFS, shift_table

    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    assert shift_table(markdown=True) in readme
    assert shift_table() in evaluate_parser().format_help()
    # Every listed shift parses for each family it names (with its parameter filled in).
    examples = {
        "view-N": "view-5",
        "cue-N": "cue-0",
        "flicker-p": "flicker-0.5",
        "occlusion-f": "occlusion-0.2",
        "distractors-N": "distractors-2",
        "sticky-p": "sticky-0.25",
        "mode-M": "mode-4",
        "difficulty-D": "difficulty-1",
        "obs-noise-s": "obs-noise-0.1",
    }
    env_ids = {"atari": "BreakoutNoFrameskip-v4", "minigrid": "RIMAgents/PickupCue-6x6-v0", "classic": "CartPole-v1"}
    for d in SHIFT_DEFS:
        for family in d.families:
            parse_shift(examples.get(d.name, d.name), family, {}, env_ids[family])
