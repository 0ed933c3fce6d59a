"""Held-out evaluation: a learned optimizer against Adam at a tuned learning rate.

For each held-out task and each of S seeds (keys from a stream never used for meta-training),
train from fresh params for ``num_steps`` inner steps (``tasks.train.train``, one ``lax.scan``,
vmapped over seeds; the same seeds for every optimizer: common random numbers):

* the learned optimizer ``lopt.opt_fn(theta)`` (theta is a jit argument: one compilation per
  task shape, whatever theta is);
* Adam at every learning rate of a small grid (vmapped over the grid). The grid point with the
  lowest mean *meta-objective* over all held-out tasks and seeds is "tuned Adam": the mean
  training-batch loss over the run for ``meta_loss = "train"``, the mean validation loss over
  the curve for ``"valid"``. Tuning on the held-out tasks themselves favours Adam; a diverged
  run counts as +inf. Adam does not depend on theta, so it is trained once and cached.

Reported per optimizer: the final train loss, final valid loss and accuracy (whole splits) and
the mean training-batch loss over the run, as mean and standard error over tasks x seeds.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from learned_opt.base import LearnedOptimizer, Theta
from learned_opt.errors import UserError
from outer_train.in_flight import bounded
from tasks.base import Task
from tasks.train import TrainResult, check_schedule, train

SUMMARY_FIELDS = ("final_train_loss", "final_valid_loss", "final_valid_accuracy",
                  "mean_batch_loss")


class Curves(NamedTuple):
    """Host arrays of one optimizer on the held-out tasks (T tasks, S seeds, E eval points).

    step: int [E]; train_loss, valid_loss, valid_accuracy: float [T, S, E];
    batch_loss: float [T, S, num_steps] (training-batch loss before each update).
    """

    step: np.ndarray
    train_loss: np.ndarray
    valid_loss: np.ndarray
    valid_accuracy: np.ndarray
    batch_loss: np.ndarray

    def summary(self) -> dict[str, tuple[float, float]]:
        """{field: (mean, standard error over tasks x seeds)} for ``SUMMARY_FIELDS``."""
        values = {
            "final_train_loss": self.train_loss[..., -1],
            "final_valid_loss": self.valid_loss[..., -1],
            "final_valid_accuracy": self.valid_accuracy[..., -1],
            "mean_batch_loss": self.batch_loss.mean(axis=-1),
        }
        return {k: _mean_sem(v) for k, v in values.items()}

    def until(self, num_steps: int) -> Curves:
        """The first ``num_steps`` inner steps (an evaluation point): what a run of that length
        gives, as batches are keyed by the global step (``tasks.train``) and an optimizer that
        does not know the run's length acts alike in both."""
        (index,) = np.flatnonzero(self.step == num_steps)
        return Curves(self.step[:index + 1], self.train_loss[..., :index + 1],
                      self.valid_loss[..., :index + 1], self.valid_accuracy[..., :index + 1],
                      self.batch_loss[..., :num_steps])

    def to_json(self) -> dict[str, Any]:
        return {k: np.asarray(v).tolist() for k, v in self._asdict().items()}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Curves:
        return cls(**{k: np.asarray(data[k]) for k in cls._fields})


def _mean_sem(x: np.ndarray) -> tuple[float, float]:
    x = np.asarray(x, np.float64).reshape(-1)
    sem = x.std(ddof=1) / math.sqrt(x.size) if x.size > 1 else float("nan")
    return float(x.mean()), float(sem)


def _stack(results: list[TrainResult]) -> Curves:
    """Per-task TrainResults ([S, ...] leaves, fetched) -> Curves with a leading task axis."""
    c = [jax.device_get(r.curves) for r in results]
    return Curves(
        step=np.asarray(c[0].step[0]),
        train_loss=np.stack([x.train_loss for x in c]),
        valid_loss=np.stack([x.valid_loss for x in c]),
        valid_accuracy=np.stack([x.valid_accuracy for x in c]),
        batch_loss=np.stack([np.asarray(jax.device_get(r.batch_loss)) for r in results]),
    )


@functools.partial(jax.jit, static_argnames=("lopt", "num_steps", "eval_every"))
def train_learned(task: Task, lopt: LearnedOptimizer, theta: Theta, keys: jax.Array,
                  num_steps: int, eval_every: int) -> TrainResult:
    """Train ``task`` with ``lopt.opt_fn(theta)`` from each key of ``keys`` [S]; theta traced."""
    one = lambda key: train(task, lopt.opt_fn(theta), key, num_steps, eval_every=eval_every)
    return jax.vmap(one)(keys)


