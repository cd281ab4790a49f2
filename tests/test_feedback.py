"""``POST /v1/feedback`` (SPEC §2): joining a score to an earlier response by the proxy's request
id or the response's own id, replacing earlier scores exactly, validation, and what it does to
the arm counters in Redis and to Prometheus."""

from __future__ import annotations

import asyncio
import collections
import math
import random
import time
from typing import Any

import openai
import pytest
import redis
from helpers import assert_error_shape
from helpers import about_zero, http_json, metrics_text, sample

from abproxy.app import REQUEST_FACING_REDIS_TIMEOUT_S, open_redis
from abproxy.recording import layout
from abproxy.stats.histogram import bucket_of

EXP = "translation"


# -- helpers -----------------------------------------------------------------------------------


def post_feedback(proxy: Any, body: Any, headers: dict[str, str] | None = None) -> tuple[int, Any]:
    """POST /v1/feedback; ``body`` is JSON-encoded unless it is already bytes."""
    return http_json("POST", f"{proxy.url}/v1/feedback", body, headers, timeout=10)


def arm_ids(proxy: Any, experiment: str = EXP) -> dict[str, str]:
    return {name: arm.arm_id for name, arm in proxy.app.catalog.plans[experiment].arms.items()}


def arm_stats(client: redis.Redis, arm: str, experiment: str = EXP) -> dict[str, str]:
    return client.hgetall(layout.stats_key(experiment, arm))


def num(stats: dict[str, str], field: str) -> float:
    return float(stats.get(field, 0))


def feedback_hist(client: redis.Redis, arm: str, name: str, experiment: str = EXP) -> dict[str, int]:
    """Non-empty histogram buckets of ``feedback.<name>`` for an arm."""
    prefix = f"feedback.{name}|"
    return {
        key[len(prefix) :]: int(value)
        for key, value in client.hgetall(layout.hist_key(experiment, arm)).items()
        if key.startswith(prefix) and int(value) != 0
    }


def aggregates(client: redis.Redis, proxy: Any, experiment: str = EXP) -> dict[str, Any]:
    """Everything the statistics read for an experiment's arms."""
    return {
        arm: (client.hgetall(layout.stats_key(experiment, arm)), client.hgetall(layout.hist_key(experiment, arm)))
        for arm in arm_ids(proxy, experiment).values()
    }






def ask(
    client: openai.OpenAI, user: str | None, text: str = "hello world", model: str = "translation", **kwargs: Any
) -> Any:
    """One chat completion (``user=None``: no unit id); returns (raw response, parsed completion)."""
    if user is not None:
        kwargs["user"] = user
    raw = client.chat.completions.with_raw_response.create(
        model=model, messages=[{"role": "user", "content": text}], **kwargs
    )
    return raw, raw.parse()




# -- 1. joining by either id, right after the response -------------------------------------------


def test_feedback_by_request_id_right_after_the_response(proxy: Any, redis_client: redis.Redis) -> None:
    raw, _ = ask(proxy.client(), "fb-user-1")
    request_id, variant = raw.headers["x-abproxy-request-id"], raw.headers["x-abproxy-variant"]
    # no settle: the record may still be in the proxy's local batch
    status, body = post_feedback(proxy, {"request_id": request_id, "name": "satisfaction", "score": 4})
    assert status == 200, body
    assert body["status"] == "recorded"
    assert body["experiment"] == EXP and body["variant"] == variant

    stats = arm_stats(redis_client, arm_ids(proxy)[variant])
    assert int(stats["feedback.satisfaction|n"]) == 1
    assert num(stats, "feedback.satisfaction|s") == 4
    assert about_zero(stats, "feedback.satisfaction")["q"] == 16
    live = http_json("GET", f"{proxy.url}/abproxy/experiments/{EXP}", timeout=5)[1]
    mine = next(v for v in live["variants"] if v["name"] == variant)
    assert mine["metrics"]["feedback.satisfaction"]["n"] == 1
    assert mine["metrics"]["feedback.satisfaction"]["mean"] == 4


