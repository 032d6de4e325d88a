"""Any gymnasium env from the command line: ``module:EnvId``, ``--env-package``, spaces-based
extractors, and the shifts that apply to any env."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml

from rim_agents.cli import evaluate_main, train_main

ROOT = Path(__file__).resolve().parent.parent
TINY = ["n_envs=2", "ppo.n_steps=16", "ppo.batch_size=16", "ppo.seq_len=8", "ppo.n_epochs=1", "checkpoint_freq=32"]

PACKAGE = '''
"""A package that registers environments when imported, as third-party env packages do."""
import gymnasium as gym
import numpy as np
from gymnasium import spaces


class Echo(gym.Env):
    """Discrete memory task: answer with the symbol shown one step earlier."""

    observation_space = spaces.Discrete(3)
    action_space = spaces.Discrete(3)

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        self.t, self.prev = 0, None
        self.cur = int(self.np_random.integers(3))
        return self.cur, {}

    def step(self, action):
        reward = float(self.prev is not None and int(action) == self.prev)
        self.prev, self.cur, self.t = self.cur, int(self.np_random.integers(3)), self.t + 1
        return self.cur, reward, False, self.t >= 16, {}


class Multi(gym.Env):
    """MultiDiscrete actions on a Box observation."""

    observation_space = spaces.Box(-1.0, 1.0, (3,), dtype=np.float32)
    action_space = spaces.MultiDiscrete([3, 2])

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        self.t = 0
        return self.observation_space.sample(), {}

    def step(self, action):
        self.t += 1
        return self.observation_space.sample(), float(action[0] == 1), False, self.t >= 12, {}


gym.register("MyPkg/Echo-v0", entry_point=Echo)
gym.register("MyPkg/Multi-v0", entry_point=Multi)
'''


@pytest.fixture
def package(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    root = tmp_path / "site"
    (root / "my_env_pkg").mkdir(parents=True)
    (root / "my_env_pkg" / "__init__.py").write_text(textwrap.dedent(PACKAGE))
    monkeypatch.syspath_prepend(str(root))
    return root


def fresh_process(args: list[str], package: Path) -> subprocess.CompletedProcess[str]:
    """A new interpreter, where nothing has imported the package yet."""
    env = {**os.environ, "PYTHONPATH": str(package), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)


@pytest.mark.parametrize("core", ["rims", "lstm", "gru", "none"])
def test_module_env_id_trains_evaluates_and_resumes_with_every_core(core: str, package: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    assert train_main(["--env", "my_env_pkg:MyPkg/Echo-v0", "--core", core, "--total-timesteps", "64",
                       "--run-dir", str(run), *TINY]) == 0  # fmt: skip
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert saved["env"] == "MyPkg/Echo-v0" and saved["env_packages"] == ["my_env_pkg"]
    assert saved["policy"]["features_extractor"] == "auto"
    # A fresh interpreter evaluates and resumes the run without being told about the package.
    out = tmp_path / "eval"
    done = fresh_process(["evaluate.py", str(run), "--shifts", "none,flicker-0.5", "--episodes", "2",
                          "--out", str(out), "--no-tensorboard"], package)  # fmt: skip
    assert done.returncode == 0, done.stderr[-600:]
    assert set(json.loads((out / "results.json").read_text())["checkpoints"][0]["shifts"]) == {"none", "flicker-0.5"}
    done = fresh_process(["train.py", "--resume", str(run), "--total-timesteps", "96", "--no-progress"], package)
    assert done.returncode == 0, done.stderr[-600:]


@pytest.mark.parametrize("env_id", ["MyPkg/Multi-v0", "Pendulum-v1"])
def test_box_and_multidiscrete_actions(env_id: str, package: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    args = ["--env", env_id, "--env-package", "my_env_pkg", "--total-timesteps", "32", "--run-dir", str(run), *TINY]
    assert train_main(args) == 0
    out = tmp_path / "eval"
    args = [str(run), "--shifts", "obs-noise-0.1,flicker-0.5", "--episodes", "2", "--out", str(out), "--no-tensorboard"]
    assert evaluate_main(args) == 0


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--env", "no_such_pkg:Thing-v0"], "cannot import 'no_such_pkg' to register its environments"),
        (["--env", "Thing-v0", "--env-package", "no_such_pkg"], "cannot import 'no_such_pkg'"),
        (["--env", "my_env_pkg:MyPkg/Ecco-v0"], "did you mean MyPkg/Echo-v0"),
        (["--env", "my_env_pkg:MyPkg/Echo-v0", "--eval-shifts", "view-3", "--eval-freq", "32"], "needs a MiniGrid"),
    ],
)
def test_bad_env_ids_are_one_line(args: list[str], message: str, package: Path, tmp_path: Path, capsys) -> None:
    assert train_main([*args, "--run-dir", str(tmp_path / "run"), *TINY]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err
    assert not (tmp_path / "run").exists()
