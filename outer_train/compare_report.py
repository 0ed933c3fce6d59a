"""The report of a comparison (``outer_train.compare``): ``report.md``, ``results.csv``,
``results.json`` and the PNGs, from the runs' numbers (``compare_results``) and the estimator
statistics at each arm's final theta (``compare_stats``). How the numbers are aggregated and
when a value is bold: ``compare_results``.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np

from outer_train.compare_results import (
    FIELDS,
    OBJECTIVE,
    ArmSummary,
    RunResult,
    adam_stats,
    best_at,
    summarize,
)
from outer_train.compare_stats import ArmStats
from outer_train.config.compare import CompareConfig
from outer_train.diagnostics.outputs import (
    fmt,
    markdown_table,
    pyplot,
    save_figure,
    write_csv,
    write_json,
    write_text,
)

CSV_COLUMNS = (
    "label", "estimator", "learning_rate", "seed", "status", "budget_point", "outer_step",
    "inner_steps", "train_seconds", "heldout_meta_objective", "valid_loss", "valid_accuracy",
    "adam_meta_objective", "adam_valid_loss", "adam_valid_accuracy", "adam_learning_rate",
    "run_seconds", "run_dir",
)


def _pm(stat: tuple[float, float, int], digits: int = 4) -> str:
    mean, sem, _ = stat
    if not math.isfinite(mean):
        return "—"
    return f"{mean:.{digits}f}" + (f" ± {sem:.{digits}f}" if math.isfinite(sem) else "")


def write_report(out_dir: Path, compare: CompareConfig, runs: tuple[RunResult, ...],
                 stats: list[ArmStats] = (), plan: dict[str, Any] | None = None) -> Path:
    """results.csv, results.json, the PNGs and report.md; returns report.md's path. stats: the
    arms' estimator statistics (``compare_stats.measure``); plan: a seconds budget's
    calibration (``compare.calibrate``)."""
    p = compare.section.num_budget_points
    summaries = summarize(compare, runs)
    adam = adam_stats(runs, compare.seeds)
    _write_csv(out_dir / "results.csv", runs, p)
    write_json(out_dir / "results.json", {
        "budget": compare.section.budget, "budget_inner_steps": compare.section.budget_inner_steps,
        "budget_seconds": compare.section.budget_seconds, "num_budget_points": p,
        "seeds": list(compare.seeds), "adam": adam, "plan": plan,
        "arms": [{"label": s.label, "estimator": s.arm.estimator.name,
                  "learning_rates": list(s.arm.learning_rates),
                  "best_learning_rate": s.arm.learning_rates[s.best_rate_index],
                  "rate_objective": list(s.rate_objective), "num_failed": s.num_failed,
                  "num_outer_steps": compare.num_outer_steps(s.arm),
                  "stats": list(s.stats)} for s in summaries],
        "estimator_stats": [st._asdict() for st in stats],
    })
    _plot_heldout(out_dir / "heldout_vs_inner_steps.png", summaries, adam, "inner_steps",
                  "inner steps (budget spent, summed over particles)")
    _plot_heldout(out_dir / "heldout_vs_seconds.png", summaries, adam, "train_seconds",
                  "training wall-clock seconds (held-out evaluation excluded)")
    _plot_meta_training(out_dir / "meta_training.png", summaries)
    curves = _plot_final_curves(out_dir / "heldout_curves.png", summaries)
    lines = _report_lines(compare, runs, summaries, adam, out_dir, curves, list(stats), plan)
    return write_text(out_dir / "report.md", "\n".join(lines) + "\n")


def _write_csv(path: Path, runs: tuple[RunResult, ...], p: int) -> None:
    rows = []
    for r in runs:
        for j, point in enumerate(r.points):
            get = (lambda k, point=point: point.get(k, math.nan) if point else math.nan)
            rows.append([
                r.spec.arm.label, r.spec.arm.estimator.name, r.spec.learning_rate, r.spec.seed,
                r.status, j, j * (r.spec.config.run.num_outer_steps // p),
                get("inner_steps"), get("train_seconds"), get("learned_mean_batch_loss"),
                get("learned_valid_loss"), get("learned_valid_accuracy"),
                get("adam_mean_batch_loss"), get("adam_valid_loss"), get("adam_valid_accuracy"),
                get("adam_learning_rate"), r.seconds, str(r.spec.directory),
            ])
    write_csv(path, CSV_COLUMNS, rows)


def _band(ax, x, stat_list, label, color):
    mean = np.array([s[0] for s in stat_list])
    sem = np.nan_to_num(np.array([s[1] for s in stat_list]))
    ax.plot(x, mean, "o-", color=color, label=label, ms=3)
    ax.fill_between(x, mean - sem, mean + sem, color=color, alpha=0.2)


def _log_scale_if_wide(ax, values: list[float]) -> None:
    """A log y axis when the positive losses span more than 10x (one diverged arm would
    otherwise flatten every other line onto the axis)."""
    finite = [v for v in values if math.isfinite(v)]
    if finite and min(finite) > 0 and max(finite) > 10 * min(finite):
        ax.set_yscale("log")


def _plot_heldout(path: Path, summaries: list[ArmSummary], adam, x_key: str, xlabel: str):
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.2))
    for (field, name), ax in zip(FIELDS[:2], axes, strict=True):
        for i, s in enumerate(summaries):
            x = np.array([st[x_key][0] for st in s.stats])
            _band(ax, x, [st[f"learned_{field}"] for st in s.stats], s.label, f"C{i}")
        mean, sem, _ = adam[f"adam_{field}"]
        if math.isfinite(mean):
            ax.axhline(mean, color="k", ls="--", lw=1, label="tuned Adam")
            if math.isfinite(sem):
                ax.axhspan(mean - sem, mean + sem, color="k", alpha=0.08)
        _log_scale_if_wide(ax, [st[f"learned_{field}"][0] for s in summaries for st in s.stats])
        ax.set_xlabel(xlabel)
        ax.set_ylabel(f"{name} (mean ± s.e. over seeds)")
        ax.legend(fontsize=8)
    fig.suptitle("held-out evaluation along the budget")
    save_figure(fig, path)


def _plot_meta_training(path: Path, summaries: list[ArmSummary]):
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for i, s in enumerate(summaries):
        for k, r in enumerate(s.runs):
            x, y = r.train_curve
            if x.size == 0:
                continue
            w = max(x.size // 20, 1)
            smooth = np.convolve(y, np.ones(w) / w, "valid")
            ax.plot(x[w - 1:], smooth, color=f"C{i}", alpha=0.8, lw=1,
                    label=s.label if k == 0 else None)
    ax.set_xlabel("inner steps")
    ax.set_ylabel("meta-training loss (window mean, running mean)")
    ax.set_title("meta-training curves (one line per seed)")
    ax.legend(fontsize=8)
    save_figure(fig, path)


def _plot_final_curves(path: Path, summaries: list[ArmSummary]) -> bool:
    """Held-out training curves of each arm's final optimizers vs tuned Adam (from each run's
    heldout_curves.json; mean over seeds of the per-run means). False when no run has them."""
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.2))
    found, adam_curves = False, []
    for i, s in enumerate(summaries):
        per_run = []
        for r in s.runs:
            f = r.spec.directory / "heldout_curves.json"
            if r.status == "finished" and f.exists():
                data = json.loads(f.read_text())
                per_run.append(data)
                adam_curves.append(data["adam"])
        if not per_run:
            continue
        found = True
        step = np.asarray(per_run[0]["learned"]["step"])
        for ax, field in zip(axes, ("train_loss", "valid_loss"), strict=True):
            values = [np.asarray(d["learned"][field], np.float64).reshape(-1, step.size).mean(0)
                      for d in per_run]
            ax.plot(step, np.mean(values, axis=0), color=f"C{i}", label=s.label)
    if adam_curves:
        step = np.asarray(adam_curves[0]["step"])
        for ax, field in zip(axes, ("train_loss", "valid_loss"), strict=True):
            values = [np.asarray(c[field], np.float64).reshape(-1, step.size).mean(0)
                      for c in adam_curves]
            ax.plot(step, np.mean(values, axis=0), "k--", label="tuned Adam")
    for ax, name in zip(axes, ("train loss", "valid loss"), strict=True):
        ax.set_xlabel("held-out inner step")
        ax.set_ylabel(name)
        ax.set_yscale("log")
        ax.legend(fontsize=8)
    fig.suptitle("held-out training with the final learned optimizers (mean over seeds)")
    save_figure(fig, path)
    return found


def _budget_words(compare: CompareConfig) -> str:
    sec = compare.section
    if sec.budget == "seconds":
        return (f"{sec.budget_seconds:,.0f} s of outer steps per run (each arm's outer steps "
                f"from its seconds per outer step, measured over {sec.calibration_steps} steps "
                "after a compiling one on this machine)")
    return f"{sec.budget_inner_steps:,} inner steps per run (summed over particles)"


def _point_budget(compare: CompareConfig, j: int) -> str:
    sec = compare.section
    p = sec.num_budget_points
    if sec.budget == "seconds":
        return f"{sec.budget_seconds * j / p:,.0f} s"
    return f"{sec.budget_inner_steps * j // p:,}"


def _report_lines(compare: CompareConfig, runs, summaries: list[ArmSummary], adam, out_dir,
                  curves: bool, stats: list[ArmStats], plan: dict[str, Any] | None
                  ) -> list[str]:
    sec = compare.section
    p = sec.num_budget_points
    key = OBJECTIVE
    seeds = ", ".join(str(s) for s in compare.seeds)
    cfg0 = summaries[0].arm.configs[0]
    lines = [
        "# Estimator comparison",
        "",
        f"- Budget: {_budget_words(compare)}, held-out evaluation at {p} budget points; seeds "
        f"{seeds} (the same for every arm).",
        f"- Held-out meta-objective: mean training-batch loss over {cfg0.eval_inner_steps} "
        f"held-out inner steps ({cfg0.eval.num_seeds} held-out seeds per task, never used in "
        "meta-training), against Adam tuned on the same held-out runs "
        f"(learning rate {fmt(adam['adam_learning_rate'][0])} on average over seeds).",
        "- Mean ± standard error over seeds. **Bold**: the lowest held-out meta-objective at "
        "that budget point, where it beats the runner-up by more than 2 standard errors of the "
        "difference.",
        "",
        "## Arms",
        "",
    ]
    arm_rows = []
    for s in summaries:
        est = s.arm.estimator
        n_outer = compare.num_outer_steps(s.arm)
        rates = ", ".join(f"{lr:g}" + ("*" if i == s.best_rate_index and len(s.arm.learning_rates)
                                       > 1 else "") for i, lr in enumerate(s.arm.learning_rates))
        knobs = ", ".join(f"{k}={v}" for k, v in est.knobs().items())
        row = [s.label, f"`{est.name}` ({knobs})",
               f"{compare.inner_steps_per_outer_step(s.arm):,}", f"{n_outer:,}", rates,
               f"{s.num_failed}/{len(s.runs)}"]
        if plan is not None:
            row.insert(3, f"{plan['arms'][s.label]['seconds_per_outer_step']:.3f}")
        arm_rows.append(row)
    arm_head = ["arm", "estimator", "inner steps / outer step", "outer steps",
                "meta-learning rate (* best)", "failed runs"]
    if plan is not None:
        arm_head.insert(3, "measured s / outer step")
    lines += [markdown_table(arm_head, arm_rows), ""]
    # Main table: meta-objective per budget point.
    unit = "training seconds" if sec.budget == "seconds" else "inner steps"
    head = ["budget point", unit] + [s.label for s in summaries] + ["tuned Adam"]
    rows = []
    for j in range(p + 1):  # j = 0: every arm's initial theta (the same learned optimizer)
        best, sig = best_at(summaries, j)
        cells = []
        for i, s in enumerate(summaries):
            text = _pm(s.stats[j][key])
            n = s.stats[j][key][2]
            if n < len(compare.seeds) and text != "—":
                text += f" ({n}/{len(compare.seeds)} seeds)"
            cells.append(f"**{text}**" if i == best and sig else text)
        rows.append([f"{j}/{p}" + (" (init)" if j == 0 else ""), _point_budget(compare, j), *cells,
                     _pm(adam["adam_mean_batch_loss"])])
    lines += ["## Held-out meta-objective along the budget", "", markdown_table(head, rows), ""]
    # Per arm and point: every field.
    detail = []
    for j in range(1, p + 1):
        for s in summaries:
            st = s.stats[j]
            detail.append([f"{j}/{p}", s.label, f"{st['inner_steps'][0]:,.0f}",
                           _pm(st[key]), _pm(st["learned_valid_loss"]),
                           _pm(st["learned_valid_accuracy"]), _pm(st["train_seconds"], 1),
                           f"{st[key][2]}/{len(compare.seeds)}"])
    lines += ["## Every arm at every budget point", "",
              markdown_table(["budget point", "arm", "inner steps (actual)",
                              "held-out meta-objective", "final valid loss",
                              "final valid accuracy", "training seconds", "seeds"], detail),
              "",
              f"Tuned Adam: meta-objective {_pm(adam['adam_mean_batch_loss'])}, final valid loss "
              f"{_pm(adam['adam_valid_loss'])}, final valid accuracy "
              f"{_pm(adam['adam_valid_accuracy'])}.", ""]
    if any(len(s.arm.learning_rates) > 1 for s in summaries):
        grid = [[s.label, f"{lr:g}", _pm((v, math.nan, 0))]
                for s in summaries for lr, v in zip(s.arm.learning_rates, s.rate_objective,
                                                     strict=True)]
        lines += ["## Meta-learning-rate grids (mean over seeds at the last budget point)", "",
                  markdown_table(["arm", "meta-learning rate", "held-out meta-objective"], grid),
                  ""]
    if stats:
        lines += _stats_lines(compare, summaries, stats)
    lines += ["## Recommendation", "", recommendation(compare, summaries, adam, stats), ""]
    lines += ["## Plots", "", "![held-out vs inner steps](heldout_vs_inner_steps.png)", "",
              "![held-out vs wall-clock](heldout_vs_seconds.png)", "",
              "![meta-training](meta_training.png)", ""]
    if curves:
        lines += ["![held-out training curves](heldout_curves.png)", ""]
    run_rows = []
    for r in runs:
        run_rows.append([str(r.spec.directory.relative_to(out_dir)), f"{r.spec.learning_rate:g}",
                         r.status, f"{r.seconds:.1f}" if math.isfinite(r.seconds) else "—",
                         r.error.splitlines()[0][:120] if r.error else ""])
    total = sum(r.seconds for r in runs if math.isfinite(r.seconds))
    lines += ["## Runs", "",
              f"The runs went one after another on one machine (each using every device), "
              f"{total:.0f} s in all; a run's seconds are its whole wall time (data, compilation, "
              "held-out evaluations; the sessions of a resumed run added, a killed session's "
              "time not counted).", "",
              markdown_table(["run", "meta-learning rate", "status", "seconds", "error"],
                             run_rows), ""]
    return lines


def _interval(row: dict[str, Any], name: str) -> str:
    value, lo, hi = (row.get(name), row.get(f"{name}_lo"), row.get(f"{name}_hi"))
    if value is None:
        return "—"
    return fmt(value) + (f" [{fmt(lo)}, {fmt(hi)}]" if lo is not None and hi is not None else "")


def _reference_cells(reference: dict[str, Any] | None) -> tuple[str, str]:
    if not reference:
        return ("—", "—")
    return (f"{reference['num_finite']}/{reference['num_draws']}",
            fmt(reference["relative_noise"]))


def _stats_lines(compare: CompareConfig, summaries: list[ArmSummary],
                 stats: list[ArmStats]) -> list[str]:
    sec = compare.section
    rows, notes = [], []
    for s, st in zip(summaries, stats, strict=True):
        if st.row is None:
            notes.append(f"{s.label}: {st.reason}.")
            continue
        r = st.row
        cosine = "—" if r["cosine"] is None else (
            f"{r['cosine']:.3f} ± {r['cosine_stderr']:.3f}" if r["cosine_stderr"] is not None
            else f"{r['cosine']:.3f}")
        rows.append([
            s.label, f"seed{st.seed}", f"{r['horizon']} ({r['num_windows']} x {r['trunc_length']})",
            _interval(r, "normalized_variance"), cosine, fmt(r["relative_variance"]),
            f"{r['num_finite']}/{r['num_draws']}", f"{r['inner_steps_per_draw']:,}",
            f"{compare.inner_steps_per_outer_step(s.arm):,}",
            *_reference_cells(st.reference),
        ])
    lines = [
        "## Estimator statistics at each arm's final theta",
        "",
        f"The variance tool (`learned-opt variance`) at each arm's final learned optimizer "
        f"(first finished seed, best rate): {sec.stats_num_draws} fresh draws of the arm's own "
        f"estimator with its knobs and {sec.stats_num_tasks} particle(s) per draw, each the "
        "mean of its estimates over one episode of T inner steps (W windows of K), against the "
        f"mean of {sec.stats_reference_draws} fresh {sec.stats_reference} draws at the same "
        "theta. Normalized variance = mean ||g - g_ref||^2 / ||g_ref||^2 (95% interval); "
        "relative variance = tr Cov / ||mean g||^2 (no reference needed). One outer step of "
        "the arm averages its particles over one window: its inner steps are in the last "
        "column.",
        "",
    ]
    if rows:
        lines += [markdown_table(
            ["arm", "theta", "T (W x K)", "normalized variance", "cosine to reference",
             "relative variance", "finite draws", "inner steps / draw",
             "inner steps / outer step", "reference finite draws",
             "reference relative noise"], rows), ""]
        lines += [f"The reference is measured at each arm's own theta. Its relative noise "
                  f"(the variance of the mean of its {sec.stats_reference_draws} draws over "
                  "its squared norm) is the floor under that row's normalized variance; a "
                  "reference with no finite draw leaves the row without one.", ""]
    if notes:
        lines += [" ".join(notes), ""]
    return lines


def recommendation(compare: CompareConfig, summaries: list[ArmSummary], adam,
                   stats: list[ArmStats] = ()) -> str:
    """A short paragraph from the numbers: the winner at the final budget on the meta-objective
    and on final valid loss, whether each is beyond noise, how often each arm led, failures,
    the cheapest in wall-clock, Adam, and the estimator statistics behind the outcome."""
    p = compare.section.num_budget_points
    key = OBJECTIVE
    n_seeds = len(compare.seeds)
    out = []
    best, sig = best_at(summaries, p)
    if best is None:
        return "No arm reached the end of the budget: nothing to recommend."
    b = summaries[best]
    ranked = sorted((s for s in summaries if math.isfinite(s.stats[p][key][0])),
                    key=lambda s: s.stats[p][key][0])
    budget = ("the full budget" if compare.section.budget == "seconds" else
              f"the full budget ({compare.section.budget_inner_steps:,} inner steps)")
    text = (f"At {budget} {b.label} reached the lowest held-out meta-objective "
            f"({_pm(b.stats[p][key])})")
    if len(ranked) > 1:
        ru = ranked[1]
        text += (f", {'beyond' if sig else 'within'} 2 standard errors of the runner-up "
                 f"{ru.label} ({_pm(ru.stats[p][key])})")
        if not sig:
            text += f": with {n_seeds} seed(s) the two are not distinguishable"
    out.append(text + ".")
    vbest, vsig = best_at(summaries, p, "learned_valid_loss")
    if vbest is not None:
        v = summaries[vbest]
        vkey = "learned_valid_loss"
        same = "the same arm" if vbest == best else "a different arm"
        out.append(f"On final valid loss the lowest was {v.label} ({_pm(v.stats[p][vkey])}; "
                   f"{same}, {'beyond' if vsig else 'within'} 2 standard errors of the next).")
    leads = {s.label: 0 for s in summaries}
    for j in range(1, p + 1):
        i, _ = best_at(summaries, j)
        if i is not None:
            leads[summaries[i].label] += 1
    out.append("Lowest meta-objective at each budget point: " + ", ".join(
        f"{label} {k}/{p}" for label, k in leads.items()) + ".")
    worst = ranked[-1] if len(ranked) > 1 else None
    if worst is not None and worst is not b:
        first = worst.stats[1][key][0] if p > 1 else math.nan
        last = worst.stats[p][key][0]
        trend = (" and had stopped improving over the second half of the budget"
                 if p > 1 and worst.stats[p // 2][key][0] <= last else "")
        out.append(f"{worst.label} ended highest ({_pm(worst.stats[p][key])}, from "
                   f"{fmt(first)} at the first budget point){trend}.")
    for s in summaries:
        if s.num_failed:
            out.append(f"{s.label} failed in {s.num_failed}/{len(s.runs)} seeds "
                       f"({_first_error(s)}).")
    secs = [(s.stats[p]["train_seconds"][0], s.label) for s in summaries
            if math.isfinite(s.stats[p]["train_seconds"][0])]
    if len(secs) > 1:
        secs.sort()
        out.append(f"Training the full budget took {secs[0][0]:.0f} s for {secs[0][1]} "
                   f"(fastest) to {secs[-1][0]:.0f} s for {secs[-1][1]}.")
    a = adam["adam_mean_batch_loss"]
    if math.isfinite(a[0]):
        beat = [s.label for s in ranked if s.stats[p][key][0] < a[0]]
        out.append(f"Tuned Adam: {_pm(a)}; " + (f"beaten by {', '.join(beat)}." if beat
                                                 else "no arm beat it at this budget."))
    measured = [(st.row["normalized_variance"], st.row["cosine"], st.label) for st in stats
                if st.row is not None and st.row["normalized_variance"] is not None]
    if measured:
        measured.sort()
        out.append("At the final thetas the meta-gradients were, from least to most noisy "
                   "(normalized variance, cosine to the reference): " + ", ".join(
                       f"{label} {fmt(nv)} ({'—' if c is None else f'{c:.2f}'})"
                       for nv, c, label in measured) + ".")
    return " ".join(out)


def _first_error(s: ArmSummary) -> str:
    for r in s.runs:
        if r.error:
            line = r.error.splitlines()[0]
            return line if len(line) <= 100 else line[:97] + "..."
    return "no error recorded"
