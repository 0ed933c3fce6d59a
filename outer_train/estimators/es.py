"""Antithetic evolution strategies over whole episodes.

    g = 1/(2 sigma^2) mean_{i=(task, m)} eps_i [L(theta + eps_i) - L(theta - eps_i)],
    eps_i ~ N(0, sigma^2 I), L = (1/T) sum_{t<T} l_t over a fresh episode,

i.e. 1/(N sigma^2) sum over N/2 pairs. Unbiased for the gradient of the Gaussian-smoothed
full-horizon meta-loss E_eps L(theta + eps) (exact for a meta-loss quadratic in theta). Uses loss
values only, so its variance stays bounded however chaotic the unroll; it grows with the number
of meta-parameters. The + and - members of a pair, and all M perturbations of one task, share
the episode's init and data keys.
"""

from __future__ import annotations

from typing import ClassVar, NamedTuple

import flax.struct

from outer_train.estimators import knobs
from outer_train.estimators.template import AntitheticTemplate, Ask


class ESState(NamedTuple):
    """Empty: every estimate starts fresh episodes."""


@flax.struct.dataclass
class ES(knobs.AntitheticKnobs, AntitheticTemplate):
    """Knobs: those of ``knobs.AntitheticKnobs``; horizon T is one integer."""

    name: ClassVar[str] = "es"

    def init(self, key, theta) -> ESState:
        del key, theta
        return ESState()

    def _ask(self, eps, state: ESState) -> Ask:
        return Ask(eps, None, None)

    def _tell(self, window, state: ESState):
        return self._window_gradient(window), state
