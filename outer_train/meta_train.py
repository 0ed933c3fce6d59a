"""The meta-training run: build everything from a config, loop jitted outer steps, checkpoint,
evaluate on held-out tasks, and write the trained optimizer, metrics, plots and summary.

One outer step (``outer_step``; jitted once, estimators passed as arguments)::

    key_v         = split(fold_in(outer_key, n), V)[v]          # n = outer step: replayable
    g_v, s_v', m_v = estimator_v.estimate(key_v, theta, s_v)    # one per training variant v
    g             = (1/V) sum_v g_v                             # equal weights
    if all(isfinite(g)):  theta, opt_state <- meta_opt(g);  s_v <- s_v'
    else:                 theta, opt_state, s_v unchanged; num_skipped += 1   # logged, not zeroed

Because every key is a function of (seed, outer step) and the whole state -- theta, meta-optimizer
state, every estimator state (particle inner states, PES accumulators) and the counters -- is one
``MetaTrainState`` pytree that the checkpoint stores bit for bit, a resumed run ends with exactly
the theta of an uninterrupted one.

Key streams (``RunKeys``), all split from ``jax.random.key(seed)``: theta init, estimator init,
outer steps, training-task sampling (family), held-out variants (family), held-out seeds.
Held-out seeds come from their own stream, so they are never used for meta-training.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from learned_opt.base import LearnedOptimizer, Theta
from learned_opt.errors import UserError
from outer_train import checkpoint
from outer_train.config import LOptConfig, MetaOptConfig, MetaTrainConfig, to_toml
from outer_train.logging import MetricsLogger, truncate_after
from outer_train.meta_loss import all_finite
from outer_train.unroll import shard_particles
from tasks.base import Task

OPTIMIZER_FILE = "learned_optimizer.lopt"  # learned_opt.save format (a zip of .npy + JSON)


class RunKeys(NamedTuple):
    """The run's independent key streams (typed PRNG keys), each used for one purpose only."""

    theta: jax.Array
    estimator_init: jax.Array
    outer: jax.Array  # outer step n uses fold_in(outer, n)
    train_tasks: jax.Array  # family: which variants are meta-trained on
    heldout_tasks: jax.Array  # family: which held-out variants are evaluated
    heldout_seeds: jax.Array  # evaluation seeds (inits and batches), never used in training


def run_keys(seed: int) -> RunKeys:
    return RunKeys(*jax.random.split(jax.random.key(seed), len(RunKeys._fields)))


class MetaTrainState(NamedTuple):
    """Everything that changes during meta-training (a pytree; what a checkpoint holds).

    theta: learned-optimizer weights. opt_state: meta-optimizer state.
    estimator_states: one estimator state per training task variant (tuple).
    outer_step: int32 []: outer steps taken (including skipped ones).
    num_skipped: int32 []: outer steps whose meta-gradient was non-finite (update skipped).
    skipped_in_a_row: int32 []: consecutive skipped steps up to now.
    """

    theta: Theta
    opt_state: optax.OptState
    estimator_states: tuple[Any, ...]
    outer_step: jax.Array
    num_skipped: jax.Array
    skipped_in_a_row: jax.Array


@dataclasses.dataclass(frozen=True)
class MetaTrainSetup:
    """The static side of a run, built from the config on the host (``build``).

    estimators: one per training task variant (pytrees holding their problem and task data).
    heldout_tasks: evaluation tasks (the training task itself for ``task.kind = "single"``:
    held-out *seeds* then keep evaluation apart from meta-training).
    """

    config: MetaTrainConfig
    keys: RunKeys
    lopt: LearnedOptimizer
    train_tasks: tuple[Task, ...]
    heldout_tasks: tuple[Task, ...]
    estimators: tuple[Any, ...]
    meta_opt: optax.GradientTransformation

    @property
    def inner_steps_per_outer_step(self) -> int:
        return sum(e.inner_steps_per_estimate for e in self.estimators)


# ---------------------------------------------------------------------------------------------
# Building blocks


def make_lopt(cfg: LOptConfig) -> LearnedOptimizer:
    """The learned optimizer named by ``[lopt]`` (``learned_opt.registry``)."""
    from learned_opt import registry

    if cfg.name == "mlp_lopt":
        return registry.make(cfg.name, hidden_sizes=cfg.hidden_sizes)
    return registry.make(cfg.name)


@functools.lru_cache(maxsize=16)
def make_meta_optimizer(cfg: MetaOptConfig) -> optax.GradientTransformation:
    """``clip_by_global_norm(clip_norm)`` (if > 0) then Adam or SGD at ``learning_rate``.

    Cached per config, so one process reuses one object (and its compiled outer step)."""
    if cfg.name == "adam":
        base = optax.adam(cfg.learning_rate, b1=cfg.b1, b2=cfg.b2)
    else:
        base = optax.sgd(cfg.learning_rate)
    if cfg.clip_norm > 0:
        return optax.chain(optax.clip_by_global_norm(cfg.clip_norm), base)
    return base


