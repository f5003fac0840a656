"""Resource limits on inputs, checked from headers before anything is allocated.

Why: a 2 MB deflated DICOM can declare a 32768 x 32768 slice, a 7 MB zip can expand to gigabytes, and a
PixelSpacing of 100 mm turns a 512 x 512 slice into a 51 m field of view that the segmenter would resample onto a
grid of billions of voxels. Each of these is refused with one line naming the file, the declared size and the
option that raises the limit, before any buffer of that size exists.

The limits are process-wide (the CLI sets them once from its options, decoding workers inherit them), so every
reader in a run applies the same ones without threading them through each call.

Example:
    >>> from cspine.io.limits import Limits, configure, active
    >>> configure(Limits(max_slice_pixels=8192 * 8192))  # doctest: +SKIP
    >>> active().max_slice_pixels  # doctest: +SKIP
    67108864
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from cspine.errors import ResourceLimitError


@dataclass(frozen=True)
class Limits:
    """Largest inputs cspine accepts; each has a command-line option (in brackets) to raise it.

    Attributes:
        max_slice_pixels: Rows x Columns x frames of one DICOM image [--max-slice-pixels]; 4096 x 4096 by default.
        max_series_voxels: voxels of one decoded series or NIfTI volume [--max-series-voxels]; 512 x 512 x 2048
            by default (1 GiB as int16).
        max_grid_voxels: voxels of a grid a study is resampled onto [--max-grid-voxels]; 2^28 by default
            (1 GiB as float32).
        max_zip_bytes: total uncompressed size of a zip's members [--max-zip-bytes]; 4 GiB by default.
        max_fov_mm: field of view along any axis [--max-fov-mm]; 2000 mm (no patient is longer).
    """

    max_slice_pixels: int = 4096 * 4096
    max_series_voxels: int = 512 * 512 * 2048
    max_grid_voxels: int = 1 << 28
    max_zip_bytes: int = 4 << 30
    max_fov_mm: float = 2000.0


#: Limit name -> the command-line option that raises it (the messages name the option).
OPTIONS: dict[str, str] = {f.name: "--" + f.name.replace("_", "-") for f in dataclasses.fields(Limits)}

_active = Limits()


def configure(limits: Limits) -> None:
    """Make ``limits`` the ones every reader of this process (and of the workers it starts) applies."""
    global _active
    _active = limits


def active() -> Limits:
    """The limits in force."""
    return _active


def check(name: str, value: float, what: str) -> None:
    """Raise ResourceLimitError when ``value`` exceeds the active limit ``name``.

    Args:
        name: a field of :class:`Limits`.
        value: the declared size.
        what: the file and the quantity, e.g. ``"a.dcm: 32768 x 32768 pixels per slice"``.
    """
    limit = getattr(_active, name)
    if value > limit:
        shown = f"{limit:,}" if isinstance(limit, int) else f"{limit:g}"
        raise ResourceLimitError(f"{what} exceeds the limit of {shown} ({OPTIONS[name]} raises it)")


def names_a_limit(message: str) -> bool:
    """True for a refusal message written by :func:`check` (or naming a limit's option), e.g. from a worker."""
    return any(f"{option} raises it" in message for option in OPTIONS.values())


def parse_size(text: str) -> int:
    """``"4G"``, ``"512M"``, ``"300k"`` or a plain number -> an int (binary multiples), for the CLI options."""
    t = str(text).strip().upper().removesuffix("B").removesuffix("I")
    scale = 1
    if t and t[-1] in "KMGT":
        scale = 1024 ** ("KMGT".index(t[-1]) + 1)
        t = t[:-1]
    try:
        value = float(t) * scale
    except ValueError:
        raise ValueError(f"not a size: {text!r} (e.g. 4G, 512M or 1000000)") from None
    if not value > 0:
        raise ValueError(f"not a positive size: {text!r}")
    return int(value)
