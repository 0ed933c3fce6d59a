"""Meta-loss surfaces against known answers: the linear system's exact quadratic meta-loss, direct
unrolls with the documented keys, Monte Carlo smoothing reproduced draw by draw, the Gaussian
identity E L(theta + eps) = L(theta) + sigma^2/2 tr(H), directions, 2-D grids, a 2-device mesh
and the MLP learned optimizer on the standard task."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from learned_opt.hyper import LearnedAdam, LearnedSGD
from learned_opt.mlp_lopt import MLPLOpt
from outer_train import unroll
from outer_train.analytic import LinearSystemProblem, QuadraticTask
from outer_train.diagnostics import surface
from outer_train.problem import LearnedOptProblem

REPO = Path(__file__).resolve().parents[2]
HORIZONS = (1, 3, 8)
LDS = LinearSystemProblem.create(jax.random.key(0))  # noise-free, init_scale 0: L is exact
THETA0 = jnp.array([0.3, -0.2, 0.1, 0.5], jnp.float32)
SLICE_A = np.linspace(-1.0, 1.0, 9, dtype=np.float32)

_expected_batch = jax.jit(
    lambda thetas, horizons: jnp.stack(
        [jax.vmap(lambda th, t=t: LDS.expected_meta_loss(th, t))(thetas) for t in horizons], 1
    ),
    static_argnums=1,
)


def _expected(thetas, horizons=HORIZONS) -> np.ndarray:
    """[N, H]: the linear system's exact meta-loss at each flat theta (its own scan)."""
    return np.asarray(_expected_batch(jnp.stack(list(thetas)), tuple(horizons)))


@pytest.fixture(scope="module")
def lds_direction():
    return surface.random_direction(jax.random.key(1), THETA0, "paper")


@pytest.fixture(scope="module")
def lds_slice(lds_direction):
    progress = []
    result = surface.compute_surface(
        LDS,
        THETA0,
        [lds_direction],
        SLICE_A,
        horizons=HORIZONS,
        mode="common",
        key=jax.random.key(2),
        chunk_size=4,
        on_chunk=progress.append,
    )
    return result, progress


def test_linear_system_slice_is_the_exact_parabola(lds_slice, lds_direction):
    result, progress = lds_slice
    assert result.coords.shape == (9, 1) and result.raw.shape == (9, 3)
    np.testing.assert_array_equal(result.horizons, HORIZONS)
    want = _expected([THETA0 + a * lds_direction for a in SLICE_A])
    np.testing.assert_allclose(result.raw, want, rtol=2e-6)
    for j in range(len(HORIZONS)):  # a quadratic in a: a degree-2 fit leaves only rounding
        fit = np.polyval(np.polyfit(SLICE_A, result.raw[:, j], 2), SLICE_A)
        span = np.ptp(result.raw[:, j])
        assert np.max(np.abs(fit - result.raw[:, j])) < 1e-5 * span
    assert result.smoothed is None and result.smoothed_stderr is None
    assert result.num_nonfinite.tolist() == [0, 0, 0]
    assert progress == [4, 8, 9]  # 3 chunks of 4 points, the last padded
    assert result.inner_steps == 3 * 4 * 8


# --- a problem whose losses depend on the step key: QuadraticTask trained by LearnedSGD


QUAD = LearnedOptProblem(QuadraticTask.create(jax.random.key(3), dim=4), LearnedSGD())
QUAD_THETA0 = LearnedSGD.theta_from(0.1)
QUAD_A = np.array([-0.5, 0.0, 0.0, 0.5], np.float32)  # points 1 and 2 coincide
QUAD_HORIZONS = (2, 6)
QUAD_KEY = jax.random.key(4)
# 3 perturbations per point: 4 episodes per point, 2 points per call (also on a 2-device mesh)
QUAD_KNOBS = dict(horizons=QUAD_HORIZONS, key=QUAD_KEY, num_smoothing=3, sigma=0.1, chunk_size=8)


@jax.jit
def _direct_unroll(problem, theta, reset_key, step_keys):
    """Per-step losses [T] of problem.step called in a Python loop, with the given keys."""
    state = unroll.start_episode(problem, theta, reset_key, step_keys.shape[0]).inner
    losses = []
    for t in range(step_keys.shape[0]):
        state, loss = problem.step(theta, state, step_keys[t])
        losses.append(loss)
    return jnp.stack(losses)


