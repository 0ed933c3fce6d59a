"""Hyperparameter learned optimizers: SGD, SGD with momentum and Adam with learnable
hyperparameters, each with a handful of meta-parameters.

theta is a dict of float32 scalars in unconstrained coordinates, so any real theta is valid and
ES perturbations of a fixed sigma act multiplicatively on the hyperparameters:
    lr = exp(log_lr),  momentum / beta = 1 - exp(log_one_minus_*),  eps = exp(log_eps).
With 1-2 meta-parameters the meta-loss surface over theta can be computed exactly on a grid
(REFERENCE.md: "the simplest learned optimizers ... 1-D/2-D meta-loss surfaces").

Params must be float32 (``init`` raises UserError otherwise). Updates follow optax exactly
(``optax.sgd`` / ``optax.adam`` with the same hyperparameters give the same updates up to the
float32 rounding of 1 - exp(log(1 - beta))). ``loss`` and extra keyword arguments are accepted
and unused, but for ``mask`` (float32 like params, 0 on padding): the updates are zero on the
padding (gradients there are zero for a zero-padded model, so the moments stay zero too).
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from typing import Any, ClassVar, NamedTuple

import jax
import jax.numpy as jnp
import optax

from learned_opt.base import Theta
from learned_opt.errors import UserError
from learned_opt.features import flat_layout


def _scalar(value: float) -> jax.Array:
    return jnp.asarray(value, jnp.float32)


def _log(name: str, value: float) -> float:
    """log(value) for a hyperparameter that must be a positive number (else UserError)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not value > 0:
        raise UserError(f"{name} must be a number > 0 (its log is the theta entry), got {value!r}")
    return math.log(value)


class LearnedSGDState(NamedTuple):
    """LearnedSGD keeps no state (an empty NamedTuple, like optax.EmptyState)."""


class LearnedMomentumState(NamedTuple):
    """trace: pytree like params (float32), t <- g + momentum * t (optax.sgd's trace)."""

    trace: Any


class LearnedAdamState(NamedTuple):
    """count: int32 [] updates so far; mu, nu: pytrees like params (float32), the first and
    second moment estimates of optax.adam."""

    count: jax.Array
    mu: Any
    nu: Any


