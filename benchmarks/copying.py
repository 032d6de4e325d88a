"""The copying task of the RIM paper: RIMs against LSTMs, trained with a dormant phase of 50 and
tested with 50 and 200.

A sequence of 10 symbols from an alphabet of 8, then a dormant phase of blanks, then a delimiter,
then 10 more blanks during which the model must output the 10 symbols. Inputs are one-hot over
10 tokens (8 symbols, blank, delimiter); the loss and the reported figure are the cross-entropy
(nats per symbol) over the 10 output steps. Models, as in the paper's table: RIMs (6 units of 100,
k = 4, LSTM cells; 600 total), LSTM-600 and LSTM-300, each followed by a linear read-out;
``rims-no-query-bias`` is the RIM model with bias-free queries (``input_query_bias=False``).

Paper (test-200 cross-entropy): RIMs 0.00, LSTM-600 3.56, LSTM-300 4.32.

    python benchmarks/copying.py            # the full table (about an hour on a 2-core CPU)
    python benchmarks/copying.py --quick    # a few minutes: fewer steps, smaller batches

Writes ``benchmarks/results/copying.json`` and ``benchmarks/results/copying.md``. Results of models
not run this time are kept from the existing JSON when it was written with the same settings, so
``--models rims`` reruns one row of the table.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch as th
import torch.nn.functional as F
from torch import nn

from rim_agents import RIMCore

N_SYMBOLS, SEQ, BLANK, DELIM, VOCAB = 8, 10, 8, 9, 10
RESULTS = Path(__file__).resolve().parent / "results"
MODELS = ("rims", "rims-no-query-bias", "lstm-600", "lstm-300")


def batch(batch_size: int, dormant: int, generator: th.Generator) -> tuple[th.Tensor, th.Tensor]:
    """Inputs ``(T, B, VOCAB)`` one-hot and targets ``(SEQ, B)``; ``T = 2 * SEQ + dormant + 1``."""
    symbols = th.randint(0, N_SYMBOLS, (SEQ, batch_size), generator=generator)
    tokens = th.full((2 * SEQ + dormant + 1, batch_size), BLANK)
    tokens[:SEQ] = symbols
    tokens[SEQ + dormant] = DELIM
    return F.one_hot(tokens, VOCAB).float(), symbols


class Model(nn.Module):
    def __init__(self, kind: str) -> None:
        super().__init__()
        if kind in ("rims", "rims-no-query-bias"):
            self.core: nn.Module = RIMCore(
                VOCAB,
                num_units=6,
                k_active=4,
                unit_size=100,
                cell="lstm",
                input_dropout=0.0,
                comm_dropout=0.0,
                input_query_bias=kind == "rims",
            )
            width = 600
        else:
            width = int(kind.split("-")[1])
            self.core = nn.LSTM(VOCAB, width)
        self.readout = nn.Linear(width, N_SYMBOLS)

    def forward(self, x: th.Tensor) -> th.Tensor:
        out, _ = self.core(x)
        return self.readout(out[-SEQ:])  # (SEQ, B, N_SYMBOLS)


def cross_entropy(model: Model, dormant: int, n: int, seed: int) -> float:
    g = th.Generator().manual_seed(seed)
    x, y = batch(n, dormant, g)
    model.eval()
    with th.no_grad():
        logits = model(x)
    model.train()
    return float(F.cross_entropy(logits.reshape(-1, N_SYMBOLS), y.reshape(-1)))


def train(kind: str, steps: int, batch_size: int, lr: float, seed: int, log_every: int) -> dict[str, object]:
    th.manual_seed(seed)
    model = Model(kind)
    opt = th.optim.Adam(model.parameters(), lr=lr)
    g = th.Generator().manual_seed(seed + 1)
    start = time.time()
    curve = []
    for step in range(1, steps + 1):
        x, y = batch(batch_size, 50, g)
        loss = F.cross_entropy(model(x).reshape(-1, N_SYMBOLS), y.reshape(-1))
        opt.zero_grad()
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if step % log_every == 0 or step == steps:
            curve.append((step, loss.item()))
            print(f"  {kind:<9} step {step:>6}  train CE {loss.item():.3f}  ({time.time() - start:.0f} s)", flush=True)
    return {
        "model": kind,
        "steps": steps,
        "train_seconds": round(time.time() - start, 1),
        "ce_test_50": cross_entropy(model, 50, 1000, seed + 2),
        "ce_test_200": cross_entropy(model, 200, 1000, seed + 3),
        "curve": curve,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a few minutes instead of about an hour")
    parser.add_argument("--steps", type=int, help="training steps per model (default 3000, quick 300)")
    parser.add_argument("--batch-size", type=int, default=None, help="default 64, quick 32")
    parser.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate (the paper's, for copying)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--models", default="rims,lstm-600,lstm-300", help="also: rims-no-query-bias")
    parser.add_argument("--out", default=str(RESULTS), help="folder for copying.json and copying.md")
    args = parser.parse_args()
    steps = args.steps or (300 if args.quick else 3000)
    batch_size = args.batch_size or (32 if args.quick else 64)
    kinds = args.models.split(",")
    for kind in kinds:
        if kind not in MODELS:
            parser.error(f"unknown model {kind!r}: choose from {', '.join(MODELS)}")
    out = Path(args.out)
    settings = {"steps": steps, "batch_size": batch_size, "lr": args.lr, "seed": args.seed, "quick": args.quick}
    suffix = "_quick" if args.quick else ""
    stored = result_path(out, suffix, "json")
    kept: dict[str, dict[str, object]] = {}
    if stored.is_file():
        previous = json.loads(stored.read_text())
        if previous.get("settings") == settings:
            kept = {str(r["model"]): r for r in previous["results"] if r["model"] not in kinds}
    new = {}
    for kind in kinds:
        print(f"training {kind}: {steps} steps, batch {batch_size}, Adam {args.lr}", flush=True)
        new[kind] = train(kind, steps, batch_size, args.lr, args.seed, max(1, steps // 10))
    rows = [new.get(kind) or kept[kind] for kind in MODELS if kind in new or kind in kept]
    write_results(out, suffix, settings, rows)


def write_results(out: Path, suffix: str, settings: dict[str, object], rows: list[dict[str, object]]) -> None:
    """``copying{suffix}.json`` (settings and rows) and ``copying{suffix}.md`` (the table)."""
    paper = {"rims": 0.00, "lstm-600": 3.56, "lstm-300": 4.32}
    lines = [
        f"Copying task, train dormant 50, {settings['steps']} steps x batch {settings['batch_size']}, "
        f"Adam {settings['lr']}, seed {settings['seed']}; "
        "cross-entropy in nats per output symbol (chance: ln 8 = 2.08).",
        "",
        "| model | test CE, dormant 50 | test CE, dormant 200 | paper, dormant 200 | train time (s) |",
        "|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['ce_test_50']:.3f} | {r['ce_test_200']:.3f} | {paper.get(str(r['model']), '-')} "
            f"| {r['train_seconds']} |"
        )
    table = "\n".join(lines)
    print(table)
    out.mkdir(parents=True, exist_ok=True)
    result_path(out, suffix, "json").write_text(json.dumps({"settings": settings, "results": rows}, indent=2) + "\n")
    result_path(out, suffix, "md").write_text(table + "\n")


def result_path(out: Path, suffix: str, ext: str) -> Path:
    """``copying.json``, ``copying_quick.md``, ..."""
    return out / f"copying{suffix}.{ext}"


if __name__ == "__main__":
    main()
