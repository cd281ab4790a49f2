"""A lean HTTP/1.1 client for the generation hot path.

aiohttp's general-purpose ``ClientSession`` spends about as many instructions per call as the
rest of a proxy together (URL objects, multidicts, payload registry, tracing hooks, timer
contexts). Forwarding a POST needs much less: keep-alive connections per upstream, the request
written in one piece, the response parsed by httptools (llhttp, as uvicorn uses for the server
side). aiohttp stays for the rarely used pass-through and model-list calls.

Errors keep the shapes the proxy already translates: ``TimeoutError`` for a timeout (504),
``OSError`` (``ConnectionError`` included) for anything else that breaks the exchange (502).
"""

from __future__ import annotations

import asyncio
import ssl
import time
import zlib
from collections import deque
from collections.abc import Iterable
from typing import Any
from urllib.parse import urlsplit

import httptools

IDLE_KEEPALIVE_S = 30.0
"""An idle connection older than this is closed rather than reused: servers drop idle
connections after their own keep-alive timeout, and reusing one just then fails the request."""

_PAUSE_READING_AT = 256 * 1024
"""A client that reads a stream slower than the upstream writes it: stop reading the upstream
socket past this many undelivered bytes, so memory stays bounded and TCP pushes back."""

_BODYLESS_STATUSES = frozenset({204, 304})


class UpstreamDisconnected(ConnectionError):
    """The upstream closed the connection before the response was complete."""


class _Origin:
    """One upstream's address and its idle keep-alive connections."""

    def __init__(self, base_url: str, authorization: bytes | None, connect_timeout_s: float):
        parts = urlsplit(base_url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"upstream base_url must be http(s)://host[:port][/path], not {base_url!r}")
        secure = parts.scheme == "https"
        self.host = parts.hostname
        self.port = parts.port or (443 if secure else 80)
        self.ssl: ssl.SSLContext | None = ssl.create_default_context() if secure else None
        netloc = parts.netloc.rpartition("@")[2]  # never user:password@ in a Host header
        self.host_header = netloc.encode("ascii") if netloc.isascii() else netloc.encode("idna")
        self.base_path = parts.path.rstrip("/").encode("ascii")
        self.authorization = authorization
        self.connect_timeout_s = connect_timeout_s
        self.idle: deque[_Connection] = deque()
        """Most recently used on the right, where connections are taken from; the left end holds
        the longest idle, closed once they pass ``IDLE_KEEPALIVE_S``, so a burst's connections
        do not stay open for good once traffic falls again."""

    def take_idle(self, now: float) -> _Connection | None:
        while self.idle:
            connection = self.idle.pop()
            if not connection.closed and now - connection.idle_since < IDLE_KEEPALIVE_S:
                return connection
            connection.close()
        return None

    def put_idle(self, connection: _Connection, now: float) -> None:
        connection.idle_since = now
        self.idle.append(connection)
        while now - self.idle[0].idle_since >= IDLE_KEEPALIVE_S:
            self.idle.popleft().close()


