"""chunked.map_chunks: same numbers as one call on the whole input, padding dropped, one
compilation, a bounded number of calls in flight, and no XLA CPU all-reduce deadlock over many
chunks on 2 devices."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from outer_train import chunked
from outer_train.chunked import map_chunks

REPO = Path(__file__).resolve().parents[2]


def _rows(tree):
    """A row-wise function of a pytree input (row i of the output depends on row i only)."""
    x, y = tree["x"], tree["y"]
    return {"sum": jnp.sum(jnp.sin(x), axis=1) * y, "scaled": x * y[:, None]}


ROWS = jax.jit(_rows)


def _inputs(n: int, as_jax: bool = False):
    rng = np.random.default_rng(n)
    tree = {"x": rng.normal(size=(n, 3)).astype(np.float32),
            "y": rng.normal(size=(n,)).astype(np.float32)}
    return jax.tree.map(jnp.asarray, tree) if as_jax else tree


@pytest.mark.parametrize(
    ("n", "chunk_size"),
    [(12, 4), (10, 4), (3, 8), (1, 1), (7, 7)],
    ids=["multiple", "not-multiple", "smaller-than-chunk", "one-row", "one-chunk"],
)
def test_results_equal_fn_on_the_whole_input(n, chunk_size):
    inputs = _inputs(n)
    progress = []
    out = map_chunks(ROWS, inputs, chunk_size=chunk_size, on_chunk=progress.append)
    want = jax.device_get(ROWS(inputs))
    assert set(out) == {"sum", "scaled"}
    for name in out:
        assert isinstance(out[name], np.ndarray) and out[name].shape == want[name].shape
        np.testing.assert_allclose(out[name], want[name], rtol=1e-6, atol=1e-7)
    # one on_chunk per chunk, with the rows done so far (padding excluded)
    assert progress == [min((i + 1) * chunk_size, n) for i in range(-(-n // chunk_size))]


def test_jax_array_inputs_and_max_in_flight_one():
    inputs = _inputs(9, as_jax=True)
    out = map_chunks(ROWS, inputs, chunk_size=2, max_in_flight=1)
    np.testing.assert_allclose(out["sum"], np.asarray(ROWS(inputs)["sum"]), rtol=1e-6)


def test_padding_repeats_the_last_row_so_every_call_has_one_shape():
    seen = []

    def fn(chunk):
        seen.append(np.asarray(chunk).copy())
        return chunk

    out = map_chunks(fn, np.arange(5.0), chunk_size=4)
    np.testing.assert_array_equal(out, np.arange(5.0))
    np.testing.assert_array_equal(seen[1], [4.0, 4.0, 4.0, 4.0])
    assert {s.shape for s in seen} == {(4,)}


def test_a_jitted_fn_is_traced_once_for_many_chunks():
    traces = []

    @jax.jit
    def fn(x):
        traces.append(x.shape)  # a Python side effect: runs at trace time only
        return 2.0 * x

    x = np.arange(50, dtype=np.float32)
    out = map_chunks(fn, x, chunk_size=7)  # 8 chunks, the last padded from 1 row to 7
    np.testing.assert_array_equal(out, 2.0 * x)
    assert traces == [(7,)]


def test_at_most_max_in_flight_results_are_unfetched(monkeypatch):
    state = {"dispatched": 0, "fetched": 0, "max_unfetched": 0}
    real_get = jax.device_get

    def fn(x):
        state["dispatched"] += 1
        unfetched = state["dispatched"] - state["fetched"]
        state["max_unfetched"] = max(state["max_unfetched"], unfetched)
        return x + 1.0

    def counting_get(tree):
        state["fetched"] += 1
        return real_get(tree)

    monkeypatch.setattr(chunked.jax, "device_get", counting_get)
    out = map_chunks(fn, np.zeros(20, np.float32), chunk_size=2, max_in_flight=3)
    np.testing.assert_array_equal(out, np.ones(20))
    assert state["dispatched"] == state["fetched"] == 10
    assert state["max_unfetched"] == 3


def test_bad_inputs_and_outputs_are_rejected():
    with pytest.raises(ValueError, match="same leading axis"):
        map_chunks(ROWS, {"x": np.zeros((3, 3)), "y": np.zeros(4)}, chunk_size=2)
    with pytest.raises(ValueError, match="0 rows"):
        map_chunks(ROWS, {"x": np.zeros((0, 3)), "y": np.zeros(0)}, chunk_size=2)
    with pytest.raises(ValueError, match="leading axis chunk_size"):
        map_chunks(lambda x: jnp.sum(x), np.zeros(4), chunk_size=2)
    with pytest.raises(ValueError, match="chunk_size"):
        map_chunks(ROWS, _inputs(3), chunk_size=0)
    with pytest.raises(ValueError, match="max_in_flight"):
        map_chunks(ROWS, _inputs(3), chunk_size=1, max_in_flight=0)


# Each call reduces over an axis split across the 2 devices (an all-reduce). Dispatched without
# waiting (max_in_flight=1000) this very script aborts in XLA's rendezvous after 40 s
# ("Expected 2 threads to join the rendezvous"); bounded it takes ~1 s.
_MANY_CHUNKS_SCRIPT = """
import os
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
import jax, jax.numpy as jnp, numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from outer_train.chunked import map_chunks

assert len(jax.devices()) == 2, jax.devices()
mesh = Mesh(np.asarray(jax.devices()), ("p",))
split = NamedSharding(mesh, P(None, "p"))  # axis 1 (size 2): one half per device
w = jax.device_put(0.5 * jnp.eye(256), NamedSharding(mesh, P()))

@jax.jit
def fn(x, w):
    z = jnp.broadcast_to(x[:, :, None, :], (x.shape[0], 2, 256, 256))
    return jnp.sum(jnp.tanh(z @ w), axis=(1, 2, 3)) / 256  # sums the split axis: all-reduce

x = np.random.default_rng(0).normal(size=(150 * 4 + 1, 2, 256)).astype(np.float32)
hlo = fn.lower(jax.device_put(x[:4], split), w).compile().as_text()
assert "all-reduce" in hlo
calls = []
out = map_chunks(lambda c: fn(jax.device_put(c, split), w), x, chunk_size=4,
                 on_chunk=calls.append)
assert len(calls) == 151, len(calls)
want = np.tanh(0.5 * x).sum(axis=(1, 2))
np.testing.assert_allclose(out, want, rtol=1e-5, atol=1e-4)
print("ok", len(calls))
"""


@pytest.mark.slow
def test_many_chunks_of_a_cross_device_reduction_do_not_deadlock():
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2",
               JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, "-c", _MANY_CHUNKS_SCRIPT], env=env,
                          capture_output=True, text=True, cwd=REPO, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip() == "ok 151", proc.stdout
