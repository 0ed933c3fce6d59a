"""``learned-opt compare``: several outer estimators ("arms") on one meta-training job, at an
equal budget, and a report of which one meta-trains best.

Layout of the output directory (every run is a normal ``meta_train`` run directory)::

    <out>/compare.json                  the comparison's config (base sections + [compare])
    <out>/<label>/seed<k>/              one run: arm <label>, run.seed = k (one learning rate)
    <out>/<label>/lr<rate>/seed<k>/     ... with a learning-rate grid (one run per rate)
    <out>/<run>/compare_status.json     "finished" or "failed" (+ error), wall seconds, config
    <out>/report.md, results.csv, results.json, *.png

Runs go one after another (each already uses every device). A run counts as done when its
status file says finished or failed for exactly its config and, when finished, its
metrics.jsonl holds the final held-out evaluation; ``resume`` skips done runs and continues
any other from its newest checkpoint (``meta_train(resume=True)``). A run that raises (a
divergence ``UserError``, any other exception) is recorded as failed and the others go on;
KeyboardInterrupt stops the comparison (resume continues it). Failed runs are not retried on
resume (meta-training is deterministic): delete the run's directory to retry it.

Numbers per run, from its metrics.jsonl: at budget point j (outer step n_j = j N / P) the
held-out meta-objective ``learned_mean_batch_loss`` (mean training-batch loss over the held-out
horizon, mean over held-out tasks x seeds), ``learned_valid_loss`` / ``learned_valid_accuracy``
(final), tuned Adam's same fields, inner steps n_j * I, and training seconds: the sum over the
train records up to n_j of (steps since the previous record) * I / inner_steps_per_second
(outer steps only, held-out evaluation excluded; the first step of a session includes
compilation).

Aggregation over seeds (one value per run): mean and standard error sem = std(ddof=1) /
sqrt(n). An arm with a learning-rate grid is reported at its best rate: the lowest mean over
seeds of the held-out meta-objective at the last budget point (a failed seed counts as +inf);
choosing on the held-out seeds favours arms with a grid, as tuning Adam on them favours Adam.
The best arm at a budget point is bold only where the runner-up's mean exceeds it by more than
2 sqrt(sem_best^2 + sem_runner_up^2).
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from learned_opt.errors import UserError
from outer_train.config import MetaTrainConfig
from outer_train.config.compare import Arm, CompareConfig
from outer_train.diagnostics.outputs import (
    fmt,
    markdown_table,
    pyplot,
    save_figure,
    write_csv,
    write_json,
    write_text,
)
from outer_train.logging import read_records
from outer_train.meta_train import meta_train

STATUS_FILE = "compare_status.json"
CONFIG_FILE = "compare.json"
# (metrics.jsonl eval key, report name) of the numbers reported per budget point.
FIELDS = (
    ("mean_batch_loss", "held-out meta-objective"),
    ("valid_loss", "final valid loss"),
    ("valid_accuracy", "final valid accuracy"),
)
CSV_COLUMNS = (
    "label", "estimator", "learning_rate", "seed", "status", "budget_point", "outer_step",
    "inner_steps", "train_seconds", "heldout_meta_objective", "valid_loss", "valid_accuracy",
    "adam_meta_objective", "adam_valid_loss", "adam_valid_accuracy", "adam_learning_rate",
    "run_seconds", "run_dir",
)


@dataclasses.dataclass(frozen=True)
class RunSpec:
    """One run of the comparison: arm, learning-rate index, seed, directory and config."""

    arm: Arm
    rate_index: int
    seed: int
    directory: Path
    config: MetaTrainConfig

    @property
    def learning_rate(self) -> float:
        return self.arm.learning_rates[self.rate_index]


@dataclasses.dataclass(frozen=True)
class RunResult:
    """What one run left. points: per budget point j = 0..P, a dict of the eval fields (the
    learned_/adam_ keys of metrics.jsonl plus ``outer_step``, ``inner_steps``,
    ``train_seconds``), or None where the run did not get there."""

    spec: RunSpec
    status: str  # "finished", "failed" or "missing"
    error: str
    seconds: float
    points: tuple[dict[str, float] | None, ...]
    train_curve: tuple[np.ndarray, np.ndarray]  # (inner steps, meta-loss) of the train records


@dataclasses.dataclass(frozen=True)
class CompareResult:
    out_dir: Path
    runs: tuple[RunResult, ...]
    report_path: Path


def run_specs(compare: CompareConfig, out_dir: Path) -> list[RunSpec]:
    """Every run, in the order they go: arm by arm, rate by rate, seed by seed."""
    specs = []
    for arm in compare.arms:
        for r, lr in enumerate(arm.learning_rates):
            base = out_dir / arm.label
            if len(arm.learning_rates) > 1:
                base = base / f"lr{lr:g}"
            for seed in compare.seeds:
                specs.append(RunSpec(arm, r, seed, base / f"seed{seed}",
                                     compare.run_config(arm, r, seed)))
    return specs


def run_compare(base: MetaTrainConfig, compare: CompareConfig, out_dir: str | Path, *,
                raw_config: dict[str, Any] | None = None, resume: bool = False,
                progress: bool = True, log: Callable[[str], None] = print) -> CompareResult:
    """Runs every arm x rate x seed (skipping done runs with ``resume``), then writes the
    report. Raises ``UserError`` for an output directory holding another comparison without
    ``resume``."""
    del base  # every run's config is complete in ``compare``
    out_dir = Path(out_dir)
    specs = run_specs(compare, out_dir)
    if not resume and ((out_dir / CONFIG_FILE).exists()
                       or any((s.directory / "checkpoints").exists() for s in specs)):
        raise UserError(f"{out_dir} already holds a comparison; pass --resume to continue it "
                        "(finished runs are skipped), or choose another --out")
    out_dir.mkdir(parents=True, exist_ok=True)
    write_json(out_dir / CONFIG_FILE, raw_config or {})
    for i, spec in enumerate(specs, 1):
        name = spec.directory.relative_to(out_dir)
        done = _done_status(spec)
        if done is not None:
            log(f"[{i}/{len(specs)}] {name}: {done['status']} earlier, skipped")
            continue
        log(f"[{i}/{len(specs)}] {name}: {spec.config.run.num_outer_steps} outer steps "
            f"x {compare.inner_steps_per_outer_step(spec.arm)} inner steps")
        _run_one(spec, progress=progress, log=log)
    runs = tuple(collect_run(s, compare.section.num_budget_points) for s in specs)
    report = write_report(out_dir, compare, runs)
    return CompareResult(out_dir, runs, report)


def _run_one(spec: RunSpec, *, progress: bool, log: Callable[[str], None]) -> None:
    """One run (continued from its checkpoint if it has one); its status file after."""
    status = _read_status(spec.directory)
    earlier = status.get("seconds", 0.0) if status.get("config") == spec.config.to_dict() else 0.0
    resume = (spec.directory / "checkpoints").exists()
    t0 = time.perf_counter()
    try:
        result = meta_train(spec.config, spec.directory, resume=resume, progress=progress,
                            log=log)
    except KeyboardInterrupt:
        raise
    except Exception as e:  # recorded; the other runs go on
        seconds = earlier + time.perf_counter() - t0
        kind = "" if isinstance(e, UserError) else f"{type(e).__name__}: "
        _write_status(spec, "failed", seconds, f"{kind}{e}",
                      "" if isinstance(e, UserError) else traceback.format_exc())
        log(f"  failed: {kind}{e}")
        return
    if int(result.state.outer_step) < spec.config.run.num_outer_steps:
        return  # stopped early (meta_train's stop_after): not done, resume continues it
    _write_status(spec, "finished", earlier + time.perf_counter() - t0)


def _read_status(directory: Path) -> dict[str, Any]:
    try:
        return json.loads((directory / STATUS_FILE).read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return {}


def _write_status(spec: RunSpec, status: str, seconds: float, error: str = "",
                  trace: str = "") -> None:
    write_json(spec.directory / STATUS_FILE, {
        "status": status, "seconds": seconds, "error": error, "traceback": trace,
        "config": spec.config.to_dict(),
    })


def _done_status(spec: RunSpec) -> dict[str, Any] | None:
    """The status of a run that needs no more work, else None (see the module docstring)."""
    status = _read_status(spec.directory)
    if status.get("config") != spec.config.to_dict():
        return None
    if status.get("status") == "failed":
        return status
    if status.get("status") != "finished":
        return None
    final = spec.config.run.num_outer_steps
    metrics = spec.directory / "metrics.jsonl"
    if metrics.exists() and any(r["outer_step"] == final for r in read_records(metrics, "eval")):
        return status
    return None


# ---------------------------------------------------------------------------------------------
# Collecting the numbers


def collect_run(spec: RunSpec, num_points: int) -> RunResult:
    """The run's numbers at every budget point, from its metrics.jsonl and status file."""
    status = _read_status(spec.directory)
    if status.get("config") != spec.config.to_dict():
        status = {}
    metrics = spec.directory / "metrics.jsonl"
    records = list(read_records(metrics)) if metrics.exists() else []
    setup = [r for r in records if r["kind"] == "setup"]
    per_outer = setup[-1]["inner_steps_per_outer_step"] if setup else 0
    train = {r["outer_step"]: r for r in records if r["kind"] == "train"}  # last one wins
    evals = {r["outer_step"]: r for r in records if r["kind"] == "eval"}
    steps = sorted(train)
    seconds, total, prev = {}, 0.0, 0
    for n in steps:
        total += (n - prev) * per_outer / max(train[n].get("inner_steps_per_second", math.inf),
                                              1e-12)
        seconds[n], prev = total, n
    every = spec.config.run.num_outer_steps // num_points
    points = []
    for j in range(num_points + 1):
        n = j * every
        r = evals.get(n)
        if r is None:
            points.append(None)
            continue
        known = [s for s in steps if s <= n]
        points.append({**{k: v for k, v in r.items() if k.startswith(("learned_", "adam_"))},
                       "outer_step": n, "inner_steps": n * per_outer,
                       "train_seconds": seconds[known[-1]] if known else 0.0})
    curve = (np.array([n * per_outer for n in steps], np.float64),
             np.array([train[n]["meta_loss"] for n in steps], np.float64))
    return RunResult(spec, status.get("status", "missing"), status.get("error", ""),
                     float(status.get("seconds", math.nan)), tuple(points), curve)


