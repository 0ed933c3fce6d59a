"""Reports of a run: PNG plots and a summary.md with the final table (matplotlib, Agg backend).

Files written into the output directory:

* ``meta_training.png`` -- meta-loss per outer step (raw and running mean) and, from the
  periodic held-out evaluations, the learned optimizer's mean training loss vs tuned Adam's;
* ``heldout_curves.png`` -- held-out training curves (train loss, valid loss, valid accuracy vs
  inner step; mean over tasks x seeds, band = one standard error): learned optimizer at its
  initialization and after meta-training, and tuned Adam;
* ``heldout_curves.json`` -- the numbers behind that plot;
* ``summary.md`` -- the final table (mean +- standard error over tasks x seeds) and, for a
  meta-training run, the generalization table (``outer_train.generalization``);
* ``generalization.json`` -- the numbers behind that table.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from outer_train.evaluation import Curves, EvalResults
from outer_train.logging import read_records

_COLUMNS = (
    ("final_train_loss", "final train loss"),
    ("final_valid_loss", "final valid loss"),
    ("final_valid_accuracy", "final valid accuracy"),
    ("mean_batch_loss", "mean train-batch loss over the run"),
)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _rows(results: EvalResults) -> list[tuple[str, Curves]]:
    rows = []
    if results.learned_init is not None:
        rows.append(("learned optimizer, initial theta", results.learned_init))
    label = ("learned optimizer" if results.outer_step < 0
             else f"learned optimizer, outer step {results.outer_step}")
    rows.append((label, results.learned))
    rows.append((f"Adam, tuned lr = {results.adam.learning_rate:g}", results.adam.curves))
    return rows


def _fmt(mean: float, sem: float) -> str:
    if not math.isfinite(mean):
        return str(mean)
    if not math.isfinite(sem):
        return f"{mean:.4f}"
    return f"{mean:.4f} ± {sem:.4f}"


def results_table(results: EvalResults) -> str:
    """The final table as GitHub markdown."""
    head = "| optimizer | " + " | ".join(label for _, label in _COLUMNS) + " |"
    sep = "|---|" + "---:|" * len(_COLUMNS)
    lines = [head, sep]
    for name, curves in _rows(results):
        s = curves.summary()
        lines.append(f"| {name} | " + " | ".join(_fmt(*s[k]) for k, _ in _COLUMNS) + " |")
    return "\n".join(lines)


def adam_grid_table(results: EvalResults, objective: str) -> str:
    lines = [f"| Adam learning rate | {objective} |", "|---:|---:|"]
    for lr, value in zip(results.adam.grid, results.adam.grid_objective, strict=True):
        mark = " (chosen)" if lr == results.adam.learning_rate else ""
        lines.append(f"| {lr:g}{mark} | {value:.4f} |")
    return "\n".join(lines)


def plot_heldout_curves(results: EvalResults, path: str | Path, title: str = "") -> Path:
    """Train loss / valid loss / valid accuracy vs inner step (mean ± s.e. over tasks x seeds)."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    panels = (("train_loss", "train loss (whole split)"), ("valid_loss", "valid loss"),
              ("valid_accuracy", "valid accuracy"))
    for (name, curves), style in zip(_rows(results), ("C7--", "C0-", "C3-"), strict=False):
        for ax, (field, label) in zip(axes, panels, strict=True):
            values = np.asarray(getattr(curves, field), np.float64)
            values = values.reshape(-1, values.shape[-1])
            mean = values.mean(axis=0)
            sem = (values.std(axis=0, ddof=1) / math.sqrt(values.shape[0])
                   if values.shape[0] > 1 else np.zeros_like(mean))
            ax.plot(curves.step, mean, style, label=name)
            ax.fill_between(curves.step, mean - sem, mean + sem, color=style[:2], alpha=0.2)
            ax.set_xlabel("inner step")
            ax.set_ylabel(label)
    axes[0].set_yscale("log")
    axes[1].set_yscale("log")
    axes[0].legend(fontsize=8)
    tasks = ", ".join(results.task_names)
    fig.suptitle(title or f"held-out training ({tasks}; {results.num_seeds} seeds each)")
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_meta_training(metrics_path: str | Path, path: str | Path) -> Path:
    """Meta-loss vs outer step and the held-out evaluations over meta-training."""
    plt = _pyplot()
    train = list(read_records(metrics_path, kind="train"))
    evals = list(read_records(metrics_path, kind="eval"))
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.2))
    ax = axes[0]
    if train:
        steps = np.array([r["outer_step"] for r in train])
        loss = np.array([r["meta_loss"] for r in train], np.float64)
        ax.plot(steps, loss, "C0.", ms=3, alpha=0.5, label="meta-loss (logged steps)")
        if len(loss) >= 5:
            w = max(len(loss) // 20, 2)
            ax.plot(steps[w - 1:], np.convolve(loss, np.ones(w) / w, "valid"), "C0-",
                    label=f"running mean ({w} points)")
        skipped = [r["outer_step"] for r in train if r.get("skipped")]
        if skipped:
            ax.plot(skipped, np.full(len(skipped), np.nanmax(loss)), "rx",
                    label="skipped update (non-finite meta-gradient)")
    ax.set_xlabel("outer step")
    ax.set_ylabel("meta-loss (window mean)")
    ax.set_title("meta-training")
    ax.legend(fontsize=8)
    ax = axes[1]
    if evals:
        steps = np.array([r["outer_step"] for r in evals])
        for prefix, style, label in (("learned", "C0o-", "learned optimizer"),
                                     ("adam", "C3--", "tuned Adam")):
            mean = np.array([r[f"{prefix}_mean_batch_loss"] for r in evals], np.float64)
            sem = np.array([r[f"{prefix}_mean_batch_loss_sem"] for r in evals], np.float64)
            ax.errorbar(steps, mean, yerr=np.nan_to_num(sem), fmt=style, label=label,
                        capsize=3)
    ax.set_xlabel("outer step")
    ax.set_ylabel("held-out mean train-batch loss over the run")
    ax.set_title("held-out evaluation")
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_curves_json(results: EvalResults, path: str | Path) -> Path:
    data = {
        "outer_step": results.outer_step,
        "num_steps": results.num_steps,
        "task_names": list(results.task_names),
        "num_seeds": results.num_seeds,
        "adam_learning_rate": results.adam.learning_rate,
        "adam_grid": list(results.adam.grid),
        "adam_grid_objective": list(results.adam.grid_objective),
        "learned": results.learned.to_json(),
        "learned_init": None if results.learned_init is None else results.learned_init.to_json(),
        "adam": results.adam.curves.to_json(),
    }
    path = Path(path)
    path.write_text(json.dumps(data))
    return path


def _train_stats(metrics_path: Path) -> dict[str, Any]:
    train = list(read_records(metrics_path, kind="train")) if metrics_path.exists() else []
    if not train:
        return {}
    last = train[-1]
    speeds = [r["inner_steps_per_second"] for r in train if "inner_steps_per_second" in r]
    return {
        "outer_steps": last["outer_step"],
        "skipped": last.get("num_skipped", 0),
        "last_meta_loss": last.get("meta_loss"),
        "inner_steps_per_second": float(np.median(speeds)) if speeds else float("nan"),
    }


def write_meta_train_report(out_dir: str | Path, config, results: EvalResults, *,
                            resumed_from: int | None = None,
                            generalization: dict[str, Any] | None = None) -> Path:
    """Plots, curves JSON and summary.md of a finished meta-training run; returns summary.md.

    ``generalization``: the run's document from ``outer_train.generalization.evaluate_run``
    (None: none made), written to generalization.json and as summary.md's generalization
    section."""
    from outer_train.config import to_toml

    out_dir = Path(out_dir)
    metrics = out_dir / "metrics.jsonl"
    plot_meta_training(metrics, out_dir / "meta_training.png")
    plot_heldout_curves(results, out_dir / "heldout_curves.png")
    write_curves_json(results, out_dir / "heldout_curves.json")
    stats = _train_stats(metrics)
    est = config.estimator
    objective = ("mean train-batch loss" if config.problem.meta_loss == "train"
                 else "mean valid loss")
    lines = [
        "# Meta-training summary",
        "",
        f"- Estimator `{est.name}` ({', '.join(f'{k}={v}' for k, v in est.knobs().items())}),"
        f" learned optimizer `{config.lopt.name}`, meta-optimizer `{config.meta_opt.name}` "
        f"lr {config.meta_opt.learning_rate:g} (clip {config.meta_opt.clip_norm:g}),"
        f" seed {config.run.seed}.",
        f"- Outer steps: {stats.get('outer_steps', '?')}; skipped updates (non-finite "
        f"meta-gradient): {stats.get('skipped', '?')}; median inner steps/s: "
        f"{stats.get('inner_steps_per_second', float('nan')):,.0f}."
        + (f" Resumed from outer step {resumed_from}." if resumed_from is not None else ""),
        f"- Held-out evaluation: {', '.join(results.task_names)}; {results.num_seeds} seeds "
        f"never used in meta-training; {results.num_steps} inner steps (meta-training "
        f"horizon {est.horizon}).",
        f"- Adam's learning rate tuned on the same held-out tasks and seeds by {objective} "
        "(this favours Adam).",
        "",
        *_results_sections(results, objective, "Held-out results"),
        *_generalization_section(out_dir, generalization),
        "![meta-training](meta_training.png)",
        "",
        "![held-out curves](heldout_curves.png)",
        "",
        "## Config",
        "",
        "```toml",
        to_toml(config).strip(),
        "```",
        "",
    ]
    path = out_dir / "summary.md"
    path.write_text("\n".join(lines))
    return path


def _generalization_section(out_dir: Path, doc: dict[str, Any] | None) -> list[str]:
    """Writes generalization.json (atomically) and returns its summary.md section; [] and no
    file without ``doc``."""
    from learned_opt.zoo import heldout_table
    from outer_train import generalization, run_dir

    if doc is None:
        return []
    run_dir.write_text(out_dir / generalization.FILE, json.dumps(doc, indent=1) + "\n")
    grid = ", ".join(f"{lr:g}" for lr in doc["adam_learning_rates"])
    return [
        "## Generalization (against Adam tuned per row)",
        "",
        f"Past the trained setting: the held-out tasks at multiples of the trained horizon T = "
        f"{doc['horizon']} inner steps, and other tasks at T; {doc['num_seeds']} held-out seeds "
        "per task, never used in meta-training (mean ± standard error over tasks x seeds). "
        f"Adam's learning rate is tuned per row over {{{grid}}} by the {doc['objective']} on "
        "that row's own runs (this favours Adam). Verdicts compare the paired differences "
        "over common seeds with 2 standard errors. A verdict of \"diverged\" means the learned "
        "optimizer blows up past its horizon (or on that task): some run's loss is non-finite "
        f"or above {generalization.DIVERGENCE_FACTOR:g}x its step-0 loss. The numbers: "
        f"`{generalization.FILE}`.",
        "",
        heldout_table(doc["rows"]),
        "",
    ]


def _results_sections(results: EvalResults, objective: str, title: str) -> list[str]:
    """The results table and Adam's learning-rate grid, as markdown lines."""
    return [
        f"## {title} (mean ± standard error over tasks x seeds)",
        "",
        results_table(results),
        "",
        "## Adam learning-rate grid",
        "",
        adam_grid_table(results, objective),
        "",
    ]


def write_eval_report(out_dir: str | Path, results: EvalResults, *, optimizer_file: str,
                      objective: str, extra_lines: Sequence[str] = ()) -> Path:
    """Curves, plot and summary.md of ``learned-opt eval``; returns summary.md."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    plot_heldout_curves(results, out_dir / "heldout_curves.png")
    write_curves_json(results, out_dir / "heldout_curves.json")
    lines = [
        "# Evaluation summary",
        "",
        f"- Learned optimizer: `{optimizer_file}`.",
        f"- Tasks: {', '.join(results.task_names)}; {results.num_seeds} seeds; "
        f"{results.num_steps} inner steps.",
        *extra_lines,
        "",
        *_results_sections(results, objective, "Results"),
        "![curves](heldout_curves.png)",
        "",
    ]
    path = out_dir / "summary.md"
    path.write_text("\n".join(lines))
    return path
