"""One training run: build env and model from a config, train, and keep a complete run directory.

Run directory layout::

    config.yaml            resolved config (defaults < YAML < command line)
    command.txt            the command that started (or resumed) the run
    versions.json          package versions and git commit
    tb/                    TensorBoard logs, progress.csv (and progress_resume<step>.csv)
    checkpoints/step_N.zip periodic checkpoints, written atomically
    final_model.zip        the trained model, written last: a run without it is not finished
    .lock                  held (``flock``) by the process training in the folder

One process at a time trains in a run directory: a second gets a one-line error. SIGTERM and
SIGINT stop training at the next env step (never inside an update), save a checkpoint and raise
:class:`Interrupted`; a second signal stops at once.
"""

from __future__ import annotations

import copy
import csv
import dataclasses
import datetime as dt
import fcntl
import io
import json
import os
import pickle
import platform
import shlex
import signal
import subprocess
import sys
import threading
import zipfile
from importlib import metadata
from pathlib import Path
from types import FrameType
from typing import Any

import torch as th
import yaml
from gymnasium import spaces
from stable_baselines3.common.callbacks import BaseCallback, CallbackList
from stable_baselines3.common.logger import Logger, TensorBoardOutputFormat, make_output_format
from stable_baselines3.common.utils import LinearSchedule
from stable_baselines3.common.vec_env import VecEnv
from torch.utils.tensorboard import SummaryWriter

from rim_agents.callbacks import CheckpointCallback, RIMActivityCallback, ShiftEvalCallback, VideoCallback
from rim_agents.checkpoints import (
    CHECKPOINT_DIR,
    FINAL_MODEL,
    atomic_write_text,
    checkpoint_path,
    latest_checkpoint,
    save_model,
)
from rim_agents.config import TrainConfig, config_from_dict
from rim_agents.envs import make_vec_env
from rim_agents.errors import UsageError
from rim_agents.extractors import auto_extractor, extractor_class
from rim_agents.policy import RIMPolicy
from rim_agents.ppo import RIMPPO

CONFIG_FILE = "config.yaml"
PACKAGES = ("rim-agents", "torch", "gymnasium", "ale-py", "stable-baselines3", "sb3-contrib", "minigrid", "numpy")


def schedule(value: float | str) -> float | LinearSchedule:
    """``"lin_X"`` -> linear decay from X to 0 over training; a number -> constant."""
    if isinstance(value, str):
        return LinearSchedule(float(value[4:]), 0.0, 1.0)
    return float(value)


def policy_kwargs(config: TrainConfig, observation_space: spaces.Space | None = None) -> dict[str, Any]:
    """The policy's arguments; ``features_extractor: auto`` is resolved from ``observation_space``."""
    p = config.policy
    name, normalize = p.features_extractor, p.normalize_images
    if name == "auto":
        assert observation_space is not None, "features_extractor=auto needs the observation space"
        name = auto_extractor(observation_space)
        normalize = normalize or name == "nature_cnn"  # uint8 images are scaled to [0, 1]
    return {
        "core": config.core,
        "core_kwargs": dataclasses.asdict(config.rims) if config.core == "rims" else {},
        "lstm_hidden_size": p.lstm_hidden_size,
        "n_lstm_layers": p.n_lstm_layers,
        "enable_critic_lstm": p.enable_critic_lstm,
        "shared_lstm": p.shared_lstm,
        "ortho_init": p.ortho_init,
        "normalize_images": normalize,
        "net_arch": list(p.net_arch),
        "features_extractor_class": extractor_class(name),
        "features_extractor_kwargs": dict(p.features_extractor_kwargs),
    }


def make_env(config: TrainConfig, seed: int | None = None, n_envs: int | None = None) -> VecEnv:
    options = dataclasses.asdict(config.env_options)
    return make_vec_env(
        config.env,
        n_envs or config.n_envs,
        config.seed if seed is None else seed,
        env_packages=config.env_packages,
        **options,
    )


