"""Command-line front ends: ``train.py``, ``evaluate.py``, ``visualize.py`` and ``curves.py`` call
:func:`train_main`, :func:`evaluate_main`, :func:`visualize_main` and :func:`curves_main`."""

from __future__ import annotations

import argparse
import datetime as dt
import io
import json
import os
import shlex
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import NoReturn

from rim_agents.config import load_config
from rim_agents.errors import UsageError
from rim_agents.evaluation import EvaluationResults, check_spaces, evaluate, resolve_checkpoint
from rim_agents.models import make_env
from rim_agents.report import format_table, write_outputs, write_tensorboard
from rim_agents.runs import (
    TB_DIR,
    VIDEO_DIR,
    atomic_write_bytes,
    atomic_write_text,
    curve_at,
    latest_checkpoint,
    load_run_config,
    progress_points,
    study_runs,
)
from rim_agents.shifts import __doc__ as shifts_doc
from rim_agents.shifts import shift_spec
from rim_agents.study import STUDY_FILE, RayStartError, load_spec, narrow, run_study, write_study_results
from rim_agents.training import Interrupted, train
from rim_agents.visualize import (
    action_names,
    activity_png,
    event_summary,
    gif_bytes,
    record_episode,
    write_tensorboard_gif,
    write_video,
)


class OneLineParser(argparse.ArgumentParser):
    """argparse with one-line errors and exit code 2."""

    def error(self, message: str) -> NoReturn:
        raise UsageError(f"{message} (see {self.prog} --help)")


def train_parser() -> argparse.ArgumentParser:
    p = OneLineParser(
        prog="train.py",
        description="Train a PPO agent with a RIM, LSTM or GRU core.",
        epilog="Any config key can be set as KEY=VALUE, e.g. ppo.n_epochs=4 rims.k_active=5 "
        "policy.enable_critic_lstm=true. "
        "Order: config defaults < configs/<family>.yaml < --config < flags < KEY=VALUE.",
    )
    p.add_argument(
        "--env",
        help="gymnasium env id, e.g. BreakoutNoFrameskip-v4, RIMAgents/Pickup-8x8-v0, or module:EnvId for an "
        "env another package registers when imported",
    )
    p.add_argument(
        "--env-package",
        action="append",
        metavar="MODULE",
        help="import MODULE first (it registers env ids); repeatable; recorded in the run's config",
    )
    p.add_argument("--core", help="rims (default), lstm, gru or none (feed-forward control)")
    p.add_argument("--config", help="a YAML config file (same keys as configs/*.yaml)")
    p.add_argument("--total-timesteps", type=int, help="env steps to train for (all envs together)")
    p.add_argument("--seed", type=int)
    p.add_argument("--n-envs", type=int)
    p.add_argument("--device", help="auto, cpu or cuda")
    p.add_argument("--run-dir", help="where to write the run (default runs/<env>_<core>_s<seed>_<time>)")
    p.add_argument("--resume", metavar="RUN_DIR", help="continue a run from its newest checkpoint")
    p.add_argument("--eval-shifts", help="comma-separated shifts to evaluate during training (see evaluate.py --help)")
    p.add_argument("--eval-freq", type=int, help="env steps between evaluations during training")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument(
        "--compile",
        action="store_true",
        help=(
            "compile the RIM core's step with torch.compile (rims.compile=default); on a GPU, "
            "rims.cuda_graphs=true (replaying each whole unroll as CUDA graphs) is faster"
        ),
    )
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides")
    return p


def _summary(run_dir: Path, num_timesteps: int) -> str:
    q = shlex.quote
    return "\n".join(
        [
            f"Training finished: {num_timesteps} env steps.",
            f"  run directory : {run_dir}",
            f"  final model   : {run_dir / 'final_model.zip'}",
            f"  TensorBoard   : tensorboard --logdir {q(str(run_dir / 'tb'))}",
            f"  evaluate      : python evaluate.py {q(str(run_dir))} --shifts all --episodes 100",
            f"  resume/extend : python train.py --resume {q(str(run_dir))} --total-timesteps N",
        ]
    )