def mean_sem(values) -> tuple[float, float, int]:
    """(mean, standard error std(ddof=1)/sqrt(n), n) of the finite values; nan when none."""
    x = np.asarray([v for v in values if v is not None and math.isfinite(v)], np.float64)
    if x.size == 0:
        return math.nan, math.nan, 0
    sem = float(x.std(ddof=1) / math.sqrt(x.size)) if x.size > 1 else math.nan
    return float(x.mean()), sem, int(x.size)


@dataclasses.dataclass(frozen=True)
class ArmSummary:
    """One arm at its best learning rate. stats[j][field] = (mean, sem, n) over seeds at
    budget point j (fields: the learned_ keys, ``inner_steps``, ``train_seconds``);
    rate_objective: per learning rate, the selection objective (see the module docstring)."""

    arm: Arm
    best_rate_index: int
    runs: tuple[RunResult, ...]
    stats: tuple[dict[str, tuple[float, float, int]], ...]
    rate_objective: tuple[float, ...]

    @property
    def label(self) -> str:
        return self.arm.label

    @property
    def num_failed(self) -> int:
        return sum(r.status == "failed" for r in self.runs)


def summarize(compare: CompareConfig, runs: tuple[RunResult, ...]) -> list[ArmSummary]:
    """Per arm: its best rate's runs and their statistics per budget point."""
    p = compare.section.num_budget_points
    out = []
    for arm in compare.arms:
        by_rate = [[r for r in runs if r.spec.arm.label == arm.label and r.spec.rate_index == i]
                   for i in range(len(arm.learning_rates))]
        objective = []
        for rate_runs in by_rate:
            finals = [r.points[p]["learned_mean_batch_loss"] if r.points[p] else math.inf
                      for r in rate_runs]
            value = float(np.mean(finals))
            objective.append(value if math.isfinite(value) else math.inf)
        best = int(np.argmin(objective))
        chosen = tuple(by_rate[best])
        keys = [f"learned_{f}" for f, _ in FIELDS] + ["inner_steps", "train_seconds"]
        stats = tuple(
            {k: mean_sem([r.points[j][k] if r.points[j] else None for r in chosen]) for k in keys}
            for j in range(p + 1)
        )
        out.append(ArmSummary(arm, best, chosen, stats, tuple(objective)))
    return out


