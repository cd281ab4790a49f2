import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from abproxy.proxy.sse import StreamObserver


def _chunk(content=None, usage=None, choices=True, id_="chatcmpl-1"):
    payload = {"id": id_, "object": "chat.completion.chunk", "choices": []}
    if choices:
        payload["choices"] = [{"index": 0, "delta": {"content": content} if content is not None else {}}]
    if usage is not None:
        payload["usage"] = usage
    return b"data: " + orjson.dumps(payload) + b"\n\n"


def _stream(include_usage=True):
    events = [_chunk(""), _chunk("Hello"), _chunk(" world"), _chunk(None)]
    if include_usage:
        events.append(_chunk(usage={"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}, choices=False))
    events.append(b"data: [DONE]\n\n")
    return b"".join(events)


def test_events_split_across_reads_are_forwarded_whole_and_measured():
    ticks = iter(range(100))
    observer = StreamObserver("chat", strip_usage_chunk=False, clock=lambda: float(next(ticks)))
    raw = _stream()
    forwarded = b"".join(observer.feed(raw[i : i + 7]) for i in range(0, len(raw), 7)) + observer.remainder()
    assert forwarded == raw
    assert "".join(observer.text_parts) == "Hello world"
    assert observer.usage == {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}
    assert observer.response_id == "chatcmpl-1"
    assert observer.done
    assert observer.first_content_at is not None


def test_usage_chunk_the_proxy_asked_for_is_stripped():
    observer = StreamObserver("chat", strip_usage_chunk=True)
    forwarded = observer.feed(_stream())
    assert forwarded == _stream(include_usage=False)
    assert observer.usage["total_tokens"] == 5


def test_crlf_separated_events_and_non_json_data_pass_through():
    observer = StreamObserver("chat", strip_usage_chunk=True)
    raw = b": keep-alive\r\n\r\ndata: not json\r\n\r\n" + _chunk("x").replace(b"\n\n", b"\r\n\r\n")
    assert observer.feed(raw) == raw
    assert observer.text_parts == ["x"]


def test_responses_api_events_give_text_usage_and_id():
    observer = StreamObserver("responses", strip_usage_chunk=False)
    events = [
        {"type": "response.created", "response": {"id": "resp_1", "usage": None}},
        {"type": "response.output_text.delta", "delta": "Hi"},
        {"type": "response.output_text.delta", "delta": " there"},
        {"type": "response.completed", "response": {"id": "resp_1", "usage": {"input_tokens": 2, "output_tokens": 2}}},
    ]
    raw = b"".join(b"event: " + e["type"].encode() + b"\ndata: " + orjson.dumps(e) + b"\n\n" for e in events)
    assert observer.feed(raw) == raw
    assert "".join(observer.text_parts) == "Hi there"
    assert observer.response_id == "resp_1" and observer.usage == {"input_tokens": 2, "output_tokens": 2}
    assert observer.done


def test_a_stream_without_its_end_marker_or_with_an_error_event_did_not_end_well():
    cut = StreamObserver("chat", strip_usage_chunk=False)
    cut.feed(_chunk("Hello") + _chunk(" world"))
    assert not cut.done and not cut.ended_well

    errored = StreamObserver("chat", strip_usage_chunk=False)
    errored.feed(_chunk("Hello") + b'data: {"error": {"message": "overloaded", "type": "server_error"}}\n\n')
    errored.feed(b"data: [DONE]\n\n")
    assert errored.done and errored.failed and not errored.ended_well

    failed = StreamObserver("responses", strip_usage_chunk=False)
    failed.feed(b'event: response.failed\ndata: {"type": "response.failed", "response": {"id": "resp_1"}}\n\n')
    assert failed.done and not failed.ended_well

    whole = StreamObserver("chat", strip_usage_chunk=False)
    whole.feed(_stream())
    assert whole.ended_well


def test_a_body_without_event_separators_is_passed_on_not_hoarded():
    from abproxy.proxy.sse import MAX_EVENT_BYTES

    observer = StreamObserver("chat", strip_usage_chunk=False)
    blob = b"x" * (MAX_EVENT_BYTES + 10)
    assert observer.feed(blob) == blob
    assert observer.remainder() == b""


@settings(max_examples=300, deadline=None)
@given(
    words=st.lists(st.text(alphabet="ab \n\"é", max_size=4), min_size=1, max_size=6),
    crlf=st.lists(st.booleans(), min_size=8, max_size=8),
    cuts=st.lists(st.integers(min_value=0, max_value=400), max_size=6),
)
@pytest.mark.slow
def test_however_the_stream_is_cut_and_separated_the_client_gets_the_same_events(words, crlf, cuts):
    """Reads split anywhere, LF and CRLF separators mixed: the forwarded bytes are the upstream's
    with the usage chunk and the `"usage":null` fields removed, and the text is all there."""
    usage = {"prompt_tokens": 3, "completion_tokens": len(words), "total_tokens": 3 + len(words)}
    events = [b": keep-alive"] + [_chunk(w, usage=None)[:-2].replace(b',"usage"', b"") for w in words]
    events = [e.replace(b'"choices"', b'"usage":null,"choices"') if e.startswith(b"data") else e for e in events]
    usage_event = _chunk(usage=usage, choices=False)[:-2]
    separators = [b"\r\n\r\n" if flag else b"\n\n" for flag in crlf]
    stream = events + [usage_event, b"data: [DONE]"]
    raw = b"".join(event + separators[i % len(separators)] for i, event in enumerate(stream))
    expected = b"".join(
        event.replace(b'"usage":null,', b"") + separators[i % len(separators)]
        for i, event in enumerate(stream)
        if event is not usage_event
    )
    observer = StreamObserver("chat", strip_usage_chunk=True)
    points = sorted({c for c in cuts if c < len(raw)} | {0, len(raw)})
    forwarded = b"".join(observer.feed(raw[a:b]) for a, b in zip(points, points[1:])) + observer.remainder()
    assert forwarded == expected.replace(b',"usage":null', b"")
    assert "".join(observer.text_parts) == "".join(words)
    assert observer.usage == usage
    assert observer.ended_well
