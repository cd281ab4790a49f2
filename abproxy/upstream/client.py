"""A lean keep-alive HTTP/1.1 client to the configured upstreams.

aiohttp's general-purpose ``ClientSession`` spends about as many instructions per call as the
rest of a proxy together (URL objects, multidicts, payload registry, tracing hooks, timer
contexts). Forwarding needs much less: keep-alive connections per upstream, the request written
in one piece (or its body streamed as the client sends it), the response parsed by httptools.

Errors: ``TimeoutError`` for a timeout, ``ConnectionError`` (:mod:`abproxy.upstream.errors`)
for anything else that breaks the exchange, ``OSError`` when the upstream cannot be reached.
"""

from __future__ import annotations

import asyncio
import ssl
import time
from collections import deque
from collections.abc import AsyncIterator, Iterable, Mapping
from dataclasses import dataclass
from urllib.parse import urlsplit

from abproxy.upstream.http11 import Connection, UpstreamResponse

IDLE_KEEPALIVE_S = 30.0
"""An idle connection older than this is closed rather than reused: servers drop idle
connections after their own keep-alive timeout, and reusing one just then fails the request."""

DEFAULT_MAX_RESPONSE_BYTES = 64 * 1024 * 1024


@dataclass(frozen=True, slots=True)
class OriginSettings:
    base_url: str
    api_key: str = ""
    connect_timeout_s: float = 10.0
    max_connections: int = 512


@dataclass(slots=True)
class StreamedBody:
    """A request body forwarded as the client sends it: with its length when the client gave
    one, else in chunked transfer encoding."""

    chunks: AsyncIterator[bytes]
    length: int | None


class Origin:
    """One upstream's address, its idle keep-alive connections, and how many are open: at most
    ``max_connections``; a request that finds them all busy waits for one to come back."""

    def __init__(self, settings: OriginSettings, idle_keepalive_s: float):
        parts = urlsplit(settings.base_url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"upstream base_url must be http(s)://host[:port][/path], not {settings.base_url!r}")
        secure = parts.scheme == "https"
        self.host = parts.hostname
        self.port = parts.port or (443 if secure else 80)
        self.ssl: ssl.SSLContext | None = ssl.create_default_context() if secure else None
        netloc = parts.netloc.rpartition("@")[2]  # never user:password@ in a Host header
        self.host_header = netloc.encode("ascii") if netloc.isascii() else netloc.encode("idna")
        self.base_path = parts.path.rstrip("/").encode("ascii")
        self.authorization = f"Bearer {settings.api_key}".encode("latin-1") if settings.api_key else None
        self.connect_timeout_s = settings.connect_timeout_s
        self.idle_keepalive_s = idle_keepalive_s
        self.idle: deque[Connection] = deque()
        """Most recently used on the right, where connections are taken from; the left end holds
        the longest idle, closed once they pass ``idle_keepalive_s``, so a burst's connections
        do not stay open for good once traffic falls again."""
        self.max_connections = settings.max_connections
        self.open = 0
        """Connections being made or open (idle or busy), until each is lost."""
        self.waiters: deque[asyncio.Future[Connection | None]] = deque()
        """Requests waiting for a connection: handed one as it comes back, or woken (None) to
        make one when another closed."""

    def take_idle(self, now: float) -> Connection | None:
        while self.idle:
            connection = self.idle.pop()
            if not connection.closed and now - connection.idle_since < self.idle_keepalive_s:
                return connection
            connection.close()
        return None

    def put_idle(self, connection: Connection, now: float) -> None:
        connection.idle_since = now
        while self.waiters:
            waiter = self.waiters.popleft()
            if not waiter.done():
                waiter.set_result(connection)
                return
        self.idle.append(connection)
        while now - self.idle[0].idle_since >= self.idle_keepalive_s:
            self.idle.popleft().close()

    def connection_lost(self) -> None:
        self.open -= 1
        self.wake_one()

    def wake_one(self) -> None:
        """A slot is free: the first request still waiting may make a connection."""
        while self.waiters:
            waiter = self.waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return


class Exchange:
    """``async with client.request(...) as response``: the response is released on exit."""

    __slots__ = ("_client", "_origin", "_head", "_body", "_timeout_s", "_streaming", "_bodyless", "_response")

    def __init__(
        self,
        client: UpstreamClient,
        origin: Origin,
        head: bytes,
        body: StreamedBody | None,
        timeout_s: float,
        streaming: bool,
        bodyless: bool,
    ):
        self._client = client
        self._origin = origin
        self._head = head
        self._body = body
        self._timeout_s = timeout_s
        self._streaming = streaming
        self._bodyless = bodyless
        self._response: UpstreamResponse | None = None

    async def __aenter__(self) -> UpstreamResponse:
        self._response = await self._client.send(self)
        return self._response

    async def __aexit__(self, *exc_info: object) -> None:
        if self._response is not None:
            self._response.release()


