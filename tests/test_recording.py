"""Recording: what reaches the counters in Redis (SPEC §3), exactly, under concurrency, client
disconnects, Redis outages and crashes, replays, a full buffer and a graceful shutdown."""

from __future__ import annotations

import asyncio
import collections
import copy
import json
import math
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import openai
import pytest
import redis
import yaml
from redis.asyncio import Redis as AsyncRedis
from redis.exceptions import ConnectionError as RedisConnectionError

from abproxy.app import open_redis
from abproxy.recording import ids, layout, scripts, store
from abproxy.recording.counters import ArmCounters, parse_arm
from abproxy.catalog import Catalog
from abproxy.metrics import DROP_REASONS
from abproxy.recording.embedded_redis import EmbeddedRedis, free_port

from proxykit import BASE_EXPERIMENTS, make_config
from helpers import about_zero, comes_true, http, http_json, metrics_text, sample, wait_until

EXP = "translation"
PRICE_IN, PRICE_OUT = 0.15, 0.60


# -- helpers -----------------------------------------------------------------------------------


def arm_ids(proxy: Any, experiment: str = EXP) -> dict[str, str]:
    """variant name → arm id (``variant@hash``) as the running proxy defines it."""
    return {name: arm.arm_id for name, arm in proxy.app.catalog.plans[experiment].arms.items()}


def arm_stats(client: redis.Redis, arm: str, experiment: str = EXP) -> dict[str, str]:
    return client.hgetall(layout.stats_key(experiment, arm))


def arm_hist(client: redis.Redis, arm: str, experiment: str = EXP) -> dict[str, str]:
    return client.hgetall(layout.hist_key(experiment, arm))


def num(stats: dict[str, str], field: str) -> float:
    return float(stats.get(field, 0))


def hist_count(hist: dict[str, str], metric: str) -> int:
    return sum(int(v) for k, v in hist.items() if k.partition("|")[0] == metric)


def read_arms(url: str, arms: list[str], experiment: str = EXP) -> dict[str, ArmCounters]:
    async def main() -> dict[str, ArmCounters]:
        client = AsyncRedis.from_url(url, decode_responses=True)
        try:
            return await store.read_arms(client, experiment, arms)
        finally:
            await client.aclose()

    return asyncio.run(main())






