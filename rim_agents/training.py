"""One training run: build env and model from a config, train, and keep a complete run directory
(its layout: :mod:`rim_agents.runs`).

One process at a time trains in a run directory: a second gets a one-line error. SIGTERM and
SIGINT stop training at the next env step (never inside an update), save a checkpoint and raise
:class:`Interrupted`; a second signal stops at once.
"""

from __future__ import annotations

import json
import platform
import shlex
import signal
import subprocess
import sys
import threading
from importlib import metadata
from pathlib import Path
from types import FrameType
from typing import Any

import torch as th
import yaml
from stable_baselines3.common.callbacks import BaseCallback, CallbackList
from stable_baselines3.common.logger import Logger, TensorBoardOutputFormat, make_output_format
from stable_baselines3.common.vec_env import VecEnv
from torch.utils.tensorboard import SummaryWriter

from rim_agents import host
from rim_agents.callbacks import AnnealK, CheckpointCallback, RIMActivityCallback, ShiftEvalCallback, VideoCallback
from rim_agents.config import TrainConfig
from rim_agents.errors import UsageError
from rim_agents.models import DamagedCheckpoint, build_model, check_config, load_model, make_env
from rim_agents.ppo import RIMPPO
from rim_agents.runs import (
    CHECKPOINT_DIR,
    COMMAND_FILE,
    CONFIG_FILE,
    FINAL_MODEL,
    LOCK_FILE,
    TB_DIR,
    VERSIONS_FILE,
    RunLock,
    atomic_write_text,
    checkpoint_path,
    default_run_dir,
    latest_checkpoint,
    purge_progress,
    save_model,
)

PACKAGES = ("rim-agents", "torch", "gymnasium", "ale-py", "stable-baselines3", "sb3-contrib", "minigrid", "numpy")


def versions() -> dict[str, Any]:
    out: dict[str, Any] = {"python": sys.version.split()[0], "platform": platform.platform(), "cpu": host.cpu_name()}
    for name in PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    try:
        root = Path(__file__).resolve().parent.parent
        out["git_commit"] = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5, check=True
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        out["git_commit"] = None
    return out


class Interrupted(Exception):
    """Training stopped by a signal; a checkpoint was saved (``checkpoint`` is None when nothing
    had been trained yet)."""

    def __init__(self, signum: int, run_dir: Path, checkpoint: Path | None) -> None:
        self.signum, self.run_dir, self.checkpoint = signum, run_dir, checkpoint
        name = signal.Signals(signum).name
        resume = f"python train.py --resume {shlex.quote(str(run_dir))}"
        where = f"checkpoint {checkpoint}; continue with: {resume}" if checkpoint else "nothing trained yet"
        super().__init__(f"stopped by {name}: {where}")


class StopOnSignal(BaseCallback):
    """Ends ``learn`` at the next env step after SIGTERM or SIGINT (a second signal: at once).

    Stopping between env steps means the model is always the one after a complete update.
    Handlers are installed only in the main thread (Python delivers signals there).
    """

    def __init__(self) -> None:
        super().__init__()
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.signum is not None:  # the second signal: stop now
            self.restore()
            raise KeyboardInterrupt
        self.signum = signum

    def install(self) -> StopOnSignal:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}

    def _on_step(self) -> bool:
        return self.signum is None


def train(
    config: TrainConfig,
    run_dir: Path | None = None,
    resume: bool = False,
    command: list[str] | None = None,
    progress_bar: bool = False,
    extra_callbacks: list[BaseCallback] | None = None,
) -> Path:
    """Train ``config`` and return the run directory.

    :param config: the resolved config.
    :param run_dir: where to write; a fresh timestamped folder under ``runs/`` when None.
    :param resume: continue the run in ``run_dir`` from its newest checkpoint, with the step counter
        and the schedules where they were, up to ``config.total_timesteps``.
    :param command: the command line to record.
    :param progress_bar: show a progress bar.
    :param extra_callbacks: more SB3 callbacks.
    """
    check_config(config)  # before anything is written
    host.apply_allocator(config.allocator)
    created = run_dir is None
    if run_dir is None:
        run_dir = default_run_dir(config)
    run_dir = Path(run_dir)
    if not resume and not run_dir.exists():
        try:
            run_dir.mkdir(parents=True)
            created = True
        except FileExistsError:
            pass  # another process created it a moment ago: the run lock below decides who trains
        except OSError as e:
            raise UsageError(f"cannot create run directory {run_dir}: {e.strerror}") from None
    if not run_dir.is_dir():
        what = "does not exist" if not run_dir.exists() else "is not a folder"
        raise UsageError(f"run directory {run_dir} {what}: pass the folder of a run")
    lock = RunLock(run_dir).acquire()
    stop = StopOnSignal().install()
    try:
        return _train_locked(config, run_dir, resume, command, progress_bar, extra_callbacks, stop)
    finally:
        stop.restore()
        lock.release()
        if created and {p.name for p in run_dir.iterdir()} <= {LOCK_FILE}:
            # Failed before writing anything: leave nothing that looks like a run behind.
            (run_dir / LOCK_FILE).unlink(missing_ok=True)
            run_dir.rmdir()


