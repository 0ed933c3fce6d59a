"""Truncated backprop through time (TBPTT) over K-step windows, inner state carried forward.

    g = mean_tasks d/dtheta (1/K) sum_{k<K} l_{t+k}(theta; s_t fixed)

The incoming state s_t is treated as a constant (no gradient through earlier windows): cheap and
low-variance but biased -- short-horizon bias -- for the full-horizon meta-loss. With K = T and
particles due for a reset it equals full backprop. Particles reset in-scan at their horizon;
a particle with a non-finite loss or gradient is dropped from the mean, counted and reset.
"""

from __future__ import annotations

from typing import ClassVar, NamedTuple

import flax.struct
import jax.numpy as jnp
from jax.flatten_util import ravel_pytree

from outer_train.estimators import knobs
from outer_train.estimators.metrics import estimator_metrics, finite_backprop
from outer_train.meta_loss import masked_mean
from outer_train.unroll import (
    Horizon,
    ParticleState,
    force_reset,
    start_particles,
    unroll_particles_grad,
    window_keys,
)


class TBPTTState(NamedTuple):
    """particles: ParticleState, leaves [num_tasks, ...]."""

    particles: ParticleState


@flax.struct.dataclass
class TBPTT(knobs.EstimatorKnobs):
    """Knobs: num_tasks particles; trunc_length K; horizon T or (T_min, T_max) log-uniform;
    staggered: start particles at random points of their first episode; segment_length of the
    rematerialized window scan (None: ``unroll.memory_optimal_segment``, which stores every
    step's residuals when the window's fit its budget)."""

    name: ClassVar[str] = "tbptt"
    num_tasks: int = knobs.knob(8)
    trunc_length: int = knobs.knob(20)
    horizon: Horizon = knobs.knob(200)
    staggered: bool = knobs.knob(True)
    segment_length: int | None = knobs.knob(None)

    @property
    def inner_steps_per_estimate(self) -> int:
        return self.num_tasks * self.trunc_length

    def init(self, key, theta) -> TBPTTState:
        return TBPTTState(start_particles(
            self.problem, key, theta, num_groups=self.num_tasks, group_size=1,
            horizon=self.horizon, staggered=self.staggered, theta_axis=None,
        ))

    def estimate(self, key, theta, state: TBPTTState):
        keys = window_keys(key, self.num_tasks, self.trunc_length)
        losses, grads, particles, trace = unroll_particles_grad(
            self.problem, theta, state.particles, keys.reset, keys.step,
            horizon=self.horizon, theta_axis=None,
            segment_length=self.segment_length,
        )
        valid = finite_backprop(losses, grads)
        metrics = estimator_metrics(
            meta_loss=masked_mean(losses, valid),
            num_nonfinite=jnp.sum(~valid),
            num_resets=jnp.sum(trace.after_reset[:, -1]),
            inner_steps=self.inner_steps_per_estimate,
        )
        meta_grad = ravel_pytree(theta)[1](masked_mean(grads, valid))
        return meta_grad, TBPTTState(force_reset(particles, ~valid)), metrics
