"""Counts that survive a sick Redis: a key of an arm with the wrong type, or a counter that is not
a number (a hand edit, a script, a migration), loses nothing silently. Every measurement is
either written or counted in ``abproxy_recorder_dropped_total{reason}`` and logged; the rest of
the batch and every other arm are written; the live results answer 200 and name the key."""

from __future__ import annotations

import logging
from typing import Any

import openai
import pytest
import redis

from abproxy.recording import layout

from helpers import http_json, metrics_text, sample, wait_until

EXP = "translation"


def arm_ids(proxy: Any, experiment: str = EXP) -> dict[str, str]:
    return {name: arm.arm_id for name, arm in proxy.app.catalog.plans[experiment].arms.items()}


def send(client: openai.OpenAI, count: int, prefix: str, experiment: str = EXP) -> dict[str, int]:
    """``count`` requests from as many users; how many each variant served."""
    served: dict[str, int] = {}
    for i in range(count):
        raw = client.chat.completions.with_raw_response.create(
            model=experiment,
            messages=[{"role": "user", "content": f"sentence {i}"}],
            user=f"{prefix}-{i}",
            extra_body={"abproxy_variables": {"product": "shoes"}},
        )
        variant = raw.headers["x-abproxy-variant"]
        served[variant] = served.get(variant, 0) + 1
    return served


def requests_in(client: redis.Redis, arm: str, experiment: str = EXP) -> int:
    return int(client.hget(layout.stats_key(experiment, arm), "requests") or 0)


def dropped(proxy: Any, reason: str) -> float:
    return sample(metrics_text(proxy.url), "abproxy_recorder_dropped_total", reason=reason)


def test_an_arm_key_of_the_wrong_type_drops_that_arm_counted_and_writes_the_rest(
    proxy: Any, redis_client: redis.Redis, caplog: pytest.LogCaptureFixture
) -> None:
    arms = arm_ids(proxy)
    client = proxy.client()
    before = send(client, 40, "before")
    proxy.settle()
    assert set(before) == set(arms), "both arms need traffic before one is broken"
    broken_key = layout.hist_key(EXP, arms["professional"])
    redis_client.delete(broken_key)
    redis_client.set(broken_key, "a string where a hash belongs")

    with caplog.at_level(logging.WARNING, logger="abproxy"):
        after = send(client, 60, "after")
        proxy.settle()

    # the healthy arm is written whole, the broken one keeps what it had and drops the rest, counted
    assert requests_in(redis_client, arms["basic"]) == before["basic"] + after["basic"]
    assert requests_in(redis_client, arms["professional"]) == before["professional"]
    assert dropped(proxy, "corrupt_counters") == after["professional"]
    assert dropped(proxy, "buffer_full") == 0
    assert proxy.app.recorder.buffered == 0, "a batch Redis cannot take must not be retried for ever"
    assert any(broken_key in record.getMessage() for record in caplog.records), "the log names the key"

    status, body = http_json("GET", f"{proxy.url}/abproxy/experiments/{EXP}")
    assert status == 200, body
    assert "corrupt_counters" in body["warnings"]
    assert any(broken_key in entry for entry in body["corrupt"]), body["corrupt"]
    assert body["status"] == "collecting", "no verdict rests on an arm whose counters cannot be read"

    # the key mended (deleted), the arm records again
    redis_client.delete(broken_key)
    more = send(client, 30, "mended")
    proxy.settle()
    assert requests_in(redis_client, arms["professional"]) == before["professional"] + more.get("professional", 0)
    assert dropped(proxy, "corrupt_counters") == after["professional"]


def test_a_counter_that_is_not_a_number_drops_only_that_metric(proxy: Any, redis_client: redis.Redis) -> None:
    arms = arm_ids(proxy)
    client = proxy.client()
    before = send(client, 40, "before")
    proxy.settle()
    stats_key = layout.stats_key(EXP, arms["professional"])
    kept = redis_client.hgetall(stats_key)
    redis_client.hset(stats_key, "latency_ms|q", "not a number")

    after = send(client, 60, "after")
    proxy.settle()

    stats = redis_client.hgetall(stats_key)
    served = before["professional"] + after["professional"]
    # everything but the broken metric goes on being counted
    assert int(stats["requests"]) == served
    assert int(stats["total_tokens|n"]) == served
    assert stats["latency_ms|n"] == kept["latency_ms|n"], "the broken metric takes no partial update"
    assert stats["latency_ms|s"] == kept["latency_ms|s"]
    assert dropped(proxy, "corrupt_counters") == after["professional"]

    status, body = http_json("GET", f"{proxy.url}/abproxy/experiments/{EXP}")
    assert status == 200
    assert body["corrupt"] == ["professional/latency_ms|q"]
    professional = next(v for v in body["variants"] if v["name"] == "professional")
    assert professional["requests"] == served


