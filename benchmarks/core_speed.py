"""Forward + backward time of the RIM core against nn.LSTM and a per-RIM-loop reference.

Shapes from the paper's Atari setting scaled as in the issue: T=128, B=16, d_in=512, K=6,
d_h=64 (384 total). Every variant runs in the same process, interleaved round by round (the order
rotating, ``rounds.round_order``), so machine noise hits them alike; we print medians and ratios to
nn.LSTM(512, 384) and to the reference.

The loss is a fixed random projection of the output (not ``out.sum()``, whose gradient through a
softmax is exactly zero and fills the backward pass with denormals).

    python benchmarks/core_speed.py [--rounds 15] [--threads N] [--device cuda] [--steps T] [--autograd]
        [--allocator retain|system]

Every variant runs under the process's ``--allocator`` setting (``rim_agents.host``), by default
the training job's (``retain``: freed memory kept for reuse).

``RIMCore`` trains through its hand-written backward pass (:mod:`rim_agents.rim_unroll`) on the
CPU; ``--autograd`` also times both cells with autograd's step-by-step backward pass, as before it.
"""

from __future__ import annotations

import argparse
import functools
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch as th
from rounds import round_order
from torch import nn

from rim_agents import RIMCore
from rim_agents.config import ALLOCATORS
from rim_agents.host import apply_allocator, describe


class LoopRIMReference(nn.Module):
    """The straightforward implementation: a Python loop over RIMs, one ``nn.LSTMCell`` each.

    Same computation as :class:`RIMCore` (null-token input attention, top-k, communication,
    masked write), written the way public implementations write it.
    """

    def __init__(self, input_size: int, num_units: int = 6, k_active: int = 4, unit_size: int = 64) -> None:
        super().__init__()
        self.K, self.k, self.d_h = num_units, k_active, unit_size
        d_k, d_v, self.Hc, self.dc = 64, 4 * unit_size, 4, 32
        self.key = nn.Linear(input_size, d_k, bias=False)
        self.value = nn.Linear(input_size, d_v, bias=False)
        self.query = nn.ModuleList(nn.Linear(unit_size, d_k) for _ in range(num_units))  # with the query bias
        self.cells = nn.ModuleList(nn.LSTMCell(d_v, unit_size) for _ in range(num_units))
        self.comm_qkv = nn.ModuleList(nn.Linear(unit_size, 3 * self.Hc * self.dc, bias=False) for _ in range(num_units))
        self.comm_out = nn.ModuleList(nn.Linear(self.Hc * self.dc, unit_size) for _ in range(num_units))
        self.comm_gate = nn.ModuleList(nn.Linear(unit_size, unit_size) for _ in range(num_units))

    def forward(self, x: th.Tensor) -> th.Tensor:
        T, B, _ = x.shape
        h = [x.new_zeros(B, self.d_h) for _ in range(self.K)]
        c = [x.new_zeros(B, self.d_h) for _ in range(self.K)]
        outs = []
        for t in range(T):
            key, value = self.key(x[t]), self.value(x[t])
            p = [th.sigmoid((self.query[i](h[i]) * key).sum(-1, keepdim=True) / 8.0) for i in range(self.K)]
            p_all = th.cat(p, dim=1)
            mask = th.zeros_like(p_all).scatter_(1, p_all.topk(self.k, dim=1).indices, 1.0)
            new = [self.cells[i](p[i] * value, (h[i], c[i])) for i in range(self.K)]
            tent = [mask[:, i : i + 1] * new[i][0] + (1 - mask[:, i : i + 1]) * h[i] for i in range(self.K)]
            qkv = [self.comm_qkv[i](tent[i]).view(B, 3, self.Hc, self.dc) for i in range(self.K)]
            q = th.stack([z[:, 0] for z in qkv], 2)
            k = th.stack([z[:, 1] for z in qkv], 2)
            v = th.stack([z[:, 2] for z in qkv], 2)
            att = th.softmax(q @ k.transpose(-1, -2) / self.dc**0.5, -1) @ v  # (B, Hc, K, dc)
            for i in range(self.K):
                o = self.comm_out[i](att[:, :, i].reshape(B, -1))
                m = mask[:, i : i + 1]
                h_hat = tent[i] + th.sigmoid(self.comm_gate[i](o)) * th.tanh(o)
                h[i] = m * h_hat + (1 - m) * h[i]
                c[i] = m * new[i][1] + (1 - m) * c[i]
            outs.append(th.cat(h, dim=1))
        return th.stack(outs)


