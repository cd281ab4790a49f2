"""The proxy's own wire helpers (:mod:`abproxy.wire`), called in process with scripted ASGI
clients: request bodies read within limits, JSON in and out, errors in OpenAI's shape, request ids."""

from __future__ import annotations

import asyncio
import re
from collections.abc import Awaitable, Callable
from typing import Any

import orjson
import pytest

from abproxy.wire import (
    BodyReader,
    ClientGone,
    HTTPError,
    RequestIds,
    bearer_token,
    declared_length,
    dump_json_object,
    parse_json_object,
    read_body,
    refuse_dot_segments,
    send_error,
    send_json,
)

Message = dict[str, Any]


def scope(*headers: tuple[bytes, bytes]) -> dict[str, Any]:
    return {"type": "http", "headers": list(headers)}


def scripted_client(*messages: Message) -> tuple[Callable[[], Awaitable[Message]], list[Message]]:
    """An ASGI ``receive`` that hands out ``messages`` in order, and the list of those taken."""
    pending = list(messages)
    taken: list[Message] = []

    async def receive() -> Message:
        message = pending.pop(0)
        taken.append(message)
        return message

    return receive, taken


def body_part(data: bytes, more: bool) -> Message:
    return {"type": "http.request", "body": data, "more_body": more}


def recorder() -> tuple[Callable[[Message], Awaitable[None]], list[Message]]:
    sent: list[Message] = []

    async def send(message: Message) -> None:
        sent.append(message)

    return send, sent


def read(headers: tuple[tuple[bytes, bytes], ...], *messages: Message, limit: int = 100) -> bytes:
    receive, _ = scripted_client(*messages)
    return asyncio.run(read_body(scope(*headers), receive, limit))


def test_an_error_body_is_in_openai_error_shape() -> None:
    error = HTTPError(400, "bad thing", "bad_code", param="model")
    assert orjson.loads(error.body()) == {
        "error": {"message": "bad thing", "type": "invalid_request_error", "param": "model", "code": "bad_code"}
    }


def test_an_error_after_stream_headers_is_one_sse_event_whose_data_carries_the_error() -> None:
    event = HTTPError(502, "upstream broke", "broken_stream", "upstream_error").sse_event()
    assert event.startswith(b"data: ") and event.endswith(b"\n\n")
    assert event.count(b"\n\n") == 1
    assert orjson.loads(event[len(b"data: ") : -2])["error"]["code"] == "broken_stream"


def test_a_json_object_body_is_read_as_a_dict() -> None:
    assert parse_json_object(b'{"model": "m", "messages": []}') == {"model": "m", "messages": []}


@pytest.mark.parametrize(
    "raw",
    [b"", b"{", b"not json", b'{"a": NaN}', b'{"a": "\xff"}', b"[" * 1100 + b"]" * 1100],
    ids=["empty", "truncated", "text", "nan", "invalid-utf8", "nested-past-reading"],
)
def test_a_body_that_is_not_json_is_a_400_invalid_json(raw: bytes) -> None:
    with pytest.raises(HTTPError) as caught:
        parse_json_object(raw)
    assert (caught.value.status, caught.value.code) == (400, "invalid_json")
    assert caught.value.message.startswith("request body is not valid JSON")


@pytest.mark.parametrize("raw", [b"[]", b'"text"', b"42", b"null", b"true"])
def test_json_that_is_not_an_object_is_a_400_invalid_json(raw: bytes) -> None:
    with pytest.raises(HTTPError) as caught:
        parse_json_object(raw)
    assert (caught.value.status, caught.value.code) == (400, "invalid_json")
    assert "must be a JSON object" in caught.value.message


def test_a_body_the_proxy_changed_is_forwarded_as_the_same_json() -> None:
    body = {"model": "m", "messages": [{"role": "user", "content": "héllo"}], "n": 1, "t": 0.5}
    assert orjson.loads(dump_json_object(body)) == body


def test_nesting_that_reads_but_cannot_be_written_is_a_400_invalid_json_not_a_500() -> None:
    body = parse_json_object(b'{"messages": ' + b"[" * 300 + b"]" * 300 + b"}")
    with pytest.raises(HTTPError) as caught:
        dump_json_object(body)
    assert (caught.value.status, caught.value.code) == (400, "invalid_json")
    assert "nested too deeply" in caught.value.message


@pytest.mark.parametrize(
    "value",
    [b"Bearer sk-abc", b"bearer sk-abc", b"BEARER sk-abc", b"Bearer    sk-abc  ", b"bEaReR sk-abc\t"],
)
def test_a_bearer_token_with_odd_casing_or_whitespace_is_still_read(value: bytes) -> None:
    assert bearer_token(scope((b"authorization", value))) == "sk-abc"


@pytest.mark.parametrize("value", [b"Basic dXNlcjpwYXNz", b"Bearer", b"Bearer ", b"Bearer    ", b"sk-abc", b""])
def test_an_authorization_that_is_not_a_bearer_token_gives_no_token(value: bytes) -> None:
    assert bearer_token(scope((b"authorization", value))) is None


def test_a_request_without_authorization_gives_no_token() -> None:
    assert bearer_token(scope((b"content-type", b"application/json"))) is None


@pytest.mark.parametrize(
    "path",
    ["/v1/../abproxy/admin", "/v1/./models", "/v1/models/..", "/..", "/v1/files/./", "/v1//../x"],
)
def test_dot_segments_including_decoded_percent_encoded_ones_are_refused_with_400_invalid_path(path: str) -> None:
    with pytest.raises(HTTPError) as caught:
        refuse_dot_segments(path)
    assert (caught.value.status, caught.value.code) == (400, "invalid_path")


