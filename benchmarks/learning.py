"""Does PPO learn with each core, on every seed? Tasks x cores x seeds, resumable.

Every run goes through ``train.py`` with its family's config unchanged but the budget (and the
task's env settings), one torch thread per run, ``--parallel`` runs at a time. A finished run
(``final_model.zip``) is never run again; an interrupted one is resumed from its newest checkpoint;
nothing is deleted. Each finished run is then evaluated once (``--episodes`` episodes on env seeds
``EVAL_SEED_BASE + 1000 * seed``, disjoint from every training env's seeds) and its result
written to ``<runs>/<task>/<core>/s<seed>/learning_result.json``.

Outputs in ``--out`` (default ``benchmarks/results/learning/``): ``results.json`` (every run's
result and wall time, per task x core the per-seed values, the fraction of seeds past the bar, the
IQM with a 95% bootstrap interval over seeds), ``table.md``, and ``curves_<task>.png`` (training
curves from each run's ``progress.csv``: mean over seeds and a 95% bootstrap interval of it).

Tasks (bars from the project's learning issue; env steps per run):

==============  =========================================  ======  ==================================
task            env                                        steps   bar
==============  =========================================  ======  ==================================
pickup-1        RIMAgents/Pickup-6x6-v0, 1 distractor      300k    success >= 0.9 on 10/10 seeds
pickup-2        RIMAgents/Pickup-6x6-v0, 2 distractors     500k    success >= 0.9 on 8/10 (lstm, rims)
pickup-cue      RIMAgents/PickupCue-6x6-v0                 500k    none <= chance + 0.1 on every seed;
                                                                   lstm, rims >= 0.9 on 8/10
cartpole-novel  RIMAgents/CartPoleNoVel-v1                 100k    return > 450 on 9/10 (lstm, rims)
repeat-K        RIMAgents/Repeat-v0, delay K = 1, 4, 8 or  150k    return >= 0.95 on 8/10 (lstm, gru,
                32, episodes of max(24, 2K) steps                  rims); none <= chance + 0.1
breakout        BreakoutNoFrameskip-v4                     1M      last 100 games >= 0.8x none's
==============  =========================================  ======  ==================================

``--cores`` takes cores (``none``, ``lstm``, ``gru``, ``rims``) and RIM variants (``rims-all-active``,
``rims-st`` for the straight-through selection, ``rims-balance``, ``rims-st-balance``, ``rims-anneal``
for k annealed from K over the first half of training).

Example (the pickup rows, 10 seeds, about 2.5 h on two cores)::

    python benchmarks/learning.py --tasks pickup-1 --cores none,lstm,rims --seeds 0-9
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import csv
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from rim_agents.runs import FINAL_MODEL, latest_checkpoint  # noqa: E402 (after the path line)

RESULTS = ROOT / "benchmarks" / "results" / "learning"
RUNS = ROOT / "runs" / "learning"
EVAL_SEED_BASE = 1_000_000
RESULT_FILE = "learning_result.json"


@dataclass(frozen=True)
class Task:
    env: str
    steps: int
    metric: str  # "success" (evaluation success rate) or "return" (evaluation mean return)
    bar: float  # a seed passes with metric >= bar
    need: dict[str, float]  # core -> fraction of seeds that must pass
    overrides: tuple[str, ...] = ()
    chance: float | None = None  # success of a memoryless guess (cue task)
    curve: str = "rollout/success_rate"
    train_metric: bool = False  # judge on the last 100 training episodes, not an evaluation
    extra: dict[str, Any] = field(default_factory=dict)


TASKS: dict[str, Task] = {
    "pickup-1": Task(
        "RIMAgents/Pickup-6x6-v0",
        300_000,
        "success",
        0.9,
        {"none": 1.0, "lstm": 1.0, "rims": 1.0},
        ("env_options.env_kwargs.num_distractors=1",),
    ),
    "pickup-2": Task("RIMAgents/Pickup-6x6-v0", 500_000, "success", 0.9, {"lstm": 0.8, "rims": 0.8}),
    "pickup-cue": Task("RIMAgents/PickupCue-6x6-v0", 500_000, "success", 0.9, {"lstm": 0.8, "rims": 0.8}, chance=0.5),
    "cartpole-novel": Task(
        "RIMAgents/CartPoleNoVel-v1", 100_000, "return", 450.0, {"lstm": 0.9, "rims": 0.9}, curve="rollout/ep_rew_mean"
    ),
    **{
        f"repeat-{delay}": Task(
            "RIMAgents/Repeat-v0",
            150_000,
            "return",
            0.95,
            {"lstm": 0.8, "gru": 0.8, "rims": 0.8},
            (f"env_options.env_kwargs.delay={delay}", f"env_options.env_kwargs.length={max(24, 2 * delay)}"),
            chance=0.25,
            curve="rollout/ep_rew_mean",
        )
        for delay in (1, 4, 8, 32)
    },
    "breakout": Task(
        "BreakoutNoFrameskip-v4", 1_000_000, "return", 0.0, {}, curve="rollout/ep_rew_mean", train_metric=True
    ),
}


#: Variants beyond the plain cores (none, lstm, gru, rims): a core and its config overrides. The
#: all-active row assumes the family config's num_units = 4 (classic and minigrid).
VARIANTS: dict[str, tuple[str, tuple[str, ...]]] = {
    "rims-all-active": ("rims", ("rims.k_active=4",)),
    "rims-st": ("rims", ("rims.selection=straight_through",)),
    "rims-balance": ("rims", ("rims.balance_coef=0.01",)),
    "rims-st-balance": ("rims", ("rims.selection=straight_through", "rims.balance_coef=0.01")),
    "rims-anneal": ("rims", ("rims.k_anneal=0.5",)),
}


def variant(name: str) -> tuple[str, tuple[str, ...]]:
    """A variant's core and overrides; a plain core name is itself with none."""
    return VARIANTS.get(name, (name, ()))


