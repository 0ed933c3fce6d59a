"""The numbers of a comparison (``outer_train.compare``), read back from its run directories.

Per run, from its metrics.jsonl: at budget point j (outer step n_j = j N / P) the held-out
meta-objective ``learned_mean_batch_loss`` (mean training-batch loss over the held-out
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
import math
from pathlib import Path
from typing import Any

import numpy as np

from outer_train.config import MetaTrainConfig
from outer_train.config.compare import Arm, CompareConfig
from outer_train.diagnostics.outputs import read_json
from outer_train.logging import read_records

STATUS_FILE = "compare_status.json"
# (metrics.jsonl eval key, report name) of the numbers reported per budget point.
FIELDS = (
    ("mean_batch_loss", "held-out meta-objective"),
    ("valid_loss", "final valid loss"),
    ("valid_accuracy", "final valid accuracy"),
)
OBJECTIVE = "learned_mean_batch_loss"


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


def read_status(directory: Path) -> dict[str, Any]:
    """A run's status file (``outer_train.compare``), {} when it has none."""
    return read_json(directory / STATUS_FILE)


def collect_run(spec: RunSpec, num_points: int) -> RunResult:
    """The run's numbers at every budget point, from its metrics.jsonl and status file."""
    status = read_status(spec.directory)
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


def best_at(summaries: list[ArmSummary], j: int, key: str = OBJECTIVE, *,
            higher: bool = False) -> tuple[int | None, bool]:
    """(index of the best mean of ``key`` at budget point j -- the lowest, or the highest with
    ``higher`` --, whether it beats the runner-up by more than 2 standard errors of the
    difference)."""
    sign = -1.0 if higher else 1.0
    ranked = sorted((sign * s.stats[j][key][0], i) for i, s in enumerate(summaries)
                    if math.isfinite(s.stats[j][key][0]))
    if not ranked:
        return None, False
    best = ranked[0][1]
    if len(ranked) < 2:
        return best, False
    (m1, s1, _), (m2, s2, _) = summaries[best].stats[j][key], summaries[ranked[1][1]].stats[j][key]
    se = math.sqrt(s1 ** 2 + s2 ** 2)
    return best, bool(math.isfinite(se) and sign * (m2 - m1) > 2 * se)
