"""``learned-opt compare`` end to end at tiny sizes: the files and their numbers against the run
directories, resume after a kill (finished runs skipped, same results), a failing arm that does
not stop the others, and config errors named by their key."""

from __future__ import annotations

import csv
import dataclasses
import functools
import json
import math
import tomllib
from pathlib import Path

import numpy as np
import pytest

from learned_opt.errors import UserError
from outer_train import compare as compare_mod
from outer_train.cli import main
from outer_train.config import load_toml
from outer_train.config.compare import compare_config_from_dict, load_compare_config
from outer_train.logging import read_records

REPO = Path(__file__).resolve().parents[2]
TINY = """
[task]
hidden_sizes = [8]
batch_size = 16
[lopt]
name = "learned_sgd"  # few meta-parameters: quick to compile
[estimator]
num_tasks = 2
horizon = 8
[run]
devices = 1
[eval]
num_seeds = 2
num_inner_steps = 8
curve_every = 4
adam_learning_rates = [0.03, 0.1]
[checkpoint]
every = 2
[compare]
seeds = [0, 1]
budget_inner_steps = 64
num_budget_points = 2
[[compare.arms]]
label = "tbptt"
estimator = { name = "tbptt", trunc_length = 4 }
[[compare.arms]]
label = "pes"
estimator = { name = "pes", trunc_length = 4 }
"""
# tbptt: 2 tasks x K = 4 -> 8 inner steps per outer step, 8 outer steps; pes: 16 and 4.
VOLATILE = {"run_seconds", "train_seconds", "run_dir"}


@pytest.fixture(scope="module")
def tiny_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("compare") / "tiny.toml"
    path.write_text(TINY)
    return path


@pytest.fixture(scope="module")
def cli_run(tiny_file) -> Path:
    out = tiny_file.parent / "out"
    assert main(["compare", str(tiny_file), "--out", str(out), "--no-progress"]) == 0
    return out


def _csv(path: Path) -> list[dict[str, str]]:
    with path.open() as f:
        return list(csv.DictReader(f))


def _stable(rows):
    return [{k: v for k, v in r.items() if k not in VOLATILE} for r in rows]


@pytest.mark.slow
def test_outputs_and_numbers_match_the_run_directories(cli_run):
    for name in ("report.md", "results.csv", "results.json", "compare.json",
                 "heldout_vs_inner_steps.png", "heldout_vs_seconds.png", "meta_training.png",
                 "heldout_curves.png"):
        assert (cli_run / name).exists(), name
    rows = _csv(cli_run / "results.csv")
    assert len(rows) == 2 * 2 * 3  # arms x seeds x budget points 0..2
    outer_steps = {"tbptt": 8, "pes": 4}  # 8 and 16 inner steps per outer step
    for row in rows:
        run = Path(row["run_dir"])
        assert run == cli_run / row["label"] / f"seed{row['seed']}"
        assert row["status"] == "finished"
        assert (run / "learned_optimizer.lopt").exists() and (run / "summary.md").exists()
        n = outer_steps[row["label"]]
        j = int(row["budget_point"])
        assert int(row["outer_step"]) == j * n // 2
        assert float(row["inner_steps"]) == j * 32  # the same budget points for every arm
        ev = {r["outer_step"]: r for r in read_records(run / "metrics.jsonl", "eval")}
        rec = ev[int(row["outer_step"])]
        assert float(row["heldout_meta_objective"]) == rec["learned_mean_batch_loss"]
        assert float(row["valid_accuracy"]) == rec["learned_valid_accuracy"]
        assert float(row["adam_meta_objective"]) == rec["adam_mean_batch_loss"]
    # The same tuned Adam for every arm of a seed.
    for seed in ("0", "1"):
        adam = {r["adam_meta_objective"] for r in rows if r["seed"] == seed}
        assert len(adam) == 1
    # The report's main table: mean +- sem over seeds of the final points.
    final = [float(r["heldout_meta_objective"]) for r in rows
             if r["label"] == "pes" and r["budget_point"] == "2"]
    mean, sem = np.mean(final), np.std(final, ddof=1) / math.sqrt(2)
    report = (cli_run / "report.md").read_text()
    assert f"{mean:.4f} ± {sem:.4f}" in report
    assert "one after another" in report and "## Recommendation" in report
    assert "On final valid loss the lowest was" in report
    summary = json.loads((cli_run / "results.json").read_text())
    assert [a["label"] for a in summary["arms"]] == ["tbptt", "pes"]


