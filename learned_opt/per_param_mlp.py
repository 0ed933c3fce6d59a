"""The per-parameter MLP of MLPLOpt as one kernel with a hand-written backward pass.

``forward(weights, x, shared_bias, scales)`` maps normalized per-parameter features
x [N, F] to step sizes [N]:

    h_0 = relu(x @ W_x + c)              c = shared_bias [H_0] (time features, hoisted)
    h_i = relu(h_{i-1} @ W_i + b_i)      i = 1 .. L-1
    (d, m) = h_{L-1} @ W_out + b_out
    step = d * exp(m * exp_mult) * step_mult

``backward`` is its VJP, written by hand (``forward_saving`` is the forward pass that keeps
what it needs); ``step_sizes`` is ``forward`` with ``backward`` as its custom VJP. (MLPLOpt
chains ``backward`` with the feature computation's hand-written VJP into one custom VJP for its
whole update, see ``mlp_lopt._per_param_update``.)

Why by hand: meta-training backpropagates through this millions of times (TBPTT, full backprop,
hybrid), and JAX's automatic transpose of it is slow on CPU: the F-input first layer (F
multiply-adds per unit, the fast forward) transposes into F separate reductions, the 2-output
layer into a badly shaped dot, and every ReLU stores a boolean mask as a residual. Here the
backward is written as ops XLA runs well -- [N, H] x [H, H] matmuls, matrix-vector products,
one fused elementwise pass per layer, column sums -- and saves only x and two floats per row
(``Saved``: the output terms): the activations are recomputed in the backward pass (one more
[N, H] x [H, H] matmul per hidden layer, cheaper on CPU than writing and re-reading [N, H]
activations per layer per step).

Large N (one big model, or many particles' models at once) runs over row tiles (``ROW_TILE``)
so the [tile, H] intermediates stay in cache; the backward pass tiles the same way and sums the
weight gradients over tiles.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

# Rows per tile when N is large: [tile, 32] float32 intermediates are 2 MiB, and stay in cache
# instead of streaming [N, 32] arrays through DRAM once per layer (``bench/lopt_step.py
# --row-tiles`` sweeps it).
ROW_TILE = 16384


class Weights(NamedTuple):
    """first: [F, H_0] per-parameter part of the first layer's kernel; hidden: ((W_i, b_i), ...)
    for layers 1..L-1; out_kernel [H_{L-1}, 2], out_bias [2] (direction, magnitude)."""

    first: jax.Array
    hidden: tuple[tuple[jax.Array, jax.Array], ...]
    out_kernel: jax.Array
    out_bias: jax.Array


class Scales(NamedTuple):
    """Static output scaling: step = d * exp(m * exp_mult) * step_mult."""

    exp_mult: float
    step_mult: float


def _first_layer(first: jax.Array, x: jax.Array, shared_bias: jax.Array) -> jax.Array:
    """[F, H], [N, F], [H] -> pre-activation [N, H] as F multiply-adds per unit: XLA fuses them
    with the bias and the ReLU into one pass (a K = F matmul would be a separate op)."""
    a = shared_bias
    for f in range(first.shape[0]):
        a = a + x[:, f : f + 1] * first[f]
    return a


def _activations(w: Weights, x, shared_bias) -> list[jax.Array]:
    """Post-ReLU activations [h_0, ..., h_{L-1}], each [N, H_i]."""
    hs = [jax.nn.relu(_first_layer(w.first, x, shared_bias))]
    for kernel, bias in w.hidden:
        hs.append(jax.nn.relu(hs[-1] @ kernel + bias))
    return hs


def _outputs(w: Weights, h: jax.Array, scales: Scales):
    """-> (step [N], factor [N], d [N]) with factor = exp(m * exp_mult) * step_mult.
    Kept a [H, 2] dot: written as two row sums, XLA's CPU backend fuses them with the matmul
    before into one slower kernel."""
    out = h @ w.out_kernel + w.out_bias
    d, m = out[:, 0], out[:, 1]
    factor = jnp.exp(m * scales.exp_mult) * scales.step_mult
    return d * factor, factor, d


class Saved(NamedTuple):
    """The output terms the forward pass keeps for the backward: factor [N], d [N] (two floats
    per row). Recomputing them would need the output dot in the backward pass, whose [N, H]
    input XLA then builds a second time (the ReLU of the last hidden layer is fused into each
    of its consumers)."""

    factor: jax.Array
    d: jax.Array


def _forward_rows(w: Weights, x, shared_bias, scales: Scales) -> tuple[jax.Array, Saved]:
    step, factor, d = _outputs(w, _activations(w, x, shared_bias)[-1], scales)
    return step, Saved(factor, d)


def _backward_rows(w: Weights, x, shared_bias, scales: Scales, g, saved: Saved):
    """Cotangents of (w, x, shared_bias) for rows x [N, F] and step cotangent g [N]."""
    hs = _activations(w, x, shared_bias)
    factor, d = saved
    dd = g * factor  # d step / d d = factor
    dm = g * d * factor * scales.exp_mult  # d step / d m
    # two matrix-vector products: as one [H, N] x [N, 2] dot, batched over particles (vmap),
    # XLA's CPU backend runs much slower
    d_out_kernel = jnp.stack([hs[-1].T @ dd, hs[-1].T @ dm], axis=-1)
    d_out_bias = jnp.stack([jnp.sum(dd), jnp.sum(dm)])
    # through the last ReLU: fused multiply-adds of the two output columns, masked
    dh = (dd[:, None] * w.out_kernel[:, 0] + dm[:, None] * w.out_kernel[:, 1]) * (hs[-1] > 0)
    d_hidden = []
    for i in range(len(w.hidden), 0, -1):
        kernel, _ = w.hidden[i - 1]
        d_hidden.append((hs[i - 1].T @ dh, jnp.sum(dh, axis=0)))
        dh = (dh @ kernel.T) * (hs[i - 1] > 0)
    d_first = x.T @ dh
    dx = dh @ w.first.T
    d_shared_bias = jnp.sum(dh, axis=0)
    dw = Weights(d_first, tuple(reversed(d_hidden)), d_out_kernel, d_out_bias)
    return dw, dx, d_shared_bias


def _tiling(n: int, tile: int) -> tuple[int, int]:
    """(num_tiles, rows per tile): near-equal tiles, a multiple of 8 rows; (1, n) if one fits."""
    if n <= tile:
        return 1, n
    num_tiles = -(-n // tile)
    rows = -(-n // (num_tiles * 8)) * 8
    return (1, n) if rows >= n else (num_tiles, rows)


def _tile_start(i, rows: int, n: int):
    """Start row of tile i; the last tile is shifted back to end at row n (it recomputes a few
    rows of the previous tile instead of padding)."""
    return jnp.minimum(i * rows, n - rows)


def _tiled_forward(rows_fn, w: Weights, x: jax.Array, shared_bias, scales: Scales):
    """``rows_fn(w, x rows, shared_bias, scales)`` (a pytree of [rows] arrays) over row tiles."""
    n = x.shape[0]
    num_tiles, rows = _tiling(n, ROW_TILE)
    if num_tiles == 1:
        return rows_fn(w, x, shared_bias, scales)

    def body(i, out):
        start = _tile_start(i, rows, n)
        tile = rows_fn(w, lax.dynamic_slice_in_dim(x, start, rows), shared_bias, scales)
        return jax.tree.map(
            lambda a, b: lax.dynamic_update_slice_in_dim(a, b, start, axis=0), out, tile
        )

    shapes = jax.eval_shape(rows_fn, w, x, shared_bias, scales)
    zeros = jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), shapes)
    return lax.fori_loop(0, num_tiles, body, zeros)


def forward(w: Weights, x: jax.Array, shared_bias: jax.Array, scales: Scales) -> jax.Array:
    """Step sizes [N] of rows x [N, F] (see the module docstring); row tiles when N is large."""
    return _tiled_forward(lambda *args: _forward_rows(*args)[0], w, x, shared_bias, scales)


def forward_saving(
    w: Weights, x: jax.Array, shared_bias: jax.Array, scales: Scales
) -> tuple[jax.Array, Saved]:
    """``forward`` and what ``backward`` needs besides the inputs: (step sizes [N], Saved)."""
    return _tiled_forward(_forward_rows, w, x, shared_bias, scales)


def backward(
    w: Weights, x: jax.Array, shared_bias: jax.Array, scales: Scales, g: jax.Array,
    saved: Saved,
):
    """Cotangents (d weights, dx [N, F], d shared_bias [H_0]) of ``forward`` for the step
    cotangent g [N], given ``forward_saving``'s ``saved``; the activations are recomputed,
    tile by tile."""
    n = x.shape[0]
    num_tiles, rows = _tiling(n, ROW_TILE)
    if num_tiles == 1:
        return _backward_rows(w, x, shared_bias, scales, g, saved)

    def body(i, carry):
        dw, dx, dc = carry
        start = _tile_start(i, rows, n)
        # rows before i * rows belong to the previous tile (the last tile is shifted back):
        # a zero cotangent keeps them out of the weight gradients, and their dx rows, already
        # written, are kept
        fresh = start + jnp.arange(rows) >= i * rows
        g_tile = jnp.where(fresh, lax.dynamic_slice_in_dim(g, start, rows), 0.0)
        x_tile, saved_tile = jax.tree.map(
            lambda a: lax.dynamic_slice_in_dim(a, start, rows), (x, saved)
        )
        dw_tile, dx_tile, dc_tile = _backward_rows(
            w, x_tile, shared_bias, scales, g_tile, saved_tile
        )
        dx_tile = jnp.where(fresh[:, None], dx_tile, lax.dynamic_slice_in_dim(dx, start, rows))
        dx = lax.dynamic_update_slice_in_dim(dx, dx_tile, start, axis=0)
        return jax.tree.map(jnp.add, dw, dw_tile), dx, dc + dc_tile

    zeros = (jax.tree.map(jnp.zeros_like, w), jnp.zeros_like(x), jnp.zeros_like(shared_bias))
    return lax.fori_loop(0, num_tiles, body, zeros)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def step_sizes(w: Weights, x: jax.Array, shared_bias: jax.Array, scales: Scales) -> jax.Array:
    """``forward`` with ``backward`` as its VJP (saves the inputs and ``Saved``)."""
    return forward(w, x, shared_bias, scales)


def _step_sizes_fwd(w, x, shared_bias, scales):
    step, saved = forward_saving(w, x, shared_bias, scales)
    return step, (w, x, shared_bias, saved)


def _step_sizes_bwd(scales, residuals, g):
    w, x, shared_bias, saved = residuals
    return backward(w, x, shared_bias, scales, g, saved)


step_sizes.defvjp(_step_sizes_fwd, _step_sizes_bwd)
