"""Config loading and validation: defaults == configs/default.toml, every shipped config loads,
and bad input is rejected (UserError naming the key) before any compute."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from learned_opt.errors import UserError
from outer_train.cli import main
from outer_train.config import (
    EstimatorConfig,
    MetaTrainConfig,
    apply_overrides,
    config_from_dict,
    load_config,
    parse_override,
    to_toml,
)

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


def test_default_toml_is_the_dataclass_defaults():
    # The defaults are the embedded copy of configs/default.toml (works when installed
    # non-editable); the two must not drift apart.
    assert load_config(CONFIGS / "default.toml") == MetaTrainConfig()
    assert load_config() == MetaTrainConfig()


def test_default_toml_is_written_in_full():
    # Every key that applies is spelled out, so the file documents the default job.
    assert tomllib.loads((CONFIGS / "default.toml").read_text()) == tomllib.loads(
        to_toml(MetaTrainConfig())
    )


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.toml")), ids=lambda p: p.name)
def test_every_shipped_config_is_valid(path):
    config = load_config(path)
    assert isinstance(config, MetaTrainConfig)
    assert config_from_dict(tomllib.loads(to_toml(config))) == config  # round trip


def test_one_config_per_estimator_on_the_same_workload():
    from outer_train.estimators import ESTIMATORS

    by_estimator = {name: load_config(CONFIGS / f"{name}.toml") for name in ESTIMATORS}
    assert all(c.estimator.name == name for name, c in by_estimator.items())
    workloads = {(c.task, c.lopt, c.problem) for c in by_estimator.values()}
    assert len(workloads) == 1
    family = [load_config(p) for p in CONFIGS.glob("*.toml")]
    assert any(c.task.kind == "family" for c in family)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["estimator.foo=1"], "unknown key 'estimator.foo' in [estimator]; allowed keys: name"),
        (["nosuch.key=1"], "unknown section 'nosuch'"),
        (["run.seed=1.5"], "run.seed = 1.5: expected an integer"),
        (["run.seed=true"], "run.seed = True: expected an integer"),
        (["run.seed=-1"], "run.seed = -1 is out of range: allowed [0, 2147483647]"),
        (["estimator.sigma=-0.1"], "estimator.sigma = -0.1 is out of range"),
        (["estimator.sigma=0"], "sigma must be a number > 0"),
        (["meta_opt.learning_rate=0"], "meta_opt.learning_rate = 0.0 is out of range: allowed (0"),
        (["estimator.name=sgd"], "estimator.name = 'sgd': expected one of 'full_bptt'"),
        (["task.hidden_sizes=[32, 0]"], "task.hidden_sizes = [32, 0]"),
        (["task.hidden_sizes=32"], "task.hidden_sizes = 32: expected a list of"),
        (["estimator.trunc_length=300"], "shorter than trunc_length 300"),
        (["estimator.name=tbptt", "estimator.sigma=0.1"],
         "estimator.sigma is not a knob of estimator 'tbptt'"),
        (["lopt.name=learned_sgd", "lopt.hidden_sizes=[4]"], "lopt.hidden_sizes applies to"),
        (["task.kind=family", "family.widths=[8]"], "[family] held-out pair"),
        (["family.heldout_pairs=[[16, 3]]"], "family.heldout_pairs[0][1] = 3: expected a string"),
        (["eval.adam_learning_rates=[]"], "eval.adam_learning_rates = []"),
        (["run.seed"], "expected section.key=value"),
        (["seed=1"], "the key must be section.key"),
    ],
)
def test_bad_values_are_rejected_with_the_key_named(overrides, message):
    with pytest.raises(UserError) as e:
        load_config(None, overrides)
    assert message in str(e.value)


def test_full_bptt_sigma_unset_means_plain_backprop():
    # full_bptt's sigma is a smoothing (reparameterization gradient), not ES noise: the ES
    # default 0.01 must not turn "full backprop" into a smoothed estimator
    assert load_config(None, ["estimator.name=full_bptt"]).estimator.knobs()["sigma"] == 0.0
    smoothed = load_config(None, ["estimator.name=full_bptt", "estimator.sigma=0.02"])
    assert smoothed.estimator.knobs()["sigma"] == 0.02
    assert load_config(None, ["estimator.name=pes"]).estimator.sigma == 0.01


def test_unknown_top_level_table(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text("[estimatr]\nname = 'pes'\n")
    with pytest.raises(UserError, match="unknown key 'estimatr' in the top level"):
        load_config(path)


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(UserError, match="not found"):
        load_config(tmp_path / "nope.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("[run\nseed = 1\n")
    with pytest.raises(UserError, match="not valid TOML"):
        load_config(bad)


def test_overrides_parse_toml_values_and_bare_words():
    assert parse_override("estimator.sigma=0.003") == (["estimator", "sigma"], 0.003)
    assert parse_override("task.hidden_sizes=[16, 16]") == (["task", "hidden_sizes"], [16, 16])
    assert parse_override("estimator.name=nres") == (["estimator", "name"], "nres")
    assert parse_override("estimator.name='nres'") == (["estimator", "name"], "nres")
    data = apply_overrides({"run": {"seed": 3}}, ["run.num_outer_steps=7"])
    assert data == {"run": {"seed": 3, "num_outer_steps": 7}}
    config = load_config(None, ["estimator.name=tbptt", "estimator.trunc_length=5"])
    assert config.estimator.name == "tbptt"
    assert config.estimator.knobs() == {
        "num_tasks": 8, "trunc_length": 5, "horizon": 200, "staggered": True,
        "segment_length": None,
    }
    # An int where a float is expected is fine (TOML writes 1 for 1.0).
    assert load_config(None, ["meta_opt.clip_norm=2"]).meta_opt.clip_norm == 2.0


def test_estimator_knobs_map_onto_the_estimator():
    assert EstimatorConfig(name="full_bptt").knobs()["segment_length"] is None
    assert EstimatorConfig(name="full_bptt", segment_length=20).knobs()["segment_length"] == 20


def test_trajectory_hash_ignores_run_length_but_not_seed_or_estimator():
    base = load_config()
    same = load_config(None, ["run.num_outer_steps=5", "eval.every=1", "checkpoint.keep=9"])
    assert base.trajectory_hash() == same.trajectory_hash()
    for override in ("run.seed=1", "estimator.sigma=0.02", "meta_opt.learning_rate=0.1"):
        assert load_config(None, [override]).trajectory_hash() != base.trajectory_hash()


def test_cli_rejects_a_bad_config_before_compute(tmp_path, capsys):
    out = tmp_path / "run"
    code = main(["meta-train", "--out", str(out), "--set", "estimator.num_tasks=0"])
    assert code == 2
    err = capsys.readouterr().err
    assert "estimator.num_tasks = 0 is out of range" in err
    assert not out.exists()  # nothing was built or written
