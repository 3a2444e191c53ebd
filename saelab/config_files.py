"""Dataclass configs from YAML / TOML / JSON files, with unknown keys reported by name.

A config may nest another dataclass whose fields it also accepts as FLAT keys (``TrainConfig.sae`` holds the
``SAEConfig``; ``k: 32`` and ``sae: {k: 32}`` mean the same): such a field is declared with :func:`flat_nested`,
and :func:`nest_flat_keys` is the one place that routes flat keys into it (for ``--config`` files, experiment arms
and sweeps). On the command line simple_parsing gives the nested fields their plain ``--flag`` names as long as
they do not collide.
"""

from __future__ import annotations

import dataclasses
import json
import tomllib
import typing
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")

_FLAT_KEYS = "saelab_flat_keys"
"""Field-metadata key marking a nested dataclass field whose fields are also accepted as flat keys."""


def flat_nested(cls: type[T]) -> T:
    """A dataclass field holding a ``cls()`` whose command-line fields are also accepted as flat keys of the
    containing config (:func:`nest_flat_keys`), e.g. ``sae: SAEConfig = flat_nested(SAEConfig)``."""
    return dataclasses.field(default_factory=cls, metadata={_FLAT_KEYS: True})


def flat_key_owners(cls: type) -> dict[str, str]:
    """Flat key -> name of the :func:`flat_nested` field of dataclass ``cls`` that owns it.

    The keys are the nested dataclass's command-line fields (simple_parsing ``field(cmd=False)`` fields, set by the
    program, are left out) that ``cls`` does not have itself; ``cls``'s own fields win a name clash.
    """
    hints = typing.get_type_hints(cls)
    own = {f.name for f in dataclasses.fields(cls)}
    owners: dict[str, str] = {}
    for f in dataclasses.fields(cls):
        if not f.metadata.get(_FLAT_KEYS):
            continue
        for g in dataclasses.fields(hints[f.name]):
            if g.metadata.get("cmd", True) and g.name not in own:
                owners.setdefault(g.name, f.name)
    return owners


def flat_field_types(cls: type) -> dict[str, Any]:
    """Type hint of every flat key of dataclass ``cls``: its own fields except the :func:`flat_nested` ones, plus
    the flat keys those own (:func:`flat_key_owners`)."""
    hints = typing.get_type_hints(cls)
    out = {f.name: hints[f.name] for f in dataclasses.fields(cls) if not f.metadata.get(_FLAT_KEYS)}
    for key, owner in flat_key_owners(cls).items():
        out[key] = typing.get_type_hints(hints[owner])[key]
    return out


def nest_flat_keys(cls: type, data: dict[str, Any], *, where: str = "") -> dict[str, Any]:
    """``data`` with its flat keys moved into the mappings of the :func:`flat_nested` fields that own them
    (``{"k": 32, "lr": 1e-3}`` -> ``{"sae": {"k": 32}, "lr": 1e-3}`` for ``TrainConfig``); other keys unchanged.
    ``data`` is not modified.

    Raises:
        ValueError: a key is given both flat and nested (``k`` and ``sae.k``), or a nested field that receives
            flat keys is not a mapping.
    """
    owners = flat_key_owners(cls)
    out = {k: v for k, v in data.items() if k not in owners}
    for key, owner in owners.items():
        if key not in data:
            continue
        nested = out.get(owner, {})
        if not isinstance(nested, dict):
            raise ValueError(f"config key {where + owner!r} must be a mapping of its fields to combine it with the "
                             f"flat key {where + key!r}, got {nested!r}")
        if key in nested:
            raise ValueError(f"config key {where + key!r} is given both flat and as {where + owner}.{key}; keep one")
        out[owner] = {**nested, key: data[key]}
    return out


