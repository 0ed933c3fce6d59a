"""Building a meta-training run from its config: config -> (static setup, outer step 0 state).

``build(config)`` loads the data, samples the task variants and makes the learned optimizer,
the estimators (one per training variant) and the meta-optimizer, on the host and without
training; ``init_state(setup)`` is the state at outer step 0.

Key streams (``RunKeys``), all split from ``jax.random.key(seed)``: theta init, estimator init,
outer steps, training-task sampling (family), held-out variants (family), held-out seeds.
Held-out seeds come from their own stream, so they are never used for meta-training.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from learned_opt.base import LearnedOptimizer, Theta
from learned_opt.errors import UserError
from outer_train.config import LOptConfig, MetaOptConfig, MetaTrainConfig
from tasks.base import Task


class RunKeys(NamedTuple):
    """The run's independent key streams (typed PRNG keys), each used for one purpose only."""

    theta: jax.Array
    estimator_init: jax.Array
    outer: jax.Array  # outer step n uses fold_in(outer, n)
    train_tasks: jax.Array  # family: which variants are meta-trained on
    heldout_tasks: jax.Array  # family: which held-out variants are evaluated
    heldout_seeds: jax.Array  # evaluation seeds (inits and batches), never used in training


def run_keys(seed: int) -> RunKeys:
    return RunKeys(*jax.random.split(jax.random.key(seed), len(RunKeys._fields)))


class MetaTrainState(NamedTuple):
    """Everything that changes during meta-training (a pytree; what a checkpoint holds).

    theta: learned-optimizer weights. opt_state: meta-optimizer state.
    estimator_states: one estimator state per training task variant (tuple).
    outer_step: int32 []: outer steps taken (including skipped ones).
    num_skipped: int32 []: outer steps whose meta-gradient was non-finite (update skipped).
    skipped_in_a_row: int32 []: consecutive skipped steps up to now.
    """

    theta: Theta
    opt_state: optax.OptState
    estimator_states: tuple[Any, ...]
    outer_step: jax.Array
    num_skipped: jax.Array
    skipped_in_a_row: jax.Array


@dataclasses.dataclass(frozen=True)
class MetaTrainSetup:
    """The static side of a run, built from the config on the host (``build``).

    estimators: one per training task variant (pytrees holding their problem and task data), or
    with ``family.compile = "once"`` one ``variant_stack.StackedEstimator`` per dataset of the
    variants (``padded_variant_groups``).
    heldout_tasks: evaluation tasks (the training task itself for ``task.kind = "single"``:
    held-out *seeds* then keep evaluation apart from meta-training).
    """

    config: MetaTrainConfig
    keys: RunKeys
    lopt: LearnedOptimizer
    train_tasks: tuple[Task, ...]
    heldout_tasks: tuple[Task, ...]
    estimators: tuple[Any, ...]
    meta_opt: optax.GradientTransformation

    @property
    def inner_steps_per_outer_step(self) -> int:
        return sum(e.inner_steps_per_estimate for e in self.estimators)


def make_lopt(cfg: LOptConfig) -> LearnedOptimizer:
    """The learned optimizer named by ``[lopt]`` (``learned_opt.registry``)."""
    from learned_opt import registry

    if cfg.name == "mlp_lopt":
        return registry.make(cfg.name, hidden_sizes=cfg.hidden_sizes)
    return registry.make(cfg.name)


@functools.lru_cache(maxsize=16)
def make_meta_optimizer(cfg: MetaOptConfig) -> optax.GradientTransformation:
    """``clip_by_global_norm(clip_norm)`` (if > 0) then Adam or SGD at ``learning_rate``.

    Cached per config, so one process reuses one object (and its compiled outer step)."""
    if cfg.name == "adam":
        base = optax.adam(cfg.learning_rate, b1=cfg.b1, b2=cfg.b2)
    else:
        base = optax.sgd(cfg.learning_rate)
    if cfg.clip_norm > 0:
        return optax.chain(optax.clip_by_global_norm(cfg.clip_norm), base)
    return base


