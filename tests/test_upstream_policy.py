"""The border to the upstreams (:mod:`abproxy.upstream.policy`), called in process: which headers
cross it each way, which upstream answers a client could not use, what a failure becomes for the
client and the metrics, and how failures are logged."""

from __future__ import annotations

import asyncio
import logging
import socket

import pytest

from abproxy.config import parse_config
from abproxy.upstream import policy
from abproxy.upstream.errors import UpstreamBadResponse, UpstreamDisconnected, UpstreamResponseTooLarge
from abproxy.upstream.policy import (
    REASONS,
    WARN_EVERY_S,
    FailureLog,
    Upstreams,
    check_generation_answer,
    check_generation_body,
    error_reason,
    response_headers,
    translate_failure,
)
from abproxy.wire import HTTPError

Headers = list[tuple[bytes, bytes]]

CLIENT_HEADERS: Headers = [
    (b"host", b"proxy.local"),
    (b"content-length", b"42"),
    (b"content-type", b"application/json"),
    (b"connection", b"keep-alive"),
    (b"keep-alive", b"timeout=5"),
    (b"transfer-encoding", b"chunked"),
    (b"te", b"trailers"),
    (b"upgrade", b"h2c"),
    (b"expect", b"100-continue"),
    (b"accept-encoding", b"gzip"),
    (b"proxy-authorization", b"Basic cHJveHk6cHc="),
    (b"authorization", b"Bearer sk-client"),
    (b"x-abproxy-variant", b"professional"),
    (b"x-abproxy-user", b"u1"),
    (b"openai-organization", b"org-1"),
    (b"user-agent", b"OpenAI/Python 1.0"),
    (b"x-stainless-retry-count", b"0"),
]


def upstreams(forward_client_authorization: bool) -> Upstreams:
    config = parse_config(
        {
            "upstreams": {
                "keyed": {"base_url": "https://user:hunter2@api.example.com/v1", "api_key": "sk-proxy"},
                "keyless": {"base_url": "http://localhost:8000/v1"},
            },
            "default_upstream": "keyed",
        },
        environ={},
    )
    return Upstreams(config, forward_client_authorization=forward_client_authorization)


def names(headers: Headers) -> set[bytes]:
    return {name for name, _ in headers}


def as_client_error(error: UpstreamBadResponse) -> HTTPError:
    http_error, reason = translate_failure(error, "openai")
    assert reason == "bad_response"
    return http_error


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def warnings(caplog: pytest.LogCaptureFixture) -> pytest.LogCaptureFixture:
    caplog.set_level(logging.WARNING, logger="abproxy.upstream")
    return caplog


