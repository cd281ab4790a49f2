"""`abproxy demo`: from nothing to a winner in MLflow, on embedded defaults, in under a minute;
the commands it prints last show its results; it never deletes a folder it did not create."""

from __future__ import annotations

import pytest
import json
import os
import queue
import re
import shlex
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

from mlflow import MlflowClient

from demo_output import printed_commands, report_requests, without_servers

EXIT_REFUSED = 2


def abproxy(*args: str, cwd: Path, timeout: float = 240) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "abproxy", *args], capture_output=True, text=True, timeout=timeout, cwd=cwd
    )


def run_printed_commands(commands: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    """The printed lines in a shell, `abproxy` and `python` being this interpreter."""
    bin_dir = cwd / "bin"
    bin_dir.mkdir(exist_ok=True)
    (bin_dir / "python").symlink_to(sys.executable)
    (bin_dir / "abproxy").write_text(f'#!/bin/sh\nexec {shlex.quote(sys.executable)} -m abproxy "$@"\n')
    (bin_dir / "abproxy").chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}
    return subprocess.run(
        ["bash", "-e", "-c", without_servers(commands)], capture_output=True, text=True, timeout=120, cwd=cwd, env=env
    )


@pytest.mark.slow
def test_demo_ends_with_winners_printed_and_tagged_in_mlflow(tmp_path):
    started = time.monotonic()
    result = abproxy("demo", "--dir", str(tmp_path / "demo"), "--seed", "7", cwd=tmp_path)
    elapsed = time.monotonic() - started
    assert result.returncode == 0, result.stderr[-3000:]
    out = result.stdout
    # The simulated users prefer `professional` by almost one point on a 1-5 scale.
    assert "translation    professional (winner)" in out, out
    assert "Winners:" in out and "mlflow ui --backend-store-uri sqlite:///" in out
    for table_header in ("translation: status=", "sentiment: status=", "summarization: status="):
        assert table_header in out
    assert "2400/2400 requests" in result.stderr
    print(f"\nthe demo took {elapsed:.0f} s")  # the README reports it (about 20 s here)

    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'demo' / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("translation")
    winners = client.search_runs([experiment.experiment_id], filter_string="tags.`abproxy.winner` = 'true'")
    assert [run.data.tags["abproxy.variant"] for run in winners] == ["professional"]
    assert not (tmp_path / "mlruns").exists(), "the demo must keep its artifacts inside its own folder"

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    shown = run_printed_commands(printed_commands(out), elsewhere)
    assert shown.returncode == 0, shown.stderr[-3000:]
    assert report_requests(shown.stdout, "translation")["professional"] > 0
    assert re.search(r"^0\s+professional\s+\d\.\d+$", shown.stdout, re.M), shown.stdout  # the search_runs query
    assert sorted(path.name for path in elsewhere.iterdir()) == ["bin"], "no stray mlflow.db or mlruns"


@pytest.mark.slow
def test_demo_refuses_a_folder_it_did_not_create_and_deletes_nothing(tmp_path):
    folder = tmp_path / "my-project"
    folder.mkdir()
    (folder / "notes.txt").write_text("months of work")
    (folder / "data").mkdir()

    result = abproxy("demo", "--dir", str(folder), "--requests", "20", cwd=tmp_path)

    assert result.returncode == EXIT_REFUSED
    assert "did not create" in result.stderr and "nothing was touched" in result.stderr
    assert sorted(path.name for path in folder.iterdir()) == ["data", "notes.txt"]
    assert (folder / "notes.txt").read_text() == "months of work"


@pytest.mark.slow
def test_demo_refuses_a_file_as_its_folder(tmp_path):
    (tmp_path / "a-file").write_text("not a folder")
    result = abproxy("demo", "--dir", str(tmp_path / "a-file"), "--requests", "20", cwd=tmp_path)
    assert result.returncode == EXIT_REFUSED and "not a folder" in result.stderr
    assert (tmp_path / "a-file").read_text() == "not a folder"


def total_requests(config: Path, cwd: Path) -> int:
    report = abproxy("report", "--json", "--config", str(config), cwd=cwd, timeout=60)
    assert report.returncode == 0, report.stderr
    return sum(variant["requests"] for exp in json.loads(report.stdout)["experiments"] for variant in exp["variants"])


@pytest.mark.slow
def test_demo_takes_an_empty_folder_and_replaces_its_own_earlier_run(tmp_path):
    folder = tmp_path / "empty"
    folder.mkdir()
    first = abproxy("demo", "--dir", str(folder), "--requests", "40", cwd=tmp_path)
    assert first.returncode == 0, first.stderr[-3000:]
    assert total_requests(folder / "abproxy.yaml", tmp_path) == 40

    again = abproxy("demo", "--dir", str(folder), "--requests", "30", cwd=tmp_path)
    assert again.returncode == 0, again.stderr[-3000:]
    assert total_requests(folder / "abproxy.yaml", tmp_path) == 30, "the second run must start from nothing"


