"""How often does a training chunk hold both the cue and the pickup it should steer?

``RIMPPO`` trains on fixed chunks of ``seq_len`` steps of each env's stream, each starting from the
stored core state (no gradient reaches earlier steps). On the memory variant the cue is an
episode's first observation, so the policy gradient of a pickup reaches the cue's encoding only
when both lie in one chunk. This plays a uniformly random policy (an untrained agent's behaviour)
for ``--steps`` steps of one env and prints, for each chunk length, the fraction of pickups
whose episode started in the same chunk.

    python benchmarks/cue_in_chunk.py [--env RIMAgents/PickupCue-6x6-v0] [--steps 200000] [--seq-lens 32,64,128]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import gymnasium as gym
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import rim_agents.envs  # noqa: F401 (registers the envs)


def pickups(env_id: str, steps: int, seed: int = 0) -> tuple[list[tuple[int, int]], list[int]]:
    """``(first step, pickup step)`` of every episode that ended in a pickup, and every episode's length."""
    env = gym.make(env_id)
    rng = np.random.default_rng(seed)
    env.reset(seed=seed)
    start, found, lengths = 0, [], []
    for step in range(steps):
        _, _, terminated, truncated, _ = env.step(int(rng.integers(env.action_space.n)))
        if terminated or truncated:
            if terminated:
                found.append((start, step))
            lengths.append(step - start + 1)
            env.reset()
            start = step + 1
    env.close()
    return found, lengths


def in_same_chunk(found: list[tuple[int, int]], seq_len: int) -> float:
    """Fraction of ``(start, end)`` pairs whose two steps fall in one chunk of ``seq_len`` steps."""
    return float(np.mean([s // seq_len == e // seq_len for s, e in found]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--env", default="RIMAgents/PickupCue-6x6-v0")
    parser.add_argument("--steps", type=int, default=200_000)
    parser.add_argument("--seq-lens", default="32,64,128")
    args = parser.parse_args()
    found, lengths = pickups(args.env, args.steps)
    print(
        f"{args.env}, random policy: {len(lengths)} episodes, length mean {np.mean(lengths):.1f}, "
        f"median {np.median(lengths):.0f}; {len(found) / len(lengths):.2f} end in a pickup"
    )
    for seq_len in (int(v) for v in args.seq_lens.split(",")):
        print(f"seq_len {seq_len}: {in_same_chunk(found, seq_len):.2f} of pickups share a chunk with their cue")


if __name__ == "__main__":
    main()
