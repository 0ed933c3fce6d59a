"""The analytic problems: their stated formulas hold (Monte Carlo), and Fig. 1's figures follow."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.optimize import brentq

from outer_train.analytic import (
    REPARAM_ASYMPTOTE,
    LinearSystemProblem,
    QuadraticTask,
    SinusoidToy,
    toy_es_variance,
    toy_max_variance,
    toy_reparam_variance,
)
from tasks.base import Task

SIGMA = 0.3


@pytest.mark.parametrize("w", [2.0, 8.0, 15.0, 30.0])
def test_toy_variances_match_monte_carlo(w):
    rng = np.random.default_rng(0)
    x = np.linspace(-10, 10, 41)
    eps = rng.normal(0.0, SIGMA, (200_000, 1))
    k = w / np.pi
    loss = lambda z: 0.1 * np.sin(z * k) + (z / 10) ** 2 + 0.1
    grad = lambda z: 0.1 * k * np.cos(k * z) + z / 50
    rp = grad(x + eps).var(axis=0)
    es = (eps * (loss(x + eps) - loss(x - eps)) / (2 * SIGMA**2)).var(axis=0)
    np.testing.assert_allclose(rp, toy_reparam_variance(x, w, SIGMA), rtol=0.03)
    np.testing.assert_allclose(es, toy_es_variance(x, w, SIGMA), rtol=0.06)


def test_toy_reference_figures():
    """The paper's Fig. 1: backprop max-variance ~5.1e-4 w^2, ES ~0.1-0.2, crossing near 15.

    5.1e-4 is the large-w limit a^2/2 = 1/(200 pi^2); within 10% of it from w = 12 on.
    """
    assert abs(REPARAM_ASYMPTOTE - 5.1e-4) < 0.05e-4
    for w in (12.0, 15.0, 20.0, 30.0, 50.0):
        ratio = toy_max_variance(w, SIGMA, estimator="reparam") / (REPARAM_ASYMPTOTE * w**2)
        assert 0.9 < ratio < 1.1, (w, ratio)
    es = [toy_max_variance(w, SIGMA, estimator="es") for w in np.linspace(1, 50, 50)]
    assert 0.1 < min(es) and max(es) < 0.25, (min(es), max(es))
    gap = lambda w: toy_max_variance(w, SIGMA, estimator="reparam") - toy_max_variance(
        w, SIGMA, estimator="es"
    )
    assert 14.0 < brentq(gap, 5.0, 30.0) < 16.0


def test_toy_problem_loss():
    toy = SinusoidToy(jnp.float32(10.0))
    x = jnp.float32(1.3)
    state = toy.init(x, jax.random.key(0))
    _, loss = toy.step(x, state, jax.random.key(1))
    np.testing.assert_allclose(loss, 0.1 * np.sin(1.3 * 10 / np.pi) + 0.13**2 + 0.1, rtol=1e-6)


def test_linear_system_meta_loss_is_quadratic_in_theta():
    lds = LinearSystemProblem.create(jax.random.key(0))
    hess = jax.jit(jax.hessian(lambda th: lds.expected_meta_loss(th, 20)))
    h1, h2 = hess(jnp.zeros(4)), hess(jnp.full(4, 3.0))
    np.testing.assert_allclose(h1, h2, rtol=1e-4, atol=1e-5)
    assert np.all(np.linalg.eigvalsh(np.asarray(h1)) > 0)
    assert np.max(np.abs(np.linalg.eigvals(np.asarray(lds.transition)))) == pytest.approx(0.9)


def test_linear_system_noise_adds_a_theta_independent_constant():
    """E[noisy meta-loss] = expected_meta_loss + c, with the same c at two thetas (so the
    expected gradient is the noise-free one)."""
    lds = LinearSystemProblem.create(jax.random.key(0), init_scale=0.5, noise_scale=0.5)
    horizon = 10

    def noisy(theta, key):
        init_key, step_key = jax.random.split(key)
        step = lambda s, k: lds.step(theta, s, k)
        steps = jax.random.split(step_key, horizon)
        return jnp.mean(jax.lax.scan(step, lds.init(theta, init_key), steps)[1])

    keys = jax.random.split(jax.random.key(1), 10_000)
    thetas = jnp.stack([jnp.zeros(4), jnp.full(4, 2.0)])
    samples = jax.jit(jax.vmap(jax.vmap(noisy, in_axes=(None, 0)), in_axes=(0, None)))(thetas, keys)
    expected = jax.vmap(lds.expected_meta_loss, in_axes=(0, None))(thetas, horizon)
    gaps = np.asarray(jnp.mean(samples, axis=1) - expected)
    assert gaps[0] > 0
    # same keys at both thetas: the gaps differ only by the cross term's sample mean (mean 0)
    assert abs(gaps[0] - gaps[1]) < 0.02 * gaps[0], gaps


def test_quadratic_task_protocol_and_expected_loss():
    task = QuadraticTask.create(jax.random.key(0), dim=5, noise_scale=0.3, batch_size=8)
    assert isinstance(task, Task)
    params = task.init(jax.random.key(1))
    assert params["w"].shape == (5,)
    batches = jax.vmap(task.sample_batch)(jax.random.split(jax.random.key(2), 20_000))
    mc = float(jnp.mean(jax.vmap(task.loss, in_axes=(None, 0))(params, batches)))
    assert mc == pytest.approx(float(task.evaluate(params)["loss"]), rel=0.01)
