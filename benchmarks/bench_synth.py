"""Time the synthetic generator: one small and one full-size study, in memory and written to disk.

Run: ``.venv/bin/python benchmarks/bench_synth.py [--studies N] [--full N] [--workers W] [--profile P]``.
Prints seconds per study (generation, writing), bytes on disk per study and per transfer syntax, and the dataset
totals.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from cspine.synth import PROFILES, SynthConfig, generate_dataset, generate_study


def _time_memory(size: str, n: int, profile: str) -> list[float]:
    out = []
    for i in range(n):
        t = time.perf_counter()
        generate_study(0, size, i, profile=profile)  # type: ignore[arg-type]
        out.append(time.perf_counter() - t)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--studies", type=int, default=20, help="small studies for the dataset benchmark")
    ap.add_argument("--full", type=int, default=4, help="full-size studies")
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--profile", choices=PROFILES, default="default")
    args = ap.parse_args()

    for size, n in (("small", args.studies), ("full", args.full)):
        mem = _time_memory(size, min(n, 5 if size == "full" else n), args.profile)
        print(f"[{size}] in memory: {sum(mem) / len(mem):.2f} s/study (min {min(mem):.2f}, max {max(mem):.2f})")
        with tempfile.TemporaryDirectory() as tmp:
            cfg = SynthConfig(
                out=Path(tmp),
                studies=n,
                seed=0,
                size=size,
                segmented=0.5,  # type: ignore[arg-type]
                test_studies=0,
                workers=args.workers,
                profile=args.profile,
            )
            summary = generate_dataset(cfg, progress=False)
            rec = json.loads((Path(tmp) / "synth.json").read_text())
        gen = [t["generate"] for t in rec["timings"].values()]
        wr = [t["write"] for t in rec["timings"].values()]
        per_ts: dict[str, list[int]] = {}
        for s in rec["studies"]:
            per_ts.setdefault(s["transfer_syntax"], []).append(s["bytes"] // s["slices"])
        print(
            f"[{size}] dataset of {n} studies, workers={args.workers}: {summary.seconds:.1f} s total, "
            f"{summary.bytes / 1e6:.1f} MB, {summary.slices} slices, "
            f"{summary.bytes / max(n, 1) / 1e6:.1f} MB/study"
        )
        print(f"[{size}]   per study: generate {sum(gen) / len(gen):.2f} s, write {sum(wr) / len(wr):.2f} s")
        for ts, b in sorted(per_ts.items()):
            print(f"[{size}]   {ts:24s} {sum(b) / len(b) / 1e3:7.1f} kB/slice  ({len(b)} studies)")


if __name__ == "__main__":
    main()