def make_tasks(config: MetaTrainConfig, keys: RunKeys
               ) -> tuple[tuple[Task, ...], tuple[Task, ...]]:
    """(training tasks, held-out tasks) of a config.

    ``single``: the task itself for both (held-out *seeds* separate evaluation from training).
    ``family``: ``num_train_tasks`` training variants sampled with ``keys.train_tasks`` and up
    to ``eval.num_heldout_tasks`` held-out variants chosen with ``keys.heldout_tasks``.
    """
    from tasks.image_mlp import make_task

    if config.task.kind == "family":
        family = config.make_family()
        train = tuple(family.sample_tasks(keys.train_tasks, config.family.num_train_tasks))
        num_heldout = min(config.eval.num_heldout_tasks, len(family.heldout_variants()))
        return train, tuple(family.heldout_tasks(keys.heldout_tasks, num_heldout))
    task = make_task(config.task_config())
    return (task,), (task,)


def build(config: MetaTrainConfig) -> MetaTrainSetup:
    """Loads data, samples task variants and builds the estimators (host side, no training)."""
    from outer_train.estimators import make_estimator
    from outer_train.problem import LearnedOptProblem

    keys = run_keys(config.run.seed)
    train_tasks, heldout_tasks = make_tasks(config, keys)
    lopt = make_lopt(config.lopt)
    p = config.problem
    estimators = tuple(
        make_estimator(
            config.estimator.name,
            LearnedOptProblem(
                task, lopt, meta_loss=p.meta_loss, loss_transform=p.loss_transform,
                loss_clip=p.loss_clip or None,
            ),
            **config.estimator.knobs(),
        )
        for task in train_tasks
    )
    return MetaTrainSetup(
        config, keys, lopt, train_tasks, heldout_tasks, estimators,
        make_meta_optimizer(config.meta_opt),
    )


@jax.jit
def _init_estimator(estimator, key: jax.Array, theta: Theta):
    # Jitted: particle start-up (init + staggering) is many small ops, slow op by op.
    return estimator.init(key, theta)


def init_state(setup: MetaTrainSetup) -> MetaTrainState:
    """Outer step 0: theta from its key, fresh meta-optimizer and estimator states."""
    theta = setup.lopt.init(setup.keys.theta)
    est_keys = jax.random.split(setup.keys.estimator_init, len(setup.estimators))
    estimator_states = tuple(
        _init_estimator(est, k, theta) for est, k in zip(setup.estimators, est_keys, strict=True)
    )
    zero = lambda: jnp.zeros((), jnp.int32)
    return MetaTrainState(
        theta, setup.meta_opt.init(theta), estimator_states, zero(), zero(), zero()
    )


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


def _checkpoint_extra(config: MetaTrainConfig) -> dict[str, Any]:
    return {"config": config.to_dict()}


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
    from outer_train import evaluation, report

    out_dir = Path(out_dir)
    ckpt_dir = out_dir / "checkpoints"
    if not resume and checkpoint.list_checkpoints(ckpt_dir):
        raise UserError(
            f"{out_dir} already holds a run's checkpoints; pass --resume to continue it, or "
            "choose another --out"
        )
    out_dir.mkdir(parents=True, exist_ok=True)

    mesh = particle_mesh(config.run.devices)  # a bad device count fails before any compute
    t_build = time.perf_counter()
    setup = build(config)
    state = init_state(setup)
    config_hash = config.trajectory_hash()
    resumed_from = None
    if resume:
        restored = checkpoint.restore_latest(ckpt_dir, state, config_hash=config_hash, warn=log)
        if restored is None:
            log(f"no checkpoint in {ckpt_dir}; starting from outer step 0")
        else:
            state, resumed_from = restored.state, restored.outer_step
            log(f"resuming from {restored.path} (outer step {resumed_from})")
    estimators, outer_key = setup.estimators, setup.keys.outer
    if mesh is not None:
        # particles split, the rest replicated: the jitted step's input shardings then equal
        # its output shardings (one compilation, not a second one at step 2) and the task data
        # is not copied to the devices again every step
        replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
        state = jax.device_put(state, replicated)._replace(
            estimator_states=shard_particles(state.estimator_states, mesh)
        )
        estimators, outer_key = jax.device_put((estimators, outer_key), replicated)
        log(f"particles split over {mesh.size} devices")
    start = int(state.outer_step)
    (out_dir / "config.toml").write_text(to_toml(config))  # after a compatible restore only
    truncate_after(out_dir / "metrics.jsonl", start)
    num_steps = config.run.num_outer_steps
    if stop_after is not None:
        num_steps = min(num_steps, stop_after)

    evaluator = None
    if evaluate:
        evaluator = evaluation.HeldoutEvaluator.from_setup(setup)
    step_fn = make_outer_step(setup.meta_opt)
    inner_per_outer = setup.inner_steps_per_outer_step
    logger = MetricsLogger(out_dir, purge_step=start)
    try:
        if evaluator is not None and start == 0:
            _evaluate(evaluator, state, logger, log, label="init")
        logger.log(start, "setup", {
            "startup_seconds": time.perf_counter() - t_build,  # data, compile, first eval
            "inner_steps_per_outer_step": inner_per_outer,
            "num_train_tasks": len(setup.train_tasks),
            "num_theta": sum(x.size for x in jax.tree.leaves(state.theta)),
        })
        # the mesh as context: estimators that create their particles inside estimate (es,
        # full_bptt) split them over it too (unroll.constrain_particles)
        with jax.set_mesh(mesh) if mesh is not None else contextlib.nullcontext():
            state = _loop(setup, step_fn, estimators, outer_key, state, start, num_steps,
                          logger, ckpt_dir, config_hash, evaluator, progress, log)
        finished = int(state.outer_step) >= config.run.num_outer_steps
        if finished and evaluator is not None:
            _evaluate(evaluator, state, logger, log, label="final")
    finally:
        logger.close()

    optimizer_path = out_dir / OPTIMIZER_FILE
    _save_optimizer(optimizer_path, setup.lopt, state.theta)
    summary_path = None
    if evaluator is not None and int(state.outer_step) >= config.run.num_outer_steps:
        summary_path = report.write_meta_train_report(
            out_dir, config, evaluator.final_results(), resumed_from=resumed_from
        )
    return MetaTrainResult(state, out_dir, optimizer_path, summary_path, resumed_from)


