"""One config converter for both learning stages: frozen dataclass <-> JSON-ready dict, with a type check per field.

Why: a config file written by one cspine and read by another, or an override typed on the command line, must fail
with a message naming the field, never half-apply. Unknown keys are refused with the valid ones listed (a typo
must not be silently ignored); values are checked against the annotations and minimally converted (int -> float,
str -> Path, list -> tuple, dict -> nested config). Torch-free.

Example::

    from cspine.engine.config import from_dict, to_dict
    cfg = from_dict(TrainSegConfig, {"epochs": 3, "patch": [48, 48, 48]})
    assert from_dict(TrainSegConfig, to_dict(cfg)) == cfg
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

from cspine.errors import ConfigError

T = TypeVar("T")


def to_dict(cfg: Any) -> dict[str, Any]:
    """A JSON-ready dict of a (nested) config dataclass: paths as strings, tuples as lists."""
    return json.loads(json.dumps(dataclasses.asdict(cfg), default=str))


def from_dict(cls: type[T], values: dict[str, Any] | T) -> T:
    """Build a (nested) config dataclass from plain values, checking every name and type (ConfigError)."""
    if isinstance(values, cls):
        return values
    if not dataclasses.is_dataclass(cls):
        raise TypeError(f"{cls} is not a dataclass")
    if not isinstance(values, dict):
        raise ConfigError(f"{cls.__name__}: expected an object of settings, got {values!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - names)
    if unknown:
        raise ConfigError(
            f"unknown {cls.__name__} setting(s) {', '.join(unknown)} (an unknown field is refused, so a typo is "
            f"never ignored); valid: {', '.join(sorted(names))}"
        )
    kwargs = {k: convert(hints[k], v, f"{cls.__name__}.{k}") for k, v in values.items()}
    return cls(**kwargs)


def convert(hint: Any, value: Any, where: str) -> Any:
    """Check (and minimally convert) one value against its annotation; ConfigError naming ``where`` if it fails."""
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for opt in args:
            if opt is type(None):
                continue
            try:
                return convert(opt, value, where)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(errors[0] if errors else f"{where}: bad value {value!r}")
    if dataclasses.is_dataclass(hint) and isinstance(hint, type):
        return from_dict(hint, value)
    if origin is tuple:  # fixed-length or variadic tuples arrive from JSON as lists
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(convert(args[0], v, where) for v in value)
        if len(args) != len(value):
            raise ConfigError(f"{where}: expected {len(args)} values, got {value!r}")
        return tuple(convert(a, v, where) for a, v in zip(args, value, strict=True))
    if hint is Path:
        if isinstance(value, str | Path):
            return Path(value)
        raise ConfigError(f"{where}: expected a path, got {value!r}")
    if hint is float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
        raise ConfigError(f"{where}: expected a number, got {value!r}")
    if hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{where}: expected an integer, got {value!r}")
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{where}: expected true/false, got {value!r}")
    if hint is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{where}: expected a string, got {value!r}")
    return value


__all__ = ["convert", "from_dict", "to_dict"]