def user_msg(text: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": text}]


def has_request_record(client: redis.Redis, request_id: str) -> bool:
    """Whether feedback can find the request: a signed id verifies under the secret Redis holds
    (it carries the request); a random one needs the record the recorder wrote."""
    if ids.looks_signed(request_id):
        secret = client.get(ids.SECRET_KEY)
        return secret is not None and ids.Signer(ids.unb64(secret)).verify(request_id) is not None
    return bool(client.keys(f"{layout.PREFIX}:*req:{request_id}"))


def get_json(url: str) -> Any:
    raw = http("GET", url, timeout=5)
    assert raw.status == 200, raw
    return raw.json()


# -- 1. exact counts under concurrency ---------------------------------------------------------


@pytest.mark.slow
def test_300_concurrent_requests_are_counted_exactly(proxy: Any, redis_client: redis.Redis, redis_server: Any) -> None:
    arms = arm_ids(proxy)

    async def one(client: openai.AsyncOpenAI, i: int) -> dict[str, Any]:
        text = " ".join(f"w{j}" for j in range(1 + i % 9))
        kwargs = dict(model="translation", messages=user_msg(text), user=f"user-{i}")
        if i % 2:
            raw = await client.chat.completions.with_raw_response.create(
                **kwargs, stream=True, stream_options={"include_usage": True}
            )
            parts, usage = [], None
            async for chunk in raw.parse():
                if chunk.choices and chunk.choices[0].delta.content:
                    parts.append(chunk.choices[0].delta.content)
                if chunk.usage is not None:
                    usage = chunk.usage
            reply, streamed = "".join(parts), True
        else:
            raw = await client.chat.completions.with_raw_response.create(**kwargs)
            completion = raw.parse()
            reply, usage, streamed = completion.choices[0].message.content, completion.usage, False
        assert usage is not None
        return {
            "variant": raw.headers["x-abproxy-variant"],
            "reply": reply,
            "prompt": usage.prompt_tokens,
            "completion": usage.completion_tokens,
            "total": usage.total_tokens,
            "streamed": streamed,
        }

    async def main() -> list[dict[str, Any]]:
        async with proxy.async_client() as client:
            return await asyncio.gather(*(one(client, i) for i in range(300)))

    seen = asyncio.run(main())
    proxy.settle()

    assert len(seen) == 300
    assert {r["variant"] for r in seen} == set(arms), "300 users should reach both variants"
    total_requests = 0
    for variant, arm in arms.items():
        mine = [r for r in seen if r["variant"] == variant]
        stats, hist = arm_stats(redis_client, arm), arm_hist(redis_client, arm)
        assert int(stats["requests"]) == len(mine), variant
        total_requests += int(stats["requests"])
        assert int(stats.get("errors", 0)) == 0
        assert int(stats["units"]) == len(mine)  # one request per distinct user
        assert num(stats, "total_tokens|s") == sum(r["total"] for r in mine)
        assert num(stats, "prompt_tokens|s") == sum(r["prompt"] for r in mine)
        assert num(stats, "completion_tokens|s") == sum(r["completion"] for r in mine)
        assert num(stats, "response_chars|s") == sum(len(r["reply"]) for r in mine)
        assert int(stats["latency_ms|n"]) == len(mine)
        assert hist_count(hist, "latency_ms") == len(mine)
        assert int(stats["ttft_ms|n"]) == sum(r["streamed"] for r in mine)
        expected_cost = sum((r["prompt"] * PRICE_IN + r["completion"] * PRICE_OUT) / 1e6 for r in mine)
        assert math.isclose(num(stats, "cost_usd|s"), expected_cost, rel_tol=1e-12), variant
        assert num(stats, "error_rate|s") == 0 and int(stats["error_rate|n"]) == len(mine)
    assert total_requests == 300

    # The typed reader and the live results endpoint agree with the raw hashes.
    counters = read_arms(redis_server.url, list(arms.values()))
    for variant, arm in arms.items():
        mine = [r for r in seen if r["variant"] == variant]
        assert counters[arm].requests == len(mine)
        assert counters[arm].metrics["total_tokens"].moments.n == len(mine)
        assert sum(counters[arm].metrics["latency_ms"].histogram.values()) == len(mine)
    live = get_json(f"{proxy.url}/abproxy/experiments/translation")
    assert sum(v["requests"] for v in live["variants"]) == 300
    for v in live["variants"]:
        assert v["metrics"]["latency_ms"]["n"] == v["requests"]


# -- 2. stream-only metrics, words, usage the client did not ask for -----------------------------


@pytest.mark.slow
def test_streams_record_ttft_and_json_does_not_and_words_are_whitespace_words(
    proxy: Any, redis_client: redis.Redis
) -> None:
    reply = "Hello  wide   world, said\tthe proxy"
    expected_words = len(reply.split())  # 6
    headers = {"x-fake-reply": reply, "x-fake-chunk-delay-ms": "30"}
    client = proxy.client()
    kwargs = dict(model="translation", messages=user_msg("one two three"), user="words-user", extra_headers=headers)

    json_usage = []
    variants = set()
    for _ in range(2):
        raw = client.chat.completions.with_raw_response.create(**kwargs)
        variants.add(raw.headers["x-abproxy-variant"])
        completion = raw.parse()
        assert completion.choices[0].message.content == reply
        json_usage.append(completion.usage.total_tokens)
    streamed_usage_seen = []
    for include_usage in (False, False, True):
        extra = {"stream_options": {"include_usage": True}} if include_usage else {}
        raw = client.chat.completions.with_raw_response.create(**kwargs, stream=True, **extra)
        variants.add(raw.headers["x-abproxy-variant"])
        text, usages = "", []
        for chunk in raw.parse():
            if chunk.choices and chunk.choices[0].delta.content:
                text += chunk.choices[0].delta.content
            if chunk.usage is not None:
                usages.append(chunk.usage.total_tokens)
        assert text == reply
        # The proxy asks upstream for usage but strips that chunk when the client did not ask.
        assert len(usages) == (1 if include_usage else 0)
        streamed_usage_seen += usages
    proxy.settle()

    assert len(variants) == 1, "one user, one variant"
    arm = arm_ids(proxy)[variants.pop()]
    stats = arm_stats(redis_client, arm)
    assert int(stats["requests"]) == 5
    assert int(stats["latency_ms|n"]) == 5
    assert int(stats["ttft_ms|n"]) == 3, "only the three streams have a time to first token"
    assert int(stats["response_words|n"]) == 5
    assert num(stats, "response_words|s") == 5 * expected_words
    assert num(stats, "response_chars|s") == 5 * len(reply)
    # The streams the client asked no usage for are still measured, from the usage the proxy asked for.
    assert json_usage[0] == json_usage[1] == streamed_usage_seen[0]
    assert int(stats["total_tokens|n"]) == 5
    assert num(stats, "total_tokens|s") == 5 * json_usage[0]
    # A first token comes one chunk delay in; the last byte several chunk delays later.
    ttft_mean = num(stats, "ttft_ms|s") / 3
    assert 0 < ttft_mean < 150


# -- 3. errors -----------------------------------------------------------------------------------


def test_upstream_errors_count_as_errors_not_latency(proxy: Any, redis_client: redis.Redis) -> None:
    client = proxy.client()
    for i in range(10):
        fail = i < 4
        kwargs = dict(model="translation", messages=user_msg(f"hi {i}"), user=f"err-{i}")
        if fail:
            with pytest.raises(openai.InternalServerError) as info:
                client.chat.completions.create(**kwargs, extra_headers={"x-fake-status": "500"})
            assert info.value.status_code == 500
            assert info.value.response.headers.get("x-abproxy-variant") in arm_ids(proxy)
        else:
            client.chat.completions.create(**kwargs)
    proxy.settle()

    totals: collections.Counter[str] = collections.Counter()
    for arm in arm_ids(proxy).values():
        stats = arm_stats(redis_client, arm)
        for field in ("requests", "errors", "latency_ms|n", "error_rate|n", "total_tokens|n"):
            totals[field] += int(stats.get(field, 0))
        totals["error_rate|s"] += num(stats, "error_rate|s")
        assert num(stats, "error_rate|s") == int(stats.get("errors", 0))
    assert totals["requests"] == 10
    assert totals["errors"] == 4
    assert totals["error_rate|n"] == 10 and totals["error_rate|s"] == 4
    assert totals["latency_ms|n"] == 6, "failed requests have no latency sample"
    assert totals["total_tokens|n"] == 6
    live = get_json(f"{proxy.url}/abproxy/experiments/translation")
    assert sum(v["errors"] for v in live["variants"]) == 4
    text = metrics_text(proxy.url)
    assert sum(
        sample(text, "abproxy_requests_total", experiment=EXP, variant=v, status="500") for v in arm_ids(proxy)
    ) == 4


# -- 4. forced variants ------------------------------------------------------------------------


def test_forced_variants_are_served_and_in_prometheus_but_not_in_the_statistics(
    proxy: Any, redis_client: redis.Redis, upstream: Any
) -> None:
    client = proxy.client()
    for i in range(5):
        raw = client.chat.completions.with_raw_response.create(
            model="translation",
            messages=user_msg("good morning"),
            user=f"qa-{i}",
            extra_headers={"X-ABProxy-Variant": "professional"},
        )
        assert raw.headers["x-abproxy-variant"] == "professional"
        assert raw.parse().choices[0].message.content.startswith("Echo: Translate this English sentence")
        # served with the professional variant's system prompt
        assert upstream.received[-1].json["messages"][0]["content"].startswith("You are a translator")
    for i in range(3):
        client.chat.completions.create(model="translation", messages=user_msg("hello"), user=f"normal-{i}")
    proxy.settle()

    counted = {name: int(arm_stats(redis_client, arm).get("requests", 0)) for name, arm in arm_ids(proxy).items()}
    assert sum(counted.values()) == 3, f"only the unforced requests are counted: {counted}"
    text = metrics_text(proxy.url)
    professional_total = sample(text, "abproxy_requests_total", experiment=EXP, variant="professional", status="200")
    basic_total = sample(text, "abproxy_requests_total", experiment=EXP, variant="basic", status="200")
    assert professional_total == 5 + counted["professional"]
    assert basic_total == counted["basic"]


# -- 5. client disconnect ------------------------------------------------------------------------


def test_client_disconnect_mid_stream_cancels_upstream_and_counts_cancelled(
    served_proxy: Any, redis_client: redis.Redis, upstream: Any
) -> None:
    before = upstream.disconnects
    long_reply = " ".join(f"word{i}" for i in range(40))  # 40 chunks x 200 ms = 8 s if not cut
    client = served_proxy.client()
    raw = client.chat.completions.with_raw_response.create(
        model="translation",
        messages=user_msg("tell me a long story"),
        user="leaver",
        stream=True,
        extra_headers={"x-fake-chunk-delay-ms": "200", "x-fake-reply": long_reply},
    )
    variant = raw.headers["x-abproxy-variant"]
    stream = raw.parse()
    first = next(iter(stream))
    assert first.choices
    stream.close()
    client.close()

    # well before the 8 s the rest of the stream would have taken
    assert wait_until(lambda: upstream.disconnects == before + 1, timeout=60), "upstream never saw the disconnect"
    assert wait_until(lambda: upstream.active == 0, timeout=60)
    served_proxy.settle()

    stats = arm_stats(redis_client, arm_ids(served_proxy)[variant])
    assert int(stats["requests"]) == 1
    assert int(stats["cancelled"]) == 1
    assert int(stats.get("errors", 0)) == 0
    assert "latency_ms|n" not in stats, "a cancelled stream has no latency sample"
    text = metrics_text(served_proxy.url)
    assert sample(text, "abproxy_requests_total", experiment=EXP, variant=variant, status="499") == 1


# -- 6. Redis outages ------------------------------------------------------------------------------


def _send(client: openai.OpenAI, i: int, failures: list[str]) -> str | None:
    try:
        raw = client.chat.completions.with_raw_response.create(
            model="translation", messages=user_msg(f"outage {i}"), user=f"o-{i % 37}"
        )
        raw.parse()
        return raw.headers["x-abproxy-request-id"]
    except Exception as error:  # noqa: BLE001 - every failure is reported
        failures.append(f"{i}: {error!r}")
        return None


class _Traffic:
    """``total`` requests from ``workers`` threads, in the background, each noting when it started."""

    def __init__(self, proxy: Any, total: int, workers: int = 4):
        self.client = proxy.client()
        self.total = total
        self.failures: list[str] = []
        self.sent: list[tuple[float, str | None]] = []
        self._next = iter(range(total))
        self._lock = threading.Lock()
        self._threads = [threading.Thread(target=self._work) for _ in range(workers)]
        for thread in self._threads:
            thread.start()

    def _work(self) -> None:
        while True:
            with self._lock:
                i = next(self._next, None)
            if i is None:
                return
            started = time.monotonic()
            request_id = _send(self.client, i, self.failures)
            with self._lock:
                self.sent.append((started, request_id))

    def wait_for(self, count: int) -> None:
        assert wait_until(lambda: len(self.sent) >= count, timeout=30), f"only {len(self.sent)} sent"

    def join(self) -> None:
        for thread in self._threads:
            thread.join(60)


def _total_requests(client: redis.Redis, proxy: Any) -> int:
    return sum(int(arm_stats(client, arm).get("requests", 0)) for arm in arm_ids(proxy).values())


@pytest.mark.slow
def test_redis_stopped_mid_traffic_loses_nothing(proxy: Any, redis_client: redis.Redis, redis_server: Any) -> None:
    traffic = _Traffic(proxy, 200)
    try:
        traffic.wait_for(50)
        redis_server.stop()
        traffic.wait_for(150)
        assert wait_until(lambda: proxy.app.recorder.buffered > 0), "the outage should leave measurements buffered"
        assert get_status(f"{proxy.url}/readyz") == 503
    finally:
        redis_server.start()
        traffic.join()
    assert len(traffic.sent) == 200
    assert traffic.failures == [], "clients must not notice Redis being down"
    proxy.settle(timeout_s=60)

    check = redis_server.client()
    assert _total_requests(check, proxy) == 200
    assert dropped_for_any_reason(proxy) == 0
    assert get_status(f"{proxy.url}/readyz") == 200
    missing = [rid for _, rid in traffic.sent if rid is None or not has_request_record(check, rid)]
    assert missing == [], "every request stays joinable for feedback"


@pytest.mark.slow
def test_redis_crash_mid_traffic_counts_everything_after_restart_once(
    proxy: Any, redis_client: redis.Redis, redis_server: Any
) -> None:
    """Redis killed (SIGKILL) mid-traffic, then restarted from its append-only file.

    With ``appendfsync everysec`` a crash may lose up to the last second of writes Redis had
    already acknowledged, so some of the requests recorded before the kill may be gone. What must
    hold: every request started after the kill (while Redis was down, or after it came back) is
    counted and joinable, and nothing is counted twice (a batch replayed after a lost reply is
    deduplicated), so the total lies between that number and 200."""
    traffic = _Traffic(proxy, 200)
    try:
        traffic.wait_for(50)
        redis_server.kill()
        killed_at = time.monotonic()
        traffic.wait_for(150)
        assert wait_until(lambda: proxy.app.recorder.buffered > 0), "the crash should leave measurements buffered"
    finally:
        redis_server.start()
        traffic.join()
    assert len(traffic.sent) == 200
    assert traffic.failures == []
    proxy.settle(timeout_s=60)

    check = redis_server.client()
    after_kill = [rid for started, rid in traffic.sent if started > killed_at]
    assert len(after_kill) >= 50  # most of the 150 sent after it (a slow kill lets a few start before)
    total = _total_requests(check, proxy)
    assert len(after_kill) <= total <= 200, total
    missing = [rid for rid in after_kill if rid is None or not has_request_record(check, rid)]
    assert missing == []
    assert dropped_for_any_reason(proxy) == 0


def dropped_for_any_reason(proxy: Any) -> float:
    text = metrics_text(proxy.url)
    return sum(sample(text, "abproxy_recorder_dropped_total", reason=reason) for reason in DROP_REASONS)


def get_status(url: str) -> int:
    return http("GET", url, timeout=5).status


# -- 7. idempotent replay ----------------------------------------------------------------------------


class _LostReplies:
    """Wraps the proxy's async Redis client: the next ``lose`` writes reach Redis and are applied,
    but their replies are 'lost' (a ConnectionError, as when the connection drops after Redis
    executed the commands). The recorder must replay those batches without double counting."""

    def __init__(self, real: Any, lose: int):
        self._real = real
        self.lose = lose
        self.lost = 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self._real, name)

    def _maybe_lose(self) -> None:
        if self.lose > 0:
            self.lose -= 1
            self.lost += 1
            raise RedisConnectionError("connection lost before the reply (simulated)")

    def pipeline(self, *args: Any, **kwargs: Any) -> Any:
        pipe = self._real.pipeline(*args, **kwargs)
        execute = pipe.execute

        async def execute_and_lose(*a: Any, **k: Any) -> Any:
            result = await execute(*a, **k)
            self._maybe_lose()
            return result

        pipe.execute = execute_and_lose
        return pipe

    async def evalsha(self, *args: Any, **kwargs: Any) -> Any:
        result = await self._real.evalsha(*args, **kwargs)
        self._maybe_lose()
        return result


