"""Evaluation reports: the console table, ``results.json``, ``results.csv``, ``chart.png`` and the
runs' TensorBoard."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import Any

import numpy as np

from rim_agents.evaluation import EvaluationResults, GroupShiftResult
from rim_agents.runs import TB_DIR, atomic_write_bytes, atomic_write_text


def format_table(results: EvaluationResults) -> str:
    lines = []
    for r in results.checkpoints:
        lines.append(f"{r.checkpoint}  ({r.env}, core {r.core}, seed {r.seed}, {r.num_timesteps} steps)")
        lines.append(f"  {'shift':<28}{'mean return':>12}{'95% CI':>22}{'success':>9}{'length':>9}{'drop':>9}")
        for name, s in r.shifts.items():
            succ = f"{s.success_rate:.2f}" if s.success_rate is not None else "-"
            ci = f"[{s.ci95[0]:.2f}, {s.ci95[1]:.2f}]"
            lines.append(f"  {name:<28}{s.mean_return:>12.2f}{ci:>22}{succ:>9}{s.mean_length:>9.1f}{s.drop:>9.2f}")
    if results.groups:
        lines.append("")
        lines.append("Aggregated over seeds (IQM; 95% stratified bootstrap CI over seeds, over episodes for one seed):")
        w = max(16, *(len(g.label) + 2 for g in results.groups))
        lines.append(f"  {'group':<{w}}{'seeds':>6}  {'shift':<28}{'IQM return':>11}{'95% CI':>22}{'IQM success':>12}")
        for g in results.groups:
            for name, gs in g.shifts.items():
                ci = f"[{gs.ci95[0]:.2f}, {gs.ci95[1]:.2f}]"
                succ = f"{gs.iqm_success:.2f}" if gs.iqm_success is not None else "-"
                lines.append(f"  {g.label:<{w}}{len(g.seeds):>6}  {name:<28}{gs.iqm_return:>11.2f}{ci:>22}{succ:>12}")
    return "\n".join(lines)


def _csv_text(results: EvaluationResults) -> str:
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
    for r in results.checkpoints:
        for name, s in r.shifts.items():
            writer.writerow(
                [
                    "checkpoint",
                    r.checkpoint,
                    r.env,
                    r.core,
                    r.seed,
                    name,
                    s.episodes,
                    s.mean_return,
                    s.ci95[0],
                    s.ci95[1],
                    s.success_rate,
                    s.mean_length,
                    s.drop,
                ]
            )
    for g in results.groups:
        for name, gs in g.shifts.items():
            writer.writerow(
                [
                    "group_iqm",
                    g.label,
                    g.env,
                    g.core,
                    " ".join(map(str, g.seeds)),
                    name,
                    "",
                    gs.iqm_return,
                    gs.ci95[0],
                    gs.ci95[1],
                    gs.iqm_success,
                    "",
                    gs.iqm_drop,
                ]
            )
    return buf.getvalue()


def _value(result: GroupShiftResult | None, name: str, default: Any) -> Any:
    value = getattr(result, name, None) if result is not None else None
    return default if value is None else value


def zero_based_ylim(ax: Any) -> None:
    """Anchor a bar chart's y axis at 0 on the side the bars grow from: bars of returns >= 0 rise
    from 0 (the axis starts there), bars of returns <= 0 hang from it (Pendulum, MountainCar), and
    mixed signs keep matplotlib's range, which holds both. An all-zero chart gets [0, 1]."""
    low, high = ax.dataLim.y0, ax.dataLim.y1
    if not (np.isfinite(low) and np.isfinite(high)):
        return
    if low >= 0 and high <= 0:
        ax.set_ylim(0, 1)
    elif low >= 0:
        ax.set_ylim(bottom=0)
    elif high <= 0:
        ax.set_ylim(top=0)


