"""benchmarks/gpu_check.sh runs its whole path on the CPU (--device cpu --quick) and prints one table;
asked for a GPU where there is none, it stops with one line and exit code 2."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch as th

ROOT = Path(__file__).resolve().parent.parent


def run(*args: str) -> subprocess.CompletedProcess:
    env = {"PYTHON": sys.executable, "PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        ["bash", "benchmarks/gpu_check.sh", *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=400
    )


def test_the_gpu_check_runs_on_the_cpu_and_prints_one_table() -> None:
    done = run("--device", "cpu", "--quick")
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    table = done.stdout.split("=== gpu_check on cpu ===")[1]
    assert "agreement within 0.0001: yes" in table
    for row in ("core   RIMCore lstm", "train  ppo-cnn", "train  ours-lstm", "train  ours-rims", "memory rims"):
        line = next(x for x in table.splitlines() if x.startswith(row))
        assert re.search(r"\d+\.\d+", line), line


@pytest.mark.skipif(th.cuda.is_available(), reason="a GPU is present")
def test_asking_for_a_gpu_without_one_is_one_line_and_exit_2() -> None:
    done = run("--device", "cuda")
    assert done.returncode == 2
    assert done.stderr.strip() == "error: no CUDA device here: run with --device cpu"
