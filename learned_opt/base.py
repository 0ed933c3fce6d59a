"""The LearnedOptimizer protocol: meta-parameters ``theta`` -> an optax transformation.

``theta`` is a pytree of arrays (the thing meta-training optimizes). ``opt_fn(theta)`` returns an
``optax.GradientTransformationExtraArgs`` whose ``update(grads, state, params, *, loss=None)``
returns ``(updates, state)``; its state never holds the params. Being plain optax, a learned
optimizer composes with ``optax.chain`` and drops into any training loop.

An optimizer with the class attribute ``supports_mask = True`` also takes ``mask=``: a float32
pytree like params, 0 on padding entries (a model padded to a larger shape, ``tasks.padded_mlp``).
It must then give updates 0 there and compute any statistic over a tensor from its real entries
only, so that the padded model trains as the unpadded one would. Family meta-training compiled
once (``[family] compile = "once"``) requires it.
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

import jax
import optax

Theta = Any  # a pytree of float32 arrays: the learned optimizer's meta-parameters


@runtime_checkable
class LearnedOptimizer(Protocol):
    """A family of optimizers indexed by meta-parameters ``theta``.

    Implementations are frozen dataclasses holding static configuration only.
    ``name`` identifies the architecture in saved files; ``config()`` returns the JSON-able
    keyword arguments that rebuild the same architecture (used by ``learned_opt.save``).
    """

    name: str

    def init(self, key: jax.Array) -> Theta: ...

    def opt_fn(self, theta: Theta) -> optax.GradientTransformationExtraArgs: ...

    def config(self) -> dict[str, Any]: ...