def _output(core: RIMCore, x: th.Tensor) -> th.Tensor:
    return core(x)[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=15, help="timed rounds per variant (median reported)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (timed with a synchronize)")
    parser.add_argument("--steps", type=int, default=128, help="sequence length T")
    parser.add_argument("--batch", type=int, default=16, help="sequences per batch B")
    parser.add_argument("--compile", action="store_true", help="also time both cells with rims.compile=default")
    parser.add_argument("--autograd", action="store_true", help="also time both cells with autograd's backward")
    parser.add_argument(
        "--allocator", choices=ALLOCATORS, default="retain", help="the process's allocator setting (training's: retain)"
    )
    args = parser.parse_args()
    apply_allocator(args.allocator)
    device = th.device(args.device)
    if args.threads:
        th.set_num_threads(args.threads)
    th.manual_seed(0)
    T, B, d_in, K, d_h = args.steps, args.batch, 512, 6, 64
    x = th.randn(T, B, d_in, device=device)
    proj = th.randn(T, B, K * d_h, device=device)

    def rim(cell: str = "lstm", **settings: Any) -> RIMCore:
        """The benchmark's RIM core (K=6, k=4, dropout 0.1) with ``settings``, on the device."""
        return RIMCore(
            d_in, num_units=K, k_active=4, unit_size=d_h, cell=cell, input_dropout=0.1, comm_dropout=0.1, **settings
        ).to(device)

    rim_lstm, rim_gru = rim("lstm"), rim("gru")
    lstm = nn.LSTM(d_in, K * d_h)
    reference = LoopRIMReference(d_in, K, 4, d_h)
    for module in (rim_lstm, rim_gru, lstm, reference):
        module.to(device)
    sync = th.cuda.synchronize if device.type == "cuda" else lambda: None
    compiled: dict[str, RIMCore] = {}
    if args.compile:
        for cell in ("lstm", "gru"):
            core = compiled[cell] = rim(cell, compile="reduce-overhead" if device.type == "cuda" else "default")
            start = time.perf_counter()
            for _ in range(2):  # the first calls compile the forward and the backward
                (core(x)[0] * proj).sum().backward()
            sync()
            print(f"compile time (RIMCore {cell}, forward and backward): {time.perf_counter() - start:.1f} s")

    variants: dict[str, Callable[[], th.Tensor]] = {
        "nn.LSTM(512, 384)": lambda: lstm(x)[0],
        "RIMCore lstm": lambda: rim_lstm(x)[0],
        "RIMCore gru": lambda: rim_gru(x)[0],
        "per-RIM loop reference": lambda: reference(x),
    }
    for cell, core in compiled.items():
        variants[f"RIMCore {cell} compiled"] = functools.partial(_output, core, x)
    if args.autograd:
        for cell in ("lstm", "gru"):
            core = rim(cell)
            core.cell.handwritten_backward = False
            variants[f"RIMCore {cell} autograd"] = functools.partial(_output, core, x)
    if device.type == "cuda":
        graphed = rim(cuda_graphs=True)
        start = time.perf_counter()
        (graphed(x)[0] * proj).sum().backward()  # records the forward and backward graphs
        sync()
        print(f"record time (RIMCore lstm, cuda_graphs): {time.perf_counter() - start:.1f} s")
        variants["RIMCore lstm cuda-graphs"] = lambda: graphed(x)[0]
    times: dict[str, list[float]] = {name: [] for name in variants}
    for r in range(args.warmup + args.rounds):
        for name in round_order(list(variants), r):
            fn = variants[name]
            sync()
            start = time.perf_counter()
            (fn() * proj).sum().backward()
            sync()
            elapsed = time.perf_counter() - start
            if r >= args.warmup:
                times[name].append(elapsed)

    med = {name: statistics.median(ts) for name, ts in times.items()}
    base, ref = med["nn.LSTM(512, 384)"], med["per-RIM loop reference"]
    print(
        f"forward + backward on {device}, T={T} B={B} d_in={d_in} K={K} d_h={d_h}, {args.rounds} rounds, "
        f"allocator {args.allocator}"
    )
    print(describe())
    print(f"{'variant':<26}{'median s':>10}{'vs nn.LSTM':>12}{'ref / this':>12}")
    for name, m in med.items():
        print(f"{name:<26}{m:>10.4f}{m / base:>11.2f}x{ref / m:>11.2f}x")


if __name__ == "__main__":
    main()
