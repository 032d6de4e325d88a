"""How much does a trained RIM agent depend on which RIMs are active? Evaluate it with k changed.

For each RIM run directory, the trained actor is evaluated (the study's protocol: 100 episodes,
env seeds from 1,000,000, sampled actions) with the number of active RIMs per step set to every
value from 1 to K in turn, the selection rule otherwise the trained one. The critic plays no part
in acting. Two questions it answers:

- does an agent trained all-active (k = K) survive one RIM going dormant each step (k = K - 1)?
  If not, a dormant RIM's missing update is what breaks its memory;
- does an agent trained with k < K do better when every RIM is let through (k = K)? If so, the
  sparse choice is what holds it back at evaluation, not what it learnt.

Writes ``intervention.md`` and ``intervention.json`` to ``--out``. Example (the selection study)::

    python benchmarks/selection_intervention.py runs/selection/runs/repeat-4/*/s0 --out benchmarks/results/selection
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch as th

from rim_agents.evaluation import episodes_under, resolve_checkpoint
from rim_agents.policy import RIMPolicy
from rim_agents.shifts import shift_spec
from rim_agents.stats import bootstrap_ci

EVAL_SEED = 1_000_000  # the study runner's default evaluation seed (disjoint from training seeds)


def evaluate_with_k(run: Path, episodes: int, seed: int) -> dict[str, object]:
    ckpt = resolve_checkpoint(run, device="cpu")
    policy = ckpt.model.policy
    assert isinstance(policy, RIMPolicy)
    cores = policy.rim_cores()
    if not cores:
        raise SystemExit(f"{run} is not a RIM run (core {ckpt.config.core!r})")
    trained_k, K = cores[0].cell.k_active, cores[0].cell.num_units
    per_k: dict[int, list[float]] = {}
    for k in range(1, K + 1):
        for core in cores:
            core.cell.k_now = k
        # evaluate()'s protocol (seeded per setting, 8 envs, sampled actions), through its own helper.
        per_k[k] = episodes_under(ckpt, shift_spec(ckpt.config, "none"), episodes, seed).returns
    return {
        "run": str(run),
        "variant": run.parent.name,
        "seed": ckpt.config.seed,
        "trained_k": trained_k,
        "K": K,
        "selection": cores[0].cell.selection,
        "mean_return": {k: float(np.mean(r)) for k, r in per_k.items()},
        "ci95": {k: list(bootstrap_ci(r, seed=seed)) for k, r in per_k.items()},
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs", nargs="+", type=Path, help="RIM run directories")
    ap.add_argument("--episodes", type=int, default=100)
    ap.add_argument("--seed", type=int, default=EVAL_SEED)
    ap.add_argument("--out", type=Path, default=None, help="folder for intervention.md/.json (default: print only)")
    args = ap.parse_args()
    th.set_num_threads(1)
    rows = [evaluate_with_k(run, args.episodes, args.seed) for run in args.runs]
    K = max(int(r["K"]) for r in rows)  # type: ignore[call-overload]
    lines = [
        f"Evaluation return ({args.episodes} episodes, env seed {args.seed}) with k RIMs active per step at "
        "evaluation; the trained k is in bold.",
        "",
        "| run | selection | trained k of K | " + " | ".join(f"k = {k}" for k in range(1, K + 1)) + " |",
        "|---|---|---|" + "---|" * K,
    ]
    for r in rows:
        means: dict[int, float] = r["mean_return"]  # type: ignore[assignment]
        cells = [
            (f"**{means[k]:.2f}**" if k == r["trained_k"] else f"{means[k]:.2f}") if k in means else "-"
            for k in range(1, K + 1)
        ]
        lines.append(
            f"| {r['variant']}/s{r['seed']} | {r['selection']} | {r['trained_k']} of {r['K']} | "
            + " | ".join(cells)
            + " |"
        )
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "intervention.md").write_text(text)
        (args.out / "intervention.json").write_text(json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
    main()
