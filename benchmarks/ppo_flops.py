"""How much arithmetic one PPO update on Breakout does per core, and the time it cannot go below.

Counts the floating-point operations of every matrix product and convolution (forward and
backward; ``torch.utils.flop_counter``) of one PPO update (8 envs x 128 steps, 4 epochs of
minibatch 256: the Atari config) for each variant, split into collecting (the rollout's policy
forwards) and training, and measures this machine's matrix-product rate (a 1024 x 1024 x 1024
``mm``, median of ``--rounds``). The counts are exact and machine-independent; the rate is what one
``mm`` of a comfortable size reaches, which the small per-step products of a recurrent core do not.

``floor s`` is the extra arithmetic over feed-forward PPO divided by that rate: the least extra time
an update of the variant can take on this machine, however its kernels are fused. Against it,
``--budget-ratio`` (0.9 by default) converts a measured feed-forward update time (``--ff-seconds``,
from ``benchmarks/ppo_profile.py`` on a quiet machine) into the extra time that ratio allows.

    python benchmarks/ppo_flops.py [--variants ppo-cnn,ours-lstm,ours-rims] [--ff-seconds 3.11]
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
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parent))

from ppo_profile import per_phase
from train_throughput import build


def update_flops(model: Any) -> dict[str, float]:
    """GFLOP of one update (after a warm-up update), split into collecting and training."""

    def counted(call: Callable[[], Any]) -> tuple[Any, float]:
        with FlopCounterMode(display=False) as counter:
            out = call()
        return out, counter.get_total_flops() / 1e9

    return per_phase(model, 1, counted)


def gemm_rate(rounds: int, n: int = 1024) -> float:
    """GFLOP/s of an ``n x n x n`` ``mm`` (median of ``rounds`` timings)."""
    a, b = th.randn(n, n), th.randn(n, n)
    th.mm(a, b)
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        th.mm(a, b)
        times.append(time.perf_counter() - start)
    return 2 * n**3 / statistics.median(times) / 1e9


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variants", default="ppo-cnn,ours-lstm,ours-rims")
    parser.add_argument("--rounds", type=int, default=21, help="timings of the rate's mm")
    parser.add_argument("--ff-seconds", type=float, default=None, help="feed-forward PPO's seconds per update")
    parser.add_argument("--budget-ratio", type=float, default=0.9)
    args = parser.parse_args()
    names = args.variants.split(",")
    if "ppo-cnn" not in names:
        parser.error("--variants must include ppo-cnn, the baseline the extra arithmetic is counted against")
    flops = {name: update_flops(build(name, seed=0)) for name in names}
    rate = gemm_rate(args.rounds)
    base = sum(flops["ppo-cnn"].values())
    print(f"one PPO update on Breakout (Atari config); mm rate {rate:.1f} GFLOP/s ({th.get_num_threads()} threads)")
    print("| variant | collect GFLOP | train GFLOP | total GFLOP | extra over ppo-cnn | floor s |")
    print("|---|---|---|---|---|---|")
    for name, f in flops.items():
        total = f["collect"] + f["train"]
        extra = total - base
        print(f"| {name} | {f['collect']:.1f} | {f['train']:.1f} | {total:.1f} | {extra:+.1f} | {extra / rate:.3f} |")
    if args.ff_seconds is not None:
        allowed = args.ff_seconds * (1 / args.budget_ratio - 1)
        print(f"\n{args.budget_ratio}x of a {args.ff_seconds:.2f} s feed-forward update allows {allowed:.3f} s extra")


if __name__ == "__main__":
    main()
