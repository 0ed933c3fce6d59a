"""Per-parameter inputs of learned optimizers, computed on ONE flat view of all params.

A learned optimizer that acts parameter by parameter treats the whole params pytree as one
float32 vector of length ``P_total`` (leaves raveled and concatenated in ``jax.tree`` order):
one matmul chain for all tensors instead of one per leaf. ``FlatLayout`` records, at trace time,
where each leaf lives in that vector, so per-tensor statistics are segment statistics.

Features (REFERENCE.md, "Learned optimizer architecture"):
  * per-parameter features x[p, f] (gradient, parameter, momenta), each normalized by its
    per-tensor second moment: ``x / sqrt(mean_over_tensor(x**2) + eps)``;
  * time features ``tanh(t / tau - 1)``, the same for every parameter at a step.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from learned_opt.errors import UserError

# Metz et al.: 1, 3, 10, 30, ..., 1e5 (11 scales).
DEFAULT_TIME_SCALES: tuple[float, ...] = (
    1.0, 3.0, 10.0, 30.0, 100.0, 300.0, 1e3, 3e3, 1e4, 3e4, 1e5,
)
# Momentum decays of the reference per-parameter MLP.
DEFAULT_DECAYS: tuple[float, ...] = (0.1, 0.5, 0.9, 0.99, 0.999, 0.9999)


class FlatLayout(NamedTuple):
    """Where each leaf of a params pytree lives in the flat [P_total] vector (static, hashable).

    shapes[i], sizes[i], offsets[i]: shape, number of elements and start of leaf i (tree order).
    """

    treedef: Any
    shapes: tuple[tuple[int, ...], ...]
    sizes: tuple[int, ...]
    offsets: tuple[int, ...]

    @property
    def total(self) -> int:
        return self.offsets[-1] + self.sizes[-1] if self.sizes else 0

    @property
    def num_segments(self) -> int:
        return len(self.sizes)


def flat_layout(params: Any, *, what: str = "params") -> FlatLayout:
    """The layout of ``params``; every leaf must be a float32 array (optimizers keep float32)."""
    leaves, treedef = jax.tree.flatten(params)
    if not leaves:
        raise UserError(f"{what} is an empty pytree; pass the model's parameter pytree")
    for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        dtype = getattr(leaf, "dtype", None)
        if dtype != jnp.float32:
            raise UserError(
                f"{what}{jax.tree_util.keystr(path)} has dtype {dtype}; learned optimizers "
                "work in float32: cast with jax.tree.map(lambda x: x.astype(jnp.float32), tree)"
            )
    shapes = tuple(tuple(int(d) for d in leaf.shape) for leaf in leaves)
    sizes = tuple(math.prod(s) for s in shapes)
    offsets = tuple(int(o) for o in np.cumsum((0, *sizes[:-1])))
    return FlatLayout(treedef, shapes, sizes, offsets)


def check_same_layout(layout: FlatLayout, tree: Any, what: str) -> None:
    """Raise UserError unless ``tree`` has ``layout``'s structure, shapes and float32 dtype."""
    other = flat_layout(tree, what=what)
    if other.treedef != layout.treedef or other.shapes != layout.shapes:
        raise UserError(
            f"{what} does not match the params the optimizer state was built for: "
            f"structure/shapes {other.treedef}/{other.shapes} vs {layout.treedef}/{layout.shapes}; "
            "call opt.init(params) with the same params pytree"
        )


def flatten(layout: FlatLayout, tree: Any) -> jax.Array:
    """The raveled leaves of ``tree`` (laid out as ``layout``) end to end: float32 [P_total].

    Written as in-place slice updates of one buffer (a copy per leaf): XLA's CPU backend emits
    a 1-D ``concatenate`` of differently sized operands as a slow per-element loop (measured
    10x slower on the 784-256-256-10 MLP's leaves).
    """
    flat = jnp.zeros((layout.total,), jnp.float32)
    for leaf, offset in zip(jax.tree.leaves(tree), layout.offsets, strict=True):
        flat = jax.lax.dynamic_update_slice(flat, leaf.reshape(-1).astype(jnp.float32), (offset,))
    return flat


def unflatten(layout: FlatLayout, flat: jax.Array) -> Any:
    """Inverse of ``flatten``: [P_total] -> pytree with ``layout``'s structure and shapes."""
    leaves = [
        flat[o : o + n].reshape(s)
        for o, n, s in zip(layout.offsets, layout.sizes, layout.shapes, strict=True)
    ]
    return jax.tree.unflatten(layout.treedef, leaves)


def segments(layout: FlatLayout, x: jax.Array) -> list[jax.Array]:
    """Split rows of ``x`` [P_total, ...] into one block per leaf (static slices)."""
    return [x[o : o + n] for o, n in zip(layout.offsets, layout.sizes, strict=True)]


def segment_rms_scale(layout: FlatLayout, x: jax.Array, eps: float) -> jax.Array:
    """Per-tensor second-moment normalizers: [P_total, F] -> [num_segments, F].

    scale[l, f] = 1 / sqrt(mean_{p in leaf l} x[p, f]**2 + eps), so ``x * scale[leaf(p)]`` is
    the normalized feature. Static slices, not a scatter: a leaf is a contiguous row block and
    there are few leaves, so XLA emits one small reduction per leaf.
    """
    mean_sq = jnp.stack([jnp.mean(jnp.square(block), axis=0) for block in segments(layout, x)])
    return jax.lax.rsqrt(mean_sq + eps)


def scale_segments(layout: FlatLayout, x: jax.Array, scale: jax.Array) -> jax.Array:
    """Row p of ``x`` [P_total, F] times ``scale[leaf(p)]`` ([num_segments, F]) -> [P_total, F].

    A concatenation of per-leaf products (one fused pass), not a gather by a [P_total] index
    constant.
    """
    blocks = [block * scale[i] for i, block in enumerate(segments(layout, x))]
    return jnp.concatenate(blocks) if len(blocks) > 1 else blocks[0]


def time_features(step: jax.Array, time_scales: Sequence[float]) -> jax.Array:
    """``tanh(step / tau - 1)`` for each tau: int32 [] -> float32 [len(time_scales)]."""
    taus = np.asarray(time_scales, np.float32)
    return jnp.tanh(step.astype(jnp.float32) / taus - 1.0)
