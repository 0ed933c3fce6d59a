"""Truncated antithetic ES: ES over one K-step window from a shared carried state.

    g = 1/(2 sigma^2) mean_i eps_i [L_w(theta + eps_i; s_t) - L_w(theta - eps_i; s_t)],
    L_w = (1/K) sum_{k<K} l_{t+k},

all members starting from the same unperturbed state s_t. Biased like TBPTT (it estimates the
gradient of the smoothed *window* loss). The carried state is advanced by a third, unperturbed
unroll (the "center"), never by the + member -- carrying a perturbed state forward is a known bug.
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


class TruncatedESState(NamedTuple):
    """particles: the unperturbed (center) particles, leaves [num_tasks, ...]."""

    particles: ParticleState


@flax.struct.dataclass
class TruncatedES(knobs.AntitheticWindowKnobs):
    """Knobs: those of ``knobs.AntitheticWindowKnobs``."""

    @property
    def group_size(self) -> int:
        return 2 * self.num_perturbations + 1

    @property
    def inner_steps_per_estimate(self) -> int:
        return self.num_tasks * self.group_size * self.trunc_length

    def init(self, key, theta) -> TruncatedESState:
        return TruncatedESState(start_particles(
            self.problem, key, theta, num_groups=self.num_tasks, group_size=1,
            horizon=self.horizon, staggered=self.staggered, theta_axis=None,
        ))

    def estimate(self, key, theta, state: TruncatedESState):
        g, m = self.num_tasks, self.num_perturbations
        keys = window_keys(key, g, self.trunc_length)
        theta_flat, unravel = ravel_pytree(theta)
        eps = antithetic.sample_noise(keys.noise, g * m, theta_flat, self.sigma)
        thetas = jax.vmap(unravel)(antithetic.member_thetas(theta_flat, eps, g, with_center=True))
        reset_keys, step_keys = repeat_members((keys.reset, keys.step), self.group_size)
        members = repeat_members(state.particles, self.group_size)
        particles, trace = unroll_particles(
            self.problem, thetas, members, reset_keys, step_keys,
            horizon=self.horizon, theta_axis=0,
        )
        pos, neg, center = antithetic.split_members(trace.losses, g, m, with_center=True)
        restarted = antithetic.split_members(trace.after_reset[:, -1], g, m, with_center=True)[2]
        valid = antithetic.pair_valid(pos, neg)
        delta = antithetic.shape_difference(
            jnp.mean(pos - neg, axis=-1), self.loss_shaping, self.shaping_scale
        )
        meta_grad = masked_mean(delta[:, None] * eps, valid) / (2 * self.sigma**2)
        center_valid = jnp.all(jnp.isfinite(center), axis=-1)
        carried = jax.tree.map(
            lambda x: x.reshape(g, self.group_size, *x.shape[1:])[:, -1], particles
        )
        metrics = estimator_metrics(
            meta_loss=masked_mean(jnp.mean(center, axis=-1), center_valid),
            num_nonfinite=jnp.sum(~jnp.all(jnp.isfinite(trace.losses), axis=-1)),
            num_resets=jnp.sum(restarted),
            inner_steps=self.inner_steps_per_estimate,
        )
        return unravel(meta_grad), TruncatedESState(force_reset(carried, ~center_valid)), metrics
