"""RIMs against an LSTM on MiniGrid object picking, then both under every MiniGrid shift.

Trains, by default on ``RIMAgents/Pickup-6x6-v0`` with one distractor (a 6x6 room, a target and one
training-palette distractor; ``more-distractors`` then means 2; ``--env`` and ``--num-distractors``
change it), with configs/minigrid.yaml's PPO settings and the same budget for every run:

- ``rims``, ``lstm`` and ``none`` (the feed-forward control): ``--seeds`` seeds each (default 5);
- ablations, ``--ablation-seeds`` each (default 3): ``rims`` with ``k = K`` (``rims-all-active``),
  ``rims`` without communication (``rims-no-comm``) and ``rims`` with bias-free queries
  (``rims-no-query-bias``, the core before ``input_query_bias``).

Runs go two at a time, one torch thread each. A run whose ``final_model.zip`` exists is not run
again and an interrupted one resumes from its newest checkpoint, so a study started again
continues where it stopped; no run folder is ever deleted. Then ``evaluate.py`` runs every
checkpoint under every MiniGrid shift and writes the aggregate table (IQM and 95% stratified
bootstrap intervals over seeds) and chart to ``benchmarks/results/pickup_study/``, with
``table.md`` (IQM success and intervals, per-run success) and ``rim_activity.csv`` (what each RIM
run's top-k did in its last logged rollout).

The README's main table (about an hour)::

    python benchmarks/pickup_study.py --steps 400000 --runs-dir benchmarks/results/pickup_runs_400k
        --variants rims,lstm,rims-all-active,rims-no-comm
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
ENV = "RIMAgents/Pickup-6x6-v0"
VARIANTS: dict[str, tuple[str, list[str]]] = {
    "rims": ("rims", []),
    "lstm": ("lstm", []),
    "none": ("none", []),  # the feed-forward control: what memory buys
    "rims-all-active": ("rims", ["rims.k_active=4"]),  # configs/minigrid.yaml: num_units 4
    "rims-no-comm": ("rims", ["rims.communication=false"]),
    "rims-no-query-bias": ("rims", ["rims.input_query_bias=false"]),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--env", default=ENV, help="a RIMAgents/Pickup-* id")
    parser.add_argument(
        "--num-distractors", type=int, default=1, help="distractors in training (-1: the env id's own count)"
    )
    parser.add_argument("--steps", type=int, default=250_000, help="env steps per run")
    parser.add_argument("--seeds", type=int, default=5, help="seeds of rims, lstm and none")
    parser.add_argument("--ablation-seeds", type=int, default=3, help="seeds of each ablation")
    parser.add_argument("--episodes", type=int, default=100, help="evaluation episodes per checkpoint and shift")
    parser.add_argument("--parallel", type=int, default=2, help="runs at a time")
    parser.add_argument("--runs-dir", default=str(RESULTS / "pickup_runs"))
    parser.add_argument("--out", default=str(RESULTS / "pickup_study"))
    parser.add_argument("--variants", default=",".join(VARIANTS), help=f"some of {', '.join(VARIANTS)}")
    parser.add_argument("--skip-eval", action="store_true", help="train and summarise, do not evaluate")
    args = parser.parse_args()
    variants = args.variants.split(",")
    for name in variants:
        if name not in VARIANTS:
            parser.error(f"unknown variant {name!r}: choose from {', '.join(VARIANTS)}")

    env_overrides = []
    if args.num_distractors >= 0:
        env_overrides.append(f"env_options.env_kwargs.num_distractors={args.num_distractors}")
    runs_dir = Path(args.runs_dir)
    jobs: list[tuple[Path, list[str]]] = []
    for name in variants:
        core, overrides = VARIANTS[name]
        n_seeds = args.seeds if name in ("rims", "lstm", "none") else args.ablation_seeds
        for seed in range(n_seeds):
            run = runs_dir / f"{name}_s{seed}"
            cmd = [
                sys.executable,
                str(ROOT / "train.py"),
                "--env",
                args.env,
                "--core",
                core,
                "--seed",
                str(seed),
                "--total-timesteps",
                str(args.steps),
                "--run-dir",
                str(run),
                "--no-progress",
                "checkpoint_freq=0",
                *env_overrides,
                *overrides,
            ]
            jobs.append((run, cmd))

    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    pending = [(run, cmd) for run, cmd in jobs if not (run / "final_model.zip").is_file()]
    running: list[tuple[Path, subprocess.Popen[bytes], float]] = []
    for run, _ in jobs:
        if (run / "final_model.zip").is_file():
            print(f"done already: {run.name}", flush=True)
    while pending or running:
        while pending and len(running) < args.parallel:
            run, cmd = pending.pop(0)
            if run.is_dir() and any((run / "checkpoints").glob("step_*.zip")):
                # An interrupted run: continue it from its newest checkpoint.
                cmd = [*cmd[:2], "--no-progress", "--resume", str(run), "--total-timesteps", str(args.steps)]
            elif run.exists():  # died before its first checkpoint: kept aside, never deleted
                run.rename(run.with_name(f"{run.name}.failed-{int(time.time())}"))
            run.parent.mkdir(parents=True, exist_ok=True)
            log = open(run.parent / f"{run.name}.log", "wb")  # noqa: SIM115 (closed with the process)
            running.append((run, subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env), time.time()))
            print(f"started: {run.name}", flush=True)
        time.sleep(2)
        for item in list(running):
            run, proc, start = item
            if proc.poll() is not None:
                running.remove(item)
                status = "ok" if proc.returncode == 0 else f"FAILED ({proc.returncode}), see {run.name}.log"
                print(f"finished: {run.name} in {time.time() - start:.0f} s: {status}", flush=True)

    runs = [run for run, _ in jobs if (run / "final_model.zip").is_file()]
    write_activity(Path(args.out), runs)
    if args.skip_eval:
        return
    cmd = [
        sys.executable,
        str(ROOT / "evaluate.py"),
        *map(str, runs),
        "--shifts",
        "all",
        "--episodes",
        str(args.episodes),
        "--out",
        args.out,
        "--no-progress",
        "--no-tensorboard",
        "--force",  # the study rewrites its own results folder
    ]
    print("evaluating: " + " ".join(cmd[1:3]) + " ...", flush=True)
    subprocess.run(cmd, check=True)
    write_markdown(Path(args.out))


def variant_of(run: str) -> str:
    """``rims-no-comm_s2`` -> ``rims-no-comm``."""
    return run.rsplit("_s", 1)[0]


def write_markdown(out: Path) -> None:
    """``table.md`` from the evaluation's ``results.json``: IQM success [95% interval] per variant and
    shift, and each run's in-distribution success."""
    results = json.loads((out / "results.json").read_text())
    per_run = {Path(c["run_dir"]).name: c for c in results["checkpoints"]}
    # (variant, group); a checkpoint path is <run dir>/final_model.zip
    columns = [(variant_of(Path(g["checkpoints"][0]).parent.name), g) for g in results["groups"]]
    shifts = list(dict.fromkeys(name for _, g in columns for name in g["shifts"]))
    lines = [
        "| shift | " + " | ".join(f"{v}, {len(g['seeds'])} seeds" for v, g in columns) + " |",
        "|---" * (len(columns) + 1) + "|",
    ]
    for shift in shifts:
        cells = []
        for _, g in columns:
            r = g["shifts"].get(shift)
            if r is None:
                cells.append("-")
            else:
                low, high = r["success_ci95"]
                cells.append(f"{r['iqm_success']:.2f} [{low:.2f}, {high:.2f}]")
        lines.append(f"| {shift} | " + " | ".join(cells) + " |")
    lines += ["", "In-distribution success per run:", ""]
    for variant, _ in columns:
        runs = sorted(name for name in per_run if variant_of(name) == variant)
        lines.append(f"- {variant}: " + " ".join(f"{per_run[r]['shifts']['none']['success_rate']:.2f}" for r in runs))
    (out / "table.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines), flush=True)


def write_activity(out: Path, runs: list[Path]) -> None:
    """What the RIMs of each run did in its last logged rollout (``rims/*`` in ``tb/progress.csv``):
    how often each RIM was active and how often the active set changed, to ``rim_activity.csv``."""
    rows = []
    for run in runs:
        log = run / "tb" / "progress.csv"
        if not log.is_file():
            continue
        with log.open() as f:
            logged = [r for r in csv.DictReader(f) if r.get("rims/switch_rate")]
        if not logged:
            continue  # not a RIM run
        last = logged[-1]
        fracs = [float(v) for k, v in sorted(last.items()) if k.startswith("rims/active_frac/") and v]
        rows.append(
            {
                "run": run.name,
                "timesteps": last["time/total_timesteps"],
                "active_frac": " ".join(f"{v:.2f}" for v in fracs),
                "rims_ever_active": sum(v > 0.01 for v in fracs),
                "switch_rate": f"{float(last['rims/switch_rate']):.3f}",
                "null_attention": f"{float(last['rims/null_attention']):.3f}",
            }
        )
    if not rows:
        return
    out.mkdir(parents=True, exist_ok=True)
    with (out / "rim_activity.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    for row in rows:
        print("  ".join(f"{k}={v}" for k, v in row.items()), flush=True)


if __name__ == "__main__":
    main()
