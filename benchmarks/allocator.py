"""What ``allocator=retain`` (the training job's default, ``rim_agents/host.py``) changes in a PPO
update on Breakout: page faults, the kernel's CPU time, the extractor's forward pass over a minibatch
of frames, and the update's wall time.

The setting applies to a whole process and cannot be undone, so each measurement runs in a fresh
process: ``--pairs`` pairs of processes, one ``system`` and one ``retain``, the order alternating
from pair to pair. Each process builds the variant (``benchmarks/train_throughput.py``'s names),
collects one rollout, then times ``--updates`` calls of ``model.train()`` and 40 forward passes of
the features extractor over 256 frames (the minibatch), and reports medians and its peak resident
memory. Printed: each
process's figures, and per setting the medians over processes.

    python benchmarks/allocator.py [--pairs 3] [--variant ours-rims] [--updates 3]
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def measure(setting: str, variant: str, updates: int) -> dict[str, float]:
    """One process's figures (run in the child)."""
    from rim_agents.host import apply_allocator

    apply_allocator(setting)
    import torch as th

    sys.path.insert(0, str(HERE))
    from train_throughput import build

    model = build(variant, seed=0)
    model.learn(model.n_envs * model.n_steps)  # one rollout (and one update) to train on
    before = resource.getrusage(resource.RUSAGE_SELF)
    times = []
    for _ in range(updates):
        start = time.perf_counter()
        model.train()
        times.append(time.perf_counter() - start)
    after = resource.getrusage(resource.RUSAGE_SELF)
    policy = model.policy
    frames = th.randint(0, 256, (256, *model.observation_space.shape), dtype=th.uint8)
    forwards = []
    with th.no_grad():
        for _ in range(40):
            start = time.perf_counter()
            policy.extract_features(frames)
            forwards.append(time.perf_counter() - start)
    return {
        "train_s": statistics.median(times),
        "faults": (after.ru_minflt - before.ru_minflt) / updates,
        "sys_s": (after.ru_stime - before.ru_stime) / updates,
        "user_s": (after.ru_utime - before.ru_utime) / updates,
        "extractor_ms": statistics.median(forwards) * 1000,
        "peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,  # Linux: KiB
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pairs", type=int, default=3)
    parser.add_argument("--variant", default="ours-rims", help="a benchmarks/train_throughput.py variant")
    parser.add_argument("--updates", type=int, default=3, help="timed model.train() calls per process")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure(args.child, args.variant, args.updates)))
        return
    from rim_agents.host import describe

    results: dict[str, list[dict[str, float]]] = {"system": [], "retain": []}
    print(f"{args.variant}, Breakout, Atari config; {args.updates} model.train() calls per process")
    print(describe())
    print(
        f"{'process':<10}{'train() s':>11}{'faults':>10}{'kernel CPU s':>14}{'user CPU s':>12}"
        f"{'extractor ms':>14}{'peak MB':>9}"
    )
    for pair in range(args.pairs):
        for setting in ("system", "retain") if pair % 2 == 0 else ("retain", "system"):
            cmd = [
                sys.executable,
                __file__,
                "--child",
                setting,
                "--variant",
                args.variant,
                "--updates",
                str(args.updates),
            ]
            out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
            figures = json.loads(out.strip().splitlines()[-1])
            results[setting].append(figures)
            print(
                f"{setting:<10}{figures['train_s']:>11.3f}{figures['faults']:>10.0f}{figures['sys_s']:>14.3f}"
                f"{figures['user_s']:>12.2f}{figures['extractor_ms']:>14.1f}{figures['peak_mb']:>9.0f}"
            )
    print("medians over processes (per model.train() call; the extractor over 256 frames):")
    for setting, runs in results.items():
        med = {key: statistics.median(run[key] for run in runs) for key in runs[0]}
        print(
            f"{setting:<10}{med['train_s']:>11.3f}{med['faults']:>10.0f}{med['sys_s']:>14.3f}"
            f"{med['user_s']:>12.2f}{med['extractor_ms']:>14.1f}{med['peak_mb']:>9.0f}"
        )


if __name__ == "__main__":
    main()