def adam_stats(runs: tuple[RunResult, ...], seeds: tuple[int, ...]
               ) -> dict[str, tuple[float, float, int]]:
    """Tuned Adam per field, mean and sem over the seeds (one value per seed: Adam depends on
    the seed's held-out keys only, so every arm's runs of one seed carry the same numbers)."""
    per_seed: dict[int, dict[str, float]] = {}
    for r in runs:
        for point in r.points:
            if point is not None and r.spec.seed not in per_seed:
                per_seed[r.spec.seed] = point
    fields = [f"adam_{f}" for f, _ in FIELDS] + ["adam_learning_rate"]
    return {k: mean_sem([per_seed[s][k] for s in seeds if s in per_seed]) for k in fields}


def best_at(summaries: list[ArmSummary], j: int) -> tuple[int | None, bool]:
    """(index of the lowest mean held-out meta-objective at budget point j, whether it beats
    the runner-up by more than 2 standard errors of the difference)."""
    key = "learned_mean_batch_loss"
    ranked = sorted((s.stats[j][key][0], i) for i, s in enumerate(summaries)
                    if math.isfinite(s.stats[j][key][0]))
    if not ranked:
        return None, False
    best = ranked[0][1]
    if len(ranked) < 2:
        return best, False
    (m1, s1, _), (m2, s2, _) = summaries[best].stats[j][key], summaries[ranked[1][1]].stats[j][key]
    se = math.sqrt(s1 ** 2 + s2 ** 2)
    return best, bool(math.isfinite(se) and m2 - m1 > 2 * se)


