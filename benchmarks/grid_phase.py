"""Do the segmenter's level names depend on where the coarse network's stride grid falls on a study?

Run: ``.venv/bin/python benchmarks/grid_phase.py STUDY [STUDY ...] [--model DIR] [--phases 0,2,...,14]
[--hu-offset -1024] [--generated N]``.

The coarse stage is a U-Net that downsamples four times (16 model voxels, 32 mm, per cell of its deepest level),
so it is not shift-invariant: moving the study by a few model voxels against that grid changes what each deep cell
sees. Each phase k here puts k empty model slices (the window's floor, as the network pads) below the study before
the coarse network and removes them from its output; the names a robust segmenter gives should not change with k.
Printed per study and phase: the levels found with their centroid height (mm, patient z) and volume (ml), and how
many phases name the same levels as phase 0 (all within 6 mm, half a vertebra). ``--generated N`` adds the first N
held-out wide-profile studies (seed 1203) that hold a cervical spine, with their mean Dice against the truth.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from cspine.io import load_study
from cspine.io.volume import Volume
from cspine.metrics import dice
from cspine.seg.infer import SegModel, load_model, segment_volume
from cspine.seg.models import get_spec
from cspine.synth import generate_study

HALF_VERTEBRA_MM = 6.0


class Shifted(nn.Module):
    """``net`` run on its input with ``k`` zero slices put before axis 2 (z) (and as many after as keep the length
    a multiple of the network's ``divisor``), those slices cut from the output."""

    def __init__(self, net: nn.Module, k: int, divisor: int) -> None:
        super().__init__()
        self.net, self.k, self.divisor = net, k, divisor

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.k:
            return self.net(x)
        n = x.shape[2]
        after = -(n + self.k) % self.divisor
        y = self.net(torch.nn.functional.pad(x, (0, 0, 0, 0, self.k, after)))
        return y[:, :, self.k : self.k + n]


def levels(vol: Volume, model: SegModel, k: int) -> tuple[dict[str, tuple[float, float]], np.ndarray]:
    """Level -> (centroid height mm, volume ml) and the mask, with the coarse grid at phase ``k``."""
    net = model.net
    model.net = Shifted(net, k, get_spec(model.arch).divisor)
    try:
        res = segment_volume(vol, model)
    finally:
        model.net = net
    found = {
        name: (float(v["centroid_lps"][2]), float(v["volume_ml"]))
        for name, v in res.to_json()["vertebrae"].items()
        if v.get("present")
    }
    return found, res.mask


def agrees(a: dict[str, tuple[float, float]], b: dict[str, tuple[float, float]]) -> bool:
    return set(a) == set(b) and all(abs(a[n][0] - b[n][0]) <= HALF_VERTEBRA_MM for n in a)


def mean_dice(mask: np.ndarray, truth: np.ndarray) -> float:
    """Mean Dice over C1..C7 where the level is in either mask (nan when in neither)."""
    scores = [d for v in range(1, 8) if (d := dice(mask, truth, v)) is not None]
    return float(np.mean(scores)) if scores else float("nan")


def report(name: str, vol: Volume, model: SegModel, phases: list[int], truth: np.ndarray | None) -> dict[str, Any]:
    print(f"\n{name}")
    first: dict[str, tuple[float, float]] | None = None
    same = 0
    for k in phases:
        found, mask = levels(vol, model, k)
        first = found if first is None else first
        same += agrees(found, first)
        text = ", ".join(f"{n} {z:.0f} ({ml:.1f})" for n, (z, ml) in found.items()) or "none"
        extra = f"  Dice {mean_dice(mask, truth):.3f}" if truth is not None else ""
        print(f"  phase {k:2d}: {text}{extra}", flush=True)
    print(f"  {same}/{len(phases)} phases name the levels as phase {phases[0]} does")
    return {"study": name, "same": same, "phases": len(phases)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("studies", nargs="*", type=Path)
    ap.add_argument("--model", default="src/cspine/weights/segmenter")
    ap.add_argument("--phases", default="0,2,4,6,8,10,12,14")
    ap.add_argument("--hu-offset", type=float, default=None, help="added to every study's values (--hu-offset)")
    ap.add_argument("--generated", type=int, default=0, help="held-out wide-profile studies (seed 1203)")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model = load_model(args.model, "cpu")
    phases = [int(p) for p in args.phases.split(",")]
    rows = [report(str(p), load_study(p, hu_offset=args.hu_offset), model, phases, None) for p in args.studies]
    index, generated = 0, 0
    while generated < args.generated:
        s = generate_study(1203, "small", index, profile="wide")
        if s.mask.max():
            name = f"generated wide 1203/{index} ({s.extra.get('fov')})"
            rows.append(report(name, s.volume, model, phases, s.mask))
            generated += 1
        index += 1
    print("\n| study | phases naming the levels as phase 0 |\n|---|---|")
    for r in rows:
        print(f"| {r['study']} | {r['same']}/{r['phases']} |")


if __name__ == "__main__":
    main()
