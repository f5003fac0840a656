"""The report's NiiVue viewer in headless Chromium, driven over the DevTools protocol (websocket-client).

Checked: the page loads with no console error or exception, the volume renders (the canvas holds many
non-background pixels), a vertebra's row moves the view to its key slice (and the picture changes), the window
presets change the picture, and the page stays self-contained (nothing fetched but the file itself).
"""

from __future__ import annotations

import base64
import io
import json
import shutil
import subprocess
import time
import urllib.request
from typing import Any

import numpy as np
import pytest

from conftest import stop_process
from cspine.report import write_report

RESULT = {
    "StudyInstanceUID": "1.2.3",
    "patient_overall": 0.8,
    **{f"C{i}": p for i, p in zip(range(1, 8), [0.1, 0.9, 0.2, 0.05, 0.6, 0.3, 0.1], strict=True)},
    "vertebrae": {},
    "warnings": [],
}


class DevTools:
    """A minimal DevTools-protocol client for one page: commands in order, events collected."""

    def __init__(self, ws_url: str) -> None:
        import websocket

        self.ws = websocket.create_connection(ws_url, timeout=60, suppress_origin=True)
        self.next_id = 0
        self.events: list[dict[str, Any]] = []

    def send(self, method: str, **params: Any) -> dict[str, Any]:
        self.next_id += 1
        self.ws.send(json.dumps({"id": self.next_id, "method": method, "params": params}))
        while True:
            msg = json.loads(self.ws.recv())
            if msg.get("id") == self.next_id:
                if "error" in msg:
                    raise RuntimeError(f"{method}: {msg['error']}")
                return msg.get("result", {})
            self.events.append(msg)

    def eval(self, expression: str) -> Any:
        res = self.send("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        if "exceptionDetails" in res:
            raise RuntimeError(f"{expression}: {res['exceptionDetails']}")
        return res["result"].get("value")

    def errors(self) -> list[str]:
        out = []
        for e in self.events:
            p = e.get("params", {})
            if e.get("method") == "Runtime.exceptionThrown":
                out.append(json.dumps(p.get("exceptionDetails", {}))[:500])
            elif e.get("method") == "Runtime.consoleAPICalled" and p.get("type") == "error":
                out.append(json.dumps(p.get("args", []))[:500])
            elif e.get("method") == "Log.entryAdded" and p.get("entry", {}).get("level") == "error":
                out.append(p["entry"].get("text", "")[:500])
        return out

    def canvas_png(self) -> np.ndarray:
        """The viewer's canvas as the screen shows it (RGB, int)."""
        from PIL import Image

        r = self.eval("(() => { const c = document.getElementById('viewer'); c.scrollIntoView();"
                      " const b = c.getBoundingClientRect(); return [b.left, b.top, b.right, b.bottom]; })()")
        shot = base64.b64decode(self.send("Page.captureScreenshot", format="png")["data"])
        x0, y0, x1, y1 = (round(v) for v in r)
        return np.asarray(Image.open(io.BytesIO(shot)).convert("RGB")).astype(int)[max(0, y0) : y1, max(0, x0) : x1]


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    """Headless Chromium with a DevTools port on 127.0.0.1 (chosen by Chromium); yields the port."""
    exe = shutil.which("chromium") or shutil.which("chromium-browser")
    if exe is None:
        pytest.skip("chromium not installed (CI installs Debian's chromium package)")
    pytest.importorskip("websocket", reason="websocket-client not installed (dev extra)")
    profile = tmp_path_factory.mktemp("profile")
    proc = subprocess.Popen(
        [exe, "--headless=new", "--no-sandbox", "--disable-gpu-sandbox", "--use-angle=swiftshader",
         "--enable-unsafe-swiftshader", "--remote-debugging-address=127.0.0.1", "--remote-debugging-port=0",
         f"--user-data-dir={profile}", "--no-first-run", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--window-size=1280,1000", "about:blank"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        port_file = profile / "DevToolsActivePort"
        for _ in range(300):
            if port_file.exists() and port_file.read_text().strip():
                break
            time.sleep(0.1)
        else:
            pytest.fail("chromium did not open its DevTools port")
        yield int(port_file.read_text().split()[0])
    finally:
        stop_process(proc)


@pytest.fixture(scope="module")
def page(browser: int, tmp_path_factory):
    """The report of a small generated study, open in a fresh tab, viewer ready."""
    from cspine.synth import generate_study

    study = generate_study(1, "small", 5)
    out = tmp_path_factory.mktemp("report")
    _, html = write_report(out, study.volume, study.mask, RESULT, slice_scores={"C2": [(40, 0.9), (41, 0.2)]})
    req = urllib.request.Request(f"http://127.0.0.1:{browser}/json/new?about:blank", method="PUT")
    with urllib.request.urlopen(req, timeout=30) as resp:
        target = json.loads(resp.read())
    dt = DevTools(target["webSocketDebuggerUrl"])
    for domain in ("Runtime", "Log", "Page", "Network"):
        dt.send(f"{domain}.enable")
    dt.send("Page.navigate", url=html.as_uri())
    state = None
    for _ in range(600):
        state = dt.eval("(() => { const b = document.getElementById('viewer-box');"
                        " return b ? b.getAttribute('data-viewer') : null; })()")  # fmt: skip
        if state in ("ready", "error"):
            break
        time.sleep(0.1)
    yield dt, state, html
    dt.ws.close()


def test_viewer_loads_without_errors_and_renders(page) -> None:
    dt, state, _ = page
    assert state == "ready", dt.errors()
    time.sleep(0.5)
    img = dt.canvas_png()
    assert img.shape[0] > 300 and img.shape[1] > 300
    foreground = (img.max(axis=2) > 40).mean()
    assert foreground > 0.1, f"only {foreground:.1%} of the canvas is drawn"
    coloured = ((img[..., 0] - img[..., 2] > 60) | (img[..., 1] - img[..., 2] > 60)).mean()
    assert coloured > 0.001  # the probability overlay (green/yellow/red) is on screen
    assert dt.errors() == []
    requested = {e["params"]["request"]["url"].split(":")[0] for e in dt.events
                 if e.get("method") == "Network.requestWillBeSent"}  # fmt: skip
    assert requested <= {"file", "data"}, requested  # self-contained: nothing from a network


def test_clicking_a_vertebra_jumps_to_its_key_slice(page) -> None:
    dt, state, _ = page
    assert state == "ready"
    before_pos = dt.eval("cspineViewer.where()")
    before = dt.canvas_png()
    key = dt.eval("JSON.parse(document.getElementById('viewer-data').textContent).keys.C4")
    dt.eval("document.querySelector(\"tr[data-vertebra='C4']\").click()")
    time.sleep(0.3)
    after_pos = dt.eval("cspineViewer.where()")
    assert round(after_pos[2]) == round(key[2]) != round(before_pos[2])  # the axial slice shown changed to C4's
    assert np.abs(dt.canvas_png() - before).mean() > 0.5
    dt.eval("document.querySelector(\"tr[data-vertebra='C2']\").click()")  # p 0.9: drawn red
    time.sleep(0.3)
    img = dt.canvas_png()
    assert ((img[..., 0] > 150) & (img[..., 1] < 100)).sum() > 50
    dt.eval("document.querySelector(\"button[data-preset='soft tissue']\").click()")
    time.sleep(0.3)
    soft = dt.canvas_png()
    dt.eval("document.querySelector(\"button[data-preset='bone']\").click()")
    time.sleep(0.3)
    assert np.abs(dt.canvas_png() - soft).mean() > 0.5  # window presets change the picture
    assert dt.errors() == []