def parse_seeds(text: str) -> list[int]:
    """``"0-9"`` or ``"0,1,5"`` (or both, comma-separated)."""
    seeds: list[int] = []
    for part in text.split(","):
        lo, _, hi = part.partition("-")
        seeds += list(range(int(lo), int(hi) + 1)) if hi else [int(lo)]
    return seeds


def run_dir(runs: Path, task: str, core: str, seed: int) -> Path:
    return runs / task / core / f"s{seed}"


# ------------------------------------------------------------------------------------- one run
def train_and_evaluate(task_name: str, core: str, seed: int, runs: Path, episodes: int, extra: list[str]) -> dict:
    """Train (or resume) one run, evaluate it once, return its result (also written beside it)."""
    task = TASKS[task_name]
    run = run_dir(runs, task_name, core, seed)
    result_path = run / RESULT_FILE
    if result_path.is_file():
        return json.loads(result_path.read_text())
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    train = [sys.executable, str(ROOT / "train.py"), "--no-progress", "--total-timesteps", str(task.steps)]
    started = time.time()
    if not (run / FINAL_MODEL).is_file():
        if run.is_dir() and latest_checkpoint(run) is not None:
            cmd = [*train, "--resume", str(run)]
        else:
            if run.exists() and any(run.iterdir()):  # a start that died before its first checkpoint
                run.rename(run.with_name(f"{run.name}.failed-{int(time.time())}"))
            base, overrides = variant(core)
            cmd = [*train, "--env", task.env, "--core", base, "--seed", str(seed), "--run-dir", str(run)]
            cmd += [*task.overrides, *overrides, *extra]
        run.parent.mkdir(parents=True, exist_ok=True)
        with open(run.parent / f"s{seed}.log", "ab") as log:
            proc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
        if proc.returncode != 0:
            raise RuntimeError(f"{task_name}/{core}/s{seed}: train.py exited {proc.returncode}, see {run.parent}")
    train_s = time.time() - started
    started = time.time()
    cmd = [sys.executable, __file__, "--evaluate-run", str(run), "--episodes", str(episodes), "--task", task_name]
    cmd += ["--steps", str(task.steps)]
    subprocess.run(cmd, check=True, env=env, cwd=ROOT)
    result = json.loads(result_path.read_text())
    result["wall_train_s"] = round(train_s, 1) if result.get("wall_train_s") is None else result["wall_train_s"]
    result["wall_eval_s"] = round(time.time() - started, 1)
    result_path.write_text(json.dumps(result, indent=1) + "\n")
    return result