def messages(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [record.getMessage() for record in caplog.records if record.name == "abproxy.upstream"]


def test_hop_by_hop_and_encoding_headers_from_the_upstream_are_not_passed_to_the_client() -> None:
    raw = [
        (b"connection", b"close"),
        (b"keep-alive", b"timeout=5"),
        (b"transfer-encoding", b"chunked"),
        (b"content-length", b"123"),
        (b"content-encoding", b"gzip"),
        (b"proxy-authenticate", b"Basic"),
        (b"trailer", b"x-checksum"),
        (b"upgrade", b"websocket"),
    ]
    assert response_headers(raw) == []


def test_headers_the_upstreams_connection_header_names_are_hop_by_hop_and_not_passed_on() -> None:
    raw = [
        (b"content-type", b"application/json"),
        (b"connection", b"keep-alive, X-Upstream-Session , x-hop"),
        (b"x-upstream-session", b"s-1"),
        (b"x-hop", b"1"),
        (b"x-request-id", b"req-1"),
    ]
    assert response_headers(raw) == [(b"content-type", b"application/json"), (b"x-request-id", b"req-1")]


def test_an_upstream_cannot_set_the_proxys_own_x_abproxy_headers_for_the_client() -> None:
    raw = [(b"x-abproxy-variant", b"other"), (b"x-abproxy-experiment", b"x"), (b"x-request-id", b"req-1")]
    assert response_headers(raw) == [(b"x-request-id", b"req-1")]


def test_the_upstreams_other_headers_reach_the_client_in_order_and_unchanged() -> None:
    raw = [
        (b"content-type", b"application/json"),
        (b"x-request-id", b"req-1"),
        (b"openai-processing-ms", b"120"),
        (b"x-ratelimit-remaining-requests", b"99"),
        (b"set-cookie", b"a=1"),
        (b"set-cookie", b"b=2"),
    ]
    assert response_headers([(b"connection", b"close"), *raw]) == raw


@pytest.mark.parametrize("status", [301, 302, 303, 307, 308])
@pytest.mark.parametrize("streaming", [False, True])
def test_a_redirect_where_a_generation_was_expected_is_a_502_upstream_bad_response(status: int, streaming: bool) -> None:
    with pytest.raises(UpstreamBadResponse) as caught:
        check_generation_answer(status, "text/html", streaming)
    error = as_client_error(caught.value)
    assert (error.status, error.code, error.error_type) == (502, "upstream_bad_response", "upstream_error")
    assert f"redirect ({status})" in error.message


@pytest.mark.parametrize(("status", "content_type"), [(200, "application/json"), (200, "text/plain"), (201, ""), (204, "")])
def test_a_success_to_a_stream_request_that_is_not_an_event_stream_is_a_502_naming_what_came(
    status: int, content_type: str
) -> None:
    with pytest.raises(UpstreamBadResponse) as caught:
        check_generation_answer(status, content_type, streaming=True)
    error = as_client_error(caught.value)
    assert (error.status, error.code) == (502, "upstream_bad_response")
    assert (content_type or "no content-type") in error.message


@pytest.mark.parametrize(
    ("status", "content_type", "streaming"),
    [
        (200, "text/event-stream", True),
        (200, "application/json", False),
        (400, "application/json", True),
        (429, "application/json", True),
        (500, "text/html", True),
        (503, "", False),
    ],
)
def test_usable_generation_answers_and_upstream_errors_pass_the_check(status: int, content_type: str, streaming: bool) -> None:
    check_generation_answer(status, content_type, streaming)


@pytest.mark.parametrize(
    "body",
    [b"", b"   \n", b"<html>oops</html>", b"OK", b"{", b"}", b"[{}]", b'"{}"', b'{"a": 1} trailing', b"\xef\xbb\xbf{}"],
)
def test_a_whole_success_that_is_not_a_json_object_is_a_502_upstream_bad_response(body: bytes) -> None:
    with pytest.raises(UpstreamBadResponse) as caught:
        check_generation_body(200, body)
    error = as_client_error(caught.value)
    assert (error.status, error.code) == (502, "upstream_bad_response")
    assert "not JSON" in error.message


@pytest.mark.parametrize("body", [b"{}", b'{"id": "chatcmpl-1"}', b' \r\n\t{"id": 1}\n\n ', b"{\n}"])
def test_a_whole_success_that_is_a_json_object_passes_even_with_blank_padding(body: bytes) -> None:
    check_generation_body(200, body)


@pytest.mark.parametrize(("status", "body"), [(400, b"Bad Request"), (429, b""), (500, b"<html>500</html>")])
def test_an_error_status_body_is_passed_on_whatever_it_holds(status: int, body: bytes) -> None:
    check_generation_body(status, body)


@pytest.mark.parametrize(
    ("status", "reason"),
    [(429, "rate_limited"), (400, "http_4xx"), (401, "http_4xx"), (404, "http_4xx"), (500, "http_5xx"), (503, "http_5xx")],
)
def test_an_upstream_error_status_is_counted_under_its_reason(status: int, reason: str) -> None:
    assert error_reason(status) == reason
    assert reason in REASONS


@pytest.mark.parametrize(
    ("error", "status", "code", "reason"),
    [
        (TimeoutError(), 504, "upstream_timeout", "timeout"),
        (asyncio.TimeoutError(), 504, "upstream_timeout", "timeout"),
        (socket.timeout("timed out"), 504, "upstream_timeout", "timeout"),
        (ConnectionRefusedError(111, "Connection refused"), 502, "upstream_unreachable", "unreachable"),
        (ConnectionResetError(104, "Connection reset by peer"), 502, "upstream_unreachable", "unreachable"),
        (socket.gaierror(-2, "Name or service not known"), 502, "upstream_unreachable", "unreachable"),
        (OSError(101, "Network is unreachable"), 502, "upstream_unreachable", "unreachable"),
        (UpstreamDisconnected("closed early"), 502, "upstream_unreachable", "unreachable"),
        (UpstreamBadResponse("malformed status line"), 502, "upstream_bad_response", "bad_response"),
        (UpstreamResponseTooLarge("body over 100 bytes"), 502, "upstream_response_too_large", "too_large"),
    ],
    ids=lambda value: type(value).__name__ if isinstance(value, BaseException) else None,
)
def test_a_failed_upstream_call_becomes_the_clients_error_and_the_metrics_reason(
    error: BaseException, status: int, code: str, reason: str
) -> None:
    http_error, counted = translate_failure(error, "openai")
    assert (http_error.status, http_error.code, http_error.error_type, counted) == (status, code, "upstream_error", reason)
    assert "'openai'" in http_error.message
    assert counted in REASONS


def test_what_the_upstream_sent_wrong_is_told_to_the_client() -> None:
    http_error, _ = translate_failure(UpstreamResponseTooLarge("response body exceeds 100 bytes"), "openai")
    assert "response body exceeds 100 bytes" in http_error.message
    http_error, _ = translate_failure(UpstreamBadResponse("status 999 out of range"), "openai")
    assert "status 999 out of range" in http_error.message


@pytest.mark.parametrize(
    "error",
    [
        TimeoutError("connect to https://sk-secret@api.example.com timed out"),
        ConnectionRefusedError(111, "refused: Bearer sk-secret"),
        OSError("sk-secret"),
        UpstreamDisconnected("authorization: Bearer sk-secret"),
    ],
)
def test_the_clients_error_message_for_a_failure_never_contains_an_api_key(error: BaseException) -> None:
    http_error, _ = translate_failure(error, "openai")
    assert "sk-secret" not in http_error.message
    assert "sk-secret" not in http_error.body().decode()


def test_a_failure_is_logged_at_once_with_the_upstream_its_host_and_what_went_wrong(
    warnings: pytest.LogCaptureFixture,
) -> None:
    log = FailureLog({"openai": "api.openai.com"}, clock=Clock())
    log.failed("openai", "unreachable", ConnectionRefusedError(111, "Connection refused"))
    [message] = messages(warnings)
    assert "'openai'" in message and "api.openai.com" in message
    assert "is unreachable" in message and "connection refused" in message


@pytest.mark.parametrize(
    ("error", "said"),
    [
        (socket.gaierror(-2, "Name or service not known"), "DNS lookup failed"),
        (TimeoutError(), "TimeoutError"),
        (TimeoutError("read timed out after 5 s"), "read timed out after 5 s"),
        (UpstreamDisconnected("closed early"), "closed early"),
        (ValueError("odd"), "ValueError: odd"),
    ],
)
def test_the_logged_failure_says_what_went_wrong_in_words_an_operator_can_act_on(
    warnings: pytest.LogCaptureFixture, error: BaseException, said: str
) -> None:
    FailureLog({"openai": "api.openai.com"}, clock=Clock()).failed("openai", "unreachable", error)
    [message] = messages(warnings)
    assert f"is unreachable: {said}" in message


def test_repeated_failures_are_logged_once_per_interval_then_with_how_many_were_left_out(
    warnings: pytest.LogCaptureFixture,
) -> None:
    clock = Clock()
    log = FailureLog({"openai": "api.openai.com"}, every_s=10.0, clock=clock)
    for _ in range(5):
        log.failed("openai", "timeout", TimeoutError())
        clock.now += 1.0
    assert len(messages(warnings)) == 1
    clock.now += 5.0
    log.failed("openai", "timeout", TimeoutError())
    first, second = messages(warnings)
    assert "more like it" not in first
    assert second.endswith("; 4 more like it since the last warning")


def test_the_default_interval_between_warnings_is_warn_every_s(warnings: pytest.LogCaptureFixture) -> None:
    clock = Clock()
    log = FailureLog({"openai": "api.openai.com"}, clock=clock)
    log.failed("openai", "unreachable", ConnectionRefusedError())
    clock.now += WARN_EVERY_S - 0.01
    log.failed("openai", "unreachable", ConnectionRefusedError())
    assert len(messages(warnings)) == 1
    clock.now += 0.01
    log.failed("openai", "unreachable", ConnectionRefusedError())
    assert len(messages(warnings)) == 2


def test_another_upstream_or_another_reason_is_logged_despite_a_recent_warning(warnings: pytest.LogCaptureFixture) -> None:
    log = FailureLog({"openai": "api.openai.com", "local": "localhost:8000"}, clock=Clock())
    log.failed("openai", "timeout", TimeoutError())
    log.failed("openai", "unreachable", ConnectionRefusedError())
    log.failed("local", "timeout", TimeoutError())
    log.failed("openai", "timeout", TimeoutError())
    assert len(messages(warnings)) == 3


def test_a_failure_of_an_unknown_upstream_or_reason_is_still_logged(warnings: pytest.LogCaptureFixture) -> None:
    FailureLog({}, clock=Clock()).failed("ghost", "something_new", OSError("boom"))
    [message] = messages(warnings)
    assert "'ghost' (?)" in message and "something_new" in message


def test_the_logged_host_of_an_upstream_leaves_out_credentials_in_its_url(warnings: pytest.LogCaptureFixture) -> None:
    upstreams(forward_client_authorization=False).failed("keyed", "unreachable", ConnectionRefusedError())
    [message] = messages(warnings)
    assert "(api.example.com)" in message
    assert "hunter2" not in message and "user:" not in message


@pytest.mark.parametrize("forward", [False, True])
def test_the_clients_authorization_is_dropped_when_the_proxy_holds_a_key_for_the_upstream(forward: bool) -> None:
    forwarded = upstreams(forward)._forwarded("keyed", CLIENT_HEADERS, policy._REQUEST_HEADERS_DROPPED)
    assert b"authorization" not in names(forwarded)


def test_the_clients_authorization_reaches_a_keyless_upstream_when_forwarding_is_set() -> None:
    forwarded = upstreams(True)._forwarded("keyless", CLIENT_HEADERS, policy._REQUEST_HEADERS_DROPPED)
    assert [value for name, value in forwarded if name == b"authorization"] == [b"Bearer sk-client"]


def test_the_clients_authorization_never_reaches_an_upstream_when_forwarding_is_off() -> None:
    forwarded = upstreams(False)._forwarded("keyless", CLIENT_HEADERS, policy._REQUEST_HEADERS_DROPPED)
    assert b"authorization" not in names(forwarded)


@pytest.mark.parametrize("upstream", ["keyed", "keyless"])
def test_hop_by_hop_proxy_and_own_headers_of_the_client_never_reach_the_upstream(upstream: str) -> None:
    forwarded = upstreams(True)._forwarded(upstream, CLIENT_HEADERS, policy._REQUEST_HEADERS_DROPPED)
    assert names(forwarded) & {
        b"host",
        b"content-length",
        b"connection",
        b"keep-alive",
        b"transfer-encoding",
        b"te",
        b"upgrade",
        b"expect",
        b"accept-encoding",
        b"proxy-authorization",
    } == set()
    assert not any(name.startswith(b"x-abproxy-") for name in names(forwarded))


def test_headers_the_clients_connection_header_names_never_reach_the_upstream() -> None:
    client = [(b"connection", b"close, X-Client-Hop"), (b"x-client-hop", b"1"), (b"openai-organization", b"org-1")]
    forwarded = upstreams(False)._forwarded("keyed", client, policy._REQUEST_HEADERS_DROPPED)
    assert forwarded == [(b"openai-organization", b"org-1")]


def test_a_pass_through_keeps_the_clients_content_type_and_other_headers_in_order() -> None:
    forwarded = upstreams(False)._forwarded("keyed", CLIENT_HEADERS, policy._REQUEST_HEADERS_DROPPED)
    assert forwarded == [
        (b"content-type", b"application/json"),
        (b"openai-organization", b"org-1"),
        (b"user-agent", b"OpenAI/Python 1.0"),
        (b"x-stainless-retry-count", b"0"),
    ]


def test_a_rewritten_generation_body_does_not_carry_the_clients_content_type() -> None:
    forwarded = upstreams(False)._forwarded("keyed", CLIENT_HEADERS, policy._JSON_HEADERS_DROPPED)
    assert b"content-type" not in names(forwarded)
    assert b"openai-organization" in names(forwarded)
