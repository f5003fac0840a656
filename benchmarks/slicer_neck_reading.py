"""Sagittal reformats of the real Slicer neck CT, for reading its vertebra levels by eye (docs/real_ct.md).

    python benchmarks/slicer_neck_reading.py \
        ../shared/data/real/series/slicer_ctheadaxial_neck docs/slicer_neck_reading.png

The series stores HU + 1024 with intercept 0, so it is read with --hu-offset -1024's correction. Two midline
columns (x = 31, 32 of 64), the spine region only, z in mm above the lowest slice with a 5 mm grid.
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
        ax.imshow(a[:, :, x], cmap="gray", vmin=-200, vmax=1300, origin="lower",
                  extent=(0, a.shape[1] * dy, 0, a.shape[0] * dz))
        ax.set_xlim(90, 190)
        ax.set_ylim(0, a.shape[0] * dz)
        ax.set_title(f"sagittal x={x} (row mm ->, z mm above lowest slice ^)")
        ax.set_yticks(np.arange(0, a.shape[0] * dz, 5))
        ax.grid(alpha=0.4, color="y")
    fig.savefig(out, dpi=70, bbox_inches="tight")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