class _Connection(asyncio.Protocol):
    """One keep-alive TCP (or TLS) connection; serves one response at a time."""

    def __init__(self, origin: _Origin):
        self.origin = origin
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self.idle_since = 0.0
        self.response: UpstreamResponse | None = None
        self._parser = httptools.HttpResponseParser(self)

    def close(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.close()

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
            response.fail(UpstreamDisconnected("upstream switched protocols (101), which a POST to it never asks for"))
        except httptools.HttpParserError as error:
            self.close()
            response.fail(UpstreamDisconnected(f"malformed HTTP response from upstream: {error}"))

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self.response is not None:
            self.response.connection_lost()

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
    whole (:meth:`read`) or chunk by chunk as it arrives (``async for chunk in response``)."""

    def __init__(self, connection: _Connection, timeout_s: float, idle_timeout: bool):
        self._connection = connection
        self._loop = asyncio.get_running_loop()
        self.status = 0
        self.raw_headers: list[tuple[bytes, bytes]] = []
        self.content_type = ""
        self.keep_alive = False
        self.interim = False
        self._chunks: list[bytes] = []
        self._buffered = 0
        self._paused = False
        # uvloop's TLS transport drops decrypted bytes it still holds when the peer closes while
        # reading is paused, so only plain-TCP streams are paused; a TLS stream is buffered whole.
        self._pausable = idle_timeout and connection.origin.ssl is None
        self._headers_done = False
        self._done = False
        self._error: BaseException | None = None
        self._waiter: asyncio.Future[None] | None = None
        self._length_known = False
        self._decoder: Any = None
        # One timer per exchange. For a stream it is a silence limit: every arrival moves the
        # deadline, and the timer, when it fires early, re-arms itself for the new deadline.
        self._timeout_s = timeout_s
        self._moving_deadline = idle_timeout
        self._deadline = self._loop.time() + timeout_s
        self._timer: asyncio.TimerHandle | None = self._loop.call_at(self._deadline, self._on_timer)

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
                self.fail(UpstreamDisconnected(f"upstream sent an unsupported content-encoding: {encoding.decode('latin-1')}"))
                self._connection.close()

    def headers_complete(self, status: int, keep_alive: bool) -> None:
        if 100 <= status < 200:
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

    def feed(self, data: bytes) -> None:
        if self._decoder is not None:
            try:
                data = self._decoder.decompress(data)
            except zlib.error as error:
                self._connection.close()
                self.fail(UpstreamDisconnected(f"upstream body could not be decompressed: {error}"))
                return
        if data:
            self._chunks.append(data)
            self._buffered += len(data)
            if self._pausable and self._buffered > _PAUSE_READING_AT and not self._paused:
                self._paused = True
                self._connection.transport.pause_reading()
        self._touch()
        self._wake()

    @property
    def ended_cleanly(self) -> bool:
        return self._done and self._error is None

    def message_complete(self) -> None:
        if self._error is not None:
            return  # the body is already known to be bad; its end changes nothing
        if self._decoder is not None:
            tail = self._decoder.flush()
            if tail:
                self._chunks.append(tail)
            if not self._decoder.eof:
                self._connection.close()
                self.fail(UpstreamDisconnected("upstream's compressed body ended before its compressed stream did"))
                return
        self._done = True
        self._stop_timer()
        self._resume()  # the connection may go back to the pool: it must be reading again
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

    async def wait_headers(self) -> None:
        while not self._headers_done:
            if self._error is not None:
                raise self._error
            await self._wait()

    async def read(self) -> bytes:
        """The whole body."""
        self._pausable = False
        self._resume()
        while True:
            if self._error is not None:
                raise self._error
            if self._done:
                break
            await self._wait()
        body = self._chunks[0] if len(self._chunks) == 1 else b"".join(self._chunks)
        self._chunks = []
        return body

    def __aiter__(self) -> UpstreamResponse:
        return self

    async def __anext__(self) -> bytes:
        """Whatever arrived since the last call, as one piece."""
        while not self._chunks:
            if self._error is not None:
                raise self._error
            if self._done:
                raise StopAsyncIteration
            await self._wait()
        chunks = self._chunks
        self._chunks = []
        self._buffered = 0
        self._resume()
        return chunks[0] if len(chunks) == 1 else b"".join(chunks)

    def _resume(self) -> None:
        if self._paused:
            self._paused = False
            if self._connection.transport is not None:
                self._connection.transport.resume_reading()

    def release(self) -> None:
        """The proxy is done with the response: a connection still busy with it is closed."""
        self._stop_timer()
        if not self._done:
            connection = self._connection
            if connection.response is self:
                connection.response = None
            connection.close()


class Exchange:
    """``async with client.post(...) as response``: the response is released on exit."""

    __slots__ = ("_client", "_origin", "_request", "_timeout_s", "_streaming", "_response")

    def __init__(self, client: UpstreamClient, origin: _Origin, request: bytes, timeout_s: float, streaming: bool):
        self._client = client
        self._origin = origin
        self._request = request
        self._timeout_s = timeout_s
        self._streaming = streaming
        self._response: UpstreamResponse | None = None

    async def __aenter__(self) -> UpstreamResponse:
        self._response = await self._client.send(self._origin, self._request, self._timeout_s, self._streaming)
        return self._response

    async def __aexit__(self, *exc_info: object) -> None:
        if self._response is not None:
            self._response.release()


class UpstreamClient:
    """Keep-alive HTTP/1.1 connections to each configured upstream, for forwarding POSTs."""

    def __init__(self, origins: dict[str, tuple[str, str, float]]):
        """``origins``: upstream name → (base URL, API key or "", connect timeout in seconds)."""
        self._origins = {
            name: _Origin(base_url, f"Bearer {api_key}".encode("latin-1") if api_key else None, connect_timeout_s)
            for name, (base_url, api_key, connect_timeout_s) in origins.items()
        }

    def post(
        self,
        upstream: str,
        path: str,
        query: bytes,
        headers: Iterable[tuple[bytes, bytes]],
        body: bytes,
        timeout_s: float,
        streaming: bool,
    ) -> Exchange:
        """A POST of ``body`` to ``path`` under the upstream's base URL. ``headers`` must
        already be filtered (no hop-by-hop, host, length or authorization); the upstream's API
        key, if it has one, is added here. For a stream ``timeout_s`` limits each silence, for
        anything else the whole exchange."""
        origin = self._origins[upstream]
        target = origin.base_path + path.encode("latin-1")
        if query:
            target += b"?" + query
        if b" " in target or b"\r" in target or b"\n" in target:
            raise ValueError("request target contains whitespace")
        parts = [b"POST ", target, b" HTTP/1.1\r\nhost: ", origin.host_header, b"\r\n"]
        for name, value in headers:
            parts += (name, b": ", value, b"\r\n")
        if origin.authorization is not None:
            parts += (b"authorization: ", origin.authorization, b"\r\n")
        parts += (b"accept-encoding: gzip\r\ncontent-length: ", b"%d" % len(body), b"\r\n\r\n", body)
        return Exchange(self, origin, b"".join(parts), timeout_s, streaming)

    async def send(self, origin: _Origin, request: bytes, timeout_s: float, streaming: bool) -> UpstreamResponse:
        # Never sent twice, not even when a reused connection closes before a byte of answer (the
        # keep-alive race): the upstream may have read and run the request, and a generation is
        # billed. The client gets a 502 and decides (the OpenAI SDK retries it).
        connection = origin.take_idle(time.monotonic())
        if connection is None:
            connection = await self._connect(origin, min(origin.connect_timeout_s, timeout_s))
        response = UpstreamResponse(connection, timeout_s, idle_timeout=streaming)
        connection.response = response
        assert connection.transport is not None
        connection.transport.write(request)
        try:
            await response.wait_headers()
        except BaseException:
            response.release()
            raise
        return response

    async def _connect(self, origin: _Origin, timeout_s: float) -> _Connection:
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(timeout_s):
                _, connection = await loop.create_connection(
                    lambda: _Connection(origin),
                    origin.host,
                    origin.port,
                    ssl=origin.ssl,
                    server_hostname=origin.host if origin.ssl is not None else None,
                )
        except TimeoutError:
            raise TimeoutError(f"could not connect to upstream within {timeout_s:g} s") from None
        except ssl.SSLError as error:
            raise ConnectionError(f"TLS handshake with upstream failed: {error}") from None
        return connection

    def close(self) -> None:
        for origin in self._origins.values():
            while origin.idle:
                origin.idle.pop().close()
