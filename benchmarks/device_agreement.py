"""Do the RIM core's outputs and gradients on a device agree with the CPU's? One batch per cell type.

The same weights (copied) and inputs, with episode starts inside the batch, dropout off; the
forward output, the final state and every parameter's gradient of a random projection of the
output are compared. On CUDA the device's forward and backward also run under
``torch.cuda.set_sync_debug_mode("warn")``, which reports every operation that waits for the GPU
(``.item()``, ``.tolist()``, ``nonzero``, a copy to the host): the RIM time loop must have none.
Exit status 1 when a difference exceeds ``--tol`` or the loop synchronises.

    python benchmarks/device_agreement.py --device cuda [--tol 1e-4]
"""

from __future__ import annotations

import argparse
import copy
import sys
import warnings
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
    syncs_all = 0
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
        x_d, starts_d, proj_d = x.to(device), starts.to(device), proj.to(device)
        if device.type == "cuda":
            th.cuda.synchronize()
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                th.cuda.set_sync_debug_mode("warn")
                try:
                    got = run(other, x_d, starts_d, proj_d)
                finally:
                    th.cuda.set_sync_debug_mode("default")
            syncs = [str(w.message).splitlines()[0] for w in caught if "called a synchronizing" in str(w.message)]
            syncs_all += len(syncs)
            print(f"RIMCore {cell} cells, host synchronisations in forward + backward: {len(syncs)}")
            for line in sorted(set(syncs)):
                print(f"  {line}")
        else:
            got = run(other, x_d, starts_d, proj_d)
        worst = max(float((a - b.cpu()).abs().max()) for a, b in zip(expected, got, strict=True))
        worst_all = max(worst_all, worst)
        print(f"RIMCore {cell} cells, cpu vs {device}: max abs difference {worst:.2e} over output, state, gradients")
    ok = worst_all <= args.tol
    print(f"agreement within {args.tol:g}: {'yes' if ok else 'NO'}")
    if device.type == "cuda":
        print(f"host synchronisations in the RIM loop: {syncs_all}")
    return 0 if ok and syncs_all == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
