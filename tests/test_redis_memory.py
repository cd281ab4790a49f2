"""What Redis holds for traffic, and for how long (SPEC §7): keys that expire with what needs
them, a request costing no record of its own until feedback arrives."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest
import redis

from abproxy.recording import ids, layout


from helpers import http_json


def ttls(client: redis.Redis, pattern: str) -> list[int]:
    return [int(client.ttl(key)) for key in client.scan_iter(match=pattern, count=1000)]


def arm_stats(client: redis.Redis, experiment: str) -> list[dict[str, str]]:
    """The counters hash of each of the experiment's arms that Redis holds."""
    return [client.hgetall(key) for key in client.scan_iter(match=f"{layout.experiment_tag(experiment)}:a:*")]


def chat(proxy: Any, model: str, user: str) -> Any:
    return proxy.client().chat.completions.with_raw_response.create(
        model=model, messages=[{"role": "user", "content": "hi"}], user=user,
        extra_body={"abproxy_variables": {"product": "tea"}},
    )


def test_per_user_state_expires_after_the_users_last_request(start_proxy: Any, redis_client: redis.Redis) -> None:
    proxy = start_proxy(feedback_ttl_s=3000)
    for model in ("translation", "sentiment"):
        request_id = chat(proxy, model, "alice").headers["x-abproxy-request-id"]
        proxy.settle()
        # sentiment (unit: request) keeps per-user sums of its primary metric, from feedback
        status, _ = http_json("POST", f"{proxy.url}/v1/feedback", {"request_id": request_id, "score": 1})
        assert status == 200
    proxy.settle()
    user_keys = {exp: ttls(redis_client, f"{layout.experiment_tag(exp)}:u:*") for exp in ("translation", "sentiment")}
    # unit: user — its statistics need a returning user's totals: kept 90 days after the last request
    assert user_keys["translation"] and all(layout.UNIT_TTL_S - 60 < t <= layout.UNIT_TTL_S for t in user_keys["translation"])
    # unit: request — only the design effect: kept feedback_ttl_s after the last request
    assert user_keys["sentiment"] and all(2900 < t <= 3000 for t in user_keys["sentiment"])
    redis_client.expire(next(redis_client.scan_iter(match=f"{layout.experiment_tag('translation')}:u:*")), 100)
    chat(proxy, "translation", "alice")
    proxy.settle()
    assert all(t > layout.UNIT_TTL_S - 60 for t in ttls(redis_client, f"{layout.experiment_tag('translation')}:u:*"))
    batches = ttls(redis_client, f"{layout.PREFIX}:*:batch:*")
    assert batches and all(0 < t <= 3600 for t in batches)


_REWRITE_AS_BEFORE = """
local id, ys, ns = cmsgpack.unpack(redis.call('GET', KEYS[1]))
local names = {}
for name in string.gmatch(redis.call('HGET', KEYS[2], id), '[^%z]+') do names[#names + 1] = name end
redis.call('SET', KEYS[1], cmsgpack.pack(names, ys, ns), 'KEEPTTL')
return #names
"""


def test_a_users_totals_name_their_metrics_once_per_experiment_and_older_keys_still_count(
    start_proxy: Any, redis_client: redis.Redis
) -> None:
    """A user's key holds a 12-character id of its metric list, not the names (~100 bytes of the
    key before). Keys written by earlier versions, names inline, go on adding up."""
    proxy = start_proxy()
    chat(proxy, "translation", "alice")
    proxy.settle()
    (user_key,) = redis_client.scan_iter(match=f"{layout.experiment_tag('translation')}:u:*")
    schemas = layout.unit_schemas_key("translation")
    assert redis_client.eval("return type(cmsgpack.unpack(redis.call('GET', KEYS[1])))", 1, user_key) == "string"
    size = int(redis_client.memory_usage(user_key))
    assert redis_client.eval(_REWRITE_AS_BEFORE, 2, user_key, schemas) >= 5  # the built-in metrics, as before
    assert size < int(redis_client.memory_usage(user_key)) - 80
    chat(proxy, "translation", "alice")
    proxy.settle()
    arms = arm_stats(redis_client, "translation")
    (alice,) = [arm for arm in arms if arm.get("requests")]
    # one user with two requests: one unit, Σ n_u² = 4 (read afresh, the old key would make 2 and 2)
    assert alice["units"] == "1" and float(alice["latency_ms|unn"]) == 4
    assert redis_client.eval("return type(cmsgpack.unpack(redis.call('GET', KEYS[1])))", 1, user_key) == "string"