@pytest.mark.slow
def test_a_batch_replayed_after_a_lost_reply_is_counted_once(
    start_proxy: Any, redis_client: redis.Redis, redis_server: Any
) -> None:
    wrapper = _LostReplies(open_redis(redis_server.url), lose=2)
    proxy = start_proxy(app_options={"redis": wrapper})
    client = proxy.client()
    seen: list[tuple[str, int]] = []
    for i in range(12):
        completion = client.chat.completions.with_raw_response.create(
            model="translation", messages=user_msg(f"replay {i} " * (1 + i % 3)), user=f"replay-{i % 4}"
        )
        seen.append((completion.headers["x-abproxy-variant"], completion.parse().usage.total_tokens))
    proxy.settle(timeout_s=60)
    assert wrapper.lost == 2, "the recorder never wrote through the wrapped client"

    for variant, arm in arm_ids(proxy).items():
        mine = [tokens for v, tokens in seen if v == variant]
        stats = arm_stats(redis_client, arm)
        assert int(stats.get("requests", 0)) == len(mine), variant
        assert num(stats, "total_tokens|s") == sum(mine)
        assert int(stats.get("latency_ms|n", 0)) == len(mine)
        assert hist_count(arm_hist(redis_client, arm), "latency_ms") == len(mine)
        users = {f"replay-{i % 4}" for i, (v, _) in enumerate(seen) if v == variant}
        assert int(stats.get("units", 0)) == len(users)
        assert int(float(stats.get("total_tokens|uk", 0))) == len(users)
    live = get_json(f"{proxy.url}/abproxy/experiments/translation")
    assert sum(v["requests"] for v in live["variants"]) == 12


