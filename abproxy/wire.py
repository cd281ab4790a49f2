"""What the raw ASGI endpoints of the hot path (generation, pass-through, model list) put on and
take off the wire: request bodies read within limits, JSON sent, errors in OpenAI's shape. The rest
of the HTTP surface is Starlette's (:mod:`abproxy.routes`)."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from typing import Any

import orjson
from starlette.types import Scope

Headers = list[tuple[bytes, bytes]]
JSON_CONTENT_TYPE = (b"content-type", b"application/json")


class HTTPError(Exception):
    """An error the proxy answers itself, in OpenAI's error shape."""

    def __init__(
        self, status: int, message: str, code: str, error_type: str = "invalid_request_error", param: str | None = None
    ):
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code
        self.error_type = error_type
        self.param = param

    def body(self) -> bytes:
        return error_body(self.message, self.error_type, self.code, self.param)

    def sse_event(self) -> bytes:
        """The error as the last event of a stream whose headers are already sent: the OpenAI
        SDK raises ``APIError`` on an event whose data carries ``error``."""
        return b"data: " + self.body() + b"\n\n"


def error_body(message: str, error_type: str, code: str, param: str | None = None) -> bytes:
    return orjson.dumps({"error": {"message": message, "type": error_type, "param": param, "code": code}})


def parse_json_object(raw: bytes) -> dict[str, Any]:
    """A request body that must be a JSON object; 400 in OpenAI's shape otherwise."""
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError as error:
        raise HTTPError(400, f"request body is not valid JSON: {error}", "invalid_json") from None
    if not isinstance(body, dict):
        raise HTTPError(400, "request body must be a JSON object", "invalid_json")
    return body


def dump_json_object(body: dict[str, Any]) -> bytes:
    """A request body the proxy changed, as JSON again. orjson reads 1024 levels of nesting but
    writes only 254: a body in between is the client's error (400), not the proxy's (500)."""
    try:
        return orjson.dumps(body)
    except orjson.JSONEncodeError as error:
        raise HTTPError(400, f"request body is nested too deeply to forward: {error}", "invalid_json") from None


def header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope["headers"]:
        if key == name:
            return value.decode("latin-1")
    return None


def bearer_token(scope: Scope) -> str | None:
    value = header(scope, b"authorization")
    if value is None:
        return None
    scheme, _, token = value.partition(" ")
    return token.strip() if scheme.lower() == "bearer" and token.strip() else None


def refuse_dot_segments(path: str) -> None:
    """400 for a decoded path with ``.`` or ``..`` segments (``%2e%2e`` included): a server or
    client that resolves them would take the path for another one than the proxy routed."""
    segments = path.split("/")
    if "." in segments or ".." in segments:
        raise HTTPError(400, "path segments '.' and '..' are not allowed", "invalid_path")


def _too_large(limit: int) -> HTTPError:
    return HTTPError(413, f"request body exceeds {limit} bytes", "request_too_large")


def declared_length(scope: Scope, limit: int) -> int | None:
    """The body's ``content-length``, if the client sent one; 413 when it is over ``limit``."""
    declared = header(scope, b"content-length")
    # isdigit() alone takes '²' (latin-1 0xb2), which int() refuses
    length = int(declared) if declared is not None and declared.isascii() and declared.isdigit() else None
    if length is not None and length > limit:
        raise _too_large(limit)
    return length


class BodyReader:
    """A request body, message by message, never more than ``limit`` bytes in all."""

    __slots__ = ("_receive", "_limit", "_size", "done")

    def __init__(self, receive: Any, limit: int):
        self._receive = receive
        self._limit = limit
        self._size = 0
        self.done = False

    async def chunk(self) -> bytes:
        message = await self._receive()
        if message["type"] == "http.disconnect":
            raise ClientGone()
        chunk: bytes = message.get("body", b"")
        self._size += len(chunk)
        if self._size > self._limit:
            raise _too_large(self._limit)
        self.done = not message.get("more_body", False)
        return chunk

    async def rest(self, first: bytes) -> AsyncIterator[bytes]:
        """``first`` (what was read already), then every further chunk as it arrives."""
        yield first
        while not self.done:
            yield await self.chunk()


async def read_body(scope: Scope, receive: Any, limit: int) -> bytes:
    declared_length(scope, limit)
    reader = BodyReader(receive, limit)
    first = await reader.chunk()
    if reader.done:
        return first
    return b"".join([chunk async for chunk in reader.rest(first)])


class ClientGone(Exception):
    """The client disconnected before its request was read."""


async def send_bytes(send: Any, status: int, body: bytes, headers: Headers) -> None:
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [*headers, (b"content-length", str(len(body)).encode())],
        }
    )
    await send({"type": "http.response.body", "body": body})


async def send_json(send: Any, status: int, payload: Any, headers: Headers = ()) -> None:  # type: ignore[assignment]
    await send_bytes(send, status, orjson.dumps(payload), [JSON_CONTENT_TYPE, *headers])


async def send_error(send: Any, error: HTTPError, headers: Headers = ()) -> None:  # type: ignore[assignment]
    await send_bytes(send, error.status, error.body(), [JSON_CONTENT_TYPE, *headers])


class RequestIds:
    """Unguessable request ids (128 bits from the OS's CSPRNG), drawn in bulk: one
    ``os.urandom`` call per 256 ids instead of a system call per request."""

    _BATCH = 256

    def __init__(self) -> None:
        self._pool = b""
        self._offset = 0

    def next(self) -> str:
        if self._offset >= len(self._pool):
            self._pool = os.urandom(16 * self._BATCH)
            self._offset = 0
        start = self._offset
        self._offset += 16
        return self._pool[start : start + 16].hex()
