"""Feature extractors: what the recurrent core reads.

- Atari: :class:`NatureCNN`, SB3's (one vector per frame) with its convolutions in channels-last
  layout, or :class:`NatureCNNTokens`, the same convolutions giving the final 7x7 feature map as 49
  tokens with a learned position embedding (for the RIM core's spatial input attention).
- MiniGrid: :class:`MiniGridExtractor` for the dict observation (egocentric ``image`` of cell
  indices plus ``target``); SB3's NatureCNN cannot take a 7x7 image.
- Vectors: SB3's ``FlattenExtractor`` (the policy's ``net_arch`` adds the MLP).
"""

from __future__ import annotations

import gymnasium as gym
import torch as th
from minigrid.core.constants import COLOR_TO_IDX, OBJECT_TO_IDX
from stable_baselines3.common.preprocessing import get_flattened_obs_dim, is_image_space
from stable_baselines3.common.torch_layers import BaseFeaturesExtractor, CombinedExtractor, FlattenExtractor
from stable_baselines3.common.torch_layers import NatureCNN as SB3NatureCNN
from torch import nn

from rim_agents.envs.pickup import COLOURS, TYPES


def _check_layout(channels_last: bool | str) -> bool | str:
    """``channels_last`` as given, if it is ``auto``, ``True`` or ``False`` (not 1 or 0)."""
    if not (channels_last is True or channels_last is False or channels_last == "auto"):
        raise ValueError(
            f"features_extractor_kwargs.channels_last={channels_last!r} is invalid: use auto (channels-last "
            "convolutions on the CPU), true or false"
        )
    return channels_last


def conv_input(images: th.Tensor, channels_last: bool | str) -> th.Tensor:
    """``images`` ``(B, C, H, W)`` in the layout the convolutions should run in.

    Channels-last (NHWC) lets oneDNN's convolutions skip their own reordering: on this project's
    2-core CPU, NatureCNN's forward and backward over a minibatch of 256 Atari frames took 0.36 s
    against 0.51 s (one thread, two trainings sharing the machine), and PPO on Breakout ran 1.09-1.14x faster end to end
    (``benchmarks/train_throughput.py``, variants with and without ``-nchw``). The values are the
    same products summed in another order: outputs agree with the NCHW layout to float rounding.
    ``auto`` uses it on the CPU only; on CUDA it is not measured, so ``auto`` leaves the layout alone.
    """
    if channels_last is True or (channels_last == "auto" and images.device.type == "cpu"):
        return images.contiguous(memory_format=th.channels_last)
    return images


class NatureCNN(SB3NatureCNN):
    """SB3's ``NatureCNN`` (same layers, same parameter names, so its checkpoints load), run with
    its convolutions in channels-last layout (see :func:`conv_input`).

    :param observation_space: a channel-first image space.
    :param features_dim: output width.
    :param normalized_image: whether the images are already in [0, 1].
    :param channels_last: ``auto`` (on the CPU), ``True`` or ``False``.
    """

    def __init__(
        self,
        observation_space: gym.Space,
        features_dim: int = 512,
        normalized_image: bool = False,
        channels_last: bool | str = "auto",
    ) -> None:
        super().__init__(observation_space, features_dim=features_dim, normalized_image=normalized_image)
        self.channels_last = _check_layout(channels_last)

    def forward(self, observations: th.Tensor) -> th.Tensor:
        return self.linear(self.cnn(conv_input(observations, self.channels_last)))


class NatureCNNTokens(BaseFeaturesExtractor):
    """NatureCNN's three convolutions; the final feature map as a set of tokens.

    Output: ``(B, N * C)``, the flattening of ``N = H' * W'`` tokens of width ``C`` (64), each the
    feature vector of one cell plus a learned embedding of its position. ``token_shape`` is
    ``(N, C)``; the policy unflattens before the core.

    :param observation_space: a channel-first image space.
    :param normalized_image: whether the images are already in [0, 1].
    :param channels_last: the convolutions' layout, as :class:`NatureCNN`'s.
    """

    def __init__(
        self, observation_space: gym.spaces.Box, normalized_image: bool = False, channels_last: bool | str = "auto"
    ) -> None:
        if not is_image_space(observation_space, check_channels=False, normalized_image=normalized_image):
            raise ValueError(
                f"nature_cnn_tokens needs channel-first image observations, got {observation_space}: "
                "use it on Atari-like envs (normalized_image=True for float images in [0, 1])"
            )
        n_channels = observation_space.shape[0]
        cnn = nn.Sequential(
            nn.Conv2d(n_channels, 32, kernel_size=8, stride=4),
            nn.ReLU(),
            nn.Conv2d(32, 64, kernel_size=4, stride=2),
            nn.ReLU(),
            nn.Conv2d(64, 64, kernel_size=3, stride=1),
            nn.ReLU(),
        )
        with th.no_grad():
            out = cnn(th.as_tensor(observation_space.sample()[None]).float())
        C, H, W = out.shape[1:]
        super().__init__(observation_space, features_dim=C * H * W)
        self.cnn = cnn
        self.token_shape = (H * W, C)
        self.position = nn.Parameter(th.zeros(H * W, C))
        nn.init.normal_(self.position, std=0.02)
        self.channels_last = _check_layout(channels_last)

    def forward(self, observations: th.Tensor) -> th.Tensor:
        fmap = self.cnn(conv_input(observations, self.channels_last))  # (B, C, H, W)
        tokens = fmap.flatten(2).transpose(1, 2) + self.position  # (B, N, C)
        return tokens.flatten(1)


