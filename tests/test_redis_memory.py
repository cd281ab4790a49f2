"""What Redis holds for traffic, and for how long (SPEC §7): keys that expire with what needs
them, a request costing no record of its own until feedback arrives."""

from __future__ import annotations

from typing import Any

import redis

from abproxy.recording import store

from helpers import http_json


def ttls(client: redis.Redis, pattern: str) -> list[int]:
    return [int(client.ttl(key)) for key in client.scan_iter(match=pattern, count=1000)]


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
    user_keys = {exp: ttls(redis_client, f"{store.experiment_tag(exp)}:u:*") for exp in ("translation", "sentiment")}
    # unit: user — its statistics need a returning user's totals: kept 90 days after the last request
    assert user_keys["translation"] and all(store.UNIT_TTL_S - 60 < t <= store.UNIT_TTL_S for t in user_keys["translation"])
    # unit: request — only the design effect: kept feedback_ttl_s after the last request
    assert user_keys["sentiment"] and all(2900 < t <= 3000 for t in user_keys["sentiment"])
    redis_client.expire(next(redis_client.scan_iter(match=f"{store.experiment_tag('translation')}:u:*")), 100)
    chat(proxy, "translation", "alice")
    proxy.settle()
    assert all(t > store.UNIT_TTL_S - 60 for t in ttls(redis_client, f"{store.experiment_tag('translation')}:u:*"))
    batches = ttls(redis_client, f"{store.PREFIX}:*:batch:*")
    assert batches and all(0 < t <= 3600 for t in batches)
