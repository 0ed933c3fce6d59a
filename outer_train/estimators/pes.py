"""Persistent evolution strategies (PES; Vicol, Metz, Sohl-Dickstein, ICML 2021).

Each pair keeps its own + and - inner states across windows and an accumulator
xi = sum of the eps drawn since its episode began. Per window, a fresh eps ~ N(0, sigma^2 I):

    xi <- xi + eps;   g = 1/(2 sigma^2) mean_i (L_i^+ - L_i^-) xi_i,

with L^{+/-} the window-mean meta-loss of the + and - unrolls (theta +/- eps, from their own
carried states). If an episode ends inside the window, the steps before the reset use the old
xi + eps, the steps after it only eps, and xi restarts at eps. Unbiased for the gradient of the
Gaussian-smoothed full-horizon meta-loss (averaged over the windows of an episode); its variance
grows with the number of windows per episode, since xi keeps accumulating noise.
"""

from __future__ import annotations

from typing import ClassVar, NamedTuple

import flax.struct
import jax
import jax.numpy as jnp
from jax.flatten_util import ravel_pytree

from outer_train.estimators import knobs
from outer_train.estimators.template import AntitheticTemplate, Ask
from outer_train.unroll import ParticleState, start_particles


class PESState(NamedTuple):
    """particles: leaves [num_tasks * 2 * num_perturbations, ...], per task [pos_1..M, neg_1..M];
    xi: float [num_tasks * num_perturbations, D]: noise accumulated by each pair's episode."""

    particles: ParticleState
    xi: jax.Array


def accumulated_noise(
    xi: jax.Array, eps: jax.Array, restarted: jax.Array
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """PES's noise for one window: (before, after, next xi).

    xi [N, D]: noise accumulated by each pair's episode before this window; eps [N, D]: this
    window's perturbation; restarted bool [N]: the episode ended inside the window. The loss
    difference before a reset multiplies xi + eps, the one after it eps (its episode's only
    noise so far); xi carries on as xi + eps, or restarts at eps.
    """
    return xi + eps, eps, jnp.where(restarted[:, None], eps, xi + eps)


@flax.struct.dataclass
class PES(knobs.AntitheticWindowKnobs, AntitheticTemplate):
    """Knobs: those of ``knobs.AntitheticWindowKnobs``."""

    name: ClassVar[str] = "pes"

    def init(self, key, theta) -> PESState:
        g, m = self.num_tasks, self.num_perturbations
        particles = start_particles(
            self.problem, key, theta, num_groups=g, group_size=2 * m,
            horizon=self.horizon, staggered=self.staggered, theta_axis=None,
        )
        theta_flat = ravel_pytree(theta)[0]
        return PESState(particles, jnp.zeros((g * m, theta_flat.shape[0]), theta_flat.dtype))

    def _ask(self, eps, state: PESState) -> Ask:
        return Ask(eps, None, state.particles)

    def _tell(self, window, state: PESState):
        before, after, xi = accumulated_noise(state.xi, window.eps, window.restarted)
        new_state = PESState(self._reset_diverged_pairs(window), xi)
        return self._episode_gradient(window, before, after), new_state
