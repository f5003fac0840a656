"""The report's interactive viewer: NiiVue (vendored, BSD-2) showing the CT with the vertebrae coloured by probability.

The page must stay one self-contained file that opens offline, so the CT and the overlay travel inside it as
base64 NIfTI (gzip). To keep a 512x512x400 study to a few MB the CT is cropped to the cervical spine (plus a
margin) and decimated by whole voxels (never interpolated) until it holds at most :data:`MAX_VOXELS`; the overlay
gets the same grid, so mask and image stay aligned voxel for voxel. Each vertebra jumps to its key slice: where its
slice-level score peaks, or the middle of its mask.
"""

from __future__ import annotations

import base64
import gzip
import html
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from importlib import resources

import numpy as np

from cspine.io.volume import WINDOWS, Volume
from cspine.labels import CERVICAL, LABEL_VALUES

#: Most voxels the embedded CT may hold (int16: 2 bytes each before gzip).
MAX_VOXELS = 4_000_000
#: Margin kept around the cervical vertebrae, in mm.
MARGIN_MM = 25.0
#: The CT travels as one byte per voxel: HU in [-800, 1495] in steps of 9 HU (NIfTI scl_slope / scl_inter give
#: HU back), which holds both presets whole: bone (-500..1300) keeps 200 grey levels, soft tissue (-160..240) 44.
HU_RANGE, HU_STEP = (-800, 1495), 9
#: Window presets offered as buttons (from the project's window table).
PRESETS = {"bone": WINDOWS["bone"], "soft tissue": WINDOWS["soft"]}


@dataclass(frozen=True)
class ViewerGrid:
    """The embedded grid: a crop start and a whole-voxel stride per axis of the study's (z, y, x) grid."""

    start: tuple[int, int, int]
    stop: tuple[int, int, int]
    stride: tuple[int, int, int]

    def take(self, array: np.ndarray) -> np.ndarray:
        (z0, y0, x0), (z1, y1, x1), (sz, sy, sx) = self.start, self.stop, self.stride
        return array[z0:z1:sz, y0:y1:sy, x0:x1:sx]

    def affine(self, vol_affine: np.ndarray) -> np.ndarray:
        aff = vol_affine.copy()
        aff[:3, :3] = vol_affine[:3, :3] * np.asarray(self.stride, dtype=np.float64)[None, :]
        aff[:3, 3] = vol_affine[:3, :3] @ np.asarray(self.start, dtype=np.float64) + vol_affine[:3, 3]
        return aff

    def to_grid(self, zyx: Sequence[float]) -> list[float]:
        """A study voxel (z, y, x) -> NIfTI voxel (i, j, k) = (x, y, z) on the embedded grid."""
        z, y, x = ((np.asarray(zyx, dtype=np.float64) - self.start) / self.stride).tolist()
        return [x, y, z]


