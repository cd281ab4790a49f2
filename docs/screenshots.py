"""The screenshots in docs/images: MLflow's pages after `abproxy demo`, as a prompt engineer sees
them, taken with headless Chromium (Debian's `chromium` package) against `mlflow ui`.

    python docs/screenshots.py [--demo-dir .abproxy/screenshots] [--out docs/images]

Runs the demo into its own folder (unless that folder already holds a finished demo), starts
`mlflow ui` on its store, drives Chromium over the DevTools protocol (a websocket, no browser
driver needed: the `websockets` package uvicorn already brings), dismisses MLflow's first-visit
pop-ups, and writes one PNG per page.
"""

from __future__ import annotations

import argparse
import base64
import json
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

from websockets.sync.client import connect

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--hide-scrollbars",
]
WIDTH, HEIGHT = 1500, 950

# Close what MLflow shows on a first visit (the assistant panel, feature tips), so the pages show
# what they are about. Clicks by visible text or label: the UI has no stable ids for these.
DISMISS_JS = """
(() => {
  const clicked = [];
  for (const el of document.querySelectorAll('button, [role=button]')) {
    const text = (el.innerText || '').trim();
    const label = el.getAttribute('aria-label') || '';
    if (text === 'Got it' || text === 'Dismiss' || text === 'Skip' || /^close/i.test(label)) {
      el.click();
      clicked.push(text || label);
    }
  }
  return clicked;
})()
"""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_http(url: str, timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.3)