# -- 8. bounded buffer -----------------------------------------------------------------------------


@pytest.mark.slow
def test_full_buffer_drops_and_counts_the_excess_and_writes_the_rest(
    start_proxy: Any, redis_client: redis.Redis, redis_server: Any
) -> None:
    proxy = start_proxy(app_options={"recorder_options": {"max_buffered": 10}})
    client = proxy.client()
    failures: list[str] = []
    redis_server.stop()
    try:
        for i in range(30):
            _send(client, i, failures)
        assert failures == []
        text = metrics_text(proxy.url)
        assert sample(text, "abproxy_recorder_dropped_total", reason="buffer_full") == 20
        assert proxy.app.recorder.buffered == 10
    finally:
        redis_server.start()
    proxy.settle(timeout_s=60)
    assert _total_requests(redis_server.client(), proxy) == 10
    assert sample(metrics_text(proxy.url), "abproxy_recorder_dropped_total", reason="buffer_full") == 20


# -- 9. graceful shutdown of the real CLI --------------------------------------------------------------


def _redis_children(parent: int) -> set[int]:
    """redis-server processes whose parent is ``parent`` (redis rewrites its own command line,
    so it is recognised by its executable)."""
    found = set()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            ppid = int(stat.rpartition(")")[2].split()[1])
            exe = os.readlink(entry / "exe")
        except (OSError, ValueError, IndexError):
            continue
        if ppid == parent and Path(exe).name == "redis-server":
            found.add(int(entry.name))
    return found