def build_model(config: TrainConfig, env: VecEnv) -> RIMPPO:
    """A fresh model for ``config`` on ``env``; bad settings raise :class:`UsageError`."""
    ppo = config.ppo
    dict_ready = ("minigrid", "combined", "auto")
    if isinstance(env.observation_space, spaces.Dict) and config.policy.features_extractor not in dict_ready:
        raise UsageError(
            f"environment {config.env} has dict observations: set policy.features_extractor to one of "
            f"{', '.join(dict_ready)}"
        )
    try:
        return RIMPPO(
            RIMPolicy,
            env,
            seq_len=ppo.seq_len,
            n_steps=ppo.n_steps,
            batch_size=ppo.batch_size,
            n_epochs=ppo.n_epochs,
            learning_rate=schedule(ppo.learning_rate),
            clip_range=schedule(ppo.clip_range),
            ent_coef=ppo.ent_coef,
            vf_coef=ppo.vf_coef,
            gamma=ppo.gamma,
            gae_lambda=ppo.gae_lambda,
            max_grad_norm=ppo.max_grad_norm,
            normalize_advantage=ppo.normalize_advantage,
            target_kl=ppo.target_kl,
            policy_kwargs=policy_kwargs(config, env.observation_space),
            seed=config.seed,
            device=config.device,
            verbose=0,
        )
    except (ValueError, AssertionError, RuntimeError, TypeError) as e:
        raise UsageError(f"cannot build the model: {(str(e).splitlines() or [type(e).__name__])[0]}") from None
    except MemoryError:
        raise UsageError(
            f"cannot build the model: not enough memory for a rollout of {config.n_envs} envs x "
            f"{ppo.n_steps} steps; lower ppo.n_steps or n_envs"
        ) from None


#: Entries of SB3's ``data`` that resume needs, read as plain JSON numbers (never unpickled).
_RESUME_DATA = ("num_timesteps", "_n_updates", "_current_progress_remaining", "_episode_num")


def load_model(config: TrainConfig, checkpoint: Path, env: VecEnv | None = None, device: str | None = None) -> RIMPPO:
    """Load a checkpoint of a run without unpickling anything from it.

    SB3's ``load`` unpickles the ``data`` entry of the zip, which runs whatever code a crafted file
    holds. Here the model is rebuilt from the run's ``config.yaml`` (read as safe YAML), its
    tensors are read with ``torch.load(weights_only=True)``, and the step counter and schedule
    progress are read from ``data`` as plain JSON numbers.

    :param config: the run's config.
    :param checkpoint: a ``.zip`` written by this package (``save_model``).
    :param env: the env the model will run on (spaces must match the run's); one of the run's
        own is made and closed when None.
    :param device: overrides ``config.device``.
    """
    try:
        with zipfile.ZipFile(checkpoint) as archive:
            data = json.loads(archive.read("data"))
            tensors = {
                name: th.load(io.BytesIO(archive.read(f"{name}.pth")), map_location="cpu", weights_only=True)
                for name in ("policy", "policy.optimizer")
            }
    except (OSError, KeyError, ValueError, RuntimeError, zipfile.BadZipFile, pickle.UnpicklingError) as e:
        first = (str(e).splitlines() or [type(e).__name__])[0]
        raise DamagedCheckpoint(f"cannot load checkpoint {checkpoint}: {first}") from None
    config = copy.deepcopy(config)
    if device is not None:
        config.device = device
    if config.core == "rims" and not any(k.endswith("input_query_b") for k in tensors["policy"]):
        config.rims.input_query_bias = False  # a checkpoint from before the query bias existed
    own_env = env is None
    env = make_env(config, n_envs=1) if env is None else env
    try:
        model = build_model(config, env)
    finally:
        if own_env:
            env.close()
    try:
        model.policy.load_state_dict(tensors["policy"])
        model.policy.optimizer.load_state_dict(tensors["policy.optimizer"])
    except (RuntimeError, ValueError, KeyError) as e:
        lines = [line.strip() for line in str(e).splitlines() if line.strip()]
        detail = next((line for line in lines if "size mismatch" in line or "key" in line.lower()), lines[0])
        raise UsageError(
            f"checkpoint {checkpoint} does not fit {config.env} as its run's {CONFIG_FILE} builds it: {detail[:200]}"
        ) from None
    for key in _RESUME_DATA:
        if isinstance(data.get(key), (int, float)) and not isinstance(data.get(key), bool):
            setattr(model, key, data[key])
    return model