@pytest.mark.slow
def test_refuses_an_existing_comparison_without_resume(cli_run, tiny_file):
    base, compare = load_compare_config(tiny_file)
    with pytest.raises(UserError, match="--resume"):
        compare_mod.run_compare(base, compare, cli_run, progress=False, log=lambda s: None)


@pytest.mark.slow
def test_resume_after_a_kill_skips_finished_runs_and_ends_the_same(cli_run, tiny_file,
                                                                   monkeypatch):
    base, compare = load_compare_config(tiny_file)
    out = tiny_file.parent / "killed"
    real = compare_mod.meta_train
    calls = []

    def killed(config, out_dir, **kw):  # pes/seed0 is killed after 2 of its 4 outer steps
        calls.append(Path(out_dir).relative_to(out).as_posix())
        if calls[-1] == "pes/seed0":
            real(config, out_dir, **kw, stop_after=2)
            raise KeyboardInterrupt
        return real(config, out_dir, **kw)

    monkeypatch.setattr(compare_mod, "meta_train", killed)
    with pytest.raises(KeyboardInterrupt):
        compare_mod.run_compare(base, compare, out, progress=False, log=lambda s: None)
    assert calls == ["tbptt/seed0", "tbptt/seed1", "pes/seed0"]
    assert not (out / "report.md").exists()
    calls.clear()
    monkeypatch.setattr(compare_mod, "meta_train", _counting(real, calls, out))
    compare_mod.run_compare(base, compare, out, resume=True, progress=False, log=lambda s: None)
    assert calls == ["pes/seed0", "pes/seed1"]  # the finished tbptt runs were skipped
    resumed = [r for r in read_records(out / "pes/seed0/metrics.jsonl", "eval")]
    assert [r["outer_step"] for r in resumed] == [0, 2, 4]
    assert _stable(_csv(out / "results.csv")) == _stable(_csv(cli_run / "results.csv"))


def _counting(real, calls, out):
    def fn(config, out_dir, **kw):
        calls.append(Path(out_dir).relative_to(out).as_posix())
        assert kw["resume"] == (calls[-1] == "pes/seed0")  # the killed run continues
        return real(config, out_dir, **kw)

    return fn


@pytest.mark.slow
def test_a_failing_arm_does_not_stop_the_others(cli_run, tiny_file, monkeypatch):
    base, compare = load_compare_config(tiny_file)
    out = tiny_file.parent / "failing"
    real = compare_mod.meta_train

    def diverging(config, out_dir, **kw):
        if config.estimator.name == "tbptt" and config.run.seed == 1:
            raise UserError("meta-training diverged: 20 non-finite meta-gradients in a row")
        return real(config, out_dir, **kw)

    monkeypatch.setattr(compare_mod, "meta_train", diverging)
    result = compare_mod.run_compare(base, compare, out, progress=False, log=lambda s: None)
    status = {r.spec.directory.relative_to(out).as_posix(): r.status for r in result.runs}
    assert status == {"tbptt/seed0": "finished", "tbptt/seed1": "failed",
                      "pes/seed0": "finished", "pes/seed1": "finished"}
    report = (out / "report.md").read_text()
    assert "tbptt failed in 1/2 seeds (meta-training diverged" in report
    assert "(1/2 seeds)" in report
    # A failed run is done: resume does not retry it.
    calls = []
    monkeypatch.setattr(compare_mod, "meta_train", _counting(real, calls, out))
    compare_mod.run_compare(base, compare, out, resume=True, progress=False, log=lambda s: None)
    assert calls == []


