"""Statistical ground truths on the linear dynamical system (meta-loss exactly quadratic in theta).

Each test draws R independent estimates (fresh keys: data, inits, perturbations) and compares
their mean with the exact gradient coordinate by coordinate: |mean - exact| < 4 standard errors.
The negative control (TBPTT with K < T) must FAIL that same test, so the test has power.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from outer_train.analytic import LinearSystemProblem
from outer_train.estimators import make_estimator
from outer_train.unroll import force_reset

THETA = jnp.array([0.3, -0.2, 0.1, 0.5])
NUM_PARAMS = THETA.shape[0]
HORIZON = 32
NUM_DRAWS = 4000


@pytest.fixture(scope="module")
def noisy_system():
    """Random inits and per-step noise: + and - must share them for low variance."""
    return LinearSystemProblem.create(jax.random.key(0), init_scale=0.5, noise_scale=0.5)


@pytest.fixture(scope="module")
def clean_system():
    return LinearSystemProblem.create(jax.random.key(0))


def _episode_start(est):
    """Estimator state whose particles start a fresh episode at the next window's first step."""
    state = est.init(jax.random.key(1), THETA)
    if hasattr(state, "particles"):
        due = jnp.ones(state.particles.horizon.shape, bool)
        state = state._replace(particles=force_reset(state.particles, due))
    return state


def _window_draws(est, num_windows, num_draws=NUM_DRAWS):
    """[R, num_windows, P]: the estimates of the windows of one episode, R independent times."""
    state = _episode_start(est)

    def episode(key):
        def body(s, k):
            g, s, _ = est.estimate(k, THETA, s)
            return s, g

        return jax.lax.scan(body, state, jax.random.split(key, num_windows))[1]

    keys = jax.random.split(jax.random.key(3), num_draws)
    return np.asarray(jax.jit(jax.vmap(episode))(keys))


def _z_scores(samples, exact):
    mean, se = samples.mean(0), samples.std(0, ddof=1) / np.sqrt(len(samples))
    return (mean - np.asarray(exact)) / se