@pytest.mark.slow
def test_a_broken_request_count_drops_the_arm_and_the_results_still_answer(proxy: Any, redis_client: redis.Redis) -> None:
    arms = arm_ids(proxy)
    client = proxy.client()
    send(client, 20, "before")
    proxy.settle()
    stats_key = layout.stats_key(EXP, arms["basic"])
    redis_client.hset(stats_key, "requests", "12.5")  # HINCRBY refuses a float

    after = send(client, 40, "after")
    proxy.settle()
    assert redis_client.hget(stats_key, "requests") == "12.5"
    assert dropped(proxy, "corrupt_counters") == after["basic"]
    status, body = http_json("GET", f"{proxy.url}/abproxy/experiments/{EXP}")
    assert status == 200 and body["status"] == "collecting"
    assert "basic/requests" in body["corrupt"]


@pytest.mark.slow
def test_a_user_key_of_the_wrong_type_starts_that_user_afresh(proxy: Any, redis_client: redis.Redis) -> None:
    """A unit's running totals that cannot be read are treated as expired: the user counts as a
    new unit of the arm (as after ``UNIT_TTL_S``), and nothing of the batch is lost."""
    arms = arm_ids(proxy)
    client = proxy.client()
    first = send(client, 1, "returning")
    proxy.settle()
    (variant,) = first
    unit_key = layout.unit_key(EXP, arms[variant], layout.hash_unit("returning-0"))
    assert redis_client.exists(unit_key)
    redis_client.delete(unit_key)
    redis_client.hset(unit_key, "oops", "1")
    send(client, 1, "returning")
    proxy.settle()
    stats = redis_client.hgetall(layout.stats_key(EXP, arms[variant]))
    assert int(stats["requests"]) == 2
    assert int(stats["units"]) == 2, "the user whose totals were unreadable counts afresh"
    assert redis_client.type(unit_key) == "string", "its key is written anew"
    assert dropped(proxy, "corrupt_counters") == 0


@pytest.mark.slow
def test_a_wrong_type_key_leaves_other_experiments_alone(proxy: Any, redis_client: redis.Redis) -> None:
    arms = arm_ids(proxy)
    client = proxy.client()
    send(client, 10, "warm")
    proxy.settle()
    for arm in arms.values():
        redis_client.delete(layout.stats_key(EXP, arm))
        redis_client.rpush(layout.stats_key(EXP, arm), "x")
    sentiment = send(client, 20, "other", experiment="sentiment")
    broken = send(client, 20, "broken")
    proxy.settle()
    sentiment_arms = arm_ids(proxy, "sentiment")
    assert sum(requests_in(redis_client, arm, "sentiment") for arm in sentiment_arms.values()) == sum(sentiment.values())
    assert dropped(proxy, "corrupt_counters") == sum(broken.values())
    status, body = http_json("GET", f"{proxy.url}/abproxy/experiments")
    assert status == 200
    by_name = {experiment["experiment"]: experiment for experiment in body["experiments"]}
    assert "corrupt_counters" in by_name[EXP]["warnings"]
    assert "corrupt_counters" not in by_name["sentiment"]["warnings"]


def test_feedback_on_an_arm_whose_counters_are_broken_is_refused_and_writes_nothing(
    proxy: Any, redis_client: redis.Redis
) -> None:
    arms = arm_ids(proxy)
    client = proxy.client()
    raw = client.chat.completions.with_raw_response.create(
        model=EXP, messages=[{"role": "user", "content": "hi"}], user="scorer"
    )
    request_id, variant = raw.headers["x-abproxy-request-id"], raw.headers["x-abproxy-variant"]
    proxy.settle()
    stats_key = layout.stats_key(EXP, arms[variant])
    redis_client.hset(stats_key, "feedback.satisfaction|q", "garbage")
    status, body = http_json("POST", f"{proxy.url}/v1/feedback", {"request_id": request_id, "score": 4})
    assert status == 503, body
    assert body["error"]["code"] == "corrupt_counters"
    assert "feedback.satisfaction|q" in body["error"]["message"]
    assert redis_client.hget(stats_key, "feedback.satisfaction|n") is None
    assert not redis_client.keys(layout.feedback_key(EXP, "*")), "the score is not kept half-written"

    redis_client.hdel(stats_key, "feedback.satisfaction|q")
    status, body = http_json("POST", f"{proxy.url}/v1/feedback", {"request_id": request_id, "score": 4})
    assert status == 200 and body["status"] == "recorded"
    assert wait_until(lambda: redis_client.hget(stats_key, "feedback.satisfaction|n") == "1")


