"""The one estimate of the antithetic ES estimators (es, truncated_es, pes, nres).

``AntitheticTemplate.estimate`` runs, for G tasks x M antithetic pairs (layout: ``antithetic``):

    keys -> member thetas -> unroll -> split members -> valid pairs -> gradient -> metrics -> resets

and, as evosax's strategies share ask/tell, each estimator supplies only what differs:

    _ask(eps, state) -> Ask:        the members' perturbations (before and after a reset inside
                                    the window) and incoming inner states, from this estimate's
                                    fresh noise eps [N, D] and the estimator state;
    _tell(window, state):           (flat meta-gradient [D], next estimator state) from the
                                    members' losses (``Window``);
    _meta_loss(window):             the reported meta-loss (default: the pairs' mean loss).

``carries_center`` adds one unperturbed member per task after its pairs (truncated ES: it carries
the shared state). Metrics (``metrics.estimator_metrics``): ``num_nonfinite`` counts the member
unrolls with a non-finite loss, ``num_resets`` the tasks whose members began a new episode inside
the window (a task's members reset together). Hybrid backprops through its members and so runs
its own estimate from the same pieces.
"""

from __future__ import annotations

import abc
from typing import ClassVar, NamedTuple, final

import jax
import jax.numpy as jnp
from jax.flatten_util import ravel_pytree

from outer_train.base import EstimatorState, Metrics, PRNGKey, Theta
from outer_train.estimators import antithetic
from outer_train.estimators.metrics import estimator_metrics, finite_unrolls
from outer_train.placement import constrain_particles
from outer_train.unroll import (
    ParticleState,
    force_reset,
    repeat_members,
    start_particles,
    unroll_particles,
    window_keys,
)


class Ask(NamedTuple):
    """What one window unrolls (N = G*M pairs).

    offsets: float [N, D]: pair i's members run at theta + offsets_i and theta - offsets_i.
    reset_offsets: float [N, D] | None: the same for an episode begun inside the window
      (None: ``offsets`` throughout).
    members: ParticleState, leaves [G*S, ...]: the members' incoming states; None: each member
      runs one fresh episode of ``window_length`` steps.
    """

    offsets: jax.Array
    reset_offsets: jax.Array | None
    members: ParticleState | None


class Window(NamedTuple):
    """One window's outcome, split by member role (pairs i = (task, m) are rows g*M + m).

    eps: float [N, D]: this estimate's fresh noise.
    particles: ParticleState, leaves [G*S, ...]: every member after the window.
    pos, neg: float [N, K]: step losses of the + and - members.
    after_reset: bool [N, K]: the step belongs to an episode begun inside the window.
    valid: bool [N]: both members' losses are finite.
    center, center_valid: float [G, K], bool [G] with ``carries_center``; else None.
    num_nonfinite: int []: member unrolls with a non-finite loss.
    """

    eps: jax.Array
    particles: ParticleState
    pos: jax.Array
    neg: jax.Array
    after_reset: jax.Array
    valid: jax.Array
    center: jax.Array | None
    center_valid: jax.Array | None
    num_nonfinite: jax.Array

    @property
    def restarted(self) -> jax.Array:
        """bool [N]: the pair's episode ended inside the window (a new one is under way)."""
        return self.after_reset[:, -1]


def perturbed_thetas(theta_flat, unravel, offsets, num_groups: int, *, with_center: bool):
    """Members' thetas (pytree, leading axis G*S) for flat offsets [N, D]."""
    flat = antithetic.member_thetas(theta_flat, offsets, num_groups, with_center=with_center)
    return jax.vmap(unravel)(flat)


def start_centers(est, key: PRNGKey, theta: Theta) -> ParticleState:
    """One unperturbed particle per task (truncated ES, hybrid), leaves [num_tasks, ...]."""
    return start_particles(
        est.problem, key, theta, num_groups=est.num_tasks, group_size=1,
        horizon=est.horizon, staggered=est.staggered, theta_axis=None,
    )


