"""Meta-gradient variance vs unroll length, measured the same way for every estimator.

For each shift a (theta = theta0 + a d), unroll length T and estimator (the ``[variance]``
section, ``config.diagnostics.VarianceConfig``, says how K, W and the knobs follow from T):

  1. one fixed estimator state S at theta, "fresh" or "warm" (``variance_draws``);
  2. R independent draws from S (``variance_draws.DrawProgram``): draw r is the mean of W
     consecutive estimates, g_r = (1/W) sum_w g_{r,w}; from a fresh start with W = T / K it
     estimates the gradient of L_T = (1/T) sum_{t<T} l_t at the cost of T inner steps per
     particle, for every estimator alike;
  3. a reference g_ref per (shift, T) (``reference_gradient``): the mean of many fresh draws of
     an unbiased estimator, independent of the measured draws, with the variance of its mean;
  4. the statistics of ``variance_stats.gradient_stats`` (total variance, normalized variance,
     cosine, SNR, bias, each variance with its interval), and for windowed estimators the
     total variance of each window's own estimate g_{., w} over the draws, w = 1..W
     (``Measurement.window_variance``): how the variance of one outer step's gradient changes
     with the number of windows the episode has run (on a quadratic PES's grows, its xi
     accumulating one eps per window, and NRES's stays (P + 1) ||grad of that window||^2).

The draws of one (estimator, T) are one compiled program reused for every shift; draws use the
same keys at every shift (common random numbers). A draw whose gradient is non-finite (every
particle of some window diverged) is excluded from the statistics and counted, never zeroed.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from outer_train.base import EstimatorState, InnerProblem, PRNGKey, Theta
from outer_train.config.diagnostics import VarianceConfig
from outer_train.diagnostics.variance_draws import (
    DrawProgram,
    FixedBatchProblem,
    auto_chunk_size,
    warm_state,
)
from outer_train.diagnostics.variance_stats import (
    GradientStats,
    Interval,
    gradient_stats,
    total_variance,
)
from outer_train.estimators import make_estimator

START_DESCRIPTIONS = {
    "fresh": "fresh: every draw starts new episodes at its first step (the estimator state is "
             "due for a reset)",
    "warm": "warm: every draw starts from the estimator state after {n} estimates at fixed "
            "theta (particles staggered)",
}
# Per-window draws are kept (for ``window_variance``) up to this many bytes per measurement.
WINDOW_DRAWS_BYTES = 2**29


class Reference(NamedTuple):
    """The reference gradient at one (shift, T). estimator: its name ("none": no reference);
    mean: float64 [P]; mean_var: float64 [P], the variance of each coordinate of the mean
    (sample variance / number of finite draws); num_draws, num_finite; seconds (with
    compilation)."""

    estimator: str
    shift: float
    horizon: int
    mean: np.ndarray | None
    mean_var: np.ndarray | None
    num_draws: int
    num_finite: int
    seconds: float


class Measurement(NamedTuple):
    """One (shift, estimator, T). trunc_length: K (T for full-episode estimators); num_windows:
    W; num_finite: draws used by ``stats``; num_nonfinite_unrolls: particle unrolls the
    estimator itself dropped; meta_loss: mean reported meta-loss; inner_steps_per_draw: particle
    inner steps of one draw; seconds_per_draw (compilation excluded) and compile_seconds (0 when
    the program was reused); window_variance: tr Cov of each window's estimate [W] (windowed
    estimators with W > 1, else None)."""

    shift: float
    estimator: str
    horizon: int
    trunc_length: int
    num_windows: int
    num_draws: int
    num_finite: int
    num_nonfinite_unrolls: int
    meta_loss: float
    inner_steps_per_draw: int
    seconds_per_draw: float
    compile_seconds: float
    stats: GradientStats
    window_variance: tuple[Interval, ...] | None


class VarianceResult(NamedTuple):
    """Every measurement and reference, in loop order (T, then estimator, then shift);
    ``start``: the start state in words; ``seconds``: the whole study."""

    measurements: list[Measurement]
    references: list[Reference]
    start: str
    seconds: float


class StudyKeys(NamedTuple):
    """The study's independent key streams, split from ``jax.random.key(section.seed)``."""

    direction: PRNGKey
    fixed_batch: PRNGKey
    start: PRNGKey
    draws: PRNGKey
    reference: PRNGKey


def study_keys(seed: int) -> StudyKeys:
    return StudyKeys(*jax.random.split(jax.random.key(seed), len(StudyKeys._fields)))