def last_training_value(run: Path, column: str) -> float | None:
    """The last logged value of ``column`` in the run's progress CSVs (resumed parts included)."""
    rows = read_progress(run)
    values = [float(r[column]) for r in rows if r.get(column)]
    return values[-1] if values else None


def read_progress(run: Path) -> list[dict[str, str]]:
    rows: list[dict[str, str]] = []
    for path in sorted((run / "tb").glob("progress*.csv")):
        with path.open() as f:
            rows += list(csv.DictReader(f))
    rows.sort(key=lambda r: int(float(r.get("time/total_timesteps") or 0)))
    return rows


def evaluate_run(run: Path, task_name: str, episodes: int) -> None:
    """Evaluate one run's final model and write its result (runs in its own one-thread process)."""
    import torch as th

    from rim_agents.evaluation import resolve_checkpoint
    from rim_agents.models import make_env
    from rim_agents.rollout import run_episodes
    from rim_agents.runs import load_run_config
    from rim_agents.shifts import shift_spec

    th.set_num_threads(1)
    task = TASKS[task_name]
    config = load_run_config(run)
    result: dict[str, Any] = {"task": task_name, "core": run.parent.name, "seed": config.seed, "env": config.env}
    result["timesteps"] = config.total_timesteps
    result["train_last"] = last_training_value(run, task.curve)
    eval_seed = EVAL_SEED_BASE + 1000 * config.seed
    if not task.train_metric:
        ckpt = resolve_checkpoint(run / FINAL_MODEL, device="cpu")
        th.manual_seed(eval_seed)
        env = make_env(config, 8, eval_seed, shift_spec(config, "none"))
        eps = run_episodes(ckpt.model, env, episodes)
        env.close()
        result["episodes"] = len(eps.returns)
        result["mean_return"] = float(np.mean(eps.returns))
        if eps.successes:
            result["success"] = float(np.mean(eps.successes))
    result["value"] = (
        result["train_last"]
        if task.train_metric
        else result[task.metric if task.metric == "success" else "mean_return"]
    )
    result["eval_seed"] = None if task.train_metric else eval_seed
    (run / RESULT_FILE).write_text(json.dumps(result, indent=1) + "\n")


def random_baseline(task_name: str, episodes: int = 100, seed: int = 2_000_000) -> float:
    """Mean return of uniformly random actions over ``episodes`` episodes (Atari: whole games)."""
    from rim_agents.config import load_config
    from rim_agents.models import make_env

    task = TASKS[task_name]
    config = load_config(task.env, "none", overrides=list(task.overrides))
    env = make_env(config, seed=seed)
    env.reset()
    rng = np.random.default_rng(seed)
    returns: list[float] = []
    while len(returns) < episodes:
        n = getattr(env.action_space, "n", None)
        if n is not None:
            actions = rng.integers(0, n, env.num_envs)
        else:
            actions = np.array([env.action_space.sample() for _ in range(env.num_envs)])
        _, _, _, infos = env.step(actions)
        returns += [float(i["episode"]["r"]) for i in infos if "episode" in i]
    env.close()
    return float(np.mean(returns[:episodes]))


