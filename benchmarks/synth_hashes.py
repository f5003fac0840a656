"""Hash every file of three fixed synthetic datasets, to check that a change of the generator leaves its bytes alone.

Run at two commits and diff the outputs (the default profile must not change unless said so)::

    git archive OLD src | tar -x -C /tmp/old
    PYTHONPATH=/tmp/old/src .venv/bin/python benchmarks/synth_hashes.py /tmp/h_old > old.md5
    .venv/bin/python benchmarks/synth_hashes.py /tmp/h_new > new.md5 && diff old.md5 new.md5

Datasets: small 8 + 3 studies seed 0 (1 worker), small 8 + 3 seed 5 (2 workers), one full-size study seed 2 with
its mask. ``synth.json`` is hashed without its timings, output path and package versions (they differ run to run).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
from pathlib import Path

try:
    from cspine.synth import SynthConfig, generate_dataset
except ImportError:  # commits before the generator moved to cspine.synth
    from cspine.data.synth import SynthConfig, generate_dataset  # type: ignore[no-redef]

DATASETS = {
    "a": {"studies": 8, "test_studies": 3, "seed": 0},
    "b": {"studies": 8, "test_studies": 3, "seed": 5, "workers": 2},
    "c": {"studies": 1, "test_studies": 0, "seed": 2, "size": "full", "segmented": 1.0},
}


def _normalised_record(path: Path) -> bytes:
    rec = json.loads(path.read_text())
    rec.pop("timings", None)
    rec.pop("versions", None)
    rec["summary"].pop("seconds", None)
    rec["summary"].pop("out", None)
    rec["config"].pop("out", None)
    return json.dumps(rec, sort_keys=True).encode()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", type=Path, help="scratch folder (replaced)")
    args = ap.parse_args()
    shutil.rmtree(args.out, ignore_errors=True)
    for name, kw in DATASETS.items():
        generate_dataset(SynthConfig(out=args.out / name, **kw), progress=False)  # type: ignore[arg-type]
    for f in sorted(p for p in args.out.rglob("*") if p.is_file()):
        data = _normalised_record(f) if f.name == "synth.json" else f.read_bytes()
        print(hashlib.md5(data).hexdigest(), f.relative_to(args.out))


if __name__ == "__main__":
    main()
