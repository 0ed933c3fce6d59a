"""Family meta-training compiled once (``family.compile = "once"``): a stack of padded variants
estimates what its members estimate one by one, and trains the theta that one estimator per
variant trains."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import bitwise_equal

from learned_opt.errors import UserError
from learned_opt.mlp_lopt import MLPLOpt
from outer_train.build import build, init_state
from outer_train.config import load_config
from outer_train.estimators import make_estimator
from outer_train.meta_train import make_outer_step, meta_train
from outer_train.problem import LearnedOptProblem
from outer_train.variant_stack import StackedEstimator, stack
from tasks.image_mlp import ImageMLPConfig
from tasks.padded_mlp import pad_variants

FAMILY = [
    "task.kind=family", "family.widths=[8, 16]", "family.depths=[1, 2]",
    "family.activations=['relu', 'tanh']", "family.batch_sizes=[16]",
    "family.heldout_pairs=[[8, 'tanh']]", "family.num_train_tasks=4",
    "estimator.name=pes", "estimator.num_tasks=2", "estimator.trunc_length=3",
    "estimator.horizon=9", "lopt.hidden_sizes=[8]", "run.devices=1",
]


def _rel(a, b) -> float:
    """max |a - b| / max |a| over the float leaves (the other leaves must be equal)."""
    pairs = list(zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True))
    floats = [(x, y) for x, y in pairs if jnp.issubdtype(x.dtype, jnp.floating)]
    for x, y in pairs:
        if not jnp.issubdtype(x.dtype, jnp.floating):
            if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
                x, y = jax.random.key_data(x), jax.random.key_data(y)
            assert np.array_equal(x, y)
    num = max(float(jnp.max(jnp.abs(x - y))) for x, y in floats)
    return num / max(float(jnp.max(jnp.abs(x))) for x, _ in floats)


def test_stack_estimates_what_its_members_estimate(digits):
    configs = [ImageMLPConfig(hidden_sizes=(8,), batch_size=16),
               ImageMLPConfig(hidden_sizes=(16, 16), activation="tanh", batch_size=32)]
    lopt = MLPLOpt(hidden_sizes=(8,))
    members = [make_estimator("pes", LearnedOptProblem.create(t, lopt), num_tasks=2,
                              trunc_length=3, horizon=9, sigma=0.01)
               for t in pad_variants(configs)]
    stacked = stack(members)
    # the task data is kept once; the variants' indices and masks are stacked
    data = jax.tree.leaves(members[0].problem.task.data)
    shared = [leaf for leaf, s in zip(stacked.leaves, stacked.stacked, strict=True) if not s]
    assert all(any(x is d for x in shared) for d in data)
    assert stacked.inner_steps_per_estimate == 2 * members[0].inner_steps_per_estimate

    theta = lopt.init(jax.random.key(0))
    keys = jax.random.split(jax.random.key(1), 2)
    state = jax.jit(StackedEstimator.init)(stacked, keys, theta)
    grad, new_state, metrics = jax.jit(StackedEstimator.estimate)(stacked, keys, theta, state)
    one_by_one = []
    for i, member in enumerate(members):
        s = jax.jit(type(member).init)(member, keys[i], theta)
        g, s, m = jax.jit(type(member).estimate)(member, keys[i], theta, s)
        assert _rel(jax.tree.map(lambda x, i=i: x[i], new_state), s) < 1e-5
        one_by_one.append((g, m))
    mean = jax.tree.map(lambda *gs: sum(gs) / len(gs), *[g for g, _ in one_by_one])
    assert _rel(mean, grad) < 1e-5
    assert int(metrics["inner_steps"]) == sum(int(m["inner_steps"]) for _, m in one_by_one)
    assert np.isclose(float(metrics["meta_loss"]),
                      np.mean([float(m["meta_loss"]) for _, m in one_by_one]), rtol=1e-6)


def _train(mode: str, steps: int = 3):
    setup = build(load_config(None, [*FAMILY, f"family.compile='{mode}'"]))
    state = init_state(setup)
    step = make_outer_step(setup.meta_opt)
    for _ in range(steps):
        state, metrics = step(setup.estimators, state, setup.keys.outer)
    return setup, state, metrics


def test_compiled_once_trains_the_theta_of_one_estimator_per_variant(digits):
    per_variant, state_v, metrics_v = _train("per_variant")
    once, state_o, metrics_o = _train("once")
    assert len(per_variant.estimators) == 4
    assert {t.hidden_sizes for t in per_variant.train_tasks} == {(8,), (16,), (8, 8)}
    assert len(once.estimators) == 1 and once.estimators[0].variant_ids == (0, 1, 2, 3)
    assert once.inner_steps_per_outer_step == per_variant.inner_steps_per_outer_step
    assert _rel(state_v.theta, state_o.theta) < 1e-5
    assert _rel(state_v.theta, init_state(per_variant).theta) > 1e-4  # it moved
    assert np.isclose(float(metrics_o["meta_loss"]), float(metrics_v["meta_loss"]), rtol=1e-5)


def test_once_needs_an_optimizer_that_takes_a_mask(digits, monkeypatch):
    monkeypatch.setattr(MLPLOpt, "supports_mask", False)
    with pytest.raises(UserError, match="per_variant"):
        build(load_config(None, [*FAMILY, "family.compile='once'"]))


def test_compile_mode_in_the_checkpoint_hash():
    family = load_config(None, FAMILY)
    saved = family.to_dict()
    del saved["family"]["compile"]  # a checkpoint written before the key existed
    assert family.family.compile == "per_variant" and family.trajectory_changes(saved) == []
    once = load_config(None, [*FAMILY, "family.compile='once'"])
    assert once.trajectory_hash() != family.trajectory_hash()
    assert once.trajectory_changes(saved) == [("family.compile", "per_variant", "once")]
    # a single task has no variants: the mode cannot change its trajectory
    single = load_config(None, [])
    assert load_config(None, ["family.compile='once'"]).trajectory_hash() == \
        single.trajectory_hash()


def test_compiled_once_resumes_to_the_bitwise_theta(tmp_path, digits):
    config = load_config(None, [*FAMILY, "family.compile='once'", "run.num_outer_steps=4",
                                "checkpoint.every=2", "eval.every=0"])
    quiet = {"progress": False, "evaluate": False, "log": lambda m: None}
    straight = meta_train(config, tmp_path / "straight", **quiet)
    meta_train(config, tmp_path / "killed", stop_after=2, **quiet)
    resumed = meta_train(config, tmp_path / "killed", resume=True, **quiet)
    assert resumed.resumed_from == 2
    assert bitwise_equal(resumed.state, straight.state)
