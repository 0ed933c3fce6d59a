"""Generalization: how the learned optimizer fares against tuned Adam past its training setting.

A *row* is one setting: a list of tasks and a number of inner steps (a multiple of the trained
horizon T, or T on another task). For every task and each of S seeds (``seed_keys``, the same
for every optimizer: common random numbers) it trains from fresh params, exactly as held-out
evaluation does (``outer_train.evaluation.HeldoutEvaluator``):

* the learned optimizer with weights theta;
* Adam at each rate of a grid, then keeps the rate with the lowest mean train-batch loss over
  the row's own runs (the meta-objective; tuned per row, on the row itself: this favours Adam).

Per optimizer: mean ± standard error over tasks x seeds of the meta-objective (the mean
train-batch loss over the run), the final valid loss and accuracy. The verdict (``verdict``)
compares the paired differences over common runs (d_r = one optimizer's value minus the
other's on run r; s.e. = std(d, ddof=1) / sqrt(R)):

* diverged: some learned run's training-batch or whole-split train losses are non-finite or
  exceed ``DIVERGENCE_FACTOR`` x its step-0 train loss -> "diverged (k of n runs)";
* ``beats_adam``: mean(Adam's meta-objective - the learned one's) > 2 s.e.;
* ``valid_no_worse``: mean(the learned final valid loss - Adam's) <= 2 s.e.;
* "beats Adam" (both), "lower meta-objective, worse valid loss" (only the first), "worse than
  Adam" (Adam's meta-objective lower by > 2 s.e.), else "within 2 s.e. of Adam".

Rows are made by meta-training (``meta_train``: the rows of ``run_plan`` at the end of a run, in
summary.md and generalization.json) and by ``outer_train.pretrained_card`` (a shipped
optimizer's card, with its own seeds and grid).
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np

if TYPE_CHECKING:
    import jax

    from learned_opt.base import LearnedOptimizer, Theta
    from outer_train.config import MetaTrainConfig
    from outer_train.evaluation import AdamBaseline, Curves
    from tasks.image_mlp import ImageMLPConfig

DIVERGENCE_FACTOR = 10.0
BEATS = "beats Adam"
SPLIT = "lower meta-objective, worse valid loss"
LEVEL = "within 2 s.e. of Adam"
WORSE = "worse than Adam"
VERDICTS = (BEATS, SPLIT, LEVEL, WORSE)  # and "diverged (k of n runs)"
DIVERGED_PREFIX = "diverged ("
ADAM_TUNING = "per row, lowest mean train-batch loss on the row's own runs"
OBJECTIVE = "mean train-batch loss over the run"
DIVERGENCE = f"non-finite or > {DIVERGENCE_FACTOR:g}x the step-0 train loss"
FILE = "generalization.json"


def default_adam_lrs() -> tuple[float, ...]:
    """9 log-spaced learning rates from 1e-3 to 1e-1 (rounded to 4 significant digits)."""
    return tuple(float(f"{10 ** (-3 + i / 4):.4g}") for i in range(9))


# ---------------------------------------------------------------------------------------------
# Which tasks


def trained_horizon(config: MetaTrainConfig) -> int:
    """T: the estimator's horizon (the longest of a range)."""
    horizon = config.estimator.horizon
    return max(horizon) if isinstance(horizon, tuple) else horizon


def heldout_task_configs(config: MetaTrainConfig) -> list[ImageMLPConfig]:
    """The ``ImageMLPConfig``s of a meta-training config's held-out tasks, in the order
    ``outer_train.build.make_tasks`` builds them."""
    import jax

    from outer_train.build import run_keys

    if config.task.kind != "family":
        return [config.task_config()]
    family = config.make_family()
    configs = family.heldout_variants()
    n = min(config.eval.num_heldout_tasks, len(configs))
    order = jax.random.permutation(run_keys(config.run.seed).heldout_tasks, len(configs))[:n]
    return [configs[int(i)] for i in order]


def default_variants(config: MetaTrainConfig) -> list[str]:
    """The presets on the trained dataset other than the trained task (single-task configs;
    none for a family, whose held-out variants are its generalization at T)."""
    from tasks.image_mlp import PRESETS

    if config.task.kind == "family":
        return []
    trained = config.task_config()
    return [k for k, v in PRESETS.items()
            if v.dataset == trained.dataset and v != trained]


def variant_names(config: MetaTrainConfig) -> list[str]:
    """``eval.generalization_variants``, with "auto" resolved by ``default_variants``."""
    variants = config.eval.generalization_variants
    return default_variants(config) if variants == "auto" else list(variants)


def task_label(task_config: ImageMLPConfig) -> str:
    """The preset name of a task config if it is one, else its ``name``."""
    from tasks.image_mlp import PRESETS

    return next((k for k, v in PRESETS.items() if v == task_config), task_config.name)


def task_record(task_config: ImageMLPConfig) -> dict[str, Any]:
    """JSON of a task: its label and ``ImageMLPConfig`` fields (``ImageMLPConfig(**config)``)."""
    return {"label": task_label(task_config), "config": dataclasses.asdict(task_config)}


