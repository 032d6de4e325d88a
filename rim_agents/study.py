"""Studies: envs x variants x seeds, trained and then evaluated as Ray tasks, resumable, aggregated.

A study spec (YAML, ``configs/studies/*.yaml``) names the envs (with env kwargs), the variants (a
core plus ``KEY=VALUE`` overrides of the training config), the seeds, the budget, the evaluation
(shifts, episodes) and, optionally, bars a variant must pass and a search space for tuning.
:func:`run_study` turns it into ordinary run directories under the study folder::

    <study>/spec.yaml                      the spec as it was run
    <study>/study.json                     every run's state, attempts, errors and wall times
    <study>/runs/<env>/<variant>/s<seed>/  a run directory, as train.py writes it
    <study>/runs/<env>/<variant>/s<seed>.log
    <study>/evaluations/<env>/<variant>/s<seed>.json   one run's evaluation (reused when unchanged)
    <study>/results/                       results.json/.csv, chart.png (as evaluate.py writes them),
                                           table.md, runs.md, curves_<env>.png
    <study>/tune/                          the tuning trials' runs and tuning.json (``--tune N``)

Every training run and every evaluation is a Ray task with one CPU and one torch thread (and a GPU
fraction when the spec asks for one and the cluster has GPUs). A study started again skips finished
runs, resumes interrupted ones from their newest checkpoint and never deletes a run folder; a task
whose process dies (killed worker, out of memory) is submitted again, so that it resumes from its
checkpoint, up to ``retries`` times, and every failure is recorded in ``study.json``.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import datetime as dt
import hashlib
import io
import json
import os
import signal
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch as th
import yaml

from rim_agents.config import TrainConfig, env_family, flat_keys, load_config, load_yaml, read_yaml, yaml_error_text
from rim_agents.errors import UsageError
from rim_agents.evaluation import (
    CheckpointResult,
    EvaluationResults,
    ShiftResult,
    aggregate,
    evaluate,
)
from rim_agents.report import curves_png, format_table, write_outputs
from rim_agents.runs import (
    CONFIG_FILE,
    FINAL_MODEL,
    STUDY_FILE,
    STUDY_RUNS_DIR,
    RunLock,
    atomic_write_bytes,
    atomic_write_text,
    checkpoint_step,
    latest_checkpoint,
    load_run_config,
    newest_model,
    read_progress,
    study_run_dir,
    train_seconds,
)
from rim_agents.shifts import parse_shift
from rim_agents.stats import bootstrap_ci, iqm
from rim_agents.training import train

SPEC_FILE = "spec.yaml"
EVAL_DIR = "evaluations"
RESULTS_DIR = "results"
TUNE_DIR = "tune"
#: success and return: of the evaluation under none; train_return: the last logged mean return of
#: the run's last 100 training episodes (``rollout/ep_rew_mean``).
METRICS = ("success", "return", "train_return")

# ------------------------------------------------------------------------------------------ spec


@dataclass(frozen=True)
class Bar:
    """What one seed must reach (``min``) or stay under (``max``) on ``metric`` (evaluated under
    ``none``), and the fraction of seeds that must do so. With ``of`` (a variant), ``min`` and
    ``max`` are factors of that variant's value on the same seed (e.g. >= 0.8x none's return)."""

    metric: str = "success"
    min: float | None = None
    max: float | None = None
    need: float = 1.0
    of: str | None = None

    def passes(self, value: float, reference: float | None = None) -> bool:
        """Whether ``value`` passes; a relative bar needs a positive ``reference`` (a factor of a
        return of 0 or below, as on Pendulum, says nothing about which run did better)."""
        if self.of is not None:
            if reference is None or not reference > 0:
                return False
            low = None if self.min is None else self.min * reference
            high = None if self.max is None else self.max * reference
        else:
            low, high = self.min, self.max
        return (low is None or value >= low) and (high is None or value <= high)

    def condition(self) -> str:
        times = f"x {self.of}'s" if self.of else ""
        parts = [f">= {self.min:g}{times}"] if self.min is not None else []
        parts += [f"<= {self.max:g}{times}"] if self.max is not None else []
        return f"{self.metric} {' and '.join(parts)}"

    def text(self) -> str:
        return f"{self.condition()} on {self.need:.0%} of seeds"


@dataclass(frozen=True)
class EnvSpec:
    name: str
    env: str
    env_kwargs: dict[str, Any] = field(default_factory=dict)
    steps: int | None = None
    overrides: tuple[str, ...] = ()
    bars: dict[str, tuple[Bar, ...]] = field(default_factory=dict)  # variant (or "default") -> its bars
    shifts: tuple[str, ...] | None = None  # this env's evaluation shifts instead of the study's

    def bar(self, variant: str, core: str) -> tuple[Bar, ...]:
        """The bars a seed of ``variant`` must all pass (none: no bar)."""
        return self.bars.get(variant, self.bars.get(core, self.bars.get("default", ())))


@dataclass(frozen=True)
class VariantSpec:
    name: str
    core: str
    overrides: tuple[str, ...] = ()
    seeds: tuple[int, ...] | None = None  # None: the study's seeds


@dataclass(frozen=True)
class EvalSpec:
    shifts: str | tuple[str, ...] = "all"
    episodes: int = 100
    seed: int = 1_000_000  # env seeds disjoint from every training env's
    deterministic: bool = False
    n_envs: int = 8


@dataclass(frozen=True)
class TuneSpec:
    """Ray Tune (Optuna's TPE) over ``space``, the same number of trials for every variant, each
    trial trained on the tuning ``seeds`` and scored on ``metric`` under ``none``."""

    seeds: tuple[int, ...] = (100, 101)
    metric: str = "success"
    episodes: int = 50
    steps: int | None = None  # None: the env's budget
    space: dict[str, dict[str, list[Any]]] = field(default_factory=dict)


@dataclass(frozen=True)
class StudySpec:
    name: str
    envs: tuple[EnvSpec, ...]
    variants: tuple[VariantSpec, ...]
    seeds: tuple[int, ...]
    steps: int
    overrides: tuple[str, ...] = ()
    config: str | None = None  # a config YAML every run starts from (relative to the spec)
    evaluation: EvalSpec = EvalSpec()
    tune: TuneSpec | None = None
    retries: int = 2
    gpus_per_run: float = 0.0
    source: dict[str, Any] = field(default_factory=dict)  # the YAML as read


def _shifts(value: Any) -> str | tuple[str, ...]:
    """``all``, a list of shift names or one comma-separated string of them."""
    if isinstance(value, list):
        return tuple(str(s) for s in value)
    return "all" if value == "all" else tuple(s for s in str(value).split(",") if s)


def _check_shifts(shifts: tuple[str, ...], env_id: str, env_kwargs: dict[str, Any], where: str) -> None:
    """Refuse, when the spec is read, a shift that the env cannot take (e.g. ``cue-0`` without a cue)."""
    for name in shifts:
        try:
            parse_shift(name, env_family(env_id), env_kwargs, env_id)
        except (UsageError, ValueError) as e:
            raise UsageError(f"{where}: {e}") from None


def env_evaluation(spec: StudySpec, env: EnvSpec) -> EvalSpec:
    """The evaluation settings of ``env``'s runs: the study's, with the env's own shifts if it has any."""
    return spec.evaluation if env.shifts is None else dataclasses.replace(spec.evaluation, shifts=env.shifts)


def parse_seeds(value: Any, where: str) -> tuple[int, ...]:
    """``[0, 1, 5]``, ``"0-9"``, ``"0-4,7"`` or one integer."""
    if isinstance(value, bool):
        raise UsageError(f"{where}: {value!r} is not a list of seeds (e.g. 0-9 or [0, 1, 2])")
    if isinstance(value, int):
        return (value,)
    seeds: list[int] = []
    try:
        if isinstance(value, str):
            for part in value.split(","):
                lo, _, hi = part.strip().partition("-")
                seeds += list(range(int(lo), int(hi) + 1)) if hi else [int(lo)]
        elif isinstance(value, list):
            seeds = [int(v) for v in value if not isinstance(v, bool)]
            if len(seeds) != len(value):
                raise ValueError
        else:
            raise ValueError
    except ValueError:
        raise UsageError(f"{where}: {value!r} is not a list of seeds (e.g. 0-9 or [0, 1, 2])") from None
    if not seeds or len(set(seeds)) != len(seeds) or min(seeds) < 0:
        raise UsageError(f"{where}: {value!r} must name distinct non-negative seeds")
    return tuple(seeds)


def _mapping(data: Any, where: str, allowed: set[str], required: set[str] | None = None) -> dict[str, Any]:
    if not isinstance(data, dict):
        raise UsageError(f"{where} must be a mapping, got {type(data).__name__}")
    unknown = sorted(set(data) - allowed)
    if unknown:
        raise UsageError(f"{where}: unknown key {unknown[0]!r}; allowed: {', '.join(sorted(allowed))}")
    missing = sorted((required or set()) - set(data))
    if missing:
        raise UsageError(f"{where}: missing key {missing[0]!r}")
    return data


def _overrides(value: Any, where: str) -> tuple[str, ...]:
    if value is None:
        return ()
    if not isinstance(value, list) or not all(isinstance(v, str) and "=" in v for v in value):
        raise UsageError(f"{where} must be a list of KEY=VALUE strings (e.g. [rims.k_active=4])")
    return tuple(value)


def _positive_int(value: Any, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise UsageError(f"{where} must be a positive integer, got {value!r}")
    return value


def _bar(data: Any, where: str) -> Bar:
    d = _mapping(data, where, {"metric", "min", "max", "need", "of"})
    metric = d.get("metric", "success")
    if metric not in METRICS:
        raise UsageError(f"{where}.metric must be one of {', '.join(METRICS)}, got {metric!r}")
    for key in ("min", "max"):
        if key in d and (isinstance(d[key], bool) or not isinstance(d[key], (int, float))):
            raise UsageError(f"{where}.{key} must be a number, got {d[key]!r}")
    need = d.get("need", 1.0)
    if isinstance(need, bool) or not isinstance(need, (int, float)) or not 0 < need <= 1:
        raise UsageError(f"{where}.need must be a fraction in (0, 1], got {need!r}")
    if "min" not in d and "max" not in d:
        raise UsageError(f"{where} needs min or max")
    return Bar(metric, d.get("min"), d.get("max"), float(need), None if d.get("of") is None else str(d["of"]))


def spec_from_dict(data: Any, name: str = "study") -> StudySpec:
    """A validated spec; every error is one line naming the key."""
    top = {"name", "envs", "variants", "seeds", "steps", "overrides", "config", "evaluation", "tune"}
    d = _mapping(data, "spec", top | {"retries", "gpus_per_run"}, {"envs", "variants", "seeds", "steps"})
    steps = _positive_int(d["steps"], "steps")
    seeds = parse_seeds(d["seeds"], "seeds")
    envs_raw = d["envs"]
    if not isinstance(envs_raw, dict) or not envs_raw:
        raise UsageError("envs must map names to env settings, e.g. pickup-1: {env: RIMAgents/Pickup-6x6-v0}")
    envs = []
    for env_name, raw in envs_raw.items():
        where = f"envs.{env_name}"
        e = _mapping(raw, where, {"env", "env_kwargs", "steps", "overrides", "bars", "shifts"}, {"env"})
        kwargs = e.get("env_kwargs") or {}
        if not isinstance(kwargs, dict):
            raise UsageError(f"{where}.env_kwargs must be a mapping")
        bars_raw = e.get("bars") or {}
        if not isinstance(bars_raw, dict):
            raise UsageError(f"{where}.bars must map variant names (or default) to bars")
        bars = {
            str(k): tuple(_bar(b, f"{where}.bars.{k}") for b in (v if isinstance(v, list) else [v]))
            for k, v in bars_raw.items()
        }
        env_steps = _positive_int(e["steps"], f"{where}.steps") if "steps" in e else None
        env_shifts: tuple[str, ...] | None = None
        if "shifts" in e:
            listed = _shifts(e["shifts"])
            if isinstance(listed, str) or not listed:
                raise UsageError(f"{where}.shifts must list shift names, e.g. [none, cue-0]")
            _check_shifts(listed, str(e["env"]), dict(kwargs), f"{where}.shifts")
            env_shifts = listed
        envs.append(
            EnvSpec(
                str(env_name),
                str(e["env"]),
                dict(kwargs),
                env_steps,
                _overrides(e.get("overrides"), f"{where}.overrides"),
                bars,
                env_shifts,
            )
        )
    variants_raw = d["variants"]
    if not isinstance(variants_raw, dict) or not variants_raw:
        raise UsageError("variants must map names to {core: ..., overrides: [...]}, e.g. rims: {core: rims}")
    variants = []
    for var_name, raw in variants_raw.items():
        where = f"variants.{var_name}"
        v = _mapping(raw if raw is not None else {}, where, {"core", "overrides", "seeds"})
        variant_seeds = parse_seeds(v["seeds"], f"{where}.seeds") if "seeds" in v else None
        core = str(v.get("core", var_name))
        variants.append(
            VariantSpec(str(var_name), core, _overrides(v.get("overrides"), f"{where}.overrides"), variant_seeds)
        )
    ev = _mapping(d.get("evaluation") or {}, "evaluation", {"shifts", "episodes", "seed", "deterministic", "n_envs"})
    evaluation = EvalSpec(
        _shifts(ev.get("shifts", "all")),
        _positive_int(ev.get("episodes", 100), "evaluation.episodes"),
        int(ev.get("seed", 1_000_000)),
        bool(ev.get("deterministic", False)),
        _positive_int(ev.get("n_envs", 8), "evaluation.n_envs"),
    )
    tune = None
    if d.get("tune") is not None:
        t = _mapping(d["tune"], "tune", {"seeds", "metric", "episodes", "steps", "space"}, {"space"})
        space = t["space"]
        if not isinstance(space, dict) or not space:
            raise UsageError(
                "tune.space must map config keys to distributions, e.g. ppo.learning_rate: {loguniform: [1e-4, 1e-3]}"
            )
        for key, dist in space.items():
            if not isinstance(dist, dict) or len(dist) != 1 or next(iter(dist)) not in DISTRIBUTIONS:
                raise UsageError(f"tune.space.{key} must be one of {{{', '.join(DISTRIBUTIONS)}: [...]}}")
            args = next(iter(dist.values()))
            if not isinstance(args, list) or not args:
                raise UsageError(f"tune.space.{key} needs a list of arguments, e.g. [1.0e-4, 1.0e-3]")
        metric = t.get("metric", "success")
        if metric not in METRICS:
            raise UsageError(f"tune.metric must be one of {', '.join(METRICS)}, got {metric!r}")
        tune_seeds = parse_seeds(t.get("seeds", [100, 101]), "tune.seeds")
        if set(tune_seeds) & set(seeds):
            raise UsageError(
                "tune.seeds must differ from the study's seeds: settings are chosen on seeds never reported"
            )
        tune = TuneSpec(
            tune_seeds,
            metric,
            _positive_int(t.get("episodes", 50), "tune.episodes"),
            _positive_int(t["steps"], "tune.steps") if "steps" in t else None,
            {str(k): dict(v) for k, v in space.items()},
        )
    retries = d.get("retries", 2)
    if isinstance(retries, bool) or not isinstance(retries, int) or retries < 0:
        raise UsageError(f"retries must be a non-negative integer, got {retries!r}")
    gpus = d.get("gpus_per_run", 0.0)
    if isinstance(gpus, bool) or not isinstance(gpus, (int, float)) or not 0 <= gpus <= 1:
        raise UsageError(f"gpus_per_run must be a fraction in [0, 1], got {gpus!r}")
    return StudySpec(
        str(d.get("name", name)),
        tuple(envs),
        tuple(variants),
        seeds,
        steps,
        _overrides(d.get("overrides"), "overrides"),
        d.get("config"),
        evaluation,
        tune,
        retries,
        float(gpus),
        dict(d),
    )


def load_spec(path: str | Path) -> StudySpec:
    """Read and validate a spec file; errors are one line that starts with the file's name."""
    path = Path(path)
    if not path.is_file():
        raise UsageError(
            f"study spec {path} does not exist: give a YAML file such as configs/studies/pickup_robustness.yaml"
        )
    try:
        data = load_yaml(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        raise UsageError(f"study spec {path} is not valid YAML: {yaml_error_text(e)}") from None
    try:
        spec = spec_from_dict(data, path.stem)
    except UsageError as e:
        raise UsageError(f"study spec {path}: {e}") from None
    if spec.config is not None:
        config = Path(spec.config)
        spec = dataclasses.replace(spec, config=str(config if config.is_absolute() else path.parent / config))
        read_yaml(config if config.is_absolute() else path.parent / config)  # fails here if missing or broken
    return spec


def narrow(
    spec: StudySpec, envs: str | None = None, variants: str | None = None, seeds: str | None = None
) -> StudySpec:
    """The part of a study named on the command line (comma-separated envs and variants, seeds as
    in a spec); unknown names are an error."""
    out = spec
    if envs:
        names = envs.split(",")
        unknown = [n for n in names if n not in {e.name for e in spec.envs}]
        if unknown:
            raise UsageError(
                f"--envs: {unknown[0]!r} is not in the spec (it has {', '.join(e.name for e in spec.envs)})"
            )
        out = dataclasses.replace(out, envs=tuple(e for e in spec.envs if e.name in names))
    if variants:
        names = variants.split(",")
        known = {v.name for v in spec.variants}
        unknown = [n for n in names if n not in known]
        if unknown:
            raise UsageError(f"--variants: {unknown[0]!r} is not in the spec (it has {', '.join(sorted(known))})")
        out = dataclasses.replace(out, variants=tuple(v for v in out.variants if v.name in names))
    if seeds:
        chosen = set(parse_seeds(seeds, "--seeds"))
        kept = tuple(
            dataclasses.replace(v, seeds=tuple(s for s in v.seeds if s in chosen) if v.seeds else None)
            for v in out.variants
        )
        out = dataclasses.replace(out, seeds=tuple(s for s in out.seeds if s in chosen), variants=kept)
    return out


# --------------------------------------------------------------------------------------- planning


@dataclass
class RunPlan:
    """One run of a study; its folders follow from the study's ``root`` and its key."""

    env: EnvSpec
    variant: VariantSpec
    seed: int
    root: Path
    config: TrainConfig

    @property
    def key(self) -> str:
        return f"{self.env.name}/{self.variant.name}/s{self.seed}"

    @property
    def run_dir(self) -> Path:
        return study_run_dir(self.root, self.key)

    @property
    def log(self) -> Path:
        return self.run_dir.with_name(f"{self.run_dir.name}.log")

    @property
    def evaluation_file(self) -> Path:
        """The run's cached evaluation (see :func:`evaluate_run`)."""
        return self.root / EVAL_DIR / self.env.name / self.variant.name / f"s{self.seed}.json"


def run_config(
    spec: StudySpec, env: EnvSpec, variant: VariantSpec, seed: int, steps: int, extra: list[str], device: str
) -> TrainConfig:
    kwargs = [f"env_options.env_kwargs.{k}={json.dumps(v)}" for k, v in env.env_kwargs.items()]
    overrides = [*kwargs, *env.overrides, *spec.overrides, *variant.overrides, *extra]
    try:
        return load_config(
            env.env, variant.core, spec.config, overrides, {"seed": seed, "total_timesteps": steps, "device": device}
        )
    except UsageError as e:
        raise UsageError(f"env {env.name}, variant {variant.name}: {e}") from None


def plan_runs(
    spec: StudySpec, root: Path, tuned: dict[str, list[str]] | None = None, device: str = "cpu"
) -> list[RunPlan]:
    """Every run of the study, seed-major (a study stopped early has every variant on the same seeds);
    a folder that already holds a run with other settings is an error, before anything runs."""
    plans = []
    for env in spec.envs:
        for seed in sorted({s for v in spec.variants for s in (v.seeds or spec.seeds)}):
            for variant in spec.variants:
                if seed not in (variant.seeds or spec.seeds):
                    continue
                extra = (tuned or {}).get(f"{env.name}/{variant.name}", [])
                config = run_config(spec, env, variant, seed, env.steps or spec.steps, extra, device)
                plan = RunPlan(env, variant, seed, root, config)
                check_existing(plan)
                plans.append(plan)
    return plans


def check_existing(plan: RunPlan) -> None:
    """A run folder from an earlier start must hold this very configuration."""
    if not (plan.run_dir / CONFIG_FILE).is_file():
        return
    saved = load_run_config(plan.run_dir)
    want, have = plan.config.identity(), saved.identity()
    if want != have or saved.seed != plan.config.seed:
        flat_want, flat_have = flat_keys(want), flat_keys(have)
        differ = sorted(k for k in flat_want.keys() | flat_have.keys() if flat_want.get(k) != flat_have.get(k))
        differ = differ or ["seed"]
        raise UsageError(
            f"{plan.run_dir} holds a run with other settings ({', '.join(differ[:4])} differ): "
            "restore the spec, or give the study another folder"
        )


def reuse_runs(plans: list[RunPlan], sources: list[Path]) -> dict[str, Path]:
    """Link into this study every planned run that another study folder in ``sources`` has already
    trained to the end with the very same settings, seed and budget (whatever its env or variant is named
    there), so that a study that only evaluates differently (other shifts) trains nothing again.
    Unfinished runs are never linked: two studies would train one folder. Returns {key: source}."""

    def key(config: TrainConfig) -> tuple[str, int, int]:
        return json.dumps(config.identity(), sort_keys=True, default=str), config.seed, config.total_timesteps

    found: dict[tuple[str, int, int], tuple[Path, Path]] = {}  # -> (run folder, its evaluation there)
    for source in sources:
        for config_file in sorted((source / STUDY_RUNS_DIR).glob(f"*/*/s*/{CONFIG_FILE}")):
            run_dir = config_file.parent
            try:
                saved = load_run_config(run_dir)
            except UsageError:
                continue
            if is_finished(run_dir, saved.total_timesteps):  # its last update may overshoot the budget
                where = run_dir.relative_to(source / STUDY_RUNS_DIR)
                evaluation = source / EVAL_DIR / where.parent / f"{where.name}.json"
                found.setdefault(key(saved), (run_dir.resolve(), evaluation))
    linked: dict[str, Path] = {}
    for plan in plans:
        if plan.run_dir.exists() or plan.run_dir.is_symlink():
            continue
        hit = found.get(key(plan.config))
        if hit is None:
            continue
        match, evaluation = hit
        plan.run_dir.parent.mkdir(parents=True, exist_ok=True)
        plan.run_dir.symlink_to(match, target_is_directory=True)
        log = match.with_name(f"{match.name}.log")
        if log.is_file():
            plan.log.symlink_to(log)
        if evaluation.is_file() and not plan.evaluation_file.exists():
            # The source's cached evaluation: used only while its model and settings are this study's
            # (evaluate_run checks), so a study with other shifts evaluates again.
            plan.evaluation_file.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_text(plan.evaluation_file, evaluation.read_text())
        linked[plan.key] = match
    return linked


def check_links(plans: list[RunPlan]) -> None:
    """A run linked from another study is only evaluated here: it must be finished at this budget."""
    for plan in plans:
        if plan.run_dir.is_symlink() and not is_finished(plan.run_dir, plan.config.total_timesteps):
            raise UsageError(
                f"{plan.run_dir} is linked from another study ({plan.run_dir.resolve()}) and is not trained to "
                f"{plan.config.total_timesteps} steps: finish it there, or remove the link to train it here"
            )


def trained_steps(run_dir: Path) -> int:
    """Env steps of the run's final model (0 when it has none)."""
    final = run_dir / FINAL_MODEL
    return checkpoint_step(final) if final.is_file() else 0


def is_finished(run_dir: Path, steps: int) -> bool:
    return (run_dir / FINAL_MODEL).is_file() and trained_steps(run_dir) >= steps


# ------------------------------------------------------------------------------------ the tasks


@contextlib.contextmanager
def output_to(path: Path) -> Iterator[None]:
    """Send this process's stdout and stderr (file descriptors 1 and 2) to ``path`` for a while."""
    path.parent.mkdir(parents=True, exist_ok=True)
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    with open(path, "ab") as f:
        os.dup2(f.fileno(), 1)
        os.dup2(f.fileno(), 2)
    try:
        yield
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        os.close(saved[0])
        os.close(saved[1])


def train_run(run_dir: str, config: TrainConfig, log: str) -> dict[str, Any]:
    """Bring one run to ``config.total_timesteps``: nothing when it is there, resume from the newest
    checkpoint when there is one, else train from scratch (a folder left by a start that died before
    its first checkpoint is renamed aside, never deleted). Idempotent, so a retry resumes."""
    th.set_num_threads(1)
    run = Path(run_dir)
    started = time.time()
    if not is_finished(run, config.total_timesteps):
        with output_to(Path(log)):
            print(f"--- {dt.datetime.now().isoformat(timespec='seconds')} pid {os.getpid()}", flush=True)
            if latest_checkpoint(run) is not None or (run / FINAL_MODEL).is_file():
                saved = load_run_config(run)
                saved.total_timesteps, saved.device = config.total_timesteps, config.device
                train(saved, run, resume=True, command=["study.py", "--resume", run_dir])
            else:
                if run.exists() and any(run.iterdir()):
                    run.rename(run.with_name(f"{run.name}.failed-{int(time.time())}"))
                run.parent.mkdir(parents=True, exist_ok=True)
                train(config, run, command=["study.py", run_dir])
    return {"wall_s": round(time.time() - started, 1), "steps": trained_steps(run), "pid": os.getpid()}


def evaluate_run(run_dir: str, evaluation: EvalSpec, cache: str) -> dict[str, Any]:
    """Evaluate one run's newest model under the study's shifts; the result is cached in ``cache``
    and reused while the model and the settings are unchanged."""
    th.set_num_threads(1)
    run = Path(run_dir)
    model = newest_model(run)
    settings = dataclasses.asdict(evaluation)
    key = {"model": str(model), "steps": checkpoint_step(model) if model else None, "settings": settings}
    path = Path(cache)
    if path.is_file():
        cached = json.loads(path.read_text())
        if _same_evaluation(cached.get("key"), json.loads(json.dumps(key))):
            return cached["result"]
    started = time.time()
    shifts = evaluation.shifts if evaluation.shifts == "all" else list(evaluation.shifts)
    results = evaluate(
        [run],
        shifts,
        episodes=evaluation.episodes,
        seed=evaluation.seed,
        deterministic=evaluation.deterministic,
        n_envs=evaluation.n_envs,
        device="cpu",
    )
    result = dataclasses.asdict(results.checkpoints[0])
    result["wall_s"] = round(time.time() - started, 1)
    atomic_write_text(path, json.dumps({"key": key, "result": result}) + "\n")
    return result


def _same_evaluation(cached: Any, key: dict[str, Any]) -> bool:
    """Whether a cached evaluation's key names the same model file (through any link: a run linked
    from another study reads the evaluation that study cached), steps and settings as ``key``."""
    if not isinstance(cached, dict) or set(cached) != set(key):
        return False
    mine, theirs = key["model"], cached["model"]
    same_model = mine == theirs or (
        mine is not None and theirs is not None and Path(mine).resolve() == Path(theirs).resolve()
    )
    return same_model and all(cached[k] == key[k] for k in key if k != "model")


def checkpoint_result(data: dict[str, Any]) -> CheckpointResult:
    data = {k: v for k, v in data.items() if k != "wall_s"}
    shifts = {name: ShiftResult(**s) for name, s in data.pop("shifts").items()}
    return CheckpointResult(**data, shifts=shifts)


# ---------------------------------------------------------------------------------- the study


def _now() -> str:
    return dt.datetime.now().isoformat(timespec="seconds")


class StudyState:
    """``study.json``: the spec, every run's state, and wall times; written atomically on change."""

    def __init__(self, root: Path, spec: StudySpec, plans: list[RunPlan]) -> None:
        self.path = root / STUDY_FILE
        old = json.loads(self.path.read_text()) if self.path.is_file() else {}
        old_runs = old.get("runs", {})
        self.data: dict[str, Any] = {
            "name": spec.name,
            "spec": spec.source,
            "created": old.get("created", _now()),
            "updated": _now(),
            "sessions": old.get("sessions", []),
            "tune": old.get("tune", {}),
            # Runs of earlier starts that this one does not plan (a narrowed spec) keep their entries.
            "runs": dict(old_runs),
        }
        self.planned = [p.key for p in plans]
        for p in plans:
            entry = old_runs.get(p.key, {})
            self.data["runs"][p.key] = {
                "env": p.env.name,
                "variant": p.variant.name,
                "core": p.variant.core,
                "seed": p.seed,
                "run_dir": str(p.run_dir),
                "steps": p.config.total_timesteps,
                "state": "finished" if is_finished(p.run_dir, p.config.total_timesteps) else "pending",
                "evaluated": False,
                "attempts": entry.get("attempts", 0),
                "errors": entry.get("errors", []),
                "wall_train_s": entry.get("wall_train_s", 0.0),
                "wall_eval_s": entry.get("wall_eval_s"),
            }

    def run(self, key: str) -> dict[str, Any]:
        return self.data["runs"][key]

    def counts(self) -> dict[str, int]:
        """States of the runs this start plans (earlier starts' other runs are not counted)."""
        out = {"pending": 0, "running": 0, "finished": 0, "failed": 0, "evaluated": 0}
        for r in map(self.run, self.planned):
            out[r["state"]] += 1
            out["evaluated"] += bool(r["evaluated"])
        return out

    def save(self) -> None:
        self.data["updated"] = _now()
        atomic_write_text(self.path, json.dumps(self.data, indent=1) + "\n")


class Progress:
    """One line per event and a summary line at most every ``every`` seconds: runs done, running,
    failed, evaluations done, and an ETA from the mean wall time of the runs finished so far,
    less what the running ones have already spent (see :meth:`eta_minutes`)."""

    def __init__(
        self, state: StudyState, parallel: int, every: float = 60.0, write: Callable[[str], None] = print
    ) -> None:
        self.state, self.parallel, self.every, self.write = state, max(1, parallel), every, write
        self.last = 0.0
        self.walls: list[float] = []
        self.running_since: Callable[[], list[float]] = list  # start times of the training tasks in flight

    def event(self, text: str) -> None:
        self.write(f"[{dt.datetime.now():%H:%M:%S}] {text}")
        self.tick(force=True)

    def eta_minutes(self, pending: int, ages_s: list[float]) -> tuple[float, bool]:
        """Minutes left if every run takes the mean finished wall time: each running run needs what
        it has not spent of it, each pending one all of it, ``parallel`` at a time. The flag says
        that a running run has outlived the mean (the figure is then a lower bound)."""
        mean = float(np.mean(self.walls))
        left = [max(mean - age, 0.0) for age in ages_s] + [mean] * pending
        return sum(left) / self.parallel / 60, any(age > mean for age in ages_s)

    def tick(self, force: bool = False) -> None:
        if not force and time.time() - self.last < self.every:
            return
        self.last = time.time()
        c = self.state.counts()
        total = len(self.state.planned)
        eta = ""
        if self.walls and c["pending"] + c["running"]:
            minutes, over = self.eta_minutes(c["pending"], [self.last - t for t in self.running_since()])
            eta = f", ETA {'>= ' if over else ''}{minutes:.0f} min"
        self.write(
            f"  study: {c['finished']}/{total} trained, {c['running']} running, {c['failed']} failed, "
            f"{c['evaluated']}/{total} evaluated{eta}"
        )


class RayStartError(RuntimeError):
    """Ray could not start its local node (a busy or short-of-memory machine): not the user's input."""


def _ray() -> Any:
    try:
        import ray
    except ImportError:
        raise UsageError("study.py needs Ray: pip install 'rim-agents[study]' (or pip install 'ray[tune]')") from None
    return ray


def start_ray(address: str | None, max_parallel: int | None) -> dict[str, Any]:
    """Connect to ``address`` (``auto`` or ``HOST:PORT``) or start a local Ray with this machine's
    CPUs (``max_parallel`` of them when given). Returns what was started (startup time, dashboard)."""
    ray = _ray()
    started = time.time()
    env_vars = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    kwargs: dict[str, Any] = {"log_to_driver": False, "runtime_env": {"env_vars": env_vars}}
    if address is None:
        kwargs["num_cpus"] = max_parallel or os.cpu_count() or 1
        kwargs["include_dashboard"] = None  # Ray starts it when its dependencies (ray[default]) are installed
    else:
        kwargs["address"] = address
    try:
        context = ray.init(**kwargs)
    except ConnectionError as e:
        raise UsageError(f"cannot reach the Ray cluster at {address}: {e}; start it with ray start --head") from None
    except Exception as e:  # Ray's own start-up failures, e.g. "The current node timed out during startup"
        if address is not None:
            raise
        ray.shutdown()  # what started of it
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise RayStartError(
            f"Ray did not start on this machine ({first}); nothing was trained: run the same command again, "
            "when the machine is less busy"
        ) from None
    dashboard = getattr(context, "dashboard_url", None) or None
    return {
        "address": address or "local",
        "startup_s": round(time.time() - started, 2),
        "cpus": ray.cluster_resources().get("CPU", 0),
        "gpus": ray.cluster_resources().get("GPU", 0),
        "dashboard": f"http://{dashboard}" if dashboard and not dashboard.startswith("http") else dashboard,
    }


def _is_usage_error(error: BaseException) -> bool:
    return isinstance(error, UsageError) or isinstance(getattr(error, "cause", None), UsageError)


def _error_line(error: BaseException) -> str:
    cause = getattr(error, "cause", None)
    err = cause if isinstance(cause, BaseException) else error
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[-1] if text else ''}"[:300]


def run_study(
    spec: StudySpec,
    root: Path,
    address: str | None = None,
    max_parallel: int | None = None,
    tune_trials: int = 0,
    write: Callable[[str], None] = print,
    progress_every: float = 60.0,
    reuse: Sequence[Path] = (),
) -> int:
    """Run (or continue) the study in ``root``; return the number of runs that failed. One study
    process at a time works in a folder (a second gets a one-line error). Runs that the study
    folders in ``reuse`` finished with the same settings are linked, not trained (:func:`reuse_runs`)."""
    plans = plan_runs(spec, root)  # bad settings or a conflicting folder fail here, before Ray starts
    for source in reuse:
        if not (source / STUDY_FILE).is_file():
            raise UsageError(f"--reuse {source} is not a study folder (no {STUDY_FILE}): give another study's --out")
    ray = _ray()
    root.mkdir(parents=True, exist_ok=True)
    lock = RunLock(root, "study.py", "give the study another --out").acquire()
    try:
        if reuse:
            linked = reuse_runs(plans, list(reuse))
            runs = "run" if len(linked) == 1 else "runs"
            write(f"reused {len(linked)} finished {runs} from {', '.join(map(str, reuse))}")
        check_links(plans)
        return _run_locked(ray, spec, root, address, max_parallel, tune_trials, write, progress_every)
    finally:
        lock.release()


def _run_locked(
    ray: Any,
    spec: StudySpec,
    root: Path,
    address: str | None,
    max_parallel: int | None,
    tune_trials: int,
    write: Callable[[str], None],
    progress_every: float,
) -> int:
    atomic_write_text(root / SPEC_FILE, yaml.safe_dump(spec.source, sort_keys=False))
    info = start_ray(address, max_parallel)
    parallel = max_parallel or int(info["cpus"]) or 1
    device = "cuda" if spec.gpus_per_run > 0 and info["gpus"] > 0 else "cpu"
    gpus = spec.gpus_per_run if device == "cuda" else 0.0
    write(
        f"Ray ({info['address']}): {info['cpus']:g} CPUs, {info['gpus']:g} GPUs, started in {info['startup_s']} s"
        + (f"; dashboard {info['dashboard']}" if info["dashboard"] else "")
    )
    try:
        tuned: dict[str, list[str]] = {}
        if tune_trials > 0:
            tuned = run_tuning(spec, root, tune_trials, parallel, device, write)
        plans = plan_runs(spec, root, tuned, device)
        state = StudyState(root, spec, plans)
        state.data["tune"] = {**state.data["tune"], **({"overrides": tuned} if tuned else {})}
        state.data["sessions"].append({"started": _now(), **info, "max_parallel": parallel})
        state.save()
        failed = _drive(ray, spec, plans, state, parallel, gpus, write, progress_every)
        write_results(spec, root, plans, state)
        write(f"results: {root / RESULTS_DIR}")
        return failed
    finally:
        ray.shutdown()


def write_study_results(spec: StudySpec, root: Path) -> int:
    """Rewrite ``<root>/results`` from every planned run evaluated so far; start nothing. Returns
    the number of runs aggregated."""
    if not (root / STUDY_FILE).is_file():
        raise UsageError(f"no study in {root} yet (no {STUDY_FILE}): start it without --results-only")
    tuned = json.loads((root / STUDY_FILE).read_text()).get("tune", {}).get("overrides", {})
    plans = plan_runs(spec, root, tuned)
    state = StudyState(root, spec, plans)
    for p in plans:
        state.run(p.key)["evaluated"] = p.evaluation_file.is_file()
    write_results(spec, root, plans, state)
    return sum(bool(state.run(p.key)["evaluated"]) for p in plans)


def _drive(
    ray: Any,
    spec: StudySpec,
    plans: list[RunPlan],
    state: StudyState,
    parallel: int,
    gpus: float,
    write: Callable[[str], None],
    progress_every: float,
) -> int:
    train_task = ray.remote(num_cpus=1, num_gpus=gpus, max_retries=0)(train_run)
    eval_task = ray.remote(num_cpus=1, max_retries=0)(evaluate_run)
    progress = Progress(state, parallel, progress_every, write)
    by_key = {p.key: p for p in plans}
    queue: list[tuple[str, str]] = []  # (kind, key), trained runs are evaluated before new ones start
    for p in plans:
        queue.append(("eval" if state.run(p.key)["state"] == "finished" else "train", p.key))
    in_flight: dict[Any, tuple[str, str, float]] = {}
    progress.running_since = lambda: [t for kind, _, t in in_flight.values() if kind == "train"]

    def submit(kind: str, key: str) -> None:
        p, run = by_key[key], state.run(key)
        if kind == "train":
            run["state"] = "running"
            run["attempts"] += 1
            ref = train_task.remote(str(p.run_dir), p.config, str(p.log))
        else:
            ref = eval_task.remote(str(p.run_dir), env_evaluation(spec, p.env), str(p.evaluation_file))
        in_flight[ref] = (kind, key, time.time())

    def handle_sigterm(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, handle_sigterm)
    try:
        while queue or in_flight:
            while queue and len(in_flight) < parallel:
                evals = [i for i, q in enumerate(queue) if q[0] == "eval"]
                submit(*queue.pop(evals[0] if evals else 0))
            state.save()
            done, _ = ray.wait(list(in_flight), num_returns=1, timeout=5.0)
            progress.tick()
            for ref in done:
                kind, key, _ = in_flight.pop(ref)
                run = state.run(key)
                try:
                    out = ray.get(ref)
                except Exception as e:  # a failed or killed task: recorded, retried, reported
                    line = _error_line(e)
                    if kind == "eval":
                        run["errors"].append(f"evaluation: {line}")
                        progress.event(f"evaluation FAILED {key}: {line}")
                        continue
                    run["errors"].append(line)
                    retry = not _is_usage_error(e) and run["attempts"] <= spec.retries
                    run["state"] = "pending" if retry else "failed"
                    if retry:
                        queue.insert(0, ("train", key))
                    what = (
                        f"retrying from its checkpoint ({run['attempts']}/{spec.retries + 1})" if retry else "gave up"
                    )
                    progress.event(f"FAILED {key}: {line}; {what}")
                    continue
                if kind == "train":
                    run["state"] = "finished"
                    run["wall_train_s"] = round(run["wall_train_s"] + out["wall_s"], 1)
                    if out["wall_s"] > 1:
                        progress.walls.append(out["wall_s"])
                    queue.insert(0, ("eval", key))
                    progress.event(f"trained {key}: {out['steps']} steps in {out['wall_s']:.0f} s")
                else:
                    run["evaluated"] = True
                    run["wall_eval_s"] = out.get("wall_s")
                    none = out["shifts"].get("none", {})
                    success = none.get("success_rate")
                    what = f"return {none.get('mean_return', float('nan')):.3f}"
                    what += f", success {success:.3f}" if success is not None else ""
                    progress.event(f"evaluated {key}: {what} under none")
                state.save()
    except KeyboardInterrupt:
        write("stopping: asking running tasks to save a checkpoint...")
        for ref in in_flight:
            ray.cancel(ref)  # a KeyboardInterrupt in the task: train() saves a checkpoint first
        with contextlib.suppress(Exception):
            ray.wait(list(in_flight), num_returns=len(in_flight), timeout=60)
        for kind, key, _ in in_flight.values():
            if kind == "train":
                state.run(key)["state"] = "pending"
        state.save()
        raise
    finally:
        signal.signal(signal.SIGTERM, previous)
    return state.counts()["failed"]


# -------------------------------------------------------------------------------------- results


def write_results(spec: StudySpec, root: Path, plans: list[RunPlan], state: StudyState) -> None:
    """Aggregate the cached evaluations (the same tables evaluate.py gives on the study folder),
    the per-run table, the bars and the learning curves."""
    out = root / RESULTS_DIR
    entries: list[tuple[RunPlan, CheckpointResult]] = []
    for p in plans:
        if state.run(p.key)["evaluated"] and p.evaluation_file.is_file():
            entries.append((p, checkpoint_result(json.loads(p.evaluation_file.read_text())["result"])))
    if not entries:
        return
    ev = spec.evaluation
    settings = {"episodes": ev.episodes, "seed": ev.seed, "deterministic": ev.deterministic}
    checkpoints = [c for _, c in entries]
    results = EvaluationResults(settings, checkpoints, aggregate(checkpoints, ev.seed))
    write_outputs(results, out)
    atomic_write_text(out / "evaluation.txt", format_table(results) + "\n")
    atomic_write_text(out / "runs.md", runs_table(entries, state))
    atomic_write_text(out / "runs.csv", runs_csv(entries))
    summary: list[dict[str, Any]] = []
    atomic_write_text(out / "table.md", variants_table(spec, entries, summary))
    atomic_write_text(out / "summary.json", json.dumps(summary, indent=1) + "\n")
    for env in spec.envs:
        curves = training_curves(env, [p for p in plans if p.env.name == env.name])
        if curves:
            atomic_write_bytes(out / f"curves_{env.name}.png", learning_curves(env, curves))
            atomic_write_text(out / f"curves_{env.name}.csv", curves_csv(curves))


def bars_metric(env: EnvSpec) -> str | None:
    """The evaluation metric an env's bars judge (``success`` or ``return``), if any."""
    for bars in env.bars.values():
        for bar in bars:
            if bar.metric in ("success", "return"):
                return bar.metric
            if bar.metric == "train_return":
                return "return"
    return None


def display_metric(env: EnvSpec, result: CheckpointResult) -> str:
    """What a table shows for an env: its bars' evaluation metric, else the success rate where the
    env reports one, else the mean return."""
    return bars_metric(env) or ("success" if _score(result, "success") is not None else "return")


def _reference_run(bar: Bar, plan: RunPlan, mine: list[tuple[RunPlan, CheckpointResult]]) -> CheckpointResult | None:
    """A relative bar's reference: the named variant's run of ``plan``'s seed among ``mine``."""
    return next((c for p, c in mine if p.variant.name == bar.of and p.seed == plan.seed), None)


def _reference(bar: Bar, plan: RunPlan, mine: list[tuple[RunPlan, CheckpointResult]]) -> float | None:
    """A relative bar's reference value on ``plan``'s seed (None without the run or its value)."""
    run = _reference_run(bar, plan, mine)
    return None if run is None else _score(run, bar.metric)


def _passes(bar: Bar, plan: RunPlan, result: CheckpointResult, mine: list[tuple[RunPlan, CheckpointResult]]) -> bool:
    """Whether one run passes ``bar`` (a relative bar reads the named variant's run of the same seed)."""
    value = _score(result, bar.metric)
    if value is None:
        return False
    return bar.passes(value, _reference(bar, plan, mine) if bar.of is not None else None)


def _reference_present(bar: Bar, plan: RunPlan, mine: list[tuple[RunPlan, CheckpointResult]]) -> bool:
    """Whether a relative bar's named variant has a run of ``plan``'s seed among ``mine`` (true for
    an absolute bar)."""
    return bar.of is None or _reference_run(bar, plan, mine) is not None


def _score(result: CheckpointResult, metric: str, shift: str = "none") -> float | None:
    if metric == "train_return":
        rows = [r for r in read_progress(Path(result.run_dir)) if r.get("rollout/ep_rew_mean")]
        return float(rows[-1]["rollout/ep_rew_mean"]) if rows else None
    s = result.shifts.get(shift)
    if s is None:
        return None
    return s.success_rate if metric == "success" else s.mean_return


def runs_table(entries: list[tuple[RunPlan, CheckpointResult]], state: StudyState) -> str:
    shifts = list(dict.fromkeys(name for _, c in entries for name in c.shifts))
    lines = [
        "| env | variant | seed | steps | attempts | train min (logged) | " + " | ".join(shifts) + " |",
        "|---" * (6 + len(shifts)) + "|",
    ]
    for p, c in entries:
        run = state.run(p.key)
        metric = display_metric(p.env, c)
        cells = []
        for name in shifts:
            value = _score(c, metric, name)
            cells.append("-" if value is None else f"{value:.2f}")
        seconds = train_seconds(p.run_dir)
        minutes = "-" if seconds is None else f"{seconds / 60:.1f}"
        lines.append(
            f"| {p.env.name} | {p.variant.name} | {p.seed} | {c.num_timesteps} | {run['attempts']} | {minutes} | "
            + " | ".join(cells)
            + " |"
        )
    head = (
        "Per run: each env's metric (its bars', else the success rate where the env reports one, else the "
        "mean return) under each shift; training minutes as the run "
        "logged them (time/time_elapsed, every resume included), on whatever machine it shared.\n\n"
    )
    return head + "\n".join(lines) + "\n"


RUNS_CSV_COLUMNS = ["env", "variant", "core", "seed", "shift", "episodes", "mean_return", "success_rate"]


def runs_csv(entries: list[tuple[RunPlan, CheckpointResult]]) -> str:
    """One row per run and shift, each run named by its env and variant (evaluate.py's results.csv
    names only the core, which two variants of one core share):
    ``benchmarks/paired_difference.py`` pairs these rows by seed."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(RUNS_CSV_COLUMNS)
    for p, c in entries:
        for name, r in c.shifts.items():
            success = "" if r.success_rate is None else r.success_rate
            writer.writerow([p.env.name, p.variant.name, c.core, p.seed, name, r.episodes, r.mean_return, success])
    return buf.getvalue()


def variants_table(
    spec: StudySpec, entries: list[tuple[RunPlan, CheckpointResult]], summary: list[dict[str, Any]] | None = None
) -> str:
    """Per env x variant x shift: IQM over seeds [95% bootstrap interval], and the bar's verdict
    (also appended to ``summary``, one dict per env x variant)."""
    summary = [] if summary is None else summary
    lines = []
    for env in spec.envs:
        mine = [(p, c) for p, c in entries if p.env.name == env.name]
        if not mine:
            continue
        shifts = list(dict.fromkeys(name for _, c in mine for name in c.shifts))
        lines += [f"## {env.name} ({env.env}): {display_metric(env, mine[0][1])}", ""]
        lines.append("| variant | seeds | " + " | ".join(shifts) + " | bar | per seed (none) |")
        lines.append("|---" * (4 + len(shifts)) + "|")
        for variant in spec.variants:
            runs = [(p, c) for p, c in mine if p.variant.name == variant.name]
            if not runs:
                continue
            cells = []
            shown = display_metric(env, runs[0][1])
            for name in shifts:
                values = [v for _, c in runs if (v := _score(c, shown, name)) is not None]
                if not values:
                    cells.append("-")
                    continue
                low, high = bootstrap_ci(values, iqm, seed=spec.evaluation.seed)
                cells.append(f"{iqm(values):.2f} [{low:.2f}, {high:.2f}]")
            bars = env.bar(variant.name, variant.core)
            metric = bars[0].metric if bars else shown
            scores = [(p.seed, _score(c, metric)) for p, c in runs]
            verdict = "-"
            row: dict[str, Any] = {"env": env.name, "variant": variant.name, "metric": metric}
            row["values"] = {str(seed): v for seed, v in scores}
            if bars:
                passed = [all(_passes(bar, p, c, mine) for bar in bars) for p, c in runs]
                need = max(bar.need for bar in bars)
                met = sum(passed) / len(passed) >= need
                text = f"{' and '.join(bar.condition() for bar in bars)} on {need:.0%} of seeds"
                verdict = f"{sum(passed)}/{len(passed)} {'met' if met else 'missed'} ({text})"
                # A relative bar is not passed without the named variant's run of the same seed, or
                # when that run's value is 0 or below (a factor of it is undefined); say which.
                unmatched: set[str] = set()
                missing: set[int] = set()
                unsigned_seeds: set[int] = set()
                for bar in (b for b in bars if b.of is not None):
                    for p, _ in runs:
                        reference = _reference_run(bar, p, mine)
                        if reference is None:
                            unmatched.add(str(bar.of))
                            missing.add(p.seed)
                        elif (ref := _score(reference, bar.metric)) is not None and not ref > 0:
                            unsigned_seeds.add(p.seed)
                if missing:
                    seeds = sorted(missing)
                    verdict += f"; no {', '.join(sorted(unmatched))} run of seed {', '.join(map(str, seeds))} here"
                    row["without_reference"] = seeds
                if unsigned_seeds:
                    unsigned = sorted(unsigned_seeds)
                    verdict += f"; the reference is not positive on seed {', '.join(map(str, unsigned))}"
                    row["reference_not_positive"] = unsigned
                row.update(bar=text, passing=sum(passed), seeds=len(passed), met=met)
            summary.append(row)
            per_seed = " ".join(f"{s}: {v:.2f}" for s, v in scores if v is not None)
            lines.append(f"| {variant.name} | {len(runs)} | " + " | ".join(cells) + f" | {verdict} | {per_seed} |")
        lines.append("")
    head = (
        f"Evaluation: {spec.evaluation.episodes} episodes per run and shift, env seeds from {spec.evaluation.seed}; "
        "each env's metric (in its heading); IQM over seeds with a 95% bootstrap interval.\n\n"
    )
    return head + "\n".join(lines)


class TrainingCurve(NamedTuple):
    """One run's training curve: ``column`` of its progress CSVs against env ``steps``."""

    plan: RunPlan
    column: str
    steps: np.ndarray
    values: np.ndarray


def training_curves(env: EnvSpec, plans: list[RunPlan]) -> list[TrainingCurve]:
    """Each run's training success rate (or return, where the env's bars judge the return or it
    reports no success) over the last 100 episodes; runs with fewer than two points are left out."""
    curves = []
    metric = bars_metric(env)
    for p in plans:
        rows = read_progress(p.run_dir)
        has_success = any(r.get("rollout/success_rate") for r in rows)
        column = "rollout/success_rate" if metric != "return" and has_success else "rollout/ep_rew_mean"
        rows = [r for r in rows if r.get(column)]
        if len(rows) >= 2:
            steps = np.array([float(r["time/total_timesteps"]) for r in rows])
            curves.append(TrainingCurve(p, column, steps, np.array([float(r[column]) for r in rows])))
    return curves


def learning_curves(env: EnvSpec, curves: list[TrainingCurve]) -> bytes:
    """The curves as a PNG: the mean over seeds per variant, with its interval."""
    series: dict[str, list[tuple[np.ndarray, np.ndarray]]] = {}
    for curve in curves:
        series.setdefault(curve.plan.variant.name, []).append((curve.steps, curve.values))
    metric = bars_metric(env)
    steps = max(c.plan.config.total_timesteps for c in curves)
    label = "success rate" if metric == "success" else "return" if metric == "return" else "success or return"
    return curves_png(series, steps, f"{env.name}: {env.env}", f"training {label} (last 100 episodes)")


CURVES_CSV_COLUMNS = ["env", "variant", "seed", "steps", "column", "value"]


def curves_csv(curves: list[TrainingCurve]) -> str:
    """The curves' points, one row each: the study's results keep them when the run folders are gone."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(CURVES_CSV_COLUMNS)
    for c in curves:
        for step, value in zip(c.steps, c.values, strict=True):
            writer.writerow([c.plan.env.name, c.plan.variant.name, c.plan.seed, int(step), c.column, f"{value:.6g}"])
    return buf.getvalue()


# --------------------------------------------------------------------------------------- tuning

DISTRIBUTIONS = ("loguniform", "uniform", "choice", "randint")


def trial_dir(root: Path, env: str, variant: str, params: dict[str, Any]) -> Path:
    digest = hashlib.sha1(json.dumps(params, sort_keys=True).encode()).hexdigest()[:10]
    return root / TUNE_DIR / env / variant / f"t{digest}"


def tune_trial(params: dict[str, Any], context: dict[str, Any]) -> None:
    """One Ray Tune trial: train the variant with ``params`` on every tuning seed, evaluate each
    under ``none``, report the mean score. Trial runs are ordinary run folders, reused when the
    same settings come again."""
    from ray import tune as ray_tune

    spec: StudySpec = context["spec"]
    env = next(e for e in spec.envs if e.name == context["env"])
    variant = next(v for v in spec.variants if v.name == context["variant"])
    tune_spec = spec.tune
    assert tune_spec is not None
    overrides = [f"{k}={json.dumps(v)}" for k, v in sorted(params.items())]
    folder = trial_dir(Path(context["root"]), env.name, variant.name, params)
    scores = []
    for seed in tune_spec.seeds:
        steps = tune_spec.steps or env.steps or spec.steps
        config = run_config(spec, env, variant, seed, steps, overrides, context["device"])
        run = folder / f"s{seed}"
        train_run(str(run), config, str(folder / f"s{seed}.log"))
        evaluation = EvalSpec(
            ("none",), tune_spec.episodes, spec.evaluation.seed + 500_000, n_envs=spec.evaluation.n_envs
        )
        result = checkpoint_result(evaluate_run(str(run), evaluation, str(folder / f"s{seed}.eval.json")))
        score = _score(result, tune_spec.metric)
        scores.append(float(score if score is not None else result.shifts["none"].mean_return))
    ray_tune.report({"score": float(np.mean(scores)), "scores": scores, "folder": str(folder)})


def run_tuning(
    spec: StudySpec, root: Path, trials: int, parallel: int, device: str, write: Callable[[str], None]
) -> dict[str, list[str]]:
    """The same number of trials for every env x variant; returns each one's best overrides
    (recorded in ``tune/tuning.json``; a variant tuned with as many trials before is not tuned again)."""
    if spec.tune is None:
        raise UsageError("--tune needs a tune: section in the spec (seeds, metric, space)")
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")  # Tune's console tables: the study prints its own lines
    from ray import tune as ray_tune
    from ray.tune.search.optuna import OptunaSearch

    path = root / TUNE_DIR / "tuning.json"
    record: dict[str, Any] = json.loads(path.read_text()) if path.is_file() else {}
    best: dict[str, list[str]] = {}
    space = {key: _distribution(ray_tune, dist) for key, dist in spec.tune.space.items()}
    for env in spec.envs:
        for variant in spec.variants:
            key = f"{env.name}/{variant.name}"
            done = record.get(key)
            if done is None or done["trials"] < trials or done["space"] != spec.tune.space:
                write(f"tuning {key}: {trials} trials on seeds {list(spec.tune.seeds)}")
                context = {"spec": spec, "env": env.name, "variant": variant.name, "root": str(root), "device": device}
                searcher = OptunaSearch(metric="score", mode="max", seed=0)
                tuner = ray_tune.Tuner(
                    ray_tune.with_resources(ray_tune.with_parameters(tune_trial, context=context), {"cpu": 1}),
                    param_space=space,
                    tune_config=ray_tune.TuneConfig(
                        search_alg=searcher, num_samples=trials, max_concurrent_trials=parallel
                    ),
                    run_config=ray_tune.RunConfig(
                        name=f"{env.name}-{variant.name}".replace("/", "-"),
                        storage_path=str((root / TUNE_DIR / "ray").resolve()),
                        verbose=0,
                    ),
                )
                grid = tuner.fit()
                rows = []
                for i in range(len(grid)):
                    result = grid[i]
                    if result.error is None and result.metrics and result.config and "score" in result.metrics:
                        params = {k: result.config[k] for k in spec.tune.space}
                        rows.append(
                            {"params": params, "score": result.metrics["score"], "scores": result.metrics["scores"]}
                        )
                if not rows:
                    raise UsageError(f"every tuning trial of {key} failed: see {root / TUNE_DIR}")
                rows.sort(key=lambda r: -r["score"])
                done = {"trials": trials, "space": spec.tune.space, "seeds": list(spec.tune.seeds), "results": rows}
                record[key] = done
                atomic_write_text(path, json.dumps(record, indent=1) + "\n")
            top = done["results"][0]
            best[key] = [f"{k}={json.dumps(v)}" for k, v in sorted(top["params"].items())]
            write(f"tuned {key}: best {' '.join(best[key])} (score {top['score']:.3f} on tuning seeds)")
    return best


def _distribution(ray_tune: Any, dist: dict[str, list[Any]]) -> Any:
    ((kind, args),) = dist.items()
    if kind == "choice":
        return ray_tune.choice(args)
    return getattr(ray_tune, kind)(*args)
