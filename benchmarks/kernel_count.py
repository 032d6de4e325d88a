"""How many kernels one RIM step launches, forward and backward, beside ``nn.LSTM``.

On a GPU a time loop of small kernels is bound by launch overhead, not arithmetic: the step's
cost is about (kernels per step) x (launch cost). This counts, with ``torch.profiler``, the device
kernels (CUDA) or the leaf ATen operators (CPU) of one forward + backward of the benchmark's core
(T steps, B=16, d_in=512, K=6, k=4, d_h=64, LSTM and GRU cells) and divides by T. On the CPU it
also counts the core with autograd's step-by-step backward instead of the hand-written one.

    python benchmarks/kernel_count.py --device cuda [--steps 32]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch as th
from torch import nn
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from rim_agents import RIMCore


def count(module: nn.Module, x: th.Tensor, proj: th.Tensor, device: th.device) -> tuple[int, int]:
    """Kernels (CUDA) or leaf operators (CPU) of the forward and of the backward."""
    activities = [ProfilerActivity.CUDA] if device.type == "cuda" else [ProfilerActivity.CPU]
    module.zero_grad()
    out = (module(x)[0] * proj).sum()  # warm-up: allocator, cuBLAS handles
    out.backward()
    module.zero_grad()
    counts = []
    with profile(activities=activities) as prof:
        out = (module(x)[0] * proj).sum()
        if device.type == "cuda":
            th.cuda.synchronize()
    counts.append(_kernels(prof, device))
    with profile(activities=activities) as prof:
        out.backward()
        if device.type == "cuda":
            th.cuda.synchronize()
    counts.append(_kernels(prof, device))
    return counts[0], counts[1]


def _kernels(prof: profile, device: th.device) -> int:
    events = prof.events()
    if device.type == "cuda":
        return sum(1 for e in events if e.device_type == th.autograd.DeviceType.CUDA)
    # Leaf CPU operators: those that call no other operator.
    parents = {id(e.cpu_parent) for e in events if e.cpu_parent is not None}
    return sum(1 for e in events if id(e) not in parents and e.name.startswith("aten::"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--steps", type=int, default=32)
    args = parser.parse_args()
    device = th.device(args.device)
    th.manual_seed(0)
    T, B, d_in, K, d_h = args.steps, 16, 512, 6, 64
    x = th.randn(T, B, d_in, device=device)
    proj = th.randn(T, B, K * d_h, device=device)
    modules: dict[str, nn.Module] = {
        "nn.LSTM(512, 384)": nn.LSTM(d_in, K * d_h),
        "RIMCore lstm": RIMCore(d_in, num_units=K, k_active=4, unit_size=d_h, cell="lstm"),
        "RIMCore gru": RIMCore(d_in, num_units=K, k_active=4, unit_size=d_h, cell="gru"),
    }
    if device.type == "cpu":  # the CPU trains through the hand-written backward; autograd's beside it
        for cell in ("lstm", "gru"):
            core = modules[f"RIMCore {cell} autograd"] = RIMCore(
                d_in, num_units=K, k_active=4, unit_size=d_h, cell=cell
            )
            core.cell.handwritten_backward = False
    what = "kernels" if device.type == "cuda" else "leaf ATen operators"
    print(f"{what} per step of T={T}, forward and backward, on {device}")
    print(f"{'module':<24}{'forward':>10}{'backward':>10}{'total':>10}")
    for name, module in modules.items():
        fwd, bwd = count(module.to(device), x, proj, device)
        print(f"{name:<24}{fwd / T:>10.1f}{bwd / T:>10.1f}{(fwd + bwd) / T:>10.1f}")


if __name__ == "__main__":
    main()