@functools.partial(jax.jit, static_argnames=("num_steps", "eval_every"))
def train_adam_grid(task: Task, learning_rates: jax.Array, keys: jax.Array, num_steps: int,
                    eval_every: int) -> TrainResult:
    """Adam at each of ``learning_rates`` [L] from each key [S]; leaves get [L, S] axes."""

    def one(lr, key):
        return train(task, optax.adam(lr), key, num_steps, eval_every=eval_every)

    return jax.vmap(jax.vmap(one, in_axes=(None, 0)), in_axes=(0, None))(learning_rates, keys)


@functools.partial(jax.jit, static_argnames=("lopt", "num_steps", "eval_every"))
def train_learned_and_adam_grid(task: Task, lopt: LearnedOptimizer, theta: Theta,
                                learning_rates: jax.Array, keys: jax.Array, num_steps: int,
                                eval_every: int) -> tuple[TrainResult, TrainResult]:
    """``train_learned`` and ``train_adam_grid`` in one program: one compilation, not two
    (for short one-off runs on CPU, compiling each program costs more than running it)."""
    return (train_learned(task, lopt, theta, keys, num_steps, eval_every),
            train_adam_grid(task, learning_rates, keys, num_steps, eval_every))


class AdamBaseline(NamedTuple):
    """Tuned Adam: the chosen learning rate, its curves and every grid point's objective."""

    learning_rate: float
    curves: Curves
    grid: tuple[float, ...]
    grid_objective: tuple[float, ...]


