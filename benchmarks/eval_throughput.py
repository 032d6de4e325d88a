"""Evaluation throughput: episodes per second of rim_agents' vectorised evaluation against a plain
loop of SB3's ``evaluate_policy`` on one env, same checkpoint and episode count. Both time the
episodes from env creation on, with the model already loaded (what ``evaluate.py`` repeats for
every shift).

The checkpoint is a RIM agent on ``RIMAgents/Pickup-6x6-v0`` trained for a few thousand steps in a
temporary run directory (``--steps``), so episodes have realistic lengths. Both sides run the same
number of episodes (``--episodes``) with stochastic actions; rounds are interleaved, and we print
the median episodes/s and the ratio.

    python benchmarks/eval_throughput.py [--episodes 64] [--rounds 3] [--steps 4096]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

from sb3_contrib import RecurrentPPO
from stable_baselines3.common.evaluation import evaluate_policy

from rim_agents.config import load_config
from rim_agents.envs import make_vec_env
from rim_agents.host import describe
from rim_agents.models import make_env
from rim_agents.rollout import run_episodes
from rim_agents.shifts import shift_spec
from rim_agents.training import train

ENV = "RIMAgents/Pickup-6x6-v0"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--episodes", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=4096, help="training steps of the benchmark checkpoint")
    parser.add_argument("--n-envs", type=int, default=8)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        config = load_config(ENV, "rims", flags={"total_timesteps": args.steps, "device": "cpu"})
        run = train(config, Path(tmp) / "run")
        model = RecurrentPPO.load(run / "final_model.zip", device="cpu")
        spec = shift_spec(config, "none")
        rates: dict[str, list[float]] = {"ours (vectorised)": [], "evaluate_policy (1 env)": []}
        for r in range(args.rounds):
            start = time.perf_counter()
            env = make_env(config, args.n_envs, r, spec)
            run_episodes(model, env, args.episodes)
            rates["ours (vectorised)"].append(args.episodes / (time.perf_counter() - start))
            env.close()
            env = make_vec_env(ENV, 1, seed=r)
            start = time.perf_counter()
            evaluate_policy(model, env, n_eval_episodes=args.episodes, deterministic=False)
            rates["evaluate_policy (1 env)"].append(args.episodes / (time.perf_counter() - start))
            env.close()
    med = {k: statistics.median(v) for k, v in rates.items()}
    base = med["evaluate_policy (1 env)"]
    print(f"{ENV}, RIM agent after {args.steps} steps, {args.episodes} episodes per round, {args.rounds} rounds")
    print(describe())
    print(f"{'variant':<26}{'median episodes/s':>19}{'ratio':>8}   all rounds")
    for name, m in med.items():
        print(f"{name:<26}{m:>19.2f}{m / base:>7.2f}x   {', '.join(f'{v:.2f}' for v in rates[name])}")


if __name__ == "__main__":
    main()
