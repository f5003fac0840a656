"""Sagittal reformats of the real Slicer neck CT, for reading its vertebra levels by eye (docs/real_ct.md).

    python benchmarks/slicer_neck_reading.py \
        ../shared/data/real/series/slicer_ctheadaxial_neck docs/slicer_neck_reading.png

The series stores HU + 1024 with intercept 0, so it is read with --hu-offset -1024's correction. Two midline
columns (x = 31, 32 of 64), the spine region only, z in mm above the lowest slice with a 5 mm grid. Also printed:
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


def main(study: str, out: str) -> None:
    vol = load_study(study, hu_offset=-1024)
    a = vol.array.astype(float)
    dz, dy, _ = vol.spacing
    fig, axs = plt.subplots(1, 2, figsize=(14, 12))
    for ax, x in zip(axs, (31, 32), strict=True):
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
    fig.savefig(out, dpi=70, bbox_inches="tight")
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
