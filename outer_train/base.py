"""Protocols of the outer loop: an unrolled inner system and a meta-gradient estimator.

Notation (REFERENCE.md): theta = meta-parameters, s_t = inner state, s_{t+1} = f(s_t, theta),
meta-loss L(theta) = (1/T) sum_t l_t(s_t, theta) over a horizon of T inner steps.
"""

from __future__ import annotations

from typing import Any, Protocol

import jax

PRNGKey = jax.Array
Theta = Any
InnerState = Any
EstimatorState = Any
Metrics = dict[str, jax.Array]


class InnerProblem(Protocol):
    """One iterated system s_{t+1} = f(s_t, theta) with a per-step meta-loss l_t.

    ``init(key)`` starts a fresh inner problem (new task sample, params and optimizer state).
    ``step(theta, state, key)`` advances one inner step and returns ``(new_state, loss)`` where
    ``loss`` is the (normalized) scalar meta-loss contribution of that step. Both are pure and
    vmappable; the key decides the step's data.
    """

    def init(self, key: PRNGKey) -> InnerState: ...

    def step(self, theta: Theta, state: InnerState, key: PRNGKey) -> tuple[InnerState, jax.Array]: ...


class GradientEstimator(Protocol):
    """Estimates d/dtheta of the meta-loss. Pure: calling ``estimate`` R times with R keys at the
    same (theta, state) gives R independent draws (the variance diagnostics rely on this).

    ``estimate`` returns ``(meta_grad, new_state, metrics)``; ``meta_grad`` has theta's structure.
    """

    def init(self, key: PRNGKey, theta: Theta) -> EstimatorState: ...

    def estimate(
        self, key: PRNGKey, theta: Theta, state: EstimatorState
    ) -> tuple[Theta, EstimatorState, Metrics]: ...
