"""CUDA gives the answers the CPU gives: the shipped segmenter's masks and the shipped classifier's probabilities.

Deselected by default (pyproject: ``-m 'not slow and not gpu'``) and skipped without CUDA; a GPU session runs
``pytest -m gpu tests/test_gpu.py`` (benchmarks/gpu_checks.sh). Both stages run under bf16 autocast on CUDA and in
float32 on the CPU, so the answers agree within bounds, not bit for bit.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cspine.labels import CERVICAL, PREDICTION_TYPES
from cspine.metrics import dice

pytestmark = pytest.mark.gpu


def device_answers(device: str, seeds: tuple[int, ...] = (1201, 1202)) -> list[tuple[np.ndarray, dict[str, float]]]:
    """(mask, calibrated probabilities) of a few held-out generated studies with the shipped models on ``device``."""
    from cspine.cls.infer import load_classifier
    from cspine.cls.shipped import shipped_classifier
    from cspine.seg.infer import InferConfig, load_model, segment_volume
    from cspine.seg.shipped import shipped_model
    from cspine.synth import generate_study

    seg = load_model(shipped_model(), device)
    clf = load_classifier(shipped_classifier(), device)
    out = []
    for seed in seeds:
        vol = generate_study(seed, "small").volume
        mask = segment_volume(vol, seg, InferConfig(device=device)).mask
        out.append((mask, clf.predict(vol, mask).probabilities))
    return out


def assert_same_answers(a: list[tuple[np.ndarray, dict[str, float]]], b: list[tuple[np.ndarray, dict[str, float]]]):
    """The same vertebrae found, each with Dice >= 0.98 between the devices; probabilities within 0.02."""
    for (mask_a, p_a), (mask_b, p_b) in zip(a, b, strict=True):
        found_a = {v for v in range(1, 8) if (mask_a == v).any()}
        assert found_a == {v for v in range(1, 8) if (mask_b == v).any()}
        for v in found_a:
            assert dice(mask_a, mask_b, v) >= 0.98, f"{CERVICAL[v - 1]}: masks differ between the devices"
        for t in PREDICTION_TYPES:
            assert abs(p_a[t] - p_b[t]) <= 0.02, f"{t}: {p_a[t]:.3f} vs {p_b[t]:.3f}"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_segments_and_classifies_as_the_cpu_does() -> None:
    assert_same_answers(device_answers("cpu"), device_answers("cuda"))