class RunningDemo:
    """`abproxy demo --keep` in the background, its stdout read line by line."""

    def __init__(self, folder: Path, cwd: Path):
        self.process = subprocess.Popen(
            [sys.executable, "-m", "abproxy", "demo", "--keep", "--requests", "120", "--dir", str(folder)],
            cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
            # Ctrl-C stops it, as at a terminal: a test run started in the background (nohup, a CI
            # job) has SIGINT ignored, which a child inherits and Python then keeps ignoring.
            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
        )  # fmt: skip
        self.lines: queue.Queue[str] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.process.stdout:  # type: ignore[union-attr]
            self.lines.put(line)

    def output_until(self, marker: str, timeout_s: float = 180) -> str:
        seen = []
        deadline = time.monotonic() + timeout_s
        while not any(marker in line for line in seen):
            assert time.monotonic() < deadline, f"no {marker!r} in time:\n{''.join(seen)}"
            try:
                seen.append(self.lines.get(timeout=1))
            except queue.Empty:
                assert self.process.poll() is None, f"the demo exited:\n{''.join(seen)}"
        return "".join(seen)

    def stop(self) -> int | None:
        """Ctrl-C: its exit status, or None (and it is killed) when it did not stop within 60 s."""
        self.process.send_signal(signal.SIGINT)
        try:
            return self.process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
            return None


@pytest.mark.slow
def test_kept_demo_answers_the_printed_commands_from_its_live_redis(tmp_path):
    folder = tmp_path / "demo"
    demo = RunningDemo(folder, tmp_path)
    try:
        out = demo.output_until("keeps running at")
        proxy_url = out.split("keeps running at ", 1)[1].split("/v1", 1)[0]
        url_file = folder / "redis" / "url"
        live_redis = url_file.read_text()

        elsewhere = tmp_path / "elsewhere"
        elsewhere.mkdir()
        shown = run_printed_commands(printed_commands(out), elsewhere)
        assert shown.returncode == 0, shown.stderr[-3000:]
        assert sum(report_requests(shown.stdout, "translation").values()) > 0
        with urllib.request.urlopen(f"{proxy_url}/abproxy/experiments") as response:
            live = json.loads(response.read())
        assert total_requests(folder / "abproxy.yaml", tmp_path) == sum(
            variant["requests"] for exp in live["experiments"] for variant in exp["variants"]
        ) == 120
        # The report used the demo's Redis; one of its own would have replaced this file and removed it.
        assert url_file.read_text() == live_redis

        second = abproxy("demo", "--dir", str(folder), "--requests", "20", cwd=tmp_path)
        assert second.returncode == EXIT_REFUSED and "still running" in second.stderr
        with urllib.request.urlopen(f"{proxy_url}/healthz") as response:
            assert response.status == 200
    finally:
        assert demo.stop() == 0


def _decisions(out: str) -> list[list[str]]:
    """The demo's tables and verdicts, without what it measures (latency, time to first token)
    or where it ran (ports, folder, seconds)."""
    rows: list[list[str]] = []
    dropped: set[int] = set()
    for line in out[out.index("translation: status=") : out.index("The demo's config")].splitlines():
        cells = re.split(r"\s{2,}", line.strip())
        if cells[0] == "variant":
            dropped = {i for i, name in enumerate(cells) if "latency" in name or "TTFT" in name}
        if line.startswith(tuple("0123456789")) and "requests (" in line:
            cells = [line.partition(" in ")[0]]  # "2400 requests (23 simulated upstream errors)"
        rows.append([cell for i, cell in enumerate(cells) if i not in dropped or len(cells) < 4])
    return rows


@pytest.mark.slow
def test_one_seed_gives_the_same_verdicts_and_tables_on_every_run(tmp_path):
    """Requests arrive in a different order each run (24 concurrent users), and the machine's
    speed varies: the demo's randomness hangs on each request, and its looks on request counts."""
    runs = [abproxy("demo", "--dir", str(tmp_path / f"demo{i}"), "--seed", "11", "--requests", "900", cwd=tmp_path) for i in (1, 2)]
    for run in runs:
        assert run.returncode == 0, run.stderr[-3000:]
    first, second = (_decisions(run.stdout) for run in runs)
    assert first == second
    assert ["Winners:"] in first and ["900 requests (6 simulated upstream errors)"] in first, first
