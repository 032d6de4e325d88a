"""Training callbacks: periodic atomic checkpoints and TensorBoard views of what the RIMs do."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch as th
from stable_baselines3.common.callbacks import BaseCallback
from stable_baselines3.common.logger import Image

from rim_agents.config import TrainConfig
from rim_agents.models import make_env
from rim_agents.policy import RIMPolicy
from rim_agents.rim import RIMCore
from rim_agents.rollout import run_episodes
from rim_agents.runs import TB_DIR, checkpoint_path, save_model
from rim_agents.shifts import shift_spec
from rim_agents.visualize import action_names, gif_bytes, record_episode, write_tensorboard_gif

_NOT_TEXT = ("stdout", "log", "json", "csv")


class CheckpointCallback(BaseCallback):
    """Save ``run_dir/checkpoints/step_<n>.zip`` atomically every ``save_freq`` env steps.

    :param run_dir: the run directory.
    :param save_freq: env steps between checkpoints (counted over all envs).
    """

    def __init__(self, run_dir: Path, save_freq: int) -> None:
        super().__init__()
        self.run_dir = run_dir
        self.save_freq = save_freq
        self.next_save = 0

    def _on_training_start(self) -> None:
        self.next_save = (self.num_timesteps // self.save_freq + 1) * self.save_freq

    def _on_step(self) -> bool:
        if self.num_timesteps >= self.next_save:
            save_model(self.model, checkpoint_path(self.run_dir, self.num_timesteps))
            self.next_save = (self.num_timesteps // self.save_freq + 1) * self.save_freq
        return True


class ShiftEvalCallback(BaseCallback):
    """Every ``eval_freq`` env steps, evaluate the current model under each shift and log
    ``eval/<shift>/mean_return`` (and ``success_rate``, ``mean_length``) to TensorBoard.

    :param config: the run's config (env and env options).
    :param shifts: shift names (see :mod:`rim_agents.shifts`).
    :param eval_freq: env steps between evaluations.
    :param n_episodes: episodes per shift.
    :param n_envs: parallel eval envs.
    """

    def __init__(self, config: TrainConfig, shifts: list[str], eval_freq: int, n_episodes: int, n_envs: int = 4):
        super().__init__()
        self.config, self.shifts = config, shifts
        self.eval_freq, self.n_episodes, self.n_envs = eval_freq, n_episodes, n_envs
        self.next_eval = 0
        self.evaluations = 0

    def _on_training_start(self) -> None:
        self.next_eval = (self.num_timesteps // self.eval_freq + 1) * self.eval_freq

    def _on_step(self) -> bool:
        if self.num_timesteps < self.next_eval:
            return True

        self.next_eval = (self.num_timesteps // self.eval_freq + 1) * self.eval_freq
        self.evaluations += 1
        for shift in self.shifts:
            seed = self.config.seed + 1000 * self.evaluations
            env = make_env(self.config, min(self.n_envs, self.n_episodes), seed, shift_spec(self.config, shift))
            try:
                eps = run_episodes(self.model, env, self.n_episodes, deterministic=False)
            finally:
                env.close()
            self.logger.record(f"eval/{shift}/mean_return", float(np.mean(eps.returns)))
            self.logger.record(f"eval/{shift}/mean_length", float(np.mean(eps.lengths)))
            if eps.successes:
                self.logger.record(f"eval/{shift}/success_rate", float(np.mean(eps.successes)))
        return True


class VideoCallback(BaseCallback):
    """Every ``video_freq`` env steps, one episode of the current model (in distribution) as an
    animated image in TensorBoard (``video/episode``), with the RIM strip for a RIM core."""

    def __init__(self, config: TrainConfig, video_freq: int, run_dir: Path, max_steps: int = 1000) -> None:
        super().__init__()
        self.config, self.video_freq, self.run_dir, self.max_steps = config, video_freq, run_dir, max_steps
        self.next = video_freq

    def _on_training_start(self) -> None:
        self.next = (self.num_timesteps // self.video_freq + 1) * self.video_freq

    def _on_step(self) -> bool:
        if self.num_timesteps < self.next:
            return True

        self.next = (self.num_timesteps // self.video_freq + 1) * self.video_freq
        env = make_env(self.config, 1, self.config.seed + 10_000, shift_spec(self.config, "none"))
        training = self.model.policy.training
        try:
            episode = record_episode(self.model, self.config, env, seed=self.num_timesteps, max_steps=self.max_steps)
        finally:
            env.close()
            self.model.policy.set_training_mode(training)
        frame = episode.frames[0]
        gif = gif_bytes(episode, action_names(self.config))
        write_tensorboard_gif(
            self.run_dir / TB_DIR, "video/episode", gif, frame.shape[0], frame.shape[1], self.num_timesteps
        )
        return True


class AnnealK(BaseCallback):
    """Annealed k (``rims.k_anneal``): at every rollout start, set the RIM cores' number of active
    RIMs from the training progress, logged as ``rims/k``. Collecting and the update that follows
    use the same k, so PPO's ratio compares the same network twice."""

    def __init__(self, total_timesteps: int) -> None:
        super().__init__()
        self.total_timesteps = total_timesteps

    def _on_rollout_start(self) -> None:
        policy = self.model.policy
        cores = policy.rim_cores() if isinstance(policy, RIMPolicy) else []
        for core in cores:
            core.cell.set_progress(self.num_timesteps / self.total_timesteps)
        if cores:
            self.logger.record("rims/k", cores[0].cell.k_now)
            if cores[0].cell.anneal == "leak":
                self.logger.record("rims/leak", cores[0].cell.leak_now)

    def _on_step(self) -> bool:
        return True


