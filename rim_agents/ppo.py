"""``RIMPPO``: sb3-contrib's ``RecurrentPPO`` with our policies and a padding-free sequence sampler.

sb3-contrib cuts each minibatch into sequences at every episode start and pads them to the longest
one, so the feature extractor (a CNN on Atari) also runs on the padding, and the core runs a
per-step loop. Our cores take episode starts *inside* a sequence (see
:func:`rim_agents.cores.unroll`), so ``RIMPPO`` samples fixed-length chunks instead:

- each env's rollout of ``n_steps`` is cut into chunks of ``seq_len`` steps;
- a minibatch is ``batch_size / seq_len`` chunks drawn in random order, each starting from the
  core state stored during the rollout, with episode starts passed to the core where they fall;
- no padding, so the CNN sees exactly ``batch_size`` observations and the loss mask is all ones;
- with a ``selection="sampled"`` RIM core, each step's drawn choice of RIMs is stored beside the
  action and handed back with its chunk (``lstm_states.selection``) for the policy to replay;
- with a policy's ``cue_recall``, each step's last shown ``target`` of its episode is stored (a
  latch per env, kept across rollouts; hidden until the episode shows one) and handed back as
  ``lstm_states.cue`` with where the recall is scored: the observed target hidden, the latched one
  not.

``seq_len=None`` keeps sb3-contrib's sampler.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Generator
from typing import Any, ClassVar

import numpy as np
import torch as th
from gymnasium import spaces
from sb3_contrib import RecurrentPPO
from sb3_contrib.common.recurrent.buffers import RecurrentDictRolloutBuffer, RecurrentRolloutBuffer
from sb3_contrib.common.recurrent.policies import RecurrentActorCriticPolicy
from sb3_contrib.common.recurrent.type_aliases import (
    RecurrentDictRolloutBufferSamples,
    RecurrentRolloutBufferSamples,
    RNNStates,
)
from stable_baselines3.common.policies import BasePolicy
from stable_baselines3.common.preprocessing import preprocess_obs
from stable_baselines3.common.save_util import load_from_zip_file

from rim_agents.envs.pickup import HIDDEN_TARGET, latch_shown_target, recall_scored
from rim_agents.normalization import ScaleReward
from rim_agents.policy import CnnRIMPolicy, MlpRIMPolicy, MultiInputRIMPolicy, RIMPolicy

AUTO_MIN_SEQ_LEN = 8
_STATE_ARRAYS = ("hidden_states_pi", "cell_states_pi", "hidden_states_vf", "cell_states_vf")
_FLAT_ARRAYS = ("actions", "values", "log_probs", "advantages", "returns", "episode_starts", *_STATE_ARRAYS)


class SelectionStates(RNNStates):
    """``RNNStates`` carrying what the chunk sampler stored beside the states, sequence-major (see
    ``RIMPolicy.evaluate_actions``): the choices of RIMs ``selection`` ``(n_seq * T, K)``, and
    ``cue``, the last shown target one-hot ``(n_seq * T, sum(nvec))`` with where it is scored
    ``(n_seq * T,)``."""

    selection: th.Tensor | None = None
    cue: tuple[th.Tensor, th.Tensor] | None = None


class _ChunkSampler:
    """Mixin for sb3-contrib's recurrent rollout buffers: fixed-length chunks, no padding.

    With ``selection_source`` (a sampled RIM core's ``RIMPolicy.pop_selection``), every ``add``
    also stores the choice of RIMs the policy just drew, ``selection_width`` (K) entries. With
    ``cue_space`` (the observation's ``target`` space), every ``add`` also stores the target last
    shown in each env's episode (see the module docstring).
    """

    buffer_size: int
    n_envs: int
    pos: int
    generator_ready: bool
    full: bool
    observations: Any
    selections: np.ndarray | None = None
    cues: np.ndarray | None = None

    def __init__(
        self,
        *args: Any,
        seq_len: int,
        selection_source: Callable[[], np.ndarray] | None = None,
        selection_width: int = 0,
        cue_space: spaces.MultiDiscrete | None = None,
        **kwargs: Any,
    ) -> None:
        self.seq_len = seq_len
        self.selection_source, self.selection_width = selection_source, selection_width
        self.cue_space = cue_space
        super().__init__(*args, **kwargs)  # the buffer's own; it calls reset()
        if cue_space is not None:  # the latch outlives rollouts: an episode can span two
            self._latch = np.tile(np.array(HIDDEN_TARGET, dtype=np.int64), (self.n_envs, 1))

    def reset(self) -> None:
        super().reset()  # type: ignore[misc]
        if self.selection_source is not None:
            self.selections = np.full((self.buffer_size, self.n_envs, self.selection_width), -1, dtype=np.int64)
        if self.cue_space is not None:
            self.cues = np.zeros((self.buffer_size, self.n_envs, len(HIDDEN_TARGET)), dtype=np.int64)

    def add(self, *args: Any, **kwargs: Any) -> None:
        if self.selection_source is not None:
            assert self.selections is not None
            self.selections[self.pos] = self.selection_source()
        if self.cue_space is not None:
            assert self.cues is not None
            obs, episode_start = args[0], np.asarray(args[3], dtype=bool)
            target = np.asarray(obs["target"]).reshape(self.n_envs, -1)
            latch_shown_target(self._latch, target, episode_start)
            self.cues[self.pos] = self._latch
        super().add(*args, **kwargs)  # type: ignore[misc]

    @property
    def cue_scored(self) -> np.ndarray:
        """Where the stored cues are scored, shaped like them without the last axis: the observed
        target hidden and the latched one not (the episode showed one)."""
        assert self.cues is not None
        return recall_scored(self.observations["target"], self.cues)

    def _prepare(self) -> None:
        # (n_steps, n_layers, n_envs, dim) -> (n_steps, n_envs, n_layers, dim), then every array
        # (n_steps, n_envs, ...) -> (n_envs * n_steps, ...), env-major so that a chunk is contiguous.
        for name in _STATE_ARRAYS:
            self.__dict__[name] = self.__dict__[name].swapaxes(1, 2)
        for name in _FLAT_ARRAYS:
            self.__dict__[name] = self.swap_and_flatten(self.__dict__[name])  # type: ignore[attr-defined]
        if self.selections is not None:
            self.selections = self.swap_and_flatten(self.selections)  # type: ignore[attr-defined]
        if self.cues is not None:
            self.cues = self.swap_and_flatten(self.cues)  # type: ignore[attr-defined]
        if isinstance(self.observations, dict):
            for key, obs in self.observations.items():
                self.observations[key] = self.swap_and_flatten(obs)  # type: ignore[attr-defined]
        else:
            self.observations = self.swap_and_flatten(self.observations)  # type: ignore[attr-defined]
        self.generator_ready = True

    def get(self, batch_size: int | None = None) -> Generator[Any, None, None]:
        assert self.full, "Rollout buffer must be full before sampling from it"
        if not self.generator_ready:
            self._prepare()
        total = self.buffer_size * self.n_envs
        batch_size = total if batch_size is None else batch_size
        chunks_per_batch = batch_size // self.seq_len
        # Chunk starts, env-major: env e's chunk j starts at e * n_steps + j * seq_len.
        starts = np.arange(0, total, self.seq_len)
        order = np.random.permutation(len(starts))
        for i in range(0, len(order), chunks_per_batch):
            yield self._chunk_samples(starts[order[i : i + chunks_per_batch]])

    def _chunk_samples(self, chunk_starts: np.ndarray) -> Any:
        inds = (chunk_starts[:, None] + np.arange(self.seq_len)[None, :]).ravel()
        to_torch = self.to_torch  # type: ignore[attr-defined]

        def states(h: str, c: str) -> tuple[th.Tensor, th.Tensor]:
            # (n_seq, n_layers, dim) -> (n_layers, n_seq, dim)
            h_t, c_t = (to_torch(self.__dict__[n][chunk_starts].swapaxes(0, 1)).contiguous() for n in (h, c))
            return h_t, c_t

        if isinstance(self.observations, dict):
            observations: Any = {key: to_torch(obs[inds]) for key, obs in self.observations.items()}
            sample_cls: Any = RecurrentDictRolloutBufferSamples
        else:
            observations = to_torch(self.observations[inds])
            sample_cls = RecurrentRolloutBufferSamples
        returns = self.returns[inds].flatten()  # type: ignore[attr-defined]
        lstm_states = SelectionStates(
            states("hidden_states_pi", "cell_states_pi"), states("hidden_states_vf", "cell_states_vf")
        )
        if self.selections is not None:
            lstm_states.selection = to_torch(self.selections[inds])
        if self.cue_space is not None and self.cues is not None:
            one_hot = preprocess_obs(to_torch(self.cues[inds]), self.cue_space)
            assert isinstance(one_hot, th.Tensor)
            lstm_states.cue = (one_hot, to_torch(self.cue_scored[inds].ravel()))
        return sample_cls(
            observations=observations,
            actions=to_torch(self.actions[inds]),  # type: ignore[attr-defined]
            old_values=to_torch(self.values[inds].flatten()),  # type: ignore[attr-defined]
            old_log_prob=to_torch(self.log_probs[inds].flatten()),  # type: ignore[attr-defined]
            advantages=to_torch(self.advantages[inds].flatten()),  # type: ignore[attr-defined]
            returns=to_torch(returns),
            lstm_states=lstm_states,
            episode_starts=to_torch(self.episode_starts[inds].flatten()),  # type: ignore[attr-defined]
            mask=to_torch(np.ones_like(returns)),
        )


class ChunkedRecurrentRolloutBuffer(_ChunkSampler, RecurrentRolloutBuffer):
    """``RecurrentRolloutBuffer`` sampling fixed-length chunks (see the module docstring)."""


class ChunkedRecurrentDictRolloutBuffer(_ChunkSampler, RecurrentDictRolloutBuffer):
    """``RecurrentDictRolloutBuffer`` sampling fixed-length chunks (see the module docstring)."""


class RIMPPO(RecurrentPPO):
    """``RecurrentPPO`` with the RIM policies' aliases and the chunked sampler.

    :param policy: a policy class or alias (``"MlpRIMPolicy"``, ``"CnnRIMPolicy"``,
        ``"MultiInputRIMPolicy"``, or sb3-contrib's LSTM aliases).
    :param env: the environment.
    :param seq_len: training sequence length; must divide ``n_steps`` and ``batch_size``.
        ``"auto"``: the largest length up to 32 that divides both (an error if that is below 8).
        ``None`` keeps sb3-contrib's
        padded sampler.
    :param normalize_reward: train on rewards divided by the running standard deviation of the
        discounted return (:class:`rim_agents.normalization.ScaleReward`, wrapped around the
        training env when learning starts; its moments are saved with the model).
    :param kwargs: ``RecurrentPPO``'s arguments.
    """

    policy_aliases: ClassVar[dict[str, type[BasePolicy]]] = {
        **RecurrentPPO.policy_aliases,
        "MlpRIMPolicy": MlpRIMPolicy,
        "CnnRIMPolicy": CnnRIMPolicy,
        "MultiInputRIMPolicy": MultiInputRIMPolicy,
    }

    def __init__(
        self,
        policy: str | type[RecurrentActorCriticPolicy],
        env: Any,
        seq_len: int | str | None = "auto",
        normalize_reward: bool = False,
        _init_setup_model: bool = True,
        **kwargs: Any,
    ) -> None:
        super().__init__(policy, env, _init_setup_model=False, **kwargs)
        self.normalize_reward = normalize_reward
        #: The reward scaler's moments as plain numbers, saved in the checkpoint's JSON data.
        self.return_moments: dict[str, float] | None = None
        if seq_len == "auto":
            seq_len = math.gcd(self.n_steps, self.batch_size or self.n_steps, 32)
            if seq_len < AUTO_MIN_SEQ_LEN:
                raise ValueError(
                    f"seq_len='auto' resolves to {seq_len} (the largest length up to 32 dividing n_steps="
                    f"{self.n_steps} and batch_size={self.batch_size}), too short for a recurrent core to "
                    f"learn from: choose n_steps and batch_size with a common divisor >= {AUTO_MIN_SEQ_LEN}, "
                    "or pass seq_len explicitly"
                )
        if not (seq_len is None or isinstance(seq_len, int)):
            raise ValueError(f"seq_len={seq_len!r} must be an integer, 'auto' or None")
        self.seq_len = seq_len
        if seq_len is not None:
            n_steps, batch_size = self.n_steps, self.batch_size
            if seq_len < 1 or n_steps % seq_len != 0:
                raise ValueError(f"seq_len={seq_len} must be a positive divisor of n_steps={n_steps}")
            if batch_size is None or batch_size % seq_len != 0:
                raise ValueError(f"batch_size={batch_size} must be a multiple of seq_len={seq_len}")
        if _init_setup_model:
            self._setup_model()

    @classmethod
    def load(  # type: ignore[override]
        cls,
        path: Any,
        env: Any = None,
        device: th.device | str = "auto",
        custom_objects: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> RIMPPO:
        """``RecurrentPPO.load``; a RIM policy saved before ``input_query_bias`` existed is rebuilt
        without the query bias, as it was trained."""
        custom_objects = dict(custom_objects or {})
        if "policy_kwargs" not in custom_objects:
            data, _, _ = load_from_zip_file(path, custom_objects=custom_objects, device="cpu")
            data = data or {}
            policy_class = data.get("policy_class")
            policy_kwargs = dict(data.get("policy_kwargs") or {})
            core_kwargs = dict(policy_kwargs.get("core_kwargs") or {})
            is_rims = isinstance(policy_class, type) and issubclass(policy_class, RIMPolicy)
            if is_rims and policy_kwargs.get("core", "rims") == "rims" and "input_query_bias" not in core_kwargs:
                core_kwargs["input_query_bias"] = False
                custom_objects["policy_kwargs"] = {**policy_kwargs, "core_kwargs": core_kwargs}
        return super().load(path, env=env, device=device, custom_objects=custom_objects, **kwargs)

    def _setup_learn(self, total_timesteps: int, *args: Any, **kwargs: Any) -> Any:
        if self.normalize_reward and self.env is not None and not isinstance(self.env, ScaleReward):
            self.env = ScaleReward(self.env, self.gamma)
            if self.return_moments is not None:  # resumed: the scale goes on where it was
                self.env.load_state(self.return_moments)
        return super()._setup_learn(total_timesteps, *args, **kwargs)

    def save(self, *args: Any, **kwargs: Any) -> None:
        if isinstance(self.env, ScaleReward):
            self.return_moments = self.env.state()
        super().save(*args, **kwargs)

    _grad_norms: list[th.Tensor]  # per minibatch of the update, before clipping (train/grad_norm)
    last_grad_norms: list[float]  # the same, of the last update that stepped, as numbers
    _param_grad_norms: list[th.Tensor]  # per parameter, of the backward pass in progress

    def train(self) -> None:
        self._steps, self._nonfinite_steps = 0, 0
        self._grad_norms, self._param_grad_norms = [], []
        super().train()
        # Always logged, so a run's curves show that none were skipped (see _skip_nonfinite_step).
        self.logger.record("train/nonfinite_steps", self._nonfinite_steps)
        if self._grad_norms:
            # The global gradient norm of each minibatch before max_grad_norm clips it: a spike shows
            # how far clipping shrank every parameter's step (one read-back per update).
            norms = th.stack(self._grad_norms)
            self.last_grad_norms = norms.tolist()
            self.logger.record("train/grad_norm", norms.median().item())
            self.logger.record("train/grad_norm_max", max(self.last_grad_norms))
        if self._steps and self._nonfinite_steps == self._steps:
            raise ValueError(
                f"every gradient step of the update at step {self.num_timesteps} had NaN or inf gradients "
                f"({self._steps} of {self._steps}); nothing was applied"
            )
        if isinstance(self.policy, RIMPolicy) and self.policy.normalize_observations:
            # After the update: collecting and training this rollout used the same moments.
            observations: Any = self.rollout_buffer.observations
            self.policy.update_observation_moments(observations)
        if isinstance(self.env, ScaleReward):
            self.logger.record("train/reward_scale", self.env.scale)
        if isinstance(self.policy, RIMPolicy):
            losses = [loss for core in self.policy.rim_cores() for loss in core.balance_losses]
            for core in self.policy.rim_cores():
                core.balance_losses.clear()
                # The update's unrolls are back-propagated, or dropped by the target_kl stop.
                core.release_graphs()
            if losses:
                self.logger.record("rims/balance_loss", th.stack(losses).mean().item())
            if self.policy.recall_errors:
                self.logger.record("train/cue_recall_error", th.stack(self.policy.recall_errors).mean().item())
                self.policy.recall_errors.clear()

    def _skip_nonfinite_step(self, optimizer: th.optim.Optimizer, args: Any, kwargs: Any) -> None:
        """Before each optimizer step: a step whose gradients hold a NaN or inf is skipped whole (every
        gradient dropped, so Adam moves nothing and its moments stay as they were), as mixed-precision
        training skips an overflowed step; applied, gradient clipping would turn it into NaN
        parameters. Counted per update (``train/nonfinite_steps``); an update with no finite step
        at all is an error (see :meth:`train`)."""
        self._steps += 1
        if self._param_grad_norms:
            # The backward pass's norms, before clipping: clipping keeps a finite gradient finite and
            # makes a non-finite one NaN, so the total decides for the clipped gradients too.
            total = th.linalg.vector_norm(th.stack(self._param_grad_norms))
            self._grad_norms.append(total)
            self._param_grad_norms = []
            finite = bool(th.isfinite(total))
        else:  # gradients set without a backward pass
            grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
            finite = not grads or bool(th.isfinite(th.stack([th.linalg.vector_norm(g) for g in grads])).all())
        if finite:
            return
        self._nonfinite_steps += 1
        for group in optimizer.param_groups:
            for p in group["params"]:
                p.grad = None

    def _record_grad_norm(self, param: th.Tensor) -> None:
        assert param.grad is not None
        self._param_grad_norms.append(th.linalg.vector_norm(param.grad))

    def _setup_model(self) -> None:
        super()._setup_model()
        self._steps, self._nonfinite_steps = 0, 0
        self._grad_norms = []
        self._param_grad_norms = []
        self.last_grad_norms = []
        self.policy.optimizer.register_step_pre_hook(self._skip_nonfinite_step)
        for group in self.policy.optimizer.param_groups:
            for param in group["params"]:
                # After the backward pass accumulated it, before PPO clips it.
                param.register_post_accumulate_grad_hook(self._record_grad_norm)
        if isinstance(self.policy, RIMPolicy):
            # Save the resolved core settings (defaults included), not only what was passed.
            self.policy_kwargs = {
                **self.policy_kwargs,
                "core": self.policy.core_name,
                "core_kwargs": dict(self.policy.core_kwargs),
            }
        # A sampled choice of RIMs is stored beside each action (see _ChunkSampler).
        source, width = None, 0
        if isinstance(self.policy, RIMPolicy) and (sampled := self.policy.sampled_core()) is not None:
            source, width = self.policy.pop_selection, sampled.cell.num_units
        cue_space: spaces.MultiDiscrete | None = None
        if isinstance(self.policy, RIMPolicy) and self.policy.cue_recall > 0:
            assert isinstance(self.observation_space, spaces.Dict)
            target = self.observation_space["target"]
            assert isinstance(target, spaces.MultiDiscrete)  # RIMPolicy checked it
            cue_space = target
        if self.seq_len is None:
            if source is not None or cue_space is not None:
                what = "selection='sampled'" if source is not None else "cue_recall"
                raise ValueError(
                    f"{what} needs RIMPPO's chunk sampler to store what it replays: set an integer seq_len (or 'auto')"
                )
            return
        lstm: Any = self.policy.lstm_actor
        hidden_state_buffer_shape = (self.n_steps, lstm.num_layers, self.n_envs, lstm.hidden_size)
        buffer_cls = (
            ChunkedRecurrentDictRolloutBuffer
            if isinstance(self.observation_space, spaces.Dict)
            else ChunkedRecurrentRolloutBuffer
        )
        self.rollout_buffer = buffer_cls(
            self.n_steps,
            self.observation_space,
            self.action_space,
            hidden_state_buffer_shape,
            self.device,
            gamma=self.gamma,
            gae_lambda=self.gae_lambda,
            n_envs=self.n_envs,
            seq_len=self.seq_len,
            selection_source=source,
            selection_width=width,
            cue_space=cue_space,
        )
