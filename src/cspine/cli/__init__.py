"""The ``cspine`` command: subcommands parse and validate, then call one library function.

Heavy imports (torch, monai, pydicom) happen inside the subcommand that needs them so
``cspine --help`` answers at once. Bad input of any kind ends with one line on stderr
and exit code 2, never a traceback.

A package so no module grows past a few hundred lines: :mod:`cspine.cli.args` checks arguments,
:mod:`cspine.cli.commands` holds the subcommands, :mod:`cspine.cli.parser` builds the parser; this module
keeps :func:`main` (the console script's entry point) and its error handling.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import logging
import os
import sys
from collections.abc import Callable, Sequence

from cspine.cli.args import _limits
from cspine.cli.parser import build_parser
from cspine.errors import CspineInputError

log = logging.getLogger("cspine")

#: Exit code for bad input (missing path, unreadable DICOM, broken model directory ...).
EXIT_BAD_INPUT = 2

__all__ = ["EXIT_BAD_INPUT", "build_parser", "main"]


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``cspine`` console script.

    Exit codes: 0 done, 2 bad input (a :class:`~cspine.errors.CspineInputError`, or an OS error about a path the
    user gave: one line on stderr), 130 interrupted; anything else is a bug and shows its traceback (1).
    """
    # Before torch loads OpenMP: idle threads sleep instead of spinning. On a shared or busy machine spinning
    # threads wait for a core another job holds; the segmenter's many small windows took 8.2 s instead of 2.4 s.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    _tolerant_streams()
    parser = build_parser()
    args = parser.parse_args(argv)
    # Our own messages at INFO; third-party libraries (openjpeg logs every tile) only from WARNING up.
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    logging.getLogger("cspine").setLevel(logging.DEBUG if args.verbose else logging.INFO)
    if not getattr(args, "func", None):
        parser.print_help()
        return EXIT_BAD_INPUT
    from cspine.runtime import remove_stale_decode_buffers

    remove_stale_decode_buffers()
    func: Callable[[argparse.Namespace], int] = args.func
    try:
        _limits(args)
        from cspine.io import set_default_hu_offset

        set_default_hu_offset(getattr(args, "hu_offset", None))
        code = func(args)
    except KeyboardInterrupt:
        print("cspine: interrupted", file=sys.stderr)
        code = 130
    except (CspineInputError, OSError) as exc:
        message = _input_error(exc)
        if message is None:
            raise  # an OS error that is not about a path the user gave: a bug or the machine, shown as such
        if args.verbose:
            log.exception("failed")
        print(f"cspine {args.command}: error: {message}", file=sys.stderr)
        code = EXIT_BAD_INPUT
    if argv is None:  # the process's own entry point (console script, python -m): a torchrun worker ends here
        from cspine.runtime import exit_worker

        return exit_worker(code)
    return code


#: OS errors that say something about a path the user gave (missing, not allowed, wrong kind, too long, full).
_PATH_ERRNOS = {errno.ENOENT, errno.EACCES, errno.EPERM, errno.ENOTDIR, errno.EISDIR, errno.EEXIST,
                errno.ENAMETOOLONG, errno.ELOOP, errno.ENOSPC, errno.EROFS, errno.EDQUOT}  # fmt: skip


def _input_error(exc: BaseException) -> str | None:
    """The one line for a bad-input exception, or None when it is not one (then it is re-raised as a bug)."""
    if isinstance(exc, CspineInputError):
        return str(exc).strip().replace("\n", " ")
    if isinstance(exc, OSError):
        if exc.errno in _PATH_ERRNOS and exc.filename is not None:
            return f"{exc.filename}: {exc.strerror}"
        if exc.errno is None and isinstance(exc, (FileNotFoundError, NotADirectoryError)) and exc.args:
            return str(exc)  # raised by cspine itself with a message naming the path
    return None


def _tolerant_streams() -> None:
    """Never fail on printing: a path that is not valid UTF-8 (kept by Python as surrogates) is printed escaped
    instead of raising UnicodeEncodeError after every output was written."""
    for stream in (sys.stdout, sys.stderr):
        reconfigure = getattr(stream, "reconfigure", None)
        if reconfigure is not None:
            with contextlib.suppress(ValueError, OSError):
                reconfigure(errors="backslashreplace")
