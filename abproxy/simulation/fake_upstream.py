"""A fast, realistic OpenAI-compatible upstream of our own (pure ASGI + orjson): no model can be
reached from where abproxy is built and tested, so this stands in for one.

Used by the test-suite, the benchmarks and the demo (:mod:`abproxy.simulation.server` runs it).
This module is the HTTP side (routing, failure injection, streaming, introspection); the bodies
and SSE events it answers with are built in :mod:`abproxy.simulation.replies`.

Endpoints (under ``/v1``): ``POST chat/completions``, ``POST completions``,
``POST responses``, ``POST embeddings``, ``GET models``.  Introspection:
``GET /_fake/requests`` (recorded requests) and ``DELETE /_fake/requests``.

Replies echo the last user text (``"Echo: " + text``); usage counts
whitespace-separated words.  Failure injection is driven by request headers
so that it can be passed through a proxy (e.g. the SDK's ``extra_headers``):

* ``x-fake-status: 429``       -> that status with an OpenAI-shaped error body
* ``x-fake-delay-ms: N``       -> sleep before the response start
* ``x-fake-chunk-delay-ms: N`` -> per-chunk sleep for streams
* ``x-fake-hang: 1``           -> never answer (until the client goes away)
* ``x-fake-break-after: N``    -> drop the connection after N word chunks
* ``x-fake-reply: text``       -> use this reply instead of the echo
* ``x-fake-usage: 0``          -> omit usage (also in streams)
* ``x-fake-retry-after: S``    -> add a ``retry-after`` response header

``FakeUpstream.disconnects`` counts requests whose client went away while the
fake was still waiting (hang, delay, or between stream chunks); a stream sent
with no chunk delay is written in one go and cannot be interrupted.  A
``break-after`` abort is server-side and is not counted.

Run standalone::

    python -m abproxy.simulation.fake_upstream --host 127.0.0.1 --port 9000 [--latency-ms X]
        [--chunk-delay-ms Y] [--api-key K] [--record]
"""

from __future__ import annotations

import argparse
import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeAlias

import orjson

from abproxy.simulation import replies
from abproxy.simulation.replies import Fake, Reply, ReplyError, error_body, header_text
from abproxy.simulation.server import BrokenOnPurpose, serve_forever

__all__ = ["FakeUpstream", "ReceivedRequest", "FakeBrokenStream", "main"]

_dumps = orjson.dumps
_loads = orjson.loads

# A route: the request's JSON object and its x-fake-* headers (None when it had none) -> its reply.
Handler: TypeAlias = Callable[[dict[str, Any], Fake | None], Reply]

# ---------------------------------------------------------------------------
# Precomputed constants
# ---------------------------------------------------------------------------

_JSON_CT = (b"content-type", b"application/json")
_SSE_HEADERS = [
    (b"content-type", b"text/event-stream; charset=utf-8"),
    (b"cache-control", b"no-cache"),
]


class FakeBrokenStream(BrokenOnPurpose):
    """Raised inside the ASGI app to make the server drop the connection."""


@dataclass
class ReceivedRequest:
    method: str
    path: str
    headers: dict[str, str]
    body: bytes
    json: Any | None

    def to_dict(self) -> dict[str, Any]:
        return {"method": self.method, "path": self.path, "headers": self.headers, "json": self.json}


class _Conn:
    """Per-request disconnect state (only allocated when the request can yield)."""

    __slots__ = ("fut", "done", "gone", "task")

    def __init__(self) -> None:
        self.fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.done = False
        self.gone = False
        self.task: asyncio.Task[None] | None = None


def _hdr_num(v: bytes | None, default: float = 0.0) -> float:
    if v is None:
        return default
    try:
        return float(v)
    except ValueError:
        return default


# ---------------------------------------------------------------------------
# The app
# ---------------------------------------------------------------------------


