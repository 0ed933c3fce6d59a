"""The meta-training run: loop jitted outer steps, checkpoint, evaluate on held-out tasks, and
write the trained optimizer, metrics, plots and summary. Building the run from its config is
``outer_train.build``; splitting the particles over devices is ``outer_train.placement``.

One outer step (``outer_step``; jitted once, estimators passed as arguments)::

    key_v          = split(fold_in(outer_key, n), V)[v]          # n = outer step: replayable
    g_e, s_e', m_e = estimator_e.estimate(key_v of e, theta, s_e)  # one per estimator e
    g              = sum_e V_e g_e / sum_e V_e                   # equal weights per variant
    if all(isfinite(g)):  theta, opt_state <- meta_opt(g);  s_e <- s_e'
    else:                 theta, opt_state, s_e unchanged; num_skipped += 1   # logged, not zeroed

An estimator serves one training variant (V_e = 1), or V_e variants padded to one shape and run
as one (``variant_stack.StackedEstimator``, ``family.compile = "once"``; g_e is their mean).

Because every key is a function of (seed, outer step) (``build.RunKeys``) and the whole state --
theta, meta-optimizer state, every estimator state (particle inner states, PES accumulators) and
the counters -- is one ``MetaTrainState`` pytree that the checkpoint stores bit for bit, a
resumed run ends with exactly the theta of an uninterrupted one.

In a group of processes (``outer_train.distributed``) every process runs this loop on its share
of the particles and computes the same update; only process 0 (``distributed.is_writer``)
claims the folder and writes files, and a checkpoint gathers the whole state there
(``placement.to_host``), so a run resumes with any number of processes (the particles are
split anew).

A run owns its output folder while it lasts (``run_dir.claim``: one process at a time, leftovers
of a killed run removed). SIGINT and SIGTERM stop it between outer steps with a checkpoint of the
last completed one (``interrupt``): ``meta_train`` then raises ``interrupt.Interrupted``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import jax
import jax.numpy as jnp
import optax

from learned_opt.errors import UserError
from outer_train import checkpoint, distributed, run_dir
from outer_train.build import MetaTrainSetup, MetaTrainState, build, init_state
from outer_train.config import MetaTrainConfig, to_toml
from outer_train.in_flight import InFlight
from outer_train.interrupt import Interrupted, StopRequest, stop_signals
from outer_train.logging import MetricsLogger, NullLogger, truncate_after
from outer_train.meta_loss import all_finite
from outer_train.placement import mesh_scope, particle_mesh, place, shard_particles, to_host
from outer_train.variant_stack import StackedEstimator, num_variants, variant_keys

if TYPE_CHECKING:
    from outer_train.evaluation import EvalResults, HeldoutEvaluator

OPTIMIZER_FILE = "learned_optimizer.lopt"  # learned_opt.save format (a zip of .npy + JSON)
_STOP_NOTICE = ("stopping after the current outer step, with a checkpoint; a second signal "
                "stops at once, without one")


def outer_step(
    meta_opt: optax.GradientTransformation,
    estimators: tuple[Any, ...],
    state: MetaTrainState,
    outer_key: jax.Array,
) -> tuple[MetaTrainState, dict[str, jax.Array]]:
    """One outer step (see the module docstring); pure. Returns (state, metrics)."""
    step_key = jax.random.fold_in(outer_key, state.outer_step)
    est_keys = variant_keys(step_key, estimators)
    grads, new_est_states, est_metrics = [], [], []
    for est, key, est_state in zip(estimators, est_keys, state.estimator_states, strict=True):
        g, s, m = est.estimate(key, state.theta, est_state)
        grads.append(g)
        new_est_states.append(s)
        est_metrics.append(m)
    weights = [num_variants(est) for est in estimators]

    def variant_mean(values):
        return sum(w * v for w, v in zip(weights, values, strict=True)) / sum(weights)

    if all(w == 1 for w in weights):  # the unweighted sums: per-variant runs stay bit for bit
        meta_grad = jax.tree.map(lambda *gs: sum(gs) / len(gs), *grads)
        meta_loss = jnp.mean(jnp.stack([m["meta_loss"] for m in est_metrics]))
    else:
        meta_grad = jax.tree.map(lambda *gs: variant_mean(gs), *grads)
        meta_loss = variant_mean([m["meta_loss"] for m in est_metrics])
    finite = all_finite(meta_grad)
    updates, new_opt_state = meta_opt.update(meta_grad, state.opt_state, state.theta)
    new_theta = optax.apply_updates(state.theta, updates)

    def take(new, old):  # lax.cond: also selects PRNG-key leaves, which jnp.where cannot
        return jax.lax.cond(finite, lambda: new, lambda: old)

    skipped = (~finite).astype(jnp.int32)
    new_state = MetaTrainState(
        theta=take(new_theta, state.theta),
        opt_state=take(new_opt_state, state.opt_state),
        estimator_states=take(tuple(new_est_states), state.estimator_states),
        outer_step=state.outer_step + 1,
        num_skipped=state.num_skipped + skipped,
        skipped_in_a_row=(state.skipped_in_a_row + 1) * skipped,
    )
    metrics = {
        "meta_loss": meta_loss,
        "num_nonfinite": sum(m["num_nonfinite"] for m in est_metrics),
        "num_resets": sum(m["num_resets"] for m in est_metrics),
        "meta_grad_norm": optax.tree.norm(meta_grad),
        "update_norm": jnp.where(finite, optax.tree.norm(updates), 0.0),
        "theta_norm": optax.tree.norm(new_state.theta),
        "skipped": ~finite,
        "num_skipped": new_state.num_skipped,
    }
    return new_state, metrics


@functools.lru_cache(maxsize=16)
def make_outer_step(meta_opt: optax.GradientTransformation) -> Callable:
    """``jit(outer_step)`` for one meta-optimizer: ``fn(estimators, state, outer_key)``.

    Estimators (and the task data inside them) are jit arguments, never baked-in constants;
    cached per meta-optimizer object, so runs of the same config in one process (a resume,
    tests) compile once.
    """

    def fn(estimators, state, outer_key):
        return outer_step(meta_opt, estimators, state, outer_key)

    return jax.jit(fn)


# ---------------------------------------------------------------------------------------------
# The run


@dataclasses.dataclass(frozen=True)
class MetaTrainResult:
    """What ``meta_train`` leaves: the final state and the files in ``out_dir``."""

    state: MetaTrainState
    out_dir: Path
    optimizer_path: Path
    summary_path: Path | None
    resumed_from: int | None


@dataclasses.dataclass(frozen=True)
class _LoopContext:
    """What the outer loop reads and never changes.

    step_fn: ``make_outer_step(setup.meta_opt)``. estimators, outer_key: placed on the devices
    (``placement.place``). num_steps: the loop ends once this many outer steps are done.
    evaluator: None without held-out evaluation.
    """

    setup: MetaTrainSetup
    step_fn: Callable
    estimators: tuple[Any, ...]
    outer_key: jax.Array
    num_steps: int
    logger: MetricsLogger | NullLogger
    ckpt_dir: Path
    config_hash: str
    evaluator: HeldoutEvaluator | None
    stop: StopRequest


def meta_train(
    config: MetaTrainConfig,
    out_dir: str | Path,
    *,
    resume: bool = False,
    progress: bool = True,
    evaluate: bool = True,
    stop_after: int | None = None,
    log: Callable[[str], None] = print,
) -> MetaTrainResult:
    """Runs (or with ``resume``, continues) the meta-training job of ``config`` in ``out_dir``.

    ``stop_after``: stop (after checkpointing) once this many outer steps are done, as if the
    process had been killed there -- for tests of resumption. ``evaluate=False`` skips held-out
    evaluation, plots and summary (tests of the training loop alone).
    Raises ``UserError`` for an out directory that cannot be used, is in use by another process
    or holds another run (without ``resume``), and when ``run.max_skipped_in_a_row``
    consecutive meta-gradients are non-finite; ``Interrupted`` after SIGINT / SIGTERM.
    In a group of processes, every process calls it alike; only process 0 writes and logs.
    """
    out_dir = Path(out_dir)
    mesh = particle_mesh(config.run.devices)  # a bad device count fails before any compute
    if not distributed.is_writer():  # computes only: process 0 writes, logs and shows progress
        log, progress = (lambda _: None), False
    leftovers = (f"checkpoints/{checkpoint.TEMP_PATTERN}",)
    claim = (run_dir.claim(out_dir, leftovers=leftovers, log=log) if distributed.is_writer()
             else contextlib.nullcontext())
    with claim, stop_signals(_STOP_NOTICE) as stop:
        _refuse_another_run(out_dir, out_dir / "checkpoints", resume=resume)
        if resume:  # what the files alone show fails before any compute
            checkpoint.check_restorable(
                out_dir / "checkpoints", config_hash=config.trajectory_hash(),
                explain=lambda extra: _config_changes(config, extra),
            )
        return _run(config, out_dir, mesh, stop, resume=resume, progress=progress,
                    evaluate=evaluate, stop_after=stop_after, log=log)


def _run(config: MetaTrainConfig, out_dir: Path, mesh: jax.sharding.Mesh | None,
         stop: StopRequest, *, resume: bool, progress: bool, evaluate: bool,
         stop_after: int | None, log: Callable[[str], None]) -> MetaTrainResult:
    """``meta_train`` in a folder it holds."""
    from outer_train import evaluation, generalization

    ckpt_dir = out_dir / "checkpoints"
    t_build = time.perf_counter()
    setup = build(config)
    config_hash = config.trajectory_hash()
    state, resumed_from = _start_or_resume(setup, ckpt_dir, config_hash, resume=resume, log=log)
    state, estimators, outer_key = _place(mesh, setup, state, log=log)
    start = int(state.outer_step)
    writer = distributed.is_writer()
    if writer:
        run_dir.write_text(out_dir / "config.toml", to_toml(config))  # after a compatible restore
        # a fresh start (step 0) keeps no record of an earlier attempt, not even its step-0 ones
        truncate_after(out_dir / "metrics.jsonl", start if start > 0 else -1)
    num_steps = config.run.num_outer_steps
    if stop_after is not None:
        num_steps = min(num_steps, stop_after)
    evaluator = evaluation.HeldoutEvaluator.from_setup(setup) if evaluate else None
    if evaluate:  # the generalization rows' data: if missing, fail before compute
        generalization.load_tasks(generalization.run_plan(config))
    ctx = _LoopContext(
        setup, make_outer_step(setup.meta_opt), estimators, outer_key, num_steps,
        MetricsLogger(out_dir, purge_step=start) if writer else NullLogger(), ckpt_dir,
        config_hash, evaluator, stop,
    )
    try:
        if evaluator is not None and start == 0 and not stop.requested:
            _evaluate(ctx, state, log, label="init")
        ctx.logger.log(start, "setup", {
            "startup_seconds": time.perf_counter() - t_build,  # data, compile, first eval
            "inner_steps_per_outer_step": setup.inner_steps_per_outer_step,
            "num_train_tasks": len(setup.train_tasks),
            "num_theta": sum(x.size for x in jax.tree.leaves(state.theta)),
        })
        with mesh_scope(mesh):
            state = _loop(ctx, state, progress=progress, log=log)
        finished = int(state.outer_step) >= config.run.num_outer_steps
        if finished and evaluator is not None:
            _evaluate(ctx, state, log, label="final")
    finally:
        ctx.logger.close()
    return _write_outputs(setup, state, out_dir, evaluator, resumed_from, log=log)


def _refuse_another_run(out_dir: Path, ckpt_dir: Path, *, resume: bool) -> None:
    """Without ``resume``, refuses a folder that holds another run's checkpoints, with the one
    way on that works: --resume if a checkpoint is intact, another --out if none is."""
    if resume or not checkpoint.list_checkpoints(ckpt_dir):
        return
    if checkpoint.newest_intact(ckpt_dir) is None:
        raise UserError(
            f"{out_dir} holds a run whose checkpoints are all corrupt: nothing there can be "
            "resumed. Start the new run in another --out"
        )
    raise UserError(
        f"{out_dir} already holds a run's checkpoints; pass --resume to continue it, or "
        "choose another --out"
    )


def _start_or_resume(setup: MetaTrainSetup, ckpt_dir: Path, config_hash: str, *, resume: bool,
                     log: Callable[[str], None]) -> tuple[MetaTrainState, int | None]:
    """(state, outer step resumed from): outer step 0, or with ``resume`` the latest compatible
    checkpoint in ``ckpt_dir`` if there is one (None when starting afresh)."""
    state = init_state(setup)
    if not resume:
        return state, None
    restored = checkpoint.restore_latest(
        ckpt_dir, state, config_hash=config_hash, step_of=lambda s: int(s.outer_step),
        explain=lambda extra: _config_changes(setup.config, extra), warn=log,
    )
    if restored is None:
        log(f"nothing to resume: no checkpoint in {ckpt_dir}; starting a new run from outer "
            "step 0")
        return state, None
    log(f"resuming from {restored.path} (outer step {restored.outer_step})")
    return restored.state, restored.outer_step


def _config_changes(config: MetaTrainConfig, extra: dict[str, Any]) -> str:
    """The trajectory keys where a checkpoint's config (its header's ``extra["config"]``)
    differs from ``config``, for the refusal message ("" when the header has no config)."""
    saved = extra.get("config")
    if not isinstance(saved, dict):
        return ""
    changes = config.trajectory_changes(saved)
    shown = "; ".join(f"{key} = {old!r} in the checkpoint, {new!r} now"
                      for key, old, new in changes[:4])
    return shown + (f"; and {len(changes) - 4} more" if len(changes) > 4 else "")


def _place(mesh: jax.sharding.Mesh | None, setup: MetaTrainSetup, state: MetaTrainState, *,
           log: Callable[[str], None]) -> tuple[MetaTrainState, tuple[Any, ...], jax.Array]:
    """(state, estimators, outer key) on the devices: the estimator states' particles split over
    ``mesh`` (behind the variant axis of a stack's state), everything else replicated
    (``placement.place``); unchanged without a mesh."""
    estimator_states = state.estimator_states
    _, (state, estimators, outer_key) = place(
        mesh, particles=(),
        replicated=(state._replace(estimator_states=()), setup.estimators, setup.keys.outer),
    )
    if mesh is not None:
        estimator_states = tuple(
            shard_particles(s, mesh, particle_axis=int(isinstance(e, StackedEstimator)))
            for e, s in zip(setup.estimators, estimator_states, strict=True)
        )
        processes = distributed.process_count()
        across = f" of {processes} processes" if processes > 1 else ""
        log(f"particles split over {mesh.size} devices{across}")
    return state._replace(estimator_states=estimator_states), estimators, outer_key


def _write_outputs(setup: MetaTrainSetup, state: MetaTrainState, out_dir: Path,
                   evaluator: HeldoutEvaluator | None, resumed_from: int | None, *,
                   log: Callable[[str], None]) -> MetaTrainResult:
    """Saves the trained optimizer and, after a finished run with evaluation, the report with
    the generalization rows (computed here, at the end: a resumed run has them too)."""
    from learned_opt.io import save
    from outer_train import report

    config = setup.config
    optimizer_path = out_dir / OPTIMIZER_FILE
    theta = to_host(state.theta)  # every process takes part; process 0 writes
    summary_path = None
    results = rows = None
    if evaluator is not None and int(state.outer_step) >= config.run.num_outer_steps:
        # Every process computes the rows, as it does the held-out evaluation: the processes
        # then reach ``distributed.leave`` together (its barrier waits 5 minutes at most).
        results = evaluator.final_results()
        rows = _generalization(setup, evaluator, results, theta, log)
    if not distributed.is_writer():
        return MetaTrainResult(state, out_dir, optimizer_path, summary_path, resumed_from)
    save(optimizer_path, setup.lopt, theta)
    if results is not None:
        summary_path = report.write_meta_train_report(
            out_dir, config, results, resumed_from=resumed_from, generalization=rows)
    return MetaTrainResult(state, out_dir, optimizer_path, summary_path, resumed_from)


def _generalization(setup: MetaTrainSetup, evaluator: HeldoutEvaluator, results: EvalResults,
                    theta: Any, log: Callable[[str], None]) -> dict[str, Any] | None:
    """generalization.json's document of the final theta (None without rows), on the final
    evaluation's held-out seeds."""
    from outer_train import generalization

    doc = generalization.evaluate_run(setup.config, setup.lopt, theta,
                                      seed_keys=evaluator.seed_keys,
                                      outer_step=results.outer_step, log=log)
    if doc is not None:
        log(f"generalization: {len(doc['rows'])} rows in {doc['seconds']:.1f} s")
    return doc


def _evaluate(ctx: _LoopContext, state: MetaTrainState, log: Callable[[str], None], *,
              label: str) -> None:
    t0 = time.perf_counter()
    n = int(state.outer_step)
    summary = ctx.evaluator.evaluate(to_host(state.theta), outer_step=n)
    metrics = {**summary, "seconds": time.perf_counter() - t0}
    ctx.logger.log(n, "eval", metrics)
    log(
        f"eval @ outer step {n} ({label}): learned valid loss {summary['learned_valid_loss']:.4f}"
        f" acc {summary['learned_valid_accuracy']:.3f} | tuned Adam valid loss "
        f"{summary['adam_valid_loss']:.4f} acc {summary['adam_valid_accuracy']:.3f}"
    )


def _write_checkpoint(ctx: _LoopContext, outer_step: int, state: MetaTrainState) -> Path:
    """The whole state, gathered from every process (all take part), written by process 0."""
    config = ctx.setup.config
    state = to_host(state)
    if not distributed.is_writer():
        return checkpoint.checkpoint_path(ctx.ckpt_dir, outer_step)
    return checkpoint.save(
        ctx.ckpt_dir, outer_step, state, config_hash=ctx.config_hash,
        keep=config.checkpoint.keep, extra={"config": config.to_dict()},
    )


def divergence_advice(config: MetaTrainConfig) -> str:
    """What to change after ``run.max_skipped_in_a_row`` non-finite meta-gradients in a row:
    only settings that apply to ``config`` and are not already the stabler choice."""
    from outer_train.estimators import estimator_knobs

    fixes = ["meta_opt.learning_rate"]
    if "sigma" in estimator_knobs(config.estimator.name):
        fixes.append("estimator.sigma")
    text = "Lower " + " or ".join(fixes)
    if config.problem.loss_transform != "clip":
        text += ", or use problem.loss_transform = 'clip'"
    elif config.meta_opt.clip_norm == 0:
        text += ", or clip the meta-gradient (meta_opt.clip_norm = 1)"
    return text


def _loop(ctx: _LoopContext, state: MetaTrainState, *, progress: bool,
          log: Callable[[str], None]) -> MetaTrainState:
    """Outer steps from ``state`` up to ``ctx.num_steps``: logs, checkpoints at the cadence,
    evaluates periodically; stops with ``UserError`` after too many skipped steps, and with
    ``Interrupted`` (after a checkpoint) at the first step boundary after a stop signal."""
    from tqdm.auto import tqdm

    config = ctx.setup.config
    start = int(state.outer_step)
    num_steps = ctx.num_steps
    inner_per_outer = ctx.setup.inner_steps_per_outer_step
    max_in_a_row = config.run.max_skipped_in_a_row
    bar = tqdm(
        total=config.run.num_outer_steps, initial=start, disable=not progress,
        desc="meta-train", unit="outer step", dynamic_ncols=True,
    )
    if progress:
        log = bar.write  # messages above the bar, not through it
    window_t0, window_steps = time.perf_counter(), 0
    saved = start  # the newest checkpointed outer step (start: restored, or nothing done yet)
    stopping = False
    # one step in flight: its metrics are fetched before the next step is dispatched (queued
    # multi-device calls deadlock XLA's CPU all-reduce; in_flight), which also times it honestly
    in_flight = InFlight(max_in_flight=1)
    try:
        for n in range(start, num_steps):
            if distributed.any_process(ctx.stop.requested):  # all stop at the same step
                stopping = True
                break
            t0 = time.perf_counter()
            state, metrics = ctx.step_fn(ctx.estimators, state, ctx.outer_key)
            (metrics,) = in_flight.put(metrics)  # waits for the step
            seconds = time.perf_counter() - t0
            window_steps += 1
            done = n + 1
            in_a_row = int(state.skipped_in_a_row)
            bar.update(1)
            bar.set_postfix(
                meta_loss=f"{float(metrics['meta_loss']):.4f}",
                inner_steps_s=f"{inner_per_outer / seconds:,.0f}",
                skipped=int(metrics["num_skipped"]),
            )
            if done % config.run.log_every == 0 or done == num_steps or metrics["skipped"]:
                elapsed = time.perf_counter() - window_t0
                ctx.logger.log(done, "train", {
                    **metrics,
                    "step_seconds": seconds,
                    "inner_steps_per_second": inner_per_outer * window_steps / elapsed,
                })
                window_t0, window_steps = time.perf_counter(), 0
            if in_a_row == 1:  # once per streak of skipped updates, not once per step
                log(f"outer step {done}: non-finite meta-gradient, update skipped "
                    f"({int(metrics['num_skipped'])} skipped so far)")
            if in_a_row >= max_in_a_row:
                _write_checkpoint(ctx, done, state)
                raise UserError(
                    f"meta-training diverged: {in_a_row} non-finite meta-gradients in a row "
                    f"(outer step {done}; every one skipped and logged). "
                    f"{divergence_advice(config)}"
                )
            final = done == num_steps
            every = config.checkpoint.every
            if final or (every > 0 and done % every == 0):
                _write_checkpoint(ctx, done, state)
                saved = done
            if (ctx.evaluator is not None and done < config.run.num_outer_steps
                    and config.eval.every > 0 and done % config.eval.every == 0):
                _evaluate(ctx, state, log, label="periodic")
                window_t0, window_steps = time.perf_counter(), 0
        if stopping or distributed.any_process(ctx.stop.requested):
            raise _interrupted(ctx, state, start, saved)
    finally:
        bar.close()
    if int(state.num_skipped) > 0:
        log(f"{int(state.num_skipped)} of {int(state.outer_step)} outer steps skipped their "
            "update (non-finite meta-gradient)")
    return state


def _interrupted(ctx: _LoopContext, state: MetaTrainState, start: int,
                 saved: int) -> Interrupted:
    """Checkpoints the last completed outer step (unless it is already) for ``Interrupted``;
    ``start``: the outer step this session began at, ``saved``: its newest checkpoint's."""
    done = int(state.outer_step)
    if done == start:
        what = "before completing an outer step; nothing new to checkpoint"
    else:
        path = (_write_checkpoint(ctx, done, state) if done > saved
                else checkpoint.checkpoint_path(ctx.ckpt_dir, done))
        what = f"after outer step {done}; checkpoint {path} is written"
    if ctx.stop.requested:
        return Interrupted(ctx.stop.signum, f"meta-train stopped by {ctx.stop.name} {what}")
    # another process of the group got the signal: every process stops at the same step
    return Interrupted(signal.SIGTERM, f"meta-train stopped with its process group {what}")
