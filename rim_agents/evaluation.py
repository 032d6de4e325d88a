"""Evaluate checkpoints under distribution shifts, with confidence intervals.

For every checkpoint and shift we run N episodes on vectorised envs (recurrent state carried, and
reset where an episode starts, as in training), then report the mean return with a 95% bootstrap
interval over episodes, the success rate (MiniGrid), the episode length and the drop relative to
``none``. Checkpoints whose configs differ only in the seed are aggregated as seeds: the
interquartile mean (IQM) of their per-seed scores with a 95% stratified bootstrap interval over
seeds, as rliable (Agarwal et al., 2021) computes it for one task.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch as th
from stable_baselines3.common.base_class import BaseAlgorithm
from stable_baselines3.common.utils import set_random_seed
from stable_baselines3.common.vec_env import VecEnv

from rim_agents.config import TrainConfig, env_family
from rim_agents.errors import UsageError
from rim_agents.models import load_model, make_env
from rim_agents.ppo import RIMPPO
from rim_agents.runs import (
    CONFIG_FILE,
    FINAL_MODEL,
    atomic_write_bytes,
    atomic_write_text,
    load_run_config,
    newest_model,
)
from rim_agents.shifts import DEFAULT_SHIFTS, ShiftSpec, shift_spec

# ----------------------------------------------------------------------------------- statistics


def iqm(values: Sequence[float] | np.ndarray) -> float:
    """Interquartile mean as rliable computes it (``scipy.stats.trim_mean(x, 0.25)``): sort, drop
    ``int(0.25 * n)`` values at each end, average the rest."""
    x = np.sort(np.asarray(values, dtype=float).ravel())
    if len(x) == 0:
        return float("nan")
    cut = int(0.25 * len(x))
    return float(np.mean(x[cut : len(x) - cut]))


def bootstrap_ci(
    values: Sequence[float] | np.ndarray,
    statistic: Callable[[np.ndarray], float] = np.mean,
    n_boot: int = 2000,
    confidence: float = 0.95,
    seed: int = 0,
) -> tuple[float, float]:
    """Percentile bootstrap interval of ``statistic`` over ``values`` resampled with replacement."""
    x = np.asarray(values, dtype=float)
    if len(x) == 0:
        return float("nan"), float("nan")
    if len(x) == 1:
        return float(x[0]), float(x[0])
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(x), (n_boot, len(x)))
    stats = np.array([statistic(x[row]) for row in idx])
    alpha = (1.0 - confidence) / 2
    return float(np.quantile(stats, alpha)), float(np.quantile(stats, 1 - alpha))


def stratified_bootstrap_iqm(
    scores: dict[str, Sequence[float]], n_boot: int = 2000, seed: int = 0
) -> tuple[float, float, float]:
    """IQM over all runs of all tasks and its 95% interval, resampling runs within each task.

    :param scores: task -> per-run scores (here one task: a shift; runs: seeds).
    :return: ``(iqm, low, high)``.
    """
    tasks = [np.asarray(v, dtype=float) for v in scores.values() if len(v)]
    point = iqm(np.concatenate(tasks)) if tasks else float("nan")
    if not tasks or all(len(t) == 1 for t in tasks):
        return point, point, point
    rng = np.random.default_rng(seed)
    stats = np.empty(n_boot)
    for b in range(n_boot):
        stats[b] = iqm(np.concatenate([t[rng.integers(0, len(t), len(t))] for t in tasks]))
    return point, float(np.quantile(stats, 0.025)), float(np.quantile(stats, 0.975))


# ----------------------------------------------------------------------------------- episodes


@dataclass
class Episodes:
    returns: list[float] = field(default_factory=list)
    lengths: list[int] = field(default_factory=list)
    successes: list[bool] = field(default_factory=list)


def run_episodes(
    model: BaseAlgorithm,
    env: VecEnv,
    n_episodes: int,
    deterministic: bool = False,
    on_episode: Callable[[], None] | None = None,
) -> Episodes:
    """Run ``n_episodes`` complete episodes (Atari: whole games) on a ``VecEnv``.

    The result is the first ``n_episodes`` episodes to *start*, each run to its end: which episodes
    count is fixed before their outcome is known, so short episodes are not over-represented (the
    bias of keeping the first episodes to *finish*). An env that finishes an episode starts the
    next counted one while fewer than ``n_episodes`` have started, and idles otherwise, so the
    run ends with the longest remaining episode rather than the slowest env's whole share. The
    recurrent state is carried and reset wherever the env reports ``done`` (a lost life ends a
    training episode, not a game).
    """
    n_envs = env.num_envs
    counting = np.arange(n_envs) < n_episodes  # env i's current episode is one of the counted ones
    started = int(counting.sum())
    out = Episodes()
    obs = env.reset()
    policy: Any = model.policy
    policy.set_training_mode(False)
    # The actor's core state stays a tensor between steps (model.predict round-trips it through numpy).
    shape = (policy.lstm_actor.num_layers, n_envs, policy.lstm_actor.hidden_size)
    state = (th.zeros(shape, device=policy.device), th.zeros(shape, device=policy.device))
    starts = np.ones(n_envs, dtype=bool)
    while counting.any():
        with th.no_grad():
            obs_tensor, _ = policy.obs_to_tensor(obs)
            starts_tensor = th.as_tensor(starts, dtype=th.float32, device=policy.device)
            dist, state = policy.get_distribution(obs_tensor, state, starts_tensor)
            actions = dist.get_actions(deterministic=deterministic).cpu().numpy()
        obs, _, dones, infos = env.step(actions)
        starts = dones
        for i, info in enumerate(infos):
            if "episode" not in info or not counting[i]:
                continue
            out.returns.append(float(info["episode"]["r"]))
            out.lengths.append(int(info["episode"]["l"]))
            if "is_success" in info:
                out.successes.append(bool(info["is_success"]))
            if on_episode is not None:
                on_episode()
            counting[i] = started < n_episodes
            started += int(counting[i])
    return out


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


def check_spaces(ckpt: Checkpoint, env: VecEnv, shift: str) -> None:
    if env.observation_space != ckpt.model.observation_space or env.action_space != ckpt.model.action_space:
        raise UsageError(
            f"checkpoint {ckpt.path} does not fit {ckpt.config.env} under shift {shift!r}: the model expects "
            f"{ckpt.model.observation_space} / {ckpt.model.action_space}, the env gives "
            f"{env.observation_space} / {env.action_space}"
        )


# ----------------------------------------------------------------------------------- evaluate


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
    on_result: Callable[[dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """Evaluate checkpoints under shifts and aggregate seeds.

    ``on_result`` receives the results so far after every checkpoint x shift (so that a caller can
    write them as they come and an interrupt keeps them). Torch, NumPy and the envs are seeded
    with ``seed`` before each checkpoint x shift.

    Everything that can fail on bad input (paths, checkpoints, shift names, space mismatches) is
    checked before the first episode runs.

    :return: ``{"checkpoints": [...], "groups": [...]}`` (see :func:`write_outputs`).
    """
    if episodes < 1:
        raise UsageError(f"--episodes must be positive, got {episodes}")
    ckpts = [resolve_checkpoint(t, device) for t in targets]
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
    results: list[dict[str, Any]] = []
    settings = {"episodes": episodes, "seed": seed, "deterministic": deterministic}

    def report() -> dict[str, Any]:
        return {"settings": settings, "checkpoints": results, "groups": aggregate(results, seed)}

    for ckpt, specs in plans:
        per_shift: dict[str, Any] = {}
        entry = {
            "checkpoint": str(ckpt.path),
            "run_dir": str(ckpt.run_dir),
            "env": ckpt.config.env,
            "core": ckpt.config.core,
            "seed": ckpt.config.seed,
            "num_timesteps": int(ckpt.model.num_timesteps),
            "group": _group_key(ckpt.config),
            "shifts": per_shift,
        }
        results.append(entry)
        for name, spec in specs:
            # Seeded per checkpoint and shift: a result does not depend on what ran before it.
            set_random_seed(seed)
            env = make_env(ckpt.config, min(n_envs, episodes), seed, spec)
            try:
                eps = run_episodes(ckpt.model, env, episodes, deterministic, bar.update if bar else None)
            finally:
                env.close()
            low, high = bootstrap_ci(eps.returns, seed=seed)
            ref = per_shift["none"]["mean_return"] if per_shift else float(np.mean(eps.returns))
            mean = float(np.mean(eps.returns))
            per_shift[name] = {
                "episodes": len(eps.returns),
                "mean_return": mean,
                "ci95": [low, high],
                "success_rate": float(np.mean(eps.successes)) if eps.successes else None,
                "success_ci95": list(bootstrap_ci(eps.successes, seed=seed)) if eps.successes else None,
                "mean_length": float(np.mean(eps.lengths)),
                "returns": eps.returns,
                "drop": ref - mean,
                "relative_drop": (ref - mean) / abs(ref) if ref else None,
            }
            if on_result is not None:
                on_result(report())
    if bar is not None:
        bar.close()
    return report()


def _flatten(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in data.items():
        if isinstance(v, dict) and v:
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def aggregate(results: list[dict[str, Any]], seed: int = 0) -> list[dict[str, Any]]:
    """Group checkpoints whose configs differ only in the seed; IQM and stratified bootstrap."""
    groups: dict[str, list[dict[str, Any]]] = {}
    for r in results:
        groups.setdefault(r["group"], []).append(r)
    envs = {r["env"] for r in results}
    flat = {key: _flatten(json.loads(key)) for key in groups}
    out = []
    for key, members in groups.items():
        first = members[0]
        label = first["core"] if len(envs) == 1 else f"{first['env']} {first['core']}"
        # Groups of one core that differ in other settings: name the settings that differ.
        rivals = [flat[k] for k, m in groups.items() if m[0]["core"] == first["core"] and m[0]["env"] == first["env"]]
        if len(rivals) > 1:
            differing = sorted(k for k in flat[key] if len({str(r.get(k)) for r in rivals}) > 1)
            label += " (" + ", ".join(f"{k.split('.')[-1]}={flat[key][k]}" for k in differing) + ")"
        shift_names = [s for s in first["shifts"] if all(s in m["shifts"] for m in members)]
        per_shift = {}
        for name in shift_names:
            returns = [m["shifts"][name]["mean_return"] for m in members]
            drops = [m["shifts"][name]["drop"] for m in members]
            point, low, high = stratified_bootstrap_iqm({name: returns}, seed=seed)
            if len(members) == 1:  # one seed: the interval over its episodes
                low, high = first["shifts"][name]["ci95"]
            entry: dict[str, Any] = {
                "iqm_return": point,
                "ci95": [low, high],
                "iqm_drop": iqm(drops),
                "per_seed_returns": returns,
            }
            succ = [m["shifts"][name]["success_rate"] for m in members]
            if all(s is not None for s in succ):
                s_point, s_low, s_high = stratified_bootstrap_iqm({name: succ}, seed=seed)
                if len(members) == 1:
                    s_low, s_high = first["shifts"][name]["success_ci95"]
                entry.update(iqm_success=s_point, success_ci95=[s_low, s_high])
            per_shift[name] = entry
        out.append(
            {
                "label": label,
                "env": first["env"],
                "core": first["core"],
                "seeds": [m["seed"] for m in members],
                "checkpoints": [m["checkpoint"] for m in members],
                "shifts": per_shift,
            }
        )
    return out


# ------------------------------------------------------------------------------------ outputs


def format_table(results: dict[str, Any]) -> str:
    lines = []
    for r in results["checkpoints"]:
        lines.append(f"{r['checkpoint']}  ({r['env']}, core {r['core']}, seed {r['seed']}, {r['num_timesteps']} steps)")
        lines.append(f"  {'shift':<28}{'mean return':>12}{'95% CI':>22}{'success':>9}{'length':>9}{'drop':>9}")
        for name, s in r["shifts"].items():
            succ = f"{s['success_rate']:.2f}" if s["success_rate"] is not None else "-"
            ci = f"[{s['ci95'][0]:.2f}, {s['ci95'][1]:.2f}]"
            lines.append(
                f"  {name:<28}{s['mean_return']:>12.2f}{ci:>22}{succ:>9}{s['mean_length']:>9.1f}{s['drop']:>9.2f}"
            )
    if results["groups"]:
        lines.append("")
        lines.append("Aggregated over seeds (IQM; 95% stratified bootstrap CI over seeds, over episodes for one seed):")
        w = max(16, *(len(g["label"]) + 2 for g in results["groups"]))
        lines.append(f"  {'group':<{w}}{'seeds':>6}  {'shift':<28}{'IQM return':>11}{'95% CI':>22}{'IQM success':>12}")
        for g in results["groups"]:
            for name, s in g["shifts"].items():
                ci = f"[{s['ci95'][0]:.2f}, {s['ci95'][1]:.2f}]"
                succ = f"{s['iqm_success']:.2f}" if "iqm_success" in s else "-"
                lines.append(
                    f"  {g['label']:<{w}}{len(g['seeds']):>6}  {name:<28}{s['iqm_return']:>11.2f}{ci:>22}{succ:>12}"
                )
    return "\n".join(lines)


def _csv_text(results: dict[str, Any]) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(
        [
            "kind",
            "name",
            "env",
            "core",
            "seed",
            "shift",
            "episodes",
            "mean_return",
            "ci_low",
            "ci_high",
            "success_rate",
            "mean_length",
            "drop",
        ]
    )
    for r in results["checkpoints"]:
        for name, s in r["shifts"].items():
            writer.writerow(
                [
                    "checkpoint",
                    r["checkpoint"],
                    r["env"],
                    r["core"],
                    r["seed"],
                    name,
                    s["episodes"],
                    s["mean_return"],
                    s["ci95"][0],
                    s["ci95"][1],
                    s["success_rate"],
                    s["mean_length"],
                    s["drop"],
                ]
            )
    for g in results["groups"]:
        for name, s in g["shifts"].items():
            writer.writerow(
                [
                    "group_iqm",
                    g["label"],
                    g["env"],
                    g["core"],
                    " ".join(map(str, g["seeds"])),
                    name,
                    "",
                    s["iqm_return"],
                    s["ci95"][0],
                    s["ci95"][1],
                    s.get("iqm_success"),
                    "",
                    s["iqm_drop"],
                ]
            )
    return buf.getvalue()


def chart_png(results: dict[str, Any]) -> bytes:
    """Bars of IQM return per group (core) and shift, with 95% intervals."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = results["groups"]
    shift_names = list(dict.fromkeys(name for g in groups for name in g["shifts"]))
    use_success = all("iqm_success" in s for g in groups for s in g["shifts"].values())
    n_bars = len(shift_names) * max(1, len(groups))
    fig, ax = plt.subplots(figsize=(min(16.0, max(6.0, 0.3 * n_bars + 2)), 4.0))
    width = 0.8 / max(1, len(groups))
    x = np.arange(len(shift_names))
    for k, g in enumerate(groups):
        key, ci_key = ("iqm_success", "success_ci95") if use_success else ("iqm_return", "ci95")
        vals = np.array([g["shifts"].get(n, {}).get(key, np.nan) for n in shift_names], dtype=float)
        cis = np.array([g["shifts"].get(n, {}).get(ci_key, [np.nan, np.nan]) for n in shift_names], dtype=float)
        err = np.abs(np.stack([vals - cis[:, 0], cis[:, 1] - vals]))
        ax.bar(
            x + (k - (len(groups) - 1) / 2) * width,
            vals,
            width,
            yerr=err,
            capsize=3,
            label=f"{g['label']} ({len(g['seeds'])} seeds)",
        )
    ax.set_xticks(x, shift_names, rotation=20, ha="right")
    ax.set_ylabel("IQM success rate" if use_success else "IQM return")
    ax.set_title(f"{groups[0]['env']}: robustness to shifts (95% CI)" if groups else "")
    ax.set_ylim(bottom=0)
    ax.grid(axis="y", alpha=0.3)
    # Below the axes, so that it never hides a bar.
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.22), ncol=2 if len(groups) > 1 else 1, fontsize="small")
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120, bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()


