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

    ``init(theta, key)`` starts a fresh inner problem (new params and optimizer state; the key
    decides the sample). It takes theta because an optimizer's state is built by
    ``opt_fn(theta).init(params)``; gradients flow through it. ``step(theta, state, key)``
    advances one inner step and returns ``(new_state, loss)`` where ``loss`` is the scalar
    (normalized) meta-loss contribution of that step: NaN, never a clipped or zeroed value, when
    the step diverged. Both are pure, written for ONE particle (the engine vmaps them), and the
    key decides the step's data. Implementations are pytrees (``flax.struct.dataclass``) whose
    data arrays are leaves, so they are passed to jitted functions as arguments.
    """

    def init(self, theta: Theta, key: PRNGKey) -> InnerState: ...

    def step(
        self, theta: Theta, state: InnerState, key: PRNGKey
    ) -> tuple[InnerState, jax.Array]: ...


class GradientEstimator(Protocol):
    """Estimates d/dtheta of the meta-loss. Pure: calling ``estimate`` R times with R keys at the
    same (theta, state) gives R independent draws (the variance diagnostics rely on this).

    ``estimate`` returns ``(meta_grad, new_state, metrics)``; ``meta_grad`` has theta's structure;
    ``metrics`` holds scalar arrays (at least ``meta_loss``, ``num_nonfinite``, ``num_resets``,
    ``inner_steps``). ``inner_steps_per_estimate`` is the number of particle inner steps one
    ``estimate`` runs (for inner-steps/s). Estimators are pytrees holding the problem; their
    knobs are static, so ``jax.jit(type(est).estimate)(est, key, theta, state)`` compiles once.
    """

    @property
    def inner_steps_per_estimate(self) -> int: ...

    def init(self, key: PRNGKey, theta: Theta) -> EstimatorState: ...

    def estimate(
        self, key: PRNGKey, theta: Theta, state: EstimatorState
    ) -> tuple[Theta, EstimatorState, Metrics]: ...
