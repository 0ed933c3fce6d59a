"""Problems with known answers, for testing estimators exactly and cheaply.

* ``QuadraticTask``: a Task (tasks/base.py) -- a noisy diagonal quadratic in the params, trained
  by any learned optimizer through ``LearnedOptProblem``.
* ``LinearSystemProblem``: an InnerProblem whose meta-loss is exactly quadratic in theta,
  s_{t+1} = A s_t + B theta + noise; the expected meta-loss and its gradient are known, so
  unbiasedness (ES, PES, NRES) and bias (TBPTT) can be tested statistically.
* ``SinusoidToy``: the 1-D toy of the paper's Fig. 1, with the exact variances of the
  reparameterization and antithetic-ES estimators of its Gaussian-smoothed gradient.
"""

from __future__ import annotations

import math

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np


@flax.struct.dataclass
class QuadraticTask:
    """loss(params, batch) = mean_b 0.5 sum_i h_i (w_i - c_i - n_bi)^2, n ~ N(0, noise_scale^2).

    params: {"w": float [dim]}; a batch is the noise n: float [batch_size, dim]. ``evaluate`` gives
    the expected loss over the noise, 0.5 sum_i h_i ((w_i - c_i)^2 + noise_scale^2).
    curvature h: [dim] log-spaced in [1, condition]; center c: [dim].
    """

    curvature: jax.Array
    center: jax.Array
    noise_scale: float = flax.struct.field(pytree_node=False, default=0.1)
    init_scale: float = flax.struct.field(pytree_node=False, default=1.0)
    batch_size: int = flax.struct.field(pytree_node=False, default=4)
    loss_clip: float = flax.struct.field(pytree_node=False, default=1e3)
    name: str = flax.struct.field(pytree_node=False, default="quadratic")

    @classmethod
    def create(cls, key: jax.Array, dim: int = 8, condition: float = 10.0, **kwargs):
        curvature = jnp.logspace(0.0, math.log10(condition), dim)
        return cls(curvature, jax.random.normal(key, (dim,)), **kwargs)

    def init(self, key: jax.Array):
        return {"w": self.init_scale * jax.random.normal(key, self.center.shape, self.center.dtype)}

    def sample_batch(self, key: jax.Array, split: str = "train") -> jax.Array:
        del split  # every split has the same noise distribution
        shape = (self.batch_size, *self.center.shape)
        return self.noise_scale * jax.random.normal(key, shape, self.center.dtype)

    def loss(self, params, batch: jax.Array) -> jax.Array:
        residual = params["w"] - self.center - batch
        return jnp.mean(0.5 * jnp.sum(self.curvature * residual**2, axis=-1))

    def evaluate(self, params, split: str = "valid") -> dict[str, jax.Array]:
        del split
        residual2 = (params["w"] - self.center) ** 2 + self.noise_scale**2
        return {"loss": 0.5 * jnp.sum(self.curvature * residual2), "accuracy": jnp.nan}


@flax.struct.dataclass
class LinearSystemProblem:
    """Linear dynamics with a quadratic per-step loss (an InnerProblem; theta: float [theta_dim]).

        s_0 = init_mean + init_scale z,            z ~ N(0, I)     (init key)
        s_{t+1} = A s_t + B theta + noise_scale w_t,  w_t ~ N(0, I)   (step key)
        l_t = 0.5 ||s_{t+1} - target||^2

    s_t is affine in (theta, z, w), so every mean-of-steps meta-loss is quadratic in theta and
    its expectation differs from the noise-free one by a theta-independent constant:
    ``expected_meta_loss`` has exactly the gradient every unbiased estimator must average to.
    A: symmetric, eigenvalues spread in [-spectral_radius, spectral_radius] (stable if < 1).
    """

    transition: jax.Array  # A [n, n]
    control: jax.Array  # B [n, m]
    target: jax.Array  # [n]
    init_mean: jax.Array  # [n]
    init_scale: float = flax.struct.field(pytree_node=False, default=0.0)
    noise_scale: float = flax.struct.field(pytree_node=False, default=0.0)

    @classmethod
    def create(
        cls,
        key: jax.Array,
        state_dim: int = 6,
        theta_dim: int = 4,
        spectral_radius: float = 0.9,
        **kwargs,
    ):
        basis_key, eig_key, control_key, target_key, init_key = jax.random.split(key, 5)
        basis, _ = jnp.linalg.qr(jax.random.normal(basis_key, (state_dim, state_dim)))
        eigs = jax.random.uniform(eig_key, (state_dim,), minval=-1.0, maxval=1.0)
        eigs = spectral_radius * eigs / jnp.max(jnp.abs(eigs))
        return cls(
            transition=(basis * eigs) @ basis.T,
            control=jax.random.normal(control_key, (state_dim, theta_dim)) / math.sqrt(theta_dim),
            target=jax.random.normal(target_key, (state_dim,)),
            init_mean=jax.random.normal(init_key, (state_dim,)),
            **kwargs,
        )

    def init(self, theta: jax.Array, key: jax.Array) -> jax.Array:
        del theta
        z = jax.random.normal(key, self.init_mean.shape, self.init_mean.dtype)
        return self.init_mean + self.init_scale * z

    def _advance(self, theta, state, noise):
        new = self.transition @ state + self.control @ theta + noise
        return new, 0.5 * jnp.sum((new - self.target) ** 2)

    def step(self, theta: jax.Array, state: jax.Array, key: jax.Array):
        noise = self.noise_scale * jax.random.normal(key, state.shape, state.dtype)
        return self._advance(theta, state, noise)

    def expected_meta_loss(self, theta: jax.Array, horizon: int) -> jax.Array:
        """(1/T) sum_t l_t on the noise-free trajectory from init_mean: E[meta-loss] - const."""

        def body(state, _):
            return self._advance(theta, state, jnp.zeros_like(state))

        _, losses = jax.lax.scan(body, self.init_mean, None, length=horizon)
        return jnp.mean(losses)


