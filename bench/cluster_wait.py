"""What confirming each recorder batch with a replica (``WAIT 1``) costs on a Redis Cluster.

Starts a loopback cluster (3 masters, 1 replica each; tests/clusterkit.py), then writes the same
recorder batches (N outcomes of a ``unit: user`` experiment, one script call each) through
``Recorder`` twice: as abproxy does on a cluster (script + WAIT on the same connection), and
with the WAIT left out. Prints batches/s and ms per batch for each, and their ratio.

    python bench/cluster_wait.py [--batches 300] [--size 200]
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from clusterkit import RedisCluster  # noqa: E402

from abproxy.catalog import Catalog  # noqa: E402
from abproxy.config import parse_config  # noqa: E402
from abproxy.metrics import ProxyMetrics  # noqa: E402
from abproxy.recording import connection  # noqa: E402
from abproxy.recording.connection import open_redis  # noqa: E402
from abproxy.recording.outcome import ExperimentRoute, Outcome  # noqa: E402
from abproxy.recording.recorder import Recorder  # noqa: E402
from prometheus_client import CollectorRegistry  # noqa: E402

CONFIG = {
    "upstreams": {"fake": {"base_url": "http://127.0.0.1:9/v1"}},
    "default_upstream": "fake",
    "experiments": {"e": {"unit": "user", "variants": {"a": {"control": True}, "b": {}}}},
}


def outcome(catalog: Catalog, i: int) -> Outcome:
    plan = catalog.plans["e"]
    variant = "a" if i % 2 else "b"
    route = ExperimentRoute(experiment="e", variant=variant, arm=plan.arms[variant].arm_id, unit=f"u{i % 5000}", forced=False)
    body = b'{"id":"chatcmpl-%d","usage":{"prompt_tokens":10,"completion_tokens":20,"total_tokens":30},"choices":[{"message":{"content":"hi"}}]}' % i
    return Outcome(request_id=f"r{i}", endpoint="chat", model="m", upstream="fake", status=200, latency_s=0.01 + (i % 50) / 1000,
                   started_at=time.time(), route=route, body=body, streamed=False)  # fmt: skip


async def measure(url: str, batches: int, size: int, wait: bool) -> float:
    config = parse_config(CONFIG, environ={})
    catalog = Catalog(config)
    client = open_redis(url)
    recorder = Recorder(client, config, catalog, ProxyMetrics(CollectorRegistry()), max_batch=size)
    original = connection.confirm_replicated

    async def no_wait(redis: Any, pipe: Any, key: str, wait_ms: int = 0) -> Any:
        await redis.initialize()
        node = redis.get_node_from_key(key)
        pipe.execute_command("ECHO", "1", target_nodes=node)
        return node

    connection.confirm_replicated = original if wait else no_wait  # type: ignore[assignment]
    try:
        started = time.perf_counter()
        for b in range(batches):
            for i in range(size):
                recorder.record(outcome(catalog, b * size + i))
            assert await recorder.flush()
        return time.perf_counter() - started
    finally:
        connection.confirm_replicated = original  # type: ignore[assignment]
        await client.aclose()


async def key_sizes(url: str) -> None:
    """Redis's own MEMORY USAGE of one key of each kind the recorder writes."""
    client = open_redis(url)
    try:
        await client.initialize()
        for pattern in ("req", "resp", "u", "batch", "a", "h"):
            key = next(iter(await client.keys(f"abproxy:{{e}}:{pattern}:*", target_nodes=client.get_node_from_key("abproxy:{e}:x"))))
            print(f"  {pattern:5} e.g. {key[:60]:60} {await client.memory_usage(key)} bytes")
    finally:
        await client.aclose()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--batches", type=int, default=300)
    parser.add_argument("--size", type=int, default=200)
    args = parser.parse_args()
    cluster = RedisCluster(Path(tempfile.mkdtemp()))
    cluster.start()
    try:
        results = {}
        for wait in (False, True, False, True):
            seconds = asyncio.run(measure(cluster.url, args.batches, args.size, wait))
            results.setdefault(wait, []).append(seconds)
        for wait, runs in results.items():
            best = min(runs)
            print(f"{'with WAIT' if wait else 'no WAIT  '}: {args.batches / best:7.1f} batches/s, "
                  f"{best / args.batches * 1000:.2f} ms per batch of {args.size}")  # fmt: skip
        print(f"ratio (with / without): {min(results[False]) / min(results[True]):.2f} of the throughput")
        asyncio.run(key_sizes(cluster.url))
    finally:
        cluster.stop()


if __name__ == "__main__":
    main()
