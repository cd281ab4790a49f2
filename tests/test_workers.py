"""`abproxy serve --workers N`: worker processes share one Redis and add up in /metrics."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import threading
import sys
import time
import urllib.request
from pathlib import Path

import openai
import orjson
import yaml

from abproxy.embedded_redis import free_port
from conftest import BASE_EXPERIMENTS
from prometheus_text import sample


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


def test_two_workers_count_every_request_in_redis_and_in_metrics(tmp_path: Path, redis_client, redis_server, upstream_url):
    port = free_port()
    config = tmp_path / "abproxy.yaml"
    config.write_text(yaml.safe_dump({
        "redis_url": redis_server.url,
        "mlflow": {"tracking_uri": f"sqlite:///{tmp_path / 'mlflow.db'}", "flush_interval_s": 0},
        "upstreams": {"fake": {"base_url": upstream_url}},
        "default_upstream": "fake",
        "experiments": {"translation": BASE_EXPERIMENTS["translation"]},
    }))
    server = subprocess.Popen(
        [sys.executable, "-m", "abproxy", "serve", "--config", str(config), "--port", str(port), "--workers", "2",
         "--log-level", "warning"],
        cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                urllib.request.urlopen(f"{base}/healthz", timeout=1).read()
                break
            except OSError:
                assert time.monotonic() < deadline and server.poll() is None, server.stdout.read().decode()[-2000:]
                time.sleep(0.2)
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
        time.sleep(1.0)  # the recorders' batches
        # Scrapes on many connections at once: whichever worker answers must report all 40.
        totals = [
            sum(sample(text, "abproxy_requests_total", experiment="translation", variant=v, status="200")
                for v in ("basic", "professional"))
            for text in raw_get_many(port, "/metrics", 16)
        ]
        assert totals == [40] * 16, totals
        requests = sum(
            int(redis_client.hget(key, "requests") or 0) for key in redis_client.scan_iter("abproxy:{translation}:a:*")
        )
        assert requests == 40
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(30)
    assert server.returncode == 0
