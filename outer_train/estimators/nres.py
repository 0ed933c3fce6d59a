"""Noise-reuse evolution strategies (NRES; Li, Harrison, Sohl-Dickstein, Smith, Metz, NeurIPS
2023; the same idea as ES-Single, Vicol, Kolter, Swersky 2023).

One eps ~ N(0, sigma^2 I) per pair per episode, reused in every window until the episode ends:

    g = 1/(2 sigma^2) mean_i (L_i^+ - L_i^-) eps_i,

with L^{+/-} the window-mean meta-loss of the + and - unrolls (theta +/- eps_i, carried states).
An episode that ends inside the window restarts with a new eps: the steps after the reset run
at theta +/- eps_new (and the fresh state is built with it) and their loss difference multiplies
eps_new. Summed over an episode's windows this is exactly antithetic ES on the full episode, so
it is unbiased for the smoothed full-horizon meta-loss and its variance does not grow with the
number of windows (for one pair on a quadratic: (P+1) ||grad||^2, P = number of meta-params).
"""

from __future__ import annotations

from typing import ClassVar, NamedTuple

import flax.struct
import jax
import jax.numpy as jnp
from jax.flatten_util import ravel_pytree

from outer_train.estimators import antithetic, knobs
from outer_train.estimators.template import AntitheticTemplate, Ask, perturbed_thetas
from outer_train.unroll import ParticleState, start_particles


class NRESState(NamedTuple):
    """particles: leaves [num_tasks * 2 * num_perturbations, ...], per task [pos_1..M, neg_1..M];
    eps: float [num_tasks * num_perturbations, D]: the perturbation of each pair's episode."""

    particles: ParticleState
    eps: jax.Array


def reused_noise(
    eps: jax.Array, new_eps: jax.Array, restarted: jax.Array
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """NRES's noise for one window: (before, after, next eps).

    eps [N, D]: each pair's episode perturbation; new_eps [N, D]: this window's fresh draw, used
    by an episode that begins inside the window; restarted bool [N]: the episode ended inside
    the window. The loss difference before a reset multiplies eps, the one after it new_eps;
    the episode's eps carries on, or becomes new_eps.
    """
    return eps, new_eps, jnp.where(restarted[:, None], new_eps, eps)


@flax.struct.dataclass
class NRES(knobs.AntitheticWindowKnobs, AntitheticTemplate):
    """Knobs: those of ``knobs.AntitheticWindowKnobs``."""

    name: ClassVar[str] = "nres"

    def init(self, key, theta) -> NRESState:
        g, m = self.num_tasks, self.num_perturbations
        noise_key, particle_key = jax.random.split(key)
        theta_flat, unravel = ravel_pytree(theta)
        eps = antithetic.sample_noise(noise_key, g * m, theta_flat, self.sigma)
        thetas = perturbed_thetas(theta_flat, unravel, eps, g, with_center=False)
        particles = start_particles(
            self.problem, particle_key, thetas, num_groups=g, group_size=2 * m,
            horizon=self.horizon, staggered=self.staggered, theta_axis=0,
        )
        return NRESState(particles, eps)

    def _ask(self, eps, state: NRESState) -> Ask:
        # The episode's perturbation until a reset; this estimate's fresh one after it.
        return Ask(state.eps, eps, state.particles)

    def _tell(self, window, state: NRESState):
        before, after, eps = reused_noise(state.eps, window.eps, window.restarted)
        new_state = NRESState(self._reset_diverged_pairs(window), eps)
        return self._episode_gradient(window, before, after), new_state
