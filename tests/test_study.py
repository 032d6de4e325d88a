"""study.py: specs are checked before anything runs; a study trains every run once, resumes a run
whose worker was killed from its checkpoint, aggregates like evaluate.py, and trains nothing when
started again."""

from __future__ import annotations

import csv
import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest
import yaml

from rim_agents.cli import study_main
from rim_agents.errors import UsageError
from rim_agents.runs import CHECKPOINT_DIR, FINAL_MODEL, LOCK_FILE, checkpoint_step, progress_points
from rim_agents.study import (
    Bar,
    check_links,
    env_evaluation,
    evaluate_run,
    load_spec,
    parse_seeds,
    plan_runs,
    reuse_runs,
    spec_from_dict,
)

ROOT = Path(__file__).resolve().parent.parent
TINY = ["n_envs=2", "ppo.n_steps=16", "ppo.batch_size=16", "ppo.seq_len=8", "ppo.n_epochs=1"]


def tiny_spec(steps: int = 128, **extra: object) -> dict:
    return {
        "name": "tiny",
        "envs": {"pickup": {"env": "RIMAgents/Pickup-6x6-v0", "env_kwargs": {"num_distractors": 1}}},
        "variants": {"rims": {"core": "rims"}, "lstm": {"core": "lstm"}},
        "seeds": "0-1",
        "steps": steps,
        "overrides": [*TINY, "checkpoint_freq=32"],
        "evaluation": {"shifts": ["none", "novel-distractors"], "episodes": 4},
        **extra,
    }


def write_spec(tmp_path: Path, data: dict) -> Path:
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


# ------------------------------------------------------------------------------------- the spec


def test_seeds_are_read_as_ranges_lists_or_one_integer() -> None:
    assert parse_seeds("0-3,7", "seeds") == (0, 1, 2, 3, 7)
    assert parse_seeds([5, 2], "seeds") == (5, 2)
    assert parse_seeds(4, "seeds") == (4,)
    for bad in ("a-b", [1, 1], [True], "-1", None):
        with pytest.raises(UsageError, match="seeds"):
            parse_seeds(bad, "seeds")


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"stepz": 5}, "unknown key 'stepz'"),
        ({"steps": 0}, "steps must be a positive integer"),
        ({"variants": {"rims": {"core": "rims", "overide": []}}}, "variants.rims: unknown key 'overide'"),
        ({"variants": {"rims": {"overrides": "rims.k_active=4"}}}, "variants.rims.overrides must be a list"),
        ({"envs": {"pickup": {"env_kwargs": {}}}}, "envs.pickup: missing key 'env'"),
        ({"tune": {"seeds": [0], "space": {"ppo.learning_rate": {"uniform": [0, 1]}}}}, "must differ"),
        ({"tune": {"space": {"ppo.learning_rate": {"gauss": [0, 1]}}}}, "tune.space.ppo.learning_rate"),
        ({"envs": {"p": {"env": "X", "bars": {"default": {"metric": "success"}}}}}, "needs min or max"),
        ({"envs": {"p": {"env": "RIMAgents/Pickup-6x6-v0", "shifts": ["cue-0"]}}}, "envs.p.shifts: shift cue-0 needs"),
        ({"envs": {"p": {"env": "RIMAgents/Pickup-6x6-v0", "shifts": "all"}}}, "envs.p.shifts must list shift names"),
    ],
)
def test_bad_specs_get_one_line_naming_the_key(change: dict, message: str) -> None:
    with pytest.raises(UsageError, match=message.replace(".", r"\.")):
        spec_from_dict({**tiny_spec(), **change})


def test_plans_are_seed_major_with_each_variants_overrides(tmp_path: Path) -> None:
    data = tiny_spec()
    data["variants"]["rims-all-active"] = {"core": "rims", "overrides": ["rims.k_active=4"], "seeds": [1]}
    plans = plan_runs(spec_from_dict(data), tmp_path)
    assert [p.key for p in plans] == [
        "pickup/rims/s0",
        "pickup/lstm/s0",
        "pickup/rims/s1",
        "pickup/lstm/s1",
        "pickup/rims-all-active/s1",
    ]
    assert plans[-1].config.rims.k_active == 4 and plans[0].config.rims.k_active != 4
    assert {p.config.env_options.env_kwargs["num_distractors"] for p in plans} == {1}
    assert [p.config.seed for p in plans] == [0, 0, 1, 1, 1]
    assert plans[0].run_dir == tmp_path / "runs" / "pickup" / "rims" / "s0"


