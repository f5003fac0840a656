"""The per-study report a radiologist can check with their eyes: PNG and a self-contained HTML page.

A sagittal and a coronal reformat through the spine show each vertebra coloured by its
fracture probability (green -> red); for each vertebra above the threshold, the axial
slices where the slice-level head fires most are shown with the vertebra outlined.
The HTML embeds every image (base64) so it can be mailed or archived as one file.
"""

from __future__ import annotations

import base64
import html
import io
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from cspine.io.volume import Volume, window
from cspine.labels import CERVICAL, LABEL_VALUES, PATIENT


def _prob_colour(p: float) -> tuple[float, float, float]:
    """Green (0) -> yellow (0.5) -> red (1)."""
    p = float(np.clip(p, 0.0, 1.0))
    return (min(1.0, 2 * p), min(1.0, 2 * (1 - p)), 0.1)


def _head_up(vol: Volume) -> bool:
    return bool(vol.affine[2, 0] > 0)


def _prob_overlay(labels2d: np.ndarray, probs: Mapping[str, float]) -> np.ndarray:
    """RGBA image: each cervical vertebra filled with its probability colour."""
    rgba = np.zeros((*labels2d.shape, 4), dtype=np.float32)
    for name in CERVICAL:
        sel = labels2d == LABEL_VALUES[name]
        if sel.any() and name in probs:
            rgba[sel, :3] = _prob_colour(probs[name])
            rgba[sel, 3] = 0.5
    return rgba


def _fig_png(fig: Any) -> bytes:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, facecolor=fig.get_facecolor(), bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()


def overview_png(vol: Volume, mask: np.ndarray, probs: Mapping[str, float], title: str = "") -> bytes:
    """Sagittal + coronal reformats through the spine, vertebrae coloured by fracture probability."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import LinearSegmentedColormap

    cerv = (mask >= 1) & (mask <= 7)
    pts = np.argwhere(cerv) if cerv.any() else np.argwhere(vol.array > 300)
    _, cy, cx = np.median(pts, axis=0).astype(int) if len(pts) else np.array(vol.shape) // 2
    dz, dy, dx = vol.spacing
    nz, ny, nx = vol.shape
    up = _head_up(vol)
    origin = "lower" if up else "upper"
    # Thick-slab maximum of the mask over +-4 mm so thin posterior elements stay visible.
    half_x = max(1, round(4.0 / dx))
    half_y = max(1, round(4.0 / dy))
    sag_lab = mask[:, :, max(0, cx - half_x) : cx + half_x + 1].max(axis=2)
    cor_lab = mask[:, max(0, cy - half_y) : cy + half_y + 1, :].max(axis=1)
    fig, axes = plt.subplots(1, 2, figsize=(11, 7), facecolor="black")
    for ax, pic, lab, w_mm, name in (
        (axes[0], window(vol.array[:, :, cx], "bone"), sag_lab, ny * dy, "sagittal"),  # the two planes only
        (axes[1], window(vol.array[:, cy, :], "bone"), cor_lab, nx * dx, "coronal"),
    ):
        extent = [0, w_mm, 0, nz * dz] if up else [0, w_mm, nz * dz, 0]
        ax.imshow(pic, cmap="gray", vmin=0, vmax=1, extent=extent, origin=origin)
        ax.imshow(_prob_overlay(lab, probs), extent=extent, origin=origin, interpolation="nearest")
        for name_v in CERVICAL:
            zz = np.argwhere(lab == LABEL_VALUES[name_v])
            if len(zz) and name_v in probs:
                z_mm = (zz[:, 0].mean() + 0.5) * dz
                x_mm = (zz[:, 1].max() + 2) * (w_mm / lab.shape[1])
                ax.text(x_mm, z_mm, f"{name_v} {probs[name_v]:.2f}", color="white", fontsize=9, va="center")
        ax.set_title(name, color="white")
        ax.set_axis_off()
    cmap = LinearSegmentedColormap.from_list("p", [_prob_colour(0), _prob_colour(0.5), _prob_colour(1)])
    sm = plt.cm.ScalarMappable(cmap=cmap, norm=plt.Normalize(0, 1))
    cbar = fig.colorbar(sm, ax=axes, fraction=0.025, pad=0.02)
    cbar.set_label("fracture probability", color="white")
    cbar.ax.yaxis.set_tick_params(color="white", labelcolor="white")
    fig.suptitle(title, color="white")
    return _fig_png(fig)


def axial_png(vol: Volume, mask: np.ndarray, vertebra: str, z_indices: Sequence[int], prob: float) -> bytes:
    """The axial slices where a vertebra's slice head fires most, vertebra outlined, in a bone window."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    zs = list(z_indices)[:4]
    fig, axes = plt.subplots(1, max(1, len(zs)), figsize=(3.2 * max(1, len(zs)), 3.6), facecolor="black")
    axes = np.atleast_1d(axes)
    value = LABEL_VALUES[vertebra]
    _, dy, dx = vol.spacing
    for ax, z in zip(axes, zs, strict=False):
        sel = mask[z] == value
        pic = window(vol.array[z], "bone")
        if sel.any():
            rows, cols = np.nonzero(sel)
            pad = 12
            r0, r1 = max(0, rows.min() - pad), min(sel.shape[0], rows.max() + pad + 1)
            c0, c1 = max(0, cols.min() - pad), min(sel.shape[1], cols.max() + pad + 1)
        else:
            r0, r1, c0, c1 = 0, sel.shape[0], 0, sel.shape[1]
        # Pixel coordinates for both layers (so the outline sits exactly on its pixels), true aspect.
        ax.imshow(pic[r0:r1, c0:c1], cmap="gray", vmin=0, vmax=1, aspect=dy / dx)
        if sel.any():
            ax.contour(sel[r0:r1, c0:c1].astype(float), levels=[0.5], colors=[_prob_colour(prob)], linewidths=1.2)
        inst = int(vol.instance_numbers[z]) if len(vol.instance_numbers) else z
        ax.set_title(f"{vertebra} slice {inst}", color="white", fontsize=9)
        ax.set_axis_off()
    return _fig_png(fig)


