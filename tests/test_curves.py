"""curves.py: a run's training curve read back at env-step marks, from its progress CSVs."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from rim_agents.cli import curves_main
from rim_agents.runs import FINAL_MODEL, STUDY_FILE, TB_DIR, curve_at, progress_points, study_runs

COLUMNS = ["time/total_timesteps", "rollout/ep_rew_mean", "rollout/success_rate"]


def fake_run(run: Path, files: dict[str, list[tuple[int, float, float | None]]]) -> Path:
    """A run folder whose progress CSVs hold ``(step, return, success)`` rows, and a model."""
    (run / TB_DIR).mkdir(parents=True)
    for name, rows in files.items():
        with (run / TB_DIR / name).open("w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(COLUMNS)
            writer.writerows([s, r, "" if p is None else p] for s, r, p in rows)
    (run / FINAL_MODEL).write_bytes(b"")
    return run


def test_each_mark_takes_the_first_point_at_or_after_it_across_resumes(tmp_path: Path) -> None:
    run = fake_run(
        tmp_path / "run",
        {
            "progress.csv": [(1024, 0.1, None), (2048, 0.2, 0.5), (3072, 0.3, 0.6)],
            "progress_resume3072.csv": [(5120, 0.5, 0.8), (4096, 0.4, 0.7)],  # merged and ordered by step
        },
    )

    def progress_at(metric: str, marks: list[int]) -> tuple[list[float | None], tuple[int, float] | None]:
        return curve_at(progress_points(run, metric), marks)

    assert progress_at("return", [1000, 2048, 2049, 5000, 6000]) == ([0.1, 0.2, 0.3, 0.5, None], (5120, 0.5))
    # The success column is empty on the first row: that row is skipped, not read as zero.
    assert progress_at("success", [1000]) == ([0.5], (5120, 0.8))
    assert progress_at("rollout/success_rate", [4000]) == ([0.7], (5120, 0.8))
    assert progress_at("rims/switch_rate", [1000]) == ([None], None)


def test_a_study_folder_is_read_through_its_runs_keys_from_any_working_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    study = tmp_path / "studies" / "s"
    fake_run(study / "runs" / "pickup" / "lstm" / "s0", {"progress.csv": [(100, 1.0, 0.25), (200, 2.0, 0.75)]})
    # The recorded run_dir is relative to where the study was started, not to the study folder.
    runs = {"pickup/lstm/s0": {"run_dir": "studies/s/runs/pickup/lstm/s0"}, "pickup/rims/s0": {"run_dir": "x"}}
    (study / STUDY_FILE).write_text(json.dumps({"runs": runs}))
    monkeypatch.chdir(tmp_path / "studies")
    assert study_runs(Path("s")) == [Path("s/runs/pickup/lstm/s0")]  # the untrained run is left out
    assert curves_main(["s", "--every", "100"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "| run | 100 | 200 | last (step) |"
    assert lines[2] == "| s/runs/pickup/lstm/s0 | 0.25 | 0.75 | 0.75 (200) |"


def test_bad_input_is_one_line_and_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    run = fake_run(tmp_path / "run", {"progress.csv": [(100, 1.0, None)]})
    (tmp_path / "empty").mkdir()
    assert curves_main([str(tmp_path / "empty")]) == 2
    assert "has no progress logs" in capsys.readouterr().err
    assert curves_main([str(run), "--metric", "success"]) == 2
    assert "no run logged 'success'" in capsys.readouterr().err
    assert curves_main([str(run), "--every", "0"]) == 2
    assert capsys.readouterr().err.count("\n") == 1
