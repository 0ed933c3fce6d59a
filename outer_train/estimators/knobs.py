"""Validation of estimator knobs: bad values raise UserError naming the knob and what is allowed.

Called from each estimator's ``__post_init__`` so direct construction and ``make_estimator``
(config files) are checked alike.
"""

from __future__ import annotations

import flax.struct

from learned_opt.errors import UserError
from outer_train.base import InnerProblem
from outer_train.estimators.antithetic import LOSS_SHAPINGS
from outer_train.unroll import Horizon


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


def check_segment_length(value) -> None:
    if value is not None:
        check_int("segment_length", value)



def check_antithetic(estimator, *, truncated: bool) -> None:
    """The knobs every antithetic-ES estimator shares: pairs, horizon (with K when
    ``truncated``, else a constant T), sigma and loss-difference shaping."""
    check_int("num_tasks", estimator.num_tasks)
    check_int("num_perturbations", estimator.num_perturbations)
    if truncated:
        check_int("trunc_length", estimator.trunc_length)
        check_horizon(estimator.horizon, trunc_length=estimator.trunc_length)
    else:
        check_horizon(estimator.horizon, constant=True)
    check_sigma("sigma", estimator.sigma)
    check_choice("loss_shaping", estimator.loss_shaping, LOSS_SHAPINGS)
    check_sigma("shaping_scale", estimator.shaping_scale)


@flax.struct.dataclass
class AntitheticWindowKnobs:
    """The problem and knobs of the windowed antithetic-ES estimators (PES, NRES, truncated ES,
    hybrid), validated on construction: num_tasks x num_perturbations pairs; trunc_length K;
    horizon T or (T_min, T_max) log-uniform; sigma; loss_shaping + shaping_scale; staggered:
    start particles at random points of their first episode. Subclasses add their own knobs."""

    problem: InnerProblem
    num_tasks: int = flax.struct.field(pytree_node=False, default=8)
    num_perturbations: int = flax.struct.field(pytree_node=False, default=1)
    trunc_length: int = flax.struct.field(pytree_node=False, default=20)
    horizon: Horizon = flax.struct.field(pytree_node=False, default=200)
    sigma: float = flax.struct.field(pytree_node=False, default=0.01)
    loss_shaping: str = flax.struct.field(pytree_node=False, default="none")
    shaping_scale: float = flax.struct.field(pytree_node=False, default=1.0)
    staggered: bool = flax.struct.field(pytree_node=False, default=True)

    def __post_init__(self):
        check_antithetic(self, truncated=True)