class MiniGridExtractor(BaseFeaturesExtractor):
    """Dict observation ``{"image": (V, V, 3) cell indices, "target": (type, colour)}`` to a vector.

    Each cell's (object, colour, state) indices are embedded and summed; two 3x3 convolutions keep
    the ``V x V`` grid, each modulated channel-wise by the target (FiLM; the target arrives one-hot,
    as SB3 encodes a ``MultiDiscrete`` space); a linear layer maps the grid to ``features_dim``.

    With ``target_match`` the target (a pickup env's ``(type, colour)``) is embedded with the *same*
    object and colour tables as the cells, and the convolutions also read each cell's embedding
    multiplied by it (gated attention, Chaplot et al. 2018): a cell that shows the target object
    differs from the others by one channel sum from the first update on, instead of by a match the
    FiLM path must discover. A hidden target (the memory variant's index past the last) embeds to zero.

    :param observation_space: ``Dict`` with ``image`` (``Box`` of integer indices, channel last) and
        optionally ``target`` (``MultiDiscrete``).
    :param features_dim: output width.
    :param embed_dim: width of each index embedding.
    :param target_match: add the cell-times-target channels (needs a pickup env's ``target``).
    :param readout_tokens: append every cell's embedding (the same sum of type, colour and state
        rows) to the output, ``V * V * embed_dim`` more values after the ``features_dim`` features:
        the tokens of the policy's ``token_readout``, which scores each cell against a query from
        the core's output. ``readout_shape`` is then ``(V * V, embed_dim)`` (else None).
    :param tokens: output the grid as ``V * V`` tokens instead of one vector: each cell's 64
        features after the second convolution (FiLM included) plus a learned embedding of its
        position, flattened; ``token_shape`` is ``(V * V, 64)``. The RIM core reads them with its
        input attention (each RIM's query against each cell); other cores read the flattening.
        ``features_dim`` is then ignored.
    """

    def __init__(
        self,
        observation_space: gym.spaces.Dict,
        features_dim: int = 128,
        embed_dim: int = 16,
        target_match: bool = False,
        readout_tokens: bool = False,
        tokens: bool = False,
    ) -> None:
        image_space = observation_space["image"]
        if not isinstance(image_space, gym.spaces.Box) or len(image_space.shape) != 3 or image_space.shape[2] != 3:
            raise ValueError(
                f"MiniGridExtractor needs an 'image' Box of shape (V, V, 3), got {image_space}: "
                "use the rim_agents MiniGrid environments"
            )
        V = image_space.shape[0]
        if tokens and readout_tokens:
            raise ValueError(
                "MiniGridExtractor: tokens and readout_tokens are alternatives (the RIM core already attends "
                "over the cells): drop one"
            )
        self.readout_shape = (V * V, embed_dim) if readout_tokens else None
        self.token_shape = (V * V, 64) if tokens else None
        if tokens:
            features_dim = V * V * 64
        super().__init__(observation_space, features_dim + (V * V * embed_dim if readout_tokens else 0))
        self.max_index = int(image_space.high.max()) + 1
        self.embed = nn.Embedding(3 * self.max_index, embed_dim)
        self.register_buffer("offsets", th.arange(3) * self.max_index, persistent=False)
        target_dim = get_flattened_obs_dim(observation_space["target"]) if "target" in observation_space.spaces else 0
        self.target_match = target_match
        if target_match:
            if not target_dim:
                raise ValueError("target_match needs a 'target' in the observation: use a RIMAgents/Pickup env")
            # Target (type, colour) indices -> rows of the cell embedding table; hidden -> -1.
            target_space = observation_space["target"]
            assert isinstance(target_space, gym.spaces.MultiDiscrete)
            nvec = [int(n) for n in target_space.nvec]
            types = [OBJECT_TO_IDX[t] for t in TYPES] + [-1] * (nvec[0] - len(TYPES))
            colours = [COLOR_TO_IDX[c] + self.max_index for c in COLOURS] + [-1] * (nvec[1] - len(COLOURS))
            self.register_buffer("target_rows", th.tensor(types + colours), persistent=False)
        self.conv1 = nn.Conv2d(embed_dim * (2 if target_match else 1), 32, 3, padding=1)
        self.conv2 = nn.Conv2d(32, 64, 3, padding=1)
        # FiLM (Perez et al. 2018), as in BabyAI: the target scales and shifts every channel of
        # both convolutions, so cells that match it can stand out before the grid is flattened.
        self.film = nn.Linear(target_dim, 2 * (32 + 64)) if target_dim else None
        if tokens:
            self.position = nn.Parameter(th.zeros(V * V, 64))
            nn.init.normal_(self.position, std=0.02)
        else:
            self.head = nn.Sequential(nn.Linear(64 * V * V, features_dim), nn.ReLU())

    def target_embedding(self, target: th.Tensor) -> th.Tensor:
        """``(B, n_types + n_colours)`` one-hot target -> ``(B, E)``: the sum of its type's and colour's
        rows of the cell embedding table (zero for a hidden type or colour)."""
        one_hot = target > 0.5  # one type and one colour per row
        target_rows: th.Tensor = self.target_rows  # type: ignore[assignment]
        rows = target_rows.expand_as(one_hot)[one_hot].view(-1, 2)
        return (self.embed(rows.clamp(min=0)) * (rows >= 0).unsqueeze(-1)).sum(dim=1)

    def forward(self, observations: dict[str, th.Tensor], target_embedding: th.Tensor | None = None) -> th.Tensor:
        """Features of a batch of observations.

        :param observations: the env's observations, preprocessed as SB3 does (the target one-hot).
        :param target_embedding: with ``target_match``, a ``(B, E)`` embedding to match the cells
            against instead of the observation's target (e.g. one recalled from memory); the FiLM
            conditioning still reads the observation's target.
        """
        offsets: th.Tensor = self.offsets  # type: ignore[assignment]
        idx = observations["image"].long().clamp_(0, self.max_index - 1) + offsets  # (B, V, V, 3)
        cells = self.embed(idx).sum(dim=3)  # (B, V, V, E)
        grid = cells.permute(0, 3, 1, 2)  # (B, E, V, V)
        if self.target_match:
            target = self.target_embedding(observations["target"]) if target_embedding is None else target_embedding
            grid = th.cat([grid, grid * target[..., None, None]], dim=1)
        h1 = self.conv1(grid)
        if self.film is None:
            h2 = self.conv2(th.relu(h1))
        else:
            g1, b1, g2, b2 = self.film(observations["target"].float()).split([32, 32, 64, 64], dim=1)
            h2 = self.conv2(th.relu(h1 * (1 + g1[..., None, None]) + b1[..., None, None]))
            h2 = h2 * (1 + g2[..., None, None]) + b2[..., None, None]
        if self.token_shape is not None:  # (B, 64, V, V) -> (B, V * V, 64), plus the positions
            return (th.relu(h2).flatten(2).transpose(1, 2) + self.position).flatten(1)
        features = self.head(th.relu(h2).flatten(1))
        if self.readout_shape is None:
            return features
        return th.cat([features, cells.flatten(1)], dim=1)


