"""One HTTP/1.1 connection to an upstream and the response read from it.

The response is parsed by httptools (llhttp, as uvicorn uses for the server side). A gzip body
is decoded by the reader, a slice at a time, never inside ``data_received``: a small compressed
body can expand a thousandfold, and decoding it in one call would stall every other request on
the event loop. The decoded size is capped (``server.max_response_bytes``), so memory stays
bounded whatever the upstream sends.
"""

from __future__ import annotations

import asyncio
import ssl
import time
import zlib
from collections import deque
from typing import Any, Protocol

import httptools

from abproxy.upstream.errors import UpstreamBadResponse, UpstreamDisconnected, UpstreamResponseTooLarge

PAUSE_READING_AT = 256 * 1024
"""A client that reads a stream slower than the upstream writes it: stop reading the upstream
socket past this many undelivered bytes, so memory stays bounded and TCP pushes back."""

DECODE_SLICE = 256 * 1024
"""Decoded bytes per decompression call: about a quarter of a millisecond of CPU."""

_BODYLESS_STATUSES = frozenset({204, 304})


class ConnectionOwner(Protocol):
    """What a connection needs of the origin whose connections it is one of
    (:class:`abproxy.upstream.client.Origin`): where to go back when idle, and whom to tell when lost."""

    ssl: ssl.SSLContext | None

    def put_idle(self, connection: Connection, now: float) -> None: ...

    def connection_lost(self) -> None: ...