def aggregates(client: redis.Redis) -> dict[str, dict[str, str]]:
    return {key: client.hgetall(key) for key in client.scan_iter(match=f"{layout.PREFIX}:*:[ah]:*")}


def feedback(proxy: Any, request_id: str, score: float = 4) -> tuple[int, Any]:
    return http_json("POST", f"{proxy.url}/v1/feedback", {"request_id": request_id, "name": "satisfaction", "score": score})


def test_a_request_keeps_no_record_and_feedback_by_request_id_or_response_id_still_lands(
    proxy: Any, redis_client: redis.Redis
) -> None:
    raw = chat(proxy, "translation", "bob")
    request_id, response_id = raw.headers["x-abproxy-request-id"], raw.parse().id
    assert ids.looks_signed(request_id) and len(request_id) <= ids.MAX_ID_LENGTH
    proxy.settle()
    assert not list(redis_client.scan_iter(match=f"{layout.PREFIX}:*:req:*"))
    assert not list(redis_client.scan_iter(match=f"{layout.PREFIX}:*:resp:*"))
    status, body = feedback(proxy, request_id, 2)
    assert (status, body["status"], body["variant"]) == (200, "recorded", raw.headers["x-abproxy-variant"]), body
    # the upstream's id names the same request: the score is replaced, not counted twice
    status, body = feedback(proxy, response_id, 5)
    assert (status, body["status"], body["request_id"]) == (200, "updated", request_id), body
    arm = proxy.app.catalog.plans["translation"].arms[raw.headers["x-abproxy-variant"]].arm_id
    stats = redis_client.hgetall(layout.stats_key("translation", arm))
    assert (stats["feedback.satisfaction|n"], float(stats["feedback.satisfaction|s"])) == ("1", 5.0)


def test_a_forged_altered_or_expired_request_id_is_refused_and_changes_nothing(
    start_proxy: Any, redis_client: redis.Redis
) -> None:
    proxy = start_proxy(feedback_ttl_s=600)
    raw = chat(proxy, "translation", "carol")
    request_id = raw.headers["x-abproxy-request-id"]
    proxy.settle()
    before = aggregates(redis_client)
    signer = proxy.app.signers.signer
    genuine = signer.verify(request_id)
    assert genuine is not None and genuine.arm.startswith(raw.headers["x-abproxy-variant"] + "@")
    other_arm = next(a.arm_id for a in proxy.app.catalog.plans["translation"].arms.values() if a.arm_id != genuine.arm)
    altered = request_id[:-20] + ("A" if request_id[-20] != "A" else "B") + request_id[-19:]
    moved = signer.encode(ids.SignedId(genuine.experiment, other_arm, genuine.unit, False, False, genuine.issued_at, genuine.nonce))
    moved = moved[:-3] + request_id[-3:]  # another arm under the genuine MAC's tail
    forged = ids.Signer(b"not the secret" * 3).encode(genuine)
    for bad in (altered, moved, forged, "r1.", "r1.!!!"):
        status, body = feedback(proxy, bad)
        assert status == 400 and body["error"]["code"] == "invalid_request_id", (bad, body)
    expired = signer.encode(ids.SignedId(genuine.experiment, genuine.arm, genuine.unit, False, False, int(time.time()) - 700, genuine.nonce))
    status, body = feedback(proxy, expired)
    assert status == 404 and body["error"]["code"] == "request_not_found", body
    assert aggregates(redis_client) == before
    assert not list(redis_client.scan_iter(match=f"{layout.PREFIX}:*:fb:*"))
    assert feedback(proxy, request_id)[0] == 200


