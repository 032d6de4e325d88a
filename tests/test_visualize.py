"""visualize.py: videos, activity rasters, token heat maps, shifts in the frames, and its CLI."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch as th

from rim_agents.cli import visualize_main
from rim_agents.config import load_config
from rim_agents.models import build_model, make_env
from rim_agents.shifts import shift_spec
from rim_agents.training import train
from rim_agents.visualize import (
    activity_png,
    compose_frame,
    event_summary,
    raster,
    record_episode,
    token_heat,
    write_video,
)

TINY = ["n_envs=2", "ppo.n_steps=16", "ppo.batch_size=16", "ppo.seq_len=8", "ppo.n_epochs=1"]


def untrained(env_id: str, core: str, extra: list[str] | None = None):
    config = load_config(env_id, core, overrides=[*TINY, *(extra or [])])
    env = make_env(config, 1, 0, shift_spec(config, "none"))
    model = build_model(config, env)
    env.close()
    return config, model


def episode_of(config, model, shift: str = "none", max_steps: int = 40, seed: int = 0):
    env = make_env(config, 1, seed, shift_spec(config, shift))
    try:
        return record_episode(model, config, env, seed=seed, max_steps=max_steps)
    finally:
        env.close()


def test_video_has_one_frame_per_step_and_the_raster_is_the_cores_mask(tmp_path: Path) -> None:
    config, model = untrained("RIMAgents/Pickup-6x6-v0", "rims")
    episode = episode_of(config, model)
    path = write_video(episode, tmp_path / "ep.mp4", ["left", "right", "forward", "pickup"])
    video = cv2.VideoCapture(str(path))
    assert int(video.get(cv2.CAP_PROP_FRAME_COUNT)) == episode.length > 0
    ok, frame = video.read()
    assert ok and frame.shape[:2] == compose_frame(episode, 0).shape[:2]
    # Replaying the episode's observations through the core in one unroll gives the same masks.
    policy = model.policy.eval()
    core = policy.lstm_actor
    core.track_activity = True
    obs = {k: np.concatenate([o[k] for o in episode.observations]) for k in episode.observations[0]}
    starts = np.zeros(episode.length, dtype=np.float32)
    starts[0] = 1.0
    with th.no_grad():
        obs_tensor, _ = policy.obs_to_tensor(obs)
        zeros = (th.zeros(1, 1, core.hidden_size),) * 2
        policy.get_distribution(obs_tensor, zeros, th.as_tensor(starts))
    replay = core.last_activity.mask[:, 0].numpy()  # (T, K)
    np.testing.assert_array_equal(~np.isnan(raster(episode)), replay.T)
    assert activity_png(episode)[:8] == b"\x89PNG\r\n\x1a\n"
    # Every active RIM's row of the mean communication is a distribution over RIMs.
    comm = np.array(episode.communication)
    np.testing.assert_allclose(comm.sum(-1), 1.0, rtol=1e-5)


def test_token_heat_map_is_the_rims_attention_away_from_null() -> None:
    config, model = untrained(
        "BreakoutNoFrameskip-v4", "rims", ["policy.features_extractor=nature_cnn_tokens", "rims.unit_size=16"]
    )
    episode = episode_of(config, model, max_steps=5)
    assert episode.token_grid == (7, 7)
    for mask, attention in zip(episode.masks, episode.attention, strict=True):
        for i in np.flatnonzero(mask):
            heat = token_heat(attention[i], episode.token_grid)
            assert heat.shape == (7, 7)
            np.testing.assert_allclose(heat.sum(), 1.0 - attention[i, 0], rtol=1e-5)
    assert compose_frame(episode, 0).shape[0] > 336 + 26 + 44  # the heat maps are below the strip


@pytest.mark.parametrize(("shift", "check"), [("flicker-1.0", "blank"), ("occlusion-0.2", "band")])
def test_shifts_show_in_the_frames(shift: str, check: str) -> None:
    config, model = untrained("BreakoutNoFrameskip-v4", "lstm")
    plain = episode_of(config, model, max_steps=10)
    shifted = episode_of(config, model, shift, max_steps=10)
    assert all(f.any() for f in plain.frames)
    if check == "blank":
        assert not any(f.any() for f in shifted.frames)
    else:
        band = shifted.frames[-1][336 // 2 - 10 : 336 // 2 + 10]
        assert not band.any() and plain.frames[-1][336 // 2 - 10 : 336 // 2 + 10].any()


@pytest.mark.parametrize("core", ["lstm", "none"])
def test_other_cores_get_frames_without_the_strip(core: str, tmp_path: Path) -> None:
    config, model = untrained("RIMAgents/Pickup-6x6-v0", core)
    episode = episode_of(config, model)
    assert not episode.masks and episode.length > 0
    write_video(episode, tmp_path / "ep.mp4")
    assert compose_frame(episode, 0).shape[0] == 336 + 26 + 24  # frame, text, mission


def test_event_summary_conditions_on_events() -> None:
    config, model = untrained("RIMAgents/PickupCue-6x6-v0", "rims")
    episode = episode_of(config, model, max_steps=30)
    table = event_summary([episode])
    masks = np.array(episode.masks, dtype=float)
    np.testing.assert_allclose(table["all"], masks.mean(0))
    (key,) = [k for k in table if k.startswith("target-shown")]
    assert key == "target-shown (1 steps)"  # the cue: the first observation only
    np.testing.assert_allclose(table[key], masks[0])


def test_cli_writes_videos_summary_and_tensorboard(tmp_path: Path, capsys) -> None:
    run = train(load_config("RIMAgents/PickupCue-6x6-v0", "rims", overrides=TINY, flags={"total_timesteps": 32}),
                tmp_path / "run")  # fmt: skip
    out = tmp_path / "viz"
    args = [str(run), "--shift", "cue-0", "--episodes", "2", "--max-steps", "20", "--summary", "--tensorboard"]
    assert visualize_main([*args, "--out", str(out)]) == 0
    names = sorted(p.name for p in out.iterdir())
    assert [n for n in names if n.endswith(".mp4")] == ["cue-0_ep0_step32.mp4", "cue-0_ep1_step32.mp4"]
    assert {"summary.md", "summary.json", "summary.png"} <= set(names)
    assert set(json.loads((out / "summary.json").read_text())) == {"none", "cue-0"}
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run / "tb"), size_guidance={"images": 0}).Reload()
    assert "visualize/cue-0" in events.Tags()["images"]
    # Bad input: one line, exit 2, nothing written.
    assert visualize_main([*args, "--out", str(out)]) == 2  # out holds results
    assert visualize_main([str(run), "--shift", "occlusion-0.2", "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and "--force" in err[0] and "needs an Atari" in err[1]
    assert not (tmp_path / "x").exists()


def test_videos_during_training(tmp_path: Path) -> None:
    config = load_config(
        "RIMAgents/Pickup-6x6-v0", "rims", overrides=[*TINY, "video_freq=32"], flags={"total_timesteps": 64}
    )
    run = train(config, tmp_path / "run")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run / "tb"), size_guidance={"images": 0}).Reload()
    assert [e.step for e in events.Images("video/episode")] == [32, 64]
