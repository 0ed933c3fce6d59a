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

from typing import ClassVar, NamedTuple

import flax.struct
import jax
import jax.numpy as jnp
from jax.flatten_util import ravel_pytree

from learned_opt.errors import UserError
from outer_train.estimators import antithetic, knobs
from outer_train.estimators.metrics import estimator_metrics, finite_backprop
from outer_train.estimators.template import perturbed_thetas, start_centers
from outer_train.meta_loss import masked_mean
from outer_train.unroll import (
    ParticleState,
    force_reset,
    repeat_members,
    unroll_particles,
    unroll_particles_grad,
    window_keys,
)


class HybridState(NamedTuple):
    """particles: the unperturbed (center) particles, leaves [num_tasks, ...]."""

    particles: ParticleState


def masked_variance(x: jax.Array, mean: jax.Array, valid: jax.Array) -> jax.Array:
    """Unbiased per-coordinate variance of rows [N, D] where valid (0 with < 2 valid rows)."""
    count = jnp.sum(valid)
    sq = jnp.sum(jnp.where(valid[:, None], (x - mean) ** 2, 0.0), axis=0)
    return sq / jnp.maximum(count - 1, 1)


def inverse_variance_combine(
    es: jax.Array, rp: jax.Array, valid: jax.Array
) -> tuple[jax.Array, jax.Array]:
    """(g [D], es_weight [D]) from per-pair estimates es, rp [N, D] over the valid pairs:
    g_j = w_j mean(es)_j + (1 - w_j) mean(rp)_j, w_j = v_rp_j / (v_es_j + v_rp_j), i.e. the
    inverse-variance weighting of the module docstring; w_j = 1/2 when both variances are 0."""
    es_mean, rp_mean = masked_mean(es, valid), masked_mean(rp, valid)
    es_var = masked_variance(es, es_mean, valid)
    rp_var = masked_variance(rp, rp_mean, valid)
    total = es_var + rp_var
    es_weight = jnp.where(total > 0, rp_var / jnp.where(total > 0, total, 1.0), 0.5)
    return es_weight * es_mean + (1 - es_weight) * rp_mean, es_weight


@flax.struct.dataclass
class Hybrid(knobs.AntitheticWindowKnobs):
    """Knobs: those of ``knobs.AntitheticWindowKnobs`` (loss shaping acts on the ES side), and
    segment_length of the rematerialized window scan (None: ``unroll.memory_optimal_segment``)."""

    name: ClassVar[str] = "hybrid"
    segment_length: int | None = knobs.knob(None)

    @classmethod
    def check_knobs(cls, values) -> None:
        super().check_knobs(values)
        if values["num_tasks"] * values["num_perturbations"] < 2:
            raise UserError(
                "hybrid needs num_tasks * num_perturbations >= 2 to estimate variances, got "
                f"{values['num_tasks']} * {values['num_perturbations']}"
            )

    @property
    def inner_steps_per_estimate(self) -> int:
        return self.num_tasks * (2 * self.num_perturbations + 1) * self.trunc_length

    def init(self, key, theta) -> HybridState:
        return HybridState(start_centers(self, key, theta))

    def estimate(self, key, theta, state: HybridState):
        g, m = self.num_tasks, self.num_perturbations
        keys = window_keys(key, g, self.trunc_length)
        theta_flat, unravel = ravel_pytree(theta)
        eps = antithetic.sample_noise(keys.noise, g * m, theta_flat, self.sigma)
        thetas = perturbed_thetas(theta_flat, unravel, eps, g, with_center=False)
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
        split = lambda x: antithetic.split_members(x, g, m, with_center=False)[:2]
        (pos_loss, neg_loss), (pos_grad, neg_grad) = split(losses), split(grads)
        member_ok = finite_backprop(losses, grads)
        pos_ok, neg_ok = split(member_ok)
        valid = pos_ok & neg_ok
        delta = antithetic.shape_difference(
            pos_loss - neg_loss, self.loss_shaping, self.shaping_scale
        )
        es = delta[:, None] * eps / (2 * self.sigma**2)
        rp = 0.5 * (pos_grad + neg_grad)
        meta_grad, es_weight = inverse_variance_combine(es, rp, valid)
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