def train_main(argv: Sequence[str] | None = None) -> int:
    """Parse ``argv``, train, print a summary. Returns the exit code (2 on bad input)."""

    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        args = train_parser().parse_args(argv)
        if args.compile:
            if args.resume:
                raise UsageError("--resume continues a run with its saved config; drop --compile")
            args.overrides = ["rims.compile=default", *args.overrides]
        flags = {
            "seed": args.seed,
            "n_envs": args.n_envs,
            "total_timesteps": args.total_timesteps,
            "device": args.device,
            "eval_freq": args.eval_freq,
            "eval_shifts": [s for s in args.eval_shifts.split(",") if s] if args.eval_shifts else None,
            "env_packages": args.env_package or None,
        }
        if args.resume:
            names = ("env", "core", "config", "run_dir", "seed", "n_envs", "eval_shifts", "eval_freq", "env_package")
            conflicting = [n for n in names if getattr(args, n)]
            if conflicting or args.overrides:
                what = ", ".join([f"--{n.replace('_', '-')}" for n in conflicting] + args.overrides)
                raise UsageError(
                    f"--resume continues a run with its saved config; drop {what} "
                    "(only --total-timesteps and --device may change)"
                )
            run_dir: Path | None = Path(args.resume)
            config = load_run_config(Path(args.resume))
            if args.total_timesteps is not None:
                config.total_timesteps = args.total_timesteps
            if args.device is not None:
                config.device = args.device
        else:
            config = load_config(args.env, args.core, args.config, args.overrides, flags)
            run_dir = Path(args.run_dir) if args.run_dir else None
        out = train(
            config,
            run_dir=run_dir,
            resume=bool(args.resume),
            command=["python", "train.py", *argv],
            progress_bar=not args.no_progress and sys.stderr.isatty(),
        )
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except Interrupted as e:
        print(str(e), file=sys.stderr)
        return 128 + e.signum
    except KeyboardInterrupt:
        print("interrupted: the last checkpoint is in the run directory; continue with --resume", file=sys.stderr)
        return 130

    ckpt = latest_checkpoint(out)
    steps = int(ckpt.stem.split("_")[1]) if ckpt else 0
    print(_summary(out, steps))
    return 0


def evaluate_parser() -> argparse.ArgumentParser:

    p = OneLineParser(
        prog="evaluate.py",
        description="Evaluate checkpoints under distribution shifts, with confidence intervals.",
        epilog=shifts_doc,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("targets", nargs="+", metavar="RUN_DIR_OR_CHECKPOINT", help="run directories or checkpoint files")
    p.add_argument("--shifts", default="all", help="'all' (the family's catalogue) or a comma-separated list")
    p.add_argument("--episodes", type=int, default=100, help="episodes per checkpoint and shift")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--deterministic", action="store_true", help="greedy actions")
    p.add_argument("--n-envs", type=int, default=8, help="parallel envs per evaluation")
    p.add_argument("--device", default="auto")
    p.add_argument("--out", help="output folder (default eval_results/<time>)")
    p.add_argument("--force", action="store_true", help="overwrite the results already in --out")
    p.add_argument("--no-tensorboard", action="store_true", help="do not write eval scalars to the runs' TensorBoard")
    p.add_argument("--no-progress", action="store_true")
    return p


def evaluate_main(argv: Sequence[str] | None = None) -> int:
    """Parse ``argv``, evaluate, write the results as they come. Returns the exit code (2 on bad
    input, 130 when interrupted: the finished evaluations are kept)."""

    argv = list(sys.argv[1:] if argv is None else argv)
    out: Path | None = None
    created = False
    done: list[EvaluationResults] = []

    def save(results: EvaluationResults) -> None:
        assert out is not None
        done[:] = [results]
        write_outputs(results, out)

    try:
        args = evaluate_parser().parse_args(argv)
        shifts: str | list[str] = "all" if args.shifts == "all" else [s for s in args.shifts.split(",") if s]
        if not shifts:
            raise UsageError("--shifts is empty: give 'all' or names such as none,novel-distractors")
        if args.n_envs < 1:
            raise UsageError(f"--n-envs must be positive, got {args.n_envs}")
        out = Path(args.out) if args.out else Path("eval_results") / dt.datetime.now().strftime("%Y%m%d-%H%M%S")
        created = _prepare_out(out, args.force)
        results = evaluate(
            args.targets,
            shifts,
            episodes=args.episodes,
            seed=args.seed,
            deterministic=args.deterministic,
            n_envs=args.n_envs,
            device=args.device,
            progress=not args.no_progress and sys.stderr.isatty(),
            on_result=save,
        )
    except UsageError as e:
        if created and out is not None and not any(out.iterdir()):
            out.rmdir()
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        finished = sum(len(c.shifts) for c in done[0].checkpoints) if done else 0
        where = f"{finished} finished checkpoint x shift evaluations are in {out}" if finished else "nothing finished"
        print(f"interrupted: {where}", file=sys.stderr)
        return 130
    paths = write_outputs(results, out)
    print(format_table(results))
    print("\nwritten: " + ", ".join(str(p) for p in paths))
    if not args.no_tensorboard:
        for problem in write_tensorboard(results):
            print(f"warning: results saved, but not written to TensorBoard in {problem}", file=sys.stderr)
    return 0


def _prepare_out(out: Path, force: bool) -> bool:
    """Check, before any episode runs, that ``out`` can be written; return whether it was created."""
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out} is a file: give a folder")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise UsageError(f"--out {out} already holds results: pass --force to overwrite them, or another --out")
    created = not out.exists()
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".write_test{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise UsageError(f"cannot write to --out {out}: {e.strerror or e}") from None
    return created


