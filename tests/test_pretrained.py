"""The pretrained optimizers shipped in the package (``learned_opt.pretrained``).

Every shipped optimizer loads, has a card with its held-out table, and its card's one-seed
reference numbers at the trained horizon T reproduce. Tolerance: on the machine that wrote the
card the recomputation is the same program on the same inputs (bitwise equal); on another CPU
(AVX2 vs AVX-512, other LLVM vectorization) float sums are reordered, giving differences of
order 1e-6 relative per step which stay that small over a T-step run of a well-behaved
optimizer. So rtol 1e-3 on the meta-objective (a mean over T batch losses) and 5e-3 on the
final valid loss (one point, no averaging) catch a changed optimizer, task or data pipeline,
not rounding. Only the T row on one seed runs here (a few seconds), not the 2T/5T rows.
"""

from __future__ import annotations

import tomllib
from fnmatch import fnmatch
from pathlib import Path

import numpy as np
import pytest

import learned_opt
from learned_opt import UserError, pretrained
from outer_train.cli import main

ROOT = Path(__file__).resolve().parent.parent
NAMES = pretrained.names()


def test_some_optimizer_is_shipped_and_packaged():
    assert "digits_pes_t200" in NAMES
    data = tomllib.loads((ROOT / "pyproject.toml").read_text())
    globs = data["tool"]["setuptools"]["package-data"]["learned_opt"]
    folder = ROOT / "learned_opt" / "pretrained_data"
    for path in folder.iterdir():
        rel = f"pretrained_data/{path.name}"
        assert any(fnmatch(rel, g) for g in globs), f"{rel} would be left out of the wheel"
        assert path.stat().st_size < 300_000, f"{rel} is too big to ship"


@pytest.mark.parametrize("name", NAMES)
def test_loads_and_lists_its_card(name):
    loaded = pretrained(name)
    assert isinstance(loaded, learned_opt.LoadedOptimizer)
    cards = {c.name: c for c in pretrained.list()}
    card = cards[name]
    assert card == pretrained.card(name)
    assert card.description and card.trained_on["estimator"] and card.trained_on["outer_steps"]
    assert card.config["lopt"]["name"] == loaded.optimizer.name
    T = card.horizon
    steps = [r["num_steps"] for r in card.heldout]
    assert {T, 2 * T, 5 * T} <= set(steps), "generalization rows past the horizon are missing"
    assert len(card.evaluation["adam_learning_rates"]) >= 9
    for row in card.heldout:
        assert row["verdict"] and isinstance(row["beats_adam"], bool)
        assert row["adam"]["learning_rate"] in card.evaluation["adam_learning_rates"]
    table = card.heldout_table()
    assert table.count("\n") == len(card.heldout) + 1


@pytest.mark.slow
@pytest.mark.parametrize("name", NAMES)
def test_recorded_reference_reproduces_on_one_seed(name):
    import jax

    from outer_train.pretrained_card import reference_runs, task_from_record

    card = pretrained.card(name)
    loaded = pretrained(name)
    row = next(r for r in card.heldout if r["num_steps"] == card.horizon)
    ref = row["reference"]
    keys = jax.random.split(jax.random.key(ref["seed"]), ref["num_seeds"])
    got = reference_runs(task_from_record(ref["task"]), loaded.optimizer, loaded.theta, keys,
                         ref["num_steps"], ref["eval_every"], ref["adam_learning_rate"])
    for side in ("learned", "adam"):
        np.testing.assert_allclose(got[side]["mean_batch_loss"], ref[side]["mean_batch_loss"],
                                   rtol=1e-3, err_msg=f"{side} meta-objective")
        np.testing.assert_allclose(got[side]["final_valid_loss"],
                                   ref[side]["final_valid_loss"], rtol=5e-3,
                                   err_msg=f"{side} final valid loss")


def test_unknown_name_names_the_available_ones():
    with pytest.raises(UserError, match=r"no pretrained optimizer named 'nope'.*digits_pes_t200"):
        pretrained("nope")


def test_eval_cli_takes_a_pretrained_optimizer(tmp_path, capsys):
    out = tmp_path / "eval"
    code = main(["eval", "--optimizer", "pretrained:digits_pes_t200", "--steps", "8",
                 "--seeds", "1", "--adam-lrs", "0.01", "--curve-every", "4",
                 "--out", str(out)])
    assert code == 0
    assert "| learned optimizer |" in capsys.readouterr().out
    assert "pretrained:digits_pes_t200" in (out / "summary.md").read_text()


def test_eval_cli_unknown_pretrained_name(tmp_path, capsys):
    code = main(["eval", "--optimizer", "pretrained:nope", "--out", str(tmp_path / "x")])
    assert code == 2
    err = capsys.readouterr().err
    assert "no pretrained optimizer named 'nope'" in err and "digits_pes_t200" in err
    assert not (tmp_path / "x").exists()
