"""benchmarks/match_supervised.py: the memory variant's supervised match data and network."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch as th

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
from match_supervised import (
    ENV,
    FEEDBACK_AUX,
    SHOWN_ENV,
    SHOWN_OVERRIDES,
    MatchModel,
    _tensors,
    balanced_accuracy,
    collect,
)
from minigrid.core.constants import COLOR_TO_IDX, OBJECT_TO_IDX

from rim_agents.config import load_config
from rim_agents.envs.pickup import COLOURS, TYPES


@pytest.fixture(scope="module")
def episodes():
    return collect(load_config(env=ENV, core="lstm"), n_rounds=1, seed=7, keep=40)


def test_episodes_hide_the_target_after_the_cue_and_label_only_objects_in_front(episodes) -> None:
    target = episodes.obs["target"]  # (T, E, 2): type, colour; the last index of each means hidden
    assert episodes.obs["image"].shape == (40, 8, 7, 7, 3) and episodes.labels.shape == (40, 8)
    hidden = np.array([3, 6])
    assert not (target[0] == hidden).any()
    assert (target[1:] == hidden).all()
    assert (episodes.labels[0] == -1).all()  # nothing is scored while the cue is shown
    assert set(np.unique(episodes.labels)) <= {-1, 0, 1}
    assert (episodes.labels >= 0).any()


def test_balanced_accuracy_weighs_both_classes_alike() -> None:
    labels = th.tensor([1, 0, 0, 0, -1])
    assert balanced_accuracy(th.tensor([1.0, -1.0, -1.0, -1.0, 5.0]), labels) == 1.0
    assert balanced_accuracy(th.tensor([-1.0, -1.0, -1.0, -1.0, 5.0]), labels) == 0.5  # majority guess
    assert balanced_accuracy(th.tensor([1.0, 1.0, -1.0, -1.0, 5.0]), labels) == pytest.approx((1 + 2 / 3) / 2)


def test_only_a_core_with_memory_sees_the_cue(episodes) -> None:
    obs, _ = _tensors(episodes, slice(0, 2))
    other = {k: v.clone() for k, v in obs.items()}
    other["target"][0] = (other["target"][0] + 1) % th.tensor([3, 6])  # another cue, same walk
    for core, remembers in (("lstm", True), ("none", False)):
        model = MatchModel(core, seed=0)
        with th.no_grad():
            a, b = model(obs), model(other)
        assert a.shape == (40, 2)
        assert not th.equal(a[0], b[0])  # the cue step itself differs for both
        assert (not th.allclose(a[1:], b[1:])) == remembers


@pytest.mark.parametrize("shown", [False, True])
def test_labels_say_whether_the_cell_in_front_shows_the_target(episodes, shown) -> None:
    if shown:  # the control: target shown at every step, room lit
        episodes = collect(load_config(env=SHOWN_ENV, core="lstm", overrides=SHOWN_OVERRIDES), 1, seed=7, keep=40)
        assert (episodes.obs["target"] == episodes.obs["target"][:1]).all()
    image, labels = episodes.obs["image"], episodes.labels
    front = image[:, :, 3, 5]  # (T, E, 3): the cell ahead of the agent in its 7x7 view
    target = episodes.obs["target"][:1]  # the cue (t = 0) holds the episode's target
    is_target = (front[..., 0] == np.array([OBJECT_TO_IDX[t] for t in TYPES])[target[..., 0]]) & (
        front[..., 1] == np.array([COLOR_TO_IDX[c] for c in COLOURS])[target[..., 1]]
    )
    is_object = np.isin(front[..., 0], [OBJECT_TO_IDX[t] for t in ("key", "ball", "box")])
    expected = np.where(is_object, is_target, -1)
    expected[0] = -1
    assert np.array_equal(labels, expected)
    assert (labels == 1).any() and (labels == 0).any()


def test_feedback_prototype_reads_the_recall_after_the_cue_only(episodes) -> None:
    obs, _ = _tensors(episodes, slice(0, 2))
    model = MatchModel(FEEDBACK_AUX, seed=0)
    logits = model(obs)
    assert logits.shape == (40, 2) and model.aux_loss is not None and model.aux_loss.item() > 0
    logits[0].sum().backward(retain_graph=True)  # the cue step: the target is visible, no recall
    assert model.recall.weight.grad is None or not model.recall.weight.grad.any()
    logits[5].sum().backward()
    assert model.recall.weight.grad is not None and model.recall.weight.grad.abs().sum() > 0
