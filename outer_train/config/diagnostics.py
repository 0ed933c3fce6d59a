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
  * ``run.devices`` splits surface points and variance draws over devices as in meta-training
    (0 = all local devices); dynamics runs on one device (one trajectory per seed).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

from learned_opt.errors import UserError
from outer_train.config.files import apply_overrides, load_toml
from outer_train.config.schema import MetaTrainConfig, config_from_dict
from outer_train.config.validate import check_fields, field, from_mapping

RANDOM_DIRECTIONS: tuple[str, ...] = ("paper", "per_tensor")
Mode = Literal["fixed_batch", "common"]
_DIRECTION = f"{' or '.join(map(repr, RANDOM_DIRECTIONS))} or the name of a scalar leaf of theta"


def horizons_field(default: tuple[int, ...]):
    """Unroll lengths: a non-empty, strictly increasing list of ints in [1, 1e6]."""
    return field(default, lo=1, hi=1_000_000, min_len=1, increasing=True,
                 doc="unroll lengths T, e.g. [8, 32, 128]")


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

    directions: tuple[str, ...] = field(
        ("paper",), min_len=1, max_len=2,
        doc=f"one direction: a 1-D slice, two: a 2-D surface; each {_DIRECTION}")
    num_points: int = field(65, lo=2, hi=100_000)
    radius: float = field(0.01, lo=0.0, hi=1e6, lo_open=True)
    center: float = field(0.0, lo=-1e6, hi=1e6)
    horizons: tuple[int, ...] = horizons_field((8, 32, 128))
    mode: Mode = "fixed_batch"
    num_smoothing: int = field(0, lo=0, hi=100_000)
    sigma: float = field(0.01, lo=0.0, hi=10.0, lo_open=True)
    points_per_call: int = field(0, lo=0, hi=1_000_000)
    seed: int = field(0, lo=0, hi=2**31 - 1)

    def __post_init__(self):
        check_fields(self, "surface")
        for i, d in enumerate(self.directions):
            check_direction(f"surface.directions[{i}]", d)
        if len(self.directions) == 2 and self.num_smoothing > 0:
            raise UserError(
                "surface.num_smoothing > 0 needs a 1-D slice (one direction); a 2-D surface is "
                "raw only: set surface.num_smoothing = 0"
            )


@dataclasses.dataclass(frozen=True)
class DynamicsConfig:
    """``learned-opt dynamics``: the Jacobians of the inner-training map along a trajectory
    (``outer_train.diagnostics.dynamics`` has the formulas).

    The trajectory: the task trained by the learned optimizer at theta = theta0 + shift d
    (``optimizer = "lopt"``; d from ``direction``) or by an optax optimizer for comparison
    ("adam", "sgd", "momentum" at ``learning_rate``; ``shift`` must then be 0), for
    max(horizons) steps under ``mode``'s batches (as in ``[surface]``), from ``num_seeds``
    inits and batch sequences (the seed's keys). Along it: the top singular value and spectral
    radius of the one-step Jacobian at ``jacobian_steps`` (``power_iterations`` products each;
    an increasing list of steps in [0, max(horizons)), possibly empty), the finite-time
    Lyapunov exponent at every T in ``horizons`` from ``num_vectors`` tangents per seed
    (renormalized every ``renorm_every`` steps), and with ``gradient_norms`` (learned
    optimizer only) ||dL_T/dtheta|| by full backprop at every T.
    """

    optimizer: Literal["lopt", "adam", "sgd", "momentum"] = "lopt"
    learning_rate: float = field(1e-3, lo=0.0, hi=100.0, lo_open=True)
    direction: str = field("paper", doc=_DIRECTION)
    shift: float = field(0.0, lo=-1e6, hi=1e6)
    horizons: tuple[int, ...] = horizons_field((8, 32, 128, 512))
    mode: Mode = "fixed_batch"
    jacobian_steps: tuple[int, ...] = field((0, 10, 100), lo=0, hi=999_999, increasing=True,
                                            doc="each < max(dynamics.horizons); [] for none")
    power_iterations: int = field(30, lo=1, hi=10_000)
    num_vectors: int = field(4, lo=1, hi=1024)
    num_seeds: int = field(2, lo=1, hi=1024)
    renorm_every: int = field(1, lo=1, hi=1_000_000)
    gradient_norms: bool = True
    seed: int = field(0, lo=0, hi=2**31 - 1)

    def __post_init__(self):
        check_fields(self, "dynamics")
        check_direction("dynamics.direction", self.direction)
        steps = self.jacobian_steps
        if any(s >= self.horizons[-1] for s in steps):
            raise UserError(
                f"dynamics.jacobian_steps = {list(steps)}: expected an increasing list of steps "
                f"in [0, max(dynamics.horizons)) = [0, {self.horizons[-1]}), e.g. [0, 10, 100] "
                "(or [] for none)"
            )
        if self.optimizer != "lopt" and self.shift != 0:
            raise UserError(
                f"dynamics.shift = {self.shift} moves the learned optimizer's theta, but "
                f"dynamics.optimizer = {self.optimizer!r} has none: set dynamics.shift = 0 or "
                "dynamics.optimizer = 'lopt'"
            )


