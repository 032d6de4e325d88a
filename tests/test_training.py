"""train(): run directories, checkpoints, resume, RIM logging, and the train.py command line."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from stable_baselines3.common.callbacks import BaseCallback

from rim_agents import RIMPPO
from rim_agents.cli import train_main
from rim_agents.config import load_config
from rim_agents.errors import UsageError
from rim_agents.runs import FINAL_MODEL, latest_checkpoint, save_model
from rim_agents.training import train

ROOT = Path(__file__).resolve().parent.parent
TINY = [
    "n_envs=2",
    "ppo.n_steps=16",
    "ppo.batch_size=16",
    "ppo.seq_len=8",
    "ppo.n_epochs=1",
    "ppo.learning_rate=lin_1e-3",
    "checkpoint_freq=32",
    "rim_image_freq=1",
]


def tiny_config(core: str = "rims", total: int = 64, extra: list[str] | None = None):
    return load_config("CartPole-v1", core, overrides=[*TINY, *(extra or [])], flags={"total_timesteps": total})


def read_progress(run_dir: Path) -> list[dict[str, str]]:
    rows: list[dict[str, str]] = []
    for path in sorted((run_dir / "tb").glob("progress*.csv")):
        with open(path) as f:
            rows += list(csv.DictReader(f))
    return sorted(rows, key=lambda row: int(row["time/total_timesteps"]))


def test_run_directory_contents(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from rim_agents import host

    applied: list[str] = []
    monkeypatch.setattr(host, "apply_allocator", applied.append)
    run = train(tiny_config(), tmp_path / "run", command=["train.py", "--env", "CartPole-v1"])
    assert applied == ["retain"]  # the config's allocator setting, applied by the training job
    assert (run / FINAL_MODEL).is_file()
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert saved["env"] == "CartPole-v1" and saved["rims"]["num_units"] == 8  # the classic family's
    assert "train.py --env CartPole-v1" in (run / "command.txt").read_text()
    versions = yaml.safe_load((run / "versions.json").read_text())
    assert versions["torch"] and "git_commit" in versions and versions["cpu"]
    steps = sorted(int(p.stem.split("_")[1]) for p in (run / "checkpoints").glob("step_*.zip"))
    assert steps == [32, 64]
    assert not list(run.rglob("*.tmp*"))
    model = RIMPPO.load(run / FINAL_MODEL)
    assert model.num_timesteps == 64


def test_rim_activity_is_logged(tmp_path: Path) -> None:
    paper_4_3 = ["rims.num_units=4", "rims.k_active=3", "rims.selection=hard", "rims.k_anneal=0.0"]
    run = train(tiny_config(extra=paper_4_3), tmp_path / "run")
    rows = read_progress(run)
    last = rows[-1]
    fracs = [float(last[f"rims/active_frac/rim_{i}"]) for i in range(4)]
    # Exactly k = 3 of the 4 RIMs are active at every step, so the fractions sum to 3.
    assert sum(fracs) == pytest.approx(3.0)
    assert 0.0 <= float(last["rims/switch_rate"]) <= 1.0
    assert 0.0 < float(last["rims/input_attention_entropy"]) <= 0.6932
    # Selection diagnostics: the gap at the k-th RIM, and per-RIM query gradients from the
    # training phase before the last rollout (the first rollout has none before it).
    assert 0.0 <= float(last["rims/selection_margin"]) <= 1.0
    norms = [float(last[f"rims/query_grad_norm/rim_{i}"]) for i in range(4)]
    assert all(np.isfinite(norms)) and max(norms) > 0
    assert "rims/query_grad_norm/rim_0" not in rows[0] or rows[0]["rims/query_grad_norm/rim_0"] == ""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run / "tb"), size_guidance={"images": 0}).Reload()
    assert "rims/activation_pattern" in events.Tags()["images"]
    image = events.Images("rims/activation_pattern")[-1]
    assert image.height == 4 * 8  # K RIMs, 8 pixels each


class _Crash(BaseCallback):
    def __init__(self, at: int = 48) -> None:
        super().__init__()
        self.at = at

    def _on_step(self) -> bool:
        if self.num_timesteps >= self.at:
            raise KeyboardInterrupt
        return True


def test_resume_continues_steps_and_schedule(tmp_path: Path) -> None:
    full = train(tiny_config(total=160), tmp_path / "full")
    config = tiny_config(total=160)
    with pytest.raises(KeyboardInterrupt):
        train(config, tmp_path / "part", extra_callbacks=[_Crash(at=64)])
    train(config, tmp_path / "part", resume=True)
    model = RIMPPO.load(tmp_path / "part" / FINAL_MODEL)
    assert model.num_timesteps == 160
    assert model._current_progress_remaining == pytest.approx(0.0)
    full_rows = {row["time/total_timesteps"]: row for row in read_progress(full)}
    part_rows = {row["time/total_timesteps"]: row for row in read_progress(tmp_path / "part")}
    assert sorted(part_rows, key=int) == ["32", "96", "128", "160"]
    # Updates after the resume use the learning rate of the uninterrupted run at the same step:
    # the linear schedule went on from where it was (1e-3 * (1 - 96/160) = 4e-4, then 2e-4).
    for step in ("128", "160"):
        assert float(part_rows[step]["train/learning_rate"]) == pytest.approx(
            float(full_rows[step]["train/learning_rate"])
        )
    assert float(part_rows["128"]["train/learning_rate"]) == pytest.approx(4e-4)
    assert (tmp_path / "part" / "command.txt").read_text().count("\n") == 2


def test_interrupted_run_keeps_a_checkpoint_and_no_final_model(tmp_path: Path) -> None:
    config = tiny_config(total=128, extra=["checkpoint_freq=1000"])
    with pytest.raises(KeyboardInterrupt):
        train(config, tmp_path / "run", extra_callbacks=[_Crash()])
    assert not (tmp_path / "run" / FINAL_MODEL).exists()
    ckpt = latest_checkpoint(tmp_path / "run")
    assert ckpt is not None and ckpt.name == "step_000000000048.zip"
    train(config, tmp_path / "run", resume=True)
    # PPO trains whole rollouts (2 envs x 16 steps): from step 48 it stops at the first multiple
    # of 32 steps past 128.
    assert RIMPPO.load(tmp_path / "run" / FINAL_MODEL).num_timesteps == 144


def test_checkpoint_write_is_atomic(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model = RIMPPO("MlpRIMPolicy", "CartPole-v1", n_steps=16, batch_size=16)
    target = tmp_path / "ckpt.zip"
    save_model(model, target)
    good = target.read_bytes()

    def boom(*args: object) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(OSError, match="disk full"):
        save_model(model, target)
    # The previous checkpoint is intact and no temporary file is left behind.
    assert target.read_bytes() == good
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt.zip"]


def test_refuses_to_overwrite_a_run(tmp_path: Path) -> None:
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "something").write_text("x")
    with pytest.raises(UsageError, match="already exists"):
        train(tiny_config(), tmp_path / "run")
    with pytest.raises(UsageError, match="holds no checkpoint"):
        train(tiny_config(), tmp_path / "run", resume=True)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--env", "Nope-v0"], "unknown environment id 'Nope-v0'"),
        (["--env", "CartPole-v1", "--core", "transformer"], "unknown core 'transformer'"),
        (["--env", "CartPole-v1", "rims.k_active=9"], "k_active=9"),
        (["--env", "CartPole-v1", "ppo.bogus=1"], "unknown config key 'ppo.bogus'"),
        (["--env", "CartPole-v1", "ppo.n_epochs=many"], "ppo.n_epochs: 'many' is not a valid int"),
        (["--env", "CartPole-v1", "--config", "/nonexistent.yaml"], "does not exist"),
        (["--env", "CartPole-v1", "--total-timesteps", "ten"], "invalid int value"),
        (["env=5"], "config key env: 5 is not a valid str"),
        (["env=[a]"], "config key env: ['a'] is not a valid str"),
        (["--env", "CartPole-v1", "policy.net_arch=[a]"], "policy.net_arch[0]: 'a' is not a valid int"),
        (["--env", "CartPole-v1", "ppo.gamma=2"], "ppo.gamma=2.0 is out of range"),
        (["--env", "CartPole-v1", "ppo.learning_rate=1e999"], "ppo.learning_rate=inf is out of range"),
        (["--env", "CartPole-v1", "rim_log_freq=0"], "rim_log_freq must be positive"),
        (["--env", "CartPole-v1", "rim_image_freq=0"], "rim_image_freq must be positive"),
        (["--env", "CartPole-v1", "checkpoint_freq=-5"], "checkpoint_freq must be >= 0"),
        (["--env", "CartPole-v1", "ppo.batch_size=100"], "must divide a rollout"),
        (["--env", "CartPole-v1", "ppo.batch_size=4096"], "must divide a rollout"),
        (["--env", "CartPole-v1", "policy.features_extractor_kwargs={bogus: 1}"], "cannot build the model"),
        (
            ["--env", "RIMAgents/Pickup-6x6-v0", "--eval-shifts", "flicker-1.2.3", "--eval-freq", "64"],
            "is not a number",
        ),
    ],
)
def test_cli_bad_input(args: list[str], message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = train_main([*args, "--run-dir", str(tmp_path / "run")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert len(err) == 1 and message in err[0] and "Traceback" not in err[0]
    assert not (tmp_path / "run").exists()


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="a GPU is present")
def test_cli_cuda_without_gpu(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert train_main(["--env", "CartPole-v1", "--device", "cuda", "--run-dir", str(tmp_path / "run")]) == 2
    assert "torch sees no CUDA GPU" in capsys.readouterr().err and not (tmp_path / "run").exists()


def test_cli_bad_config_files(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    binary = tmp_path / "binary.yaml"
    binary.write_bytes(b"\xff\xfe\x00bad")
    broken = tmp_path / "broken.yaml"
    broken.write_text("ppo:\n  n_steps: 8\n bad: [\n")
    a_file = tmp_path / "file"
    a_file.write_text("x")
    for args, message in [
        (["--config", str(binary)], "is not UTF-8 text"),
        (["--config", str(broken)], "at line 3, column"),
        (["--run-dir", str(a_file)], "is not a folder"),
    ]:
        assert train_main(["--env", "CartPole-v1", *args]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and message in err[0], err


def test_cli_resume_without_checkpoint(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert train_main(["--resume", str(tmp_path)]) == 2
    assert "not a run directory" in capsys.readouterr().err


def test_train_script_writes_a_run(tmp_path: Path) -> None:
    run = tmp_path / "run"
    result = subprocess.run(
        [
            sys.executable,
            str(ROOT / "train.py"),
            "--env",
            "CartPole-v1",
            "--core",
            "lstm",
            "--total-timesteps",
            "32",
            "--run-dir",
            str(run),
            *TINY,
        ],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr
    assert f"run directory : {run}" in result.stdout
    assert f"tensorboard --logdir {run / 'tb'}" in result.stdout
    assert (run / FINAL_MODEL).is_file()
    assert yaml.safe_load((run / "config.yaml").read_text())["core"] == "lstm"


# ------------------------------------------------------------------------------ reliability
def test_a_locked_run_directory_is_refused(tmp_path: Path) -> None:
    from rim_agents.runs import RunLock

    run = tmp_path / "run"
    run.mkdir()
    lock = RunLock(run).acquire()
    try:
        with pytest.raises(UsageError, match=rf"in use by another training process \(pid {os.getpid()}\)"):
            train(tiny_config(), run)
    finally:
        lock.release()
    # A lock file left behind by a process that is gone does not block.
    assert (run / ".lock").is_file()
    assert (train(tiny_config(total=32), run) / FINAL_MODEL).is_file()


def test_failed_start_leaves_no_run_directory(tmp_path: Path) -> None:
    config = tiny_config()
    config.env = "Nope-v0"
    with pytest.raises(UsageError, match="unknown environment id"):
        train(config, tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_default_run_directories_are_distinct(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from rim_agents.runs import default_run_dir

    monkeypatch.chdir(tmp_path)
    config = tiny_config()
    dirs = {default_run_dir(config) for _ in range(3)}  # the same second, most likely
    assert len(dirs) == 3 and all(d.is_dir() for d in dirs)


def _train_process(run: Path, steps: int, *extra: str) -> subprocess.Popen[str]:
    cmd = [sys.executable, str(ROOT / "train.py"), "--env", "CartPole-v1", "--total-timesteps", str(steps)]
    cmd += ["--run-dir", str(run), *TINY, *extra]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def test_run_directory_created_by_another_process_meanwhile(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The race of two processes starting on one fresh --run-dir: the folder appears between the
    existence check and mkdir. The loser of mkdir goes on to the run lock, which decides; here no
    one holds it, so this process trains."""
    run = tmp_path / "run"
    real_mkdir = Path.mkdir
    raced: list[Path] = []

    def mkdir_after_another_process(self: Path, *args: object, **kwargs: object) -> None:
        if self == run and not raced:
            raced.append(self)
            real_mkdir(self)  # the other process wins the race
            raise FileExistsError(17, "File exists", str(self))
        real_mkdir(self, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(Path, "mkdir", mkdir_after_another_process)
    assert train(tiny_config(), run) == run
    monkeypatch.undo()
    assert raced == [run] and (run / FINAL_MODEL).is_file()


def test_two_processes_cannot_share_a_run_directory(tmp_path: Path) -> None:
    run = tmp_path / "run"
    procs = [_train_process(run, 64, "rims.k_active=2"), _train_process(run, 64, "rims.k_active=4")]
    outcomes = [(p.wait(timeout=300), p.stderr.read() if p.stderr else "") for p in procs]
    codes = sorted(code for code, _ in outcomes)
    assert codes == [0, 2], outcomes
    loser = next(err for code, err in outcomes if code == 2).strip().splitlines()
    assert len(loser) == 1 and ("in use by another training process" in loser[0] or "already exists" in loser[0])
    # The folder holds one consistent run: the saved config is the model's.
    k_saved = yaml.safe_load((run / "config.yaml").read_text())["rims"]["k_active"]
    assert RIMPPO.load(run / FINAL_MODEL).policy.lstm_actor.cell.k_active == k_saved


def test_sigterm_saves_a_checkpoint_and_exits_143(tmp_path: Path) -> None:
    import signal
    import time

    run = tmp_path / "run"
    proc = _train_process(run, 1_000_000, "checkpoint_freq=0")
    deadline = time.time() + 120
    while not list((run / "tb").glob("progress.csv")) or len(read_progress(run)) < 2:
        assert proc.poll() is None and time.time() < deadline, proc.stderr.read() if proc.stderr else ""
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    code = proc.wait(timeout=120)
    err = (proc.stderr.read() if proc.stderr else "").strip().splitlines()
    assert code == 143
    assert len(err) == 1 and err[0].startswith("stopped by SIGTERM: checkpoint ") and "--resume" in err[0]
    ckpt = latest_checkpoint(run)
    assert ckpt is not None and not (run / FINAL_MODEL).exists()
    steps = RIMPPO.load(ckpt).num_timesteps
    assert steps >= 64 and ckpt.name == f"step_{steps:012d}.zip"
    # The run resumes from there.
    assert train_main(["--resume", str(run), "--total-timesteps", str(steps + 32)]) == 0
    assert RIMPPO.load(run / FINAL_MODEL).num_timesteps == steps + 32


class _Evil:
    """Unpickling this creates a file: the shape of a crafted checkpoint's payload."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        return (open, (str(self.marker), "w"))


def _plant_payload(checkpoint: Path, marker: Path) -> None:
    """Rewrite the checkpoint's SB3 ``data`` so that unpickling any of it creates ``marker``."""
    import base64
    import json
    import pickle
    import zipfile

    with zipfile.ZipFile(checkpoint) as archive:
        entries = {name: archive.read(name) for name in archive.namelist()}
    data = json.loads(entries["data"])
    payload = base64.b64encode(pickle.dumps(_Evil(marker))).decode()
    for key, value in data.items():
        if isinstance(value, dict) and ":serialized:" in value:
            value[":serialized:"] = payload
            data[key] = value
    entries["data"] = json.dumps(data).encode()
    with zipfile.ZipFile(checkpoint, "w") as archive:
        for name, content in entries.items():
            archive.writestr(name, content)


def test_evaluating_and_resuming_never_unpickle_the_checkpoint(tmp_path: Path) -> None:
    from rim_agents.cli import evaluate_main

    run = train(tiny_config(total=64), tmp_path / "run")
    marker = tmp_path / "pwned"
    for ckpt in [run / FINAL_MODEL, *(run / "checkpoints").glob("step_*.zip")]:
        _plant_payload(ckpt, marker)
    # The crafted file is dangerous for a plain SB3 load...
    with pytest.raises(Exception):  # noqa: B017 (what the payload breaks after running does not matter)
        RIMPPO.load(run / FINAL_MODEL)
    assert marker.exists()
    marker.unlink()
    # ... and harmless for ours: same weights, same step counter, nothing executed.
    out = tmp_path / "eval"
    args = [str(run), "--shifts", "none", "--episodes", "2", "--out", str(out), "--no-tensorboard", "--no-progress"]
    assert evaluate_main(args) == 0
    assert train_main(["--resume", str(run), "--total-timesteps", "96"]) == 0  # from the crafted step_64
    assert not marker.exists()
    assert RIMPPO.load(run / FINAL_MODEL).num_timesteps == 96  # written by this process, clean


def test_resume_after_a_kill_purges_orphaned_points_and_stale_files(tmp_path: Path) -> None:
    """A killed run logged steps past its last checkpoint: resuming drops those points (CSV and
    TensorBoard), so no step appears twice; half-written temporary files are removed."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = train(tiny_config(total=128, extra=["checkpoint_freq=64"]), tmp_path / "run")
    # What kill -9 at step ~128 leaves: rows up to 128, a checkpoint at 64, a half-written file.
    for late in [run / FINAL_MODEL, *(run / "checkpoints").glob("step_00000000012*.zip")]:
        late.unlink()
    stale = run / "checkpoints" / ".step_000000000128.zip.tmp99999"
    stale.write_bytes(b"half")
    assert latest_checkpoint(run).name == "step_000000000064.zip"
    assert train_main(["--resume", str(run), "--total-timesteps", "128"]) == 0
    steps = [int(row["time/total_timesteps"]) for row in read_progress(run)]
    assert steps == [32, 64, 96, 128]
    events = EventAccumulator(str(run / "tb")).Reload()
    tb_steps = [e.step for e in events.Scalars("train/learning_rate")]
    assert len(tb_steps) == len(set(tb_steps))
    assert not stale.exists()


def test_resume_refuses_a_budget_below_the_run_and_keeps_its_config(tmp_path: Path) -> None:
    run = train(tiny_config(total=64), tmp_path / "run")
    before = (run / "config.yaml").read_text()
    assert train_main(["--resume", str(run), "--total-timesteps", "32"]) == 2
    assert (run / "config.yaml").read_text() == before


def test_resume_skips_a_damaged_newest_checkpoint(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run = train(tiny_config(total=64), tmp_path / "run")
    newest = latest_checkpoint(run)
    newest.write_bytes(newest.read_bytes()[:100])  # truncated
    assert train_main(["--resume", str(run), "--total-timesteps", "96"]) == 0
    assert "resuming from the checkpoint before it" in capsys.readouterr().err
    assert newest.with_name(newest.name + ".damaged").is_file()  # kept, not deleted
    assert RIMPPO.load(run / FINAL_MODEL).num_timesteps == 96


def test_disk_full_is_one_line_and_keeps_the_last_checkpoint(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import errno

    import rim_agents.runs as runs

    real_replace = os.replace
    calls = {"n": 0}

    def replace(src: object, dst: object) -> None:
        calls["n"] += 1
        if calls["n"] > 3:  # config, versions, first checkpoint succeed
            raise OSError(errno.ENOSPC, "No space left on device")
        real_replace(src, dst)

    monkeypatch.setattr(runs.os, "replace", replace)
    with pytest.raises(
        UsageError, match=r"No space left on device; the newest complete checkpoint is .*step_000000000032"
    ):
        train(tiny_config(total=128), tmp_path / "run")


def test_command_is_recorded_shell_quoted(tmp_path: Path) -> None:
    run = tmp_path / "run"
    train(tiny_config(total=32), run, command=["python", "train.py", "policy.net_arch=[16, 16]"])
    assert (run / "command.txt").read_text().strip() == "python train.py 'policy.net_arch=[16, 16]'"


class _Diverge(BaseCallback):
    """Turns the policy to NaN at a step, as a too-large learning rate does."""

    def _on_step(self) -> bool:
        if self.num_timesteps >= 40:
            with __import__("torch").no_grad():
                next(self.model.policy.mlp_extractor.parameters()).fill_(float("nan"))
        return True


def test_divergence_is_one_line_and_saves_no_nan_checkpoint(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match=r"training diverged at step \d+ \(NaN or inf in the policy"):
        train(tiny_config(total=128), tmp_path / "run", extra_callbacks=[_Diverge()])
    checkpoints = sorted((tmp_path / "run" / "checkpoints").glob("step_*.zip"))
    assert [p.name for p in checkpoints] == ["step_000000000032.zip"]


def test_shifts_are_evaluated_during_training(tmp_path: Path) -> None:
    config = load_config(
        "RIMAgents/Pickup-6x6-v0",
        "lstm",
        overrides=[*TINY, "eval_episodes=3"],
        flags={"total_timesteps": 96, "eval_shifts": ["none", "view-3"], "eval_freq": 64},
    )
    run = train(config, tmp_path / "run")
    rows = [r for r in read_progress(run) if r.get("eval/view-3/success_rate")]
    assert [int(r["time/total_timesteps"]) for r in rows] == [64]
    for shift in ("none", "view-3"):
        assert 0.0 <= float(rows[0][f"eval/{shift}/success_rate"]) <= 1.0
        assert float(rows[0][f"eval/{shift}/mean_length"]) > 0


def test_annealed_k_in_ppo(tmp_path: Path) -> None:
    run = train(tiny_config(total=128), tmp_path / "run")
    ks = [int(float(r["rims/k"])) for r in read_progress(run) if r.get("rims/k")]
    # The classic family's default: 8 RIMs, k = 7 reached over the first half of training (k_anneal
    # 0.5); 4 rollouts of 32 steps.
    assert ks == [8, 8, 7, 7]
    model = RIMPPO.load(run / FINAL_MODEL)
    assert model.policy.lstm_actor.cell.k_now == 7  # a loaded model runs the final k
    assert model.policy.lstm_actor.cell.selection == "straight_through"
