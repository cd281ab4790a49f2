"""The lean upstream client on real sockets: a scripted HTTP server (a raw asyncio server that
answers with exactly the bytes a test gives it) for the wire-level cases, and the fake upstream
behind TLS with the real openai SDK going through the proxy."""

from __future__ import annotations

import asyncio
import datetime
import gzip
import ipaddress
import os
import ssl
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import openai
import pytest
import uvloop
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from abproxy.simulation.fake_upstream import FakeUpstream
from abproxy.simulation.server import serve_in_thread
from abproxy.upstream.client import OriginSettings, UpstreamClient
from abproxy.upstream.errors import UpstreamBadResponse, UpstreamDisconnected
from proxykit import make_config, run

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter, int], Awaitable[None]]
BODY = b'{"model":"gpt-4o-mini","messages":[]}'


class ScriptedServer:
    """Counts connections and the requests it read; ``handler(reader, writer, n)`` answers
    request n (0-based, over all connections) however the test wants."""

    def __init__(self, handler: Handler):
        self.handler = handler
        self.connections = 0
        self.closed = 0
        self.requests: list[bytes] = []
        self._server: asyncio.Server | None = None

    async def __aenter__(self) -> str:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        port = self._server.sockets[0].getsockname()[1]
        return f"http://127.0.0.1:{port}/v1"

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = next(
                    int(line.split(b":")[1]) for line in head.split(b"\r\n") if line.lower().startswith(b"content-length:")
                )
                self.requests.append(head + await reader.readexactly(length))
                await self.handler(reader, writer, len(self.requests) - 1)
                if writer.is_closing():
                    return
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            self.closed += 1
            writer.close()


def json_response(body: bytes, *extra: bytes) -> bytes:
    return b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: %d\r\n%s\r\n%s" % (
        len(body),
        b"".join(h + b"\r\n" for h in extra),
        body,
    )


def client_for(url: str, api_key: str = "", connect_timeout_s: float = 2.0, **options: Any) -> UpstreamClient:
    return UpstreamClient({"up": OriginSettings(url, api_key, connect_timeout_s)}, **options)


def post_to(client: UpstreamClient, timeout_s: float, streaming: bool) -> Any:
    return client.request("up", "POST", "/chat/completions", b"", [(b"content-type", b"application/json")], BODY, timeout_s, streaming)


