"""Official JSON data lists, checked entry by entry so a bad list fails at
start-up with the file and entry index, not later inside a worker."""

from __future__ import annotations

import json
from pathlib import Path


class ConfigError(ValueError):
    """The config or its data lists cannot describe a dataset."""


def require(path: str | Path, what: str) -> Path:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{what}: {path} does not exist")
    return path


def load_data_list(path: str | Path, keys: dict[str, type | tuple[type, ...]] | None, what: str) -> list:
    """Read a JSON list of objects, each with `keys` of the given types
    (`keys=None`: any list, e.g. the VQA answer list of strings)."""
    path = require(path, what)
    try:
        with open(path, encoding="utf-8") as f:
            entries = json.load(f)
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}: not valid JSON ({e})") from e
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not UTF-8 text ({e})") from e
    if not isinstance(entries, list):
        raise ConfigError(f"{path}: expected a JSON list of entries, got {type(entries).__name__}")
    for i, entry in enumerate(entries if keys is not None else ()):
        if not isinstance(entry, dict):
            raise ConfigError(f"{path}: entry {i} is {type(entry).__name__}, expected an object")
        for key, kind in keys.items():
            if key not in entry:
                raise ConfigError(f"{path}: entry {i} lacks {key!r}")
            if not isinstance(entry[key], kind):
                raise ConfigError(f"{path}: entry {i} has {key!r} of type {type(entry[key]).__name__}")
    return entries
