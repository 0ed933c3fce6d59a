"""Meta-training configuration: typed, frozen dataclasses loaded from TOML (configs/*.toml).

``schema``: the sections and their defaults (the defaults ARE the default config);
``validate``: the generic TOML-to-dataclass checks (types, ranges, unknown keys);
``files``: reading and writing TOML, ``--set section.key=value`` overrides.
Loading validates everything before any compute: an unknown key, a wrong type or an
out-of-range value raises ``UserError`` naming the key and what is allowed.
"""

from __future__ import annotations

from outer_train.config.files import (
    apply_overrides,
    load_config,
    load_toml,
    parse_override,
    to_toml,
)
from outer_train.config.schema import (
    SECTIONS,
    CheckpointConfig,
    EstimatorConfig,
    EvalConfig,
    FamilyConfig,
    LOptConfig,
    MetaOptConfig,
    MetaTrainConfig,
    ProblemConfig,
    RunConfig,
    TaskConfig,
    config_from_dict,
)

__all__ = [
    "SECTIONS",
    "CheckpointConfig",
    "EstimatorConfig",
    "EvalConfig",
    "FamilyConfig",
    "LOptConfig",
    "MetaOptConfig",
    "MetaTrainConfig",
    "ProblemConfig",
    "RunConfig",
    "TaskConfig",
    "apply_overrides",
    "config_from_dict",
    "load_config",
    "load_toml",
    "parse_override",
    "to_toml",
]
