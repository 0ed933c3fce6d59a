"""V estimators of one shape as one estimator: a leading variant axis, one traced program.

Family meta-training builds one estimator per training variant. When the variants are padded to
one shape (``tasks.padded_mlp``) their estimators have equal structure and shapes, and
``stack(estimators)`` makes them a ``StackedEstimator``: the outer step then traces and compiles
one estimator program for the whole group instead of one per variant.

    keys_v               = split(key, V), or the V keys given
    g_v, s_v', m_v       = lax.map over v of member_v.estimate(keys_v, theta, s_v)
    estimate             = (mean_v g_v, s', m)      m: meta_loss mean_v, counts summed over v

Leaves that are the same array in every member (the task data: datasets load once per process)
are kept once and closed over; the others (each variant's indices and param mask) are stacked.
The state has a leading axis V (``init``) before the particle axis, which a multi-device run
splits (``placement.shard_particles(..., particle_axis=1)``). ``num_variants`` = V is the group's
weight in the outer step's mean over variants; ``variant_keys`` hands every variant the key it
gets without stacking, so a stacked run and a per-variant run draw the same randomness.
"""

from __future__ import annotations

from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from outer_train.base import EstimatorState, Metrics, PRNGKey, Theta

_SUMMED = ("num_nonfinite", "num_resets", "inner_steps")


@flax.struct.dataclass
class StackedEstimator:
    """The members' leaves (shared ones once, the others stacked [V, ...]); see the module
    docstring. Satisfies ``outer_train.base.GradientEstimator``."""

    leaves: tuple[Any, ...]
    treedef: Any = flax.struct.field(pytree_node=False)
    stacked: tuple[bool, ...] = flax.struct.field(pytree_node=False)
    variant_ids: tuple[int, ...] = flax.struct.field(pytree_node=False)
    member_inner_steps: int = flax.struct.field(pytree_node=False)

    @property
    def num_variants(self) -> int:
        return len(self.variant_ids)

    @property
    def inner_steps_per_estimate(self) -> int:
        return self.num_variants * self.member_inner_steps

    def _map(self, fn, *args):
        """``fn(member, *args)`` for each member in turn (``lax.map``: one traced body); ``args``
        and the result have a leading axis V. Not ``vmap``: batching the members measured slower
        on CPU, and under ``vmap`` a padded task's ``lax.switch`` would run every branch."""
        shared = [None if s else x for x, s in zip(self.leaves, self.stacked, strict=True)]
        stacked = [x if s else None for x, s in zip(self.leaves, self.stacked, strict=True)]

        def one(xs):
            leaves, a = xs
            full = [x if s else y for x, y, s in zip(leaves, shared, self.stacked, strict=True)]
            return fn(jax.tree.unflatten(self.treedef, full), *a)

        return jax.lax.map(one, (stacked, args))

    def member_keys(self, key: PRNGKey) -> jax.Array:
        """One key per member: ``key`` split in V, or ``key`` itself when it is already V keys
        (the outer step passes each variant the key it would get without stacking)."""
        if key.shape == (self.num_variants,):
            return key
        return jax.random.split(key, self.num_variants)

    def init(self, key: PRNGKey, theta: Theta) -> EstimatorState:
        return self._map(lambda est, k: est.init(k, theta), self.member_keys(key))

    def estimate(
        self, key: PRNGKey, theta: Theta, state: EstimatorState
    ) -> tuple[Theta, EstimatorState, Metrics]:
        keys = self.member_keys(key)
        grads, state, metrics = self._map(
            lambda est, k, s: est.estimate(k, theta, s), keys, state
        )
        grad = jax.tree.map(lambda g: jnp.mean(g, axis=0), grads)
        metrics = {
            k: jnp.sum(v, axis=0) if k in _SUMMED else jnp.mean(v, axis=0)
            for k, v in metrics.items()
        }
        return grad, state, metrics


def stack(estimators: list[Any], variant_ids: tuple[int, ...] | None = None) -> StackedEstimator:
    """One ``StackedEstimator`` of ``estimators`` (equal pytree structure and leaf shapes;
    ValueError otherwise). ``variant_ids``: the members' positions among all the run's training
    variants (which of the outer step's per-variant keys each gets); default 0..V-1."""
    if not estimators:
        raise ValueError("stack needs at least one estimator")
    if variant_ids is None:
        variant_ids = tuple(range(len(estimators)))
    if len(variant_ids) != len(estimators):
        raise ValueError(f"{len(variant_ids)} variant ids for {len(estimators)} estimators")
    flat = [jax.tree.flatten(e) for e in estimators]
    treedef = flat[0][1]
    for _, other in flat[1:]:
        if other != treedef:
            raise ValueError(f"estimators differ in structure: {treedef} vs {other}")
    columns = list(zip(*(leaves for leaves, _ in flat), strict=True))
    stacked = tuple(any(x is not column[0] for x in column) for column in columns)
    leaves = []
    for column, is_stacked in zip(columns, stacked, strict=True):
        if is_stacked and len({jnp.shape(x) for x in column}) != 1:
            shapes = [jnp.shape(x) for x in column]
            raise ValueError(f"estimators differ in a leaf's shape: {shapes}")
        leaves.append(jnp.stack(column) if is_stacked else column[0])
    return StackedEstimator(
        tuple(leaves), treedef, stacked, tuple(int(i) for i in variant_ids),
        estimators[0].inner_steps_per_estimate,
    )


def num_variants(estimator: Any) -> int:
    """The training variants ``estimator`` serves: V for a ``StackedEstimator``, else 1."""
    return estimator.num_variants if isinstance(estimator, StackedEstimator) else 1


def variant_keys(key: PRNGKey, estimators: tuple[Any, ...]) -> list[jax.Array]:
    """``key`` split once per training variant and handed out per estimator: a plain estimator
    (the e-th) gets key e, a stack the keys of its ``variant_ids``. With no stack this is
    ``split(key, E)``, and a variant gets the same key whether or not it is stacked."""
    keys = jax.random.split(key, sum(num_variants(e) for e in estimators))
    return [
        keys[np.asarray(e.variant_ids)] if isinstance(e, StackedEstimator) else keys[i]
        for i, e in enumerate(estimators)
    ]