def test_feedback_by_the_responses_own_id_json_and_stream(proxy: Any, redis_client: redis.Redis) -> None:
    client = proxy.client()
    raw, completion = ask(client, "fb-user-2")
    assert completion.id.startswith("chatcmpl-")
    status, body = post_feedback(proxy, {"request_id": completion.id, "name": "satisfaction", "score": 3})
    assert status == 200, body
    assert body["status"] == "recorded"
    assert (body["experiment"], body["variant"]) == (EXP, raw.headers["x-abproxy-variant"])

    raw = client.chat.completions.with_raw_response.create(
        model="translation", messages=[{"role": "user", "content": "stream me"}], user="fb-user-3", stream=True
    )
    ids = {chunk.id for chunk in raw.parse()}
    assert len(ids) == 1
    chunk_id = ids.pop()
    assert chunk_id.startswith("chatcmpl-")
    status, body = post_feedback(proxy, {"request_id": chunk_id, "name": "satisfaction", "score": 5})
    assert status == 200, body
    assert body["status"] == "recorded"
    assert (body["experiment"], body["variant"]) == (EXP, raw.headers["x-abproxy-variant"])

    totals: collections.Counter[str] = collections.Counter()
    for arm in arm_ids(proxy).values():
        stats = arm_stats(redis_client, arm)
        totals["n"] += int(stats.get("feedback.satisfaction|n", 0))
        totals["s"] += num(stats, "feedback.satisfaction|s")
    assert totals == {"n": 2, "s": 8}


@pytest.mark.slow
def test_many_feedbacks_posted_immediately_after_their_responses_all_succeed(
    proxy: Any, redis_client: redis.Redis
) -> None:
    """An app posts feedback the moment it has the response; none of those may be a 404."""

    async def one(client: openai.AsyncOpenAI, feedback: Any, i: int) -> tuple[int, Any]:
        raw = await client.chat.completions.with_raw_response.create(
            model="translation", messages=[{"role": "user", "content": f"quick {i}"}], user=f"quick-{i}"
        )
        completion = raw.parse()
        request_id = completion.id if i % 2 else raw.headers["x-abproxy-request-id"]
        response = await feedback.post(
            f"{proxy.url}/v1/feedback", json={"request_id": request_id, "name": "satisfaction", "score": 1 + i % 5}
        )
        return response.status_code, response.json()

    async def main() -> list[tuple[int, Any]]:
        async with proxy.async_client() as client, proxy.async_http() as feedback:
            return await asyncio.gather(*(one(client, feedback, i) for i in range(200)))

    results = asyncio.run(main())
    failed = [(i, r) for i, r in enumerate(results) if r[0] != 200]
    assert failed == [], f"{len(failed)} of 200 immediate feedbacks failed, e.g. {failed[:3]}"
    n = sum(int(arm_stats(redis_client, arm).get("feedback.satisfaction|n", 0)) for arm in arm_ids(proxy).values())
    assert n == 200


class _RecorderWritesDuringLookup:
    """Wraps the feedback service's Redis client. The first read it sees (the lookup of the
    request record) runs against Redis, and before its reply is handed back the recorder writes
    its pending batch -- exactly what the recorder's background loop does when its timer fires
    while a feedback lookup is in flight."""

    def __init__(self, real: Any):
        self._real = real
        self.recorder: Any = None
        self.interleaved = 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self._real, name)

    async def _after_first_read(self, result: Any) -> Any:
        if not self.interleaved:
            self.interleaved += 1
            await self.recorder.flush()
        return result

    async def get(self, *args: Any, **kwargs: Any) -> Any:
        return await self._after_first_read(await self._real.get(*args, **kwargs))

    def pipeline(self, *args: Any, **kwargs: Any) -> Any:
        pipe = self._real.pipeline(*args, **kwargs)
        execute = pipe.execute

        async def execute_then_interleave(*a: Any, **k: Any) -> Any:
            return await self._after_first_read(await execute(*a, **k))

        pipe.execute = execute_then_interleave
        return pipe