@dataclasses.dataclass
class HeldoutEvaluator:
    """Trains held-out tasks with a learned optimizer vs tuned Adam (see the module docstring).

    tasks: held-out tasks; seed_keys: [S] PRNG keys (the same for every task and optimizer);
    objective: "train" (mean batch loss) or "valid" (mean curve validation loss) for tuning.
    """

    tasks: tuple[Task, ...]
    lopt: LearnedOptimizer
    seed_keys: jax.Array
    num_steps: int
    eval_every: int
    adam_learning_rates: tuple[float, ...]
    objective: str = "train"
    theta_init: Theta | None = None
    _adam: AdamBaseline | None = dataclasses.field(default=None, init=False, repr=False)
    _last: tuple[int, Curves] | None = dataclasses.field(default=None, init=False, repr=False)
    _init: Curves | None = dataclasses.field(default=None, init=False, repr=False)

    def __post_init__(self):
        check_schedule(self.num_steps, self.eval_every)
        if self.objective not in ("train", "valid"):
            raise UserError(f"objective must be 'train' or 'valid', got {self.objective!r}")

    @classmethod
    def from_setup(cls, setup) -> HeldoutEvaluator:
        """The evaluator of a meta-training run (``build.MetaTrainSetup``)."""
        cfg = setup.config
        num_steps = cfg.eval_inner_steps
        return cls(
            tasks=setup.heldout_tasks,
            lopt=setup.lopt,
            seed_keys=jax.random.split(setup.keys.heldout_seeds, cfg.eval.num_seeds),
            num_steps=num_steps,
            eval_every=eval_every_for(num_steps, cfg.eval.curve_every),
            adam_learning_rates=cfg.eval.adam_learning_rates,
            objective=cfg.problem.meta_loss,
            theta_init=setup.lopt.init(setup.keys.theta),
        )

    # -- training --------------------------------------------------------------------------

    def learned(self, theta: Theta) -> Curves:
        """Curves of the learned optimizer with weights ``theta`` on every held-out task."""
        return _stack(list(bounded(
            (train_learned(task, self.lopt, theta, self.seed_keys, self.num_steps,
                           self.eval_every)
             for task in self.tasks),
            max_in_flight=2,
        )))

    def adam(self) -> AdamBaseline:
        """Tuned Adam (trained once, then cached)."""
        if self._adam is None:
            self._adam = tune_adam(self.adam_grid(), self.adam_learning_rates, self.objective)
        return self._adam

    def adam_grid(self) -> list[Curves]:
        """Adam's curves at each rate of ``adam_learning_rates`` (trained on every call)."""
        lrs = jnp.asarray(self.adam_learning_rates, jnp.float32)
        return self._split_grid(list(bounded(
            (train_adam_grid(task, lrs, self.seed_keys, self.num_steps, self.eval_every)
             for task in self.tasks),
            max_in_flight=2,
        )))

    def learned_and_adam_grid(self, theta: Theta) -> tuple[Curves, list[Curves]]:
        """``learned(theta)`` and ``adam_grid()`` from one compiled program per task
        (``train_learned_and_adam_grid``): for one-off evaluations, where compiling dominates."""
        lrs = jnp.asarray(self.adam_learning_rates, jnp.float32)
        both = list(bounded(
            (train_learned_and_adam_grid(task, self.lopt, theta, lrs, self.seed_keys,
                                         self.num_steps, self.eval_every)
             for task in self.tasks),
            max_in_flight=2,
        ))
        return _stack([learned for learned, _ in both]), self._split_grid(
            [adam for _, adam in both])

    def _split_grid(self, per_task: list[TrainResult]) -> list[Curves]:
        """Per-task results with a leading learning-rate axis -> Curves per learning rate."""
        return [
            _stack([jax.tree.map(lambda x, i=i: x[i], r) for r in per_task])
            for i in range(len(self.adam_learning_rates))
        ]

    # -- the meta-training hook ------------------------------------------------------------

    def evaluate(self, theta: Theta, *, outer_step: int) -> dict[str, float]:
        """Trains with ``theta`` (and Adam, cached); returns scalars to log.

        Keys: ``learned_<field>`` / ``adam_<field>`` (means) and ``..._sem`` for the fields
        ``train_loss``, ``valid_loss``, ``valid_accuracy`` (final) and ``mean_batch_loss``,
        plus ``adam_learning_rate``.
        """
        curves = self.learned(theta)
        self._last = (outer_step, curves)
        if outer_step == 0:
            self._init = curves
        out: dict[str, float] = {}
        adam = self.adam()
        for prefix, c in (("learned", curves), ("adam", adam.curves)):
            for field, (mean, sem) in c.summary().items():
                name = field.removeprefix("final_")
                out[f"{prefix}_{name}"] = mean
                out[f"{prefix}_{name}_sem"] = sem
        out["adam_learning_rate"] = adam.learning_rate
        return out

    def final_results(self) -> EvalResults:
        """Curves of the initial and the last-evaluated theta, and of tuned Adam."""
        if self._last is None:
            raise RuntimeError("evaluate() has not been called")
        init = self._init
        if init is None and self.theta_init is not None:
            init = self.learned(self.theta_init)  # after a resume: recompute (deterministic)
        return EvalResults(
            outer_step=self._last[0], learned=self._last[1], learned_init=init,
            adam=self.adam(), num_steps=self.num_steps,
            task_names=tuple(getattr(t, "name", "task") for t in self.tasks),
            num_seeds=int(self.seed_keys.shape[0]),
        )


def tune_adam(grid: list[Curves], learning_rates: tuple[float, ...],
              objective: str) -> AdamBaseline:
    """Tuned Adam from its curves at each of ``learning_rates``: the lowest mean objective
    ("train": the mean training-batch loss over the run, "valid": the mean validation loss over
    the curve) over tasks x seeds; a non-finite mean counts as +inf."""
    values = [_objective(c, objective) for c in grid]
    best = int(np.argmin(values))
    return AdamBaseline(float(learning_rates[best]), grid[best], tuple(learning_rates),
                        tuple(values))


def _objective(curves: Curves, objective: str) -> float:
    per_run = (curves.batch_loss.mean(axis=-1) if objective == "train"
               else curves.valid_loss.mean(axis=-1))
    value = float(np.mean(per_run))
    return value if math.isfinite(value) else math.inf


class EvalResults(NamedTuple):
    """What a report needs: curves of the learned optimizer (final and, if known, initial)
    and of tuned Adam, on the same held-out tasks and seeds."""

    outer_step: int
    learned: Curves
    learned_init: Curves | None
    adam: AdamBaseline
    num_steps: int
    task_names: tuple[str, ...]
    num_seeds: int


def eval_every_for(num_steps: int, curve_every: int) -> int:
    """The largest divisor of ``num_steps`` that is <= ``curve_every`` (curves need a divisor)."""
    for d in range(min(curve_every, num_steps), 0, -1):
        if num_steps % d == 0:
            return d
    return 1