@pytest.mark.parametrize("path", ["/v1/models", "/v1/files/.hidden", "/v1/files/...", "/v1/files/a..b", "/v1/files/.x"])
def test_names_that_merely_contain_dots_are_allowed(path: str) -> None:
    refuse_dot_segments(path)


def test_a_declared_length_over_the_limit_is_a_413_naming_the_limit() -> None:
    with pytest.raises(HTTPError) as caught:
        declared_length(scope((b"content-length", b"101")), 100)
    assert (caught.value.status, caught.value.code) == (413, "request_too_large")
    assert "100 bytes" in caught.value.message
    assert orjson.loads(caught.value.body())["error"]["code"] == "request_too_large"


@pytest.mark.parametrize(
    ("value", "expected"), [(b"100", 100), (b"0", 0), (b"007", 7), (None, None), (b"abc", None), (b"-5", None), (b"\xb2", None), (b"1\xb9", None)]
)
def test_a_declared_length_within_the_limit_or_unreadable_is_not_refused(value: bytes | None, expected: int | None) -> None:
    headers = () if value is None else ((b"content-length", value),)
    assert declared_length(scope(*headers), 100) == expected


def test_a_body_sent_in_one_message_is_read_whole() -> None:
    assert read((), body_part(b'{"a": 1}', more=False)) == b'{"a": 1}'


def test_a_body_sent_in_several_messages_is_joined_in_order() -> None:
    parts = (body_part(b"ab", True), body_part(b"", True), body_part(b"cd", True), body_part(b"e", False))
    assert read(((b"content-length", b"5"),), *parts) == b"abcde"


def test_a_body_of_exactly_the_limit_is_accepted() -> None:
    assert read((), body_part(b"x" * 60, True), body_part(b"y" * 40, False)) == b"x" * 60 + b"y" * 40


def test_a_body_declared_over_the_limit_is_refused_before_any_of_it_is_read() -> None:
    receive, taken = scripted_client(body_part(b"x", False))
    with pytest.raises(HTTPError) as caught:
        asyncio.run(read_body(scope((b"content-length", b"1000")), receive, 100))
    assert caught.value.status == 413
    assert taken == []


def test_a_body_that_grows_past_the_limit_without_a_declared_length_is_a_413() -> None:
    receive, taken = scripted_client(body_part(b"x" * 60, True), body_part(b"x" * 41, True), body_part(b"x", False))
    with pytest.raises(HTTPError) as caught:
        asyncio.run(read_body(scope(), receive, 100))
    assert (caught.value.status, caught.value.code) == (413, "request_too_large")
    assert len(taken) == 2


def test_a_body_over_the_limit_is_a_413_even_when_its_declared_length_is_under_it() -> None:
    with pytest.raises(HTTPError) as caught:
        read(((b"content-length", b"10"),), body_part(b"x" * 101, False))
    assert caught.value.status == 413


def test_a_client_that_disconnects_mid_body_raises_client_gone() -> None:
    with pytest.raises(ClientGone):
        read((), body_part(b"half", True), {"type": "http.disconnect"})


def test_a_client_that_disconnects_before_any_body_raises_client_gone() -> None:
    with pytest.raises(ClientGone):
        read((), {"type": "http.disconnect"})


def test_a_streamed_pass_through_body_yields_what_was_read_first_then_the_rest_as_it_arrives() -> None:
    receive, _ = scripted_client(body_part(b"one", True), body_part(b"two", True), body_part(b"three", False))

    async def stream() -> list[bytes]:
        reader = BodyReader(receive, 100)
        first = await reader.chunk()
        return [chunk async for chunk in reader.rest(first)]

    assert asyncio.run(stream()) == [b"one", b"two", b"three"]


def test_json_is_sent_with_its_type_its_exact_length_and_the_extra_headers() -> None:
    send, sent = recorder()
    asyncio.run(send_json(send, 200, {"object": "list", "data": []}, [(b"x-abproxy-variant", b"basic")]))
    start, body = sent
    assert start["type"] == "http.response.start" and start["status"] == 200
    headers = dict(start["headers"])
    assert headers[b"content-type"] == b"application/json"
    assert headers[b"x-abproxy-variant"] == b"basic"
    assert body["type"] == "http.response.body"
    assert orjson.loads(body["body"]) == {"object": "list", "data": []}
    assert int(headers[b"content-length"]) == len(body["body"])


def test_an_error_is_sent_with_its_status_as_openai_shaped_json() -> None:
    send, sent = recorder()
    asyncio.run(send_error(send, HTTPError(404, "no such model", "model_not_found")))
    start, body = sent
    assert start["status"] == 404
    assert dict(start["headers"])[b"content-type"] == b"application/json"
    assert int(dict(start["headers"])[b"content-length"]) == len(body["body"])
    assert orjson.loads(body["body"])["error"] == {
        "message": "no such model",
        "type": "invalid_request_error",
        "param": None,
        "code": "model_not_found",
    }


def test_request_ids_are_32_hex_chars_and_never_repeat_across_a_few_thousand_draws() -> None:
    ids = RequestIds()
    drawn = [ids.next() for _ in range(3000)]
    assert all(re.fullmatch(r"[0-9a-f]{32}", request_id) for request_id in drawn)
    assert len(set(drawn)) == len(drawn)


def test_two_id_sources_do_not_hand_out_the_same_ids() -> None:
    first, second = RequestIds(), RequestIds()
    assert {first.next() for _ in range(300)}.isdisjoint(second.next() for _ in range(300))
