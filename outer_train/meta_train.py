"""The meta-training run: loop jitted outer steps, checkpoint, evaluate on held-out tasks, and
write the trained optimizer, metrics, plots and summary. Building the run from its config is
``outer_train.build``; splitting the particles over devices is ``outer_train.placement``.

One outer step (``outer_step``; jitted once, estimators passed as arguments)::

    key_v         = split(fold_in(outer_key, n), V)[v]          # n = outer step: replayable
    g_v, s_v', m_v = estimator_v.estimate(key_v, theta, s_v)    # one per training variant v
    g             = (1/V) sum_v g_v                             # equal weights
    if all(isfinite(g)):  theta, opt_state <- meta_opt(g);  s_v <- s_v'
    else:                 theta, opt_state, s_v unchanged; num_skipped += 1   # logged, not zeroed

Because every key is a function of (seed, outer step) (``build.RunKeys``) and the whole state --
theta, meta-optimizer state, every estimator state (particle inner states, PES accumulators) and
the counters -- is one ``MetaTrainState`` pytree that the checkpoint stores bit for bit, a
resumed run ends with exactly the theta of an uninterrupted one.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import jax
import jax.numpy as jnp
import optax

from learned_opt.errors import UserError
from outer_train import checkpoint
from outer_train.build import MetaTrainSetup, MetaTrainState, build, init_state
from outer_train.config import MetaTrainConfig, to_toml
from outer_train.logging import MetricsLogger, truncate_after
from outer_train.meta_loss import all_finite
from outer_train.placement import mesh_scope, particle_mesh, place

if TYPE_CHECKING:
    from outer_train.evaluation import HeldoutEvaluator

OPTIMIZER_FILE = "learned_optimizer.lopt"  # learned_opt.save format (a zip of .npy + JSON)


def outer_step(
    meta_opt: optax.GradientTransformation,
    estimators: tuple[Any, ...],
    state: MetaTrainState,
    outer_key: jax.Array,
) -> tuple[MetaTrainState, dict[str, jax.Array]]:
    """One outer step (see the module docstring); pure. Returns (state, metrics)."""
    step_key = jax.random.fold_in(outer_key, state.outer_step)
    est_keys = jax.random.split(step_key, len(estimators))
    grads, new_est_states, est_metrics = [], [], []
    for est, key, est_state in zip(estimators, est_keys, state.estimator_states, strict=True):
        g, s, m = est.estimate(key, state.theta, est_state)
        grads.append(g)
        new_est_states.append(s)
        est_metrics.append(m)
    meta_grad = jax.tree.map(lambda *gs: sum(gs) / len(gs), *grads)
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
        "meta_loss": jnp.mean(jnp.stack([m["meta_loss"] for m in est_metrics])),
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
    logger: MetricsLogger
    ckpt_dir: Path
    config_hash: str
    evaluator: HeldoutEvaluator | None


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
    Raises ``UserError`` for an out directory that holds another run (without ``resume``), and
    when ``run.max_skipped_in_a_row`` consecutive meta-gradients are non-finite.
    """
    from outer_train import evaluation

    out_dir = Path(out_dir)
    ckpt_dir = out_dir / "checkpoints"
    _claim_out_dir(out_dir, ckpt_dir, resume=resume)
    mesh = particle_mesh(config.run.devices)  # a bad device count fails before any compute
    t_build = time.perf_counter()
    setup = build(config)
    config_hash = config.trajectory_hash()
    state, resumed_from = _start_or_resume(setup, ckpt_dir, config_hash, resume=resume, log=log)
    state, estimators, outer_key = _place(mesh, setup, state, log=log)
    start = int(state.outer_step)
    (out_dir / "config.toml").write_text(to_toml(config))  # after a compatible restore only
    truncate_after(out_dir / "metrics.jsonl", start)
    num_steps = config.run.num_outer_steps
    if stop_after is not None:
        num_steps = min(num_steps, stop_after)
    evaluator = evaluation.HeldoutEvaluator.from_setup(setup) if evaluate else None
    ctx = _LoopContext(
        setup, make_outer_step(setup.meta_opt), estimators, outer_key, num_steps,
        MetricsLogger(out_dir, purge_step=start), ckpt_dir, config_hash, evaluator,
    )
    try:
        if evaluator is not None and start == 0:
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
    return _write_outputs(setup, state, out_dir, evaluator, resumed_from)


def _claim_out_dir(out_dir: Path, ckpt_dir: Path, *, resume: bool) -> None:
    """Creates ``out_dir``; refuses one that holds another run's checkpoints unless resuming."""
    if not resume and checkpoint.list_checkpoints(ckpt_dir):
        raise UserError(
            f"{out_dir} already holds a run's checkpoints; pass --resume to continue it, or "
            "choose another --out"
        )
    out_dir.mkdir(parents=True, exist_ok=True)