class RIMActivityCallback(BaseCallback):
    """Log what the actor's RIM core does during rollouts.

    Scalars every ``log_freq`` rollouts:

    - ``rims/active_frac/rim_<i>``: fraction of steps in which RIM ``i`` was active;
    - ``rims/switch_rate``: fraction of steps (within an episode) whose active set differs from
      the previous step's;
    - ``rims/input_attention_entropy``: mean entropy (nats) of each RIM's input attention over
      ``[null, tokens...]``;
    - ``rims/null_attention``: mean attention on the null token;
    - ``rims/selection_margin``: mean gap in null attention between the (k+1)-th and the k-th
      least attentive RIM (how close the top-k came to choosing otherwise; absent when k = K);
    - ``rims/query_grad_norm/rim_<i>``: mean gradient norm reaching RIM ``i``'s input query
      (weights and bias) per minibatch of the training phase before the rollout (a hard top-k
      sends none to a RIM dormant for a whole minibatch).

    Every ``image_freq`` rollouts, ``rims/activation_pattern``: the active mask of env 0 over its
    last complete episode (RIMs by time; white is active), at most ``max_image_steps`` steps.

    Tracking is switched on only during rollouts, so training minibatches pay nothing for it.
    """

    def __init__(self, log_freq: int = 1, image_freq: int = 20, max_image_steps: int = 1000) -> None:
        super().__init__()
        self.log_freq, self.image_freq, self.max_image_steps = log_freq, image_freq, max_image_steps
        self.rollouts = 0
        self.episode: list[np.ndarray] = []
        self.last_episode: np.ndarray | None = None
        self._reset_stats()

    def _reset_stats(self) -> None:
        self.active_sum: np.ndarray | None = None
        self.steps = 0
        self.switches = 0
        self.switch_steps = 0
        self.entropy_sum = 0.0
        self.null_sum = 0.0
        self.attention_steps = 0
        self.margin_sum = 0.0
        self.prev_mask: np.ndarray | None = None

    def _core(self) -> RIMCore | None:
        policy = self.model.policy
        cores: list[RIMCore] = policy.rim_cores() if isinstance(policy, RIMPolicy) else []
        return cores[0] if cores else None

    def _on_training_start(self) -> None:
        self.query_grads: list[th.Tensor] = []  # (K,) norms, one per backward pass
        core = self._core()
        if core is None or not core.cell.input_attention:
            return

        def record(name: str) -> Callable[[th.Tensor], None]:
            def hook(grad: th.Tensor) -> None:
                norms = grad.detach().flatten(1).square().sum(1)  # (K,)
                if name == "input_query":
                    self.query_grads.append(norms)
                elif self.query_grads:  # the bias's hook runs in the same backward pass
                    self.query_grads[-1] = self.query_grads[-1] + norms

            return hook

        cell = core.cell
        self.hooks = [cell.input_query.register_hook(record("input_query"))]
        if cell.input_query_bias:
            self.hooks.append(cell.input_query_b.register_hook(record("input_query_b")))

    def _on_training_end(self) -> None:
        for hook in getattr(self, "hooks", []):
            hook.remove()

    def _on_rollout_start(self) -> None:
        core = self._core()
        if core is not None:
            core.track_activity = True

    def _on_step(self) -> bool:
        core = self._core()
        if core is None or core.last_activity is None:
            return True
        mask = core.last_activity.mask[-1].cpu().numpy()  # (n_envs, K)
        starts = np.asarray(self.model._last_episode_starts, dtype=bool)  # the step just taken
        if self.active_sum is None:
            self.active_sum = np.zeros(mask.shape[1])
        self.active_sum += mask.sum(0)
        self.steps += mask.shape[0]
        if self.prev_mask is not None:
            within = ~starts
            changed = (mask != self.prev_mask).any(axis=1)
            self.switches += int((changed & within).sum())
            self.switch_steps += int(within.sum())
        self.prev_mask = mask
        attention = core.last_activity.input_attention
        if attention is not None:
            p = attention[-1].clamp_min(1e-12)  # (n_envs, K, N + 1)
            self.entropy_sum += float(-(p * p.log()).sum(-1).mean()) * mask.shape[0]
            self.null_sum += float(p[..., 0].mean()) * mask.shape[0]
            self.attention_steps += mask.shape[0]
            k, K = core.cell.k_now, core.cell.num_units
            if k < K:
                least = th.topk(p[..., 0], k + 1, dim=-1, largest=False).values  # (n_envs, k + 1)
                self.margin_sum += float((least[:, k] - least[:, k - 1]).sum())
        # Env 0's episode, for the image.
        if starts[0] and self.episode:
            self.last_episode = np.stack(self.episode[: self.max_image_steps], axis=1)
            self.episode = []
        self.episode.append(mask[0])
        return True

    def _on_rollout_end(self) -> None:
        core = self._core()
        if core is None:
            return
        core.track_activity = False
        core.last_activity = None
        self.rollouts += 1
        if self.steps and self.active_sum is not None and self.rollouts % self.log_freq == 0:
            for i, frac in enumerate(self.active_sum / self.steps):
                self.logger.record(f"rims/active_frac/rim_{i}", float(frac))
            if self.switch_steps:
                self.logger.record("rims/switch_rate", self.switches / self.switch_steps)
            if self.attention_steps:
                self.logger.record("rims/input_attention_entropy", self.entropy_sum / self.attention_steps)
                self.logger.record("rims/null_attention", self.null_sum / self.attention_steps)
                if core.cell.k_now < core.cell.num_units:
                    self.logger.record("rims/selection_margin", self.margin_sum / self.attention_steps)
            if self.query_grads:
                norms = th.stack(self.query_grads).sqrt().mean(0)
                for i, norm in enumerate(norms.tolist()):
                    self.logger.record(f"rims/query_grad_norm/rim_{i}", norm)
                self.query_grads = []
            self._reset_stats()
        if self.last_episode is not None and self.rollouts % self.image_freq == 0:
            self.logger.record("rims/activation_pattern", Image(activity_image(self.last_episode), "HWC"), _NOT_TEXT)


def activity_image(mask: np.ndarray, row_height: int = 8) -> np.ndarray:
    """``(K, T)`` bool mask -> ``(K * row_height, T, 3)`` uint8 image, active white, rows separated."""
    rows = np.repeat(mask.astype(np.uint8) * 255, row_height, axis=0)
    rows[row_height - 1 :: row_height] = 64  # a grey line under each RIM
    return np.repeat(rows[:, :, None], 3, axis=2)
