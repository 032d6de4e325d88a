"""Compile the step or the whole unroll? Forward + backward of one PPO training unroll of the Atari
RIM core (``configs/atari.yaml``: 6 GRU RIMs of 85 with 5 active; T=32 steps x B=8 sequences, d_in=512, episode starts
inside the batch): eager, ``rims.compile=default`` (the per-step function compiled, as shipped) and
``torch.compile`` of the whole time loop (``RIMCore.run`` traced through all T steps; not offered).

Prints each variant's compile time and the medians of interleaved rounds with their ratio to eager.
The loss is a fixed random projection of the output.

    python benchmarks/unroll_compile.py [--rounds 15] [--threads 1] [--steps 32] [--batch 8]
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch as th

from rim_agents import RIMCore
from rim_agents.config import load_config


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--steps", type=int, default=32)
    parser.add_argument("--batch", type=int, default=8)
    args = parser.parse_args()
    th.set_num_threads(args.threads)
    th.manual_seed(0)
    T, B = args.steps, args.batch
    core = RIMCore(512, load_config(env="BreakoutNoFrameskip-v4", core="rims").rims)  # configs/atari.yaml
    x = th.randn(T, B, 512, requires_grad=True)
    h0 = th.zeros(1, B, core.hidden_size)
    starts = (th.rand(T, B) < 0.02).float()
    proj = th.randn(T, B, core.hidden_size)

    def unroll(x: th.Tensor, h0: th.Tensor, starts: th.Tensor) -> th.Tensor:
        return RIMCore.run(core.cell, x, (h0, h0), starts)[0]

    whole = th.compile(unroll, dynamic=False)
    variants: dict[str, tuple[str, Callable[..., th.Tensor]]] = {
        "eager": ("off", unroll),
        "step compiled (rims.compile=default)": ("default", unroll),
        "whole unroll compiled": ("off", whole),
    }

    def timed(mode: str, fn: Callable[..., th.Tensor]) -> float:
        core.cell.compile_mode = mode
        start = time.perf_counter()
        (fn(x, h0, starts) * proj).sum().backward()
        return time.perf_counter() - start

    for name, (mode, fn) in variants.items():
        start = time.perf_counter()
        for _ in range(2):  # the first calls compile the forward and the backward
            timed(mode, fn)
        print(f"{name}: first two calls {time.perf_counter() - start:.1f} s", flush=True)
    times: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(args.rounds):
        for name, (mode, fn) in variants.items():
            times[name].append(timed(mode, fn))
    base = statistics.median(times["eager"])
    print(f"\nT={T}, B={B}, {args.threads} thread(s), medians of {args.rounds} interleaved rounds")
    print("| variant | median ms | vs eager |\n|---|---|---|")
    for name, values in times.items():
        median = statistics.median(values)
        print(f"| {name} | {median * 1000:.1f} | {median / base:.2f}x |")


if __name__ == "__main__":
    main()
