"""Full unrolled backprop: the exact gradient of the mean meta-loss over whole episodes.

    g = mean_tasks d/dtheta (1/T) sum_{t<T} l_t(theta),   each estimate on fresh episodes.

Unbiased for the full-horizon meta-loss, but chaotic and high-variance for long T when the inner
dynamics are unstable (REFERENCE.md). Memory: the T-step scan is rematerialized in segments of
``segment_length`` steps (``jax.checkpoint`` on a nested scan), so backprop stores O(T/s) carries
plus one segment's residuals instead of T steps' activations; by default s ~ sqrt(T * carry /
residual bytes), so memory grows like sqrt(T).

``sigma > 0`` turns it into the reparameterization estimator of the Gaussian-smoothed loss
E_eps L(theta + eps): each task's gradient is taken at its own theta + eps, eps ~ N(0, sigma^2 I)
(the backprop side of the paper's Fig. 1 and Fig. 3).
"""

from __future__ import annotations

from typing import ClassVar, NamedTuple

import flax.struct
import jax
import jax.numpy as jnp
from jax.flatten_util import ravel_pytree

from outer_train.estimators import knobs
from outer_train.estimators.antithetic import sample_noise
from outer_train.estimators.metrics import estimator_metrics, finite_backprop
from outer_train.meta_loss import masked_mean
from outer_train.placement import constrain_particles
from outer_train.unroll import unroll_particles_grad, window_keys


class FullBPTTState(NamedTuple):
    """Empty: every estimate starts fresh episodes."""


@flax.struct.dataclass
class FullBPTT(knobs.EstimatorKnobs):
    """Knobs: num_tasks episodes per estimate; horizon T (constant); sigma (0: plain backprop);
    segment_length of the rematerialized scan (None: ``unroll.memory_optimal_segment``)."""

    name: ClassVar[str] = "full_bptt"
    num_tasks: int = knobs.knob(8)
    horizon: int = knobs.knob(200)
    sigma: float = knobs.knob(0.0)
    segment_length: int | None = knobs.knob(None)

    @classmethod
    def check_knobs(cls, values) -> None:
        knobs.check_values(values, allow_zero_sigma=True)

    @property
    def inner_steps_per_estimate(self) -> int:
        return self.num_tasks * self.horizon

    def init(self, key, theta) -> FullBPTTState:
        del key, theta
        return FullBPTTState()

    def estimate(self, key, theta, state: FullBPTTState):
        keys = window_keys(key, self.num_tasks, self.horizon)
        theta_flat, unravel = ravel_pytree(theta)
        if self.sigma > 0:
            eps = sample_noise(keys.noise, self.num_tasks, theta_flat, self.sigma)
            thetas, theta_axis = constrain_particles(jax.vmap(unravel)(theta_flat + eps)), 0
        else:
            thetas, theta_axis = theta, None
        reset_keys, step_keys = constrain_particles((keys.reset, keys.step))
        losses, grads, _, _ = unroll_particles_grad(
            self.problem, thetas, None, reset_keys, step_keys,
            horizon=self.horizon, theta_axis=theta_axis, segment_length=self.segment_length,
        )
        valid = finite_backprop(losses, grads)
        metrics = estimator_metrics(
            meta_loss=masked_mean(losses, valid),
            num_nonfinite=jnp.sum(~valid),
            num_resets=0,
            inner_steps=self.inner_steps_per_estimate,
        )
        return unravel(masked_mean(grads, valid)), state, metrics
