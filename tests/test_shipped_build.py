"""``cspine build-segmenter``'s bookkeeping that runs in seconds: keeping the installed refinement stage."""

from __future__ import annotations

import json
from pathlib import Path

from cspine.runtime import write_json
from cspine.seg.shipped import _keep_refine


def _installed(root: Path, record: dict) -> Path:
    (root / "refine").mkdir(parents=True)
    (root / "refine" / "model.pt").write_bytes(b"weights")
    write_json(root / "recipe.json", record)
    return root


def test_a_kept_refinement_stage_says_which_build_trained_it(tmp_path: Path) -> None:
    trained = {"command": "cspine build-segmenter --out /a", "recipe": {"seed": 1}, "stages": {"refine": {"steps": 6}}}
    first = _installed(tmp_path / "first", trained)
    model = tmp_path / "build1" / "model"
    kept = _keep_refine(model, first)
    assert (model / "refine" / "model.pt").read_bytes() == b"weights"
    assert kept == {"command": "cspine build-segmenter --out /a", "recipe": {"seed": 1}, "stage": {"steps": 6}}
    # a build that itself kept the stage passes the first build's record on, not its own command
    second = _installed(
        tmp_path / "second",
        {"command": "cspine build-segmenter --out /b", "stages": {"refine": {"steps": 6, "kept_from": kept}}},
    )
    assert _keep_refine(tmp_path / "build2" / "model", second) == kept
    # a resumed build keeps its copy and the record made with it, whatever is installed now
    (first / "refine" / "model.pt").write_bytes(b"other")
    write_json(first / "recipe.json", {"command": "cspine build-segmenter --out /c"})
    assert _keep_refine(model, first) == kept and (model / "refine" / "model.pt").read_bytes() == b"weights"
    assert json.loads((model / "refine" / "kept_from.json").read_text()) == kept

