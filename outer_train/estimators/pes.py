"""Persistent evolution strategies (PES; Vicol, Metz, Sohl-Dickstein, ICML 2021).

Each pair keeps its own + and - inner states across windows and an accumulator
xi = sum of the eps drawn since its episode began. Per window, a fresh eps ~ N(0, sigma^2 I):

    xi <- xi + eps;   g = 1/(2 sigma^2) mean_i (L_i^+ - L_i^-) xi_i,

with L^{+/-} the window-mean meta-loss of the + and - unrolls (theta +/- eps, from their own
carried states). If an episode ends inside the window, the steps before the reset use the old
xi + eps, the steps after it only eps, and xi restarts at eps. Unbiased for the gradient of the
Gaussian-smoothed full-horizon meta-loss (averaged over the windows of an episode); its variance
grows with the number of windows per episode, since xi keeps accumulating noise.
"""

from __future__ import annotations

from typing import NamedTuple

import flax.struct
import jax
import jax.numpy as jnp
from jax.flatten_util import ravel_pytree

from outer_train.estimators import antithetic, knobs
from outer_train.estimators.metrics import estimator_metrics
from outer_train.meta_loss import masked_mean
from outer_train.unroll import (
    ParticleState,
    force_reset,
    repeat_members,
    start_particles,
    unroll_particles,
    window_keys,
)


class PESState(NamedTuple):
    """particles: leaves [num_tasks * 2 * num_perturbations, ...], per task [pos_1..M, neg_1..M];
    xi: float [num_tasks * num_perturbations, D]: noise accumulated by each pair's episode."""

    particles: ParticleState
    xi: jax.Array


@flax.struct.dataclass
class PES(knobs.AntitheticWindowKnobs):
    """Knobs: those of ``knobs.AntitheticWindowKnobs``."""

    @property
    def inner_steps_per_estimate(self) -> int:
        return 2 * self.num_tasks * self.num_perturbations * self.trunc_length

    def init(self, key, theta) -> PESState:
        g, m = self.num_tasks, self.num_perturbations
        particles = start_particles(
            self.problem, key, theta, num_groups=g, group_size=2 * m,
            horizon=self.horizon, staggered=self.staggered, theta_axis=None,
        )
        theta_flat = ravel_pytree(theta)[0]
        return PESState(particles, jnp.zeros((g * m, theta_flat.shape[0]), theta_flat.dtype))

    def estimate(self, key, theta, state: PESState):
        g, m = self.num_tasks, self.num_perturbations
        keys = window_keys(key, g, self.trunc_length)
        theta_flat, unravel = ravel_pytree(theta)
        eps = antithetic.sample_noise(keys.noise, g * m, theta_flat, self.sigma)
        thetas = jax.vmap(unravel)(antithetic.member_thetas(theta_flat, eps, g, with_center=False))
        reset_keys, step_keys = repeat_members((keys.reset, keys.step), 2 * m)
        particles, trace = unroll_particles(
            self.problem, thetas, state.particles, reset_keys, step_keys,
            horizon=self.horizon, theta_axis=0,
        )
        pos, neg, _ = antithetic.split_members(trace.losses, g, m, with_center=False)
        after_reset = antithetic.split_members(trace.after_reset, g, m, with_center=False)[0]
        valid = antithetic.pair_valid(pos, neg)
        before, after = antithetic.split_difference(pos, neg, after_reset)
        before = antithetic.shape_difference(before, self.loss_shaping, self.shaping_scale)
        after = antithetic.shape_difference(after, self.loss_shaping, self.shaping_scale)
        samples = before[:, None] * (state.xi + eps) + after[:, None] * eps
        meta_grad = masked_mean(samples, valid) / (2 * self.sigma**2)
        restarted = after_reset[:, -1]
        xi = jnp.where(restarted[:, None], eps, state.xi + eps)
        # A diverged pair restarts its whole task (members of a task stay in lockstep).
        broken = antithetic.group_any(~valid, g)
        metrics = estimator_metrics(
            meta_loss=masked_mean(0.5 * jnp.mean(pos + neg, axis=-1), valid),
            num_nonfinite=jnp.sum(~jnp.all(jnp.isfinite(trace.losses), axis=-1)),
            num_resets=jnp.sum(antithetic.group_any(restarted, g)),
            inner_steps=self.inner_steps_per_estimate,
        )
        new_state = PESState(force_reset(particles, repeat_members(broken, 2 * m)), xi)
        return unravel(meta_grad), new_state, metrics
