"""The error type of DICOM reading.

In a module of its own so that every step of the reader (files, header, decode, geometry, assembly) can raise it
without the steps importing each other; :mod:`cspine.io.dicom` re-exports it.
"""

from __future__ import annotations

from cspine.errors import CspineInputError


class DicomError(CspineInputError):
    """A DICOM input cannot be read as a consistent CT volume; the message names the file(s) and the problem."""
