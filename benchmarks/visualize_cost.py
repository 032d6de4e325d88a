"""What a video costs: record and render one Atari episode of up to 1,000 steps with visualize.py's code.

An untrained RIM agent with the token extractor (the costliest frame: strip plus one heat map per
active RIM) on Pong, whose games last long enough for a random agent. Prints the steps, the
seconds to record (policy + env) and to render the MP4, and the total per 1,000 steps.

    python benchmarks/visualize_cost.py [--env PongNoFrameskip-v4] [--steps 1000]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from rim_agents.config import load_config
from rim_agents.models import build_model, make_env
from rim_agents.shifts import shift_spec
from rim_agents.visualize import action_names, record_episode, write_video


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--env", default="PongNoFrameskip-v4")
    parser.add_argument("--steps", type=int, default=1000)
    args = parser.parse_args()
    config = load_config(args.env, "rims", overrides=["policy.features_extractor=nature_cnn_tokens"])
    env = make_env(config, 1, 0, shift_spec(config, "none"))
    model = build_model(config, env)
    started = time.time()
    episode = record_episode(model, config, env, seed=0, max_steps=args.steps)
    recorded = time.time() - started
    env.close()
    with tempfile.TemporaryDirectory() as tmp:
        started = time.time()
        write_video(episode, Path(tmp) / "episode.mp4", action_names(config))
        rendered = time.time() - started
    total = recorded + rendered
    print(
        f"{args.env}: {episode.length} steps; record {recorded:.1f} s, render {rendered:.1f} s, "
        f"total {total:.1f} s ({total / episode.length * 1000:.1f} s per 1,000 steps)"
    )


if __name__ == "__main__":
    main()
