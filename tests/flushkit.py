"""Helpers shared by the MLflow flush tests (test_flusher.py, test_cli_report.py,
test_mlflow_faults.py): driving traffic and feedback through a running proxy, raw HTTP calls, a
real ``mlflow server`` process, and reading MLflow back the way a user would
(``mlflow.search_runs`` / ``MlflowClient``)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import mlflow
from mlflow.tracking import MlflowClient

from helpers import free_port, http_json

EXP = "translation"

# Scores that make `professional` clearly better than `basic` (means 4.6 vs 2.2), with some
# spread so that variances (and therefore p-values) are finite.
GOOD_SCORES = (5, 4, 5, 5, 4)
BAD_SCORES = (2, 3, 2, 1, 3)


def flush(proxy: Any, timeout: float = 60) -> tuple[int, Any]:
    return http_json("POST", f"{proxy.url}/abproxy/flush", timeout=timeout)


def live(proxy: Any, experiment: str = EXP) -> dict[str, Any]:
    status, body = http_json("GET", f"{proxy.url}/abproxy/experiments/{experiment}")
    assert status == 200, body
    return body






def users_for(plan: Any, variant: str, count: int, prefix: str) -> list[str]:
    """``count`` user ids that the deterministic assignment puts into ``variant``."""
    users: list[str] = []
    i = 0
    while len(users) < count:
        uid = f"{prefix}-{i}"
        if plan.allocation.choose(uid) == variant:
            users.append(uid)
        i += 1
    return users


def drive(
    proxy: Any,
    per_arm: dict[str, int],
    prefix: str,
    scores: dict[str, Iterable[int]] | None = None,
    experiment: str = EXP,
    model: str = "translation",
) -> dict[str, int]:
    """Send ``per_arm[variant]`` requests from fresh users assigned to each variant, post a
    ``satisfaction`` score for each (cycling through ``scores[variant]``), and wait until the
    recorder has written everything. Returns the number of feedbacks posted per variant."""
    if scores is None:
        scores = {"professional": GOOD_SCORES, "basic": BAD_SCORES}
    plan = proxy.app.catalog.plans[experiment]
    client = proxy.client()
    posted: dict[str, int] = {}
    for variant, count in per_arm.items():
        cycle = list(scores.get(variant, ()))
        for i, user in enumerate(users_for(plan, variant, count, f"{prefix}-{variant}")):
            raw = client.chat.completions.with_raw_response.create(
                model=model, messages=[{"role": "user", "content": f"sentence number {i}"}], user=user
            )
            assert raw.headers["x-abproxy-variant"] == variant
            if cycle:
                status, body = http_json(
                    "POST",
                    f"{proxy.url}/v1/feedback",
                    {"request_id": raw.headers["x-abproxy-request-id"], "name": "satisfaction", "score": cycle[i % len(cycle)]},
                )
                assert status == 200, body
                posted[variant] = posted.get(variant, 0) + 1
    client.close()
    proxy.settle()
    return posted


class MlflowServer:
    """A real ``mlflow server`` (sqlite backend, local artifacts under ``root``) that a test may
    kill and start again on the same port and the same store."""

    def __init__(self, root: Path):
        self.root = root
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.db = root / "srv.db"
        self.process: subprocess.Popen[bytes] | None = None

    def log_tail(self) -> str:
        path = self.root / "server.log"
        return path.read_text(errors="replace")[-2000:] if path.exists() else ""

    def start(self, timeout_s: float = 120) -> float:
        """Start it and wait until ``/health`` answers; returns the seconds that took."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
        env["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] = "false"  # no background job workers
        with open(self.root / "server.log", "ab") as log:
            self.process = subprocess.Popen(
                [
                    sys.executable, "-m", "mlflow", "server",
                    "--backend-store-uri", f"sqlite:///{self.db}",
                    "--default-artifact-root", str(self.root / "art"),
                    "--host", "127.0.0.1", "--port", str(self.port), "--workers", "1",
                ],
                cwd=self.root, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
            )  # fmt: skip
        started = time.monotonic()
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(f"mlflow server exited: {self.log_tail()}")
            if time.monotonic() - started > timeout_s:
                self.kill()
                raise RuntimeError(f"mlflow server not healthy after {timeout_s:g} s: {self.log_tail()}")
            try:
                with urllib.request.urlopen(f"{self.url}/health", timeout=1) as response:
                    if response.status == 200:
                        return time.monotonic() - started
            except OSError:
                pass
            time.sleep(0.2)

    def _signal_group(self, sig: int) -> None:
        # The server runs its workers in its own session: signal that whole group, ours alone.
        assert self.process is not None
        try:
            os.killpg(self.process.pid, sig)
        except ProcessLookupError:
            pass

    def kill(self) -> None:
        """SIGKILL, as a crash or an OOM kill would: no clean shut-down of anything."""
        if self.process is None:
            return
        self._signal_group(signal.SIGKILL)
        self.process.wait(timeout=10)
        self.process = None

    def stop(self) -> None:
        if self.process is None:
            return
        self._signal_group(signal.SIGTERM)
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self._signal_group(signal.SIGKILL)
            self.process.wait(timeout=5)
        self.process = None


def search(uri: str, filter_string: str = "", experiment: str = EXP) -> list[Any]:
    """``mlflow.search_runs`` exactly as a user would call it."""
    mlflow.set_tracking_uri(uri)
    return mlflow.search_runs(experiment_names=[experiment], filter_string=filter_string, output_format="list")


def runs_by_name(uri: str, experiment: str = EXP) -> dict[str, Any]:
    found = search(uri, experiment=experiment)
    by_name: dict[str, Any] = {}
    for run in found:
        assert run.info.run_name not in by_name, f"two runs named {run.info.run_name!r}"
        by_name[run.info.run_name] = run
    return by_name


def history(uri: str, run_id: str, key: str) -> list[tuple[int, float]]:
    return sorted((m.step, m.value) for m in MlflowClient(uri).get_metric_history(run_id, key))


def artifact_text(uri: str, run_id: str, path: str) -> str:
    mlflow.set_tracking_uri(uri)
    return mlflow.artifacts.load_text(f"runs:/{run_id}/{path}")


