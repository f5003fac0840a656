"""Labels and fracture plans of synthetic studies: an exact distribution over fractured level sets.

Every study draws from its own ``numpy.random.Generator`` streams keyed by (seed, split, index, stream), so study i
is the same whatever the number of studies, the worker count or the order of writing. The label stream is separate
and cheap (:func:`sample_labels`), so prevalence can be checked over thousands of studies without building a volume.
"""

from __future__ import annotations

import functools
from typing import Literal

import numpy as np

from cspine.labels import CERVICAL, PATIENT, PREDICTION_TYPES, PREVALENCE

Split = Literal["train", "test"]

TEST_STREAM = 1_000_003  # keeps test studies independent of the number of training studies

#: Fracture kinds per vertebra and their probabilities.
KINDS: dict[str, tuple[tuple[str, ...], tuple[float, ...]]] = {
    "C1": (("ring",), (1.0,)),
    "C2": (("dens", "body_line", "posterior", "wedge"), (0.4, 0.3, 0.2, 0.1)),
    **{v: (("body_line", "wedge", "posterior"), (0.4, 0.25, 0.35)) for v in CERVICAL[2:]},
}
SUBTLE_P = 0.4
BOX_P = 0.5  # fraction of fractured training studies with boxes in train_bounding_boxes.csv

# ---------------------------------------------------------------------------------------------------------------
# Labels: an exact, calibrated distribution over sets of fractured levels
# ---------------------------------------------------------------------------------------------------------------

_K_P = (0.62, 0.26, 0.12)  # number of fractured levels in a positive patient: mean 1.5 = sum(prevalence) / 0.476
_NONCONTIG_P = 0.25  # chance that the extra level is not adjacent (non-contiguous injuries occur)


def _set_distribution(q: np.ndarray) -> dict[frozenset[int], float]:
    """Distribution over fractured level sets given the primary-level probabilities q (length 7).

    Primary level v ~ q; a second level is adjacent (75 %) or drawn from q away from v; a third extends a
    contiguous run (adjacent injuries are the rule in trauma) or adds another level from q.
    """
    n = len(q)
    out: dict[frozenset[int], float] = {}

    def add(s: frozenset[int], p: float) -> None:
        out[s] = out.get(s, 0.0) + p

    def far(v: frozenset[int]) -> list[tuple[int, float]]:
        excl = set(v) | {x + 1 for x in v} | {x - 1 for x in v}
        cand = [(u, float(q[u])) for u in range(n) if u not in excl]
        tot = sum(p for _, p in cand)
        return [(u, p / tot) for u, p in cand]

    for v in range(n):
        pv = float(q[v])
        add(frozenset([v]), pv * _K_P[0])
        nbrs = [u for u in (v - 1, v + 1) if 0 <= u < n]
        for u in nbrs:
            add(frozenset([v, u]), pv * _K_P[1] * (1 - _NONCONTIG_P) / len(nbrs))
        for u, pu in far(frozenset([v])):
            add(frozenset([v, u]), pv * _K_P[1] * _NONCONTIG_P * pu)
        runs = [(a, a + 1, a + 2) for a in range(v - 2, v + 1) if a >= 0 and a + 2 < n]
        for r in runs:
            add(frozenset(r), pv * _K_P[2] * (1 - _NONCONTIG_P) / len(runs))
        for u in nbrs:
            pair = frozenset([v, u])
            for w, pw in far(pair):
                add(pair | {w}, pv * _K_P[2] * _NONCONTIG_P * pw / len(nbrs))
    return out


@functools.lru_cache(maxsize=1)
def label_distribution() -> tuple[tuple[frozenset[int], ...], np.ndarray]:
    """Level-set distribution whose per-vertebra marginals equal PREVALENCE given a positive patient.

    Calibrated by iterative proportional scaling of the primary-level probabilities; exact (no sampling noise).
    """
    target = np.array([PREVALENCE[v] for v in CERVICAL]) / PREVALENCE[PATIENT]
    q = target / target.sum()
    for _ in range(200):
        dist = _set_distribution(q)
        marg = np.zeros(len(CERVICAL))
        for s, p in dist.items():
            for v in s:
                marg[v] += p
        q = q * (target / marg)
        q /= q.sum()
    dist = _set_distribution(q)
    sets = tuple(sorted(dist, key=lambda s: (len(s), sorted(s))))
    probs = np.array([dist[s] for s in sets])
    return sets, probs / probs.sum()


def study_rng(seed: int, split: str, index: int, stream: int) -> np.random.Generator:
    """The generator of one stream of one study (0 labels, 1 fracture kinds, 2 anatomy, 3 fracture geometry,
    4 scanner geometry, 5 noise, 6 file encodings)."""
    return np.random.default_rng([int(seed), TEST_STREAM if split == "test" else 0, int(index), stream])


def sample_labels(seed: int, index: int, split: Split = "train") -> dict[str, int]:
    """train.csv row of one study (patient_overall, C1..C7), without building anything else. Cheap."""
    rng = study_rng(seed, split, index, 0)
    labels = {p: 0 for p in PREDICTION_TYPES}
    if rng.random() < PREVALENCE[PATIENT]:
        sets, probs = label_distribution()
        chosen = sets[int(rng.choice(len(sets), p=probs))]
        for v in chosen:
            labels[CERVICAL[v]] = 1
        labels[PATIENT] = 1
    return labels


def fracture_plan(seed: int, index: int, split: Split = "train") -> list[tuple[str, str, bool]]:
    """(vertebra, kind, subtle) for each fractured level of a study."""
    labels = sample_labels(seed, index, split)
    rng = study_rng(seed, split, index, 1)
    plan = []
    for v in CERVICAL:
        if labels[v]:
            kinds, p = KINDS[v]
            kind = str(kinds[int(rng.choice(len(kinds), p=p))])
            plan.append((v, kind, bool(rng.random() < SUBTLE_P)))
    return plan