def _direct_meta_losses(mode: str) -> np.ndarray:
    episode_key, _ = jax.random.split(QUAD_KEY)  # compute_surface's documented split
    keys = unroll.window_keys(episode_key, 1, max(QUAD_HORIZONS))
    if mode == "fixed_batch":
        step_keys = jnp.repeat(keys.step[0, :1], max(QUAD_HORIZONS), axis=0)  # one key
    else:
        step_keys = keys.step[0]
    rows = []
    for a in QUAD_A:
        theta = {"log_lr": QUAD_THETA0["log_lr"] + a}
        losses = np.asarray(_direct_unroll(QUAD, theta, keys.reset[0], step_keys))
        rows.append([losses[:t].mean() for t in QUAD_HORIZONS])
    return np.array(rows)


@pytest.fixture(scope="module")
def quad_slices():
    direction = surface.axis_direction(QUAD_THETA0, "log_lr")
    return {  # one compiled program for both modes: the mode only chooses the keys
        mode: surface.compute_surface(
            QUAD, QUAD_THETA0, [direction], QUAD_A, mode=mode, **QUAD_KNOBS
        )
        for mode in surface.MODES
    }


def test_episode_keys_of_the_two_modes():
    key = jax.random.key(5)
    keys = unroll.window_keys(key, 1, 6)
    data = jax.random.key_data
    reset, fixed = surface.episode_keys(key, 6, "fixed_batch")
    _, common = surface.episode_keys(key, 6, "common")
    np.testing.assert_array_equal(data(reset), data(keys.reset[0]))
    np.testing.assert_array_equal(data(fixed), np.repeat(data(keys.step[0, :1]), 6, axis=0))
    np.testing.assert_array_equal(data(common), data(keys.step[0]))
    assert len({tuple(k) for k in np.asarray(data(common))}) == 6
    with pytest.raises(ValueError, match="fixed_batch"):
        surface.episode_keys(key, 6, "fresh")


@pytest.mark.parametrize("mode", sorted(surface.MODES))
def test_each_mode_equals_a_direct_unroll_with_the_documented_keys(quad_slices, mode):
    result = quad_slices[mode]
    np.testing.assert_allclose(result.raw, _direct_meta_losses(mode), rtol=1e-6)
    for name in ("raw", "smoothed", "smoothed_stderr"):  # same theta, same keys: identical
        np.testing.assert_array_equal(getattr(result, name)[1], getattr(result, name)[2])
    assert result.inner_steps == 2 * 2 * 4 * 6  # 2 calls, 2 points of 1 + 3 episodes, 6 steps


def test_fixed_batch_differs_from_common_and_common_is_the_projects_meta_loss(quad_slices):
    fixed, common = quad_slices["fixed_batch"].raw, quad_slices["common"].raw
    assert np.all(np.abs(fixed - common) > 1e-4 * np.abs(common))
    # "common" at a = 0 and T = 2 < max(horizons) is exactly unroll.evaluate_meta_loss with
    # compute_surface's episode key and horizon 2 (its step keys are a prefix of ours)
    episode_key, _ = jax.random.split(QUAD_KEY)
    evaluate = jax.jit(unroll.evaluate_meta_loss, static_argnames=("horizon", "num_tasks"))
    ref = evaluate(QUAD, episode_key, QUAD_THETA0, horizon=2, num_tasks=1)["meta_loss"]
    np.testing.assert_allclose(common[1, 0], float(ref), rtol=1e-6)


def test_prefix_trick_equals_a_separate_shorter_unroll(quad_slices):
    direction = surface.axis_direction(QUAD_THETA0, "log_lr")
    short = surface.compute_surface(
        QUAD,
        QUAD_THETA0,
        [direction],
        QUAD_A,
        horizons=[2],
        mode="common",
        key=QUAD_KEY,
        chunk_size=4,  # and without smoothing: the raw episodes do not depend on the others
    )
    np.testing.assert_allclose(short.raw[:, 0], quad_slices["common"].raw[:, 0], rtol=1e-6)


# --- Gaussian smoothing

SIGMA = 0.3
NUM_SMOOTHING = 64
SMOOTH_KEY = jax.random.key(6)


