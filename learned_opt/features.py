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

    Concatenated as [n, 1] columns: XLA's CPU backend emits a 1-D ``concatenate`` of differently
    sized operands as a slow per-element loop, and slice updates of one buffer turn into
    scatters under vmap.
    """
    return jnp.concatenate([leaf.reshape(-1, 1) for leaf in jax.tree.leaves(tree)])[:, 0]


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


def _tensor_mean(block: jax.Array, count: jax.Array | None) -> jax.Array:
    """Mean over a leaf's rows [n, k] -> [k]: over all n, or ``sum / count`` when padding rows
    (which are zero) must not count."""
    if count is None:
        return jnp.mean(block, axis=0)
    return jnp.sum(block, axis=0) / count


def _normalized_blocks(layout: FlatLayout, columns: list[jax.Array], eps: float, counts):
    """Per leaf: (rows [n, F] unnormalized, scale [F]) from [P_total, k] column blocks."""
    out = []
    for i, (o, n) in enumerate(zip(layout.offsets, layout.sizes, strict=True)):
        count = None if counts is None else counts[i]
        parts = [c[o : o + n] for c in columns]
        mean_sq = jnp.concatenate([_tensor_mean(jnp.square(part), count) for part in parts])
        out.append((jnp.concatenate(parts, axis=1), jax.lax.rsqrt(mean_sq + eps)))
    return out


def masked_counts(layout: FlatLayout, mask: Any) -> jax.Array:
    """The number of real (mask 1) entries of each leaf of ``mask``, at least 1 (a leaf that is
    all padding has zero features: 0 / 1, not 0 / 0): float32 [num_segments]."""
    check_same_layout(layout, mask, "mask")
    return jnp.stack([jnp.maximum(jnp.sum(leaf), 1.0) for leaf in jax.tree.leaves(mask)])


def _concat_rows(blocks: list[jax.Array]) -> jax.Array:
    return jnp.concatenate(blocks) if len(blocks) > 1 else blocks[0]


def _one_minus(decays: Sequence[float]) -> np.ndarray:
    # 1 - decay in float64 first: float32(1 - float32(0.9999)) is off by 1.7e-4 relative.
    return (1.0 - np.asarray(decays, np.float64)).astype(np.float32)


def _columns(g, params, momenta, decays):
    """(new momenta [P, D], the feature columns [g, params, new momenta] as [P, k] blocks)."""
    new_momenta = momenta * np.asarray(decays, np.float32) + g[:, None] * _one_minus(decays)
    columns = [g[:, None]] + ([params[:, None]] if params is not None else []) + [new_momenta]
    return new_momenta, columns


def momenta_and_features(
    layout: FlatLayout,
    g: jax.Array,
    params: jax.Array | None,
    momenta: jax.Array,
    decays: Sequence[float],
    eps: float,
    counts: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array]:
    """One step of the per-parameter inputs: (features x [P_total, F], new momenta [P_total, D]).

    g, params: float32 [P_total] (params None: not a feature); momenta: [P_total, D].
        m_i <- decay_i * m_i + (1 - decay_i) * g
        x    = [g, params, m_1 .. m_D], each column divided by its per-tensor RMS:
               c_f[p] / sqrt(mean_{q in leaf(p)} c_f[q]**2 + eps).
    counts: None, or float32 [num_segments]: the mean over leaf i is ``sum / counts[i]``, for
    padded tensors whose padding entries of g, params and momenta are zero (``masked_counts``).
    The second moments come from the columns themselves (one small reduction per leaf and
    column: static slices, few leaves), and x is written once, leaf block by leaf block,
    already scaled. ``momenta_and_features_vjp`` is its VJP, written by hand.
    """
    new_momenta, columns = _columns(g, params, momenta, decays)
    blocks = [rows * scale for rows, scale in _normalized_blocks(layout, columns, eps, counts)]
    return _concat_rows(blocks), new_momenta


def momenta_and_features_vjp(
    layout: FlatLayout,
    g: jax.Array,
    params: jax.Array | None,
    momenta: jax.Array,
    decays: Sequence[float],
    eps: float,
    dx: jax.Array,
    d_new_momenta: jax.Array,
    counts: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array | None, jax.Array]:
    """Cotangents (dg, dparams or None, d momenta) of ``momenta_and_features`` at (g, params,
    momenta, counts) for output cotangents (dx, d_new_momenta); recomputes the forward pass.

    JAX's own transpose of the forward turns the momentum broadcast into a reduction over D
    that XLA's CPU backend runs slowly, and saves every leaf's slices as separate residuals.
    """
    _, columns = _columns(g, params, momenta, decays)
    # x = c * s with s = (mean(c^2) + eps)^(-1/2) per leaf and column:
    # dc = dx * s - c * s^3 * mean(dx * c)   (mean over the leaf's real entries)
    dcs = []
    for i, ((rows, scale), dx_block) in enumerate(zip(
        _normalized_blocks(layout, columns, eps, counts), segments(layout, dx), strict=True
    )):
        count = None if counts is None else counts[i]
        mean_dx_c = _tensor_mean(dx_block * rows, count)
        dcs.append(dx_block * scale - rows * (scale**3 * mean_dx_c))
    dc = _concat_rows(dcs)  # [P, F]
    first_momentum = 1 + int(params is not None)
    dm = d_new_momenta + dc[:, first_momentum:]
    # the sum over the D decays as explicit column adds (XLA fuses them; a reduce is slow)
    one_minus = _one_minus(decays)
    dg = dc[:, 0]
    for i in range(len(decays)):
        dg = dg + dm[:, i] * one_minus[i]
    dparams = dc[:, 1] if params is not None else None
    return dg, dparams, dm * np.asarray(decays, np.float32)


def time_features(step: jax.Array, time_scales: Sequence[float]) -> jax.Array:
    """``tanh(step / tau - 1)`` for each tau: int32 [] -> float32 [len(time_scales)]."""
    taus = np.asarray(time_scales, np.float32)
    return jnp.tanh(step.astype(jnp.float32) / taus - 1.0)