class Connection(asyncio.Protocol):
    """One keep-alive TCP (or TLS) connection; serves one response at a time."""

    def __init__(self, origin: ConnectionOwner):
        self.origin = origin
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self.idle_since = 0.0
        self.response: UpstreamResponse | None = None
        self._parser = httptools.HttpResponseParser(self)
        self._writable: asyncio.Future[None] | None = None

    def close(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.close()

    async def drain(self) -> None:
        """Wait while the upstream is not taking what was written (a streamed request body)."""
        while self._writable is not None and not self.closed:
            await asyncio.shield(self._writable)

    # -- asyncio.Protocol ---------------------------------------------------------------------

    def connection_made(self, transport: Any) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        response = self.response
        if response is None:
            # Bytes on an idle connection (a server's 408 before it hangs up): never reuse it.
            self.close()
            return
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self.close()
            response.fail(UpstreamBadResponse("upstream switched protocols (101), which the proxy never asks for"))
        except httptools.HttpParserError as error:
            self.close()
            response.fail(UpstreamBadResponse(f"malformed HTTP response from upstream: {error}"))

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.origin.connection_lost()
        self.resume_writing()
        if self.response is not None:
            self.response.connection_lost()

    def pause_writing(self) -> None:
        if self._writable is None:
            self._writable = asyncio.get_running_loop().create_future()

    def resume_writing(self) -> None:
        waiter, self._writable = self._writable, None
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    # -- httptools callbacks ----------------------------------------------------------------

    def on_header(self, name: bytes, value: bytes) -> None:
        self.response.add_header(name.lower(), value)  # type: ignore[union-attr]

    def on_headers_complete(self) -> None:
        self.response.headers_complete(self._parser.get_status_code(), self._parser.should_keep_alive())  # type: ignore[union-attr]

    def on_body(self, body: bytes) -> None:
        self.response.feed(body)  # type: ignore[union-attr]

    def on_message_complete(self) -> None:
        response = self.response
        if response is not None and response.interim:
            response.interim = False  # the end of a 1xx: the final response follows
            return
        self.response = None
        if response is not None:
            response.message_complete()
        if response is not None and response.ended_cleanly and response.keep_alive and not self.closed:
            self.origin.put_idle(self, time.monotonic())
        else:
            self.close()


class UpstreamResponse:
    """The response of one exchange: status and headers once they arrived, then the body
    whole (:meth:`read`) or piece by piece as it arrives (``async for chunk in response``)."""

    def __init__(self, connection: Connection, timeout_s: float, *, idle_timeout: bool, max_body_bytes: int, bodyless: bool):
        self._connection = connection
        self._loop = asyncio.get_running_loop()
        self.status = 0
        self.raw_headers: list[tuple[bytes, bytes]] = []
        self.content_type = ""
        self.keep_alive = False
        self.interim = False
        self._bodyless = bodyless
        self._chunks: deque[bytes] = deque()
        """Body bytes as they arrived, still compressed when there is a decoder."""
        self._buffered = 0
        self._received = 0
        self._decoded = 0
        self._max_body = max_body_bytes
        self._paused = False
        # uvloop's TLS transport drops decrypted bytes it still holds when the peer closes while
        # reading is paused, so only plain-TCP streams are paused; a TLS stream is buffered (up
        # to the body limit).
        self._pausable = idle_timeout and connection.origin.ssl is None
        self._headers_done = False
        self._done = False
        self._error: BaseException | None = None
        self._waiter: asyncio.Future[None] | None = None
        self._length_known = False
        self._decoder: Any = None
        self._decoder_finished = False
        # One timer per exchange. For a stream it is a silence limit: every arrival moves the
        # deadline, and the timer, when it fires early, re-arms itself for the new deadline.
        self._timeout_s = timeout_s
        self._moving_deadline = idle_timeout
        self._deadline = 0.0
        self._timer: asyncio.TimerHandle | None = None

    def start_timer(self) -> None:
        """Called once the request is written: from then on the upstream has ``timeout_s``."""
        if self._done or self._error is not None:
            return
        self._deadline = self._loop.time() + self._timeout_s
        self._timer = self._loop.call_at(self._deadline, self._on_timer)

    # -- fed by the connection ----------------------------------------------------------------

    def add_header(self, name: bytes, value: bytes) -> None:
        self.raw_headers.append((name, value))
        if name == b"content-type":
            self.content_type = value.split(b";", 1)[0].strip().lower().decode("latin-1")
        elif name == b"content-length" or (name == b"transfer-encoding" and b"chunked" in value.lower()):
            self._length_known = True
        elif name == b"content-encoding":
            encoding = value.strip().lower()
            if encoding in (b"gzip", b"x-gzip"):
                self._decoder = zlib.decompressobj(wbits=16 + zlib.MAX_WBITS)
            elif encoding != b"identity":
                self._connection.close()
                self.fail(UpstreamBadResponse(f"upstream sent an unsupported content-encoding: {encoding.decode('latin-1')}"))

    def headers_complete(self, status: int, keep_alive: bool) -> None:
        if not 100 <= status <= 599:
            self._connection.close()
            self.fail(UpstreamBadResponse(f"upstream answered with status {status}, outside 100-599"))
            return
        if status < 200:
            # An interim response (100 Continue, 103 Early Hints) that RFC 9110 says a client
            # must accept unasked: forget its headers and wait for the final one.
            self.interim = True
            self.raw_headers = []
            self.content_type = ""
            self._decoder = None
            self._length_known = False
            return
        self.status = status
        self.keep_alive = keep_alive
        self._length_known = self._length_known or status in _BODYLESS_STATUSES
        self._headers_done = True
        self._touch()
        self._wake()
        if self._bodyless:
            # The answer to a HEAD request: its content-length describes a body that never
            # comes, which the parser would wait for; the connection is not reused.
            self._connection.close()
            self.message_complete()

    def feed(self, data: bytes) -> None:
        if self._done or self._error is not None:
            return
        self._received += len(data)
        if self._received > self._max_body:
            self._connection.close()
            self.fail(self._too_large())
            return
        self._chunks.append(data)
        self._buffered += len(data)
        if self._pausable and self._buffered > PAUSE_READING_AT and not self._paused:
            self._paused = True
            self._connection.transport.pause_reading()  # type: ignore[union-attr]
        self._touch()
        self._wake()

    @property
    def ended_cleanly(self) -> bool:
        return self._done and self._error is None

    def message_complete(self) -> None:
        if self._done or self._error is not None:
            return  # the body is already known to be bad; its end changes nothing
        self._done = True
        self._stop_timer()
        self._resume(force=True)  # the connection may go back to the pool: it must be reading again
        self._wake()

    def connection_lost(self) -> None:
        if self._done or self._error is not None:
            return
        if self._headers_done and not self._length_known:
            self.message_complete()  # a body delimited by the end of the connection
        else:
            self.fail(UpstreamDisconnected("upstream closed the connection before the response was complete"))

    def fail(self, error: BaseException) -> None:
        if self._done or self._error is not None:
            return
        self._error = error
        self._stop_timer()
        self._wake()

    def _too_large(self) -> UpstreamResponseTooLarge:
        return UpstreamResponseTooLarge(f"upstream response body exceeds {self._max_body} bytes")

    # -- timing -----------------------------------------------------------------------------

    def _touch(self) -> None:
        if self._moving_deadline:
            self._deadline = self._loop.time() + self._timeout_s

    def _on_timer(self) -> None:
        self._timer = None
        if self._done or self._error is not None:
            return
        if self._paused:
            # Not silence from the upstream: the proxy stopped reading for a slow client.
            self._deadline = self._loop.time() + self._timeout_s
        if self._moving_deadline and self._loop.time() < self._deadline:
            self._timer = self._loop.call_at(self._deadline, self._on_timer)
            return
        self._connection.close()
        self.fail(TimeoutError(f"no response from upstream within {self._timeout_s:g} s"))

    def _stop_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    # -- read by the proxy --------------------------------------------------------------------

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None:
            self._waiter = None
            if not waiter.done():
                waiter.set_result(None)

    async def _wait(self) -> None:
        self._waiter = self._loop.create_future()
        await self._waiter

    @property
    def headers_arrived(self) -> bool:
        return self._headers_done

    async def wait_headers(self) -> None:
        while not self._headers_done:
            if self._error is not None:
                raise self._error
            await self._wait()

    def _take(self) -> bytes:
        """Body bytes available now, decoded: everything that arrived, or one slice of it when
        the body is compressed (and, once it has all arrived, the decoder's last bytes)."""
        if self._decoder is None:
            if not self._chunks:
                return b""
            data = self._chunks[0] if len(self._chunks) == 1 else b"".join(self._chunks)
            self._chunks.clear()
            self._buffered = 0
            self._resume()
            return data
        while self._chunks:
            data = self._chunks.popleft()
            try:
                out = self._decoder.decompress(data, DECODE_SLICE)
            except zlib.error as error:
                raise self._reject(UpstreamBadResponse(f"upstream body could not be decompressed: {error}")) from None
            tail = self._decoder.unconsumed_tail
            if tail:
                self._chunks.appendleft(tail)
            self._buffered -= len(data) - len(tail)
            self._resume()
            if out:
                return self._count_decoded(out)
        self._resume()
        if self._done and not self._decoder_finished:
            self._decoder_finished = True
            out = self._decoder.flush()
            if not self._decoder.eof:
                raise self._reject(UpstreamBadResponse("upstream's compressed body ended before its compressed stream did"))
            return self._count_decoded(out)
        return b""

    def _count_decoded(self, out: bytes) -> bytes:
        self._decoded += len(out)
        if self._decoded > self._max_body:
            raise self._reject(self._too_large())
        return out

    def _reject(self, error: BaseException) -> BaseException:
        """A body found bad while decoding: the exchange ends with ``error``."""
        if not self._done:
            self._connection.close()  # once done, the connection may already serve another request
        self._error = error
        self._stop_timer()
        self._chunks.clear()
        return error

    @property
    def _finished(self) -> bool:
        return self._done and (self._decoder is None or self._decoder_finished)

    async def read(self) -> bytes:
        """The whole body."""
        self._pausable = False
        self._resume(force=True)
        parts: list[bytes] = []
        while True:
            if self._error is not None:
                raise self._error
            if self._decoder is None and not self._done:
                await self._wait()  # an uncompressed body is joined once, at its end
                continue
            piece = self._take()
            if piece:
                parts.append(piece)
                if self._decoder is not None:
                    await asyncio.sleep(0)  # other requests run between slices
                continue
            if self._finished:
                return parts[0] if len(parts) == 1 else b"".join(parts)
            if not self._done:
                await self._wait()

    def __aiter__(self) -> UpstreamResponse:
        return self

    async def __anext__(self) -> bytes:
        """Whatever arrived since the last call, as one piece (a slice, when compressed)."""
        while True:
            piece = self._take()
            if piece:
                return piece
            if self._error is not None:
                raise self._error
            if self._finished:
                raise StopAsyncIteration
            if not self._done:
                await self._wait()

    def _resume(self, force: bool = False) -> None:
        if self._paused and (force or self._buffered <= PAUSE_READING_AT):
            self._paused = False
            if self._connection.transport is not None:
                self._connection.transport.resume_reading()

    def release(self) -> None:
        """The proxy is done with the response: a connection still busy with it is closed.

        The error it kept is let go: raised from :meth:`read`, its traceback holds the reading
        frame, which holds this response and the body read so far (up to 64 MiB of a gzip
        bomb). Kept, they form a cycle only a full garbage collection frees, and the proxy
        collects rarely (:meth:`abproxy.app.ABProxyApp.startup`)."""
        self._stop_timer()
        self._error = None
        self._chunks.clear()
        if not self._done:
            connection = self._connection
            if connection.response is self:
                connection.response = None
            connection.close()