@jax.jit
def _hessians(theta):
    """(grad of L_8, Hessians of L_T for T in HORIZONS) of the linear system at theta."""
    losses = [lambda th, t=t: LDS.expected_meta_loss(th, t) for t in HORIZONS]
    return jax.grad(losses[-1])(theta), [jax.hessian(f)(theta) for f in losses]


@pytest.fixture(scope="module")
def lds_minimum():
    """theta* = argmin of the T = 8 meta-loss (exactly quadratic: one Newton step)."""
    grad, hessians = _hessians(THETA0)
    return THETA0 - jnp.linalg.solve(hessians[-1], grad)


@pytest.fixture(scope="module")
def smoothed_slice(lds_minimum, lds_direction):
    return surface.compute_surface(
        LDS,
        lds_minimum,
        [lds_direction],
        np.array([-0.2, 0.0, 0.3], np.float32),
        horizons=HORIZONS,
        mode="fixed_batch",
        key=SMOOTH_KEY,
        num_smoothing=NUM_SMOOTHING,
        sigma=SIGMA,
        chunk_size=2 * (NUM_SMOOTHING + 1),
    )


def test_smoothed_value_is_the_monte_carlo_average_of_the_documented_draws(
    smoothed_slice, lds_minimum, lds_direction
):
    result = smoothed_slice
    _, noise_key = jax.random.split(SMOOTH_KEY)
    eps = surface.smoothing_noise(noise_key, NUM_SMOOTHING, THETA0.size, SIGMA)
    assert eps.shape == (NUM_SMOOTHING, 4)
    for i, a in enumerate(result.coords[:, 0]):
        draws = _expected([lds_minimum + a * lds_direction + e for e in eps])  # [S, H]
        np.testing.assert_allclose(result.smoothed[i], draws.mean(axis=0), rtol=1e-5)
        np.testing.assert_allclose(
            result.smoothed_stderr[i],
            draws.std(axis=0, ddof=1) / math.sqrt(NUM_SMOOTHING),
            rtol=1e-4,
        )
    assert result.smoothed_num_nonfinite.tolist() == [[0, 0, 0]] * 3
    assert result.inner_steps == 2 * (NUM_SMOOTHING + 1) * 8 * 2  # 2 calls of 2 points


def test_smoothing_adds_half_sigma_squared_trace_hessian(smoothed_slice, lds_minimum):
    """E L(theta + eps) = L(theta) + sigma^2/2 tr(H) for a quadratic L, within 4 standard
    errors at every point and T; at the minimum of L_8 the offset is many standard errors (the
    check has the power to see it)."""
    result = smoothed_slice
    for j, (t, hess) in enumerate(zip(HORIZONS, _hessians(lds_minimum)[1], strict=True)):
        offset = 0.5 * SIGMA**2 * float(jnp.trace(hess))
        z = (result.smoothed[:, j] - result.raw[:, j] - offset) / result.smoothed_stderr[:, j]
        assert np.all(np.abs(z) < 4), (t, z)
    at_min = result.smoothed_stderr[1, 2]
    assert offset / at_min > 4, (offset, at_min)


@flax.struct.dataclass
class DivergesProblem:
    """Loss 1 at every step, NaN from step 3 on (the 4th step) when theta > 0."""

    def init(self, theta, key):
        del theta, key
        return jnp.zeros((), jnp.int32)

    def step(self, theta, state, key):
        del key
        loss = jnp.where((state >= 3) & (theta > 0), jnp.nan, 1.0)
        return state + 1, loss


def test_divergence_is_nan_from_its_step_on_and_counted():
    horizons = (2, 3, 4, 6)
    key = jax.random.key(8)
    result = surface.compute_surface(
        DivergesProblem(),
        jnp.zeros(()),
        [jnp.ones(())],
        np.array([-0.5, 0.5]),
        horizons=horizons,
        mode="common",
        key=key,
        num_smoothing=16,
        sigma=1.0,
        chunk_size=34,
    )
    # the raw point a = 0.5 diverges at step 3: NaN for T = 4 and 6, counted
    assert np.isnan(result.raw).tolist() == [[False] * 4, [False, False, True, True]]
    assert result.num_nonfinite.tolist() == [0, 0, 1, 1]
    # draws with a + eps_s > 0 diverge too: excluded from the smoothed mean and counted
    _, noise_key = jax.random.split(key)
    eps = np.asarray(surface.smoothing_noise(noise_key, 16, 1, 1.0))[:, 0]
    num_positive = [int(np.sum(a + eps > 0)) for a in (-0.5, 0.5)]
    assert 0 < num_positive[0] < num_positive[1] < 16, num_positive
    np.testing.assert_array_equal(
        result.smoothed_num_nonfinite, [[0, 0, n, n] for n in num_positive]
    )
    np.testing.assert_array_equal(result.smoothed, np.ones((2, 4)))  # the finite draws only
    np.testing.assert_array_equal(result.smoothed_stderr, np.zeros((2, 4)))


