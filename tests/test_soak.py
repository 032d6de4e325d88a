"""Soak: a long RIM run keeps its memory flat and its logged numbers finite (slow suite only)."""

from __future__ import annotations

import csv
import math
import os
from pathlib import Path

import pytest
from stable_baselines3.common.callbacks import BaseCallback

from rim_agents.config import load_config
from rim_agents.training import train


def resident_bytes() -> int:
    """This process's resident set size (Linux ``/proc``)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class SampleMemory(BaseCallback):
    def __init__(self, every: int) -> None:
        super().__init__()
        self.every, self.samples, self.next = every, [], every

    def _on_step(self) -> bool:
        if self.num_timesteps >= self.next:
            self.samples.append(resident_bytes())
            self.next += self.every
        return True


@pytest.mark.slow
@pytest.mark.timeout(4 * 3600)
def test_a_million_step_rim_pickup_run_is_flat_and_finite(tmp_path: Path) -> None:
    config = load_config("RIMAgents/Pickup-6x6-v0", "rims", flags={"total_timesteps": 1_000_000})
    memory = SampleMemory(100_000)
    run = train(config, tmp_path / "run", extra_callbacks=[memory])
    assert len(memory.samples) >= 9
    first = memory.samples[0]
    assert max(memory.samples[1:]) < 1.10 * first, [s / 2**20 for s in memory.samples]
    with (run / "tb" / "progress.csv").open() as f:
        rows = list(csv.DictReader(f))
    values = [float(v) for row in rows for v in row.values() if v not in ("", None)]
    assert values and all(math.isfinite(v) for v in values)