ESTIMATOR_NAMES: tuple[str, ...] = (
    "full_bptt", "tbptt", "es", "truncated_es", "pes", "nres", "hybrid",
)
EstimatorName = Literal["full_bptt", "tbptt", "es", "truncated_es", "pes", "nres", "hybrid"]
# Knobs the [variance] section itself sets for every estimator (T loop, K rule).
_SET_BY_SECTION: tuple[str, ...] = ("horizon", "trunc_length")


@dataclasses.dataclass(frozen=True)
class VarianceConfig:
    """``learned-opt variance``: the variance of each outer-gradient estimator vs unroll length.

    For every shift a in ``shifts`` (theta = theta0 + a d, d from ``direction``), every T in
    ``horizons`` and every measured estimator: ``num_draws`` independent draws at that fixed
    theta, all from one fixed estimator state, each compared with a reference gradient.

    ``study``: "estimators" measures ``estimators``; "perturbed_backprop" is the paper's
      Fig. 3b: full backprop of L_T at theta + eps, eps ~ N(0, sigma^2 I), one eps per draw
      (full_bptt with sigma = ``sigma``; ``estimators`` and ``backprop_sigma`` are not used).
    One draw, at unroll length T: the estimator runs W consecutive estimates from the fixed
      state and the draw is their mean. Windowed estimators (tbptt, truncated_es, pes, nres,
      hybrid) use K = min(``trunc_length``, T) (0: K = T) and W = T / K windows, so with a fixed
      K a longer T means more windows per episode; full_bptt and es unroll all T steps once
      (W = 1). Every draw thus costs T inner steps per particle and, from a fresh start,
      estimates the gradient of L_T = (1/T) sum_{t<T} l_t (biased for tbptt, truncated_es,
      hybrid with K < T).
    ``start``: "fresh": the state is due for a reset, so every draw starts a new episode at its
      first step (inits, data and noise drawn per draw); "warm": the state after
      ``warmup_steps`` estimates at fixed theta, particles staggered (PES's accumulated noise
      and the carried inner states are then part of the fixed state: draws at a fixed warm
      state can be biased where fresh ones are not).
    ``mode``: "random": every draw draws its own inits and batches; "fixed_batch": one init
      and one batch for every step of every draw (the paper's; only perturbations vary).
    Knobs: ``num_tasks``, ``num_perturbations`` go to every estimator that has them;
      ``sigma`` to the ES family (es, truncated_es, pes, nres, hybrid); full_bptt's smoothing
      is ``backprop_sigma`` (0: plain backprop; > 0: the reparameterization gradient of the
      sigma-smoothed loss, the target of ES). ``knob_overrides``: "estimator.knob=value"
      strings (the value parsed as TOML) for any other knob or one estimator's own value,
      e.g. "es.num_perturbations=8"; horizon and trunc_length are set by this section.
    ``reference``: per (shift, T), the mean of ``reference_draws`` draws of full_bptt (sigma =
      ``backprop_sigma``), es, pes or nres (fresh start), independent of the measured draws;
      "none": no reference (only total variance and SNR). In fixed_batch mode plain backprop
      is deterministic, so 2 draws are taken.
    ``confidence``: level of every interval (and of the bias test).
    ``draws_per_call``: draws vmapped in one jitted call (0 = auto: about 2048 particle inner
      steps per call, at least one per device).
    ``fast_compile``: compile without XLA's backend optimizations (several times faster to
      compile, a few times slower to run): for short runs that compilation dominates.
    """

    study: Literal["estimators", "perturbed_backprop"] = "estimators"
    estimators: tuple[EstimatorName, ...] = field(("full_bptt", "tbptt", "es", "pes", "nres"),
                                                  distinct=True)
    horizons: tuple[int, ...] = horizons_field((8, 32, 128))
    trunc_length: int = field(8, lo=0, hi=1_000_000, doc="0 = K equals T")
    num_draws: int = field(64, lo=3, hi=100_000_000)
    num_tasks: int = field(1, lo=1, hi=4096)
    num_perturbations: int = field(1, lo=1, hi=4096)
    sigma: float = field(0.01, lo=0.0, hi=10.0, lo_open=True)
    backprop_sigma: float = field(0.0, lo=0.0, hi=10.0)
    knob_overrides: tuple[str, ...] = ()
    start: Literal["fresh", "warm"] = "fresh"
    warmup_steps: int = field(0, lo=0, hi=1_000_000)
    mode: Literal["random", "fixed_batch"] = "random"
    reference: Literal["full_bptt", "es", "pes", "nres", "none"] = "full_bptt"
    reference_draws: int = field(256, lo=2, hi=100_000_000)
    shifts: tuple[float, ...] = field((0.0,), lo=-1e6, hi=1e6, min_len=1,
                                      doc="theta = theta0 + shift * direction, e.g. [0.0, 0.005]")
    direction: str = field("paper", doc=_DIRECTION)
    confidence: float = field(0.95, lo=0.5, hi=0.9999)
    draws_per_call: int = field(0, lo=0, hi=100_000_000)
    fast_compile: bool = False
    seed: int = field(0, lo=0, hi=2**31 - 1)

    def __post_init__(self):
        check_fields(self, "variance")
        check_direction("variance.direction", self.direction)
        if self.study == "estimators" and not self.estimators:
            raise UserError("variance.estimators is empty: list at least one, e.g. ['nres']")
        if self.study == "perturbed_backprop":
            default = VarianceConfig.__dataclass_fields__
            for key in ("estimators", "backprop_sigma"):
                if getattr(self, key) != default[key].default:
                    raise UserError(
                        f"variance.{key} is not used by variance.study = 'perturbed_backprop' "
                        "(it measures full backprop at theta + eps, eps ~ N(0, sigma^2 I), "
                        "with sigma = variance.sigma): remove it"
                    )
        if self.start == "fresh" and self.warmup_steps > 0:
            raise UserError(
                f"variance.warmup_steps = {self.warmup_steps} needs variance.start = 'warm' "
                "(a fresh start runs no warm-up): set start = 'warm' or warmup_steps = 0"
            )
        if self.trunc_length > 0 and any(_windowed(n) for n in self.measured()):
            bad = [t for t in self.horizons if t > self.trunc_length and t % self.trunc_length]
            if bad:
                raise UserError(
                    f"variance.horizons: T = {bad[0]} is not a multiple of variance.trunc_length "
                    f"= {self.trunc_length} (a draw runs T / K whole windows): use multiples of "
                    "K, or trunc_length = 0 (K = T)"
                )
        overrides = self.parsed_overrides()  # checks the strings
        for name in overrides:
            if name not in (*self.measured(), self.reference):
                raise UserError(
                    f"variance.knob_overrides: {name!r} is neither measured nor the reference "
                    f"(measured: {list(self.measured())}, reference: {self.reference!r})"
                )
        from outer_train.estimators import validate_knobs  # on first use: imports JAX

        names = set(self.measured()) | ({self.reference} - {"none"})
        for name in sorted(names):
            for t in self.horizons:
                for as_reference in (False, True):
                    if as_reference and name != self.reference:
                        continue
                    try:
                        validate_knobs(name, self.knobs(name, t, reference=as_reference))
                    except UserError as e:
                        raise UserError(f"variance: estimator {name!r} at T = {t}: {e}") from None

    # -- derived ---------------------------------------------------------------------------

    def measured(self) -> tuple[str, ...]:
        """The estimators measured: ``estimators``, or ("full_bptt",) for perturbed_backprop."""
        return ("full_bptt",) if self.study == "perturbed_backprop" else self.estimators

    def trunc_for(self, horizon: int) -> int:
        """K at unroll length T: min(trunc_length, T), or T when trunc_length = 0."""
        return horizon if self.trunc_length == 0 else min(self.trunc_length, horizon)

    def num_windows(self, name: str, horizon: int) -> int:
        """W: consecutive estimates per draw (T / K for windowed estimators, else 1)."""
        return horizon // self.trunc_for(horizon) if _windowed(name) else 1

    def knobs(self, name: str, horizon: int, *, reference: bool = False) -> dict[str, Any]:
        """Keyword arguments of ``make_estimator(name, problem, **knobs)`` at unroll length T
        (``reference``: as the reference estimator, which always starts fresh and, for
        full_bptt, uses ``backprop_sigma`` also in the perturbed_backprop study)."""
        from outer_train.estimators import estimator_knobs

        allowed = estimator_knobs(name)
        values: dict[str, Any] = {"horizon": horizon}
        if "trunc_length" in allowed:
            values["trunc_length"] = self.trunc_for(horizon)
        for key in ("num_tasks", "num_perturbations"):
            if key in allowed:
                values[key] = getattr(self, key)
        if name == "full_bptt":
            perturbed = self.study == "perturbed_backprop" and not reference
            values["sigma"] = self.sigma if perturbed else self.backprop_sigma
        elif "sigma" in allowed:
            values["sigma"] = self.sigma
        if "staggered" in allowed:
            values["staggered"] = self.start == "warm" and not reference
        values.update(self.parsed_overrides().get(name, {}))
        return values

    def parsed_overrides(self) -> dict[str, dict[str, Any]]:
        """``knob_overrides`` as {estimator: {knob: value}}; UserError for a bad string."""
        import tomllib

        from outer_train.estimators import estimator_knobs

        out: dict[str, dict[str, Any]] = {}
        for i, text in enumerate(self.knob_overrides):
            key = f"variance.knob_overrides[{i}] = {text!r}"
            path, sep, raw = text.partition("=")
            name, dot, knob = path.strip().partition(".")
            if not sep or not dot or not knob:
                raise UserError(f"{key}: expected 'estimator.knob=value', e.g. 'es.sigma=0.02'")
            if name not in ESTIMATOR_NAMES:
                raise UserError(f"{key}: unknown estimator {name!r}; use one of "
                                f"{list(ESTIMATOR_NAMES)}")
            knob = knob.strip()
            allowed = [k for k in estimator_knobs(name) if k not in _SET_BY_SECTION]
            if name == "full_bptt":
                allowed.remove("sigma")
            if knob not in allowed:
                why = (" (set by variance.horizons / variance.trunc_length)"
                       if knob in _SET_BY_SECTION else
                       " (use variance.backprop_sigma)" if knob == "sigma" else "")
                raise UserError(f"{key}: {knob!r} cannot be overridden for {name!r}{why}; "
                                f"overridable knobs: {allowed}")
            try:
                value = tomllib.loads(f"v = {raw.strip()}")["v"]
            except tomllib.TOMLDecodeError:
                value = raw.strip()
            out.setdefault(name, {})[knob] = value
        return out


def _windowed(name: str) -> bool:
    """Whether estimator ``name`` unrolls K-step windows (has a trunc_length knob)."""
    from outer_train.estimators import estimator_knobs

    return "trunc_length" in estimator_knobs(name)


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