async def until(condition: Any, timeout_s: float = 30.0) -> None:
    """Let the loop run until ``condition()`` holds (the server sees a close on its next read)."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "not true in time"
        await asyncio.sleep(0.01)


async def post(client: UpstreamClient, *, timeout_s: float = 2.0, streaming: bool = False) -> tuple[int, bytes]:
    async with post_to(client, timeout_s, streaming) as response:
        return response.status, await response.read()


def test_keeps_one_connection_alive_and_writes_a_complete_request() -> None:
    async def answer(reader, writer, n):
        writer.write(json_response(b'{"n":%d}' % n))

    async def main():
        server = ScriptedServer(answer)
        async with server as url:
            client = client_for(url, api_key="sk-upstream")
            bodies = [await post(client) for _ in range(5)]
            client.close()
        assert bodies == [(200, b'{"n":%d}' % n) for n in range(5)]
        assert server.connections == 1
        head, _, body = server.requests[0].partition(b"\r\n\r\n")
        lines = head.split(b"\r\n")
        assert lines[0] == b"POST /v1/chat/completions HTTP/1.1"
        assert f"host: {url.split('/')[2]}".encode() in lines
        assert b"authorization: Bearer sk-upstream" in lines
        assert b"content-length: %d" % len(BODY) in lines
        assert body == BODY

    run(main())


def test_reads_chunked_gzip_and_connection_delimited_bodies() -> None:
    payload = b'{"choices":[{"message":{"content":"' + b"word " * 2000 + b'"}}]}'
    compressed = gzip.compress(payload)

    async def answer(reader, writer, n):
        if n == 0:  # chunked, in three pieces with pauses between them
            writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ntransfer-encoding: chunked\r\n\r\n")
            for piece in (payload[:10], payload[10:5000], payload[5000:]):
                writer.write(b"%x\r\n%s\r\n" % (len(piece), piece))
                await writer.drain()
                await asyncio.sleep(0.01)
            writer.write(b"0\r\n\r\n")
        elif n == 1:
            writer.write(json_response(compressed, b"content-encoding: gzip"))
        else:  # no length at all: the body ends with the connection
            writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\nconnection: close\r\n\r\n" + payload)
            await writer.drain()
            writer.close()

    async def main():
        server = ScriptedServer(answer)
        async with server as url:
            client = client_for(url)
            results = [await post(client) for _ in range(3)]
            again = await post(client)  # after `connection: close`, a new connection
            client.close()
        assert results == [(200, payload)] * 3
        assert again == (200, payload)
        assert server.connections == 2

    run(main())


def test_a_connection_the_server_closed_while_idle_is_not_used_again() -> None:
    async def answer(reader, writer, n):
        writer.write(json_response(b"{}"))
        await writer.drain()
        writer.close()  # keep-alive promised, then dropped (a server's idle timeout)

    async def main():
        server = ScriptedServer(answer)
        async with server as url:
            client = client_for(url)
            first = await post(client)
            await asyncio.sleep(0.05)
            second = await post(client)
            client.close()
        assert first == second == (200, b"{}")
        assert server.connections == 2
        assert len(server.requests) == 2  # nothing was sent twice

    run(main())


@pytest.mark.slow
def test_connections_of_a_burst_are_closed_once_idle_too_long() -> None:

    async def answer(reader, writer, n):
        await asyncio.sleep(0.05)  # long enough for the burst to need five connections
        writer.write(json_response(b"{}"))

    async def main():
        server = ScriptedServer(answer)
        async with server as url:
            client = client_for(url, idle_keepalive_s=1.0)
            await asyncio.gather(*(post(client) for _ in range(5)))
            assert (server.connections, server.closed) == (5, 0)
            deadline = time.monotonic() + 1.6
            while time.monotonic() < deadline:  # traffic goes on, one request at a time
                assert await post(client) == (200, b"{}")
            await until(lambda: server.closed >= 4)
            assert (server.connections, server.closed) == (5, 4)  # one kept busy, four let go
            await asyncio.sleep(1.2)
            assert await post(client) == (200, b"{}")  # after a lull, on a fresh connection
            await until(lambda: server.closed >= 5)
            assert (server.connections, server.closed) == (6, 5)
            client.close()

    run(main())


def test_at_most_max_connections_are_open_to_an_upstream_and_the_others_wait_for_one() -> None:
    """A slow upstream (each answer after 50 ms) and bursts with ``max_connections: 2``: never
    more than two connections open at once, every request answered in turn; a connection the
    upstream closes makes room for a waiting request on a new one; a request that gets none
    within its timeout fails naming ``max_connections``, and the upstream never sees it."""
    peak = 0
    timed_out = asyncio.Event()  # the last two answers wait for it: no connection frees up early

    async def answer(reader, writer, n):
        nonlocal peak
        peak = max(peak, server.connections - server.closed)
        await asyncio.sleep(0.05)
        if n >= 8:
            await timed_out.wait()
        if n == 1:  # the upstream closes this one after answering
            writer.write(json_response(b'{"n":%d}' % n, b"connection: close"))
            writer.close()
        else:
            writer.write(json_response(b'{"n":%d}' % n))

    async def main():
        async with server as url:
            client = UpstreamClient({"up": OriginSettings(url, "", 2.0, max_connections=2)})
            answers = await asyncio.gather(*(post(client) for _ in range(8)))
            assert sorted(answers) == sorted((200, b'{"n":%d}' % n) for n in range(8))
            assert peak == 2 and server.connections == 3, "two at a time; a third after the upstream closed one"
            busy = [asyncio.create_task(post(client)) for _ in range(2)]
            await asyncio.sleep(0.01)
            with pytest.raises(TimeoutError, match="max_connections"):
                await post(client, timeout_s=0.02)
            timed_out.set()
            assert [await task for task in busy] == [(200, b'{"n":8}'), (200, b'{"n":9}')]
            assert len(server.requests) == 10, "the request that got no connection never reached the upstream"
            client.close()

    server = ScriptedServer(answer)
    run(main())


def test_a_request_is_never_sent_twice_even_when_a_reused_connection_drops_it() -> None:
    """The keep-alive race looks like a server that read the request and hung up: the upstream
    may have run (and billed) it, so it is not sent again; the error reaches the client."""

    async def answer(reader, writer, n):
        if n == 1:
            writer.close()  # read the request, said nothing
        elif n == 2:
            writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\nshort")
            await writer.drain()
            writer.close()
        else:
            writer.write(json_response(b"{}"))

    async def main():
        server = ScriptedServer(answer)
        async with server as url:
            client = client_for(url)
            assert await post(client) == (200, b"{}")
            with pytest.raises(UpstreamDisconnected):
                await post(client)  # request 1: dropped on the reused connection
            with pytest.raises(UpstreamDisconnected):
                await post(client)  # request 2: headers came, the body broke off
            assert await post(client) == (200, b"{}")
            client.close()
        assert len(server.requests) == 4

    run(main())


def test_interim_responses_are_skipped_and_bad_bodies_are_errors_not_successes() -> None:
    payload = b'{"ok":true}'
    compressed = gzip.compress(payload)

    async def answer(reader, writer, n):
        if n == 0:  # 103 Early Hints, then the real answer, on a connection that stays usable
            writer.write(b"HTTP/1.1 103 Early Hints\r\nlink: </style.css>\r\n\r\n" + json_response(payload))
        elif n == 1:
            writer.write(json_response(payload))
        elif n == 2:
            writer.write(json_response(b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x00\x03\xff\xff\xff\xff", b"content-encoding: gzip"))
        elif n == 3:
            writer.write(json_response(b"\x0b\x02\x80brotli", b"content-encoding: br"))
        else:  # gzip cut short, the body delimited by the connection's end
            writer.write(b"HTTP/1.1 200 OK\r\ncontent-encoding: gzip\r\nconnection: close\r\n\r\n" + compressed[:-6])
            await writer.drain()
            writer.close()

    async def main():
        server = ScriptedServer(answer)
        async with server as url:
            client = client_for(url)
            assert await post(client) == (200, payload)
            assert await post(client) == (200, payload)
            assert server.connections == 1
            for expected in ("could not be decompressed", "unsupported content-encoding", "ended before"):
                with pytest.raises(UpstreamBadResponse, match=expected):
                    await post(client)
            client.close()

    run(main())


@pytest.mark.slow
def test_timeouts_a_whole_response_and_a_silent_stream() -> None:
    async def answer(reader, writer, n):
        if n == 0:
            await asyncio.sleep(5)  # never answers in time
        else:  # a stream that trickles for 1.2 s, each gap well within the 1 s limit, then stops
            writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n")
            for _ in range(12):
                writer.write(b"6\r\ndata: \r\n")
                await writer.drain()
                await asyncio.sleep(0.1)
            await asyncio.sleep(5)

    async def main():
        server = ScriptedServer(answer)
        async with server as url:
            client = client_for(url)
            started = time.monotonic()
            with pytest.raises(TimeoutError):
                await post(client, timeout_s=0.3)
            assert time.monotonic() - started > 0.25  # not before the limit
            received = b""
            started = time.monotonic()
            with pytest.raises(TimeoutError):
                async with post_to(client, 1.0, True) as response:
                    async for chunk in response:
                        received += chunk
            assert received == b"data: " * 12  # the slow stream was not cut while it kept talking
            assert time.monotonic() - started > 2.0  # it ran longer than the limit: only silence counts
            client.close()

    run(main())


def test_unreachable_and_malformed_upstreams_raise_connection_errors() -> None:
    async def answer(reader, writer, n):
        writer.write(b"this is not HTTP\r\n\r\n")

    async def main():
        server = ScriptedServer(answer)
        async with server as url:
            client = client_for(url)
            with pytest.raises(UpstreamBadResponse, match="malformed"):
                await post(client)
            client.close()
        with pytest.raises(OSError):
            await post(client_for(url))  # the server is gone: connection refused

    run(main())


@pytest.mark.slow
def test_a_client_that_stops_reading_a_stream_leaves_the_rest_on_the_upstream() -> None:
    """Flow control: a consumer that stops reading makes the client stop reading the socket, so
    the proxy's memory stays bounded and the upstream feels the back-pressure."""
    chunk = b"data: " + b"x" * 65530 + b"\n\n"
    written = 0

    async def answer(reader, writer, n):
        nonlocal written
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n")
        for _ in range(200):  # 13 MB, more than the socket buffers hold
            writer.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
            written += len(chunk)
            await writer.drain()
        writer.write(b"0\r\n\r\n")

    async def main():
        server = ScriptedServer(answer)
        async with server as url:
            client = client_for(url)
            # A silence limit of 0.3 s: a client that stalls longer is not the upstream's silence.
            async with post_to(client, 0.3, True) as response:
                first = await response.__anext__()
                stalled_at = -1
                while written != stalled_at:  # the consumer is busy elsewhere, until the upstream stops
                    stalled_at = written
                    await asyncio.sleep(0.5)
                assert written < 200 * len(chunk)  # the upstream is held back before it wrote everything
                rest = [chunk async for chunk in response]  # reading again lets it finish
            client.close()
        assert len(first) + sum(map(len, rest)) == 200 * len(chunk)

    run(main())


