"""A Redis that evicts keys when its memory is full (issue 18: "nothing lost, nothing doubled,
nothing silent"). Evicted counters, feedback records and per-user sums make totals come out short
and re-posted scores count as new, without a word. ``abproxy serve`` refuses such a Redis unless
``redis_allow_eviction: true``; keys evicted while it serves put the warning
``redis_evicted_keys`` on every experiment's results — for every replica, for ``abproxy report``
and in MLflow — kept in Redis so that it outlives the replica that noticed.

Real parts only: ``redis-server`` processes started with a small ``--maxmemory`` and
``--maxmemory-policy allkeys-lru`` (what ElastiCache and Azure Cache also do, with volatile-lru),
overflowed by writes and by the proxy's own traffic."""

from __future__ import annotations

import asyncio
import copy
import itertools
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest
import redis
import yaml
from proxykit import BASE_EXPERIMENTS
from flushkit import runs_by_name
from helpers import ServeProcess, free_port, http_json, wait_until

from abproxy.app import open_redis
from abproxy.recording import eviction
from abproxy.recording.embedded_redis import EmbeddedRedis

MAXMEMORY = 3 * 1024 * 1024


def evicting_server(data_dir: Path) -> EmbeddedRedis:
    return EmbeddedRedis(
        data_dir, password="", extra_args=("--maxmemory", str(MAXMEMORY), "--maxmemory-policy", "allkeys-lru")
    )


@pytest.fixture
def evicting(tmp_path: Path) -> Iterator[EmbeddedRedis]:
    server = evicting_server(tmp_path / "evicting")
    server.start()
    yield server
    server.stop()


def evicted_keys(url: str) -> int:
    client = redis.Redis.from_url(url)
    try:
        return int(client.info("stats")["evicted_keys"])
    finally:
        client.close()


def fill(url: str, prefix: str, *, until_evicted: bool, value_bytes: int = 1000) -> None:
    """Write filler keys until Redis has evicted some (``until_evicted``), or until it is within
    150 KB of ``maxmemory`` without having evicted any."""
    client = redis.Redis.from_url(url)
    try:
        start = int(client.info("stats")["evicted_keys"])
        for batch in range(10_000):
            if until_evicted and int(client.info("stats")["evicted_keys"]) > start:
                return
            if not until_evicted and int(client.info("memory")["used_memory"]) > MAXMEMORY - 150_000:
                assert int(client.info("stats")["evicted_keys"]) == start
                return
            pipe = client.pipeline(transaction=False)
            for index in range(50):
                pipe.set(f"{prefix}:{batch}:{index}", "x" * value_bytes)
            pipe.execute()
        raise AssertionError("Redis never filled up")
    finally:
        client.close()


def make_room(url: str, prefix: str) -> None:
    """Delete the filler keys ``prefix`` wrote, so that Redis stops evicting: a marker written while
    Redis is still at ``maxmemory`` may be evicted again at once (its key name can wait in Redis's
    eviction pool from before), which would leave nothing for a test to read back."""
    client = redis.Redis.from_url(url)
    try:
        for batch in iter(lambda: list(itertools.islice(client.scan_iter(f"{prefix}:*", count=500), 500)), []):
            client.delete(*batch)
    finally:
        client.close()


def observe(url: str, remembered: eviction.Remembered | None = None) -> eviction.Evictions:
    async def once() -> eviction.Evictions:
        client = open_redis(url)
        try:
            return await eviction.observe(client, remembered)
        finally:
            await client.aclose()

    return asyncio.run(once())


def serve_config(redis_url: str, upstream_url: str, tmp_path: Path, **settings: Any) -> dict[str, Any]:
    return {
        "redis_url": redis_url,
        "data_dir": str(tmp_path / "data"),
        "mlflow": {"tracking_uri": f"sqlite:///{tmp_path}/mlflow.db", "flush_interval_s": 0, "trace_sample_rate": 0},
        "upstreams": {"fake": {"base_url": upstream_url, "timeout_s": 5}},
        "default_upstream": "fake",
        "experiments": copy.deepcopy(BASE_EXPERIMENTS),
        **settings,
    }


