"""How abproxy runs under uvicorn: the server options, and the HTTP protocol with the limits
uvicorn's httptools protocol lacks — a bound on the size of a request's headers, on the time
a client may take to send them, and on the time it may take to send its body
(``server.max_header_bytes``, ``server.header_timeout_s``, ``server.body_timeout_s``).

Without them, httptools keeps an unfinished header in memory however long it grows (five
connections each sending 100 MB of one header took the proxy from 329 to 804 MB), and a
connection that trickles its headers or its body (slowloris) is held for ever.
"""

from __future__ import annotations

import asyncio
import ctypes
import functools
import gc
import os
from dataclasses import dataclass
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from abproxy.config import Config
from abproxy.wire import error_body


@dataclass(frozen=True, slots=True)
class HeadLimits:
    max_bytes: int
    timeout_s: float
    body_timeout_s: float = 30.0


class GuardedHttpToolsProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol, refusing oversized headers (431), dropping a client that
    has not finished its headers within the time limit, and answering 408 to one that has not
    finished its body within its own.

    The time limits cost nothing per request: each connection notes when its current head or
    body began, and one sweep per server and second closes those past the limit (no timer per
    request)."""

    def __init__(self, *args: Any, limits: HeadLimits, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self._limits = limits
        self._awaiting_head = True
        self._head_bytes = 0
        self._head_started: float | None = None
        self._body_started: float | None = None
        self._refused = False

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._head_started = self.loop.time()
        _DeadlineSweep.ensure(self.server_state, self.loop, self._limits)

    def data_received(self, data: bytes) -> None:
        if self._refused:
            return
        counting = self._awaiting_head
        if counting:
            self._head_bytes += len(data)
        super().data_received(data)
        if self._awaiting_head and counting and self._head_bytes > self._limits.max_bytes:
            self._refuse_head()

    def on_message_begin(self) -> None:
        super().on_message_begin()
        if self._head_started is None:
            self._head_started = self.loop.time()

    def on_headers_complete(self) -> None:
        self._awaiting_head = False
        self._head_started = None
        # Fewer bytes arrived while the head was awaited than the limit: the head fits. Only
        # a read that also carried a body needs the head measured.
        if self._head_bytes > self._limits.max_bytes and self._head_size() > self._limits.max_bytes:
            self._refuse_head()  # the parser goes on through this read; the callbacks below ignore it
            return
        super().on_headers_complete()
        self._body_started = self.loop.time()

    def _head_size(self) -> int:
        return len(self.url) + sum(len(name) + len(value) + 4 for name, value in self.headers)

    def on_body(self, body: bytes) -> None:
        if not self._refused:
            super().on_body(body)

    def on_message_complete(self) -> None:
        if self._refused:
            return
        self._body_started = None
        super().on_message_complete()
        self._awaiting_head = True
        self._head_bytes = 0

    def head_overdue(self, now: float) -> bool:
        return self._head_started is not None and now - self._head_started > self._limits.timeout_s

    def body_overdue(self, now: float) -> bool:
        if self._body_started is None:
            return False
        if self.flow.read_paused:
            # Reading stopped because the app has not taken what arrived (an upload the upstream
            # is slow to accept, a pipelined request): the wait is the proxy's, not the client's.
            self._body_started = now
            return False
        return now - self._body_started > self._limits.body_timeout_s

    def drop(self) -> None:
        if not self.transport.is_closing():
            self.transport.close()

    def cut_slow_body(self) -> None:
        """408 (unless the app already answered) and close. The app's request cycle, waiting on
        the rest of the body, gets ``http.disconnect``, and whatever it sends is dropped."""
        self._refused = True
        self._body_started = None
        cycle = self.cycle
        if cycle is not None and not cycle.response_started and not self.transport.is_closing():
            body = error_body(
                f"request body not received within {self._limits.body_timeout_s:g} s of its headers",
                "invalid_request_error",
                "request_body_timeout",
            )
            self.transport.write(
                b"HTTP/1.1 408 Request Timeout\r\ncontent-type: application/json\r\n"
                b"connection: close\r\ncontent-length: %d\r\n\r\n%s" % (len(body), body)
            )
        if cycle is not None:
            cycle.disconnected = True
            cycle.message_event.set()
        self.drop()

    def _refuse_head(self) -> None:
        self._refused = True
        self._head_started = None
        body = error_body(
            f"request headers exceed {self._limits.max_bytes} bytes", "invalid_request_error", "request_headers_too_large"
        )
        self.transport.write(
            b"HTTP/1.1 431 Request Header Fields Too Large\r\ncontent-type: application/json\r\n"
            b"connection: close\r\ncontent-length: %d\r\n\r\n%s" % (len(body), body)
        )
        self.transport.close()


class _DeadlineSweep:
    """Once a second, closes the connections of one server whose request head or body is
    overdue: a new connection that sent nothing, one trickling its headers or its body
    (slowloris). An idle keep-alive connection between requests is not overdue: uvicorn's
    keep-alive timeout closes it."""

    _ATTRIBUTE = "abproxy_head_sweep"

    @classmethod
    def ensure(cls, server_state: Any, loop: asyncio.AbstractEventLoop, limits: HeadLimits) -> None:
        if getattr(server_state, cls._ATTRIBUTE, None) is None:
            every_s = min(1.0, limits.timeout_s / 2, limits.body_timeout_s / 2)
            setattr(server_state, cls._ATTRIBUTE, cls(server_state, loop, every_s))

    def __init__(self, server_state: Any, loop: asyncio.AbstractEventLoop, every_s: float):
        self._state = server_state
        self._loop = loop
        self._every_s = every_s
        loop.call_later(every_s, self._sweep)

    def _sweep(self) -> None:
        now = self._loop.time()
        for connection in list(self._state.connections):
            if not isinstance(connection, GuardedHttpToolsProtocol):
                continue
            if connection.head_overdue(now):
                connection.drop()
            elif connection.body_overdue(now):
                connection.cut_slow_body()
        if not self._loop.is_closed():
            self._loop.call_later(self._every_s, self._sweep)


BIG_BLOCK_BYTES = 1 << 20


def return_big_buffers_to_the_os(threshold: int = BIG_BLOCK_BYTES) -> bool:
    """Keep every allocation of ``threshold`` bytes or more in a mapping of its own, unmapped when
    freed. glibc's malloc raises its mmap threshold to the size of the largest block it frees (up
    to 32 MiB): after one 10 MB request body, later buffers of that size come from the heap, which
    fragments and is hardly ever given back. Under load, four rounds of 10 MB bodies and 60 MiB
    answers left RSS 120 MiB above where it started; fixing the threshold gives it back. Requests
    of ordinary size are far below it. False (nothing done) where the C library is not glibc."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        return bool(libc.mallopt(_M_MMAP_THRESHOLD, threshold))
    except (OSError, AttributeError):
        return False