def _with(data_text: str, **edits) -> dict:

    data = tomllib.loads(data_text)
    for path, value in edits.items():
        *head, last = path.split("__")
        node = data
        for k in head:
            node = node[int(k)] if k.isdigit() else node[k]
        node[int(last) if last.isdigit() else last] = value
    return data


@pytest.mark.parametrize(("edits", "message"), [
    ({"compare__arms__1__estimator": {"name": "pes", "trunc_lenght": 4}},
     r"compare\.arms\[1\]\.estimator\.trunc_lenght"),
    ({"compare__arms__0__estimator": {"name": "tbptt", "sigma": 0.1}},
     r"compare\.arms\[0\]\.estimator\.sigma is not a knob of estimator 'tbptt'"),
    ({"compare__arms__1__estimator": {"name": "pes", "trunc_length": 50}},
     r"compare\.arms\[1\] \(label 'pes'\).*shorter than trunc_length 50"),
    ({"compare__arms__1__label": "tbptt"}, r"compare\.arms\[1\]\.label = 'tbptt' is used"),
    ({"compare__arms__1__learning_rates": [0.0]}, r"compare\.arms\[1\]\.learning_rates"),
    ({"compare__arms__1__lr": 0.1}, r"compare\.arms\[1\]\.lr"),
    ({"compare__seeds": []}, r"compare\.seeds"),
    ({"compare__budget": "minutes"}, r"compare\.budget = 'minutes'"),
    ({"compare__stats_horizon": 6}, r"compare\.arms\[0\] \('tbptt'\): its estimator statistics.*"
     r"T = 6 is not a multiple"),
    ({"compare__budget_inner_steps": 16}, r"compare\.budget_inner_steps = 16 .*at least 32"),
    ({"compare__num_budget_pts": 2}, r"compare\.num_budget_pts"),
    ({"compare__arms": []}, r"compare\.arms is empty"),
    ({"compare__arms__1__estimator": {"name": "pes", "horizon": 12, "trunc_length": 4}},
     r"eval\.num_inner_steps"),
])
def test_config_errors_name_the_key(edits, message):
    data = _with(TINY, **edits)
    if "compare__arms__1__estimator" in edits and "horizon" in edits[
            "compare__arms__1__estimator"]:
        del data["eval"]["num_inner_steps"]
    with pytest.raises(UserError, match=message):
        compare_config_from_dict(data)


@pytest.mark.slow
def test_estimator_statistics_are_the_variance_tools_at_the_final_theta(cli_run, tmp_path):
    """The report's statistics of an arm equal `learned-opt variance` run by hand on the same
    settings at that arm's final .lopt (the compare plumbing adds nothing of its own)."""
    summary = json.loads((cli_run / "results.json").read_text())
    stats = {s["label"]: s for s in summary["estimator_stats"]}
    assert set(stats) == {"tbptt", "pes"}
    pes = stats["pes"]
    assert pes["seed"] == 0 and pes["reason"] == ""
    assert pes["row"]["horizon"] == 8 and pes["row"]["num_windows"] == 2  # T = 8, K = 4
    assert 0 < pes["row"]["normalized_variance"] < math.inf
    cached = json.loads((cli_run / "pes/seed0/estimator_stats.json").read_text())
    assert cached["measurement"] == pes["row"]
    report = (cli_run / "report.md").read_text()
    assert "## Estimator statistics at each arm's final theta" in report
    # By hand: the [variance] section compare used, on the run's own config and .lopt.
    data = tomllib.loads((cli_run / "pes/seed0/config.toml").read_text())
    _, compare = compare_config_from_dict(_with(TINY))
    section = compare.stats_section(compare.arms[1])
    data["variance"] = {k: list(v) if isinstance(v, tuple) else v
                        for k, v in dataclasses.asdict(section).items()}
    config = tmp_path / "variance.toml"
    config.write_text(to_toml_document(data))
    out = tmp_path / "variance"
    assert main(["variance", "--config", str(config), "--optimizer",
                 str(cli_run / "pes/seed0/learned_optimizer.lopt"), "--out", str(out),
                 "--no-progress"]) == 0
    (row,) = _csv(out / "variance.csv")
    for key in ("normalized_variance", "cosine", "total_variance", "relative_variance"):
        assert float(row[key]) == pytest.approx(pes["row"][key], rel=1e-5), key


