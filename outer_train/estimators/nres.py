"""Noise-reuse evolution strategies (NRES; Li, Harrison, Sohl-Dickstein, Smith, Metz, NeurIPS
2023; the same idea as ES-Single, Vicol, Kolter, Swersky 2023).

One eps ~ N(0, sigma^2 I) per pair per episode, reused in every window until the episode ends:

    g = 1/(2 sigma^2) mean_i (L_i^+ - L_i^-) eps_i,

with L^{+/-} the window-mean meta-loss of the + and - unrolls (theta +/- eps_i, carried states).
An episode that ends inside the window restarts with a new eps: the steps after the reset run
at theta +/- eps_new (and the fresh state is built with it) and their loss difference multiplies
eps_new. Summed over an episode's windows this is exactly antithetic ES on the full episode, so
it is unbiased for the smoothed full-horizon meta-loss and its variance does not grow with the
number of windows (for one pair on a quadratic: (P+1) ||grad||^2, P = number of meta-params).
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


class NRESState(NamedTuple):
    """particles: leaves [num_tasks * 2 * num_perturbations, ...], per task [pos_1..M, neg_1..M];
    eps: float [num_tasks * num_perturbations, D]: the perturbation of each pair's episode."""

    particles: ParticleState
    eps: jax.Array


@flax.struct.dataclass
class NRES(knobs.AntitheticWindowKnobs):
    """Knobs: those of ``knobs.AntitheticWindowKnobs``."""

    @property
    def inner_steps_per_estimate(self) -> int:
        return 2 * self.num_tasks * self.num_perturbations * self.trunc_length

    def _thetas(self, theta_flat, eps, unravel):
        return jax.vmap(unravel)(
            antithetic.member_thetas(theta_flat, eps, self.num_tasks, with_center=False)
        )

    def init(self, key, theta) -> NRESState:
        g, m = self.num_tasks, self.num_perturbations
        noise_key, particle_key = jax.random.split(key)
        theta_flat, unravel = ravel_pytree(theta)
        eps = antithetic.sample_noise(noise_key, g * m, theta_flat, self.sigma)
        particles = start_particles(
            self.problem, particle_key, self._thetas(theta_flat, eps, unravel), num_groups=g,
            group_size=2 * m, horizon=self.horizon, staggered=self.staggered, theta_axis=0,
        )
        return NRESState(particles, eps)

    def estimate(self, key, theta, state: NRESState):
        g, m = self.num_tasks, self.num_perturbations
        keys = window_keys(key, g, self.trunc_length)
        theta_flat, unravel = ravel_pytree(theta)
        new_eps = antithetic.sample_noise(keys.noise, g * m, theta_flat, self.sigma)
        reset_keys, step_keys = repeat_members((keys.reset, keys.step), 2 * m)
        particles, trace = unroll_particles(
            self.problem, self._thetas(theta_flat, state.eps, unravel), state.particles,
            reset_keys, step_keys, horizon=self.horizon, theta_axis=0,
            reset_thetas=self._thetas(theta_flat, new_eps, unravel),
        )
        pos, neg, _ = antithetic.split_members(trace.losses, g, m, with_center=False)
        after_reset = antithetic.split_members(trace.after_reset, g, m, with_center=False)[0]
        valid = antithetic.pair_valid(pos, neg)
        before, after = antithetic.split_difference(pos, neg, after_reset)
        before = antithetic.shape_difference(before, self.loss_shaping, self.shaping_scale)
        after = antithetic.shape_difference(after, self.loss_shaping, self.shaping_scale)
        samples = before[:, None] * state.eps + after[:, None] * new_eps
        meta_grad = masked_mean(samples, valid) / (2 * self.sigma**2)
        restarted = after_reset[:, -1]
        eps = jnp.where(restarted[:, None], new_eps, state.eps)
        # A diverged pair restarts its whole task (members of a task stay in lockstep).
        broken = antithetic.group_any(~valid, g)
        metrics = estimator_metrics(
            meta_loss=masked_mean(0.5 * jnp.mean(pos + neg, axis=-1), valid),
            num_nonfinite=jnp.sum(~jnp.all(jnp.isfinite(trace.losses), axis=-1)),
            num_resets=jnp.sum(antithetic.group_any(restarted, g)),
            inner_steps=self.inner_steps_per_estimate,
        )
        new_state = NRESState(force_reset(particles, repeat_members(broken, 2 * m)), eps)
        return unravel(meta_grad), new_state, metrics
