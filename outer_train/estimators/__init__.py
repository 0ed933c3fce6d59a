"""Outer-gradient estimators, constructed by name (the meta-training config uses the names).

Every estimator is a frozen pytree dataclass: ``problem`` (an InnerProblem) plus static knobs,
with ``init(key, theta) -> state`` and ``estimate(key, theta, state) -> (meta_grad, state,
metrics)``, pure and jittable with the estimator as a jit argument. Knobs are validated on the
constructor path (``make_estimator``, ``<Estimator>.create``, ``validate_knobs``), not when JAX
rebuilds the pytree; direct construction ``PES(problem, ...)`` is not checked.
"""

from __future__ import annotations

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
    cls.name: cls for cls in (FullBPTT, TBPTT, ES, TruncatedES, PES, NRES, Hybrid)
}


def _estimator_class(name: str) -> type:
    if name not in ESTIMATORS:
        raise UserError(f"unknown estimator {name!r}; choose one of {sorted(ESTIMATORS)}")
    return ESTIMATORS[name]


def estimator_knobs(name: str) -> tuple[str, ...]:
    """The knobs (dataclass fields other than ``problem``) of estimator ``name``."""
    return ESTIMATORS[name].knob_names()


def validate_knobs(name: str, knobs: dict) -> None:
    """Check knob overrides for estimator ``name`` without a problem (as configs are checked).

    Unknown names or knobs and bad values raise UserError naming them and what is allowed.
    """
    _estimator_class(name).validate(knobs)


def make_estimator(name: str, problem: InnerProblem, **knobs):
    """Build estimator ``name`` for ``problem``; ``knobs`` override its defaults.

    Validated as ``validate_knobs``; a list value (from TOML) becomes a tuple, e.g.
    horizon = [100, 1000] (log-uniform schedule).
    """
    return _estimator_class(name).create(problem, **knobs)


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
    "validate_knobs",
]
