"""The hand-written backward pass against autograd's in PPO training, on any env's shipped config.

Builds the RIM policy of ``configs/<family>.yaml`` for ``--env``, collects ``--rollouts``
rollouts, then:

1. on one minibatch of the last rollout, ``policy.evaluate_actions`` with each backward pass: the
   largest difference of values and log-probabilities, and of every parameter's gradient relative
   to that gradient's largest entry (the loss a fixed random projection of the outputs);
2. ``model.train()`` on that rollout, the switch (``core.cell.handwritten_backward``) toggled
   between interleaved rounds: the medians and their ratio.

    python benchmarks/handwritten_backward.py --env CartPole-v1 [--rounds 5] [--threads 1] [--rollouts 2]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch as th

from rim_agents.config import load_config
from rim_agents.host import describe
from rim_agents.models import build_model, make_env
from rim_agents.rim_unroll import in_graph


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--env", required=True)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rollouts", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    th.set_num_threads(args.threads)
    config = load_config(args.env, "rims", flags={"seed": args.seed})
    model = build_model(config, make_env(config))
    model.learn(args.rollouts * model.n_steps * model.n_envs)
    cores = model.policy.rim_cores()

    def switch(handwritten: bool) -> None:
        for core in cores:
            core.cell.handwritten_backward = handwritten

    batch = next(iter(model.rollout_buffer.get(model.batch_size)))
    results = []
    for handwritten in (True, False):
        switch(handwritten)
        model.policy.zero_grad()
        actions = batch.actions.long().flatten() if batch.actions.dim() > 1 else batch.actions
        values, log_prob, entropy = model.policy.evaluate_actions(
            batch.observations, actions, batch.lstm_states, batch.episode_starts
        )
        g = th.Generator().manual_seed(1)
        loss = (values.flatten() * th.randn(values.numel(), generator=g)).sum() + entropy.sum()
        (loss + (log_prob * th.randn(log_prob.numel(), generator=g)).sum()).backward()
        grads = {n: p.grad.clone() for n, p in model.policy.named_parameters() if p.grad is not None}
        results.append((values.detach(), log_prob.detach(), grads, in_graph(log_prob)))
    (v1, l1, g1, used), (v2, l2, g2, _) = results
    worst = max(float((g1[n] - g2[n]).abs().max() / g2[n].abs().max().clamp(min=1e-12)) for n in g2)
    cell = cores[0].cell
    print(
        f"{args.env}: {cell.num_units} {cell.cell_type} RIMs, k={cell.k_now}, selection {cell.selection}; "
        f"hand-written pass taken: {used}; episode starts in the minibatch: {int(batch.episode_starts.sum())}"
    )
    print(
        f"minibatch of {model.batch_size}: values differ by {float((v1 - v2).abs().max()):.2e}, log-probs by "
        f"{float((l1 - l2).abs().max()):.2e}, gradients by {worst:.2e} at most (relative)"
    )
    times: dict[bool, list[float]] = {True: [], False: []}
    for _ in range(args.rounds):
        for handwritten in (True, False):
            switch(handwritten)
            start = time.perf_counter()
            model.train()
            times[handwritten].append(time.perf_counter() - start)
    fast, slow = statistics.median(times[True]), statistics.median(times[False])
    print(describe())
    print(
        f"model.train(), medians of {args.rounds} interleaved rounds: hand-written "
        f"{fast:.2f} s, autograd {slow:.2f} s, ratio {fast / slow:.2f}x"
    )


if __name__ == "__main__":
    main()
