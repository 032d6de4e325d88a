"""Paired per-seed differences between cores under each shift, from an evaluation's results.csv.

Seeds are paired across cores (extractor, heads and env seeds are identical for a seed), so the
difference ``core - baseline`` on the same seed removes what the seed itself decides. For every
core, shift and metric column this prints the mean over seeds of that difference and its 95%
percentile bootstrap interval over seeds (``rim_agents.stats.bootstrap_ci``).

    python benchmarks/paired_difference.py benchmarks/results/robustness_pickup1/results.csv --baseline none
"""

from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path

import numpy as np

from rim_agents.stats import bootstrap_ci


def paired_differences(
    rows: list[dict[str, str]], baseline: str, column: str = "success_rate"
) -> dict[tuple[str, str], tuple[float, float, float, int]]:
    """``(core, shift) -> (mean difference, low, high, seeds)`` over the seeds both cores have."""
    value = {
        (r["core"], r["shift"], r["seed"]): float(r[column])
        for r in rows
        if r.get("kind", "checkpoint") == "checkpoint"
    }
    out: dict[tuple[str, str], tuple[float, float, float, int]] = {}
    for core, shift in sorted({(c, s) for c, s, _ in value if c != baseline}):
        seeds = sorted({seed for c, s, seed in value if c == core and s == shift and (baseline, s, seed) in value})
        diff = np.array([value[(core, shift, seed)] - value[(baseline, shift, seed)] for seed in seeds])
        if len(diff):
            low, high = bootstrap_ci(diff)
            out[(core, shift)] = (float(diff.mean()), low, high, len(diff))
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results_csv", type=Path)
    parser.add_argument("--baseline", default="none", help="the core every other core is compared with")
    parser.add_argument("--column", default="success_rate", help="success_rate or mean_return")
    args = parser.parse_args(argv)
    try:
        with args.results_csv.open(newline="") as f:
            rows = list(csv.DictReader(f))
        diffs = paired_differences(rows, args.baseline, args.column)
    except (OSError, KeyError, ValueError) as e:
        print(f"error: cannot read {args.results_csv} as an evaluation's results.csv: {e}", file=sys.stderr)
        return 2
    if not diffs:
        print(f"error: no core shares seeds with --baseline {args.baseline} in {args.results_csv}", file=sys.stderr)
        return 2
    print(f"| core - {args.baseline} | shift | mean over seeds | 95% CI | seeds |")
    print("|---|---|---|---|---|")
    for (core, shift), (mean, low, high, n) in diffs.items():
        print(f"| {core} | {shift} | {mean:+.3f} | [{low:+.3f}, {high:+.3f}] | {n} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