def _alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rpartition(")")[2].split()[0] != "Z"


def _serve(tmp_path: Path, upstream_url: str, redis_url: str | None) -> tuple[subprocess.Popen[bytes], str, Path]:
    port = free_port()
    data_dir = tmp_path / "data"
    config: dict[str, Any] = {
        "data_dir": str(data_dir),
        "mlflow": {"tracking_uri": f"sqlite:///{tmp_path / 'mlflow.db'}", "flush_interval_s": 0},
        "upstreams": {"fake": {"base_url": upstream_url, "timeout_s": 10}},
        "default_upstream": "fake",
        "prices": {"gpt-4o-mini": {"input": PRICE_IN, "output": PRICE_OUT}},
        "experiments": {EXP: copy.deepcopy(BASE_EXPERIMENTS[EXP])},
    }
    if redis_url:
        config["redis_url"] = redis_url
    path = tmp_path / "abproxy.yaml"
    path.write_text(yaml.safe_dump(config))
    env = {k: v for k, v in os.environ.items() if not k.startswith("ABPROXY_")}
    log = (tmp_path / "serve.log").open("wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "abproxy", "serve", "--config", str(path), "--port", str(port),
         "--log-level", "warning"],  # fmt: skip
        cwd=str(tmp_path),
        env={**env, "PYTHONPATH": str(Path(__file__).resolve().parents[1])},
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    log.close()
    base = f"http://127.0.0.1:{port}"
    if not wait_until(lambda: proc.poll() is not None or get_status_quiet(f"{base}/readyz") == 200, timeout=120):
        proc.kill()
        raise AssertionError("abproxy serve did not become ready")
    if proc.poll() is not None:
        raise AssertionError(f"abproxy serve exited: {(tmp_path / 'serve.log').read_text()}")
    return proc, base, data_dir


