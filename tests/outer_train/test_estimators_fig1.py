"""Fig. 1 of "Gradients are Not All You Need", measured through the real estimators.

Toy: l(x) = 0.1 sin(x w / pi) + (x / 10)^2 + 0.1, smoothed by N(0, 0.3^2). At each x in [-10, 10]
we draw R independent gradient estimates of d/dx E l(x + eps) with
  * full_bptt(sigma=0.3): the reparameterization (backprop) gradient l'(x + eps), and
  * es(1 antithetic pair, sigma=0.3): eps (l(x + eps) - l(x - eps)) / (2 sigma^2),
and take the max over x of their variances. The reference figures: backprop ~5.1e-4 w^2 (the
exact large-w limit is 1 / (200 pi^2) = 5.066e-4), ES ~0.1-0.2 at every w, crossing near w = 15.
Measured values are checked against the exact variances (outer_train.analytic) and those figures.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from outer_train.analytic import REPARAM_ASYMPTOTE, SinusoidToy, toy_max_variance
from outer_train.estimators import ES, FullBPTT, draws

SIGMA = 0.3
FREQUENCIES = (5.0, 10.0, 15.0, 20.0, 30.0)
X_GRID = jnp.linspace(-10.0, 10.0, 81)
NUM_DRAWS = 100_000


@pytest.fixture(scope="module")
def measured_max_variance():
    """{estimator: [max over x of the measured variance, per frequency]}."""

    def max_variance(est, key):
        def at(x):
            grads, _, _ = draws(est, key, x, est.init(key, x), NUM_DRAWS)
            return jnp.var(grads)

        return jnp.max(jax.vmap(at)(X_GRID))

    run = jax.jit(max_variance)
    out = {"reparam": [], "es": []}
    for w in FREQUENCIES:
        toy = SinusoidToy(jnp.float32(w))
        key = jax.random.key(int(w))
        out["reparam"].append(float(run(FullBPTT(toy, num_tasks=1, horizon=1, sigma=SIGMA), key)))
        out["es"].append(float(run(
            ES(toy, num_tasks=1, num_perturbations=1, horizon=1, sigma=SIGMA), key
        )))
    return {k: np.array(v) for k, v in out.items()}


@pytest.mark.slow
def test_measured_variances_match_the_exact_ones(measured_max_variance):
    for name, tol in (("reparam", 0.05), ("es", 0.07)):
        exact = [toy_max_variance(w, SIGMA, estimator=name, num_x=len(X_GRID)) for w in FREQUENCIES]
        np.testing.assert_allclose(measured_max_variance[name], exact, rtol=tol)


@pytest.mark.slow
def test_backprop_variance_grows_like_w_squared_and_es_stays_bounded(measured_max_variance):
    rp, es = measured_max_variance["reparam"], measured_max_variance["es"]
    for w, v in zip(FREQUENCIES, rp, strict=True):
        if w >= 15:  # where the paper's 5.1e-4 w^2 (the large-w limit) applies
            assert v == pytest.approx(REPARAM_ASYMPTOTE * w**2, rel=0.1)
            assert v == pytest.approx(5.1e-4 * w**2, rel=0.1)
    assert np.all(np.diff(rp) > 0) and rp[-1] / rp[0] > 30
    assert np.all((es > 0.1) & (es < 0.25)), es
    # They cross between w = 10 and w = 20; interpolating log(rp / es) puts it near 15.
    i10, i20 = FREQUENCIES.index(10.0), FREQUENCIES.index(20.0)
    assert rp[i10] < es[i10] and rp[i20] > es[i20]
    log_ratio = np.log(rp / es)
    crossing = np.interp(0.0, log_ratio[i10 : i20 + 1], FREQUENCIES[i10 : i20 + 1])
    assert 13.0 < crossing < 17.0, crossing
