"""Slow: both the RIM and the LSTM core learn a task that needs memory (CartPole without velocities).

Measured on the 2-core CPU (seed 0, 60k steps, configs/classic.yaml): training ep_rew_mean at the
end about 250 (rims) and 200 (lstm); a memoryless policy stays near 20-40.
"""

from __future__ import annotations

import csv
from pathlib import Path

import pytest

from rim_agents.config import load_config
from rim_agents.training import train


@pytest.mark.slow
@pytest.mark.parametrize("core", ["rims", "lstm"])
def test_learns_cartpole_without_velocities(core: str, tmp_path: Path) -> None:
    config = load_config("RIMAgents/CartPoleNoVel-v1", core, flags={"total_timesteps": 60_000, "seed": 0})
    run = train(config, tmp_path / "run")
    with open(run / "tb" / "progress.csv") as f:
        rows = list(csv.DictReader(f))
    assert float(rows[-1]["rollout/ep_rew_mean"]) >= 150.0