def get_status_quiet(url: str) -> int:
    try:
        return get_status(url)
    except OSError:
        return 0


def _drain_during_sigterm(proc: subprocess.Popen[bytes], base: str) -> dict[str, str]:
    """Two quick JSON requests, then four slow streams; SIGTERM while the streams are in flight."""
    reply = "one two three four five six seven eight"
    client = openai.OpenAI(base_url=f"{base}/v1", api_key="sk-client", max_retries=0, timeout=20)
    variants: dict[str, str] = {}
    for i in range(2):
        raw = client.chat.completions.with_raw_response.create(
            model="translation", messages=user_msg("warm up"), user=f"cli-json-{i}"
        )
        raw.parse()
        variants[raw.headers["x-abproxy-request-id"]] = raw.headers["x-abproxy-variant"]
    texts: list[str] = []
    errors: list[str] = []
    started = threading.Barrier(5, timeout=60)

    def stream(i: int) -> None:
        try:
            raw = client.chat.completions.with_raw_response.create(
                model="translation",
                messages=user_msg("stream please"),
                user=f"cli-stream-{i}",
                stream=True,
                extra_headers={"x-fake-chunk-delay-ms": "150", "x-fake-reply": reply},
            )
            variants[raw.headers["x-abproxy-request-id"]] = raw.headers["x-abproxy-variant"]
            text, finish = "", None
            for n, chunk in enumerate(raw.parse()):
                if n == 1:
                    started.wait()
                if chunk.choices:
                    text += chunk.choices[0].delta.content or ""
                    finish = chunk.choices[0].finish_reason or finish
            texts.append(f"{text}|{finish}")
        except Exception as error:  # noqa: BLE001
            errors.append(repr(error))

    threads = [threading.Thread(target=stream, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    started.wait()  # every stream has its first chunks: they are in flight
    proc.send_signal(signal.SIGTERM)
    for t in threads:
        t.join(20)
    assert errors == [], errors
    assert sorted(texts) == [f"{reply}|stop"] * 4, "in-flight streams must complete normally"
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise AssertionError("abproxy serve did not exit after SIGTERM") from None
    assert proc.returncode == 0, f"a graceful stop should exit 0, not {proc.returncode}"
    return variants


def _requests_in(client: redis.Redis, variants: dict[str, str], upstream_url: str) -> dict[str, int]:
    plan = Catalog(make_config(upstream_url)).plans[EXP]
    return {
        name: int(client.hget(layout.stats_key(EXP, arm.arm_id), "requests") or 0) for name, arm in plan.arms.items()
    }


@pytest.mark.slow
def test_sigterm_drains_in_flight_streams_and_their_measurements(
    tmp_path: Path, redis_server: Any, redis_client: redis.Redis, upstream: Any, upstream_url: str
) -> None:
    proc, base, _ = _serve(tmp_path, upstream_url, redis_server.url)
    try:
        variants = _drain_during_sigterm(proc, base)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    counted = _requests_in(redis_client, variants, upstream_url)
    expected = collections.Counter(variants.values())
    assert counted == {name: expected.get(name, 0) for name in counted}, (tmp_path / "serve.log").read_text()
    for request_id in variants:
        assert has_request_record(redis_client, request_id), "feedback must be able to find every request"


@pytest.mark.slow
def test_sigterm_with_embedded_redis_drains_and_stops_it(tmp_path: Path, upstream: Any, upstream_url: str) -> None:
    """No redis_url: ``serve`` runs its own redis-server under data_dir. SIGTERM must drain the
    in-flight streams and their measurements into it, persist them in its append-only file, and
    stop that redis-server with the proxy."""
    proc, base, data_dir = _serve(tmp_path, upstream_url, None)
    redis_dir = data_dir / "redis"
    embedded: set[int] = set()
    orphans: set[int] = set()
    try:
        embedded = _redis_children(proc.pid)
        assert len(embedded) == 1, "serve without redis_url should start one redis-server"
        variants = _drain_during_sigterm(proc, base)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        orphans = {pid for pid in embedded if not comes_true(lambda pid=pid: not _alive(pid), timeout=10)}
        for pid in orphans:  # clean up after a serve that left its redis-server behind (SIGTERM: it saves the AOF)
            os.kill(pid, signal.SIGTERM)
        assert wait_until(lambda: not any(_alive(pid) for pid in orphans), timeout=60)

    assert list(redis_dir.glob("appendonly*")), f"no append-only file in {redis_dir}: {os.listdir(redis_dir)}"
    # Restart a redis-server on the same data: the drained counters were persisted.
    reopened = EmbeddedRedis(redis_dir, password="")
    reopened.start()
    try:
        client = redis.Redis.from_url(reopened.url, decode_responses=True)
        counted = _requests_in(client, variants, upstream_url)
        client.close()
    finally:
        reopened.stop()
    expected = collections.Counter(variants.values())
    assert counted == {name: expected.get(name, 0) for name in counted}, (tmp_path / "serve.log").read_text()
    assert not orphans, (
        f"abproxy serve exited (status {proc.returncode}) but left its embedded redis-server running (pids {orphans})"
    )


# -- 10. per-unit sums ------------------------------------------------------------------------------


def test_per_user_sums_match_brute_force(proxy: Any, redis_client: redis.Redis) -> None:
    """unit: user keeps, per metric, the per-user sums the delta method needs. Requests without a
    user id are units of their own."""
    counts = {"alice": 1, "bob": 2, "carol": 3, "dave": 5, "erin": 7, None: 3}
    seen: list[tuple[str, str, int, bool]] = []  # (unit, variant, total tokens, streamed)
    client = proxy.client()

    def send(user: str | None, k: int) -> None:
        text = " ".join(["word"] * (1 + (k * 3 + len(user or "")) % 6))
        if k % 2:
            raw = client.chat.completions.with_raw_response.create(
                model="translation", messages=user_msg(text), stream=True,
                stream_options={"include_usage": True}, **({"user": user} if user else {}),
            )  # fmt: skip
            total = [c.usage.total_tokens for c in raw.parse() if c.usage is not None][0]
        else:
            raw = client.chat.completions.with_raw_response.create(
                model="translation", messages=user_msg(text), extra_headers={"X-ABProxy-User": user} if user else None
            )
            total = raw.parse().usage.total_tokens
        unit = user or f"anonymous-{raw.headers['x-abproxy-request-id']}"
        seen.append((unit, raw.headers["x-abproxy-variant"], total, bool(k % 2)))

    # two phases with a write in between: a user's sums grow across batches
    for phase in (0, 1):
        for user, n in counts.items():
            for k in range(n):
                if (k < n // 2) == (phase == 0):
                    send(user, k)
        proxy.settle()

    assert len(seen) == sum(counts.values())
    assert len({v for u, v, _, _ in seen if not u.startswith("anonymous-")}) == 2, "users in both arms"
    for variant, arm in arm_ids(proxy).items():
        per_unit: dict[str, list[int]] = collections.defaultdict(list)
        streams: collections.Counter[str] = collections.Counter()
        for unit, v, total, streamed in seen:
            if v == variant:
                per_unit[unit].append(total)
                streams[unit] += streamed
        stats = arm_stats(redis_client, arm)
        assert int(stats.get("units", 0)) == len(per_unit), variant
        assert int(stats.get("requests", 0)) == sum(len(t) for t in per_unit.values())
        ys = {u: sum(t) for u, t in per_unit.items()}
        ns = {u: len(t) for u, t in per_unit.items()}
        # kept about each metric's shift (store.py); moved back to 0 here
        tokens = about_zero(stats, "total_tokens")
        assert int(tokens["uk"]) == len(per_unit)
        assert tokens["uyy"] == pytest.approx(sum(y * y for y in ys.values()), rel=1e-12)
        assert tokens["unn"] == sum(n * n for n in ns.values())
        assert tokens["uyn"] == pytest.approx(sum(ys[u] * ns[u] for u in ys), rel=1e-12)
        assert tokens["s"] == sum(ys.values())
        # error_rate: Y_u = 0 for everyone, N_u = u's requests
        errors = about_zero(stats, "error_rate")
        assert errors["uyy"] == pytest.approx(0, abs=1e-9)
        assert errors["unn"] == sum(n * n for n in ns.values())
        # TTFT only from streams: users whose first batch had none gain it in the second
        ttft = about_zero(stats, "ttft_ms")
        assert int(ttft["uk"]) == sum(1 for c in streams.values() if c)
        assert ttft["unn"] == sum(c * c for c in streams.values())


# -- 11. precision: values around 1e8–1e12 -------------------------------------------------------------


def _apply_batches(client: redis.Redis, experiment: str, arm_id: str, batches: list[Any]) -> ArmCounters:
    """Each batch through the recorder's own reduction and Lua script, then read back."""
    for index, batch in enumerate(batches):
        payload = {"records": [], "unit_schemas": layout.unit_schemas_key(experiment), "arms": [batch.payload(experiment, arm_id)]}
        client.eval(
            scripts.RECORD_BATCH_LUA, 1, layout.batch_key(experiment, f"precision-{index}"),
            json.dumps(payload), 60, 60, 60,
        )  # fmt: skip
    return parse_arm(arm_id, client.hgetall(layout.stats_key(experiment, arm_id)), {})


@pytest.mark.parametrize("level", [1e8, 1e10, 1e12])
def test_variances_of_values_around_1e12_keep_their_digits_through_redis(redis_client: redis.Redis, level: float) -> None:
    """Batches reduce about their own mean, and Redis keeps the sums about each metric's shift,
    so the variance, per request and per user, is what numpy finds on the values themselves."""
    from abproxy.config import BUILTIN_METRICS
    from abproxy.recording.aggregate import ArmBatch
    from abproxy.stats.estimates import UnitSums, from_unit_sums

    rng = __import__("numpy").random.default_rng(int(level) % 1000)
    column = BUILTIN_METRICS.index("latency_ms")
    users = [f"user-{i}" for i in range(40)]
    values: list[float] = []
    owners: list[str] = []
    batches = []
    for drift in (0.0, 3.0, -2.0):  # later batches centred elsewhere than the first
        batch = ArmBatch("{}", counts_units=True, unit_metrics=BUILTIN_METRICS)
        for _ in range(300):
            user = users[int(rng.integers(len(users)))]
            value = level + drift + float(rng.normal(0.0, 2.0))
            row = [0.0] + [math.nan] * (len(BUILTIN_METRICS) - 1)
            row[column] = value
            batch.add(tuple(row), user)
            values.append(value)
            owners.append(user)
        batches.append(batch)
    counters = _apply_batches(redis_client, "precision", "a@1", batches)
    latency = counters.metrics["latency_ms"]

    deviations = [v - level for v in values]  # exact: Sterbenz
    mean_dev = sum(deviations) / len(deviations)
    expected = sum((d - mean_dev) ** 2 for d in deviations) / (len(deviations) - 1)
    assert latency.moments.n == 900
    assert latency.moments.variance == pytest.approx(expected, rel=1e-9)
    assert latency.moments.mean - level == pytest.approx(mean_dev, abs=1e-9 * level)

    per_user_y: dict[str, float] = collections.defaultdict(float)
    per_user_n: dict[str, int] = collections.defaultdict(int)
    for d, user in zip(deviations, owners, strict=True):
        per_user_y[user] += d
        per_user_n[user] += 1
    ys = [per_user_y[u] for u in per_user_y]
    ns = [float(per_user_n[u]) for u in per_user_y]
    reference = from_unit_sums(
        UnitSums(len(ys), sum(ys), sum(ns), sum(y * y for y in ys), sum(n * n for n in ns), sum(y * n for y, n in zip(ys, ns)), level)
    )
    got = from_unit_sums(
        UnitSums(latency.units, latency.moments.total, latency.moments.n, latency.unit_yy, latency.unit_nn, latency.unit_yn, latency.moments.shift)
    )
    assert latency.units == len(ys) and counters.units == len(ys)
    assert got.variance_of_mean == pytest.approx(reference.variance_of_mean, rel=1e-8)
    assert got.mean - level == pytest.approx(reference.mean - level, abs=1e-9 * level)


def test_a_feedback_scale_around_1e12_keeps_its_variance(start_proxy: Any, redis_client: redis.Redis) -> None:
    experiments = copy.deepcopy(BASE_EXPERIMENTS)
    experiments["translation"]["feedback"]["revenue"] = {"min": 1e12 - 1e4, "max": 1e12 + 1e4}
    big = start_proxy(experiments=experiments)
    client = big.client()
    scores = [1e12 + 0.5 * i - 7.25 for i in range(40)]
    posted: dict[str, list[float]] = collections.defaultdict(list)
    for i, score in enumerate(scores):
        raw = client.chat.completions.with_raw_response.create(model="translation", messages=user_msg(f"n {i}"), user=f"rev-{i}")
        status, _ = http_json(
            "POST", f"{big.url}/v1/feedback", {"request_id": raw.headers["x-abproxy-request-id"], "name": "revenue", "score": score}
        )
        assert status == 200
        posted[raw.headers["x-abproxy-variant"]].append(score)
    for variant, arm in arm_ids(big).items():
        counters = parse_arm(arm, arm_stats(redis_client, arm), {})
        mine = posted[variant]
        deviations = [s - 1e12 for s in mine]
        mean = sum(deviations) / len(deviations)
        expected = sum((d - mean) ** 2 for d in deviations) / (len(deviations) - 1)
        assert counters.metrics["feedback.revenue"].moments.variance == pytest.approx(expected, rel=1e-9)