def particle_mesh(devices: int) -> jax.sharding.Mesh | None:
    """The mesh the particles are split over (``run.devices``; 0 = all local devices), or None
    for a single device. The jitted outer step then runs partitioned (GSPMD): each device
    steps its share of the particles, and the particle means are reduced across devices."""
    available = jax.local_devices()
    n = len(available) if devices == 0 else devices
    if n > len(available):
        raise UserError(
            f"run.devices = {devices} but JAX sees {len(available)} device(s); use 0 (all) or "
            f"fewer. On CPU, learned-opt makes one device per core; from Python set "
            f"XLA_FLAGS=--xla_force_host_platform_device_count={devices} before importing JAX"
        )
    if n <= 1:
        return None
    return jax.sharding.Mesh(np.asarray(available[:n]), ("particles",))


def _save_optimizer(path: Path, lopt: LearnedOptimizer, theta: Theta) -> None:
    from learned_opt.io import save

    save(path, lopt, jax.device_get(theta))


def _evaluate(evaluator, state: MetaTrainState, logger: MetricsLogger,
              log: Callable[[str], None], *, label: str) -> None:
    t0 = time.perf_counter()
    n = int(state.outer_step)
    summary = evaluator.evaluate(state.theta, outer_step=n)
    metrics = {**summary, "seconds": time.perf_counter() - t0}
    logger.log(n, "eval", metrics)
    log(
        f"eval @ outer step {n} ({label}): learned valid loss {summary['learned_valid_loss']:.4f}"
        f" acc {summary['learned_valid_accuracy']:.3f} | tuned Adam valid loss "
        f"{summary['adam_valid_loss']:.4f} acc {summary['adam_valid_accuracy']:.3f}"
    )


def _loop(setup, step_fn, estimators, outer_key, state, start, num_steps, logger, ckpt_dir,
          config_hash, evaluator, progress, log) -> MetaTrainState:
    from tqdm.auto import tqdm

    config = setup.config
    inner_per_outer = setup.inner_steps_per_outer_step
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
            state, metrics = step_fn(estimators, state, outer_key)
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
                logger.log(done, "train", {
                    **metrics,
                    "step_seconds": seconds,
                    "inner_steps_per_second": inner_per_outer * window_steps / elapsed,
                })
                window_t0, window_steps = time.perf_counter(), 0
            if in_a_row >= max_in_a_row:
                _write_checkpoint(ckpt_dir, done, state, config, config_hash)
                raise UserError(
                    f"meta-training diverged: {in_a_row} non-finite meta-gradients in a row "
                    f"(outer step {done}; every one skipped and logged). Lower "
                    "meta_opt.learning_rate or estimator.sigma, or use loss_transform = 'clip'"
                )
            final = done == num_steps
            every = config.checkpoint.every
            if final or (every > 0 and done % every == 0):
                _write_checkpoint(ckpt_dir, done, state, config, config_hash)
            if (evaluator is not None and done < config.run.num_outer_steps
                    and config.eval.every > 0 and done % config.eval.every == 0):
                _evaluate(evaluator, state, logger, log, label="periodic")
                window_t0, window_steps = time.perf_counter(), 0
    except KeyboardInterrupt:
        # `state` is always a completed step: keep it, so --resume loses nothing.
        done = int(state.outer_step)
        if done > start:
            path = _write_checkpoint(ckpt_dir, done, state, config, config_hash)
            log(f"interrupted: checkpoint {path} written; continue with --resume")
        raise
    finally:
        bar.close()
    return state


def _write_checkpoint(ckpt_dir, outer_step, state, config, config_hash) -> Path:
    return checkpoint.save(
        ckpt_dir, outer_step, state, config_hash=config_hash, keep=config.checkpoint.keep,
        extra=_checkpoint_extra(config),
    )