def abproxy(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ABPROXY_", "MLFLOW_"))}
    return subprocess.run(
        [sys.executable, "-m", "abproxy", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def stop(serve: ServeProcess) -> None:
    """SIGTERM, as an operator stops a replica; killed should it not end (the test then fails)."""
    serve.terminate()
    try:
        serve.wait(30)
    except subprocess.TimeoutExpired:
        serve.kill()
        raise AssertionError(f"abproxy serve did not stop on SIGTERM:\n{serve.log()[-2000:]}") from None


def write_config(tmp_path: Path, config: dict[str, Any]) -> Path:
    path = tmp_path / "abproxy.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


# -- refused at start ---------------------------------------------------------------------------


@pytest.mark.slow
def test_serve_refuses_a_redis_that_evicts_keys_naming_the_policy_and_the_fix(
    evicting: EmbeddedRedis, tmp_path: Path, upstream_url: str
) -> None:
    path = write_config(tmp_path, serve_config(evicting.url, upstream_url, tmp_path))
    refused = abproxy("serve", "--config", str(path), "--port", str(free_port()), cwd=tmp_path)
    assert refused.returncode == 2, refused.stderr[-3000:]
    message = refused.stderr
    for needed in ("maxmemory-policy", "allkeys-lru", "CONFIG SET maxmemory-policy noeviction", "parameter group",
                   "redis_allow_eviction: true", f"127.0.0.1:{evicting.port}"):  # fmt: skip
        assert needed in message, message
    assert "Traceback" not in message


@pytest.mark.slow
def test_every_master_of_a_cluster_is_checked_and_watched(tmp_path: Path, upstream_url: str) -> None:
    from clusterkit import RedisCluster
    from redis.crc import key_slot

    cluster = RedisCluster(tmp_path / "cluster", masters=2)
    cluster.start()
    try:
        # The node named in redis_url keeps noeviction; the other master evicts.
        other = cluster.nodes[1]
        client = other.client()
        client.config_set("maxmemory-policy", "volatile-lru")  # ElastiCache's and Azure Cache's default
        path = write_config(tmp_path, serve_config(cluster.nodes[0].url, upstream_url, tmp_path))
        refused = abproxy("serve", "--config", str(path), "--port", str(free_port()), cwd=tmp_path)
        assert refused.returncode == 2, refused.stderr[-3000:]
        assert f"127.0.0.1:{other.port}" in refused.stderr and "volatile-lru" in refused.stderr, refused.stderr
        assert f"127.0.0.1:{cluster.nodes[0].port}" not in refused.stderr

        # Keys that master evicts are counted, whichever master holds the marker.
        replica = eviction.Remembered()
        assert observe(cluster.url, replica).count == 0
        client.config_set("maxmemory", str(MAXMEMORY))
        client.config_set("maxmemory-policy", "allkeys-lru")
        its_own = [tag for tag in (f"t{i}" for i in range(100)) if key_slot(f"{{{tag}}}".encode()) >= 8192]
        start = int(client.info("stats")["evicted_keys"])
        for batch in range(200):
            client.mset({f"{{{its_own[batch % len(its_own)]}}}:{batch}:{i}": "x" * 1000 for i in range(50)})
        low = int(client.info("stats")["evicted_keys"]) - start
        counted = observe(cluster.url, replica).count
        high = int(client.info("stats")["evicted_keys"]) - start
        assert 0 < low <= counted <= high
        client.close()
    finally:
        cluster.stop()


# -- counting what Redis evicted -----------------------------------------------------------------


def look(url: str, remembered: eviction.Remembered) -> tuple[int, eviction.Evictions, int]:
    """An observation between two readings of Redis's own ``evicted_keys``: a command Redis runs
    at ``maxmemory`` may evict first, and eviction may go on in the background a moment longer."""
    before = evicted_keys(url)
    seen = observe(url, remembered)
    return before, seen, evicted_keys(url)


@pytest.mark.slow
def test_evictions_are_counted_once_across_config_resetstat_and_a_redis_restart(evicting: EmbeddedRedis) -> None:
    replica = eviction.Remembered()  # one long-lived process
    fill(evicting.url, "old", until_evicted=True)
    # what was evicted before abproxy looked is not counted: those were not its keys
    base_low, baseline, base_high = look(evicting.url, replica)
    assert baseline == eviction.Evictions(0, None, 0)

    fill(evicting.url, "a", until_evicted=True)
    low, first, high = look(evicting.url, replica)
    assert low - base_high <= first.count <= high - base_low and first.new == first.count > 0
    assert first.first_seen is not None
    make_room(evicting.url, "a")
    for process in (replica, eviction.Remembered()):  # looked at again, here or by `abproxy report`: not doubled
        low, again, high = look(evicting.url, process)
        assert low - base_high <= again.count <= high - base_low

    counted = observe(evicting.url, replica).count
    redis.Redis.from_url(evicting.url).config_resetstat()  # evicted_keys starts again from 0
    fill(evicting.url, "b", until_evicted=True)
    low, second, high = look(evicting.url, replica)
    assert counted + low <= second.count <= counted + high and second.new == second.count - counted

    evicting.stop()  # its append-only file keeps the data, the marker with it; evicted_keys starts again
    evicting.start()
    fill(evicting.url, "c", until_evicted=True)
    low, third, high = look(evicting.url, replica)
    assert second.count + low <= third.count <= second.count + high and third.new == third.count - second.count
    assert third.first_seen == first.first_seen


@pytest.mark.slow
def test_a_replica_puts_back_a_marker_that_was_itself_evicted(evicting: EmbeddedRedis) -> None:
    remembered = eviction.Remembered()
    base_low, _, base_high = look(evicting.url, remembered)
    fill(evicting.url, "a", until_evicted=True)
    _, seen, _ = look(evicting.url, remembered)
    assert seen.count > 0
    make_room(evicting.url, "a")
    redis.Redis.from_url(evicting.url).delete(eviction.MARKER_KEY)  # as allkeys-lru may do to it
    low, again, high = look(evicting.url, remembered)
    assert low - base_high <= again.count <= high - base_low and again.first_seen == seen.first_seen
    low, elsewhere, high = look(evicting.url, eviction.Remembered())  # back in Redis, for every process
    assert low - base_high <= elsewhere.count <= high - base_low


# -- the warning, end to end ---------------------------------------------------------------------


def warnings_of(serve: ServeProcess, experiment: str) -> list[str]:
    status, body = http_json("GET", f"{serve.url}/abproxy/experiments/{experiment}")
    assert status == 200, body
    return list(body["warnings"])


def overflow_with_traffic(serve: ServeProcess, url: str) -> int:
    """Requests from new users (each keeps a few hundred bytes in Redis) until Redis evicts."""
    client = openai.OpenAI(base_url=f"{serve.url}/v1", api_key="sk-test", max_retries=0)
    start = evicted_keys(url)
    sent = 0
    while evicted_keys(url) == start:
        assert sent < 5_000, "5,000 requests did not overflow Redis"
        for _ in range(25):
            client.chat.completions.create(
                model="translation", messages=[{"role": "user", "content": "hi"}], user=f"u{sent}"
            )
            sent += 1
    client.close()
    return sent


@pytest.mark.slow
def test_keys_evicted_while_serving_warn_on_every_experiment_for_every_process_until_mlflow(
    evicting: EmbeddedRedis, tmp_path: Path, upstream_url: str
) -> None:
    config = serve_config(evicting.url, upstream_url, tmp_path, redis_allow_eviction=True)
    path = write_config(tmp_path, config)
    serve = ServeProcess(tmp_path, config)
    try:
        assert "redis_allow_eviction" in serve.log() and "allkeys-lru" in serve.log(), serve.log()
        assert warnings_of(serve, "translation") == []
        fill(evicting.url, "filler", until_evicted=False)
        overflow_with_traffic(serve, evicting.url)

        for experiment in ("translation", "sentiment"):
            assert wait_until(lambda name=experiment: "redis_evicted_keys" in warnings_of(serve, name), timeout=60)
        assert "Redis evicted" in serve.log(), serve.log()[-3000:]

        # `abproxy report`, another process, reads the warning from Redis
        report = abproxy("report", "--config", str(path), cwd=tmp_path)
        assert report.returncode == 0, report.stderr
        assert "WARNINGS: redis_evicted_keys" in report.stdout, report.stdout
        assert "redis_evicted_keys: Redis evicted" in report.stdout, report.stdout
        as_json = abproxy("report", "sentiment", "--json", "--config", str(path), cwd=tmp_path)
        assert "redis_evicted_keys" in json.loads(as_json.stdout)["warnings"]
    finally:
        stop(serve)

    # The replica that noticed is gone; the one that replaces it still warns.
    replacement = ServeProcess(tmp_path, config, name="replacement")
    try:
        assert "redis_evicted_keys" in warnings_of(replacement, "translation")
    finally:
        stop(replacement)

    # and MLflow shows it on the experiment and its summary run (abproxy.warnings)
    flushed = abproxy("flush", "--config", str(path), cwd=tmp_path)
    assert flushed.returncode == 0, flushed.stderr
    uri = config["mlflow"]["tracking_uri"]
    for experiment in ("translation", "sentiment"):
        summary = runs_by_name(uri, experiment)["summary"]
        assert "redis_evicted_keys" in summary.data.tags["abproxy.warnings"].split(","), summary.data.tags


@pytest.mark.slow
def test_a_replica_notices_evictions_on_its_own_without_anyone_looking(
    evicting: EmbeddedRedis, tmp_path: Path, upstream_url: str
) -> None:
    config = serve_config(evicting.url, upstream_url, tmp_path, redis_allow_eviction=True)
    serve = ServeProcess(tmp_path, config)
    try:
        fill(evicting.url, "filler", until_evicted=False)
        fill(evicting.url, "more", until_evicted=True)
        wait_until(lambda: "Redis evicted" in serve.log(), timeout=eviction.CHECK_INTERVAL_S + 5)
    finally:
        stop(serve)