def make_tasks(config: MetaTrainConfig, keys: RunKeys
               ) -> tuple[tuple[Task, ...], tuple[Task, ...]]:
    """(training tasks, held-out tasks) of a config.

    ``single``: the task itself for both (held-out *seeds* separate evaluation from training).
    ``family``: ``num_train_tasks`` training variants sampled with ``keys.train_tasks`` and up
    to ``eval.num_heldout_tasks`` held-out variants chosen with ``keys.heldout_tasks``.
    """
    from tasks.image_mlp import make_task

    if config.task.kind == "family":
        family = config.make_family()
        train = tuple(family.sample_tasks(keys.train_tasks, config.family.num_train_tasks))
        num_heldout = min(config.eval.num_heldout_tasks, len(family.heldout_variants()))
        return train, tuple(family.heldout_tasks(keys.heldout_tasks, num_heldout))
    task = make_task(config.task_config())
    return (task,), (task,)


def padded_variant_groups(config: MetaTrainConfig, keys: RunKeys
                          ) -> list[tuple[tuple[int, ...], list[Task]]]:
    """``family.compile = "once"``: the training variants of ``make_tasks`` as (positions,
    padded tasks) groups, one per dataset (``tasks.padded_mlp``), in order of first appearance."""
    from tasks.padded_mlp import dataset_key, pad_variants

    family = config.make_family()
    configs = family.sample_configs(keys.train_tasks, config.family.num_train_tasks)
    groups: dict[tuple, list[int]] = {}
    for i, c in enumerate(configs):
        groups.setdefault(dataset_key(c), []).append(i)
    return [
        (tuple(ids), pad_variants([configs[i] for i in ids], data_dir=family.data_dir))
        for ids in groups.values()
    ]


def build(config: MetaTrainConfig) -> MetaTrainSetup:
    """Loads data, samples task variants and builds the estimators (host side, no training)."""
    from outer_train.estimators import make_estimator
    from outer_train.problem import LearnedOptProblem
    from outer_train.variant_stack import stack

    keys = run_keys(config.run.seed)
    train_tasks, heldout_tasks = make_tasks(config, keys)
    lopt = make_lopt(config.lopt)
    p = config.problem

    def estimator(task):
        return make_estimator(
            config.estimator.name,
            LearnedOptProblem.create(
                task, lopt, meta_loss=p.meta_loss, loss_transform=p.loss_transform,
                loss_clip=p.loss_clip or None,
            ),
            **config.estimator.knobs(),
        )

    if config.task.kind != "family" or config.family.compile == "per_variant":
        estimators = tuple(estimator(task) for task in train_tasks)
    else:
        if not getattr(lopt, "supports_mask", False):
            raise UserError(
                f"family.compile = \"once\" pads the task variants, and the learned optimizer "
                f"{config.lopt.name!r} does not take a padding mask (supports_mask); "
                "set family.compile = \"per_variant\""
            )
        estimators = tuple(
            stack([estimator(task) for task in tasks], ids)
            for ids, tasks in padded_variant_groups(config, keys)
        )
    return MetaTrainSetup(
        config, keys, lopt, train_tasks, heldout_tasks, estimators,
        make_meta_optimizer(config.meta_opt),
    )


@jax.jit
def _init_estimator(estimator, key: jax.Array, theta: Theta):
    # Jitted: particle start-up (init + staggering) is many small ops, slow op by op.
    return estimator.init(key, theta)


def init_state(setup: MetaTrainSetup) -> MetaTrainState:
    """Outer step 0: theta from its key, fresh meta-optimizer and estimator states."""
    from outer_train.variant_stack import variant_keys

    theta = setup.lopt.init(setup.keys.theta)
    est_keys = variant_keys(setup.keys.estimator_init, setup.estimators)
    estimator_states = tuple(
        _init_estimator(est, k, theta) for est, k in zip(setup.estimators, est_keys, strict=True)
    )
    zero = lambda: jnp.zeros((), jnp.int32)
    return MetaTrainState(
        theta, setup.meta_opt.init(theta), estimator_states, zero(), zero(), zero()
    )
