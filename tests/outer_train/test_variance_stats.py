"""The statistics of ``learned-opt variance`` on draws with known answers: interval formulas,
coverage of the variance intervals at their nominal level on Gaussian draws of known covariance,
the bias test's power and level, cosine and SNR."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats

from outer_train.diagnostics.variance_stats import (
    effective_dimension,
    gradient_stats,
    mean_interval,
    scaled_chi2_interval,
    total_variance,
)


def test_scaled_chi2_interval_is_the_textbook_one_for_gaussian_variance():
    """With var(s^2) = 2 s^4 / (R - 1) (Gaussian), nu = R - 1: the classic chi-square interval."""
    r, s2 = 20, 3.0
    iv = scaled_chi2_interval(s2, 2 * s2**2 / (r - 1), 0.9)
    lo = (r - 1) * s2 / stats.chi2.ppf(0.95, r - 1)
    hi = (r - 1) * s2 / stats.chi2.ppf(0.05, r - 1)
    np.testing.assert_allclose([iv.value, iv.lo, iv.hi], [s2, lo, hi], rtol=1e-12)
    assert scaled_chi2_interval(2.0, 0.0, 0.95) == (2.0, 2.0, 2.0)  # no spread: a point
    assert scaled_chi2_interval(0.0, 0.0, 0.95) == (0.0, 0.0, 0.0)
    assert np.isnan(scaled_chi2_interval(float("nan"), 1.0, 0.95).lo)


def test_total_variance_is_the_trace_of_the_sample_covariance():
    rng = np.random.default_rng(0)
    g = rng.normal(size=(50, 7)) * np.arange(1, 8)
    iv = total_variance(g, 0.95)
    assert iv.value == pytest.approx(np.trace(np.cov(g.T)), rel=1e-12)
    assert iv.lo < iv.value < iv.hi
    assert np.isnan(total_variance(g[:2], 0.95).value)  # jackknife needs R >= 3


def test_effective_dimension_counts_the_directions_that_vary():
    rng = np.random.default_rng(3)
    assert effective_dimension(rng.normal(size=(4000, 10))) == pytest.approx(10, rel=0.05)
    rank_one = rng.normal(size=(500, 1)) * np.arange(1.0, 6.0)
    assert effective_dimension(rank_one) == pytest.approx(1.0, abs=0.05)
    wide = rng.normal(size=(40, 300))  # R < P: the R x R Gram matrix
    assert effective_dimension(wide) == pytest.approx(300, rel=0.15)


def test_heavy_tailed_draws_get_wider_intervals_than_gaussian_theory():
    """The jackknife sees excess kurtosis: Student-t(5) draws (kurtosis 9) get an interval
    about sqrt((9 - 1) / 2) = 2x wider (relative to the estimate) than Gaussian draws."""
    rng = np.random.default_rng(4)
    width = lambda g: (lambda iv: (iv.hi - iv.lo) / iv.value)(total_variance(g, 0.95))
    gauss = np.median([width(rng.normal(size=(2000, 1))) for _ in range(20)])
    heavy = np.median([width(rng.standard_t(5, size=(2000, 1))) for _ in range(20)])
    assert 1.5 < heavy / gauss < 2.6, heavy / gauss


@pytest.mark.parametrize(("num_draws", "dim"), [(32, 1), (64, 5), (16, 50)])
def test_variance_intervals_cover_the_true_value_at_the_nominal_level(num_draws, dim):
    """2000 repetitions of R Gaussian draws with covariance diag(c): the 95% intervals of
    tr Cov and of the normalized variance contain the true values ~95% of the time (Monte
    Carlo standard error of a coverage: 0.5%; the intervals lean conservative, never being
    narrower than the Gaussian-theory ones)."""
    rng = np.random.default_rng(dim)
    scales = np.linspace(0.5, 2.0, dim)
    reference = np.linspace(1.0, -1.0, dim) + 0.5
    true_total = float(np.sum(scales**2))
    true_normalized = true_total / float(np.sum(reference**2))
    hits_total = hits_normalized = 0
    reps = 2000
    for _ in range(reps):
        g = reference + rng.normal(size=(num_draws, dim)) * scales
        iv = total_variance(g, 0.95)
        hits_total += iv.lo <= true_total <= iv.hi
        errors = np.sum((g - reference) ** 2, axis=1) / np.sum(reference**2)
        nv = mean_interval(errors, 0.95, num_draws * effective_dimension(g))
        hits_normalized += nv.lo <= true_normalized <= nv.hi
    assert 0.93 <= hits_total / reps <= 0.975, hits_total / reps
    assert 0.93 <= hits_normalized / reps <= 0.975, hits_normalized / reps


def test_bias_test_detects_a_shift_and_holds_its_level():
    rng = np.random.default_rng(1)
    reference = np.array([1.0, -2.0, 0.5, 0.0])
    noise = rng.normal(size=(400, 4))
    unbiased = gradient_stats(reference + noise, reference)
    assert not unbiased.bias_significant
    assert unbiased.bias == pytest.approx(np.linalg.norm(noise.mean(0)), rel=1e-12)
    biased = gradient_stats(reference + noise + np.array([0.0, 0.0, 0.5, 0.0]), reference)
    assert biased.bias_significant and biased.bias_max_z > 5
    assert biased.bias == pytest.approx(0.5, abs=0.15)
    # Level: over many unbiased data sets the test fires in at most ~5% of them.
    fired = sum(
        gradient_stats(reference + rng.normal(size=(100, 4)), reference).bias_significant
        for _ in range(400)
    )
    assert fired / 400 <= 0.07
    # A noisy reference counts: the same offset is no longer significant.
    noisy_ref = gradient_stats(reference + noise + np.array([0.0, 0.0, 0.2, 0.0]), reference,
                               np.full(4, 0.25))
    assert not noisy_ref.bias_significant


def test_cosine_snr_and_normalized_variance_known_answers():
    reference = np.array([3.0, 4.0])
    same = gradient_stats(np.tile(2 * reference, (5, 1)), reference)
    assert same.cosine == pytest.approx(1.0)
    assert same.total_variance.value == 0.0
    assert same.normalized_variance.value == pytest.approx(1.0)  # ||2g - g||^2 / ||g||^2
    assert same.bias_significant  # a deterministic offset
    rng = np.random.default_rng(2)
    g = reference + rng.normal(size=(20000, 2)) * np.array([1.0, 2.0])
    s = gradient_stats(g, reference)
    assert s.median_snr == pytest.approx(np.median([3.0 / 1.0, 4.0 / 2.0]), rel=0.05)
    assert s.normalized_variance.value == pytest.approx(5.0 / 25.0, rel=0.05)
    assert s.normalized_variance.lo < 0.2 < s.normalized_variance.hi
    no_ref = gradient_stats(g)
    assert np.isnan(no_ref.cosine) and no_ref.bias_significant is None


def test_no_finite_draw_gives_nan_statistics_without_warnings():
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "mean of empty slice" from an empty set of draws
        s = gradient_stats(np.zeros((0, 5)), np.ones(5), np.zeros(5))
    assert s.num_draws == 0 and s.bias_significant is None
    assert np.isnan(s.total_variance.value) and np.isnan(s.normalized_variance.value)
    assert np.isnan(s.cosine) and s.reference_norm == pytest.approx(np.sqrt(5))
