"""Jacobian spectrum and Lyapunov exponent of an iterated map, against known answers: linear maps
(log spectral radius, numpy's SVD and eigenvalues), the logistic map (ln 2 at r = 4, the exact
2-cycle exponent at r = 3.2), a state with an integer leaf, and real inner problems checked
against dense Jacobians from jax.jacfwd.

The linear-map checks run in float64 (``jax.enable_x64`` as a context, restored afterwards).
The functions under test run inside jitted helpers, one compilation per step_fn (or per map
family, where the map's data is a traced argument).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from learned_opt.hyper import LearnedAdam
from learned_opt.mlp_lopt import MLPLOpt
from outer_train.analytic import QuadraticTask
from outer_train.diagnostics import jacobian
from outer_train.problem import LearnedOptProblem


@functools.partial(jax.jit, static_argnames=("step_fn", "horizon", "num_vectors", "with_radius"))
def _diagnose(step_fn, state, key, *, horizon, num_vectors=1, with_radius=True):
    """The diagnostics of ``step_fn`` at ``state`` (the Lyapunov run of ``horizon`` steps
    starting there), in one jit: one compilation per step_fn."""
    step_key, keys_key, sv_key, radius_key, lyap_key = jax.random.split(key, 5)
    sigma, vector = jacobian.top_singular_value(step_fn, state, step_key, init_key=sv_key)
    out = {"sigma": sigma, "vector": vector}
    if with_radius:
        out["radius"] = jacobian.spectral_radius_estimate(
            step_fn, state, step_key, init_key=radius_key
        )
    keys = jax.random.split(keys_key, horizon)
    lyap = jacobian.lyapunov_exponent(
        step_fn, state, keys, init_key=lyap_key, num_vectors=num_vectors
    )
    return {**out, **lyap}


def _second_half_rate(log_growth: np.ndarray) -> np.ndarray:
    """(log_growth[:, T-1] - log_growth[:, T/2-1]) / (T/2): the exponent without the O(1/T)
    bias of the initial direction."""
    half = log_growth.shape[1] // 2
    return (log_growth[:, -1] - log_growth[:, half - 1]) / (log_growth.shape[1] - half)


# --- linear maps s' = A s (float64) -----------------------------------------------------------

LINEAR_HORIZON = 8000


def _linear_matrices() -> dict[str, np.ndarray]:
    """Three 6x6 maps with known spectra: symmetric Q diag(eigs) Q^T, non-symmetric
    V diag(eigs) V^-1 (dominant real eigenvalue 1.2), and V blockdiag(1.1 R(0.7), ...) V^-1
    (dominant complex pair of modulus 1.1)."""
    rng = np.random.default_rng(0)
    eigs = np.array([1.2, -0.9, 0.7, 0.5, -0.3, 0.1])
    basis, _ = np.linalg.qr(rng.normal(size=(6, 6)))
    mixing = np.eye(6) + 0.3 * rng.normal(size=(6, 6))
    rotation = np.zeros((6, 6))
    rotation[:2, :2] = 1.1 * np.array([[np.cos(0.7), -np.sin(0.7)], [np.sin(0.7), np.cos(0.7)]])
    rotation[2:, 2:] = np.diag([0.8, -0.6, 0.4, 0.2])
    return {
        "symmetric": (basis * eigs) @ basis.T,
        "real_dominant": mixing @ np.diag(eigs) @ np.linalg.inv(mixing),
        "complex_pair": mixing @ rotation @ np.linalg.inv(mixing),
    }


@jax.jit
def _linear_diagnostics(matrix, key):
    """Every diagnostic of s' = matrix s, in one jit: the matrix is a traced argument captured by
    step_fn, so the three maps share one compilation."""
    state_key, step_key, keys_key, sv_key, radius_key, lyap_key = jax.random.split(key, 6)
    step_fn = lambda state, key: matrix @ state
    state = jax.random.normal(state_key, (6,), matrix.dtype)
    keys = jax.random.split(keys_key, LINEAR_HORIZON)
    sigma, vector = jacobian.top_singular_value(step_fn, state, step_key, init_key=sv_key)
    lyap = jacobian.lyapunov_exponent(step_fn, state, keys, init_key=lyap_key, num_vectors=3)
    # the same tangents (same init_key) renormalized every 7 steps instead of every step
    lyap_every7 = jacobian.lyapunov_exponent(
        step_fn, state, keys, init_key=lyap_key, num_vectors=3, renorm_every=7
    )
    return {
        "sigma": sigma,
        "vector": vector,
        "radius": jacobian.spectral_radius_estimate(step_fn, state, step_key, init_key=radius_key),
        "radius_long": jacobian.spectral_radius_estimate(
            step_fn, state, step_key, init_key=radius_key, num_iters=1000
        ),
        "lyapunov": lyap["lyapunov"],
        "log_growth": lyap["log_growth"],
        "log_growth_every7": lyap_every7["log_growth"],
    }


@pytest.fixture(scope="module")
def linear_results():
    """name -> (matrix, that map's diagnostics as float64 numpy arrays)."""
    results = {}
    with jax.enable_x64(True):
        for name, matrix in _linear_matrices().items():
            out = _linear_diagnostics(jnp.asarray(matrix), jax.random.key(0))
            assert out["sigma"].dtype == jnp.float64
            results[name] = (matrix, jax.tree.map(np.asarray, out))
    return results


@pytest.mark.parametrize("name", ["symmetric", "real_dominant", "complex_pair"])
def test_linear_map_top_singular_value_is_numpys(linear_results, name):
    matrix, res = linear_results[name]
    singular_values = np.linalg.svd(matrix, compute_uv=False)
    assert res["sigma"] == pytest.approx(singular_values[0], rel=1e-5)
    assert np.linalg.norm(res["vector"]) == pytest.approx(1.0, rel=1e-12)
    assert np.linalg.norm(matrix @ res["vector"]) == pytest.approx(res["sigma"], rel=1e-12)


@pytest.mark.parametrize("name", ["symmetric", "real_dominant"])
def test_linear_map_spectral_radius_is_max_abs_eigenvalue(linear_results, name):
    """A dominant real eigenvalue: geometric convergence, at the rate |lambda_2 / lambda_1|."""
    matrix, res = linear_results[name]
    radius = np.max(np.abs(np.linalg.eigvals(matrix)))
    assert res["radius"] == pytest.approx(radius, rel=1e-4)  # default num_iters = 50
    assert res["radius_long"] == pytest.approx(radius, rel=1e-10)  # num_iters = 1000


def test_linear_map_spectral_radius_of_a_complex_pair(linear_results):
    """The norm oscillates with the rotation, so the error is O(1/num_iters), not geometric."""
    matrix, res = linear_results["complex_pair"]
    assert np.max(np.abs(np.linalg.eigvals(matrix))) == pytest.approx(1.1, rel=1e-12)
    assert res["radius"] == pytest.approx(1.1, rel=5e-2)  # default num_iters = 50
    assert res["radius_long"] == pytest.approx(1.1, rel=2e-3)


@pytest.mark.parametrize(
    ("name", "rate_atol"), [("symmetric", 1e-10), ("real_dominant", 1e-10), ("complex_pair", 5e-4)]
)
def test_linear_map_lyapunov_is_log_spectral_radius(linear_results, name, rate_atol):
    matrix, res = linear_results[name]
    log_radius = np.log(np.max(np.abs(np.linalg.eigvals(matrix))))
    assert res["lyapunov"].shape == (3,)
    assert res["log_growth"].shape == (3, LINEAR_HORIZON)
    np.testing.assert_allclose(res["lyapunov"], log_radius, atol=1e-3)
    # without the O(1/T) bias of the initial direction it is exact for a real dominant
    # eigenvalue; a complex pair keeps an O(1/T) oscillation
    np.testing.assert_allclose(_second_half_rate(res["log_growth"]), log_radius, atol=rate_atol)
    # the prefix semantics: lyapunov is log_growth at T over T
    np.testing.assert_allclose(res["lyapunov"], res["log_growth"][:, -1] / LINEAR_HORIZON)


@pytest.mark.parametrize("name", ["symmetric", "real_dominant", "complex_pair"])
def test_linear_map_renorm_every_does_not_change_log_growth(linear_results, name):
    _, res = linear_results[name]
    np.testing.assert_allclose(res["log_growth_every7"], res["log_growth"], rtol=1e-10)


# --- the logistic map x' = r x (1 - x) (float32) ----------------------------------------------

LOGISTIC_HORIZON = 10_000


@jax.jit
def _logistic_lyapunov(rate, key):
    """Lyapunov run of x' = rate x (1 - x) from x0 = 0.3 (rate traced: one compilation)."""
    keys_key, init_key = jax.random.split(key)
    keys = jax.random.split(keys_key, LOGISTIC_HORIZON)
    step_fn = lambda x, key: rate * x * (1.0 - x)
    return jacobian.lyapunov_exponent(step_fn, jnp.float32(0.3), keys, init_key=init_key)


@pytest.fixture(scope="module")
def logistic_results():
    return {
        rate: jax.tree.map(np.asarray, _logistic_lyapunov(jnp.float32(rate), jax.random.key(1)))
        for rate in (4.0, 3.2)
    }


def test_logistic_map_at_r4_is_chaotic_with_exponent_ln2(logistic_results):
    res = logistic_results[4.0]
    assert res["lyapunov"].dtype == np.float32
    assert res["lyapunov"][0] == pytest.approx(np.log(2.0), abs=1e-2)
    assert _second_half_rate(res["log_growth"])[0] == pytest.approx(np.log(2.0), abs=1e-2)


def test_logistic_map_at_r32_has_the_exact_two_cycle_exponent(logistic_results):
    rate = 3.2
    # the 2-cycle x_pm = (r + 1 +- sqrt((r + 1)(r - 3))) / (2 r); lambda = mean log |r (1 - 2x)|
    root = np.sqrt((rate + 1) * (rate - 3))
    cycle = np.array([rate + 1 + root, rate + 1 - root]) / (2 * rate)
    exact = np.mean(np.log(np.abs(rate * (1 - 2 * cycle))))  # = 0.5 log(4 + 2r - r^2) = -0.9163
    res = logistic_results[rate]
    assert res["lyapunov"][0] < 0
    # lambda_T carries the transient from x0 = 0.3 (slowly leaving the unstable fixed point,
    # ~15 nats) as a 15/T bias; past it, the growth rate is the cycle's
    assert res["lyapunov"][0] == pytest.approx(exact, abs=2e-3)
    assert _second_half_rate(res["log_growth"])[0] == pytest.approx(exact, abs=1e-4)
    assert min(abs(res["final_state"] - cycle)) < 1e-5  # it ends on the cycle


# --- integer leaves carry no tangent ----------------------------------------------------------

DECAY = np.array([0.9, 0.5, 0.2], np.float32)
COUNTING_HORIZON = 200


def _counting_step(state, key):
    """w' = diag(0.9, 0.5, 0.2) w + 0.01 count;  count' = count + 1 (an optax-like counter)."""
    del key
    count = state["count"]
    return {"w": DECAY * state["w"] + 0.01 * count.astype(jnp.float32), "count": count + 1}


def _counting_state(w, count):
    return {"w": jnp.asarray(w, jnp.float32), "count": jnp.int32(count)}


def test_split_float_leaves_keeps_integer_leaves_fixed():
    state = _counting_state([1.0, -2.0, 0.5], 3)
    flat, rebuild = jacobian.split_float_leaves(state)
    assert flat.shape == (3,)
    np.testing.assert_array_equal(flat, state["w"])
    rebuilt = rebuild(2 * flat)
    assert jax.tree.structure(rebuilt) == jax.tree.structure(state)
    np.testing.assert_array_equal(rebuilt["w"], 2 * state["w"])
    assert rebuilt["count"].dtype == jnp.int32 and int(rebuilt["count"]) == 3


@pytest.mark.parametrize(("w", "count"), [([1.0, -2.0, 0.5], 3), ([0.0, 4.0, -1.0], 10)])
def test_state_with_integer_leaf(w, count):
    """The count advances and enters w, but carries no tangent: J = diag(0.9, 0.5, 0.2) exactly.
    The second case (new values, same shapes) must reuse the compilation."""
    cache_size = _diagnose._cache_size()
    out = _diagnose(
        _counting_step, _counting_state(w, count), jax.random.key(2), horizon=COUNTING_HORIZON
    )
    if cache_size:
        assert _diagnose._cache_size() == cache_size  # no recompilation on new values
    final = out["final_state"]
    assert final["count"].dtype == jnp.int32 and int(final["count"]) == count + COUNTING_HORIZON
    expected_w = np.asarray(w, np.float64)
    for step_count in range(count, count + COUNTING_HORIZON):
        expected_w = DECAY * expected_w + 0.01 * step_count
    np.testing.assert_allclose(final["w"], expected_w, rtol=1e-5)
    rate = _second_half_rate(np.asarray(out["log_growth"]))
    np.testing.assert_allclose(rate, np.log(0.9), atol=1e-5)
    assert float(out["sigma"]) == pytest.approx(0.9, rel=1e-5)
    np.testing.assert_allclose(np.abs(out["vector"]), [1.0, 0.0, 0.0], atol=1e-5)
    assert float(out["radius"]) == pytest.approx(0.9, rel=1e-5)


def test_bad_states_are_rejected():
    key = jax.random.key(4)
    with pytest.raises(ValueError, match="no floating-point leaf"):
        jacobian.top_singular_value(lambda s, k: s + 1, jnp.int32(0), key, init_key=key)
    with pytest.raises(ValueError, match="keep shapes and dtypes"):
        jacobian.top_singular_value(
            lambda s, k: jnp.concatenate([s, s]), jnp.ones(2), key, init_key=key
        )
    with pytest.raises(ValueError, match="renorm_every"):
        jacobian.lyapunov_exponent(
            lambda s, k: s, jnp.ones(2), jax.random.split(key, 3), init_key=key, renorm_every=0
        )


# --- real inner problems ------------------------------------------------------------------------

ADAM_HORIZON = 4


@functools.partial(jax.jit, static_argnames="step_fn")
def _dense_step(step_fn, state, key):
    """(J [n, n] of the flat float map at (state, key) by jacrev, step_fn(state, key)): the
    test-only dense reference, and the next state of the reference trajectory. Reverse mode,
    so it also differentiates MLPLOpt (reverse-mode only)."""
    flat, rebuild = jacobian.split_float_leaves(state)

    def flat_step(x):
        new_state = step_fn(rebuild(x), key)
        return jacobian.split_float_leaves(new_state)[0], new_state

    return jax.jacrev(flat_step, has_aux=True)(flat)


# name -> (learned optimizer, number of float coordinates of the inner state: params [4] plus
# LearnedAdam's mu, nu [4] each / MLPLOpt's momenta [4, 6])
INNER_OPTIMIZERS = {
    "learned_adam": (LearnedAdam(init_lr=0.05), 12),
    "mlp_lopt": (MLPLOpt(), 28),  # reverse-mode only: products through its custom VJP
}


@pytest.fixture(scope="module", params=sorted(INNER_OPTIMIZERS))
def inner_run(request):
    """QuadraticTask (dim 4) trained by a learned optimizer (state = LearnedOptState(params
    {"w": [4]}, the optimizer's state with an int32 step count)); advanced 5 steps so the
    optimizer state is generic, then diagnosed with 2 tangent vectors over ADAM_HORIZON steps."""
    task_key, init_key, run_key = jax.random.split(jax.random.key(5), 3)
    lopt, _ = INNER_OPTIMIZERS[request.param]
    problem = LearnedOptProblem(QuadraticTask.create(task_key, dim=4), lopt)
    theta = lopt.init(jax.random.key(7))

    def step_fn(state, key):
        return problem.step(theta, state, key)[0]

    state = problem.init(theta, init_key)
    for key in jax.random.split(run_key, 5):
        _, state = _dense_step(step_fn, state, key)
    diagnose_key = jax.random.key(6)
    out = _diagnose(
        step_fn, state, diagnose_key, horizon=ADAM_HORIZON, num_vectors=2, with_radius=False
    )
    return step_fn, state, diagnose_key, out, INNER_OPTIMIZERS[request.param][1]


def test_top_singular_value_matches_dense_jacobian(inner_run):
    step_fn, state, diagnose_key, out, n = inner_run
    step_key = jax.random.split(diagnose_key, 5)[0]  # _diagnose's split
    dense = np.asarray(_dense_step(step_fn, state, step_key)[0], np.float64)
    assert dense.shape == (n, n)
    expected = np.linalg.svd(dense, compute_uv=False)[0]
    assert float(out["sigma"]) == pytest.approx(expected, rel=1e-4)


def test_log_growth_matches_dense_jacobian_products(inner_run):
    """log_growth[j, t-1] = log ||J_{t-1} ... J_0 v_0^(j)|| with v_0 = normal(init_key, [V, n])
    normalized per row (the documented draw), J_t dense from jacfwd along the trajectory."""
    step_fn, state, diagnose_key, out, n = inner_run
    _, keys_key, _, _, lyap_key = jax.random.split(diagnose_key, 5)  # _diagnose's split
    tangents = np.asarray(jax.random.normal(lyap_key, (2, n), jnp.float32), np.float64)
    tangents /= np.linalg.norm(tangents, axis=1, keepdims=True)
    expected = []
    for key in jax.random.split(keys_key, ADAM_HORIZON):
        dense, state = _dense_step(step_fn, state, key)
        tangents = tangents @ np.asarray(dense, np.float64).T
        expected.append(np.log(np.linalg.norm(tangents, axis=1)))
    assert out["log_growth"].shape == (2, ADAM_HORIZON)
    np.testing.assert_allclose(out["log_growth"], np.stack(expected, axis=1), atol=1e-4)
    final = out["final_state"]
    assert jax.tree.structure(final) == jax.tree.structure(state)
    # the int32 step count (LearnedAdamState.count / MLPLOptState.step)
    count = lambda s: next(x for x in jax.tree.leaves(s.opt_state) if x.dtype == jnp.int32)
    assert count(final).dtype == jnp.int32
    assert int(count(final)) == int(count(state)) == 5 + ADAM_HORIZON
    np.testing.assert_allclose(final.params["w"], state.params["w"], rtol=1e-5)
