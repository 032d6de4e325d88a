"""Configuration: layering, strict keys and types, schedules."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest
import torch as th
from stable_baselines3.common.utils import LinearSchedule

from rim_agents.config import CONFIG_DIR, ConfigError, env_family, load_config, parse_override, read_yaml
from rim_agents.models import schedule


def test_family_defaults_and_core_sections() -> None:
    rims = load_config("BreakoutNoFrameskip-v4", "rims")
    lstm = load_config("BreakoutNoFrameskip-v4", "lstm")
    # The zoo recipe, shared by every core.
    for cfg in (rims, lstm):
        assert (cfg.n_envs, cfg.ppo.n_steps, cfg.ppo.batch_size, cfg.ppo.n_epochs) == (8, 128, 256, 4)
        assert (cfg.ppo.learning_rate, cfg.ppo.clip_range) == ("lin_2.5e-4", "lin_0.1")
        assert (cfg.ppo.ent_coef, cfg.ppo.vf_coef, cfg.policy.enable_critic_lstm) == (0.01, 0.5, False)
    assert rims.ppo == lstm.ppo and rims.env_options == lstm.env_options
    assert (rims.rims.num_units, rims.rims.k_active, rims.rims.unit_size) == (6, 5, 85)
    assert lstm.policy.lstm_hidden_size == 128


@pytest.mark.parametrize("family", ["atari", "minigrid", "classic"])
def test_every_core_shares_every_ppo_setting(family: str) -> None:
    env = {"atari": "PongNoFrameskip-v4", "minigrid": "RIMAgents/Pickup-8x8-v0", "classic": "CartPole-v1"}[family]
    configs = [load_config(env, core) for core in ("rims", "lstm", "gru")]
    for cfg in configs[1:]:
        assert cfg.ppo == configs[0].ppo
        assert cfg.n_envs == configs[0].n_envs and cfg.total_timesteps == configs[0].total_timesteps
        assert cfg.env_options == configs[0].env_options
        assert cfg.policy.features_extractor == configs[0].policy.features_extractor
        assert cfg.policy.net_arch == configs[0].policy.net_arch
        assert cfg.policy.enable_critic_lstm == configs[0].policy.enable_critic_lstm


def test_every_config_file_loads_strictly() -> None:
    """Every family file, with every core section, goes through the strict loader and validation."""
    from rim_agents.config import CORES, TrainConfig, apply_layer, validate

    files = sorted(CONFIG_DIR.glob("*.yaml"))
    assert {f.stem for f in files} >= {"atari", "minigrid", "classic"}
    for f in files:
        data = read_yaml(f)
        assert set(data.get("cores", {})) <= set(CORES), f
        for core in CORES:
            config = TrainConfig(env="CartPole-v1", core=core)
            apply_layer(config, data, core)  # unknown keys or wrong types raise
            validate(config)
    # The loader is strict: a misspelt key in a family file would raise.
    with pytest.raises(ConfigError, match=r"unknown config key 'ppo\.n_step'"):
        apply_layer(TrainConfig(), {"ppo": {"n_step": 8}})


def test_precedence_defaults_yaml_file_flags_overrides(tmp_path: Path) -> None:
    user = tmp_path / "user.yaml"
    user.write_text("seed: 5\nppo:\n  n_epochs: 3\n  learning_rate: 3e-4\nrims:\n  k_active: 3\n")
    cfg = load_config("CartPole-v1", "rims", user, ["ppo.n_epochs=7", "rims.cell=gru"], {"seed": 9, "n_envs": None})
    assert cfg.ppo.n_epochs == 7  # override beats file
    assert cfg.seed == 9  # flag beats file
    assert cfg.ppo.learning_rate == 3e-4  # YAML's "3e-4" string read as a float
    assert cfg.rims.k_active == 3 and cfg.rims.cell == "gru"
    assert cfg.n_envs == 8  # family default kept when the flag is not given
    assert cfg.ppo.n_steps == 64  # family file


def test_env_and_core_from_file_or_overrides(tmp_path: Path) -> None:
    user = tmp_path / "user.yaml"
    user.write_text("env: CartPole-v1\ncore: gru\n")
    cfg = load_config(config_file=user)
    assert (cfg.env, cfg.core) == ("CartPole-v1", "gru")
    assert cfg.policy.lstm_hidden_size == 64  # classic.yaml's gru section applied
    assert load_config(overrides=["env=CartPole-v1", "core=lstm"]).core == "lstm"


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        (["ppo.bogus=1"], "unknown config key 'ppo.bogus'"),
        (["bogus=1"], "unknown config key 'bogus'"),
        (["ppo.n_epochs=abc"], "ppo.n_epochs: 'abc' is not a valid int"),
        (["ppo.n_epochs=2.5"], "ppo.n_epochs: 2.5 is not a valid int"),
        (["rims.communication=maybe"], "rims.communication: 'maybe' is not a valid bool"),
        (["ppo.learning_rate=fast"], "ppo.learning_rate: 'fast' is not a number or 'lin_<number>'"),
        (["rims.k_active=9"], "k_active=9"),
        (["ppo.seq_len=5"], "ppo.seq_len=5 must be a positive divisor"),
        (["policy.features_extractor=resnet"], "unknown policy.features_extractor 'resnet'"),
        (["ppo=3"], "config section ppo must be a mapping"),
        (["n_envs"], "is not KEY=VALUE"),
        (["device=tpu"], "device 'tpu'"),
        (["allocator=jemalloc"], "allocator='jemalloc' is invalid: choose one of retain, system"),
    ],
)
def test_bad_values_are_errors(overrides: list[str], match: str) -> None:
    """``load_config`` checks the config itself; ``check_config`` what needs the rest of the package
    (RIM settings, extractor names); ``train`` runs both before it writes anything."""
    from rim_agents.models import check_config

    with pytest.raises(ConfigError, match=match):
        check_config(load_config("CartPole-v1", "rims", overrides=overrides))


def test_missing_and_broken_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_config("CartPole-v1", config_file=tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("ppo: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config("CartPole-v1", config_file=bad)
    listy = tmp_path / "list.yaml"
    listy.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="must hold a mapping"):
        load_config("CartPole-v1", config_file=listy)


def test_no_env_and_unknown_core() -> None:
    with pytest.raises(ConfigError, match="no environment given"):
        load_config()
    with pytest.raises(ConfigError, match="unknown core 'mamba'"):
        load_config("CartPole-v1", "mamba")


def test_parse_override_nesting_and_yaml_values() -> None:
    assert parse_override("rims.k_active=5") == {"rims": {"k_active": 5}}
    assert parse_override("policy.net_arch=[64, 64]") == {"policy": {"net_arch": [64, 64]}}
    assert parse_override("ppo.target_kl=null") == {"ppo": {"target_kl": None}}


def test_schedules() -> None:
    lin = schedule("lin_2.5e-4")
    assert isinstance(lin, LinearSchedule)
    assert lin(1.0) == pytest.approx(2.5e-4) and lin(0.5) == pytest.approx(1.25e-4) and lin(0.0) == 0.0
    assert schedule(3e-4) == 3e-4


def test_env_family() -> None:
    assert env_family("BreakoutNoFrameskip-v4") == "atari"
    assert env_family("ALE/Pong-v5") == "atari"
    assert env_family("RIMAgents/Pickup-8x8-v0") == "minigrid"
    assert env_family("MiniGrid-Fetch-8x8-N3-v0") == "minigrid"
    assert env_family("CartPole-v1") == "classic"
    assert env_family("RIMAgents/CartPoleNoVel-v1") == "classic"


def test_configs_ship_inside_the_wheel(tmp_path: Path) -> None:
    """A wheel holds the family configs, and the installed copy loads them (no source tree)."""
    import subprocess
    import sys
    import zipfile

    root = Path(__file__).resolve().parent.parent
    build = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(tmp_path),
            str(root),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert build.returncode == 0, build.stderr[-800:]
    (wheel,) = tmp_path.glob("rim_agents-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert {f"rim_agents/configs/{f}.yaml" for f in ("atari", "minigrid", "classic", "paper_rule")} <= set(names)
    target = tmp_path / "site"
    install = [sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target), str(wheel)]
    assert subprocess.run(install, capture_output=True, timeout=300).returncode == 0
    code = (
        f"import rim_agents.config as c; assert c.CONFIG_DIR.is_relative_to({str(target)!r}), c.CONFIG_DIR; "
        "cfg = c.load_config('RIMAgents/Pickup-6x6-v0', 'rims'); "
        "assert cfg.policy.features_extractor == 'minigrid' and cfg.rims.num_units == 8"
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, timeout=120,
                         env={**__import__("os").environ, "PYTHONPATH": str(target)})  # fmt: skip
    assert run.returncode == 0, run.stderr[-800:]


def test_a_missing_family_config_is_an_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import rim_agents.config as config_module

    monkeypatch.setattr(config_module, "CONFIG_DIR", tmp_path)
    with pytest.raises(ConfigError, match=r"family config .*minigrid\.yaml is missing"):
        load_config("RIMAgents/Pickup-6x6-v0", "rims")


def test_identity_drops_run_only_settings() -> None:
    base = load_config("CartPole-v1", "rims")
    seeds = load_config(
        "CartPole-v1", "rims", overrides=["seed=7", "total_timesteps=5", "checkpoint_freq=0", "allocator=system"]
    )
    other = load_config("CartPole-v1", "rims", overrides=["rims.k_active=2"])
    assert seeds.identity() == base.identity() and other.identity() != base.identity()
    assert "seed" not in base.identity() and "rims" in base.identity()


@pytest.mark.parametrize("core", ["lstm", "gru", "none"])
def test_rim_settings_are_no_part_of_another_cores_identity(core: str) -> None:
    """A study pins RIM settings per env for every variant; the LSTM, GRU and feed-forward runs
    stay the same configuration (and reuse, resume and group as before)."""
    base = load_config("CartPole-v1", core)
    pinned = load_config("CartPole-v1", core, overrides=["rims.k_active=2", "rims.selection=hard"])
    assert pinned.rims != base.rims and pinned.identity() == base.identity()
    assert "rims" not in base.identity()
    other = load_config("CartPole-v1", core, overrides=["ppo.n_epochs=3"])
    assert other.identity() != base.identity()


def test_the_straight_through_gradient_form_is_part_of_the_identity_only_where_it_is_read(tmp_path: Path) -> None:
    """``st_state_gradient`` changes what a straight-through choice learns and nothing else; a run
    config written before the setting existed loads with it on, the form it trained with."""
    import yaml

    from rim_agents.runs import CONFIG_FILE, load_run_config

    st = load_config("CartPole-v1", "rims", overrides=["rims.selection=straight_through"])
    st_state = load_config(
        "CartPole-v1", "rims", overrides=["rims.selection=straight_through", "rims.st_state_gradient=true"]
    )
    assert not st.rims.st_state_gradient and st.identity() != st_state.identity()
    hard = load_config("CartPole-v1", "rims", overrides=["rims.selection=hard"])
    hard_state = load_config("CartPole-v1", "rims", overrides=["rims.selection=hard", "rims.st_state_gradient=true"])
    assert hard.identity() == hard_state.identity()
    for written, expected in ((st, False), (st_state, True)):
        data = written.to_dict()
        (tmp_path / CONFIG_FILE).write_text(yaml.safe_dump(data))
        assert load_run_config(tmp_path).rims.st_state_gradient is expected
        del data["rims"]["st_state_gradient"]  # as written before the setting existed
        (tmp_path / CONFIG_FILE).write_text(yaml.safe_dump(data))
        assert load_run_config(tmp_path).identity() == st_state.identity()


def test_overrides_of_one_mapping_combine_key_by_key() -> None:
    from rim_agents.config import load_config

    config = load_config(
        "RIMAgents/Repeat-v0", "lstm", overrides=["env_options.env_kwargs.delay=8", "env_options.env_kwargs.length=24"]
    )
    assert config.env_options.env_kwargs == {"delay": 8, "length": 24}
    # a later value of the same key still wins, and nested mappings merge too
    config = load_config(
        "RIMAgents/Repeat-v0",
        "lstm",
        overrides=["env_options.env_kwargs.delay=8", "env_options.env_kwargs.delay=2", "env_options.env_kwargs.x.a=1",
                   "env_options.env_kwargs.x.b=2"],
    )  # fmt: skip
    assert config.env_options.env_kwargs == {"delay": 2, "x": {"a": 1, "b": 2}}


def test_optimizer_keywords_reach_the_policy() -> None:
    """``policy.optimizer_kwargs`` is passed to the policy, which adds Adam's eps and the fused kernel
    to what is not given (see ``rim_agents.policy._optimizer_kwargs``)."""
    from rim_agents.models import policy_kwargs
    from rim_agents.policy import _optimizer_kwargs

    config = load_config("BreakoutNoFrameskip-v4", "rims", overrides=["policy.optimizer_kwargs.fused=false"])
    assert policy_kwargs(config)["optimizer_kwargs"] == {"fused": False}
    assert policy_kwargs(load_config("BreakoutNoFrameskip-v4", "rims"))["optimizer_kwargs"] == {}
    assert _optimizer_kwargs(th.optim.Adam, None) == {"eps": 1e-5, "fused": True}
    assert _optimizer_kwargs(th.optim.Adam, {"eps": 1e-8, "fused": False}) == {"eps": 1e-8, "fused": False}
    assert _optimizer_kwargs(th.optim.AdamW, {"foreach": True}) == {"foreach": True}
    assert _optimizer_kwargs(th.optim.SGD, {"momentum": 0.9}) == {"momentum": 0.9}


def test_overrides_are_checked_together_not_one_by_one() -> None:
    """Fewer RIMs and fewer active ones, given in either order, are valid together although the first
    alone is not (Atari: 6 RIMs, 5 active); a pair that is invalid together is still refused."""
    default = load_config("BreakoutNoFrameskip-v4", "rims")
    assert (default.rims.num_units, default.rims.k_active) == (6, 5)
    for overrides in (["rims.num_units=4", "rims.k_active=3"], ["rims.k_active=3", "rims.num_units=4"]):
        config = load_config("BreakoutNoFrameskip-v4", "rims", overrides=overrides)
        assert (config.rims.num_units, config.rims.k_active) == (4, 3)
    overrides = ["rims.k_active=2", "rims.k_active=3", "rims.num_units=4"]
    assert load_config("BreakoutNoFrameskip-v4", "rims", overrides=overrides).rims.k_active == 3  # the later wins
    with pytest.raises(ConfigError, match=r"k_active=5 is invalid: .* num_units=4"):
        load_config("BreakoutNoFrameskip-v4", "rims", overrides=["rims.num_units=4", "rims.k_active=5"])


@pytest.mark.parametrize(
    ("env", "default"),
    [("CartPole-v1", (8, 7, "straight_through", 0.5)), ("RIMAgents/Pickup-6x6-v0", (8, 7, "straight_through", 0.5)),
     ("BreakoutNoFrameskip-v4", (6, 5, "hard", 0.0))],
)  # fmt: skip
def test_the_paper_rule_is_one_switch_away(env: str, default: tuple) -> None:
    """The classic and MiniGrid families train the choice (straight-through read from a detached
    state, k annealed from K); the shipped configs/paper_rule.yaml turns it back into the paper's
    hard top-k from the first step, keeping the family's RIMs; Atari already uses the paper's rule,
    which it leaves as it is."""
    rims = load_config(env, "rims").rims
    assert (rims.num_units, rims.k_active, rims.selection, rims.k_anneal) == default
    assert rims.st_state_gradient is False
    paper = load_config(env, "rims", CONFIG_DIR / "paper_rule.yaml").rims
    assert (paper.selection, paper.k_anneal) == ("hard", 0.0)
    assert dataclasses.replace(paper, selection=rims.selection, k_anneal=rims.k_anneal) == rims


def test_the_fast_yaml_parser_reads_every_shipped_file_as_pyyaml_does() -> None:
    """Configs and study specs are parsed with libyaml where PyYAML has it: the same documents as
    ``yaml.safe_load``'s, and an error still names its line and column."""
    import yaml

    from rim_agents.config import load_yaml, yaml_error_text

    files = sorted(CONFIG_DIR.rglob("*.yaml"))  # the family configs and configs/studies/ (configs/ links here)
    assert len(files) >= 5
    for path in files:
        text = path.read_text(encoding="utf-8")
        assert load_yaml(text) == yaml.safe_load(text), path
    for raw in ("1e-4", "[1, 2]", "{a: 1}", "true", "null", "lin_2.5e-4", "0.5"):
        assert load_yaml(raw) == yaml.safe_load(raw), raw
    with pytest.raises(yaml.YAMLError) as error:
        load_yaml("a: 1\nb: [2\n")
    assert re.search(r"at line \d+, column \d+$", yaml_error_text(error.value))