@dataclasses.dataclass(frozen=True)
class LearnedSGD:
    """SGD with a learnable learning rate: update = -exp(log_lr) * g.

    theta = {"log_lr": f32[]}; ``init`` sets it to log(init_lr) whatever the key.
    """

    init_lr: float = 0.1

    name: ClassVar[str] = "learned_sgd"
    supports_mask: ClassVar[bool] = True

    def __post_init__(self):
        _log("LearnedSGD.init_lr", self.init_lr)

    @staticmethod
    def theta_from(lr: float) -> Theta:
        """theta for a given learning rate."""
        return {"log_lr": _scalar(_log("lr", lr))}

    def init(self, key: jax.Array) -> Theta:
        del key  # deterministic: the hyperparameters start at their configured values
        return self.theta_from(self.init_lr)

    def config(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def opt_fn(self, theta: Theta) -> optax.GradientTransformationExtraArgs:
        def init_fn(params: Any) -> LearnedSGDState:
            flat_layout(params)  # float32 leaves only, like every learned optimizer here
            return LearnedSGDState()

        def update_fn(grads, state, params=None, *, loss=None, mask=None, **extra_args):
            del params, loss, extra_args
            lr = jnp.exp(theta["log_lr"])
            return _masked(jax.tree.map(lambda g: -lr * g, grads), mask), state

        return optax.GradientTransformationExtraArgs(init_fn, update_fn)


@dataclasses.dataclass(frozen=True)
class LearnedMomentum:
    """SGD with heavy-ball momentum, as optax.sgd(lr, momentum):
    t <- g + momentum * t;  update = -lr * t.

    theta = {"log_lr": f32[], "log_one_minus_momentum": f32[]}.
    """

    init_lr: float = 0.1
    init_momentum: float = 0.9

    name: ClassVar[str] = "learned_momentum"
    supports_mask: ClassVar[bool] = True

    def __post_init__(self):
        _log("LearnedMomentum.init_lr", self.init_lr)
        _log("1 - LearnedMomentum.init_momentum", 1.0 - self.init_momentum)

    @staticmethod
    def theta_from(lr: float, momentum: float) -> Theta:
        return {
            "log_lr": _scalar(_log("lr", lr)),
            "log_one_minus_momentum": _scalar(_log("1 - momentum", 1.0 - momentum)),
        }

    def init(self, key: jax.Array) -> Theta:
        del key
        return self.theta_from(self.init_lr, self.init_momentum)

    def config(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def opt_fn(self, theta: Theta) -> optax.GradientTransformationExtraArgs:
        def init_fn(params: Any) -> LearnedMomentumState:
            flat_layout(params)
            return LearnedMomentumState(trace=optax.tree.zeros_like(params))

        def update_fn(grads, state, params=None, *, loss=None, mask=None, **extra_args):
            del params, loss, extra_args
            lr = jnp.exp(theta["log_lr"])
            momentum = 1.0 - jnp.exp(theta["log_one_minus_momentum"])
            trace = jax.tree.map(lambda g, t: g + momentum * t, grads, state.trace)
            updates = _masked(jax.tree.map(lambda t: -lr * t, trace), mask)
            return updates, LearnedMomentumState(trace)

        return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def _masked(updates: Any, mask: Any) -> Any:
    """``updates`` zeroed where ``mask`` (a pytree like them, or None) is 0."""
    return updates if mask is None else jax.tree.map(lambda u, m: u * m, updates, mask)


def _safe_sqrt(x: jax.Array) -> jax.Array:
    """sqrt with derivative 0 (not inf) at x = 0; the same values as jnp.sqrt.

    A coordinate whose gradient is always 0 (digits' constant border pixels) has nu = 0, and
    sqrt's infinite slope there times a zero tangent gives NaN meta-gradients under backprop.
    Where nu stays 0 its true derivative is 0; the double where keeps NaN out of both branches.
    """
    positive = x > 0
    return jnp.where(positive, jnp.sqrt(jnp.where(positive, x, 1.0)), 0.0)


@dataclasses.dataclass(frozen=True)
class LearnedAdam:
    """Adam (Kingma & Ba 2015) with learnable lr, beta1, beta2, eps, as optax.adam:
    mu <- b1 mu + (1-b1) g;  nu <- b2 nu + (1-b2) g^2;  k <- k + 1;
    update = -lr * (mu / (1 - b1^k)) / (sqrt(nu / (1 - b2^k)) + eps).

    theta = {"log_lr", "log_one_minus_b1", "log_one_minus_b2", "log_eps"} (f32[] each).
    """

    init_lr: float = 1e-3
    init_b1: float = 0.9
    init_b2: float = 0.999
    init_eps: float = 1e-8

    name: ClassVar[str] = "learned_adam"
    supports_mask: ClassVar[bool] = True

    def __post_init__(self):
        self.theta_from(self.init_lr, self.init_b1, self.init_b2, self.init_eps)

    @staticmethod
    def theta_from(lr: float, b1: float, b2: float, eps: float) -> Theta:
        return {
            "log_lr": _scalar(_log("lr", lr)),
            "log_one_minus_b1": _scalar(_log("1 - b1", 1.0 - b1)),
            "log_one_minus_b2": _scalar(_log("1 - b2", 1.0 - b2)),
            "log_eps": _scalar(_log("eps", eps)),
        }

    def init(self, key: jax.Array) -> Theta:
        del key
        return self.theta_from(self.init_lr, self.init_b1, self.init_b2, self.init_eps)

    def config(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def opt_fn(self, theta: Theta) -> optax.GradientTransformationExtraArgs:
        def init_fn(params: Any) -> LearnedAdamState:
            flat_layout(params)
            zeros = optax.tree.zeros_like(params)
            return LearnedAdamState(count=jnp.zeros([], jnp.int32), mu=zeros, nu=zeros)

        def update_fn(grads, state, params=None, *, loss=None, mask=None, **extra_args):
            del params, loss, extra_args
            lr = jnp.exp(theta["log_lr"])
            one_minus_b1 = jnp.exp(theta["log_one_minus_b1"])
            one_minus_b2 = jnp.exp(theta["log_one_minus_b2"])
            b1, b2 = 1.0 - one_minus_b1, 1.0 - one_minus_b2
            eps = jnp.exp(theta["log_eps"])
            mu = jax.tree.map(lambda m, g: b1 * m + one_minus_b1 * g, state.mu, grads)
            nu = jax.tree.map(lambda v, g: b2 * v + one_minus_b2 * g * g, state.nu, grads)
            count = state.count + 1  # int32: far from overflow at any horizon used here
            k = count.astype(jnp.float32)
            mu_correction, nu_correction = 1.0 - b1**k, 1.0 - b2**k  # bias corrections
            updates = jax.tree.map(
                lambda m, v: -lr * (m / mu_correction) / (_safe_sqrt(v / nu_correction) + eps),
                mu, nu,
            )
            return _masked(updates, mask), LearnedAdamState(count, mu, nu)

        return optax.GradientTransformationExtraArgs(init_fn, update_fn)
