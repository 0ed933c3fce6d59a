"""Estimator knobs: their declarations and their validation.

A knob means the same in every estimator that has it and is checked by one rule, keyed by its
name (``check_values``); bad values raise UserError naming the knob and what is allowed.
Validation runs in the constructor path only -- ``EstimatorKnobs.create`` and
``outer_train.estimators.make_estimator`` / ``validate_knobs`` -- never in ``__post_init__``:
JAX rebuilds these pytree dataclasses at every jit boundary and tree map.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, ClassVar

import flax.struct

from learned_opt.errors import UserError
from outer_train.base import InnerProblem
from outer_train.estimators.antithetic import LOSS_SHAPINGS
from outer_train.unroll import Horizon


def knob(default):
    """A static (non-pytree) dataclass field: a knob, part of the jit cache key."""
    return flax.struct.field(pytree_node=False, default=default)


def check_int(name: str, value, *, minimum: int = 1) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise UserError(f"{name} must be an integer >= {minimum}, got {value!r}")


def check_sigma(name: str, value, *, allow_zero: bool = False) -> None:
    ok = isinstance(value, int | float) and not isinstance(value, bool)
    if not ok or not (value >= 0 if allow_zero else value > 0):
        bound = ">= 0" if allow_zero else "> 0"
        raise UserError(f"{name} must be a number {bound}, got {value!r}")


def check_choice(name: str, value, allowed) -> None:
    if value not in allowed:
        raise UserError(f"{name} must be one of {sorted(allowed)}, got {value!r}")


def check_horizon(
    value: Horizon, *, trunc_length: int | None = None, constant: bool = False
) -> None:
    """horizon: an int T, or (T_min, T_max) with T_min <= T_max for a log-uniform schedule.

    Truncated estimators need T_min >= trunc_length (at most one reset per window); full-horizon
    estimators need a constant T (their scan length).
    """
    if isinstance(value, tuple):
        if constant:
            raise UserError(
                f"horizon must be one integer for a full-horizon estimator, got {value!r}"
            )
        is_int = lambda v: isinstance(v, int) and not isinstance(v, bool)
        if len(value) != 2 or not all(is_int(v) for v in value):
            raise UserError(f"horizon must be an integer or [min, max] integers, got {value!r}")
        lo, hi = value
        if not 1 <= lo <= hi:
            raise UserError(f"horizon [min, max] needs 1 <= min <= max, got {value!r}")
    else:
        check_int("horizon", value)
        lo = value
    if trunc_length is not None and lo < trunc_length:
        raise UserError(
            f"horizon (min) {lo} is shorter than trunc_length {trunc_length}; every episode must "
            "span at least one window: raise horizon or lower trunc_length"
        )


def check_values(values: Mapping[str, Any], *, allow_zero_sigma: bool = False) -> None:
    """Check every knob in ``values`` (an estimator's complete knob set) by its name.

    An estimator without ``trunc_length`` unrolls whole episodes, so its horizon must be one
    integer; with it, every horizon must be >= trunc_length. ``staggered`` takes any bool.
    """
    for name in ("num_tasks", "num_perturbations", "trunc_length"):
        if name in values:
            check_int(name, values[name])
    truncated = "trunc_length" in values
    check_horizon(
        values["horizon"], trunc_length=values.get("trunc_length"), constant=not truncated
    )
    if "sigma" in values:
        check_sigma("sigma", values["sigma"], allow_zero=allow_zero_sigma)
    if "loss_shaping" in values:
        check_choice("loss_shaping", values["loss_shaping"], LOSS_SHAPINGS)
        check_sigma("shaping_scale", values["shaping_scale"])
    if values.get("segment_length") is not None:
        check_int("segment_length", values["segment_length"])


@flax.struct.dataclass
class EstimatorKnobs:
    """An estimator's inner problem (a pytree field: its data arrays are leaves) and, in
    subclasses, its static knobs. ``name`` is the estimator's name in ``ESTIMATORS``.

    Build with ``create`` (or ``make_estimator``), which validates the knobs. Direct construction
    does not validate: it is how JAX rebuilds the pytree, and ``replace`` uses it.
    """

    name: ClassVar[str]
    problem: InnerProblem

    @classmethod
    def knob_names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(cls) if f.name != "problem")

    @classmethod
    def validate(cls, knobs: Mapping[str, Any]) -> dict[str, Any]:
        """``knobs`` (overrides of the defaults) as the constructor takes them -- a list from TOML
        becomes a tuple, e.g. horizon = [100, 1000] -- after checking them: unknown names and bad
        values raise UserError. Needs no problem (configs are checked before any data loads)."""
        allowed = cls.knob_names()
        unknown = sorted(set(knobs) - set(allowed))
        if unknown:
            raise UserError(
                f"unknown knob(s) {', '.join(unknown)} for estimator {cls.name!r}; "
                f"allowed: {', '.join(allowed)}"
            )
        knobs = {k: tuple(v) if isinstance(v, list) else v for k, v in knobs.items()}
        defaults = {f.name: f.default for f in dataclasses.fields(cls) if f.name != "problem"}
        cls.check_knobs({**defaults, **knobs})
        return knobs

    @classmethod
    def check_knobs(cls, values: Mapping[str, Any]) -> None:
        """Raise UserError for a bad value in ``values`` (every knob of this estimator)."""
        check_values(values)

    @classmethod
    def create(cls, problem: InnerProblem, **knobs):
        """The estimator for ``problem`` with ``knobs`` overriding its defaults, validated."""
        return cls(problem, **cls.validate(knobs))


@flax.struct.dataclass
class AntitheticKnobs(EstimatorKnobs):
    """Knobs of every antithetic-ES estimator: num_tasks tasks x num_perturbations antithetic
    pairs each; horizon T; sigma; loss_shaping (``antithetic.LOSS_SHAPINGS``) with
    shaping_scale (loss units)."""

    num_tasks: int = knob(8)
    num_perturbations: int = knob(1)
    horizon: Horizon = knob(200)
    sigma: float = knob(0.01)
    loss_shaping: str = knob("none")
    shaping_scale: float = knob(1.0)

    @property
    def window_length(self) -> int:
        """Inner steps per member per estimate: a whole episode."""
        return self.horizon


@flax.struct.dataclass
class AntitheticWindowKnobs(AntitheticKnobs):
    """Knobs of the windowed antithetic-ES estimators (truncated ES, PES, NRES, hybrid): those of
    ``AntitheticKnobs``, with horizon T or (T_min, T_max) log-uniform, plus trunc_length K and
    staggered (start particles at random points of their first episode)."""

    trunc_length: int = knob(20)
    staggered: bool = knob(True)

    @property
    def window_length(self) -> int:
        return self.trunc_length
