"""Real parts for every test: a redis-server on a free port, the project's fake OpenAI-compatible
upstream on loopback, and the proxy itself served by uvicorn, called with the real openai SDK."""

from __future__ import annotations

import asyncio
import copy
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import openai
import pytest
import redis

from abproxy.app import ABProxyApp
from abproxy.config import Config, parse_config
from abproxy.recording.embedded_redis import EmbeddedRedis
from abproxy.simulation.provider import FakeUpstream
from abproxy.simulation.server import RunningServer, serve_in_thread
from abproxy.serving import server_options

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


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path_factory.mktemp("redis"))
    server.start()
    yield server
    server.stop()


@pytest.fixture
def redis_client(redis_server: RedisServer) -> Iterator[redis.Redis]:
    if not redis_server.embedded.running:
        redis_server.start()
    client = redis_server.client()
    client.flushall()
    yield client
    client.close()


@pytest.fixture(scope="session")
def fake_upstream() -> Iterator[tuple[FakeUpstream, RunningServer]]:
    app = FakeUpstream()
    running = serve_in_thread(app)
    yield app, running
    running.stop()


@pytest.fixture
def upstream(fake_upstream: tuple[FakeUpstream, RunningServer]) -> FakeUpstream:
    app, _ = fake_upstream
    app.clear()
    return app


@pytest.fixture
def upstream_url(fake_upstream: tuple[FakeUpstream, RunningServer]) -> str:
    return f"{fake_upstream[1].url}/v1"


def make_config(upstream_url: str, **overrides: Any) -> Config:
    data: dict[str, Any] = {
        "upstreams": {"fake": {"base_url": upstream_url, "timeout_s": 5}},
        "default_upstream": "fake",
        "prices": {"gpt-4o-mini": {"input": 0.15, "output": 0.60}, "gpt-4o": {"input": 2.5, "output": 10.0}},
        "experiments": copy.deepcopy(BASE_EXPERIMENTS),
    }
    for key, value in overrides.items():
        data[key] = value
    # No traces unless a test asks for them: writing them runs beside the flush it checks.
    data["mlflow"] = {"trace_sample_rate": 0, **data.get("mlflow", {})}
    return parse_config(data, environ={})


class Proxy:
    """A running proxy: its URL, its app object and SDK clients pointed at it."""

    def __init__(self, app: ABProxyApp, running: RunningServer):
        self.app = app
        self.running = running
        self.url = running.url
        self.base_url = f"{running.url}/v1"

    def client(self, api_key: str = "sk-client", **kwargs: Any) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.base_url, api_key=api_key, max_retries=0, **kwargs)

    def async_client(self, api_key: str = "sk-client", **kwargs: Any) -> openai.AsyncOpenAI:
        return openai.AsyncOpenAI(base_url=self.base_url, api_key=api_key, max_retries=0, **kwargs)

    def settle(self, timeout_s: float = 5.0) -> None:
        """Wait until the recorder has written everything it holds to Redis."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.app.recorder.buffered == 0:
                time.sleep(0.06)  # one more recorder interval: the last batch may be mid-write
                if self.app.recorder.buffered == 0:
                    return
            time.sleep(0.02)
        raise AssertionError(f"recorder still holds {self.app.recorder.buffered} measurements")

    def stop(self) -> None:
        self.running.stop(timeout=15)


@pytest.fixture
def start_proxy(redis_client: redis.Redis, redis_server: RedisServer, upstream_url: str) -> Iterator[Callable[..., Proxy]]:
    """Start a proxy with ``make_config(upstream_url, **overrides)``; stopped after the test."""
    started: list[Proxy] = []

    def start(config: Config | None = None, *, app_options: dict[str, Any] | None = None, **overrides: Any) -> Proxy:
        """``app_options`` go to :class:`ABProxyApp` (Redis clients, recorder options)."""
        config = config or make_config(upstream_url, **overrides)
        proxy = serve(ABProxyApp(config, redis_url=redis_server.url, **(app_options or {})))
        started.append(proxy)
        return proxy

    yield start
    for proxy in started:
        proxy.stop()


def serve(app: ABProxyApp) -> Proxy:
    """The app as `abproxy serve` runs it (its HTTP protocol and limits), on a port of the test's."""
    options = server_options(app.config, host="127.0.0.1", port=0, log_level="warning")
    options.update(timeout_graceful_shutdown=10)
    for chosen_by_the_runner in ("host", "port"):
        del options[chosen_by_the_runner]
    return Proxy(app, serve_in_thread(app, **options))


@pytest.fixture
def proxy(start_proxy: Callable[..., Proxy]) -> Proxy:
    return start_proxy()


def run(coro: Any) -> Any:
    return asyncio.run(coro)