def study_parser() -> argparse.ArgumentParser:
    p = OneLineParser(
        prog="study.py",
        description="Run a study (envs x variants x seeds, then every run under every shift) as Ray tasks. "
        "Started again, it skips finished runs and resumes interrupted ones.",
        epilog="Specs: configs/studies/*.yaml. Results: <out>/results/ (table.md, runs.md, results.json/.csv, "
        "chart.png, curves_<env>.png); state: <out>/study.json.",
    )
    p.add_argument("spec", metavar="SPEC.yaml", help="a study spec, e.g. configs/studies/pickup_robustness.yaml")
    p.add_argument("--out", help="the study folder (default studies/<spec name>)")
    p.add_argument(
        "--address", help="an existing Ray cluster: auto, or HOST:PORT (default: a local Ray on this machine's CPUs)"
    )
    p.add_argument("--max-parallel", type=int, help="tasks at a time (default: the cluster's CPUs)")
    p.add_argument("--tune", type=int, default=0, metavar="N", help="first tune each variant with N Ray Tune trials")
    p.add_argument("--status", action="store_true", help="print the study's progress from study.json; start nothing")
    p.add_argument(
        "--results-only",
        action="store_true",
        help="rewrite <out>/results from the runs evaluated so far; start nothing",
    )
    p.add_argument("--envs", help="run only these of the spec's envs (comma-separated)")
    p.add_argument("--variants", help="run only these of the spec's variants (comma-separated)")
    p.add_argument("--seeds", help="run only these of the spec's seeds, e.g. 0-4")
    p.add_argument(
        "--reuse",
        action="append",
        default=[],
        metavar="STUDY_DIR",
        help="link runs that this other study folder finished with the same settings, seed and budget "
        "instead of training them again (repeatable)",
    )
    return p


def study_main(argv: Sequence[str] | None = None) -> int:
    """Parse ``argv`` and run the study. Returns the exit code: 0, 1 when some runs failed (the
    results hold the others) or Ray did not start, 2 on bad input, 130 when interrupted (continue with
    the same command)."""

    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        args = study_parser().parse_args(argv)
        if args.max_parallel is not None and args.max_parallel < 1:
            raise UsageError(f"--max-parallel must be positive, got {args.max_parallel}")
        if args.tune < 0:
            raise UsageError(f"--tune must be a number of trials, got {args.tune}")
        spec = load_spec(args.spec)
        out = Path(args.out) if args.out else Path("studies") / spec.name
        whole, spec = spec, narrow(spec, args.envs, args.variants, args.seeds)
        if out.exists() and not out.is_dir():
            raise UsageError(f"--out {out} is a file: give a folder")
        if args.status:
            return _study_status(out)
        if args.results_only:
            n = write_study_results(whole, out)
            print(f"results of {n} evaluated runs: {out / 'results'}")
            return 0
        failed = run_study(spec, out, args.address, args.max_parallel, args.tune, reuse=[Path(r) for r in args.reuse])
        if spec != whole:  # the results cover every run of the spec evaluated so far, not only these
            write_study_results(whole, out)
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except RayStartError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted: running runs saved checkpoints; run the same command to continue", file=sys.stderr)
        return 130
    if failed:
        print(f"{failed} runs failed (see study.json and their logs); the results hold the others", file=sys.stderr)
        return 1
    return 0


