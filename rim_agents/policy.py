"""A recurrent actor-critic policy for sb3-contrib's ``RecurrentPPO`` with a core chosen by name.

``RIMPolicy(core="rims" | "lstm" | "gru" | "none", core_kwargs=...)`` is a
``RecurrentActorCriticPolicy`` whose ``lstm_actor`` (and ``lstm_critic`` with ``enable_critic_lstm``)
is that core. ``none`` is the feed-forward control: extractor and heads as for the other cores, no
memory, and the critic reads the features as SB3's feed-forward ``PPO`` does (with gradient, no
extra ``Linear``), whatever ``shared_lstm`` / ``enable_critic_lstm`` say. Everything
else (feature extractor, MLP heads, shared / critic-core options, ``predict`` with state) is
sb3-contrib's. Differences:

- the optimizer is rebuilt after the swap, so the new core is trained;
- the sequence is unrolled by :func:`rim_agents.cores.unroll`: one loop over time inside the
  RIM core with episode starts handled there, one fused call per reset-free stretch for
  ``nn.LSTM`` / ``nn.GRU``, instead of sb3-contrib's per-step loop whenever a minibatch holds an
  episode start;
- a token extractor (``NatureCNNTokens``) feeds the RIM core a set of tokens per step;
- ``token_readout``: the heads also read one score per token of the extractor (MiniGrid: per
  cell), the token's match with a query computed from the core's output, so a target the core
  remembers can be matched against what is seen by a dot product instead of by the heads' MLP;
- ``cue_recall``: with ``token_readout`` on an env whose ``target`` can be hidden (the memory
  variant), an auxiliary loss teaches each read-out's query the embedding of the target last shown
  in the episode while it is hidden, so the core learns to keep the cue under a dense signal and
  the read-out's scores carry the match the decision needs (``RIMPPO`` stores the cue per step);
- the constructor parameters include the core's, so ``policy.save`` / ``load`` round-trips;
- with ``selection="sampled"`` RIMs, the actor's choice of active RIMs is part of the action:
  :meth:`forward` (collecting) draws it, adds its log-probability to the action's and keeps it
  for the rollout buffer (:meth:`pop_selection`); :meth:`evaluate_actions` replays the stored
  draw (``lstm_states.selection``, from ``RIMPPO``'s sampler) and adds its log-probability under
  the current parameters, so PPO's ratio and clipping cover the choice. Elsewhere (evaluation,
  ``predict``) the actor takes the top-k, and the critic's core always does.
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import math
from collections.abc import Iterator
from typing import Any

import gymnasium as gym
import numpy as np
import torch as th
import torch.nn.functional as F
from sb3_contrib.common.recurrent.policies import RecurrentActorCriticPolicy
from sb3_contrib.common.recurrent.type_aliases import RNNStates
from stable_baselines3.common.torch_layers import BaseFeaturesExtractor, CombinedExtractor, FlattenExtractor
from stable_baselines3.common.torch_layers import NatureCNN as SB3NatureCNN
from stable_baselines3.common.type_aliases import Schedule
from torch import nn

from rim_agents.config import RIMConfig
from rim_agents.cores import CORES, FeedForwardCore, add_forget_bias, build_core, core_hidden_size, unroll
from rim_agents.extractors import NatureCNN
from rim_agents.normalization import NormalizedObservations
from rim_agents.rim import AddAuxiliaryLoss, RIMCore, SelectionRequest


class RIMPolicy(RecurrentActorCriticPolicy):
    """Recurrent actor-critic policy with a RIM, LSTM or GRU core.

    :param observation_space: observation space.
    :param action_space: action space.
    :param lr_schedule: learning-rate schedule.
    :param core: ``"rims"`` (:class:`rim_agents.RIMCore`), ``"lstm"`` (``nn.LSTM``, as in
        sb3-contrib), ``"gru"`` or ``"none"`` (feed-forward control).
    :param core_kwargs: keyword arguments of the core's constructor (``RIMCore``'s for ``rims``;
        for ``lstm`` and ``gru`` they join ``lstm_kwargs``).
    :param lstm_hidden_size: hidden width of ``lstm`` and ``gru``; ignored by ``rims``, whose width
        is ``num_units * unit_size``.
    :param n_lstm_layers: layers of ``lstm`` and ``gru``.
    :param shared_lstm: the critic reuses the actor's core output (without gradient).
    :param enable_critic_lstm: the critic has its own core.
    :param lstm_kwargs: extra keyword arguments of ``nn.LSTM`` / ``nn.GRU``.
    :param normalize_observations: standardise (flat ``Box``) observations with running moments
        before the features extractor (:mod:`rim_agents.normalization`); the moments are buffers of
        this policy, updated by :meth:`update_observation_moments`.
    :param forget_bias: added at initialisation to the bias of each core's keep gate (LSTM forget
        gate, GRU update gate, in the actor's and the critic's core, RIM cells included;
        :func:`rim_agents.cores.add_forget_bias`); 0 keeps PyTorch's initialisation.
    :param token_readout: the extractor appends read-out tokens ``(N, E)`` to its features (it must
        offer them: ``minigrid``); each core's output ``o`` gives a query ``q = W o`` (one linear
        map for the actor, one for the critic core) and the heads read ``[o, tokens . q / sqrt(E)]``:
        ``N`` scores more. The core reads the features without the tokens. Needs a critic core
        (``enable_critic_lstm``) or ``shared_lstm``.
    :param critic_shares_core: the critic reads the actor's core (and read-out) *with* gradient,
        so the value loss trains them too (A3C's and IMPALA's shared torso; sb3-contrib's
        ``shared_lstm`` reads it without gradient). Implemented as ``enable_critic_lstm`` with
        ``lstm_critic`` the actor's own module: the critic's state runs alongside, always equal to
        the actor's. Refused with ``shared_lstm``.
    :param cue_recall: weight of the cue-recall loss (0: none): at every step where the
        observation's ``target`` is hidden and the episode showed one before, the squared distance
        between each read-out's query and the shown target's embedding (the extractor's
        ``target_embedding``, without gradient), averaged over those steps and added to PPO's loss.
        Needs ``token_readout``, an extractor with ``target_embedding`` (``minigrid`` with
        ``target_match``) and a pickup env's ``MultiDiscrete`` ``target`` (hidden as
        :data:`rim_agents.envs.pickup.HIDDEN_TARGET` with ``cue_steps``; where it is never hidden
        nothing is scored); trained by ``RIMPPO`` with an integer ``seq_len``.
    :param kwargs: ``RecurrentActorCriticPolicy``'s other arguments (``net_arch``,
        ``features_extractor_class``, ...).
    """

    def __init__(
        self,
        observation_space: gym.spaces.Space,
        action_space: gym.spaces.Space,
        lr_schedule: Schedule,
        core: str = "rims",
        core_kwargs: dict[str, Any] | None = None,
        lstm_hidden_size: int = 256,
        n_lstm_layers: int = 1,
        shared_lstm: bool = False,
        enable_critic_lstm: bool = True,
        lstm_kwargs: dict[str, Any] | None = None,
        normalize_observations: bool = False,
        forget_bias: float = 0.0,
        token_readout: bool = False,
        critic_shares_core: bool = False,
        cue_recall: float = 0.0,
        **kwargs: Any,
    ) -> None:
        if core not in CORES:
            raise ValueError(f"unknown core {core!r}: choose one of {', '.join(CORES)}")
        self.core_name = core
        self.core_kwargs = dict(core_kwargs or {})
        if core == "rims":
            # Every setting resolved and saved, input_query_bias included (RIMPPO.load tells
            # checkpoints from before that option by its absence). RIMConfig's dropout default is
            # 0: PPO's ratio compares the network that collected (eval mode) with the one that
            # trains (train mode), so nothing random may differ between the two.
            self.core_kwargs = dataclasses.asdict(RIMConfig(**self.core_kwargs))
            if self.core_kwargs["selection_noise"] > 0:
                raise ValueError(
                    "selection_noise > 0 cannot train a PPO policy: the RIMs chosen while collecting and "
                    "while training would differ; use selection=straight_through or balance_coef instead"
                )
        self._lstm_hidden_size = lstm_hidden_size
        lstm_kwargs = dict(lstm_kwargs or {})
        if core == "lstm":
            lstm_kwargs.update(self.core_kwargs)
        if core == "rims" and self.core_kwargs["selection"] == "sampled" and critic_shares_core:
            raise ValueError(
                "selection='sampled' cannot go with critic_shares_core: the critic would unroll the shared core "
                "with another choice of RIMs than the actor's; give the critic its own core"
            )
        if core == "none":
            # The critic gets its own (identity) core: it reads the features with gradient.
            shared_lstm, enable_critic_lstm = False, True
        self.critic_shares_core = critic_shares_core
        if critic_shares_core:
            if shared_lstm:
                raise ValueError(
                    "critic_shares_core and shared_lstm are alternatives (with and without the value loss's "
                    "gradient): set one"
                )
            enable_critic_lstm = True
        self.cue_recall = float(cue_recall)
        if self.cue_recall < 0:
            raise ValueError(f"cue_recall={cue_recall} must be >= 0 (the weight of the cue-recall loss)")
        if self.cue_recall > 0:
            _check_cue_recall(observation_space, token_readout)
        #: Set by :meth:`recalling` for :meth:`_process_sequence`.
        self._cue: tuple[th.Tensor, th.Tensor] | None = None
        #: The last training pass's recall errors relative to the cue's squared norm, per core.
        self.recall_errors: list[th.Tensor] = []
        self.token_readout = token_readout
        self.readout_shape: tuple[int, int] | None = None  # set with the heads, from the extractor
        if token_readout:
            if not (enable_critic_lstm or shared_lstm):
                raise ValueError(
                    "token_readout needs a critic that reads a core: set enable_critic_lstm=true (or shared_lstm=true)"
                )
            extractor = kwargs.get("features_extractor_class", FlattenExtractor)
            if "readout_tokens" not in inspect.signature(extractor).parameters:
                raise _no_readout_tokens(extractor.__name__)
            kwargs["features_extractor_kwargs"] = {
                **(kwargs.get("features_extractor_kwargs") or {}),
                "readout_tokens": True,
            }
        kwargs["optimizer_kwargs"] = _optimizer_kwargs(
            kwargs.get("optimizer_class", th.optim.Adam), kwargs.get("optimizer_kwargs")
        )
        if kwargs.get("net_arch") is None and issubclass(
            kwargs.get("features_extractor_class", FlattenExtractor), SB3NatureCNN
        ):
            # SB3's default heads for its NatureCNN (none), which it recognises by identity only:
            # the channels-last subclass would get its MLP default otherwise.
            kwargs["net_arch"] = []
        self.normalize_observations = normalize_observations
        if normalize_observations:  # the wrapper refuses spaces it cannot standardise
            kwargs["features_extractor_kwargs"] = {
                "extractor_class": kwargs.get("features_extractor_class", FlattenExtractor),
                "extractor_kwargs": dict(kwargs.get("features_extractor_kwargs") or {}),
            }
            kwargs["features_extractor_class"] = NormalizedObservations
        super().__init__(
            observation_space,
            action_space,
            lr_schedule,
            lstm_hidden_size=core_hidden_size(core, lstm_hidden_size, self.core_kwargs),
            n_lstm_layers=n_lstm_layers,
            shared_lstm=shared_lstm,
            enable_critic_lstm=enable_critic_lstm,
            lstm_kwargs=lstm_kwargs,
            **kwargs,
        )
        token_shape = getattr(self.pi_features_extractor, "token_shape", None)
        # The RIM core reads tokens; nn.LSTM / nn.GRU read their flattening.
        self.core_input_shape: tuple[int, ...] = (
            tuple(token_shape)
            if core == "rims" and token_shape is not None
            else (self.features_dim - self.readout_width,)
        )
        self.readout_actor: nn.Linear | None = None
        self.readout_critic: nn.Linear | None = None
        new_cores = core != "lstm" or self.readout_shape is not None  # sb3-contrib's nn.LSTM does not fit
        if new_cores:
            build = {**lstm_kwargs, **self.core_kwargs} if core in ("gru", "lstm") else self.core_kwargs
            input_size = self.core_input_shape[-1]
            # sb3-contrib types these as nn.LSTM; every core follows its calling convention.
            self.lstm_actor = build_core(core, input_size, lstm_hidden_size, n_lstm_layers, build)  # type: ignore[assignment]
            if self.lstm_critic is not None:
                self.lstm_critic = build_core(core, input_size, lstm_hidden_size, n_lstm_layers, build)  # type: ignore[assignment]
            if self.readout_shape is not None:
                core_width = self.lstm_output_dim - self.readout_shape[0]
                self.readout_actor = nn.Linear(core_width, self.readout_shape[1])
                if self.lstm_critic is not None:
                    self.readout_critic = nn.Linear(core_width, self.readout_shape[1])
        if critic_shares_core:  # one module under two names: parameters() lists it once
            self.lstm_critic = self.lstm_actor
            self.readout_critic = self.readout_actor
        if new_cores or critic_shares_core:
            self.to(self.device)
            # The base class built its optimizer over the nn.LSTM we just replaced.
            self.optimizer = self.optimizer_class(  # type: ignore[call-arg]
                self.parameters(), lr=lr_schedule(1), **self.optimizer_kwargs
            )
        if self.cue_recall > 0 and not getattr(self.pi_features_extractor, "target_match", False):
            raise ValueError(
                "cue_recall needs an extractor that embeds the target like the cells: use features_extractor "
                "minigrid with features_extractor_kwargs.target_match=true"
            )
        self.forget_bias = forget_bias
        self._last_selection: th.Tensor | None = None  # a sampled core's last draw (see pop_selection)
        for module in self.cores():
            add_forget_bias(module, forget_bias)
        self._fold_critic()

    def _fold_critic(self) -> None:
        """Without a critic core, sb3-contrib maps the features by ``critic``, a ``Linear(features,
        core width)``, before the value head; where no value layers (``net_arch``) lie between
        them, the two maps run as one (:class:`FoldedCritic`, :class:`FoldedValueHead`): the same
        parameters, function and gradients, to float rounding."""
        if type(self.critic) is not nn.Linear or type(self.value_net) is not nn.Linear:
            return
        if len(self.mlp_extractor.value_net) > 0:  # value layers between the two maps
            return
        if self.critic.bias is None or self.value_net.bias is None:
            return
        self.critic = FoldedCritic(self.critic)
        self.value_net = FoldedValueHead(self.value_net, self.critic)

    @property
    def readout_width(self) -> int:
        """How many of the extractor's outputs are read-out tokens (0 without ``token_readout``)."""
        return 0 if self.readout_shape is None else self.readout_shape[0] * self.readout_shape[1]

    def _build_mlp_extractor(self) -> None:
        if self.token_readout:
            self.readout_shape = getattr(self.pi_features_extractor, "readout_shape", None)
            if self.readout_shape is None:  # e.g. the tokens' extractor inside a normalising wrapper
                raise _no_readout_tokens(type(self.pi_features_extractor).__name__)
        if self.core_name == "none":
            # The heads read the features themselves; the state stays one unit wide.
            self.lstm_output_dim = self.features_dim - self.readout_width
        if self.readout_shape is not None:
            self.lstm_output_dim += self.readout_shape[0]  # one score per token
        super()._build_mlp_extractor()

    def _get_constructor_parameters(self) -> dict[str, Any]:
        data = super()._get_constructor_parameters()
        data.update(
            core=self.core_name,
            core_kwargs=self.core_kwargs,
            lstm_hidden_size=self._lstm_hidden_size,
            n_lstm_layers=self.lstm_actor.num_layers,
            shared_lstm=self.shared_lstm,
            enable_critic_lstm=self.enable_critic_lstm,
            lstm_kwargs={k: v for k, v in self.lstm_kwargs.items() if k not in self.core_kwargs},
            normalize_observations=self.normalize_observations,
            forget_bias=self.forget_bias,
            token_readout=self.token_readout,
            critic_shares_core=self.critic_shares_core,
            cue_recall=self.cue_recall,
        )
        if self.token_readout:  # the policy asks its extractor for the tokens itself
            data["features_extractor_kwargs"] = {
                k: v for k, v in data["features_extractor_kwargs"].items() if k != "readout_tokens"
            }
        if self.normalize_observations:  # the extractor as configured, not its wrapper
            wrapped = data["features_extractor_kwargs"]
            data.update(
                features_extractor_class=wrapped["extractor_class"],
                features_extractor_kwargs=wrapped["extractor_kwargs"],
            )
        return data

    @th.no_grad()
    def update_observation_moments(self, observations: th.Tensor | np.ndarray) -> None:
        """Fold a batch of raw observations into the moments of every normalising extractor
        (one when the extractor is shared, the actor's and the critic's otherwise)."""
        for module in self.modules():
            if isinstance(module, NormalizedObservations):
                module.moments.update(observations)

    def cores(self) -> list[nn.Module]:
        """The actor's core and the critic's, if it has one; once when the critic shares it."""
        cores = {id(m): m for m in (self.lstm_actor, self.lstm_critic) if m is not None}
        return list(cores.values())

    def rim_cores(self) -> list[RIMCore]:
        """The RIM cores of this policy (actor first), empty for other cores."""
        return [m for m in self.cores() if isinstance(m, RIMCore)]

    def sampled_core(self) -> RIMCore | None:
        """The actor's core if its choice of RIMs is sampled (``selection="sampled"``), else None."""
        core = self.lstm_actor
        return core if isinstance(core, RIMCore) and core.cell.selection == "sampled" else None

    def forward(  # type: ignore[override]
        self, obs: th.Tensor, lstm_states: RNNStates, episode_starts: th.Tensor, deterministic: bool = False
    ) -> tuple[th.Tensor, th.Tensor, th.Tensor, RNNStates]:
        """sb3-contrib's ``forward``; a sampled core's choice is drawn (or the top-k with
        ``deterministic``), its log-probability added to the action's and the draw kept for
        :meth:`pop_selection`."""
        core = self.sampled_core()
        if core is None:
            return super().forward(obs, lstm_states, episode_starts, deterministic)
        core.selection_request = SelectionRequest(sample=not deterministic)
        actions, values, log_prob, states = super().forward(obs, lstm_states, episode_starts, deterministic)
        selection = core.last_selection
        assert selection is not None
        self._last_selection = selection.order[0]  # (n_envs, K): one step
        return actions, values, log_prob + selection.log_prob[0], states

    def pop_selection(self) -> np.ndarray:
        """The sampled core's choice at the last :meth:`forward` ``(n_envs, K)``, the active RIMs
        in draw order padded with -1, for the rollout buffer; cleared once read."""
        selection = self._last_selection
        if selection is None:
            raise RuntimeError("no sampled selection to store: call forward() before adding to the rollout buffer")
        self._last_selection = None
        return selection.cpu().numpy()

    def evaluate_actions(  # type: ignore[override]
        self, obs: th.Tensor, actions: th.Tensor, lstm_states: RNNStates, episode_starts: th.Tensor
    ) -> tuple[th.Tensor, th.Tensor, th.Tensor]:
        """sb3-contrib's ``evaluate_actions``; a sampled core replays the stored choices
        (``lstm_states.selection``, ``(n_seq * T, K)`` sequence-major) and their log-probability
        joins the action's; with ``cue_recall`` the stored shown targets (``lstm_states.cue``) give
        each read-out its recall loss, joined to the latent by :class:`AddAuxiliaryLoss` so that
        PPO's backward pass trains it."""
        cue = getattr(lstm_states, "cue", None)
        if self.cue_recall > 0 and cue is None:
            raise ValueError(
                "cue_recall needs the shown target of every step: train with RIMPPO and an integer seq_len "
                "(its chunk sampler stores them)"
            )
        with self.recalling(cue if self.cue_recall > 0 else None):
            return self._evaluate_actions(obs, actions, lstm_states, episode_starts)

    @contextlib.contextmanager
    def recalling(self, cue: tuple[th.Tensor, th.Tensor] | None) -> Iterator[None]:
        """Within the block, every read-out of :meth:`_process_sequence` adds its recall loss for
        ``cue``: the shown target of each step, one-hot ``(M, n_types + n_colours)``
        sequence-major, and where it is scored ``(M,)`` (None: no loss)."""
        self._cue = cue
        try:
            yield
        finally:
            self._cue = None

    def _evaluate_actions(
        self, obs: th.Tensor, actions: th.Tensor, lstm_states: RNNStates, episode_starts: th.Tensor
    ) -> tuple[th.Tensor, th.Tensor, th.Tensor]:
        core = self.sampled_core()
        if core is None:
            return super().evaluate_actions(obs, actions, lstm_states, episode_starts)
        given = getattr(lstm_states, "selection", None)
        if given is None:
            raise ValueError(
                "selection='sampled' needs the rollout's stored choices of RIMs: train with RIMPPO and an "
                "integer seq_len (its chunk sampler stores them)"
            )
        n_seq = lstm_states.pi[0].shape[1]
        core.selection_request = SelectionRequest(given=given.reshape(n_seq, -1, given.shape[-1]).transpose(0, 1))
        values, log_prob, entropy = super().evaluate_actions(obs, actions, lstm_states, episode_starts)
        selection = core.last_selection
        assert selection is not None
        return values, log_prob + selection.log_prob.transpose(0, 1).reshape(-1), entropy

    def _process_sequence(  # type: ignore[override]
        self,
        features: th.Tensor,
        lstm_states: tuple[th.Tensor, th.Tensor],
        episode_starts: th.Tensor,
        lstm: nn.Module,
    ) -> tuple[th.Tensor, tuple[th.Tensor, th.Tensor]]:
        """Unroll the core over a batch of sequences.

        :param features: ``(n_seq * T, features_dim)``, sequence-major.
        :param lstm_states: ``(h, c)``, each ``(n_layers, n_seq, hidden)``.
        :param episode_starts: ``(n_seq * T,)``.
        :return: core output ``(n_seq * T, hidden)`` and the final states.
        """
        tokens = None
        if self.readout_shape is not None:
            features, tokens = features.split([features.shape[-1] - self.readout_width, self.readout_width], dim=-1)
        if isinstance(lstm, FeedForwardCore):
            out, states = features, lstm_states
        else:
            n_seq = lstm_states[0].shape[1]
            x = features.reshape(n_seq, -1, *self.core_input_shape).transpose(0, 1)
            starts = episode_starts.reshape(n_seq, -1).transpose(0, 1)
            out, states = unroll(lstm, x, lstm_states, starts)
            out = out.transpose(0, 1).flatten(0, 1)
        if tokens is None:
            return out, states
        readout = self.readout_critic if lstm is self.lstm_critic else self.readout_actor
        assert readout is not None and self.readout_shape is not None
        n_tokens, width = self.readout_shape
        query = readout(out)  # (M, E)
        scores = th.einsum("mne,me->mn", tokens.reshape(-1, n_tokens, width), query) / math.sqrt(width)
        latent = th.cat([out, scores], dim=-1)
        if self._cue is not None:
            loss = self._recall_loss(query, lstm)
            if loss.requires_grad:
                latent = AddAuxiliaryLoss.apply(latent, loss)
        return latent, states

    def _recall_loss(self, query: th.Tensor, core: nn.Module) -> th.Tensor:
        """``cue_recall`` times the mean squared distance between the query and the shown target's
        embedding over the steps where it is scored; its error relative to the target's squared norm
        joins :attr:`recall_errors`."""
        assert self._cue is not None
        one_hot, scored = self._cue
        critic = core is self.lstm_critic and core is not self.lstm_actor
        extractor = (
            self.vf_features_extractor if critic and not self.share_features_extractor else self.pi_features_extractor
        )
        with th.no_grad():
            cue = extractor.target_embedding(one_hot)  # type: ignore[operator]  # MiniGridExtractor's, (M, E)
        weight = scored.to(query.dtype)
        n = weight.sum().clamp(min=1.0)
        error = ((query - cue) ** 2).sum(dim=-1)
        self.recall_errors.append(
            (error.detach() * weight).sum() / ((cue**2).sum(dim=-1) * weight).sum().clamp(min=1e-8)
        )
        return self.cue_recall * (error * weight).sum() / n


