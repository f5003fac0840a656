"""Real necks beside generated wide-profile studies: docs/real_vs_synth.png and the realism table.

Run: ``.venv/bin/python benchmarks/real_vs_synth.py [--real ../shared/data/real] [--out docs/real_vs_synth.png]``.
Rows: the OpenKBP head-and-neck CT, the Slicer neck CT (stored values = HU + 1024, corrected here), the cornerstone
cervico-thoracic slice, then wide-profile studies of several fields of view (seed 0, small size). Columns: the
mid-sagittal plane in a bone window (W 1800 / L 400), then an axial plane in a soft-tissue window (W 400 / L 40) and
in the bone window: through the neck (neck and chest: through T1, the real slice's level; no neck: the middle
slice). Every panel shows the same millimetres around the image centre, so sizes compare directly. Prints the median
HU and body fraction of fat / soft tissue / bone for the real slice, the real necks, and the wide and default
profiles (the README's realism table).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from cspine.io.volume import Volume
from cspine.labels import CERVICAL_VALUES, LABEL_VALUES
from cspine.synth import generate_study

BANDS = {"fat": (-200, -30), "soft": (-30, 120), "bone": (250, 3100)}
WINDOWS = {"bone": (400, 1800), "soft": (40, 400)}
FOVS_SHOWN = ("head_neck", "neck", "neck_chest", "head", "chest")
VIEW_MM = ((130.0, 170.0), (210.0, 160.0))  # half width, half height of the sagittal and axial panels (mm)


def band_stats(hu: np.ndarray) -> dict[str, tuple[float, float]]:
    """Median HU and fraction of body pixels (-500 < HU, padding excluded) per fixed HU band."""
    body = hu[(hu > -500) & (hu < 3500)]
    return {
        k: (float(np.median(body[(body >= lo) & (body < hi)])), float(((body >= lo) & (body < hi)).mean()))
        for k, (lo, hi) in BANDS.items()
    }


def _planes(arr: np.ndarray, spacing: tuple[float, float, float], k: int, x: int) -> tuple[np.ndarray, np.ndarray]:
    """(sagittal with z up, axial) of a (z, y, x) array."""
    return arr[::-1, :, x], arr[k]


def _real(root: Path) -> list[tuple[str, np.ndarray, tuple[float, float, float], int, int]]:
    from cspine.io.dicom import load_series, read_hu
    from cspine.io.nifti import load_nifti_volume

    out = []
    a = load_nifti_volume(root / "nifti/openkbp_hn_pt2/ct.nii.gz")
    out.append(("real: OpenKBP pt2 (H&N planning CT)", a.array.astype(np.float32), a.spacing, 70, 64))
    b = load_series(root / "series/slicer_ctheadaxial_neck")
    out.append(("real: Slicer neck (HU = stored - 1024)", b.array.astype(np.float32) - 1024, b.spacing, 30, 32))
    c = read_hu(str(root / "codec/cornerstone_ctimage/CTImage.dcm")).astype(np.float32)[None]
    out.append(("real: cornerstone CTImage (one slice)", c, (5.0, 0.6758, 0.6758), 0, 256))
    return out


def _synthetic(n_max: int = 40) -> list[tuple[str, np.ndarray, tuple[float, float, float], int, int]]:
    out, seen = [], set()
    for i in range(n_max):
        st = generate_study(0, "small", i, profile="wide")
        fov = st.extra["fov"]
        if fov in seen or fov not in FOVS_SHOWN:
            continue
        seen.add(fov)
        vol: Volume = st.volume
        arr = vol.array.astype(np.float32)
        cerv = np.isin(st.mask, CERVICAL_VALUES)
        lab = cerv if cerv.any() else st.mask > 0
        if lab.any():
            zz, _, xx = np.nonzero(lab)
            k = int(np.median(zz)) if cerv.any() else arr.shape[0] // 2
            x = int(np.median(xx))
            t1 = np.nonzero(st.mask == LABEL_VALUES["T1"])[0]
            if fov == "neck_chest" and len(t1):  # the level of the real cervico-thoracic slice
                k = int(np.median(t1))
        else:
            k, x = arr.shape[0] // 2, arr.shape[2] // 2
        dz, dx = st.extra["slice_spacing"], st.extra["pixel_spacing"]
        title = f"wide #{i}: {fov}, {dx:.2f} x {dz:.2f} mm, pad {st.extra['padding_hu']}"
        out.append((title, arr, vol.spacing, k, x))
        if len(seen) == len(FOVS_SHOWN):
            break
    return out


def figure(rows: list[tuple[str, np.ndarray, tuple[float, float, float], int, int]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(rows), 3, figsize=(10.5, 3.3 * len(rows)), facecolor="black")
    for r, (title, arr, sp, k, x) in enumerate(rows):
        sag, ax_ = _planes(arr, sp, k, x)
        dz, dy, dx = sp
        panels = [
            (sag, WINDOWS["bone"], (0, sag.shape[1] * dy, 0, sag.shape[0] * dz), "sagittal, bone"),
            (ax_, WINDOWS["soft"], (0, ax_.shape[1] * dx, ax_.shape[0] * dy, 0), "axial, soft tissue"),
            (ax_, WINDOWS["bone"], (0, ax_.shape[1] * dx, ax_.shape[0] * dy, 0), "axial, bone"),
        ]
        for c, (img, (level, width), extent, name) in enumerate(panels):
            a = axes[r, c]
            if arr.shape[0] == 1 and c == 0:
                a.set_axis_off()
                continue
            a.imshow(img, cmap="gray", vmin=level - width / 2, vmax=level + width / 2, extent=extent)
            half = VIEW_MM[0 if c == 0 else 1]  # the same millimetres in every row, so sizes compare
            cx, cy = (extent[0] + extent[1]) / 2, (extent[2] + extent[3]) / 2
            a.set_xlim(cx - half[0], cx + half[0])
            a.set_ylim(*((cy - half[1], cy + half[1]) if c == 0 else (cy + half[1], cy - half[1])))
            a.set_facecolor("black")
            a.set_title(f"{title}\n{name}" if c == 0 or (c == 1 and arr.shape[0] == 1) else name, color="w", fontsize=7)
            a.set_xticks([])
            a.set_yticks([])
    fig.tight_layout()
    fig.savefig(path, dpi=80, facecolor="black")
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--real", type=Path, default=Path(__file__).resolve().parents[2] / "shared" / "data" / "real")
    ap.add_argument("--out", type=Path, default=Path("docs/real_vs_synth.png"))
    ap.add_argument("--stats-studies", type=int, default=12)
    args = ap.parse_args()
    real = _real(args.real)
    synth = _synthetic()
    figure(real + synth, args.out)
    print(args.out)

    print("| HU band | real slice (CTImage) | real necks (OpenKBP, Slicer) | wide profile | default profile |")
    print("|---|---|---|---|---|")
    ref = band_stats(real[2][1])
    necks = [band_stats(real[0][1]), band_stats(real[1][1])]
    wide = [
        band_stats(generate_study(0, "small", i, profile="wide").volume.array.astype(np.float32))
        for i in range(args.stats_studies)
    ]
    default = [band_stats(generate_study(0, "small", i).volume.array.astype(np.float32)) for i in range(4)]

    def mean(stats: list[dict[str, tuple[float, float]]], k: str) -> str:
        return f"{np.mean([s[k][0] for s in stats]):.0f} / {np.mean([s[k][1] for s in stats]):.2f}"

    for k in BANDS:
        print(f"| {k} | {ref[k][0]:.0f} / {ref[k][1]:.2f} | {mean(necks, k)} | {mean(wide, k)} | {mean(default, k)} |")


if __name__ == "__main__":
    main()
