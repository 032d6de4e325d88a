"""Command-line front ends: ``train.py`` and ``evaluate.py`` call :func:`train_main`."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import NoReturn

from rim_agents.errors import UsageError


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
    p.add_argument("--env", help="gymnasium env id, e.g. BreakoutNoFrameskip-v4 or RIMAgents/Pickup-8x8-v0")
    p.add_argument("--core", choices=None, help="rims (default), lstm or gru")
    p.add_argument("--config", help="a YAML config file (same keys as configs/*.yaml)")
    p.add_argument("--total-timesteps", type=int, help="env steps to train for (all envs together)")
    p.add_argument("--seed", type=int)
    p.add_argument("--n-envs", type=int)
    p.add_argument("--device", help="auto, cpu or cuda")
    p.add_argument("--run-dir", help="where to write the run (default runs/<env>_<core>_s<seed>_<time>)")
    p.add_argument("--resume", metavar="RUN_DIR", help="continue a run from its newest checkpoint")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides")
    return p


def _summary(run_dir: Path, num_timesteps: int) -> str:
    return "\n".join(
        [
            f"Training finished: {num_timesteps} env steps.",
            f"  run directory : {run_dir}",
            f"  final model   : {run_dir / 'final_model.zip'}",
            f"  TensorBoard   : tensorboard --logdir {run_dir / 'tb'}",
            f"  evaluate      : python evaluate.py {run_dir} --shifts all --episodes 100",
            f"  resume/extend : python train.py --resume {run_dir} --total-timesteps N",
        ]
    )


def train_main(argv: Sequence[str] | None = None) -> int:
    """Parse ``argv``, train, print a summary. Returns the exit code (2 on bad input)."""
    from rim_agents.config import load_config
    from rim_agents.training import load_run_config, train

    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        args = train_parser().parse_args(argv)
        flags = {
            "seed": args.seed,
            "n_envs": args.n_envs,
            "total_timesteps": args.total_timesteps,
            "device": args.device,
        }
        if args.resume:
            conflicting = [n for n in ("env", "core", "config", "run_dir", "seed", "n_envs") if getattr(args, n)]
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
    except KeyboardInterrupt:
        print("interrupted: the last checkpoint is in the run directory; continue with --resume", file=sys.stderr)
        return 130
    from rim_agents.checkpoints import latest_checkpoint

    ckpt = latest_checkpoint(out)
    steps = int(ckpt.stem.split("_")[1]) if ckpt else 0
    print(_summary(out, steps))
    return 0
