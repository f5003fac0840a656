"""Format versions of what cspine writes (model directories, bundles): major.minor, checked on read. Torch-free.

A reader accepts its own major and any minor up to its own: a minor adds what an older reader may ignore, a major
changes what existing files mean. Old integer formats read as ``n.0``, so they are refused once the major moved.
"""

from __future__ import annotations

from typing import Any

from cspine.errors import ConfigError, CspineInputError


def parse_format(value: Any) -> tuple[int, int] | None:
    """"2.1" -> (2, 1); an old integer format n -> (n, 0); anything else -> None."""
    if isinstance(value, int) and not isinstance(value, bool):
        return value, 0
    if not isinstance(value, str):
        return None
    parts = value.split(".")
    if len(parts) != 2 or not all(p.isdigit() for p in parts):
        return None
    return int(parts[0]), int(parts[1])


def check_format(
    found: Any, ours: str, what: str, hint: str = "", error: type[CspineInputError] = ConfigError
) -> None:
    """Refuse ``found`` unless it has our major and a minor no newer than ours: ``error`` with one line that says
    ``what`` (file or component), both versions and ``hint`` (what to do)."""
    f, o = parse_format(found), parse_format(ours)
    if o is None:
        raise ValueError(f"bad format version in the code: {ours!r}")
    if f is None or f[0] != o[0] or f[1] > o[1]:
        raise error(f"{what} format {found}, this cspine reads {o[0]}.0 to {ours}{'; ' + hint if hint else ''}")


__all__ = ["check_format", "parse_format"]
