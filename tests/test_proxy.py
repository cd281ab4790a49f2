"""Integration tests of the proxy against the real openai SDK, a real redis-server and the
project's fake OpenAI-compatible upstream (SPEC §1, §2, §5)."""

from __future__ import annotations

import asyncio
import copy
import json
import logging
import re
import subprocess
import sys
import urllib.error
import urllib.request
from collections import Counter
from pathlib import Path
from typing import Any

import httpx2
import openai
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from abproxy.cli import open_relay_problem
from abproxy.config import parse_config
from abproxy.simulation.replies import error_body as fake_error_body
from abproxy.upstream.policy import FailureLog
from helpers import assert_openai_error, free_port, http, metrics_text, sample
from outside_tools import require_tool

REQUEST_ID = re.compile(r"[0-9a-f]{32}|r1\.[A-Za-z0-9_-]{40,}")  # random, or signed (experiment requests)
MESSAGES = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "Hello world"},
]
USER_ONLY = [{"role": "user", "content": "Hello world"}]
BASIC_USER = "Translate into Korean: Hello world"
PRO_SYSTEM = "You are a translator with ten years of experience."
PRO_USER = "Translate this English sentence into natural Korean:\nHello world"


# -- helpers --------------------------------------------------------------------------------


def chat_body(model: str = "translation", **extra: Any) -> bytes:
    return json.dumps({"model": model, "messages": USER_ONLY, **extra}).encode()


def metric_samples(text: str) -> list[tuple[str, dict[str, str], float]]:
    return [
        (sample.name, dict(sample.labels), sample.value)
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    ]






def live_results(proxy: Any, name: str = "translation", headers: dict[str, str] | None = None) -> dict[str, Any]:
    raw = http("GET", f"{proxy.url}/abproxy/experiments/{name}", headers=headers)
    assert raw.status == 200, raw.body
    return raw.json()


def variant_of(raw: Any) -> str:
    return raw.headers["x-abproxy-variant"]


def sse_events(body: bytes) -> list[bytes]:
    assert body.endswith(b"\n\n"), body[-80:]
    return [event for event in body.split(b"\n\n") if event]


def normalized_payloads(events: list[bytes]) -> list[Any]:
    """Each event's data, with the per-response id and created timestamp normalized."""
    out: list[Any] = []
    for event in events:
        assert event.startswith(b"data: "), event
        data = event[len(b"data: "):]
        if data == b"[DONE]":
            out.append("[DONE]")
            continue
        payload = json.loads(data)
        payload["id"] = "ID"
        payload["created"] = 0
        out.append(payload)
    return out


# -- 1. the SDK's call styles -----------------------------------------------------------------


def assert_experiment_headers(headers: Any) -> str:
    request_id = headers["x-abproxy-request-id"]
    assert REQUEST_ID.fullmatch(request_id), request_id
    assert headers["x-abproxy-experiment"] == "translation"
    assert headers["x-abproxy-variant"] in {"basic", "professional"}
    return request_id


def test_sync_chat_call_through_experiment_succeeds(proxy, upstream):
    completion = proxy.client().chat.completions.create(model="translation", messages=USER_ONLY, user="u-1")
    text = completion.choices[0].message.content
    assert text in {f"Echo: {BASIC_USER}", f"Echo: {PRO_USER}"}
    assert completion.usage is not None and completion.usage.completion_tokens == len(text.split())
    assert upstream.received[-1].json["model"] == "gpt-4o-mini"


def test_raw_response_carries_request_id_experiment_and_variant_headers(proxy):
    client = proxy.client()
    ids = set()
    for i in range(3):
        raw = client.chat.completions.with_raw_response.create(model="translation", messages=USER_ONLY, user=f"u-{i}")
        ids.add(assert_experiment_headers(raw.headers))
        assert raw.parse().choices[0].message.content.startswith("Echo: ")
    assert len(ids) == 3, "X-ABProxy-Request-Id must differ per request"


def test_async_chat_call_through_experiment_succeeds_with_headers(proxy):
    async def main() -> list[str]:
        async with proxy.async_client() as client:
            plain = await client.chat.completions.create(model="translation", messages=USER_ONLY)
            assert plain.choices[0].message.content.startswith("Echo: Translate")
            raws = await asyncio.gather(
                *[
                    client.chat.completions.with_raw_response.create(model="translation", messages=USER_ONLY)
                    for _ in range(4)
                ]
            )
            for raw in raws:
                assert raw.parse().choices[0].message.content.startswith("Echo: Translate")
            return [assert_experiment_headers(raw.headers) for raw in raws]

    ids = asyncio.run(main())
    assert len(set(ids)) == 4


