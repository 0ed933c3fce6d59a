"""The metrics every estimator returns (scalar arrays; logged on the host by the caller)."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def estimator_metrics(
    *, meta_loss: jax.Array, num_nonfinite: jax.Array, num_resets: jax.Array, inner_steps: int,
    **extra: jax.Array,
) -> dict[str, jax.Array]:
    """meta_loss: mean window meta-loss of the particles kept (NaN if none);
    num_nonfinite: particle unrolls whose loss or gradient was non-finite (dropped, reset);
    num_resets: inner problems (tasks) that started a new episode inside the window;
    inner_steps: particle inner steps run by this estimate (a constant)."""
    return {
        "meta_loss": jnp.asarray(meta_loss),
        "num_nonfinite": jnp.asarray(num_nonfinite, jnp.int32),
        "num_resets": jnp.asarray(num_resets, jnp.int32),
        "inner_steps": jnp.asarray(inner_steps, jnp.int32),
        **{k: jnp.asarray(v) for k, v in extra.items()},
    }


def finite_unrolls(losses: jax.Array) -> jax.Array:
    """bool [P]: every step loss of the particle's window [P, K] is finite."""
    return jnp.all(jnp.isfinite(losses), axis=-1)


def finite_backprop(losses: jax.Array, grads: jax.Array) -> jax.Array:
    """bool [P]: the particle's window loss [P] and flat gradient [P, D] are finite."""
    return jnp.isfinite(losses) & jnp.all(jnp.isfinite(grads), axis=-1)
