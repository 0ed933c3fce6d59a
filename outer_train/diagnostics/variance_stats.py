"""Statistics of R independent gradient draws against a reference gradient (host NumPy, float64).

For draws g_1..g_R (flat, [R, P]) with mean g_bar and a reference g_ref [P] (REFERENCE.md,
"Measuring smoothness and variance"):

    total variance        V = tr Cov(g) = sum_j s_j^2,  s_j^2 the sample variance (ddof 1)
    normalized variance   N = (1/R) sum_i ||g_i - g_ref||^2 / ||g_ref||^2   (an MSE: tr Cov and
                          the squared bias, over ||g_ref||^2)
    cosine                mean_i cos(g_i, g_ref), standard error std_i / sqrt(R)
    median SNR            median_j |g_bar_j| / s_j
    bias                  ||g_bar - g_ref||, with the delta-method standard error
                          sqrt(sum_j v_j^2 tau_j^2) / ||v||, v = g_bar - g_ref,
                          tau_j^2 = s_j^2 / R + (the reference mean's own variance)_j.

Confidence intervals of V and N (``scaled_chi2_interval``): each is approximated as
c * chi^2_nu / nu, nu = min(nu_jackknife, nu_gaussian):
  * nu_jackknife = 2 estimate^2 / var_jackknife matches a jackknife estimate of the
    estimator's variance, which carries the draws' excess kurtosis (heavy-tailed draws --
    chaotic backprop, ES products -- get wider intervals);
  * nu_gaussian = (R - 1) P_eff for V (R P_eff for N), with P_eff = (tr C)^2 / tr(C^2) in
    [1, P] from an unbiased estimate of tr(C^2) (Srivastava 2005): the degrees of freedom of V
    for Gaussian draws (Satterthwaite), so no interval is narrower than the Gaussian-theory one.
For Gaussian draws of one coordinate this is the textbook chi-square interval (nu = R - 1).
The interval is [nu est / chi^2_{nu, 1 - a/2}, nu est / chi^2_{nu, a/2}]; the tests check its
coverage on draws of known variance.

Bias test: coordinate j's z_j = v_j / tau_j; the bias is "significant" when max_j |z_j|
exceeds the Bonferroni threshold t_{R-1}^{-1}(1 - a / (2 P)) (a level-a test whatever the
correlations between coordinates). tau_j^2 gets a floor of (1e-5 (|g_bar_j| + |g_ref_j|))^2,
so two deterministic gradients that differ by float rounding are not called biased.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np
from scipy import stats

ROUNDING = 1e-5  # relative float rounding allowed between two computations of one gradient


class Interval(NamedTuple):
    """A point estimate and its confidence interval [lo, hi]."""

    value: float
    lo: float
    hi: float

    def scaled(self, factor: float) -> Interval:
        return Interval(self.value * factor, self.lo * factor, self.hi * factor)


def effective_dimension(grads: np.ndarray) -> float:
    """P_eff = (tr C)^2 / tr(C^2) of draws [R, P] (R >= 3), in [1, P]: P for an isotropic
    covariance, 1 for a rank-one one. tr(C^2) is estimated without bias for Gaussian draws,
    n^2 / ((n - 1)(n + 2)) (tr(S^2) - (tr S)^2 / n), n = R - 1 (Srivastava 2005), via the
    smaller of the R x R and P x P Gram matrices. NaN for a zero covariance."""
    g = np.asarray(grads, np.float64)
    r, p = g.shape
    x = g - g.mean(axis=0)
    n = r - 1
    gram = x @ x.T if r <= p else x.T @ x
    tr_s = float(np.trace(gram)) / n
    tr_s2 = float(np.sum(gram**2)) / n**2
    if tr_s <= 0:
        return float("nan")
    a2 = n**2 / ((n - 1) * (n + 2)) * (tr_s2 - tr_s**2 / n)
    return float(np.clip(tr_s**2 / a2, 1.0, p)) if a2 > 0 else float(p)


def scaled_chi2_interval(estimate: float, variance: float, level: float,
                         max_dof: float = math.inf) -> Interval:
    """Interval for a positive quantity whose estimator is ~ c chi^2_nu / nu, with
    nu = min(2 estimate^2 / variance, max_dof) (``variance``: the estimator's own variance,
    e.g. jackknife; ``max_dof``: e.g. the Gaussian-theory degrees of freedom).

    A zero variance gives [estimate, estimate]; a zero estimate [0, 0]; NaN stays NaN.
    """
    if not (math.isfinite(estimate) and math.isfinite(variance)):
        return Interval(float("nan"), float("nan"), float("nan"))
    if estimate <= 0 or variance <= 0:
        return Interval(estimate, estimate, estimate)
    nu = min(2.0 * estimate**2 / variance, max_dof)
    alpha = 1.0 - level
    lo = nu * estimate / stats.chi2.ppf(1.0 - alpha / 2, nu)
    hi = nu * estimate / stats.chi2.ppf(alpha / 2, nu)
    return Interval(float(estimate), float(lo), float(hi))


def total_variance(grads: np.ndarray, level: float) -> Interval:
    """tr Cov(g) of draws [R, P] (R >= 3) with its interval (module docstring).

    Jackknife in closed form: with y_i = ||g_i - g_bar||^2 and V = sum_i y_i / (R - 1), leaving
    draw i out gives V_(-i) = ((R - 1) V - R y_i / (R - 1)) / (R - 2), so the jackknife variance
    (R - 1)/R sum_i (V_(-i) - mean)^2 is R / ((R - 1) (R - 2)^2) sum_i (y_i - y_bar)^2.
    """
    g = np.asarray(grads, np.float64)
    r = g.shape[0]
    if r < 3:
        return Interval(float("nan"), float("nan"), float("nan"))
    y = np.sum((g - g.mean(axis=0)) ** 2, axis=1)
    value = float(y.sum() / (r - 1))
    jack = float(r / ((r - 1) * (r - 2) ** 2) * np.sum((y - y.mean()) ** 2))
    p_eff = effective_dimension(g)
    return scaled_chi2_interval(value, jack, level,
                                (r - 1) * p_eff if math.isfinite(p_eff) else math.inf)


def mean_interval(y: np.ndarray, level: float, max_dof: float = math.inf) -> Interval:
    """Mean of non-negative per-draw values y [R] with the scaled chi-square interval (the
    jackknife variance of a mean is var(y) / R; ``max_dof`` caps nu)."""
    y = np.asarray(y, np.float64)
    if y.size < 2:
        return Interval(float("nan"), float("nan"), float("nan"))
    return scaled_chi2_interval(float(y.mean()), float(y.var(ddof=1) / y.size), level, max_dof)


class GradientStats(NamedTuple):
    """The statistics of one set of draws (module docstring); reference-based fields are NaN
    without a reference. ``bias_significant`` is None without one."""

    num_draws: int
    mean_norm: float
    total_variance: Interval
    median_snr: float
    reference_norm: float
    normalized_variance: Interval
    cosine: float
    cosine_stderr: float
    bias: float
    bias_stderr: float
    bias_max_z: float
    bias_threshold: float
    bias_significant: bool | None


def _median_snr(mean: np.ndarray, std: np.ndarray) -> float:
    keep = (std > 0) | (mean != 0)  # a coordinate that is 0 in every draw has no SNR
    if not np.any(keep):
        return float("nan")
    with np.errstate(divide="ignore", invalid="ignore"):
        snr = np.abs(mean[keep]) / std[keep]
    return float(np.median(snr))


def gradient_stats(
    grads: np.ndarray,
    reference: np.ndarray | None = None,
    reference_var: np.ndarray | None = None,
    *,
    level: float = 0.95,
) -> GradientStats:
    """Statistics of finite draws ``grads`` [R, P] against ``reference`` [P] (module docstring).

    reference_var: [P], the variance of each coordinate of the reference (a mean of draws:
      its per-coordinate sample variance / its number of draws); None: an exact reference.
    level: confidence level of the intervals and of the bias test.
    """
    g = np.asarray(grads, np.float64)
    r, p = g.shape
    nan = float("nan")
    if r == 0:  # every draw was non-finite: nothing to measure
        empty = Interval(nan, nan, nan)
        ref_norm = nan if reference is None else float(np.linalg.norm(reference))
        return GradientStats(
            num_draws=0, mean_norm=nan, total_variance=empty, median_snr=nan,
            reference_norm=ref_norm, normalized_variance=empty, cosine=nan, cosine_stderr=nan,
            bias=nan, bias_stderr=nan, bias_max_z=nan, bias_threshold=nan,
            bias_significant=None,
        )
    mean = g.mean(axis=0)
    std = g.std(axis=0, ddof=1) if r >= 2 else np.full(p, np.nan)
    base = dict(
        num_draws=r,
        mean_norm=float(np.linalg.norm(mean)),
        total_variance=total_variance(g, level),
        median_snr=_median_snr(mean, std),
    )
    if reference is None:
        return GradientStats(
            **base, reference_norm=nan, normalized_variance=Interval(nan, nan, nan),
            cosine=nan, cosine_stderr=nan, bias=nan, bias_stderr=nan, bias_max_z=nan,
            bias_threshold=nan, bias_significant=None,
        )
    ref = np.asarray(reference, np.float64)
    ref_var = np.zeros(p) if reference_var is None else np.asarray(reference_var, np.float64)
    ref_norm = float(np.linalg.norm(ref))
    p_eff = effective_dimension(g) if r >= 3 else math.nan
    p_eff = p_eff if math.isfinite(p_eff) else math.inf
    with np.errstate(divide="ignore", invalid="ignore"):
        errors = np.sum((g - ref) ** 2, axis=1) / ref_norm**2
        norms = np.linalg.norm(g, axis=1)
        cos = (g @ ref) / (norms * ref_norm)
    cos = cos[np.isfinite(cos)]
    v = mean - ref
    tau2 = std**2 / r + ref_var
    tau2 = np.maximum(tau2, (ROUNDING * (np.abs(mean) + np.abs(ref))) ** 2)
    bias = float(np.linalg.norm(v))
    positive = tau2 > 0
    with np.errstate(divide="ignore", invalid="ignore"):
        bias_stderr = float(np.sqrt(np.sum(v**2 * tau2)) / bias) if bias > 0 else 0.0
        z = np.where(positive, np.abs(v) / np.sqrt(np.where(positive, tau2, 1.0)),
                     np.where(v != 0, np.inf, 0.0))
    alpha = 1.0 - level
    threshold = float(stats.t.ppf(1.0 - alpha / (2 * p), max(r - 1, 1)))
    max_z = float(np.max(z))
    return GradientStats(
        **base,
        reference_norm=ref_norm,
        normalized_variance=mean_interval(errors, level, r * p_eff) if ref_norm > 0 else
        Interval(nan, nan, nan),
        cosine=float(cos.mean()) if cos.size else nan,
        cosine_stderr=float(cos.std(ddof=1) / math.sqrt(cos.size)) if cos.size >= 2 else nan,
        bias=bias,
        bias_stderr=bias_stderr,
        bias_max_z=max_z,
        bias_threshold=threshold,
        bias_significant=bool(max_z > threshold),
    )
