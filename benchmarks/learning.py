"""Random-policy baselines of a study's envs: the floor every learning bar is read against.

The learning benchmark itself (does PPO learn with each core, on every seed?) is a study::

    python study.py configs/studies/learning.yaml                 # pickup rooms, cue, CartPole, repeat
    python study.py configs/studies/learning.yaml --envs pickup-1 --seeds 0-9
    python study.py configs/studies/learning_breakout.yaml        # Breakout, 1M steps (a GPU helps)

This script prints, for each env of a spec, the mean return of uniformly random actions::

    python benchmarks/learning.py --spec configs/studies/learning.yaml --episodes 100
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from rim_agents.config import TrainConfig  # noqa: E402 (after the path line)
from rim_agents.models import make_env  # noqa: E402
from rim_agents.study import VariantSpec, load_spec, run_config  # noqa: E402


def random_return(config: TrainConfig, episodes: int, seed: int) -> float:
    """Mean return of uniformly random actions over ``episodes`` episodes (Atari: whole games)."""
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--spec", default=str(ROOT / "configs" / "studies" / "learning.yaml"))
    parser.add_argument("--envs", help="comma-separated subset of the spec's envs")
    parser.add_argument("--episodes", type=int, default=100)
    parser.add_argument("--seed", type=int, default=2_000_000)
    args = parser.parse_args()
    spec = load_spec(args.spec)
    for env in spec.envs:
        if args.envs and env.name not in args.envs.split(","):
            continue
        config = run_config(spec, env, VariantSpec("none", "none"), args.seed, env.steps or spec.steps, [], "cpu")
        value = random_return(config, args.episodes, args.seed)
        print(f"{env.name}: random policy mean return {value:.2f} over {args.episodes} episodes", flush=True)


if __name__ == "__main__":
    main()
