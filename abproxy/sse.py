"""Watching a server-sent-events stream as it passes: split it into events, note the time of
the first content token, collect the text and usage, and drop the usage chunk the proxy asked
for on its own account. Events are forwarded as soon as they are complete, never held back."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import orjson

_SEPARATORS = (b"\n\n", b"\r\n\r\n")
MAX_EVENT_BYTES = 1 << 20
"""An "event" longer than this is not SSE as we know it: pass it on rather than hold it."""


def _next_event_end(buffer: bytes | bytearray, start: int) -> tuple[int, int]:
    """(end of the event, length of its separator), or (-1, 0) when no event is complete."""
    best, size = -1, 0
    for separator in _SEPARATORS:
        index = buffer.find(separator, start)
        if index != -1 and (best == -1 or index < best):
            best, size = index, len(separator)
    return best, size


def _data_of(event: bytes) -> bytes | None:
    """The joined ``data:`` field of one event, or None when it has none."""
    lines = [line for line in event.splitlines() if line.startswith(b"data:")]
    if not lines:
        return None
    return b"\n".join(line[5:].lstrip(b" ") if line[5:6] == b" " else line[5:] for line in lines)


class StreamObserver:
    def __init__(self, endpoint: str, strip_usage_chunk: bool, clock: Callable[[], float] = time.perf_counter):
        self._endpoint = endpoint
        self._strip_usage_chunk = strip_usage_chunk
        self._clock = clock
        self._buffer = bytearray()
        self.first_content_at: float | None = None
        self.text_parts: list[str] = []
        self.usage: dict[str, Any] | None = None
        self.response_id: str | None = None
        self.done = False
        """The stream said it was complete (``[DONE]``, or ``response.completed`` and kin)."""
        self.failed = False
        """The upstream reported an error inside the stream."""

    def feed(self, data: bytes) -> bytes:
        """Take bytes from upstream; return the complete events to forward now."""
        self._buffer += data
        out = bytearray()
        start = 0
        while True:
            end, size = _next_event_end(self._buffer, start)
            if end == -1:
                break
            event = bytes(self._buffer[start : end + size])
            start = end + size
            if self._observe(event):
                out += self.forwardable(event)
        del self._buffer[:start]
        if len(self._buffer) > MAX_EVENT_BYTES:
            out += self._buffer
            self._buffer.clear()
        return bytes(out)

    def remainder(self) -> bytes:
        """Whatever trailing bytes never formed a complete event (forwarded as they are)."""
        rest = bytes(self._buffer)
        self._buffer.clear()
        return rest

    def _observe(self, event: bytes) -> bool:
        """Record what the event says; False when the event must not reach the client."""
        data = _data_of(event)
        if data is None:
            return True
        if data == b"[DONE]":
            self.done = True
            return True
        try:
            payload = orjson.loads(data)
        except orjson.JSONDecodeError:
            return True
        if not isinstance(payload, dict):
            return True
        if "error" in payload and payload["error"]:
            self.failed = True
            return True
        if self._endpoint == "responses":
            self._observe_responses_event(payload)
            return True
        if self.response_id is None and isinstance(payload.get("id"), str):
            self.response_id = payload["id"]
        choices = payload.get("choices")
        usage = payload.get("usage")
        if isinstance(usage, dict):
            self.usage = usage
        if isinstance(choices, list):
            for choice in choices:
                text = self._choice_text(choice)
                if text:
                    if self.first_content_at is None:
                        self.first_content_at = self._clock()
                    self.text_parts.append(text)
        if self._strip_usage_chunk and usage is not None and not choices:
            return False
        return True

    def forwardable(self, event: bytes) -> bytes:
        """The event as the client should see it: without the ``"usage": null`` the upstream
        adds to every chunk once the proxy asked for usage on the client's behalf."""
        if self._strip_usage_chunk:
            return event.replace(b',"usage":null', b"").replace(b', "usage": null', b"")
        return event

    def _choice_text(self, choice: Any) -> str | None:
        if not isinstance(choice, dict):
            return None
        if self._endpoint == "completions":
            text = choice.get("text")
        else:
            delta = choice.get("delta")
            text = delta.get("content") if isinstance(delta, dict) else None
        return text if isinstance(text, str) else None

    @property
    def ended_well(self) -> bool:
        return self.done and not self.failed

    def _observe_responses_event(self, payload: dict[str, Any]) -> None:
        kind = payload.get("type")
        if kind == "error":
            self.failed = True
            return
        if kind == "response.output_text.delta":
            delta = payload.get("delta")
            if isinstance(delta, str) and delta:
                if self.first_content_at is None:
                    self.first_content_at = self._clock()
                self.text_parts.append(delta)
            return
        response = payload.get("response")
        if isinstance(response, dict):
            if self.response_id is None and isinstance(response.get("id"), str):
                self.response_id = response["id"]
            if isinstance(response.get("usage"), dict):
                self.usage = response["usage"]
            if kind in ("response.completed", "response.failed", "response.incomplete"):
                self.done = True
            if kind == "response.failed":
                self.failed = True
