"""The craniocervical junction as the coarse segmenter sees it: real necks beside generated head-and-neck studies.

Run: ``.venv/bin/python benchmarks/junction_view.py [--real ../shared/data/real] [--out docs/junction_view.png]``.
Every row is the coarse stage's own input (the study on its 2 mm canonical grid, windowed as the network gets it),
centred on the foramen magnum: OpenKBP pt2 (the lower end of its Brainstem contour), the Slicer neck (its reading in
docs/real_ct.md: the occiput's inner table ends ~90 mm above the lowest slice), then generated wide-profile head
and neck studies (the generator's own landmark). Columns: mid-sagittal (anterior to the right), coronal through the
atlas, axial 10 mm above the foramen magnum (the skull base) and 12 mm below it (the atlas). Where the real and the
generated skull bases differ, a segmenter trained on the generated ones misreads the real one (docs/real_ct.md).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from cspine.io import load_study
from cspine.io.volume import Volume
from cspine.seg.data import to_model_grid
from cspine.seg.infer import load_model
from cspine.synth import generate_study
from cspine.synth.appearance import draw_fov
from cspine.synth.sampling import study_rng

HALF = 35  # half size of each panel in model voxels (2 mm)


def _row(vol: Volume, point_lps: np.ndarray, pre: object) -> tuple[np.ndarray, tuple[int, int, int]]:
    """The model-grid image and the (z, y, x) model voxel of ``point_lps`` (through the grid map: the study index
    permuted and flipped to canonical order, then divided by the model step)."""
    image, gm = to_model_grid(vol, pre)  # type: ignore[arg-type]
    index = vol.patient_to_index(point_lps[None])[0]
    canonical = np.array([index[p] for p in gm.perm])
    canonical = np.where(gm.flip, np.array(gm.shape) - 1 - canonical, canonical)
    model = np.clip(np.round(canonical / gm.scale).astype(int), 0, np.array(gm.model_shape) - 1)
    return image, tuple(int(i) for i in model)  # type: ignore[return-value]


def _crop(a: np.ndarray, centre: tuple[int, int], half: int) -> np.ndarray:
    pad = np.pad(a, half, constant_values=0.0)
    return pad[centre[0] : centre[0] + 2 * half, centre[1] : centre[1] + 2 * half]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--real", type=Path, default=Path("../shared/data/real"))
    ap.add_argument("--out", type=Path, default=Path("docs/junction_view.png"))
    ap.add_argument("--generated", type=int, default=3, help="generated head-and-neck studies (seed 0)")
    args = ap.parse_args()
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import nibabel as nib

    pre = load_model(Path(__file__).resolve().parents[1] / "src/cspine/weights/segmenter").preprocess
    rows = []
    okbp = args.real / "nifti/openkbp_hn_pt2"
    if okbp.exists():
        vol = load_study(okbp / "ct.nii.gz")
        st = nib.as_closest_canonical(nib.load(okbp / "structures.nii.gz"))
        labels = np.asarray(st.dataobj)
        brainstem = np.argwhere(labels == 1)
        low = brainstem[brainstem[:, 2] == brainstem[:, 2].min()].mean(0)
        ras = st.affine[:3, :3] @ low + st.affine[:3, 3]
        rows.append(("OpenKBP pt2 (real)", vol, np.array([-ras[0], -ras[1], ras[2]])))
    slicer = args.real / "series/slicer_ctheadaxial_neck"
    if slicer.exists():
        vol = load_study(slicer, hu_offset=-1024)
        ends = vol.index_to_patient(np.array([[k, vol.shape[1] / 2, vol.shape[2] / 2] for k in (0, vol.shape[0] - 1)]))
        rows.append(("Slicer neck (real)", vol, ends[np.argmin(ends[:, 2])] + np.array([0.0, 0.0, 90.0])))
    for i in [i for i in range(80) if draw_fov(study_rng(0, "train", i, 7)) == "head_neck"][: args.generated]:
        g = generate_study(0, "small", i, profile="wide")
        k, r, c = np.nonzero(g.mask == 1)
        c1 = g.volume.index_to_patient(np.array([[k.mean(), r.mean(), c.mean()]]))[0]
        fm = np.array([c1[0], c1[1], g.params["landmarks"]["foramen_magnum"]])
        rows.append((f"generated head and neck #{i} ({g.extra['pixel_spacing']:.1f} mm)", g.volume, fm))
    fig, ax = plt.subplots(len(rows), 4, figsize=(16, 4.2 * len(rows)), squeeze=False)
    for r, (name, vol, point) in enumerate(rows):
        image, (z, y, x) = _row(vol, point, pre)
        panels = [
            (_crop(image[:, :, x], (z, y), HALF)[::-1, ::-1], f"{name}: sagittal"),
            (_crop(image[:, y, :], (z, x), HALF)[::-1], "coronal"),
            (_crop(image[min(z + 5, image.shape[0] - 1)], (y, x), HALF), "axial, foramen magnum + 10 mm"),
            (_crop(image[max(z - 6, 0)], (y, x), HALF), "axial, foramen magnum - 12 mm"),
        ]
        for c, (panel, title) in enumerate(panels):
            ax[r, c].imshow(panel, cmap="gray", vmin=0.0, vmax=1.0)
            ax[r, c].set_title(title, fontsize=9)
            ax[r, c].axis("off")
    fig.tight_layout()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=60)
    print(args.out)


if __name__ == "__main__":
    main()