# ---------------------------------------------------------------------------------------------
# The report


def _pm(stat: tuple[float, float, int], digits: int = 4) -> str:
    mean, sem, _ = stat
    if not math.isfinite(mean):
        return "—"
    return f"{mean:.{digits}f}" + (f" ± {sem:.{digits}f}" if math.isfinite(sem) else "")


def write_report(out_dir: Path, compare: CompareConfig, runs: tuple[RunResult, ...]) -> Path:
    """results.csv, results.json, the PNGs and report.md; returns report.md's path."""
    p = compare.section.num_budget_points
    budget = compare.section.budget_inner_steps
    summaries = summarize(compare, runs)
    adam = adam_stats(runs, compare.seeds)
    _write_csv(out_dir / "results.csv", runs, p)
    write_json(out_dir / "results.json", {
        "budget_inner_steps": budget, "num_budget_points": p, "seeds": list(compare.seeds),
        "adam": adam,
        "arms": [{"label": s.label, "estimator": s.arm.estimator.name,
                  "learning_rates": list(s.arm.learning_rates),
                  "best_learning_rate": s.arm.learning_rates[s.best_rate_index],
                  "rate_objective": list(s.rate_objective), "num_failed": s.num_failed,
                  "stats": list(s.stats)} for s in summaries],
    })
    _plot_heldout(out_dir / "heldout_vs_inner_steps.png", summaries, adam, "inner_steps",
                  "inner steps (budget spent, summed over particles)")
    _plot_heldout(out_dir / "heldout_vs_seconds.png", summaries, adam, "train_seconds",
                  "training wall-clock seconds (held-out evaluation excluded)")
    _plot_meta_training(out_dir / "meta_training.png", summaries)
    curves = _plot_final_curves(out_dir / "heldout_curves.png", summaries)
    lines = _report_lines(compare, runs, summaries, adam, out_dir, curves)
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


