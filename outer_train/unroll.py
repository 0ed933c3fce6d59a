"""The particle engine: a window of K inner steps per particle in one ``lax.scan``, resets in-scan.

A *particle* is one inner problem being trained: its inner state (params + optimizer state), the
inner step it is at and the horizon T of its current episode (``ParticleState``). Everything here
is written for ONE particle and vmapped over a leading particle axis P -- the unit of
parallelism, kept as the leading array axis so it can be sharded across devices later.

Window semantics (``unroll_window``), for k = 0..K-1:
  1. if ``inner_step >= horizon`` the episode is over: the particle is replaced by a fresh
     episode (new params, optimizer state and horizon) with a ``jnp.where`` against a fresh state
     built ONCE per window from ``reset_key`` -- no per-step re-initialization, no Python control
     flow; ``after_reset[k:]`` becomes True;
  2. one inner step with the step's key gives the meta-loss ``losses[k]``.
A reset happens *before* a step, so ``losses[k]`` belongs to the new episode iff
``after_reset[k]``; a particle whose episode ends exactly at a window's end resets at step 0 of
the next window. Truncated estimators require every sampled horizon >= K, so at most one reset
happens per particle per window (the first, staggered episode may be shorter: it began before).

Groups: particles that must stay in lockstep (the + and - members of antithetic pairs, all
perturbations of one task) form a group and receive identical reset and step keys (common random
numbers), hence identical data, inits and horizons. ``window_keys`` draws keys per group.

Horizons: an int T (constant) or a pair (T_min, T_max): each episode draws T log-uniformly.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.flatten_util import ravel_pytree

from outer_train.base import InnerProblem, InnerState, PRNGKey, Theta
from outer_train.meta_loss import masked_mean

Horizon = int | tuple[int, int]


class ParticleState(NamedTuple):
    """One particle (leaves gain a leading [P] axis when batched).

    inner: the problem's state pytree (params, optimizer state).
    inner_step: int32 []: steps taken in the current episode.
    horizon: int32 []: length T of the current episode.
    """

    inner: InnerState
    inner_step: jax.Array
    horizon: jax.Array


class WindowTrace(NamedTuple):
    """What one window of K steps produced for one particle.

    losses: float [K]: per-step meta-loss (NaN where the inner run diverged).
    after_reset: bool [K]: losses[k] belongs to an episode that began inside this window.
    """

    losses: jax.Array
    after_reset: jax.Array


class WindowKeys(NamedTuple):
    """Per-group keys of one window (G groups, K steps).

    reset: key [G]: builds the group's fresh episode (init + horizon).
    step: key [G, K]: decides each step's data.
    noise: key []: for the estimator's perturbations.
    """

    reset: jax.Array
    step: jax.Array
    noise: jax.Array


def horizon_bounds(horizon: Horizon) -> tuple[int, int]:
    """(T_min, T_max) of a horizon spec."""
    if isinstance(horizon, tuple):
        return horizon
    return horizon, horizon


def sample_horizon(key: PRNGKey, horizon: Horizon) -> jax.Array:
    """int32 []: T itself, or log-uniform on [T_min, T_max] (density ~ 1/T)."""
    lo, hi = horizon_bounds(horizon)
    if lo == hi:
        return jnp.asarray(lo, jnp.int32)
    u = jax.random.uniform(key, ())
    t = jnp.exp(math.log(lo) + u * (math.log(hi + 1) - math.log(lo)))
    return jnp.clip(jnp.floor(t), lo, hi).astype(jnp.int32)


def start_episode(
    problem: InnerProblem, theta: Theta, key: PRNGKey, horizon: Horizon
) -> ParticleState:
    """A fresh episode: ``problem.init(theta, .)`` at inner step 0 with a sampled horizon."""
    init_key, horizon_key = jax.random.split(key)
    inner = problem.init(theta, init_key)
    return ParticleState(inner, jnp.zeros((), jnp.int32), sample_horizon(horizon_key, horizon))


def stagger(
    state: ParticleState, key: PRNGKey, stratum: jax.Array, num_strata: int
) -> ParticleState:
    """Truncate the (first) episode to a length in [1, T], so resets are not in lockstep.

    Stratified: group g of G draws its offset uniformly in [g T / G, (g + 1) T / G), so the G
    groups' resets are spread evenly over the horizon (independent uniform offsets bunch up:
    with 8 groups, 5 often reset within a few windows and the meta-loss spikes every T/K steps).
    The params stay fresh and the optimizer sees step 0: the episode is simply shorter, which
    keeps every step's inputs honest (no pretend "already at step t" with fresh params).
    """
    u = (stratum + jax.random.uniform(key)) / num_strata
    offset = jnp.clip(jnp.floor(u * state.horizon).astype(jnp.int32), 0, state.horizon - 1)
    return state._replace(horizon=state.horizon - offset)


def force_reset(state: ParticleState, reset: jax.Array) -> ParticleState:
    """Mark particles (bool [P]) as finished: they restart at step 0 of the next window."""
    return state._replace(inner_step=jnp.where(reset, state.horizon, state.inner_step))


def window_keys(key: PRNGKey, num_groups: int, num_steps: int) -> WindowKeys:
    """Split one estimate's key into per-group reset/step keys and a noise key (each used once)."""
    reset_key, step_key, noise_key = jax.random.split(key, 3)
    step = jax.random.split(step_key, num_groups * num_steps).reshape(num_groups, num_steps)
    return WindowKeys(jax.random.split(reset_key, num_groups), step, noise_key)


