"""Dataclass configs from YAML / TOML / JSON files, with unknown keys reported by name."""

from __future__ import annotations

import dataclasses
import json
import tomllib
import typing
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")


def read_config_file(path: str | Path) -> dict[str, Any]:
    """Parse a ``.yaml``/``.yml``, ``.toml`` or ``.json`` file into a dict.

    Raises:
        FileNotFoundError: the file does not exist.
        ValueError: unsupported extension or a parse error (names the file).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file {path} not found")
    text = path.read_text()
    try:
        if path.suffix in (".yaml", ".yml"):
            import yaml

            data = yaml.safe_load(text) or {}
        elif path.suffix == ".toml":
            data = tomllib.loads(text)
        elif path.suffix == ".json":
            data = json.loads(text)
        else:
            raise ValueError(f"{path}: config files must end in .yaml, .yml, .toml or .json")
    except (ValueError, tomllib.TOMLDecodeError) as e:
        raise ValueError(f"could not parse config file {path}: {e}") from e
    except Exception as e:  # yaml.YAMLError
        raise ValueError(f"could not parse config file {path}: {e}") from e
    if not isinstance(data, dict):
        raise ValueError(f"{path}: the top level must be a mapping of field names to values")
    return data


def from_dict(cls: type[T], data: dict[str, Any], *, where: str = "") -> T:
    """Build dataclass ``cls`` from a (nested) dict.

    Nested dataclass fields take nested dicts. Fields missing from ``data`` keep their defaults.

    Raises:
        ValueError: a key is not a field of ``cls`` (lists the valid fields).
    """
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs: dict[str, Any] = {}
    for key, value in data.items():
        if key not in fields:
            raise ValueError(f"unknown config key {where + key!r}; valid keys: {', '.join(fields)}")
        ftype = hints[key]
        if dataclasses.is_dataclass(ftype) and isinstance(value, dict):
            value = from_dict(ftype, value, where=f"{where}{key}.")
        kwargs[key] = value
    return cls(**kwargs)
