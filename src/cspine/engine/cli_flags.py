"""Command-line flags generated from config dataclasses: one field, one flag. Torch-free.

Why: a setting must not be written three times (the dataclass, a parser flag, a list of names to copy over).
Each field of a config dataclass becomes ``--field-name`` with its type (bools as ``--x/--no-x``, fixed tuples as
several values), its help from the class docstring's ``Attributes:`` entry and its dataclass default; choices come
from the registry the config module already keeps. Flags default to None, so only what the user typed becomes an
override (recipe defaults and the dataclass then fill the rest, type-checked by cspine.engine.config).

Example::

    add_config_flags(parser, CropConfig, "crop", choices={"stats_region": STATS_REGIONS})
    overrides = config_overrides(parser.parse_args(argv), "crop")   # {"size": 64} for --size 64
"""

from __future__ import annotations

import argparse
import dataclasses
import re
import types
import typing
from collections.abc import Collection, Mapping, Sequence
from pathlib import Path
from typing import Any


def field_docs(cls: type) -> dict[str, str]:
    """Field name -> its text in the class docstring's ``Attributes:`` section (``a, b: text`` documents both)."""
    docs: dict[str, str] = {}
    lines = (cls.__doc__ or "").splitlines()
    try:
        start = next(i for i, line in enumerate(lines) if line.strip() == "Attributes:")
    except StopIteration:
        return docs
    current: list[str] = []
    indent = None
    for line in lines[start + 1 :]:
        if not line.strip():
            if docs:
                break
            continue
        width = len(line) - len(line.lstrip())
        indent = width if indent is None else indent
        m = re.match(r"\s*([a-z_][a-z0-9_, ]*):\s*(.*)", line)
        if width == indent and m:
            current = [n.strip() for n in m.group(1).split(",")]
            for n in current:
                docs[n] = m.group(2).strip()
        elif width > indent and current:
            for n in current:
                docs[n] = f"{docs[n]} {line.strip()}"
        else:
            break
    return docs


def _default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return None


def add_config_flags(
    parser: argparse.ArgumentParser | argparse._ArgumentGroup,
    cls: type,
    section: str,
    *,
    skip: Collection[str] = (),
    choices: Mapping[str, Sequence[Any]] | None = None,
    defaults_note: str = "",
) -> None:
    """Add one flag per field of ``cls`` (nested dataclasses and ``skip`` left out), stored as ``section.field``."""
    hints = typing.get_type_hints(cls)
    docs = field_docs(cls)
    choices = choices or {}
    for f in dataclasses.fields(cls):
        hint = hints[f.name]
        if f.name in skip or (dataclasses.is_dataclass(hint) and isinstance(hint, type)):
            continue
        if typing.get_origin(hint) in (typing.Union, types.UnionType):
            hint = next(a for a in typing.get_args(hint) if a is not type(None))
        kwargs: dict[str, Any] = {"dest": f"{section}.{f.name}", "default": None}
        origin = typing.get_origin(hint)
        if hint is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        elif origin is tuple:
            args = typing.get_args(hint)
            variadic = len(args) == 2 and args[1] is Ellipsis
            kwargs.update(nargs="+" if variadic else len(args), type=args[0], metavar=f.name.upper())
        else:
            kwargs.update(type=str if hint is Path else hint, metavar=f.name.upper())
        if f.name in choices:
            kwargs["choices"] = tuple(choices[f.name])
            kwargs.pop("metavar", None)
        default = _default(f)
        shown = "" if default is None else " ".join(map(str, default)) if isinstance(default, tuple) else default
        text = docs.get(f.name, f.name.replace("_", " ")).rstrip(".")
        if shown != "" or defaults_note:
            text += f" (default {shown}{defaults_note})" if shown != "" else f" ({defaults_note.lstrip('; ')})"
        kwargs["help"] = text.replace("%", "%%")  # argparse formats help with %
        parser.add_argument("--" + f.name.replace("_", "-"), **kwargs)


def config_overrides(args: argparse.Namespace, section: str) -> dict[str, Any]:
    """The values the user gave for ``section``'s flags (tuples as tuples), by field name."""
    prefix = f"{section}."
    out = {}
    for dest, value in vars(args).items():
        if dest.startswith(prefix) and value is not None:
            out[dest[len(prefix) :]] = tuple(value) if isinstance(value, list) else value
    return out


__all__ = ["add_config_flags", "config_overrides", "field_docs"]
