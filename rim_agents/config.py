"""Typed training configuration: dataclass defaults < ``configs/<family>.yaml`` < ``--config FILE`` < CLI.

Every YAML key maps one to one onto a field below. Unknown keys and values of the wrong type are
errors (:class:`ConfigError`), never silently ignored. A family file may hold a ``cores:`` section
whose entry for the chosen core is applied after the shared settings, so that all cores of a family
share every PPO setting and differ only in their own.

Schedules follow rl-baselines3-zoo: ``learning_rate: lin_2.5e-4`` decays linearly to zero over
training; a plain number is constant. YAML reads ``3e-4`` as a string; numeric strings are accepted
for float fields.
"""

from __future__ import annotations

import dataclasses
import importlib
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union

import yaml

from rim_agents.errors import UsageError

#: The family configs, shipped inside the package (the top-level ``configs/`` links here).
CONFIG_DIR = Path(__file__).resolve().parent / "configs"
#: Recurrent cores by name; ``none`` is the feed-forward control (see :mod:`rim_agents.cores`).
CORES = ("rims", "lstm", "gru", "none")
#: ``allocator`` settings (:mod:`rim_agents.host`): ``retain`` keeps the memory a process frees
#: for its reuse (glibc), ``system`` leaves the C library's defaults.
ALLOCATORS = ("retain", "system")


class ConfigError(UsageError):
    """A configuration value or file is wrong."""


@dataclass
class PPOConfig:
    """Arguments of :class:`rim_agents.RIMPPO` (sb3-contrib's ``RecurrentPPO``)."""

    n_steps: int = 128  # steps per env per rollout
    batch_size: int = 256  # transitions per minibatch
    n_epochs: int = 4  # passes over each rollout
    seq_len: int | None = 32  # training sequence length (None: sb3-contrib's padded sampler)
    learning_rate: float | str = "lin_2.5e-4"  # number, or "lin_<start>" for a linear decay to 0
    clip_range: float | str = "lin_0.1"  # same syntax as learning_rate
    ent_coef: float = 0.01
    vf_coef: float = 0.5
    gamma: float = 0.99
    gae_lambda: float = 0.95
    max_grad_norm: float = 0.5
    normalize_advantage: bool = True
    target_kl: float | None = None
    normalize_reward: bool = False  # divide rewards by the running std of the discounted return


@dataclass
class PolicyConfig:
    """Arguments of :class:`rim_agents.RIMPolicy` other than the core's own."""

    features_extractor: str = "nature_cnn"  # nature_cnn | nature_cnn_tokens | minigrid | flatten | combined | auto
    features_extractor_kwargs: dict[str, Any] = field(default_factory=dict)
    net_arch: list[int] = field(default_factory=list)  # MLP after the core, shared by actor and critic
    lstm_hidden_size: int = 128  # width of the lstm / gru cores
    n_lstm_layers: int = 1
    enable_critic_lstm: bool = False  # the critic gets its own core
    shared_lstm: bool = False  # the critic reads the actor's core output (no gradient)
    ortho_init: bool = True
    normalize_images: bool = True
    normalize_observations: bool = False  # standardise Box observations with running moments
    forget_bias: float = 0.0  # added at init to the cores' keep-gate bias (LSTM forget, GRU update gate)
    token_readout: bool = False  # heads also read each extractor token's match with a query from the core (minigrid)
    critic_shares_core: bool = False  # the critic reads the actor's core with gradient (the value loss trains it)
    cue_recall: float = 0.0  # weight of a loss teaching the read-out's query the hidden target (needs token_readout)
    optimizer_kwargs: dict[str, Any] = field(default_factory=dict)  # Adam's keywords; default eps 1e-5, fused