class Setting(NamedTuple):
    """One planned row: its name, its tasks and its number of inner steps."""

    name: str
    task_configs: tuple[ImageMLPConfig, ...]
    num_steps: int


def plan(config: MetaTrainConfig, multiples: Sequence[int],
         variants: Sequence[str]) -> list[Setting]:
    """The held-out tasks (the trained task on held-out seeds for ``task.kind = "single"``) at
    each of ``multiples`` x T, then each preset of ``variants`` at T."""
    from tasks.image_mlp import PRESETS

    horizon = trained_horizon(config)
    trained = tuple(heldout_task_configs(config))
    what = "trained task" if config.task.kind != "family" else "held-out family variants"
    rows = [Setting(f"{what}, {m}T" if m != 1 else f"{what}, T", trained, m * horizon)
            for m in multiples]
    rows += [Setting("held-out variant, T", (PRESETS[v],), horizon) for v in variants]
    return rows


def run_plan(config: MetaTrainConfig) -> list[Setting]:
    """The rows of a meta-training run (``[eval]``; none when ``generalization_multiples`` is
    empty): ``generalization_multiples`` x T and the variants at T for a single task; for a
    family, its held-out variants at T too (the final evaluation's tasks: at T they already
    are the generalization to unseen tasks)."""
    multiples = config.eval.generalization_multiples
    if not multiples:
        return []
    if config.task.kind == "family":
        multiples = (1, *multiples)
    return plan(config, multiples, variant_names(config))


def load_tasks(settings: Sequence[Setting]) -> None:
    """Loads the data of every task of ``settings`` (cached per process; ``TaskError`` for data
    that is not there, before a run spends its compute)."""
    from tasks.image_mlp import make_task

    for s in settings:
        for c in s.task_configs:
            make_task(c)


# ---------------------------------------------------------------------------------------------
# The verdict


def _finite(x: float) -> float | None:
    return float(x) if math.isfinite(x) else None


def _pair(mean: float, sem: float) -> list[float | None]:
    return [_finite(mean), _finite(sem)]


def _paired(a, b) -> tuple[float, float]:
    """(mean, standard error) of a - b over runs (tasks x seeds)."""
    d = (np.asarray(a, np.float64) - np.asarray(b, np.float64)).reshape(-1)
    sem = d.std(ddof=1) / math.sqrt(d.size) if d.size > 1 else math.nan
    return float(d.mean()), float(sem)


def diverged_runs(curves: Curves) -> int:
    """Runs whose batch or whole-split train losses are non-finite or > 10x the step-0 loss."""
    init = curves.train_loss[..., :1]
    bad = (~np.isfinite(curves.batch_loss).all(axis=-1)
           | ~np.isfinite(curves.train_loss).all(axis=-1)
           | (curves.batch_loss > DIVERGENCE_FACTOR * init).any(axis=-1)
           | (curves.train_loss > DIVERGENCE_FACTOR * init).any(axis=-1))
    return int(bad.sum())


def _side(curves: Curves) -> dict[str, Any]:
    s = curves.summary()
    return {
        "mean_batch_loss": _pair(*s["mean_batch_loss"]),
        "final_valid_loss": _pair(*s["final_valid_loss"]),
        "final_valid_accuracy": _pair(*s["final_valid_accuracy"]),
        "final_train_loss": _pair(*s["final_train_loss"]),
        "diverged_runs": diverged_runs(curves),
    }


def verdict(learned: Curves, adam: Curves) -> dict[str, Any]:
    """The comparison of a row (module docstring) from both optimizers' curves on the same
    runs: the paired differences, the three flags and the verdict string."""
    gain = _paired(adam.batch_loss.mean(-1), learned.batch_loss.mean(-1))
    valid_gap = _paired(learned.valid_loss[..., -1], adam.valid_loss[..., -1])
    num_diverged = diverged_runs(learned)
    diverged = num_diverged > 0
    beats = bool(not diverged and gain[0] > 2 * gain[1])
    no_worse = bool(not diverged and valid_gap[0] <= 2 * valid_gap[1])
    if diverged:
        text = f"diverged ({num_diverged} of {learned.batch_loss[..., 0].size} runs)"
    elif beats and no_worse:
        text = BEATS
    elif beats:
        text = SPLIT
    elif gain[0] < -2 * gain[1]:
        text = WORSE
    else:
        text = LEVEL
    return {
        "meta_objective_gain": _pair(*gain),  # Adam minus learned (paired); > 0: learned lower
        "final_valid_loss_gap": _pair(*valid_gap),  # learned minus Adam (paired)
        "beats_adam": beats,
        "valid_no_worse": no_worse,
        "diverged": diverged,
        "verdict": text,
    }