def _study_status(out: Path) -> int:
    path = out / STUDY_FILE
    if not path.is_file():
        raise UsageError(f"no study in {out} yet (no {STUDY_FILE}): start it without --status")
    data = json.loads(path.read_text())
    runs = data["runs"].values()
    counts: dict[str, int] = {}
    for r in runs:
        counts[r["state"]] = counts.get(r["state"], 0) + 1
    print(f"study {data['name']} in {out}, updated {data['updated']}")
    print("  " + ", ".join(f"{n} {state}" for state, n in sorted(counts.items())) + f" of {len(runs)} runs")
    for r in runs:
        if r["state"] != "finished" or r["errors"]:
            errors = f"; {len(r['errors'])} errors, last: {r['errors'][-1]}" if r["errors"] else ""
            print(f"  {r['env']}/{r['variant']}/s{r['seed']}: {r['state']}, {r['attempts']} attempts{errors}")
    return 0


def curves_parser() -> argparse.ArgumentParser:
    p = OneLineParser(
        prog="curves.py",
        description="Training curves as a Markdown table: each run's logged metric every N env steps (the "
        "first point logged at or after each mark) and its last logged point, read from its progress CSVs.",
    )
    p.add_argument("targets", nargs="+", metavar="RUN_DIR_OR_STUDY")
    p.add_argument(
        "--metric",
        default="success",
        help="success (rollout/success_rate), return (rollout/ep_rew_mean) or any logged column, "
        "e.g. rims/switch_rate (default success)",
    )
    p.add_argument("--every", type=int, default=100_000, help="env steps between marks (default 100000)")
    p.add_argument("--until", type=int, help="the last mark (default: the furthest run's last logged step)")
    return p


