"""Layout and formulas of the antithetic ES family (es, truncated_es, pes, nres, hybrid).

Layout: G tasks (groups) x M perturbations. Within a group, the particles are
``[pos_1..pos_M, neg_1..neg_M]`` (+ ``center`` for estimators that carry the unperturbed state);
all members of a group share reset and step keys, so + and - see the same data and inits.
Perturbations eps ~ N(0, sigma^2 I) live as flat vectors [G*M, D] in ``ravel_pytree(theta)``
order; pair i = (g, m) is row g*M + m.

Estimate of one pair (REFERENCE.md; 1/sigma^2 overall, not 1/(2 sigma)):
    g_i = (L_i^+ - L_i^-) eps_i / (2 sigma^2),   g = mean_i g_i = 1/(N sigma^2) sum_{N/2 pairs}
The mean runs over the valid pairs only (both members finite); with none it is NaN.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from outer_train.meta_loss import masked_mean

# name -> meaning; applied to each loss difference (L+ - L-) before it multiplies the noise.
LOSS_SHAPINGS: dict[str, str] = {
    "none": "the raw difference",
    "sign": "shaping_scale * sign(difference): robust to outlier losses, biased",
    "clip": "difference clipped to [-shaping_scale, shaping_scale]",
}


def sample_noise(key: jax.Array, num_pairs: int, theta_flat: jax.Array, sigma: float) -> jax.Array:
    """eps [num_pairs, D] ~ N(0, sigma^2 I), in theta's dtype."""
    shape = (num_pairs, theta_flat.shape[0])
    return sigma * jax.random.normal(key, shape, theta_flat.dtype)


def member_thetas(
    theta_flat: jax.Array, eps: jax.Array, num_groups: int, *, with_center: bool
) -> jax.Array:
    """Flat thetas [G*S, D] group-major: per group theta + eps_m, theta - eps_m (, theta)."""
    num_pairs, dim = eps.shape
    eps = eps.reshape(num_groups, num_pairs // num_groups, dim)
    parts = [theta_flat + eps, theta_flat - eps]
    if with_center:
        parts.append(jnp.broadcast_to(theta_flat, (num_groups, 1, dim)))
    return jnp.concatenate(parts, axis=1).reshape(-1, dim)


def split_members(x: jax.Array, num_groups: int, num_perturbations: int, *, with_center: bool):
    """Per-particle rows [G*S, ...] -> (pos [G*M, ...], neg [G*M, ...], center [G, ...] | None)."""
    m = num_perturbations
    x = x.reshape(num_groups, -1, *x.shape[1:])
    pos = x[:, :m].reshape(-1, *x.shape[2:])
    neg = x[:, m : 2 * m].reshape(-1, *x.shape[2:])
    center = x[:, 2 * m] if with_center else None
    return pos, neg, center


def shape_difference(delta: jax.Array, kind: str, scale: float) -> jax.Array:
    """Loss-difference shaping (``LOSS_SHAPINGS``); NaN stays NaN (the pair is dropped later)."""
    if kind == "sign":
        return scale * jnp.sign(delta)
    if kind == "clip":
        return jnp.clip(delta, -scale, scale)
    return delta


def split_difference(
    pos_losses: jax.Array, neg_losses: jax.Array, after_reset: jax.Array
) -> tuple[jax.Array, jax.Array]:
    """Window-mean loss difference of each pair [N, K] -> (before [N], after [N]) the reset.

    The two parts belong to different episodes and so multiply different noise (PES, NRES);
    before + after = mean_k (L+_k - L-_k).
    """
    delta = (pos_losses - neg_losses) / pos_losses.shape[-1]
    before = jnp.sum(jnp.where(after_reset, 0.0, delta), axis=-1)
    after = jnp.sum(jnp.where(after_reset, delta, 0.0), axis=-1)
    return before, after


def pair_valid(pos_losses: jax.Array, neg_losses: jax.Array) -> jax.Array:
    """bool [N]: both members' window losses [N, K] are finite."""
    return jnp.all(jnp.isfinite(pos_losses) & jnp.isfinite(neg_losses), axis=-1)


def group_any(flags: jax.Array, num_groups: int) -> jax.Array:
    """bool [G]: any of a group's rows (laid out group-major) is set."""
    return jnp.any(flags.reshape(num_groups, -1), axis=1)


def antithetic_gradient(
    delta: jax.Array, noise: jax.Array, valid: jax.Array, sigma: float
) -> jax.Array:
    """1/(2 sigma^2) mean_{valid i} delta_i noise_i: flat [D] from differences [N], noise [N, D]."""
    return masked_mean(delta[:, None] * noise, valid) / (2 * sigma**2)


def split_antithetic_gradient(
    before: jax.Array,
    after: jax.Array,
    noise_before: jax.Array,
    noise_after: jax.Array,
    valid: jax.Array,
    sigma: float,
) -> jax.Array:
    """1/(2 sigma^2) mean_{valid i} (before_i noise_before_i + after_i noise_after_i), flat [D].

    For a window that a reset splits into two episodes (``split_difference``): each part of a
    pair's loss difference [N] multiplies the noise [N, D] of its own episode (PES, NRES).
    """
    samples = before[:, None] * noise_before + after[:, None] * noise_after
    return masked_mean(samples, valid) / (2 * sigma**2)


def pair_meta_loss(pos_losses: jax.Array, neg_losses: jax.Array, valid: jax.Array) -> jax.Array:
    """Mean over valid pairs of (L+ + L-) / 2, the window-mean losses [N, K] of both members."""
    return masked_mean(0.5 * jnp.mean(pos_losses + neg_losses, axis=-1), valid)