def test_feedback_found_when_the_recorder_writes_during_the_lookup(
    start_proxy: Any, redis_client: redis.Redis, redis_server: Any
) -> None:
    """Feedback posted right after its response, while the recorder's own loop happens to write the
    batch holding the response id's alias between the feedback's lookup and its check of the recorder's
    buffer: the lookup missed, the buffer is now empty, and the record *is* in Redis. The app must
    get 200, not a 404 for a response it has just received."""
    wrapper = _RecorderWritesDuringLookup(open_redis(redis_server.url, REQUEST_FACING_REDIS_TIMEOUT_S))
    # The recorder's own loop is held back (a 30 s interval): this test decides when it writes.
    proxy = start_proxy(app_options={"request_redis": wrapper, "recorder_options": {"interval_s": 30.0}})
    wrapper.recorder = proxy.app.recorder
    raw, completion = ask(proxy.client(), "interleaved-user")
    assert proxy.app.recorder.buffered == 1, "the record must still be in the proxy's batch"
    # by the upstream's response id: a signed request id needs no lookup, its alias does
    status, body = post_feedback(proxy, {"request_id": completion.id, "name": "satisfaction", "score": 4})
    assert wrapper.interleaved == 1, "the feedback service did not read through the wrapped client"
    assert status == 200, body
    stats = arm_stats(redis_client, arm_ids(proxy)[raw.headers["x-abproxy-variant"]])
    assert int(stats["feedback.satisfaction|n"]) == 1


# -- 2. replace semantics --------------------------------------------------------------------------


def test_posting_again_replaces_the_score(proxy: Any, redis_client: redis.Redis) -> None:
    raw, completion = ask(proxy.client(), "replace-user")
    request_id, arm = raw.headers["x-abproxy-request-id"], arm_ids(proxy)[raw.headers["x-abproxy-variant"]]

    status, first = post_feedback(proxy, {"request_id": request_id, "name": "satisfaction", "score": 2})
    assert (status, first["status"]) == (200, "recorded")
    # the same response named by its own id is the same (request_id, name)
    status, second = post_feedback(proxy, {"request_id": completion.id, "name": "satisfaction", "score": 5})
    assert (status, second["status"]) == (200, "updated")

    stats = arm_stats(redis_client, arm)
    assert int(stats["feedback.satisfaction|n"]) == 1
    assert num(stats, "feedback.satisfaction|s") == 5
    assert about_zero(stats, "feedback.satisfaction")["q"] == 25
    assert feedback_hist(redis_client, arm, "satisfaction") == {bucket_of(5.0): 1}

    status, thumbs = post_feedback(proxy, {"request_id": request_id, "name": "thumbs", "score": 1})
    assert (status, thumbs["status"]) == (200, "recorded"), "another name is another score"
    stats = arm_stats(redis_client, arm)
    assert int(stats["feedback.thumbs|n"]) == 1 and num(stats, "feedback.thumbs|s") == 1
    assert int(stats["feedback.satisfaction|n"]) == 1 and num(stats, "feedback.satisfaction|s") == 5

    # per-unit sums (unit: user) also moved, not added: one unit, Y = 5, N = 1
    sums = about_zero(stats, "feedback.satisfaction")
    assert int(sums["uk"]) == 1
    assert (sums["uyy"], sums["unn"], sums["uyn"]) == (25, 1, 5)


