"""``learned-opt variance`` as a job: the study of a ``[variance]`` section
(``diagnostics.variance.run_variance``), written. Into the output directory (in a group of
processes, process 0 alone):

  variance.png    total variance vs T (log-log), one line per estimator (and shift), interval
                  bands; variance x inner steps per draw (equal cost); per-window variance of
                  the windowed estimators at the longest T
  variance.csv    one row per (shift, estimator, T): every number of the study
  variance.json   the same, per-window variances, the references' summaries and provenance
  reference.npz   the reference gradients: mean and mean_var [shifts, horizons, P]
  summary.md      settings, the table, the reference used and a generated reading
"""

from __future__ import annotations

import io
import math
from pathlib import Path

import numpy as np

from outer_train import distributed
from outer_train.diagnostics import outputs
from outer_train.diagnostics.job import Job, direction
from outer_train.diagnostics.variance import planned_draws, run_variance, study_keys

COLUMNS = (
    "shift", "estimator", "horizon", "trunc_length", "num_windows", "num_draws", "num_finite",
    "num_nonfinite_unrolls", "meta_loss", "inner_steps_per_draw", "seconds_per_draw",
    "compile_seconds", "total_variance", "total_variance_lo", "total_variance_hi",
    "variance_x_cost", "variance_x_cost_lo", "variance_x_cost_hi", "normalized_variance",
    "normalized_variance_lo", "normalized_variance_hi", "cosine", "cosine_stderr", "median_snr",
    "mean_norm", "relative_variance", "reference_norm", "bias", "bias_stderr", "bias_max_z",
    "bias_threshold", "bias_significant",
)


def run(job: Job, out: Path, *, progress: bool = True):
    """Runs the section's study and writes the files (module docstring); returns the
    ``VarianceResult``. In a group of processes every process runs it, process 0 alone writes
    (``distributed.is_writer``)."""
    section = job.section
    d = direction(job, section.direction, study_keys(section.seed).direction)
    bar = outputs.progress_bar(planned_draws(section), "variance", "draw",
                               progress)
    try:
        result = run_variance(job.problem, job.theta, d, section, mesh=job.mesh,
                              on_draws=bar.update)
    finally:
        bar.close()
    if not distributed.is_writer():  # a group's other processes compute only
        return result
    prov = outputs.provenance(job)
    rows = [row(m) for m in result.measurements]
    outputs.write_csv(out / "variance.csv", COLUMNS, ([r[c] for c in COLUMNS] for r in rows))
    outputs.write_json(out / "variance.json", {
        "provenance": prov,
        "start": result.start,
        "seconds": result.seconds,
        "references": [reference_summary(r) for r in result.references],
        "measurements": [
            {**r, "window_variance": window_rows(m)} for r, m in zip(
                rows, result.measurements, strict=True)
        ],
    })
    write_references(out / "reference.npz", result.references, section)
    plot(out / "variance.png", result, section)
    outputs.write_text(out / "summary.md", summary(result, section, prov))
    return result


# ---------------------------------------------------------------------------------------------
# Rows and files


def row(m) -> dict:
    """One measurement as a flat dict of the CSV's columns."""
    s = m.stats
    cost = s.total_variance.scaled(m.inner_steps_per_draw)
    return {
        "shift": m.shift, "estimator": m.estimator, "horizon": m.horizon,
        "trunc_length": m.trunc_length, "num_windows": m.num_windows,
        "num_draws": m.num_draws, "num_finite": m.num_finite,
        "num_nonfinite_unrolls": m.num_nonfinite_unrolls, "meta_loss": m.meta_loss,
        "inner_steps_per_draw": m.inner_steps_per_draw, "seconds_per_draw": m.seconds_per_draw,
        "compile_seconds": m.compile_seconds,
        "total_variance": s.total_variance.value, "total_variance_lo": s.total_variance.lo,
        "total_variance_hi": s.total_variance.hi,
        "variance_x_cost": cost.value, "variance_x_cost_lo": cost.lo,
        "variance_x_cost_hi": cost.hi,
        "normalized_variance": s.normalized_variance.value,
        "normalized_variance_lo": s.normalized_variance.lo,
        "normalized_variance_hi": s.normalized_variance.hi,
        "cosine": s.cosine, "cosine_stderr": s.cosine_stderr, "median_snr": s.median_snr,
        "mean_norm": s.mean_norm, "relative_variance": relative_variance(m),
        "reference_norm": s.reference_norm,
        "bias": s.bias, "bias_stderr": s.bias_stderr, "bias_max_z": s.bias_max_z,
        "bias_threshold": s.bias_threshold, "bias_significant": s.bias_significant,
    }


