"""Typed configs from plain mappings (YAML, JSON, keyword dicts): every key is a
dataclass field, and an unknown key or a value of the wrong type is an error
that names the key and where it came from, before anything is loaded."""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Mapping
from typing import Any


def coerce(name: str, value: Any, hint: Any, where: str) -> Any:
    """Check `value` against the field's type hint; YAML's '5e-5' (a string in YAML 1.1) becomes a float."""
    origin = typing.get_origin(hint)
    options = typing.get_args(hint) if origin in (typing.Union, types.UnionType) else (hint,)
    if value is None and type(None) in options:
        return None
    for option in options:
        base = typing.get_origin(option) or option
        if base is float and isinstance(value, (int, float, str)) and not isinstance(value, bool):
            try:
                return float(value)
            except ValueError:
                continue
        if base is int and isinstance(value, int) and not isinstance(value, bool):
            return value
        if base in (str, bool, list, dict) and isinstance(value, base):
            return value
    quote = ""
    if isinstance(value, bool) and any((typing.get_origin(o) or o) is str for o in options):
        quote = " (YAML reads unquoted no/yes/off/on as booleans: quote it)"
    raise ValueError(f"{where}: key {name!r} must be {hint}, got {value!r}{quote}")


def from_mapping(cls, values: Mapping[str, Any], where: str):
    """`cls(**values)` with every key known to `cls` and every value of its field's type."""
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - names)
    if unknown:
        raise ValueError(f"{where}: unknown config key(s) {unknown}")
    missing = sorted(
        f.name
        for f in dataclasses.fields(cls)
        if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING and f.name not in values
    )
    if missing:
        raise ValueError(f"{where}: config lacks key(s) {missing}")
    return cls(**{k: coerce(k, v, hints[k], where) for k, v in values.items()})
