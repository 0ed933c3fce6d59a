"""Hybrid ES + backprop, weighted per coordinate by inverse empirical variance.

(Metz, Maheswaranathan, Nixon, Freeman, Sohl-Dickstein, ICML 2019, arXiv 1810.10180.)

From the shared carried state, each pair i unrolls K steps at theta + eps_i and theta - eps_i and
yields two estimates of the gradient of the smoothed window loss E_eps L_w(theta + eps):

    es_i = (L_w(theta + eps_i) - L_w(theta - eps_i)) eps_i / (2 sigma^2)          (black box)
    rp_i = (grad L_w(theta + eps_i) + grad L_w(theta - eps_i)) / 2            (reparameterization)

and, per coordinate j, with v_es, v_rp the empirical variances of es_i, rp_i over the pairs,

    g_j = (mean(es)_j / v_es_j + mean(rp)_j / v_rp_j) / (1 / v_es_j + 1 / v_rp_j).

Truncated like TBPTT (biased for the full horizon); K = T gives the full-episode hybrid. The
carried state is advanced by an unperturbed unroll ("center"), as in truncated ES. Needs at least
two pairs (num_tasks * num_perturbations >= 2) to estimate variances.
"""

from __future__ import annotations

from typing import NamedTuple

import flax.struct
import jax
import jax.numpy as jnp
from jax.flatten_util import ravel_pytree

from learned_opt.errors import UserError
from outer_train.estimators import antithetic, knobs
from outer_train.estimators.metrics import estimator_metrics
from outer_train.meta_loss import masked_mean
from outer_train.unroll import (
    ParticleState,
    force_reset,
    repeat_members,
    start_particles,
    unroll_particles,
    unroll_particles_grad,
    window_keys,
)


class HybridState(NamedTuple):
    """particles: the unperturbed (center) particles, leaves [num_tasks, ...]."""

    particles: ParticleState


def _masked_variance(x: jax.Array, mean: jax.Array, valid: jax.Array) -> jax.Array:
    """Unbiased per-coordinate variance of rows [N, D] where valid (0 with < 2 valid rows)."""
    count = jnp.sum(valid)
    sq = jnp.sum(jnp.where(valid[:, None], (x - mean) ** 2, 0.0), axis=0)
    return sq / jnp.maximum(count - 1, 1)


@flax.struct.dataclass
class Hybrid(knobs.AntitheticWindowKnobs):
    """Knobs: those of ``knobs.AntitheticWindowKnobs`` (loss shaping acts on the ES side), and
    segment_length of the rematerialized window scan (None: ``unroll.memory_optimal_segment``)."""

    segment_length: int | None = flax.struct.field(pytree_node=False, default=None)

    def __post_init__(self):
        super().__post_init__()
        if self.num_tasks * self.num_perturbations < 2:
            raise UserError(
                "hybrid needs num_tasks * num_perturbations >= 2 to estimate variances, got "
                f"{self.num_tasks} * {self.num_perturbations}"
            )
        knobs.check_segment_length(self.segment_length)

    @property
    def inner_steps_per_estimate(self) -> int:
        return self.num_tasks * (2 * self.num_perturbations + 1) * self.trunc_length

    def init(self, key, theta) -> HybridState:
        return HybridState(start_particles(
            self.problem, key, theta, num_groups=self.num_tasks, group_size=1,
            horizon=self.horizon, staggered=self.staggered, theta_axis=None,
        ))

    def estimate(self, key, theta, state: HybridState):
        g, m = self.num_tasks, self.num_perturbations
        keys = window_keys(key, g, self.trunc_length)
        theta_flat, unravel = ravel_pytree(theta)
        eps = antithetic.sample_noise(keys.noise, g * m, theta_flat, self.sigma)
        thetas = jax.vmap(unravel)(antithetic.member_thetas(theta_flat, eps, g, with_center=False))
        reset_keys, step_keys = repeat_members((keys.reset, keys.step), 2 * m)
        members = repeat_members(state.particles, 2 * m)
        losses, grads, _, _ = unroll_particles_grad(
            self.problem, thetas, members, reset_keys, step_keys,
            horizon=self.horizon, theta_axis=0,
            segment_length=self.segment_length,
        )
        particles, center_trace = unroll_particles(
            self.problem, theta, state.particles, keys.reset, keys.step,
            horizon=self.horizon, theta_axis=None,
        )
        pos_loss, neg_loss, _ = antithetic.split_members(losses, g, m, with_center=False)
        pos_grad, neg_grad, _ = antithetic.split_members(grads, g, m, with_center=False)
        member_ok = jnp.isfinite(losses) & jnp.all(jnp.isfinite(grads), axis=-1)
        pos_ok, neg_ok, _ = antithetic.split_members(member_ok, g, m, with_center=False)
        valid = pos_ok & neg_ok
        delta = antithetic.shape_difference(
            pos_loss - neg_loss, self.loss_shaping, self.shaping_scale
        )
        es = delta[:, None] * eps / (2 * self.sigma**2)
        rp = 0.5 * (pos_grad + neg_grad)
        es_mean, rp_mean = masked_mean(es, valid), masked_mean(rp, valid)
        es_var = _masked_variance(es, es_mean, valid)
        rp_var = _masked_variance(rp, rp_mean, valid)
        total = es_var + rp_var
        # Inverse-variance weights; when neither variance is estimable, weigh equally.
        es_weight = jnp.where(total > 0, rp_var / jnp.where(total > 0, total, 1.0), 0.5)
        meta_grad = es_weight * es_mean + (1 - es_weight) * rp_mean
        center = jnp.mean(center_trace.losses, axis=-1)
        center_valid = jnp.isfinite(center)
        metrics = estimator_metrics(
            meta_loss=masked_mean(center, center_valid),
            num_nonfinite=jnp.sum(~member_ok) + jnp.sum(~center_valid),
            num_resets=jnp.sum(center_trace.after_reset[:, -1]),
            inner_steps=self.inner_steps_per_estimate,
            es_weight=jnp.mean(es_weight),
        )
        return unravel(meta_grad), HybridState(force_reset(particles, ~center_valid)), metrics