EXTRACTORS: dict[str, type[BaseFeaturesExtractor]] = {
    "nature_cnn": NatureCNN,
    "nature_cnn_tokens": NatureCNNTokens,
    "minigrid": MiniGridExtractor,
    "flatten": FlattenExtractor,
    "combined": CombinedExtractor,
}
#: Config names: the extractors above, and ``auto`` (chosen from the observation space).
EXTRACTOR_NAMES = (*EXTRACTORS, "auto")


def auto_extractor(observation_space: gym.Space) -> str:
    """The extractor for an env this package knows nothing about, from its observation space: SB3's
    image test picks ``nature_cnn``, a ``Dict`` ``combined`` (SB3's ``CombinedExtractor``), anything
    else (vectors, ``Discrete``, ``MultiDiscrete``) ``flatten`` (one-hot for discrete spaces)."""
    if isinstance(observation_space, gym.spaces.Dict):
        return "combined"
    if is_image_space(observation_space, check_channels=False):
        return "nature_cnn"
    return "flatten"


def extractor_class(name: str) -> type[BaseFeaturesExtractor]:
    """A feature extractor by its config name."""
    if name not in EXTRACTORS:
        raise ValueError(f"unknown features_extractor {name!r}: choose one of {', '.join(EXTRACTORS)}")
    return EXTRACTORS[name]
