"""Can the memory variant's policy network learn the match from a dense signal? PickupCue, supervised.

On ``RIMAgents/PickupCue-6x6-v0`` the target is shown in the first observation only, and PPO
agents that keep it in memory can still fail to act on it: they pick up the target and the other
object alike (``benchmarks/memory_probe.py``). This asks whether the network itself can compute the
match between what it was shown and what it sees when told the answer at every step.

A fresh model of the RL recipe (``configs/minigrid.yaml``: the run's extractor and actor core,
initialised from ``--seeds``) gets a new linear read-out of one logit, "the object in front is the
target", trained with binary cross-entropy at every step after the cue where an object is in front.
Episodes are random walks (left, right, forward; never a pickup, so every episode lasts the env's
180 steps), of which the first ``--length`` steps are kept and unrolled from a zero state; Adam
at the recipe's learning rate (5e-4), 16 episodes per update drawn from a fixed pool. Prints the
balanced accuracy (mean of the accuracies on "target in front" and "other object in front") on
held-out episodes at a few points of training; 0.5 is chance, and the feed-forward control
(``none``), which cannot see the target, should stay there.

``--shown`` is the control that the harness can teach a match at all: the same room with the
target shown at every step and the room lit (``RIMAgents/Pickup-6x6-v0`` with one distractor, the
network built for it), where the extractor's target-match channels compute the match against the
visible target.

Variants beside the plain cores (``none``, ``lstm``, ``rims``, ``gru``):

- ``lstm+oracle-cue``: the extractor's match channels read the true cue's embedding at every step
  (what a perfect recall would give them); the core and read-out as for ``lstm``.
- ``lstm+feedback``: they read a linear map of the LSTM's previous output instead (a recall);
  ``lstm+feedback+aux`` adds a loss teaching that map the cue's embedding; ``lstm+feedback+aux+skip``
  also lets the read-out see the extractor's features beside the core's output.
- ``CORE+recall`` (e.g. ``lstm+recall``, ``rims+recall``): the policy's own options
  ``policy.token_readout=true policy.cue_recall=1.0``, the recall loss computed by the policy as
  in PPO (scored at every step after the cue); the read-out reads ``[o, scores]``.

The recall error (the recall's squared distance to the cue's embedding over the cue's squared norm,
on the held-out episodes) is printed beside the accuracy where there is a recall.

    python benchmarks/match_supervised.py [--cores none,lstm,rims] [--seeds 100,103] [--updates 600] [OVERRIDES]
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch as th
import torch.nn.functional as F
from stable_baselines3.common.preprocessing import preprocess_obs

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from memory_probe import front_is_target  # noqa: E402

from rim_agents.config import load_config  # noqa: E402
from rim_agents.envs.pickup import target_hidden  # noqa: E402
from rim_agents.models import build_model, make_env  # noqa: E402

ENV = "RIMAgents/PickupCue-6x6-v0"
#: The control: the target shown at every step (and the room lit; PickupCue's is dark while the cue shows).
SHOWN_ENV, SHOWN_OVERRIDES = "RIMAgents/Pickup-6x6-v0", ["env_options.env_kwargs.num_distractors=1"]
#: The prototype core: an LSTM whose previous output is fed back as the target to match the view against.
FEEDBACK = "lstm+feedback"
#: The same, with an auxiliary loss teaching the recall the cue's embedding (squared error, stopped gradient).
FEEDBACK_AUX = "lstm+feedback+aux"
#: The same, with the read-out also reading the extractor's features (a skip past the core).
FEEDBACK_AUX_SKIP = "lstm+feedback+aux+skip"
#: The control of the feedback path: the match channels read the true cue's embedding at every step.
ORACLE = "lstm+oracle-cue"
#: The policy's own options (``policy.token_readout`` and ``policy.cue_recall=1.0``) on a core, e.g. ``lstm+recall``.
RECALL = "+recall"
RECALL_OVERRIDES = ("policy.token_readout=true", "policy.cue_recall=1.0")
MOVES = 3  # left, right, forward: the first three of MiniGrid's actions


@dataclass
class Episodes:
    """Whole random-walk episodes, time first."""

    obs: dict[str, np.ndarray]  # each (T, E, ...)
    labels: np.ndarray  # (T, E): 1 target in front, 0 other object in front, -1 neither (or t = 0)


def collect(config: Any, n_rounds: int, seed: int, n_envs: int = 8, keep: int | None = None) -> Episodes:
    """``n_rounds x n_envs`` episodes of random moves (the envs reset together after ``max_steps``),
    each cut to its first ``keep`` steps (all by default)."""
    env = make_env(config, n_envs=n_envs, seed=seed)
    rng = np.random.default_rng(seed)
    length = env.envs[0].unwrapped.max_steps
    obs = env.reset()
    rounds_obs: list[dict[str, np.ndarray]] = []
    rounds_labels: list[np.ndarray] = []
    for _ in range(n_rounds):
        steps_obs: list[dict[str, np.ndarray]] = []
        steps_labels = []
        for t in range(length):
            steps_obs.append({k: v.copy() for k, v in obs.items()})
            steps_labels.append([-1 if t == 0 else {None: -1, True: 1, False: 0}[front_is_target(e)] for e in env.envs])
            obs, _, dones, _ = env.step(rng.integers(MOVES, size=n_envs))
            if dones.any() != (t == length - 1) or dones.any() != dones.all():
                raise RuntimeError("random-walk episodes must all last max_steps steps")
        rounds_obs.append({k: np.stack([o[k] for o in steps_obs[:keep]]) for k in steps_obs[0]})
        rounds_labels.append(np.array(steps_labels[:keep]))
    env.close()
    keys = rounds_obs[0].keys()
    return Episodes(
        {k: np.concatenate([r[k] for r in rounds_obs], axis=1) for k in keys}, np.concatenate(rounds_labels, axis=1)
    )


class MatchModel(th.nn.Module):
    """The policy's extractor and actor core, and a one-logit read-out of the core's output."""

    def __init__(self, core: str, seed: int, shown: bool = False, overrides: tuple[str, ...] = ()) -> None:
        super().__init__()
        self.feedback = core in (FEEDBACK, FEEDBACK_AUX, FEEDBACK_AUX_SKIP, ORACLE)
        self.recall_loss = core in (FEEDBACK_AUX, FEEDBACK_AUX_SKIP)
        self.skip, self.oracle = core == FEEDBACK_AUX_SKIP, core == ORACLE
        self.aux_loss: th.Tensor | None = None
        self.recall_error: float | None = None  # the last forward's recall error relative to the cue's norm
        env_id, extra = (SHOWN_ENV, SHOWN_OVERRIDES) if shown else (ENV, [])
        base = "lstm" if self.feedback else core.removesuffix(RECALL)
        if core.endswith(RECALL):
            extra = [*extra, *RECALL_OVERRIDES]
        config = load_config(env=env_id, core=base, overrides=[*overrides, *extra], flags={"seed": seed})
        env = make_env(config, n_envs=1, seed=seed)
        self.policy = build_model(config, env).policy
        env.close()
        th.manual_seed(seed)
        width = self.policy.lstm_output_dim + (self.policy.features_dim if self.skip else 0)
        self.head = th.nn.Linear(width, 1)
        if self.feedback:
            extractor = self.policy.pi_features_extractor
            self.recall = th.nn.Linear(self.policy.lstm_actor.hidden_size, extractor.embed.embedding_dim)

    def forward(self, obs: dict[str, th.Tensor]) -> th.Tensor:
        """``obs`` time first ``(T, B, ...)`` -> logits ``(T, B)``, from zero states at t = 0."""
        if self.feedback:
            return self._forward_feedback(obs)
        policy = self.policy
        T, B = obs["image"].shape[:2]
        flat = {k: v.transpose(0, 1).flatten(0, 1) for k, v in obs.items()}  # sequence-major
        features = policy.pi_features_extractor(preprocess_obs(flat, policy.observation_space))
        core = policy.lstm_actor
        shape = (core.num_layers, B, core.hidden_size)
        states = (th.zeros(shape), th.zeros(shape))
        starts = th.zeros(B, T)
        starts[:, 0] = 1
        recall = None
        if policy.cue_recall > 0:  # the policy's recall loss: the cue (t = 0), scored where it is hidden
            cue = flat["target"].view(B, T, -1)[:, :1].expand(B, T, -1).flatten(0, 1)
            scored = th.as_tensor(target_hidden(flat["target"].numpy()))
            recall = (preprocess_obs(cue, policy.observation_space["target"]), scored)
        with policy.recalling(recall):
            latent, _ = policy._process_sequence(features, states, starts.flatten(), core)
        if policy.recall_errors:
            self.recall_error = float(policy.recall_errors[-1])
            policy.recall_errors.clear()
        return self.head(latent).view(B, T).transpose(0, 1)

    def _forward_feedback(self, obs: dict[str, th.Tensor]) -> th.Tensor:
        """The prototype: after the cue, the extractor matches the cells against an embedding
        recalled from the core's previous output (a linear map of it) instead of the hidden target."""
        policy, extractor, core = self.policy, self.policy.pi_features_extractor, self.policy.lstm_actor
        T, B = obs["image"].shape[:2]
        pre = preprocess_obs({k: v.flatten(0, 1) for k, v in obs.items()}, policy.observation_space)
        pre = {k: v.view(T, B, *v.shape[1:]) for k, v in pre.items()}
        n_types = int(policy.observation_space["target"].nvec[0])
        h = c = th.zeros(core.num_layers, B, core.hidden_size)
        cue = extractor.target_embedding(pre["target"][0]).detach()
        outs, errors, norms = [], [], []
        for t in range(T):
            step = {k: v[t] for k, v in pre.items()}
            hidden = step["target"][:, n_types - 1 : n_types]  # 1 where the target is hidden
            recall = self.recall(h[-1])
            if t > 0:
                errors.append(((recall - cue) ** 2).sum(dim=-1).mean())
                norms.append((cue**2).sum(dim=-1).mean())
            recalled = cue if self.oracle else extractor.target_embedding(step["target"]) + hidden * recall
            x = extractor(step, target_embedding=recalled)
            out, (h, c) = core(x[None], (h, c))
            outs.append(th.cat([out[0], x], dim=-1) if self.skip else out[0])
        self.aux_loss = th.stack(errors).mean() if self.recall_loss else None
        self.recall_error = None if self.oracle else float(th.stack(errors).detach().mean() / th.stack(norms).mean())
        return self.head(th.stack(outs)).squeeze(-1)


