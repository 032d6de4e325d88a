"""Evaluate checkpoints under distribution shifts, with confidence intervals (the statistics are
:mod:`rim_agents.stats`', the episodes :mod:`rim_agents.rollout`', the outputs :mod:`rim_agents.report`').

For every checkpoint and shift we run N episodes on vectorised envs (recurrent state carried, and
reset where an episode starts, as in training), then report the mean return with a 95% bootstrap
interval over episodes, the success rate (MiniGrid), the episode length and the drop relative to
``none``. Checkpoints whose configs differ only in the seed are aggregated as seeds: the
interquartile mean (IQM) of their per-seed scores with a 95% stratified bootstrap interval over
seeds, as rliable (Agarwal et al., 2021) computes it for one task.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from stable_baselines3.common.utils import set_random_seed
from stable_baselines3.common.vec_env import VecEnv

from rim_agents.config import TrainConfig, env_family, flat_keys
from rim_agents.errors import UsageError
from rim_agents.models import load_model, make_env
from rim_agents.ppo import RIMPPO
from rim_agents.rollout import Episodes, run_episodes
from rim_agents.runs import (
    CONFIG_FILE,
    FINAL_MODEL,
    STUDY_FILE,
    load_run_config,
    newest_model,
    study_runs,
)
from rim_agents.shifts import DEFAULT_SHIFTS, ShiftSpec, shift_spec
from rim_agents.stats import bootstrap_ci, iqm, stratified_bootstrap_iqm

# --------------------------------------------------------------------------------- checkpoints


@dataclass
class Checkpoint:
    path: Path
    run_dir: Path
    config: TrainConfig
    model: RIMPPO


def resolve_checkpoint(target: str | Path, device: str = "auto") -> Checkpoint:
    """A run directory (its final model, else its newest checkpoint) or a checkpoint file."""
    path = Path(target)
    if path.is_dir():
        run_dir = path
        if not (run_dir / CONFIG_FILE).is_file():
            raise UsageError(f"{path} is not a run directory (no {CONFIG_FILE}): pass a folder written by train.py")
        ckpt = newest_model(run_dir)
        if ckpt is None:
            raise UsageError(f"run directory {path} holds no model yet (no {FINAL_MODEL}, no checkpoints/step_*.zip)")
    elif path.is_file():
        ckpt = path
        candidates = [path.parent, path.parent.parent]
        found = [c for c in candidates if (c / CONFIG_FILE).is_file()]
        if not found:
            raise UsageError(f"checkpoint {path} is not inside a run directory (no {CONFIG_FILE} beside it or above)")
        run_dir = found[0]
    else:
        raise UsageError(f"checkpoint or run directory {path} does not exist")
    config = load_run_config(run_dir)
    # Rebuilt from the run's config with weights-only tensors: nothing in the file is unpickled.
    model = load_model(config, ckpt, device=device)
    return Checkpoint(ckpt, run_dir, config, model)


def expand_studies(targets: Sequence[str | Path]) -> list[str | Path]:
    """A study folder (it holds ``study.json``) stands for its trained runs, in the study's order."""
    out: list[str | Path] = []
    for t in targets:
        path = Path(t)
        if path.is_dir() and not (path / CONFIG_FILE).is_file() and (path / STUDY_FILE).is_file():
            runs = study_runs(path)
            if not runs:
                raise UsageError(f"study {path} has no trained run yet: run study.py first")
            out += runs
        else:
            out.append(t)
    return out


def check_spaces(ckpt: Checkpoint, env: VecEnv, shift: str) -> None:
    if env.observation_space != ckpt.model.observation_space or env.action_space != ckpt.model.action_space:
        raise UsageError(
            f"checkpoint {ckpt.path} does not fit {ckpt.config.env} under shift {shift!r}: the model expects "
            f"{ckpt.model.observation_space} / {ckpt.model.action_space}, the env gives "
            f"{env.observation_space} / {env.action_space}"
        )


# ----------------------------------------------------------------------------------- evaluate


