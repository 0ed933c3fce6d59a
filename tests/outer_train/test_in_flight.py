"""in_flight: the bound on dispatched, un-fetched calls (exact counts, order, laziness), and
loops on 2 host devices that would deadlock XLA's CPU all-reduce unbounded finish bounded: a
carry loop like meta-training's through ``InFlight``, and meta-training itself, > 300 steps."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from outer_train.in_flight import InFlight, bounded
from outer_train.logging import read_records

REPO = Path(__file__).resolve().parents[2]
TWO_DEVICES = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2",
                   JAX_PLATFORMS="cpu")


@pytest.fixture
def counted(monkeypatch):
    """Counts fetches (``jax.device_get``, which ``in_flight``'s ``placement.to_host`` calls once
    per output of this process's devices)."""
    fetched = []
    real_get = jax.device_get

    def counting_get(tree):
        fetched.append(tree)
        return real_get(tree)

    monkeypatch.setattr(jax, "device_get", counting_get)
    return fetched


@pytest.mark.parametrize("max_in_flight", [1, 2, 3])
def test_put_fetches_the_oldest_to_keep_the_bound(counted, max_in_flight):
    queue = InFlight(max_in_flight)
    returned = []
    for i in range(7):
        returned += queue.put(jnp.asarray(i))
        # max_in_flight - 1 left outstanding: at most max_in_flight while the next dispatches
        assert len(queue) == min(i + 1, max_in_flight - 1)
    returned += queue.drain()
    assert len(queue) == 0
    assert [int(x) for x in returned] == list(range(7))  # each once, in dispatch order
    assert all(isinstance(x, np.ndarray) for x in returned)  # host values
    assert len(counted) == 7


def test_max_in_flight_one_returns_the_call_just_put_fetched():
    (out,) = InFlight(1).put({"loss": jnp.float32(2.0)})
    assert isinstance(out["loss"], np.ndarray) and float(out["loss"]) == 2.0


def test_bounded_dispatches_lazily_at_most_max_in_flight_ahead(counted):
    dispatched = []

    def calls():
        for i in range(10):
            dispatched.append(i)
            # outstanding while this call is dispatched: dispatched and not yet fetched
            assert len(dispatched) - len(counted) <= 3
            yield jnp.asarray(i) * 2

    seen = []
    for out in bounded(calls(), max_in_flight=3):
        seen.append(int(out))
        assert len(dispatched) - len(seen) <= 2  # the consumer runs while later calls do
    assert seen == [2 * i for i in range(10)]


def test_max_in_flight_below_one_is_rejected():
    with pytest.raises(ValueError, match="max_in_flight must be >= 1, got 0"):
        InFlight(0)


# A carry loop (each step's input is the previous step's output, as in meta-training) whose
# step reduces over an axis split across the 2 devices (an all-reduce). Dispatched without
# waiting (max_in_flight=100000) this very script aborts in XLA's rendezvous after ~40 s
# ("Expected 2 threads to join the rendezvous"); bounded it takes ~1 s.
_CARRY_LOOP_SCRIPT = """
import sys
import jax, jax.numpy as jnp, numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from outer_train.in_flight import InFlight

assert len(jax.devices()) == 2, jax.devices()
mesh = Mesh(np.asarray(jax.devices()), ("p",))
w = jax.device_put(jnp.eye(256) / 16, NamedSharding(mesh, P()))
x = jax.device_put(jnp.ones((2, 256, 256)), NamedSharding(mesh, P("p")))

@jax.jit
def step(x, w):
    y = jnp.tanh(x @ w)
    m = jnp.mean(y)  # over both devices' halves: an all-reduce
    return y - 0.1 * m + 0.5, m

assert "all-reduce" in step.lower(x, w).compile().as_text()
queue = InFlight(max_in_flight=int(sys.argv[1]))
means = []
for _ in range(301):
    x, m = step(x, w)
    means += queue.put(m)
means += queue.drain()
assert len(means) == 301 and np.all(np.isfinite(means))
print("ok", len(means))
"""


def test_301_steps_of_a_cross_device_carry_loop_do_not_deadlock():
    proc = subprocess.run([sys.executable, "-c", _CARRY_LOOP_SCRIPT, "2"], env=TWO_DEVICES,
                          capture_output=True, text=True, cwd=REPO, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip() == "ok 301", proc.stdout


@pytest.mark.slow
def test_301_outer_steps_of_meta_training_on_two_devices_finish(tmp_path):
    """The loop itself: particles split over 2 host devices, the mean meta-gradient reduced
    across them every outer step (``run.devices = 2``)."""
    sets = [
        "task.hidden_sizes=[8]", "task.batch_size=32", "lopt.hidden_sizes=[8]",
        "estimator.name=pes", "estimator.num_tasks=2", "estimator.trunc_length=4",
        "estimator.horizon=12", "run.devices=2", "run.num_outer_steps=301",
        "run.log_every=100", "checkpoint.every=0",
    ]
    script = "import sys\nfrom outer_train.cli import main\nsys.exit(main(sys.argv[1:]))\n"
    proc = subprocess.run(
        [sys.executable, "-c", script, "meta-train", "--out", str(tmp_path / "run"),
         "--no-progress", "--no-eval", *[x for s in sets for x in ("--set", s)]],
        env=TWO_DEVICES, capture_output=True, text=True, cwd=REPO, timeout=400,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "split over 2 devices" in proc.stdout, proc.stdout
    steps = [r["outer_step"] for r in read_records(tmp_path / "run" / "metrics.jsonl", "train")]
    assert steps == [100, 200, 300, 301], steps