def test_an_env_can_have_its_own_shifts() -> None:
    """The memory variant is evaluated under its cue shifts too; other envs keep the study's."""
    data = tiny_spec()
    data["envs"]["cue"] = {"env": "RIMAgents/PickupCue-6x6-v0", "shifts": "none,cue-0,novel-distractors"}
    spec = spec_from_dict(data)
    pickup, cue = spec.envs
    assert pickup.shifts is None and cue.shifts == ("none", "cue-0", "novel-distractors")
    assert env_evaluation(spec, pickup) == spec.evaluation
    assert env_evaluation(spec, cue).shifts == cue.shifts
    assert dataclasses.replace(env_evaluation(spec, cue), shifts=spec.evaluation.shifts) == spec.evaluation


def test_a_bar_passes_values_inside_its_bounds() -> None:
    assert Bar("success", min=0.9).passes(0.9) and not Bar("success", min=0.9).passes(0.89)
    assert Bar("success", max=0.6).passes(0.5) and not Bar("success", max=0.6).passes(0.61)


def test_a_bad_spec_exits_2_and_creates_no_study_folder(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    spec = write_spec(tmp_path, {**tiny_spec(), "variants": {"rims": {"core": "transformer"}}})
    out = tmp_path / "study"
    assert study_main([str(spec), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "unknown core 'transformer'" in err and "variant rims" in err
    assert not out.exists()
    assert study_main([str(tmp_path / "missing.yaml")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_the_shipped_specs_are_valid(tmp_path: Path) -> None:
    specs = sorted((ROOT / "configs" / "studies").glob("*.yaml"))
    assert len(specs) >= 2
    for path in specs:
        spec = load_spec(path)
        plans = plan_runs(spec, tmp_path / spec.name)
        assert len({p.config.seed for p in plans}) >= 10, path  # the project's rule: >= 10 seeds


def test_the_shipped_specs_pin_the_rims_they_reported_and_name_todays_default(tmp_path: Path) -> None:
    """The RIM variants reported before the classic default changed keep the paper's rule with 4
    RIMs (3 active in the classic family, 2 in MiniGrid), so the committed commands reproduce them;
    rims-k8-7-st-anneal is the trained selection (the classic family's default), and the other
    cores' runs are the same configurations whatever the pins say."""
    from rim_agents.config import load_config

    for name in ("learning", "memory_span", "pickup_robustness", "selection"):
        spec = load_spec(ROOT / "configs" / "studies" / f"{name}.yaml")
        plans = plan_runs(spec, tmp_path / name)
        seen = set()
        for plan in plans:
            rims, minigrid = plan.config.rims, plan.env.env.startswith("RIMAgents/Pickup")
            if plan.variant.name == "rims":
                assert (rims.num_units, rims.k_active, rims.selection, rims.k_anneal) == (
                    4, 2 if minigrid else 3, "hard", 0.0
                ), (name, plan.key)  # fmt: skip
                assert "st_state_gradient" not in plan.config.identity()["rims"], (name, plan.key)
            elif plan.variant.name.startswith("rims-k8-7-st-anneal"):
                trained = (rims.num_units, rims.k_active, rims.selection, rims.k_anneal) == (
                    8,
                    7,
                    "straight_through",
                    0.5,
                )
                # As reported: the surrogate's gradient through the state too. Detached: the classic
                # and MiniGrid families' default.
                detached = plan.variant.name == "rims-k8-7-st-anneal-detached"
                assert trained and rims.st_state_gradient is not detached, (name, plan.key)
                assert not detached or rims == load_config(plan.config.env, "rims").rims, (name, plan.key)
            elif plan.config.core != "rims":
                assert "rims" not in plan.config.identity(), (name, plan.key)
            seen.add(plan.variant.name)
        assert {"rims", "rims-k8-7-st-anneal", "rims-k8-7-st-anneal-detached"} <= seen, name


# ------------------------------------------------------------------------------------- a study


def run_study_process(spec: Path, out: Path) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "RAY_AUTH_MODE": "disabled"}
    cmd = [sys.executable, str(ROOT / "study.py"), str(spec), "--out", str(out), "--max-parallel", "2"]
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def test_a_study_survives_a_killed_worker_and_trains_nothing_when_started_again(tmp_path: Path) -> None:
    steps = 1024
    spec = write_spec(tmp_path, tiny_spec(steps))
    out = tmp_path / "study"
    proc = run_study_process(spec, out)
    # Kill -9 the process training pickup/rims/s0 once it has written a checkpoint.
    victim = out / "runs" / "pickup" / "rims" / "s0"
    deadline = time.time() + 120
    killed_at = None
    while time.time() < deadline and proc.poll() is None:
        ckpts = list((victim / CHECKPOINT_DIR).glob("step_*.zip"))
        pid = (victim / LOCK_FILE).read_text().strip() if (victim / LOCK_FILE).is_file() else ""
        if ckpts and pid and not (victim / FINAL_MODEL).exists():
            os.kill(int(pid), signal.SIGKILL)
            killed_at = max(checkpoint_step(c) for c in ckpts)
            break
        time.sleep(0.05)
    output, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, output
    assert killed_at is not None and killed_at < steps, output

    state = json.loads((out / "study.json").read_text())
    runs = state["runs"]
    assert len(runs) == 4 and all(r["state"] == "finished" and r["evaluated"] for r in runs.values())
    killed = runs["pickup/rims/s0"]
    assert killed["attempts"] == 2 and len(killed["errors"]) == 1, killed  # recorded, then retried
    assert "FAILED pickup/rims/s0" in output and "retrying from its checkpoint" in output
    # The retry resumed from the checkpoint: train.py's record says so and the model has every step.
    assert "resume:" in (victim / "command.txt").read_text()
    for r in runs.values():
        assert checkpoint_step(Path(r["run_dir"]) / FINAL_MODEL) == steps
    results = json.loads((out / "results" / "results.json").read_text())
    assert len(results["checkpoints"]) == 4
    assert {s for c in results["checkpoints"] for s in c["shifts"]} == {"none", "novel-distractors"}
    table = (out / "results" / "table.md").read_text()
    assert "| rims | 2 |" in table and "| lstm | 2 |" in table
    assert (out / "results" / "curves_pickup.png").stat().st_size > 0
    # The curves' points are kept beside the figure, equal to each run's progress CSVs.
    with (out / "results" / "curves_pickup.csv").open(newline="") as f:
        points = list(csv.DictReader(f))
    assert {(r["variant"], r["seed"]) for r in points} == {(v, s) for v in ("rims", "lstm") for s in ("0", "1")}
    mine = [r for r in points if (r["variant"], r["seed"]) == ("rims", "0")]
    expected = progress_points(victim, mine[0]["column"])
    assert [(int(r["steps"]), float(r["value"])) for r in mine] == [
        (step, pytest.approx(value, rel=1e-5)) for step, value in expected
    ]
    assert (out / "results" / "runs.csv").read_text().count("\n") == 1 + 4 * 2  # a row per run and shift

    # Started again: nothing is trained (no attempt, no model rewritten), the results are the same.
    models = {p: p.stat().st_mtime_ns for p in out.glob(f"runs/*/*/*/{FINAL_MODEL}")}
    proc = run_study_process(spec, out)
    output, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, output
    assert "trained " not in output
    again = json.loads((out / "study.json").read_text())["runs"]
    assert {k: r["attempts"] for k, r in again.items()} == {k: r["attempts"] for k, r in runs.items()}
    assert {p: p.stat().st_mtime_ns for p in models} == models
    assert json.loads((out / "results" / "results.json").read_text())["checkpoints"] == results["checkpoints"]

    # A narrowed start (one variant) keeps every run in study.json and the results; --results-only
    # rewrites the results from what was evaluated, without Ray.
    done = subprocess.run(
        [sys.executable, str(ROOT / "study.py"), str(spec), "--out", str(out), "--variants", "lstm", "--seeds", "1"],
        cwd=ROOT, env={**os.environ, "RAY_AUTH_MODE": "disabled"}, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    assert set(json.loads((out / "study.json").read_text())["runs"]) == set(runs)
    assert len(json.loads((out / "results" / "results.json").read_text())["checkpoints"]) == 4
    (out / "results" / "results.json").unlink()
    assert study_main([str(spec), "--out", str(out), "--results-only"]) == 0
    assert json.loads((out / "results" / "results.json").read_text())["checkpoints"] == results["checkpoints"]

    # evaluate.py on the study folder, with the study's settings, gives the same tables.
    ev = tmp_path / "eval"
    cmd = [sys.executable, str(ROOT / "evaluate.py"), str(out), "--shifts", "none,novel-distractors"]
    cmd += ["--episodes", "4", "--seed", "1000000", "--out", str(ev), "--no-tensorboard", "--no-progress"]
    subprocess.run(cmd, cwd=ROOT, check=True, capture_output=True)
    assert (ev / "results.csv").read_text() == (out / "results" / "results.csv").read_text()


def test_a_study_folder_holding_other_settings_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "study"
    run = out / "runs" / "pickup" / "rims" / "s0"
    run.mkdir(parents=True)
    spec = spec_from_dict(tiny_spec())
    config = plan_runs(spec, out)[0].config
    config.ppo.learning_rate = 0.5
    (run / "config.yaml").write_text(yaml.safe_dump(config.to_dict()))
    path = write_spec(tmp_path, tiny_spec())
    assert study_main([str(path), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "holds a run with other settings (ppo.learning_rate differ)" in err
    assert not (out / "study.json").exists()


def fake_finished_run(run_dir: Path, config: object, steps: int) -> None:
    """A run folder as train.py leaves it, as far as a study reads it: its config and a final model."""
    run_dir.mkdir(parents=True)
    (run_dir / "config.yaml").write_text(yaml.safe_dump(config.to_dict()))  # type: ignore[attr-defined]
    with zipfile.ZipFile(run_dir / FINAL_MODEL, "w") as archive:
        archive.writestr("data", json.dumps({"num_timesteps": steps}))
    run_dir.with_name(f"{run_dir.name}.log").write_text("trained\n")


def test_a_study_reuses_what_another_study_trained_with_the_same_settings_only(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """The robustness study evaluates the learning study's runs under more shifts without training
    them again: a run is linked when settings, seed and budget are equal, whatever its name there."""
    source_spec = spec_from_dict(tiny_spec(128))
    src = tmp_path / "learning"
    (src / "study.json").parent.mkdir(parents=True)
    (src / "study.json").write_text("{}")
    by_key = {p.key: p for p in plan_runs(source_spec, src)}
    fake_finished_run(src / "runs" / "room" / "rnn" / "s0", by_key["pickup/lstm/s0"].config, 128)  # renamed there
    short = by_key["pickup/rims/s0"].config
    short.total_timesteps = 64  # another budget
    fake_finished_run(by_key["pickup/rims/s0"].run_dir, short, 64)
    stopped = by_key["pickup/lstm/s0"].run_dir
    fake_finished_run(stopped, by_key["pickup/lstm/s0"].config, 96)  # stopped before its budget (a model at 96)
    fake_finished_run(by_key["pickup/rims/s1"].run_dir, by_key["pickup/rims/s1"].config, 136)  # overshot
    other = by_key["pickup/lstm/s1"].config
    other.ppo.learning_rate = 0.5  # other settings
    fake_finished_run(by_key["pickup/lstm/s1"].run_dir, other, 128)
    (by_key["pickup/rims/s1"].run_dir.parent / "s2").mkdir()  # an unfinished run: no model, not linked

    # The source's cached evaluation of pickup/rims/s1, as evaluate_run writes it.
    evaluation = env_evaluation(source_spec, source_spec.envs[0])
    cache_key = {"model": str(by_key["pickup/rims/s1"].run_dir / FINAL_MODEL), "steps": 136}
    cache_key["settings"] = dataclasses.asdict(evaluation)
    cached = {"key": cache_key, "result": {"name": "cached there"}}
    by_key["pickup/rims/s1"].evaluation_file.parent.mkdir(parents=True)
    by_key["pickup/rims/s1"].evaluation_file.write_text(json.dumps(cached))

    out = tmp_path / "robustness"
    plans = plan_runs(spec_from_dict(tiny_spec(128)), out)
    linked = reuse_runs(plans, [src])
    assert linked == {
        "pickup/lstm/s0": (src / "runs" / "room" / "rnn" / "s0").resolve(),
        "pickup/rims/s1": by_key["pickup/rims/s1"].run_dir.resolve(),
    }
    for plan in plans:
        assert plan.run_dir.is_symlink() == (plan.key in linked)
    assert (plans[1].run_dir.parent / "s0.log").read_text() == "trained\n"
    check_links(plans)  # every link is finished at this budget
    # The linked run's evaluation comes with it and is used (its stub model could not be evaluated)
    # while the model and the settings are the same; other settings evaluate again.
    here = {p.key: p for p in plans}["pickup/rims/s1"]
    assert evaluate_run(str(here.run_dir), evaluation, str(here.evaluation_file)) == {"name": "cached there"}
    assert not {p.key: p for p in plans}["pickup/lstm/s0"].evaluation_file.exists()  # none there to copy
    with pytest.raises(Exception):  # noqa: B017 (the stub is no model: evaluating it fails)
        evaluate_run(str(here.run_dir), dataclasses.replace(evaluation, episodes=3), str(here.evaluation_file))
    assert reuse_runs(plans, [src]) == {}  # started again: nothing new, nothing replaced

    # A larger budget for the same folder: the linked run is not trained here, the start is refused.
    with pytest.raises(UsageError, match=r"linked from another study .* not trained to 256 steps"):
        check_links(plan_runs(spec_from_dict(tiny_spec(256)), out))
    # --reuse of a folder that is no study: one line, exit 2, no study folder made.
    spec = write_spec(tmp_path, tiny_spec(128))
    assert study_main([str(spec), "--out", str(tmp_path / "new"), "--reuse", str(tmp_path / "nothing")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "is not a study folder" in err
    assert not (tmp_path / "new").exists()


def test_tuning_gives_each_variant_its_own_best_settings_from_the_tuning_seeds(tmp_path: Path) -> None:
    data = tiny_spec(64)
    data["variants"] = {"lstm": {"core": "lstm"}}
    data["seeds"] = [0]
    data["evaluation"] = {"shifts": ["none"], "episodes": 2}
    data["tune"] = {
        "seeds": [100],
        "episodes": 2,
        "space": {"ppo.learning_rate": {"loguniform": [1.0e-4, 1.0e-3]}, "ppo.n_epochs": {"choice": [1, 2]}},
    }
    out = tmp_path / "study"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "RAY_AUTH_MODE": "disabled"}
    cmd = [sys.executable, str(ROOT / "study.py"), str(write_spec(tmp_path, data)), "--out", str(out), "--tune", "2"]
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    record = json.loads((out / "tune" / "tuning.json").read_text())["pickup/lstm"]
    assert record["trials"] == 2 and len(record["results"]) == 2 and record["seeds"] == [100]
    best = record["results"][0]
    assert best["score"] == max(r["score"] for r in record["results"])
    # The trials trained on the tuning seed only; the reported run uses the best trial's settings.
    trial_configs = [yaml.safe_load(p.read_text()) for p in out.glob("tune/pickup/lstm/t*/s*/config.yaml")]
    assert len(trial_configs) == 2 and {c["seed"] for c in trial_configs} == {100}
    final = yaml.safe_load((out / "runs" / "pickup" / "lstm" / "s0" / "config.yaml").read_text())
    assert final["seed"] == 0
    assert final["ppo"]["learning_rate"] == pytest.approx(best["params"]["ppo.learning_rate"])
    assert final["ppo"]["n_epochs"] == best["params"]["ppo.n_epochs"]


def test_a_study_can_be_narrowed_to_some_envs_variants_and_seeds() -> None:
    from rim_agents.study import narrow

    data = tiny_spec()
    data["variants"]["rims-all-active"] = {"core": "rims", "overrides": ["rims.k_active=4"], "seeds": [0, 1]}
    spec = narrow(spec_from_dict(data), "pickup", "lstm,rims-all-active", "1")
    assert [v.name for v in spec.variants] == ["lstm", "rims-all-active"]
    assert spec.seeds == (1,) and spec.variants[1].seeds == (1,)
    with pytest.raises(UsageError, match="--variants: 'gru' is not in the spec"):
        narrow(spec_from_dict(data), variants="gru")
    with pytest.raises(UsageError, match="--envs: 'breakout' is not in the spec"):
        narrow(spec_from_dict(data), envs="breakout")


def test_a_narrowed_start_counts_and_fails_on_its_own_runs_only(tmp_path: Path) -> None:
    from rim_agents.study import Progress, StudyState, narrow

    spec = spec_from_dict(tiny_spec())
    first = StudyState(tmp_path, spec, plan_runs(spec, tmp_path))
    first.run("pickup/rims/s0")["state"] = "failed"  # an earlier start's run, not planned below
    first.save()
    narrowed = narrow(spec, variants="lstm", seeds="1")
    state = StudyState(tmp_path, narrowed, plan_runs(narrowed, tmp_path))
    assert len(state.data["runs"]) == 4  # every entry is kept
    assert state.counts() == {"pending": 1, "running": 0, "finished": 0, "failed": 0, "evaluated": 0}
    lines: list[str] = []
    Progress(state, 1, write=lines.append).tick(force=True)
    assert "0/1 trained, 0 running, 0 failed, 0/1 evaluated" in lines[0]


def test_a_relative_bar_compares_with_the_named_variant_on_the_same_seed() -> None:
    bar = Bar("return", min=0.8, of="none")
    assert bar.passes(8.0, reference=10.0) and not bar.passes(7.9, reference=10.0)
    assert not bar.passes(100.0, reference=None)  # no reference run: not passed
    assert bar.text() == "return >= 0.8x none's on 100% of seeds"


def test_a_second_study_process_on_one_folder_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from rim_agents.runs import RunLock

    out = tmp_path / "study"
    out.mkdir()
    held = RunLock(out, "study.py").acquire()  # as a running study.py holds it
    try:
        assert study_main([str(write_spec(tmp_path, tiny_spec())), "--out", str(out)]) == 2
    finally:
        held.release()
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: folder {out} is in use by another study.py (pid ")
    assert err.endswith("wait for it to finish or give the study another --out")
    assert not (out / "study.json").exists() and not (out / "runs").exists()


def test_a_variant_may_have_several_bars_and_train_return_reads_the_training_curve(tmp_path: Path) -> None:
    from rim_agents.evaluation import CheckpointResult
    from rim_agents.study import _passes, _reference_present, _score

    data = tiny_spec()
    data["envs"]["pickup"]["bars"] = {
        "rims": [{"metric": "train_return", "min": 5}, {"metric": "train_return", "min": 0.8, "of": "lstm"}]
    }
    spec = spec_from_dict(data)
    bars = spec.envs[0].bar("rims", "rims")
    assert len(bars) == 2 and spec.envs[0].bar("lstm", "lstm") == ()
    plans = {p.key: p for p in plan_runs(spec, tmp_path)}
    results = {}
    for key, value in (("pickup/rims/s0", 9.0), ("pickup/lstm/s0", 10.0), ("pickup/rims/s1", 7.0)):
        tb = tmp_path / key / "tb"
        tb.mkdir(parents=True)
        rows = "time/total_timesteps,rollout/ep_rew_mean\n64,1.0\n128," + str(value) + "\n"
        (tb / "progress.csv").write_text(rows)
        results[key] = CheckpointResult("m", str(tmp_path / key), "e", "rims", 0, 128, "g")
    assert _score(results["pickup/rims/s0"], "train_return") == 9.0  # the last logged value
    mine = [(plans[k], r) for k, r in results.items()]
    assert all(_passes(b, plans["pickup/rims/s0"], results["pickup/rims/s0"], mine) for b in bars)  # 9 >= 5, >= 8
    # seed 1 has no lstm run to compare with: the relative bar is not passed, and the table says why
    assert not all(_passes(b, plans["pickup/rims/s1"], results["pickup/rims/s1"], mine) for b in bars)
    assert _reference_present(bars[1], plans["pickup/rims/s0"], mine)
    assert not _reference_present(bars[1], plans["pickup/rims/s1"], mine) and _reference_present(
        bars[0], plans["pickup/rims/s1"], mine
    )


def test_a_relative_bar_against_a_return_of_zero_or_below_is_not_passed_and_the_table_says_why(
    tmp_path: Path,
) -> None:
    from rim_agents.evaluation import CheckpointResult
    from rim_agents.study import Bar, variants_table

    # Pendulum-like returns: 0.8x of -1000 is -800, which would ask the run to beat the reference.
    bar = Bar(metric="train_return", min=0.8, of="none")
    assert not bar.passes(-900.0, -1000.0) and not bar.passes(5.0, 0.0)
    assert bar.passes(9.0, 10.0) and not bar.passes(7.0, 10.0)
    data = tiny_spec()
    data["variants"] = {"none": {"core": "none"}, "rims": {"core": "rims"}}
    data["envs"]["pickup"]["bars"] = {"rims": {"metric": "train_return", "min": 0.8, "of": "none"}}
    spec = spec_from_dict(data)
    entries = []
    values = {("none", 0): 10.0, ("rims", 0): 9.0, ("none", 1): -1000.0, ("rims", 1): -900.0}
    for p in plan_runs(spec, tmp_path):
        tb = p.run_dir / "tb"
        tb.mkdir(parents=True)
        value = values[(p.variant.name, p.seed)]
        (tb / "progress.csv").write_text(f"time/total_timesteps,rollout/ep_rew_mean\n128,{value}\n")
        entries.append((p, CheckpointResult("m", str(p.run_dir), "e", p.variant.core, p.seed, 128, "g")))
    summary: list[dict] = []
    table = variants_table(spec, entries, summary)
    rims = next(row for row in summary if row["variant"] == "rims")
    assert rims["passing"] == 1 and rims["reference_not_positive"] == [1]
    assert "1/2 missed" in table and "the reference is not positive on seed 1" in table


def test_training_time_is_read_from_the_runs_own_logs_every_resume_included(tmp_path: Path) -> None:
    from rim_agents.runs import train_seconds

    tb = tmp_path / "tb"
    tb.mkdir()
    (tb / "progress.csv").write_text("time/total_timesteps,time/time_elapsed\n64,40\n128,100\n")
    (tb / "progress_resume128.csv").write_text("time/total_timesteps,time/time_elapsed\n192,50\n")
    assert train_seconds(tmp_path) == 150.0
    assert train_seconds(tmp_path / "missing") is None


def test_tables_show_the_metric_the_bars_judge_not_a_success_rate_the_env_happens_to_report(tmp_path: Path) -> None:
    from rim_agents.evaluation import CheckpointResult, ShiftResult
    from rim_agents.study import variants_table

    data = tiny_spec()
    data["envs"]["pickup"]["bars"] = {"default": {"metric": "return", "min": 0.9, "need": 1.0}}
    spec = spec_from_dict(data)
    entries = []
    for p in plan_runs(spec, tmp_path):
        shift = ShiftResult(10, 0.95, [0.9, 1.0], 0.0, [0.0, 0.0], 24.0, [0.95] * 10, 0.0, 0.0)
        entries.append(
            (p, CheckpointResult("m", str(p.run_dir), "e", p.variant.core, p.seed, 128, "g", {"none": shift}))
        )
    summary: list[dict] = []
    table = variants_table(spec, entries, summary)
    assert "## pickup (RIMAgents/Pickup-6x6-v0): return" in table
    assert "| rims | 2 | 0.95 [0.95, 0.95] | 2/2 met" in table  # the return, not the success rate 0.00
    assert summary[0]["values"] == {"0": 0.95, "1": 0.95} and summary[0]["met"]


def test_the_readmes_spec_example_is_a_valid_spec(tmp_path: Path) -> None:
    text = (ROOT / "README.md").read_text()
    block = text[text.index("name: pickup-robustness  ") :]
    spec = spec_from_dict(yaml.safe_load(block[: block.index("```")]))
    assert spec.tune is not None and spec.gpus_per_run == 0.25
    assert len(plan_runs(spec, tmp_path)) == 10 + 5


def test_every_env_kwarg_of_a_spec_reaches_the_runs_config(tmp_path: Path) -> None:
    data = tiny_spec()
    data["envs"] = {"repeat-8": {"env": "RIMAgents/Repeat-v0", "env_kwargs": {"delay": 8, "length": 24}}}
    plans = plan_runs(spec_from_dict(data), tmp_path)
    assert {str(p.config.env_options.env_kwargs) for p in plans} == {"{'delay': 8, 'length': 24}"}


def test_the_eta_counts_what_running_runs_have_spent(tmp_path: Path) -> None:
    from rim_agents.study import Progress, StudyState

    spec = spec_from_dict(tiny_spec())
    progress = Progress(StudyState(tmp_path, spec, plan_runs(spec, tmp_path)), parallel=2)
    progress.walls = [600.0, 1800.0]  # mean 20 min
    # two running, 5 and 15 min in, three pending: (15 + 5 + 3 * 20) / 2 = 40 min
    assert progress.eta_minutes(3, [300.0, 900.0]) == (pytest.approx(40.0), False)
    # one running past the mean: it is counted as done, and the figure is flagged as a lower bound
    assert progress.eta_minutes(0, [1500.0]) == (pytest.approx(0.0), True)
    assert progress.eta_minutes(1, [0.0, 0.0]) == (pytest.approx(30.0), False)


def test_runs_csv_names_each_variant_and_pairs_them_by_seed(tmp_path: Path) -> None:
    import csv
    import io

    from rim_agents.evaluation import CheckpointResult, ShiftResult
    from rim_agents.study import runs_csv

    sys.path.insert(0, str(ROOT / "benchmarks"))
    from paired_difference import paired_differences

    data = tiny_spec(
        variants={"rims": {"core": "rims"}, "rims-all-active": {"core": "rims", "overrides": ["rims.k_active=4"]}}
    )
    spec = spec_from_dict(data)
    entries = []
    for p in plan_runs(spec, tmp_path):
        success = 0.5 + 0.1 * p.seed + (0.2 if p.variant.name == "rims" else 0.0)  # rims ahead by 0.2 on every seed
        shift = ShiftResult(4, success, [0.0, 1.0], success, None, 10.0, [success] * 4, 0.0, None)
        entries.append(
            (p, CheckpointResult("m.zip", str(p.run_dir), p.env.env, "rims", p.seed, 128, "g", {"none": shift}))
        )
    rows = list(csv.DictReader(io.StringIO(runs_csv(entries))))
    assert [(r["variant"], r["core"], r["seed"], r["shift"]) for r in rows] == [
        (p.variant.name, "rims", str(p.seed), "none") for p, _ in entries
    ]
    mean, low, high, seeds = paired_differences(rows, "rims-all-active")[("rims", "none")]
    assert seeds == 2 and mean == pytest.approx(0.2) and low == pytest.approx(0.2) and high == pytest.approx(0.2)
    # Named by core only (evaluate.py's results.csv), the two variants cannot be told apart: refused.
    with pytest.raises(ValueError, match="two runs of 'rims' on seed 0 under 'none'"):
        paired_differences([{k: v for k, v in r.items() if k != "variant"} for r in rows], "none")


def test_ray_that_does_not_start_is_one_line_and_leaves_no_results(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    """On a busy machine Ray's local node can time out while starting: the study says so in one line
    (exit 1: not the user's input), trains nothing and writes no results."""
    import ray

    def init(**kwargs: object) -> None:
        raise Exception(
            "The current node timed out during startup. This could happen because some of the raylet "
            "failed to startup or the GCS has become overloaded."
        )

    monkeypatch.setattr(ray, "init", init)
    out = tmp_path / "study"
    assert study_main([str(write_spec(tmp_path, tiny_spec(64))), "--out", str(out)]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert "Ray did not start" in err and "timed out during startup" in err and "run the same command again" in err
    assert not (out / "runs").exists() and not (out / "results").exists()
