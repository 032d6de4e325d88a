"""PPO with ``rims.cuda_graphs`` against the eager core, end to end on one device.

Two RIM agents from the same config and seed (the pickup room, ``configs/minigrid.yaml``: actor and
critic RIM cores), one with the whole-unroll CUDA graphs: after one update (same rollout, same
minibatches) their parameters must agree to ``--tol``; then each trains ``--updates`` more updates
and the env steps per second of both are printed. Exit status 1 when the parameters disagree.

    python benchmarks/graphs_training_check.py --device cuda [--updates 6]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch as th

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from rim_agents.config import load_config
from rim_agents.models import build_model, make_env


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--env", default="RIMAgents/Pickup-6x6-v0")
    parser.add_argument("--updates", type=int, default=6, help="timed updates after the compared one")
    parser.add_argument("--tol", type=float, default=1e-4)
    args = parser.parse_args()
    models = {}
    for name, graphs in (("eager", False), ("cuda_graphs", True)):
        config = load_config(
            args.env,
            "rims",
            overrides=[f"rims.cuda_graphs={str(graphs).lower()}", "checkpoint_freq=0"],
            flags={"seed": 0, "device": args.device},
        )
        models[name] = build_model(config, make_env(config))
    per_update = models["eager"].n_steps * models["eager"].n_envs
    for model in models.values():
        model.learn(per_update)
    eager, graphed = (dict(m.policy.named_parameters()) for m in models.values())
    worst = max(float((eager[k] - graphed[k]).detach().abs().max()) for k in eager)
    print(f"{args.env} on {args.device}: after one update the parameters differ by at most {worst:.2e}")
    for name, model in models.items():
        if args.device.startswith("cuda"):
            th.cuda.synchronize()
        start = time.perf_counter()
        model.learn(args.updates * per_update, reset_num_timesteps=False)
        if args.device.startswith("cuda"):
            th.cuda.synchronize()
        rate = args.updates * per_update / (time.perf_counter() - start)
        print(f"{name:<12} {rate:8.1f} env steps/s over {args.updates} updates")
    ok = worst <= args.tol
    print(f"agreement within {args.tol:g}: {'yes' if ok else 'NO'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
