"""Roughness metrics of a 1-D curve against answers derived by hand: a parabola, whole periods
of a sine sampled on its extrema, white noise, constant curves, plateaus and non-finite input."""

from __future__ import annotations

import math

import numpy as np
import pytest

from outer_train.diagnostics.roughness import (
    REPORT_KEYS,
    SMOOTHED_KEYS,
    max_abs_slope,
    num_local_minima,
    roughness_report,
    second_difference,
    smoothed_gap,
    smoothness_ratio,
    total_variation,
)

# a parabola y = a^2 on [-1, 1], 1001 points: h = 0.002, range 1, vertex at the middle point
GRID = np.linspace(-1.0, 1.0, 1001)
STEP = 0.002
PARABOLA = GRID**2

# y = A sin(2 pi f a) on [0, 1] with f = 3 whole periods and N = 1201 points (h = 1/1200): the
# extrema a = (1/4 + j/2) / f are multiples of 50 h, so they are grid points
SINE_N, SINE_F, SINE_A = 1201, 3, 2.5
SINE_GRID = np.linspace(0.0, 1.0, SINE_N)
SINE = SINE_A * np.sin(2 * np.pi * SINE_F * SINE_GRID)


def test_parabola_second_difference_is_two_h_squared_over_range():
    # y[i+1] - 2 y[i] + y[i-1] = (a + h)^2 - 2 a^2 + (a - h)^2 = 2 h^2 exactly; range = 1 - 0
    assert second_difference(PARABOLA, GRID) == pytest.approx(2 * STEP**2 / 1.0, abs=1e-9)
    # and it is resolution-dependent: halving h quarters it
    fine = np.linspace(-1.0, 1.0, 2001)
    assert second_difference(fine**2, fine) == pytest.approx(2 * 0.001**2, rel=1e-6)


def test_parabola_total_variation_minima_and_slope():
    assert total_variation(PARABOLA) == pytest.approx(2.0, rel=1e-12)  # down 1, up 1, range 1
    assert num_local_minima(PARABOLA) == 1  # the vertex a = 0 (odd point count)
    # even point count on an exactly symmetric grid: the vertex falls between the two middle
    # points, whose values (+-h/2)^2 are equal, a two-point plateau that counts once
    even = (STEP * (np.arange(1000) - 499.5)) ** 2
    assert even[499] == even[500] and num_local_minima(even) == 1
    # the steepest chord is the last one: (1 - (1 - h)^2) / h = 2 - h
    assert max_abs_slope(PARABOLA, GRID) == pytest.approx(2.0 - STEP, rel=1e-9)


def test_monotone_curve_has_total_variation_one():
    assert total_variation(np.exp(GRID)) == pytest.approx(1.0, rel=1e-12)
    assert num_local_minima(np.exp(GRID)) == 0


def test_sine_over_whole_periods():
    # TV of k whole periods = 4 k A; range = 2 A (the extrema are grid points) -> 2 k
    assert total_variation(SINE) == pytest.approx(2.0 * SINE_F, rel=1e-9)
    # one trough per period, all interior: a = 0.25, 0.583, 0.917
    assert num_local_minima(SINE) == SINE_F
    assert num_local_minima(-SINE) == SINE_F  # the peaks
    # the steepest chord starts at a zero crossing (a grid point): A sin(delta) / h
    # = 2 pi f A sin(delta) / delta with delta = 2 pi f h, within delta^2 / 6 = 4e-5 of 2 pi f A
    delta = 2 * np.pi * SINE_F / (SINE_N - 1)
    assert max_abs_slope(SINE, SINE_GRID) == pytest.approx(2 * np.pi * SINE_F * SINE_A, rel=1e-4)
    # second difference = -4 sin^2(delta / 2) y[i] ~ -delta^2 y[i]; the N - 2 interior points
    # hold every nonzero sample of whole periods, sum |sin| = (2 / pi) (N - 1) (1 + O(delta^2)),
    # so the mean is (2 / pi) (N - 1) / (N - 2); times A delta^2, over the range 2 A:
    expected = delta**2 / np.pi * (SINE_N - 1) / (SINE_N - 2)
    assert second_difference(SINE, SINE_GRID) == pytest.approx(expected, rel=1e-4)