def test_streaming_call_through_experiment_succeeds_with_headers(proxy):
    client = proxy.client()
    raw = client.chat.completions.with_raw_response.create(
        model="translation", messages=USER_ONLY, stream=True, user="stream-user"
    )
    assert_experiment_headers(raw.headers)
    chunks = list(raw.parse())
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    expected = BASIC_USER if variant_of(raw) == "basic" else PRO_USER
    assert text == f"Echo: {expected}"
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    # and the plain streaming style works too
    plain = list(client.chat.completions.create(model="translation", messages=USER_ONLY, stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in plain if c.choices).startswith("Echo: Translate")


# -- 2. assignment --------------------------------------------------------------------------


def test_same_user_body_field_always_gets_same_variant(proxy):
    client = proxy.client()
    seen = {
        variant_of(client.chat.completions.with_raw_response.create(model="translation", messages=USER_ONLY, user="alice"))
        for _ in range(20)
    }
    assert len(seen) == 1, seen


def test_same_user_header_always_gets_same_variant_and_wins_over_body_user(proxy):
    client = proxy.client()
    variants = set()
    for i in range(20):
        raw = client.chat.completions.with_raw_response.create(
            model="translation", messages=USER_ONLY, user=f"body-user-{i}", extra_headers={"X-ABProxy-User": "bob"}
        )
        variants.add(variant_of(raw))
    assert len(variants) == 1, "the X-ABProxy-User header decides, whatever the body's user says"


@pytest.mark.slow
def test_distinct_users_split_roughly_evenly_between_variants(proxy):
    client = proxy.client()
    counts = Counter(
        variant_of(
            client.chat.completions.with_raw_response.create(model="translation", messages=USER_ONLY, user=f"user-{i}")
        )
        for i in range(200)
    )
    assert set(counts) == {"basic", "professional"}
    # Binomial(200, 0.5): sd ~7.1; 70..130 is beyond +-4 sd.
    assert 70 <= counts["basic"] <= 130, counts


def test_request_unit_experiment_varies_per_request_for_same_user(proxy):
    client = proxy.client()
    variants = Counter(
        variant_of(
            client.chat.completions.with_raw_response.create(
                model="sentiment", messages=USER_ONLY, user="same-user",
                extra_headers={"X-ABProxy-User": "same-user"}, extra_body={"abproxy_variables": {"product": "p"}},
            )
        )
        for _ in range(40)
    )
    assert set(variants) == {"simple", "detailed"}, variants


# -- 3. templates as the upstream sees them -------------------------------------------------------


def test_basic_variant_sets_model_merges_params_and_applies_user_template(proxy, upstream):
    raw = proxy.client().chat.completions.with_raw_response.create(
        model="translation", messages=MESSAGES, temperature=0.1, top_p=0.9,
        extra_headers={"X-ABProxy-Variant": "basic"},
    )
    assert variant_of(raw) == "basic"
    sent = upstream.received[-1].json
    assert sent["model"] == "gpt-4o-mini"
    assert sent["temperature"] == 0.7, "the variant's params override the client's"
    assert sent["max_tokens"] == 100
    assert sent["top_p"] == 0.9, "a param only the client set is kept"
    assert sent["messages"][0] == {"role": "system", "content": "You are terse."}
    assert sent["messages"][-1] == {"role": "user", "content": BASIC_USER}
    assert raw.parse().choices[0].message.content == f"Echo: {BASIC_USER}"
    assert not any(k.startswith("x-abproxy") for k in upstream.received[-1].headers)


def test_professional_variant_replaces_system_message_and_applies_user_template(proxy, upstream):
    raw = proxy.client().chat.completions.with_raw_response.create(
        model="translation", messages=MESSAGES, temperature=0.1, extra_headers={"X-ABProxy-Variant": "professional"}
    )
    assert variant_of(raw) == "professional"
    sent = upstream.received[-1].json
    assert sent["model"] == "gpt-4o-mini"
    assert sent["temperature"] == 0.1, "professional sets no params: the client's stay"
    assert sent["messages"] == [
        {"role": "system", "content": PRO_SYSTEM},
        {"role": "user", "content": PRO_USER},
    ]


def test_professional_variant_inserts_system_message_when_client_has_none(proxy, upstream):
    proxy.client().chat.completions.create(
        model="translation", messages=USER_ONLY, extra_headers={"X-ABProxy-Variant": "professional"}
    )
    assert upstream.received[-1].json["messages"] == [
        {"role": "system", "content": PRO_SYSTEM},
        {"role": "user", "content": PRO_USER},
    ]


def test_abproxy_variables_render_template_and_are_stripped_before_forwarding(proxy, upstream):
    raw = proxy.client().chat.completions.with_raw_response.create(
        model="sentiment", messages=MESSAGES,
        extra_headers={"X-ABProxy-Variant": "detailed"}, extra_body={"abproxy_variables": {"product": "shoes"}},
    )
    assert raw.headers["x-abproxy-experiment"] == "sentiment" and variant_of(raw) == "detailed"
    sent = upstream.received[-1].json
    assert "abproxy_variables" not in sent
    assert b"abproxy_variables" not in upstream.received[-1].body
    assert sent["model"] == "gpt-4o" and sent["temperature"] == 0
    assert sent["messages"] == [
        {"role": "system", "content": "You are a sentiment analyst for shoes."},
        {"role": "user", "content": "Hello world"},
    ]


def test_missing_template_variable_is_400_naming_it_and_nothing_is_forwarded(proxy, upstream):
    with pytest.raises(openai.BadRequestError) as caught:
        proxy.client().chat.completions.create(
            model="sentiment", messages=USER_ONLY, extra_headers={"X-ABProxy-Variant": "detailed"}
        )
    assert caught.value.status_code == 400
    assert "product" in caught.value.message
    assert upstream.received == []


# -- 4. non-experiment traffic ---------------------------------------------------------------


def test_non_experiment_traffic_is_forwarded_byte_for_byte(proxy, upstream):
    sent = (
        b'{ "model":"gpt-4o-mini",  "messages": [{"role":"user","content":"caf\\u00e9 \xe2\x9c\x93 {{input}}"}],'
        b' "abproxy_variables": {"product": "kept"}, "temperature": 0.30, "zzz_unknown": [1, 2.50]}'
    )
    raw = http("POST", f"{proxy.base_url}/chat/completions", sent, {"Authorization": "Bearer sk-client"})
    assert raw.status == 200, raw.body
    assert upstream.received[-1].body == sent
    assert "x-abproxy-experiment" not in raw.headers
    assert "x-abproxy-variant" not in raw.headers
    assert REQUEST_ID.fullmatch(raw.headers["x-abproxy-request-id"])
    assert raw.json()["choices"][0]["message"]["content"] == "Echo: caf\u00e9 \u2713 {{input}}"


def test_non_experiment_stream_is_forwarded_untouched_without_usage_request(proxy, upstream):
    sent = b'{"model": "gpt-4o-mini", "stream": true, "messages": [{"role": "user", "content": "one two"}]}'
    raw = http("POST", f"{proxy.base_url}/chat/completions", sent)
    assert raw.status == 200
    assert upstream.received[-1].body == sent, "no stream_options added outside experiments"
    assert "x-abproxy-experiment" not in raw.headers
    assert sse_events(raw.body)[-1] == b"data: [DONE]"


def test_non_experiment_sdk_call_has_no_experiment_header(proxy, upstream):
    raw = proxy.client().chat.completions.with_raw_response.create(model="gpt-4o-mini", messages=MESSAGES)
    assert "x-abproxy-experiment" not in raw.headers
    assert upstream.received[-1].json["messages"] == MESSAGES
    assert raw.parse().choices[0].message.content == "Echo: Hello world"


# -- 5. joining by header --------------------------------------------------------------------


def test_experiment_header_joins_experiment_whatever_the_model(proxy, upstream):
    raw = proxy.client().chat.completions.with_raw_response.create(
        model="gpt-4o", messages=USER_ONLY, extra_headers={"X-ABProxy-Experiment": "translation"}
    )
    assert raw.headers["x-abproxy-experiment"] == "translation"
    variant = variant_of(raw)
    sent = upstream.received[-1].json
    assert sent["model"] == "gpt-4o-mini"
    assert sent["messages"][-1]["content"] == (BASIC_USER if variant == "basic" else PRO_USER)


def test_unknown_experiment_header_is_404_in_openai_error_shape(proxy, upstream):
    raw = http("POST", f"{proxy.base_url}/chat/completions", chat_body("gpt-4o"), {"X-ABProxy-Experiment": "nope"})
    assert_openai_error(raw, 404)
    assert upstream.received == []
    with pytest.raises(openai.NotFoundError):
        proxy.client().chat.completions.create(
            model="gpt-4o", messages=USER_ONLY, extra_headers={"X-ABProxy-Experiment": "nope"}
        )


def test_forcing_unknown_variant_is_400(proxy, upstream):
    raw = http("POST", f"{proxy.base_url}/chat/completions", chat_body(), {"X-ABProxy-Variant": "nope"})
    error = assert_openai_error(raw, 400)
    assert "nope" in error["message"]
    assert upstream.received == []


# -- 6. stream fidelity ----------------------------------------------------------------------


def test_stream_usage_is_requested_upstream_and_stripped_when_client_did_not_ask(proxy, upstream):
    reply = "Annyeong haseyo, segye! How are you"
    chunks = list(
        proxy.client().chat.completions.create(
            model="translation", messages=USER_ONLY, stream=True, extra_headers={"x-fake-reply": reply}
        )
    )
    assert upstream.received[-1].json["stream_options"] == {"include_usage": True}
    assert chunks, "no chunks"
    assert all(c.choices for c in chunks), "the usage-only chunk the proxy asked for reached the client"
    assert all(c.usage is None for c in chunks)
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == reply


def test_stream_usage_reaches_client_when_client_asked(proxy, upstream):
    reply = "one two three four"
    chunks = list(
        proxy.client().chat.completions.create(
            model="translation", messages=USER_ONLY, stream=True, stream_options={"include_usage": True},
            extra_headers={"x-fake-reply": reply},
        )
    )
    assert upstream.received[-1].json["stream_options"] == {"include_usage": True}
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == 4
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == reply


def test_raw_sse_via_proxy_equals_upstream_stream_except_ids_and_stripped_usage(proxy, upstream, upstream_url):
    reply = "Fixed reply with several words in it"
    headers = {"x-fake-reply": reply, "X-ABProxy-Variant": "basic", "Authorization": "Bearer sk-client"}
    via_proxy = http("POST", f"{proxy.base_url}/chat/completions", chat_body(stream=True), headers)
    assert via_proxy.status == 200
    assert via_proxy.headers["content-type"].startswith("text/event-stream")
    forwarded = copy.deepcopy(upstream.received[-1].json)
    assert forwarded.pop("stream_options") == {"include_usage": True}

    direct = http("POST", f"{upstream_url}/chat/completions", json.dumps(forwarded).encode(), {"x-fake-reply": reply})
    assert direct.status == 200

    proxied_payloads = normalized_payloads(sse_events(via_proxy.body))
    direct_payloads = normalized_payloads(sse_events(direct.body))
    # The upstream, asked for usage, adds `"usage": null` to every chunk (as OpenAI does) and a
    # final usage chunk: the proxy removes both, so the client sees the stream it asked for.
    assert all(not (isinstance(p, dict) and "usage" in p) for p in proxied_payloads)
    assert proxied_payloads == direct_payloads
    assert len(sse_events(via_proxy.body)) == len(sse_events(direct.body))


# -- 7. Responses API and legacy completions ------------------------------------------------------


@pytest.mark.slow
def test_responses_api_through_experiment_sets_instructions_and_renders_input(proxy, upstream):
    client = proxy.client()
    raw = client.responses.with_raw_response.create(
        model="translation", input="Hello world", extra_headers={"X-ABProxy-Variant": "professional"}
    )
    assert raw.headers["x-abproxy-experiment"] == "translation" and variant_of(raw) == "professional"
    sent = upstream.received[-1].json
    assert upstream.received[-1].path == "/v1/responses"
    assert sent["model"] == "gpt-4o-mini"
    assert sent["instructions"] == PRO_SYSTEM
    assert sent["input"] == PRO_USER
    assert raw.parse().output_text == f"Echo: {PRO_USER}"


def test_responses_api_stream_through_experiment_renders_user_template(proxy, upstream):
    stream = proxy.client().responses.create(
        model="translation", input="Hello world", stream=True, extra_headers={"X-ABProxy-Variant": "basic"}
    )
    events = list(stream)
    sent = upstream.received[-1].json
    assert sent["input"] == BASIC_USER
    assert sent.get("instructions") is None
    assert "".join(e.delta for e in events if e.type == "response.output_text.delta") == f"Echo: {BASIC_USER}"
    assert events[-1].type == "response.completed"


def test_responses_api_variant_max_tokens_is_sent_as_max_output_tokens(proxy, upstream):
    """The Responses API has no `max_tokens` (OpenAI answers 400 "Unknown parameter: 'max_tokens'");
    a variant's `max_tokens` must reach it as `max_output_tokens`."""
    proxy.client().responses.create(model="translation", input="Hello world", extra_headers={"X-ABProxy-Variant": "basic"})
    sent = upstream.received[-1].json
    assert sent["temperature"] == 0.7
    assert "max_tokens" not in sent
    assert sent.get("max_output_tokens") == 100


def test_legacy_completions_through_experiment_render_prompt(proxy, upstream):
    client = proxy.client()
    raw = client.completions.with_raw_response.create(
        model="translation", prompt="Hello world", extra_headers={"X-ABProxy-Variant": "basic"}
    )
    assert variant_of(raw) == "basic"
    sent = upstream.received[-1].json
    assert upstream.received[-1].path == "/v1/completions"
    assert sent["model"] == "gpt-4o-mini" and sent["prompt"] == BASIC_USER
    assert raw.parse().choices[0].text == f"Echo: {BASIC_USER}"

    client.completions.create(model="translation", prompt="Hello world", extra_headers={"X-ABProxy-Variant": "professional"})
    assert upstream.received[-1].json["prompt"] == f"{PRO_SYSTEM}\n\n{PRO_USER}"


def test_legacy_completions_stream_through_experiment_strips_usage_and_keeps_text(proxy, upstream):
    chunks = list(
        proxy.client().completions.create(
            model="translation", prompt="Hello world", stream=True, extra_headers={"X-ABProxy-Variant": "basic"}
        )
    )
    assert upstream.received[-1].json["prompt"] == BASIC_USER
    assert upstream.received[-1].json["stream_options"] == {"include_usage": True}
    assert all(c.choices for c in chunks)
    assert "".join(c.choices[0].text for c in chunks) == f"Echo: {BASIC_USER}"


# -- 8. models and passthrough ---------------------------------------------------------------


def test_models_list_includes_upstream_models_and_experiments(proxy):
    ids = [m.id for m in proxy.client().models.list()]
    assert {"gpt-4o-mini", "gpt-4o", "translation", "sentiment"} <= set(ids)
    assert ids.count("translation") == 1 and ids.count("sentiment") == 1


def test_embeddings_pass_through_to_default_upstream(proxy, upstream):
    result = proxy.client().embeddings.create(model="text-embedding-3-small", input="x")
    assert len(result.data) == 1 and len(result.data[0].embedding) == 8
    assert result.model == "text-embedding-3-small"
    received = upstream.received[-1]
    assert received.path == "/v1/embeddings"
    assert received.json["model"] == "text-embedding-3-small" and received.json["input"] == "x"
    proxy.settle()
    text = metrics_text(proxy.url)
    assert sample(text, "abproxy_requests_total", experiment="", variant="", status="200") == 1


def test_passthrough_streams_a_large_upload_and_any_method_through(start_proxy, upstream):
    """Uploads (the files API, say) are forwarded as they arrive, in the client's own framing,
    and refused past max_body_bytes even when they come without a length."""
    proxy = start_proxy(server={"max_body_bytes": 4 << 20}, socket=True)  # the client's own framing
    payload = bytes(range(256)) * (12 << 10)  # 3 MiB, sent chunked
    pieces = (payload[i : i + 65536] for i in range(0, len(payload), 65536))
    request = urllib.request.Request(f"{proxy.url}/v1/files?purpose=batch", data=pieces, method="POST",
                                     headers={"content-type": "application/octet-stream"})  # fmt: skip
    with pytest.raises(urllib.error.HTTPError) as answered:  # the fake provider has no files API: 404
        urllib.request.urlopen(request, timeout=30)
    assert answered.value.code == 404
    received = upstream.received[-1]
    assert (received.method, received.path, received.body) == ("POST", "/v1/files", payload)
    assert received.headers["transfer-encoding"] == "chunked" and received.headers["content-type"] == "application/octet-stream"

    too_big = (b"x" * 65536 for _ in range(80))  # 5 MiB without a length
    request = urllib.request.Request(f"{proxy.url}/v1/files", data=too_big, method="POST")
    # The proxy answers 413 and closes while the client is still sending: a client that reads
    # before it has sent everything sees the 413, one that keeps writing sees the reset.
    with pytest.raises((urllib.error.HTTPError, urllib.error.URLError, ConnectionError)) as refused:
        urllib.request.urlopen(request, timeout=30)
    if isinstance(refused.value, urllib.error.HTTPError):
        assert refused.value.code == 413

    for method in ("GET", "DELETE", "HEAD"):
        answer = http(method, f"{proxy.url}/v1/no-such-api/7")
        assert answer.status == 404 and answer.headers["x-abproxy-request-id"]  # the fake's answer, passed on
        assert (upstream.received[-1].method, upstream.received[-1].body) == (method, b"")
    # whatever the proxy sent upstream of the cut-off upload arrived before these three
    assert [r.path for r in upstream.received[1:]] == ["/v1/no-such-api/7"] * 3, (
        "the cut-off upload never reached the upstream as a whole request"
    )


def test_passthrough_refuses_dot_segments_and_keeps_encoded_characters(served_proxy, upstream):
    for path in ("/v1/%2e%2e/admin", "/v1/files/../../admin", "/v1/./models"):
        raw = http("GET", f"{served_proxy.url}{path}", headers={"Authorization": "Bearer sk-client"})
        assert_openai_error(raw, 400, "invalid_path")
    assert upstream.received == [], "a dot-segment path reached the upstream"
    # An encoded slash or question mark stays encoded: it cannot change the path or add a query.
    raw = http("GET", f"{served_proxy.url}/v1/files/a%2Fb%3Fx=1", headers={"Authorization": "Bearer sk-client"})
    assert raw.status == 404
    # The upstream decodes what it received: had the served_proxy forwarded it decoded, the upstream
    # would have seen the path /v1/files/a/b and a query string x=1 instead.
    assert upstream.received[-1].path == "/v1/files/a/b?x=1"


# -- 9. upstream errors ----------------------------------------------------------------------


def translation_errors(proxy: Any) -> int:
    proxy.settle()
    return sum(v["errors"] for v in live_results(proxy)["variants"])


def test_upstream_429_reaches_client_as_rate_limit_error_and_is_counted(proxy):
    with pytest.raises(openai.RateLimitError) as caught:
        proxy.client().chat.completions.create(
            model="translation", messages=USER_ONLY, user="u", extra_headers={"x-fake-status": "429"}
        )
    error = caught.value
    assert error.status_code == 429
    assert error.response.content == fake_error_body(429), "the upstream's error body, byte for byte"
    assert error.message and "fake error 429" in error.message
    assert translation_errors(proxy) == 1
    assert sample(metrics_text(proxy.url), "abproxy_upstream_errors_total", upstream="fake", reason="rate_limited") == 1


def test_upstream_error_on_streaming_request_reaches_client_with_upstream_status(proxy):
    with pytest.raises(openai.RateLimitError) as caught:
        list(proxy.client().chat.completions.create(
            model="translation", messages=USER_ONLY, stream=True, extra_headers={"x-fake-status": "429"}
        ))
    assert caught.value.response.content == fake_error_body(429)
    assert caught.value.response.headers["x-abproxy-experiment"] == "translation"
    assert translation_errors(proxy) == 1


def test_upstream_500_reaches_client_as_internal_server_error_and_is_counted(proxy):
    with pytest.raises(openai.InternalServerError) as caught:
        proxy.client().chat.completions.create(
            model="translation", messages=USER_ONLY, extra_headers={"x-fake-status": "500"}
        )
    assert caught.value.status_code == 500
    assert caught.value.response.content == fake_error_body(500)
    assert translation_errors(proxy) == 1
    assert sample(metrics_text(proxy.url), "abproxy_upstream_errors_total", upstream="fake", reason="http_5xx") == 1


def test_unreachable_upstream_is_502_upstream_unreachable_and_is_counted(start_proxy):
    dead = f"http://127.0.0.1:{free_port()}/v1"
    proxy = start_proxy(upstreams={"dead": {"base_url": dead, "timeout_s": 2}}, default_upstream="dead")
    raw = http("POST", f"{proxy.base_url}/chat/completions", chat_body(user="u"))
    assert_openai_error(raw, 502, "upstream_unreachable")
    assert REQUEST_ID.fullmatch(raw.headers["x-abproxy-request-id"])
    with pytest.raises(openai.APIStatusError) as caught:
        proxy.client().chat.completions.create(model="translation", messages=USER_ONLY)
    assert caught.value.status_code == 502
    assert translation_errors(proxy) == 2
    assert sample(metrics_text(proxy.url), "abproxy_upstream_errors_total", upstream="dead", reason="unreachable") == 2


def test_an_unreachable_upstream_is_one_warning_in_the_log_not_one_per_request(start_proxy, caplog):
    """Before, the client got its 502 and the log said nothing at all."""
    port = free_port()
    dead = f"http://user:pw-SECRET@127.0.0.1:{port}/v1"
    upstreams = {"dead": {"base_url": dead, "api_key": "sk-up-SECRET", "timeout_s": 2}}
    proxy = start_proxy(upstreams=upstreams, default_upstream="dead")
    client = proxy.client()
    with caplog.at_level(logging.WARNING, logger="abproxy"):
        for _ in range(10):
            with pytest.raises(openai.APIStatusError) as caught:
                client.chat.completions.create(model="translation", messages=USER_ONLY)
            assert caught.value.status_code == 502
            with pytest.raises(openai.APIStatusError):
                client.embeddings.create(model="text-embedding-3-small", input="x")  # pass-through
    warnings = [r.getMessage() for r in caplog.records if r.name.startswith("abproxy") and r.levelno >= logging.WARNING]
    assert len(warnings) == 1, warnings
    assert f"upstream 'dead' (127.0.0.1:{port}) is unreachable: connection refused" in warnings[0], warnings
    assert "SECRET" not in warnings[0]


def test_upstream_failure_warnings_count_what_they_left_out(caplog):
    now = [0.0]
    failures = FailureLog({"dead": "10.0.0.7:8000"}, every_s=10, clock=lambda: now[0])
    refused = ConnectionRefusedError(111, "Connection refused")
    with caplog.at_level(logging.WARNING, logger="abproxy"):
        for second in range(25):  # one failed request a second
            now[0] = float(second)
            failures.failed("dead", "unreachable", refused)
        failures.failed("dead", "timeout", TimeoutError("no response from upstream within 5 s"))
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 4, warnings  # at 0, 10 and 20 s, and the first timeout
    assert "more" not in warnings[0]
    assert warnings[1].endswith("; 9 more like it since the last warning")
    assert "upstream 'dead' (10.0.0.7:8000) timed out: no response from upstream within 5 s" == warnings[3]


@pytest.mark.slow
def test_upstream_timeout_is_504_upstream_timeout_and_is_counted(start_proxy, upstream_url):
    proxy = start_proxy(upstreams={"fake": {"base_url": upstream_url, "timeout_s": 0.5}})
    raw = http("POST", f"{proxy.base_url}/chat/completions", chat_body(), {"x-fake-delay-ms": "3000"})
    assert_openai_error(raw, 504, "upstream_timeout")
    assert raw.headers.get("x-abproxy-experiment") == "translation"
    assert translation_errors(proxy) == 1
    assert sample(metrics_text(proxy.url), "abproxy_upstream_errors_total", upstream="fake", reason="timeout") == 1


def test_broken_upstream_stream_raises_api_error_in_sdk_and_is_counted(proxy):
    received: list[str] = []
    with pytest.raises(openai.APIError) as caught:
        for chunk in proxy.client().chat.completions.create(
            model="translation", messages=USER_ONLY, stream=True, extra_headers={"x-fake-break-after": "2"}
        ):
            if chunk.choices and chunk.choices[0].delta.content:
                received.append(chunk.choices[0].delta.content)
    assert not isinstance(caught.value, openai.APIConnectionError), "the proxy should end the stream with an error event"
    assert len(received) == 2, received
    assert translation_errors(proxy) == 1
    assert sample(metrics_text(proxy.url), "abproxy_upstream_errors_total", upstream="fake", reason="broken_stream") == 1


@pytest.mark.slow
def test_stream_that_goes_silent_ends_with_an_error_event_and_counts_as_a_timeout(start_proxy, upstream_url):
    """A stream may run longer than timeout_s, but never be silent for that long: the client's
    headers are gone already, so it gets an error event its SDK raises on, not a hang."""
    proxy = start_proxy(upstreams={"fake": {"base_url": upstream_url, "timeout_s": 0.5}})
    with pytest.raises(openai.APIError) as caught:
        for _ in proxy.client().chat.completions.create(
            model="translation", messages=USER_ONLY, stream=True, extra_headers={"x-fake-chunk-delay-ms": "3000"}
        ):
            pass
    assert not isinstance(caught.value, openai.APIConnectionError)
    assert "interrupted" in str(caught.value) and "timed out" in str(caught.value)  # given up, not waited out
    assert translation_errors(proxy) == 1
    assert sample(metrics_text(proxy.url), "abproxy_upstream_errors_total", upstream="fake", reason="timeout") == 1


# -- 10. bad input ---------------------------------------------------------------------------


def test_malformed_json_is_400_invalid_json_and_not_forwarded(proxy, upstream):
    raw = http("POST", f"{proxy.base_url}/chat/completions", b'{"model": "translation", "messages": [')
    assert_openai_error(raw, 400, "invalid_json")
    raw = http("POST", f"{proxy.base_url}/chat/completions", b'{"model": "gpt-4o-mini", ')
    assert_openai_error(raw, 400, "invalid_json")
    assert upstream.received == []


def test_json_array_body_is_400_and_not_forwarded(proxy, upstream):
    raw = http("POST", f"{proxy.base_url}/chat/completions", b'[{"model": "translation"}]')
    assert_openai_error(raw, 400)
    assert upstream.received == []


def test_body_over_max_body_bytes_is_413_and_not_forwarded(start_proxy, upstream):
    proxy = start_proxy(server={"max_body_bytes": 1000}, socket=True)  # a chunked body too
    big = chat_body("gpt-4o-mini", padding="x" * 2000)
    raw = http("POST", f"{proxy.base_url}/chat/completions", big)
    assert_openai_error(raw, 413)
    # a chunked body (no Content-Length) is cut off as well
    with httpx2.Client(timeout=10) as client:
        response = client.post(
            f"{proxy.base_url}/chat/completions", content=iter([big[:600], big[600:]]),
            headers={"content-type": "application/json"},
        )
    assert response.status_code == 413 and "error" in response.json()
    # and under the limit it works
    assert http("POST", f"{proxy.base_url}/chat/completions", chat_body("gpt-4o-mini")).status == 200
    assert len(upstream.received) == 1


# -- 11. security ----------------------------------------------------------------------------


def test_proxy_api_keys_reject_missing_and_wrong_keys_without_echoing_them(start_proxy, upstream):
    proxy = start_proxy(server={"api_keys": ["sk-proxy-1"]})
    raw = http("POST", f"{proxy.base_url}/chat/completions", chat_body())
    assert_openai_error(raw, 401)
    with pytest.raises(openai.AuthenticationError) as caught:
        proxy.client(api_key="sk-wrong-key-123").chat.completions.create(model="translation", messages=USER_ONLY)
    assert caught.value.status_code == 401
    assert "sk-wrong-key-123" not in caught.value.response.text
    with pytest.raises(openai.AuthenticationError):
        proxy.client(api_key="sk-wrong-key-123").embeddings.create(model="text-embedding-3-small", input="x")
    with pytest.raises(openai.AuthenticationError):
        proxy.client(api_key="sk-wrong-key-123").models.list()
    assert upstream.received == []


def test_proxy_api_key_is_accepted_and_not_forwarded_upstream(start_proxy, upstream):
    proxy = start_proxy(server={"api_keys": ["sk-proxy-1"]})
    client = proxy.client(api_key="sk-proxy-1")
    client.chat.completions.create(model="translation", messages=USER_ONLY)
    client.chat.completions.create(model="gpt-4o-mini", messages=USER_ONLY)
    client.embeddings.create(model="text-embedding-3-small", input="x")
    assert len(upstream.received) == 3
    for received in upstream.received:
        assert not any("sk-proxy-1" in value for value in received.headers.values()), received.headers


def test_upstream_api_key_replaces_client_key_and_never_leaks(start_proxy, upstream, upstream_url):
    secret = "sk-upstream-secret"
    proxy = start_proxy(upstreams={"fake": {"base_url": upstream_url, "api_key": secret, "timeout_s": 5}})
    client = proxy.client(api_key="sk-client-own")
    responses = [
        client.chat.completions.with_raw_response.create(model="translation", messages=USER_ONLY),
        client.chat.completions.with_raw_response.create(model="gpt-4o-mini", messages=USER_ONLY),
        client.chat.completions.with_raw_response.create(model="translation", messages=USER_ONLY, stream=True),
        client.embeddings.with_raw_response.create(model="text-embedding-3-small", input="x"),
        client.models.with_raw_response.list(),
    ]
    texts = []
    for raw in responses:
        texts.append(raw.http_response.read().decode())
        texts.append(json.dumps(dict(raw.headers)))
    with pytest.raises(openai.RateLimitError) as caught:
        client.chat.completions.create(model="translation", messages=USER_ONLY, extra_headers={"x-fake-status": "429"})
    texts.append(caught.value.response.text + json.dumps(dict(caught.value.response.headers)))
    assert len(upstream.received) == 6
    for received in upstream.received:
        assert received.headers["authorization"] == f"Bearer {secret}"
    proxy.settle()
    texts.append(metrics_text(proxy.url))
    texts.append(http("GET", f"{proxy.url}/abproxy/experiments").body.decode())
    for text in texts:
        assert secret not in text


def test_admin_key_protects_admin_endpoints(start_proxy):
    proxy = start_proxy(server={"admin_key": "adm"})
    for path in ("/abproxy/experiments", "/abproxy/experiments/translation"):
        assert_openai_error(http("GET", proxy.url + path), 401)
        wrong = http("GET", proxy.url + path, headers={"Authorization": "Bearer wrong-admin-token"})
        assert_openai_error(wrong, 401)
        assert b"wrong-admin-token" not in wrong.body
        ok = http("GET", proxy.url + path, headers={"Authorization": "Bearer adm"})
        assert ok.status == 200, ok.body
    assert http("GET", proxy.url + "/abproxy/experiments/translation",
                headers={"Authorization": "Bearer adm"}).json()["experiment"] == "translation"


def test_client_keys_are_never_admin_keys(start_proxy):
    """Client keys without an admin key (the shipped config): nobody is an admin. A client key
    could otherwise read every experiment, flush and promote."""
    proxy = start_proxy(server={"api_keys": ["sk-client"]})
    calls = (
        ("GET", "/abproxy/experiments"),
        ("GET", "/abproxy/experiments/translation"),
        ("POST", "/abproxy/flush"),
        ("POST", "/abproxy/experiments/translation/promote"),
        ("DELETE", "/abproxy/experiments/translation/promote"),
    )
    for method, path in calls:
        for headers in ({}, {"Authorization": "Bearer sk-client"}, {"Authorization": "Bearer wrong"}):
            refused = http(method, proxy.url + path, b"{}" if method == "POST" else None, headers)
            error = assert_openai_error(refused, 403, "admin_key_required")
            assert "server.admin_key" in error["message"] and b"sk-client" not in refused.body
    assert proxy.app.overrides.promoted("translation") is None, "nothing was promoted"
    # the clients still scrape /metrics and call the API with their key
    assert http("GET", proxy.url + "/metrics", headers={"Authorization": "Bearer sk-client"}).status == 200
    assert proxy.client(api_key="sk-client").chat.completions.create(model="translation", messages=USER_ONLY).choices

    # no keys at all (a loopback set-up): the admin endpoints stay open
    keyless = start_proxy()
    assert http("GET", keyless.url + "/abproxy/experiments/translation").json()["experiment"] == "translation"


def test_metrics_need_the_metrics_or_admin_key_once_the_proxy_has_keys(start_proxy):
    """/metrics publishes p-values, feedback means and the winner, which /abproxy/* protects."""
    open_proxy = start_proxy()
    assert http("GET", open_proxy.url + "/metrics").status == 200  # no keys anywhere: open, as Prometheus expects

    proxy = start_proxy(server={"api_keys": ["sk-client"], "admin_key": "adm", "metrics_key": "scrape"})
    assert_openai_error(http("GET", proxy.url + "/metrics"), 401)
    for token in ("sk-client", "wrong-metrics-token"):
        refused = http("GET", proxy.url + "/metrics", headers={"Authorization": f"Bearer {token}"})
        assert_openai_error(refused, 401)
        assert token.encode() not in refused.body
    for token in ("scrape", "adm"):
        scraped = http("GET", proxy.url + "/metrics", headers={"Authorization": f"Bearer {token}"})
        assert scraped.status == 200 and b"abproxy_requests_total" in scraped.body

    # Client keys alone: /metrics is for the clients, not for anyone who can reach the port.
    clients_only = start_proxy(server={"api_keys": ["sk-client"]})
    assert_openai_error(http("GET", clients_only.url + "/metrics"), 401)
    assert http("GET", clients_only.url + "/metrics", headers={"Authorization": "Bearer sk-client"}).status == 200


def relay_config(**server: Any) -> Any:
    return parse_config(
        {
            "upstreams": {"openai": {"base_url": "https://api.openai.com/v1", "api_key": "sk-upstream-secret"}},
            "default_upstream": "openai",
            "server": server,
        },
        environ={},
    )


def test_open_relay_check_refuses_public_bind_with_upstream_key_and_no_client_keys():
    assert open_relay_problem(relay_config(), "0.0.0.0")
    assert open_relay_problem(relay_config(), "::")
    assert open_relay_problem(relay_config(), "127.0.0.1") is None
    assert open_relay_problem(relay_config(), "localhost") is None
    assert open_relay_problem(relay_config(api_keys=["sk-proxy-1"]), "0.0.0.0") is None
    assert open_relay_problem(relay_config(allow_open_relay=True), "0.0.0.0") is None


def test_served_by_anything_else_the_app_answers_only_local_clients_while_it_would_be_an_open_relay(
    redis_server: Any, upstream: Any, upstream_url: str
):
    """`abproxy serve` refuses to listen beyond loopback; uvicorn running ``app_from_env``, or the
    app inside another, cannot know where it listens, so each request is held to the rule: a
    client not on loopback gets 403 ``open_relay_refused`` and the upstream never sees it. In
    process (httpx's ASGI transport, which sets the client's address), with the openai SDK."""
    from abproxy.app import ABProxyApp
    from proxykit import make_config

    keyed = {"fake": {"base_url": upstream_url, "api_key": "sk-upstream-secret", "timeout_s": 5}}
    app = ABProxyApp(make_config(upstream_url, upstreams=keyed), redis_url=redis_server.url)
    messages = [{"role": "user", "content": "hello"}]

    async def ask(client_host: str) -> Any:
        transport = httpx2.ASGITransport(app=app, client=(client_host, 50_000))
        async with httpx2.AsyncClient(transport=transport, base_url="http://abproxy") as http_client:
            client = openai.AsyncOpenAI(base_url="http://abproxy/v1", api_key="any", http_client=http_client, max_retries=0)
            return await client.chat.completions.create(model="translation", messages=messages, user="relay-check")

    async def scenario() -> None:
        await app.startup()
        try:
            with pytest.raises(openai.PermissionDeniedError) as refused:
                await ask("203.0.113.7")
            assert refused.value.code == "open_relay_refused"
            assert "server.api_keys" in refused.value.message and "sk-upstream-secret" not in refused.value.message
            assert upstream.received == [], "the upstream never saw the refused request"
            answer = await ask("127.0.0.1")
            assert answer.choices[0].message.content, "a local client is served"
        finally:
            await app.shutdown()

    asyncio.run(scenario())
    from abproxy.proxy.auth import open_relay_upstreams

    assert open_relay_upstreams(make_config(upstream_url, upstreams=keyed)) == ("fake",)
    for server in ({"allow_open_relay": True}, {"api_keys": ["sk-client"]}):
        assert open_relay_upstreams(make_config(upstream_url, upstreams=keyed, server=server)) == (), server


@pytest.mark.slow
def test_cli_serve_refuses_open_relay_with_exit_code_2(tmp_path: Path):
    config = {
        "redis_url": "redis://127.0.0.1:1/0",
        "data_dir": str(tmp_path / "data"),
        "upstreams": {"openai": {"base_url": "https://api.openai.com/v1", "api_key": "sk-upstream-secret"}},
        "default_upstream": "openai",
    }
    path = tmp_path / "abproxy.yaml"
    path.write_text(yaml.safe_dump(config))
    done = subprocess.run(
        [sys.executable, "-m", "abproxy", "serve", "--config", str(path), "--host", "0.0.0.0", "--port", str(free_port())],
        capture_output=True, text=True, timeout=120, cwd=Path(__file__).resolve().parent.parent,
    )
    assert done.returncode == 2, (done.stdout, done.stderr)
    assert "allow_open_relay" in done.stderr
    assert "sk-upstream-secret" not in done.stderr + done.stdout


# -- 12. Prometheus --------------------------------------------------------------------------


def test_prometheus_counts_requests_by_experiment_variant_and_status(proxy):
    client = proxy.client()
    seen = Counter()
    for i in range(6):
        raw = client.chat.completions.with_raw_response.create(model="translation", messages=USER_ONLY, user=f"p-{i}")
        seen[variant_of(raw)] += 1
    client.chat.completions.create(model="gpt-4o-mini", messages=USER_ONLY)
    client.chat.completions.create(model="gpt-4o-mini", messages=USER_ONLY)
    client.chat.completions.create(model="totally-unknown-model-xyz", messages=USER_ONLY)
    proxy.settle()
    text = metrics_text(proxy.url)
    for variant, count in seen.items():
        assert sample(
            text, "abproxy_requests_total", experiment="translation", variant=variant, status="200"
        ) == count
    assert sample(text, "abproxy_requests_total", experiment="", variant="", status="200") == 3
    assert sample(text, "abproxy_request_duration_seconds_count", experiment="", variant="") == 3
    assert sum(
        sample(text, "abproxy_request_duration_seconds_count", experiment="translation", variant=v) for v in seen
    ) == 6
    for variant in seen:
        assert sample(text, "abproxy_tokens_total", experiment="translation", variant=variant, kind="completion") > 0
    assert "totally-unknown-model-xyz" not in text
    for name in ("abproxy_upstream_errors_total", "abproxy_recorder_dropped_total", "abproxy_flush_duration_seconds",
                 "abproxy_flush_last_success_timestamp_seconds", "abproxy_feedback_total",
                 "abproxy_time_to_first_token_seconds", "abproxy_cost_usd_total"):
        assert name in text, name


def test_prometheus_exposition_passes_promtool(proxy):
    client = proxy.client()
    client.chat.completions.create(model="translation", messages=USER_ONLY)
    list(client.chat.completions.create(model="translation", messages=USER_ONLY, stream=True))
    client.chat.completions.create(model="gpt-4o-mini", messages=USER_ONLY)
    with pytest.raises(openai.RateLimitError):
        client.chat.completions.create(model="translation", messages=USER_ONLY, extra_headers={"x-fake-status": "429"})
    proxy.settle()
    text = metrics_text(proxy.url)
    promtool = require_tool("promtool", "install Debian's prometheus package (.ci/run does)")
    done = subprocess.run([promtool, "check", "metrics"], input=text, capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stdout + done.stderr


# -- 13. live results ------------------------------------------------------------------------


def test_live_results_count_requests_and_latency_per_variant(proxy):
    client = proxy.client()
    n = 12
    seen = Counter()
    for i in range(n):
        raw = client.chat.completions.with_raw_response.create(model="translation", messages=USER_ONLY, user=f"live-{i}")
        seen[variant_of(raw)] += 1
    proxy.settle()
    results = live_results(proxy)
    assert results["experiment"] == "translation"
    assert results["primary_metric"] == "feedback.satisfaction"
    by_name = {v["name"]: v for v in results["variants"]}
    assert set(by_name) == {"basic", "professional"}
    assert by_name["basic"]["control"] is True and by_name["professional"]["control"] is False
    assert sum(v["requests"] for v in by_name.values()) == n
    for name, variant in by_name.items():
        assert variant["requests"] == seen[name], (name, variant, seen)
        assert variant["errors"] == 0
        latency = variant["metrics"]["latency_ms"]
        assert latency["n"] == seen[name]
        if seen[name]:
            assert latency["mean"] > 0
            assert 0 < latency["p50"] <= latency["p95"]
    assert sum(v["metrics"]["latency_ms"]["n"] for v in by_name.values()) == n


def test_live_results_leave_forced_requests_out(proxy):
    client = proxy.client()
    for _ in range(3):
        client.chat.completions.create(model="translation", messages=USER_ONLY, extra_headers={"X-ABProxy-Variant": "basic"})
    client.chat.completions.create(model="translation", messages=USER_ONLY, user="not-forced")
    proxy.settle()
    assert sum(v["requests"] for v in live_results(proxy)["variants"]) == 1


def test_admin_paths_refuse_dot_segments_as_v1_paths_do(served_proxy):
    for path in (
        "/abproxy/experiments/../experiments",
        "/abproxy/experiments/%2e%2e/experiments",
        "/abproxy/experiments/%2E%2E",
        "/abproxy/./experiments",
        "/abproxy/experiments/./translation",
        "/abproxy/experiments/translation/../promote",
    ):
        assert_openai_error(http("GET", f"{served_proxy.url}{path}"), 400, "invalid_path")
    assert_openai_error(http("POST", f"{served_proxy.url}/abproxy/experiments/../flush", b"{}"), 400, "invalid_path")
    # a dot inside a name is no dot segment
    assert_openai_error(http("GET", f"{served_proxy.url}/abproxy/experiments/v1.2"), 404, "experiment_not_found")


def test_live_results_for_unknown_experiment_is_404(proxy):
    assert_openai_error(http("GET", f"{proxy.url}/abproxy/experiments/nope"), 404)
    listing = http("GET", f"{proxy.url}/abproxy/experiments")
    assert listing.status == 200
    assert {e["experiment"] for e in listing.json()["experiments"]} == {"translation", "sentiment"}