class Browser:
    """One headless Chromium tab, driven over the DevTools protocol."""

    def __init__(self, profile: Path):
        port = free_port()
        self.process = subprocess.Popen(
            ["chromium", *CHROMIUM_FLAGS, f"--remote-debugging-port={port}", f"--user-data-dir={profile}",
             f"--window-size={WIDTH},{HEIGHT}", "about:blank"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        wait_http(f"http://127.0.0.1:{port}/json/version")
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list") as response:
            page = next(target for target in json.load(response) if target["type"] == "page")
        self.socket = connect(page["webSocketDebuggerUrl"], max_size=None, legacy=True)
        self._next_id = 0
        self.call("Page.enable")
        self.call("Emulation.setDeviceMetricsOverride", width=WIDTH, height=HEIGHT, deviceScaleFactor=1, mobile=False)

    def call(self, method: str, **params: Any) -> dict[str, Any]:
        self._next_id += 1
        self.socket.send(json.dumps({"id": self._next_id, "method": method, "params": params}))
        while True:
            message = json.loads(self.socket.recv())
            if message.get("id") == self._next_id:
                if "error" in message:
                    raise RuntimeError(f"{method}: {message['error']}")
                return dict(message.get("result", {}))

    def evaluate(self, expression: str) -> Any:
        return self.call("Runtime.evaluate", expression=expression, returnByValue=True).get("result", {}).get("value")

    def open(self, url: str, expect: str, settle_s: float = 3.0, timeout_s: float = 90.0) -> None:
        """Go to ``url`` and wait until the page shows ``expect`` (MLflow's pages load their data
        after the document, and its bundle is large)."""
        self.call("Page.navigate", url=url)
        self.open_wait(expect, settle_s, timeout_s)

    def open_wait(self, expect: str, settle_s: float = 3.0, timeout_s: float = 90.0) -> None:
        deadline = time.monotonic() + timeout_s
        while expect not in (self.evaluate("document.body ? document.body.innerText : ''") or ""):
            if time.monotonic() > deadline:
                raise TimeoutError(f"the page never showed {expect!r}")
            time.sleep(0.5)
        time.sleep(settle_s)
        for _ in range(3):
            if not self.evaluate(DISMISS_JS):
                break
            time.sleep(0.8)

    def click_containing(self, text: str, settle_s: float = 4.0) -> bool:
        """Click the innermost element whose text contains ``text`` (a table row's cell)."""
        found = self.evaluate(
            "(() => { const hits = Array.from(document.querySelectorAll('[role=gridcell], [role=cell], td, span, div'))"
            f".filter(el => (el.innerText || '').includes({json.dumps(text)}) && el.children.length <= 1);"
            " if (!hits.length) return false; hits[hits.length - 1].click(); return true; })()"
        )
        time.sleep(settle_s)
        return bool(found)

    def reload(self, expect: str) -> None:
        self.call("Page.reload", ignoreCache=False)
        self.open_wait(expect)

    def update_storage(self, key: str, changes: dict[str, Any]) -> None:
        """Merge ``changes`` into a JSON object MLflow keeps in localStorage."""
        current = json.loads(self.evaluate(f"localStorage.getItem({json.dumps(key)})") or "{}")
        current.update(changes)
        self.evaluate(f"localStorage.setItem({json.dumps(key)}, {json.dumps(json.dumps(current))})")

    def set_storage(self, origin: str, items: dict[str, str]) -> None:
        self.call("Page.navigate", url=origin)
        time.sleep(2)
        for key, value in items.items():
            self.evaluate(f"localStorage.setItem({json.dumps(key)}, {json.dumps(value)})")

    def screenshot(self, path: Path) -> None:
        data = self.call("Page.captureScreenshot", format="png")["data"]
        path.write_bytes(base64.b64decode(data))
        print(f"wrote {path.relative_to(ROOT) if path.is_relative_to(ROOT) else path}")

    def close(self) -> None:
        self.socket.close()
        self.process.terminate()
        self.process.wait(10)


def ui_state() -> dict[str, str]:
    """The assistant panel MLflow opens on a first visit, closed as a user closes it (its close
    button sits in a panel the page renders late); nothing else is set: the runs table, the
    trace list and the models are MLflow's defaults."""
    return {"mlflow.assistant.panelOpen_v1": "false", "mlflow.assistant.fab.autoOpenedOnFirstLoad_v1": "true"}


def run_demo(folder: Path) -> None:
    if (folder / "mlflow.db").exists() and (folder / "abproxy.yaml").exists():
        return
    subprocess.run([sys.executable, "-m", "abproxy", "demo", "--dir", str(folder)], cwd=ROOT, check=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--demo-dir", type=Path, default=ROOT / ".abproxy" / "screenshots")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "images")
    args = parser.parse_args()
    if shutil.which("chromium") is None:
        print("needs Debian's chromium: apt-get install chromium", file=sys.stderr)
        return 2
    run_demo(args.demo_dir.resolve())
    store = f"sqlite:///{args.demo_dir.resolve() / 'mlflow.db'}"
    from mlflow import MlflowClient

    client = MlflowClient(store)
    experiment = client.get_experiment_by_name("translation")
    assert experiment is not None, "the demo wrote no translation experiment"
    rated = next(t for t in client.search_traces(locations=[experiment.experiment_id], max_results=200) if t.info.assessments)

    port = free_port()
    ui = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", store, "--host", "127.0.0.1", "--port", str(port)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=args.demo_dir,
    )  # fmt: skip
    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as profile:
        browser = None
        try:
            wait_http(f"http://127.0.0.1:{port}/health")
            browser = Browser(Path(profile))
            origin = f"http://127.0.0.1:{port}/"
            browser.set_storage(origin, ui_state())
            base = f"{origin}#/experiments/{experiment.experiment_id}"
            browser.open(base, expect="Latency")
            browser.screenshot(args.out / "overview.png")
            browser.open(f"{base}/runs", expect="matching runs")
            browser.screenshot(args.out / "runs.png")
            browser.open(f"{base}/traces", expect="Tokens")
            browser.screenshot(args.out / "traces.png")
            browser.click_containing((rated.info.request_preview or "")[:40])
            browser.click_containing("Assess")  # the trace's assessments: the user's feedback
            browser.screenshot(args.out / "trace-with-feedback.png")
            browser.open(f"{base}/models", expect="step_by_step")
            browser.screenshot(args.out / "logged-models.png")
            browser.open(f"{base}/prompts", expect="translation")
            browser.screenshot(args.out / "prompts.png")
        finally:
            if browser is not None:
                browser.close()
            ui.terminate()
            ui.wait(10)
    return 0


if __name__ == "__main__":
    sys.exit(main())
