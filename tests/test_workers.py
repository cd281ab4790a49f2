"""Several processes on one Redis: `abproxy serve --workers N` adds up in /metrics, and two
replicas (separate `abproxy serve` processes) count exactly and flush once per interval."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import threading
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import openai
import pytest
import orjson
import yaml
from mlflow.tracking import MlflowClient


from abproxy.recording import ids, layout
from proxykit import BASE_EXPERIMENTS
from flushkit import history, search
from helpers import free_port, http_json, sample, wait_until


def start_serve(tmp_path: Path, config: dict, port: int, *extra_args: str) -> subprocess.Popen:
    """`abproxy serve` as its own process group; returns once it answers /healthz."""
    config_path = tmp_path / f"abproxy-{port}.yaml"
    config_path.write_text(yaml.safe_dump(config))
    log_path = tmp_path / f"serve-{port}.log"  # a file: a pipe nobody reads would block a chatty server
    with log_path.open("wb") as log:
        server = subprocess.Popen(
            [sys.executable, "-m", "abproxy", "serve", "--config", str(config_path), "--port", str(port), *extra_args],
            cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
    deadline = time.monotonic() + 120
    while True:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=1).read()
            return server
        except OSError:
            if time.monotonic() > deadline or server.poll() is not None:
                os.killpg(server.pid, signal.SIGKILL)
                raise AssertionError(log_path.read_text(errors="replace")[-2000:]) from None
            time.sleep(0.2)


def serve_config(redis_url: str, upstream_url: str, tracking_uri: str, flush_interval_s: float = 0) -> dict:
    """The `translation` experiment against the fake upstream, for `abproxy serve`."""
    return {
        "redis_url": redis_url,
        "mlflow": {"tracking_uri": tracking_uri, "flush_interval_s": flush_interval_s},
        "upstreams": {"fake": {"base_url": upstream_url}},
        "default_upstream": "fake",
        "experiments": {"translation": BASE_EXPERIMENTS["translation"]},
    }


def stop_serve(server: subprocess.Popen) -> int | None:
    """SIGTERM, as an operator stops a replica: its exit status, or None when it did not end
    within 60 s (it is then killed, with its process group, so it flushes nothing later)."""
    os.killpg(server.pid, signal.SIGTERM)
    try:
        return server.wait(60)
    except subprocess.TimeoutExpired:
        os.killpg(server.pid, signal.SIGKILL)
        server.wait()
        return None


def raw_get_many(port: int, path: str, connections: int) -> list[str]:
    """Open many connections at once (the workers race to accept them), then GET on each."""
    sockets = [socket.create_connection(("127.0.0.1", port), timeout=10) for _ in range(connections)]
    bodies = []
    for conn in sockets:
        with conn:
            conn.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
            response = b""
            while chunk := conn.recv(65536):
                response += chunk
            bodies.append(response.split(b"\r\n\r\n", 1)[1].decode())
    return bodies


def worker_pids(port: int, connections: int = 32) -> set[int]:
    return {orjson.loads(body)["pid"] for body in raw_get_many(port, "/healthz", connections)}


@pytest.mark.slow
def test_two_workers_count_every_request_in_redis_and_in_metrics(tmp_path: Path, redis_client, redis_server, upstream_url):
    port = free_port()
    config = serve_config(redis_server.url, upstream_url, f"sqlite:///{tmp_path / 'mlflow.db'}")
    server = start_serve(tmp_path, config, port, "--workers", "2", "--log-level", "warning")
    base = f"http://127.0.0.1:{port}"
    try:
        # Idle workers race to accept; bursts of connections, repeated, reach both of them.
        pids: set[int] = set()
        for _ in range(40):
            pids |= worker_pids(port, 16)
            if len(pids) == 2:
                break
            time.sleep(0.05)
        assert len(pids) == 2, f"the connections did not reach both workers: {pids}"
        def ask(worker: int) -> None:
            # Concurrent clients on connections of their own: both workers serve some.
            for i in range(5):
                with openai.OpenAI(base_url=f"{base}/v1", api_key="sk-client", max_retries=0) as client:
                    client.chat.completions.create(
                        model="translation", messages=[{"role": "user", "content": "hi"}], user=f"u{worker}-{i}"
                    )

        threads = [threading.Thread(target=ask, args=(worker,)) for worker in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
        # Scrapes on many connections at once: whichever worker answers must report all 40 (once
        # the recorders' batches are in).
        def totals() -> list[float]:
            return [
                sum(sample(text, "abproxy_requests_total", experiment="translation", variant=v, status="200")
                    for v in ("basic", "professional"))
                for text in raw_get_many(port, "/metrics", 16)
            ]

        wait_until(lambda: totals() == [40] * 16, timeout=60)
        requests = sum(
            int(redis_client.hget(key, "requests") or 0) for key in redis_client.scan_iter("abproxy:{translation}:a:*")
        )
        assert requests == 40
    finally:
        returncode = stop_serve(server)
    assert returncode == 0


@pytest.mark.slow
def test_two_replicas_count_exactly_join_feedback_across_and_flush_once_per_interval(
    tmp_path: Path, redis_client, redis_server, upstream_url
):
    """Two `abproxy serve` processes behind one load balancer share one Redis and one MLflow
    store: a response served by one replica takes feedback through the other, totals are exact,
    and in each flush interval exactly one of them writes to MLflow."""
    interval_s = 1.5
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    config = serve_config(redis_server.url, upstream_url, uri, interval_s)
    ports = [free_port(), free_port()]
    replicas = [start_serve(tmp_path, config, port, "--log-level", "warning") for port in ports]
    started = time.monotonic()
    try:
        served = {port: 0 for port in ports}
        for i in range(40):
            port, other = ports[i % 2], ports[(i + 1) % 2]
            with openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="sk-client", max_retries=0) as client:
                raw = client.chat.completions.with_raw_response.create(
                    model="translation", messages=[{"role": "user", "content": f"sentence {i}"}], user=f"user-{i}"
                )
            served[port] += 1
            # The other replica, which never saw the request, is asked at once: the signed id
            # carries the request, under the secret the replicas share through Redis.
            assert ids.looks_signed(raw.headers["x-abproxy-request-id"])
            status, body = http_json(
                "POST", f"http://127.0.0.1:{other}/v1/feedback",
                {"request_id": raw.headers["x-abproxy-request-id"], "name": "satisfaction", "score": 1 + i % 5},
            )  # fmt: skip
            assert status == 200, body
        assert served == {ports[0]: 20, ports[1]: 20}

        def recorded() -> int:  # the serving replicas' next batches
            arms = list(redis_client.scan_iter("abproxy:{translation}:a:*"))
            return sum(int(redis_client.hget(key, "requests") or 0) for key in arms)

        wait_until(lambda: recorded() == 40, timeout=60)
        arms = list(redis_client.scan_iter("abproxy:{translation}:a:*"))
        assert sum(int(redis_client.hget(key, "feedback.satisfaction|n") or 0) for key in arms) == 40

        # Wait for a periodic flush that saw everything: MLflow then holds the exact totals. Not
        # before a replica's first flush has created the store: this test's MLflow client would
        # run the schema migrations at the same time (sqlite: "duplicate column name").
        wait_until(lambda: redis_client.hget(layout.runs_key("translation"), "experiment_id"), timeout=120)
        deadline = time.monotonic() + 120
        while True:
            runs = [r for r in search(uri) if r.data.tags.get("abproxy.role") == "variant"]
            if (
                len(runs) == 2
                and sum(r.data.metrics.get("requests", 0) for r in runs) == 40
                and sum(r.data.metrics.get("feedback.satisfaction.n", 0) for r in runs) == 40
            ):
                break  # a flush that began after the last feedback
            assert time.monotonic() < deadline, [(r.info.run_name, r.data.metrics.get("requests")) for r in runs]
            time.sleep(0.3)
    finally:
        codes = [stop_serve(replica) for replica in replicas]
    elapsed = time.monotonic() - started
    assert codes == [0, 0]

    # Each flush is one step (the fencing token): two replicas flushing on their own would make
    # about twice as many steps as intervals went by. (An interval is claimed for 0.9 of its
    # length, so one replica may flush a little more often than once an interval.)
    steps = [step for step, _ in history(uri, runs[0].info.run_id, "requests")]
    assert steps == sorted(set(steps)), steps
    assert 1 <= len(steps) <= elapsed / (0.9 * interval_s) + 2, (steps, elapsed)
    experiment = MlflowClient(uri).get_experiment_by_name("translation")
    assert len(MlflowClient(uri).search_runs([experiment.experiment_id])) == 3  # two variants and the summary


@pytest.mark.slow
def test_a_flush_to_an_mlflow_server_that_is_down_fails_in_seconds_not_minutes(
    tmp_path: Path, redis_server, upstream_url, monkeypatch
) -> None:
    """MLflow's client would retry a refused connection for minutes; `serve` tells it not to,
    so the flush answers 502 promptly (and the next interval tries again)."""
    for name in ("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "MLFLOW_HTTP_REQUEST_TIMEOUT"):
        monkeypatch.delenv(name, raising=False)
    port = free_port()
    config = serve_config(redis_server.url, upstream_url, f"http://127.0.0.1:{free_port()}")  # nothing listens
    server = start_serve(tmp_path, config, port, "--log-level", "warning")
    try:
        started = time.monotonic()
        request = urllib.request.Request(f"http://127.0.0.1:{port}/abproxy/flush", method="POST")
        with pytest.raises(urllib.error.HTTPError) as failed:
            urllib.request.urlopen(request, timeout=60)
        assert failed.value.code == 502
        assert orjson.loads(failed.value.read())["error"]["code"] == "mlflow_unavailable"
        assert time.monotonic() - started < 30
    finally:
        stop_serve(server)
