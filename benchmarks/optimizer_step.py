"""One Adam step over a PPO policy's parameters: the fused kernel (the package's default) against
PyTorch's per-tensor default and ``foreach``, and how far the fused step's parameters move from the
per-tensor step's over 20 steps from the same state and gradients.

Setting: the Atari config's policy (``--core rims``: NatureCNN + the paper's 6 RIMs of 85, 3.1M
parameters in 27 tensors), random gradients, ``lr`` 2.5e-4, ``eps`` 1e-5. Variants interleave round
by round; we print the median ms per step and the ratio to the per-tensor step.

    python benchmarks/optimizer_step.py [--core rims] [--rounds 30] [--threads 1]
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Any

import torch as th

from rim_agents.config import load_config
from rim_agents.host import describe
from rim_agents.models import build_model, make_env

VARIANTS: dict[str, dict[str, Any]] = {
    "per-tensor": {"foreach": False},
    "foreach": {"foreach": True},
    "fused": {"fused": True},
}


def optimizer(params: list[th.Tensor], **kwargs: Any) -> tuple[th.optim.Adam, list[th.Tensor]]:
    copies = [p.detach().clone().requires_grad_() for p in params]
    return th.optim.Adam(copies, lr=2.5e-4, eps=1e-5, **kwargs), copies


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--core", default="rims")
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    th.set_num_threads(args.threads)
    config = load_config("BreakoutNoFrameskip-v4", args.core, flags={"seed": 0, "device": "cpu"})
    params = list(build_model(config, make_env(config, n_envs=1)).policy.parameters())
    optimizers = {}
    for name, kwargs in VARIANTS.items():
        opt, copies = optimizer(params, **kwargs)
        for p in copies:
            p.grad = th.randn_like(p)
        for _ in range(5):
            opt.step()
        optimizers[name] = opt
    times: dict[str, list[float]] = {name: [] for name in VARIANTS}
    for _ in range(args.rounds):
        for name, opt in optimizers.items():
            start = time.perf_counter()
            opt.step()
            times[name].append(time.perf_counter() - start)
    # Agreement: the same 20 gradients into the per-tensor and the fused step.
    runs = []
    for kwargs in (VARIANTS["per-tensor"], VARIANTS["fused"]):
        opt, copies = optimizer(params, **kwargs)
        for i in range(20):
            gen = th.Generator().manual_seed(i)
            for p in copies:
                p.grad = th.randn(p.shape, generator=gen)
            opt.step()
        runs.append(copies)
    diff = max((a - b).abs().max().item() for a, b in zip(*runs, strict=True))
    print(
        f"Adam over the {args.core} Atari policy: {sum(p.numel() for p in params) / 1e6:.2f}M parameters in "
        f"{len(params)} tensors; {args.rounds} rounds"
    )
    base = statistics.median(times["per-tensor"])
    print(describe())
    print(f"{'variant':<12}{'median ms':>11}{'vs per-tensor':>15}")
    for name, ts in times.items():
        m = statistics.median(ts)
        print(f"{name:<12}{m * 1e3:>11.2f}{m / base:>14.2f}x")
    print(f"fused vs per-tensor after 20 steps: max |difference| {diff:.1e}")


if __name__ == "__main__":
    main()
