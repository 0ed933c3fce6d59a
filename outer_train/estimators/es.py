"""Antithetic evolution strategies over whole episodes.

    g = 1/(2 sigma^2) mean_{i=(task, m)} eps_i [L(theta + eps_i) - L(theta - eps_i)],
    eps_i ~ N(0, sigma^2 I), L = (1/T) sum_{t<T} l_t over a fresh episode,

i.e. 1/(N sigma^2) sum over N/2 pairs. Unbiased for the gradient of the Gaussian-smoothed
full-horizon meta-loss E_eps L(theta + eps) (exact for a meta-loss quadratic in theta). Uses loss
values only, so its variance stays bounded however chaotic the unroll; it grows with the number
of meta-parameters. The + and - members of a pair, and all M perturbations of one task, share
the episode's init and data keys.
"""

from __future__ import annotations

from typing import NamedTuple

import flax.struct
import jax
import jax.numpy as jnp
from jax.flatten_util import ravel_pytree

from outer_train.base import InnerProblem
from outer_train.estimators import antithetic, knobs
from outer_train.estimators.metrics import estimator_metrics
from outer_train.meta_loss import masked_mean
from outer_train.unroll import (
    constrain_particles,
    repeat_members,
    unroll_particles,
    window_keys,
)


class ESState(NamedTuple):
    """Empty: every estimate starts fresh episodes."""


@flax.struct.dataclass
class ES:
    """Knobs: num_tasks episodes x num_perturbations antithetic pairs each; horizon T (constant);
    sigma; loss_shaping ("none" | "sign" | "clip") with shaping_scale (loss units)."""

    problem: InnerProblem
    num_tasks: int = flax.struct.field(pytree_node=False, default=8)
    num_perturbations: int = flax.struct.field(pytree_node=False, default=1)
    horizon: int = flax.struct.field(pytree_node=False, default=200)
    sigma: float = flax.struct.field(pytree_node=False, default=0.01)
    loss_shaping: str = flax.struct.field(pytree_node=False, default="none")
    shaping_scale: float = flax.struct.field(pytree_node=False, default=1.0)

    def __post_init__(self):
        knobs.check_antithetic(self, truncated=False)

    @property
    def inner_steps_per_estimate(self) -> int:
        return 2 * self.num_tasks * self.num_perturbations * self.horizon

    def init(self, key, theta) -> ESState:
        del key, theta
        return ESState()

    def estimate(self, key, theta, state: ESState):
        g, m = self.num_tasks, self.num_perturbations
        keys = window_keys(key, g, self.horizon)
        theta_flat, unravel = ravel_pytree(theta)
        eps = antithetic.sample_noise(keys.noise, g * m, theta_flat, self.sigma)
        thetas = jax.vmap(unravel)(antithetic.member_thetas(theta_flat, eps, g, with_center=False))
        reset_keys, step_keys = repeat_members((keys.reset, keys.step), 2 * m)
        thetas, reset_keys, step_keys = constrain_particles((thetas, reset_keys, step_keys))
        _, trace = unroll_particles(
            self.problem, thetas, None, reset_keys, step_keys,
            horizon=self.horizon, theta_axis=0,
        )
        pos, neg, _ = antithetic.split_members(trace.losses, g, m, with_center=False)
        valid = antithetic.pair_valid(pos, neg)
        delta = antithetic.shape_difference(
            jnp.mean(pos - neg, axis=-1), self.loss_shaping, self.shaping_scale
        )
        meta_grad = masked_mean(delta[:, None] * eps, valid) / (2 * self.sigma**2)
        metrics = estimator_metrics(
            meta_loss=masked_mean(0.5 * jnp.mean(pos + neg, axis=-1), valid),
            num_nonfinite=jnp.sum(~jnp.all(jnp.isfinite(trace.losses), axis=-1)),
            num_resets=0,
            inner_steps=self.inner_steps_per_estimate,
        )
        return unravel(meta_grad), state, metrics