def _report_lines(compare: CompareConfig, runs, summaries: list[ArmSummary], adam, out_dir,
                  curves: bool) -> list[str]:
    sec = compare.section
    p = sec.num_budget_points
    key = "learned_mean_batch_loss"
    seeds = ", ".join(str(s) for s in compare.seeds)
    cfg0 = summaries[0].arm.configs[0]
    lines = [
        "# Estimator comparison",
        "",
        f"- Budget: {sec.budget_inner_steps:,} inner steps per run (summed over particles), "
        f"held-out evaluation at {p} budget points; seeds {seeds} (the same for every arm).",
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
        arm_rows.append([s.label, f"`{est.name}` ({knobs})",
                         f"{compare.inner_steps_per_outer_step(s.arm):,}", f"{n_outer:,}", rates,
                         f"{s.num_failed}/{len(s.runs)}"])
    lines += [markdown_table(["arm", "estimator", "inner steps / outer step", "outer steps",
                              "meta-learning rate (* best)", "failed runs"], arm_rows), ""]
    # Main table: meta-objective per budget point.
    head = ["budget point", "inner steps"] + [s.label for s in summaries] + ["tuned Adam"]
    rows = []
    for j in range(1, p + 1):
        best, sig = best_at(summaries, j)
        cells = []
        for i, s in enumerate(summaries):
            text = _pm(s.stats[j][key])
            n = s.stats[j][key][2]
            if n < len(compare.seeds) and text != "—":
                text += f" ({n}/{len(compare.seeds)} seeds)"
            cells.append(f"**{text}**" if i == best and sig else text)
        rows.append([f"{j}/{p}", f"{sec.budget_inner_steps * j // p:,}", *cells,
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
    lines += ["## Recommendation", "", recommendation(compare, summaries, adam), ""]
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


def recommendation(compare: CompareConfig, summaries: list[ArmSummary], adam) -> str:
    """A short paragraph from the numbers: the winner at the final budget and whether it is
    beyond noise, how often each arm led, failures, the cheapest in wall-clock, Adam."""
    p = compare.section.num_budget_points
    key = "learned_mean_batch_loss"
    n_seeds = len(compare.seeds)
    out = []
    best, sig = best_at(summaries, p)
    if best is None:
        return "No arm reached the end of the budget: nothing to recommend."
    b = summaries[best]
    ranked = sorted((s for s in summaries if math.isfinite(s.stats[p][key][0])),
                    key=lambda s: s.stats[p][key][0])
    text = (f"At the full budget ({compare.section.budget_inner_steps:,} inner steps) "
            f"{b.label} reached the lowest held-out meta-objective ({_pm(b.stats[p][key])})")
    if len(ranked) > 1:
        ru = ranked[1]
        text += (f", {'beyond' if sig else 'within'} 2 standard errors of the runner-up "
                 f"{ru.label} ({_pm(ru.stats[p][key])})")
        if not sig:
            text += f": with {n_seeds} seed(s) the two are not distinguishable"
    out.append(text + ".")
    leads = {s.label: 0 for s in summaries}
    for j in range(1, p + 1):
        i, _ = best_at(summaries, j)
        if i is not None:
            leads[summaries[i].label] += 1
    out.append("Lowest at each budget point: " + ", ".join(
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
    return " ".join(out)


def _first_error(s: ArmSummary) -> str:
    for r in s.runs:
        if r.error:
            line = r.error.splitlines()[0]
            return line if len(line) <= 100 else line[:97] + "..."
    return "no error recorded"