class FoldedCritic(nn.Linear):
    """sb3-contrib's critic map ``Linear(features, core width)`` when only the value head follows
    it: it hands the features on unchanged, and :class:`FoldedValueHead` applies both maps.

    It takes over the given layer's parameters (the same tensors, so names, initialisation, an
    optimizer built over them and saved state dicts all stay valid).
    """

    def __init__(self, layer: nn.Linear) -> None:
        super().__init__(layer.in_features, layer.out_features, device="meta")
        self.weight, self.bias = layer.weight, layer.bias

    def forward(self, features: th.Tensor) -> th.Tensor:
        return features


class FoldedValueHead(nn.Linear):
    """The value head ``Linear(core width, 1)`` after a :class:`FoldedCritic`: ``value_net(critic(x))``
    computed as the one product ``x (w_v W_c)^T + (w_v b_c + b_v)``, the two maps folded per call
    instead of every sample mapped to the core's width. Forward and backward, that replaces a
    ``(N, 512) x (512, 510)`` product by a ``(N, 512) x (512, 1)`` one for the Atari RIM policy
    (6.8 GFLOP of an update's 260.8; ``benchmarks/ppo_flops.py``). The fold is not cached: fused
    optimizers change parameters without bumping their version counters.

    :param layer: the value head, whose parameters it takes over (as :class:`FoldedCritic`).
    :param critic: the critic map before it (not registered here: its parameters stay ``critic.*``).
    """

    def __init__(self, layer: nn.Linear, critic: FoldedCritic) -> None:
        super().__init__(layer.in_features, layer.out_features, device="meta")
        self.weight, self.bias = layer.weight, layer.bias
        self._critic = (critic,)  # a tuple: not a submodule

    def forward(self, features: th.Tensor) -> th.Tensor:
        critic = self._critic[0]
        weight = self.weight @ critic.weight  # (1, features)
        bias = F.linear(critic.bias, self.weight, self.bias)  # (1,)
        return F.linear(features, weight, bias)

    def extra_repr(self) -> str:
        critic = self._critic[0]
        return f"folded: {critic.in_features} -> {critic.out_features} (critic) -> {self.out_features}"


