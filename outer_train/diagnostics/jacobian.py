"""Local dynamics of the inner-training map s_{t+1} = f_t(s_t): its one-step Jacobian's top
singular value and spectral radius, and the finite-time maximal Lyapunov exponent
(REFERENCE.md, "Measuring smoothness and variance" and "Diagnostics: facts to build and test
against"; Benettin, Galgani, Giorgilli, Strelcyn 1980).

``step_fn(state, key) -> new_state`` is one pure inner step of ONE particle; for a learned
optimizer ``lambda s, k: problem.step(theta, s, k)[0]`` with s a ``LearnedOptState``. It must
return a state of the same structure, shapes and dtypes. Tangents live only on the
floating-point leaves, seen as one flat vector x (``split_float_leaves``: ``ravel_pytree`` of the
float leaves in tree order); integer and key leaves (optax's ``count``, step counters) are
carried as constants of the map, J_t = d flat(f_t(s)) / d x at s = s_t, [n, n] with n = x.size.
Everything is matrix-free (one product with J or J^T at a time, never a dense J) and jittable
with ``step_fn`` and the integer knobs static.

Products are taken in reverse mode only (``linear_maps``): J^T u is the step's vjp, and J v the
vjp of that vjp (J^T u is linear in u, so its own vjp at any u, applied to v, is J v). Forward
mode would be cheaper, but a learned optimizer may be reverse-mode only (``MLPLOpt``'s
hand-written VJP: JAX cannot ``jvp`` a ``custom_vjp`` function), and one path serves every step.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from jax.flatten_util import ravel_pytree

State = Any
StepFn = Callable[[State, jax.Array], State]


def _is_float(leaf) -> bool:
    dtype = jnp.result_type(leaf)
    if jax.dtypes.issubdtype(dtype, jnp.complexfloating):
        raise ValueError(f"complex state leaves are not supported (got {dtype})")
    return jax.dtypes.issubdtype(dtype, jnp.floating)


def split_float_leaves(state: State) -> tuple[jax.Array, Callable[[jax.Array], State]]:
    """(x, rebuild): x = the float leaves of ``state`` raveled into one vector [n] (tree order,
    dtype: their common float dtype); ``rebuild(x')`` = ``state`` with its float leaves taken from
    x' (each cast back to its own dtype) and every other leaf (ints, keys) kept as in ``state``.
    ValueError if the state has no float leaf or a complex one."""
    leaves, treedef = jax.tree.flatten(state)
    is_float = [_is_float(leaf) for leaf in leaves]
    if not any(is_float):
        raise ValueError("the state has no floating-point leaf to take tangents along")
    flat, unravel = ravel_pytree([leaf for leaf, f in zip(leaves, is_float, strict=True) if f])

    def rebuild(x: jax.Array) -> State:
        new_floats = iter(unravel(x))
        merged = [next(new_floats) if f else leaf for leaf, f in zip(leaves, is_float, strict=True)]
        return jax.tree.unflatten(treedef, merged)

    return flat, rebuild


def _flat_map(step_fn: StepFn, state: State, key: jax.Array):
    """(fn, x): fn(x') = (flat float leaves of step_fn(rebuild(x'), key), that new state)."""
    flat, rebuild = split_float_leaves(state)

    def fn(x):
        new_state = step_fn(rebuild(x), key)
        new_flat, _ = split_float_leaves(new_state)
        if new_flat.shape != flat.shape or new_flat.dtype != flat.dtype:
            raise ValueError(
                f"step_fn changed the float part of the state from {flat.dtype}{list(flat.shape)}"
                f" to {new_flat.dtype}{list(new_flat.shape)}; it must keep shapes and dtypes"
            )
        return new_flat, new_state

    return fn, flat


def linear_maps(fn: Callable, x: jax.Array):
    """(aux, J v, J^T u) of ``fn(x) -> (y, aux)`` at x, both as functions, from reverse mode
    only (see the module docstring): ``jvp(v)`` [n] -> [m], ``vjp(u)`` [m] -> [n]."""
    y, vjp_tuple, aux = jax.vjp(fn, x, has_aux=True)
    vjp = lambda u: vjp_tuple(u)[0]
    _, transpose = jax.vjp(vjp, jnp.zeros_like(y))  # vjp is linear: the point does not matter
    return aux, (lambda v: transpose(v)[0]), vjp


def _unit(v: jax.Array, axis=None) -> tuple[jax.Array, jax.Array]:
    """(v / ||v||, ||v||) along ``axis``; a zero vector stays zero (its norm, 0, is returned)."""
    norm = jnp.linalg.norm(v, axis=axis, keepdims=axis is not None)
    return v / jnp.where(norm > 0, norm, 1), jnp.squeeze(norm) if axis is None else norm[..., 0]


def _check_positive(name: str, value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be an int >= 1, got {value!r}")


def top_singular_value(
    step_fn: StepFn,
    state: State,
    key: jax.Array,
    *,
    num_iters: int = 30,
    init_key: jax.Array,
) -> tuple[jax.Array, jax.Array]:
    """sigma_max(J) of the one-step map at (state, key), by power iteration on J^T J.

        v_0 = z / ||z||, z ~ N(0, I_n) (init_key);   v_{i+1} = J^T J v_i / ||J^T J v_i||;
        returns (||J v_K||, v_K) with K = num_iters,

    one product with J and one with J^T per iteration. v_K -> the
    top right singular vector at the rate (sigma_2 / sigma_1)^(2 K); ||J v_K|| <= sigma_max
    always (a lower bound that is exact at convergence). Shapes: sigma float []; v float [n] in
    the layout of ``split_float_leaves(state)`` (``rebuild(v)`` gives it as a state pytree).
    """
    _check_positive("num_iters", num_iters)
    fn, flat = _flat_map(step_fn, state, key)
    _, jvp_fn, vjp_fn = linear_maps(fn, flat)

    def body(_, v):
        return _unit(vjp_fn(jvp_fn(v)))[0]

    v0, _ = _unit(jax.random.normal(init_key, flat.shape, flat.dtype))
    v = jax.lax.fori_loop(0, num_iters, body, v0)
    return jnp.linalg.norm(jvp_fn(v)), v


def spectral_radius_estimate(
    step_fn: StepFn,
    state: State,
    key: jax.Array,
    *,
    num_iters: int = 50,
    init_key: jax.Array,
) -> jax.Array:
    """max_i |lambda_i(J)| of the one-step map at (state, key), from repeated products J v.

        v_0 = z / ||z||, z ~ N(0, I_n) (init_key);
        g_k = log ||J v_{k-1}||,  v_k = J v_{k-1} / e^{g_k}  for k = 1..K (K = num_iters);
        returns exp(mean of g_k over the last m = ceil(K / 2) of the K steps)
              = (||J^K v_0|| / ||J^(K-m) v_0||)^(1/m).

    For a dominant real eigenvalue this converges to |lambda_1| at the rate |lambda_2/lambda_1|^K.
    For a dominant complex pair ||J^k v|| = |lambda_1|^k c_k with c_k oscillating in a bounded
    band, so the estimate is off by at most log(max c / min c) / m: averaging over the last half
    is what makes this case work. It is slow when the top two |lambda| are close. Float [].
    """
    _check_positive("num_iters", num_iters)
    fn, flat = _flat_map(step_fn, state, key)
    _, jvp_fn, _ = linear_maps(fn, flat)

    def body(v, _):
        v, norm = _unit(jvp_fn(v))
        return v, jnp.log(norm)

    v0, _ = _unit(jax.random.normal(init_key, flat.shape, flat.dtype))
    _, log_norms = jax.lax.scan(body, v0, None, length=num_iters)
    return jnp.exp(jnp.mean(log_norms[num_iters // 2 :]))


def lyapunov_exponent(
    step_fn: StepFn,
    state: State,
    keys: jax.Array,
    *,
    init_key: jax.Array,
    renorm_every: int = 1,
    num_vectors: int = 1,
) -> dict[str, Any]:
    """Finite-time maximal Lyapunov exponent along s_{t+1} = step_fn(s_t, keys[t]), t < T.

    Benettin's method: v_0^(j) = z_j / ||z_j|| with z = normal(init_key, [num_vectors, n]);
    u_{t+1} = J_t u_t (``linear_maps`` of the step at s_t); every ``renorm_every`` steps add
    log ||u|| to the running sum and renormalize u to unit length. Mathematically u and the sums
    give
        log_growth[j, t-1] = log ||J_{t-1} ... J_0 v_0^(j)||,
        lambda_T^(j) = log_growth[j, T-1] / T = (1/T) sum of the logged norms,
    whatever ``renorm_every`` (which only trades overflow risk for fewer divisions), so one run
    gives lambda at every prefix length t: log_growth[:, t-1] / t. For generic v_0, lambda_T ->
    the top Lyapunov exponent (log of the spectral radius for a fixed linear map; > 0 means
    chaos) with an O(1/T) bias from the initial direction; (log_growth[:, T-1] -
    log_growth[:, T/2-1]) / (T/2) drops most of it. A tangent that collapses to 0 gives -inf.

    The ``num_vectors`` tangents share one trajectory (one step per t, the product vmapped over
    the tangents); they are independent directions, not an orthonormalized basis, so all estimate
    the top exponent. keys: [T] key array (typed or raw). Returns
        {"lyapunov": float [num_vectors], "log_growth": float [num_vectors, T],
         "final_state": s_T (same structure as ``state``)}.
    """
    _check_positive("renorm_every", renorm_every)
    _check_positive("num_vectors", num_vectors)
    horizon = keys.shape[0]
    if horizon < 1:
        raise ValueError("keys must hold at least one step's key")
    flat, _ = split_float_leaves(state)
    tangents, _ = _unit(
        jax.random.normal(init_key, (num_vectors, *flat.shape), flat.dtype), axis=-1
    )

    def body(carry, step):
        state, tangents, log_sum = carry
        t, key = step
        fn, x = _flat_map(step_fn, state, key)
        new_state, jvp_fn, _ = linear_maps(fn, x)  # the step once, its products per tangent
        pushed = jax.vmap(jvp_fn)(tangents)
        unit, norms = _unit(pushed, axis=-1)
        log_growth = log_sum + jnp.log(norms)
        renorm = (t + 1) % renorm_every == 0
        tangents = jnp.where(renorm, unit, pushed)
        log_sum = jnp.where(renorm, log_growth, log_sum)
        return (new_state, tangents, log_sum), log_growth

    init = (state, tangents, jnp.zeros((num_vectors,), flat.dtype))
    (final_state, _, _), log_growth = jax.lax.scan(body, init, (jnp.arange(horizon), keys))
    log_growth = log_growth.T
    return {
        "lyapunov": log_growth[:, -1] / horizon,
        "log_growth": log_growth,
        "final_state": final_state,
    }
