"""docs/configs.md is generated from the config dataclasses and must stay so; what a key allows
is declared once (``validate.field``) and both checked and documented from there."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from learned_opt.errors import UserError
from outer_train.config import MetaTrainConfig, load_config, reference
from outer_train.config.compare import ArmTable, CompareSection
from outer_train.config.diagnostics import (
    DIAGNOSTIC_SECTIONS,
    SurfaceConfig,
    VarianceConfig,
    load_diagnostic_config,
)
from outer_train.config.validate import check_fields

ROOT = Path(__file__).resolve().parents[2]


def test_configs_md_is_the_generated_reference():
    text = (ROOT / "docs" / "configs.md").read_text()
    assert text == reference.markdown(), (
        "docs/configs.md is out of date: python -m outer_train.config.reference --write")


def _section_text(markdown: str, table: str) -> str:
    start = markdown.index(f"## `[{table}]`\n")
    end = markdown.find("\n## `[", start + 1)
    return markdown[start:] if end < 0 else markdown[start:end]


def test_every_section_and_every_key_is_documented():
    markdown = reference.markdown()
    classes = {s.table: s.cls for s in reference.sections()}
    meta = {f.name for f in dataclasses.fields(MetaTrainConfig)}
    assert meta | set(DIAGNOSTIC_SECTIONS) | {"compare", "[compare.arms]"} == set(classes)
    assert classes["compare"] is CompareSection and classes["[compare.arms]"] is ArmTable
    for table, cls in classes.items():
        text = _section_text(markdown, table)
        for f in dataclasses.fields(cls):
            assert f"\n| `{f.name}` | " in text, f"{table}.{f.name}"
    assert "\n| `batch_size` | integer | `128` | [1, 65536] |" in _section_text(markdown, "task")
    assert "\n| `estimator` | table |" in _section_text(markdown, "[compare.arms]")


def test_every_default_is_allowed():
    for section in reference.sections():
        check_fields(section.cls(), section.table)


@pytest.mark.parametrize(("load", "message"), [
    (lambda: load_config(None, ["family.widths=[]"]),
     "family.widths = []: expected a list: non-empty, items >= 1"),
    (lambda: load_config(None, ["task.hidden_sizes=[32, 0]"]),
     "task.hidden_sizes = [32, 0]: expected a list: non-empty, items in [1, 65536]"),
    (lambda: load_diagnostic_config(None, ["surface.horizons=[32, 8]"], "surface"),
     "surface.horizons = [32, 8]: expected a list: non-empty, increasing, items in [1, 1000000]"),
    (lambda: SurfaceConfig(horizons=(8, 8)), "surface.horizons = [8, 8]: expected a list"),
    (lambda: SurfaceConfig(directions=()), "surface.directions = []: expected a list: 1 or 2"),
    (lambda: VarianceConfig(estimators=("pes", "pes")), "expected a list: distinct items"),
])
def test_declared_rules_are_checked_on_load_and_on_construction(load, message):
    with pytest.raises(UserError) as e:
        load()
    assert message in str(e.value)
