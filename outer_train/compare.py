"""``learned-opt compare``: several outer estimators ("arms") on one meta-training job, at an
equal budget, and a report of which one meta-trains best.

Layout of the output directory (every run is a normal ``meta_train`` run directory)::

    <out>/compare.json                  the comparison's config (base sections + [compare])
    <out>/budget_plan.json              budget = "seconds": each arm's measured s / outer step
    <out>/<label>/calibration/          ... the throwaway run that measured it
    <out>/<label>/seed<k>/              one run: arm <label>, run.seed = k (one learning rate)
    <out>/<label>/lr<rate>/seed<k>/     ... with a learning-rate grid (one run per rate)
    <out>/<run>/compare_status.json     "finished" or "failed" (+ error), wall seconds, config
    <out>/<run>/estimator_stats.json    the arm's estimator statistics (``compare_stats``)
    <out>/report.md, results.csv, results.json, *.png     (``compare_report``)

Runs go one after another (each already uses every device). A run counts as done when its
status file says finished or failed for exactly its config and, when finished, its
metrics.jsonl holds the final held-out evaluation; ``resume`` skips done runs and continues
any other from its newest checkpoint (``meta_train(resume=True)``). A run that raises (a
divergence ``UserError``, any other exception) is recorded as failed and the others go on;
KeyboardInterrupt stops the comparison (resume continues it). Failed runs are not retried on
resume (meta-training is deterministic): delete the run's directory to retry it.

A seconds budget S is made an outer-step count per arm before any run (``calibrate``): the
arm's first config (first rate, first seed) runs one compiling outer step and
``calibration_steps`` timed ones; with t their median seconds, the arm gets
N = P floor(floor(S / t) / P) outer steps. The plan is saved and reused on resume, so every
run stays a deterministic meta-training run; the report gives the planned and the measured
training seconds.

In a group of processes (``outer_train.distributed``) every process runs every run (each a
``meta_train`` of the group) and the statistics; process 0 alone claims the folder and writes
every file, and whatever is read from the folder -- which runs are done or continue from a
checkpoint, the saved budget plan and the calibrated seconds, the statistics' cache and final
thetas -- is process 0's, handed to the others (``distributed.from_writer``), so that every
process runs the same runs. A run that fails with a ``UserError`` (a divergence: the same in
every process) is recorded as failed; any other error ends the comparison in a group, since the
processes may no longer be at the same point (``--resume`` continues it).
"""

from __future__ import annotations

import contextlib
import dataclasses
import shutil
import statistics
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

from learned_opt.errors import UserError
from outer_train import compare_report, compare_stats, distributed, run_dir
from outer_train.compare_results import (
    STATUS_FILE,
    RunResult,
    RunSpec,
    collect_run,
    read_status,
    summarize,
)
from outer_train.config import MetaTrainConfig
from outer_train.config.compare import CompareConfig
from outer_train.diagnostics.outputs import read_json, write_json
from outer_train.logging import read_records
from outer_train.meta_train import meta_train
from outer_train.runtime.machine import describe

CONFIG_FILE = "compare.json"
PLAN_FILE = "budget_plan.json"


@dataclasses.dataclass(frozen=True)
class CompareResult:
    """runs and report_path: () and None in a group's other processes (process 0 writes)."""

    out_dir: Path
    runs: tuple[RunResult, ...]
    report_path: Path | None


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
    """Runs every arm x rate x seed (skipping done runs with ``resume``), measures the arms'
    estimator statistics, then writes the report, holding ``out_dir`` (``run_dir.claim``).
    Raises ``UserError`` for an output directory holding another comparison without
    ``resume``, or one that another live process holds. In a group of processes every process
    calls it alike; only process 0 writes and logs."""
    del base  # every run's config is complete in ``compare``
    out_dir = Path(out_dir)
    writer = distributed.is_writer()
    if not writer:  # computes only: process 0 writes, logs and shows progress
        log, progress = (lambda _: None), False
    held = writer and not resume and (
        (out_dir / CONFIG_FILE).exists()
        or any((out_dir / arm.label).exists() for arm in compare.arms))
    if distributed.from_writer(held):
        raise UserError(f"{out_dir} already holds a comparison; pass --resume to continue it "
                        "(finished runs are skipped), or choose another --out")
    # one comparison per folder (its runs lock theirs)
    claim = run_dir.claim(out_dir, log=log) if writer else contextlib.nullcontext()
    with claim:
        return _run_all(compare, out_dir, raw_config, progress=progress, log=log)


def _run_all(compare: CompareConfig, out_dir: Path, raw_config: dict[str, Any] | None, *,
             progress: bool, log: Callable[[str], None]) -> CompareResult:
    writer = distributed.is_writer()
    if writer:
        write_json(out_dir / CONFIG_FILE, raw_config or {})
    plan = None
    if compare.section.budget == "seconds":
        compare, plan = calibrate(compare, out_dir, log=log)
    specs = run_specs(compare, out_dir)
    for i, spec in enumerate(specs, 1):
        name = spec.directory.relative_to(out_dir)
        # process 0's folder decides for every process
        done, resume = distributed.from_writer(
            (_done_status(spec), (spec.directory / "checkpoints").exists()) if writer else None)
        if done is not None:
            log(f"[{i}/{len(specs)}] {name}: {done['status']} earlier, skipped")
            continue
        log(f"[{i}/{len(specs)}] {name}: {spec.config.run.num_outer_steps} outer steps "
            f"x {compare.inner_steps_per_outer_step(spec.arm)} inner steps")
        _run_one(spec, resume=resume, progress=progress, log=log)
    if not writer:
        compare_stats.measure(compare, None, log=log)  # computed with process 0
        return CompareResult(out_dir, (), None)
    runs = tuple(collect_run(s, compare.section.num_budget_points) for s in specs)
    stats = compare_stats.measure(compare, summarize(compare, runs), log=log)
    report = compare_report.write_report(out_dir, compare, runs, stats, plan)
    return CompareResult(out_dir, runs, report)


