"""The helpers every test module may need, in one place: raw HTTP calls, OpenAI's error shape,
reading /metrics, free ports, waiting for a condition, ``abproxy serve`` as a real process."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx2
import yaml
from prometheus_client.parser import text_string_to_metric_families

from inprocess import transport_for


@dataclass
class Raw:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


def http(method: str, url: str, body: bytes | None = None, headers: dict[str, str] | None = None,
         timeout: float = 10.0) -> Raw:
    """A raw HTTP call that returns error statuses instead of raising; to an app served in
    process (:mod:`inprocess`) when ``url`` is one's."""
    all_headers = {"Content-Type": "application/json", **(headers or {})} if body is not None else dict(headers or {})
    in_process = transport_for(url)
    if in_process is not None:
        with httpx2.Client(transport=in_process, timeout=timeout) as client:
            answer = client.request(method, url, content=body, headers=all_headers)
            return Raw(answer.status_code, {k.lower(): v for k, v in answer.headers.items()}, answer.content)
    request = urllib.request.Request(url, data=body, method=method, headers=all_headers)
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return Raw(response.status, {k.lower(): v for k, v in response.headers.items()}, response.read())
    except urllib.error.HTTPError as error:
        return Raw(error.code, {k.lower(): v for k, v in error.headers.items()}, error.read())


def http_json(method: str, url: str, body: Any = None, headers: dict[str, str] | None = None, timeout: float = 30) -> tuple[int, Any]:
    """One HTTP call with a JSON body (or raw bytes); returns (status, parsed JSON or raw bytes)."""
    data = None if body is None else (body if isinstance(body, bytes) else json.dumps(body).encode())
    raw = http(method, url, data, {"content-type": "application/json", **(headers or {})}, timeout)
    try:
        return raw.status, raw.json()
    except ValueError:
        return raw.status, raw.body


def assert_error_shape(body: Any) -> dict[str, Any]:
    """What every error the proxy answers itself looks like: OpenAI's error shape."""
    assert isinstance(body, dict) and isinstance(body.get("error"), dict), body
    error = body["error"]
    assert isinstance(error.get("message"), str) and error["message"]
    assert isinstance(error.get("type"), str) and error["type"]
    assert "code" in error
    return error


def assert_openai_error(raw: Raw, status: int, code: str | None = None) -> dict[str, Any]:
    assert raw.status == status, raw.body
    payload = raw.json()
    assert set(payload) == {"error"}, payload
    error = assert_error_shape(payload)
    if code is not None:
        assert error["code"] == code, error
    return error


def metrics_text(base_url: str, key: str | None = None) -> str:
    raw = http("GET", f"{base_url}/metrics", headers={"authorization": f"Bearer {key}"} if key else None, timeout=5)
    assert raw.status == 200, raw.body
    return raw.body.decode()


def sample(text: str, metric: str, **labels: str) -> float:
    """The value of the one sample named ``metric`` whose labels include ``labels`` (0.0 when the
    series does not exist)."""
    values = [
        s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.name == metric and all(s.labels.get(k) == v for k, v in labels.items())
    ]
    assert len(values) <= 1, (metric, labels, values)
    return values[0] if values else 0.0


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_until(predicate: Callable[[], Any], timeout: float = 30.0, interval: float = 0.02) -> Any:
    """Poll ``predicate`` until it returns something truthy, which is returned; fail after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"not true within {timeout} s: {getattr(predicate, '__name__', predicate)}")
        time.sleep(interval)


def comes_true(predicate: Callable[[], Any], timeout: float = 30.0, interval: float = 0.02) -> bool:
    """:func:`wait_until` for a test that goes on either way: whether ``predicate`` held in time."""
    try:
        wait_until(predicate, timeout, interval)
    except AssertionError:
        return False
    return True


REPO = Path(__file__).resolve().parents[1]


class ServeProcess:
    """``abproxy serve`` as a real process of its own (its own process group), on a free port,
    with its log in ``log_path``."""

    def __init__(self, tmp_path: Path, config: dict[str, Any], *extra_args: str, name: str = "serve"):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = tmp_path / f"{name}.log"
        config_path = tmp_path / f"{name}.yaml"
        config_path.write_text(yaml.safe_dump(config, sort_keys=False))
        env = {k: v for k, v in os.environ.items() if not k.startswith(("ABPROXY_", "MLFLOW_TRACKING"))}
        env["PYTHONPATH"] = str(REPO)
        with self.log_path.open("wb") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "abproxy", "serve", "--config", str(config_path), "--port", str(self.port), *extra_args],
                cwd=tmp_path, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
            )  # fmt: skip
        try:
            wait_until(self._healthy, timeout=60, interval=0.1)
        except AssertionError:
            self.kill()
            raise AssertionError(f"abproxy serve did not start:\n{self.log()[-3000:]}") from None

    def _healthy(self) -> bool:
        assert self.process.poll() is None, f"abproxy serve exited:\n{self.log()[-3000:]}"
        try:
            with urllib.request.urlopen(f"{self.url}/healthz", timeout=1) as response:
                return response.status == 200
        except OSError:
            return False

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def rss_bytes(self) -> int:
        for line in Path(f"/proc/{self.process.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        raise AssertionError("no VmRSS")

    def terminate(self) -> None:
        os.killpg(self.process.pid, signal.SIGTERM)

    def wait(self, timeout: float = 60) -> int:
        return self.process.wait(timeout)

    def kill(self) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(10)


def about_zero(stats: dict[str, str], metric: str) -> dict[str, float]:
    """One metric's counters in an arm's Redis hash, with the sums Redis keeps about the metric's
    shift ``m|k`` moved back to 0 (exact for integers): ``n``, ``s`` (Σx), ``q`` (Σx²), and the
    per-unit ``uk``, ``uyy`` (Σ Y_u²), ``unn`` (Σ N_u²), ``uyn`` (Σ Y_u·N_u)."""
    def get(part: str) -> float:
        return float(stats.get(f"{metric}|{part}", 0))

    k, n = get("k"), get("n")
    t = get("t") if k else get("s")
    uyy, unn, uyn = get("uyy"), get("unn"), get("uyn")
    return {
        "n": n,
        "s": get("s"),
        "q": get("q") + 2 * k * t + n * k * k,
        "uk": get("uk"),
        "uyy": uyy + 2 * k * uyn + k * k * unn,
        "unn": unn,
        "uyn": uyn + k * unn,
    }
