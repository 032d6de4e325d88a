"""Where PPO's time goes on Breakout (Atari config): one policy forward of a rollout step (8 envs,
one step, the core's state carried), and one update split into collecting and training.

    python benchmarks/ppo_profile.py [--variants ppo-cnn,ours-lstm,ours-rims] [--updates 3]

Medians of 50 forwards after 10; the split is the mean over ``--updates`` updates after one
warm-up update. Same settings as benchmarks/train_throughput.py.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch as th

sys.path.insert(0, str(Path(__file__).resolve().parent))

from train_throughput import build

from rim_agents.host import describe


def forward_ms(model: Any) -> float | None:
    """Median ms of one policy forward for a rollout step (recurrent policies only)."""
    policy = model.policy
    if not hasattr(policy, "lstm_hidden_state_shape"):
        return None
    from sb3_contrib.common.recurrent.type_aliases import RNNStates

    layers, _, width = policy.lstm_hidden_state_shape
    n_envs = model.n_envs
    z = th.zeros(layers, n_envs, width)
    obs = policy.obs_to_tensor(th.zeros((n_envs, *model.observation_space.shape), dtype=th.uint8).numpy())[0]
    times = []
    with th.no_grad():
        for _ in range(60):
            start = time.perf_counter()
            policy.forward(obs, RNNStates((z, z), (z, z)), th.zeros(n_envs))
            times.append(time.perf_counter() - start)
    return statistics.median(times[10:]) * 1000


def per_phase(model: Any, updates: int, measure: Callable[[Callable[[], Any]], tuple[Any, float]]) -> dict[str, float]:
    """Mean per update, after one warm-up update, of what ``measure`` returns for each call of
    collecting (``collect_rollouts``) and of training (``train``); ``measure(call)`` runs ``call``
    and returns its result and the amount."""
    steps = model.n_envs * model.n_steps
    model.learn(steps)
    totals = {"collect": 0.0, "train": 0.0}
    collect, train = model.collect_rollouts, model.train

    def measured(name: str, fn: Any) -> Any:
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            out, amount = measure(lambda: fn(*args, **kwargs))
            totals[name] += amount
            return out

        return wrapper

    model.collect_rollouts, model.train = measured("collect", collect), measured("train", train)
    try:
        model.learn(updates * steps, reset_num_timesteps=False)
    finally:
        model.collect_rollouts, model.train = collect, train
    return {k: v / updates for k, v in totals.items()}


def split(model: Any, updates: int) -> dict[str, float]:
    """Mean seconds per update spent collecting and training."""

    def timed(call: Callable[[], Any]) -> tuple[Any, float]:
        start = time.perf_counter()
        out = call()
        return out, time.perf_counter() - start

    return per_phase(model, updates, timed)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variants", default="ppo-cnn,ours-lstm,ours-rims")
    parser.add_argument("--updates", type=int, default=3)
    args = parser.parse_args()
    print(describe())
    print(f"{'variant':<12}{'forward ms':>12}{'collect s':>11}{'train s':>9}")
    for name in args.variants.split(","):
        model = build(name, seed=0)
        fwd = forward_ms(model)
        parts = split(model, args.updates)
        fwd_text = f"{fwd:.2f}" if fwd is not None else "-"
        print(f"{name:<12}{fwd_text:>12}{parts['collect']:>11.2f}{parts['train']:>9.2f}", flush=True)


if __name__ == "__main__":
    main()