def relative_variance(m) -> float:
    """tr Cov(g) / ||mean g||^2: noise over signal, comparable across T without a reference."""
    norm2 = m.stats.mean_norm**2
    return m.stats.total_variance.value / norm2 if norm2 > 0 else float("nan")


def window_rows(m) -> list[dict] | None:
    if m.window_variance is None:
        return None
    return [{"window": w + 1, "total_variance": iv.value, "lo": iv.lo, "hi": iv.hi}
            for w, iv in enumerate(m.window_variance)]


def reference_noise(ref) -> float:
    """E||g_ref_hat - g_ref||^2 / ||g_ref_hat||^2 ~ sum(mean_var) / ||mean||^2: the floor the
    reference's own noise puts under every normalized variance and bias."""
    if ref.mean is None:
        return float("nan")
    norm2 = float(np.sum(ref.mean**2))
    return float(np.sum(ref.mean_var)) / norm2 if norm2 > 0 else float("nan")


def reference_summary(ref) -> dict:
    return {
        "estimator": ref.estimator, "shift": ref.shift, "horizon": ref.horizon,
        "num_draws": ref.num_draws, "num_finite": ref.num_finite, "seconds": ref.seconds,
        "norm": None if ref.mean is None else float(np.linalg.norm(ref.mean)),
        "relative_noise": reference_noise(ref),
    }


def write_references(path: Path, references, section) -> None:
    """reference.npz: horizons [H], shifts [S], mean and mean_var [S, H, P] (NaN without a
    reference), estimator (its name); written atomically."""
    shifts, horizons = list(section.shifts), list(section.horizons)
    size = next((r.mean.size for r in references if r.mean is not None), 0)
    mean = np.full((len(shifts), len(horizons), size), np.nan)
    mean_var = np.full_like(mean, np.nan)
    for r in references:
        if r.mean is not None:
            i, j = shifts.index(r.shift), horizons.index(r.horizon)
            mean[i, j], mean_var[i, j] = r.mean, r.mean_var
    buffer = io.BytesIO()
    np.savez(buffer, horizons=np.asarray(horizons), shifts=np.asarray(shifts), mean=mean,
             mean_var=mean_var, estimator=np.asarray(section.reference))
    outputs.write_bytes(path, buffer.getvalue())


# ---------------------------------------------------------------------------------------------
# Figure


def _lines(result):
    """{(estimator, shift): measurements sorted by T}."""
    lines: dict = {}
    for m in result.measurements:
        lines.setdefault((m.estimator, m.shift), []).append(m)
    return {k: sorted(v, key=lambda m: m.horizon) for k, v in lines.items()}


def _label(name: str, shift: float, section) -> str:
    if len(section.shifts) == 1:
        return name
    return f"shift {shift:g}" if len(section.measured()) == 1 else f"{name}, shift {shift:g}"


def plot(path: Path, result, section) -> None:
    from outer_train.diagnostics.outputs import pyplot, save_figure

    plt = pyplot()
    lines = _lines(result)
    windowed = [ms[-1] for ms in lines.values() if ms[-1].window_variance is not None]
    panels = 3 if windowed else 2
    fig, axes = plt.subplots(1, panels, figsize=(5.2 * panels, 4.2))
    names = list(section.measured())
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    styles = ["-", "--", ":", "-."]
    shifts = list(section.shifts)

    def color_style(name, shift):  # colour by estimator (by shift when there is one)
        if len(names) > 1:
            return (colors[names.index(name) % len(colors)],
                    styles[shifts.index(shift) % len(styles)])
        return colors[shifts.index(shift) % len(colors)], "-"

    for (name, shift), ms in lines.items():
        color, style = color_style(name, shift)
        t = [m.horizon for m in ms]
        costs = [m.inner_steps_per_draw for m in ms]
        for ax, scale in ((axes[0], [1] * len(ms)), (axes[1], costs)):
            v = [m.stats.total_variance.scaled(c) for m, c in zip(ms, scale, strict=True)]
            ax.plot(t, [x.value for x in v], style, color=color, marker="o", ms=3,
                    label=_label(name, shift, section))
            ax.fill_between(t, [x.lo for x in v], [x.hi for x in v], color=color, alpha=0.2)
    axes[0].set_ylabel("total variance tr Cov(g)")
    axes[1].set_ylabel("variance x inner steps per draw (equal cost)")
    level = f"{section.confidence:.0%}"
    title = "full backprop at theta + eps (Fig. 3b)" if section.study == "perturbed_backprop" \
        else "estimators"
    axes[0].set_title(f"{title}; bands: {level} intervals")
    for ax in axes[:2]:
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("unroll length T")
        ax.grid(True, which="both", alpha=0.3)
    axes[0].legend(fontsize=8)
    if windowed:
        ax = axes[2]
        for m in windowed:
            color, style = color_style(m.estimator, m.shift)
            w = np.arange(1, len(m.window_variance) + 1)
            ax.plot(w, [iv.value for iv in m.window_variance], style, color=color, marker=".",
                    label=_label(m.estimator, m.shift, section))
            ax.fill_between(w, [iv.lo for iv in m.window_variance],
                            [iv.hi for iv in m.window_variance], color=color, alpha=0.2)
        ax.set_yscale("log")
        ax.set_xlabel(f"window (K = {windowed[0].trunc_length}) at T = {windowed[0].horizon}")
        ax.set_ylabel("tr Cov of that window's estimate")
        ax.set_title("one outer step's variance through an episode")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    save_figure(fig, path)