def _b64(png: bytes) -> str:
    return base64.b64encode(png).decode("ascii")


def write_report(
    out_dir: Path,
    vol: Volume,
    mask: np.ndarray,
    result: Mapping[str, Any],
    slice_scores: Mapping[str, Sequence[tuple[int, float]]] | None = None,
    threshold: float = 0.5,
    viewer: bool = True,
) -> tuple[Path, Path]:
    """Write report.png (the overview) and report.html (overview, viewer, table, axial views; self-contained).

    Args:
        out_dir: output folder.
        vol, mask: the study and its vertebra label map on the same grid.
        result: the result dict (patient_overall, C1..C7, vertebrae, warnings).
        slice_scores: per vertebra, (z index, score) of its sampled slices; the highest are shown.
        threshold: vertebrae at or above it get axial views.
        viewer: embed the interactive viewer (cspine.viewer: NiiVue, the CT and the coloured vertebrae).
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    probs = {k: float(result[k]) for k in CERVICAL if result.get(k) is not None}
    patient = result.get(PATIENT)
    assessed = result.get("fractures") != "not assessed"
    why = "no cervical spine in the field of view" if assessed else "fractures not assessed"
    patient_text = f"n/a ({why})" if patient is None else f"{float(patient):.3f}"
    overview = overview_png(vol, mask, probs, title=f"patient fracture probability {patient_text}")
    png_path = out_dir / "report.png"
    tmp = png_path.with_name(f".{png_path.name}.tmp{os.getpid()}")
    tmp.write_bytes(overview)
    os.replace(tmp, png_path)
    rows = []
    axials = []
    verts = result.get("vertebrae", {})
    for name in CERVICAL:
        info = verts.get(name, {})
        p = probs.get(name)
        present = info.get("present", p is not None)
        sl = info.get("slices")
        rows.append(
            f"<tr class='{'hit' if p is not None and p >= threshold else ''}' data-vertebra='{name}'><td>{name}</td>"
            f"<td>{'' if p is None else f'{p:.3f}'}</td><td>{'yes' if present else 'no'}</td>"
            f"<td>{html.escape(str(sl) if sl else '-')}</td></tr>"
        )
        if p is not None and p >= threshold and present:
            scored = sorted((slice_scores or {}).get(name, []), key=lambda t: -t[1])
            zs = [int(z) for z, _ in scored[:3]]
            if not zs:
                zz = np.nonzero((mask == LABEL_VALUES[name]).any(axis=(1, 2)))[0]
                zs = [int(zz[len(zz) // 2])] if len(zz) else []
            if zs:
                axials.append(
                    f"<h3>{name}: p = {p:.2f}</h3><img alt='{name} axial slices' "
                    f"src='data:image/png;base64,{_b64(axial_png(vol, mask, name, zs, p))}'>"
                )
    warnings = "".join(f"<li>{html.escape(str(w))}</li>" for w in result.get("warnings", []))
    uid = html.escape(str(result.get("StudyInstanceUID", "")))
    scroll = ""
    if viewer:
        from cspine.viewer import viewer_html

        scroll = ("<h2>Viewer</h2><p>Axial, coronal and sagittal planes: click or drag to move, scroll to page "
                  "through slices, click a vertebra in the table to jump to its key slice.</p>"
                  + viewer_html(vol, mask, probs, slice_scores, threshold))
    page = f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>cspine report {uid}</title>
<style>body{{font-family:sans-serif;background:#111;color:#eee;margin:2em}}table{{border-collapse:collapse}}
td,th{{border:1px solid #555;padding:4px 10px}}tr.hit td{{background:#5a1d1d}}img{{max-width:100%}}
tr[data-vertebra]{{cursor:pointer}}#viewer{{width:100%;height:440px;display:block}}
#viewer-tools button{{margin:0 4px 6px 0}}</style></head>
<body><h1>Cervical spine fracture report</h1>
<p>Study {uid}. Patient-level fracture probability: <b>{patient_text}</b>
(threshold {threshold:.2f}). Research software, not a medical device.</p>
<img id="overview" alt="sagittal and coronal overview" src="data:image/png;base64,{_b64(overview)}">
<table id="vertebrae"><tr><th>vertebra</th><th>probability</th><th>in field of view</th><th>slices</th></tr>
{"".join(rows)}</table>
{scroll}
{"<h2>Warnings</h2><ul>" + warnings + "</ul>" if warnings else ""}
<h2>Vertebrae above threshold</h2>{"".join(axials) or "<p>none</p>"}
<script>
// Self-check for headless browsers and archivists: every embedded image decoded.
window.addEventListener("load", function () {{
  var imgs = Array.prototype.slice.call(document.images);
  var ok = imgs.every(function (im) {{ return im.complete && im.naturalWidth > 0; }});
  document.body.setAttribute("data-images", ok ? "ok:" + imgs.length : "broken");
}});
</script>
</body></html>
"""
    html_path = out_dir / "report.html"
    tmp = html_path.with_name(f".{html_path.name}.tmp{os.getpid()}")
    tmp.write_text(page)
    os.replace(tmp, html_path)
    return png_path, html_path
