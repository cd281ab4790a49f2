"""The upstream connection (abproxy/upstream/http11.py) fed a scripted byte stream, as httpcore
tests its own: the bytes an upstream could send, cut at any point, with no socket in between.
What a response is made of (body, headers, errors) must not depend on where TCP cut it."""

from __future__ import annotations

import asyncio
import gzip
import ssl
from collections.abc import Sequence

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from abproxy.upstream.errors import UpstreamBadResponse, UpstreamDisconnected, UpstreamResponseTooLarge
from abproxy.upstream.http11 import PAUSE_READING_AT, Connection, UpstreamResponse


class ScriptedPool:
    """The origin side of a connection (its ``ConnectionOwner``): notes whether it was handed back for reuse."""

    ssl: ssl.SSLContext | None = None

    def __init__(self) -> None:
        self.idle: list[Connection] = []
        self.lost = 0

    def put_idle(self, connection: Connection, now: float) -> None:
        self.idle.append(connection)

    def connection_lost(self) -> None:
        self.lost += 1


class ScriptedTransport:
    """The socket side: what the connection wrote, and whether it paused reading or closed."""

    def __init__(self) -> None:
        self.closed = False
        self.paused = False
        self.pauses = 0

    def write(self, data: bytes) -> None:
        pass

    def close(self) -> None:
        self.closed = True

    def pause_reading(self) -> None:
        self.paused = True
        self.pauses += 1

    def resume_reading(self) -> None:
        self.paused = False


def exchange(
    *, streaming: bool = False, max_body_bytes: int = 1 << 20, head: bool = False
) -> tuple[Connection, UpstreamResponse, ScriptedPool, ScriptedTransport]:
    pool, transport = ScriptedPool(), ScriptedTransport()
    connection = Connection(pool)
    connection.connection_made(transport)
    response = UpstreamResponse(connection, 30.0, idle_timeout=streaming, max_body_bytes=max_body_bytes, bodyless=head)
    connection.response = response
    response.start_timer()
    return connection, response, pool, transport


def cut(data: bytes, at: Sequence[int]) -> list[bytes]:
    points = sorted({point % (len(data) + 1) for point in at})
    return [data[start:end] for start, end in zip([0, *points], [*points, len(data)]) if end > start]


def feed(connection: Connection, pieces: Sequence[bytes]) -> None:
    for piece in pieces:
        connection.data_received(piece)


CHUNKED = (
    b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n"
    b"10\r\ndata: {\"a\": 1}\n\n\r\n"
    b"e\r\ndata: [DONE]\n\n\r\n"
    b"0\r\n\r\n"
)


@settings(max_examples=150, deadline=None)
@given(at=st.lists(st.integers(min_value=0, max_value=len(CHUNKED)), max_size=12))
def test_a_chunked_stream_reads_the_same_wherever_tcp_cut_it_and_the_connection_is_reused(at: list[int]) -> None:
    async def main() -> None:
        connection, response, pool, transport = exchange(streaming=True)
        feed(connection, cut(CHUNKED, at))
        await response.wait_headers()
        assert (response.status, response.content_type) == (200, "text/event-stream")
        assert b"".join([chunk async for chunk in response]) == b'data: {"a": 1}\n\ndata: [DONE]\n\n'
        assert pool.idle == [connection] and not transport.closed

    asyncio.run(main())


@settings(max_examples=100, deadline=None)
@given(at=st.lists(st.integers(min_value=0, max_value=400), max_size=8))
def test_a_gzip_body_is_decoded_whole_wherever_it_was_cut(at: list[int]) -> None:
    body = b'{"choices": [{"message": {"content": "' + b"hello " * 200 + b'"}}]}'
    packed = gzip.compress(body)
    raw = b"HTTP/1.1 200 OK\r\ncontent-encoding: gzip\r\ncontent-length: %d\r\n\r\n" % len(packed) + packed

    async def main() -> None:
        connection, response, pool, _ = exchange()
        feed(connection, cut(raw, at))
        await response.wait_headers()
        assert await response.read() == body
        assert pool.idle == [connection]

    asyncio.run(main())


def test_an_interim_100_continue_is_skipped_and_the_final_answers_headers_are_kept() -> None:
    async def main() -> None:
        connection, response, _, _ = exchange()
        feed(connection, [b"HTTP/1.1 100 Continue\r\nx-interim: yes\r\n\r\n", b"HTTP/1.1 201 Created\r\ncontent-length: 2\r\n\r\nok"])
        await response.wait_headers()
        assert response.status == 201 and (b"x-interim", b"yes") not in response.raw_headers
        assert await response.read() == b"ok"

    asyncio.run(main())


