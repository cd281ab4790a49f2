"""The suite's fixtures: a redis-server on a free port, the project's fake OpenAI-compatible
upstream on loopback, and the proxy itself, called with the real openai SDK — in process unless
a test asks for the socket (``start_proxy(..., socket=True)``). What tests share besides
fixtures is in :mod:`proxykit` and :mod:`helpers`."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest
import redis
from hypothesis import HealthCheck, settings

from abproxy.app import ABProxyApp
from abproxy.config import Config
from abproxy.simulation.fake_upstream import FakeUpstream
from abproxy.simulation.server import RunningServer, serve_in_thread
from proxykit import Proxy, RedisServer, make_config, serve, serve_in_process

# Property tests judge the code, not the machine: a busy one must not fail them for slowness.
settings.register_profile("abproxy", deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile("abproxy")


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


@pytest.fixture
def start_proxy(redis_client: redis.Redis, redis_server: RedisServer, upstream_url: str) -> Iterator[Callable[..., Proxy]]:
    """Start a proxy with ``make_config(upstream_url, **overrides)``; stopped after the test."""
    started: list[Proxy] = []

    def start(
        config: Config | None = None, *, app_options: dict[str, Any] | None = None, socket: bool = False, **overrides: Any
    ) -> Proxy:
        """``app_options`` go to :class:`ABProxyApp` (Redis clients, recorder options);
        ``socket`` serves it with uvicorn on a port, as `abproxy serve` does, rather than in process."""
        config = config or make_config(upstream_url, **overrides)
        app = ABProxyApp(config, redis_url=redis_server.url, **(app_options or {}))
        proxy = serve(app) if socket else serve_in_process(app)
        started.append(proxy)
        return proxy

    yield start
    for proxy in started:
        proxy.stop()


@pytest.fixture
def proxy(start_proxy: Callable[..., Proxy]) -> Proxy:
    """The proxy on the default config, called in process."""
    return start_proxy()


@pytest.fixture
def served_proxy(start_proxy: Callable[..., Proxy]) -> Proxy:
    """The proxy on the default config, served as `abproxy serve` serves it, on a port."""
    return start_proxy(socket=True)