def calibrate(compare: CompareConfig, out_dir: Path, *, log: Callable[[str], None] = print
              ) -> tuple[CompareConfig, dict[str, Any]]:
    """(the comparison with each arm's measured seconds per outer step, the plan) for a
    seconds budget (module docstring); a saved plan for the same arms is reused. Raises
    ``UserError`` when an arm's outer step is too slow for one step per budget point. In a
    group, process 0's saved plan and measured seconds are every process's."""
    sec = compare.section
    writer = distributed.is_writer()
    saved = distributed.from_writer(read_json(out_dir / PLAN_FILE) if writer else None)
    arms = saved.get("arms", {}) if saved.get("calibration_steps") == sec.calibration_steps else {}
    machine = saved.get("machine") if arms else None
    for arm in compare.arms:
        probe = _probe_config(compare, arm)
        entry = arms.get(arm.label)
        if entry is not None and entry.get("config") == probe.to_dict():
            continue
        log(f"calibrating {arm.label}: 1 + {sec.calibration_steps} timed outer steps")
        directory = out_dir / arm.label / "calibration"
        if writer:
            shutil.rmtree(directory, ignore_errors=True)  # a killed calibration starts over
        distributed.barrier()  # the others look into the folder once it is cleared
        meta_train(probe, directory, evaluate=False, progress=False, log=lambda _: None)
        seconds = distributed.from_writer(_median_step_seconds(directory) if writer else None)
        arms[arm.label] = {"seconds_per_outer_step": seconds, "config": probe.to_dict()}
        machine = describe()
        if writer:  # saved after each arm: a killed calibration re-measures the others only
            write_json(out_dir / PLAN_FILE, _plan(sec, machine, arms))
    plan = _plan(sec, machine, arms)
    compare = dataclasses.replace(compare, step_seconds={
        arm.label: arms[arm.label]["seconds_per_outer_step"] for arm in compare.arms})
    p = sec.num_budget_points
    for i, arm in enumerate(compare.arms):
        t = compare.step_seconds[arm.label]
        if compare.num_outer_steps(arm) < p:
            raise UserError(
                f"compare.arms[{i}] ({arm.label!r}): one outer step takes {t:.3g} s here, so "
                f"compare.budget_seconds = {sec.budget_seconds:g} gives fewer than "
                f"compare.num_budget_points = {p} outer steps: raise the budget to at least "
                f"{t * p:.3g} or lower num_budget_points"
            )
    return compare, plan


def _median_step_seconds(directory: Path) -> float:
    """The median step seconds of a calibration run's timed steps (step 1 compiles)."""
    records = [r for r in read_records(directory / "metrics.jsonl", "train")
               if r["outer_step"] > 1]
    return statistics.median(r["step_seconds"] for r in records)


def _plan(sec, machine: Any, arms: dict[str, Any]) -> dict[str, Any]:
    return {"budget_seconds": sec.budget_seconds, "calibration_steps": sec.calibration_steps,
            "machine": machine, "arms": arms}


def _probe_config(compare: CompareConfig, arm) -> MetaTrainConfig:
    """The arm's first config, run for 1 + calibration_steps outer steps, logging each."""
    config = arm.configs[0]
    return dataclasses.replace(
        config,
        run=dataclasses.replace(config.run, seed=compare.seeds[0],
                                num_outer_steps=1 + compare.section.calibration_steps,
                                log_every=1),
    )


def _run_one(spec: RunSpec, *, resume: bool, progress: bool,
             log: Callable[[str], None]) -> None:
    """One run (``resume``: continued from its checkpoint); its status file after."""
    status = read_status(spec.directory)
    earlier = status.get("seconds", 0.0) if status.get("config") == spec.config.to_dict() else 0.0
    t0 = time.perf_counter()
    try:
        result = meta_train(spec.config, spec.directory, resume=resume, progress=progress,
                            log=log)
    except KeyboardInterrupt:
        raise
    except Exception as e:  # recorded; the other runs go on
        if distributed.process_count() > 1 and not isinstance(e, UserError):
            raise  # maybe this process's alone: the others may be elsewhere in the run
        seconds = earlier + time.perf_counter() - t0
        kind = "" if isinstance(e, UserError) else f"{type(e).__name__}: "
        _write_status(spec, "failed", seconds, f"{kind}{e}",
                      "" if isinstance(e, UserError) else traceback.format_exc())
        log(f"  failed: {kind}{e}")
        return
    if int(result.state.outer_step) < spec.config.run.num_outer_steps:
        return  # stopped early (meta_train's stop_after): not done, resume continues it
    _write_status(spec, "finished", earlier + time.perf_counter() - t0)


def _write_status(spec: RunSpec, status: str, seconds: float, error: str = "",
                  trace: str = "") -> None:
    if not distributed.is_writer():
        return
    write_json(spec.directory / STATUS_FILE, {
        "status": status, "seconds": seconds, "error": error, "traceback": trace,
        "config": spec.config.to_dict(),
    })


def _done_status(spec: RunSpec) -> dict[str, Any] | None:
    """The status of a run that needs no more work, else None (see the module docstring)."""
    status = read_status(spec.directory)
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
