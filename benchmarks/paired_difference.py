"""Paired per-seed differences between cores (or a study's variants) under each shift.

Seeds are paired across cores (extractor, heads and env seeds are identical for a seed), so the
difference ``core - baseline`` on the same seed removes what the seed itself decides. For every
core, shift and metric column this prints the mean over seeds of that difference and its 95%
percentile bootstrap interval over seeds (``rim_agents.stats.bootstrap_ci``).

It reads an evaluation's ``results.csv`` (rows named by core) or a study's ``results/runs.csv``
(rows named by variant, so that two variants of one core, e.g. ``rims`` and ``rims-all-active``,
stay apart); a ``results.csv`` holding two runs of one core on one seed is refused. Several files
are read as one (e.g. an earlier study's cores and a later study's new variant on the same seeds).

    python benchmarks/paired_difference.py benchmarks/results/robustness_pickup1/results.csv --baseline none
    python benchmarks/paired_difference.py runs/robustness-cue/results/runs.csv --baseline rims-all-active
    python benchmarks/paired_difference.py benchmarks/results/robustness_pickup1/runs.csv \
        benchmarks/results/robustness_pickup1/detached/runs.csv --baseline lstm

Rows pair only within one env name, and a ``results.csv`` names the env by its id where a
``runs.csv`` names it as the study spec does: combine files of one kind.
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
    """``(name, shift) -> (mean difference, low, high, seeds)`` over the seeds both have; a row's
    name is its ``variant`` where the rows have one, else its ``core``; rows of different envs are
    not paired (the shift is then ``env/shift``)."""
    value: dict[tuple[str, str, str], float] = {}
    several_envs = len({r.get("env") for r in rows}) > 1
    for r in rows:
        if r.get("kind", "checkpoint") != "checkpoint":
            continue
        name = r.get("variant") or r["core"]
        shift = f"{r['env']}/{r['shift']}" if several_envs else r["shift"]
        key = (name, shift, r["seed"])
        if key in value:
            raise ValueError(
                f"two runs of {name!r} on seed {r['seed']} under {shift!r} (variants of one core?): "
                "pass a study's results/runs.csv, which names each variant"
            )
        value[key] = float(r[column])
    out: dict[tuple[str, str], tuple[float, float, float, int]] = {}
    for name, shift in sorted({(c, s) for c, s, _ in value if c != baseline}):
        seeds = sorted({seed for c, s, seed in value if c == name and s == shift and (baseline, s, seed) in value})
        diff = np.array([value[(name, shift, seed)] - value[(baseline, shift, seed)] for seed in seeds])
        if len(diff):
            low, high = bootstrap_ci(diff)
            out[(name, shift)] = (float(diff.mean()), low, high, len(diff))
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results_csv", type=Path, nargs="+", help="one or more results.csv or runs.csv, read as one")
    parser.add_argument("--baseline", default="none", help="the core (or variant) every other is compared with")
    parser.add_argument("--column", default="success_rate", help="success_rate or mean_return")
    args = parser.parse_args(argv)
    files = ", ".join(map(str, args.results_csv))
    rows: list[dict[str, str]] = []
    try:
        for path in args.results_csv:
            with path.open(newline="") as f:
                rows += list(csv.DictReader(f))
        diffs = paired_differences(rows, args.baseline, args.column)
    except (OSError, KeyError, ValueError) as e:
        print(f"error: cannot read {files} as results.csv or runs.csv files: {e}", file=sys.stderr)
        return 2
    if not diffs:
        print(f"error: no core shares seeds with --baseline {args.baseline} in {files}", file=sys.stderr)
        return 2
    kind = "variant" if any(r.get("variant") for r in rows) else "core"
    print(f"| {kind} - {args.baseline} | shift | mean over seeds | 95% CI | seeds |")
    print("|---|---|---|---|---|")
    for (core, shift), (mean, low, high, n) in diffs.items():
        print(f"| {core} | {shift} | {mean:+.3f} | [{low:+.3f}, {high:+.3f}] | {n} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