def balanced_accuracy(logits: th.Tensor, labels: th.Tensor) -> float:
    """Mean of the accuracies on the labelled steps of each class (1 and 0)."""
    predicted = logits > 0
    per_class = [(predicted[labels == c] == bool(c)).float().mean() for c in (0, 1)]
    return float(sum(per_class) / 2)


def _tensors(episodes: Episodes, index: np.ndarray | slice) -> tuple[dict[str, th.Tensor], th.Tensor]:
    obs = {k: th.as_tensor(v[:, index]) for k, v in episodes.obs.items()}
    return obs, th.as_tensor(episodes.labels[:, index])


def train(
    core: str,
    seed: int,
    pool: Episodes,
    held_out: Episodes,
    updates: int,
    batch: int = 16,
    lr: float = 5e-4,
    report_at: tuple[int, ...] = (),
    shown: bool = False,
    overrides: tuple[str, ...] = (),
) -> tuple[dict[int, float], dict[int, float]]:
    """Train one core's network: the held-out balanced accuracy at 0, each of ``report_at`` and the
    end, and (the feedback prototypes only) the held-out recall error relative to the cue's squared
    norm at the same points."""
    model = MatchModel(core, seed, shown, overrides)
    optimizer = th.optim.Adam(model.parameters(), lr=lr)
    rng = np.random.default_rng(seed)
    test_obs, test_labels = _tensors(held_out, slice(None))
    scores: dict[int, float] = {}
    recall: dict[int, float] = {}

    def score(step: int) -> None:
        with th.no_grad():
            scores[step] = balanced_accuracy(model(test_obs), test_labels)
        if model.recall_error is not None:
            recall[step] = model.recall_error

    score(0)
    n_episodes = pool.labels.shape[1]
    for step in range(1, updates + 1):
        obs, labels = _tensors(pool, rng.choice(n_episodes, size=batch, replace=False))
        logits = model(obs)
        scored = labels >= 0
        loss = F.binary_cross_entropy_with_logits(logits[scored], labels[scored].float())
        if model.aux_loss is not None:
            loss = loss + model.aux_loss
        optimizer.zero_grad()
        loss.backward()
        th.nn.utils.clip_grad_norm_(model.parameters(), 0.5)  # the recipe's max_grad_norm
        optimizer.step()
        if step in report_at or step == updates:
            score(step)
    return scores, recall


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cores", default="none,lstm,rims")
    parser.add_argument("--seeds", default="100,103")
    parser.add_argument("--updates", type=int, default=600)
    parser.add_argument("--episodes", type=int, default=640, help="training pool (a multiple of 8)")
    parser.add_argument("--held-out", type=int, default=128, help="held-out episodes (a multiple of 8)")
    parser.add_argument("--length", type=int, default=64, help="steps kept of each episode")
    parser.add_argument("--shown", action="store_true", help="show the target at every step (the control)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("overrides", nargs="*", help="config overrides of every model, e.g. policy.forget_bias=3.0")
    args = parser.parse_args()
    th.set_num_threads(args.threads)
    env_id, overrides = (SHOWN_ENV, SHOWN_OVERRIDES) if args.shown else (ENV, [])
    config = load_config(env=env_id, core="lstm", overrides=overrides)
    start = time.perf_counter()
    pool = collect(config, args.episodes // 8, seed=3_000_000, keep=args.length)
    held_out = collect(config, args.held_out // 8, seed=4_000_000, keep=args.length)
    labelled = held_out.labels >= 0
    print(
        f"{pool.labels.shape[1]} training and {held_out.labels.shape[1]} held-out episodes of "
        f"{pool.labels.shape[0]} steps collected in {time.perf_counter() - start:.0f} s; held out: "
        f"{int(labelled.sum())} labelled steps, "
        f"{float((held_out.labels[labelled] == 1).mean()):.2f} with the target in front"
    )
    report_at = tuple(sorted({args.updates // 6, args.updates // 3, args.updates // 2, args.updates}))
    shown = "shown at every step, room lit" if args.shown else "shown at the first step only"
    print(f"balanced accuracy of 'the object in front is the target' ({shown}) on held-out episodes (chance 0.5)")
    print("| core | seed | untrained | " + " | ".join(f"{s} updates" for s in report_at) + " | wall s |")
    print("|---|---|---|" + "---|" * len(report_at) + "---|", flush=True)
    for core in args.cores.split(","):
        for seed in (int(s) for s in args.seeds.split(",")):
            start = time.perf_counter()
            scores, recall = train(
                core,
                seed,
                pool,
                held_out,
                args.updates,
                report_at=report_at,
                shown=args.shown,
                overrides=tuple(args.overrides),
            )
            cells = " | ".join(
                f"{scores[s]:.3f}" + (f" (recall {recall[s]:.2f})" if s in recall else "") for s in report_at
            )
            print(f"| {core} | {seed} | {scores[0]:.3f} | {cells} | {time.perf_counter() - start:.0f} |", flush=True)


if __name__ == "__main__":
    main()
