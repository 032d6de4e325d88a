"""How the RIM core's cost grows with the number of RIMs K and the sequence length T, beside
``nn.LSTM`` of the same total width (K x 64).

Forward + backward of a random projection of the output (B=16 unless ``--batch``, d_in=512, d_h=64
per RIM, LSTM cells, the paper's attention sizes) on ``--device``, median of ``--rounds`` rounds,
every configuration of a round timed back to back so that machine noise hits them alike. Two sweeps:

- K in 4, 6, 8, 16, 32 (k = K/2 and k = K-1) at T=128;
- T in 32, 64, 128, 256, 512 at K=6, k=4.

Also printed: the time per step (does the cost grow as the arithmetic does, or is it a fixed
per-step overhead?) and a figure ``--out`` (default benchmarks/results/core_scaling.png).

    python benchmarks/core_scaling.py --rounds 3 --threads 1
    python benchmarks/core_scaling.py --device cuda --out core_scaling_cuda.png   # timed with a synchronize
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch as th
from torch import nn

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from rim_agents import RIMCore  # noqa: E402 (after the path line)
from rim_agents.host import describe  # noqa: E402

D_IN, D_H = 512, 64


def case(kind: str, K: int, k: int, T: int, B: int, device: th.device) -> tuple[str, Callable[[], None]]:
    th.manual_seed(0)
    x = th.randn(T, B, D_IN, device=device)
    proj = th.randn(T, B, K * D_H, device=device)
    module: nn.Module
    if kind == "lstm":
        module = nn.LSTM(D_IN, K * D_H)
    else:
        module = RIMCore(D_IN, num_units=K, k_active=k, unit_size=D_H, cell="lstm")
    module.to(device)

    def run() -> None:
        module.zero_grad()
        (module(x)[0] * proj).sum().backward()
        if device.type == "cuda":
            th.cuda.synchronize()

    return f"{kind} K={K} k={k} T={T}", run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--batch", type=int, default=16, help="sequences per batch B")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "core_scaling.png"))
    args = parser.parse_args()
    th.set_num_threads(args.threads)
    device = th.device(args.device)
    configs: list[tuple[str, int, int, int]] = []
    for K in (4, 6, 8, 16, 32):
        configs += [("rims", K, K // 2, 128), ("rims", K, K - 1, 128), ("lstm", K, K, 128)]
    for T in (32, 64, 128, 256, 512):
        configs += [("rims", 6, 4, T)] + ([("lstm", 6, 6, T)] if T != 128 else [])
    cases = [case(*c, args.batch, device) for c in configs]
    for _, run in cases:  # warm-up
        run()
    times: dict[str, list[float]] = {name: [] for name, _ in cases}
    for _ in range(args.rounds):
        for name, run in cases:
            if device.type == "cuda":
                th.cuda.synchronize()
            start = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - start)
    med = {name: statistics.median(ts) for name, ts in times.items()}
    rows = []
    for (kind, K, k, T), (name, _) in zip(configs, cases, strict=True):
        lstm = med[f"lstm K={K} k={K} T={T}"]
        rows.append({"kind": kind, "K": K, "k": k, "T": T, "s": med[name], "vs_lstm": med[name] / lstm})
    print(f"forward + backward on {device}, B={args.batch} d_in={D_IN} d_h={D_H}, median of {args.rounds}")
    print(describe())
    print(f"{'core':<6}{'K':>4}{'k':>4}{'T':>5}{'median s':>10}{'ms/step':>9}{'vs nn.LSTM':>12}")
    for r in rows:
        print(
            f"{r['kind']:<6}{r['K']:>4}{r['k']:>4}{r['T']:>5}{r['s']:>10.4f}{1000 * r['s'] / r['T']:>9.2f}"
            f"{r['vs_lstm']:>11.2f}x"
        )
    out = Path(args.out)
    out.with_suffix(".json").write_text(
        json.dumps(
            {"device": str(device), "batch": args.batch, "threads": args.threads, "rounds": args.rounds, "rows": rows}
        )
    )
    plot(rows, out)


def plot(rows: list[dict], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.6))
    at128 = [r for r in rows if r["T"] == 128]
    for label, pick in (
        ("nn.LSTM(512, 64K)", lambda r: r["kind"] == "lstm"),
        ("RIMs, k = K/2", lambda r: r["kind"] == "rims" and r["k"] == r["K"] // 2),
        ("RIMs, k = K-1", lambda r: r["kind"] == "rims" and r["k"] == r["K"] - 1),
    ):
        sel = sorted((r for r in at128 if pick(r)), key=lambda r: r["K"])
        a.plot([r["K"] for r in sel], [r["s"] for r in sel], marker="o", label=label)
    a.set_xscale("log", base=2)
    a.set_yscale("log")
    a.set_xlabel("K (RIMs of 64 units; LSTM width 64K)")
    a.set_ylabel("forward + backward, s (T=128)")
    a.legend(fontsize=8)
    k6 = [r for r in rows if r["K"] == 6]
    for kind, label in (("lstm", "nn.LSTM(512, 384)"), ("rims", "RIMs K=6, k=4")):
        sel = sorted((r for r in k6 if r["kind"] == kind), key=lambda r: r["T"])
        b.plot([r["T"] for r in sel], [r["s"] for r in sel], marker="o", label=label)
    b.set_xscale("log", base=2)
    b.set_yscale("log")
    b.set_xlabel("T (steps)")
    b.set_ylabel("forward + backward, s")
    b.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)


if __name__ == "__main__":
    main()