def _self_signed_certificate(directory: Path) -> tuple[Path, Path]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.timezone.utc)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = directory / "cert.pem", directory / "key.pem"
    cert_path.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return cert_path, key_path


def test_an_https_upstream_through_the_proxy_with_the_sdk(tmp_path, monkeypatch, start_proxy) -> None:
    cert, key = _self_signed_certificate(tmp_path)
    upstream = FakeUpstream(api_key="sk-upstream")
    running = serve_in_thread(upstream, ssl_certfile=str(cert), ssl_keyfile=str(key))
    try:
        https_url = running.url.replace("http://", "https://").replace("127.0.0.1", "localhost") + "/v1"
        monkeypatch.setenv("SSL_CERT_FILE", str(cert))  # trust the test's own CA, as an operator would
        proxy = start_proxy(make_config(https_url, upstreams={"fake": {"base_url": https_url, "api_key": "sk-upstream"}}))
        client = proxy.client()
        reply = client.chat.completions.create(
            model="gpt-4o-mini", messages=[{"role": "user", "content": "over TLS"}], user="u1"
        )
        streamed = "".join(
            chunk.choices[0].delta.content or ""
            for chunk in client.chat.completions.create(
                model="gpt-4o-mini", messages=[{"role": "user", "content": "streamed over TLS"}], stream=True
            )
            if chunk.choices
        )
        assert "over TLS" in reply.choices[0].message.content
        assert "streamed over TLS" in streamed
        assert upstream.received[0].headers["host"] == https_url.split("/")[2]

        monkeypatch.delenv("SSL_CERT_FILE")  # an upstream whose certificate nobody vouches for
        untrusting = start_proxy(make_config(https_url, upstreams={"fake": {"base_url": https_url, "api_key": "sk-upstream"}}))
        with pytest.raises(openai.APIStatusError) as refused:
            untrusting.client().chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}])
        assert refused.value.status_code == 502
        assert "sk-upstream" not in refused.value.response.text
    finally:
        running.stop()


