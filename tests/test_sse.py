import orjson

from abproxy.sse import StreamObserver


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
    from abproxy.sse import MAX_EVENT_BYTES

    observer = StreamObserver("chat", strip_usage_chunk=False)
    blob = b"x" * (MAX_EVENT_BYTES + 10)
    assert observer.feed(blob) == blob
    assert observer.remainder() == b""
