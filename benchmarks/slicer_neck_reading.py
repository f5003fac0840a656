"""Sagittal reformats of the real Slicer neck CT, for reading its vertebra levels by eye (docs/real_ct.md).

    python benchmarks/slicer_neck_reading.py \
        ../shared/data/real/series/slicer_ctheadaxial_neck docs/slicer_neck_reading.png

The series stores HU + 1024 with intercept 0, so it is read with --hu-offset -1024's correction. Two midline
columns (x = 31, 32 of 64), the spine region only, z in mm above the lowest slice with a 5 mm grid; under them the
six lowest axial slices with the shipped segmenter's C5 / C6 / C7 outlined (where its C7 lies). Also printed:
the mean HU of the anterior column (the vertebral bodies: rows 115-141 mm, columns 29-34) per slice, with the discs
marked (a slice darker than its neighbours within 3 mm and more than 40 HU under the brightest slice within 6 mm on
each side), which places the bodies' ends without reading by eye.
"""

from __future__ import annotations

import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np

from cspine.io import load_study
from cspine.seg.infer import load_model, segment_volume
from cspine.seg.shipped import shipped_model

OUTLINES = {5: "cyan", 6: "yellow", 7: "red"}


def main(study: str, out: str) -> None:
    vol = load_study(study, hu_offset=-1024)
    a = vol.array.astype(float)
    dz, dy, _ = vol.spacing
    mask = segment_volume(vol, load_model(shipped_model(), "cpu")).mask
    fig = plt.figure(figsize=(14, 15))
    grid = fig.add_gridspec(2, 6, height_ratios=(12, 2.2), hspace=0.08)
    for col, x in enumerate((31, 32)):
        ax = fig.add_subplot(grid[0, 3 * col : 3 * col + 3])
        ax.imshow(
            a[:, :, x],
            cmap="gray",
            vmin=-200,
            vmax=1300,
            origin="lower",
            extent=(0, a.shape[1] * dy, 0, a.shape[0] * dz),
        )
        ax.set_xlim(90, 190)
        ax.set_ylim(0, a.shape[0] * dz)
        ax.set_title(f"sagittal x={x} (row mm ->, z mm above lowest slice ^)")
        ax.set_yticks(np.arange(0, a.shape[0] * dz, 5))
        ax.grid(alpha=0.4, color="y")
    for k in range(6):
        ax = fig.add_subplot(grid[1, k])
        ax.imshow(a[k], cmap="gray", vmin=-200, vmax=1300)
        for value, colour in OUTLINES.items():
            if (mask[k] == value).any():
                ax.contour(mask[k] == value, levels=[0.5], colors=colour, linewidths=1)
        ax.set_xlim(17, 46)
        ax.set_ylim(56, 33)
        ax.set_title(f"axial {k * dz:.1f} mm", fontsize=10)
        ax.set_xticks([])
        ax.set_yticks([])
        if k == 0:
            ax.set_ylabel("C6 yellow, C7 red")
    fig.savefig(out, dpi=70, bbox_inches="tight")
    print(
        ", ".join(
            f"{label} {(mask == v).sum() * float(np.prod(vol.spacing)) / 1000:.1f} ml"
            for v, label in ((5, "C5"), (6, "C6"), (7, "C7"))
        )
    )
    rows = slice(int(115 / dy), int(141 / dy) + 1)
    column = a[:, rows, 29:35].mean(axis=(1, 2))
    reach, near = round(6 / dz), round(3 / dz)
    for k, hu in enumerate(column):
        sides = column[max(0, k - reach) : k], column[k + 1 : k + 1 + reach]
        disc = (
            all(len(side) for side in sides)
            and hu <= column[max(0, k - near) : k + near + 1].min()
            and hu < min(side.max() for side in sides) - 40
        )
        print(f"{k * dz:5.1f} mm  {hu:4.0f} HU{'  disc' if disc else ''}")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