def test_random_posts_and_replacements_match_brute_force(proxy: Any, redis_client: redis.Redis) -> None:
    rng = random.Random(20240607)
    client = proxy.client()
    requests: list[dict[str, str]] = []
    for i in range(20):
        # users brute-0..5 (both arms), and every fifth request without a user: a unit of its own
        user = f"brute-{i % 6}" if i % 5 else None
        raw, completion = ask(client, user, text=f"sentence number {i}")
        requests.append(
            {
                "request_id": raw.headers["x-abproxy-request-id"],
                "response_id": completion.id,
                "user": user or f"anonymous-{i}",
                "variant": raw.headers["x-abproxy-variant"],
            }
        )
    scales = {"satisfaction": [1 + k / 2 for k in range(9)], "thumbs": [0, 0.5, 1]}
    final: dict[tuple[int, str], float] = {}
    for _ in range(50):
        index = rng.randrange(20)
        name = rng.choice(["satisfaction", "satisfaction", "thumbs"])
        score = rng.choice(scales[name])
        request_id = requests[index][rng.choice(["request_id", "response_id"])]
        status, body = post_feedback(proxy, {"request_id": request_id, "name": name, "score": score})
        assert status == 200, body
        assert body["status"] == ("updated" if (index, name) in final else "recorded")
        assert body["variant"] == requests[index]["variant"]
        final[(index, name)] = score

    for variant, arm in arm_ids(proxy).items():
        stats = arm_stats(redis_client, arm)
        for name in scales:
            scores = {i: s for (i, n), s in final.items() if n == name and requests[i]["variant"] == variant}
            metric = f"feedback.{name}"
            assert int(stats.get(f"{metric}|n", 0)) == len(scores), (variant, name)
            assert num(stats, f"{metric}|s") == sum(scores.values())
            assert math.isclose(about_zero(stats, metric)["q"], sum(s * s for s in scores.values()), abs_tol=1e-9)
            expected_hist = collections.Counter(bucket_of(float(s)) for s in scores.values())
            assert feedback_hist(redis_client, arm, name) == dict(expected_hist)
            # per unit: Y_u = sum of u's final scores, N_u = how many of u's requests have one
            y: dict[str, float] = collections.defaultdict(float)
            n: dict[str, int] = collections.defaultdict(int)
            for i, score in scores.items():
                y[requests[i]["user"]] += score
                n[requests[i]["user"]] += 1
            sums = about_zero(stats, metric)
            assert int(sums["uk"]) == len(n)
            assert math.isclose(sums["uyy"], sum(v * v for v in y.values()), abs_tol=1e-9)
            assert sums["unn"] == sum(v * v for v in n.values())
            assert math.isclose(sums["uyn"], sum(y[u] * n[u] for u in n), abs_tol=1e-9)
        # feedback never changes the request counters
        users = {r["user"] for r in requests if r["variant"] == variant}
        assert len(users) > 1
        assert int(stats.get("requests", 0)) == sum(r["variant"] == variant for r in requests)
        assert int(stats.get("units", 0)) == len(users)


# -- 3. default name ----------------------------------------------------------------------------------


def test_name_defaults_to_the_experiments_first_feedback_metric(proxy: Any, redis_client: redis.Redis) -> None:
    client = proxy.client()
    raw, _ = ask(client, "default-name")
    status, body = post_feedback(proxy, {"request_id": raw.headers["x-abproxy-request-id"], "score": 4})
    assert status == 200, body
    stats = arm_stats(redis_client, arm_ids(proxy)[raw.headers["x-abproxy-variant"]])
    assert int(stats["feedback.satisfaction|n"]) == 1 and num(stats, "feedback.satisfaction|s") == 4
    assert "feedback.thumbs|n" not in stats

    # another experiment, another first metric
    raw, _ = ask(
        client, "default-name", text="great product", model="sentiment",
        extra_body={"abproxy_variables": {"product": "shoes"}},
    )  # fmt: skip
    status, body = post_feedback(proxy, {"request_id": raw.headers["x-abproxy-request-id"], "score": 1})
    assert status == 200, body
    assert body["experiment"] == "sentiment"
    stats = arm_stats(redis_client, arm_ids(proxy, "sentiment")[raw.headers["x-abproxy-variant"]], "sentiment")
    assert int(stats["feedback.accuracy|n"]) == 1 and num(stats, "feedback.accuracy|s") == 1


# -- 4. errors ---------------------------------------------------------------------------------------


