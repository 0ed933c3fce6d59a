"""Backprop through the hyperparameter learned optimizers on real data gives finite gradients."""

import jax
import numpy as np
import pytest

from learned_opt import LearnedAdam, LearnedMomentum, LearnedSGD
from outer_train.estimators import make_estimator
from outer_train.problem import LearnedOptProblem


@pytest.mark.parametrize("lopt", [LearnedSGD(), LearnedMomentum(), LearnedAdam()], ids=str)
def test_full_backprop_meta_gradient_is_finite_with_always_zero_gradients(standard_task, lopt):
    # Digits has constant border pixels: their first-layer weights always get gradient 0, so
    # Adam's nu stays 0 there, where sqrt has an infinite slope (the NaN source this guards).
    estimator = make_estimator(
        "full_bptt", LearnedOptProblem(standard_task, lopt), num_tasks=2, horizon=10
    )
    theta = lopt.init(jax.random.key(0))
    state = estimator.init(jax.random.key(1), theta)
    grad, _, metrics = jax.jit(lambda e, k, t, s: e.estimate(k, t, s))(
        estimator, jax.random.key(2), theta, state
    )
    assert int(metrics["num_nonfinite"]) == 0
    leaves = jax.tree.leaves(grad)
    assert all(np.isfinite(np.asarray(g)).all() for g in leaves)
    assert any(float(abs(g)) > 0 for g in leaves)  # the gradient says something