def _optimizer_kwargs(optimizer_class: type[th.optim.Optimizer], given: dict[str, Any] | None) -> dict[str, Any]:
    """The optimizer's keywords: ``given``, with Adam's ``eps`` 1e-5 unless given (SB3 sets it only
    when no keywords are given at all) and, for Adam and AdamW, the fused kernel unless ``fused`` or
    ``foreach`` is given. One fused step over the Atari RIM policy's 3.15M parameters took 7.7 ms
    against 28.2 ms for the per-tensor default (one thread, this project's CPU,
    ``benchmarks/optimizer_step.py``); after 20 steps the parameters agree with the default's to
    1.5e-8 (the same arithmetic in another order)."""
    kwargs = dict(given or {})
    if optimizer_class is th.optim.Adam:
        kwargs.setdefault("eps", 1e-5)
    if optimizer_class in (th.optim.Adam, th.optim.AdamW) and "foreach" not in kwargs:
        kwargs.setdefault("fused", True)
    return kwargs


def _check_cue_recall(observation_space: gym.spaces.Space, token_readout: bool) -> None:
    """Refuse ``cue_recall`` where it has nothing to recall or no query to teach."""
    if not token_readout:
        raise ValueError("cue_recall teaches the read-out's query: set policy.token_readout=true")
    target = observation_space.spaces.get("target") if isinstance(observation_space, gym.spaces.Dict) else None
    if not isinstance(target, gym.spaces.MultiDiscrete):
        raise ValueError(
            "cue_recall needs a 'target' (MultiDiscrete) in the observation that can be hidden: use a "
            "RIMAgents/PickupCue env or a pickup env with cue_steps"
        )


def _no_readout_tokens(extractor: str) -> ValueError:
    return ValueError(
        f"token_readout needs an extractor that gives read-out tokens, not {extractor}: use features_extractor minigrid"
    )


class CnnRIMPolicy(RIMPolicy):
    """:class:`RIMPolicy` with ``NatureCNN`` (SB3's, channels-last) as the default feature extractor."""

    def __init__(self, *args: Any, features_extractor_class: type[BaseFeaturesExtractor] = NatureCNN, **kwargs: Any):
        super().__init__(*args, features_extractor_class=features_extractor_class, **kwargs)


class MultiInputRIMPolicy(RIMPolicy):
    """:class:`RIMPolicy` with SB3's ``CombinedExtractor`` as the default feature extractor."""

    def __init__(
        self, *args: Any, features_extractor_class: type[BaseFeaturesExtractor] = CombinedExtractor, **kwargs: Any
    ):
        super().__init__(*args, features_extractor_class=features_extractor_class, **kwargs)


MlpRIMPolicy = RIMPolicy
