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



def test_the_threads_go_to_the_stages_that_still_train(tmp_path: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """With the refinement stage kept (already trained), the coarse stage gets all of ``threads``; with both to
    train, each gets half; a resumed build whose coarse stage is done gives them all to the refinement stage; a
    finished build starts nothing."""
    import subprocess

    from cspine.seg import shipped

    started: list[list[str]] = []

    class Done:
        returncode = 0

        def __init__(self, cmd: list[str], **_: object) -> None:
            started.append(cmd)

        def poll(self) -> int:
            return 0

    monkeypatch.setattr(subprocess, "Popen", Done)
    monkeypatch.setattr(shipped.time, "sleep", lambda _s: None)
    recipe = shipped.ShippedRecipe(threads=2)
    for refine_done, want in ((True, {"2"}), (False, {"1"})):
        started.clear()
        monkeypatch.setattr(shipped, "_finished", lambda stage, n, r=refine_done: r and stage.name == "refine")
        shipped._train(tmp_path / "cache", tmp_path / "model", recipe)
        assert {c[c.index("--threads") + 1] for c in started} == want
        assert sum("refine" in c for c in started) == (0 if refine_done else 1), started
    started.clear()
    monkeypatch.setattr(shipped, "_finished", lambda stage, n: stage.name != "refine")
    shipped._train(tmp_path / "cache", tmp_path / "model", recipe)
    assert len(started) == 1 and "refine" in started[0] and started[0][started[0].index("--threads") + 1] == "2"
    monkeypatch.setattr(shipped, "_finished", lambda stage, n: True)
    started.clear()
    assert shipped._train(tmp_path / "cache", tmp_path / "model", recipe) == {} and not started
