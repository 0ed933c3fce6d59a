"""Deterministic dataset splits that do not depend on any RNG library's stream.

A split must be the same on every machine and every NumPy/JAX version, or results cannot be
replayed. So the permutation is an ``argsort`` of a fixed integer hash (SplitMix64) of the
example index mixed with a seed: pure uint64 arithmetic, no generator state.
"""

from __future__ import annotations

import numpy as np

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_MIX1 = np.uint64(0xBF58476D1CE4E5B9)
_MIX2 = np.uint64(0x94D049BB133111EB)


def _splitmix64(x: np.ndarray) -> np.ndarray:
    """SplitMix64 finalizer on a uint64 array (wrap-around arithmetic is intended)."""
    x = x + _GOLDEN
    x = (x ^ (x >> np.uint64(30))) * _MIX1
    x = (x ^ (x >> np.uint64(27))) * _MIX2
    return x ^ (x >> np.uint64(31))


def stable_permutation(n: int, seed: int) -> np.ndarray:
    """A permutation of ``range(n)`` (int64 [n]) fixed by ``seed``, identical on every platform."""
    salt = _splitmix64(np.full(1, seed, dtype=np.uint64))
    keys = _splitmix64(np.arange(n, dtype=np.uint64) ^ salt)
    return np.argsort(keys, kind="stable")


def carve(n: int, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Split indices ``0..n-1`` into ``(kept, carved)``.

    ``carved`` holds ``round(fraction * n)`` indices chosen by ``stable_permutation(n, seed)``;
    ``kept`` holds the other ``n - round(fraction * n)``. Both are sorted ascending (the source
    order is kept) and together they partition ``range(n)``. Raises ``ValueError`` when either
    part would be empty.
    """
    num_carved = round(fraction * n)
    if not 0 < num_carved < n:
        raise ValueError(
            f"cannot carve {fraction:.3g} of {n} examples: both parts must be non-empty"
        )
    perm = stable_permutation(n, seed)
    return np.sort(perm[num_carved:]), np.sort(perm[:num_carved])