def to_toml_document(data: dict) -> str:
    """A nested dict of tables as TOML (the test writes a [variance] config by hand)."""
    from outer_train.config.files import toml_value

    lines = []
    for name, table in data.items():
        lines.append(f"[{name}]")
        lines += [f"{k} = {toml_value(v)}" for k, v in table.items() if v is not None]
    return "\n".join(lines) + "\n"


@pytest.mark.slow
def test_a_seconds_budget_is_calibrated_once_and_reused(tmp_path, monkeypatch):
    data = _with(TINY, compare__budget="seconds", compare__budget_seconds=1000.0,
                 compare__calibration_steps=2)
    _, compare = compare_config_from_dict(data)
    calls = []
    real = compare_mod.meta_train

    def counting(config, out_dir, **kw):
        calls.append(Path(out_dir).relative_to(tmp_path).as_posix())
        return real(config, out_dir, **kw)

    monkeypatch.setattr(compare_mod, "meta_train", counting)
    calibrated, plan = compare_mod.calibrate(compare, tmp_path, log=lambda s: None)
    assert calls == ["tbptt/calibration", "pes/calibration"]
    for arm in calibrated.arms:
        t = plan["arms"][arm.label]["seconds_per_outer_step"]
        assert t == calibrated.step_seconds[arm.label] > 0
        n = calibrated.num_outer_steps(arm)
        assert n == 2 * (int(1000.0 / t) // 2) >= 2  # P floor(floor(S / t) / P)
        cfg = calibrated.run_config(arm, 0, 1)
        assert (cfg.run.num_outer_steps, cfg.eval.every) == (n, n // 2)
        records = read_records(tmp_path / arm.label / "calibration/metrics.jsonl", "train")
        assert [r["outer_step"] for r in records] == [1, 2, 3]  # 1 compiling + 2 timed
    # Reused on resume: no new probe, the same outer steps.
    again, _ = compare_mod.calibrate(compare, tmp_path, log=lambda s: None)
    assert len(calls) == 2 and again.step_seconds == calibrated.step_seconds
    # A budget too small for one outer step per budget point is refused, naming the fix.
    small = dataclasses.replace(compare, section=dataclasses.replace(
        compare.section, budget_seconds=1e-9))
    with pytest.raises(UserError, match=r"compare\.budget_seconds = 1e-09 gives fewer than"):
        compare_mod.calibrate(small, tmp_path, log=lambda s: None)


def test_a_killed_seconds_budget_comparison_resumes_with_the_saved_plan(tmp_path, monkeypatch):
    # Calibration is faked (0.25 s per outer step, so 1.0 s buys 4 outer steps per arm) to make
    # the plan deterministic; the runs themselves are real.
    data = _with(TINY, compare__budget="seconds", compare__budget_seconds=1.0,
                 compare__calibration_steps=2, compare__estimator_stats=False)
    base, compare = compare_config_from_dict(data)
    real, calls, kill_at = compare_mod.meta_train, [], {"pes/calibration"}

    def fake(config, out_dir, **kw):
        name = Path(out_dir).relative_to(tmp_path).as_posix()
        calls.append(name)
        if name.endswith("/calibration"):
            Path(out_dir).mkdir(parents=True)
            (Path(out_dir) / "metrics.jsonl").write_text("".join(
                json.dumps({"kind": "train", "outer_step": i, "step_seconds": 0.25}) + "\n"
                for i in (1, 2, 3)))
        if name in kill_at:
            if not name.endswith("/calibration"):
                real(config, out_dir, **kw, stop_after=2)
            raise KeyboardInterrupt
        if not name.endswith("/calibration"):
            return real(config, out_dir, **kw)

    monkeypatch.setattr(compare_mod, "meta_train", fake)
    run = functools.partial(compare_mod.run_compare, base, compare, tmp_path, progress=False,
                            log=lambda s: None)
    with pytest.raises(KeyboardInterrupt):  # killed while calibrating the second arm
        run()
    assert calls == ["tbptt/calibration", "pes/calibration"]
    assert set(json.loads((tmp_path / "budget_plan.json").read_text())["arms"]) == {"tbptt"}
    calls.clear()
    kill_at = {"pes/seed0"}  # then killed in the middle of a run
    with pytest.raises(KeyboardInterrupt):
        run(resume=True)
    assert calls == ["pes/calibration", "tbptt/seed0", "tbptt/seed1", "pes/seed0"]
    plan = (tmp_path / "budget_plan.json").read_text()
    calls.clear()
    kill_at = set()
    run(resume=True)
    assert calls == ["pes/seed0", "pes/seed1"]  # no new calibration: the saved plan is used
    assert (tmp_path / "budget_plan.json").read_text() == plan
    for label in ("tbptt", "pes"):
        for seed in (0, 1):
            train = list(read_records(tmp_path / label / f"seed{seed}/metrics.jsonl", "train"))
            assert train[-1]["outer_step"] == 4  # floor(1.0 / 0.25) outer steps
    assert (tmp_path / "report.md").exists()


def test_a_comparison_owns_its_folder(tmp_path, tiny_file):
    from outer_train import run_dir

    base, compare = load_compare_config(tiny_file)
    with run_dir.claim(tmp_path / "held", log=lambda s: None):  # another live owner
        with pytest.raises(UserError, match=r"in use by another learned-opt process \(pid"):
            compare_mod.run_compare(base, compare, tmp_path / "held", resume=True,
                                    progress=False, log=lambda s: None)
    assert not (tmp_path / "held" / "compare.json").exists()  # refused before writing


def test_full_bptt_arms_do_not_inherit_the_es_sigma():
    data = _with(TINY, estimator__sigma=0.02)
    data["compare"]["arms"].append({"label": "bptt", "estimator": {"name": "full_bptt"}})
    _, compare = compare_config_from_dict(data)
    pes, bptt = compare.arms[1], compare.arms[2]
    assert pes.estimator.sigma == 0.02
    assert bptt.estimator.knobs()["sigma"] == 0.0  # plain backprop, not a smoothed one


def test_arm_estimators_inherit_the_base_section_and_the_budget():
    base, compare = compare_config_from_dict(_with(TINY))
    tb, pes = compare.arms
    assert tb.estimator.horizon == pes.estimator.horizon == 8  # from [estimator]
    assert pes.estimator.sigma == base.estimator.sigma
    assert [compare.num_outer_steps(a) for a in compare.arms] == [8, 4]
    cfg = compare.run_config(pes, 0, 1)
    assert (cfg.run.seed, cfg.run.num_outer_steps, cfg.eval.every) == (1, 4, 2)


@pytest.mark.parametrize("name", ["quick.toml", "horizon.toml"])
def test_shipped_configs_validate(name):
    path = REPO / "configs" / "compare" / name
    if not path.exists():
        pytest.skip(f"{name} not shipped")
    base, compare = compare_config_from_dict(load_toml(path))
    assert len(compare.arms) >= 3 and base.task.dataset == "digits"
