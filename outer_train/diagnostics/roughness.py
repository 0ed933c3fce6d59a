"""Roughness of a 1-D curve y(a) sampled on an evenly spaced grid a (REFERENCE.md, "Measuring
smoothness and variance": roughness of a 1-D slice of the meta-loss).

Host-side NumPy: arrays in (any array-like, read as float64), Python numbers out. With
N = len(y), h = a[1] - a[0] and range(y) = max(y) - min(y):

    second_difference  = mean_{i=1..N-2} |y[i+1] - 2 y[i] + y[i-1]| / range(y)
    total_variation    = sum_{i=0..N-2} |y[i+1] - y[i]| / range(y)
    num_local_minima   = interior strict local minima, a plateau counted once
    max_abs_slope      = max_i |y[i+1] - y[i]| / |a[i+1] - a[i]|
    smoothed_gap       = RMS(y - y_smooth) / range(y_smooth)
    smoothness_ratio   = mean_i |y[i+1] - 2 y[i] + y[i-1]| / (the same of y_smooth)

Dividing by the range makes the first two invariant to y -> c y + b (c > 0), so slices of
losses on different scales compare; a constant curve gives 0, never a division by zero.
Non-finite values are not silently dropped: every function raises ValueError naming how many
points are non-finite, and the caller decides (mask, clip, or report the slice as diverged).
"""

from __future__ import annotations

import numpy as np

REPORT_KEYS = (
    "second_difference",
    "total_variation",
    "num_local_minima",
    "max_abs_slope",
)
SMOOTHED_KEYS = ("smoothed_gap", "smoothness_ratio")


def _curve(y, name: str = "y", *, min_len: int = 2) -> np.ndarray:
    """y as a finite 1-D float64 array of at least ``min_len`` points (else ValueError)."""
    y = np.asarray(y, dtype=np.float64)
    if y.ndim != 1:
        raise ValueError(f"{name} must be 1-D, got shape {y.shape}")
    if y.size < min_len:
        raise ValueError(f"{name} needs at least {min_len} points, got {y.size}")
    num_bad = int(np.sum(~np.isfinite(y)))
    if num_bad:
        raise ValueError(f"{name} has {num_bad} non-finite value(s) of {y.size} points")
    return y


def _grid(a, num_points: int, *, even: bool) -> np.ndarray:
    """a as a finite 1-D grid of ``num_points`` distinct consecutive points; evenly spaced
    (to 0.1% of the step: a float32 ``linspace`` varies by rounding, ~1e-5 relative) when
    ``even``."""
    a = _curve(a, "a")
    if a.size != num_points:
        raise ValueError(f"a has {a.size} points but y has {num_points}")
    step = np.diff(a)
    if np.any(step == 0):
        raise ValueError("a has repeated consecutive points (zero spacing)")
    if even and not np.allclose(step, step.mean(), rtol=1e-3, atol=0.0):
        raise ValueError(
            f"a must be evenly spaced; its spacing ranges over [{step.min()}, {step.max()}]"
        )
    return a


def _range(y: np.ndarray) -> float:
    return float(np.max(y) - np.min(y))


def second_difference(y, a) -> float:
    """Normalized mean absolute second difference of y on the evenly spaced grid a:

        mean_{i=1..N-2} |y[i+1] - 2 y[i] + y[i-1]| / (max(y) - min(y)),   0 if the range is 0.

    Resolution-dependent: for a smooth curve y[i+1] - 2 y[i] + y[i-1] = h^2 y''(a_i) + O(h^4),
    so the value shrinks like h^2 as the grid is refined (for y = a^2 it is exactly
    2 h^2 / range), while for white noise it does not shrink at all. Compare it only between
    curves sampled on the same grid (as the surface tool does: a raw and a smoothed slice).
    ``a`` is only validated (1-D, same length as y, evenly spaced); N >= 3 points.
    """
    y = _curve(y, min_len=3)
    _grid(a, y.size, even=True)
    spread = _range(y)
    if spread == 0.0:
        return 0.0
    return _mean_abs_second_difference(y) / spread


def _mean_abs_second_difference(y: np.ndarray) -> float:
    return float(np.mean(np.abs(y[2:] - 2.0 * y[1:-1] + y[:-2])))