# --- directions and 2-D slices


def test_paper_direction_has_norm_num_meta_parameters():
    theta = MLPLOpt().init(jax.random.key(9))
    flat = jax.flatten_util.ravel_pytree(surface.random_direction(jax.random.key(10), theta))[0]
    assert flat.size == 1762
    np.testing.assert_allclose(float(jnp.linalg.norm(flat)), 1762.0, rtol=1e-6)
    assert jax.tree.structure(theta) == jax.tree.structure(
        surface.random_direction(jax.random.key(10), theta)
    )


def test_per_tensor_direction_matches_thetas_leaf_norms_and_zero_leaves_stay_zero():
    theta = MLPLOpt().init(jax.random.key(9))
    direction = surface.random_direction(jax.random.key(11), theta, "per_tensor")
    theta_norms = [float(jnp.linalg.norm(x.ravel())) for x in jax.tree.leaves(theta)]
    d_norms = [float(jnp.linalg.norm(x.ravel())) for x in jax.tree.leaves(direction)]
    assert 0.0 in theta_norms  # the hidden biases start at zero
    np.testing.assert_allclose(d_norms, theta_norms, rtol=1e-5)
    with pytest.raises(ValueError, match="per_tensor"):
        surface.random_direction(jax.random.key(11), theta, "filter")


def test_axis_direction_is_one_hot_and_unknown_names_are_listed():
    theta = LearnedAdam().init(jax.random.key(0))
    names = surface.leaf_names(theta)
    assert "log_lr" in names and len(names) == 4
    direction = surface.axis_direction(theta, "log_lr")
    assert {n: float(x) for n, x in zip(names, jax.tree.leaves(direction), strict=True)} == {
        n: float(n == "log_lr") for n in names
    }
    with pytest.raises(ValueError, match=r"unknown axis 'lr'.*log_lr"):
        surface.axis_direction(theta, "lr")
    with pytest.raises(ValueError, match="scalar leaf"):
        surface.axis_direction(MLPLOpt().init(jax.random.key(0)), "hidden_0/kernel")


def test_two_dimensional_grid(lds_direction):
    other = surface.random_direction(jax.random.key(12), THETA0, "per_tensor")
    a, b = np.linspace(-1, 1, 3), np.linspace(-0.5, 0.5, 4)
    coords = surface.grid_coords(a, b)
    assert coords.shape == (12, 2) and tuple(coords[4]) == (np.float32(a[1]), np.float32(b[0]))
    result = surface.compute_surface(
        LDS,
        THETA0,
        [lds_direction, other],
        coords,
        horizons=HORIZONS,
        mode="common",
        key=jax.random.key(13),
        chunk_size=5,
    )
    assert result.coords.shape == (12, 2) and result.raw.shape == (12, 3)
    grid = result.raw.reshape(3, 4, 3)
    want = _expected([THETA0 + ai * lds_direction + bj * other for ai in a for bj in b])
    np.testing.assert_allclose(grid, want.reshape(3, 4, 3), rtol=2e-6)
    with pytest.raises(ValueError, match="k = 2"):
        surface.compute_surface(
            LDS,
            THETA0,
            [lds_direction, other],
            a,
            horizons=HORIZONS,
            mode="common",
            key=jax.random.key(13),
            chunk_size=5,
        )


# --- a 2-device mesh (fresh process: XLA's device count is fixed when JAX starts)

