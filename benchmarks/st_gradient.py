"""Does the straight-through surrogate's gradient explode through the recurrent state?

For each checkpoint of a RIM run trained with ``selection=straight_through``, continue PPO training
for a few updates three times from the same weights, env seeds and torch seed: with the
surrogate's gradient kept out of the previous state (``rims.st_state_gradient=false``, the
default), with it flowing into the state as well (``true``, the form the earlier studies trained
with), and with the paper's hard rule (no surrogate: the gradient of the core's own dynamics). The
forward passes are identical; only the backward differs. Reports the global gradient norm of every
minibatch before PPO clips it to ``max_grad_norm``: its median, 90th percentile and maximum, and the share of
minibatches past 10 (where clipping to 0.5 shrinks every parameter's step twenty-fold or more).
The norms are ``RIMPPO.last_grad_norms`` (``train/grad_norm`` in a run's logs).

Example (the K = 8 option's pickup 6x6 runs)::

    python benchmarks/st_gradient.py runs/selection-k8-pickup1/runs/pickup-1/*/s*/checkpoints/step_000000200000.zip \\
        --out benchmarks/results/selection/st_gradient
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch as th

from rim_agents.evaluation import resolve_checkpoint
from rim_agents.models import load_model, make_env
from rim_agents.rim import RIMCell

# form: (selection, st_state_gradient). The hard rule on the same weights is the baseline: the
# gradient the core's own dynamics give, with no surrogate at all.
FORMS = {
    "hard rule": ("hard", False),
    "detached": ("straight_through", False),
    "through the state": ("straight_through", True),
}


def grad_norms(checkpoint: Path, selection: str, state_gradient: bool, updates: int, seed: int) -> np.ndarray:
    """Pre-clip global gradient norms of ``updates`` PPO updates from ``checkpoint``."""
    found = resolve_checkpoint(checkpoint, device="cpu")
    if found.config.core != "rims" or found.config.rims.selection != "straight_through":
        print(
            f"error: {checkpoint} is not a RIM run with selection=straight_through: pass such a run's checkpoint",
            file=sys.stderr,
        )
        raise SystemExit(2)
    model = load_model(found.config, found.path, env=make_env(found.config, seed=seed), device="cpu")
    for module in model.policy.modules():
        if isinstance(module, RIMCell):
            module.selection, module.st_state_gradient = selection, state_gradient
    norms: list[float] = []
    train = model.train

    def train_and_record() -> None:
        train()
        norms.extend(model.last_grad_norms)

    model.train = train_and_record  # type: ignore[method-assign]
    th.manual_seed(seed)
    np.random.seed(seed)
    model.learn(updates * model.n_steps * model.n_envs, reset_num_timesteps=True)
    return np.array(norms)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "checkpoints", nargs="+", type=Path, help="checkpoints (or run folders) of straight-through RIM runs"
    )
    parser.add_argument("--updates", type=int, default=3, help="PPO updates per checkpoint and form")
    parser.add_argument("--seed", type=int, default=4242, help="env and torch seed of the continued training")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/selection/st_gradient"))
    args = parser.parse_args()
    th.set_num_threads(1)
    lines = [
        f"Pre-clip global gradient norm of every PPO minibatch over {args.updates} updates continued from each "
        f"checkpoint (env and torch seed {args.seed}): the hard rule's (no surrogate), the surrogate's "
        "gradient detached from the previous state, or flowing through it; same weights, same forward passes.",
        "",
        "| checkpoint | form | minibatches | median | p90 | max | share > 10 |",
        "|---|---|---|---|---|---|---|",
    ]
    for checkpoint in args.checkpoints:
        name = "/".join(checkpoint.parts[-5:]) if checkpoint.suffix == ".zip" else "/".join(checkpoint.parts[-3:])
        for form, (selection, state_gradient) in FORMS.items():
            norms = grad_norms(checkpoint, selection, state_gradient, args.updates, args.seed)
            row = (
                f"| {name} | {form} | {len(norms)} | {np.median(norms):.3g} | {np.quantile(norms, 0.9):.3g} | "
                f"{norms.max():.3g} | {np.mean(norms > 10):.2f} |"
            )
            lines.append(row)
            print(row, flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "table.md").write_text("\n".join(lines) + "\n")
    print(f"wrote {args.out / 'table.md'}")


if __name__ == "__main__":
    main()
