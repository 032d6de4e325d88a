"""Which training unroll is fastest? Forward + backward of one PPO training unroll of the Atari RIM
core (``configs/atari.yaml``: 6 GRU RIMs of 85 with 5 active; T=32 steps x B=8 sequences, d_in=512,
episode starts inside the batch): autograd's step-by-step backward pass (eager, and with the step
compiled), the hand-written backward pass (``rim_agents/rim_unroll.py``, the default: eager, and
with ``rims.compile=default``, which compiles its step functions) and, with ``--whole``,
``torch.compile`` of the whole autograd time loop (``RIMCore.run`` traced through all T steps; not
offered; its first compile takes minutes).

Prints each variant's compile time and the medians of interleaved rounds with their ratio to
autograd's eager unroll. The loss is a fixed random projection of the output.

    python benchmarks/unroll_compile.py [--rounds 15] [--threads 1] [--steps 32] [--batch 8] [--whole]
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch as th

from rim_agents import RIMCore
from rim_agents.config import load_config
from rim_agents.host import describe


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--steps", type=int, default=32)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--whole", action="store_true", help="also compile the whole autograd unroll (minutes)")
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

    variants: dict[str, tuple[str, bool, Callable[..., th.Tensor]]] = {
        "autograd, eager": ("off", False, unroll),
        "autograd, step compiled": ("default", False, unroll),
        "hand-written backward, eager (default)": ("off", True, unroll),
        "hand-written backward, rims.compile=default": ("default", True, unroll),
    }
    if args.whole:
        variants["autograd, whole unroll compiled"] = ("off", False, th.compile(unroll, dynamic=False))

    def timed(mode: str, handwritten: bool, fn: Callable[..., th.Tensor]) -> float:
        core.cell.compile_mode = mode
        core.cell.handwritten_backward = handwritten
        start = time.perf_counter()
        (fn(x, h0, starts) * proj).sum().backward()
        return time.perf_counter() - start

    for name, (mode, handwritten, fn) in variants.items():
        start = time.perf_counter()
        for _ in range(2):  # the first calls compile the forward and the backward
            timed(mode, handwritten, fn)
        print(f"{name}: first two calls {time.perf_counter() - start:.1f} s", flush=True)
    times: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(args.rounds):
        for name, (mode, handwritten, fn) in variants.items():
            times[name].append(timed(mode, handwritten, fn))
    base = statistics.median(times["autograd, eager"])
    print(f"\nT={T}, B={B}, medians of {args.rounds} interleaved rounds")
    print(describe())
    print("| variant | median ms | vs autograd, eager |\n|---|---|---|")
    for name, values in times.items():
        median = statistics.median(values)
        print(f"| {name} | {median * 1000:.1f} | {median / base:.2f}x |")


if __name__ == "__main__":
    main()
