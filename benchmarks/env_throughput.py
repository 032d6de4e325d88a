"""Environment throughput: agent steps per second with random actions, 8 envs.

Atari (BreakoutNoFrameskip-v4, 4 stacked 84x84 frames):
- ``ours-atari``: :class:`rim_agents.envs.atari.AtariVecEnv` (ale-py's C++ vector env);
- ``sb3-dummy``: SB3 ``make_atari_env`` + ``VecFrameStack`` on ``DummyVecEnv``;
- ``sb3-subproc``: the same on ``SubprocVecEnv``.

MiniGrid (8x8 room, 3 distractors):
- ``ours-pickup``: ``make_vec_env("RIMAgents/Pickup-8x8-v0", 8)``;
- ``minigrid-fetch``: ``gymnasium.make_vec("MiniGrid-Fetch-8x8-N3-v0", 8)`` (sync vector env);
- ``pickup-single``: one ``PickupEnv`` stepped directly (single-threaded steps/s).

Variants run interleaved, ``--rounds`` times ``--steps`` vector steps each; we print medians and
ratios (Atari against the faster SB3 option; pickup against MiniGrid's Fetch).

    python benchmarks/env_throughput.py [--rounds 5] [--steps 500]
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from typing import Any

import gymnasium as gym
import minigrid  # noqa: F401  (registers MiniGrid ids)
import numpy as np
from stable_baselines3.common.env_util import make_atari_env
from stable_baselines3.common.vec_env import DummyVecEnv, SubprocVecEnv, VecFrameStack

from rim_agents.envs import make_vec_env
from rim_agents.envs.pickup import PickupEnv
from rim_agents.host import describe

N_ENVS = 8


def vec_stepper(env: Any, n_actions: int, gym_api: bool = False) -> Callable[[int], int]:
    rng = np.random.default_rng(0)
    env.reset()

    def run(steps: int) -> int:
        for _ in range(steps):
            env.step(rng.integers(0, n_actions, N_ENVS))
        return steps * N_ENVS

    return run


def make_breakout(**kwargs: Any) -> gym.Env:
    """gymnasium.make of the ALE id, registering ALE's ids first (also in subprocesses)."""
    import ale_py

    gym.register_envs(ale_py)
    return gym.make("BreakoutNoFrameskip-v4", **kwargs)


def single_stepper() -> Callable[[int], int]:
    env = PickupEnv()
    env.reset(seed=0)
    rng = np.random.default_rng(0)

    def run(steps: int) -> int:
        n = steps * N_ENVS
        for a in rng.integers(0, 4, n):
            _, _, term, trunc, _ = env.step(int(a))
            if term or trunc:
                env.reset()
        return n

    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=500, help="vector steps per round")
    args = parser.parse_args()

    env_id = "BreakoutNoFrameskip-v4"
    sb3_kw: dict[str, Any] = {"n_envs": N_ENVS, "seed": 0}
    variants: dict[str, Callable[[int], int]] = {
        "ours-atari": vec_stepper(make_vec_env(env_id, N_ENVS, seed=0), 4),
        "sb3-dummy": vec_stepper(VecFrameStack(make_atari_env(make_breakout, vec_env_cls=DummyVecEnv, **sb3_kw), 4), 4),
        "sb3-subproc": vec_stepper(
            VecFrameStack(make_atari_env(make_breakout, vec_env_cls=SubprocVecEnv, **sb3_kw), 4), 4
        ),
        "ours-pickup": vec_stepper(make_vec_env("RIMAgents/Pickup-8x8-v0", N_ENVS, seed=0), 4),
        "minigrid-fetch": vec_stepper(
            gym.make_vec("MiniGrid-Fetch-8x8-N3-v0", N_ENVS, vectorization_mode="sync"), 4, gym_api=True
        ),
        "pickup-single": single_stepper(),
    }
    rates: dict[str, list[float]] = {name: [] for name in variants}
    for run in variants.values():  # warm-up
        run(20)
    for _ in range(args.rounds):
        for name, run in variants.items():
            start = time.perf_counter()
            n = run(args.steps)
            rates[name].append(n / (time.perf_counter() - start))
    med = {name: statistics.median(r) for name, r in rates.items()}
    best_sb3 = max(med["sb3-dummy"], med["sb3-subproc"])
    baseline = {
        "ours-atari": best_sb3,
        "sb3-dummy": best_sb3,
        "sb3-subproc": best_sb3,
        "ours-pickup": med["minigrid-fetch"],
        "minigrid-fetch": med["minigrid-fetch"],
        "pickup-single": med["minigrid-fetch"],
    }
    print(f"random actions, {N_ENVS} envs, {args.rounds} rounds x {args.steps} vector steps")
    print(describe())
    print(f"{'variant':<16}{'median steps/s':>16}{'ratio':>9}  baseline")
    for name, m in med.items():
        base = "best SB3 Atari" if name in ("ours-atari", "sb3-dummy", "sb3-subproc") else "minigrid-fetch"
        print(f"{name:<16}{m:>16.0f}{m / baseline[name]:>8.2f}x  {base}")


if __name__ == "__main__":
    main()