def write_outputs(results: dict[str, Any], out_dir: Path) -> list[Path]:
    """``results.json``, ``results.csv`` and ``chart.png``, each written atomically."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = [out_dir / "results.json", out_dir / "results.csv", out_dir / "chart.png"]
    atomic_write_text(paths[0], json.dumps(results, indent=2) + "\n")
    atomic_write_text(paths[1], _csv_text(results))
    atomic_write_bytes(paths[2], chart_png(results))
    return paths


def write_tensorboard(results: dict[str, Any]) -> list[str]:
    """The same scalars in each run's TensorBoard, ``evaluate/<shift>/...`` at the checkpoint's step
    (training-time evaluations log ``eval/<shift>/...``). Returns one line per run that could
    not be written (a read-only run directory), instead of failing after the results are saved."""
    from torch.utils.tensorboard import SummaryWriter

    problems = []
    for r in results["checkpoints"]:
        try:
            writer = SummaryWriter(str(Path(r["run_dir"]) / "tb"))
            for name, s in r["shifts"].items():
                writer.add_scalar(f"evaluate/{name}/mean_return", s["mean_return"], r["num_timesteps"])
                writer.add_scalar(f"evaluate/{name}/mean_length", s["mean_length"], r["num_timesteps"])
                if s["success_rate"] is not None:
                    writer.add_scalar(f"evaluate/{name}/success_rate", s["success_rate"], r["num_timesteps"])
            writer.close()
        except OSError as e:
            problems.append(f"{r['run_dir']}: {e.strerror or e}")
    return problems
