"""The diagnostic sections: ``[surface]``, ``[dynamics]`` and ``[variance]``.

A diagnostic's config file is a meta-training config (``[task]``, ``[lopt]``, ``[problem]``,
``[run]``, ...: the inner problem, the learned optimizer and its meta-loss) plus the one section
of its command, e.g. ``learned-opt surface`` reads ``[surface]``. ``load_diagnostic_config``
validates both before any compute, with the same messages as meta-training (unknown key, wrong
type, out of range: named by its dotted key); ``--set surface.num_points=33`` overrides a key of
the section like any other.

Shared conventions of the sections:
  * ``direction``: how a direction d through theta is chosen (``diagnostics.surface``):
    "paper" (random normal, ||d||_2 = number of meta-parameters), "per_tensor" (each leaf of d
    rescaled to the norm of theta's leaf), or the name of a scalar leaf of theta (a
    hyper-parameter axis such as "log_lr" of the hyper-parameter optimizers: a unit step of
    that hyper-parameter). A name is checked against theta when the job starts.
  * ``seed``: the diagnostic's own keys (directions, episodes, perturbations), independent of
    ``run.seed`` (which seeds theta's init, as in meta-training).
  * ``run.devices`` splits the work over devices as in meta-training (0 = all local devices).
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

from learned_opt.errors import UserError
from outer_train.config.files import apply_overrides, load_toml
from outer_train.config.schema import MetaTrainConfig, config_from_dict
from outer_train.config.validate import field, from_mapping

RANDOM_DIRECTIONS: tuple[str, ...] = ("paper", "per_tensor")
Mode = Literal["fixed_batch", "common"]


def check_horizons(key: str, horizons: Sequence[int], *, hi: int = 1_000_000) -> None:
    """Unroll lengths: a non-empty, strictly increasing list of ints in [1, hi]."""
    ok = bool(horizons) and all(1 <= t <= hi for t in horizons)
    ok = ok and all(a < b for a, b in itertools.pairwise(horizons))
    if not ok:
        raise UserError(
            f"{key} = {list(horizons)}: expected a non-empty, increasing list of unroll lengths "
            f"in [1, {hi}], e.g. [8, 32, 128]"
        )


def check_direction(key: str, direction: str) -> None:
    if not direction or not isinstance(direction, str):
        raise UserError(
            f"{key} = {direction!r}: expected one of {list(RANDOM_DIRECTIONS)} or the name of a "
            "scalar leaf of theta (e.g. 'log_lr')"
        )


@dataclasses.dataclass(frozen=True)
class SurfaceConfig:
    """``learned-opt surface``: the meta-loss on a 1-D or 2-D slice through theta.

    1-D (one entry in ``directions``): theta0 + a d for ``num_points`` values of a evenly spaced
    in [center - radius, center + radius]. 2-D (two entries): theta0 + a d1 + b d2 on a
    ``num_points`` x ``num_points`` grid, both coordinates in that interval (``center`` shifts
    a only). The meta-loss at unroll length T is the mean of the first T per-step meta-losses
    ([problem] decides them: ``loss_transform = "log"`` is the paper's log of the training
    loss) of one episode of max(horizons) steps. ``mode``: "fixed_batch" (one init and one
    batch for every step and point, the paper's) or "common" (fresh batches per step, the same
    at every point). ``num_smoothing`` > 0 adds the Gaussian-smoothed slice: the mean over that
    many perturbations eps ~ N(0, sigma^2 I), the same ones at every point (1-D only).
    ``points_per_call``: points evaluated by one jitted call (0 = auto: about 64 episodes).
    """

    directions: tuple[str, ...] = ("paper",)
    num_points: int = field(65, lo=2, hi=100_000)
    radius: float = field(0.01, lo=0.0, hi=1e6, lo_open=True)
    center: float = field(0.0, lo=-1e6, hi=1e6)
    horizons: tuple[int, ...] = (8, 32, 128)
    mode: Mode = "fixed_batch"
    num_smoothing: int = field(0, lo=0, hi=100_000)
    sigma: float = field(0.01, lo=0.0, hi=10.0, lo_open=True)
    points_per_call: int = field(0, lo=0, hi=1_000_000)
    seed: int = field(0, lo=0, hi=2**31 - 1)

    def __post_init__(self):
        if len(self.directions) not in (1, 2):
            raise UserError(
                f"surface.directions = {list(self.directions)}: expected one direction (a 1-D "
                "slice) or two (a 2-D surface), e.g. ['paper'] or ['log_lr', 'log_one_minus_beta1']"
            )
        for i, d in enumerate(self.directions):
            check_direction(f"surface.directions[{i}]", d)
        check_horizons("surface.horizons", self.horizons)
        if len(self.directions) == 2 and self.num_smoothing > 0:
            raise UserError(
                "surface.num_smoothing > 0 needs a 1-D slice (one direction); a 2-D surface is "
                "raw only: set surface.num_smoothing = 0"
            )


@dataclasses.dataclass(frozen=True)
class DynamicsConfig:
    """``learned-opt dynamics``: the Jacobians of the inner-training map along a trajectory.

    The trajectory: the task trained by the learned optimizer at theta = theta0 + shift d
    (``optimizer = "lopt"``) or by an optax optimizer for comparison ("adam", "sgd",
    "momentum" at ``learning_rate``), for max(horizons) steps under ``mode``'s batches (as in
    ``[surface]``), from ``num_seeds`` inits (the seed's keys).
    """

    optimizer: Literal["lopt", "adam", "sgd", "momentum"] = "lopt"
    learning_rate: float = field(1e-3, lo=0.0, hi=100.0, lo_open=True)
    direction: str = "paper"
    shift: float = field(0.0, lo=-1e6, hi=1e6)
    horizons: tuple[int, ...] = (8, 32, 128, 512)
    mode: Mode = "fixed_batch"
    jacobian_steps: tuple[int, ...] = (0, 10, 100)
    power_iterations: int = field(30, lo=1, hi=10_000)
    num_vectors: int = field(4, lo=1, hi=1024)
    num_seeds: int = field(2, lo=1, hi=1024)
    renorm_every: int = field(1, lo=1, hi=1_000_000)
    gradient_norms: bool = True
    seed: int = field(0, lo=0, hi=2**31 - 1)

    def __post_init__(self):
        check_direction("dynamics.direction", self.direction)
        check_horizons("dynamics.horizons", self.horizons)
        if any(s < 0 or s >= self.horizons[-1] for s in self.jacobian_steps):
            raise UserError(
                f"dynamics.jacobian_steps = {list(self.jacobian_steps)}: each step must be in "
                f"[0, max(dynamics.horizons)) = [0, {self.horizons[-1]})"
            )


@dataclasses.dataclass(frozen=True)
class VarianceConfig:
    """``learned-opt variance``: the variance of each outer-gradient estimator vs unroll length.

    For every estimator in ``estimators`` and every T in ``horizons``: ``num_draws`` independent
    draws at fixed theta = theta0 + shift d and fixed estimator state, against a reference
    gradient. ``trunc_length``: K of the windowed estimators (a fixed K with growing T = more
    windows per episode). ``num_tasks`` / ``num_perturbations`` / ``sigma``: the estimators'
    knobs. ``start``: "fresh" (the estimator's initial state) or "warm" (its state after
    ``warmup_steps`` estimates at fixed theta).
    """

    estimators: tuple[str, ...] = ("full_bptt", "tbptt", "pes", "nres")
    horizons: tuple[int, ...] = (8, 32, 128)
    trunc_length: int = field(8, lo=1, hi=1_000_000)
    num_draws: int = field(32, lo=2, hi=1_000_000)
    num_tasks: int = field(1, lo=1, hi=4096)
    num_perturbations: int = field(1, lo=1, hi=4096)
    sigma: float = field(0.01, lo=0.0, hi=10.0, lo_open=True)
    start: Literal["fresh", "warm"] = "fresh"
    warmup_steps: int = field(0, lo=0, hi=1_000_000)
    direction: str = "paper"
    shift: float = field(0.0, lo=-1e6, hi=1e6)
    seed: int = field(0, lo=0, hi=2**31 - 1)

    def __post_init__(self):
        check_direction("variance.direction", self.direction)
        check_horizons("variance.horizons", self.horizons)


DIAGNOSTIC_SECTIONS: dict[str, type] = {
    "surface": SurfaceConfig,
    "dynamics": DynamicsConfig,
    "variance": VarianceConfig,
}


def diagnostic_config_from_dict(
    data: Mapping[str, Any], section: str
) -> tuple[MetaTrainConfig, Any]:
    """(meta-training config, section dataclass) from a TOML-shaped dict; ``UserError`` for
    any bad key, and for another diagnostic's section (it would be silently ignored)."""
    if section not in DIAGNOSTIC_SECTIONS:
        raise ValueError(f"unknown diagnostic section {section!r}")
    others = sorted(set(data) & (set(DIAGNOSTIC_SECTIONS) - {section}))
    if others:
        raise UserError(
            f"[{others[0]}] is not read by `learned-opt {section}` (it reads [{section}] and the "
            f"meta-training sections); remove it or run `learned-opt {others[0]}`"
        )
    rest = {k: v for k, v in data.items() if k != section}
    table = data.get(section, {})
    if not isinstance(table, Mapping):
        raise UserError(f"[{section}] must be a table of keys, got {table!r}")
    cls = DIAGNOSTIC_SECTIONS[section]
    return config_from_dict(rest), from_mapping(cls, table, section)


def load_diagnostic_config(
    path: str | Path | None, overrides: Sequence[str], section: str
) -> tuple[MetaTrainConfig, Any]:
    """Loads a diagnostic's config: the defaults, updated by the TOML file, then ``--set``s
    (which may also name ``section``); validated before any compute."""
    data = load_toml(path) if path is not None else {}
    return diagnostic_config_from_dict(apply_overrides(data, overrides, extra=(section,)),
                                       section)