_MESH_SCRIPT = """
import json, os
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
import jax, numpy as np
from learned_opt.hyper import LearnedSGD
from outer_train.chunked import map_chunks
from outer_train.diagnostics import surface
from outer_train.placement import particle_mesh
from outer_train.problem import LearnedOptProblem
from outer_train.analytic import QuadraticTask

shardings = []

def recording_map_chunks(fn, inputs, **kw):
    def record(chunk):
        out = fn(chunk)
        shardings.append(out.sharding)
        return out
    return map_chunks(record, inputs, **kw)

surface.map_chunks = recording_map_chunks
problem = LearnedOptProblem(QuadraticTask.create(jax.random.key(3), dim=4), LearnedSGD())
theta0 = LearnedSGD.theta_from(0.1)
result = surface.compute_surface(
    problem, theta0, [surface.axis_direction(theta0, "log_lr")], np.array(%(coords)s, np.float32),
    mode="common", mesh=particle_mesh(2), horizons=%(horizons)s, key=jax.random.key(4),
    num_smoothing=3, sigma=0.1, chunk_size=8)
assert len(shardings) == 2 and not any(s.is_fully_replicated for s in shardings), shardings
# more than 100 two-device calls in a row: map_chunks bounds them in flight (no deadlock)
many = surface.compute_surface(
    problem, theta0, [surface.axis_direction(theta0, "log_lr")],
    np.linspace(-1, 1, 202, dtype=np.float32), mode="fixed_batch", mesh=particle_mesh(2),
    horizons=(1, 4), key=jax.random.key(5), chunk_size=2)
assert len(shardings) == 2 + 101 and np.all(np.isfinite(many.raw)), (len(shardings), many.raw)
print(json.dumps({name: getattr(result, name).tolist()
                  for name in ("raw", "smoothed", "smoothed_stderr")}
                 | {"inner_steps": result.inner_steps}))
"""


@pytest.mark.slow
def test_mesh_result_equals_the_single_device_one(quad_slices):
    """The same slice (QUAD, "common", 3 perturbations) on a 2-device mesh in a fresh process:
    each chunk's output is split over the devices, and the numbers equal this process's; then
    a slice of 101 two-device calls runs to the end."""
    assert QUAD_KNOBS["key"] is QUAD_KEY and np.all(
        jax.random.key_data(QUAD_KEY) == jax.random.key_data(jax.random.key(4))
    )
    script = _MESH_SCRIPT % {"coords": QUAD_A.tolist(), "horizons": list(QUAD_HORIZONS)}
    env = dict(
        os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2", JAX_PLATFORMS="cpu"
    )
    proc = subprocess.run(
        [sys.executable, "-c", script],
        env=env,
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    split = json.loads(proc.stdout.strip().splitlines()[-1])
    plain = quad_slices["common"]
    for name in ("raw", "smoothed", "smoothed_stderr"):
        np.testing.assert_allclose(split[name], getattr(plain, name), rtol=1e-6, atol=1e-7)
    assert split["inner_steps"] == plain.inner_steps


# --- the MLP learned optimizer on the standard task


@pytest.mark.slow
def test_mlp_lopt_slice_on_the_standard_task(standard_task):
    lopt = MLPLOpt()
    problem = LearnedOptProblem(standard_task, lopt)
    theta = lopt.init(jax.random.key(14))
    direction = surface.random_direction(jax.random.key(15), theta)
    key = jax.random.key(16)
    result = surface.compute_surface(
        problem,
        theta,
        [direction],
        np.linspace(-0.01, 0.01, 5),
        horizons=[2, 4],
        mode="common",
        key=key,
        chunk_size=5,
    )
    assert result.raw.shape == (5, 2) and np.all(np.isfinite(result.raw))
    assert np.ptp(result.raw[:, 1]) > 0  # the slice moves the meta-loss
    # a = 0 by hand, as unroll.evaluate_meta_loss computes it: one fresh episode from group 0
    # of window_keys(episode_key, 1, 4), with compute_surface's documented key split
    episode_key, _ = jax.random.split(key)
    keys = unroll.window_keys(episode_key, 1, 4)
    direct = jax.jit(
        lambda p, th: unroll.unroll_particles(
            p, th, None, keys.reset, keys.step, horizon=4, theta_axis=None
        )[1].losses[0]
    )
    losses = np.asarray(direct(problem, theta))
    np.testing.assert_allclose(result.raw[2], [losses[:2].mean(), losses.mean()], rtol=1e-5)