def test_invalid_feedback_is_rejected_in_openai_shape_and_changes_nothing(
    proxy: Any, redis_client: redis.Redis
) -> None:
    raw, _ = ask(proxy.client(), "invalid-user")
    rid = raw.headers["x-abproxy-request-id"]
    status, _ = post_feedback(proxy, {"request_id": rid, "name": "satisfaction", "score": 3})
    assert status == 200
    proxy.settle()  # the request's own counts: a signed id's feedback does not wait for them
    before = aggregates(redis_client, proxy)
    prometheus_before = metrics_text(proxy.url)

    cases: list[tuple[Any, int]] = [
        ({"request_id": "f" * 32, "name": "satisfaction", "score": 3}, 404),
        ({"request_id": "chatcmpl-doesnotexist", "score": 3}, 404),
        ({"request_id": rid, "name": "nope", "score": 3}, 422),
        ({"request_id": rid, "name": "satisfaction", "score": 0}, 422),
        ({"request_id": rid, "name": "satisfaction", "score": 6}, 422),
        ({"request_id": rid, "name": "satisfaction", "score": 5.01}, 422),
        ({"request_id": rid, "name": "thumbs", "score": 2}, 422),
        ({"request_id": rid, "name": "thumbs", "score": -1}, 422),
        ({"request_id": rid, "name": "satisfaction", "score": "good"}, 422),
        ({"request_id": rid, "name": "satisfaction", "score": "4"}, 422),
        ({"request_id": rid, "name": "satisfaction", "score": True}, 422),
        ({"request_id": rid, "name": "satisfaction", "score": None}, 422),
        ({"request_id": rid, "name": "satisfaction", "score": [4]}, 422),
        ({"request_id": rid, "name": "satisfaction"}, 400),
        ({"name": "satisfaction", "score": 3}, 400),
        ({"request_id": "", "score": 3}, 400),
        ({"request_id": 12345, "score": 3}, 400),
        (b'{"request_id": "' + rid.encode() + b'", "score": 3', 400),
        (b"not json at all", 400),
        (b"", 400),
        (b'[{"request_id": "x", "score": 3}]', 400),
        (b'"just a string"', 400),
    ]
    problems = []
    for body, expected in cases:
        status, answer = post_feedback(proxy, body)
        if status != expected:
            problems.append(f"{body!r}: {status} (expected {expected}): {answer}")
            continue
        try:
            assert_error_shape(answer)
        except AssertionError:
            problems.append(f"{body!r}: not an OpenAI error: {answer!r}")
    assert problems == [], "\n".join(problems)
    assert aggregates(redis_client, proxy) == before
    after = metrics_text(proxy.url)
    for variant in arm_ids(proxy):
        for name in ("satisfaction", "thumbs"):
            labels = dict(experiment=EXP, variant=variant, name=name)
            assert sample(after, "abproxy_feedback_total", **labels) == sample(
                prometheus_before, "abproxy_feedback_total", **labels
            )


def test_feedback_while_redis_is_down_is_503_then_works_again(
    proxy: Any, redis_client: redis.Redis, redis_server: Any
) -> None:
    raw, _ = ask(proxy.client(), "outage-user")
    rid = raw.headers["x-abproxy-request-id"]
    # one score before the outage: the restarted Redis no longer has the feedback script cached
    assert post_feedback(proxy, {"request_id": rid, "name": "thumbs", "score": 1})[0] == 200
    proxy.settle()
    redis_server.stop()
    try:
        status, body = post_feedback(proxy, {"request_id": rid, "name": "satisfaction", "score": 4})
        assert status == 503, body
        assert_error_shape(body)
    finally:
        redis_server.start()
    status, body = post_feedback(proxy, {"request_id": rid, "name": "satisfaction", "score": 4})
    assert status == 200, body
    assert body["status"] == "recorded", "the failed attempt must not have counted"
    stats = arm_stats(redis_server.client(), arm_ids(proxy)[raw.headers["x-abproxy-variant"]])
    assert int(stats["feedback.satisfaction|n"]) == 1 and num(stats, "feedback.satisfaction|s") == 4


def test_non_experiment_request_ids_are_404(proxy: Any, redis_client: redis.Redis) -> None:
    raw, completion = ask(proxy.client(), "plain-user", model="gpt-4o-mini")
    assert "x-abproxy-experiment" not in raw.headers
    rid = raw.headers["x-abproxy-request-id"]
    proxy.settle()
    for request_id in (rid, completion.id):
        status, body = post_feedback(proxy, {"request_id": request_id, "score": 3})
        assert status == 404, body
        assert_error_shape(body)


def test_feedback_for_a_forced_variant_is_accepted_but_not_counted(proxy: Any, redis_client: redis.Redis) -> None:
    client = proxy.client()
    # one counted request so the arms exist and the check below can tell a change
    counted_raw, _ = ask(client, "counted-user")
    status, _ = post_feedback(proxy, {"request_id": counted_raw.headers["x-abproxy-request-id"], "score": 2})
    assert status == 200
    proxy.settle()  # the request's own counts: a signed id's feedback does not wait for them
    before = aggregates(redis_client, proxy)

    raw, completion = ask(client, "qa-user", extra_headers={"X-ABProxy-Variant": "professional"})
    assert raw.headers["x-abproxy-variant"] == "professional"
    status, body = post_feedback(proxy, {"request_id": raw.headers["x-abproxy-request-id"], "score": 5})
    assert status == 200, body
    assert (body["experiment"], body["variant"], body["status"]) == (EXP, "professional", "recorded")
    status, body = post_feedback(proxy, {"request_id": completion.id, "score": 1})
    assert (status, body["status"]) == (200, "updated")
    proxy.settle()
    assert aggregates(redis_client, proxy) == before