def _start_or_resume(setup: MetaTrainSetup, ckpt_dir: Path, config_hash: str, *, resume: bool,
                     log: Callable[[str], None]) -> tuple[MetaTrainState, int | None]:
    """(state, outer step resumed from): outer step 0, or with ``resume`` the latest compatible
    checkpoint in ``ckpt_dir`` if there is one (None when starting afresh)."""
    state = init_state(setup)
    if not resume:
        return state, None
    restored = checkpoint.restore_latest(ckpt_dir, state, config_hash=config_hash, warn=log)
    if restored is None:
        log(f"no checkpoint in {ckpt_dir}; starting from outer step 0")
        return state, None
    log(f"resuming from {restored.path} (outer step {restored.outer_step})")
    return restored.state, restored.outer_step


def _place(mesh: jax.sharding.Mesh | None, setup: MetaTrainSetup, state: MetaTrainState, *,
           log: Callable[[str], None]) -> tuple[MetaTrainState, tuple[Any, ...], jax.Array]:
    """(state, estimators, outer key) on the devices: the estimator states' particles split over
    ``mesh``, everything else replicated (``placement.place``); unchanged without a mesh."""
    estimator_states, (state, estimators, outer_key) = place(
        mesh, particles=state.estimator_states,
        replicated=(state._replace(estimator_states=()), setup.estimators, setup.keys.outer),
    )
    if mesh is not None:
        log(f"particles split over {mesh.size} devices")
    return state._replace(estimator_states=estimator_states), estimators, outer_key


def _write_outputs(setup: MetaTrainSetup, state: MetaTrainState, out_dir: Path,
                   evaluator: HeldoutEvaluator | None, resumed_from: int | None) -> MetaTrainResult:
    """Saves the trained optimizer and, after a finished run with evaluation, the report."""
    from learned_opt.io import save
    from outer_train import report

    config = setup.config
    optimizer_path = out_dir / OPTIMIZER_FILE
    save(optimizer_path, setup.lopt, jax.device_get(state.theta))
    summary_path = None
    if evaluator is not None and int(state.outer_step) >= config.run.num_outer_steps:
        summary_path = report.write_meta_train_report(
            out_dir, config, evaluator.final_results(), resumed_from=resumed_from
        )
    return MetaTrainResult(state, out_dir, optimizer_path, summary_path, resumed_from)


def _evaluate(ctx: _LoopContext, state: MetaTrainState, log: Callable[[str], None], *,
              label: str) -> None:
    t0 = time.perf_counter()
    n = int(state.outer_step)
    summary = ctx.evaluator.evaluate(state.theta, outer_step=n)
    metrics = {**summary, "seconds": time.perf_counter() - t0}
    ctx.logger.log(n, "eval", metrics)
    log(
        f"eval @ outer step {n} ({label}): learned valid loss {summary['learned_valid_loss']:.4f}"
        f" acc {summary['learned_valid_accuracy']:.3f} | tuned Adam valid loss "
        f"{summary['adam_valid_loss']:.4f} acc {summary['adam_valid_accuracy']:.3f}"
    )


def _write_checkpoint(ctx: _LoopContext, outer_step: int, state: MetaTrainState) -> Path:
    config = ctx.setup.config
    return checkpoint.save(
        ctx.ckpt_dir, outer_step, state, config_hash=ctx.config_hash,
        keep=config.checkpoint.keep, extra={"config": config.to_dict()},
    )


def _loop(ctx: _LoopContext, state: MetaTrainState, *, progress: bool,
          log: Callable[[str], None]) -> MetaTrainState:
    """Outer steps from ``state`` up to ``ctx.num_steps``: logs, checkpoints at the cadence (and
    on Ctrl-C), evaluates periodically; stops with ``UserError`` after too many skipped steps."""
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
    try:
        for n in range(start, num_steps):
            t0 = time.perf_counter()
            state, metrics = ctx.step_fn(ctx.estimators, state, ctx.outer_key)
            metrics = jax.device_get(metrics)  # waits for the step: honest timings
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
            if in_a_row >= max_in_a_row:
                _write_checkpoint(ctx, done, state)
                raise UserError(
                    f"meta-training diverged: {in_a_row} non-finite meta-gradients in a row "
                    f"(outer step {done}; every one skipped and logged). Lower "
                    "meta_opt.learning_rate or estimator.sigma, or use loss_transform = 'clip'"
                )
            final = done == num_steps
            every = config.checkpoint.every
            if final or (every > 0 and done % every == 0):
                _write_checkpoint(ctx, done, state)
            if (ctx.evaluator is not None and done < config.run.num_outer_steps
                    and config.eval.every > 0 and done % config.eval.every == 0):
                _evaluate(ctx, state, log, label="periodic")
                window_t0, window_steps = time.perf_counter(), 0
    except KeyboardInterrupt:
        # `state` is always a completed step: keep it, so --resume loses nothing.
        done = int(state.outer_step)
        if done > start:
            path = _write_checkpoint(ctx, done, state)
            log(f"interrupted: checkpoint {path} written; continue with --resume")
        raise
    finally:
        bar.close()
    return state
