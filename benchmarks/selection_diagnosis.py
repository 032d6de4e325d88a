"""What the RIM top-k does over training: selection statistics from runs' TensorBoard CSVs.

For each run directory (a RIM run trained by ``train.py`` or ``benchmarks/learning.py``) it reads
``tb/progress*.csv`` and reports, at a few points of training and at the end: the training return,
how often each RIM was active (``rims/active_frac``), how often the active set changed within an
episode (``switch_rate``), the null-attention gap between the (k+1)-th and k-th RIM
(``selection_margin``), the mean null attention, and the gradient norm reaching each RIM's input
query per minibatch (``query_grad_norm``). Writes ``table.md`` and ``selection.png`` (those
statistics against env steps, one line per run) to ``--out``.

Example (the runs of the learning benchmark's repeat-4 task)::

    python benchmarks/selection_diagnosis.py runs/learning/repeat-4/rims*/s0 --out benchmarks/results/selection
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path

import numpy as np

STEP = "time/total_timesteps"


def read_rows(run: Path) -> list[dict[str, float]]:
    rows: list[dict[str, float]] = []
    for path in sorted((run / "tb").glob("progress*.csv")):
        with path.open() as f:
            for row in csv.DictReader(f):
                rows.append({k: float(v) for k, v in row.items() if v not in ("", None)})
    return sorted((r for r in rows if STEP in r), key=lambda r: r[STEP])


def label(run: Path) -> str:
    return f"{run.parent.name}/{run.name}"


def series(rows: list[dict[str, float]], key: str) -> tuple[np.ndarray, np.ndarray]:
    pts = [(r[STEP], r[key]) for r in rows if key in r]
    return (np.array([p[0] for p in pts]), np.array([p[1] for p in pts])) if pts else (np.array([]), np.array([]))


def summary_row(run: Path, rows: list[dict[str, float]], curve: str, tail: int = 10) -> str:
    """Means over the last ``tail`` logged rollouts."""

    def last(key: str) -> float:
        values = [r[key] for r in rows if key in r][-tail:]
        return float(np.mean(values)) if values else float("nan")

    k = len([key for key in rows[-1] if key.startswith("rims/active_frac/")]) if rows else 0
    fracs = " ".join(f"{last(f'rims/active_frac/rim_{i}'):.2f}" for i in range(k))
    grads = " ".join(f"{last(f'rims/query_grad_norm/rim_{i}'):.3f}" for i in range(k))
    return (
        f"| {label(run)} | {last(curve):.3f} | {fracs} | {last('rims/switch_rate'):.3f} | "
        f"{last('rims/selection_margin'):.3f} | {last('rims/null_attention'):.3f} | {grads} |"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", help="RIM run directories")
    parser.add_argument("--curve", default="rollout/ep_rew_mean", help="the training-progress column to show")
    parser.add_argument("--out", default="benchmarks/results/selection")
    args = parser.parse_args()
    runs = [Path(r) for r in args.runs]
    data = {run: read_rows(run) for run in runs}
    lines = [
        "Means over the last 10 logged rollouts of each run.",
        "",
        "| run | training return | active fraction per RIM | switch rate | selection margin | null attention "
        "| query grad norm per RIM |",
        "|---|---|---|---|---|---|---|",
    ]
    lines += [summary_row(run, rows, args.curve) for run, rows in data.items() if rows]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "table.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    panels = [
        (args.curve, "training return"),
        ("rims/switch_rate", "switch rate"),
        ("rims/selection_margin", "selection margin"),
        ("rims/null_attention", "null attention"),
    ]
    fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 3.2))
    for ax, (key, title) in zip(axes, panels, strict=True):
        for run, rows in data.items():
            x, y = series(rows, key)
            if len(x):
                ax.plot(x, y, label=label(run), lw=1)
        ax.set_title(title)
        ax.set_xlabel("env steps (thousands)")
        ax.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v / 1000:.0f}"))
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "selection.png", dpi=90)


if __name__ == "__main__":
    main()