def chart_png(results: EvaluationResults) -> bytes:
    """Bars of IQM return per group (core) and shift, with 95% intervals."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = results.groups
    shift_names = list(dict.fromkeys(name for g in groups for name in g.shifts))
    use_success = all(s.iqm_success is not None for g in groups for s in g.shifts.values())
    n_bars = len(shift_names) * max(1, len(groups))
    fig, ax = plt.subplots(figsize=(min(16.0, max(6.0, 0.3 * n_bars + 2)), 4.0))
    width = 0.8 / max(1, len(groups))
    x = np.arange(len(shift_names))
    for k, g in enumerate(groups):
        key, ci_key = ("iqm_success", "success_ci95") if use_success else ("iqm_return", "ci95")
        vals = np.array([_value(g.shifts.get(n), key, np.nan) for n in shift_names], dtype=float)
        cis = np.array([_value(g.shifts.get(n), ci_key, [np.nan, np.nan]) for n in shift_names], dtype=float)
        err = np.abs(np.stack([vals - cis[:, 0], cis[:, 1] - vals]))
        ax.bar(
            x + (k - (len(groups) - 1) / 2) * width,
            vals,
            width,
            yerr=err,
            capsize=3,
            label=f"{g.label} ({len(g.seeds)} seeds)",
        )
    ax.set_xticks(x, shift_names, rotation=20, ha="right")
    ax.set_ylabel("IQM success rate" if use_success else "IQM return")
    ax.set_title(f"{groups[0].env}: robustness to shifts (95% CI)" if groups else "")
    zero_based_ylim(ax)
    ax.grid(axis="y", alpha=0.3)
    # Below the axes, so that it never hides a bar.
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.22), ncol=2 if len(groups) > 1 else 1, fontsize="small")
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120, bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()


def curves_png(
    series: dict[str, list[tuple[np.ndarray, np.ndarray]]], steps: int, title: str, ylabel: str, seed: int = 0
) -> bytes:
    """Learning curves: per label, the mean over its runs' curves (each ``(env steps, value)``,
    interpolated on a common grid) and a 95% bootstrap interval of that mean."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    grid = np.linspace(0, steps, 61)[1:]
    fig, ax = plt.subplots(figsize=(6, 3.6))
    rng = np.random.default_rng(seed)
    for label, curves in series.items():
        c = np.array([np.interp(grid, x, y) for x, y in curves])
        boot = c[rng.integers(0, len(c), (1000, len(c)))].mean(axis=1)
        ax.plot(grid, c.mean(axis=0), label=f"{label} ({len(c)} seeds)")
        ax.fill_between(grid, np.quantile(boot, 0.025, axis=0), np.quantile(boot, 0.975, axis=0), alpha=0.25)
    ax.set_xlabel("env steps (thousands)")
    ax.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v / 1000:g}"))
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    return buf.getvalue()


def write_outputs(results: EvaluationResults, out_dir: Path) -> list[Path]:
    """``results.json``, ``results.csv`` and ``chart.png``, each written atomically."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = [out_dir / "results.json", out_dir / "results.csv", out_dir / "chart.png"]
    atomic_write_text(paths[0], json.dumps(results.to_dict(), indent=2) + "\n")
    atomic_write_text(paths[1], _csv_text(results))
    atomic_write_bytes(paths[2], chart_png(results))
    return paths


def write_tensorboard(results: EvaluationResults) -> list[str]:
    """The same scalars in each run's TensorBoard, ``evaluate/<shift>/...`` at the checkpoint's step
    (training-time evaluations log ``eval/<shift>/...``). Returns one line per run that could
    not be written (a read-only run directory), instead of failing after the results are saved."""
    from torch.utils.tensorboard import SummaryWriter

    problems = []
    for r in results.checkpoints:
        try:
            writer = SummaryWriter(str(Path(r.run_dir) / TB_DIR))
            for name, s in r.shifts.items():
                writer.add_scalar(f"evaluate/{name}/mean_return", s.mean_return, r.num_timesteps)
                writer.add_scalar(f"evaluate/{name}/mean_length", s.mean_length, r.num_timesteps)
                if s.success_rate is not None:
                    writer.add_scalar(f"evaluate/{name}/success_rate", s.success_rate, r.num_timesteps)
            writer.close()
        except OSError as e:
            problems.append(f"{r.run_dir}: {e.strerror or e}")
    return problems
