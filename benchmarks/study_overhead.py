"""What Ray adds to a study: start-up, a task's round trip, and one tiny training run as a Ray task
against the same run in this process.

    python benchmarks/study_overhead.py --rounds 5

Prints ``ray.init`` time (a local Ray on this machine), the first task's latency (a worker
process starts), the median round trip of an empty task, and the medians of a 64-step training
run (Pickup-6x6, rims) trained in-process and as a Ray task (each in a fresh run folder).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import ray  # noqa: E402 (after the path line)

from rim_agents.config import load_config  # noqa: E402
from rim_agents.study import start_ray, train_run  # noqa: E402

TINY = ["n_envs=2", "ppo.n_steps=16", "ppo.batch_size=16", "ppo.seq_len=8", "ppo.n_epochs=1", "checkpoint_freq=0"]


def noop() -> int:
    return 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    config = load_config("RIMAgents/Pickup-6x6-v0", "rims", None, TINY, {"total_timesteps": 64, "device": "cpu"})
    with tempfile.TemporaryDirectory() as tmp:
        local = []
        for i in range(args.rounds):
            started = time.perf_counter()
            train_run(f"{tmp}/local{i}/run", config, f"{tmp}/local{i}/run.log")
            local.append(time.perf_counter() - started)
        info = start_ray(None, 2)
        task = ray.remote(num_cpus=1)(noop)
        started = time.perf_counter()
        ray.get(task.remote())
        first = time.perf_counter() - started
        trips = []
        for _ in range(20):
            started = time.perf_counter()
            ray.get(task.remote())
            trips.append(time.perf_counter() - started)
        remote_train = ray.remote(num_cpus=1)(train_run)
        remote = []
        for i in range(args.rounds):
            started = time.perf_counter()
            ray.get(remote_train.remote(f"{tmp}/ray{i}/run", config, f"{tmp}/ray{i}/run.log"))
            remote.append(time.perf_counter() - started)
        ray.shutdown()
    print(f"ray.init (local, 2 CPUs): {info['startup_s']:.2f} s")
    print(f"first task (a worker starts): {first:.2f} s")
    print(f"empty task round trip, median of 20: {statistics.median(trips) * 1000:.1f} ms")
    med_local, med_remote = statistics.median(local), statistics.median(remote)
    print(f"64-step rims run in-process, median of {args.rounds}: {med_local:.2f} s")
    print(f"64-step rims run as a Ray task, median of {args.rounds}: {med_remote:.2f} s")
    print(f"Ray task overhead per run: {med_remote - med_local:+.2f} s (ratio {med_remote / med_local:.2f}x)")


if __name__ == "__main__":
    main()
