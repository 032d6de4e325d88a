"""Does a memory-variant agent keep the cue under a shift? The recall, measured while it acts.

For each run trained with ``policy.cue_recall`` on ``RIMAgents/PickupCue-*``, this plays the run's
newest model (stochastic actions, as the evaluation does) under each shift and reads, at every step
where the target is hidden, the actor read-out's query ``q`` against the embedding ``e`` of the
target the episode showed (latched from the observations, as training stores it): the relative
recall error ``|q - e|^2 / |e|^2`` (0: the cue is held exactly; about 1 or more: it is lost). Under
``flicker-p`` the steps whose image was blanked and those that were seen are reported apart. For a
RIM core it also reads which RIMs were active at those steps (share of steps per RIM, blanked and
seen, and at the steps that show the cue) and how often the active set changed between two
consecutive hidden-target steps of an episode (switch rate): whether the shift routes the input
to RIMs other than those that hold the cue.

    python benchmarks/cue_under_shift.py runs/learning-cue/runs/pickup-cue/{lstm,rims}/s0 \\
        --shifts none,view-3,flicker-0.5 --episodes 100

Prints one markdown table (a row per run and shift) and, with ``--out``, writes it there.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch as th
from stable_baselines3.common.preprocessing import preprocess_obs

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from rim_agents.envs.pickup import HIDDEN_TARGET, latch_shown_target, recall_scored, target_hidden  # noqa: E402
from rim_agents.models import load_model, make_env  # noqa: E402 (after the path line)
from rim_agents.rim import RIMCore  # noqa: E402
from rim_agents.runs import load_run_config, newest_model  # noqa: E402
from rim_agents.shifts import shift_spec  # noqa: E402


@dataclass
class Recall:
    """What :func:`measure` reads for one model under one shift."""

    success: float
    episodes: int
    error_seen: list[float] = field(default_factory=list)  # hidden-target steps whose image was seen
    error_blank: list[float] = field(default_factory=list)  # hidden-target steps whose image was blanked
    active_seen: list[np.ndarray] = field(default_factory=list)  # (K,) masks, RIM cores only
    active_blank: list[np.ndarray] = field(default_factory=list)
    active_cue: list[np.ndarray] = field(default_factory=list)  # masks at the steps that show the target
    switched: list[bool] = field(default_factory=list)  # changed since the step before, both hidden-target steps


def measure(model: Any, env: Any, episodes: int, max_steps: int = 100_000) -> Recall:
    """Play ``model`` on ``env`` (a vector env of a pickup room with a cue) until ``episodes`` end."""
    policy = model.policy
    if policy.readout_actor is None:
        raise SystemExit("the run has no token read-out (policy.token_readout): nothing to read the recall from")
    queries: list[th.Tensor] = []
    hook = policy.readout_actor.register_forward_hook(lambda _m, _i, out: queries.append(out.detach()))
    core = policy.lstm_actor if isinstance(policy.lstm_actor, RIMCore) else None
    if core is not None:
        core.track_activity = True
    cue_space = policy.observation_space["target"]
    embed = policy.pi_features_extractor.target_embedding
    n = env.num_envs
    latch = np.tile(np.array(HIDDEN_TARGET), (n, 1))
    obs = env.reset()
    starts = np.ones(n, dtype=bool)
    state = None
    previous = None  # the RIM masks of the step before, (n, K)
    was_scored = np.zeros(n, dtype=bool)  # whether the step before was a scored (hidden-target) step
    out = Recall(success=0.0, episodes=0)
    successes: list[bool] = []
    try:
        for _ in range(max_steps):
            latch_shown_target(latch, obs["target"], starts)  # as RIMPPO's buffer stores it for the loss
            queries.clear()
            actions, state = model.predict(obs, state=state, episode_start=starts, deterministic=False)
            assert len(queries) == 1, "one read-out of the actor per step"
            scored = recall_scored(obs["target"], latch)
            mask = core.last_activity.mask[0].cpu().numpy() if core is not None else None
            if scored.any():
                with th.no_grad():
                    one_hot = preprocess_obs(th.as_tensor(latch), cue_space)
                    cue = embed(one_hot)
                    error = ((queries[0] - cue) ** 2).sum(-1) / (cue**2).sum(-1)
                blank = ~obs["image"].reshape(n, -1).any(axis=1)
                for i in np.flatnonzero(scored):
                    (out.error_blank if blank[i] else out.error_seen).append(float(error[i]))
                    if mask is not None:
                        (out.active_blank if blank[i] else out.active_seen).append(mask[i].astype(float))
                        if previous is not None and was_scored[i] and not starts[i]:
                            out.switched.append(bool((mask[i] != previous[i]).any()))
            if mask is not None:
                out.active_cue.extend(mask[~target_hidden(obs["target"])].astype(float))
            previous, was_scored = mask, scored
            obs, _, dones, infos = env.step(actions)
            for i in np.flatnonzero(dones):
                successes.append(bool(infos[i].get("success", False)))
            starts = dones
            if len(successes) >= episodes:
                break
    finally:
        hook.remove()
        if core is not None:
            core.track_activity = False
    out.success = float(np.mean(successes[:episodes]))
    out.episodes = min(len(successes), episodes)
    return out


def _mean(values: list[float]) -> str:
    return f"{np.mean(values):.2f}" if values else "-"


def _shares(masks: list[np.ndarray]) -> str:
    return " ".join(f"{v:.2f}" for v in np.mean(masks, axis=0)) if masks else "-"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", type=Path, help="run directories trained with policy.cue_recall")
    parser.add_argument("--shifts", default="none,view-3,flicker-0.5", help="comma-separated shifts")
    parser.add_argument("--episodes", type=int, default=100, help="episodes per run and shift")
    parser.add_argument("--seed", type=int, default=1_000_000, help="env seed (the evaluation's)")
    parser.add_argument("--out", type=Path, help="also write the table to this markdown file")
    args = parser.parse_args(argv)
    th.set_num_threads(1)
    rows = [
        "| run | shift | success | recall error, seen | recall error, blanked "
        "| RIMs active at the cue | RIMs active, seen | RIMs active, blanked | switch rate |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    pairs = []  # (success, recall error on seen steps) under each shift but none
    for run in args.runs:
        config = load_run_config(run)
        checkpoint = newest_model(run)
        if checkpoint is None:
            raise SystemExit(f"{run} holds no model")
        for shift in args.shifts.split(","):
            env = make_env(config, 8, args.seed, shift_spec(config, shift))
            try:
                th.manual_seed(args.seed)
                result = measure(load_model(config, checkpoint, env=env), env, args.episodes)
            finally:
                env.close()
            rows.append(
                f"| {run} | {shift} | {result.success:.2f} | {_mean(result.error_seen)} | {_mean(result.error_blank)} "
                f"| {_shares(result.active_cue)} | {_shares(result.active_seen)} | {_shares(result.active_blank)} "
                f"| {_mean(result.switched)} |"
            )
            print(rows[-1], flush=True)
            if shift != "none" and result.error_seen:
                pairs.append((result.success, float(np.mean(result.error_seen))))
    table = "\n".join(rows) + "\n"
    if len(pairs) >= 3:
        r = np.corrcoef(np.array(pairs).T)[0, 1]
        table += (
            f"\nSuccess against the recall error on seen steps, over the {len(pairs)} run x shift pairs "
            f"other than none: Pearson r = {r:.2f}\n"
        )
    print(table)
    if args.out:
        args.out.write_text(table)


if __name__ == "__main__":
    main()
