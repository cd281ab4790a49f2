"""What happened to one proxied request: captured on the request path as cheaply as possible,
interpreted later by the recorder, off the request path."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, NamedTuple

import orjson

from abproxy.sse import interpret_stream

CANCELLED_STATUS = 499
"""The status counted in Prometheus when the client went away first, or the request was cut
at shutdown (nginx's "client closed request"). An upstream's own 499 is not a cancellation."""


@dataclass(slots=True)
class ExperimentRoute:
    """Where an experiment request went: resolved on the request path."""

    experiment: str
    variant: str
    arm: str
    unit: str | None
    forced: bool


@dataclass(slots=True)
class Outcome:
    request_id: str
    endpoint: str
    upstream: str
    model: str
    started_at: float
    route: ExperimentRoute | None = None
    status: int = 0
    cancelled: bool = False
    """The client went away, or shutdown cut the request: neither a success nor an error."""
    error_reason: str | None = None
    latency_s: float = 0.0
    ttft_s: float | None = None
    streamed: bool = False
    body: bytes | None = None
    stream_payloads: list[bytes] = field(default_factory=list)
    """A stream's events' data, interpreted by the recorder."""

    def cancel(self) -> None:
        self.cancelled = True
        self.status = CANCELLED_STATUS

    @property
    def failed(self) -> bool:
        return not self.cancelled and (self.status >= 400 or self.error_reason is not None)


class ResponseFacts(NamedTuple):
    """What the recorder derives from a finished response (a tuple: made once per request)."""

    chars: int | None
    words: int | None
    prompt_tokens: int | None
    completion_tokens: int | None
    total_tokens: int | None
    response_id: str | None


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
            return ResponseFacts(None, None, None, None, None, None)
        text = _json_response_text(outcome.endpoint, payload)
        usage = payload.get("usage")
        response_id = payload.get("id") if isinstance(payload.get("id"), str) and payload["id"] else None
    prompt, completion, total = _tokens(usage)
    return ResponseFacts(len(text), len(text.split()), prompt, completion, total, response_id)