def _fold(key: PRNGKey, *ids: int) -> PRNGKey:
    for i in ids:
        key = jax.random.fold_in(key, i)
    return key


def reference_draw_count(section: VarianceConfig) -> int:
    """``reference_draws``, or 2 when the reference is deterministic (plain backprop in
    fixed_batch mode: every draw is the same gradient)."""
    deterministic = (section.reference == "full_bptt" and section.mode == "fixed_batch"
                     and section.backprop_sigma == 0)
    return 2 if deterministic else section.reference_draws


def planned_draws(section: VarianceConfig) -> int:
    """Draws a study runs (measured and reference), for a progress bar's total."""
    per_t = len(section.measured()) * section.num_draws
    if section.reference != "none":
        per_t += reference_draw_count(section)
    return per_t * len(section.horizons) * len(section.shifts)


def _shifted(theta: Theta, direction: Theta, a: float) -> Theta:
    return jax.tree.map(lambda t, d: (t + a * d).astype(jnp.result_type(t)), theta, direction)


class DrawPrograms:
    """Compiled draw programs on one problem and mesh, one per (estimator, knobs, W, chunk
    size, fast_compile): the reference and a measured estimator with the same knobs share one
    program (a program that keeps per-window estimates serves a caller that does not need
    them), and so do studies that pass the same ``DrawPrograms`` to ``run_variance``."""

    def __init__(self, problem, mesh: Mesh | None):
        self.problem, self.mesh = problem, mesh
        self._programs: dict = {}

    def get(self, section: VarianceConfig, name: str, horizon: int, num_draws: int, *,
            reference: bool = False, per_window: bool = False) -> DrawProgram:
        knobs = section.knobs(name, horizon, reference=reference)
        windows = section.num_windows(name, horizon)
        est = make_estimator(name, self.problem, **knobs)
        size = auto_chunk_size(est, num_draws, section.draws_per_call)
        cache_key = (name, tuple(sorted(knobs.items())), windows, size, section.fast_compile)
        program = self._programs.get(cache_key)
        if program is None or (per_window and not program.per_window):
            program = DrawProgram(est, num_windows=windows, chunk_size=size, mesh=self.mesh,
                                  per_window=per_window, fast_compile=section.fast_compile)
            self._programs[cache_key] = program
        return program


def reference_gradient(
    problem: InnerProblem,
    theta: Theta,
    horizon: int,
    section: VarianceConfig,
    key: PRNGKey,
    *,
    shift: float = 0.0,
    mesh: Mesh | None = None,
    program: DrawProgram | None = None,
    on_chunk: Callable[[int], None] | None = None,
) -> Reference:
    """The mean of ``reference_draw_count(section)`` fresh draws of ``section.reference`` at
    (theta, T) and the variance of each coordinate of that mean; non-finite draws are dropped.
    ``program``: a compiled reference program to reuse (built here when None)."""
    t0 = time.perf_counter()
    name = section.reference
    if name == "none":
        return Reference("none", shift, horizon, None, None, 0, 0, 0.0)
    num = reference_draw_count(section)
    if program is None:
        program = DrawPrograms(problem, mesh).get(section, name, horizon, num, reference=True)
    draws = program.run(theta, key, num, on_chunk=on_chunk)
    good = draws.grads[draws.finite].astype(np.float64)
    n = good.shape[0]
    mean = good.mean(axis=0) if n else np.full(draws.grads.shape[1], np.nan)
    mean_var = good.var(axis=0, ddof=1) / n if n >= 2 else np.full_like(mean, np.nan)
    return Reference(name, shift, horizon, mean, mean_var, num, n, time.perf_counter() - t0)


def start_state(estimator, key: PRNGKey, theta: Theta,
                section: VarianceConfig) -> EstimatorState | None:
    """The fixed state the draws start from: None for a fresh start (``DrawProgram.run`` builds
    it), else the state after ``warmup_steps`` estimates at theta."""
    if section.start == "fresh":
        return None
    return warm_state(estimator, key, theta, num_steps=section.warmup_steps,
                      fast_compile=section.fast_compile)


def window_variances(windows: np.ndarray, finite: np.ndarray,
                     level: float) -> tuple[Interval, ...]:
    """tr Cov over the finite draws of each window's estimate: windows [R, W, P] -> W intervals."""
    good = windows[finite].astype(np.float64)
    return tuple(total_variance(good[:, w], level) for w in range(good.shape[1]))