def _episode_estimates(system, name, trunc_length):
    """Mean over an episode's windows = estimate of the full-horizon gradient (per draw)."""
    knobs = dict(num_tasks=1, trunc_length=trunc_length, horizon=HORIZON, staggered=False)
    if name != "tbptt":
        knobs["sigma"] = 0.1
    est = make_estimator(name, system, **knobs)
    return _window_draws(est, HORIZON // trunc_length).mean(axis=1)


@pytest.mark.slow
def test_full_es_is_unbiased_for_a_quadratic_meta_loss(noisy_system):
    est = make_estimator("es", noisy_system, num_tasks=1, horizon=HORIZON, sigma=0.1)
    samples = _window_draws(est, 1)[:, 0]
    z = _z_scores(samples, jax.grad(noisy_system.expected_meta_loss)(THETA, HORIZON))
    assert np.abs(z).max() < 4, z


@pytest.mark.slow
@pytest.mark.parametrize("name", ["pes", "nres"])
def test_pes_and_nres_summed_over_an_episode_are_unbiased(noisy_system, name):
    exact = jax.grad(noisy_system.expected_meta_loss)(THETA, HORIZON)
    z = _z_scores(_episode_estimates(noisy_system, name, trunc_length=8), exact)
    assert np.abs(z).max() < 4, z


@pytest.mark.slow
def test_negative_control_truncated_backprop_is_detected_as_biased(noisy_system):
    exact = jax.grad(noisy_system.expected_meta_loss)(THETA, HORIZON)
    z_full = _z_scores(_episode_estimates(noisy_system, "tbptt", trunc_length=HORIZON), exact)
    assert np.abs(z_full).max() < 4, z_full  # K = T: unbiased, passes
    z = _z_scores(_episode_estimates(noisy_system, "tbptt", trunc_length=8), exact)
    assert np.abs(z).max() > 8, z  # K < T: short-horizon bias, caught by the same test


@pytest.mark.slow
def test_nres_variance_stays_flat_over_an_episode_while_pes_grows(clean_system):
    """Per-window estimates through one episode of 16 windows (K = 4, T = 64).

    NRES: every window's normalized variance E||g - g_w||^2 / ||g_w||^2 is P + 1 exactly (one
    pair, quadratic loss), however many windows came before. PES: xi accumulates one eps per
    window, so its variance grows with the window index (about linearly here). Both stay
    unbiased for each window's exact gradient.
    """
    k, windows = 4, 16

    def window_loss(theta, w):  # exact mean loss of window w (1-based) of a noise-free episode
        total = lambda t: t * clean_system.expected_meta_loss(theta, t) if t else 0.0
        return (total(w * k) - total((w - 1) * k)) / k

    exact = np.stack([jax.grad(window_loss)(THETA, w) for w in range(1, windows + 1)])
    normalized = {}
    for name in ("nres", "pes"):
        est = make_estimator(
            name, clean_system, num_tasks=1, trunc_length=k, horizon=k * windows, sigma=0.1,
            staggered=False,
        )
        samples = _window_draws(est, windows)
        assert np.abs(_z_scores(samples, exact)).max() < 4.5  # 64 coordinates x windows
        normalized[name] = samples.var(0, ddof=1).sum(-1) / (exact**2).sum(-1)
    np.testing.assert_allclose(normalized["nres"], NUM_PARAMS + 1, rtol=0.15)
    assert normalized["nres"][-1] / normalized["nres"][0] < 1.1
    assert normalized["pes"][-1] / normalized["pes"][0] > 5
    assert np.all(np.diff(normalized["pes"][::4]) > 0)


def test_truncated_es_carries_the_unperturbed_state(noisy_system):
    """Truncated ES advances the carried state with theta itself (a center unroll), never with
    theta + eps: its new state is exactly TBPTT's with the same key."""
    common = dict(num_tasks=3, trunc_length=4, horizon=(6, 12))
    tbptt = make_estimator("tbptt", noisy_system, **common)
    tes = make_estimator("truncated_es", noisy_system, num_perturbations=2, **common)
    state = tbptt.init(jax.random.key(1), THETA)
    key = jax.random.key(2)
    _, tb_state, _ = jax.jit(tbptt.estimate)(key, THETA, state)
    _, tes_state, _ = jax.jit(tes.estimate)(key, THETA, tes.init(jax.random.key(1), THETA))
    for a, b in zip(jax.tree.leaves(tb_state), jax.tree.leaves(tes_state), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)  # equal up to float rounding


def test_hybrid_trusts_backprop_where_its_variance_vanishes(clean_system):
    """On a noise-free quadratic, (grad L(theta + eps) + grad L(theta - eps)) / 2 = grad L(theta)
    exactly: the backprop side has zero variance, gets all the weight, and the hybrid equals
    TBPTT's gradient with the same key."""
    common = dict(num_tasks=2, trunc_length=4, horizon=12)
    tbptt = make_estimator("tbptt", clean_system, **common)
    hybrid = make_estimator("hybrid", clean_system, num_perturbations=2, sigma=0.1, **common)
    key = jax.random.key(2)
    g_tbptt, _, _ = jax.jit(tbptt.estimate)(key, THETA, tbptt.init(jax.random.key(1), THETA))
    hybrid_state = hybrid.init(jax.random.key(1), THETA)
    g_hybrid, _, metrics = jax.jit(hybrid.estimate)(key, THETA, hybrid_state)
    assert float(metrics["es_weight"]) < 1e-6
    np.testing.assert_allclose(g_hybrid, g_tbptt, rtol=1e-4, atol=1e-6)


@pytest.mark.slow
def test_smoothed_backprop_and_truncated_es_are_unbiased_for_their_targets(noisy_system):
    """full_bptt with sigma > 0 (reparameterization gradient of the smoothed loss) and truncated
    ES with K = T from a fresh episode both average to the exact full-horizon gradient."""
    exact = jax.grad(noisy_system.expected_meta_loss)(THETA, HORIZON)
    rp = make_estimator("full_bptt", noisy_system, num_tasks=1, horizon=HORIZON, sigma=0.3)
    assert np.abs(_z_scores(_window_draws(rp, 1)[:, 0], exact)).max() < 4
    tes = make_estimator(
        "truncated_es", noisy_system, num_tasks=1, trunc_length=HORIZON, horizon=HORIZON,
        sigma=0.1, staggered=False,
    )
    assert np.abs(_z_scores(_window_draws(tes, 1)[:, 0], exact)).max() < 4