def member_groups(num_groups: int, group_size: int) -> np.ndarray:
    """int [G*S]: the group of each particle; particles are laid out group-major."""
    return np.repeat(np.arange(num_groups), group_size)


def repeat_members(tree, group_size: int):
    """Each group's state (leading axis G) repeated for its ``group_size`` members, group-major
    ([G * S]): the same values as indexing by ``member_groups``, but as a broadcast + reshape,
    which keeps a leading axis split over devices split (a gather by an index array makes XLA
    gather everything onto every device and run all members everywhere)."""
    return jax.tree.map(lambda x: jnp.repeat(x, group_size, axis=0), tree)


def _select(pred: jax.Array, on_true, on_false):
    return jax.tree.map(lambda a, b: jnp.where(pred, a, b), on_true, on_false)


def _scan(body, carry, xs, segment_length: int | None):
    """``lax.scan``; with ``segment_length`` a nested scan whose segments are rematerialized.

    Backprop then stores the carry at segment boundaries plus one segment's residuals:
    O(T/s + s) states instead of O(T) (s ~ sqrt(T) balances the two).
    """
    num_steps = xs.shape[0]
    if segment_length is None or segment_length >= num_steps:
        return lax.scan(body, carry, xs)
    segment = jax.checkpoint(lambda c, seg: lax.scan(body, c, seg), prevent_cse=False)
    num_full = num_steps // segment_length
    head = xs[: num_full * segment_length].reshape(num_full, segment_length, *xs.shape[1:])
    carry, ys = lax.scan(segment, carry, head)
    ys = jax.tree.map(lambda y: y.reshape(num_full * segment_length, *y.shape[2:]), ys)
    if num_steps % segment_length:
        carry, tail = segment(carry, xs[num_full * segment_length :])
        ys = jax.tree.map(lambda a, b: jnp.concatenate([a, b]), ys, tail)
    return carry, ys


def unroll_window(
    problem: InnerProblem,
    theta: Theta,
    state: ParticleState,
    reset_key: PRNGKey | None,
    step_keys: jax.Array,
    *,
    horizon: Horizon,
    reset_theta: Theta | None = None,
    segment_length: int | None = None,
    peel_last: bool = False,
) -> tuple[ParticleState, WindowTrace]:
    """Run one particle for K = len(step_keys) inner steps (see the module docstring).

    theta: used for every step, or only until the reset when ``reset_theta`` is given (noise-reuse
      ES: a new episode gets a new perturbation). The fresh episode is built with the theta it
      will be stepped with.
    reset_key: None disables resets (full-horizon unrolls of a fresh episode).
    segment_length: rematerialize the scan in segments of this many steps (for backprop).
    peel_last: for backprop: run the last step after the scan instead of in it. Same values;
      but inside a scan every step gets the same backward pass, while after it JAX sees that
      the last step's new state feeds no loss of the window (with the training-batch
      meta-loss): the backward through its update and the second-order backward through its
      task gradient are left out.
    """
    if reset_key is not None:
        fresh_theta = theta if reset_theta is None else reset_theta
        fresh = start_episode(problem, fresh_theta, reset_key, horizon)

    def body(carry, key):
        particle, after_reset = carry
        if reset_key is not None:
            done = particle.inner_step >= particle.horizon
            particle = _select(done, fresh, particle)
            after_reset = after_reset | done
        step_theta = theta if reset_theta is None else _select(after_reset, reset_theta, theta)
        inner, loss = problem.step(step_theta, particle.inner, key)
        particle = ParticleState(inner, particle.inner_step + 1, particle.horizon)
        return (particle, after_reset), (loss, after_reset)

    carry = (state, jnp.zeros((), bool))
    if peel_last and step_keys.shape[0] >= 2:
        carry, head = _scan(body, carry, step_keys[:-1], segment_length)
        carry, last = body(carry, step_keys[-1])
        trace = jax.tree.map(lambda h, x: jnp.concatenate([h, x[None]]), head, last)
    else:
        carry, trace = _scan(body, carry, step_keys, segment_length)
    return carry[0], WindowTrace(*trace)


