"""Study-grouped, label-stratified splits (iterative stratification), and the seed's leaky split for comparison.

Why studies, not images: neighbouring slices of one patient are nearly identical, so a random split over images
puts the same fracture on both sides and the test score measures memory, not diagnosis (the seed's 92-99 %
accuracy). Every function here assigns whole studies, except :func:`leaky_image_split`, which exists only to
reproduce and expose that mistake.

Why iterative stratification: the seven vertebra labels are rare (C3 3.6 %) and co-occur; plain stratification on
one column can leave a fold with no C3 fracture at all. Sechidis et al. (2011) assign the rarest label's studies
first, each to the part that still lacks it most, which keeps every label's positives spread evenly.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def stratified_partition(labels: np.ndarray, proportions: Sequence[float], seed: int = 0) -> np.ndarray:
    """Assign each row (a study) to one part so that every label's positives follow ``proportions``.

    Args:
        labels: (n, m) 0/1 matrix, one row per study (e.g. patient_overall, C1..C7).
        proportions: desired fraction per part (normalised).
        seed: tie-breaking and visiting order.

    Returns:
        (n,) int part index per study. Deterministic in (labels, proportions, seed).
    """
    y = np.asarray(labels) > 0.5
    if y.ndim != 2:
        raise ValueError(f"labels must be (n_studies, n_labels), got shape {y.shape}")
    n = y.shape[0]
    r = np.asarray(proportions, dtype=np.float64)
    if r.ndim != 1 or len(r) < 2 or (r <= 0).any():
        raise ValueError("proportions must list at least two positive fractions")
    r = r / r.sum()
    if n < len(r):
        raise ValueError(f"{n} studies cannot fill {len(r)} parts")
    rng = np.random.default_rng(seed)
    want_size = r * n
    want_label = r[:, None] * y.sum(axis=0)[None, :]
    part = np.full(n, -1, dtype=np.int64)
    unassigned = set(range(n))

    def choose(*keys: np.ndarray) -> int:
        """The part that most lacks keys[0]; ties by the next keys; remaining ties at random."""
        best = np.arange(len(r))
        for key in keys:
            best = best[np.isclose(key[best], key[best].max())]
            if len(best) == 1:
                break
        return int(rng.choice(best))

    while True:
        remaining = np.array(sorted(unassigned), dtype=np.int64)
        if len(remaining) == 0:
            break
        pos = y[remaining].sum(axis=0)
        if not pos.any():
            break
        lab = int(np.argmin(np.where(pos > 0, pos, np.iinfo(np.int64).max)))
        rows = remaining[y[remaining, lab]]
        for i in rng.permutation(rows):
            # rarest label first, then this study's other labels, then part size
            k = choose(want_label[:, lab], want_label[:, y[i]].sum(axis=1), want_size)
            part[i] = k
            unassigned.discard(int(i))
            want_label[k] -= y[i]
            want_size[k] -= 1
    for i in rng.permutation(np.array(sorted(unassigned), dtype=np.int64)):
        k = choose(want_size)
        part[i] = k
        want_size[k] -= 1
    return part


def make_folds(labels: np.ndarray, n_folds: int, seed: int = 0) -> np.ndarray:
    """Fold index (0..n_folds-1) per study, label-stratified. Studies are the unit, so folds never share one."""
    if n_folds < 2:
        raise ValueError(f"n_folds must be >= 2, got {n_folds}")
    return stratified_partition(labels, [1.0] * n_folds, seed)


def holdout_split(labels: np.ndarray, fraction: float, seed: int = 0) -> np.ndarray:
    """Boolean mask of held-out studies (about ``fraction`` of them), label-stratified, whole studies only."""
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"holdout fraction must be in (0, 1), got {fraction}")
    return stratified_partition(labels, [1.0 - fraction, fraction], seed) == 1


def leaky_image_split(n_images: int, fraction: float, seed: int = 0) -> np.ndarray:
    """The seed's split: a random ``fraction`` of images held out, whatever study they come from (leaks)."""
    rng = np.random.default_rng(seed)
    test = np.zeros(n_images, dtype=bool)
    test[rng.permutation(n_images)[: round(fraction * n_images)]] = True
    return test
