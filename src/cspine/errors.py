"""Typed input errors: the only exceptions the CLI turns into one line on stderr and exit code 2.

Anything else that escapes a command is a bug and is shown as one (a traceback, exit 1). Each error's message names
the file (or option) and the problem, so that a user knows what to fix without reading code.
"""

from __future__ import annotations


class CspineInputError(ValueError):
    """Bad input: a file, folder, option or model directory that cannot be used as given.

    Subclasses ValueError so that library callers catching ValueError keep working.
    """


class UsageError(CspineInputError):
    """A command-line option or path that the CLI itself refuses."""


class ConfigError(CspineInputError):
    """A configuration value (from the command line or a saved config file) that is out of range or unknown."""


class ResourceLimitError(CspineInputError):
    """An input whose declared size (pixels, voxels, uncompressed bytes) exceeds a documented limit."""
