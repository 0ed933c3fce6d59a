"""Generalization rows (``outer_train.generalization``): the verdict rule on constructed curves
(it can fail: a diverging, a worse and a level learned optimizer are told apart from a better
one), the ``[eval]`` keys, and a tiny meta-train whose summary.md and generalization.json carry
the rows, also after a resume."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from learned_opt.errors import UserError
from outer_train import generalization
from outer_train.config import load_config
from outer_train.evaluation import Curves
from outer_train.generalization import BEATS, LEVEL, SPLIT, VERDICTS, WORSE
from outer_train.meta_train import meta_train

NUM_OUTER_STEPS = 4
TINY = [  # tests/outer_train/test_meta_train.py's tiny run, shorter
    "task.hidden_sizes=[8]", "task.batch_size=32",
    "lopt.hidden_sizes=[8]",
    "estimator.name=pes", "estimator.num_tasks=2", "estimator.trunc_length=4",
    "estimator.horizon=12",
    f"run.num_outer_steps={NUM_OUTER_STEPS}", "run.log_every=1",
    "eval.every=0", "eval.num_seeds=2", "eval.num_inner_steps=12", "eval.curve_every=4",
    "eval.adam_learning_rates=[0.01, 0.1]",
    "checkpoint.every=2", "checkpoint.keep=2",
]
QUIET = dict(progress=False, log=lambda _: None)


# ---------------------------------------------------------------------------------------------
# The verdict rule


def _curves(batch_loss: np.ndarray, valid_final: np.ndarray) -> Curves:
    """Curves of one task, S seeds: training-batch losses [S, N], final valid losses [S]; the
    whole-split train loss is the batch loss at the eval points (0 and N)."""
    batch = batch_loss[None].astype(np.float64)
    train = np.stack([batch[..., 0], batch[..., -1]], -1)
    valid = np.stack([np.full_like(valid_final, 2.3), valid_final], -1)[None]
    return Curves(step=np.array([0, batch.shape[-1]]), train_loss=train, valid_loss=valid,
                  valid_accuracy=np.full_like(valid, 0.9), batch_loss=batch)


def _run(rng, level: float, *, noise: float = 0.01, seeds: int = 8, steps: int = 20):
    """Losses decaying from 2.3 towards ``level`` plus per-seed noise (common across steps)."""
    decay = 2.3 * np.exp(-np.arange(steps) / 3.0)
    return level + decay + noise * rng.normal(size=(seeds, 1))


def _verdict(learned: Curves, adam: Curves) -> dict:
    return generalization.verdict(learned, adam)


def test_verdict_beats_worse_level_split_diverged():
    rng = np.random.default_rng(0)
    adam_runs = _run(rng, 0.30)
    adam = _curves(adam_runs, np.full(8, 0.30) + 0.01 * rng.normal(size=8))
    shared = rng.normal(size=(8, 1))  # the common-seed part the paired difference cancels

    better = _curves(adam_runs - 0.1 + 0.005 * shared, np.full(8, 0.20))
    v = _verdict(better, adam)
    assert v["verdict"] == BEATS and v["beats_adam"] and v["valid_no_worse"]
    assert v["meta_objective_gain"][0] == pytest.approx(0.1, abs=0.01)

    worse = _curves(adam_runs + 0.1, np.full(8, 0.40))
    assert _verdict(worse, adam)["verdict"] == WORSE

    # a small difference under large seed-to-seed spread of the difference (s.e. 0.019)
    alternating = 0.05 * np.array([1.0, -1.0] * 4)[:, None]
    level = _curves(adam_runs + 0.001 + alternating, np.full(8, 0.30))
    assert _verdict(level, adam)["verdict"] == LEVEL

    split = _curves(adam_runs - 0.1, np.full(8, 0.60))  # lower meta-objective, worse valid
    v = _verdict(split, adam)
    assert v["verdict"] == SPLIT and v["beats_adam"] and not v["valid_no_worse"]


def test_verdict_diverged_when_losses_explode_or_go_nonfinite():
    rng = np.random.default_rng(1)
    adam_runs = _run(rng, 0.30)
    adam = _curves(adam_runs, np.full(8, 0.30))
    exploding = adam_runs.copy()
    exploding[:3, 10:] = 2.3 * 1e3 * np.exp(np.arange(10))  # blows up past step 10
    exploding[3, -1] = np.nan
    # lower on average elsewhere, so only the divergence rule can call it
    v = _verdict(_curves(exploding - 0.2, np.full(8, 0.1)), adam)
    assert v["verdict"] == "diverged (4 of 8 runs)"
    assert v["diverged"] and not v["beats_adam"] and not v["valid_no_worse"]
    # just under 10x the step-0 loss is not divergence; just over is
    spike = adam_runs.copy()
    spike[0, 5] = 9.9 * spike[0, 0]
    assert not _verdict(_curves(spike, np.full(8, 0.3)), adam)["diverged"]
    spike[0, 5] = 10.1 * spike[0, 0]
    assert _verdict(_curves(spike, np.full(8, 0.3)), adam)["verdict"] == \
        "diverged (1 of 8 runs)"


@pytest.mark.slow
def test_shorter_rows_are_the_prefix_of_the_longest_run():
    # One run of 2T steps gives the T row too: the same as a separate T-step run.
    import jax

    from outer_train.build import make_lopt

    config = load_config(None, TINY)
    lopt = make_lopt(config.lopt)
    theta = lopt.init(jax.random.key(0))
    common = dict(seed_keys=jax.random.split(jax.random.key(1), 2), adam_lrs=(0.01, 0.3),
                  curve_every=4)
    task = (config.task_config(),)
    short, long = generalization.train_rows(task, lopt, theta, steps=[12, 24], **common)
    (alone,) = generalization.train_rows(task, lopt, theta, steps=[12], **common)
    assert short[2] == alone[2] == 4 and long[0].batch_loss.shape[-1] == 24
    for got, want in ((short[0], alone[0]), (short[1].curves, alone[1].curves)):
        for field in Curves._fields:
            np.testing.assert_allclose(getattr(got, field), getattr(want, field), rtol=1e-5,
                                       err_msg=field)
    assert short[1].learning_rate == alone[1].learning_rate
    np.testing.assert_allclose(short[1].grid_objective, alone[1].grid_objective, rtol=1e-5)
    assert long[1].grid_objective != short[1].grid_objective  # tuned per row, on its own steps


# ---------------------------------------------------------------------------------------------
# The [eval] keys


def test_eval_keys_defaults_and_plans():
    config = load_config()
    assert config.eval.generalization_multiples == (2, 5)
    assert config.eval.generalization_variants == "auto"
    plan = generalization.run_plan(config)
    assert [(s.name, s.num_steps) for s in plan] == [
        ("trained task, 2T", 400), ("trained task, 5T", 1000),
        ("held-out variant, T", 200), ("held-out variant, T", 200)]
    assert generalization.variant_names(config) == ["digits_mlp_tanh", "digits_mlp_wide"]
    family = load_config(None, ["task.kind=family", "eval.generalization_multiples=[3]"])
    plan = generalization.run_plan(family)
    assert [(s.name, s.num_steps) for s in plan] == [
        ("held-out family variants, T", 200), ("held-out family variants, 3T", 600)]
    assert plan[0].task_configs == tuple(generalization.heldout_task_configs(family))
    assert generalization.run_plan(load_config(None, ["eval.generalization_multiples=[]"])) == []


@pytest.mark.parametrize(("override", "message"), [
    ("eval.generalization_variants=['digits_mlp_tanh', 'nope']",
     r"eval.generalization_variants: unknown task preset 'nope'; presets: digits_mlp, "),
    ("eval.generalization_variants=other", r"eval.generalization_variants = 'other': expected"),
    ("eval.generalization_multiples=[1]", r"eval.generalization_multiples = \[1\]"),
    ("eval.generalization_multiples=[2, 2]", r"distinct items"),
])
def test_eval_keys_are_checked(override, message):
    with pytest.raises(UserError, match=message):
        load_config(None, [override])


def test_family_refuses_variant_presets():
    with pytest.raises(UserError, match=r"generalization_variants applies to task.kind = "
                                        r"'single' only"):
        load_config(None, ["task.kind=family", "eval.generalization_variants=['digits_mlp']"])
    load_config(None, ["task.kind=family", "eval.generalization_variants=[]"])


# ---------------------------------------------------------------------------------------------
# End to end


def _check_rows(out, multiples, variants):
    summary = (out / "summary.md").read_text()
    assert "## Generalization (against Adam tuned per row)" in summary
    assert 'A verdict of "diverged" means the learned optimizer blows up past its horizon' in (
        " ".join(summary.split()))
    doc = json.loads((out / generalization.FILE).read_text())
    rows = doc["rows"]
    expected = [f"trained task, {m}T" for m in multiples] + ["held-out variant, T"] * len(variants)
    assert [r["setting"] for r in rows] == expected
    assert [r["num_steps"] for r in rows] == [12 * m for m in multiples] + [12] * len(variants)
    assert [r["task_labels"] for r in rows[len(multiples):]] == [[v] for v in variants]
    for r in rows:
        assert r["verdict"] in VERDICTS or r["verdict"].startswith("diverged (")
        for side in ("learned", "adam"):
            for field in ("mean_batch_loss", "final_valid_loss", "final_valid_accuracy"):
                assert all(math.isfinite(x) for x in r[side][field]), (r["setting"], side, field)
        assert r["adam"]["learning_rate"] in (0.01, 0.1)
        assert f"| {r['setting']} | {', '.join(r['task_labels'])} | {r['num_steps']} |" in summary
    assert doc["num_seeds"] == 2 and doc["horizon"] == 12
    return doc


@pytest.mark.slow
def test_meta_train_writes_the_rows_also_when_resumed(tmp_path):
    config = load_config(None, [*TINY, "eval.generalization_multiples=[2]",
                                "eval.generalization_variants=['digits_mlp_tanh']"])
    out = tmp_path / "run"
    meta_train(config, out, stop_after=2, **QUIET)  # killed mid-way: no report yet
    assert not (out / "summary.md").exists() and not (out / generalization.FILE).exists()
    meta_train(config, out, resume=True, **QUIET)  # resumed mid-way: computed at the end
    first = _check_rows(out, [2], ["digits_mlp_tanh"])
    meta_train(config, out, resume=True, **QUIET)  # resumed after finishing: written again
    again = _check_rows(out, [2], ["digits_mlp_tanh"])
    assert again["rows"] == first["rows"]  # the same theta and seeds: the same numbers


def test_empty_multiples_write_no_section(tmp_path):
    config = load_config(None, [*TINY, "eval.generalization_multiples=[]"])
    meta_train(config, tmp_path / "run", **QUIET)
    assert "## Generalization" not in (tmp_path / "run" / "summary.md").read_text()
    assert not (tmp_path / "run" / generalization.FILE).exists()
