"""Is the sparse RIM's failure on the repeat task PPO's or the selection's? The same task learnt by
supervised learning.

``RIMAgents/Repeat-v0`` asks for the symbol shown ``delay`` steps ago. Here the cores of
``configs/classic.yaml`` (the RL runs' widths and RIM settings) read the same one-hot symbols, a
linear read-out predicts the symbol ``delay`` steps back at every scored step, and Adam minimises
the cross-entropy on fresh random sequences each step: the gradient says at every step what the
answer was, where PPO's says only how much return an action earned. Variants: ``lstm``, the RIM
core all active (``k = K``), the paper's hard top-k, and straight-through top-k with k annealed
over the first half of training: the selection study's variants of those names, read with their
overrides from ``configs/studies/selection.yaml`` (any of its ``lstm`` or ``rims`` variants can be named).

Prints the accuracy on held-out sequences (top-k in force, evaluation mode; chance is
``1 / n_symbols``) at a few points of training, per variant and seed, and each run's wall time.

    python benchmarks/selection_supervised.py [--delay 4] [--steps 3000] [--seeds 0,1,2] [--threads 1]
"""

from __future__ import annotations

import argparse
import time

import torch as th
from torch import nn
from torch.nn import functional as F

from rim_agents import RIMCore
from rim_agents.config import CONFIG_DIR, TrainConfig, load_config
from rim_agents.study import load_spec

STUDY = CONFIG_DIR / "studies" / "selection.yaml"
VARIANTS = ("lstm", "rims-all-active", "rims", "rims-st-anneal")


def variant_config(name: str) -> TrainConfig:
    """The repeat task's run config of the selection study's variant ``name`` (its core and overrides)."""
    spec = load_spec(STUDY)
    variants = {v.name: v for v in spec.variants if v.core in ("lstm", "rims")}
    if name not in variants:
        raise ValueError(
            f"unknown variant {name!r}: choose an lstm or rims variant of {STUDY.name}: {', '.join(variants)}"
        )
    variant = variants[name]
    repeat = next(e for e in spec.envs if e.env == "RIMAgents/Repeat-v0")  # its pins, not its delay
    overrides = [*repeat.overrides, *spec.overrides, *variant.overrides]
    return load_config(env="RIMAgents/Repeat-v0", core=variant.core, overrides=overrides)


def repeat_batch(
    batch: int, length: int, delay: int, n_symbols: int, generator: th.Generator
) -> tuple[th.Tensor, th.Tensor]:
    """Random symbols ``(length, batch)`` and the targets: the symbol ``delay`` steps back, -100 (no
    loss, no score) for the first ``delay`` steps, as the env scores nothing there."""
    symbols = th.randint(n_symbols, (length, batch), generator=generator)
    targets = th.full_like(symbols, -100)
    targets[delay:] = symbols[: length - delay]
    return symbols, targets


class Model(nn.Module):
    """One-hot symbols -> core -> linear read-out of the answer at every step."""

    def __init__(self, variant: str, n_symbols: int) -> None:
        super().__init__()
        config = variant_config(variant)
        self.n_symbols = n_symbols
        self.core: nn.Module
        if config.core == "lstm":
            self.core = nn.LSTM(n_symbols, config.policy.lstm_hidden_size)
        else:
            self.core = RIMCore(n_symbols, config.rims)
        self.head = nn.Linear(self.core.hidden_size, n_symbols)

    def set_progress(self, fraction_done: float) -> None:
        if isinstance(self.core, RIMCore):
            self.core.cell.set_progress(fraction_done)

    def forward(self, symbols: th.Tensor) -> th.Tensor:
        out, _ = self.core(F.one_hot(symbols, self.n_symbols).float())
        return self.head(out)  # (T, B, n_symbols)


def accuracy(model: Model, symbols: th.Tensor, targets: th.Tensor) -> float:
    """Share of scored steps answered right (the argmax), in evaluation mode."""
    was_training = model.training
    model.eval()
    with th.no_grad():
        predicted = model(symbols).argmax(dim=-1)
    model.train(was_training)
    scored = targets >= 0
    return float((predicted[scored] == targets[scored]).float().mean())


def train(
    variant: str,
    seed: int,
    steps: int,
    delay: int,
    n_symbols: int = 4,
    length: int = 24,
    batch: int = 64,
    lr: float = 1e-3,
    report_at: tuple[int, ...] = (),
) -> dict[int, float]:
    """Train one variant; the held-out accuracy at each step of ``report_at`` and at the end."""
    th.manual_seed(seed)
    model = Model(variant, n_symbols)
    optimizer = th.optim.Adam(model.parameters(), lr=lr)
    data = th.Generator().manual_seed(seed)
    held_out = repeat_batch(1024, length, delay, n_symbols, th.Generator().manual_seed(1_000_000 + seed))
    scores: dict[int, float] = {}
    for step in range(1, steps + 1):
        model.set_progress((step - 1) / steps)
        symbols, targets = repeat_batch(batch, length, delay, n_symbols, data)
        logits = model(symbols)
        loss = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=-100)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step in report_at or step == steps:
            scores[step] = accuracy(model, *held_out)
    return scores


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--delay", type=int, default=4)
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    th.set_num_threads(args.threads)
    variants = args.variants.split(",")
    for variant in variants:
        try:
            variant_config(variant)
        except ValueError as e:
            parser.error(str(e))
    seeds = [int(s) for s in args.seeds.split(",")]
    report_at = tuple(sorted({args.steps // 6, args.steps // 3, args.steps // 2, args.steps}))
    print(f"repeat the symbol from {args.delay} steps ago, supervised; held-out accuracy (chance 0.25)")
    print("| variant | seed | " + " | ".join(f"step {s}" for s in report_at) + " | wall s |")
    print("|---|---|" + "---|" * len(report_at) + "---|", flush=True)
    for variant in variants:
        for seed in seeds:
            start = time.perf_counter()
            scores = train(variant, seed, args.steps, args.delay, report_at=report_at)
            wall = time.perf_counter() - start
            cells = " | ".join(f"{scores[s]:.3f}" for s in report_at)
            print(f"| {variant} | {seed} | {cells} | {wall:.0f} |", flush=True)


if __name__ == "__main__":
    main()
