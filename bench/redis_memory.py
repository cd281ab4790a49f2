"""What a proxied request, a feedback and a user cost in Redis (SPEC §7), measured.

    PYTHONPATH=. python bench/redis_memory.py [--requests 20000] [--users 2000]

Starts its own redis-server (the binary the tests use), the fake upstream and abproxy (in this
process, on loopback), and for a ``unit: user`` and a ``unit: request`` experiment measures
``used_memory`` growth, after a warm-up that creates the arms' hashes:

* per request: ``--requests`` requests from ``--users`` new users (SPEC §7's figure);
* per request again: as many from the same users (what a request costs once its user is known);
* per new user: requests each from a user never seen, less the figure above;
* per feedback: scores posted by request id (half) and by the upstream's response id (half).

then ``MEMORY USAGE`` of sample keys of each kind, and the projection at 100 requests/s for a
week with the default TTLs. Takes a minute or two.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import aiohttp
import redis

from abproxy.app import ABProxyApp
from abproxy.config import parse_config
from abproxy.recording import layout
from abproxy.recording.embedded_redis import EmbeddedRedis
from abproxy.serving import server_options
from abproxy.simulation.fake_upstream import FakeUpstream
from abproxy.simulation.server import serve_in_thread

CONCURRENCY = 32
WEEK_S = 7 * 24 * 3600
RATE = 100  # requests per second, for the projection

EXPERIMENTS: dict[str, Any] = {
    "per_user": {
        "match": {"model": "per-user"},
        "unit": "user",
        "primary_metric": "feedback.score",
        "feedback": {"score": {"min": 0, "max": 5}},
        "variants": {"a": {"control": True, "model": "gpt-4o-mini"}, "b": {"model": "gpt-4o"}},
    },
    "per_request": {
        "match": {"model": "per-request"},
        "unit": "request",
        "primary_metric": "feedback.score",
        "feedback": {"score": {"min": 0, "max": 5}},
        "variants": {"a": {"control": True, "model": "gpt-4o-mini"}, "b": {"model": "gpt-4o"}},
    },
}


def used_memory(client: redis.Redis) -> int:
    return int(client.info("memory")["used_memory"])


class Harness:
    def __init__(self, base_url: str, client: redis.Redis, app: ABProxyApp):
        self.base_url = base_url
        self.redis = client
        self.app = app

    def settle(self) -> None:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if self.app.recorder.buffered == 0:
                time.sleep(0.5)  # a batch may be mid-write
                if self.app.recorder.buffered == 0:
                    return
            time.sleep(0.05)
        raise RuntimeError(f"recorder still holds {self.app.recorder.buffered} measurements")

    async def requests(self, model: str, users: list[str]) -> list[tuple[str, str]]:
        """One chat completion per entry of ``users``; (request id, response id) of each."""
        ids: list[tuple[str, str]] = []
        queue = iter(users)

        async def worker(session: aiohttp.ClientSession) -> None:
            for user in queue:
                body = {"model": model, "messages": [{"role": "user", "content": "hello"}], "user": user}
                async with session.post(f"{self.base_url}/chat/completions", json=body, headers={"authorization": "Bearer sk-bench"}) as resp:
                    data = await resp.json()
                    if resp.status != 200:
                        raise RuntimeError(f"request failed: {resp.status} {data}")
                    ids.append((resp.headers["x-abproxy-request-id"], data["id"]))

        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=CONCURRENCY)) as session:
            await asyncio.gather(*(worker(session) for _ in range(CONCURRENCY)))
        return ids

    async def feedback(self, ids: list[str]) -> None:
        queue = iter(ids)

        async def worker(session: aiohttp.ClientSession) -> None:
            for request_id in queue:
                body = {"request_id": request_id, "name": "score", "score": random.randint(0, 5)}
                async with session.post(f"{self.base_url}/feedback", json=body, headers={"authorization": "Bearer sk-bench"}) as resp:
                    if resp.status != 200:
                        raise RuntimeError(f"feedback failed: {resp.status} {await resp.text()}")

        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=CONCURRENCY)) as session:
            await asyncio.gather(*(worker(session) for _ in range(CONCURRENCY)))

    def grow(self, make: Any) -> tuple[int, Any]:
        """used_memory growth over ``make()`` (an awaitable factory), once recorded."""
        self.settle()
        before = used_memory(self.redis)
        result = asyncio.run(make())
        self.settle()
        return used_memory(self.redis) - before, result


def key_kinds(client: redis.Redis, experiment: str, sample: int = 200) -> dict[str, tuple[int, float, int]]:
    """Per kind of key of an experiment (req, resp, batch, u, fb, ...): (count, mean MEMORY USAGE
    of a sample, TTL of one in s)."""
    prefix = layout.experiment_tag(experiment) + ":"
    names: dict[str, list[str]] = defaultdict(list)
    count: dict[str, int] = defaultdict(int)
    for key in client.scan_iter(match=prefix + "*", count=1000):
        kind = key[len(prefix):].split(":", 1)[0]
        count[kind] += 1
        if len(names[kind]) < sample:
            names[kind].append(key)
    kinds = {}
    for kind, keys in sorted(names.items()):
        sizes = [client.memory_usage(k, samples=0) or 0 for k in keys]
        kinds[kind] = (count[kind], sum(sizes) / len(sizes), int(client.ttl(keys[0])))
    return kinds


def human(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000:
            return f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} PB"


def measure(h: Harness, experiment: str, model: str, requests: int, users: int) -> dict[str, float]:
    tag = experiment[:4]
    _, warm = h.grow(lambda: h.requests(model, [f"warm-{tag}-{i % 100}" for i in range(1000)]))
    h.grow(lambda: h.feedback([rid for rid, _ in warm[:100]]))  # the feedback metric's fields
    people = [f"user-{tag}-{i}" for i in range(users)]
    plan = [people[i % users] for i in range(requests)]
    random.shuffle(plan)
    grown, _ = h.grow(lambda: h.requests(model, plan))
    first = grown / requests
    grown, ids = h.grow(lambda: h.requests(model, plan))
    again = grown / requests
    fresh = max(users, requests // 4)
    grown, _ = h.grow(lambda: h.requests(model, [f"new-{tag}-{i}" for i in range(fresh)]))
    per_new_request = grown / fresh
    scored = ids[: max(1, min(len(ids), requests // 4))]
    chosen = [rid if i % 2 else resp for i, (rid, resp) in enumerate(scored)]
    grown, _ = h.grow(lambda: h.feedback(chosen))
    per_feedback = grown / len(chosen)
    kinds = key_kinds(h.redis, experiment)
    print(f"\n## {experiment} (unit: {EXPERIMENTS[experiment]['unit']})")
    print(f"  {requests} requests from {users} new users:    {first:7.1f} B per request   (SPEC §7: at most 100)")
    print(f"  {requests} requests from the same users:     {again:7.1f} B per request")
    print(f"  {fresh} requests, each from a new user:    {per_new_request:7.1f} B per request -> {per_new_request - again:6.1f} B per new user")
    print(f"  {len(chosen)} feedbacks (half by request id, half by response id): {per_feedback:7.1f} B per feedback")
    print("  keys now held (MEMORY USAGE of up to 200 of each kind):")
    for kind, (n, size, ttl) in kinds.items():
        shown_ttl = "no TTL" if ttl < 0 else f"TTL {ttl / 86400:.1f} d"
        print(f"    {kind:8} {n:7d} keys  {size:7.1f} B each  {shown_ttl}")
    return {"first": first, "again": again, "new_user": per_new_request - again, "feedback": per_feedback}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=20_000)
    parser.add_argument("--users", type=int, default=2_000)
    args = parser.parse_args()
    random.seed(14)
    with tempfile.TemporaryDirectory(prefix="abproxy-redis-memory-") as tmp:
        embedded = EmbeddedRedis(Path(tmp), password="")
        embedded.start()
        upstream = serve_in_thread(FakeUpstream())
        config = parse_config(
            {
                "upstreams": {"fake": {"base_url": f"{upstream.url}/v1", "timeout_s": 10}},
                "default_upstream": "fake",
                "experiments": EXPERIMENTS,
                "mlflow": {"trace_sample_rate": 0, "flush_interval_s": 0},
            },
            environ={},
        )
        app = ABProxyApp(config, redis_url=embedded.url)
        options = server_options(config, host="127.0.0.1", port=0, log_level="warning")
        for chosen_here in ("host", "port"):
            del options[chosen_here]
        proxy = serve_in_thread(app, **options)
        client = redis.Redis.from_url(embedded.url, decode_responses=True)
        try:
            h = Harness(f"{proxy.url}/v1", client, app)
            started = time.monotonic()
            print(f"abproxy {sys.argv[0]}: feedback_ttl_s {config.feedback_ttl_s} s; redis {client.info('server')['redis_version']}")
            results = {
                name: measure(h, name, EXPERIMENTS[name]["match"]["model"], args.requests, args.users) for name in EXPERIMENTS
            }
            week = RATE * WEEK_S
            print(f"\n## Projection at {RATE} requests/s for a week ({week:,} requests), default TTLs")
            for name, r in results.items():
                per_user_s = layout.UNIT_TTL_S if EXPERIMENTS[name]["unit"] == "user" else config.feedback_ttl_s
                print(
                    f"  {name}: users who come back: {human(r['again'] * week)}; "
                    f"a new user on every request: {human((r['again'] + r['new_user']) * week)} "
                    f"(per-user state kept {per_user_s / 86400:.0f} d after the last request: "
                    f"{human(r['new_user'] * RATE * per_user_s)} at steady state); "
                    f"plus {human(r['feedback'])} per feedback"
                )
            print(f"\n({time.monotonic() - started:.0f} s)")
        finally:
            client.close()
            proxy.stop(timeout=15)
            upstream.stop()
            embedded.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
