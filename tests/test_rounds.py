"""benchmarks/rounds.py (train_throughput.py and core_speed.py): the paired ratio, each round's ratio
between variants run back to back, so that the machine's speed changing from round to round
cancels; and the order of the variants, rotating from round to round."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
from rounds import paired_ratio, round_order


def test_a_constant_ratio_survives_a_machine_whose_speed_changes_between_rounds() -> None:
    base = [100.0, 300.0, 300.0, 120.0, 280.0]
    rates = [0.9 * b for b in base]
    assert paired_ratio(rates, base) == pytest.approx(0.9)
    # A slow spell during two of the variant's rounds: the ratio of medians would be 90 / 300 = 0.3.
    assert paired_ratio([90.0, 90.0, 270.0], [100.0, 300.0, 300.0]) == pytest.approx(0.9)


def test_rounds_must_pair_up() -> None:
    with pytest.raises(ValueError):
        paired_ratio([1.0, 2.0], [1.0])


def test_over_as_many_rounds_as_variants_each_runs_once_in_each_position() -> None:
    names = ["ppo-cnn", "ours-none", "ours-rims"]
    orders = [round_order(names, r) for r in range(6)]
    assert orders[0] == names and orders[3] == names and all(sorted(o) == sorted(names) for o in orders)
    for position in range(3):
        assert sorted(o[position] for o in orders[:3]) == sorted(names)
