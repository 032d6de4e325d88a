"""benchmarks/selection_supervised.py: the supervised repeat task's data, variants and training."""

from __future__ import annotations

import sys
from pathlib import Path

import torch as th

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
from selection_supervised import Model, repeat_batch, train

from rim_agents import RIMCore


def test_targets_are_the_symbols_delay_steps_back_and_unscored_before() -> None:
    symbols, targets = repeat_batch(5, 12, 3, 4, th.Generator().manual_seed(0))
    assert symbols.shape == targets.shape == (12, 5)
    assert (targets[:3] == -100).all()
    assert th.equal(targets[3:], symbols[:9])


def test_variants_have_the_selection_study_settings() -> None:
    cores = {name: Model(name, 4).core for name in ("rims", "rims-all-active", "rims-st-anneal")}
    assert all(isinstance(core, RIMCore) for core in cores.values())
    assert isinstance(Model("lstm", 4).core, th.nn.LSTM)
    assert cores["rims"].cell.k_active == 3 and cores["rims"].cell.selection == "hard"
    assert cores["rims-all-active"].cell.k_active == 4
    annealed = Model("rims-st-anneal", 4)
    assert annealed.core.cell.selection == "straight_through"
    annealed.set_progress(0.0)
    assert annealed.core.cell.k_now == 4  # all active at the start
    annealed.set_progress(0.6)
    assert annealed.core.cell.k_now == 3  # k reached past the first half


def test_training_learns_the_one_step_repeat() -> None:
    scores = train("rims-all-active", 0, steps=150, delay=1, report_at=(1,))
    assert scores[1] < 0.4  # about chance (0.25) after one step
    assert scores[150] > 0.8