# ------------------------------------------------------------------------------------- summary
def summarise(results: list[dict], runs: Path, out: Path) -> dict:
    from rim_agents.stats import bootstrap_ci, iqm

    summary: dict[str, Any] = {"runs": results, "groups": []}
    lines = ["| task | core | seeds | IQM [95% CI] | passing | bar | per-seed (seed: value) | mean wall min |"]
    lines.append("|---|---|---|---|---|---|---|---|")
    keys = sorted({(r["task"], r["core"]) for r in results}, key=lambda k: (list(TASKS).index(k[0]), k[1]))
    none_values: dict[tuple[str, int], float] = {
        (r["task"], r["seed"]): r["value"] for r in results if r["core"] == "none"
    }
    for task_name, core in keys:
        task = TASKS[task_name]
        rows = sorted((r for r in results if r["task"] == task_name and r["core"] == core), key=lambda r: r["seed"])
        values = np.array([r["value"] for r in rows], dtype=float)
        if task_name == "breakout" and core != "none":
            passed = [
                (task_name, r["seed"]) in none_values and r["value"] >= 0.8 * none_values[(task_name, r["seed"])]
                for r in rows
            ]
            bar_text = ">= 0.8x none"
        elif core == "none" and task.chance is not None:
            passed = [bool(v <= task.chance + 0.1) for v in values]
            bar_text = f"<= {task.chance + 0.1:.2f}"
        else:
            passed = [bool(v >= task.bar) for v in values]
            bar_text = f">= {task.bar:g}"
        low, high = bootstrap_ci(values, iqm)
        need = task.need.get(core, task.need.get(variant(core)[0]))
        if core == "none" and task.chance is not None:
            need = 1.0
        group = {
            "task": task_name,
            "core": core,
            "seeds": [r["seed"] for r in rows],
            "values": values.tolist(),
            "iqm": iqm(values),
            "ci95": [low, high],
            "passing": int(sum(passed)),
            "bar": bar_text,
            "needed_fraction": need,
            "bar_met": None if need is None else bool(np.mean(passed) >= need),
            "wall_train_s": [r.get("wall_train_s") for r in rows],
        }
        summary["groups"].append(group)
        per_seed = " ".join(f"{r['seed']}: {v:.2f}" for r, v in zip(rows, values, strict=True))
        walls = [w for w in group["wall_train_s"] if w]
        wall = f"{np.mean(walls) / 60:.1f}" if walls else "-"
        verdict = "" if need is None else (" (met)" if group["bar_met"] else f" (missed; needs {need:.0%})")
        lines.append(
            f"| {task_name} | {core} | {len(rows)} | {group['iqm']:.2f} [{low:.2f}, {high:.2f}] | "
            f"{group['passing']}/{len(rows)}{verdict} | {bar_text} | {per_seed} | {wall} |"
        )
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(summary, indent=1) + "\n")
    (out / "table.md").write_text("\n".join(lines) + "\n")
    for task_name in dict.fromkeys(k[0] for k in keys):
        plot_curves(task_name, [k[1] for k in keys if k[0] == task_name], results, runs, out)
    return summary