@pytest.mark.slow
def test_a_batch_redis_stops_partway_is_counted_not_replayed_twice_or_skipped(
    proxy: Any, redis_client: redis.Redis, redis_server: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """Something the script's checks do not foresee (here a user's totals that unpack, as many
    as their names, but are text) stops it after it began writing. Redis keeps what it wrote:
    the replay must neither write it again nor pass for a success."""
    arms = arm_ids(proxy)
    client = proxy.client()
    (variant,) = send(client, 1, "odd")
    proxy.settle()
    unit_key = layout.unit_key(EXP, arms[variant], layout.hash_unit("odd-0"))
    raw = redis.Redis.from_url(redis_server.url)
    packed = raw.get(unit_key)
    assert packed is not None and packed[0] == 0xAC and packed[13] & 0xF0 == 0x90, packed
    count = packed[13] & 0x0F
    # MessagePack (schema id, ["x", ...], [1, ...]): the same schema, values that are text
    raw.set(unit_key, packed[:13] + bytes([0x90 | count]) + b"\xa1x" * count + bytes([0x90 | count]) + b"\x01" * count)

    with caplog.at_level(logging.ERROR, logger="abproxy"):
        send(client, 1, "odd")
        assert wait_until(lambda: dropped(proxy, "partly_written") >= 1, timeout=60)
    proxy.settle()
    assert dropped(proxy, "partly_written") == 1
    assert any("partway" in record.getMessage() for record in caplog.records)
    # recording goes on for everyone else
    served = send(client, 10, "after")
    proxy.settle()
    total = sum(requests_in(redis_client, arm) for arm in arms.values())
    assert total >= 1 + sum(served.values())


@pytest.mark.slow
def test_a_redis_that_refuses_the_script_drops_each_batch_after_three_tries_counted(
    start_proxy: Any, redis_client: redis.Redis, redis_server: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """An ACL that forbids scripts (as some managed Redis plans do) refuses every batch the same
    way: retrying for ever would only hold the experiment's queue up until the buffer overflows."""
    from abproxy.recording.connection import open_redis

    redis_client.execute_command("ACL", "SETUSER", "scriptless", "on", ">secret", "~*", "&*", "+@all", "-@scripting")
    try:
        limited = redis_server.url.replace("redis://", "redis://scriptless:secret@", 1)
        proxy = start_proxy(app_options={"redis": open_redis(limited)})
        client = proxy.client()
        with caplog.at_level(logging.ERROR, logger="abproxy"):
            served = send(client, 12, "refused")
            proxy.settle(timeout_s=60)
        assert dropped(proxy, "redis_refused") == sum(served.values())
        assert any("refused a batch" in record.getMessage() for record in caplog.records)
        assert sum(requests_in(redis_client, arm) for arm in arm_ids(proxy).values()) == 0
    finally:
        redis_client.execute_command("ACL", "DELUSER", "scriptless")


def test_feedback_by_response_id_while_redis_is_full_answers_503_not_404(proxy: Any, redis_client: redis.Redis) -> None:
    """A full Redis (``maxmemory``, ``noeviction``) refuses the recorder's writes: the response's
    alias waits in memory. A 404 would tell the app the response is unknown, and it would drop the
    score; a 503 tells it to post again, which succeeds once Redis takes writes again."""
    client = proxy.client()
    send(client, 2, "warm")
    proxy.settle()
    redis_client.config_set("maxmemory", 1)  # far below what it holds: every write is refused (OOM)
    try:
        completion = client.chat.completions.create(model=EXP, messages=[{"role": "user", "content": "hi"}], user="full")
        assert wait_until(lambda: proxy.app.recorder.buffered == 1)
        status, body = http_json("POST", f"{proxy.url}/v1/feedback", {"request_id": completion.id, "score": 5})
        assert status == 503, body
        assert proxy.app.recorder.buffered == 1
    finally:
        redis_client.config_set("maxmemory", 0)
    proxy.settle()
    status, body = http_json("POST", f"{proxy.url}/v1/feedback", {"request_id": completion.id, "score": 5})
    assert status == 200 and body["status"] == "recorded", body
    assert dropped(proxy, "buffer_full") + dropped(proxy, "redis_refused") == 0, "a full Redis is waited for, not given up on"


@pytest.mark.slow
def test_unit_schemas_of_the_wrong_type_stop_the_per_user_arms_and_say_so(proxy: Any, redis_client: redis.Redis) -> None:
    """Every arm of a ``unit: user`` experiment keeps per-user sums, named by the experiment's
    schemas hash: with that key broken none of them can be written whole."""
    client = proxy.client()
    send(client, 10, "before")
    proxy.settle()
    schemas = layout.unit_schemas_key(EXP)
    redis_client.delete(schemas)
    redis_client.sadd(schemas, "not a hash")
    after = send(client, 20, "after")
    proxy.settle()
    assert dropped(proxy, "corrupt_counters") == sum(after.values())
    status, body = http_json("GET", f"{proxy.url}/abproxy/experiments/{EXP}")
    assert status == 200 and body["status"] == "collecting"
    assert any(schemas in entry for entry in body["corrupt"]), body["corrupt"]


@pytest.mark.slow
def test_a_histogram_bucket_that_is_no_integer_drops_only_its_metric(proxy: Any, redis_client: redis.Redis) -> None:
    """Buckets are added one by one (reading them all first would cost the script a tenth of its
    time): the first that refuses marks its metric broken for the batch, counted and left alone."""
    arms = arm_ids(proxy)
    client = proxy.client()
    before = send(client, 30, "before")
    proxy.settle()
    hist_key = layout.hist_key(EXP, arms["professional"])
    # every request so far succeeded: error_rate's only bucket is 0's, and every new request adds to it
    (bucket,) = [field for field in redis_client.hgetall(hist_key) if field.startswith("error_rate|")]
    redis_client.hset(hist_key, bucket, "1.5")
    stats_key = layout.stats_key(EXP, arms["professional"])
    kept = redis_client.hget(stats_key, "error_rate|n")

    after = send(client, 40, "after")
    proxy.settle()
    assert redis_client.hget(stats_key, "error_rate|n") == kept
    assert int(redis_client.hget(stats_key, "requests")) == before["professional"] + after["professional"]
    assert dropped(proxy, "corrupt_counters") == after["professional"]
    status, body = http_json("GET", f"{proxy.url}/abproxy/experiments/{EXP}")
    assert status == 200 and body["corrupt"] == [f"professional/error_rate|h:{bucket.partition('|')[2]}"], body["corrupt"]


def test_an_alias_bucket_of_the_wrong_type_loses_the_response_id_not_the_measurement(
    proxy: Any, redis_client: redis.Redis, caplog: pytest.LogCaptureFixture
) -> None:
    """The upstream's response ids go to hourly hash buckets (the first 64 of an hour to one):
    a bucket of another type refuses them, which is logged; the request is counted all the same,
    and its X-ABProxy-Request-Id still takes feedback."""
    import time

    client = proxy.client()
    hour = int(time.time() // 3600)
    for later in (hour, hour + 1):  # the hour may turn during the test
        redis_client.set(layout.alias_key(EXP, later, 0, 0), "a hand edit")
    with caplog.at_level(logging.WARNING, logger="abproxy"):
        raw = client.chat.completions.with_raw_response.create(
            model=EXP, messages=[{"role": "user", "content": "hi"}], user="aliased"
        )
        proxy.settle()
    completion = raw.parse()
    assert sum(requests_in(redis_client, arm) for arm in arm_ids(proxy).values()) == 1
    assert dropped(proxy, "corrupt_counters") == 0
    assert any("1 response-id aliases not written" in record.getMessage() for record in caplog.records)
    status, _ = http_json("POST", f"{proxy.url}/v1/feedback", {"request_id": completion.id, "score": 4})
    assert status == 404
    status, body = http_json("POST", f"{proxy.url}/v1/feedback", {"request_id": raw.headers["x-abproxy-request-id"], "score": 4})
    assert status == 200 and body["status"] == "recorded"