class AntitheticTemplate(abc.ABC):
    """Mixin for a knobs dataclass (``knobs.AntitheticKnobs``): the final ``estimate`` and its
    hooks (module docstring)."""

    carries_center: ClassVar[bool] = False

    @property
    @abc.abstractmethod
    def window_length(self) -> int:
        """Inner steps per member per estimate (K; T for full-episode ES): from the knobs."""

    @property
    def group_size(self) -> int:
        return 2 * self.num_perturbations + int(self.carries_center)

    @property
    def inner_steps_per_estimate(self) -> int:
        return self.num_tasks * self.group_size * self.window_length

    @abc.abstractmethod
    def _ask(self, eps: jax.Array, state: EstimatorState) -> Ask: ...

    @abc.abstractmethod
    def _tell(self, window: Window, state: EstimatorState) -> tuple[jax.Array, EstimatorState]:
        ...

    def _meta_loss(self, window: Window) -> jax.Array:
        return antithetic.pair_meta_loss(window.pos, window.neg, window.valid)

    @final
    def estimate(
        self, key: PRNGKey, theta: Theta, state: EstimatorState
    ) -> tuple[Theta, EstimatorState, Metrics]:
        g, m = self.num_tasks, self.num_perturbations
        keys = window_keys(key, g, self.window_length)
        theta_flat, unravel = ravel_pytree(theta)
        eps = antithetic.sample_noise(keys.noise, g * m, theta_flat, self.sigma)
        window = self._unroll(keys, theta_flat, unravel, eps, self._ask(eps, state))
        meta_grad, new_state = self._tell(window, state)
        metrics = estimator_metrics(
            meta_loss=self._meta_loss(window),
            num_nonfinite=window.num_nonfinite,
            num_resets=jnp.sum(antithetic.group_any(window.restarted, g)),
            inner_steps=self.inner_steps_per_estimate,
        )
        return unravel(meta_grad), new_state, metrics

    @final
    def _unroll(self, keys, theta_flat, unravel, eps, ask: Ask) -> Window:
        g, m, center = self.num_tasks, self.num_perturbations, self.carries_center
        thetas = perturbed_thetas(theta_flat, unravel, ask.offsets, g, with_center=center)
        reset_thetas = None
        if ask.reset_offsets is not None:
            reset_thetas = perturbed_thetas(
                theta_flat, unravel, ask.reset_offsets, g, with_center=center
            )
        reset_keys, step_keys = repeat_members((keys.reset, keys.step), self.group_size)
        if ask.members is None:  # particles made here: split them over a ``particles`` mesh
            thetas, reset_keys, step_keys = constrain_particles((thetas, reset_keys, step_keys))
        particles, trace = unroll_particles(
            self.problem, thetas, ask.members, reset_keys, step_keys,
            horizon=self.horizon, theta_axis=0, reset_thetas=reset_thetas,
        )
        pos, neg, center_losses = antithetic.split_members(trace.losses, g, m, with_center=center)
        after_reset = antithetic.split_members(trace.after_reset, g, m, with_center=center)[0]
        return Window(
            eps, particles, pos, neg, after_reset, antithetic.pair_valid(pos, neg),
            center_losses, None if center_losses is None else finite_unrolls(center_losses),
            jnp.sum(~finite_unrolls(trace.losses)),
        )

    @final
    def _window_gradient(self, window: Window) -> jax.Array:
        """Every step of the window ran at theta +/- eps: antithetic ES on the window mean."""
        delta = antithetic.shape_difference(
            jnp.mean(window.pos - window.neg, axis=-1), self.loss_shaping, self.shaping_scale
        )
        return antithetic.antithetic_gradient(delta, window.eps, window.valid, self.sigma)

    @final
    def _episode_gradient(
        self, window: Window, noise_before: jax.Array, noise_after: jax.Array
    ) -> jax.Array:
        """Loss differences before and after a reset multiply their own episode's noise."""
        parts = antithetic.split_difference(window.pos, window.neg, window.after_reset)
        before, after = (
            antithetic.shape_difference(d, self.loss_shaping, self.shaping_scale) for d in parts
        )
        return antithetic.split_antithetic_gradient(
            before, after, noise_before, noise_after, window.valid, self.sigma
        )

    @final
    def _reset_diverged_pairs(self, window: Window) -> ParticleState:
        """A diverged pair restarts its whole task (members of a task stay in lockstep)."""
        broken = antithetic.group_any(~window.valid, self.num_tasks)
        return force_reset(window.particles, repeat_members(broken, self.group_size))
