"""Pictures a person checks with their eyes: spine views with vertebra masks.

Matplotlib runs headless (Agg). Views are drawn with the true voxel aspect and with
the patient's head at the top, whichever way the slices were stored.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from cspine.io.volume import Volume, window
from cspine.labels import LABEL_NAMES

#: One colour per mask value (C1..C7 distinct, thoracic vertebrae share muted tones).
_CERVICAL_COLOURS = ["#e6194b", "#f58231", "#ffe119", "#3cb44b", "#42d4f4", "#4363d8", "#f032e6"]


def label_colour(value: int) -> str:
    """Display colour of a mask value."""
    if 1 <= value <= 7:
        return _CERVICAL_COLOURS[value - 1]
    return "#a9a9a9" if value % 2 else "#808080"


def _spine_centre(vol: Volume, mask: np.ndarray | None) -> tuple[int, int, int]:
    """Centre of the labelled vertebrae, else of dense bone, else of the volume (index z, y, x)."""
    if mask is not None and (mask > 0).any():
        pts = np.argwhere((mask > 0) & (mask <= 7)) if ((mask > 0) & (mask <= 7)).any() else np.argwhere(mask > 0)
        return tuple(int(v) for v in np.median(pts, axis=0))  # type: ignore[return-value]
    bone = vol.array > 300
    if bone.any():
        sub = np.argwhere(bone[:: max(1, vol.shape[0] // 64)])
        zyx = np.median(sub, axis=0)
        return (vol.shape[0] // 2, int(zyx[1]), int(zyx[2]))
    return tuple(s // 2 for s in vol.shape)  # type: ignore[return-value]


def _overlay(ax: object, labels2d: np.ndarray, extent: list[float] | None, origin: str) -> list[int]:
    """Draw each label in its colour, half transparent; return the labels drawn."""
    from matplotlib.colors import ListedColormap

    present = [int(v) for v in np.unique(labels2d) if v > 0]
    for v in present:
        layer = np.where(labels2d == v, 1.0, np.nan)
        ax.imshow(  # type: ignore[attr-defined]
            layer,
            cmap=ListedColormap([label_colour(v)]),
            alpha=0.45,
            extent=extent,
            origin=origin,
            interpolation="nearest",
            vmin=0,
            vmax=1,
        )
    return present


def show_spine(
    vol: Volume,
    mask: np.ndarray | None = None,
    out: str | os.PathLike[str] = "view.png",
    title: str | None = None,
    centre: tuple[int, int, int] | None = None,
) -> Path:
    """Axial, coronal and sagittal planes through the spine, mask overlaid per vertebra with a legend.

    Args:
        vol: the CT volume.
        mask: optional label map on ``vol``'s grid (1..7 = C1..C7, 8.. = T1..).
        out: PNG path (written atomically).
        title: figure title; defaults to a short geometry summary (no patient identity).
        centre: (z, y, x) the planes pass through; default the centre of the labelled spine.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    if mask is not None and mask.shape != vol.shape:
        raise ValueError(f"mask shape {mask.shape} differs from volume shape {vol.shape}")
    cz, cy, cx = centre or _spine_centre(vol, mask)
    dz, dy, dx = vol.spacing
    img = window(vol.array, "bone")
    # Is the head at high z index? Then draw z upwards (origin lower) so the head is at the top.
    head_up = vol.affine[2, 0] > 0
    origin = "lower" if head_up else "upper"
    nz, ny, nx = vol.shape
    views = [
        ("axial", img[cz], None if mask is None else mask[cz], [0, nx * dx, ny * dy, 0], "upper"),
        (
            "coronal",
            img[:, cy, :],
            None if mask is None else mask[:, cy, :],
            _extent(nx * dx, nz * dz, head_up),
            origin,
        ),
        (
            "sagittal",
            img[:, :, cx],
            None if mask is None else mask[:, :, cx],
            _extent(ny * dy, nz * dz, head_up),
            origin,
        ),
    ]
    fig, axes = plt.subplots(1, 3, figsize=(15, 6), facecolor="black")
    drawn: set[int] = set()
    for ax, (name, pic, lab, extent, org) in zip(axes, views, strict=True):
        ax.imshow(pic, cmap="gray", vmin=0, vmax=1, extent=extent, origin=org, interpolation="bilinear")
        if lab is not None:
            drawn.update(_overlay(ax, lab, extent, org))
        ax.set_title(name, color="white")
        ax.set_axis_off()
    if drawn:
        handles = [Patch(color=label_colour(v), label=LABEL_NAMES.get(v, str(v))) for v in sorted(drawn)]
        fig.legend(handles=handles, loc="lower center", ncol=min(10, len(handles)), frameon=False, labelcolor="white")
    summary = f"{nz}x{ny}x{nx} voxels, spacing {dz:.2f}/{dy:.2f}/{dx:.2f} mm"
    fig.suptitle(title or summary, color="white")
    out_path = Path(out)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_path.with_name(f".{out_path.name}.tmp{os.getpid()}.png")
    fig.savefig(tmp, dpi=100, facecolor="black", bbox_inches="tight")
    plt.close(fig)
    os.replace(tmp, out_path)
    return out_path


def _extent(width_mm: float, height_mm: float, head_up: bool) -> list[float]:
    return [0, width_mm, 0, height_mm] if head_up else [0, width_mm, height_mm, 0]