def viewer_grid(vol: Volume, mask: np.ndarray, max_voxels: int = MAX_VOXELS) -> ViewerGrid:
    """Crop to the cervical vertebrae (+ margin; the whole study without any) and pick strides under the budget,
    always coarsening the axis with the finest effective spacing, so the voxels stay as near isotropic as can be."""
    cerv = (mask >= 1) & (mask <= 7)
    shape = np.array(vol.shape)
    if cerv.any():
        spans = [np.flatnonzero(cerv.any(axis=other)) for other in ((1, 2), (0, 2), (0, 1))]
        pad = np.ceil(MARGIN_MM / np.asarray(vol.spacing)).astype(int)
        lo = np.maximum(np.array([s[0] for s in spans]) - pad, 0)
        hi = np.minimum(np.array([s[-1] for s in spans]) + pad + 1, shape)
    else:
        lo, hi = np.zeros(3, dtype=int), shape
    stride = np.ones(3, dtype=int)
    spacing = np.asarray(vol.spacing, dtype=np.float64)
    while np.prod(-(-(hi - lo) // stride)) > max_voxels:
        stride[int(np.argmin(spacing * stride))] += 1
    return ViewerGrid(tuple(int(v) for v in lo), tuple(int(v) for v in hi), tuple(int(v) for v in stride))


def _nifti_b64(array: np.ndarray, affine_zyx: np.ndarray, scale: tuple[float, float] | None = None) -> str:
    """A gzipped NIfTI as base64; ``scale`` = (slope, intercept) from stored values to the real ones (HU)."""
    import nibabel as nib

    from cspine.io.nifti import nifti_affine

    img = nib.Nifti1Image(np.ascontiguousarray(array.transpose(2, 1, 0)), nifti_affine(affine_zyx))
    img.header.set_xyzt_units("mm")
    if scale is not None:
        img.header.set_slope_inter(*scale)
    return base64.b64encode(gzip.compress(img.to_bytes(), compresslevel=6, mtime=0)).decode("ascii")


def _colormap() -> dict[str, list[int]]:
    """The report's green (p 0) -> yellow (0.5) -> red (1) as a NiiVue colormap. NiiVue spreads the overlay's
    window [0, 100] over the table's 0..255, so an overlay value v = 1 + 99 p lands at index 2.55 v; index 0
    (v = 0: no vertebra) is transparent."""
    from cspine.report import _prob_colour

    colours = [(0.0, 0.0, 0.0), _prob_colour(0.0), _prob_colour(0.5), _prob_colour(1.0)]
    return {
        "R": [round(255 * c[0]) for c in colours],
        "G": [round(255 * c[1]) for c in colours],
        "B": [round(255 * c[2]) for c in colours],
        "A": [0, 255, 255, 255],
        "I": [0, 2, 128, 255],
    }


def key_voxels(
    mask: np.ndarray, slice_scores: Mapping[str, Sequence[tuple[int, float]]] | None
) -> dict[str, tuple[int, int, int]]:
    """Per vertebra in the mask, (z, y, x) of its key slice: the slice score's peak, else its middle slice; y, x at
    the vertebra's centre in that slice."""
    out: dict[str, tuple[int, int, int]] = {}
    for name in CERVICAL:
        sel = mask == LABEL_VALUES[name]
        zz = np.flatnonzero(sel.any(axis=(1, 2)))
        if not len(zz):
            continue
        scored = sorted((slice_scores or {}).get(name, []), key=lambda t: -t[1])
        peak = int(scored[0][0]) if scored else -1
        z = peak if 0 <= peak < len(sel) and sel[peak].any() else int(zz[len(zz) // 2])
        ys, xs = np.nonzero(sel[z])
        out[name] = (z, int(np.median(ys)), int(np.median(xs)))
    return out


def viewer_html(
    vol: Volume,
    mask: np.ndarray,
    probs: Mapping[str, float],
    slice_scores: Mapping[str, Sequence[tuple[int, float]]] | None = None,
    threshold: float = 0.5,
    max_voxels: int = MAX_VOXELS,
) -> str:
    """The viewer's HTML (a canvas, window buttons and the scripts), to be placed in the report page.

    Rows of the report's table with ``data-vertebra="C2"`` jump to that vertebra's key slice when clicked.
    """
    grid = viewer_grid(vol, mask, max_voxels)
    ct = ((np.clip(grid.take(vol.array), HU_RANGE[0], HU_RANGE[1]) - HU_RANGE[0]) // HU_STEP).astype(np.uint8)
    lut = np.zeros(256, dtype=np.uint8)
    for name in CERVICAL:
        if name in probs:
            lut[LABEL_VALUES[name]] = 1 + round(99 * float(np.clip(probs[name], 0.0, 1.0)))
    overlay = lut[grid.take(mask)]
    aff = grid.affine(vol.affine)
    (z0, y0, x0), (z1, y1, x1) = grid.start, grid.stop
    box = mask[z0:z1, y0:y1, x0:x1]  # every vertebra lies inside the crop: search there only
    box_scores = {n: [(z - z0, sc) for z, sc in v] for n, v in (slice_scores or {}).items()}
    keys = {n: grid.to_grid((z + z0, y + y0, x + x0)) for n, (z, y, x) in key_voxels(box, box_scores).items()}
    data = {
        "ct": _nifti_b64(ct, aff, scale=(HU_STEP, HU_RANGE[0])),
        "overlay": _nifti_b64(overlay, aff),
        "colormap": _colormap(),
        "presets": {k: [lv - wd / 2, lv + wd / 2] for k, (lv, wd) in PRESETS.items()},
        "keys": keys,
        "start": keys.get(next((n for n in CERVICAL if n in keys and probs.get(n, 0) >= threshold), "")),
    }
    library = resources.files("cspine.vendor").joinpath("niivue.umd.js").read_text(encoding="utf-8")
    buttons = "".join(
        f"<button type='button' data-preset='{html.escape(k)}'>{html.escape(k)}</button>" for k in PRESETS
    )
    payload = json.dumps(data, separators=(",", ":")).replace("</", "<\\/")
    return f"""<div id="viewer-box"><div id="viewer-tools">window: {buttons}
<span id="viewer-location"></span></div>
<canvas id="viewer" width="1200" height="440"></canvas></div>
<script id="viewer-data" type="application/json">{payload}</script>
<script>/* NiiVue 0.69.0, BSD-2-Clause, Copyright (c) 2021, Niivue; see cspine/vendor/ */
{library}
</script>
<script>{_VIEWER_JS}</script>"""


#: The page's glue: load both volumes, window presets, click-to-jump, and a small API for tests and users.
_VIEWER_JS = r"""
(function () {
  "use strict";
  var data = JSON.parse(document.getElementById("viewer-data").textContent);
  var box = document.getElementById("viewer-box");
  function status(s) { box.setAttribute("data-viewer", s); }
  status("loading");
  var nv = new niivue.Niivue({ backColor: [0, 0, 0, 1], show3Dcrosshair: false, isColorbar: false,
                                 crosshairColor: [0.2, 0.6, 1, 1], dragAndDropEnabled: false,
                                 isRadiologicalConvention: true });
  function where() {
    var vox = nv.frac2vox(nv.scene.crosshairPos);
    return [vox[0], vox[1], vox[2]];
  }
  function jump(name) {
    var key = data.keys[name];
    if (!key) { return false; }
    nv.scene.crosshairPos = nv.vox2frac(key);
    nv.drawScene();
    nv.createOnLocationChange();
    document.getElementById("viewer-location").textContent = name + " key slice";
    box.setAttribute("data-slice", String(Math.round(key[2])));
    return true;
  }
  function preset(name) {
    var w = data.presets[name];
    nv.volumes[0].cal_min = w[0];
    nv.volumes[0].cal_max = w[1];
    nv.updateGLVolume();
  }
  window.cspineViewer = { nv: nv, jump: jump, preset: preset, where: where };
  nv.attachTo("viewer").then(async function () {
    nv.addColormap("cspine-probability", data.colormap);
    var bone = data.presets["bone"];
    var ct = await niivue.NVImage.loadFromBase64({ base64: data.ct, name: "ct.nii.gz", colormap: "gray",
                                                   cal_min: bone[0], cal_max: bone[1] });
    var ov = await niivue.NVImage.loadFromBase64({ base64: data.overlay, name: "vertebrae.nii.gz",
                                                   colormap: "cspine-probability", opacity: 0.45,
                                                   cal_min: 0, cal_max: 100 });
    nv.addVolume(ct);
    nv.addVolume(ov);
    nv.setSliceType(nv.sliceTypeMultiplanar);
    preset("bone");
    if (data.start) { nv.scene.crosshairPos = nv.vox2frac(data.start); nv.drawScene(); }
    document.querySelectorAll("[data-preset]").forEach(function (b) {
      b.addEventListener("click", function () { preset(b.getAttribute("data-preset")); });
    });
    document.querySelectorAll("[data-vertebra]").forEach(function (row) {
      row.addEventListener("click", function () { jump(row.getAttribute("data-vertebra")); });
    });
    status("ready");
  }).catch(function (e) { status("error"); console.error("cspine viewer: " + e); });
})();
"""
