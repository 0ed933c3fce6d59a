"""MLPLOpt: the per-parameter MLP learned optimizer (Metz et al. 2019/2022; 2021 Fig. 3).

For every scalar parameter p of the inner model, at inner step t (counted from 0):

    m_i      <- decay_i * m_i + (1 - decay_i) * g                  (momenta, i = 1..D)
    x        =  [g, p, m_1, ..., m_D]                              (F per-parameter features)
    x_f      <- x_f / sqrt(mean_{tensor of p}(x_f ** 2) + 1e-5)    (per-tensor 2nd moment)
    s        =  [tanh(t / tau - 1) for tau in time_scales]         (S shared time features)
    d, m     =  MLP([x, s])                                        (ReLU MLP, 2 outputs)
    update   =  -d * exp(m * exp_mult) * step_mult                 (exp_mult = step_mult = 1e-3)

Defaults are the reference architecture: D = 6 decays (0.1, 0.5, 0.9, 0.99, 0.999, 0.9999),
S = 11 time scales (1, 3, 10, ..., 1e5), 19 inputs, hidden (32, 32), 2 outputs: 1762
meta-parameters (19*32+32 + 32*32+32 + 32*2+2).

How it is made fast (it runs millions of times inside meta-training, vmapped over particles):
  * All parameter tensors are ONE flat [P_total] vector (``features.FlatLayout``); the MLP is one
    chain over [P_total, ...] matrices, not one per leaf. Per-tensor second moments are
    segment statistics (one small reduction per leaf and feature, static slices), and the
    feature matrix is written once, already normalized (``features.momenta_and_features``).
  * Time features are the same for every parameter, so their first-layer contribution
    ``s @ W0[F:] + b0`` is a [H0] bias computed once per step (hoisted).
  * Momenta live in one float32 [P_total, D] array updated by one fused elementwise op.
  * The first layer (F = 8 inputs) is F multiply-adds per unit, fused by XLA with its bias and
    ReLU into one pass; the other layers are matmuls (``per_param_mlp``). When P_total exceeds
    ``per_param_mlp.ROW_TILE`` the chain runs over row tiles so [tile, 32] intermediates stay
    in cache.
  * Backprop through the update (TBPTT, full backprop, hybrid) uses ONE hand-written VJP for
    the whole per-parameter part (``_per_param_update``): it saves only the flat gradient,
    params and old momenta per step (plus two output terms per parameter) and recomputes
    features and activations; JAX's own transpose of these ops is much slower on CPU (see
    ``per_param_mlp``). The price: reverse mode only -- forward-mode AD through the update
    (``jax.jvp``, ``jacfwd``) raises JAX's "can't apply forward-mode autodiff (jvp) to a
    custom_vjp function".
  FLOPs per parameter per step (``flops_per_param()``, multiply and add counted separately):
  2,833 with the defaults -- momenta 18, normalization 24 (second moments 16, scaling 8), first
  layer 544 (8 multiply-adds x 32 units + ReLU), second layer 2,112 (2*32*32 + bias + ReLU),
  output 130, final update 5. Without the hoisting the first layer alone would cost
  2*19*32 + 64 = 1,280 instead of 544.

Initialization (``init``): LeCun-normal hidden layers, zero biases, output weights scaled by
``init_output_scale`` (1e-2), plus one planted path that makes the fresh optimizer a small-step
descent method: two hidden units per layer carry +x and -x of one normalized input (the
momentum whose decay is closest to 0.9, else the gradient), and since relu(x) - relu(-x) = x,
the direction output is ``d ~= init_descent_gain * x`` (update ~ -1e-3 * normalized momentum).
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Callable
from typing import Any, ClassVar, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from learned_opt import features, per_param_mlp
from learned_opt.base import Theta
from learned_opt.errors import UserError


class MLPLOptState(NamedTuple):
    """MLPLOpt's optax state (it never holds the params).

    momenta: float32 [P_total, num_decays], row p = momenta of flat parameter p
      (params flattened in ``jax.tree`` order, see ``features.FlatLayout``).
    step: int32 [], number of updates applied so far (the t of the time features).
    """

    momenta: jax.Array
    step: jax.Array


class DenseParams(nn.Module):
    """The kernel [in, out] and bias [out] of one dense layer; ``per_param_mlp`` applies them."""

    in_features: int
    features: int
    kernel_init: Callable = nn.initializers.lecun_normal()

    def setup(self):
        self.kernel = self.param(
            "kernel", self.kernel_init, (self.in_features, self.features), jnp.float32
        )
        self.bias = self.param("bias", nn.initializers.zeros_init(), (self.features,), jnp.float32)


class PerParamMLP(nn.Module):
    """The per-parameter MLP: ReLU hidden layers, outputs (direction, magnitude) -> step size.

    Parameters are those of Dense layers on the concatenated input [x, s] (first kernel
    [F + S, H_0]), but the shared part is hoisted: ``shared_bias(s) = s @ kernel[F:] + bias`` is
    computed once per step, and ``__call__(x, shared_bias)`` maps normalized per-parameter
    features [N, F] to step sizes [N] with ``per_param_mlp.step_sizes`` (fused forward,
    hand-written backward).
    """

    hidden_sizes: tuple[int, ...]
    num_param_features: int
    num_shared_features: int
    output_init_scale: float
    exp_mult: float
    step_mult: float

    def setup(self):
        inputs = (self.num_param_features + self.num_shared_features, *self.hidden_sizes[:-1])
        self.hidden = [DenseParams(i, o) for i, o in zip(inputs, self.hidden_sizes, strict=True)]
        self.output = DenseParams(
            self.hidden_sizes[-1], 2,
            kernel_init=nn.initializers.variance_scaling(
                self.output_init_scale**2, "fan_in", "truncated_normal"
            ),
        )

    def shared_bias(self, shared: jax.Array) -> jax.Array:
        """[S] -> [H_0]."""
        first = self.hidden[0]
        return shared @ first.kernel[self.num_param_features :] + first.bias

    def weights(self) -> per_param_mlp.Weights:
        """The per-parameter part of the weights, as ``per_param_mlp`` takes them."""
        return per_param_mlp.Weights(
            first=self.hidden[0].kernel[: self.num_param_features],
            hidden=tuple((layer.kernel, layer.bias) for layer in self.hidden[1:]),
            out_kernel=self.output.kernel,
            out_bias=self.output.bias,
        )

    def __call__(self, x: jax.Array, shared_bias: jax.Array) -> jax.Array:
        scales = per_param_mlp.Scales(self.exp_mult, self.step_mult)
        return per_param_mlp.step_sizes(self.weights(), x, shared_bias, scales)


def _per_param_update(layout: features.FlatLayout, decays, eps: float, scales):
    """The per-parameter part of one MLPLOpt update as ONE custom VJP:
    (weights, shared_bias, g, params or None, momenta, counts or None)
        -> (step sizes [P], new momenta [P, D]).

    It saves only its inputs (the flat gradient, params and old momenta: what backprop through
    an unroll stores per step) and the output terms ``per_param_mlp.Saved`` (two floats per
    parameter), and recomputes features and activations in the backward pass, which chains
    the two hand-written VJPs (``per_param_mlp.backward``, ``features.momenta_and_features_vjp``).
    ``counts`` (real entries per leaf, for a padded params pytree) is a constant: zero cotangent.
    """

    def forward(weights, shared_bias, g, params, momenta, counts):
        x, new_momenta = features.momenta_and_features(
            layout, g, params, momenta, decays, eps, counts
        )
        return per_param_mlp.forward(weights, x, shared_bias, scales), new_momenta

    @jax.custom_vjp
    def update(weights, shared_bias, g, params, momenta, counts):
        return forward(weights, shared_bias, g, params, momenta, counts)

    def update_fwd(*inputs):
        weights, shared_bias, g, params, momenta, counts = inputs
        x, new_momenta = features.momenta_and_features(
            layout, g, params, momenta, decays, eps, counts
        )
        step, saved = per_param_mlp.forward_saving(weights, x, shared_bias, scales)
        return (step, new_momenta), (inputs, saved)

    def update_bwd(residuals, cotangents):
        (weights, shared_bias, g, params, momenta, counts), saved = residuals
        d_step, d_new_momenta = cotangents
        x, _ = features.momenta_and_features(layout, g, params, momenta, decays, eps, counts)
        dw, dx, d_shared_bias = per_param_mlp.backward(
            weights, x, shared_bias, scales, d_step, saved
        )
        dg, dparams, dmomenta = features.momenta_and_features_vjp(
            layout, g, params, momenta, decays, eps, dx, d_new_momenta, counts
        )
        d_counts = jax.tree.map(jnp.zeros_like, counts)
        return dw, d_shared_bias, dg, dparams, dmomenta, d_counts

    update.defvjp(update_fwd, update_bwd)
    return update


@dataclasses.dataclass(frozen=True)
class MLPLOpt:
    """Per-parameter MLP learned optimizer (see the module docstring for the math and cost).

    Static configuration only; ``theta`` (from ``init``) is the flax params dict
    ``{"hidden_0": {"kernel": [F+S, H0], "bias": [H0]}, "hidden_1": ..., "output": ...}``.

    hidden_sizes: widths of the ReLU hidden layers (at least one, each >= 2).
    decays: momentum decays in [0, 1); one momentum feature each.
    time_scales: tau > 0 of the time features tanh(t / tau - 1).
    use_params: include the parameter value as a feature.
    step_mult, exp_mult: update = -d * exp(m * exp_mult) * step_mult.
    norm_eps: eps in x / sqrt(mean(x^2) + eps).
    init_descent_gain, init_output_scale: initialization only (see module docstring).
    """

    hidden_sizes: tuple[int, ...] = (32, 32)
    decays: tuple[float, ...] = features.DEFAULT_DECAYS
    time_scales: tuple[float, ...] = features.DEFAULT_TIME_SCALES
    use_params: bool = True
    step_mult: float = 1e-3
    exp_mult: float = 1e-3
    norm_eps: float = 1e-5
    init_descent_gain: float = 1.0
    init_output_scale: float = 1e-2

    name: ClassVar[str] = "mlp_lopt"
    supports_mask: ClassVar[bool] = True

    def __post_init__(self):
        set_ = lambda k, v: object.__setattr__(self, k, v)
        try:
            set_("hidden_sizes", tuple(int(w) for w in self.hidden_sizes))
            set_("decays", tuple(float(d) for d in self.decays))
            set_("time_scales", tuple(float(t) for t in self.time_scales))
            for k in ("step_mult", "exp_mult", "norm_eps", "init_descent_gain",
                      "init_output_scale"):
                set_(k, float(getattr(self, k)))
        except (TypeError, ValueError) as e:
            raise UserError(f"MLPLOpt: bad config value ({e})") from None
        if not isinstance(self.use_params, bool):
            raise UserError(f"MLPLOpt.use_params must be true or false, got {self.use_params!r}")
        if not self.hidden_sizes or min(self.hidden_sizes) < 2:
            raise UserError(
                f"MLPLOpt.hidden_sizes must list at least one width, each >= 2; "
                f"got {self.hidden_sizes}"
            )
        if any(not 0.0 <= d < 1.0 for d in self.decays):
            raise UserError(f"MLPLOpt.decays must lie in [0, 1); got {self.decays}")
        if any(not t > 0 for t in self.time_scales):
            raise UserError(f"MLPLOpt.time_scales must be > 0; got {self.time_scales}")
        for k in ("step_mult", "exp_mult", "norm_eps"):
            if not getattr(self, k) > 0:
                raise UserError(f"MLPLOpt.{k} must be > 0; got {getattr(self, k)}")

    # -- architecture ---------------------------------------------------------------------

    @property
    def num_param_features(self) -> int:
        """F: gradient, (parameter), one momentum per decay."""
        return 1 + int(self.use_params) + len(self.decays)

    @property
    def num_inputs(self) -> int:
        """F + S: the MLP's input width (19 for the reference architecture)."""
        return self.num_param_features + len(self.time_scales)

    def flops_per_param(self) -> int:
        """FLOPs per parameter per update (multiply and add counted separately; exp as 1)."""
        f, h = self.num_param_features, self.hidden_sizes
        flops = 3 * len(self.decays)  # momenta: decay * m + (1 - decay) * g
        flops += 2 * f + f  # second moments (square, add); scaling
        flops += 2 * f * h[0] + h[0]  # first layer: F multiply-adds per unit onto the bias; ReLU
        for a, b in itertools.pairwise(h):
            flops += 2 * a * b + 2 * b  # matmul, bias, ReLU
        return flops + 2 * h[-1] * 2 + 2 + 5  # output layer; -d * exp(m * c1) * c2

    def _module(self) -> PerParamMLP:
        return PerParamMLP(
            self.hidden_sizes, self.num_param_features, len(self.time_scales),
            self.init_output_scale, self.exp_mult, self.step_mult,
        )

    def _descent_input(self) -> int:
        """Index of the input that the planted descent path reads (see module docstring)."""
        if not self.decays:
            return 0
        closest = int(np.argmin(np.abs(np.asarray(self.decays) - 0.9)))
        return 1 + int(self.use_params) + closest

    # -- LearnedOptimizer protocol -----------------------------------------------------------

    def init(self, key: jax.Array) -> Theta:
        """Fresh meta-parameters: a flax params dict of float32 arrays (deterministic in key)."""
        return _jitted_init(self, key)

    def _init(self, key: jax.Array) -> Theta:
        dummy_x = jnp.zeros((1, self.num_param_features), jnp.float32)
        dummy_bias = jnp.zeros((self.hidden_sizes[0],), jnp.float32)
        theta = self._module().init(key, dummy_x, dummy_bias)["params"]
        return self._plant_descent_path(theta)

    def _plant_descent_path(self, theta: Theta) -> Theta:
        theta = jax.tree.map(lambda x: x, theta)  # fresh dicts; leaves are immutable arrays
        i = self._descent_input()
        k0 = theta["hidden_0"]["kernel"].at[:, :2].set(0.0)
        theta["hidden_0"]["kernel"] = k0.at[i, 0].set(1.0).at[i, 1].set(-1.0)
        for layer in range(1, len(self.hidden_sizes)):
            k = theta[f"hidden_{layer}"]["kernel"].at[:, :2].set(0.0)
            theta[f"hidden_{layer}"]["kernel"] = k.at[0, 0].set(1.0).at[1, 1].set(1.0)
        # hidden biases start at zero (flax default), so the path carries exactly relu(+-x).
        gain = self.init_descent_gain
        k_out = theta["output"]["kernel"].at[:2, :].set(0.0)
        theta["output"]["kernel"] = k_out.at[0, 0].set(gain).at[1, 0].set(-gain)
        return theta

    def config(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def opt_fn(self, theta: Theta) -> optax.GradientTransformationExtraArgs:
        """The optax transformation of ``theta``;
        ``update(grads, state, params, *, loss=None, mask=None)``.

        ``params`` is required when ``use_params`` (the default); ``loss`` is accepted and
        unused. All leaves must be float32. State: ``MLPLOptState``.
        ``mask``: None, or a float32 pytree like params of 1 (a real entry) and 0 (padding):
        padding entries of grads and params are read as 0, get update 0, and the per-tensor
        second moments average over the real entries only, so a model padded with zeros
        trains like the unpadded one (to float rounding; ``tasks.padded_mlp``).
        """
        module = self._module()
        scales = per_param_mlp.Scales(self.exp_mult, self.step_mult)

        def init_fn(params: Any) -> MLPLOptState:
            layout = features.flat_layout(params)
            return MLPLOptState(
                momenta=jnp.zeros((layout.total, len(self.decays)), jnp.float32),
                step=jnp.zeros([], jnp.int32),
            )

        def update_fn(
            grads: Any, state: MLPLOptState, params: Any = None, *, loss: Any = None,
            mask: Any = None, **extra_args: Any,
        ) -> tuple[Any, MLPLOptState]:
            del loss, extra_args  # part of the protocol; this architecture does not read them
            layout = features.flat_layout(grads, what="grads")
            if state.momenta.shape != (layout.total, len(self.decays)):
                raise UserError(
                    f"MLPLOpt state has momenta of shape {state.momenta.shape} but the grads "
                    f"have {layout.total} elements; call init(params) with these params"
                )
            g = features.flatten(layout, grads)
            flat_params = None
            if self.use_params:
                if params is None:
                    raise UserError(
                        "MLPLOpt reads the parameter values: call update(grads, state, params)"
                    )
                features.check_same_layout(layout, params, "params")
                flat_params = features.flatten(layout, params)
            counts = flat_mask = None
            if mask is not None:
                counts = features.masked_counts(layout, mask)
                flat_mask = features.flatten(layout, mask)
                g = g * flat_mask
                if flat_params is not None:
                    flat_params = flat_params * flat_mask
            variables = {"params": theta}
            shared = features.time_features(state.step, self.time_scales)  # [S]
            shared_bias = module.apply(variables, shared, method=PerParamMLP.shared_bias)
            weights = module.apply(variables, method=PerParamMLP.weights)
            update = _per_param_update(layout, self.decays, self.norm_eps, scales)
            step, momenta = update(weights, shared_bias, g, flat_params, state.momenta, counts)
            if flat_mask is not None:
                step = step * flat_mask
            # int32 step: overflows after 2**31 updates, far beyond any horizon here.
            return features.unflatten(layout, -step), MLPLOptState(momenta, state.step + 1)

        return optax.GradientTransformationExtraArgs(init_fn, update_fn)


# One compiled program per architecture (MLPLOpt is hashable) instead of op-by-op dispatch.
_jitted_init = jax.jit(MLPLOpt._init, static_argnums=0)
