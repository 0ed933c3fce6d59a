"""Config files: read TOML, apply ``--set`` overrides, validate; write a config back as TOML.

Overrides from the command line (``--set section.key=value``) are parsed as TOML values, so
``--set estimator.sigma=0.003`` and ``--set task.hidden_sizes=[16,16]`` work; a bare word that is
not valid TOML (``--set estimator.name=pes``) is taken as a string.
"""

from __future__ import annotations

import dataclasses
import json
import tomllib
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from learned_opt.errors import UserError
from outer_train.config.schema import SECTIONS, MetaTrainConfig, config_from_dict


def parse_override(text: str) -> tuple[list[str], Any]:
    """``"section.key=value"`` -> (["section", "key"], value); the value is parsed as TOML."""
    if "=" not in text:
        raise UserError(f"--set {text!r}: expected section.key=value, e.g. run.seed=1")
    path, raw = text.split("=", 1)
    keys = [k.strip() for k in path.strip().split(".")]
    if len(keys) != 2 or not all(keys):
        raise UserError(
            f"--set {text!r}: the key must be section.key (one dot), e.g. estimator.sigma=0.01; "
            f"sections: {', '.join(SECTIONS)}"
        )
    raw = raw.strip()
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw  # a bare word such as pes: a string
    return keys, value


def apply_overrides(data: Mapping[str, Any], overrides: Sequence[str], *,
                    extra: Sequence[str] = ()) -> dict[str, Any]:
    """Returns a copy of the TOML dict ``data`` with ``--set`` overrides applied.

    extra: sections besides the meta-training ones that ``--set`` may name (a diagnostic's own
    section, e.g. "surface")."""
    out = {k: dict(v) if isinstance(v, Mapping) else v for k, v in data.items()}
    sections = (*SECTIONS, *extra)
    for text in overrides:
        (section, key), value = parse_override(text)
        if section not in sections:
            raise UserError(
                f"--set {text!r}: unknown section {section!r}; sections: {', '.join(sections)}"
            )
        out.setdefault(section, {})
        if not isinstance(out[section], dict):
            raise UserError(f"[{section}] must be a table of keys")
        out[section][key] = value
    return out


def load_toml(path: str | Path) -> dict[str, Any]:
    """Reads a TOML file; a file that is missing, unreadable or not UTF-8 TOML text raises
    ``UserError``."""
    path = Path(path)
    try:
        with path.open("rb") as f:
            return tomllib.load(f)
    except FileNotFoundError:
        raise UserError(f"config file {str(path)!r} not found; see configs/ for examples") from None
    except IsADirectoryError:
        raise UserError(f"config file {str(path)!r} is a folder; give a .toml file, e.g. "
                        "configs/default.toml") from None
    except UnicodeDecodeError as e:
        raise UserError(f"config file {str(path)!r} is not UTF-8 text (byte {e.start}): a TOML "
                        "file must be UTF-8") from None
    except tomllib.TOMLDecodeError as e:
        raise UserError(f"config file {str(path)!r} is not valid TOML: {e}") from None
    except OSError as e:
        raise UserError(f"config file {str(path)!r} cannot be read ({e.strerror})") from None


def load_config(path: str | Path | None = None, overrides: Sequence[str] = ()) -> MetaTrainConfig:
    """Loads and validates a config: the defaults, updated by the TOML file, then ``--set``s."""
    data = load_toml(path) if path is not None else {}
    return config_from_dict(apply_overrides(data, overrides))


def to_toml(config: MetaTrainConfig) -> str:
    """Writes a config as TOML (the inverse of ``load_config``; used to save a run's config).

    Only keys that apply are written: the chosen estimator's knobs, ``lopt.hidden_sizes`` for
    ``mlp_lopt`` only, ``[family]`` for a family only.
    """
    from outer_train.estimators import estimator_knobs

    skip = {"estimator": set(dataclasses.asdict(config.estimator))
            - {"name", *estimator_knobs(config.estimator.name)}}
    if config.lopt.name != "mlp_lopt":
        skip["lopt"] = {"hidden_sizes"}
    lines = []
    for section, values in config.to_dict().items():
        if section == "family" and config.task.kind != "family":
            continue
        lines.append(f"[{section}]")
        for key, value in values.items():
            if key not in skip.get(section, ()):
                lines.append(f"{key} = {toml_value(value)}")
        lines.append("")
    return "\n".join(lines)


def toml_value(value: Any) -> str:
    """``value`` (bool, int, float, str or a list of them) as a TOML literal."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, list | tuple):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    raise TypeError(f"cannot write {value!r} as TOML")
