"""The ``[compare]`` section of ``learned-opt compare``: several estimators ("arms") on one job.

A compare config is a meta-training config (``[task]``, ``[lopt]``, ``[problem]``,
``[estimator]``, ``[meta_opt]``, ``[run]``, ``[eval]``, ``[checkpoint]``: the base job) plus::

    [compare]
    seeds = [0, 1]                  # run.seed of every arm's runs (the same list for every arm)
    budget = "inner_steps"          # the equal budget's unit
    budget_inner_steps = 200_000    # inner steps (summed over particles) per run
    num_budget_points = 5           # held-out evaluations along the budget

    [[compare.arms]]
    label = "pes"
    estimator = { name = "pes", trunc_length = 10 }
    learning_rates = [1e-3, 3e-3]   # optional: a meta-learning-rate grid (best one reported)

The base ``[estimator]`` section holds knobs shared by the arms, without a ``name``. An arm's
estimator starts from the shared keys that its estimator has (so ``horizon`` and ``num_tasks``
are written once; a shared ``sigma`` is the ES arms' noise, not full_bptt's smoothing) and its
own table overrides them; every key is checked like
``[estimator]``, including the estimator's own knob checks, and named in messages as
``compare.arms[1].estimator.trunc_length``.

Equal budget: with I = inner steps per outer step of an arm (``num_train_tasks`` x the
estimator's ``inner_steps_per_estimate``) and P = ``num_budget_points``, an arm takes
N = P * floor(floor(B / I) / P) outer steps and is evaluated every N / P outer steps, i.e. at
inner steps j * (N / P) * I ~ j * B / P for j = 1..P (and at 0). Every arm is evaluated on the
same held-out tasks and seeds for one ``run.seed``, against the same tuned Adam, for the same
number of held-out inner steps (``eval.num_inner_steps``, or the common horizon).
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from learned_opt.errors import UserError
from outer_train.config.files import apply_overrides, load_toml, toml_value
from outer_train.config.schema import EstimatorConfig, MetaTrainConfig, config_from_dict
from outer_train.config.validate import field, from_mapping

if TYPE_CHECKING:
    from outer_train.config.diagnostics import VarianceConfig

_LABEL_CHARS = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_-.")


@dataclasses.dataclass(frozen=True)
class ArmTable:
    """One ``[[compare.arms]]`` table as written, less its ``estimator`` table (overrides of
    the base ``[estimator]`` section, ``name`` included; checked separately).

    label: the arm's name and its directory under the output (letters, digits, ``_-.``).
    learning_rates: meta-learning rates to try (empty: the base ``meta_opt.learning_rate``).
    """

    label: str = ""
    learning_rates: tuple[float, ...] = field((), lo=0.0, hi=10.0, lo_open=True, distinct=True)


@dataclasses.dataclass(frozen=True)
class Arm:
    """A validated arm: its label, one complete meta-training config per learning rate (seed
    still the base one) and the rates, in the same order."""

    label: str
    configs: tuple[MetaTrainConfig, ...]
    learning_rates: tuple[float, ...]

    @property
    def estimator(self) -> EstimatorConfig:
        return self.configs[0].estimator


@dataclasses.dataclass(frozen=True)
class CompareSection:
    """``[compare]`` without its arms (see the module docstring for the budget formulas).

    budget: "inner_steps" (``budget_inner_steps`` per run) or "seconds" (``budget_seconds`` of
      outer steps per run, each arm's outer-step time measured over ``calibration_steps``).
    estimator_stats: measure each arm's estimator at its final theta with the variance tool
      (``stats_section``): ``stats_num_draws`` draws of ``stats_num_tasks`` particles each at
      unroll length ``stats_horizon`` (0 = the arm's horizon), against ``stats_reference_draws``
      fresh draws of ``stats_reference``.
    """

    seeds: tuple[int, ...] = field((0, 1), lo=0, hi=2**31 - 1, min_len=1, distinct=True)
    budget: Literal["inner_steps", "seconds"] = "inner_steps"
    budget_inner_steps: int = field(200_000, lo=1, hi=10**12, doc="inner steps per run")
    budget_seconds: float = field(600.0, lo=0.0, hi=1e8, lo_open=True,
                                  doc="seconds of outer steps per run")
    calibration_steps: int = field(5, lo=2, hi=10_000,
                                   doc="timed outer steps per arm (after one compiling step)")
    num_budget_points: int = field(5, lo=1, hi=1000)
    estimator_stats: bool = True
    stats_num_draws: int = field(8, lo=3, hi=1_000_000)
    stats_num_tasks: int = field(1, lo=1, hi=4096)
    stats_horizon: int = field(0, lo=0, hi=1_000_000, doc="0 = the arm's estimator.horizon")
    stats_reference: Literal["full_bptt", "es", "pes", "nres", "none"] = "full_bptt"
    stats_reference_draws: int = field(16, lo=2, hi=1_000_000)


@dataclasses.dataclass(frozen=True)
class CompareConfig:
    """The whole comparison: the section's settings and the validated arms."""

    section: CompareSection
    arms: tuple[Arm, ...]
    # budget = "seconds": {label: seconds per outer step} measured by calibration (None before)
    step_seconds: Mapping[str, float] | None = None

    @property
    def seeds(self) -> tuple[int, ...]:
        return self.section.seeds

    def inner_steps_per_outer_step(self, arm: Arm) -> int:
        return inner_steps_per_outer_step(arm.configs[0])

    def num_outer_steps(self, arm: Arm) -> int:
        """N = P * floor(floor(B / I) / P) with B inner steps, or P * floor(floor(S / t) / P)
        with S seconds and t the arm's measured seconds per outer step."""
        p = self.section.num_budget_points
        if self.section.budget == "seconds":
            if self.step_seconds is None or arm.label not in self.step_seconds:
                raise ValueError(f"arm {arm.label!r}: budget = 'seconds' needs its calibration")
            return p * (int(self.section.budget_seconds / self.step_seconds[arm.label]) // p)
        return p * (self.section.budget_inner_steps // self.inner_steps_per_outer_step(arm) // p)

    def stats_section(self, arm: Arm) -> VarianceConfig:
        """The variance study of ``arm``'s estimator with its knobs at one unroll length (see
        ``CompareSection``): fresh draws, random inits and batches, shift 0."""
        from outer_train.config.diagnostics import VarianceConfig

        sec, est = self.section, arm.estimator
        knobs = est.knobs()
        set_here = {"horizon", "trunc_length", "num_tasks", "num_perturbations", "sigma",
                    "staggered"}
        overrides = tuple(f"{est.name}.{k}={toml_value(v)}" for k, v in sorted(knobs.items())
                          if k not in set_here and v is not None)
        sigma = knobs.get("sigma", 0.01)
        return VarianceConfig(
            study="estimators", estimators=(est.name,),
            horizons=(sec.stats_horizon or knobs["horizon"],),
            trunc_length=knobs.get("trunc_length", 0), num_draws=sec.stats_num_draws,
            num_tasks=sec.stats_num_tasks, num_perturbations=knobs.get("num_perturbations", 1),
            sigma=sigma if est.name != "full_bptt" else 0.01,
            backprop_sigma=sigma if est.name == "full_bptt" else 0.0,
            knob_overrides=overrides, start="fresh", mode="random",
            reference=sec.stats_reference, reference_draws=sec.stats_reference_draws,
            shifts=(0.0,), direction="paper", seed=0,
        )

    def run_config(self, arm: Arm, rate_index: int, seed: int) -> MetaTrainConfig:
        """The meta-training config of one run: the arm's config at that rate, with
        ``run.seed``, the budget's ``run.num_outer_steps``, ``eval.every`` = N / P and no
        generalization rows (``eval.generalization_multiples = []``: the comparison reports
        every arm on the same held-out runs at the budget points; rows at 2T, 5T per run would
        cost more than the run)."""
        config = arm.configs[rate_index]
        n = self.num_outer_steps(arm)
        return dataclasses.replace(
            config,
            run=dataclasses.replace(config.run, seed=seed, num_outer_steps=n),
            eval=dataclasses.replace(config.eval, every=n // self.section.num_budget_points,
                                     generalization_multiples=()),
        )


def inner_steps_per_outer_step(config: MetaTrainConfig) -> int:
    """I: inner steps of one outer step (summed over particles and training task variants),
    as ``build.MetaTrainSetup.inner_steps_per_outer_step`` computes it, without loading data."""
    from outer_train.estimators import ESTIMATORS

    per_estimate = ESTIMATORS[config.estimator.name](None, **config.estimator.knobs())
    variants = config.family.num_train_tasks if config.task.kind == "family" else 1
    return variants * per_estimate.inner_steps_per_estimate


def compare_config_from_dict(data: Mapping[str, Any]) -> tuple[MetaTrainConfig, CompareConfig]:
    """(base config, comparison) from a TOML-shaped dict; ``UserError`` naming any bad key."""
    rest = {k: v for k, v in data.items() if k != "compare"}
    shared = rest.get("estimator", {})
    if not isinstance(shared, Mapping):
        raise UserError(f"[estimator] must be a table of keys, got {shared!r}")
    if "name" in shared:
        raise UserError("estimator.name is not read by `learned-opt compare`: each "
                        "[[compare.arms]] names its estimator; [estimator] holds only knobs "
                        "shared by the arms (e.g. horizon, num_tasks): remove it")
    from_mapping(EstimatorConfig, shared, "estimator")  # types and ranges of the shared knobs
    base = config_from_dict({**rest, "estimator": {}})
    table = data.get("compare", {})
    if not isinstance(table, Mapping):
        raise UserError(f"[compare] must be a table of keys, got {table!r}")
    arms_data = table.get("arms", [])
    section = from_mapping(CompareSection, {k: v for k, v in table.items() if k != "arms"},
                           "compare")
    seeds = section.seeds
    if not seeds or any(s < 0 or s > 2**31 - 1 for s in seeds) or len(set(seeds)) < len(seeds):
        raise UserError(f"compare.seeds = {list(seeds)}: expected a non-empty list of distinct "
                        "integers in [0, 2^31 - 1], e.g. [0, 1]")
    if (not isinstance(arms_data, Sequence) or isinstance(arms_data, str)
            or not all(isinstance(a, Mapping) for a in arms_data)):
        raise UserError("compare.arms must be a list of tables ([[compare.arms]] in TOML)")
    if len(arms_data) < 1:
        raise UserError("compare.arms is empty: add [[compare.arms]] tables, each with a label "
                        "and an estimator, e.g. estimator = { name = \"pes\" }")
    arms = tuple(_arm(i, a, rest, base) for i, a in enumerate(arms_data))
    labels = [a.label for a in arms]
    for i, j in itertools.combinations(range(len(labels)), 2):
        if labels[i] == labels[j]:
            raise UserError(f"compare.arms[{j}].label = {labels[j]!r} is used by "
                            f"compare.arms[{i}] too: labels name directories, make them unique")
    compare = CompareConfig(section, arms)
    _check_fair(compare)
    return base, compare


def _arm(i: int, data: Mapping[str, Any], rest: Mapping[str, Any],
         base: MetaTrainConfig) -> Arm:
    """Validates ``compare.arms[i]`` into an ``Arm`` (see the module docstring)."""
    from outer_train.estimators import estimator_knobs

    key = f"compare.arms[{i}]"
    unknown = sorted(set(data) - {"label", "estimator", "learning_rates"})
    if unknown:
        raise UserError(f"unknown key '{key}.{unknown[0]}' in [[compare.arms]]; allowed keys: "
                        "label, estimator, learning_rates")
    table = from_mapping(ArmTable, {k: v for k, v in data.items() if k != "estimator"}, key)
    if not table.label or not set(table.label) <= _LABEL_CHARS:
        raise UserError(f"{key}.label = {table.label!r}: expected a non-empty name of letters, "
                        "digits, '_', '-' or '.' (it names the arm's directory), e.g. 'pes'")
    est = data.get("estimator")
    if not isinstance(est, Mapping) or "name" not in est:
        raise UserError(f"{key}.estimator must be a table with at least a name, e.g. "
                        "estimator = { name = \"pes\", trunc_length = 10 }")
    from_mapping(EstimatorConfig, est, f"{key}.estimator")  # unknown keys, types, ranges
    name = est["name"]
    allowed = estimator_knobs(name)
    for k in est:
        if k != "name" and k not in allowed:
            raise UserError(f"{key}.estimator.{k} is not a knob of estimator {name!r}; its "
                            f"knobs: {', '.join(allowed)}")
    # full_bptt's sigma is a smoothing, not the ES arms' noise: not inherited
    inherited = {k: v for k, v in rest.get("estimator", {}).items()
                 if k in allowed and not (name == "full_bptt" and k == "sigma")}
    merged = {**inherited, **est}
    rates = table.learning_rates or (base.meta_opt.learning_rate,)
    if any(not 0.0 < lr <= 10.0 for lr in rates) or len(set(rates)) < len(rates):
        raise UserError(f"{key}.learning_rates = {list(rates)}: expected distinct meta-learning "
                        "rates in (0, 10], e.g. [1e-3, 3e-3]")
    configs = []
    for lr in rates:
        meta_opt = {**rest.get("meta_opt", {}), "learning_rate": lr}
        try:
            configs.append(config_from_dict({**rest, "estimator": merged, "meta_opt": meta_opt}))
        except UserError as e:
            msg = str(e).replace("[estimator]", f"{key}.estimator").replace(
                "estimator.", f"{key}.estimator.")
            raise UserError(f"{key} (label {table.label!r}): {msg}") from None
    return Arm(table.label, tuple(configs), tuple(rates))


def _check_fair(compare: CompareConfig) -> None:
    """Every arm: at least one outer step per budget point (inner-step budget; a seconds
    budget is checked after calibration), a valid statistics study, the same held-out inner
    steps."""
    p = compare.section.num_budget_points
    for i, arm in enumerate(compare.arms):
        per_outer = compare.inner_steps_per_outer_step(arm)
        if compare.section.budget == "inner_steps" and compare.num_outer_steps(arm) < p:
            raise UserError(
                f"compare.arms[{i}] ({arm.label!r}): one outer step takes {per_outer} inner "
                f"steps, so compare.budget_inner_steps = {compare.section.budget_inner_steps} "
                f"gives fewer than compare.num_budget_points = {p} outer steps: raise the "
                f"budget to at least {per_outer * p} or lower num_budget_points"
            )
    if compare.section.estimator_stats and compare.arms[0].configs[0].task.kind == "single":
        for i, arm in enumerate(compare.arms):
            try:
                compare.stats_section(arm)
            except UserError as e:
                raise UserError(f"compare.arms[{i}] ({arm.label!r}): its estimator statistics "
                                f"(compare.estimator_stats = true): {e}") from None
    steps = {arm.label: arm.configs[0].eval_inner_steps for arm in compare.arms}
    if len(set(steps.values())) > 1:
        raise UserError(
            f"the arms' held-out evaluations would train for different numbers of inner steps "
            f"({steps}; eval.num_inner_steps = 0 means each arm's horizon): set "
            "eval.num_inner_steps so every arm is evaluated on the same meta-objective"
        )


def load_compare_config(path: str | Path | None, overrides: Sequence[str] = ()
                        ) -> tuple[MetaTrainConfig, CompareConfig]:
    """Loads a compare config: the TOML file, then ``--set``s (which may name ``compare``);
    validated before any compute. ``--set compare.arms=...`` is not supported (edit the file)."""
    data = load_toml(path) if path is not None else {}
    data = apply_overrides(data, overrides, extra=("compare",))
    return compare_config_from_dict(data)
