"""Inner training: ``num_steps`` steps of any optax optimizer on a task, in one ``lax.scan``.

Inner step t (t = 0 .. num_steps-1) draws its batch with ``fold_in(data_key, t)``, computes
``loss, grads = value_and_grad(task.loss)``, and applies
``optimizer.update(grads, opt_state, params, loss=loss)``. ``loss=`` is passed as an extra
argument, as learned optimizers need it; plain ``GradientTransformation``s are wrapped with
``optax.with_extra_args_support`` and ignore it.

Because batches are keyed by the global step, training in segments (``train_segment`` several
times, e.g. to move a progress bar) computes the same thing as one ``train`` call.
Everything here is pure: jit it with the task as an argument and the optimizer, ``num_steps``
and ``eval_every`` static; vmap it over keys (seeds) or over stacked same-shape tasks.
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from tasks.base import Params, PRNGKey, Task
from tasks.errors import TaskError


class TrainState(NamedTuple):
    """Inner training state between segments."""

    params: Params  # float32 pytree
    opt_state: Any  # the optimizer's state pytree
    step: jax.Array  # int32 []: inner steps taken so far
    data_key: jax.Array  # PRNG key []: inner step t trains on the batch of fold_in(data_key, t)


class EvalCurves(NamedTuple):
    """Whole-split evaluations; every field has shape [E] (leading axes added by vmap)."""

    step: jax.Array  # int32: inner steps taken when evaluated
    train_loss: jax.Array  # float32: mean loss over the whole train split
    train_accuracy: jax.Array
    valid_loss: jax.Array  # float32: mean loss over the whole valid split
    valid_accuracy: jax.Array


class TrainResult(NamedTuple):
    """What ``train`` returns (leading axes added by vmap)."""

    params: Params  # final inner parameters
    curves: EvalCurves  # E = num_steps // eval_every + 1 points: steps 0, eval_every, ..., N
    batch_loss: jax.Array  # float32 [num_steps]: loss of step t's batch, before its update


def init_train_state(
    task: Task, optimizer: optax.GradientTransformation, key: PRNGKey
) -> TrainState:
    """Fresh params (from one subkey) and optimizer state; the other subkey keys the data."""
    init_key, data_key = jax.random.split(key)
    params = task.init(init_key)
    return TrainState(params, optimizer.init(params), jnp.zeros((), jnp.int32), data_key)


def evaluate(task: Task, params: Params, step: jax.Array) -> EvalCurves:
    """One evaluation point (scalar fields) on the whole train and valid splits."""
    train, valid = task.evaluate(params, "train"), task.evaluate(params, "valid")
    return EvalCurves(
        step=jnp.asarray(step, jnp.int32),
        train_loss=train["loss"],
        train_accuracy=train["accuracy"],
        valid_loss=valid["loss"],
        valid_accuracy=valid["accuracy"],
    )


def train_segment(
    task: Task,
    optimizer: optax.GradientTransformation,
    state: TrainState,
    num_evals: int,
    *,
    eval_every: int,
) -> tuple[TrainState, EvalCurves, jax.Array]:
    """``num_evals * eval_every`` inner steps, evaluating after every ``eval_every`` of them.

    Returns ``(state, curves [num_evals], batch_loss [num_evals * eval_every])``.
    """
    opt = optax.with_extra_args_support(optimizer)
    loss_and_grad = jax.value_and_grad(task.loss)

    def inner_step(state: TrainState, _) -> tuple[TrainState, jax.Array]:
        batch = task.sample_batch(jax.random.fold_in(state.data_key, state.step), "train")
        loss, grads = loss_and_grad(state.params, batch)
        updates, opt_state = opt.update(grads, state.opt_state, state.params, loss=loss)
        params = optax.apply_updates(state.params, updates)
        return TrainState(params, opt_state, state.step + 1, state.data_key), loss

    def eval_block(state: TrainState, _) -> tuple[TrainState, tuple[EvalCurves, jax.Array]]:
        state, losses = jax.lax.scan(inner_step, state, length=eval_every)
        return state, (evaluate(task, state.params, state.step), losses)

    state, (curves, losses) = jax.lax.scan(eval_block, state, length=num_evals)
    return state, curves, losses.reshape(-1)


def check_schedule(num_steps: int, eval_every: int) -> None:
    """Raise ``TaskError`` unless 1 <= eval_every <= num_steps and eval_every divides num_steps."""
    if num_steps < 1 or eval_every < 1 or num_steps % eval_every:
        raise TaskError(
            f"eval_every ({eval_every}) must be a positive divisor of the number of steps "
            f"({num_steps})"
        )


def train(
    task: Task,
    optimizer: optax.GradientTransformation,
    key: PRNGKey,
    num_steps: int,
    *,
    eval_every: int | None = None,
) -> TrainResult:
    """Train ``task`` from fresh params for ``num_steps`` inner steps; pure and jittable.

    ``eval_every`` (default ``num_steps``) must divide ``num_steps``; the curves hold the
    evaluation of the initial params and after every ``eval_every`` steps.
    Example (8 seeds)::

        fn = jax.jit(jax.vmap(lambda task, key: train(task, opt, key, 1000, eval_every=100),
                              in_axes=(None, 0)))
        result = fn(task, jax.random.split(jax.random.key(0), 8))
    """
    eval_every = num_steps if eval_every is None else eval_every
    check_schedule(num_steps, eval_every)
    state = init_train_state(task, optimizer, key)
    first = evaluate(task, state.params, state.step)
    state, curves, batch_loss = train_segment(
        task, optimizer, state, num_steps // eval_every, eval_every=eval_every
    )
    curves = jax.tree.map(lambda a, b: jnp.concatenate([a[None], b]), first, curves)
    return TrainResult(state.params, curves, batch_loss)


@functools.partial(jax.jit, static_argnames=("optimizer", "num_steps", "eval_every"))
def train_seeds(
    task: Task,
    optimizer: optax.GradientTransformation,
    keys: PRNGKey,
    num_steps: int,
    *,
    eval_every: int | None = None,
) -> TrainResult:
    """``train`` vmapped over ``keys`` [S] (one seed each), jitted; results get a leading [S].

    The optimizer is a static argument: reuse the same optimizer object to reuse the compiled
    program (``optax.adam(1e-3)`` called twice gives two objects, hence two compilations).
    """
    return jax.vmap(lambda key: train(task, optimizer, key, num_steps, eval_every=eval_every))(
        keys
    )


TARGET_SEGMENTS = 10  # at most this many jitted segments per ``train_in_segments`` run


def segment_evals(num_evals: int, target_segments: int = TARGET_SEGMENTS) -> int:
    """Evaluations per segment: the smallest divisor of ``num_evals`` giving at most
    ``target_segments`` segments."""
    divisors = [d for d in range(1, num_evals + 1) if num_evals % d == 0]
    return min(d for d in divisors if num_evals // d <= target_segments)


class SegmentedTrainer:
    """``train`` over seeds in a few equal jitted segments, so a caller can show progress
    between them; the result equals one ``train_seeds`` call (batches are keyed by the global
    step). Build once per (optimizer, num_steps, eval_every) and call it on tasks and keys:
    the compiled segment is reused.

    ``__call__(task, keys, on_segment=None) -> TrainResult`` with a leading [S] axis on every
    field; ``on_segment(steps_done)`` runs after each segment (its result fetched first, so
    at most one segment is in flight).
    """

    def __init__(self, optimizer: optax.GradientTransformation, num_steps: int, *,
                 eval_every: int, target_segments: int = TARGET_SEGMENTS):
        check_schedule(num_steps, eval_every)
        self.num_steps, self.eval_every = num_steps, eval_every
        num_evals = num_steps // eval_every
        self.evals_per_segment = segment_evals(num_evals, target_segments)
        self.num_segments = num_evals // self.evals_per_segment
        seeds = lambda f: jax.jit(jax.vmap(f, in_axes=(None, 0)))
        self._init = seeds(lambda t, k: init_train_state(t, optimizer, k))
        self._first_eval = seeds(lambda t, s: evaluate(t, s.params, s.step))
        self._segment = seeds(lambda t, s: train_segment(
            t, optimizer, s, self.evals_per_segment, eval_every=eval_every
        ))

    def __call__(self, task: Task, keys: PRNGKey, on_segment=None) -> TrainResult:
        state = self._init(task, keys)
        curves = [jax.tree.map(lambda a: a[:, None], self._first_eval(task, state))]
        batch_losses = []
        for i in range(self.num_segments):
            state, seg_curves, seg_loss = self._segment(task, state)
            curves.append(seg_curves)
            batch_losses.append(jax.block_until_ready(seg_loss))
            if on_segment is not None:
                on_segment((i + 1) * self.evals_per_segment * self.eval_every)
        curves = jax.tree.map(lambda *xs: jnp.concatenate(xs, axis=1), *curves)
        return TrainResult(state.params, curves, jnp.concatenate(batch_losses, axis=1))
