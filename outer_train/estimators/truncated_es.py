"""Truncated antithetic ES: ES over one K-step window from a shared carried state.

    g = 1/(2 sigma^2) mean_i eps_i [L_w(theta + eps_i; s_t) - L_w(theta - eps_i; s_t)],
    L_w = (1/K) sum_{k<K} l_{t+k},

all members starting from the same unperturbed state s_t. Biased like TBPTT (it estimates the
gradient of the smoothed *window* loss). The carried state is advanced by a third, unperturbed
unroll (the "center"), never by the + member -- carrying a perturbed state forward is a known bug.
"""

from __future__ import annotations

from typing import ClassVar, NamedTuple

import flax.struct
import jax
import jax.numpy as jnp

from outer_train.estimators import knobs
from outer_train.estimators.template import AntitheticTemplate, Ask, start_centers
from outer_train.meta_loss import masked_mean
from outer_train.unroll import ParticleState, force_reset, repeat_members


class TruncatedESState(NamedTuple):
    """particles: the unperturbed (center) particles, leaves [num_tasks, ...]."""

    particles: ParticleState


@flax.struct.dataclass
class TruncatedES(knobs.AntitheticWindowKnobs, AntitheticTemplate):
    """Knobs: those of ``knobs.AntitheticWindowKnobs``."""

    name: ClassVar[str] = "truncated_es"
    carries_center: ClassVar[bool] = True

    def init(self, key, theta) -> TruncatedESState:
        return TruncatedESState(start_centers(self, key, theta))

    def _ask(self, eps, state: TruncatedESState) -> Ask:
        return Ask(eps, None, repeat_members(state.particles, self.group_size))

    def _tell(self, window, state: TruncatedESState):
        carried = jax.tree.map(
            lambda x: x.reshape(self.num_tasks, self.group_size, *x.shape[1:])[:, -1],
            window.particles,
        )
        new_state = TruncatedESState(force_reset(carried, ~window.center_valid))
        return self._window_gradient(window), new_state

    def _meta_loss(self, window):
        return masked_mean(jnp.mean(window.center, axis=-1), window.center_valid)
