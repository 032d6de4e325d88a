"""After a lost life, does the game go on? Dones in 400 no-op steps after the first lost life of
Breakout, for the C++ and the gym backend (FIRE serves a ball after every lost life in both).

    python benchmarks/atari_life_loss.py
"""

from __future__ import annotations

import numpy as np

from rim_agents.envs import make_vec_env


def main() -> None:
    for backend in ("vector", "gym"):
        env = make_vec_env("BreakoutNoFrameskip-v4", n_envs=1, seed=0, backend=backend)
        env.reset()
        noop = np.zeros(1, dtype=np.int64)
        while not env.step(noop)[2][0]:
            pass
        dones = sum(int(env.step(noop)[2][0]) for _ in range(400))
        env.close()
        print(f"{backend}: {dones} dones in 400 no-op steps after the first lost life")


if __name__ == "__main__":
    main()
