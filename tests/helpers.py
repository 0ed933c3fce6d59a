"""Helpers shared by several test modules (imported as ``helpers``: pytest puts tests/ on the
path)."""

from __future__ import annotations

import jax
import numpy as np


def bitwise_equal(a, b) -> bool:
    """Same tree structure and every leaf identical bit for bit (PRNG keys by their key data)."""

    def leaf(x, y):
        if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
            x, y = jax.random.key_data(x), jax.random.key_data(y)
        x, y = np.asarray(x), np.asarray(y)
        return x.dtype == y.dtype and x.shape == y.shape and x.tobytes() == y.tobytes()

    return jax.tree.structure(a) == jax.tree.structure(b) and all(
        jax.tree.leaves(jax.tree.map(leaf, a, b))
    )
