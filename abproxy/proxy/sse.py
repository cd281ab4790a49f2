"""Watching a server-sent-events stream as it passes: split it into events, note the time of
the first content token, and drop the usage chunk the proxy asked for on its own account.
Events are forwarded as soon as they are complete, never held back.

On the request path each event costs a few byte searches; the events' JSON is parsed once, in
one call, when the recorder interprets the stream (:func:`abproxy.recording.interpret.interpret_stream`), off that path.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from typing import Any

import orjson

from abproxy.recording.interpret import StreamFacts, interpret_stream, loads_or_none

_SEPARATORS = (b"\n\n", b"\r\n\r\n")
MAX_EVENT_BYTES = 1 << 20
"""An "event" longer than this is not SSE as we know it: pass it on rather than hold it."""

# Non-empty generated text in a chunk (an empty string, as in the first role chunk, does not count).
_FIRST_CONTENT = {
    "chat": re.compile(rb'"content"\s*:\s*"(?!")'),
    "completions": re.compile(rb'"text"\s*:\s*"(?!")'),
    "responses": re.compile(rb'"delta"\s*:\s*"(?!")'),
}
_USAGE_OBJECT = re.compile(rb'"usage"\s*:\s*\{')
_TEXT_DELTA_PREFIX = b'{"type":"response.output_text.delta"'
_RESPONSE_ENDS = ("response.completed", "response.failed", "response.incomplete")


def _next_event_end(buffer: bytes | bytearray, start: int) -> tuple[int, int]:
    """(end of the event, length of its separator), or (-1, 0) when no event is complete."""
    best, size = -1, 0
    for separator in _SEPARATORS:
        index = buffer.find(separator, start)
        if index != -1 and (best == -1 or index < best):
            best, size = index, len(separator)
    return best, size


def _data_of(event: bytes) -> bytes | None:
    """The joined ``data:`` field of one event (with or without its separator), or None when it
    has none."""
    if event.startswith(b"data: "):  # the usual one-line event, without the general parse
        if b"\n" not in event:
            return event[6:]
        if event.count(b"\n") == 2 and event.endswith(b"\n\n"):
            return event[6:-2]
    lines = [line for line in event.splitlines() if line.startswith(b"data:")]
    if not lines:
        return None
    return b"\n".join(line[5:].lstrip(b" ") if line[5:6] == b" " else line[5:] for line in lines)


class StreamObserver:
    def __init__(self, endpoint: str, strip_usage_chunk: bool, clock: Callable[[], float] = time.perf_counter):
        self._endpoint = endpoint
        self._strip_usage_chunk = strip_usage_chunk
        self._clock = clock
        self._first_content = _FIRST_CONTENT[endpoint]
        self._buffer = bytearray()
        self.payloads: list[bytes] = []
        """Every event's data, for :func:`interpret_stream`."""
        self.first_content_at: float | None = None
        self.done = False
        """The stream said it was complete (``[DONE]``, or ``response.completed`` and kin)."""
        self.failed = False
        """The upstream reported an error inside the stream."""
        self._interpreted: StreamFacts | None = None
        self._rewritten = False
        """An event of the current read was dropped or changed on its way to the client."""

    def feed(self, data: bytes) -> bytes:
        """Take bytes from upstream; return the complete events to forward now."""
        if b"\r" not in data and b"\r" not in self._buffer:
            return self._feed_lf(data)
        self._buffer += data
        out = bytearray()
        start = 0
        while True:
            end, size = _next_event_end(self._buffer, start)
            if end == -1:
                break
            event = bytes(self._buffer[start : end + size])
            start = end + size
            forwarded = self._observe(event)
            if forwarded is not None:
                out += self.forwardable(forwarded)
        del self._buffer[:start]
        if len(self._buffer) > MAX_EVENT_BYTES:
            out += self._buffer
            self._buffer.clear()
        return bytes(out)

    def _feed_lf(self, data: bytes) -> bytes:
        """The usual case, a chunk without CR: its complete events are found by one split and,
        unless one of them must be dropped, forwarded as the one piece they arrived in."""
        if self._buffer:
            data = bytes(self._buffer) + data
            self._buffer.clear()
        cut = data.rfind(b"\n\n")
        if cut == -1:
            self._buffer += data
            if len(self._buffer) > MAX_EVENT_BYTES:
                return self.remainder()
            return b""
        complete = data[: cut + 2]
        if cut + 2 < len(data):
            self._buffer += data[cut + 2 :]
        events = complete.split(b"\n\n")
        del events[-1]  # what follows the last separator: nothing
        self._rewritten = False
        forwarded = [self._observe(event) for event in events]
        if self._rewritten:  # an event was dropped or changed: the piece cannot go as it came
            complete = b"".join(kept + b"\n\n" for kept in forwarded if kept is not None)
        return self.forwardable(complete)

    def remainder(self) -> bytes:
        """Whatever trailing bytes never formed a complete event (forwarded as they are)."""
        rest = bytes(self._buffer)
        self._buffer.clear()
        return rest

    def forwardable(self, event: bytes) -> bytes:
        """The event as the client should see it: without the ``"usage": null`` the upstream
        adds to every chunk once the proxy asked for usage on the client's behalf."""
        if self._strip_usage_chunk:
            return event.replace(b',"usage":null', b"").replace(b', "usage": null', b"")
        return event

    @property
    def ended_well(self) -> bool:
        return self.done and not self.failed

    def _observe(self, event: bytes) -> bytes | None:
        """Note what the event says; return it as the client gets it (the same object when
        unchanged), or None when it must not reach the client."""
        data = _data_of(event)
        if data is None:
            return event
        if data == b"[DONE]":
            self.done = True
            return event
        self.payloads.append(data)
        self._interpreted = None
        if self.first_content_at is None and self._first_content.search(data):
            self.first_content_at = self._clock()
        if self._endpoint == "responses":
            if not data.startswith(_TEXT_DELTA_PREFIX):  # the few events that are not text
                self._observe_responses_event(loads_or_none(data))
            return event
        if b'"error"' in data:
            payload = loads_or_none(data)
            if isinstance(payload, dict) and payload.get("error"):
                self.failed = True
        if self._strip_usage_chunk and _USAGE_OBJECT.search(data):
            rewritten = self._without_usage(event, data)
            self._rewritten = self._rewritten or rewritten is not event
            return rewritten
        return event

    @staticmethod
    def _without_usage(event: bytes, data: bytes) -> bytes | None:
        """The usage the proxy asked for on the client's behalf, taken out again: the usage-only
        chunk is dropped; a chunk that also carries choices (as some servers send the last one)
        loses its ``usage`` field."""
        payload = loads_or_none(data)
        if not isinstance(payload, dict) or not isinstance(payload.get("usage"), dict):
            return event
        if not payload.get("choices"):
            return None
        del payload["usage"]
        separator = event[len(event.rstrip(b"\r\n")) :]  # as it came: with it, or without when split off
        return b"data: " + orjson.dumps(payload) + separator

    def _observe_responses_event(self, payload: Any) -> None:
        if not isinstance(payload, dict):
            return
        kind = payload.get("type")
        if kind == "error":
            self.failed = True
        elif kind in _RESPONSE_ENDS:
            self.done = True
            self.failed = self.failed or kind == "response.failed"

    # What the stream said, for tests and callers that want it now rather than from the recorder.

    def _facts(self) -> StreamFacts:
        if self._interpreted is None:
            self._interpreted = interpret_stream(self._endpoint, self.payloads)
        return self._interpreted

    @property
    def text_parts(self) -> list[str]:
        return self._facts().text_parts

    @property
    def usage(self) -> dict[str, Any] | None:
        return self._facts().usage

    @property
    def response_id(self) -> str | None:
        return self._facts().response_id
