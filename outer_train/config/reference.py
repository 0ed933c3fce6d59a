"""docs/configs.md, generated from the config dataclasses: every section and key of every command.

    python -m outer_train.config.reference            # print the Markdown
    python -m outer_train.config.reference --write    # write docs/configs.md

Each key's type, default and allowed values are read from the dataclasses themselves (the
annotation, the default, and what ``validate.field`` declares, the same declarations the
validation checks), each section's prose from its class docstring, and the estimator knobs from
``outer_train.estimators``; ``tests/outer_train/test_config_reference.py`` checks that
docs/configs.md is this module's output, so the page cannot drift from the code.
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import json
import types
import typing
from pathlib import Path
from typing import Any, Literal

from outer_train.config import compare, diagnostics, schema
from outer_train.config.files import toml_value
from outer_train.config.validate import allowed_text

ROOT = Path(__file__).resolve().parents[2]
OUTPUT = ROOT / "docs" / "configs.md"


@dataclasses.dataclass(frozen=True)
class Section:
    """One TOML table of the reference: its name as written, its dataclass, the commands that
    read it, and rows the dataclass does not hold (key, type, default, allowed, note)."""

    table: str
    cls: type
    read_by: str
    extra_rows: tuple[tuple[str, str, str, str, str], ...] = ()


_META = "meta-train, compare, surface, dynamics, variance"


def sections() -> tuple[Section, ...]:
    """Every section of every command, in the order of the page."""
    hints = typing.get_type_hints(schema.MetaTrainConfig)
    meta = tuple(
        Section(f.name, hints[f.name], _META + (" (compare: without `name`)"
                                                if f.name == "estimator" else ""))
        for f in dataclasses.fields(schema.MetaTrainConfig)
    )
    diag = tuple(Section(name, cls, name) for name, cls in diagnostics.DIAGNOSTIC_SECTIONS.items())
    arm_estimator = ("estimator", "table", "(required)", "`name` and that estimator's knobs",
                     "overrides of the base `[estimator]` knobs, e.g. "
                     "`{ name = \"pes\", trunc_length = 10 }`")
    cmp = (
        Section("compare", compare.CompareSection, "compare"),
        Section("[compare.arms]", compare.ArmTable, "compare", (arm_estimator,)),
    )
    return (*meta, *diag, *cmp)


def type_text(tp: Any) -> str:
    """A TOML-side name of annotation ``tp``: string, integer, float, boolean, list of ..."""
    origin = typing.get_origin(tp)
    if origin in (types.UnionType, typing.Union):
        return " or ".join(type_text(a) for a in typing.get_args(tp))
    if origin is Literal:
        kinds = {type(a) for a in typing.get_args(tp)}
        return type_text(kinds.pop()) if len(kinds) == 1 else "string or integer"
    if origin is tuple:
        args = typing.get_args(tp)
        if len(args) == 2 and args[1] is Ellipsis:
            return f"list of {type_text(args[0])}"
        return "[" + ", ".join(type_text(a) for a in args) + "]"
    return {str: "string", int: "integer", float: "float", bool: "boolean"}.get(tp, str(tp))


def _default_text(value: Any) -> str:
    return toml_value(json.loads(json.dumps(value)))  # tuples -> lists


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def _link(cls: type) -> str:
    path = Path(inspect.getfile(cls)).resolve().relative_to(ROOT)
    return f"[`{cls.__module__}.{cls.__qualname__}`](../{path.as_posix()})"


def section_markdown(section: Section) -> str:
    """The Markdown of one section: heading, where it is defined, the key table, the docstring."""
    hints = typing.get_type_hints(section.cls)
    lines = [
        f"## `[{section.table}]`",
        "",
        f"Accepted by: {section.read_by}. Defined by {_link(section.cls)}.",
        "",
        "| key | type | default | allowed | note |",
        "| --- | --- | --- | --- | --- |",
    ]
    for f in dataclasses.fields(section.cls):
        tp = hints[f.name]
        allowed = allowed_text(tp, f.metadata)
        cells = (f"`{f.name}`", type_text(tp), f"`{_default_text(f.default)}`",
                 f"{allowed}" if allowed else "any", f.metadata.get("doc", ""))
        lines.append("| " + " | ".join(_cell(c) for c in cells) + " |")
    for row in section.extra_rows:
        lines.append("| " + " | ".join(_cell(c) for c in (f"`{row[0]}`", *row[1:])) + " |")
    doc = inspect.getdoc(section.cls) or ""
    lines += ["", "```text", doc, "```", ""]
    return "\n".join(lines)


def knob_table() -> str:
    """Which ``[estimator]`` keys each estimator takes, with the estimator's own default
    (``estimators.estimator_knobs`` and the estimator dataclass's fields)."""
    from outer_train.estimators import ESTIMATORS

    knobs = [f.name for f in dataclasses.fields(schema.EstimatorConfig) if f.name != "name"]
    defaults = {name: {f.name: f.default for f in dataclasses.fields(cls) if f.name != "problem"}
                for name, cls in ESTIMATORS.items()}
    lines = [
        "### Knobs per estimator",
        "",
        "`[estimator]` keys other than `name` are knobs; setting one that the chosen estimator "
        "does not have is an error (`outer_train.estimators.estimator_knobs`). A cell gives the "
        "estimator's own default, which `make_estimator(name, problem)` uses for a knob not "
        "passed; an empty cell: not a knob of that estimator. Through a config every knob takes "
        "the `[estimator]` value above (its default where not set; full_bptt's `sigma`: 0 "
        "unless set).",
        "",
        "| knob | " + " | ".join(f"`{n}`" for n in ESTIMATORS) + " |",
        "| --- |" + " --- |" * len(ESTIMATORS),
    ]
    for k in knobs:
        cells = (_knob_default(defaults[n][k]) if k in defaults[n] else "" for n in ESTIMATORS)
        lines.append(f"| `{k}` | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _knob_default(value: Any) -> str:
    return "`None`" if value is None else f"`{_default_text(value)}`"


HEADER = """# Config reference

Generated from the config dataclasses by `python -m outer_train.config.reference --write`
([`outer_train/config/reference.py`](../outer_train/config/reference.py)); do not edit by hand.
`tests/outer_train/test_config_reference.py` fails when this page and the code disagree.

A config file is TOML, one table per section; every key is optional and falls back to the
default below (`configs/default.toml` spells out the meta-training defaults). `--set
section.key=value` overrides one key from the command line (the value parsed as TOML; a bare
word is a string). Everything is validated before any compute: an unknown key, a wrong type
or a value outside "allowed" is rejected with a message naming the dotted key and what it
allows ([`outer_train/config/validate.py`](../outer_train/config/validate.py)). Rules that
span several keys (an estimator's own knob checks, a diagnostic section's cross-key rules) are
in each section's docstring, quoted below each table.

Which command reads which sections: `learned-opt meta-train` the nine meta-training sections;
`learned-opt surface` / `dynamics` / `variance` those plus `[surface]` / `[dynamics]` /
`[variance]` (a config for one diagnostic may not hold another's section); `learned-opt
compare` the meta-training sections (`[estimator]` without `name`: the knobs shared by the
arms) plus `[compare]` and its `[[compare.arms]]` tables.

"""


def markdown() -> str:
    """The whole page."""
    parts = [HEADER, "# Meta-training sections\n"]
    for section in sections():
        if section.table == "surface":
            parts.append("# Diagnostic sections\n")
        if section.table == "compare":
            parts.append("# Comparison sections\n")
        parts.append(section_markdown(section))
        if section.table == "estimator":
            parts.append(knob_table())
    return "\n".join(parts).rstrip("\n") + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--write", action="store_true", help=f"write {OUTPUT.relative_to(ROOT)}")
    args = parser.parse_args(argv)
    text = markdown()
    if args.write:
        OUTPUT.write_text(text)
        print(f"wrote {OUTPUT.relative_to(ROOT)}")
    else:
        print(text, end="")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
