"""The learned optimizers by name: one registry for saved files (``learned_opt.io``) and for
configs (``[lopt] name``).

A name is the class attribute ``name`` of a LearnedOptimizer dataclass; ``make(name, **config)``
rebuilds it as ``cls(**config)``, with ``config`` the JSON-able keyword arguments that its
``config()`` returns. Extend with ``register``.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from learned_opt.base import LearnedOptimizer
from learned_opt.errors import UserError
from learned_opt.hyper import LearnedAdam, LearnedMomentum, LearnedSGD
from learned_opt.mlp_lopt import MLPLOpt

OPTIMIZERS: dict[str, type] = {
    cls.name: cls for cls in (MLPLOpt, LearnedSGD, LearnedMomentum, LearnedAdam)
}


def register(cls: type) -> type:
    """Make a LearnedOptimizer dataclass known by its ``name`` (usable as a decorator)."""
    if not dataclasses.is_dataclass(cls) or not isinstance(getattr(cls, "name", None), str):
        raise TypeError(f"{cls!r} must be a dataclass with a class attribute `name: str`")
    OPTIMIZERS[cls.name] = cls
    return cls


def make(name: Any, **config: Any) -> LearnedOptimizer:
    """``OPTIMIZERS[name](**config)``; an unknown name, an unknown key or an invalid value
    raises UserError naming it and what is allowed."""
    cls = OPTIMIZERS.get(name) if isinstance(name, str) else None
    if cls is None:
        raise UserError(f"unknown optimizer {name!r}; known: {', '.join(sorted(OPTIMIZERS))}")
    allowed = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(config) - allowed)
    if unknown:
        raise UserError(f"unknown {name} config keys {unknown}; allowed: {sorted(allowed)}")
    try:
        return cls(**config)
    except UserError as e:
        raise UserError(f"invalid {name} config: {e}") from None
    except (TypeError, ValueError) as e:
        raise UserError(f"invalid {name} config ({e})") from None
