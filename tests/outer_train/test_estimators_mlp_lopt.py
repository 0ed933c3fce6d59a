"""The estimators on the real stack: digits + an image MLP + MLPLOpt (small sizes).

TBPTT with K = T from particles due for a reset equals full backprop (segmented remat) on the
same keys; PES runs a couple of windows with finite, non-zero meta-gradients and valid resets.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from learned_opt.mlp_lopt import MLPLOpt
from outer_train.estimators import make_estimator
from outer_train.problem import LearnedOptProblem
from outer_train.unroll import force_reset
from tasks.datasets import load_dataset
from tasks.image_mlp import ImageMLPTask


@pytest.fixture(scope="module")
def problem():
    task = ImageMLPTask(load_dataset("digits"), hidden_sizes=(8,), batch_size=16)
    return LearnedOptProblem(task, MLPLOpt(), meta_loss="valid")


def test_tbptt_with_k_equal_t_is_full_backprop_with_mlp_lopt(problem):
    horizon, tasks = 6, 2
    theta = problem.lopt.init(jax.random.key(0))
    full = make_estimator("full_bptt", problem, num_tasks=tasks, horizon=horizon, segment_length=4)
    tbptt = make_estimator(
        "tbptt", problem, num_tasks=tasks, trunc_length=horizon, horizon=horizon, staggered=False
    )
    state = tbptt.init(jax.random.key(1), theta)
    state = state._replace(particles=force_reset(state.particles, jnp.ones(tasks, bool)))
    key = jax.random.key(2)
    g_full, _, _ = jax.jit(full.estimate)(key, theta, full.init(key, theta))
    g_tbptt, _, _ = jax.jit(tbptt.estimate)(key, theta, state)
    scale = max(float(jnp.max(jnp.abs(g))) for g in jax.tree.leaves(g_full))
    assert scale > 1e-4
    for a, b in zip(jax.tree.leaves(g_tbptt), jax.tree.leaves(g_full), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6 * scale)


def test_pes_windows_with_mlp_lopt(problem):
    theta = problem.lopt.init(jax.random.key(0))
    pes = make_estimator("pes", problem, num_tasks=2, trunc_length=3, horizon=(3, 6))
    state = pes.init(jax.random.key(1), theta)
    estimate = jax.jit(pes.estimate)
    resets = 0
    for i in range(3):
        grad, state, metrics = estimate(jax.random.key(10 + i), theta, state)
        resets += int(metrics["num_resets"])
        assert int(metrics["num_nonfinite"]) == 0
        assert all(np.isfinite(np.asarray(g)).all() for g in jax.tree.leaves(grad))
    assert resets > 0
    assert np.all(np.asarray(state.particles.inner_step) <= np.asarray(state.particles.horizon))