@dataclass
class ShiftResult:
    """One checkpoint under one shift."""

    episodes: int
    mean_return: float
    ci95: list[float]  # bootstrap interval of the mean return over episodes
    success_rate: float | None  # MiniGrid-like envs that report success
    success_ci95: list[float] | None
    mean_length: float
    returns: list[float]
    drop: float  # mean return under none minus under this shift
    relative_drop: float | None


@dataclass
class CheckpointResult:
    """One checkpoint under every shift evaluated."""

    checkpoint: str
    run_dir: str
    env: str
    core: str
    seed: int
    num_timesteps: int
    group: str  # the config's identity (TrainConfig.identity) as JSON: seeds of one group share it
    shifts: dict[str, ShiftResult] = field(default_factory=dict)


@dataclass
class GroupShiftResult:
    """The seeds of one group under one shift."""

    iqm_return: float
    ci95: list[float]  # stratified bootstrap over seeds (over episodes for a single seed)
    iqm_drop: float
    per_seed_returns: list[float]
    iqm_success: float | None = None
    success_ci95: list[float] | None = None


@dataclass
class GroupResult:
    """Checkpoints whose configs differ only in run-only settings (seeds of one configuration)."""

    label: str
    env: str
    core: str
    seeds: list[int]
    checkpoints: list[str]
    shifts: dict[str, GroupShiftResult]


@dataclass
class EvaluationResults:
    """What :func:`evaluate` returns; ``to_dict()`` is ``results.json``."""

    settings: dict[str, Any]
    checkpoints: list[CheckpointResult]
    groups: list[GroupResult]

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _group_key(config: TrainConfig) -> str:
    """Runs whose configs differ only in run-only settings (seed, budget, ...) are seeds of one group."""
    return json.dumps(config.identity(), sort_keys=True)


def evaluate(
    targets: Sequence[str | Path],
    shifts: str | Sequence[str] = "all",
    episodes: int = 100,
    seed: int = 0,
    deterministic: bool = False,
    n_envs: int = 8,
    device: str = "auto",
    progress: bool = False,
    on_result: Callable[[EvaluationResults], None] | None = None,
) -> EvaluationResults:
    """Evaluate checkpoints under shifts and aggregate seeds.

    ``on_result`` receives the results so far after every checkpoint x shift (so that a caller can
    write them as they come and an interrupt keeps them). Torch, NumPy and the envs are seeded
    with ``seed`` before each checkpoint x shift.

    Everything that can fail on bad input (paths, checkpoints, shift names, space mismatches) is
    checked before the first episode runs.

    :return: per checkpoint and shift, and per group of seeds and shift.
    """
    if episodes < 1:
        raise UsageError(f"--episodes must be positive, got {episodes}")
    ckpts = [resolve_checkpoint(t, device) for t in expand_studies(targets)]
    if not ckpts:
        raise UsageError("no checkpoint given: pass run directories or checkpoint files")
    plans: list[tuple[Checkpoint, list[tuple[str, ShiftSpec]]]] = []
    for ckpt in ckpts:
        family = env_family(ckpt.config.env)
        names = list(DEFAULT_SHIFTS[family]) if shifts == "all" else list(shifts)
        if "none" not in names:
            names.insert(0, "none")  # the reference for the drop
        specs = [(name, shift_spec(ckpt.config, name)) for name in names]
        for name, spec in specs:
            env = make_env(ckpt.config, 1, seed, spec)
            try:
                check_spaces(ckpt, env, name)
            finally:
                env.close()
        plans.append((ckpt, specs))

    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=sum(len(s) for _, s in plans) * episodes, unit="episode", desc="evaluating")
    results: list[CheckpointResult] = []
    settings = {"episodes": episodes, "seed": seed, "deterministic": deterministic}

    def report() -> EvaluationResults:
        return EvaluationResults(settings, results, aggregate(results, seed))

    for ckpt, specs in plans:
        entry = CheckpointResult(
            str(ckpt.path),
            str(ckpt.run_dir),
            ckpt.config.env,
            ckpt.config.core,
            ckpt.config.seed,
            int(ckpt.model.num_timesteps),
            _group_key(ckpt.config),
        )
        per_shift = entry.shifts
        results.append(entry)
        for name, spec in specs:
            eps = episodes_under(ckpt, spec, episodes, seed, deterministic, n_envs, bar.update if bar else None)
            low, high = bootstrap_ci(eps.returns, seed=seed)
            ref = per_shift["none"].mean_return if per_shift else float(np.mean(eps.returns))
            mean = float(np.mean(eps.returns))
            per_shift[name] = ShiftResult(
                episodes=len(eps.returns),
                mean_return=mean,
                ci95=[low, high],
                success_rate=float(np.mean(eps.successes)) if eps.successes else None,
                success_ci95=list(bootstrap_ci(eps.successes, seed=seed)) if eps.successes else None,
                mean_length=float(np.mean(eps.lengths)),
                returns=eps.returns,
                drop=ref - mean,
                relative_drop=(ref - mean) / abs(ref) if ref else None,
            )
            if on_result is not None:
                on_result(report())
    if bar is not None:
        bar.close()
    return report()