class UpstreamClient:
    """Keep-alive HTTP/1.1 connections to each configured upstream."""

    def __init__(
        self,
        origins: Mapping[str, OriginSettings],
        *,
        max_response_bytes: int = DEFAULT_MAX_RESPONSE_BYTES,
        idle_keepalive_s: float = IDLE_KEEPALIVE_S,
    ):
        self._origins = {name: Origin(settings, idle_keepalive_s) for name, settings in origins.items()}
        self._max_response_bytes = max_response_bytes

    def request(
        self,
        upstream: str,
        method: str,
        path: str,
        query: bytes,
        headers: Iterable[tuple[bytes, bytes]],
        body: bytes | StreamedBody | None,
        timeout_s: float,
        streaming: bool,
    ) -> Exchange:
        """``method`` of ``path`` under the upstream's base URL. ``headers`` must already be
        filtered (no hop-by-hop, host, length or authorization); the upstream's API key, if it
        has one, is added here. For a stream ``timeout_s`` limits each silence, for anything
        else the whole exchange. ``body`` None sends none (``content-length: 0`` for the
        methods that carry one)."""
        origin = self._origins[upstream]
        target = origin.base_path + path.encode("latin-1")
        if query:
            target += b"?" + query
        if b" " in target or b"\r" in target or b"\n" in target:
            raise ValueError("request target contains whitespace")
        parts = [method.encode("ascii"), b" ", target, b" HTTP/1.1\r\nhost: ", origin.host_header, b"\r\n"]
        for name, value in headers:
            parts += (name, b": ", value, b"\r\n")
        if origin.authorization is not None:
            parts += (b"authorization: ", origin.authorization, b"\r\n")
        parts.append(b"accept-encoding: gzip\r\n")
        streamed = None
        if isinstance(body, StreamedBody):
            streamed = body
            if body.length is None:
                parts.append(b"transfer-encoding: chunked\r\n\r\n")
            else:
                parts += (b"content-length: ", b"%d" % body.length, b"\r\n\r\n")
        elif body is not None or method in ("POST", "PUT", "PATCH"):
            payload = body or b""
            parts += (b"content-length: ", b"%d" % len(payload), b"\r\n\r\n", payload)
        else:
            parts.append(b"\r\n")
        return Exchange(self, origin, b"".join(parts), streamed, timeout_s, streaming, bodyless=method == "HEAD")

    async def send(self, exchange: Exchange) -> UpstreamResponse:
        # Never sent twice, not even when a reused connection closes before a byte of answer (the
        # keep-alive race): the upstream may have read and run the request, and a generation is
        # billed. The client gets a 502 and decides (the OpenAI SDK retries it).
        origin = exchange._origin
        connection = origin.take_idle(time.monotonic())
        if connection is None:
            connection = await self._connection(origin, exchange._timeout_s)
        response = UpstreamResponse(
            connection,
            exchange._timeout_s,
            idle_timeout=exchange._streaming,
            max_body_bytes=self._max_response_bytes,
            bodyless=exchange._bodyless,
        )
        connection.response = response
        assert connection.transport is not None
        try:
            connection.transport.write(exchange._head)
            if exchange._body is not None:
                await self._write_body(connection, response, exchange._body, exchange._timeout_s)
            response.start_timer()
            await response.wait_headers()
        except BaseException:
            response.release()
            raise
        return response

    @staticmethod
    async def _write_body(connection: Connection, response: UpstreamResponse, body: StreamedBody, timeout_s: float) -> None:
        transport = connection.transport
        assert transport is not None
        chunked = body.length is None
        async for chunk in body.chunks:
            if connection.closed or response.headers_arrived:
                # The upstream answered early (a 413, say) or hung up: its answer decides, and
                # the connection, left mid-request, is not reused.
                response.keep_alive = False
                return
            if not chunk:
                continue
            transport.write(b"%x\r\n%s\r\n" % (len(chunk), chunk) if chunked else chunk)
            async with asyncio.timeout(timeout_s):  # an upstream that stops reading times out
                await connection.drain()
        if chunked and not connection.closed:
            transport.write(b"0\r\n\r\n")

    async def _connection(self, origin: Origin, timeout_s: float) -> Connection:
        """A new connection while fewer than ``max_connections`` are open; else the first to
        come back (or a new one once another closes), waiting at most ``timeout_s``."""
        deadline = time.monotonic() + timeout_s
        while origin.open >= origin.max_connections:
            waiter: asyncio.Future[Connection | None] = asyncio.get_running_loop().create_future()
            origin.waiters.append(waiter)
            try:
                async with asyncio.timeout(max(0.0, deadline - time.monotonic())):
                    handed = await waiter
            except BaseException as error:
                # Handed one, or woken, in the same turn as the deadline or a cancel: pass it on
                # to the next waiter, or it would stay counted open and idle nowhere.
                if waiter.done() and not waiter.cancelled():
                    handed = waiter.result()
                    if handed is not None:
                        origin.put_idle(handed, time.monotonic())
                    else:
                        origin.wake_one()
                if isinstance(error, TimeoutError):
                    raise TimeoutError(
                        f"no connection to the upstream within {timeout_s:g} s: all {origin.max_connections} "
                        "(max_connections) were busy"
                    ) from None
                raise
            if handed is not None:
                return handed
        origin.open += 1
        try:
            return await self._connect(origin, min(origin.connect_timeout_s, max(0.0, deadline - time.monotonic())))
        except BaseException:
            origin.open -= 1
            origin.wake_one()
            raise

    async def _connect(self, origin: Origin, timeout_s: float) -> Connection:
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(timeout_s):
                _, connection = await loop.create_connection(
                    lambda: Connection(origin),
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
