"""Does a memory-variant agent remember the cue, and does it use it? A linear probe.

For each run of ``RIMAgents/PickupCue-*`` (or any pickup env with ``cue_steps``), this plays the
newest checkpoint (and, as a reference, an untrained model built from the same config and seed)
with stochastic actions, records the actor core's state after every step together with the
episode's target, and fits a multinomial logistic regression from the state to the target on
states at least ``--min-age`` steps after the cue, scored on held-out states. High probe accuracy
with success at chance says the core keeps the cue and the heads do not use it; chance accuracy
says the core does not keep it.

It also asks whether the agent acts on the cue: at every step after the cue where an object is
in front of the agent, the probability of ``pickup`` when that object is the target and when it is
not, and a second probe from the state to "the object in front is the target" (a conjunction of
the memory and the view), read against the share of its majority class.

    python benchmarks/memory_probe.py runs/tune-cue/lstm-fb1-s100 runs/tune-cue/lstm-ro-s100

``--all-checkpoints`` probes every checkpoint of each run in step order instead of the newest
model: when training keeps, gains or loses the cue.

``--trace`` instead measures how much of the cue a *fresh* core (built from each run's config)
passes on: on one random-walk episode's features, ``|d o_t / d x_0| / |d o_t / d x_t|`` for the
actor core's output ``o_t`` at t = 1, 5, 10, 15 (mean of three models, seeds 0-2): the gradient
that could teach the core to keep the cue, against the one from the current input.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch as th
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from rim_agents.cores import unroll  # noqa: E402
from rim_agents.envs.pickup import TYPES  # noqa: E402
from rim_agents.models import build_model, load_model, make_env  # noqa: E402 (after the path line)
from rim_agents.runs import checkpoint_step, checkpoints, load_run_config, newest_model  # noqa: E402


def _target_index(env: Any) -> int:
    kind, colour = env.unwrapped._target_obs
    return int(kind) * 16 + int(colour)


PICKUP = 3  # the pickup env's action index


def front_is_target(env: Any) -> bool | None:
    """Whether the object in front of the agent is the target; None when there is no object there."""
    env = env.unwrapped
    front = env.grid.get(*env.front_pos)
    if front is None or front.type not in TYPES:
        return None
    return bool((front.type, front.color) == env.target)


def _facing(env: Any) -> bool | None:
    """:func:`front_is_target`, and None while the cue is shown."""
    return None if env.unwrapped.cue_shown else front_is_target(env)


@dataclass
class Rollout:
    """What :func:`collect` records; one row per env and step."""

    states: np.ndarray  # (M, hidden): the actor core's flat state after the step's observation
    targets: np.ndarray  # (M,): the episode's target
    ages: np.ndarray  # (M,): steps since the episode began (0: the first observation)
    facing: np.ndarray  # (M,): 1 facing the target, 0 facing another object, -1 neither
    pickup: np.ndarray  # (M,): the policy's probability of pickup at that step
    success: float  # success rate of the episodes that ended


def collect(model: Any, env: Any, steps: int) -> Rollout:
    """``steps`` vector steps of ``model`` (stochastic actions) on ``env``, a ``DummyVecEnv`` of pickup envs."""
    policy = model.policy
    obs = env.reset()
    starts = np.ones(env.num_envs, dtype=bool)
    state = None
    age = np.zeros(env.num_envs, dtype=int)
    targets = [_target_index(e) for e in env.envs]
    states, labels, ages, facing, pickup, successes = [], [], [], [], [], []
    for _ in range(steps):
        with th.no_grad():
            obs_tensor, _ = policy.obs_to_tensor(obs)
            shape = (policy.lstm_actor.num_layers, env.num_envs, policy.lstm_actor.hidden_size)
            before = (th.zeros(shape), th.zeros(shape)) if state is None else tuple(th.as_tensor(s) for s in state)
            dist, _ = policy.get_distribution(obs_tensor, before, th.as_tensor(starts, dtype=th.float32))
            pickup.append(dist.distribution.probs[:, PICKUP].cpu().numpy())
        actions, state = model.predict(obs, state=state, episode_start=starts, deterministic=False)
        h = np.asarray(state[0] if isinstance(state, tuple) else state)  # (layers, n_envs, hidden)
        states.append(h[-1].reshape(env.num_envs, -1).copy())
        labels.append(list(targets))
        ages.append(age.copy())
        facing.append([{None: -1, True: 1, False: 0}[_facing(e)] for e in env.envs])
        obs, _, dones, infos = env.step(actions)
        age += 1
        for i, done in enumerate(dones):
            if done:
                successes.append(bool(infos[i].get("success", False)))
                age[i] = 0
                targets[i] = _target_index(env.envs[i])
        starts = dones
    return Rollout(
        np.concatenate(states),
        np.concatenate(labels),
        np.concatenate(ages),
        np.concatenate(facing),
        np.concatenate(pickup),
        float(np.mean(successes or [np.nan])),
    )


def probe_accuracy(x: np.ndarray, y: np.ndarray, seed: int = 0, epochs: int = 500) -> tuple[float, int]:
    """Held-out accuracy (a third of the rows) of an L2-regularised multinomial logistic regression
    from ``x`` to ``y``, and the number of classes."""
    gen = th.Generator().manual_seed(seed)
    features = th.as_tensor(x, dtype=th.float32)
    classes, labels = th.unique(th.as_tensor(y), return_inverse=True)
    order = th.randperm(len(features), generator=gen)
    train, test = order[: 2 * len(order) // 3], order[2 * len(order) // 3 :]
    mean, std = features[train].mean(0), features[train].std(0) + 1e-6
    features = (features - mean) / std
    weight = th.zeros(features.shape[1], len(classes), requires_grad=True)
    bias = th.zeros(len(classes), requires_grad=True)
    optimizer = th.optim.Adam([weight, bias], lr=0.05)
    for _ in range(epochs):
        optimizer.zero_grad()
        loss = F.cross_entropy(features[train] @ weight + bias, labels[train]) + 1e-3 * weight.pow(2).sum()
        loss.backward()
        optimizer.step()
    with th.no_grad():
        accuracy = ((features[test] @ weight + bias).argmax(1) == labels[test]).float().mean().item()
    return accuracy, len(classes)


TRACE_STEPS = (1, 5, 10, 15)


def cue_gradient_ratio(model: Any, env: Any, steps: tuple[int, ...] = TRACE_STEPS) -> list[float]:
    """``|d o_t / d x_0| / |d o_t / d x_t|`` of ``model``'s actor core over one random-walk episode
    of ``env`` (one env), for each ``t`` in ``steps``."""
    policy = model.policy
    obs = env.reset()
    features = []
    rng = np.random.default_rng(0)
    for _ in range(max(steps) + 1):
        obs_tensor, _ = policy.obs_to_tensor(obs)
        with th.no_grad():
            features.append(policy.extract_features(obs_tensor, policy.pi_features_extractor))
        obs, *_ = env.step(rng.integers(0, 3, env.num_envs))  # turn or move: the episode goes on
    x = th.cat(features)[:, None, : policy.core_input_shape[-1]].clone().requires_grad_(True)  # (T, 1, F)
    core = policy.lstm_actor
    zeros = th.zeros(core.num_layers, 1, core.hidden_size)
    starts = th.zeros(len(features), 1)
    out, _ = unroll(core, x, (zeros, zeros), starts)
    ratios = []
    for t in steps:
        (grad,) = th.autograd.grad(out[t].norm(), x, retain_graph=True)
        ratios.append((grad[0].norm() / grad[t].norm()).item())
    return ratios


def models_to_probe(run: Path, config: Any, env: Any, all_checkpoints: bool = False) -> dict[str, Any]:
    """The models to probe by name: the run's newest model ("trained", when it has one) and an
    untrained one of its config; with ``all_checkpoints``, the untrained model and then every
    checkpoint in step order ("at N steps")."""
    untrained = build_model(config, env)
    if all_checkpoints:
        models: dict[str, Any] = {"untrained": untrained}
        for path in checkpoints(run):
            models[f"at {checkpoint_step(path):,} steps"] = load_model(config, path, env=env)
        return models
    checkpoint = newest_model(run)
    if checkpoint is None:
        return {"untrained": untrained}
    return {"trained": load_model(config, checkpoint, env=env), "untrained": untrained}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", type=Path, help="run directories of a pickup env with cue_steps")
    parser.add_argument("--steps", type=int, default=400, help="vector steps per model (16 envs)")
    parser.add_argument("--min-age", type=int, default=2, help="probe states at least this many steps after the cue")
    parser.add_argument("--seed", type=int, default=2_000_000, help="env seed (disjoint from training's)")
    parser.add_argument("--trace", action="store_true", help="the cue's gradient through fresh cores instead")
    parser.add_argument("--all-checkpoints", action="store_true", help="probe every checkpoint, not the newest model")
    args = parser.parse_args(argv)
    th.set_num_threads(1)
    for run in args.runs:
        config = load_run_config(run)
        if args.trace:
            ratios = []
            for seed in range(3):
                config.seed = seed
                env = make_env(config, n_envs=1, seed=args.seed + seed)
                ratios.append(cue_gradient_ratio(build_model(config, env), env))
                env.close()
            mean = np.mean(ratios, axis=0)
            print(f"{run.name}: cue gradient ratio at t = {TRACE_STEPS}: " + " ".join(f"{v:.3f}" for v in mean))
            continue
        env = make_env(config, n_envs=16, seed=args.seed)
        for name, model in models_to_probe(run, config, env, args.all_checkpoints).items():
            th.manual_seed(0)
            rollout = collect(model, env, args.steps)
            keep = rollout.ages >= args.min_age
            accuracy, n_classes = probe_accuracy(rollout.states[keep], rollout.targets[keep])
            front = rollout.facing >= 0
            match, _ = probe_accuracy(rollout.states[front], rollout.facing[front])
            on_target, on_other = rollout.facing == 1, rollout.facing == 0
            majority = max(on_target.sum(), on_other.sum()) / max(1, front.sum())  # the probe's floor
            print(
                f"{run.name} {name}: success {rollout.success:.2f}; target decoded from the actor state "
                f">= {args.min_age} steps after the cue: {accuracy:.2f} ({n_classes} targets, chance "
                f"{1 / n_classes:.2f}, {int(keep.sum())} states); facing an object ({int(front.sum())} "
                f"states): P(pickup) {rollout.pickup[on_target].mean():.2f} at the target, "
                f"{rollout.pickup[on_other].mean():.2f} at another, 'in front is the target' decoded "
                f"{match:.2f} (majority class {majority:.2f})"
            )
        env.close()


if __name__ == "__main__":
    main()
