"""benchmarks/selection_intervention.py: evaluation with k changed follows evaluate()'s protocol."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))

import selection_intervention

from rim_agents.config import load_config
from rim_agents.evaluation import evaluate
from rim_agents.training import train

TINY = ["n_envs=2", "ppo.n_steps=16", "ppo.batch_size=16", "ppo.seq_len=8", "ppo.n_epochs=1", "checkpoint_freq=0"]
# The paper's rule with 4 RIMs, 3 active (the classic family's default before the selection study).
PAPER_4_3 = ["rims.num_units=4", "rims.k_active=3", "rims.selection=hard", "rims.k_anneal=0.0"]


def test_trained_k_reproduces_the_evaluation_and_every_k_is_measured(tmp_path: Path) -> None:
    config = load_config(
        "RIMAgents/Repeat-v0",
        "rims",
        overrides=[*TINY, *PAPER_4_3, "env_options.env_kwargs.delay=2", "env_options.env_kwargs.length=8"],
        flags={"total_timesteps": 64, "seed": 0},
    )
    run = train(config, tmp_path / "run")
    row = selection_intervention.evaluate_with_k(run, episodes=12, seed=1_000_000)
    K, k = row["K"], row["trained_k"]
    assert (K, k) == (4, 3)
    means = row["mean_return"]
    assert isinstance(means, dict) and sorted(means) == [1, 2, 3, 4]
    assert all(0.0 <= m <= 1.0 for m in means.values())
    reference = evaluate([run], shifts=["none"], episodes=12, seed=1_000_000)
    assert means[k] == pytest.approx(reference.checkpoints[0].shifts["none"].mean_return, abs=1e-12)
