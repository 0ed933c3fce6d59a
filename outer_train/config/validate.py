"""Generic validation of TOML-shaped data into frozen dataclasses.

``from_mapping(cls, data)`` checks a mapping (a parsed TOML table) against the type annotations
of dataclass ``cls`` and the ranges declared with ``field``, and builds the dataclass; any
problem raises ``UserError`` naming the dotted key, the value and what is allowed, e.g.
``run.seed = 1.5: expected an integer`` or ``unknown key 'run.sed' in [run]; allowed keys: ...``.

Supported annotations: ``bool``, ``int``, ``float`` (an int is accepted and converted; NaN and
inf are not), ``str``, ``Literal[...]``, ``tuple[X, ...]`` and ``tuple[X, Y]`` (from TOML
lists), and nested dataclasses (from TOML tables). Nothing here knows the meta-training schema.
"""

from __future__ import annotations

import dataclasses
import math
import typing
from collections.abc import Mapping, Sequence
from typing import Any, Literal

from learned_opt.errors import UserError


def field(default: Any, *, lo: float | None = None, hi: float | None = None,
          lo_open: bool = False, doc: str = "") -> Any:
    """A dataclass field with an allowed interval [lo, hi] (or (lo, hi] with ``lo_open``);
    ``doc`` is quoted in the out-of-range message."""
    return dataclasses.field(
        default=default, metadata={"lo": lo, "hi": hi, "lo_open": lo_open, "doc": doc}
    )


def from_mapping(cls: type, data: Mapping[str, Any], prefix: str = "") -> Any:
    """``cls(**data)`` after checking every key, type and range; raises ``UserError``.

    ``prefix``: the dotted key of ``data`` itself, used in messages ("" = the top level).
    Keys absent from ``data`` keep the dataclass defaults.
    """
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        where = f"[{prefix}]" if prefix else "the top level"
        allowed = ", ".join(fields)
        raise UserError(
            f"unknown key {_join(prefix, unknown[0])!r} in {where}; allowed keys: {allowed}"
        )
    kwargs = {}
    for name, value in data.items():
        key = _join(prefix, name)
        coerced = _coerce(key, value, hints[name])
        _check_range(key, coerced, fields[name].metadata)
        kwargs[name] = coerced
    return cls(**kwargs)


def _describe(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin is tuple:
        args = typing.get_args(tp)
        if len(args) == 2 and args[1] is Ellipsis:
            return f"a list of ({_describe(args[0])})"
        return "a list [" + ", ".join(_describe(a) for a in args) + "]"
    if tp is float:
        return "a number"
    if tp is int:
        return "an integer"
    if tp is bool:
        return "true or false"
    if tp is str:
        return "a string"
    return getattr(tp, "__name__", str(tp))


def _coerce(key: str, value: Any, tp: Any) -> Any:
    """Checks ``value`` against the annotation ``tp``; returns it in the field's Python type."""
    origin = typing.get_origin(tp)
    bad = UserError(f"{key} = {value!r}: expected {_describe(tp)}")
    if origin is Literal:
        if value not in typing.get_args(tp) or isinstance(value, bool):
            raise bad
        return value
    if origin is tuple:
        args = typing.get_args(tp)
        if not isinstance(value, Sequence) or isinstance(value, str):
            raise bad
        if len(args) == 2 and args[1] is Ellipsis:
            args = (args[0],) * len(value)
        elif len(value) != len(args):
            raise bad
        pairs = enumerate(zip(value, args, strict=True))
        return tuple(_coerce(f"{key}[{i}]", v, a) for i, (v, a) in pairs)
    if tp is bool:
        if not isinstance(value, bool):
            raise bad
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise bad
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise bad
        value = float(value)
        if not math.isfinite(value):
            raise bad
        return value
    if tp is str:
        if not isinstance(value, str):
            raise bad
        return value
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        if not isinstance(value, Mapping):
            raise UserError(f"[{key}] must be a table of keys, got {value!r}")
        return from_mapping(tp, value, key)
    raise TypeError(f"unsupported annotation {tp}")


def _check_range(key: str, value: Any, meta: Mapping[str, Any]) -> None:
    lo, hi, lo_open = meta.get("lo"), meta.get("hi"), meta.get("lo_open", False)
    if lo is None and hi is None:
        return
    too_low = lo is not None and (value <= lo if lo_open else value < lo)
    too_high = hi is not None and value > hi
    if too_low or too_high:
        left = "(" if lo_open else "["
        doc = f" ({meta['doc']})" if meta.get("doc") else ""
        raise UserError(f"{key} = {value!r} is out of range: allowed {left}{lo}, {hi}]{doc}")


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name