def row(setting: str, task_configs: Sequence[ImageMLPConfig], learned: Curves,
        adam: AdamBaseline, *, num_steps: int, eval_every: int) -> dict[str, Any]:
    """One row's JSON from its curves (fields: those of ``learned_opt.zoo.heldout_table``)."""
    ad = _side(adam.curves)
    ad["learning_rate"] = adam.learning_rate
    ad["grid_objective"] = [_finite(v) for v in adam.grid_objective]
    return {
        "setting": setting,
        "tasks": [task_record(c) for c in task_configs],
        "task_labels": [task_label(c) for c in task_configs],
        "num_steps": num_steps,
        "eval_every": eval_every,
        "learned": _side(learned),
        "adam": ad,
        **verdict(learned, adam.curves),
    }


# ---------------------------------------------------------------------------------------------
# Training


def train_rows(task_configs: Sequence[ImageMLPConfig], lopt: LearnedOptimizer, theta: Theta, *,
               steps: Sequence[int], seed_keys: jax.Array, adam_lrs: Sequence[float],
               curve_every: int) -> list[tuple[Curves, AdamBaseline, int]]:
    """(learned curves, tuned Adam, eval_every) for each run length of ``steps``, on
    ``task_configs`` from each of ``seed_keys`` [S]; Adam tuned per length by the mean
    train-batch loss. One run of ``max(steps)`` steps per optimizer: each shorter row is its
    first n steps (``Curves.until``: batches are keyed by the global step and neither Adam nor
    the learned optimizer knows the run's length, so a separate run of n steps computes the
    same), with whole-split evaluations every ``eval_every`` steps, the largest divisor of
    every length that is <= ``curve_every``."""
    from outer_train.evaluation import HeldoutEvaluator, eval_every_for, tune_adam
    from tasks.image_mlp import make_task

    eval_every = eval_every_for(math.gcd(*steps), curve_every)
    evaluator = HeldoutEvaluator(
        tasks=tuple(make_task(c) for c in task_configs), lopt=lopt, seed_keys=seed_keys,
        num_steps=max(steps), eval_every=eval_every, adam_learning_rates=tuple(adam_lrs),
        objective="train",
    )
    learned, grid = evaluator.learned_and_adam_grid(theta)
    return [(learned.until(n), tune_adam([c.until(n) for c in grid], tuple(adam_lrs), "train"),
             eval_every) for n in steps]


def evaluate(settings: Sequence[Setting], lopt: LearnedOptimizer, theta: Theta, *,
             seed_keys: jax.Array, adam_lrs: Sequence[float], curve_every: int,
             log: Callable[[str], None] = print) -> list[dict[str, Any]]:
    """The rows of ``settings``, in order; the settings on the same tasks share one run of the
    longest length (``train_rows``)."""
    groups: dict[tuple[ImageMLPConfig, ...], list[int]] = {}
    for i, s in enumerate(settings):
        groups.setdefault(s.task_configs, []).append(i)
    rows: list[dict[str, Any] | None] = [None] * len(settings)
    for configs, members in groups.items():
        t0 = time.perf_counter()
        trained = train_rows(configs, lopt, theta, steps=[settings[i].num_steps for i in members],
                             seed_keys=seed_keys, adam_lrs=adam_lrs, curve_every=curve_every)
        for i, (learned, adam, eval_every) in zip(members, trained, strict=True):
            s = settings[i]
            rows[i] = row(s.name, configs, learned, adam, num_steps=s.num_steps,
                          eval_every=eval_every)
        log(f"generalization: {', '.join(task_label(c) for c in configs)} up to "
            f"{max(settings[i].num_steps for i in members)} steps: "
            + "; ".join(f"{settings[i].name}: {rows[i]['verdict']}" for i in members)
            + f" ({time.perf_counter() - t0:.1f} s)")
    return rows


def evaluate_run(config: MetaTrainConfig, lopt: LearnedOptimizer, theta: Theta, *,
                 seed_keys: jax.Array, outer_step: int,
                 log: Callable[[str], None] = print) -> dict[str, Any] | None:
    """generalization.json of a meta-training run (the rows of ``run_plan``, then how they
    were made); None without rows. ``seed_keys``: the final evaluation's held-out seeds.
    Whole-split evaluations every T steps only: a row needs its final values, and its
    batch losses, checked for divergence, are kept at every step."""
    settings = run_plan(config)
    if not settings:
        return None
    t0 = time.perf_counter()
    horizon = trained_horizon(config)
    rows = evaluate(settings, lopt, theta, seed_keys=seed_keys,
                    adam_lrs=config.eval.adam_learning_rates, curve_every=horizon, log=log)
    return {
        "outer_step": outer_step,
        "horizon": horizon,
        "multiples": list(config.eval.generalization_multiples),
        "variants": variant_names(config),
        "num_seeds": int(seed_keys.shape[0]),
        "seed_keys": "jax.random.split(build.run_keys(run.seed).heldout_seeds, "
                     "eval.num_seeds) (the final evaluation's seeds)",
        "adam_learning_rates": list(config.eval.adam_learning_rates),
        "adam_tuning": ADAM_TUNING,
        "objective": OBJECTIVE,
        "curve_every": horizon,
        "divergence": DIVERGENCE,
        "seconds": time.perf_counter() - t0,
        "rows": rows,
    }
