"""Diagnostic outputs: strict JSON from NumPy/JAX values, CSV, atomic writes with plain-open
permissions, and the provenance lines of a summary."""

from __future__ import annotations

import csv
import json
import math
import os

import jax.numpy as jnp
import numpy as np
import pytest

from outer_train.diagnostics import outputs


def test_jsonable_is_strict_json():
    data = {"a": np.array([1.0, np.nan, np.inf], np.float32), "b": jnp.int32(3),
            "c": (np.float64(0.5), None, "x"), 4: [np.bool_(True)]}
    text = json.dumps(outputs.jsonable(data), allow_nan=False)
    assert json.loads(text) == {"a": [1.0, None, None], "b": 3, "c": [0.5, None, "x"],
                                "4": [True]}


def test_writes_are_atomic_and_readable_by_others(tmp_path):
    path = outputs.write_json(tmp_path / "sub" / "r.json", {"x": 1})
    outputs.write_csv(tmp_path / "r.csv", ["a", "b"], [[0.1, 2], [math.nan, 3]])
    assert json.loads(path.read_text()) == {"x": 1}
    with open(tmp_path / "r.csv") as f:
        assert list(csv.reader(f)) == [["a", "b"], ["0.1", "2"], ["nan", "3"]]
    umask = os.umask(0)
    os.umask(umask)
    assert os.stat(path).st_mode & 0o777 == 0o666 & ~umask
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["r.csv", "r.json", "sub"]


def test_a_failed_write_leaves_the_old_file(tmp_path, monkeypatch):
    path = outputs.write_text(tmp_path / "s.md", "old")

    def broken(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", broken)
    with pytest.raises(OSError, match="disk full"):
        outputs.write_text(path, "new")
    assert path.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["s.md"]


def test_table_and_numbers():
    table = outputs.markdown_table(["T", "x"], [[8, outputs.fmt(0.000123456)],
                                                [16, outputs.fmt(math.nan)]])
    assert table.splitlines() == ["| T | x |", "| --- | --- |", "| 8 | 0.0001235 |",
                                  "| 16 | nan |"]
    assert outputs.fmt(-math.inf) == "-inf" and outputs.fmt(None) == "nan"
    assert outputs.command_line(["surface", "--set", "a.b=[1, 2]"]) == (
        "learned-opt surface --set 'a.b=[1, 2]'")
