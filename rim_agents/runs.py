"""The run directory: its layout, and everything that reads or writes it as a whole.

Layout::

    config.yaml            resolved config (defaults < YAML < command line)
    command.txt            the command that started (or resumed) the run, shell-quoted
    versions.json          package versions and git commit
    tb/                    TensorBoard logs, progress.csv (and progress_resume<step>.csv)
    checkpoints/step_N.zip periodic checkpoints, written atomically
    final_model.zip        the trained model, written last: a run without it is not finished
    .lock                  held (``flock``) by the process training in the folder

Files are written through a temporary file and a rename: each is either absent or complete.
"""

from __future__ import annotations

import csv
import datetime as dt
import fcntl
import io
import json
import os
import re
import zipfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

from rim_agents.config import TrainConfig, config_from_dict, load_yaml
from rim_agents.errors import UsageError

CONFIG_FILE = "config.yaml"
COMMAND_FILE = "command.txt"
VERSIONS_FILE = "versions.json"
TB_DIR = "tb"
VIDEO_DIR = "videos"  # visualize.py's default output
CHECKPOINT_DIR = "checkpoints"
FINAL_MODEL = "final_model.zip"
LOCK_FILE = ".lock"
STUDY_FILE = "study.json"  # marks a study folder (rim_agents.study): its runs are listed there
STUDY_RUNS_DIR = "runs"  # a study's run folders: <study>/runs/<env>/<variant>/s<seed>, named by the run's key
_STEP_RE = re.compile(r"step_(\d+)\.zip$")


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file in the same folder and a rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def save_model(model: Any, path: Path) -> Path:
    """Save an SB3 model (policy with any observation moments, optimizer, step counter, reward
    scale) atomically, in one file (see :mod:`rim_agents.normalization`)."""
    buffer = io.BytesIO()
    model.save(buffer)
    atomic_write_bytes(path, buffer.getvalue())
    return path


def checkpoint_path(run_dir: Path, num_timesteps: int) -> Path:
    return run_dir / CHECKPOINT_DIR / f"step_{num_timesteps:012d}.zip"


def checkpoint_step(path: Path) -> int:
    """The step counter saved in a checkpoint, read as plain JSON (nothing unpickled); -1 if unreadable."""
    try:
        with zipfile.ZipFile(path) as archive:
            steps = json.loads(archive.read("data")).get("num_timesteps")
    except (OSError, KeyError, ValueError, zipfile.BadZipFile):
        return -1
    return int(steps) if isinstance(steps, int) else -1


def checkpoints(run_dir: Path) -> list[Path]:
    """The checkpoints in ``run_dir/checkpoints``, fewest steps first (by their names)."""
    folder = run_dir / CHECKPOINT_DIR
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := _STEP_RE.search(p.name))]
    return [p for _, p in sorted(found)]


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The checkpoint with the most steps in ``run_dir/checkpoints``, or None."""
    found = checkpoints(run_dir)
    return found[-1] if found else None


def newest_model(run_dir: Path) -> Path | None:
    """``final_model.zip``, unless a checkpoint has more steps (an extension that was interrupted);
    None when the run holds no model."""
    final = run_dir / FINAL_MODEL
    newest = latest_checkpoint(run_dir)
    if not final.is_file():
        return newest
    if newest is not None and checkpoint_step(newest) > checkpoint_step(final):
        return newest
    return final


def default_run_dir(config: TrainConfig) -> Path:
    """``runs/<env>_<core>_s<seed>_<time>``, created here so that two runs started in the same
    second get two folders (``_2``, ``_3``, ... on a clash)."""
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    env = config.env.replace("/", "-")
    base = Path("runs") / f"{env}_{config.core}_s{config.seed}_{stamp}"
    base.parent.mkdir(parents=True, exist_ok=True)
    for n in range(1, 1000):
        path = base if n == 1 else base.with_name(f"{base.name}_{n}")
        try:
            path.mkdir()
            return path
        except FileExistsError:
            continue
    raise UsageError(f"could not create a fresh run directory next to {base}: pass --run-dir")


def load_run_config(run_dir: Path) -> TrainConfig:
    """The resolved config saved in a run directory."""
    path = run_dir / CONFIG_FILE
    if not path.is_file():
        raise UsageError(f"{run_dir} is not a run directory (no {CONFIG_FILE}): pass a folder written by train.py")
    try:
        data = load_yaml(path.read_text())
    except yaml.YAMLError:
        raise UsageError(f"{path} is not valid YAML: the run directory is damaged") from None
    rims = data.get("rims") if isinstance(data, dict) else None
    if isinstance(rims, dict) and "st_state_gradient" not in rims:
        # Written before the setting existed, when a straight-through choice's gradient also
        # flowed into the previous state: resumed or compared, the run stays what it was.
        rims["st_state_gradient"] = True
    return config_from_dict(data)


class RunLock:
    """An exclusive lock on a run directory, held while a process trains in it.

    ``flock`` on ``run_dir/.lock``: the kernel drops it when the process exits or dies, so a lock
    left by a killed process never blocks. The file keeps the holder's pid for the error message.
    """

    def __init__(self, run_dir: Path, holder: str = "training process", hint: str = "choose another --run-dir") -> None:
        self.path = run_dir / LOCK_FILE
        self.fd: int | None = None
        self.holder, self.hint = holder, hint

    def acquire(self) -> RunLock:
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise UsageError(f"cannot write in run directory {self.path.parent}: {e.strerror}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 32).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise UsageError(
                f"{'run directory' if self.holder == 'training process' else 'folder'} {self.path.parent} is in use "
                f"by another {self.holder} (pid {holder}): wait for it to finish or {self.hint}"
            ) from None
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        self.fd = fd
        return self

    def release(self) -> None:
        if self.fd is not None:
            fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
            self.fd = None


def purge_progress(tb_dir: Path, step: int) -> None:
    """Drop rows logged after ``step`` from the run's progress CSVs (rewritten atomically)."""
    for path in sorted(tb_dir.glob("progress*.csv")):  # SB3's CSV, one per (re)start
        with path.open(newline="") as f:
            rows = list(csv.reader(f))
        if not rows or "time/total_timesteps" not in rows[0]:
            continue
        col = rows[0].index("time/total_timesteps")
        kept = [rows[0]] + [r for r in rows[1:] if len(r) > col and (not r[col] or float(r[col]) <= step)]
        if len(kept) < len(rows):
            buffer = io.StringIO()
            csv.writer(buffer, lineterminator="\n").writerows(kept)
            atomic_write_text(path, buffer.getvalue())


