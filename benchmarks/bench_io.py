"""DICOM loading speed: cspine.io.load_series against a plain serial pydicom loop, in one run.

Generates a 512x512x300 JPEG-Lossless (SV1) study with the synthetic generator (GDCM encodes it),
then times, alternating, (a) a serial loop of dcmread + pixel_array + sort by position and
(b) load_series with its default pool (one process per core). Prints both medians and the ratio.

    .venv/bin/python benchmarks/bench_io.py [--slices 300] [--repeats 3] [--keep DIR]
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import pydicom

from cspine.io import load_series
from cspine.io.dicom import default_workers
from cspine.io.volume import crop
from cspine.synth import generate_study
from cspine.synth.writer import write_series

JPEG_LOSSLESS_SV1 = "1.2.840.10008.1.2.4.70"


def make_study(folder: Path, slices: int) -> None:
    """A full-size synthetic study cut to ``slices`` slices, JPEG Lossless SV1."""
    seed = 0
    while True:
        study = generate_study(seed, size="full", index=seed)
        if study.volume.shape[0] >= slices and study.volume.shape[1] == 512:
            break
        seed += 1
    vol = crop(study.volume, (0, 0, 0), (slices, 512, 512))
    study = dataclasses.replace(study, volume=vol, mask=study.mask[:slices], transfer_syntax=JPEG_LOSSLESS_SV1)
    write_series(study, folder, patient_number=0)


def serial_baseline(folder: Path) -> np.ndarray:
    """What a notebook does: read every file, decode, sort by z."""
    items = []
    for f in folder.iterdir():
        ds = pydicom.dcmread(f)
        items.append((float(ds.ImagePositionPatient[2]), ds.pixel_array))
    items.sort(key=lambda t: t[0])
    return np.stack([a for _, a in items])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--slices", type=int, default=300)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--keep", type=Path, default=None, help="write the study here instead of a temp folder")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        folder = args.keep or Path(tmp) / "study"
        if not folder.exists():
            t = time.perf_counter()
            make_study(folder, args.slices)
            print(f"generated {args.slices} slices in {time.perf_counter() - t:.1f} s -> {folder}")
        size = sum(p.stat().st_size for p in folder.iterdir())
        serial_baseline(folder)  # warm the page cache for both contenders
        t_serial, t_ours = [], []
        for _ in range(args.repeats):
            t = time.perf_counter()
            ref = serial_baseline(folder)
            t_serial.append(time.perf_counter() - t)
            t = time.perf_counter()
            vol = load_series(folder)
            t_ours.append(time.perf_counter() - t)
        assert vol.shape == ref.shape, (vol.shape, ref.shape)
        s, o = statistics.median(t_serial), statistics.median(t_ours)
        print(f"study: {vol.shape} int16, {size / 1e6:.1f} MB JPEG Lossless SV1, {default_workers()} workers")
        print(f"serial pydicom loop : {s:.2f} s  (runs {', '.join(f'{x:.2f}' for x in t_serial)})")
        print(f"cspine load_series  : {o:.2f} s  (runs {', '.join(f'{x:.2f}' for x in t_ours)})")
        print(f"ratio ours/serial   : {o / s:.2f}  (target <= 0.50)")


if __name__ == "__main__":
    main()
