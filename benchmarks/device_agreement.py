"""Do the RIM core's outputs and gradients on a device agree with the CPU's? One batch per cell type.

The same weights (copied) and inputs, with episode starts inside the batch, dropout off; the
forward output, the final state and every parameter's gradient of a random projection of the
output are compared. Exit status 1 when a difference exceeds ``--tol``.

    python benchmarks/device_agreement.py --device cuda [--tol 1e-4]
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

import torch as th

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from rim_agents import RIMCore


def run(core: RIMCore, x: th.Tensor, starts: th.Tensor, proj: th.Tensor) -> list[th.Tensor]:
    core.zero_grad()
    out, (h, c) = core(x, episode_starts=starts)
    (out * proj).sum().backward()
    return [t.detach() for t in (out, h, c, *(p.grad for p in core.parameters() if p.grad is not None))]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--tol", type=float, default=1e-4)
    args = parser.parse_args()
    device = th.device(args.device)
    worst_all = 0.0
    for cell in ("lstm", "gru"):
        th.manual_seed(0)
        T, B, d_in = 32, 8, 64
        cpu = RIMCore(d_in, num_units=6, k_active=4, unit_size=32, cell=cell).eval()
        other = copy.deepcopy(cpu).to(device)
        x, proj = th.randn(T, B, d_in), th.randn(T, B, 6 * 32)
        starts = th.zeros(T, B)
        starts[0] = 1
        starts[T // 2, : B // 2] = 1
        expected = run(cpu, x, starts, proj)
        got = run(other, x.to(device), starts.to(device), proj.to(device))
        worst = max(float((a - b.cpu()).abs().max()) for a, b in zip(expected, got, strict=True))
        worst_all = max(worst_all, worst)
        print(f"RIMCore {cell} cells, cpu vs {device}: max abs difference {worst:.2e} over output, state, gradients")
    ok = worst_all <= args.tol
    print(f"agreement within {args.tol:g}: {'yes' if ok else 'NO'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