@flax.struct.dataclass
class SinusoidToy:
    """The paper's Fig. 1 toy as a one-step InnerProblem (theta = x: float []; no inner state):

        l(x) = 0.1 sin(x w / pi) + (x / 10)^2 + 0.1,   smoothed by N(0, sigma^2), sigma = 0.3.

    ``frequency`` (w) is a leaf, so changing it does not recompile. Use horizon T = 1.
    """

    frequency: jax.Array

    def loss(self, x: jax.Array) -> jax.Array:
        return 0.1 * jnp.sin(x * self.frequency / jnp.pi) + (x / 10) ** 2 + 0.1

    def init(self, theta: jax.Array, key: jax.Array) -> jax.Array:
        del key
        return jnp.zeros((), jnp.result_type(theta))

    def step(self, theta: jax.Array, state: jax.Array, key: jax.Array):
        del key
        return state, self.loss(theta)


# --- Exact variances of the two estimators of d/dx E_eps l(x + eps) on the toy (float64 numpy).
# With k = w / pi, a = 0.1 k, eps ~ N(0, sigma^2) and the Gaussian identities
#   E cos(m eps) = e^{-m^2 s^2/2},  E eps sin(m eps) = m s^2 e^{-m^2 s^2/2},
#   E eps^2 cos(m eps) = (s^2 - m^2 s^4) e^{-m^2 s^2/2},
#   E eps^3 sin(m eps) = (3 m s^4 - m^3 s^6) e^{-m^2 s^2/2}
# (s = sigma), the variances below are exact (the tests check them against Monte Carlo). For
# large w the reparameterization variance at its worst x tends to
# a^2 / 2 = w^2 / (200 pi^2) = 5.066e-4 w^2: the paper's "5.1e-4 w^2".

REPARAM_ASYMPTOTE = 1.0 / (200.0 * math.pi**2)  # 5.066e-4: max_x Var_rp ~ this * w^2, large w


def toy_reparam_variance(x, w, sigma: float = 0.3) -> np.ndarray:
    """Var_eps[l'(x + eps)]: the reparameterization (backprop) gradient's variance."""
    x, k = np.asarray(x, np.float64), np.asarray(w, np.float64) / np.pi
    a, s2 = 0.1 * k, sigma**2
    var_cos = 0.5 * (1 + np.cos(2 * k * x) * np.exp(-2 * k**2 * s2)) - np.cos(k * x) ** 2 * np.exp(
        -(k**2) * s2
    )
    cov_cos_eps = -s2 * k * np.sin(k * x) * np.exp(-(k**2) * s2 / 2)
    return a**2 * var_cos + s2 / 50**2 + 2 * a / 50 * cov_cos_eps


def toy_es_variance(x, w, sigma: float = 0.3) -> np.ndarray:
    """Variance of one antithetic pair, eps (l(x + eps) - l(x - eps)) / (2 sigma^2).

    The estimate is (0.1 cos(kx) U + 0.02 x V) / sigma^2 with U = eps sin(k eps), V = eps^2.
    """
    x, k = np.asarray(x, np.float64), np.asarray(w, np.float64) / np.pi
    s2 = sigma**2
    e1, e2 = np.exp(-(k**2) * s2 / 2), np.exp(-2 * k**2 * s2)
    mean_u = k * s2 * e1
    var_u = 0.5 * (s2 - (s2 - 4 * k**2 * s2**2) * e2) - mean_u**2
    var_v = 2 * s2**2
    cov_uv = (2 * k * s2**2 - k**3 * s2**3) * e1
    c = np.cos(k * x)
    return (0.01 * c**2 * var_u + 0.0004 * x**2 * var_v + 0.004 * c * x * cov_uv) / s2**2


def toy_max_variance(w, sigma: float = 0.3, *, estimator: str, num_x: int = 4001) -> float:
    """max over x in [-10, 10] of the exact variance ("reparam" or "es"), on a fine grid."""
    fn = {"reparam": toy_reparam_variance, "es": toy_es_variance}[estimator]
    return float(np.max(fn(np.linspace(-10.0, 10.0, num_x), w, sigma)))