# ---------------------------------------------------------------------------------------------
# Summary


def _ratio(a: float, b: float) -> str:
    from outer_train.diagnostics.outputs import fmt

    if not (math.isfinite(a) and math.isfinite(b)) or b <= 0:
        return "n/a"
    return f"{fmt(a / b, 3)}x"


def reading(result, section) -> list[str]:
    """Short sentences that read the table (what a user would conclude)."""
    from outer_train.diagnostics.outputs import fmt

    lines = _lines(result)
    out = []
    t_lo, t_hi = min(section.horizons), max(section.horizons)
    for shift in section.shifts:
        where = f"At shift {shift:g}: " if len(section.shifts) > 1 else ""
        growth = []
        for name in section.measured():
            ms = lines.get((name, shift), [])
            if len(ms) < 2:
                continue
            v0, v1 = ms[0].stats.total_variance.value, ms[-1].stats.total_variance.value
            if v0 == 0 and v1 == 0:
                growth.append(f"{name}'s is 0 at every T (deterministic: fixed batch, no noise)")
            else:
                rel = _ratio(relative_variance(ms[-1]), relative_variance(ms[0]))
                growth.append(f"{name}'s {_ratio(v1, v0)} (relative to ||mean g||^2: {rel})")
        if growth:
            out.append(f"{where}from T = {t_lo} to T = {t_hi} the total variance grows: "
                       + "; ".join(growth) + ".")
        at_hi = [ms[-1] for (name, s), ms in lines.items() if s == shift and
                 ms[-1].horizon == t_hi]
        costs = [(m.stats.total_variance.value * m.inner_steps_per_draw, m) for m in at_hi
                 if math.isfinite(m.stats.total_variance.value)]
        costs = [(c, m) for c, m in costs if c > 0]
        if len(costs) >= 2:
            costs.sort(key=lambda cm: cm[0])
            best_cost, best = costs[0]
            tag = lambda m: m.estimator + (" (biased)" if m.stats.bias_significant else "")
            others = ", ".join(f"{tag(m)}'s {_ratio(c, best_cost)}" for c, m in costs[1:])
            out.append(f"{where}at T = {t_hi} and equal cost (variance x inner steps per "
                       f"draw), {tag(best)} has the lowest variance; {others} as much.")
    biased = {}
    for m in result.measurements:
        if m.stats.bias_significant:
            biased.setdefault(m.estimator, []).append(m.horizon)
    for name, ts in biased.items():
        ts = sorted(set(ts))
        out.append(f"{name}'s mean differs significantly from the reference at T = "
                   f"{', '.join(map(str, ts))} (bias test at level {section.confidence:g}; "
                   "its variance understates its error there).")
    for m in result.measurements:
        if m.stats.mean_norm == 0 and m.stats.total_variance.value == 0:
            out.append(f"{m.estimator} at T = {m.horizon}, shift {m.shift:g}: every draw is "
                       "exactly 0 (e.g. the meta-loss sits at its clip value, where its "
                       "gradient is 0: the inner training diverged).")
        if m.num_finite < m.num_draws:
            out.append(f"{m.estimator} at T = {m.horizon}, shift {m.shift:g}: "
                       f"{m.num_draws - m.num_finite} of {m.num_draws} draws non-finite "
                       "(excluded from the statistics).")
    noisy = [r for r in result.references if reference_noise(r) > 0.1]
    if noisy:
        worst = max(noisy, key=reference_noise)
        out.append(f"The reference is noisy at T = {worst.horizon} (relative noise "
                   f"{fmt(reference_noise(worst), 2)}): normalized variances and biases "
                   "against it carry that floor; raise variance.reference_draws.")
    windowed = [ms[-1] for ms in lines.values() if ms[-1].window_variance is not None]
    for m in windowed:
        first, last = m.window_variance[0].value, m.window_variance[-1].value
        out.append(f"{m.estimator} (T = {m.horizon}, K = {m.trunc_length}"
                   + (f", shift {m.shift:g}" if len(section.shifts) > 1 else "")
                   + f"): one window's variance goes from {fmt(first)} (window 1) to "
                   f"{fmt(last)} (window {m.num_windows}), {_ratio(last, first)}.")
    return out