def flat_view(cfg: Any) -> dict[str, Any]:
    """``dataclasses.asdict(cfg)`` with each :func:`flat_nested` field replaced by its flat keys
    (:func:`flat_key_owners`), i.e. the dict of a config written with flat keys; fields of the nested config that
    are no flat keys (``cmd=False``: set by the program) are left out."""
    d = dataclasses.asdict(cfg)
    owners = flat_key_owners(type(cfg))
    for owner in set(owners.values()):
        nested = d.pop(owner)
        d.update({k: v for k, v in nested.items() if owners.get(k) == owner})
    return d


def _parse_yaml(text: str) -> Any:
    import yaml  # lazy: only YAML files need it

    return yaml.safe_load(text)


_PARSERS: dict[str, Any] = {".yaml": _parse_yaml, ".yml": _parse_yaml, ".toml": tomllib.loads, ".json": json.loads}
"""File suffix -> parser of the file's text."""


def _parse_error_line(e: Exception) -> str:
    """A parse error as one line with its 1-based position: JSON's ``msg``/``lineno``/``colno``, YAML's
    ``problem``/``problem_mark`` (0-based marks) and context; TOML's message already ends in its position."""
    if isinstance(e, json.JSONDecodeError):
        return f"{e.msg} at line {e.lineno}, column {e.colno}"
    mark = getattr(e, "problem_mark", None)
    if mark is not None:  # yaml.MarkedYAMLError
        line = f"{getattr(e, 'problem', None) or 'syntax error'} at line {mark.line + 1}, column {mark.column + 1}"
        ctx, cmark = getattr(e, "context", None), getattr(e, "context_mark", None)
        if ctx and cmark is not None:
            line += f" ({ctx} at line {cmark.line + 1}, column {cmark.column + 1})"
        return line
    return " ".join(str(e).split())  # any other message, on one line


def read_config_file(path: str | Path) -> dict[str, Any]:
    """Parse a ``.yaml``/``.yml``, ``.toml`` or ``.json`` file into a dict.

    Every error is one line naming the file, the problem (for a parse error its line and column) and the fix.

    Raises:
        FileNotFoundError: the file does not exist.
        ValueError: unsupported extension, an unreadable or non-UTF-8 file, a parse error, or a top level that
            is not a mapping.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file {path} not found; check the path "
                                "(a .yaml, .yml, .toml or .json file)")
    parse = _PARSERS.get(path.suffix)
    if parse is None:
        raise ValueError(f"{path}: config files must end in {', '.join(_PARSERS)}; rename it to match its format")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: cannot be read as UTF-8 text ({e}); is it a config file?") from e
    try:
        data = parse(text)
    except Exception as e:  # noqa: BLE001 - json/toml/yaml each raise their own error type
        raise ValueError(f"could not parse config file {path}: {_parse_error_line(e)}; fix the syntax there") from e
    if data is None:  # an empty YAML file
        data = {}
    if not isinstance(data, dict):
        raise ValueError(f"{path}: the top level must be a mapping of field names to values, got a "
                         f"{type(data).__name__}")
    return data


def from_dict(cls: type[T], data: dict[str, Any], *, where: str = "") -> T:
    """Build dataclass ``cls`` from a (nested) dict.

    Nested dataclass fields take nested dicts; the fields of a :func:`flat_nested` one may also be given flat
    (:func:`nest_flat_keys`). Fields missing from ``data`` keep their defaults.

    Raises:
        ValueError: a key is not a field of ``cls`` (lists the valid fields), or is given both flat and nested.
    """
    data = nest_flat_keys(cls, data, where=where)
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs: dict[str, Any] = {}
    for key, value in data.items():
        if key not in fields:
            valid = [*fields, *flat_key_owners(cls)]
            raise ValueError(f"unknown config key {where + key!r}; valid keys: {', '.join(valid)}")
        ftype = hints[key]
        if dataclasses.is_dataclass(ftype) and isinstance(value, dict):
            value = from_dict(ftype, value, where=f"{where}{key}.")
        kwargs[key] = value
    return cls(**kwargs)