def start_particles(
    problem: InnerProblem,
    key: PRNGKey,
    thetas: Theta,
    *,
    num_groups: int,
    group_size: int,
    horizon: Horizon,
    staggered: bool,
    theta_axis: int | None,
) -> ParticleState:
    """G*S particles, group-major, members of a group identical but for their theta.

    thetas: one theta (``theta_axis=None``) or a pytree with leading axis G*S (``theta_axis=0``).
    """
    init_key, stagger_key = jax.random.split(key)
    groups = member_groups(num_groups, group_size)
    init_keys = jax.random.split(init_key, num_groups)[groups]
    particles = jax.vmap(
        lambda th, k: start_episode(problem, th, k, horizon), in_axes=(theta_axis, 0)
    )(thetas, init_keys)
    if staggered:
        stagger_keys = jax.random.split(stagger_key, num_groups)[groups]
        particles = jax.vmap(lambda p, k, g: stagger(p, k, g, num_groups))(
            particles, stagger_keys, jnp.asarray(groups)
        )
    return particles


def _nbytes(tree) -> int:
    return sum(math.prod(x.shape) * jnp.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))


def _abstract(tree, drop_leading_axis: bool = False):
    start = 1 if drop_leading_axis else 0
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape[start:], x.dtype), tree)


# Backprop through a window stores every step's residuals when all particles' residuals fit in
# this many bytes: no recomputation, which on CPU beats rematerialized segments (a TBPTT window of
# the standard workload, 20 steps x 8 particles, fits). Longer unrolls are rematerialized in
# segments.
STORE_ALL_RESIDUALS_BYTES = 256 * 2**20


def memory_optimal_segment(
    problem: InnerProblem, theta: Theta, inner: InnerState, num_steps: int,
    num_particles: int = 1,
) -> int:
    """Steps per rematerialized segment for backprop over ``num_steps`` steps.

    ``num_steps`` (no remat) when ``num_particles`` particles' residuals of all steps fit in
    ``STORE_ALL_RESIDUALS_BYTES``. Otherwise the segment that minimizes memory: ~ (T/s) carries
    + s steps' residuals, minimal at s = sqrt(T * carry / residual); ``residual`` = bytes of one
    step's VJP residuals, measured with ``eval_shape`` at trace time (no FLOPs). At least 2:
    one-step segments are slower than two-step ones.
    """
    key = jax.random.key(0)
    residuals = jax.eval_shape(
        lambda th, s: jax.vjp(lambda a, b: problem.step(a, b, key), th, s)[1],
        _abstract(theta), _abstract(inner),
    )
    residual_bytes = max(_nbytes(residuals), 1)
    if num_steps * num_particles * residual_bytes <= STORE_ALL_RESIDUALS_BYTES:
        return num_steps
    ratio = _nbytes(inner) / residual_bytes
    return max(2, min(num_steps, math.ceil(math.sqrt(num_steps * ratio))))


def _particle_window(
    problem, theta, particle, reset_key, keys, reset_theta, horizon, segment_length,
    peel_last=False,
):
    """One particle's window; ``particle=None`` starts a fresh episode from ``reset_key`` inside
    (so gradients see ``init(theta, .)``) and the window is that episode: no further resets."""
    if particle is None:
        particle = start_episode(problem, theta, reset_key, horizon)
        reset_key = None
    return unroll_window(
        problem, theta, particle, reset_key, keys,
        horizon=horizon, reset_theta=reset_theta, segment_length=segment_length,
        peel_last=peel_last,
    )


