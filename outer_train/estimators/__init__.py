"""Outer-gradient estimators, constructed by name (the meta-training config uses the names).

Every estimator is a frozen pytree dataclass: ``problem`` (an InnerProblem) plus static knobs,
with ``init(key, theta) -> state`` and ``estimate(key, theta, state) -> (meta_grad, state,
metrics)``, pure and jittable with the estimator as a jit argument.
"""

from __future__ import annotations

import dataclasses

from learned_opt.errors import UserError
from outer_train.base import InnerProblem
from outer_train.estimators.draws import draws
from outer_train.estimators.es import ES
from outer_train.estimators.full_bptt import FullBPTT
from outer_train.estimators.hybrid import Hybrid
from outer_train.estimators.nres import NRES
from outer_train.estimators.pes import PES
from outer_train.estimators.tbptt import TBPTT
from outer_train.estimators.truncated_es import TruncatedES

ESTIMATORS: dict[str, type] = {
    "full_bptt": FullBPTT,
    "tbptt": TBPTT,
    "es": ES,
    "truncated_es": TruncatedES,
    "pes": PES,
    "nres": NRES,
    "hybrid": Hybrid,
}


def estimator_knobs(name: str) -> tuple[str, ...]:
    """The knobs (dataclass fields other than ``problem``) of estimator ``name``."""
    return tuple(f.name for f in dataclasses.fields(ESTIMATORS[name]) if f.name != "problem")


def make_estimator(name: str, problem: InnerProblem, **knobs):
    """Build estimator ``name`` for ``problem``; ``knobs`` override its defaults.

    Unknown names or knobs raise UserError naming them and listing the allowed ones; a list
    value (from TOML) becomes a tuple, e.g. horizon = [100, 1000] (log-uniform schedule).
    """
    if name not in ESTIMATORS:
        raise UserError(f"unknown estimator {name!r}; choose one of {sorted(ESTIMATORS)}")
    allowed = estimator_knobs(name)
    unknown = sorted(set(knobs) - set(allowed))
    if unknown:
        raise UserError(
            f"unknown knob(s) {', '.join(unknown)} for estimator {name!r}; "
            f"allowed: {', '.join(allowed)}"
        )
    knobs = {k: tuple(v) if isinstance(v, list) else v for k, v in knobs.items()}
    return ESTIMATORS[name](problem, **knobs)


__all__ = [
    "ES",
    "ESTIMATORS",
    "NRES",
    "PES",
    "TBPTT",
    "FullBPTT",
    "Hybrid",
    "TruncatedES",
    "draws",
    "estimator_knobs",
    "make_estimator",
]