def run_variance(
    problem: InnerProblem,
    theta0: Theta,
    direction: Theta | None,
    section: VarianceConfig,
    *,
    mesh: Mesh | None = None,
    on_draws: Callable[[int], None] | None = None,
    programs: DrawPrograms | None = None,
) -> VarianceResult:
    """The study of ``section`` on ``problem`` at theta0 + a ``direction`` for a in
    ``section.shifts`` (``direction`` may be None when every shift is 0).

    Keys (``study_keys(section.seed)``): the draws of estimator j at T use
    ``fold_in(fold_in(draws, T), j)`` and its start state ``fold_in(fold_in(start, T), j)`` at
    every shift; the reference at T ``fold_in(reference, T)``; ``fixed_batch`` the frozen
    init and batch of mode = "fixed_batch". on_draws: called with the number of draws just
    finished (for a progress bar). programs: compiled programs to reuse (on this problem
    and mesh; not with mode = "fixed_batch", whose problem is the study's own).
    """
    t_start = time.perf_counter()
    keys = study_keys(section.seed)
    if section.mode == "fixed_batch":
        problem = FixedBatchProblem.create(problem, keys.fixed_batch)
    if direction is None and any(a != 0 for a in section.shifts):
        raise ValueError("run_variance: a non-zero shift needs a direction")
    thetas = [theta0 if a == 0 else _shifted(theta0, direction, a) for a in section.shifts]
    num_params = sum(np.size(x) for x in jax.tree.leaves(theta0))
    progress = _Progress(on_draws)
    if programs is None or section.mode == "fixed_batch":
        programs = DrawPrograms(problem, mesh)
    measurements, references = [], []
    for t in section.horizons:
        measured = []  # built first, so that the reference can reuse one of them
        for name in section.measured():
            windows = section.num_windows(name, t)
            window_bytes = section.num_draws * windows * num_params * 4
            per_window = windows > 1 and window_bytes <= WINDOW_DRAWS_BYTES
            measured.append(programs.get(section, name, t, section.num_draws,
                                         per_window=per_window))
        ref_program = None
        if section.reference != "none":
            ref_program = programs.get(section, section.reference, t,
                                       reference_draw_count(section), reference=True)
        refs = [
            reference_gradient(problem, th, t, section, _fold(keys.reference, t), shift=a,
                               program=ref_program, on_chunk=progress.callback())
            for a, th in zip(section.shifts, thetas, strict=True)
        ]
        references += refs
        for j, (name, program) in enumerate(zip(section.measured(), measured, strict=True)):
            windows = program.num_windows
            for a, theta, ref in zip(section.shifts, thetas, refs, strict=True):
                state = start_state(program.estimator, _fold(keys.start, t, j), theta, section)
                draws = program.run(theta, _fold(keys.draws, t, j), section.num_draws,
                                    state=state, on_chunk=progress.callback())
                good = draws.grads[draws.finite].astype(np.float64)
                measurements.append(Measurement(
                    shift=a, estimator=name, horizon=t,
                    trunc_length=section.trunc_for(t) if _windowed(program) else t,
                    num_windows=windows, num_draws=section.num_draws,
                    num_finite=int(draws.finite.sum()),
                    num_nonfinite_unrolls=int(draws.num_nonfinite.sum()),
                    meta_loss=_finite_mean(draws.meta_loss),
                    inner_steps_per_draw=draws.inner_steps_per_draw,
                    seconds_per_draw=draws.seconds_per_draw,
                    compile_seconds=draws.compile_seconds,
                    stats=gradient_stats(good, ref.mean, ref.mean_var, level=section.confidence),
                    window_variance=None if draws.windows is None else
                    window_variances(draws.windows, draws.finite, section.confidence),
                ))
    start = START_DESCRIPTIONS[section.start].format(n=section.warmup_steps)
    return VarianceResult(measurements, references, start, time.perf_counter() - t_start)


def _finite_mean(x: np.ndarray) -> float:
    """The mean of the finite entries of ``x``; NaN when there is none."""
    x = np.asarray(x, np.float64)
    finite = x[np.isfinite(x)]
    return float(finite.mean()) if finite.size else float("nan")


def _windowed(program: DrawProgram) -> bool:
    return "trunc_length" in type(program.estimator).knob_names()


class _Progress:
    """Turns ``map_chunks``' cumulative row counts into increments for ``on_draws``."""

    def __init__(self, on_draws: Callable[[int], None] | None):
        self.on_draws = on_draws

    def callback(self) -> Callable[[int], None] | None:
        if self.on_draws is None:
            return None
        done = [0]

        def on_chunk(rows: int) -> None:
            self.on_draws(rows - done[0])
            done[0] = rows

        return on_chunk