def smoothness_ratio(y, y_smooth, a) -> float:
    """How many times smoother y_smooth is than y, on one scale (both curves in y's units):

        mean_i |y[i+1] - 2 y[i] + y[i-1]| / mean_i |y_smooth[i+1] - 2 y_smooth[i] + y_smooth[i-1]|,

    1.0 when both are 0, inf when only the smoothed one is. Unlike a ratio of
    ``second_difference`` values, no curve is divided by its own range: a smoothed curve that
    is the raw one's noise shrunk 10x reads as 10x smoother, not as equally rough. Same grid,
    N >= 3 points.
    """
    y = _curve(y, min_len=3)
    y_smooth = _curve(y_smooth, "y_smooth", min_len=3)
    if y.shape != y_smooth.shape:
        raise ValueError(f"y has shape {y.shape} but y_smooth has {y_smooth.shape}")
    _grid(a, y.size, even=True)
    raw, smooth = _mean_abs_second_difference(y), _mean_abs_second_difference(y_smooth)
    if smooth == 0.0:
        return 1.0 if raw == 0.0 else float("inf")
    return raw / smooth


def total_variation(y) -> float:
    """Normalized total variation: sum_{i=0..N-2} |y[i+1] - y[i]| / (max(y) - min(y)).

    1 for a monotone curve; a curve made of p monotone pieces whose extrema all reach the global
    max and min gives 2p - 1 (e.g. 2k for k whole periods of a sine sampled on its extrema).
    0 for a constant curve. N >= 2 points.
    """
    y = _curve(y)
    spread = _range(y)
    if spread == 0.0:
        return 0.0
    return float(np.sum(np.abs(np.diff(y))) / spread)


def num_local_minima(y) -> int:
    """Number of interior strict local minima of y.

    Runs of exactly equal consecutive values are first merged into one point; a merged point
    that is neither the first nor the last counts when both of its neighbours are higher. So
    y[i] < y[i-1] and y[i] < y[i+1] counts, a flat bottom [3, 1, 1, 1, 3] counts once, and a
    shelf [3, 2, 2, 1] counts nothing (the run of 2s has a lower neighbour). Equality is exact
    (no tolerance). The end points are never minima. N >= 2 points.
    """
    y = _curve(y)
    runs = y[np.concatenate([[True], np.diff(y) != 0])]  # first value of each run of equals
    if runs.size < 3:
        return 0
    inner = runs[1:-1]
    return int(np.sum((inner < runs[:-2]) & (inner < runs[2:])))


def max_abs_slope(y, a) -> float:
    """Steepest finite-difference slope: max_i |y[i+1] - y[i]| / |a[i+1] - a[i]| (units of y
    per unit of a; any grid of distinct consecutive points). N >= 2 points."""
    y = _curve(y)
    a = _grid(a, y.size, even=False)
    return float(np.max(np.abs(np.diff(y) / np.diff(a))))


def smoothed_gap(y, y_smooth) -> float:
    """Gap between a raw curve and its smoothed version, relative to the smoothed curve's range:

        sqrt(mean_i (y[i] - y_smooth[i])^2) / (max(y_smooth) - min(y_smooth)).

    The smoothed curve's range is the scale (not the raw one), because noise inflates the raw
    range: a raw curve of pure noise around a smooth one then reads as noise-std / signal-range.
    When the smoothed curve is constant the gap is 0 if the curves are equal and inf otherwise
    (any departure is infinitely large next to a zero range). Both curves: same shape, N >= 2.
    """
    y = _curve(y)
    y_smooth = _curve(y_smooth, "y_smooth")
    if y.shape != y_smooth.shape:
        raise ValueError(f"y has shape {y.shape} but y_smooth has {y_smooth.shape}")
    rms = float(np.sqrt(np.mean((y - y_smooth) ** 2)))
    spread = _range(y_smooth)
    if spread == 0.0:
        return 0.0 if rms == 0.0 else float("inf")
    return rms / spread


def roughness_report(y, a, y_smooth=None) -> dict[str, float]:
    """All metrics of y on the grid a, as floats under stable names (``REPORT_KEYS``):

        "second_difference", "total_variation", "num_local_minima" (a count, as a float),
        "max_abs_slope";
    and, when ``y_smooth`` (same grid) is given, ``SMOOTHED_KEYS``:
        "smoothed_gap"      = smoothed_gap(y, y_smooth),
        "smoothness_ratio"  = smoothness_ratio(y, y_smooth, a),
    how many times smoother the smoothed curve is. Raises ValueError on non-finite values in y
    or y_smooth.
    """
    report = {
        "second_difference": second_difference(y, a),
        "total_variation": total_variation(y),
        "num_local_minima": float(num_local_minima(y)),
        "max_abs_slope": max_abs_slope(y, a),
    }
    if y_smooth is not None:
        report["smoothed_gap"] = smoothed_gap(y, y_smooth)
        report["smoothness_ratio"] = smoothness_ratio(y, y_smooth, a)
    return report