def _steps_label(steps: int) -> str:
    for size, unit in ((1_000_000, "M"), (1_000, "k")):
        if steps >= size and steps % (size // 10) == 0:
            return f"{steps / size:g}{unit}"
    return str(steps)


def curves_main(argv: Sequence[str] | None = None) -> int:
    """Parse ``argv``, print the table. Returns the exit code (2 on bad input)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        args = curves_parser().parse_args(argv)
        if args.every < 1 or (args.until is not None and args.until < args.every):
            raise UsageError("--every must be positive and --until at least --every")
        runs: list[Path] = []
        for target in map(Path, args.targets):
            found = study_runs(target) if (target / STUDY_FILE).is_file() else [target]
            for run in found:
                if not any((run / TB_DIR).glob("progress*.csv")):
                    raise UsageError(f"{run} has no progress logs ({TB_DIR}/progress*.csv): give a run or study folder")
            runs += found
        curves = [(run, progress_points(run, args.metric)) for run in runs]
        if not any(points for _, points in curves):
            raise UsageError(f"no run logged {args.metric!r}: use success, return or a column of the progress CSVs")
        until = args.until or max(points[-1][0] for _, points in curves if points)
        marks = list(range(args.every, until + 1, args.every))
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print("| run | " + " | ".join(map(_steps_label, marks)) + " | last (step) |")
    print("|---" * (len(marks) + 2) + "|")
    for run, points in curves:
        values, last = curve_at(points, marks)
        cells = ["-" if v is None else f"{v:.2f}" for v in values]
        cells.append("-" if last is None else f"{last[1]:.2f} ({last[0]:,})")
        print(f"| {run} | " + " | ".join(cells) + " |")
    return 0


def visualize_parser() -> argparse.ArgumentParser:
    p = OneLineParser(
        prog="visualize.py",
        description="Watch an agent and its RIMs: an MP4 and an activity PNG per episode, under any shift.",
    )
    p.add_argument("target", metavar="RUN_DIR_OR_CHECKPOINT")
    p.add_argument("--shift", default="none", help="a shift from evaluate.py's catalogue (default none)")
    p.add_argument("--episodes", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-steps", type=int, default=5000, help="cut an episode after this many steps")
    p.add_argument("--out", help="output folder (default <run dir>/videos)")
    p.add_argument("--force", action="store_true", help="overwrite files already in --out")
    p.add_argument(
        "--summary", action="store_true", help="per-RIM active fractions by event, under the shift and under none"
    )
    p.add_argument("--tensorboard", action="store_true", help="also put the first episode in the run's TensorBoard")
    p.add_argument("--device", default="cpu")
    return p


def visualize_main(argv: Sequence[str] | None = None) -> int:
    """Parse ``argv``, record and render episodes. Returns the exit code (2 on bad input)."""

    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        args = visualize_parser().parse_args(argv)
        if args.episodes < 1 or args.max_steps < 1:
            raise UsageError("--episodes and --max-steps must be positive")
        ckpt = resolve_checkpoint(args.target, device=args.device)
        shifts = [args.shift] if not args.summary or args.shift == "none" else ["none", args.shift]
        specs = {name: shift_spec(ckpt.config, name) for name in dict.fromkeys([args.shift, *shifts])}
        for name, spec in specs.items():
            env = make_env(ckpt.config, 1, args.seed, spec)
            try:
                check_spaces(ckpt, env, name)
            finally:
                env.close()
        out = Path(args.out) if args.out else ckpt.run_dir / VIDEO_DIR
        _prepare_out(out, args.force)
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    names = action_names(ckpt.config)
    written = []
    summaries = {}
    step = int(ckpt.model.num_timesteps)
    for name, spec in specs.items():
        episodes = []
        for i in range(args.episodes):
            env = make_env(ckpt.config, 1, args.seed + i, spec)
            started = time.time()
            try:
                episode = record_episode(ckpt.model, ckpt.config, env, seed=args.seed + i, max_steps=args.max_steps)
            finally:
                env.close()
            episodes.append(episode)
            if name != args.shift:
                continue  # recorded for the summary only
            stem = f"{name}_ep{i}_step{step}"
            written.append(write_video(episode, out / f"{stem}.mp4", names))
            if episode.masks:
                path = out / f"{stem}.png"
                atomic_write_bytes(path, activity_png(episode, f"{ckpt.config.core}, {name}, episode {i}"))
                written.append(path)
            print(f"{stem}: {episode.length} steps, return {episode.returns[-1]:.2f}, {time.time() - started:.1f} s")
            if args.tensorboard and i == 0:
                gif = gif_bytes(episode, names)
                frame = episode.frames[0]
                try:
                    write_tensorboard_gif(
                        ckpt.run_dir / TB_DIR, f"visualize/{name}", gif, frame.shape[0], frame.shape[1], step
                    )
                except OSError as e:
                    print(f"warning: not written to TensorBoard in {ckpt.run_dir}: {e.strerror or e}", file=sys.stderr)
        if args.summary and episodes[0].masks:
            summaries[name] = event_summary(episodes)
    if summaries:
        lines = []
        for name, table in summaries.items():
            K = len(table["all"])
            lines += [f"### {name}", "", "| steps | " + " | ".join(f"RIM {i}" for i in range(K)) + " |"]
            lines.append("|---" * (K + 1) + "|")
            lines += [
                f"| {event} | " + " | ".join(f"{v:.2f}" for v in values) + " |" for event, values in table.items()
            ]
            lines.append("")
        atomic_write_text(out / "summary.md", "\n".join(lines))
        atomic_write_text(out / "summary.json", json.dumps(summaries, indent=1) + "\n")
        atomic_write_bytes(out / "summary.png", _summary_png(summaries))
        written += [out / "summary.md", out / "summary.png"]
        print("\n".join(lines))
    print("written: " + ", ".join(str(p) for p in written))
    return 0


def _summary_png(summaries: dict) -> bytes:
    """Bars: each RIM's active fraction on all steps and per event, one panel per shift."""

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(summaries), figsize=(6 * len(summaries), 3.2), squeeze=False)
    for ax, (name, table) in zip(axes[0], summaries.items(), strict=True):
        K = len(table["all"])
        width = 0.8 / len(table)
        for j, (event, values) in enumerate(table.items()):
            ax.bar([i + j * width for i in range(K)], values, width, label=event)
        ax.set_xticks([i + 0.4 - width / 2 for i in range(K)], [f"RIM {i}" for i in range(K)])
        ax.set_ylim(0, 1.05)
        ax.set_ylabel("active fraction")
        ax.set_title(name)
        ax.legend(fontsize=6)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=90)
    plt.close(fig)
    return buffer.getvalue()