_M_MMAP_THRESHOLD = -3
"""glibc's ``mallopt`` parameter (malloc.h); setting it also turns the dynamic threshold off."""

HEAP_TRIM_EVERY_S = 2.0
HEAP_GROWTH_BYTES = 32 << 20
"""RSS this far above its lowest is worth a full garbage collection and a trim."""


def _rss_bytes() -> int:
    with open("/proc/self/statm", "rb") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


async def give_freed_heap_back(every_s: float = HEAP_TRIM_EVERY_S) -> None:
    """Every ``every_s``, glibc's ``malloc_trim`` (well under a millisecond), after a full
    garbage collection when RSS has grown :data:`HEAP_GROWTH_BYTES` above its lowest. The proxy collects rarely (app.py), so a
    reference cycle that holds a big body's slices (an error's traceback and the frame that was
    reading) waits for a full collection; and blocks under the mmap threshold are freed into the
    heap, which glibc shrinks only from its top, so one block still in use above them kept them
    resident. Before, RSS stayed 60–150 MiB above its level after four rounds of big bodies in
    one run of two or three. Returns at once where the C library is not glibc or there is no
    /proc."""
    try:
        trim = ctypes.CDLL("libc.so.6").malloc_trim
        lowest = _rss_bytes()
    except (OSError, AttributeError):
        return
    while True:
        await asyncio.sleep(every_s)
        if _rss_bytes() - lowest >= HEAP_GROWTH_BYTES:
            gc.collect()
        trim(0)
        lowest = min(lowest, _rss_bytes())


def server_options(config: Config, *, host: str, port: int, log_level: str = "info") -> dict[str, Any]:
    """The options of ``uvicorn.Config`` that every abproxy server runs with."""
    server = config.server
    limits = HeadLimits(server.max_header_bytes, server.header_timeout_s, server.body_timeout_s)
    return dict(
        host=host,
        port=port,
        loop="uvloop",
        http=functools.partial(GuardedHttpToolsProtocol, limits=limits),
        lifespan="on",
        access_log=False,
        proxy_headers=False,  # client addresses are not used: skip parsing X-Forwarded-For
        server_header=False,
        date_header=False,
        timeout_graceful_shutdown=config.server.shutdown_grace_s,
        log_level=log_level,
    )
