"""Inner-training dynamics: how fast the Jacobian products in a backprop meta-gradient grow
(the paper's diagnosis of chaotic meta-loss surfaces; REFERENCE.md "The problem" and
"Measuring smoothness and variance"; Benettin et al. 1980 for the Lyapunov exponent).

The system. Any ``InnerProblem`` at a fixed theta: a task trained by a learned optimizer
(``LearnedOptProblem``), by a fixed optax optimizer for comparison (``LearnedOptProblem`` with an
``OptaxBaseline``, whose theta is the empty dict), or a problem with a known answer
(``analytic.LinearSystemProblem``). The state s = the problem's whole inner state (for a task:
params and optimizer state, ``LearnedOptState``); tangents live on its float leaves
(``jacobian.split_float_leaves``). One trajectory per seed i:
    s_0 = ``unroll.start_episode(problem, theta, reset_key_i, T_max).inner``,
    s_{t+1} = step(theta, s_t, step_keys_i[t]),   t < T_max = max(horizons),
with (reset_key_i, step_keys_i) = ``surface.episode_keys(episode_key_i, T_max, mode)``: the
same init and data as the meta-training engine (and a slice point of ``diagnostics.surface``)
given that key; "fixed_batch" steps every t on one batch (the paper's), "common" on fresh ones.

Keys: ``episode_root, aux_root = split(key)``; seed i's episode key is ``episode_root`` for
i = 0 and ``fold_in(episode_root, i)`` after, and ``tangent_key_i, power_key_i =
split(fold_in(aux_root, i))``. So seed 0 runs exactly the episode that
``surface.compute_surface(..., key=key)`` runs at every slice point (it splits its key the same
way): with theta at a slice point, its L_T are that point's raw meta-losses. ``power_key_i`` is
split into [2, J] keys: row 0 starts the top singular value's power iteration at step j, row 1
the spectral radius's.

Per seed, with J_t = d s_{t+1} / d s_t (matrix-free products: ``jacobian.linear_maps``):
  * ``sigma_max[i, j]`` = top singular value of J_t at t = ``jacobian_steps[j]`` (power
    iteration on J^T J, ``power_iterations`` rounds; a lower bound, exact at convergence) and
    ``spectral_radius[i, j]`` = max |eigenvalue| estimate of the same J_t
    (``jacobian.spectral_radius_estimate``, ``power_iterations`` products);
  * ``log_growth[i, v, t-1]`` = log ||J_{t-1} ... J_0 u_v|| for V = ``num_vectors`` random unit
    tangents u_v (``jacobian.lyapunov_exponent``, renormalized every ``renorm_every`` steps);
    from it, for every T in horizons (one trajectory of T_max gives every prefix):
        lyapunov[i, v, h] = log_growth[i, v, T-1] / T                     (lambda_T, Benettin)
        tail[i, v, h]     = (log_growth[i, v, T-1] - log_growth[i, v, T/2-1]) / (T - T/2)
    (T/2 = floor(T / 2); tail = lambda_1 at T = 1). lambda_T carries an O(1/T) transient from
    the initial direction; ``tail`` drops most of it and is what the verdict uses;
  * ``losses[i, t]`` = the per-step meta-loss l_t of the trajectory, so L_T = mean(l_0..l_{T-1}).
Per horizon (``gradient_norms``; needs a non-empty theta): ``grad_norm[i, h]`` = ||dL_T/dtheta||_2
of L_T = (1/T) sum_{t<T} l_t by full backprop through the T steps from the same s_0 and keys
(the engine's rematerialized unroll, as ``unroll.unroll_particles_grad``; gradients also flow
through init(theta)). ``grad_meta_loss[i, h]`` is that L_T as the gradient run computed it
(the prefix mean of ``losses``: same keys).

Statistics (``exponent_stats``): each lambda estimate per horizon is summarized by its mean
over the finite (seed, vector) values and a standard error. Tangents of one trajectory align
with the same top Lyapunov vector, so their values are not independent draws; the standard
error is therefore taken over seeds (std over the per-seed means, ddof = 1, / sqrt(#seeds)) when
there are >= 2 seeds, else over that seed's vectors (ddof = 1, / sqrt(V); it understates the
spread across trajectories), else NaN.

Gradient growth (``log_slopes``): ``grad_log_slope`` is the least-squares slope b of
    mean_i log ||dL_T/dtheta||_i ~ a + b T   over the horizons (seeds with a finite norm),
and ``sum_grad_log_slope`` the same for log(T ||dL_T/dtheta||), the gradient of the SUM of the
first T losses. If every per-step gradient grows like e^(lambda t), the summed one grows like
e^(lambda T) while the mean carries an extra 1/T: ``sum_grad_log_slope`` is the one to set
against lambda (with lambda < 0 the sum converges and its slope tends to 0). The per-step
gradients dl_t/dtheta also scale with the meta-loss's own sensitivity to the state (with
``loss_transform = "log"``, d log l = dl / l grows as the loss falls), so a slope above lambda
is not by itself chaos; a slope tracking a positive lambda is.

The verdict (``verdict``) is defined there. Everything is computed in float32.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import time
from collections.abc import Callable, Sequence
from typing import Any, ClassVar, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.flatten_util import ravel_pytree

from outer_train import unroll
from outer_train.base import InnerProblem, PRNGKey, Theta
from outer_train.diagnostics import jacobian
from outer_train.diagnostics.surface import episode_keys, prefix_meta_losses
from outer_train.in_flight import bounded

# ---------------------------------------------------------------------------------------------
# The optax baseline: a fixed optax optimizer as a (theta-free) learned optimizer

OPTAX_OPTIMIZERS: dict[str, str] = {
    "adam": "optax.adam(learning_rate)",
    "sgd": "optax.sgd(learning_rate)",
    "momentum": "optax.sgd(learning_rate, momentum=0.9)",
}


@dataclasses.dataclass(frozen=True)
class OptaxBaseline:
    """A fixed optax optimizer in the ``LearnedOptimizer`` protocol, so that
    ``LearnedOptProblem(task, OptaxBaseline("adam", 1e-3))`` is the task trained by optax with
    exactly the learned optimizer's step (same batches, meta-loss and transform); its inner state
    is ``LearnedOptState(params, optax state)``.

    theta is the empty dict (nothing to meta-learn; ``init`` ignores its key). ``opt_fn(theta)``
    is ``optax.with_extra_args_support`` of ``OPTAX_OPTIMIZERS[kind]`` (``loss=`` is ignored),
    so one step equals one step of ``tasks.train`` with the same optax optimizer.
    """

    kind: str = "adam"
    learning_rate: float = 1e-3

    name: ClassVar[str] = "optax_baseline"

    def __post_init__(self):
        if self.kind not in OPTAX_OPTIMIZERS:
            raise ValueError(
                f"unknown optax optimizer {self.kind!r}; use one of {sorted(OPTAX_OPTIMIZERS)}"
            )
        if not self.learning_rate > 0:
            raise ValueError(f"learning_rate must be > 0, got {self.learning_rate}")

    def transformation(self) -> optax.GradientTransformation:
        if self.kind == "adam":
            return optax.adam(self.learning_rate)
        return optax.sgd(self.learning_rate, momentum=0.9 if self.kind == "momentum" else None)

    def init(self, key: PRNGKey) -> Theta:
        del key
        return {}

    def opt_fn(self, theta: Theta) -> optax.GradientTransformationExtraArgs:
        del theta
        return optax.with_extra_args_support(self.transformation())

    def config(self) -> dict[str, Any]:
        return {"kind": self.kind, "learning_rate": self.learning_rate}


# ---------------------------------------------------------------------------------------------
# One seed's trajectory (traced inside jit)


def _states_at(problem: InnerProblem, theta: Theta, state, step_keys: jax.Array,
               steps: tuple[int, ...]):
    """(losses float [T], the states s_t at t in ``steps`` stacked on a leading [J] axis) of
    the trajectory from ``state`` over ``step_keys`` [T]; no gradient. The state's leaves must
    be numeric arrays (``jnp.where`` keeps the snapshot)."""
    wanted = jnp.asarray(steps, jnp.int32)
    snapshots = jax.tree.map(lambda x: jnp.repeat(x[None], len(steps), axis=0), state)

    def body(carry, xs):
        state, snapshots = carry
        t, key = xs
        hit = wanted == t

        def keep(snap, x):
            return jnp.where(hit.reshape(-1, *([1] * x.ndim)), x[None], snap)

        snapshots = jax.tree.map(keep, snapshots, state)
        state, loss = problem.step(theta, state, key)
        return (state, snapshots), loss

    num_steps = step_keys.shape[0]
    (_, snapshots), losses = jax.lax.scan(
        body, (state, snapshots), (jnp.arange(num_steps, dtype=jnp.int32), step_keys)
    )
    return losses, snapshots


@functools.partial(
    jax.jit,
    static_argnames=("jacobian_steps", "num_vectors", "power_iterations", "renorm_every"),
)
def seed_dynamics(
    problem: InnerProblem,
    theta: Theta,
    reset_key: PRNGKey,
    step_keys: jax.Array,
    tangent_key: PRNGKey,
    power_key: PRNGKey,
    *,
    jacobian_steps: tuple[int, ...],
    num_vectors: int,
    power_iterations: int,
    renorm_every: int,
) -> dict[str, jax.Array]:
    """One seed's trajectory diagnostics (module docstring), in one jitted call; recompiles only
    for new shapes or static knobs, not for new keys, theta values or data.

    reset_key []: the episode's init (``unroll.start_episode``); step_keys [T_max]; tangent_key:
    the V initial tangents; power_key: split into [2, J] power-iteration starts.
    Returns {"losses": [T_max], "sigma_max": [J], "spectral_radius": [J],
             "log_growth": [V, T_max]}.
    """
    num_steps = step_keys.shape[0]
    state = unroll.start_episode(problem, theta, reset_key, num_steps).inner

    def step_fn(s, key):
        return problem.step(theta, s, key)[0]

    out = {}
    if jacobian_steps:
        losses, snapshots = _states_at(problem, theta, state, step_keys, jacobian_steps)
        keys_at = step_keys[jnp.asarray(jacobian_steps, jnp.int32)]
        sv_keys, radius_keys = jax.random.split(power_key, (2, len(jacobian_steps)))
        sigma = jax.vmap(
            lambda s, k, ik: jacobian.top_singular_value(
                step_fn, s, k, num_iters=power_iterations, init_key=ik
            )[0]
        )(snapshots, keys_at, sv_keys)
        radius = jax.vmap(
            lambda s, k, ik: jacobian.spectral_radius_estimate(
                step_fn, s, k, num_iters=power_iterations, init_key=ik
            )
        )(snapshots, keys_at, radius_keys)
    else:
        losses, _ = _states_at(problem, theta, state, step_keys, ())
        sigma = radius = jnp.zeros((0,), jnp.float32)
    lyap = jacobian.lyapunov_exponent(
        step_fn, state, step_keys, init_key=tangent_key, renorm_every=renorm_every,
        num_vectors=num_vectors,
    )
    out.update(losses=losses, sigma_max=sigma, spectral_radius=radius,
               log_growth=lyap["log_growth"])
    return out


@functools.partial(jax.jit, static_argnames=("horizons",))
def gradient_norms(problem: InnerProblem, theta: Theta, reset_keys: jax.Array,
                   step_keys: jax.Array, *, horizons: tuple[int, ...]
                   ) -> tuple[jax.Array, jax.Array]:
    """(L_T [S, H], ||dL_T/dtheta||_2 [S, H]) for every T in ``horizons`` of S fresh episodes
    (reset_keys [S], step_keys [S, T_max], T_max = horizons[-1]) by full backprop, in ONE
    program: per seed one forward unroll of T_max steps (``unroll.start_episode`` then
    ``unroll.unroll_window``, rematerialized in ``unroll.memory_optimal_segment`` segments,
    as ``unroll.unroll_particles_grad`` runs it) and H backward passes vmapped over the
    cotangents w_T = (1/T) [t < T] of the per-step losses: dL_T/dtheta = vjp(w_T).

    L_T is NaN if any of l_0..l_{T-1} is non-finite. A non-finite value ANYWHERE in the T_max
    steps makes every horizon's gradient non-finite (0 * inf in the backward pass), also for
    T before it; ``compute_dynamics`` recomputes those horizons on their own.
    """
    max_horizon = horizons[-1]
    theta_shape = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), theta)
    inner = jax.eval_shape(lambda: problem.init(theta_shape, jax.random.key(0)))
    segment = unroll.memory_optimal_segment(
        problem, theta_shape, inner, max_horizon, num_particles=reset_keys.shape[0]
    )
    index = jnp.arange(max_horizon)
    weights = jnp.stack([jnp.where(index < t, 1.0 / t, 0.0) for t in horizons])  # [H, T_max]

    def one(reset_key, keys):
        def losses_fn(theta):
            particle = unroll.start_episode(problem, theta, reset_key, max_horizon)
            _, trace = unroll.unroll_window(
                problem, theta, particle, None, keys, horizon=max_horizon,
                segment_length=segment, peel_last=True,
            )
            return trace.losses

        losses, vjp = jax.vjp(losses_fn, theta)
        grads = jax.vmap(lambda w: ravel_pytree(vjp(w.astype(losses.dtype))[0])[0])(weights)
        return prefix_meta_losses(losses[None], horizons)[0], _norm(grads)

    return jax.vmap(one)(reset_keys, step_keys)


def _norm(x: jax.Array, axis: int = -1) -> jax.Array:
    """||x||_2 along ``axis`` without overflow: max|x| * ||x / max|x|||, finite for every
    finite x (a float32 gradient with entries above ~1e19 has an infinite plain norm)."""
    scale = jnp.max(jnp.abs(x), axis=axis, keepdims=True)
    safe = jnp.where(scale > 0, scale, 1)
    return jnp.squeeze(safe, axis) * jnp.linalg.norm(x / safe, axis=axis)


@functools.partial(jax.jit, static_argnames=("horizon",))
def gradient_norm_at(problem: InnerProblem, theta: Theta, reset_keys: jax.Array,
                     step_keys: jax.Array, *, horizon: int) -> tuple[jax.Array, jax.Array]:
    """(L_T [S], ||dL_T/dtheta||_2 [S]) at the one horizon T = step_keys.shape[1]
    (``unroll.unroll_particles_grad``): the fallback of ``gradient_norms`` for a horizon whose
    losses are finite but whose gradient a later non-finite step spoiled."""
    losses, flat_grads, _, _ = unroll.unroll_particles_grad(
        problem, theta, None, reset_keys, step_keys, horizon=horizon, theta_axis=None
    )
    return losses, _norm(flat_grads)


# ---------------------------------------------------------------------------------------------
# Host-side statistics


def prefix_exponents(log_growth: np.ndarray, horizons: Sequence[int]):
    """(lyapunov, tail), each [..., H], from log_growth [..., T_max] (module docstring)."""
    log_growth = np.asarray(log_growth, np.float64)
    lyap, tail = [], []
    for t in horizons:
        lyap.append(log_growth[..., t - 1] / t)
        half = t // 2
        start = log_growth[..., half - 1] if half >= 1 else 0.0
        tail.append((log_growth[..., t - 1] - start) / (t - half))
    return np.stack(lyap, axis=-1), np.stack(tail, axis=-1)


class ExponentStats(NamedTuple):
    """Mean, standard error and count of a lambda estimate over (seeds, vectors).

    mean, stderr: float; stderr_over: "seeds", "vectors" or "none" (see the module docstring);
    num_finite / num_values: how many of the seed x vector values were finite and used."""

    mean: float
    stderr: float
    stderr_over: str
    num_finite: int
    num_values: int


def exponent_stats(values: np.ndarray) -> ExponentStats:
    """Stats of values [S, V] (seeds x tangent vectors); non-finite values are excluded and
    counted. SE over seeds' means (S >= 2 seeds with a finite value), else over the vectors of
    the one seed (>= 2 finite), else NaN."""
    values = np.asarray(values, np.float64)
    finite = np.isfinite(values)
    n = int(finite.sum())
    if n == 0:
        return ExponentStats(math.nan, math.nan, "none", 0, values.size)
    mean = float(values[finite].mean())
    seed_means = np.array([row[np.isfinite(row)].mean() for row in values
                           if np.isfinite(row).any()])
    if seed_means.size >= 2:
        stderr, over = float(seed_means.std(ddof=1) / math.sqrt(seed_means.size)), "seeds"
    elif n >= 2:
        stderr, over = float(values[finite].std(ddof=1) / math.sqrt(n)), "vectors"
    else:
        stderr, over = math.nan, "none"
    return ExponentStats(mean, stderr, over, n, values.size)


def log_slope(horizons: Sequence[int], norms: np.ndarray) -> float:
    """Least-squares slope of mean_i log norms[i, h] against T = horizons[h] ([S, H]; per T the
    mean over seeds with a finite, positive norm); NaN with fewer than 2 such horizons."""
    norms = np.asarray(norms, np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        logs = np.where(np.isfinite(norms) & (norms > 0), np.log(norms), np.nan)
    t, y = [], []
    for h, horizon in enumerate(horizons):
        column = logs[:, h]
        if np.isfinite(column).any():
            t.append(float(horizon))
            y.append(float(np.nanmean(column)))
    if len(t) < 2:
        return math.nan
    return float(np.polyfit(np.asarray(t), np.asarray(y), 1)[0])


def log_slopes(horizons: Sequence[int], grad_norm: np.ndarray) -> dict[str, float]:
    """{"grad_log_slope", "sum_grad_log_slope"} of grad_norm [S, H] (module docstring)."""
    scale = np.asarray(horizons, np.float64)[None]
    return {"grad_log_slope": log_slope(horizons, grad_norm),
            "sum_grad_log_slope": log_slope(horizons, scale * np.asarray(grad_norm))}


# ---------------------------------------------------------------------------------------------
# The verdict

VERDICT_Z = 2.0  # half-width of the interval in standard errors (~95% for a normal mean)
VERDICT_GROWTH = 1e3  # T* is where Jacobian products have grown by this factor


class Verdict(NamedTuple):
    """kind: "chaotic", "slow_growth", "stable", "marginal" or "undetermined"; line: the
    summary's sentence;
    lower, upper: the interval mean -+ VERDICT_Z stderr (NaN stderr: both = mean);
    t_star: ln(VERDICT_GROWTH) / lambda for "chaotic" and "slow_growth" (else NaN)."""

    kind: str
    line: str
    lower: float
    upper: float
    t_star: float


def _signed(x: float) -> str:
    return f"{x:+.3g}"


def verdict(mean: float, stderr: float, *, max_horizon: int,
            estimators: Sequence[str] = ("pes", "nres")) -> Verdict:
    """The one-line verdict on the tail Lyapunov estimate lambda (per inner step) at the
    longest horizon ``max_horizon``, with its standard error.

    With lower, upper = mean -+ VERDICT_Z * stderr (stderr NaN -> 0: no interval, and the line
    says so):
      * "undetermined" if mean is not finite (a trajectory or tangent diverged everywhere);
      * lower > 0: Jacobian products (hence backprop meta-gradients) grow like e^(lambda T);
        t_star = ln(VERDICT_GROWTH) / mean, the unroll length at which they have grown 1000x;
        beyond it prefer an ES-type estimator (``estimators``). "chaotic" if t_star <=
        max_horizon, else "slow_growth" (the line adds that backprop is still safe at the
        lengths measured);
      * "stable" if upper < 0: products shrink; backprop is safe at lengths <= max_horizon;
      * "marginal" otherwise (the interval contains 0): no exponential growth is resolved at
        T <= max_horizon; the line gives the length at which the upper end would reach 1000x.
    """
    no_interval = not math.isfinite(stderr)
    half = 0.0 if no_interval else VERDICT_Z * stderr
    lower, upper = mean - half, mean + half
    if not math.isfinite(mean):
        return Verdict("undetermined", "undetermined: the Lyapunov estimate is not finite (the "
                       "trajectory or its tangents diverged)", math.nan, math.nan, math.nan)
    interval = ("no error bar: one seed and one tangent" if no_interval
                else f"{VERDICT_Z:g}-SE interval [{_signed(lower)}, {_signed(upper)}]")
    growth = f"{VERDICT_GROWTH:.0e}".replace("e+0", "e")
    if lower > 0:
        t_star = math.log(VERDICT_GROWTH) / mean
        beyond = (f" (beyond the longest T measured, {max_horizon}: backprop is still safe "
                  "there)" if t_star > max_horizon else "")
        line = (f"lambda = {_signed(mean)} per inner step ({interval}): backprop "
                f"meta-gradients grow ~e^({mean:.3g} T); at T >= {t_star:.0f} (Jacobian "
                f"products {growth}x) prefer {' or '.join(estimators)}{beyond}")
        kind = "slow_growth" if t_star > max_horizon else "chaotic"
        return Verdict(kind, line, lower, upper, t_star)
    if upper < 0:
        line = (f"stable (lambda = {_signed(mean)} < 0 per inner step, {interval}): backprop "
                f"is safe at these lengths (T <= {max_horizon})")
        return Verdict("stable", line, lower, upper, math.nan)
    reach = (f"; at the upper end products would grow {growth}x by T = "
             f"{math.log(VERDICT_GROWTH) / upper:.0f}" if upper > 0 else "")
    line = (f"marginal (lambda = {_signed(mean)} per inner step, {interval} contains 0): no "
            f"exponential growth resolved at T <= {max_horizon}{reach}")
    return Verdict("marginal", line, lower, upper, math.nan)


# ---------------------------------------------------------------------------------------------
# The whole computation


class DynamicsResult(NamedTuple):
    """What ``compute_dynamics`` returns (host NumPy; S seeds, V vectors, H horizons, J steps).

    horizons int [H]; jacobian_steps int [J];
    losses float32 [S, T_max]: per-step meta-losses of each trajectory;
    sigma_max, spectral_radius float32 [S, J]; log_growth float32 [S, V, T_max];
    lyapunov, tail float64 [S, V, H] (``prefix_exponents``);
    grad_norm, grad_meta_loss float32 [S, H], or None when not computed;
    trajectory_steps: S * T_max; gradient_steps: S * T_max forward steps of the gradient
      program, plus S * T per horizon recomputed alone (0 if not computed);
    trajectory_seconds, gradient_seconds: wall time of each phase, compilation included;
    seed_seconds float [S]: wall time of each seed's call (the first one compiles).
    """

    horizons: np.ndarray
    jacobian_steps: np.ndarray
    losses: np.ndarray
    sigma_max: np.ndarray
    spectral_radius: np.ndarray
    log_growth: np.ndarray
    lyapunov: np.ndarray
    tail: np.ndarray
    grad_norm: np.ndarray | None
    grad_meta_loss: np.ndarray | None
    trajectory_steps: int
    gradient_steps: int
    trajectory_seconds: float
    gradient_seconds: float
    seed_seconds: np.ndarray


def seed_keys(key: PRNGKey, num_seeds: int, max_horizon: int, mode: str):
    """Per seed (stacked [S]): reset keys, step keys [S, T_max], tangent keys, power keys
    (module docstring: seed 0's episode is ``compute_surface``'s for the same key)."""
    episode_root, aux_root = jax.random.split(key)
    resets, steps, tangents, powers = [], [], [], []
    for i in range(num_seeds):
        episode_key = episode_root if i == 0 else jax.random.fold_in(episode_root, i)
        tangent_key, power_key = jax.random.split(jax.random.fold_in(aux_root, i))
        reset, step = episode_keys(episode_key, max_horizon, mode)
        resets.append(reset)
        steps.append(step)
        tangents.append(tangent_key)
        powers.append(power_key)
    return jnp.stack(resets), jnp.stack(steps), jnp.stack(tangents), jnp.stack(powers)


def compute_dynamics(
    problem: InnerProblem,
    theta: Theta,
    *,
    horizons: Sequence[int],
    mode: str,
    key: PRNGKey,
    num_seeds: int = 2,
    num_vectors: int = 4,
    jacobian_steps: Sequence[int] = (),
    power_iterations: int = 30,
    renorm_every: int = 1,
    gradients: bool = True,
    on_progress: Callable[[int], None] | None = None,
) -> DynamicsResult:
    """Every per-seed diagnostic and, with ``gradients`` (and a non-empty theta), the backprop
    gradient norms per horizon (module docstring for the formulas and keys).

    horizons: increasing unroll lengths >= 1 (T_max = the last); jacobian_steps: steps in
    [0, T_max). Runs one jitted call per seed (``seed_dynamics``), then one for every
    horizon's gradient (``gradient_norms``, all seeds vmapped; ``gradient_norm_at`` for a
    horizon it could not give), each fetched before the next starts;
    ``on_progress(inner_steps_done)`` after each seed (T_max steps) and after the gradients
    (``DynamicsResult.gradient_steps``).
    """
    horizons = tuple(int(t) for t in horizons)
    if not horizons or min(horizons) < 1 or list(horizons) != sorted(set(horizons)):
        raise ValueError(f"horizons must be increasing ints >= 1, got {horizons}")
    max_horizon = horizons[-1]
    jacobian_steps = tuple(int(t) for t in jacobian_steps)
    if any(not 0 <= t < max_horizon for t in jacobian_steps):
        raise ValueError(f"jacobian_steps must be in [0, {max_horizon}), got {jacobian_steps}")
    if num_seeds < 1:
        raise ValueError(f"num_seeds must be >= 1, got {num_seeds}")
    resets, steps, tangents, powers = seed_keys(key, num_seeds, max_horizon, mode)

    t0 = time.perf_counter()
    done = 0
    per_seed = []
    seed_seconds = []

    def calls():  # lazy: each next() dispatches one seed's call
        for i in range(num_seeds):
            yield time.perf_counter(), seed_dynamics(
                problem, theta, resets[i], steps[i], tangents[i], powers[i],
                jacobian_steps=jacobian_steps, num_vectors=num_vectors,
                power_iterations=power_iterations, renorm_every=renorm_every,
            )

    for t_seed, out in bounded(calls(), max_in_flight=1):  # one call in flight
        per_seed.append(jax.tree.map(np.asarray, out))
        seed_seconds.append(time.perf_counter() - t_seed)
        done += max_horizon
        if on_progress is not None:
            on_progress(done)
    trajectory_seconds = time.perf_counter() - t0
    stacked = {k: np.stack([o[k] for o in per_seed]) for k in per_seed[0]}
    lyapunov, tail = prefix_exponents(stacked["log_growth"], horizons)

    grad_norm = grad_meta_loss = None
    gradient_steps = 0
    t0 = time.perf_counter()
    if gradients and ravel_pytree(theta)[0].size > 0:
        meta, norm = gradient_norms(problem, theta, resets, steps, horizons=horizons)
        grad_meta_loss, grad_norm = np.array(meta), np.array(norm)
        gradient_steps = num_seeds * max_horizon
        # a later non-finite step spoils the shared backward pass: redo such horizons alone
        for h, t in enumerate(horizons):
            spoiled = np.isfinite(grad_meta_loss[:, h]) & ~np.isfinite(grad_norm[:, h])
            if spoiled.any():
                meta, norm = gradient_norm_at(problem, theta, resets, steps[:, :t], horizon=t)
                grad_meta_loss[:, h], grad_norm[:, h] = np.asarray(meta), np.asarray(norm)
                gradient_steps += num_seeds * t
        if on_progress is not None:
            on_progress(done + gradient_steps)
    gradient_seconds = time.perf_counter() - t0

    return DynamicsResult(
        horizons=np.asarray(horizons, np.int64),
        jacobian_steps=np.asarray(jacobian_steps, np.int64),
        losses=stacked["losses"],
        sigma_max=stacked["sigma_max"],
        spectral_radius=stacked["spectral_radius"],
        log_growth=stacked["log_growth"],
        lyapunov=lyapunov,
        tail=tail,
        grad_norm=grad_norm,
        grad_meta_loss=grad_meta_loss,
        trajectory_steps=num_seeds * max_horizon,
        gradient_steps=gradient_steps,
        trajectory_seconds=trajectory_seconds,
        gradient_seconds=gradient_seconds,
        seed_seconds=np.asarray(seed_seconds),
    )


def summarize(result: DynamicsResult) -> dict[str, Any]:
    """The derived numbers: per horizon the ``ExponentStats`` of lambda_T and of the tail
    estimate, the gradient-growth slopes, and the verdict on the tail estimate at T_max."""
    horizons = [int(t) for t in result.horizons]
    per_horizon = []
    for h, t in enumerate(horizons):
        per_horizon.append({
            "horizon": t,
            "lyapunov": exponent_stats(result.lyapunov[..., h])._asdict(),
            "tail": exponent_stats(result.tail[..., h])._asdict(),
            "meta_loss": float(np.nanmean(result.losses[:, :t].mean(axis=1))),
        })
    tail = exponent_stats(result.tail[..., -1])
    out: dict[str, Any] = {"per_horizon": per_horizon}
    if result.grad_norm is not None:
        out.update(log_slopes(horizons, result.grad_norm))
    v = verdict(tail.mean, tail.stderr, max_horizon=horizons[-1])
    out["verdict"] = v._asdict()
    return out