def test_white_noise_is_much_rougher_than_a_parabola():
    rng = np.random.default_rng(0)
    noise = rng.normal(size=GRID.size)
    noise_sd = second_difference(noise, GRID)
    assert noise_sd >= 100 * second_difference(PARABOLA, GRID)
    # E |x1 - 2 x2 + x3| = sqrt(6) sqrt(2 / pi) for iid N(0, 1); on 20,001 points the sample mean
    # is within a few percent (standard error ~ 1.5 / sqrt(20,000 / 3) ~ 0.02)
    long_grid = np.linspace(0.0, 1.0, 20_001)
    long_noise = rng.normal(size=long_grid.size)
    unnormalized = second_difference(long_noise, long_grid) * np.ptp(long_noise)
    assert unnormalized == pytest.approx(math.sqrt(6) * math.sqrt(2 / math.pi), rel=0.05)
    # a noisy parabola against the parabola: RMS(noise) / range = ~ 1 / 1 (unit-variance noise)
    assert smoothed_gap(PARABOLA + noise, PARABOLA) == pytest.approx(1.0, rel=0.1)
    assert smoothed_gap(PARABOLA, PARABOLA) == 0.0
    assert total_variation(noise) > 100  # about 2 E|x1 - x2| N / range = 1.13 * 1001 / 6.5


def test_constant_curve_gives_zeros():
    flat = np.full(11, 3.0)
    grid = np.linspace(0.0, 1.0, 11)
    report = roughness_report(flat, grid, y_smooth=flat)
    assert report == {
        "second_difference": 0.0,
        "total_variation": 0.0,
        "num_local_minima": 0.0,
        "max_abs_slope": 0.0,
        "smoothed_gap": 0.0,
        "smoothness_ratio": 1.0,
    }
    # a flat smoothed curve that the raw one departs from: an infinite gap, no ZeroDivisionError
    assert smoothed_gap(flat + np.eye(11)[5], flat) == math.inf


def test_plateaus_count_once():
    assert num_local_minima([3.0, 1.0, 1.0, 1.0, 3.0]) == 1  # a flat bottom
    assert num_local_minima([3.0, 2.0, 2.0, 1.0]) == 0  # a shelf: the run of 2s has a lower side
    assert num_local_minima([1.0, 1.0, 2.0]) == 0  # a run at the end is not interior
    assert num_local_minima([2.0, 1.0, 2.0, 2.0, 0.5, 0.5, 4.0]) == 2


def test_report_keys_and_smoothness_ratio():
    rng = np.random.default_rng(1)
    noisy = PARABOLA + 0.01 * rng.normal(size=GRID.size)
    plain = roughness_report(noisy, GRID)
    assert tuple(plain) == REPORT_KEYS
    assert all(isinstance(value, float) for value in plain.values())
    smoothed = roughness_report(noisy, GRID, y_smooth=PARABOLA)
    assert tuple(smoothed) == REPORT_KEYS + SMOOTHED_KEYS
    second = lambda y: np.mean(np.abs(np.diff(y, 2)))  # one scale for both curves
    ratio = second(noisy) / second(PARABOLA)
    assert smoothed["smoothness_ratio"] == pytest.approx(ratio, rel=1e-12)
    assert smoothed["smoothness_ratio"] > 10
    # noise shrunk 10x around the same curve is 10x smoother (a ratio of range-normalized
    # second differences would call the two equally rough: both are pure noise)
    noise = rng.normal(size=GRID.size)
    assert smoothness_ratio(noise, 0.1 * noise, GRID) == pytest.approx(10.0)
    assert second_difference(noise, GRID) == pytest.approx(second_difference(0.1 * noise, GRID))
    assert smoothed["num_local_minima"] == float(num_local_minima(noisy))


def test_non_finite_input_raises_with_the_count():
    bad = PARABOLA.copy()
    bad[[3, 10]] = np.nan
    bad[20] = np.inf
    for fn in (total_variation, num_local_minima):
        with pytest.raises(ValueError, match="3 non-finite"):
            fn(bad)
    with pytest.raises(ValueError, match="3 non-finite"):
        second_difference(bad, GRID)
    with pytest.raises(ValueError, match="3 non-finite"):
        roughness_report(bad, GRID)
    with pytest.raises(ValueError, match="y_smooth has 3 non-finite"):
        smoothed_gap(PARABOLA, bad)


def test_bad_grids_raise():
    with pytest.raises(ValueError, match="evenly spaced"):
        second_difference(PARABOLA, GRID**3)
    with pytest.raises(ValueError, match="points but y has"):
        max_abs_slope(PARABOLA, GRID[:-1])
    with pytest.raises(ValueError, match="at least 3"):
        second_difference([1.0, 2.0], [0.0, 1.0])


def test_a_float32_grid_counts_as_evenly_spaced():
    # np.linspace in float32 spaces its points unevenly by rounding (~1e-5 relative here)
    a = np.linspace(-0.01, 0.01, 129, dtype=np.float32)
    assert not np.allclose(np.diff(a), np.diff(a)[0], rtol=1e-6, atol=0.0)
    h = float(np.diff(a.astype(np.float64)).mean())
    y = a.astype(np.float64) ** 2
    assert second_difference(y, a) == pytest.approx(2 * h**2 / 1e-4, rel=1e-3)
