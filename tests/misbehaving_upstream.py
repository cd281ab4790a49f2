"""An upstream that breaks the rules on purpose, on a real socket: each request's
``x-misbehave`` header picks what it answers, written as raw bytes. Runs in a thread with its
own event loop, so the proxy under test talks to it as to any server."""

from __future__ import annotations

import asyncio
import json
import struct
import threading
import zlib
from collections.abc import Awaitable, Callable

Writer = asyncio.StreamWriter
Answer = Callable[[Writer, bytes], Awaitable[None]]

REDIRECT_TARGET = "http://127.0.0.1:9/v1/chat/completions"
"""Where the ``redirect`` answer points: the discard port, where nothing listens here."""

READ_BODY_LATE_S = 2.0
"""How long the ``read-body-late`` answer leaves a request's body unread."""

BIG_JSON_BYTES = 60 << 20
"""The ``big-json`` answer's size: a completion just under ``server.max_response_bytes`` (64 MiB)."""

BOMB_DECODED_BYTES = 1 << 30
"""A 1 GiB body of spaces: about 1 MB once gzipped."""


def _json(status: bytes, body: bytes, *extra: bytes) -> bytes:
    head = b"HTTP/1.1 %s\r\ncontent-type: application/json\r\ncontent-length: %d\r\n" % (status, len(body))
    return head + b"".join(line + b"\r\n" for line in extra) + b"\r\n" + body


def _completion(text: str) -> bytes:
    return json.dumps(
        {
            "id": "chatcmpl-misbehaving",
            "object": "chat.completion",
            "created": 0,
            "model": "gpt-4o-mini",
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5},
        }
    ).encode()


def _chunk(content: str | None, *, usage: bool = False, finish: bool = False) -> bytes:
    choices = [] if content is None else [{"index": 0, "delta": {"content": content}, "finish_reason": "stop" if finish else None}]
    payload: dict = {"id": "chatcmpl-misbehaving", "object": "chat.completion.chunk", "created": 0, "model": "gpt-4o-mini", "choices": choices}
    if usage:
        payload["usage"] = {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}
    return b"data: " + json.dumps(payload).encode() + b"\n\n"


def gzip_bomb(decoded_bytes: int = BOMB_DECODED_BYTES) -> bytes:
    """A gzip body of ``decoded_bytes`` spaces, built in well under a second: after a full flush
    deflate forgets its history, so every further megabyte of spaces compresses to the same
    bytes, which are repeated rather than recomputed."""
    block = b" " * (1 << 20)
    blocks = decoded_bytes // len(block)
    deflate = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    first = deflate.compress(block) + deflate.flush(zlib.Z_FULL_FLUSH)
    repeated = deflate.compress(block) + deflate.flush(zlib.Z_FULL_FLUSH)
    crc = 0
    for _ in range(blocks):
        crc = zlib.crc32(block, crc)
    header = b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x02\xff"
    trailer = struct.pack("<II", crc, (blocks * len(block)) & 0xFFFFFFFF)
    return header + first + repeated * (blocks - 1) + deflate.flush() + trailer