def read_progress(run_dir: Path) -> list[dict[str, str]]:
    """The rows of a run's progress CSVs (the first start's and every resume's), by env step."""
    rows: list[dict[str, str]] = []
    for path in sorted((run_dir / TB_DIR).glob("progress*.csv")):
        with path.open(newline="") as f:
            rows += list(csv.DictReader(f))
    rows.sort(key=lambda r: float(r.get("time/total_timesteps") or 0))
    return rows


METRIC_COLUMNS = {"success": "rollout/success_rate", "return": "rollout/ep_rew_mean"}


def progress_points(run_dir: Path, metric: str) -> list[tuple[int, float]]:
    """A run's training curve, ``(env step, value)`` in step order, from its progress CSVs.

    :param metric: ``success``, ``return`` or any progress column (``rims/switch_rate``).
    """
    column = METRIC_COLUMNS.get(metric, metric)
    return [
        (int(float(r["time/total_timesteps"])), float(r[column]))
        for r in read_progress(run_dir)
        if r.get(column) not in (None, "") and r.get("time/total_timesteps")
    ]


def curve_at(
    points: Sequence[tuple[int, float]], marks: Sequence[int]
) -> tuple[list[float | None], tuple[int, float] | None]:
    """A curve at env-step ``marks``: at each mark the first value at or after it (None where the
    curve has not got there), and the last ``(step, value)``."""
    at = [next((v for step, v in points if step >= mark), None) for mark in marks]
    return at, points[-1] if points else None


def study_run_dir(root: Path, key: str) -> Path:
    """A study's run folder, named by the run's key ``<env>/<variant>/s<seed>``."""
    return root / STUDY_RUNS_DIR / key


def study_runs(root: Path) -> list[Path]:
    """The run directories of a study folder that hold a model, in the study's order."""
    try:
        keys = list(json.loads((root / STUDY_FILE).read_text())["runs"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise UsageError(f"{root / STUDY_FILE} cannot be read ({e}): the study folder is damaged") from None
    # Found from the run's key inside the study folder, not from the recorded path: that one is as
    # the study was started (relative to its working directory), and the folder may have moved.
    runs = [study_run_dir(root, key) for key in keys]
    return [r for r in runs if newest_model(r) is not None]


def train_seconds(run_dir: Path) -> float | None:
    """Training wall time from the run's own logs: the last ``time/time_elapsed`` of each progress
    CSV (the first start's and every resume's), summed; None when nothing was logged."""
    total, found = 0.0, False
    for path in sorted((run_dir / TB_DIR).glob("progress*.csv")):
        with path.open(newline="") as f:
            values = [float(r["time/time_elapsed"]) for r in csv.DictReader(f) if r.get("time/time_elapsed")]
        if values:
            total, found = total + max(values), True
    return total if found else None