def _train_locked(
    config: TrainConfig,
    run_dir: Path,
    resume: bool,
    command: list[str] | None,
    progress_bar: bool,
    extra_callbacks: list[BaseCallback] | None,
    stop: StopOnSignal,
) -> Path:
    """:func:`train` once the run directory is locked."""
    for stale in [*run_dir.glob(".*.tmp*"), *run_dir.glob(f"{CHECKPOINT_DIR}/.*.tmp*")]:
        stale.unlink()  # half-written by a process that was killed (we hold the lock)
    if not resume and any(p.name != LOCK_FILE for p in run_dir.iterdir()):
        raise UsageError(f"run directory {run_dir} already exists and is not empty: pass --resume or another --run-dir")

    # Everything that can fail on bad input happens before the run directory is written.
    env = make_env(config)
    try:
        model = build_model(config, env) if not resume else _load_newest(config, run_dir, env)
    except UsageError:
        env.close()
        raise
    if resume and config.total_timesteps < model.num_timesteps:
        env.close()
        raise UsageError(
            f"the run in {run_dir} already has {model.num_timesteps} steps: "
            "pass --total-timesteps above that to extend it"
        )
    if stop.signum is not None:
        env.close()
        raise Interrupted(stop.signum, run_dir, None)

    atomic_write_text(run_dir / CONFIG_FILE, yaml.safe_dump(config.to_dict(), sort_keys=False))
    cmd = shlex.join(command or sys.argv)
    with open(run_dir / COMMAND_FILE, "a") as f:
        f.write(("resume: " if resume else "") + cmd + "\n")
    atomic_write_text(run_dir / VERSIONS_FILE, json.dumps(versions(), indent=2) + "\n")
    # A resumed run writes a CSV of its own beside the first (SB3 would truncate progress.csv);
    # points logged after the checkpoint it resumes from (by a process that was killed) are
    # dropped from the earlier CSVs and, through purge_step, from TensorBoard.
    suffix = f"_resume{model.num_timesteps}" if resume else ""
    tb_dir = run_dir / TB_DIR
    tensorboard = make_output_format("tensorboard", str(tb_dir))
    if resume:
        purge_progress(tb_dir, model.num_timesteps)
        assert isinstance(tensorboard, TensorBoardOutputFormat)
        tensorboard.writer.close()
        tensorboard.writer = SummaryWriter(str(tb_dir), purge_step=model.num_timesteps + 1)
    model.set_logger(Logger(str(tb_dir), [tensorboard, make_output_format("csv", str(tb_dir), suffix)]))

    callbacks: list[BaseCallback] = [stop]
    if config.checkpoint_freq > 0:
        callbacks.append(CheckpointCallback(run_dir, config.checkpoint_freq))
    if config.core == "rims":
        if config.rims.k_anneal > 0:
            callbacks.append(AnnealK(config.total_timesteps))
        callbacks.append(RIMActivityCallback(config.rim_log_freq, config.rim_image_freq))
    if config.video_freq > 0:
        callbacks.append(VideoCallback(config, config.video_freq, run_dir))
    if config.eval_freq > 0 and config.eval_shifts:
        callbacks.append(ShiftEvalCallback(config, config.eval_shifts, config.eval_freq, config.eval_episodes))
    callbacks += extra_callbacks or []

    remaining = config.total_timesteps - model.num_timesteps
    try:
        if remaining > 0:
            model.learn(
                total_timesteps=remaining,
                callback=CallbackList(callbacks),
                reset_num_timesteps=not resume,
                progress_bar=progress_bar,
            )
    except OSError as e:  # a checkpoint could not be written (disk full, folder removed)
        newest = latest_checkpoint(run_dir)
        kept = f"the newest complete checkpoint is {newest}" if newest else "no checkpoint was written"
        raise UsageError(f"cannot write to {run_dir}: {e.strerror or e}; {kept}") from None
    except BaseException as e:
        if not _finite(model):
            newest = latest_checkpoint(run_dir)
            kept = f"the newest checkpoint, {newest}, was saved before" if newest else "no checkpoint was saved"
            raise UsageError(
                f"training diverged at step {model.num_timesteps} (NaN or inf in the policy; lower "
                f"ppo.learning_rate or ppo.max_grad_norm); {kept}"
            ) from None
        # Keep what was trained: an interrupted run can be resumed from here. A checkpoint of the
        # same step is never overwritten (this model may be half way through an update).
        path = checkpoint_path(run_dir, model.num_timesteps)
        if model.num_timesteps > 0 and not path.exists():
            save_model(model, path)
        if isinstance(e, ValueError) and "nan" in str(e).lower():
            raise UsageError(f"training failed at step {model.num_timesteps}: {str(e).splitlines()[0]}") from None
        raise
    finally:
        env.close()
    try:
        last = save_model(model, checkpoint_path(run_dir, model.num_timesteps))
        if stop.signum is not None:
            raise Interrupted(stop.signum, run_dir, last)
        save_model(model, run_dir / FINAL_MODEL)
    except OSError as e:
        raise UsageError(f"cannot write the trained model to {run_dir}: {e.strerror or e}") from None
    return run_dir


def _finite(model: RIMPPO) -> bool:
    """Whether every parameter of the policy is finite."""
    return all(bool(th.isfinite(p).all()) for p in model.policy.parameters())


def _load_newest(config: TrainConfig, run_dir: Path, env: VecEnv) -> RIMPPO:
    """The newest readable checkpoint of a run; a damaged one is renamed ``*.damaged`` (kept, not
    deleted) with a warning, and the one before it is used."""
    while (checkpoint := latest_checkpoint(run_dir)) is not None:
        try:
            return load_model(config, checkpoint, env)
        except DamagedCheckpoint as e:
            aside = checkpoint.with_name(checkpoint.name + ".damaged")
            checkpoint.rename(aside)
            print(f"warning: {e}; kept as {aside.name}, resuming from the checkpoint before it", file=sys.stderr)
    raise UsageError(f"cannot resume {run_dir}: it holds no checkpoint (checkpoints/step_*.zip) that can be read")
