"""What a finished response says: its generated text, usage and response id, from a JSON body
or from a stream's events. Run by the recorder, off the request path: the request path only
keeps the events' data (:class:`abproxy.proxy.sse.StreamObserver`)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import orjson

from abproxy.recording.outcome import Outcome


def loads_or_none(data: bytes) -> Any:
    """The JSON in ``data``, or None when it is not JSON."""
    try:
        return orjson.loads(data)
    except orjson.JSONDecodeError:
        return None


@dataclass(frozen=True, slots=True)
class StreamFacts:
    text_parts: list[str]
    usage: dict[str, Any] | None
    response_id: str | None


def interpret_stream(endpoint: str, payloads: Sequence[bytes]) -> StreamFacts:
    """The generated text, usage and response id of a stream, from its events' data — parsed in
    one ``orjson`` call when every event is JSON, one by one when some are not."""
    if not payloads:
        return StreamFacts([], None, None)
    try:
        events = orjson.loads(b"[" + b",".join(payloads) + b"]")
    except orjson.JSONDecodeError:
        events = [loads_or_none(data) for data in payloads]
    texts: list[str] = []
    usage: dict[str, Any] | None = None
    response_id: str | None = None
    for payload in events:
        if not isinstance(payload, dict):
            continue
        if endpoint == "responses":
            if payload.get("type") == "response.output_text.delta":
                delta = payload.get("delta")
                if isinstance(delta, str) and delta:
                    texts.append(delta)
                continue
            response = payload.get("response")
            if isinstance(response, dict):
                if response_id is None and isinstance(response.get("id"), str):
                    response_id = response["id"]
                if isinstance(response.get("usage"), dict):
                    usage = response["usage"]
            continue
        if response_id is None and isinstance(payload.get("id"), str) and payload["id"]:
            response_id = payload["id"]
        if isinstance(payload.get("usage"), dict):
            usage = payload["usage"]
        choices = payload.get("choices")
        if isinstance(choices, list):
            for choice in choices:
                text = _choice_text(endpoint, choice)
                if text:
                    texts.append(text)
    return StreamFacts(texts, usage, response_id)


def _choice_text(endpoint: str, choice: Any) -> str | None:
    if not isinstance(choice, dict):
        return None
    if endpoint == "completions":
        text = choice.get("text")
    else:
        delta = choice.get("delta")
        text = delta.get("content") if isinstance(delta, dict) else None
    return text if isinstance(text, str) else None


class ResponseFacts(NamedTuple):
    """What the recorder derives from a finished response (a tuple: made once per request)."""

    chars: int | None
    words: int | None
    prompt_tokens: int | None
    completion_tokens: int | None
    total_tokens: int | None
    response_id: str | None
    text: str | None
    """The generated text (kept only by reference: it is made anyway)."""


def _count(value: Any) -> int | None:
    """A token count as the upstream reported it, if it is one (not a bool, not negative)."""
    return value if type(value) is int and value >= 0 else None


def _tokens(usage: Any) -> tuple[int | None, int | None, int | None]:
    if not isinstance(usage, dict):
        return None, None, None
    prompt = _count(usage.get("prompt_tokens", usage.get("input_tokens")))
    completion = _count(usage.get("completion_tokens", usage.get("output_tokens")))
    reported_total = usage.get("total_tokens")
    if reported_total is None and prompt is not None and completion is not None:
        return prompt, completion, prompt + completion
    return prompt, completion, _count(reported_total)


def _list(value: Any) -> list[Any]:
    return value if isinstance(value, list) else []


def _json_response_text(endpoint: str, payload: dict[str, Any]) -> str:
    """The generated text of a JSON response, whatever odd shape the upstream gave it."""
    texts: list[str] = []
    if endpoint == "responses":
        for item in _list(payload.get("output")):
            if isinstance(item, dict) and item.get("type") == "message":
                for content in _list(item.get("content")):
                    if isinstance(content, dict) and isinstance(content.get("text"), str):
                        texts.append(content["text"])
        return "".join(texts)
    for choice in _list(payload.get("choices")):
        if not isinstance(choice, dict):
            continue
        if endpoint == "completions":
            text = choice.get("text")
        else:
            message = choice.get("message")
            text = message.get("content") if isinstance(message, dict) else None
        if isinstance(text, str):
            texts.append(text)
    return "".join(texts)


def response_facts(outcome: Outcome) -> ResponseFacts:
    """Response length, tokens and id from a JSON body or from a stream's events."""
    if outcome.streamed:
        stream = interpret_stream(outcome.endpoint, outcome.stream_payloads)
        text, usage, response_id = "".join(stream.text_parts), stream.usage, stream.response_id
    else:
        try:
            payload = orjson.loads(outcome.body or b"")
        except orjson.JSONDecodeError:
            payload = None
        if not isinstance(payload, dict):
            return ResponseFacts(None, None, None, None, None, None, None)
        text = _json_response_text(outcome.endpoint, payload)
        usage = payload.get("usage")
        response_id = payload.get("id") if isinstance(payload.get("id"), str) and payload["id"] else None
    prompt, completion, total = _tokens(usage)
    return ResponseFacts(len(text), len(text.split()), prompt, completion, total, response_id, text)
