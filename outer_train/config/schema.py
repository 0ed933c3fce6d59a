"""The meta-training configuration schema: one frozen dataclass per TOML table.

A config file has one table per section (``[task]``, ``[family]``, ``[lopt]``, ``[problem]``,
``[estimator]``, ``[meta_opt]``, ``[run]``, ``[eval]``, ``[checkpoint]``); every key is optional
and falls back to the dataclass default, so the defaults below ARE the default config
(configs/default.toml is a copy of them; a test checks they agree). Types and ranges are checked
by ``validate.from_mapping``; rules that span keys (an estimator's own knob checks, a knob the
chosen estimator does not have, ``[family]``) by ``MetaTrainConfig`` and ``config_from_dict``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Mapping
from typing import Any, Literal

from learned_opt.errors import UserError
from outer_train.config.validate import check_fields, field, from_mapping
from tasks.errors import TaskError

# --------------------------------------------------------------------------------------------
# The sections. Defaults = the README's main job (configs/default.toml).


@dataclasses.dataclass(frozen=True)
class TaskConfig:
    """The inner problem: one image-MLP task (``kind = "single"``) or a task family.

    ``single``: ``tasks.image_mlp.ImageMLPConfig`` from ``dataset``, ``image_size`` (0 = the
    dataset's own), ``grayscale``, ``hidden_sizes``, ``activation``, ``batch_size``; held-out
    evaluation trains the same task from seeds never used for meta-training.
    ``family``: the ``[family]`` section decides the variants; these architecture keys are then
    not used (only ``dataset``, ``image_size`` and ``grayscale``).
    """

    kind: Literal["single", "family"] = "single"
    dataset: str = "digits"
    image_size: Literal[0, 8, 16, 28, 32] = 0
    grayscale: bool = False
    hidden_sizes: tuple[int, ...] = field((32, 32), lo=1, hi=65536, min_len=1)
    activation: Literal["relu", "gelu", "tanh", "swish", "elu"] = "relu"
    batch_size: int = field(128, lo=1, hi=65536)


@dataclasses.dataclass(frozen=True)
class FamilyConfig:
    """``tasks.family.ImageMLPFamily`` (used when ``task.kind = "family"``).

    ``num_train_tasks`` variants are sampled on the host at start (one estimator per variant,
    meta-gradients averaged with equal weights); held-out variants (``heldout_pairs`` of
    [width, activation]) are never trained on and are used for evaluation. Every held-out
    pair must lie in ``widths`` x ``activations`` and leave variants to train on (checked by
    ``ImageMLPFamily`` when ``task.kind = "family"``).

    ``compile``: how the training variants become programs in the outer step.
    ``"per_variant"``: one estimator traced per variant; each variant costs its own size, and
    the compile grows with the number of variants. ``"once"``: every variant padded to the
    largest shape (``tasks.padded_mlp``: masks keep the padding out of the model, the loss and
    the learned optimizer's statistics) and one estimator program run over them
    (``outer_train.variant_stack``): one compile whatever the number of variants, but every
    variant costs what the largest costs. Worth it for short runs, or for variants of about one
    size (docs/benchmarks.md#compilation-and-the-first-outer-step).
    """

    widths: tuple[int, ...] = field((16, 32, 64), lo=1, min_len=1)
    depths: tuple[int, ...] = field((1, 2, 3), lo=1, min_len=1)
    activations: tuple[Literal["relu", "gelu", "tanh", "swish", "elu"], ...] = field(
        ("relu", "gelu", "tanh", "swish"), min_len=1,
    )
    batch_sizes: tuple[int, ...] = field((64, 128), lo=1, min_len=1)
    heldout_pairs: tuple[tuple[int, str], ...] = ((16, "gelu"), (32, "tanh"), (64, "swish"))
    num_train_tasks: int = field(4, lo=1, hi=64)
    compile: Literal["per_variant", "once"] = "per_variant"


@dataclasses.dataclass(frozen=True)
class LOptConfig:
    """The learned optimizer, by its name in ``learned_opt.registry`` (the name saved files
    carry): ``mlp_lopt`` is the per-parameter MLP (MLPLOpt); ``learned_sgd`` /
    ``learned_momentum`` / ``learned_adam`` are the hyperparameter learned optimizers
    (LearnedSGD, ...). ``hidden_sizes`` applies to ``mlp_lopt`` only."""

    name: Literal["mlp_lopt", "learned_sgd", "learned_momentum", "learned_adam"] = "mlp_lopt"
    hidden_sizes: tuple[int, ...] = field((32, 32), lo=1, hi=65536, min_len=1)


@dataclasses.dataclass(frozen=True)
class ProblemConfig:
    """The meta-objective (``outer_train.problem.LearnedOptProblem``): per-step meta-loss on
    the ``train`` batch or a fresh ``valid`` batch, transformed by ``loss_transform``
    (``outer_train.meta_loss.LOSS_TRANSFORMS``) with clip value ``loss_clip`` (0 = the task's
    1.5 log(num_classes))."""

    meta_loss: Literal["train", "valid"] = "train"
    loss_transform: Literal["none", "clip", "log", "normalized"] = "clip"
    loss_clip: float = field(0.0, lo=0.0, hi=1e9)


@dataclasses.dataclass(frozen=True)
class EstimatorConfig:
    """The outer-gradient estimator (``outer_train.estimators.ESTIMATORS``) and its knobs.

    Each estimator has a subset of these knobs (``estimator_knobs(name)``); setting a knob the
    chosen estimator does not have is an error. ``sigma`` is the ES noise scale (default
    0.01); for full_bptt it is the smoothing of the reparameterization gradient, default 0
    (plain backprop) when not set. ``segment_length = 0`` means None:
    backprop estimators pick the memory-optimal rematerialization segment (set it to the
    horizon to turn rematerialization off).
    """

    name: Literal["full_bptt", "tbptt", "es", "truncated_es", "pes", "nres", "hybrid"] = "pes"
    num_tasks: int = field(8, lo=1, hi=4096, doc="inner problems (groups) per estimate")
    num_perturbations: int = field(1, lo=1, hi=4096, doc="antithetic pairs per task")
    trunc_length: int = field(10, lo=1, hi=100_000, doc="inner steps K per outer step")
    horizon: int | tuple[int, int] = field(200, lo=1, hi=1_000_000,
                                           doc="inner steps T per inner problem")
    sigma: float = field(0.01, lo=0.0, hi=10.0, doc="ES noise scale")
    loss_shaping: Literal["none", "sign", "clip"] = "none"
    shaping_scale: float = field(1.0, lo=0.0, hi=1e9, lo_open=True)
    staggered: bool = True
    segment_length: int = field(0, lo=0, hi=1_000_000)

    def knobs(self) -> dict[str, Any]:
        """The keyword arguments of ``make_estimator(self.name, problem, **knobs)``."""
        from outer_train.estimators import estimator_knobs

        values = dataclasses.asdict(self)
        if values["segment_length"] == 0:
            values["segment_length"] = None
        return {k: values[k] for k in estimator_knobs(self.name)}


@dataclasses.dataclass(frozen=True)
class MetaOptConfig:
    """The meta-optimizer: ``optax.chain(clip_by_global_norm(clip_norm), <name>(learning_rate))``.
    ``clip_norm = 0`` disables clipping."""

    name: Literal["adam", "sgd"] = "adam"
    learning_rate: float = field(3e-3, lo=0.0, hi=10.0, lo_open=True)
    clip_norm: float = field(1.0, lo=0.0, hi=1e9)
    b1: float = field(0.9, lo=0.0, hi=1.0)
    b2: float = field(0.999, lo=0.0, hi=1.0)


@dataclasses.dataclass(frozen=True)
class RunConfig:
    """Length, seed, devices and logging cadence of the outer loop.

    ``max_skipped_in_a_row``: consecutive non-finite meta-gradients after which the run stops
    with an error (each one skips its update and is counted; see meta_train).
    ``devices``: how many devices the particles are split over (the estimator state's leading
    axis; 0 = all local devices, 1 = no split). On CPU the ``learned-opt`` command makes one
    XLA device per core, so 0 uses every core (not part of the trajectory: only float rounding
    of the particle mean may change with it)."""

    seed: int = field(0, lo=0, hi=2**31 - 1)
    num_outer_steps: int = field(1000, lo=1, hi=10_000_000)
    log_every: int = field(1, lo=1, hi=10_000_000)
    max_skipped_in_a_row: int = field(20, lo=1, hi=10_000_000)
    devices: int = field(0, lo=0, hi=65_536)


@dataclasses.dataclass(frozen=True)
class EvalConfig:
    """Held-out evaluation: train held-out tasks/seeds with the learned optimizer and with Adam
    at the best learning rate of ``adam_learning_rates`` (the lowest mean meta-objective on the
    same held-out tasks and seeds, which favours Adam: the mean training-batch loss over the run
    for ``problem.meta_loss = "train"``, the mean validation loss over the curve for
    ``"valid"``; ``outer_train.evaluation``), ``num_inner_steps`` steps each.
    ``num_inner_steps = 0`` means the estimator's horizon (T_max of a range). ``every = 0``
    evaluates only at the start and at the end.

    Generalization (``outer_train.generalization``; at the end of a run with evaluation, in
    summary.md and generalization.json): the held-out tasks (the trained task on held-out seeds
    for ``task.kind = "single"``) trained ``m x T`` inner steps for each m of
    ``generalization_multiples`` (T = the horizon, T_max of a range), and, for a single task,
    each preset of ``generalization_variants`` (``tasks.image_mlp.PRESETS``) at T; for a family
    its held-out variants at T as well. Each row against Adam tuned on that row's own runs
    over ``adam_learning_rates`` by the mean train-batch loss, with a 2-standard-error verdict
    ("beats Adam", "within 2 s.e. of Adam", "worse than Adam", "diverged (k of n runs)", ...).
    ``generalization_multiples = []`` turns it off (no rows at all);
    ``generalization_variants = "auto"``: the other presets on the trained dataset (none for a
    family, whose held-out variants are its generalization at T); ``[]``: no variant rows."""

    every: int = field(250, lo=0, hi=10_000_000)
    num_seeds: int = field(8, lo=1, hi=1024)
    num_heldout_tasks: int = field(2, lo=1, hi=256)
    num_inner_steps: int = field(0, lo=0, hi=1_000_000)
    curve_every: int = field(10, lo=1, hi=1_000_000)
    adam_learning_rates: tuple[float, ...] = field((1e-3, 3e-3, 1e-2, 3e-2, 1e-1), lo=0.0,
                                                   hi=10.0, lo_open=True, min_len=1)
    generalization_multiples: tuple[int, ...] = field((2, 5), lo=2, hi=1000, distinct=True,
                                                      doc="x T; [] = off")
    generalization_variants: Literal["auto"] | tuple[str, ...] = field(
        "auto", doc="\"auto\" or task preset names, run at T (single task)")


@dataclasses.dataclass(frozen=True)
class CheckpointConfig:
    """Checkpoint cadence (outer steps; 0 = only at the end) and how many files are kept."""

    every: int = field(100, lo=0, hi=10_000_000)
    keep: int = field(3, lo=1, hi=1000)


@dataclasses.dataclass(frozen=True)
class MetaTrainConfig:
    """The whole meta-training job. Sections map one-to-one onto TOML tables."""

    task: TaskConfig = TaskConfig()
    family: FamilyConfig = FamilyConfig()
    lopt: LOptConfig = LOptConfig()
    problem: ProblemConfig = ProblemConfig()
    estimator: EstimatorConfig = EstimatorConfig()
    meta_opt: MetaOptConfig = MetaOptConfig()
    run: RunConfig = RunConfig()
    eval: EvalConfig = EvalConfig()
    checkpoint: CheckpointConfig = CheckpointConfig()

    def __post_init__(self):
        for section in dataclasses.fields(self):  # what each key's ``field`` allows
            check_fields(getattr(self, section.name), section.name)
        try:  # the estimator's own knob checks (e.g. horizon >= trunc_length)
            _validate_knobs(self.estimator.name, self.estimator.knobs())
        except UserError as e:
            raise UserError(f"[estimator] name = {self.estimator.name!r}: {e}") from None
        if self.task.kind == "family":
            try:
                self.make_family()
            except (UserError, TaskError) as e:
                raise UserError(f"[family] {e}") from None
        _check_variants(self.eval.generalization_variants, self.task.kind)

    # -- derived --------------------------------------------------------------------------

    def make_family(self):
        """The ``tasks.family.ImageMLPFamily`` of ``[family]`` (``task.kind = "family"``)."""
        from tasks.family import ImageMLPFamily

        f, t = self.family, self.task
        return ImageMLPFamily(
            datasets=((t.dataset, t.image_size or None),),
            widths=f.widths,
            depths=f.depths,
            activations=f.activations,
            batch_sizes=f.batch_sizes,
            heldout_pairs=f.heldout_pairs,
            grayscale=t.grayscale,
        )

    def task_config(self):
        """The ``tasks.image_mlp.ImageMLPConfig`` of ``[task]`` (``task.kind = "single"``)."""
        from tasks.image_mlp import ImageMLPConfig

        t = self.task
        return ImageMLPConfig(
            dataset=t.dataset,
            image_size=t.image_size or None,
            grayscale=t.grayscale,
            hidden_sizes=t.hidden_sizes,
            activation=t.activation,
            batch_size=t.batch_size,
        )

    @property
    def eval_inner_steps(self) -> int:
        """Inner steps of each held-out training run (defaults to the meta-training horizon, the
        longest of a range)."""
        horizon = self.estimator.horizon
        return self.eval.num_inner_steps or (max(horizon) if isinstance(horizon, tuple)
                                             else horizon)

    def to_dict(self) -> dict[str, Any]:
        """The config as plain TOML/JSON-able data (tuples become lists)."""
        return json.loads(json.dumps(dataclasses.asdict(self)))

    def trajectory_hash(self) -> str:
        """SHA-256 of the sections that decide the meta-training trajectory.

        Run length, evaluation, logging and checkpoint cadence are excluded, so a run can be
        resumed with more outer steps or a different evaluation schedule and still reproduce
        the same theta; anything else differing makes a checkpoint incompatible.
        """
        d = self._trajectory_dict()
        keep = {k: d[k] for k in _TRAJECTORY_SECTIONS}
        keep.update({k: d["run"][k] for k in _TRAJECTORY_RUN_KEYS})
        blob = json.dumps(keep, sort_keys=True, separators=(",", ":")).encode()
        return hashlib.sha256(blob).hexdigest()

    def _trajectory_dict(self) -> dict[str, Any]:
        """``to_dict()`` without ``family.compile`` where it cannot matter (a single task) or
        is the behaviour from before the key existed ("per_variant"): checkpoints written then
        keep their hash and still resume."""
        d = self.to_dict()
        if self.task.kind != "family" or self.family.compile == _COMPILE_BEFORE_THE_KEY:
            d["family"] = {k: v for k, v in d["family"].items() if k != "compile"}
        return d

    def trajectory_changes(self, saved: Mapping[str, Any]) -> list[tuple[str, Any, Any]]:
        """(dotted key, value in ``saved``, value here) for every key that ``trajectory_hash``
        covers and that differs between ``saved`` (a ``to_dict()``, e.g. the config in a
        checkpoint's header) and this config; a key missing from ``saved`` reads None."""
        d = self._trajectory_dict()
        keys = [(s, k) for s in _TRAJECTORY_SECTIONS for k in d[s]]
        keys += [("run", k) for k in _TRAJECTORY_RUN_KEYS]
        changes = []
        for section, key in keys:
            table = saved.get(section)
            missing = _COMPILE_BEFORE_THE_KEY if (section, key) == ("family", "compile") else None
            old = table.get(key, missing) if isinstance(table, Mapping) else None
            if old != d[section][key]:
                changes.append((f"{section}.{key}", old, d[section][key]))
        return changes


_TRAJECTORY_SECTIONS = ("task", "family", "lopt", "problem", "estimator", "meta_opt")
_COMPILE_BEFORE_THE_KEY = "per_variant"  # how family runs compiled before family.compile
_TRAJECTORY_RUN_KEYS = ("seed", "max_skipped_in_a_row")

SECTIONS: tuple[str, ...] = tuple(f.name for f in dataclasses.fields(MetaTrainConfig))


def config_from_dict(data: Mapping[str, Any]) -> MetaTrainConfig:
    """Validates a (TOML-shaped) dict into a ``MetaTrainConfig``; raises ``UserError``."""
    config = from_mapping(MetaTrainConfig, data)
    # A key set explicitly must be used: refuse knobs the chosen component does not have.
    from outer_train.estimators import estimator_knobs

    name = config.estimator.name
    if name == "full_bptt" and "sigma" not in data.get("estimator", {}):
        # full_bptt's sigma is its smoothing, not ES noise: unset, it is plain backprop
        config = dataclasses.replace(
            config, estimator=dataclasses.replace(config.estimator, sigma=0.0))
    allowed = (*estimator_knobs(name), "name")
    for key in data.get("estimator", {}):
        if key not in allowed:
            raise UserError(
                f"estimator.{key} is not a knob of estimator {name!r}; its knobs: "
                f"{', '.join(allowed[:-1])}"
            )
    if "hidden_sizes" in data.get("lopt", {}) and config.lopt.name != "mlp_lopt":
        raise UserError(
            f"lopt.hidden_sizes applies to lopt.name = 'mlp_lopt' only, not {config.lopt.name!r}"
        )
    return config


def _check_variants(variants: str | tuple[str, ...], kind: str) -> None:
    """``eval.generalization_variants``: preset names, for a single task only. (An explicit
    list only: the presets live with the tasks, which import JAX.)"""
    if variants == "auto" or not variants:
        return
    key = "eval.generalization_variants"
    if kind == "family":
        raise UserError(f"{key} applies to task.kind = 'single' only (a family's held-out "
                        "variants are its generalization at T); use \"auto\" or []")
    from tasks.image_mlp import PRESETS

    for v in variants:
        if v not in PRESETS:
            raise UserError(f"{key}: unknown task preset {v!r}; presets: {', '.join(PRESETS)}")


def _validate_knobs(name: str, knobs: Mapping[str, Any]) -> None:
    """``outer_train.estimators.validate_knobs`` (imported here, on first use, so that importing
    the config does not import the estimators and JAX). Raises ``UserError``."""
    from outer_train.estimators import validate_knobs

    validate_knobs(name, knobs)
