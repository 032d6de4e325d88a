"""benchmarks/paired_difference.py: per-seed differences against a baseline core, paired by seed."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
from paired_difference import main, paired_differences


def rows(core: str, shift: str, values: dict[int, float]) -> list[dict[str, str]]:
    return [
        {"kind": "checkpoint", "core": core, "shift": shift, "seed": str(s), "success_rate": str(v)}
        for s, v in values.items()
    ]


def test_differences_are_paired_by_seed() -> None:
    data = [
        *rows("none", "view-3", {0: 0.5, 1: 0.9, 2: 0.7}),
        *rows("rims", "view-3", {0: 0.6, 1: 1.0, 2: 0.8, 3: 0.0}),  # seed 3 has no partner: left out
        {"kind": "group", "core": "rims", "shift": "view-3", "seed": "", "success_rate": "0.1"},
    ]
    mean, low, high, seeds = paired_differences(data, "none")[("rims", "view-3")]
    # Every paired difference is +0.1 although the seeds range from 0.5 to 0.9: no spread left.
    assert seeds == 3 and mean == pytest.approx(0.1) and low == pytest.approx(0.1) and high == pytest.approx(0.1)


def test_a_baseline_without_shared_seeds_is_one_line_and_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "results.csv"
    path.write_text("kind,core,shift,seed,success_rate\ncheckpoint,rims,none,0,1.0\n")
    assert main([str(path), "--baseline", "lstm"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no core shares seeds with --baseline lstm" in err[0]


def test_several_files_are_read_as_one(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # An earlier study's cores in one file, a later study's variant on the same seeds in another.
    earlier = tmp_path / "earlier.csv"
    earlier.write_text(
        "env,variant,core,seed,shift,success_rate\npickup-1,lstm,lstm,0,none,0.9\npickup-1,lstm,lstm,1,none,0.7\n"
    )
    later = tmp_path / "later.csv"
    later.write_text(
        "env,variant,core,seed,shift,success_rate\npickup-1,rims-new,rims,0,none,1.0\npickup-1,rims-new,rims,1,none,0.9\n"
    )
    assert main([str(earlier), str(later), "--baseline", "lstm"]) == 0
    out = capsys.readouterr().out
    assert "| variant - lstm |" in out and "| rims-new | none | +0.150 | [+0.100, +0.200] | 2 |" in out
    # The same run in both files is refused, as within one file.
    assert main([str(later), str(later), "--baseline", "lstm"]) == 2
    assert "two runs of 'rims-new' on seed 0" in capsys.readouterr().err