# -- 5. Prometheus ------------------------------------------------------------------------------------


def test_prometheus_counts_feedback_by_experiment_variant_and_name(proxy: Any, redis_client: redis.Redis) -> None:
    client = proxy.client()
    raw, _ = ask(client, "prom-user")
    rid, variant = raw.headers["x-abproxy-request-id"], raw.headers["x-abproxy-variant"]
    labels = dict(experiment=EXP, variant=variant)
    assert sample(metrics_text(proxy.url), "abproxy_feedback_total", name="satisfaction", **labels) == 0
    assert post_feedback(proxy, {"request_id": rid, "name": "satisfaction", "score": 4})[0] == 200
    text = metrics_text(proxy.url)
    assert sample(text, "abproxy_feedback_total", name="satisfaction", **labels) == 1
    assert sample(text, "abproxy_feedback_total", name="thumbs", **labels) == 0
    assert post_feedback(proxy, {"request_id": rid, "name": "thumbs", "score": 0})[0] == 200
    text = metrics_text(proxy.url)
    assert sample(text, "abproxy_feedback_total", name="thumbs", **labels) == 1
    assert sample(text, "abproxy_feedback_total", name="satisfaction", **labels) == 1


# -- 6. API keys --------------------------------------------------------------------------------------


def test_feedback_needs_the_proxy_api_key(start_proxy: Any, redis_client: redis.Redis) -> None:
    proxy = start_proxy(server={"api_keys": ["k1"]})
    with pytest.raises(openai.AuthenticationError):
        ask(proxy.client(api_key="wrong"), "key-user")
    raw, _ = ask(proxy.client(api_key="k1"), "key-user")
    rid = raw.headers["x-abproxy-request-id"]
    body = {"request_id": rid, "name": "satisfaction", "score": 4}

    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "k1"}):
        status, answer = post_feedback(proxy, body, headers)
        assert status == 401, (headers, answer)
        assert_error_shape(answer)
    arm = arm_ids(proxy)[raw.headers["x-abproxy-variant"]]
    proxy.settle()
    assert "feedback.satisfaction|n" not in arm_stats(redis_client, arm)

    status, answer = post_feedback(proxy, body, {"Authorization": "Bearer k1"})
    assert status == 200, answer
    assert int(arm_stats(redis_client, arm)["feedback.satisfaction|n"]) == 1


def test_a_response_id_reused_by_the_upstream_is_ambiguous_not_misattributed(proxy: Any, redis_client: redis.Redis) -> None:
    """Some servers (Ollama) reuse response ids. Feedback by such an id must not land on whichever
    request wrote it last: the proxy answers 409 and the request id still works."""
    from abproxy.recording.outcome import ExperimentRoute, Outcome

    plan = proxy.app.catalog.plans[EXP]
    recorder = proxy.app.recorder
    request_ids = []
    for index, variant in enumerate(("basic", "professional")):
        arm = plan.arms[variant]
        outcome = Outcome(
            request_id=f"{'ab' * 15}{index:02d}",
            endpoint="chat",
            upstream="fake",
            model="gpt-4o-mini",
            started_at=time.time(),
            route=ExperimentRoute(EXP, variant, arm.arm_id, f"user-{index}", False),
            status=200,
            latency_s=0.1,
            body=b'{"id": "chatcmpl-7", "choices": [{"message": {"content": "hi"}}]}',
        )
        recorder.record(outcome)
        request_ids.append(outcome.request_id)
    proxy.settle()
    status, body = post_feedback(proxy, {"request_id": "chatcmpl-7", "name": "satisfaction", "score": 5})
    assert status == 409 and body["error"]["code"] == "ambiguous_response_id", body
    for arm in arm_ids(proxy).values():
        assert "feedback.satisfaction|n" not in arm_stats(redis_client, arm)
    status, body = post_feedback(proxy, {"request_id": request_ids[1], "name": "satisfaction", "score": 5})
    assert status == 200 and body["variant"] == "professional"