def test_connection_close_from_the_upstream_means_the_connection_is_not_reused() -> None:
    async def main() -> None:
        connection, response, pool, transport = exchange()
        feed(connection, [b"HTTP/1.1 200 OK\r\nconnection: close\r\ncontent-length: 2\r\n\r\nok"])
        await response.wait_headers()
        assert await response.read() == b"ok"
        assert pool.idle == [] and transport.closed

    asyncio.run(main())


def test_a_body_without_length_ends_when_the_upstream_closes_but_a_short_one_is_an_error() -> None:
    async def main() -> None:
        connection, response, _, _ = exchange()
        feed(connection, [b"HTTP/1.1 200 OK\r\n\r\nuntil the end"])
        connection.connection_lost(None)
        await response.wait_headers()
        assert await response.read() == b"until the end"

        connection, response, _, _ = exchange()
        feed(connection, [b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\nonly this"])
        connection.connection_lost(None)
        await response.wait_headers()
        with pytest.raises(UpstreamDisconnected):
            await response.read()

    asyncio.run(main())


@pytest.mark.parametrize(
    ("raw", "says", "framing_intact"),
    [
        (b"NOT HTTP AT ALL\r\n\r\n", "malformed HTTP response", False),
        (b"HTTP/1.1 200 OK\r\ncontent-encoding: br\r\ncontent-length: 1\r\n\r\nx", "unsupported content-encoding: br", False),
        (b"HTTP/1.1 101 Switching Protocols\r\nupgrade: websocket\r\nconnection: upgrade\r\n\r\n", "switched protocols", False),
        # the body is bad but the message ended where HTTP said: the connection may serve another
        (b"HTTP/1.1 200 OK\r\ncontent-encoding: gzip\r\ncontent-length: 9\r\n\r\nnot gzip!", "could not be decompressed", True),
    ],
)
def test_a_response_the_proxy_cannot_read_is_a_bad_response_and_a_broken_connection_is_closed(
    raw: bytes, says: str, framing_intact: bool
) -> None:
    async def main() -> None:
        connection, response, pool, transport = exchange()
        feed(connection, [raw])
        with pytest.raises(UpstreamBadResponse, match=says):
            await response.wait_headers()
            await response.read()
        assert transport.closed is not framing_intact
        assert pool.idle == ([connection] if framing_intact else [])

    asyncio.run(main())


def test_a_body_over_the_limit_is_refused_counted_after_decompression() -> None:
    async def main() -> None:
        plain = b"x" * 5000
        connection, response, _, transport = exchange(max_body_bytes=4096)
        feed(connection, [b"HTTP/1.1 200 OK\r\ncontent-length: 5000\r\n\r\n", plain])
        await response.wait_headers()
        with pytest.raises(UpstreamResponseTooLarge, match="4096 bytes"):
            await response.read()
        assert transport.closed

        bomb = gzip.compress(b"\0" * 100_000)  # a few hundred bytes on the wire
        connection, response, _, _ = exchange(max_body_bytes=4096)
        feed(connection, [b"HTTP/1.1 200 OK\r\ncontent-encoding: gzip\r\ncontent-length: %d\r\n\r\n" % len(bomb), bomb])
        await response.wait_headers()
        with pytest.raises(UpstreamResponseTooLarge):
            await response.read()

    asyncio.run(main())


def test_a_stream_read_slower_than_it_arrives_pauses_the_socket_then_resumes_it() -> None:
    async def main() -> None:
        connection, response, _, transport = exchange(streaming=True, max_body_bytes=1 << 24)
        feed(connection, [b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n"])
        await response.wait_headers()
        piece = b"y" * 65536
        for _ in range(PAUSE_READING_AT // len(piece) + 2):
            feed(connection, [b"%x\r\n%s\r\n" % (len(piece), piece)])
        assert transport.paused, "undelivered bytes past the threshold must stop reading the socket"
        assert len(await response.__anext__()) > PAUSE_READING_AT
        assert not transport.paused
        feed(connection, [b"0\r\n\r\n"])
        assert [chunk async for chunk in response] == []

    asyncio.run(main())


def test_the_answer_to_a_head_request_ends_at_its_headers_whatever_its_content_length_says() -> None:
    async def main() -> None:
        connection, response, pool, transport = exchange(head=True)
        feed(connection, [b"HTTP/1.1 200 OK\r\ncontent-length: 1234\r\n\r\n"])
        await response.wait_headers()
        assert await response.read() == b""
        assert transport.closed and pool.idle == []

    asyncio.run(main())


def test_bytes_arriving_on_an_idle_connection_retire_it() -> None:
    pool, transport = ScriptedPool(), ScriptedTransport()
    connection = Connection(pool)
    connection.connection_made(transport)
    connection.data_received(b"HTTP/1.1 408 Request Timeout\r\nconnection: close\r\n\r\n")
    assert connection.closed and transport.closed
