"""What tests share besides fixtures: the experiments and config most tests start from, the
suite's own redis-server, and a running proxy with SDK clients pointed at it — in process by
default (:mod:`inprocess`), over a socket under uvicorn when the socket is the point."""

from __future__ import annotations

import asyncio
import copy
import time
from pathlib import Path
from typing import Any

import httpx2
import openai
import redis

from abproxy.app import ABProxyApp
from abproxy.config import Config, parse_config
from abproxy.recording.embedded_redis import EmbeddedRedis
from abproxy.serving import server_options
from abproxy.simulation.server import RunningServer, serve_in_thread
from inprocess import AsyncInProcessTransport, InProcessServer, InProcessTransport

BASE_EXPERIMENTS: dict[str, Any] = {
    "translation": {
        "match": {"model": "translation"},
        "unit": "user",
        "primary_metric": "feedback.satisfaction",
        "feedback": {"satisfaction": {"min": 1, "max": 5}, "thumbs": {"min": 0, "max": 1}},
        "variants": {
            "basic": {
                "control": True,
                "model": "gpt-4o-mini",
                "params": {"temperature": 0.7, "max_tokens": 100},
                "user_template": "Translate into Korean: {{input}}",
            },
            "professional": {
                "model": "gpt-4o-mini",
                "system_prompt": "You are a translator with ten years of experience.",
                "user_template": "Translate this English sentence into natural Korean:\n{{input}}",
            },
        },
    },
    "sentiment": {
        "match": {"model": "sentiment"},
        "unit": "request",
        "feedback": {"accuracy": {"min": 0, "max": 1}},
        "variants": {
            "simple": {"model": "gpt-4o-mini", "user_template": "Sentiment of: {{input}}"},
            "detailed": {
                "model": "gpt-4o",
                "system_prompt": "You are a sentiment analyst for {{product}}.",
                "params": {"temperature": 0},
            },
        },
    },
}


class RedisServer:
    """A real redis-server process the suite owns: it can be stopped and started again."""

    def __init__(self, data_dir: Path):
        self.embedded = EmbeddedRedis(data_dir, password="")
        self.url = self.embedded.url

    def start(self) -> None:
        self.embedded.start()

    def stop(self) -> None:
        self.embedded.stop()

    def kill(self) -> None:
        self.embedded.kill()

    def client(self) -> redis.Redis:
        return redis.Redis.from_url(self.url, decode_responses=True)


def make_config(upstream_url: str, **overrides: Any) -> Config:
    data: dict[str, Any] = {
        "upstreams": {"fake": {"base_url": upstream_url, "timeout_s": 60}},  # a hang bound, not a test
        "default_upstream": "fake",
        "prices": {"gpt-4o-mini": {"input": 0.15, "output": 0.60}, "gpt-4o": {"input": 2.5, "output": 10.0}},
        "experiments": copy.deepcopy(BASE_EXPERIMENTS),
    }
    for key, value in overrides.items():
        data[key] = value
    # No traces unless a test asks for them: writing them runs beside the flush it checks. No
    # periodic flush either (a test that runs long would meet one holding the flush lock).
    data["mlflow"] = {"trace_sample_rate": 0, "flush_interval_s": 0, **data.get("mlflow", {})}
    return parse_config(data, environ={})


class Proxy:
    """A running proxy: its URL, its app object and SDK clients pointed at it. Served in
    process (``running`` an :class:`InProcessServer`) or by uvicorn on a port."""

    def __init__(self, app: ABProxyApp, running: RunningServer | InProcessServer):
        self.app = app
        self.running = running
        self.url = running.url
        self.base_url = f"{running.url}/v1"
        self.in_process = isinstance(running, InProcessServer)

    def client(self, api_key: str = "sk-client", **kwargs: Any) -> openai.OpenAI:
        if isinstance(self.running, InProcessServer) and "http_client" not in kwargs:
            kwargs["http_client"] = httpx2.Client(transport=InProcessTransport(self.running), timeout=kwargs.get("timeout", 60))
        return openai.OpenAI(base_url=self.base_url, api_key=api_key, max_retries=0, **kwargs)

    def async_client(self, api_key: str = "sk-client", **kwargs: Any) -> openai.AsyncOpenAI:
        if isinstance(self.running, InProcessServer) and "http_client" not in kwargs:
            transport = AsyncInProcessTransport(self.running)
            kwargs["http_client"] = httpx2.AsyncClient(transport=transport, timeout=kwargs.get("timeout", 60))
        return openai.AsyncOpenAI(base_url=self.base_url, api_key=api_key, max_retries=0, **kwargs)

    def async_http(self, timeout: float = 10.0) -> httpx2.AsyncClient:
        """A plain async HTTP client that reaches this proxy, in process or not."""
        if isinstance(self.running, InProcessServer):
            return httpx2.AsyncClient(transport=AsyncInProcessTransport(self.running), timeout=timeout)
        return httpx2.AsyncClient(timeout=timeout)

    def settle(self, timeout_s: float = 30.0) -> None:
        """Wait until every request answered so far is recorded and written to Redis. (Over a
        socket the client may have its last byte before the handler hands its outcome over.)"""
        deadline = time.monotonic() + timeout_s

        def settled() -> bool:
            return self.app.proxy.in_flight == 0 and self.app.recorder.buffered == 0

        while time.monotonic() < deadline:
            if settled():
                time.sleep(0.06)  # one more recorder interval: the last batch may be mid-write
                if settled():
                    return
            time.sleep(0.02)
        raise AssertionError(f"{self.app.proxy.in_flight} request(s) in flight, {self.app.recorder.buffered} measurement(s) unwritten")

    def stop(self) -> None:
        self.running.stop(timeout=15)


def serve(app: ABProxyApp) -> Proxy:
    """The app as `abproxy serve` runs it (its HTTP protocol and limits), on a port of the test's."""
    options = server_options(app.config, host="127.0.0.1", port=0, log_level="warning")
    options.update(timeout_graceful_shutdown=10)
    for chosen_by_the_runner in ("host", "port"):
        del options[chosen_by_the_runner]
    return Proxy(app, serve_in_thread(app, **options))


def serve_in_process(app: ABProxyApp) -> Proxy:
    """The app called in process, its lifespan run: for tests where the socket is not the point."""
    return Proxy(app, InProcessServer(app.web))


def run(coro: Any) -> Any:
    return asyncio.run(coro)
