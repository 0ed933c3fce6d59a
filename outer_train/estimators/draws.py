"""Independent draws of any estimator at a fixed theta and fixed estimator state.

The variance diagnostics (normalized variance, total variance, SNR) build on this: the R draws
differ only in their keys (data, resets, perturbations), never in theta or the inner states.
"""

from __future__ import annotations

import jax

from outer_train.base import EstimatorState, GradientEstimator, Metrics, PRNGKey, Theta


def draws(
    estimator: GradientEstimator,
    key: PRNGKey,
    theta: Theta,
    state: EstimatorState,
    num_draws: int,
    *,
    batch_size: int | None = None,
) -> tuple[Theta, EstimatorState, Metrics]:
    """``estimate`` at R = ``num_draws`` independent keys; every output gains a leading [R] axis.

    batch_size: vmap this many draws at a time (``lax.map``) to bound memory; None: all at once.
    """
    keys = jax.random.split(key, num_draws)
    one = lambda k: estimator.estimate(k, theta, state)
    if batch_size is None or batch_size >= num_draws:
        return jax.vmap(one)(keys)
    return jax.lax.map(one, keys, batch_size=batch_size)
