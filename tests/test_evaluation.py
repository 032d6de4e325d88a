"""evaluate(): statistics against hand-computed values, result shapes, determinism, bad input."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import yaml

from rim_agents.cli import evaluate_main
from rim_agents.config import load_config
from rim_agents.errors import UsageError
from rim_agents.evaluation import evaluate
from rim_agents.runs import FINAL_MODEL
from rim_agents.stats import bootstrap_ci, iqm, stratified_bootstrap_iqm
from rim_agents.training import train

TINY = ["n_envs=2", "ppo.n_steps=16", "ppo.batch_size=16", "ppo.seq_len=8", "ppo.n_epochs=1", "checkpoint_freq=0"]


# --------------------------------------------------------------------------------- statistics
@pytest.mark.parametrize(
    ("values", "expected"),
    [
        ([1, 2, 3, 4], 2.5),  # drop 1 at each end
        ([0, 1, 2, 7, 100], (1 + 2 + 7) / 3),  # int(1.25) = 1 dropped at each end
        ([5, 1, 3, 2, 4, 8, 7, 6], (3 + 4 + 5 + 6) / 4),
        ([3.0], 3.0),
        ([1, 2, 3], 2.0),  # int(0.75) = 0: plain mean
    ],
)
def test_iqm_hand_computed(values: list[float], expected: float) -> None:
    assert iqm(values) == pytest.approx(expected)


def test_bootstrap_ci_properties() -> None:
    assert bootstrap_ci([2.0, 2.0, 2.0]) == (2.0, 2.0)
    assert bootstrap_ci([5.0]) == (5.0, 5.0)
    rng = np.random.default_rng(0)
    x = rng.normal(10.0, 2.0, 400)
    low, high = bootstrap_ci(x, seed=1)
    half = 1.96 * x.std() / np.sqrt(len(x))
    assert low < x.mean() < high
    assert (high - low) / 2 == pytest.approx(half, rel=0.15)
    assert bootstrap_ci(x, seed=1) == (low, high)


def test_stratified_bootstrap_iqm() -> None:
    point, low, high = stratified_bootstrap_iqm({"a": [1.0, 2.0, 3.0, 4.0], "b": [10.0, 11.0, 12.0, 13.0]})
    assert point == pytest.approx(iqm([1, 2, 3, 4, 10, 11, 12, 13]))
    assert low <= point <= high
    # Resampling within tasks: the pooled sample always holds four values of each task, so the
    # IQM can never be as low as the IQM of task a alone.
    assert low > iqm([1, 2, 3, 4])
    assert stratified_bootstrap_iqm({"a": [7.0]}) == (7.0, 7.0, 7.0)


# ---------------------------------------------------------------------------------- evaluate
@pytest.fixture(scope="module")
def pickup_runs(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    root = tmp_path_factory.mktemp("runs")
    runs = []
    for seed in (0, 1):
        config = load_config(
            "RIMAgents/Pickup-6x6-v0", "rims", overrides=TINY, flags={"total_timesteps": 32, "seed": seed}
        )
        runs.append(train(config, root / f"s{seed}"))
    return runs


def test_results_shape_and_determinism(pickup_runs: list[Path]) -> None:
    kwargs = {"shifts": ["novel-distractors", "view-3"], "episodes": 6, "seed": 3, "n_envs": 3}
    first = evaluate(pickup_runs, **kwargs)
    second = evaluate(pickup_runs, **kwargs)
    assert first == second
    assert len(first.checkpoints) == 2
    for r in first.checkpoints:
        assert list(r.shifts) == ["none", "novel-distractors", "view-3"]  # none added as the reference
        for s in r.shifts.values():
            assert s.episodes == len(s.returns) == 6
            assert s.success_rate is not None and 0.0 <= s.success_rate <= 1.0
            assert s.ci95[0] <= s.mean_return <= s.ci95[1]
        assert r.shifts["none"].drop == 0.0
    [group] = first.groups  # same config, two seeds
    assert group.core == "rims" and group.seeds == [0, 1]
    per_seed = group.shifts["view-3"].per_seed_returns
    assert per_seed == [r.shifts["view-3"].mean_return for r in first.checkpoints]
    assert group.shifts["view-3"].iqm_return == pytest.approx(np.mean(per_seed))  # IQM of 2 = mean
    third = evaluate(pickup_runs, **{**kwargs, "seed": 4})
    assert third.checkpoints[0].shifts["none"].returns != first.checkpoints[0].shifts["none"].returns
    # results.json is the same data, as plain JSON
    assert json.loads(json.dumps(first.to_dict()))["groups"][0]["seeds"] == [0, 1]


def test_cli_writes_outputs_and_tensorboard(pickup_runs: list[Path], tmp_path: Path, capsys) -> None:
    out = tmp_path / "out"
    code = evaluate_main([str(pickup_runs[0]), "--shifts", "none,flicker-0.5", "--episodes", "4", "--out", str(out)])
    assert code == 0
    text = capsys.readouterr().out
    assert "flicker-0.5" in text and "IQM" in text
    results = json.loads((out / "results.json").read_text())
    assert set(results["checkpoints"][0]["shifts"]) == {"none", "flicker-0.5"}
    assert (out / "results.csv").read_text().count("\n") == 1 + 2 + 2
    assert (out / "chart.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(pickup_runs[0] / "tb")).Reload()
    tags = events.Tags()["scalars"]
    # Kept apart from the training-time evaluations' eval/<shift>/ tags.
    assert "evaluate/flicker-0.5/mean_return" in tags and "eval/flicker-0.5/mean_return" not in tags


def test_checkpoint_file_and_run_dir_agree(pickup_runs: list[Path]) -> None:
    a = evaluate([pickup_runs[0]], shifts=["none"], episodes=3)
    b = evaluate([pickup_runs[0] / FINAL_MODEL], shifts=["none"], episodes=3)
    assert a.checkpoints[0].shifts == b.checkpoints[0].shifts


def _bad_cases(pickup_runs: list[Path], tmp_path: Path) -> dict[str, tuple[list[str], str]]:
    empty = tmp_path / "empty"
    empty.mkdir()
    no_model = tmp_path / "no_model"
    no_model.mkdir()
    (no_model / "config.yaml").write_text((pickup_runs[0] / "config.yaml").read_text())
    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    (corrupt / "config.yaml").write_text((pickup_runs[0] / "config.yaml").read_text())
    (corrupt / FINAL_MODEL).write_bytes(b"not a zip")
    mismatch = tmp_path / "mismatch"
    mismatch.mkdir()
    cartpole = train(load_config("CartPole-v1", "lstm", overrides=TINY, flags={"total_timesteps": 32}), tmp_path / "cp")
    config = yaml.safe_load((cartpole / "config.yaml").read_text())
    config["env"] = "RIMAgents/CartPoleNoVel-v1"  # 2 observations instead of 4
    (mismatch / "config.yaml").write_text(yaml.safe_dump(config))
    (mismatch / FINAL_MODEL).write_bytes((cartpole / FINAL_MODEL).read_bytes())
    run = str(pickup_runs[0])
    return {
        "unknown shift": ([run, "--shifts", "bogus"], "unknown shift 'bogus': valid shifts for minigrid"),
        "wrong family": ([run, "--shifts", "occlusion-0.2"], "needs an Atari environment"),
        "missing": ([str(tmp_path / "nope")], "does not exist"),
        "empty run dir": ([str(empty)], "is not a run directory"),
        "no model": ([str(no_model)], "holds no model yet"),
        "corrupt": ([str(corrupt)], "cannot load checkpoint"),
        "space mismatch": ([str(mismatch), "--shifts", "none"], "does not fit RIMAgents/CartPoleNoVel-v1"),
        "episodes": ([run, "--episodes", "0"], "--episodes must be positive"),
    }


def test_bad_input_exits_2_without_outputs(pickup_runs: list[Path], tmp_path: Path, capsys) -> None:
    for name, (args, message) in _bad_cases(pickup_runs, tmp_path).items():
        out = tmp_path / f"out_{name.replace(' ', '_')}"
        code = evaluate_main([*args, "--out", str(out), "--episodes" if "--episodes" not in args else "--seed", "2"])
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 2, name
        assert len(err) == 1 and message in err[0], (name, err)
        assert not out.exists(), name


def test_evaluate_function_raises_usage_errors(pickup_runs: list[Path]) -> None:
    with pytest.raises(UsageError, match="no checkpoint given"):
        evaluate([])


def test_aggregate_groups_seeds_and_names_ablations() -> None:
    from rim_agents.evaluation import CheckpointResult, ShiftResult, aggregate

    def result(core: str, seed: int, k: int, value: float) -> CheckpointResult:
        group = json.dumps({"core": core, "env": "E", "rims": {"k_active": k}}, sort_keys=True)
        shift = ShiftResult(1, value, [value, value], None, None, 1.0, [value], 0.0, 0.0)
        return CheckpointResult(f"{core}{k}_{seed}", "", "E", core, seed, 0, group, {"none": shift})

    results = [result("rims", s, 2, float(s)) for s in range(4)] + [result("rims", s, 4, 10.0 + s) for s in range(2)]
    results.append(result("lstm", 0, 2, 5.0))
    groups = {g.label: g for g in aggregate(results)}
    assert set(groups) == {"rims (k_active=2)", "rims (k_active=4)", "lstm"}
    assert groups["rims (k_active=2)"].seeds == [0, 1, 2, 3]
    assert groups["rims (k_active=2)"].shifts["none"].iqm_return == pytest.approx(1.5)  # mean of 1, 2
    assert groups["rims (k_active=4)"].shifts["none"].iqm_return == pytest.approx(10.5)


def test_out_is_checked_first_and_never_overwritten_silently(pickup_runs: list[Path], tmp_path: Path, capsys) -> None:
    run = str(pickup_runs[0])
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "results.json").write_text("{}")
    a_file = tmp_path / "file"
    a_file.write_text("x")
    for out, message in ((taken, "already holds results: pass --force"), (a_file, "is a file")):
        assert evaluate_main([run, "--shifts", "none", "--episodes", "2", "--out", str(out)]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and message in err[0]
    assert (taken / "results.json").read_text() == "{}"
    assert evaluate_main([run, "--shifts", "none", "--episodes", "2", "--out", str(taken), "--force"]) == 0
    assert json.loads((taken / "results.json").read_text())["checkpoints"]


def test_interrupt_keeps_finished_results(
    pickup_runs: list[Path], tmp_path: Path, capsys, monkeypatch: pytest.MonkeyPatch
) -> None:
    import rim_agents.evaluation as evaluation

    real = evaluation.run_episodes
    calls = {"n": 0}

    def interrupted_on_the_third(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(evaluation, "run_episodes", interrupted_on_the_third)
    out = tmp_path / "out"
    args = [str(pickup_runs[0]), "--shifts", "none,view-5,view-3", "--episodes", "2", "--out", str(out)]
    assert evaluate_main(args) == 130
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"interrupted: 2 finished checkpoint x shift evaluations are in {out}"]
    saved = json.loads((out / "results.json").read_text())
    assert set(saved["checkpoints"][0]["shifts"]) == {"none", "view-5"}


def test_results_do_not_depend_on_the_neighbours(pickup_runs: list[Path]) -> None:
    kwargs = {"shifts": ["none"], "episodes": 6, "seed": 0}
    alone = evaluate([pickup_runs[1]], **kwargs).checkpoints[0].shifts["none"].returns
    after = evaluate([pickup_runs[0], pickup_runs[1]], **kwargs).checkpoints[1].shifts["none"].returns
    assert alone == after


def test_an_interrupted_extension_is_evaluated_at_its_newest_checkpoint(
    pickup_runs: list[Path], tmp_path: Path
) -> None:
    import shutil

    from rim_agents.evaluation import resolve_checkpoint
    from rim_agents.runs import checkpoint_path, save_model

    run = tmp_path / "run"
    shutil.copytree(pickup_runs[0], run)
    model = resolve_checkpoint(run).model
    model.num_timesteps += 1000  # what an extension that stopped before its final model leaves
    save_model(model, checkpoint_path(run, model.num_timesteps))
    ckpt = resolve_checkpoint(run)
    assert ckpt.path.name == f"step_{model.num_timesteps:012d}.zip"
    assert ckpt.model.num_timesteps == model.num_timesteps


@pytest.mark.parametrize(
    ("values", "expected"),
    [
        ([3.0, 5.0], "bottom at 0"),  # returns >= 0: bars rise from the axis
        ([-1200.0, -150.0], "top at 0"),  # Pendulum-like returns: bars hang from 0, all visible
        ([-2.0, 4.0], "both"),  # mixed signs: the range holds both
        ([0.0, 0.0], "unit"),  # nothing learnt anywhere: a readable, non-singular axis
    ],
)
def test_bar_charts_keep_every_bar_on_the_axis(values: list[float], expected: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from rim_agents.report import zero_based_ylim

    fig, ax = plt.subplots()
    intervals = np.zeros(len(values)) if expected == "unit" else np.ones(len(values))
    ax.bar(range(len(values)), values, yerr=intervals)
    zero_based_ylim(ax)
    low, high = ax.get_ylim()
    plt.close(fig)
    assert low < high
    assert low <= min(values) and high >= max(values)
    if expected == "bottom at 0":
        assert low == 0.0
    elif expected == "top at 0":
        assert high == 0.0
    elif expected == "unit":
        assert (low, high) == (0.0, 1.0)