def episodes_under(
    ckpt: Checkpoint,
    spec: ShiftSpec,
    episodes: int,
    seed: int,
    deterministic: bool = False,
    n_envs: int = 8,
    on_episode: Callable[[], None] | None = None,
) -> Episodes:
    """``episodes`` episodes of ``ckpt``'s model under one shift, seeded with ``seed`` first so that
    a result does not depend on what ran before it."""
    set_random_seed(seed)
    env = make_env(ckpt.config, min(n_envs, episodes), seed, spec)
    try:
        return run_episodes(ckpt.model, env, episodes, deterministic, on_episode)
    finally:
        env.close()


def aggregate(results: list[CheckpointResult], seed: int = 0) -> list[GroupResult]:
    """Group checkpoints whose configs differ only in run-only settings; IQM and stratified bootstrap."""
    groups: dict[str, list[CheckpointResult]] = {}
    for r in results:
        groups.setdefault(r.group, []).append(r)
    envs = {r.env for r in results}
    flat = {key: flat_keys(json.loads(key)) for key in groups}
    out = []
    for key, members in groups.items():
        first = members[0]
        label = first.core if len(envs) == 1 else f"{first.env} {first.core}"
        # Groups of one core that differ in other settings: name the settings that differ.
        rivals = [flat[k] for k, m in groups.items() if m[0].core == first.core and m[0].env == first.env]
        if len(rivals) > 1:
            differing = sorted(k for k in flat[key] if len({str(r.get(k)) for r in rivals}) > 1)
            label += " (" + ", ".join(f"{k.split('.')[-1]}={flat[key][k]}" for k in differing) + ")"
        shift_names = [s for s in first.shifts if all(s in m.shifts for m in members)]
        per_shift = {}
        for name in shift_names:
            returns = [m.shifts[name].mean_return for m in members]
            drops = [m.shifts[name].drop for m in members]
            point, low, high = stratified_bootstrap_iqm({name: returns}, seed=seed)
            if len(members) == 1:  # one seed: the interval over its episodes
                low, high = first.shifts[name].ci95
            entry = GroupShiftResult(point, [low, high], iqm(drops), returns)
            succ = [m.shifts[name].success_rate for m in members]
            if all(s is not None for s in succ):
                s_point, s_low, s_high = stratified_bootstrap_iqm({name: succ}, seed=seed)  # type: ignore[dict-item]
                if len(members) == 1:
                    s_low, s_high = first.shifts[name].success_ci95 or [s_low, s_high]
                entry.iqm_success, entry.success_ci95 = s_point, [s_low, s_high]
            per_shift[name] = entry
        seeds = [m.seed for m in members]
        out.append(GroupResult(label, first.env, first.core, seeds, [m.checkpoint for m in members], per_shift))
    return out