def plot_curves(task_name: str, cores: list[str], results: list[dict], runs: Path, out: Path) -> None:
    """Mean training curve over seeds per core, with a 95% bootstrap interval of the mean."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    task = TASKS[task_name]
    grid = np.linspace(0, task.steps, 61)[1:]
    fig, ax = plt.subplots(figsize=(6, 3.6))
    rng = np.random.default_rng(0)
    for core in cores:
        curves = []
        for r in results:
            if r["task"] != task_name or r["core"] != core:
                continue
            rows = [row for row in read_progress(run_dir(runs, task_name, core, r["seed"])) if row.get(task.curve)]
            if len(rows) < 2:
                continue
            x = np.array([float(row["time/total_timesteps"]) for row in rows])
            y = np.array([float(row[task.curve]) for row in rows])
            curves.append(np.interp(grid, x, y))
        if not curves:
            continue
        c = np.array(curves)
        boot = c[rng.integers(0, len(c), (1000, len(c)))].mean(axis=1)
        ax.plot(grid, c.mean(axis=0), label=f"{core} ({len(c)} seeds)")
        ax.fill_between(grid, np.quantile(boot, 0.025, axis=0), np.quantile(boot, 0.975, axis=0), alpha=0.25)
    ax.set_xlabel("env steps (thousands)")
    ax.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v / 1000:.0f}"))
    ax.set_ylabel(task.curve.split("/")[-1].replace("_", " ") + " (training)")
    ax.set_title(f"{task_name}: {task.env}")
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(out / f"curves_{task_name}.png", dpi=100)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", default="pickup-1", help=f"comma-separated, from {', '.join(TASKS)}")
    parser.add_argument(
        "--cores",
        default="none,lstm,rims",
        help=f"comma-separated cores (none, lstm, gru, rims) or {', '.join(VARIANTS)}",
    )
    parser.add_argument("--seeds", default="0-9", help="e.g. 0-9 or 0,3,5 (tuning seeds: 100 and up)")
    parser.add_argument("--episodes", type=int, default=100, help="evaluation episodes per run")
    parser.add_argument("--parallel", type=int, default=2, help="runs at a time, one torch thread each")
    parser.add_argument("--runs", default=str(RUNS), help="where the run directories go")
    parser.add_argument("--out", default=str(RESULTS), help="where the summary goes")
    parser.add_argument("--steps", type=int, help="override every task's budget (smoke tests; use another --runs)")
    parser.add_argument("--summary-only", action="store_true", help="summarise finished runs, start nothing")
    parser.add_argument("extra", nargs="*", help="KEY=VALUE config overrides for every run (use another --runs)")
    parser.add_argument("--random-baseline", action="store_true", help="print each task's random-policy return")
    parser.add_argument("--evaluate-run", help=argparse.SUPPRESS)
    parser.add_argument("--task", help=argparse.SUPPRESS)
    args = parser.parse_args()
    tasks, cores = ([args.task] if args.evaluate_run else args.tasks.split(",")), args.cores.split(",")
    for t in tasks:
        if t not in TASKS:
            parser.error(f"unknown task {t!r}: choose from {', '.join(TASKS)}")
    if args.steps:
        for t in tasks:
            TASKS[t] = replace(TASKS[t], steps=args.steps)
    if args.evaluate_run:
        evaluate_run(Path(args.evaluate_run), args.task, args.episodes)
        return
    if args.random_baseline:
        for t in tasks:
            print(
                f"{t}: random policy mean return {random_baseline(t, args.episodes):.2f} over {args.episodes} episodes"
            )
        return
    runs, out = Path(args.runs), Path(args.out)
    # Seed-major, so that a study stopped early has every core on the same seeds.
    jobs = [(t, c, s) for t in tasks for s in parse_seeds(args.seeds) for c in cores]
    results: list[dict] = []
    failures: list[str] = []
    if args.summary_only:
        for t, c, s in jobs:
            path = run_dir(runs, t, c, s) / RESULT_FILE
            if path.is_file():
                results.append(json.loads(path.read_text()))
    else:
        with cf.ThreadPoolExecutor(max_workers=args.parallel) as pool:
            futures = {
                pool.submit(train_and_evaluate, t, c, s, runs, args.episodes, args.extra): (t, c, s) for t, c, s in jobs
            }
            for fut in cf.as_completed(futures):
                t, c, s = futures[fut]
                try:
                    r = fut.result()
                except Exception as e:  # report, keep the others going
                    failures.append(f"{t}/{c}/s{s}: {e}")
                    print(f"FAILED {t}/{c}/s{s}: {e}", flush=True)
                    continue
                results.append(r)
                print(f"{t}/{c}/s{s}: value {r['value']:.3f} (train {r.get('wall_train_s')} s)", flush=True)
                summarise(results, runs, out)
    if results:
        summarise(results, runs, out)
        print((out / "table.md").read_text())
    if failures:
        sys.exit(f"{len(failures)} runs failed: " + "; ".join(failures))


if __name__ == "__main__":
    main()