def versions() -> dict[str, Any]:
    out: dict[str, Any] = {"python": sys.version.split()[0], "platform": platform.platform()}
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


LOCK_FILE = ".lock"


class Interrupted(Exception):
    """Training stopped by a signal; a checkpoint was saved (``checkpoint`` is None when nothing
    had been trained yet)."""

    def __init__(self, signum: int, run_dir: Path, checkpoint: Path | None) -> None:
        self.signum, self.run_dir, self.checkpoint = signum, run_dir, checkpoint
        name = signal.Signals(signum).name
        where = (
            f"checkpoint {checkpoint}; continue with: python train.py --resume {run_dir}"
            if checkpoint
            else "nothing trained yet"
        )
        super().__init__(f"stopped by {name}: {where}")


class DamagedCheckpoint(UsageError):
    """A checkpoint file that cannot be read (truncated, not a zip, bad tensors)."""


class RunLock:
    """An exclusive lock on a run directory, held while a process trains in it.

    ``flock`` on ``run_dir/.lock``: the kernel drops it when the process exits or dies, so a lock
    left by a killed process never blocks. The file keeps the holder's pid for the error message.
    """

    def __init__(self, run_dir: Path) -> None:
        self.path = run_dir / LOCK_FILE
        self.fd: int | None = None

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
                f"run directory {self.path.parent} is in use by another training process (pid {holder}): "
                "wait for it to finish or choose another --run-dir"
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
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError:
        raise UsageError(f"{path} is not valid YAML: the run directory is damaged") from None
    return config_from_dict(data)


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
    created = run_dir is None
    if run_dir is None:
        run_dir = default_run_dir(config)
    run_dir = Path(run_dir)
    if not resume and not run_dir.exists():
        try:
            run_dir.mkdir(parents=True)
        except OSError as e:
            raise UsageError(f"cannot create run directory {run_dir}: {e.strerror}") from None
        created = True
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
    with open(run_dir / "command.txt", "a") as f:
        f.write(("resume: " if resume else "") + cmd + "\n")
    atomic_write_text(run_dir / "versions.json", json.dumps(versions(), indent=2) + "\n")
    # A resumed run writes a CSV of its own beside the first (SB3 would truncate progress.csv);
    # points logged after the checkpoint it resumes from (by a process that was killed) are
    # dropped from the earlier CSVs and, through purge_step, from TensorBoard.
    suffix = f"_resume{model.num_timesteps}" if resume else ""
    tb_dir = run_dir / "tb"
    tensorboard = make_output_format("tensorboard", str(tb_dir))
    if resume:
        _purge_progress(tb_dir, model.num_timesteps)
        assert isinstance(tensorboard, TensorBoardOutputFormat)
        tensorboard.writer.close()
        tensorboard.writer = SummaryWriter(str(tb_dir), purge_step=model.num_timesteps + 1)
    model.set_logger(Logger(str(tb_dir), [tensorboard, make_output_format("csv", str(tb_dir), suffix)]))

    callbacks: list[BaseCallback] = [stop]
    if config.checkpoint_freq > 0:
        callbacks.append(CheckpointCallback(run_dir, config.checkpoint_freq))
    if config.core == "rims":
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


def _purge_progress(tb_dir: Path, step: int) -> None:
    """Drop rows logged after ``step`` from the run's progress CSVs (rewritten atomically)."""
    for path in sorted(tb_dir.glob("progress*.csv")):
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
