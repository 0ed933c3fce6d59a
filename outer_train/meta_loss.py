"""Meta-loss hygiene: turn a raw task loss into a bounded per-step meta-loss, and flag non-finite.

REFERENCE.md: clip the task loss at ``loss_clip`` (1.5 log(num_classes) for classification) so one
diverging inner run cannot dominate the meta-gradient, and *report* NaN/inf rather than silently
zeroing it. Every transform here maps a non-finite raw loss to NaN -- clipping alone would turn
``+inf`` into ``loss_clip`` and hide a divergence -- so the unroll engine sees it, counts it, drops
the affected particle's contribution and resets that particle.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

# name -> one-line meaning (shown in error messages and docs).
LOSS_TRANSFORMS: dict[str, str] = {
    "none": "the raw loss",
    "clip": "min(loss, loss_clip)",
    "log": "log(min(loss, loss_clip)); the paper's mean log-loss meta-objective",
    "normalized": "min(loss, loss_clip) / loss_clip, in [0, 1] for non-negative losses",
}

# Floor inside the log transform: a loss of exactly 0 would give -inf, a false "non-finite".
_LOG_FLOOR = 1e-8


def transform_loss(loss: jax.Array, *, kind: str, loss_clip: float) -> jax.Array:
    """Per-step meta-loss from a raw task loss (any shape; elementwise).

    kind: one of ``LOSS_TRANSFORMS``. Non-finite ``loss`` -> NaN for every kind. The clip has
    zero gradient above ``loss_clip`` (a diverged run stops pulling on theta), as in the paper.
    """
    if kind not in LOSS_TRANSFORMS:
        raise ValueError(f"unknown loss transform {kind!r}; use one of {sorted(LOSS_TRANSFORMS)}")
    finite = jnp.isfinite(loss)
    if kind == "none":
        out = loss
    elif kind == "clip":
        out = jnp.minimum(loss, loss_clip)
    elif kind == "log":
        out = jnp.log(jnp.clip(loss, _LOG_FLOOR, loss_clip))
    else:  # normalized
        out = jnp.minimum(loss, loss_clip) / loss_clip
    return jnp.where(finite, out, jnp.nan)


def all_finite(tree) -> jax.Array:
    """Scalar bool: every element of every leaf of ``tree`` is finite (vmap for a per-row flag)."""
    leaves = jax.tree.leaves(tree)
    if not leaves:
        return jnp.asarray(True)
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves]))


def masked_mean(x: jax.Array, valid: jax.Array) -> jax.Array:
    """Mean of ``x`` [N, ...] over the rows where ``valid`` [N] is True.

    Invalid rows are *dropped* (excluded from the sum and the count), never averaged in as
    zeros. With no valid row the result is NaN -- "no information" -- so the caller's explicit
    policy (skip the update, count it) applies; it is never a silent zero.
    """
    valid = valid.astype(bool)
    count = jnp.sum(valid)
    mask = valid.reshape(valid.shape + (1,) * (x.ndim - 1))
    total = jnp.sum(jnp.where(mask, x, 0), axis=0)
    return jnp.where(count > 0, total / jnp.maximum(count, 1), jnp.nan)