@pytest.mark.slow
def test_a_slow_client_gets_all_of_a_tls_stream_the_upstream_closed_behind(tmp_path) -> None:
    """uvloop's TLS transport throws away what it decrypted if the peer closes while reading is
    paused; the client must not pause TLS streams, so the slow reader still gets every byte."""
    cert, key = _self_signed_certificate(tmp_path)
    event = b"data: " + b"x" * 4000 + b"\n\n"
    sent = b"".join(event for _ in range(150)) + b"data: [DONE]\n\n"

    async def main():
        server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        server_context.load_cert_chain(cert, key)

        async def handle(reader, writer):
            await reader.readuntil(b"\r\n\r\n")
            writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ncontent-length: %d\r\n\r\n" % len(sent))
            writer.write(sent)
            await writer.drain()
            await asyncio.sleep(0.2)
            writer.transport.abort()  # gone, as after its keep-alive timeout

        server = await asyncio.start_server(handle, "127.0.0.1", 0, ssl=server_context)
        os.environ["SSL_CERT_FILE"] = str(cert)
        try:
            client = client_for(f"https://localhost:{server.sockets[0].getsockname()[1]}/v1")
        finally:
            del os.environ["SSL_CERT_FILE"]
        async with post_to(client, 5.0, True) as response:
            received = await response.__anext__()
            await asyncio.sleep(0.8)  # the client is slow; the upstream finishes and hangs up
            received += b"".join([chunk async for chunk in response])
        client.close()
        server.close()
        assert received == sent

    uvloop.run(main())