def test_request_ids_keep_working_after_redis_lost_their_secret_and_a_replica_made_another(
    start_proxy: Any, redis_client: redis.Redis
) -> None:
    """Redis restarted empty (no persistence): the secret is gone, and a replica starting then
    signs with a new one. Each replica publishes the secrets it knows and learns the others' when
    an id does not verify (and every ``ids_refresh_s``): ids of either secret take feedback on
    either replica, and both go on signing with the one Redis holds."""
    first = start_proxy(app_options={"ids_refresh_s": 3600})  # learns only when an id needs it
    before = chat(first, "translation", "erin").headers["x-abproxy-request-id"]
    redis_client.delete(ids.SECRET_KEY, ids.SECRETS_KEY)
    second = start_proxy(app_options={"ids_refresh_s": 3600})
    assert second.app.signers.signer.secret != first.app.signers.signer.secret
    after = chat(second, "translation", "frank").headers["x-abproxy-request-id"]
    first.settle(), second.settle()
    assert feedback(first, after)[0] == 200  # first learns the new secret, and publishes its own
    assert feedback(second, before)[0] == 200
    assert first.app.signers.signer.secret == second.app.signers.signer.secret == ids.unb64(redis_client.get(ids.SECRET_KEY))
    newest = chat(first, "translation", "gina").headers["x-abproxy-request-id"]
    first.settle()
    assert feedback(second, newest)[0] == 200
    arms = arm_stats(redis_client, "translation")
    assert sum(int(arm.get("feedback.satisfaction|n", 0)) for arm in arms) == 3


def test_ids_issued_before_the_secret_could_be_read_keep_their_record_and_take_feedback(
    proxy: Any, redis_client: redis.Redis
) -> None:
    """As ids issued before request ids were signed: random, with a record and an alias in Redis."""
    signer, proxy.app.signers.signer = proxy.app.signers.signer, None
    raw = chat(proxy, "translation", "dave")
    proxy.app.signers.signer = signer
    request_id, response_id = raw.headers["x-abproxy-request-id"], raw.parse().id
    assert not ids.looks_signed(request_id)
    proxy.settle()
    assert list(redis_client.scan_iter(match=f"{layout.PREFIX}:*:req:{request_id}"))
    assert feedback(proxy, request_id, 3)[1]["status"] == "recorded"
    status, body = feedback(proxy, response_id, 4)
    assert (status, body["status"], body["request_id"]) == (200, "updated", request_id), body


@pytest.mark.slow
def test_response_ids_of_thousands_of_requests_in_one_hour_all_find_their_request(
    proxy: Any, redis_client: redis.Redis
) -> None:
    """Past 64 aliases an hour spreads them over more buckets (4, 16, ...): each still found."""
    async def many() -> list[tuple[str, str]]:
        client = proxy.async_client()
        sem = asyncio.Semaphore(16)

        async def one(i: int) -> tuple[str, str]:
            async with sem:
                raw = await client.chat.completions.with_raw_response.create(
                    model="translation", messages=[{"role": "user", "content": "hi"}], user=f"u{i % 50}"
                )
                return raw.headers["x-abproxy-request-id"], raw.parse().id

        return await asyncio.gather(*(one(i) for i in range(1200)))

    to_next_hour = 3600 - time.time() % 3600
    if to_next_hour < 90:  # all 1200 in one hour (the buckets are per hour): wait for the next
        time.sleep(to_next_hour + 1)
    pairs = asyncio.run(many())
    proxy.settle()
    levels = {key.split(":")[-2] for key in redis_client.scan_iter(match=f"{layout.alias_prefix('translation')}*")}
    assert levels == {"0", "1", "2", "3"}
    for request_id, response_id in pairs[::37] + pairs[-3:]:
        status, body = feedback(proxy, response_id)
        assert (status, body["request_id"]) == (200, request_id), body


@pytest.mark.slow
def test_a_request_costs_well_under_100_bytes_of_redis_whatever_feedback_ttl_s(
    start_proxy: Any, redis_client: redis.Redis
) -> None:
    """SPEC §7 on a unit: request experiment (bench/redis_memory.py measures unit: user too):
    used_memory growth over 4,000 requests from 400 users, after a warm-up, with a 90-day TTL."""
    proxy = start_proxy(feedback_ttl_s=90 * 24 * 3600)

    async def send(users: list[str]) -> None:
        client = proxy.async_client()
        sem = asyncio.Semaphore(16)

        async def one(user: str) -> None:
            async with sem:
                await client.chat.completions.create(
                    model="sentiment", messages=[{"role": "user", "content": "hi"}], user=user,
                    extra_body={"abproxy_variables": {"product": "tea"}},
                )

        await asyncio.gather(*(one(user) for user in users))

    asyncio.run(send([f"warm-{i % 50}" for i in range(500)]))
    proxy.settle()
    before = int(redis_client.info("memory")["used_memory"])
    asyncio.run(send([f"user-{i % 400}" for i in range(4000)]))
    proxy.settle()
    per_request = (int(redis_client.info("memory")["used_memory"]) - before) / 4000
    assert per_request < 100 * 0.85, per_request  # measured ~60 B