COMPILE_MODES = ("off", "default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
#: The RIM selection rules (``RIMConfig.selection``).
SELECTIONS = ("hard", "straight_through", "sampled")


@dataclass(frozen=True)
class RIMConfig:
    """The settings of a RIM core, one set of defaults for :class:`rim_agents.rim.RIMCell` /
    ``RIMCore``, the policy and the YAML configs; frozen, and checked when made (``ValueError``).

    :param num_units: number of RIMs ``K``.
    :param k_active: number of RIMs ``k`` updated per step, ``1 <= k <= K``. Ignored (all RIMs
        active) when ``input_attention=False``.
    :param unit_size: hidden width ``d_h`` of each RIM.
    :param cell: ``"lstm"`` or ``"gru"``.
    :param input_heads: heads of the input attention.
    :param input_key_size: key/query width ``d_k`` per input-attention head.
    :param input_value_size: total value width of the input attention (all heads); default
        ``4 * unit_size`` as in the paper. Must be divisible by ``input_heads``.
    :param input_query_bias: if True (default), each RIM's query is affine in its state,
        ``q_i = W_q,i h_i + b_q,i``. Without the bias a RIM whose state is zero (every RIM at an
        episode start, and a RIM dormant since then) scores exactly 0 on every input, so all such
        RIMs tie at attention 1/2 whatever the input, and the top-k falls back to ``topk``'s
        tie-break: at an episode start the same ``k`` RIMs win for every input, and a RIM still at
        zero can only be chosen when an active RIM turns away from the input. The null token's key
        is zero either way, so its score stays exactly 0: the bias does not tilt the choice towards
        or away from the null.
    :param comm_heads: heads of the communication attention.
    :param comm_key_size: key/query width per communication head.
    :param comm_value_size: value width per communication head; default ``comm_key_size``.
    :param input_attention: if False (ablation), every RIM reads the input directly (the mean of the
        tokens for token input) and every RIM is active.
    :param communication: if False (ablation), RIMs do not read from each other.
    :param comm_gate: if True, ``h^ = h~ + sigmoid(W_g out + b_g) * tanh(out)``; else a plain residual
        ``h^ = h~ + tanh(out)``.
    :param comm_zero_init: if True, the communication's output map (weight and bias) starts at
        zero, so that ``h^ = h~`` at initialisation: the residual branch starts closed and opens as
        it learns (as residual branches are zero-initialised in Fixup, Zhang et al. 2019, and
        ReZero, Bachlechner et al. 2020). Its weight still gets a gradient at once; the queries,
        keys and values get theirs as it moves. Off by default (PyTorch's initialisation, where each
        step adds to every active RIM's state an update of about half its norm, 0.78 of it at the first
        step: ``benchmarks/init_scales.py``).
    :param input_dropout: dropout on the input-attention probabilities.
    :param comm_dropout: dropout on the communication-attention probabilities.
    :param mask_output: if True, dormant RIMs are zeroed in the output (not in the state).
    :param selection: ``"hard"`` (the paper's top-k, no gradient through the choice) or
        ``"straight_through"``: the same forward pass bit for bit, while the backward pass treats
        the write as ``h_t = h_write + (s - sg(s)) * (h~ - h_{t-1})`` with the soft mask
        ``s_i = sigmoid((thr - null_i) / selection_temperature)``, ``thr`` half-way between the
        k-th and (k+1)-th least null attention: the choice gets a first-order gradient (would
        waking this RIM, or putting it to sleep, have lowered the loss?), a dormant RIM's query
        included, while its cell still gets none. ``"sampled"``: the choice is the agent's own
        stochastic decision. Where the policy samples its actions (collecting a rollout), the ``k``
        RIMs are drawn without replacement, each draw with probability
        ``softmax(-null / selection_temperature)`` over the RIMs not drawn yet (Plackett-Luce, by
        Gumbel top-k); the draw's log-probability joins the action's, and the rollout stores the
        draw so that PPO's update replays it and its ratio covers it: the choice is trained by the
        policy gradient, like an action (hard attention trained by REINFORCE, as in Mnih et al.
        2014). Where actions are deterministic (evaluation), the top-k: the paper's rule.
    :param selection_temperature: width of the straight-through soft mask, in null-attention units;
        with ``selection="sampled"``, the temperature of the draw's softmax.
    :param st_state_gradient: with ``selection="straight_through"``, let the surrogate's gradient
        reach the previous state through ``null_i`` as well as the queries and the input. Off by
        default: that path adds to the backward recurrence a term the forward pass never has
        (the soft mask is zero forward): continued from 12 trained checkpoints it took the largest
        pre-clip minibatch gradient norm to 241-2e18 on 5 of them, where the detached form stays
        at the hard rule's scale on 11 of 12 (``benchmarks/results/selection/st_gradient/``). On,
        it is the form the studies before that measurement trained with (their specs pin it).
    :param selection_noise: std of Gaussian noise added to the null attention before the top-k,
        in training mode only (noisy top-k gating, Shazeer et al. 2017); set it from outside to
        anneal it. Off (0) by default; the RL policy refuses it (PPO would compare a network that
        collected with one noise sample against one trained with another).
    :param k_anneal: the fraction of training over which the number of active RIMs falls linearly
        from ``K`` to ``k_active`` (annealed k): every RIM learns to read the input before the
        top-k starts to put some to sleep. The trainer reports progress with :meth:`set_progress`
        (PPO: at every rollout start, so that collecting and training use the same ``k``); 0, the
        default, and any use without progress reports, is the paper's fixed ``k_active``.
    :param anneal: what ``k_anneal`` anneals. ``"count"`` (default): the number of active RIMs, as
        above, one RIM at a time. ``"leak"``: ``k_active`` RIMs are chosen from the start, and a
        dormant RIM takes a fraction ``leak`` of its update (its state moves ``leak`` of the way
        to what its cell and the communication computed), ``leak`` falling linearly from 1 (every
        RIM updates) to 0 (the paper's rule: dormant states kept bit for bit) over ``k_anneal`` of
        training: dormancy sets in gradually instead of one RIM at a time.
    :param balance_coef: weight of the load-balancing loss ``(K / k) * sum_i f_i P_i`` over each
        unrolled sequence (Fedus et al. 2021): ``f_i`` the fraction of steps RIM ``i`` was active
        (no gradient), ``P_i`` its mean share ``a_i / sum_j a_j`` of the input attention
        ``a = 1 - null``. It is 1 when the load is even and is added to whatever loss is computed
        from the core's output (:class:`AddAuxiliaryLoss`); 0 (default) adds nothing.
    :param compile: ``"off"`` (default) or a ``torch.compile`` mode (``"default"``,
        ``"reduce-overhead"``: CUDA graphs on a GPU, ``"max-autotune-no-cudagraphs"``) for the
        per-step function of the time loop. The numbers are those of the eager step (to float
        rounding); the first calls of each shape pay the compile time (tens of seconds on a CPU).
    :param cuda_graphs: record the whole time loop of each input shape, forward and backward, as
        CUDA graphs and replay them (:mod:`rim_agents.cuda_graphs`): one launch per unroll instead
        of one per kernel, the same numbers. Applies where the core runs on a CUDA device (elsewhere
        the eager loop runs); off by default.
    """

    num_units: int = 6
    k_active: int = 4
    unit_size: int = 64
    cell: str = "lstm"  # lstm | gru
    input_heads: int = 1
    input_key_size: int = 64
    input_value_size: int | None = None  # default 4 * unit_size
    input_query_bias: bool = True
    comm_heads: int = 4
    comm_key_size: int = 32
    comm_value_size: int | None = None  # default comm_key_size
    input_attention: bool = True
    communication: bool = True
    comm_gate: bool = True
    comm_zero_init: bool = False  # the communication's output map starts at zero (h^ = h~ at init)
    input_dropout: float = 0.0  # the paper: 0.1 (supervised); 0 for PPO, whose ratio needs one network
    comm_dropout: float = 0.0
    mask_output: bool = False
    selection: str = "hard"  # hard (the paper's top-k) | straight_through | sampled (see above)
    selection_temperature: float = 0.05  # width of the straight-through soft mask
    st_state_gradient: bool = False  # the straight-through gradient also flows into the previous state (unstable)
    selection_noise: float = 0.0  # noisy top-k in training mode; refused by the RL policy
    balance_coef: float = 0.0  # weight of the load-balancing loss on the selection (rims/balance_loss)
    k_anneal: float = 0.0  # fraction of training over which the active count falls from num_units to k_active
    anneal: str = "count"  # count (k falls from K) | leak (dormant RIMs' share of their update falls from 1)
    compile: str = "off"  # off | a torch.compile mode for the per-step function (default, reduce-overhead, ...)
    cuda_graphs: bool = False  # replay the whole unroll as CUDA graphs on a GPU (rim_agents.cuda_graphs)

    def __post_init__(self) -> None:
        sizes = [
            "num_units", "unit_size", "input_heads", "input_key_size", "input_value_size", "comm_heads",
            "comm_key_size", "comm_value_size",
        ]  # fmt: skip
        for name in sizes:
            value = getattr(self, name)
            if value is None and name in ("input_value_size", "comm_value_size"):
                continue
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"RIM setting {name}={value!r} is invalid: it must be a positive integer")
        if not isinstance(self.k_active, int) or not 1 <= self.k_active <= self.num_units:
            raise ValueError(
                f"RIM setting k_active={self.k_active!r} is invalid: it must be an integer with "
                f"1 <= k_active <= num_units={self.num_units}"
            )
        if self.cell not in ("lstm", "gru"):
            raise ValueError(f"RIM setting cell={self.cell!r} is invalid: use 'lstm' or 'gru'")
        if self.values_per_head is None:
            raise ValueError(
                f"RIM setting input_value_size={self.value_width} is not divisible by "
                f"input_heads={self.input_heads}: choose a value width that is a multiple of the head count"
            )
        for name in ("input_dropout", "comm_dropout"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"RIM setting {name}={getattr(self, name)!r} is invalid: it must lie in [0, 1)")
        if self.selection not in SELECTIONS:
            raise ValueError(f"RIM setting selection={self.selection!r} is invalid: use one of {', '.join(SELECTIONS)}")
        if not self.selection_temperature > 0:
            raise ValueError(
                f"RIM setting selection_temperature={self.selection_temperature!r} is invalid: it must be > 0"
            )
        if not 0.0 <= self.k_anneal <= 1.0:
            raise ValueError(f"RIM setting k_anneal={self.k_anneal!r} is invalid: it must lie in [0, 1]")
        if self.anneal not in ("count", "leak"):
            raise ValueError(f"RIM setting anneal={self.anneal!r} is invalid: use count or leak")
        if self.anneal == "leak" and self.k_anneal > 0 and (self.compile != "off" or self.cuda_graphs):
            raise ValueError(
                "RIM setting anneal=leak changes the step at every rollout, which compiled steps and recorded "
                "CUDA graphs would not follow: set compile=off and cuda_graphs=false, or anneal=count"
            )
        if self.compile not in COMPILE_MODES:
            raise ValueError(f"RIM setting compile={self.compile!r} is invalid: use one of {', '.join(COMPILE_MODES)}")
        if not isinstance(self.cuda_graphs, bool):
            raise ValueError(f"RIM setting cuda_graphs={self.cuda_graphs!r} is invalid: use true or false")
        if self.cuda_graphs and self.compile != "off":
            raise ValueError(
                f"RIM settings cuda_graphs=true and compile={self.compile!r} are alternatives: set compile=off "
                "(cuda_graphs records the whole unroll) or cuda_graphs=false"
            )
        for name in ("selection_noise", "balance_coef"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"RIM setting {name}={getattr(self, name)!r} is invalid: it must be >= 0")

    @property
    def value_width(self) -> int:
        """The input attention's total value width (``input_value_size``, default ``4 * unit_size``)."""
        return self.input_value_size if self.input_value_size is not None else 4 * self.unit_size

    @property
    def values_per_head(self) -> int | None:
        """The value width per input head; None when the heads do not divide it."""
        return None if self.value_width % self.input_heads else self.value_width // self.input_heads


