"""Argument checks of the ``cspine`` command: input paths that must exist, output files and folders checked before
any work, sizes, shards, and the resource limits applied process-wide.

Kept apart from the parser and the subcommands because both use them; nothing here imports torch.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from cspine.errors import UsageError


def _existing(path: str) -> Path:
    p = Path(path)
    try:
        p.stat()
    except FileNotFoundError:
        raise UsageError(f"{p}: no such file or folder") from None
    except OSError as exc:  # a name longer than PATH_MAX, a loop of links, a folder we may not enter ...
        raise UsageError(f"{p}: {exc.strerror or exc}") from None
    return p


def _output_file(path: str, suffixes: tuple[str, ...] = ()) -> Path:
    """Check an output file's name before any work: the right extension, not a folder, a parent that can be made."""
    p = Path(path)
    if p.is_dir():
        ending = f" ending in {' or '.join(suffixes)}" if suffixes else ""
        raise UsageError(f"{p}: is a folder; give a file name{ending}")
    if suffixes and not p.name.lower().endswith(suffixes):
        raise UsageError(f"{p}: the output must end in {' or '.join(suffixes)}")
    _writable_parent(p)
    return p


def _writable_parent(p: Path) -> None:
    parent = p.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise UsageError(f"{p}: {parent} is a file, not a folder")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise UsageError(f"{p}: cannot write in {parent} (permission denied)")


def _output_folder(path: str) -> Path:
    """Check an output folder before any work: not a file, writable, and (if it has files) an earlier output of
    the same command (it is then replaced as a whole), never someone's folder of other files."""
    from cspine.predict import check_out_folder

    p = Path(path)
    check_out_folder(p)
    _writable_parent(p)  # the folder is built beside it, then renamed into place
    return p


def _limits(args: argparse.Namespace) -> None:
    """Apply the resource-limit options (commands that read studies have them) process-wide."""
    from cspine.io.limits import Limits, configure

    if not hasattr(args, "max_slice_pixels"):
        configure(Limits())
        return
    configure(Limits(**{name: getattr(args, name) for name in Limits.__dataclass_fields__}))


def _parse_shard(text: str | None) -> tuple[int, int]:
    if not text:
        return (0, 1)
    try:
        i, n = (int(v) for v in text.split("/"))
    except ValueError as exc:
        raise UsageError(f"--shard must look like i/n (e.g. 0/4), got {text!r}") from exc
    if not (n >= 1 and 0 <= i < n):
        raise UsageError(f"--shard {text!r}: need 0 <= i < n")
    return (i, n)


def _size(text: str) -> int:
    from cspine.io.limits import parse_size

    try:
        return parse_size(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
