"""Map a jitted function over chunks of a leading axis, with a bounded number of calls in flight.

``map_chunks(fn, inputs, chunk_size=C)`` evaluates ``fn`` on rows [0, C), [C, 2C), ... of every
leaf of ``inputs`` and returns the concatenated outputs as host (NumPy) arrays, as if ``fn`` had
been applied to all N rows at once (``fn`` must act on rows independently: output row i depends
on input row i only).

Why bounded: with several XLA CPU devices, an unbounded queue of multi-device calls deadlocks
XLA's cross-device all-reduce (``in_flight`` says more). The calls go through
``in_flight.bounded``, which fetches each result (``placement.to_host``: across processes, a
result split over their devices is gathered whole in each) before more than ``max_in_flight``
calls are queued; two in flight still overlap the host's work (slicing, transfers) with the
devices'.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from outer_train.in_flight import bounded


def _num_rows(inputs: Any) -> int:
    leaves = jax.tree.leaves(inputs)
    if not leaves:
        raise ValueError("map_chunks: inputs has no array leaves")
    sizes = {np.shape(x)[0] if np.ndim(x) else None for x in leaves}
    if None in sizes or len(sizes) != 1:
        shapes = [np.shape(x) for x in leaves]
        raise ValueError(f"map_chunks: every input leaf needs the same leading axis; got {shapes}")
    (n,) = sizes
    if n == 0:
        raise ValueError("map_chunks: inputs have 0 rows")
    return n


def _chunk(x, *, start: int, stop: int, size: int):
    """Rows [start, stop) of x, padded to ``size`` rows by repeating the last row."""
    rows = x[start:stop]
    pad = size - (stop - start)
    if pad == 0:
        return rows
    xp = np if isinstance(x, np.ndarray) else jnp
    return xp.concatenate([rows, xp.repeat(rows[-1:], pad, axis=0)], axis=0)


def map_chunks(
    fn: Callable[[Any], Any],
    inputs: Any,
    *,
    chunk_size: int,
    max_in_flight: int = 2,
    on_chunk: Callable[[int], None] | None = None,
) -> Any:
    """``fn`` over chunks of the leading axis of ``inputs``; outputs concatenated on the host.

    inputs: a pytree whose leaves (NumPy or JAX arrays) share a leading axis of N >= 1 rows.
    fn: maps a chunk (the same pytree with leading axis ``chunk_size``) to a pytree whose leaves
      all have leading axis ``chunk_size`` (row i of the output belongs to row i of the input).
      Usually jitted: every call sees the same shapes (the last chunk is padded), so it compiles
      once.
    chunk_size: rows per call; ceil(N / chunk_size) calls. The last chunk is padded to
      ``chunk_size`` rows by repeating its last row; the padded rows' outputs are dropped.
    max_in_flight: at most this many calls are dispatched and not yet fetched
      (``in_flight.bounded``: the oldest result is fetched with ``placement.to_host`` first;
      unbounded queues of multi-device calls deadlock XLA's CPU all-reduce).
    on_chunk: called as ``on_chunk(num_rows_done)`` (rows of ``inputs`` finished so far,
      padding excluded) after each fetch, in order -- e.g. to advance a progress bar.

    Returns ``fn``'s output structure with NumPy leaves of leading axis N (rows in input order).
    """
    if chunk_size < 1:
        raise ValueError(f"map_chunks: chunk_size must be >= 1, got {chunk_size}")
    if max_in_flight < 1:
        raise ValueError(f"map_chunks: max_in_flight must be >= 1, got {max_in_flight}")
    n = _num_rows(inputs)

    def calls():  # lazy: each next() slices one chunk and dispatches its call
        for i in range(math.ceil(n / chunk_size)):
            start, stop = i * chunk_size, min((i + 1) * chunk_size, n)
            chunk = jax.tree.map(
                functools.partial(_chunk, start=start, stop=stop, size=chunk_size), inputs
            )
            yield stop, fn(chunk)

    done: list[Any] = []
    rows_done = 0
    for stop, out in bounded(calls(), max_in_flight=max_in_flight):
        for x in jax.tree.leaves(out):
            if np.ndim(x) == 0 or np.shape(x)[0] != chunk_size:
                raise ValueError(
                    f"map_chunks: every output leaf of fn needs leading axis chunk_size = "
                    f"{chunk_size}; got shape {np.shape(x)}"
                )
        rows = stop - rows_done  # the real rows of this chunk, padding dropped
        done.append(jax.tree.map(lambda x, rows=rows: np.asarray(x)[:rows], out))
        rows_done = stop
        if on_chunk is not None:
            on_chunk(rows_done)
    return jax.tree.map(lambda *xs: np.concatenate(xs, axis=0), *done)
