"""Particle placement over devices: the particle axis split, everything else replicated.

Estimator states carry a leading particle axis P (``outer_train.unroll``). With several devices
the particles are split over a one-axis mesh named ``particles`` and the jitted step runs
partitioned (GSPMD): each device steps its share of the particles, and particle means are
reduced across devices. Usage, as meta-train and the benchmarks do it::

    mesh = particle_mesh(devices)                      # None for one device
    states, (theta, estimator) = place(mesh, particles=states, replicated=(theta, estimator))
    with mesh_scope(mesh):                             # for constrain_particles inside jit
        ... jitted steps ...

Placing the non-particle inputs replicated makes a jitted step's input shardings equal its
output shardings (one compilation, not a second one at step 2) and keeps task data on the
devices instead of copying it every step. On CPU, split the host into N devices with
``--xla_force_host_platform_device_count=N`` before JAX starts (``outer_train.runtime``).
"""

from __future__ import annotations

import contextlib
from typing import Any

import jax
import numpy as np

from learned_opt.errors import UserError

AXIS = "particles"


def particle_mesh(devices: int) -> jax.sharding.Mesh | None:
    """The mesh the particles are split over (``run.devices``; 0 = all devices), or None for a
    single device. In a group of processes (``outer_train.distributed``) it spans every
    process's devices (``jax.devices()``), and ``devices`` must be 0 or their number; alone,
    the local ones. Raises ``UserError`` when more devices are asked for than JAX sees."""
    if jax.process_count() > 1:
        available = jax.devices()
        if devices not in (0, len(available)):
            raise UserError(
                f"run.devices = {devices}, but {jax.process_count()} processes hold "
                f"{len(available)} devices and each process must hold its share: use 0 (all)"
            )
        return jax.sharding.Mesh(np.asarray(available), (AXIS,))
    available = jax.local_devices()
    n = len(available) if devices == 0 else devices
    if n > len(available):
        raise UserError(
            f"run.devices = {devices} but JAX sees {len(available)} device(s); use 0 (all) or "
            f"fewer. On CPU, learned-opt makes one device per core; from Python set "
            f"XLA_FLAGS=--xla_force_host_platform_device_count={devices} before importing JAX"
        )
    if n <= 1:
        return None
    return jax.sharding.Mesh(np.asarray(available[:n]), (AXIS,))


def place(mesh: jax.sharding.Mesh | None, *, particles: Any, replicated: Any) -> tuple[Any, Any]:
    """(particles, replicated) placed on ``mesh``: ``particles`` by ``shard_particles``,
    ``replicated`` copied to every device. Without a mesh both are returned unchanged."""
    if mesh is None:
        return particles, replicated
    everywhere = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    return shard_particles(particles, mesh), put(replicated, everywhere)


def put(tree: Any, sharding: jax.sharding.NamedSharding) -> Any:
    """``tree`` (the same value in every process) placed with ``sharding``, leaf by leaf:
    ``jax.device_put`` alone; across processes each process builds its own shards from its copy,
    PRNG keys included (``jax.device_put`` refuses keys for a sharding of several processes)."""
    return jax.tree.map(lambda x: _put(x, sharding), tree)


def _is_key(x) -> bool:
    return isinstance(x, jax.Array) and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)


def _put(x, sharding: jax.sharding.NamedSharding):
    """``x`` (the same value in every process) placed with ``sharding``. Alone,
    ``jax.device_put``; across processes each process builds its own shards from its copy
    (``jax.make_array_from_callback``), PRNG keys through their key data."""
    if sharding.is_fully_addressable:
        return jax.device_put(x, sharding)
    if _is_key(x):
        data = _put(jax.random.key_data(x), sharding)
        return jax.random.wrap_key_data(data, impl=jax.random.key_impl(x))
    host = np.asarray(x)
    return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])


def to_host(tree: Any) -> Any:
    """``tree`` (placed by ``place``, possibly across processes) as whole arrays in this process:
    NumPy arrays, PRNG keys as local key arrays. Across processes a collective
    (``multihost_utils.process_allgather``): every process must call it, in the same order."""
    if all(not isinstance(x, jax.Array) or x.is_fully_addressable for x in jax.tree.leaves(tree)):
        return jax.device_get(tree)
    from jax.experimental import multihost_utils

    def gather(x):
        if not isinstance(x, jax.Array):
            return x
        if x.is_fully_addressable:  # already whole here (a tiled gather would stack copies)
            return x if _is_key(x) else jax.device_get(x)
        if x.is_fully_replicated:  # theta, counters: this process's copy, no collective
            local = x.addressable_data(0)
            return local if _is_key(x) else np.asarray(local)
        if _is_key(x):
            data = multihost_utils.process_allgather(jax.random.key_data(x), tiled=True)
            return jax.random.wrap_key_data(data, impl=jax.random.key_impl(x))
        return multihost_utils.process_allgather(x, tiled=True)

    return jax.tree.map(gather, tree)


def mesh_scope(mesh: jax.sharding.Mesh | None):
    """``jax.set_mesh(mesh)``, or a no-op context without a mesh: estimators that create their
    particles inside ``estimate`` (es, full_bptt) split them over it (``constrain_particles``)."""
    return jax.set_mesh(mesh) if mesh is not None else contextlib.nullcontext()


def _splits(x, size: int, axis: int = 0) -> bool:
    """Whether leaf x has a (particle) axis ``axis`` that ``size`` devices can share evenly."""
    return x.ndim > axis and x.shape[axis] % size == 0


def shard_particles(tree, mesh: jax.sharding.Mesh, axis_name: str = AXIS, *,
                    particle_axis: int = 0):
    """Place ``tree`` (e.g. an estimator state) with its particle axis (``particle_axis``: 0,
    or 1 behind the variant axis of a ``variant_stack.StackedEstimator``'s state) split over
    ``mesh``'s ``axis_name`` devices; leaves whose particle axis does not divide evenly (and
    scalars) are replicated. Jitted estimators then run partitioned (GSPMD)."""
    size = mesh.shape[axis_name]
    spec = jax.sharding.PartitionSpec(*([None] * particle_axis), axis_name)
    split = jax.sharding.NamedSharding(mesh, spec)
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())

    def put(x):
        return _put(x, split if _splits(x, size, particle_axis) else replicated)

    return jax.tree.map(put, tree)


def constrain_particles(tree, axis_name: str = AXIS):
    """Inside ``jax.set_mesh(mesh)`` with a ``particles`` axis: ask GSPMD to split the leading
    axis of every leaf of ``tree`` over it (leaves that do not divide evenly stay as they are).
    For estimators that create their particles inside ``estimate`` (es, full_bptt): constraining
    the per-particle keys and thetas splits the whole vmapped unroll. Without such a mesh (one
    device, or outside ``set_mesh``) the tree is returned unchanged."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or axis_name not in mesh.axis_names:
        return tree
    size = mesh.shape[axis_name]
    spec = jax.sharding.PartitionSpec(axis_name)

    def constrain(x):
        return jax.lax.with_sharding_constraint(x, spec) if size > 1 and _splits(x, size) else x

    return jax.tree.map(constrain, tree)
