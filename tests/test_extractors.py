"""Image extractors: channels-last convolutions give SB3's NatureCNN's values, in the layout asked."""

from __future__ import annotations

import gymnasium as gym
import numpy as np
import pytest
import torch as th
from stable_baselines3.common.torch_layers import NatureCNN as SB3NatureCNN

from rim_agents.config import load_config
from rim_agents.errors import UsageError
from rim_agents.extractors import NatureCNN, NatureCNNTokens
from rim_agents.models import build_model, make_env

SPACE = gym.spaces.Box(0, 255, (4, 84, 84), np.uint8)


def frames(batch: int = 6) -> th.Tensor:
    return th.randint(0, 256, (batch, *SPACE.shape), generator=th.Generator().manual_seed(1)).float() / 255


@pytest.mark.parametrize("layout", ["auto", True, False])
def test_nature_cnn_gives_sb3s_values_and_gradients(layout: bool | str) -> None:
    th.manual_seed(0)
    reference = SB3NatureCNN(SPACE, features_dim=64)
    ours = NatureCNN(SPACE, features_dim=64, channels_last=layout)
    assert list(ours.state_dict()) == list(reference.state_dict())  # SB3's checkpoints load as they are
    ours.load_state_dict(reference.state_dict())
    x = frames()
    projection = th.randn(x.shape[0], 64, generator=th.Generator().manual_seed(2))
    out_ref, out = reference(x), ours(x)
    th.testing.assert_close(out, out_ref, rtol=1e-5, atol=1e-5)
    (out_ref * projection).sum().backward()
    (out * projection).sum().backward()
    for (name, p_ref), p in zip(reference.named_parameters(), ours.parameters(), strict=True):
        th.testing.assert_close(p.grad, p_ref.grad, rtol=1e-4, atol=1e-5, msg=name)


@pytest.mark.parametrize("extractor", [NatureCNN, NatureCNNTokens])
@pytest.mark.parametrize(("layout", "nhwc"), [("auto", True), (True, True), (False, False)])
def test_convolutions_run_in_the_layout_asked(extractor: type, layout: bool | str, nhwc: bool) -> None:
    model = extractor(SPACE, channels_last=layout)
    seen: list[bool] = []
    for conv in (m for m in model.cnn if isinstance(m, th.nn.Conv2d)):
        conv.register_forward_pre_hook(
            lambda _m, args: seen.append(args[0].is_contiguous(memory_format=th.channels_last))
        )
    model(frames(2))
    assert seen == [nhwc] * 3


def test_tokens_are_the_same_in_either_layout() -> None:
    th.manual_seed(0)
    nchw = NatureCNNTokens(SPACE, channels_last=False)
    nhwc = NatureCNNTokens(SPACE, channels_last=True)
    nhwc.load_state_dict(nchw.state_dict())
    x = frames()
    th.testing.assert_close(nhwc(x), nchw(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("bad", ["yes", 1, 0, None, 2.0])
def test_a_bad_layout_is_refused_by_name(bad: object) -> None:
    with pytest.raises(ValueError, match=r"channels_last=.* is invalid: use auto"):
        NatureCNN(SPACE, channels_last=bad)  # type: ignore[arg-type]


def test_a_bad_layout_in_a_config_is_a_usage_error() -> None:
    config = load_config(
        "BreakoutNoFrameskip-v4", "none", overrides=["policy.features_extractor_kwargs.channels_last=maybe"]
    )
    config.n_envs = 1
    env = make_env(config)
    try:
        with pytest.raises(
            UsageError, match=r"cannot build the model: features_extractor_kwargs\.channels_last='maybe'"
        ):
            build_model(config, env)
    finally:
        env.close()
