"""Pictures of the classification stage: crop grids, training curves, confusion matrices, ROC curves.

The seed showed crops, loss/accuracy curves and a confusion matrix; these keep those pictures (now per vertebra and
on study-grouped data) so a reader can check with their eyes what the numbers claim. Matplotlib runs headless (Agg)
and every PNG is written atomically, as :func:`cspine.plots.show_spine` does.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from cspine.labels import CERVICAL, LABEL_VALUES


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig: Any, out: str | os.PathLike[str], facecolor: str = "white") -> Path:
    plt = _pyplot()
    path = Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}.png")
    fig.savefig(tmp, dpi=90, facecolor=facecolor, bbox_inches="tight")
    plt.close(fig)
    os.replace(tmp, path)
    return path


def crop_grid(crops: Mapping[str, Any], out: str | os.PathLike[str], title: str | None = None) -> Path:
    """One row per vertebra, one column per sampled slice: the centre slice in the bone window, the mask outline
    in the vertebra's colour, and fracture boxes in red (the seed's save_crop_seg, for looking at)."""
    from matplotlib.patches import Rectangle

    from cspine.plots import label_colour

    plt = _pyplot()
    names = [v for v in CERVICAL if v in crops]
    if not names:
        raise ValueError("no crops to draw")
    k = crops[names[0]].images.shape[0]
    fig, axes = plt.subplots(len(names), k, figsize=(1.3 * k, 1.4 * len(names)), facecolor="black", squeeze=False)
    for r, v in enumerate(names):
        c = crops[v]
        centre = (c.images.shape[1] - (1 if c.images.shape[1] > 1 else 0)) // 2
        for j in range(k):
            ax = axes[r][j]
            ax.imshow(c.images[j, centre], cmap="gray", vmin=0, vmax=255, interpolation="nearest")
            if c.images.shape[1] > 1:
                ax.contour(c.images[j, -1] > 127, levels=[0.5], colors=[label_colour(LABEL_VALUES[v])], linewidths=0.6)
            for rect in c.box_rects[c.box_rects[:, 0] == j] if len(c.box_rects) else []:
                _, y0, x0, y1, x1 = rect
                ax.add_patch(Rectangle((x0 - 0.5, y0 - 0.5), x1 - x0, y1 - y0, fill=False, ec="red", lw=1.0))
            if c.slice_labels[j] > 0:
                ax.set_title("box", color="red", fontsize=7, pad=1)
            ax.set_axis_off()
        axes[r][0].text(-0.15, 0.5, v, transform=axes[r][0].transAxes, color="white", ha="right", va="center")
    if title:
        fig.suptitle(title, color="white", fontsize=9)
    return _save(fig, out, facecolor="black")


def training_curves(history: Sequence[Mapping[str, Any]], out: str | os.PathLike[str]) -> Path:
    """Training/validation loss and accuracy per epoch, one line per fold (or per vertebra model)."""
    plt = _pyplot()
    fig, (ax_l, ax_a) = plt.subplots(1, 2, figsize=(11, 4))
    groups: dict[str, list[Mapping[str, Any]]] = {}
    for row in history:
        groups.setdefault(str(row.get("run", "run")), []).append(row)
    cmap = plt.get_cmap("tab10")
    for i, (name, rows) in enumerate(sorted(groups.items())):
        ep = [r["epoch"] for r in rows]
        col = cmap(i % 10)
        ax_l.plot(ep, [r["train_loss"] for r in rows], "-", color=col, label=f"{name} train")
        ax_l.plot(ep, [r["val_loss"] for r in rows], "--", color=col, label=f"{name} val")
        ax_a.plot(ep, [r["train_acc"] for r in rows], "-", color=col, label=f"{name} train")
        ax_a.plot(ep, [r["val_acc"] for r in rows], "--", color=col, label=f"{name} val")
    ax_l.set_title("loss (val: competition metric / BCE)")
    ax_a.set_title("accuracy at 0.5")
    for ax in (ax_l, ax_a):
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
    ax_a.legend(fontsize=6, ncol=2)
    return _save(fig, out)


def confusion_matrices(matrices: Mapping[str, np.ndarray], out: str | os.PathLike[str], threshold: float) -> Path:
    """2x2 confusion matrix per target (rows: truth 0/1, columns: predicted 0/1) at one threshold."""
    plt = _pyplot()
    names = list(matrices)
    cols = 4
    rows = int(np.ceil(len(names) / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(3 * cols, 2.8 * rows), squeeze=False)
    for ax in axes.flat[len(names) :]:
        ax.set_axis_off()
    for ax, name in zip(axes.flat, names, strict=False):
        m = np.asarray(matrices[name])
        ax.imshow(m, cmap="Blues", vmin=0, vmax=max(1, int(m.max())))
        for (i, j), val in np.ndenumerate(m):
            ax.text(j, i, str(int(val)), ha="center", va="center", color="black" if val < m.max() / 2 else "white")
        ax.set_xticks([0, 1], ["pred 0", "pred 1"])
        ax.set_yticks([0, 1], ["true 0", "true 1"])
        ax.set_title(name)
    fig.suptitle(f"confusion matrices at threshold {threshold:.3g}")
    return _save(fig, out)


def roc_curves(y_true: np.ndarray, y_pred: np.ndarray, names: Sequence[str], out: str | os.PathLike[str]) -> Path:
    """ROC curve per target with its AUC in the legend (targets with one class only are listed as n/a)."""
    from sklearn.metrics import roc_auc_score, roc_curve

    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 6))
    cmap = plt.get_cmap("tab10")
    for j, name in enumerate(names):
        y = y_true[:, j]
        if len(np.unique(y)) < 2:
            ax.plot([], [], color=cmap(j % 10), label=f"{name}: n/a (one class)")
            continue
        fpr, tpr, _ = roc_curve(y, y_pred[:, j])
        ax.plot(fpr, tpr, color=cmap(j % 10), lw=1.5, label=f"{name}: AUC {roc_auc_score(y, y_pred[:, j]):.3f}")
    ax.plot([0, 1], [0, 1], ":", color="grey")
    ax.set_xlabel("1 - specificity")
    ax.set_ylabel("sensitivity")
    ax.set_title("ROC")
    ax.legend(fontsize=8, loc="lower right")
    ax.grid(alpha=0.3)
    return _save(fig, out)
