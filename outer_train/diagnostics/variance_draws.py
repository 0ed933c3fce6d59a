"""Independent draws of an estimator at a fixed theta and a fixed estimator state, in vmapped
chunks inside jit, split over devices (the engine of ``diagnostics.variance``).

A draw at fixed (theta, S): W consecutive ``estimate`` calls from the state S, with keys split
from the draw's own key; the draw is their mean,
    g_r = (1/W) sum_{w<W} g_{r,w}          flat float32 [P] in ``ravel_pytree(theta)`` order,
and optionally every g_{r,w} is kept. Only the keys differ between draws (inits, data,
perturbations), never theta or S.

Execution (``DrawProgram``): a chunk of C draws is ``jax.vmap``-ed inside one jitted program,
compiled ahead of the draws (its compile time is reported apart from their run time). With a
device mesh (``placement.particle_mesh``) the chunk is split over the devices with
``jax.shard_map`` on an axis named "draws": each device runs its share of whole draws and
nothing crosses devices (the estimators' own particle constraints see no "particles" axis and do
nothing). Chunks run through ``chunked.map_chunks``, which bounds the calls in flight. In a
group of processes (``outer_train.distributed``) the mesh spans every process's devices and
each process gets every draw (``placement.to_host``).

Start states: ``fresh_state`` (every particle due for a reset, so each draw starts new episodes
at its first step) or ``warm_state`` (after N estimates at fixed theta). ``FixedBatchProblem``
freezes a problem's init and batch (the paper's fixed-batch setting).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import NamedTuple

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from outer_train import placement
from outer_train.base import EstimatorState, GradientEstimator, InnerProblem, PRNGKey, Theta
from outer_train.chunked import map_chunks
from outer_train.unroll import ParticleState, force_reset

# Auto chunk size: about this many particle inner steps of one estimate per jitted call
# (a chunk's memory grows with it: its draws run side by side).
STEPS_PER_CALL = 2048
# XLA options of ``fast_compile``: no backend (LLVM) optimization. On CPU it compiles these
# programs several times faster and runs them a few times slower: for runs that compilation
# dominates (small draw counts, short unrolls, tests).
FAST_COMPILE: dict[str, object] = {"xla_backend_optimization_level": 0}


@flax.struct.dataclass
class FixedBatchProblem:
    """``problem`` with its randomness frozen (an InnerProblem): ``init`` ignores its key and uses
    ``init_key``, ``step`` ignores its key and uses ``step_key`` -- one init and one batch for
    every episode and step. Keys are stored as raw key data (uint32 [2]) leaves."""

    problem: InnerProblem
    init_key: jax.Array
    step_key: jax.Array

    @classmethod
    def create(cls, problem: InnerProblem, key: PRNGKey) -> FixedBatchProblem:
        init_key, step_key = jax.random.split(key)
        return cls(problem, jax.random.key_data(init_key), jax.random.key_data(step_key))

    def init(self, theta, key):
        del key
        return self.problem.init(theta, jax.random.wrap_key_data(self.init_key))

    def step(self, theta, state, key):
        del key
        return self.problem.step(theta, state, jax.random.wrap_key_data(self.step_key))


# ---------------------------------------------------------------------------------------------
# The states the draws start from


def _due(tree):
    """Every ``ParticleState`` in an estimator state marked finished: it resets at step 0 of the
    next window (``unroll.force_reset``)."""
    is_particles = lambda x: isinstance(x, ParticleState)
    mark = lambda x: force_reset(x, jnp.ones(x.horizon.shape, bool)) if is_particles(x) else x
    return jax.tree.map(mark, tree, is_leaf=is_particles)


@jax.jit
def fresh_state(estimator: GradientEstimator, key: PRNGKey, theta: Theta) -> EstimatorState:
    """``estimator.init`` with every particle due for a reset: each draw starts new episodes
    (new inits; new perturbations for PES / NRES, whose accumulated noise restarts)."""
    return _due(estimator.init(key, theta))


def _warm(estimator, key, theta, *, num_steps: int):
    init_key, steps_key = jax.random.split(key)
    state = estimator.init(init_key, theta)
    body = lambda s, k: (estimator.estimate(k, theta, s)[1], None)
    return jax.lax.scan(body, state, jax.random.split(steps_key, num_steps))[0]


_WARM = {
    False: jax.jit(_warm, static_argnames=("num_steps",)),
    True: jax.jit(_warm, static_argnames=("num_steps",), compiler_options=FAST_COMPILE),
}


def warm_state(
    estimator: GradientEstimator, key: PRNGKey, theta: Theta, *, num_steps: int,
    fast_compile: bool = False,
) -> EstimatorState:
    """The estimator state after ``num_steps`` estimates at fixed theta from ``init`` (jitted;
    compiled once per estimator and ``num_steps``)."""
    return _WARM[fast_compile](estimator, key, theta, num_steps=num_steps)


# ---------------------------------------------------------------------------------------------
# Draws


class Draws(NamedTuple):
    """R draws of one estimator (host NumPy).

    grads: float32 [R, P]: each draw's mean over its W windows. finite: bool [R]: grads[r] is
    finite (the statistics use only these). windows: float32 [R, W, P] (``per_window``) or None.
    meta_loss: float32 [R]: mean reported meta-loss of the draw's windows.
    num_nonfinite: int [R]: particle unrolls the estimator dropped inside the draw.
    inner_steps_per_draw: particle inner steps of one draw. seconds: wall time of the draws
    (compilation excluded); seconds_per_draw = seconds / draws run (padding included).
    compile_seconds: lowering + compilation of the draw program (0 when reused).
    """

    grads: np.ndarray
    finite: np.ndarray
    windows: np.ndarray | None
    meta_loss: np.ndarray
    num_nonfinite: np.ndarray
    inner_steps_per_draw: int
    seconds: float
    seconds_per_draw: float
    compile_seconds: float


def _one_draw(estimator, theta, state, key_data, num_windows: int, per_window: bool):
    keys = jax.random.split(jax.random.wrap_key_data(key_data), num_windows)

    def body(s, k):
        g, s, metrics = estimator.estimate(k, theta, s)
        return s, (ravel_pytree(g)[0], metrics["meta_loss"], metrics["num_nonfinite"])

    _, (grads, losses, nonfinite) = jax.lax.scan(body, state, keys)
    out = {"grad": jnp.mean(grads, axis=0), "meta_loss": jnp.mean(losses),
           "num_nonfinite": jnp.sum(nonfinite)}
    if per_window:
        out["windows"] = grads
    return out


class DrawProgram:
    """The compiled draws of one estimator: ``run(theta, key, num_draws)`` -> ``Draws``.

    Compiled on first use, once for fresh starts and once for a given state, for the shapes of
    that theta (and state), and reused by later calls. ``chunk_size`` draws per call, rounded up
    to a multiple of the mesh's devices.
    """

    def __init__(self, estimator: GradientEstimator, *, num_windows: int = 1,
                 chunk_size: int, mesh: Mesh | None = None, per_window: bool = False,
                 fast_compile: bool = False):
        self.estimator, self.num_windows = estimator, num_windows
        self.per_window = per_window
        self._options = FAST_COMPILE if fast_compile else None
        num_devices = 1 if mesh is None else mesh.size
        self.chunk_size = math.ceil(max(chunk_size, 1) / num_devices) * num_devices
        self._mesh = None
        self._replicated = self._split = None
        if mesh is not None:
            self._mesh = Mesh(np.asarray(mesh.devices).reshape(-1), ("draws",))
            self._replicated = NamedSharding(self._mesh, P())
            self._split = NamedSharding(self._mesh, P("draws"))
        self._compiled: dict[bool, Callable] = {}

    def _local(self, fresh: bool):
        """(estimator, theta, state or state key data, key data [C, 2]) -> outputs [C, ...]."""
        num_windows, per_window = self.num_windows, self.per_window

        def local(est, theta, start, key_data):
            # a fresh state is built once per call, outside the vmap: it is the same for all
            state = _due(est.init(jax.random.wrap_key_data(start), theta)) if fresh else start
            one = lambda k: _one_draw(est, theta, state, k, num_windows, per_window)
            return jax.vmap(one)(key_data)

        if self._mesh is None:
            return jax.jit(local)
        return jax.jit(jax.shard_map(
            local, mesh=self._mesh, in_specs=(P(), P(), P(), P("draws")),
            out_specs=P("draws"), check_vma=False,  # no collectives: nothing to check
        ))

    def _place(self, tree, sharding):
        return tree if sharding is None else placement.put(tree, sharding)

    def run(self, theta: Theta, key: PRNGKey, num_draws: int, *,
            state: EstimatorState | None = None,
            estimator: GradientEstimator | None = None,
            on_chunk: Callable[[int], None] | None = None) -> Draws:
        """``num_draws`` draws at theta, with ``state_key, draws_key = split(key)`` and draw r
        using ``split(draws_key, num_draws)[r]``.

        state: the fixed state the draws start from; None: ``fresh_state(estimator,
          state_key, theta)`` (built inside the program, no compilation of its own).
        estimator: run this one instead of the program's (same type, knobs and array shapes,
          e.g. the same problem with other data arrays): the compiled program is reused.
        """
        estimator = self.estimator if estimator is None else estimator
        fresh = state is None
        state_key, draws_key = jax.random.split(key)
        start = jax.random.key_data(state_key) if fresh else state
        key_data = np.asarray(jax.random.key_data(jax.random.split(draws_key, num_draws)))
        args = self._place((estimator, theta, start), self._replicated)
        compile_seconds = 0.0
        if fresh not in self._compiled:
            t0 = time.perf_counter()
            example = self._place(key_data[:1].repeat(self.chunk_size, 0), self._split)
            lowered = self._local(fresh).lower(*args, example)
            self._compiled[fresh] = lowered.compile(compiler_options=self._options)
            compile_seconds = time.perf_counter() - t0
        compiled = self._compiled[fresh]
        fn = lambda kd: compiled(*args, self._place(kd, self._split))
        t0 = time.perf_counter()
        out = map_chunks(fn, key_data, chunk_size=self.chunk_size, on_chunk=on_chunk)
        seconds = time.perf_counter() - t0
        grads = out["grad"]
        draws_run = math.ceil(num_draws / self.chunk_size) * self.chunk_size
        return Draws(
            grads=grads,
            finite=np.all(np.isfinite(grads), axis=1),
            windows=out.get("windows"),
            meta_loss=out["meta_loss"],
            num_nonfinite=out["num_nonfinite"],
            inner_steps_per_draw=self.estimator.inner_steps_per_estimate * self.num_windows,
            seconds=seconds,
            seconds_per_draw=seconds / draws_run,
            compile_seconds=compile_seconds,
        )


def auto_chunk_size(estimator: GradientEstimator, num_draws: int, requested: int = 0) -> int:
    """Draws per call: ``requested``, or (0) about ``STEPS_PER_CALL`` particle inner steps of
    one estimate per call (a draw's windows run one after the other, so its memory is one
    window's), at most ``num_draws``."""
    if requested > 0:
        return min(requested, num_draws)
    per_draw = max(estimator.inner_steps_per_estimate, 1)
    return max(1, min(num_draws, STEPS_PER_CALL // per_draw))


def sample_draws(
    estimator: GradientEstimator,
    theta: Theta,
    key: PRNGKey,
    num_draws: int,
    *,
    state: EstimatorState | None = None,
    num_windows: int = 1,
    chunk_size: int = 0,
    mesh: Mesh | None = None,
    per_window: bool = False,
    fast_compile: bool = False,
    on_chunk: Callable[[int], None] | None = None,
) -> Draws:
    """R = ``num_draws`` independent draws of ``estimator`` at theta from ``state`` (None: a
    fresh state), keys as ``DrawProgram.run``. ``chunk_size`` 0: ``auto_chunk_size``."""
    size = auto_chunk_size(estimator, num_draws, chunk_size)
    program = DrawProgram(estimator, num_windows=num_windows, chunk_size=size, mesh=mesh,
                          per_window=per_window, fast_compile=fast_compile)
    return program.run(theta, key, num_draws, state=state, on_chunk=on_chunk)


