"""PPO training throughput (env steps per second, rollout + update) on Breakout.

Setting: BreakoutNoFrameskip-v4, 8 envs x 128 steps, minibatch 256, 4 epochs (the zoo recipe).
Variants, all in this process and interleaved round by round:

- ``ppo-cnn``: feed-forward PPO with SB3's ``CnnPolicy`` (4 stacked frames);
- ``stock-lstm``: sb3-contrib ``RecurrentPPO`` with ``CnnLstmPolicy``, 128 hidden, no critic LSTM;
- ``ours-none`` (not in the default list): ``RIMPPO`` + ``RIMPolicy(core="none")``, the package's
  feed-forward control (configs/atari.yaml);
- ``ours-lstm``: ``RIMPPO`` + ``RIMPolicy(core="lstm")``, 128 hidden (configs/atari.yaml);
- ``ours-rims``: ``RIMPPO`` + ``RIMPolicy(core="rims")`` with configs/atari.yaml's RIM settings;
- ``ours-rims-compiled`` (not in the default list): the same with ``rims.compile`` (its compile
  time falls in the warm-up iteration, which is not timed; it is printed);
- ``ours-rims-graphs`` (not in the default list; CUDA): the same with ``rims.cuda_graphs=true``, the
  whole unroll replayed as CUDA graphs (recorded in the warm-up iteration, printed);
- any ``ours-*`` with ``-nchw`` appended: the same with the NatureCNN's convolutions in SB3's
  channels-first layout (``policy.features_extractor_kwargs.channels_last=false``), to measure
  what the channels-last default gains in the same run;
- any ``ours-*`` with ``-unfused`` appended: the same with Adam's per-tensor step
  (``policy.optimizer_kwargs.fused=false``) instead of the fused kernel;
- any ``ours-*`` with ``-unfolded`` appended: the same with sb3-contrib's critic map and value head
  run as two products (plain ``nn.Linear`` on the same parameters) instead of folded into one
  (:class:`rim_agents.policy.FoldedValueHead`);
- any ``ours-rims*`` with ``-autograd`` appended: the same with the RIM unroll trained through
  autograd step by step instead of the hand-written backward pass (:mod:`rim_agents.rim_unroll`).
  Suffixes combine, in any order.

Each round runs ``--updates`` PPO iterations (rollout + train) per variant after one warm-up
iteration; we print the median env steps/s and ratios to stock RecurrentPPO and to feed-forward PPO
(ratios of the medians), and the paired ratios to feed-forward PPO and to ``ours-none``: the median
over rounds of each round's ratio. A round runs its variants back to back, so a change of the
machine's speed between rounds (common on a shared CPU) cancels in a paired ratio; the order
rotates from round to round (``rounds.round_order``), so that no variant always runs first.
Every variant runs under the process's ``--allocator`` setting (``rim_agents.host``; ``retain``, the
training config's default, keeps freed memory for reuse: fewer page faults for every variant).
With ``--train-only`` a round times ``--updates`` calls of ``model.train()`` on the warm-up's rollout
(the env's and the rollout's noise left out): steps/s are then the rollout's 1,024 steps per update.

    python benchmarks/train_throughput.py [--rounds 3] [--updates 2] [--train-only] [--device cuda]

``--n-steps`` (a multiple of the 32-step training sequences) and ``--warmup 0`` shorten a run
whose point is the path, not the figures (``gpu_check.sh --quick``).
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Any

import torch as th
from rounds import paired_ratio, round_order
from sb3_contrib import RecurrentPPO
from stable_baselines3 import PPO

from rim_agents.config import ALLOCATORS, load_config
from rim_agents.host import apply_allocator, describe
from rim_agents.models import build_model, make_env

ENV = "BreakoutNoFrameskip-v4"
COMMON: dict[str, Any] = {
    "n_steps": 128,
    "batch_size": 256,
    "n_epochs": 4,
    "learning_rate": 2.5e-4,
    "clip_range": 0.1,
    "ent_coef": 0.01,
    "vf_coef": 0.5,
}


SUFFIXES = ("-nchw", "-unfused", "-unfolded", "-autograd")


def variant_base(name: str) -> str:
    """The variant without its suffixes (``-nchw``, ``-unfused``, ``-unfolded``, ``-autograd``)."""
    while name.endswith(SUFFIXES):
        name = name[: name.rindex("-")]
    return name


def unfold_critic(policy: Any) -> None:
    """Put back sb3-contrib's two critic maps (plain ``nn.Linear``) on the folded ones' parameters."""
    for attr in ("critic", "value_net"):
        folded = getattr(policy, attr)
        if isinstance(folded, th.nn.Linear) and type(folded) is not th.nn.Linear:
            plain = th.nn.Linear(folded.in_features, folded.out_features, device="meta")
            plain.weight, plain.bias = folded.weight, folded.bias
            setattr(policy, attr, plain)


def build(name: str, seed: int, device: str = "cpu", n_steps: int = 128) -> Any:
    core = next((c for c in ("rims", "none") if name.startswith(f"ours-{c}")), "lstm")
    mode = "reduce-overhead" if device == "cuda" else "default"
    base = variant_base(name)
    overrides = {"ours-rims-compiled": [f"rims.compile={mode}"], "ours-rims-graphs": ["rims.cuda_graphs=true"]}
    chosen = list(overrides.get(base, []))
    if "-nchw" in name:
        chosen.append("policy.features_extractor_kwargs.channels_last=false")
    if "-unfused" in name:
        chosen.append("policy.optimizer_kwargs.fused=false")
    chosen.append(f"ppo.n_steps={n_steps}")
    common = {**COMMON, "n_steps": n_steps}
    config = load_config(ENV, core, overrides=chosen, flags={"seed": seed, "device": device})
    env = make_env(config)
    if name == "ppo-cnn":
        return PPO("CnnPolicy", env, seed=seed, device=device, **common)
    if name == "stock-lstm":
        return RecurrentPPO(
            "CnnLstmPolicy",
            env,
            seed=seed,
            device=device,
            policy_kwargs={"lstm_hidden_size": 128, "enable_critic_lstm": False},
            **common,
        )
    model = build_model(config, env)
    if "-unfolded" in name:
        unfold_critic(model.policy)
    if "-autograd" in name:
        for core in model.policy.rim_cores():
            core.cell.handwritten_backward = False
    return model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--updates", type=int, default=2, help="PPO iterations per timed round")
    parser.add_argument(
        "--variants", default="ppo-cnn,stock-lstm,ours-lstm,ours-rims", help="comma-separated subset to run"
    )
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--n-steps", type=int, default=128, help="steps per env per rollout (the recipe's 128)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed iterations per variant first")
    parser.add_argument("--train-only", action="store_true", help="time model.train() on one rollout, no collecting")
    parser.add_argument(
        "--allocator", choices=ALLOCATORS, default="retain",
        help="the process's allocator setting, for every variant alike (train.py's default: retain)",
    )  # fmt: skip
    args = parser.parse_args()
    apply_allocator(args.allocator)
    names = args.variants.split(",")
    models = {name: build(name, seed=0, device=args.device, n_steps=args.n_steps) for name in names}
    steps_per_update = 8 * args.n_steps
    warmup = max(args.warmup, 1 if args.train_only else 0)  # a train-only run needs one rollout
    for name, model in models.items():
        if not warmup:
            break
        start = time.perf_counter()
        model.learn(warmup * steps_per_update)
        if variant_base(name) in ("ours-rims-compiled", "ours-rims-graphs"):
            print(f"{name}: warm-up iteration (compiles or records) {time.perf_counter() - start:.1f} s")
    rates: dict[str, list[float]] = {name: [] for name in names}
    for r in range(args.rounds):
        for name in round_order(names, r):
            model = models[name]
            start = time.perf_counter()
            if args.train_only:
                for _ in range(args.updates):
                    model.train()
            else:
                model.learn(args.updates * steps_per_update, reset_num_timesteps=False)
            rates[name].append(args.updates * steps_per_update / (time.perf_counter() - start))
    med = {name: statistics.median(r) for name, r in rates.items()}
    print(
        f"{ENV}, 8 envs x {args.n_steps} steps, batch 256, 4 epochs; {args.rounds} rounds x {args.updates} updates; "
        f"device {args.device}, allocator {args.allocator}" + (", train() only" if args.train_only else "")
    )
    print(describe())
    print(
        f"{'variant':<24}{'median steps/s':>16}{'vs stock-lstm':>15}{'vs ppo-cnn':>12}{'vs ours-none':>14}"
        f"{'paired ppo-cnn':>16}{'paired ours-none':>18}   all rounds"
    )
    for name, m in med.items():
        vs = [f"{m / med[base]:.2f}x" if base in med else "-" for base in ("stock-lstm", "ppo-cnn", "ours-none")]
        paired = [
            f"{paired_ratio(rates[name], rates[base]):.2f}x" if base in rates else "-"
            for base in ("ppo-cnn", "ours-none")
        ]
        rounds = ", ".join(f"{r:.1f}" for r in rates[name])
        print(f"{name:<24}{m:>16.1f}{vs[0]:>15}{vs[1]:>12}{vs[2]:>14}{paired[0]:>16}{paired[1]:>18}   {rounds}")


if __name__ == "__main__":
    main()