@dataclass
class EnvConfig:
    """Environment options passed to :func:`rim_agents.envs.make_vec_env`."""

    frame_stack: int = 4  # Atari
    terminal_on_life_loss: bool = True  # Atari: a lost life ends the training episode
    clip_reward: bool = True  # Atari: sign of the reward for training (returns logged unclipped)
    env_kwargs: dict[str, Any] = field(default_factory=dict)  # passed to gymnasium.make
    backend: str = "auto"  # Atari: auto | vector (ale-py C++ threads) | gym (gymnasium + AtariWrapper)


#: Field metadata of the settings that do not change what is trained (see TrainConfig.identity).
RUN_ONLY = {"run_only": True}


@dataclass
class TrainConfig:
    """Everything one training run needs."""

    env: str = ""
    env_packages: list[str] = field(default_factory=list)  # modules imported first: they register env ids
    core: str = "rims"  # rims | lstm | gru | none (feed-forward control)
    seed: int = field(default=0, metadata=RUN_ONLY)
    n_envs: int = 8
    total_timesteps: int = field(default=10_000_000, metadata=RUN_ONLY)
    device: str = field(default="auto", metadata=RUN_ONLY)  # auto | cpu | cuda
    checkpoint_freq: int = field(default=100_000, metadata=RUN_ONLY)  # env steps between checkpoints (0: final only)
    rim_log_freq: int = field(default=1, metadata=RUN_ONLY)  # rollouts between RIM activity scalars
    rim_image_freq: int = field(default=20, metadata=RUN_ONLY)  # rollouts between RIM activity images
    eval_shifts: list[str] = field(default_factory=list, metadata=RUN_ONLY)  # shifts evaluated during training
    eval_freq: int = field(default=0, metadata=RUN_ONLY)  # env steps between evaluations during training (0: none)
    eval_episodes: int = field(default=10, metadata=RUN_ONLY)  # episodes per shift and evaluation during training
    video_freq: int = field(default=0, metadata=RUN_ONLY)  # env steps between videos in TensorBoard (0: none)
    allocator: str = field(default="retain", metadata=RUN_ONLY)  # retain (freed memory kept for reuse) | system
    ppo: PPOConfig = field(default_factory=PPOConfig)
    policy: PolicyConfig = field(default_factory=PolicyConfig)
    rims: RIMConfig = field(default_factory=RIMConfig)
    env_options: EnvConfig = field(default_factory=EnvConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def identity(self) -> dict[str, Any]:
        """The settings that make the trained agent what it is: runs that differ only in the others
        (``RUN_ONLY`` fields: seed, budget, device, logging) are seeds of one configuration. The RIM
        settings belong to the RIM core alone: an LSTM, GRU or feed-forward agent is the same agent
        whatever they say, so a study may pin them for every variant of an env."""
        run_only = {f.name for f in dataclasses.fields(self) if f.metadata.get("run_only")}
        if self.core != "rims":
            run_only.add("rims")
        identity = {k: v for k, v in self.to_dict().items() if k not in run_only}
        if "rims" in identity and self.rims.selection != "straight_through":
            del identity["rims"]["st_state_gradient"]  # read by the straight-through choice alone
        return identity


# ------------------------------------------------------------------------------------ coercion
def _type_name(tp: Any) -> str:
    if isinstance(tp, type):
        return tp.__name__
    return str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check ``value`` against the annotation ``tp``; convert numeric strings for floats."""
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except ConfigError:
                continue
        raise ConfigError(f"config key {key}: {value!r} is not a valid {_type_name(tp)}")
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
    elif origin is list and isinstance(value, list):
        (item,) = typing.get_args(tp) or (Any,)
        return [v if item is Any else _coerce(v, item, f"{key}[{i}]") for i, v in enumerate(value)]
    elif (tp is str and isinstance(value, str)) or (
        (tp is list and isinstance(value, list)) or ((origin is dict or tp is dict) and isinstance(value, dict))
    ):
        return value
    raise ConfigError(f"config key {key}: {value!r} is not a valid {_type_name(tp)}")


_HINTS: dict[type, dict[str, Any]] = {}


def _type_hints(cls: type) -> dict[str, Any]:
    """A config class's field types (evaluated once per class: a study plans thousands of configs)."""
    hints = _HINTS.get(cls)
    if hints is None:
        hints = _HINTS[cls] = typing.get_type_hints(cls)
    return hints


def _merge(obj: Any, updates: dict[str, Any], prefix: str = "") -> None:
    """Apply a nested dict of updates to a dataclass instance, strictly (a frozen section, such as
    ``rims``, is replaced by a checked copy)."""
    if not isinstance(updates, dict):
        raise ConfigError(f"config section {prefix.rstrip('.') or '<top>'} must be a mapping, got {updates!r}")
    hints = _type_hints(type(obj))
    names = {f.name for f in dataclasses.fields(obj)}
    for key, value in updates.items():
        full = f"{prefix}{key}"
        if key not in names:
            close = [n for n in names if n.startswith(str(key)[:3])]
            hint = f" (did you mean {', '.join(sorted(close))}?)" if close else ""
            raise ConfigError(f"unknown config key {full!r}{hint}; valid keys here: {', '.join(sorted(names))}")
        current = getattr(obj, key)
        params = getattr(type(current), "__dataclass_params__", None)
        if params is not None and params.frozen:
            setattr(obj, key, _merged_copy(current, value, f"{full}."))
        elif dataclasses.is_dataclass(current):
            _merge(current, value, prefix=f"{full}.")
        elif isinstance(current, dict) and isinstance(value, dict):
            # A mapping (env_kwargs, features_extractor_kwargs, ...) is updated key by key, so that
            # env_options.env_kwargs.delay=8 and env_options.env_kwargs.length=24 both hold.
            setattr(obj, key, _coerce(_deep_update(current, value), hints[key], full))
        else:
            setattr(obj, key, _coerce(value, hints[key], full))


def _deep_update(base: dict[str, Any], updates: dict[str, Any]) -> dict[str, Any]:
    """``base`` with ``updates`` applied key by key (nested mappings likewise); neither is changed."""
    out = dict(base)
    for k, v in updates.items():
        out[k] = _deep_update(out[k], v) if isinstance(out.get(k), dict) and isinstance(v, dict) else v
    return out


def _merged_copy(obj: Any, updates: dict[str, Any], prefix: str) -> Any:
    """A frozen dataclass with ``updates`` applied, checked by its own ``__post_init__``."""
    if not isinstance(updates, dict):
        raise ConfigError(f"config section {prefix.rstrip('.')} must be a mapping, got {updates!r}")
    hints = _type_hints(type(obj))
    names = {f.name for f in dataclasses.fields(obj)}
    unknown = [k for k in updates if k not in names]
    if unknown:
        raise ConfigError(f"unknown config key '{prefix}{unknown[0]}'; valid keys here: {', '.join(sorted(names))}")
    coerced = {k: _coerce(v, hints[k], f"{prefix}{k}") for k, v in updates.items()}
    try:
        return dataclasses.replace(obj, **coerced)
    except ValueError as e:
        raise ConfigError(f"invalid rims settings: {e}") from None


def _validate_schedule(value: float | str, key: str) -> None:
    if isinstance(value, str) and not re.fullmatch(r"lin_[0-9.eE+-]+", value):
        raise ConfigError(f"config key {key}: {value!r} is not a number or 'lin_<number>'")
    if isinstance(value, str):
        try:
            float(value[4:])
        except ValueError:
            raise ConfigError(f"config key {key}: {value!r} is not a number or 'lin_<number>'") from None


# ------------------------------------------------------------------------------------ loading
def flat_keys(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"ppo": {"n_epochs": 4}}`` -> ``{"ppo.n_epochs": 4}`` (the dotted keys of overrides)."""
    out: dict[str, Any] = {}
    for k, v in data.items():
        if isinstance(v, dict) and v:
            out.update(flat_keys(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


#: libyaml's parser where PyYAML was built with it (the wheels are): the same documents, parsed
#: about ten times faster, which planning a study's thousands of run configs needs.
_YAML_LOADER: Any = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


def load_yaml(text: str) -> Any:
    """``yaml.safe_load`` with libyaml's parser when present."""
    return yaml.load(text, Loader=_YAML_LOADER)


def read_yaml(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist: give the path of a YAML file")
    try:
        data = load_yaml(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise ConfigError(f"config file {path} is not UTF-8 text: give a YAML file") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"config file {path} is not valid YAML: {yaml_error_text(e)}") from None
    except OSError as e:
        raise ConfigError(f"cannot read config file {path}: {e.strerror}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping of config keys, got {type(data).__name__}")
    return data


def yaml_error_text(error: yaml.YAMLError) -> str:
    """One line: what is wrong and where (line and column, 1-based)."""
    mark = getattr(error, "problem_mark", None)
    problem = getattr(error, "problem", None) or (str(error).splitlines() or ["parse error"])[0]
    return f"{problem} at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else problem


def apply_layer(config: TrainConfig, data: dict[str, Any], core: str | None = None) -> None:
    """Apply one YAML layer; its ``cores:`` entry for the chosen core is applied after the rest."""
    data = dict(data)
    cores = data.pop("cores", {}) or {}
    if not isinstance(cores, dict):
        raise ConfigError("config key cores must map core names to config sections")
    _merge(config, data)
    chosen = core or config.core
    if chosen in cores:
        _merge(config, cores[chosen] or {}, prefix=f"cores.{chosen}.")


def parse_override(text: str) -> dict[str, Any]:
    """``"ppo.learning_rate=1e-4"`` -> ``{"ppo": {"learning_rate": 1e-4}}`` (value read as YAML)."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} is not KEY=VALUE (e.g. ppo.n_epochs=4 or rims.k_active=5)")
    key, raw = text.split("=", 1)
    try:
        value = load_yaml(raw) if raw != "" else ""
    except yaml.YAMLError:
        value = raw
    nested: dict[str, Any] = {}
    cursor = nested
    parts = key.strip().split(".")
    for part in parts[:-1]:
        cursor = cursor.setdefault(part, {})
    cursor[parts[-1]] = value
    return nested


def env_family(env_id: str) -> str:
    """``atari``, ``minigrid`` or ``classic``, by the env id."""
    if env_id.startswith("ALE/") or "NoFrameskip" in env_id or "Deterministic-v" in env_id:
        return "atari"
    if env_id.startswith(("MiniGrid-", "BabyAI-", "RIMAgents/Pickup")):
        return "minigrid"
    return "classic"


def load_config(
    env: str | None = None,
    core: str | None = None,
    config_file: str | Path | None = None,
    overrides: list[str] | None = None,
    flags: dict[str, Any] | None = None,
) -> TrainConfig:
    """Resolve a config: defaults < family YAML (and its core section) < file < flags < overrides.

    :param env: env id (may also come from the file or the overrides).
    :param core: core name (likewise).
    :param config_file: a user YAML file, same schema as ``configs/*.yaml``.
    :param overrides: ``KEY=VALUE`` strings with dotted keys.
    :param flags: top-level keys set by dedicated command-line flags (``seed``, ``n_envs``, ...).
    """
    user = read_yaml(Path(config_file)) if config_file is not None else {}
    layers = [parse_override(o) for o in overrides or []]
    top: dict[str, Any] = {}
    for layer in [user, {"env": env, "core": core}, *layers]:
        top.update({k: v for k, v in layer.items() if k in ("env", "core") and v is not None})
    env_id = top.get("env")
    chosen_core = top.get("core", "rims")
    for key, value in (("env", env_id), ("core", chosen_core)):
        if value is not None and not isinstance(value, str):
            raise ConfigError(f"config key {key}: {value!r} is not a valid str (e.g. env=CartPole-v1, core=rims)")
    if not env_id:
        raise ConfigError("no environment given: pass --env ENV_ID (e.g. BreakoutNoFrameskip-v4)")
    packages: list[str] = []
    if ":" in env_id:  # gymnasium's "module:EnvId": the module registers the id when imported
        module, env_id = env_id.split(":", 1)
        packages.append(module)
    if chosen_core not in CORES:
        raise ConfigError(f"unknown core {chosen_core!r}: choose one of {', '.join(CORES)}")

    config = TrainConfig()
    family_file = CONFIG_DIR / f"{env_family(env_id)}.yaml"
    if not family_file.is_file():
        raise ConfigError(f"the {env_family(env_id)} family config {family_file} is missing: reinstall rim-agents")
    apply_layer(config, read_yaml(family_file), chosen_core)
    apply_layer(config, user, chosen_core)
    config.env, config.core = str(env_id), str(chosen_core)
    _merge(config, {k: v for k, v in (flags or {}).items() if v is not None})
    # The overrides go in as one layer, so that they are checked together: with 8 RIMs, 7 active by
    # default, rims.num_units=4 rims.k_active=3 is valid although its first half alone is not.
    combined: dict[str, Any] = {}
    for layer in layers:
        combined = _deep_update(combined, layer)
    _merge(config, combined)
    config.env = config.env.split(":", 1)[-1]
    config.env_packages = list(dict.fromkeys([*config.env_packages, *packages]))
    validate(config)
    return config


def import_env_packages(packages: list[str]) -> None:
    """Import the modules that register env ids (``--env-package``, the ``module`` of ``module:EnvId``)."""
    for package in packages:
        try:
            importlib.import_module(package)
        except ModuleNotFoundError as e:
            raise ConfigError(
                f"cannot import {package!r} to register its environments ({e}): install the package "
                "that provides them, or fix --env-package / the module:EnvId id"
            ) from None
        except Exception as e:  # the package's own import failed
            first = (str(e).splitlines() or [type(e).__name__])[0]
            raise ConfigError(f"importing {package!r} to register its environments failed: {first}") from None


def validate(config: TrainConfig) -> None:
    """Checks that need more than one key, or a range. The checks that need the rest of the package
    (extractor names, shift names, RIM settings) are :func:`rim_agents.models.check_config`'s."""
    import_env_packages(config.env_packages)

    if config.core not in CORES:
        raise ConfigError(f"unknown core {config.core!r}: choose one of {', '.join(CORES)}")
    for key in ("n_envs", "total_timesteps", "rim_log_freq", "rim_image_freq"):
        if getattr(config, key) < 1:
            raise ConfigError(f"config key {key} must be positive, got {getattr(config, key)}")
    if config.checkpoint_freq < 0:
        raise ConfigError(
            f"config key checkpoint_freq must be >= 0 (0: final model only), got {config.checkpoint_freq}"
        )
    if config.device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            raise ConfigError(f"device {config.device!r} asked for, but torch sees no CUDA GPU: use --device cpu")
    if config.device not in ("auto", "cpu", "cuda") and not config.device.startswith("cuda:"):
        raise ConfigError(f"device {config.device!r} is not auto, cpu or cuda")
    _validate_schedule(config.ppo.learning_rate, "ppo.learning_rate")
    _validate_schedule(config.ppo.clip_range, "ppo.clip_range")
    _check_ranges(config.ppo)
    ppo = config.ppo
    if ppo.n_steps < 1 or ppo.batch_size < 1 or ppo.n_epochs < 1:
        raise ConfigError("ppo.n_steps, ppo.batch_size and ppo.n_epochs must be positive")
    rollout = config.n_envs * ppo.n_steps
    if ppo.batch_size > rollout or rollout % ppo.batch_size:
        raise ConfigError(
            f"ppo.batch_size={ppo.batch_size} must divide a rollout of n_envs * ppo.n_steps = {rollout} "
            "transitions (and not exceed it)"
        )
    if ppo.seq_len is not None:
        if ppo.seq_len < 1 or ppo.n_steps % ppo.seq_len:
            raise ConfigError(f"ppo.seq_len={ppo.seq_len} must be a positive divisor of ppo.n_steps={ppo.n_steps}")
        if ppo.batch_size % ppo.seq_len:
            raise ConfigError(f"ppo.batch_size={ppo.batch_size} must be a multiple of ppo.seq_len={ppo.seq_len}")
    if config.video_freq < 0:
        raise ConfigError(f"config key video_freq must be >= 0 (0: no videos), got {config.video_freq}")
    if config.allocator not in ALLOCATORS:
        raise ConfigError(
            f"config key allocator={config.allocator!r} is invalid: choose one of {', '.join(ALLOCATORS)}"
        )
    if config.eval_freq < 0 or config.eval_episodes < 1:
        raise ConfigError("eval_freq must be >= 0 and eval_episodes >= 1")


#: PPO settings and their valid ranges: (low, high, low inclusive, high inclusive).
_PPO_RANGES: dict[str, tuple[float, float, bool, bool]] = {
    "learning_rate": (0.0, 1.0, False, True),
    "clip_range": (0.0, 10.0, False, True),
    "ent_coef": (0.0, math.inf, True, False),
    "vf_coef": (0.0, math.inf, True, False),
    "gamma": (0.0, 1.0, False, True),
    "gae_lambda": (0.0, 1.0, True, True),
    "max_grad_norm": (0.0, math.inf, False, False),
}


def _check_ranges(ppo: PPOConfig) -> None:
    for key, (low, high, low_in, high_in) in _PPO_RANGES.items():
        raw = getattr(ppo, key)
        value = float(raw[4:]) if isinstance(raw, str) else float(raw)
        inside = (value > low or (low_in and value == low)) and (value < high or (high_in and value == high))
        if not (math.isfinite(value) and inside):
            interval = f"{'[' if low_in else '('}{low:g}, {high:g}{']' if high_in else ')'}"
            raise ConfigError(f"config key ppo.{key}={raw!r} is out of range: it must lie in {interval}")
    if ppo.target_kl is not None and not (math.isfinite(ppo.target_kl) and ppo.target_kl > 0):
        raise ConfigError(f"config key ppo.target_kl={ppo.target_kl!r} must be a positive number or null")


def config_from_dict(data: dict[str, Any]) -> TrainConfig:
    """Rebuild a resolved config (as saved in a run directory), strictly."""
    config = TrainConfig()
    _merge(config, data)
    validate(config)
    return config
