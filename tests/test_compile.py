"""rims.compile: a checked setting, set by train.py --compile, and a compiled core computes what the
eager one does (slow: the compile takes tens of seconds)."""

from __future__ import annotations

import copy

import pytest
import torch as th
from torch._dynamo.utils import counters

from rim_agents import RIMCore
from rim_agents.cli import train_parser
from rim_agents.config import RIMConfig, load_config


def test_compile_takes_off_or_a_torch_compile_mode() -> None:
    assert RIMConfig().compile == "off"
    assert RIMConfig(compile="reduce-overhead").compile == "reduce-overhead"
    with pytest.raises(ValueError, match="compile='fast' is invalid: use one of off, default"):
        RIMConfig(compile="fast")


def test_train_compile_flag_sets_the_rim_setting() -> None:
    args = train_parser().parse_args(["--env", "CartPole-v1", "--compile"])
    assert args.compile
    config = load_config("CartPole-v1", "rims", overrides=["rims.compile=default"])
    assert config.rims.compile == "default"


def test_an_uncompiled_core_uses_the_step_method_itself() -> None:
    core = RIMCore(8, num_units=3, k_active=2, unit_size=4)
    assert core.cell.step_function() == core.cell.step


@pytest.mark.slow
@pytest.mark.parametrize("handwritten", [True, False], ids=["handwritten-backward", "autograd-step"])
@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_a_compiled_core_matches_the_eager_one(cell: str, handwritten: bool) -> None:
    """Compiled, the hand-written unroll's step functions (the default) or the autograd step give
    the eager autograd unroll's outputs, state and gradients."""
    th.manual_seed(0)
    eager = RIMCore(16, num_units=4, k_active=3, unit_size=8, cell=cell)
    eager.cell.handwritten_backward = False
    compiled = copy.deepcopy(eager)
    compiled.cell.compile_mode = "default"
    compiled.cell.handwritten_backward = handwritten
    x, proj = th.randn(6, 5, 16), th.randn(6, 5, 32)
    starts = th.zeros(6, 5)
    starts[3, 1] = 1
    outs = []
    graphs = counters["stats"]["unique_graphs"]
    for core in (eager, compiled):
        out, (h, c) = core(x, episode_starts=starts)
        (out * proj).sum().backward()
        outs.append([out.detach(), h.detach(), c.detach(), *(p.grad.clone() for p in core.parameters())])
    for a, b in zip(*outs, strict=True):
        assert th.allclose(a, b, atol=1e-5), (a - b).abs().max()
    if handwritten:
        # One graph per step function: every step, the first included, sees one state layout.
        assert counters["stats"]["unique_graphs"] - graphs <= 2
    graphs = counters["stats"]["unique_graphs"]
    (compiled(x, episode_starts=starts)[0] * proj).sum().backward()
    assert counters["stats"]["unique_graphs"] == graphs  # nothing compiled again
