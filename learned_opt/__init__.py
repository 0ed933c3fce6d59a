"""learned-opt: learned optimizers in flax, as optax transformations.

    lopt = MLPLOpt()                      # static architecture
    theta = lopt.init(jax.random.key(0))  # meta-parameters (a pytree)
    tx = lopt.opt_fn(theta)               # an optax.GradientTransformationExtraArgs
    save("lopt.lopt", lopt, theta); tx, lopt, theta = load("lopt.lopt")

Exports are imported lazily, so ``import learned_opt.cli`` (the CLI) stays fast.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

_EXPORTS = {
    "LearnedOptimizer": "learned_opt.base",
    "Theta": "learned_opt.base",
    "UserError": "learned_opt.errors",
    "MLPLOpt": "learned_opt.mlp_lopt",
    "MLPLOptState": "learned_opt.mlp_lopt",
    "LearnedSGD": "learned_opt.hyper",
    "LearnedSGDState": "learned_opt.hyper",
    "LearnedMomentum": "learned_opt.hyper",
    "LearnedMomentumState": "learned_opt.hyper",
    "LearnedAdam": "learned_opt.hyper",
    "LearnedAdamState": "learned_opt.hyper",
    "save": "learned_opt.io",
    "load": "learned_opt.io",
    "LoadedOptimizer": "learned_opt.io",
    "FORMAT_VERSION": "learned_opt.io",
}

__all__ = [  # noqa: RUF022 -- grouped as in _EXPORTS
    "LearnedOptimizer", "Theta", "UserError",
    "MLPLOpt", "MLPLOptState",
    "LearnedSGD", "LearnedSGDState", "LearnedMomentum", "LearnedMomentumState",
    "LearnedAdam", "LearnedAdamState",
    "save", "load", "LoadedOptimizer", "FORMAT_VERSION",
]
assert set(__all__) == set(_EXPORTS)

if TYPE_CHECKING:
    from learned_opt.base import LearnedOptimizer, Theta
    from learned_opt.errors import UserError
    from learned_opt.hyper import (
        LearnedAdam,
        LearnedAdamState,
        LearnedMomentum,
        LearnedMomentumState,
        LearnedSGD,
        LearnedSGDState,
    )
    from learned_opt.io import FORMAT_VERSION, LoadedOptimizer, load, save
    from learned_opt.mlp_lopt import MLPLOpt, MLPLOptState


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'learned_opt' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value  # cache: later lookups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
