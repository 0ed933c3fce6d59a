"""Generic validation of TOML-shaped data into frozen dataclasses.

``from_mapping(cls, data)`` checks a mapping (a parsed TOML table) against the type annotations
of dataclass ``cls`` and the ranges declared with ``field``, and builds the dataclass; any
problem raises ``UserError`` naming the dotted key, the value and what is allowed, e.g.
``run.seed = 1.5: expected an integer`` or ``unknown key 'run.sed' in [run]; allowed keys: ...``.

Supported annotations: ``bool``, ``int``, ``float`` (an int is accepted and converted; NaN and
inf are not), ``str``, ``Literal[...]``, ``tuple[X, ...]`` and ``tuple[X, Y]`` (from TOML
lists), unions ``X | Y`` (the first alternative that fits), and nested dataclasses (from TOML
tables). Nothing here knows the meta-training schema.

What a key allows beyond its type is declared once, with ``field`` (an interval, list lengths,
increasing or distinct items), and read from there by the checks (``from_mapping``,
``check_fields``), their messages and the generated reference of every key
(``outer_train.config.reference``, docs/configs.md).
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
import types
import typing
from collections.abc import Mapping, Sequence
from typing import Any, Literal

from learned_opt.errors import UserError


def field(default: Any, *, lo: float | None = None, hi: float | None = None,
          lo_open: bool = False, doc: str = "", min_len: int = 0, max_len: int | None = None,
          increasing: bool = False, distinct: bool = False) -> Any:
    """A dataclass field with what it allows: a number in [lo, hi] (or (lo, hi] with
    ``lo_open``); for a list field, every item in that interval, ``min_len`` to ``max_len``
    items, strictly ``increasing`` or ``distinct`` items. ``doc`` (a short note on the key) is
    quoted in messages and in docs/configs.md."""
    return dataclasses.field(default=default, metadata={
        "lo": lo, "hi": hi, "lo_open": lo_open, "doc": doc, "min_len": min_len,
        "max_len": max_len, "increasing": increasing, "distinct": distinct,
    })


def interval_text(meta: Mapping[str, Any]) -> str:
    """The interval of ``meta`` as messages write it, e.g. ``[0, 2147483647]`` or
    ``(0.0, 10.0]``; "" when the field declares none."""
    lo, hi = meta.get("lo"), meta.get("hi")
    if lo is None and hi is None:
        return ""
    if hi is None:
        return f"{'>' if meta.get('lo_open') else '>='} {lo}"
    if lo is None:
        return f"<= {hi}"
    return f"{'(' if meta.get('lo_open') else '['}{lo}, {hi}]"


def list_rules(meta: Mapping[str, Any]) -> list[str]:
    """What a list field's ``meta`` asks of the list, in words, e.g. ["non-empty",
    "increasing", "items in [1, 1000000]"]; [] when nothing."""
    rules = []
    lo, hi = meta.get("min_len", 0), meta.get("max_len")
    if hi is not None and lo == hi:
        rules.append(f"exactly {lo} item{'s' * (lo != 1)}")
    elif hi is not None and hi == lo + 1:
        rules.append(f"{lo} or {hi} items")
    elif hi is not None:
        rules.append(f"{lo} to {hi} items")
    elif lo == 1:
        rules.append("non-empty")
    elif lo > 1:
        rules.append(f"at least {lo} items")
    if meta.get("increasing"):
        rules.append("increasing")
    elif meta.get("distinct"):
        rules.append("distinct items")
    interval = interval_text(meta)
    if interval:
        rules.append(f"items {'' if interval[0] in '<>' else 'in '}{interval}")
    return rules


def allowed_text(tp: Any, meta: Mapping[str, Any]) -> str:
    """What a field of annotation ``tp`` allows beyond its type, in words: the annotation's
    choices and the field's ``meta``; "" when any value of the type will do."""
    origin = typing.get_origin(tp)
    if origin is Literal:  # as TOML writes them
        return ", ".join(json.dumps(a) for a in typing.get_args(tp))
    if origin is tuple:
        args = typing.get_args(tp)
        rules = list_rules(meta)
        if len(args) == 2 and args[1] is Ellipsis and typing.get_origin(args[0]) is Literal:
            rules.insert(0, "items from " + allowed_text(args[0], {}))
        return ", ".join(rules)
    return interval_text(meta)


def check_fields(obj: Any, prefix: str) -> None:
    """Checks every field of dataclass instance ``obj`` against what its ``field`` allows, as
    ``from_mapping`` does for the keys it reads; for ``__post_init__``, so that configs built
    directly are held to the same rules. ``prefix``: the section's dotted key."""
    for f in dataclasses.fields(obj):
        _check_allowed(_join(prefix, f.name), getattr(obj, f.name), f.metadata)


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
        _check_allowed(key, coerced, fields[name].metadata)
        kwargs[name] = coerced
    return cls(**kwargs)


def _describe(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin in (types.UnionType, typing.Union):
        return " or ".join(_describe(a) for a in typing.get_args(tp))
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
    if origin in (types.UnionType, typing.Union):
        for alternative in typing.get_args(tp):
            try:
                return _coerce(key, value, alternative)
            except UserError:
                continue
        raise bad
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


def _check_allowed(key: str, value: Any, meta: Mapping[str, Any]) -> None:
    """UserError naming ``key`` when ``value`` is outside what ``meta`` (``field``) allows."""
    doc = f" ({meta['doc']})" if meta.get("doc") else ""
    if isinstance(value, tuple | list):
        n, hi = len(value), meta.get("max_len")
        ok = n >= meta.get("min_len", 0) and (hi is None or n <= hi)
        ok = ok and all(_in_interval(v, meta) for v in value)
        if meta.get("increasing"):
            ok = ok and all(a < b for a, b in itertools.pairwise(value))
        if meta.get("distinct"):
            ok = ok and len(set(value)) == n
        if not ok:
            raise UserError(f"{key} = {list(value)}: expected a list: "
                            f"{', '.join(list_rules(meta))}{doc}")
    elif not _in_interval(value, meta):
        raise UserError(f"{key} = {value!r} is out of range: allowed {interval_text(meta)}{doc}")


def _in_interval(value: Any, meta: Mapping[str, Any]) -> bool:
    lo, hi = meta.get("lo"), meta.get("hi")
    if lo is not None and (value <= lo if meta.get("lo_open") else value < lo):
        return False
    return hi is None or value <= hi


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name