def summary(result, section, prov) -> str:
    from outer_train.diagnostics.outputs import fmt, markdown_table, summary_header

    title = ("Full-backprop variance over Gaussian perturbations vs unroll length (Fig. 3b)"
             if section.study == "perturbed_backprop" else
             "Meta-gradient variance vs unroll length")
    ref = result.references[0] if result.references else None
    if section.reference == "none":
        ref_text = "none (total variance and SNR only)"
    else:
        ref_text = (f"the mean of {ref.num_draws} fresh {section.reference} draws per (shift, "
                    "T), independent of the measured draws (reference.npz)")
    k_text = ("K = T (one window per draw)" if section.trunc_length == 0 else
              f"K = {section.trunc_length}, W = T / K windows per draw (their mean is the draw)")
    level = f"{section.confidence:.0%}"
    lines = [
        summary_header(title, prov),
        f"- study: {section.study}; mode: {section.mode}; {section.num_draws} draws per row",
        f"- start: {result.start}",
        f"- windowed estimators: {k_text}",
        f"- knobs: num_tasks = {section.num_tasks}, num_perturbations = "
        f"{section.num_perturbations}, sigma = {section.sigma:g}, backprop_sigma = "
        f"{section.backprop_sigma:g}" + (f"; overrides {list(section.knob_overrides)}"
                                         if section.knob_overrides else ""),
        f"- reference: {ref_text}",
        f"- intervals: {level}, scaled chi-square, degrees of freedom min(jackknife, "
        "Gaussian theory) (diagnostics.variance_stats)",
        f"- time: {result.seconds:.0f} s",
        "",
        "## Reading",
        "",
        *[f"- {s}" for s in reading(result, section)],
        "",
        "## Table",
        "",
        "Total variance = tr Cov(g); relative = tr Cov(g) / ||mean g||^2; normalized = "
        "E||g - g_ref||^2 / ||g_ref||^2 (includes the squared bias); cost = inner steps per "
        "draw; bias significant (*) by a Bonferroni test.",
        "",
    ]
    with_ref = section.reference != "none"
    cols = ["shift", "estimator", "T", "K", "W", "steps/draw", "s/draw", "total variance",
            f"{level} interval", "variance x cost", "relative", "median SNR"]
    if with_ref:
        cols += ["normalized", "cosine", "bias"]
    table = []
    for m in result.measurements:
        s = m.stats
        tv, nv = s.total_variance, s.normalized_variance
        cells = [
            f"{m.shift:g}", m.estimator, m.horizon, m.trunc_length, m.num_windows,
            m.inner_steps_per_draw, fmt(m.seconds_per_draw, 3), fmt(tv.value),
            f"[{fmt(tv.lo, 3)}, {fmt(tv.hi, 3)}]", fmt(tv.value * m.inner_steps_per_draw),
            fmt(relative_variance(m), 3), fmt(s.median_snr, 3),
        ]
        if with_ref:
            bias = (f"{fmt(s.bias, 3)} ± {fmt(s.bias_stderr, 2)}"
                    f"{' *' if s.bias_significant else ''}")
            cells += [fmt(nv.value), f"{fmt(s.cosine, 3)} ± {fmt(s.cosine_stderr, 2)}", bias]
        table.append(cells)
    lines += [markdown_table(cols, table), ""]
    lines += ["Files: variance.png, variance.csv, variance.json (every number, per-window "
              "variances, provenance), reference.npz, summary.md.", ""]
    return "\n".join(lines)