def unroll_particles(
    problem: InnerProblem,
    thetas: Theta,
    particles: ParticleState | None,
    reset_keys: jax.Array,
    step_keys: jax.Array,
    *,
    horizon: Horizon,
    theta_axis: int | None,
    reset_thetas: Theta | None = None,
) -> tuple[ParticleState, WindowTrace]:
    """``unroll_window`` vmapped over P particles, no gradient. Keys: [P] and [P, K].

    ``particles=None``: every particle runs a fresh episode started from its reset key.
    """

    def one(theta, particle, reset_key, keys, reset_theta):
        return _particle_window(
            problem, theta, particle, reset_key, keys, reset_theta, horizon, None
        )

    reset_axis = None if reset_thetas is None else 0
    return jax.vmap(one, in_axes=(theta_axis, 0, 0, 0, reset_axis))(
        thetas, particles, reset_keys, step_keys, reset_thetas
    )


def unroll_particles_grad(
    problem: InnerProblem,
    thetas: Theta,
    particles: ParticleState | None,
    reset_keys: jax.Array,
    step_keys: jax.Array,
    *,
    horizon: Horizon,
    theta_axis: int | None,
    segment_length: int | None = None,
) -> tuple[jax.Array, jax.Array, ParticleState, WindowTrace]:
    """Per-particle window loss and its backprop gradient w.r.t. that particle's theta.

    The window's scan is rematerialized in segments of ``segment_length`` steps; None picks
    ``memory_optimal_segment`` (every step's residuals when they fit its budget); K (the window
    length) stores every step's residuals.

    The window loss is the mean of the K step losses. A given incoming particle state is an
    input, not a function of theta: the truncated (TBPTT) gradient. ``particles=None`` starts
    fresh episodes inside, so the gradient is the full-episode one. Gradients flow through
    every ``init(theta, .)`` that happens inside the window.
    Returns (losses [P], flat_grads [P, D] in ``ravel_pytree(theta)`` order, particles, trace).
    """

    if segment_length is None:
        theta = thetas if theta_axis is None else _abstract(thetas, drop_leading_axis=True)
        if particles is None:
            inner = jax.eval_shape(lambda: problem.init(theta, jax.random.key(0)))
        else:
            inner = _abstract(particles.inner, drop_leading_axis=True)
        segment_length = memory_optimal_segment(
            problem, theta, inner, step_keys.shape[1], num_particles=step_keys.shape[0]
        )

    def window_loss(theta, particle, reset_key, keys):
        particle, trace = _particle_window(
            problem, theta, particle, reset_key, keys, None, horizon, segment_length,
            peel_last=True,
        )
        return jnp.mean(trace.losses), (particle, trace)

    def one(theta, particle, reset_key, keys):
        (loss, aux), grad = jax.value_and_grad(window_loss, has_aux=True)(
            theta, particle, reset_key, keys
        )
        return loss, ravel_pytree(grad)[0], aux

    losses, flat_grads, (particles, trace) = jax.vmap(one, in_axes=(theta_axis, 0, 0, 0))(
        thetas, particles, reset_keys, step_keys
    )
    return losses, flat_grads, particles, trace


def evaluate_meta_loss(
    problem: InnerProblem, key: PRNGKey, theta: Theta, *, horizon: int, num_tasks: int
) -> dict[str, jax.Array]:
    """Meta-loss of ``theta``, independent of any estimator: the mean per-step meta-loss of
    ``num_tasks`` fresh episodes of ``horizon`` steps. Diverged episodes are dropped and counted.

    Returns {"meta_loss": float [], "num_nonfinite": int32 []} (meta_loss NaN if all diverged).
    """
    keys = window_keys(key, num_tasks, horizon)
    _, trace = unroll_particles(
        problem, theta, None, keys.reset, keys.step, horizon=horizon, theta_axis=None
    )
    per_task = jnp.mean(trace.losses, axis=-1)
    valid = jnp.isfinite(per_task)
    return {"meta_loss": masked_mean(per_task, valid), "num_nonfinite": jnp.sum(~valid)}
