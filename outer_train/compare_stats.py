"""The estimator statistics of a comparison: each arm's own estimator, with its knobs, measured
by the variance tool (``diagnostics.variance.run_variance``) at the arm's final theta.

Per arm, at the final ``.lopt`` of its first finished seed at its best learning rate, the
study of ``CompareConfig.stats_section(arm)``: ``stats_num_draws`` fresh draws, each the mean
of the arm's estimates over one episode of T inner steps (W = T / K windows for windowed
estimators) with ``stats_num_tasks`` particles, against the mean of ``stats_reference_draws``
fresh draws of ``stats_reference`` at the same theta. So every arm is measured on the same
target, the gradient of L_T at its own theta, and the numbers say how noisy (normalized
variance, an MSE over ||g_ref||^2) and how aligned (cosine to the reference) the meta-gradient
its meta-optimizer received was at the end. A meta-training step of the arm averages
``num_tasks`` particles of one window, so its variance is that of a draw scaled by the
particle count and window count; the report gives the cost of both.

Results are cached in ``<run>/estimator_stats.json`` with the study's settings, so a resumed
comparison does not measure twice. The compiled reference program is shared by the arms.

In a group of processes (``outer_train.distributed``) process 0 reads the runs, the caches and
the final thetas and hands them to the others (``distributed.from_writer``); every process
measures the arms to measure (the draws split over all their devices) and process 0 writes the
caches.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

from learned_opt.errors import UserError
from outer_train import distributed
from outer_train.compare_results import ArmSummary
from outer_train.config.compare import CompareConfig
from outer_train.diagnostics import outputs
from outer_train.meta_train import OPTIMIZER_FILE

STATS_FILE = "estimator_stats.json"


class ArmStats(NamedTuple):
    """One arm's measurement. row: ``variance_report.row`` of it (normalized_variance,
    cosine, ... see ``variance_report.COLUMNS``), None when not measured; reference: its
    ``variance_report.reference_summary``; reason: why not measured ("" when measured)."""

    label: str
    seed: int | None
    row: dict[str, Any] | None
    reference: dict[str, Any] | None
    seconds: float
    reason: str = ""


class _Target(NamedTuple):
    """An arm to measure: at the final theta of its run ``seed`` in ``directory``."""

    label: str
    seed: int
    config: Any  # the run's MetaTrainConfig
    section: Any  # its VarianceConfig (``CompareConfig.stats_section``)
    directory: Path


def measure(compare: CompareConfig, summaries: list[ArmSummary] | None, *,
            log: Callable[[str], None] = print) -> list[ArmStats]:
    """The statistics of every arm (module docstring); cached per run directory. In a group of
    processes every process calls it alike, the others with ``summaries`` None (process 0's are
    used)."""
    if not compare.section.estimator_stats:
        return []
    writer = distributed.is_writer()
    plan = distributed.from_writer(_plan(compare, summaries) if writer else None)
    shared: dict[str, Any] = {}  # one problem and one cache of compiled programs for all arms
    out = []
    for item in plan:
        if isinstance(item, ArmStats):  # cached or not measured
            out.append(item)
            continue
        log(f"estimator statistics of {item.label} at its final theta ({item.directory})")
        stats = _measure_one(item.config, item.section, item.directory / OPTIMIZER_FILE, shared)
        if writer:
            outputs.write_json(item.directory / STATS_FILE, {
                "settings": dataclasses.asdict(item.section), "seed": item.seed,
                "measurement": stats.row, "reference": stats.reference,
                "seconds": stats.seconds})
        out.append(stats._replace(label=item.label, seed=item.seed))
    return out


def _plan(compare: CompareConfig, summaries: list[ArmSummary]) -> list[ArmStats | _Target]:
    """Per arm, from the run directories: its statistics (cached, or why not measured) or the
    run to measure."""
    first = summaries[0].arm.configs[0]
    if first.task.kind != "single":
        return [ArmStats(s.label, None, None, None, math.nan,
                         "not measured: the variance tool looks at one task, this comparison "
                         "meta-trains a family") for s in summaries]
    plan: list[ArmStats | _Target] = []
    for s in summaries:
        run = next((r for r in s.runs if r.status == "finished"
                    and (r.spec.directory / OPTIMIZER_FILE).exists()), None)
        if run is None:
            plan.append(ArmStats(s.label, None, None, None, math.nan,
                                 "not measured: no seed finished"))
            continue
        section = compare.stats_section(s.arm)
        cached = outputs.read_json(run.spec.directory / STATS_FILE)
        if cached.get("settings") == json.loads(json.dumps(dataclasses.asdict(section))):
            plan.append(ArmStats(s.label, run.spec.seed, cached["measurement"],
                                 cached["reference"], cached["seconds"]))
            continue
        plan.append(_Target(s.label, run.spec.seed, run.spec.config, section,
                            run.spec.directory))
    return plan


def _read_optimizer(path: Path):
    """(learned optimizer, theta) of a ``.lopt`` file, or the ``UserError`` reading it."""
    from learned_opt import io

    try:
        loaded = io.load(path)
    except UserError as e:
        return e
    return loaded.optimizer, loaded.theta


def _measure_one(config, section, optimizer_path: Path, shared: dict[str, Any]) -> ArmStats:
    from outer_train.diagnostics.job import make_job
    from outer_train.diagnostics.variance import DrawPrograms, run_variance
    from outer_train.diagnostics.variance_report import reference_summary, row

    t0 = time.perf_counter()
    # process 0 reads the file (the others' disks may not hold it); every process raises alike
    read = distributed.from_writer(
        _read_optimizer(optimizer_path) if distributed.is_writer() else None)
    if isinstance(read, UserError):
        raise read
    lopt, theta = read
    if "job" not in shared:
        source = f"file {optimizer_path} ({type(lopt).__name__}; [lopt] not used)"
        shared["job"] = make_job("compare", config, section, lopt, theta, source)
        shared["programs"] = DrawPrograms(shared["job"].problem, shared["job"].mesh)
    job = shared["job"]
    if type(lopt) is not type(job.lopt):
        raise UserError(f"{optimizer_path}: a {type(lopt).__name__}, the other arms "
                        f"trained a {type(job.lopt).__name__}")
    result = run_variance(job.problem, theta, None, section, mesh=job.mesh,
                          programs=shared["programs"])
    m, ref = result.measurements[0], result.references[0]
    return ArmStats("", None, outputs.jsonable(row(m)), outputs.jsonable(reference_summary(ref)),
                    time.perf_counter() - t0)
