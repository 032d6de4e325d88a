"""benchmarks/copying.py: the authors' data and loss, every model's shapes, and a resumed run that
equals an uninterrupted one."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch as th

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))

import copying


def test_the_data_is_the_authors_copying_data() -> None:
    x, y = copying.copying_data(5, 2, 3, np.random.default_rng(0))
    assert x.shape == y.shape == (2, 25, 3)  # T + 20 positions, time first
    seq = x[:, :10]
    assert ((seq >= 1) & (seq <= 8)).all()
    assert (x[:, 10:14] == 0).all() and (x[:, 14] == 9).all() and (x[:, 15:] == 0).all()  # T-1 blanks, marker
    assert (y[:, :15] == 0).all() and th.equal(y[:, 15:], seq)  # blanks, then the symbols


def test_the_loss_covers_every_position_and_the_output_phase_separately() -> None:
    y = th.zeros(25, 2, dtype=th.long)
    logits = th.zeros(25, 2, copying.OUT_DIM)
    logits[..., 0] = 10.0  # sure of blank everywhere
    y[-10:] = 3  # wrong on the output phase only
    everywhere, output = copying.losses(logits, y)
    assert output.item() == pytest.approx(10.0 + np.log(1 + 19 * np.exp(-10.0)), abs=1e-4)
    assert everywhere.item() == pytest.approx(
        (15 * everywhere.new_tensor(0.0).item() + 10 * output.item()) / 25, abs=1e-3
    )


@pytest.mark.parametrize("name", copying.MODELS)
def test_every_model_maps_tokens_to_twenty_logits_at_any_length(name: str) -> None:
    model = copying.CopyModel(name, train_len=5)
    for T in (25, 40):
        x, _ = copying.copying_data(T - 20, 1, 2, np.random.default_rng(0))
        logits, _ = model(x[0])
        assert logits.shape == (T, 2, copying.OUT_DIM)


def test_a_resumed_run_equals_an_uninterrupted_one(tmp_path: Path) -> None:
    settings = {
        "steps": 4,
        "train_len": 5,
        "test_lens": [8],
        "lr": 1e-3,
        "clip": 1.0,
        "plateau": False,
        "reset_state": False,
        "batches_per_epoch": 3,  # the resume crosses an epoch boundary
        "eval_batches": 1,
        "checkpoint_every": 2,
        "log_every": 1,
        "eval_every": 2,
    }
    straight = copying.train_one("lstm-300", 0, settings, str(tmp_path / "a"))
    copying.train_one("lstm-300", 0, {**settings, "steps": 2}, str(tmp_path / "b"))
    resumed = copying.train_one("lstm-300", 0, settings, str(tmp_path / "b"))
    assert resumed["steps"] == straight["steps"] == 4
    assert resumed["curve"] == straight["curve"]
    assert resumed["final"] == straight["final"]


@pytest.mark.parametrize(
    ("device", "message"),
    [("cuda", "needs a CUDA GPU and none is visible"), ("tpu9", "is not a device")],
)
def test_a_device_it_cannot_use_is_refused_in_one_line(device: str, message: str, tmp_path: Path) -> None:
    import subprocess

    if device == "cuda" and th.cuda.is_available():
        pytest.skip("a GPU is visible")
    script = Path(copying.__file__)
    done = subprocess.run(
        [sys.executable, str(script), "--quick", "--models", "lstm-300", "--device", device, "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2 and message in done.stderr
    assert not any(tmp_path.iterdir())  # nothing written


def test_the_device_setting_reaches_the_run(tmp_path: Path) -> None:
    settings = {
        "steps": 1, "train_len": 5, "test_lens": [], "lr": 1e-3, "clip": 1.0, "plateau": False,
        "reset_state": False, "batches_per_epoch": 2, "eval_batches": 1, "checkpoint_every": 1,
        "log_every": 1, "eval_every": 1, "device": "cpu", "cuda_graphs": True,
    }  # fmt: skip
    result = copying.train_one("rims-6-4", 0, settings, str(tmp_path))
    assert result["steps"] == 1 and set(result["final"]) == {"5"}
    saved = th.load(tmp_path / "runs" / "rims-6-4_s0.pt", weights_only=True)
    assert saved["cuda_rng"] is None and all(t.device.type == "cpu" for t in saved["model"].values())
    assert copying.CopyModel("rims-6-4", 5, cuda_graphs=True).core.cell.cuda_graphs
    if not th.cuda.is_available():  # the setting is used: a device that is not there fails
        with pytest.raises((RuntimeError, AssertionError)):
            copying.train_one("lstm-300", 0, {**settings, "device": "cuda"}, str(tmp_path / "cuda"))