class FakeUpstream:
    """ASGI app imitating the OpenAI HTTP API.

    Attributes:
        received: recorded requests (when ``record=True``).
        disconnects: streaming/hanging/delayed requests whose client went away early.
        active: currently open HTTP requests.
        total: HTTP requests handled so far.
    """

    def __init__(
        self,
        *,
        api_key: str | None = None,
        latency_ms: float = 0.0,
        chunk_delay_ms: float = 0.0,
        record: bool = True,
    ) -> None:
        self.api_key = api_key
        self.latency_ms = float(latency_ms)
        self.chunk_delay_ms = float(chunk_delay_ms)
        self.record = record
        self.received: list[ReceivedRequest] = []
        self.disconnects = 0
        self.active = 0
        self.total = 0
        self._auth = b"Bearer " + api_key.encode() if api_key else None
        self._models_body = replies.model_list(int(time.time()))
        self._post_routes: dict[str, Handler] = {
            "/v1/chat/completions": replies.chat,
            "/v1/completions": replies.completions,
            "/v1/responses": replies.responses,
            "/v1/embeddings": replies.embeddings,
        }

    # -- public helpers ----------------------------------------------------
    def clear(self) -> None:
        self.received.clear()

    def wait_for(self, predicate, timeout: float = 5.0, interval: float = 0.01) -> bool:
        """Poll ``predicate()`` from another thread until true or timeout."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if predicate():
                return True
            time.sleep(interval)
        return bool(predicate())

    # -- ASGI ----------------------------------------------------------------
    async def __call__(self, scope, receive, send) -> None:
        typ = scope["type"]
        if typ == "http":
            self.active += 1
            self.total += 1
            try:
                await self._http(scope, receive, send)
            finally:
                self.active -= 1
        elif typ == "lifespan":
            while True:
                msg = await receive()
                if msg["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                elif msg["type"] == "lifespan.shutdown":
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        elif typ == "websocket":
            await receive()
            await send({"type": "websocket.close", "code": 1000})

    @staticmethod
    async def _send_json(send, status: int, body: bytes, extra: list | None = None) -> None:
        headers = [_JSON_CT, (b"content-length", b"%d" % len(body))]
        if extra:
            headers.extend(extra)
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body})

    async def _http(self, scope, receive, send) -> None:
        method = scope["method"]
        path = scope["path"]

        fake: dict[bytes, bytes] | None = None
        auth = None
        for name, value in scope["headers"]:
            if name[:7] == b"x-fake-":
                if fake is None:
                    fake = {}
                fake[name[7:].lower()] = value
            elif name == b"authorization" or name == b"Authorization":
                auth = value

        # read the request body (fast path: single message)
        msg = await receive()
        if msg["type"] == "http.disconnect":
            return
        body = msg.get("body", b"")
        if msg.get("more_body"):
            chunks = [body]
            while True:
                msg = await receive()
                if msg["type"] == "http.disconnect":
                    return
                chunks.append(msg.get("body", b""))
                if not msg.get("more_body"):
                    break
            body = b"".join(chunks)

        if not path.startswith("/v1/"):
            if path == "/_fake/requests":
                await self._introspect(method, send)
                return
            if path == "/_fake/stats":
                await self._send_json(send, 200, _dumps(
                    {"active": self.active, "disconnects": self.disconnects, "total": self.total,
                     "received": len(self.received)}))
                return
            await self._send_json(send, 404, error_body(404, f"Invalid URL ({method} {path})", code=None))
            return

        data: Any = None
        bad_json = False
        if body:
            try:
                data = _loads(body)
            except orjson.JSONDecodeError:
                bad_json = True

        if self.record:
            self.received.append(
                ReceivedRequest(
                    method=method,
                    path=path,
                    headers={k.decode("latin-1").lower(): header_text(v) for k, v in scope["headers"]},
                    body=body,
                    json=data,
                )
            )

        if self._auth is not None and auth != self._auth:
            await self._send_json(
                send,
                401,
                error_body(401, "Incorrect API key provided: fake. You can find your API key at "
                                "https://platform.openai.com/account/api-keys.", code="invalid_api_key"),
            )
            return

        handler: Handler | None = None
        if method == "POST":
            handler = self._post_routes.get(path)
        elif method == "GET" and path == "/v1/models":
            handler = self._models
        elif method == "GET" and path.startswith("/v1/models/"):

            def entry(req: dict[str, Any], fake: Fake | None) -> bytes:
                return replies.model_entry(path)

            handler = entry
        if handler is None:
            await self._send_json(send, 404, error_body(404, f"Invalid URL ({method} {path})", code=None))
            return

        # ---- fast path: no failure injection, no latency ------------------
        if fake is None and not self.latency_ms and not self.chunk_delay_ms:
            if bad_json:
                await self._send_json(send, 400, error_body(400, "We could not parse the JSON body of your request."))
                return
            try:
                result = handler(data if isinstance(data, dict) else {}, None)
            except ReplyError as e:
                await self._send_json(send, e.status, error_body(e.status, e.message, code=e.code, param=e.param))
                return
            if isinstance(result, bytes):
                await self._send_json(send, 200, result)
            else:
                await self._stream(send, result, None, 0.0, -1)
            return

        await self._http_slow(receive, send, handler, data, bad_json, fake or {})

    async def _http_slow(self, receive, send, handler: Handler, data: Any, bad_json: bool, fake: Fake) -> None:
        hang = fake.get(b"hang")
        delay_ms = _hdr_num(fake.get(b"delay-ms"), self.latency_ms)
        chunk_delay_ms = _hdr_num(fake.get(b"chunk-delay-ms"), self.chunk_delay_ms)
        conn: _Conn | None = None
        if (hang is not None and hang not in (b"0", b"false")) or delay_ms > 0 or chunk_delay_ms > 0:
            conn = _Conn()
            conn.task = asyncio.get_running_loop().create_task(self._watch(receive, conn))
        try:
            if conn is not None and hang is not None and hang not in (b"0", b"false"):
                await asyncio.wait((conn.fut,), timeout=3600.0)
                return
            if conn is not None and delay_ms > 0:
                await asyncio.wait((conn.fut,), timeout=delay_ms / 1000.0)
                if conn.gone:
                    return

            extra = None
            ra = fake.get(b"retry-after")
            if ra is not None:
                extra = [(b"retry-after", ra)]

            st = fake.get(b"status")
            if st is not None:
                try:
                    status = int(st)
                except ValueError:
                    status = 0
                if status >= 400:
                    await self._send_json(send, status, error_body(status), extra)
                    return

            if bad_json:
                await self._send_json(send, 400, error_body(400, "We could not parse the JSON body of your request."))
                return
            try:
                result = handler(data if isinstance(data, dict) else {}, fake)
            except ReplyError as e:
                await self._send_json(send, e.status, error_body(e.status, e.message, code=e.code, param=e.param))
                return
            if isinstance(result, bytes):
                await self._send_json(send, 200, result, extra)
            else:
                ba = fake.get(b"break-after")
                break_after = int(_hdr_num(ba, -1)) if ba is not None else -1
                await self._stream(send, result, conn, chunk_delay_ms / 1000.0, break_after)
        finally:
            if conn is not None:
                conn.done = True
                if conn.task is not None:
                    conn.task.cancel()

    async def _watch(self, receive, conn: _Conn) -> None:
        while True:
            msg = await receive()
            if msg["type"] == "http.disconnect":
                break
        # uvicorn also reports http.disconnect once the response is complete;
        # ``done`` is set synchronously right after the final send.
        if not conn.done:
            conn.gone = True
            self.disconnects += 1
            if not conn.fut.done():
                conn.fut.set_result(None)

    async def _stream(self, send, result: replies.Events, conn: _Conn | None, delay: float, break_after: int) -> None:
        events, first_word, n_words = result
        cut = -1
        if break_after >= 0:
            cut = first_word + min(break_after, n_words)
        await send({"type": "http.response.start", "status": 200, "headers": _SSE_HEADERS})
        last = len(events) - 1
        for i, ev in enumerate(events):
            if i == cut:
                raise FakeBrokenStream(f"x-fake-break-after: {break_after}")
            if conn is not None and conn.gone:
                return
            await send({"type": "http.response.body", "body": ev, "more_body": True})
            if conn is not None and delay > 0 and i < last:
                await asyncio.wait((conn.fut,), timeout=delay)
        if conn is not None and conn.gone:
            return
        await send({"type": "http.response.body", "body": b"", "more_body": False})
        if conn is not None:
            conn.done = True

    async def _introspect(self, method: str, send) -> None:
        if method == "GET":
            await self._send_json(send, 200, _dumps([r.to_dict() for r in self.received]))
        elif method == "DELETE":
            self.clear()
            await self._send_json(send, 200, b'{"ok":true}')
        else:
            await self._send_json(send, 405, error_body(405, "Method not allowed"))

    def _models(self, req: dict[str, Any], fake: Fake | None) -> bytes:
        return self._models_body


# ---------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m abproxy.simulation.fake_upstream",
                                 description=__doc__.split("\n\n")[0])
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=9000)
    ap.add_argument("--latency-ms", type=float, default=0.0, help="delay before every /v1 response")
    ap.add_argument("--chunk-delay-ms", type=float, default=0.0, help="delay between stream chunks")
    ap.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY'")
    g = ap.add_mutually_exclusive_group()
    g.add_argument("--record", dest="record", action="store_true", help="record requests (GET /_fake/requests)")
    g.add_argument("--no-record", dest="record", action="store_false", help="do not record requests (default)")
    ap.set_defaults(record=False)
    args = ap.parse_args(argv)

    app = FakeUpstream(
        api_key=args.api_key, latency_ms=args.latency_ms, chunk_delay_ms=args.chunk_delay_ms, record=args.record
    )
    serve_forever(app, args.host, args.port)


if __name__ == "__main__":
    main()