class MisbehavingUpstream:
    """``url``: the base URL (with ``/v1``). ``received``: the ``x-misbehave`` of each request."""

    def __init__(self) -> None:
        self.received: list[str] = []
        self._bomb: bytes | None = None
        self._big: bytes | None = None
        self._loop = asyncio.new_event_loop()
        self._server: asyncio.Server | None = None
        self._thread = threading.Thread(target=self._loop.run_forever, name="misbehaving-upstream", daemon=True)
        self._answers: dict[str, Answer] = {
            "status-600": self._status_600,
            "status-499": self._status_499,
            "own-headers": self._own_headers,
            "gzip-bomb": self._gzip_bomb,
            "stream-without-done": self._stream_without_done,
            "stream-cut-by-close": self._stream_cut_by_close,
            "usage-on-last-choice": self._usage_on_last_choice,
            "redirect": self._redirect,
            "html-page": self._html_page,
            "json-that-is-not": self._json_that_is_not,
            "stream-not-sse": self._stream_not_sse,
            "read-body-late": self._read_body_late,
            "big-json": self._big_json,
        }

    def start(self) -> MisbehavingUpstream:
        self._thread.start()
        self._server = asyncio.run_coroutine_threadsafe(
            asyncio.start_server(self._serve, "127.0.0.1", 0), self._loop
        ).result(10)
        return self

    @property
    def url(self) -> str:
        assert self._server is not None
        return f"http://127.0.0.1:{self._server.sockets[0].getsockname()[1]}/v1"

    def stop(self) -> None:
        async def close() -> None:
            assert self._server is not None
            self._server.close()

        asyncio.run_coroutine_threadsafe(close(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)

    def bomb(self) -> bytes:
        if self._bomb is None:
            self._bomb = gzip_bomb()
        return self._bomb

    async def _serve(self, reader: asyncio.StreamReader, writer: Writer) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                lines = head.decode("latin-1").split("\r\n")
                headers = dict(line.lower().split(": ", 1) for line in lines[1:] if ": " in line)
                mode = headers.get("x-misbehave", "")
                if mode == "read-body-late":
                    await asyncio.sleep(READ_BODY_LATE_S)  # meanwhile TCP pushes back on the sender
                body = await reader.readexactly(int(headers.get("content-length", "0")))
                self.received.append(mode)
                await self._answers[mode](writer, body)
                await writer.drain()
                if writer.is_closing():
                    return
        except (asyncio.IncompleteReadError, ConnectionError, KeyError):
            pass
        finally:
            writer.close()

    async def _status_600(self, writer: Writer, body: bytes) -> None:
        writer.write(_json(b"600 Beyond", _completion("never seen")))

    async def _status_499(self, writer: Writer, body: bytes) -> None:
        error = json.dumps({"error": {"message": "client closed request", "type": "server_error", "code": None}})
        writer.write(_json(b"499 Client Closed Request", error.encode()))

    async def _own_headers(self, writer: Writer, body: bytes) -> None:
        writer.write(
            _json(b"200 OK", _completion("hello"), b"x-abproxy-variant: evil", b"X-ABProxy-Experiment: other", b"x-upstream-trace: kept")
        )

    async def _gzip_bomb(self, writer: Writer, body: bytes) -> None:
        bomb = self.bomb()
        writer.write(
            b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-encoding: gzip\r\ncontent-length: %d\r\n\r\n"
            % len(bomb)
        )
        writer.write(bomb)

    async def _stream_without_done(self, writer: Writer, body: bytes) -> None:
        events = _chunk("Hello") + _chunk(" world", finish=True)
        writer.write(
            b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ncontent-length: %d\r\n\r\n%s" % (len(events), events)
        )

    async def _stream_cut_by_close(self, writer: Writer, body: bytes) -> None:
        # Delimited by the connection's end (no length, not chunked): the close looks like an end.
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\nconnection: close\r\n\r\n")
        writer.write(_chunk("Hello") + _chunk(" wor"))
        await writer.drain()
        writer.close()

    async def _usage_on_last_choice(self, writer: Writer, body: bytes) -> None:
        # As LiteLLM's proxy answers: the usage the proxy asked for rides on the last chunk that
        # also carries choices, not on a separate `choices: []` chunk.
        events = _chunk("Hello") + _chunk(" world", usage=True, finish=True) + b"data: [DONE]\n\n"
        writer.write(
            b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ncontent-length: %d\r\n\r\n%s" % (len(events), events)
        )

    async def _redirect(self, writer: Writer, body: bytes) -> None:
        # Somewhere nothing listens: a client that follows it fails to connect.
        page = b"Moved"
        writer.write(
            b"HTTP/1.1 307 Temporary Redirect\r\nlocation: %s\r\ncontent-type: text/plain\r\ncontent-length: %d\r\n\r\n%s"
            % (REDIRECT_TARGET.encode(), len(page), page)
        )

    async def _html_page(self, writer: Writer, body: bytes) -> None:
        # What a captive portal or a misconfigured ingress answers, with a 200.
        page = b"<html><body><h1>Welcome</h1><p>Please sign in.</p></body></html>"
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/html\r\ncontent-length: %d\r\n\r\n%s" % (len(page), page))

    async def _json_that_is_not(self, writer: Writer, body: bytes) -> None:
        writer.write(_json(b"200 OK", b"upstream overloaded, try later"))

    async def _stream_not_sse(self, writer: Writer, body: bytes) -> None:
        page = b"<html><body>Please sign in.</body></html>"
        writer.write(
            b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ncontent-length: %d\r\n\r\n%s" % (len(page), page)
        )

    async def _read_body_late(self, writer: Writer, body: bytes) -> None:
        writer.write(_json(b"200 OK", json.dumps({"received": len(body)}).encode()))

    async def _big_json(self, writer: Writer, body: bytes) -> None:
        if self._big is None:
            self._big = _completion("x" * (BIG_JSON_BYTES - len(_completion(""))))
        writer.write(_json(b"200 OK", self._big))
