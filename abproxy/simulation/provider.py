"""A fast, realistic OpenAI-compatible provider of our own (pure ASGI + orjson): no model can be
reached from where abproxy is built and tested, so this stands in for one.

Used by the test-suite, the benchmarks and the demo (:mod:`abproxy.simulation.server` runs it).

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

    python -m abproxy.simulation.provider --host 127.0.0.1 --port 9000 [--latency-ms X]
        [--chunk-delay-ms Y] [--api-key K] [--record]
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import hashlib
import os
import struct
import time
from dataclasses import dataclass
from typing import Any

import orjson

from abproxy.simulation.server import BrokenOnPurpose, serve_forever

__all__ = ["FakeUpstream", "ReceivedRequest", "FakeBrokenStream", "main"]

_dumps = orjson.dumps
_loads = orjson.loads

# ---------------------------------------------------------------------------
# Precomputed constants
# ---------------------------------------------------------------------------

_JSON_CT = (b"content-type", b"application/json")
_SSE_HEADERS = [
    (b"content-type", b"text/event-stream; charset=utf-8"),
    (b"cache-control", b"no-cache"),
]
_DONE = b"data: [DONE]\n\n"
_MODELS = ("gpt-4o-mini", "gpt-4o")

_ERROR_TYPES = {
    400: ("invalid_request_error", None),
    401: ("invalid_request_error", "invalid_api_key"),
    403: ("invalid_request_error", "permission_denied"),
    404: ("invalid_request_error", "not_found"),
    408: ("timeout", "timeout"),
    409: ("invalid_request_error", "conflict"),
    422: ("invalid_request_error", "unprocessable_entity"),
    429: ("requests", "rate_limit_exceeded"),
    500: ("server_error", "server_error"),
    502: ("server_error", "bad_gateway"),
    503: ("server_error", "service_unavailable"),
    504: ("server_error", "gateway_timeout"),
}

_TEXT_PART_TYPES = frozenset(("text", "input_text", "output_text"))


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


def _rand_hex(nbytes: int) -> str:
    return os.urandom(nbytes).hex()


def _text_of(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        out = []
        for p in content:
            if isinstance(p, dict) and p.get("type") in _TEXT_PART_TYPES:
                t = p.get("text")
                if isinstance(t, str):
                    out.append(t)
            elif isinstance(p, str):
                out.append(p)
        return " ".join(out)
    return ""


def _words(text: str) -> int:
    return len(text.split())


def _pieces(reply: str) -> list[str]:
    """Word deltas whose concatenation is exactly ``reply``."""
    parts = reply.split(" ")
    out = [parts[0]] if parts[0] else []
    for p in parts[1:]:
        out.append(" " + p)
    return out


def _hdr_str(v: bytes) -> str:
    try:
        return v.decode("utf-8")
    except UnicodeDecodeError:
        return v.decode("latin-1")


def _hdr_num(v: bytes | None, default: float = 0.0) -> float:
    if v is None:
        return default
    try:
        return float(v)
    except ValueError:
        return default


def error_body(status: int, message: str | None = None, *, code: str | None = None, type_: str | None = None,
               param: str | None = None) -> bytes:
    t, c = _ERROR_TYPES.get(status, ("server_error" if status >= 500 else "invalid_request_error", None))
    return _dumps(
        {
            "error": {
                "message": message if message is not None else f"fake error {status}",
                "type": type_ or t,
                "param": param,
                "code": code if code is not None else c,
            }
        }
    )


class _HTTPError(Exception):
    def __init__(self, status: int, message: str, code: str | None = None, param: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code
        self.param = param


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
        created = int(time.time())
        self._models_body = _dumps(
            {
                "object": "list",
                "data": [{"id": m, "object": "model", "created": created, "owned_by": "fake"} for m in _MODELS],
            }
        )
        self._post_routes = {
            "/v1/chat/completions": self._chat,
            "/v1/completions": self._completions,
            "/v1/responses": self._responses,
            "/v1/embeddings": self._embeddings,
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
                    headers={k.decode("latin-1").lower(): _hdr_str(v) for k, v in scope["headers"]},
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

        handler = None
        if method == "POST":
            handler = self._post_routes.get(path)
        elif method == "GET" and path == "/v1/models":
            handler = self._models
        elif method == "GET" and path.startswith("/v1/models/"):
            handler = self._model
        if handler is None:
            await self._send_json(send, 404, error_body(404, f"Invalid URL ({method} {path})", code=None))
            return

        # ---- fast path: no failure injection, no latency ------------------
        if fake is None and not self.latency_ms and not self.chunk_delay_ms:
            if bad_json:
                await self._send_json(send, 400, error_body(400, "We could not parse the JSON body of your request."))
                return
            try:
                result = handler(data if isinstance(data, dict) else {}, None, path)
            except _HTTPError as e:
                await self._send_json(send, e.status, error_body(e.status, e.message, code=e.code, param=e.param))
                return
            if type(result) is bytes:
                await self._send_json(send, 200, result)
            else:
                await self._stream(send, result, None, 0.0, -1)
            return

        await self._http_slow(receive, send, handler, data, bad_json, fake or {}, path)

    async def _http_slow(self, receive, send, handler, data, bad_json, fake, path) -> None:
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
                result = handler(data if isinstance(data, dict) else {}, fake, path)
            except _HTTPError as e:
                await self._send_json(send, e.status, error_body(e.status, e.message, code=e.code, param=e.param))
                return
            if type(result) is bytes:
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

    async def _stream(self, send, result, conn: _Conn | None, delay: float, break_after: int) -> None:
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

    # -- handlers ------------------------------------------------------------
    # Each returns bytes (JSON body) or (events, index_of_first_word_event, n_word_events).

    @staticmethod
    def _model_of(req: dict) -> str:
        model = req.get("model")
        if not isinstance(model, str) or not model:
            raise _HTTPError(400, "you must provide a model parameter", param="model")
        return model

    @staticmethod
    def _usage_on(fake) -> bool:
        if fake is None:
            return True
        v = fake.get(b"usage")
        return v is None or v not in (b"0", b"false", b"no")

    @staticmethod
    def _reply(fake, default_text: str) -> str:
        if fake is not None:
            r = fake.get(b"reply")
            if r is not None:
                return _hdr_str(r)
        return "Echo: " + default_text

    def _models(self, req, fake, path) -> bytes:
        return self._models_body

    def _model(self, req, fake, path) -> bytes:
        mid = path[len("/v1/models/"):]
        return _dumps({"id": mid, "object": "model", "created": 1700000000, "owned_by": "fake"})

    def _chat(self, req: dict, fake, path):
        model = self._model_of(req)
        messages = req.get("messages")
        if not isinstance(messages, list):
            raise _HTTPError(400, "Missing required parameter: 'messages'.", param="messages")
        prompt_tokens = 0
        last_user = ""
        for m in messages:
            if not isinstance(m, dict):
                continue
            t = _text_of(m.get("content"))
            prompt_tokens += _words(t)
            if m.get("role") == "user":
                last_user = t
        reply = self._reply(fake, last_user)
        completion_tokens = _words(reply)
        usage_on = self._usage_on(fake)
        usage = {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
            "prompt_tokens_details": {"cached_tokens": 0, "audio_tokens": 0},
            "completion_tokens_details": {
                "reasoning_tokens": 0,
                "audio_tokens": 0,
                "accepted_prediction_tokens": 0,
                "rejected_prediction_tokens": 0,
            },
        }
        cid = "chatcmpl-" + _rand_hex(12)
        created = int(time.time())
        if not req.get("stream"):
            out = {
                "id": cid,
                "object": "chat.completion",
                "created": created,
                "model": model,
                "choices": [
                    {
                        "index": 0,
                        "message": {"role": "assistant", "content": reply, "refusal": None, "annotations": []},
                        "logprobs": None,
                        "finish_reason": "stop",
                    }
                ],
                "service_tier": "default",
                "system_fingerprint": "fp_fake",
            }
            if usage_on:
                out["usage"] = usage
            return _dumps(out)

        so = req.get("stream_options")
        include_usage = usage_on and isinstance(so, dict) and bool(so.get("include_usage"))
        head = b"".join(
            (
                b'data: {"id":"',
                cid.encode(),
                b'","object":"chat.completion.chunk","created":',
                b"%d" % created,
                b',"model":',
                _dumps(model),
                b',"service_tier":"default","system_fingerprint":"fp_fake","choices":[',
            )
        )
        tail = b'],"usage":null}\n\n' if include_usage else b"]}\n\n"
        events = [head + b'{"index":0,"delta":{"role":"assistant","content":"","refusal":null},'
                         b'"logprobs":null,"finish_reason":null}' + tail]
        pieces = _pieces(reply)
        for p in pieces:
            events.append(head + b'{"index":0,"delta":{"content":' + _dumps(p)
                          + b'},"logprobs":null,"finish_reason":null}' + tail)
        events.append(head + b'{"index":0,"delta":{},"logprobs":null,"finish_reason":"stop"}' + tail)
        if include_usage:
            events.append(head + b'],"usage":' + _dumps(usage) + b"}\n\n")
        events.append(_DONE)
        return events, 1, len(pieces)

    def _completions(self, req: dict, fake, path):
        model = self._model_of(req)
        prompt = req.get("prompt", "")
        if isinstance(prompt, list):
            prompt = prompt[0] if prompt else ""
        if not isinstance(prompt, str):
            prompt = str(prompt)
        reply = self._reply(fake, prompt)
        prompt_tokens = _words(prompt)
        completion_tokens = _words(reply)
        usage_on = self._usage_on(fake)
        usage = {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
        }
        cid = "cmpl-" + _rand_hex(12)
        created = int(time.time())
        if not req.get("stream"):
            out = {
                "id": cid,
                "object": "text_completion",
                "created": created,
                "model": model,
                "choices": [{"text": reply, "index": 0, "logprobs": None, "finish_reason": "stop"}],
                "system_fingerprint": "fp_fake",
            }
            if usage_on:
                out["usage"] = usage
            return _dumps(out)

        so = req.get("stream_options")
        include_usage = usage_on and isinstance(so, dict) and bool(so.get("include_usage"))
        head = b"".join(
            (
                b'data: {"id":"',
                cid.encode(),
                b'","object":"text_completion","created":',
                b"%d" % created,
                b',"model":',
                _dumps(model),
                b',"system_fingerprint":"fp_fake","choices":[',
            )
        )
        tail = b'],"usage":null}\n\n' if include_usage else b"]}\n\n"
        pieces = _pieces(reply)
        events = [
            head + b'{"text":' + _dumps(p) + b',"index":0,"logprobs":null,"finish_reason":null}' + tail
            for p in pieces
        ]
        events.append(head + b'{"text":"","index":0,"logprobs":null,"finish_reason":"stop"}' + tail)
        if include_usage:
            events.append(head + b'],"usage":' + _dumps(usage) + b"}\n\n")
        events.append(_DONE)
        return events, 0, len(pieces)

    def _responses(self, req: dict, fake, path):
        model = self._model_of(req)
        inp = req.get("input", "")
        instructions = req.get("instructions")
        input_tokens = _words(instructions) if isinstance(instructions, str) else 0
        last_user = ""
        if isinstance(inp, str):
            last_user = inp
            input_tokens += _words(inp)
        elif isinstance(inp, list):
            for item in inp:
                if isinstance(item, str):
                    t = item
                    role = "user"
                elif isinstance(item, dict):
                    if item.get("type", "message") != "message":
                        output = item.get("output")
                        t = output if isinstance(output, str) else ""
                        input_tokens += _words(t)
                        continue
                    t = _text_of(item.get("content"))
                    role = str(item.get("role"))
                else:
                    continue
                input_tokens += _words(t)
                if role == "user":
                    last_user = t
        reply = self._reply(fake, last_user)
        output_tokens = _words(reply)
        usage = None
        if self._usage_on(fake):
            usage = {
                "input_tokens": input_tokens,
                "input_tokens_details": {"cached_tokens": 0},
                "output_tokens": output_tokens,
                "output_tokens_details": {"reasoning_tokens": 0},
                "total_tokens": input_tokens + output_tokens,
            }
        rid = "resp_" + _rand_hex(24)
        mid = "msg_" + _rand_hex(24)
        created = int(time.time())
        text_part = {"type": "output_text", "text": reply, "annotations": [], "logprobs": []}
        message = {
            "type": "message",
            "id": mid,
            "status": "completed",
            "role": "assistant",
            "content": [text_part],
        }

        def response(status: str, output: list, usage_obj) -> dict:
            r = {
                "id": rid,
                "object": "response",
                "created_at": created,
                "status": status,
                "background": False,
                "error": None,
                "incomplete_details": None,
                "instructions": instructions,
                "max_output_tokens": req.get("max_output_tokens"),
                "model": model,
                "output": output,
                "parallel_tool_calls": bool(req.get("parallel_tool_calls", True)),
                "previous_response_id": req.get("previous_response_id"),
                "reasoning": {"effort": None, "summary": None},
                "service_tier": "default",
                "store": bool(req.get("store", True)),
                "temperature": req.get("temperature", 1.0),
                "text": req.get("text") or {"format": {"type": "text"}},
                "tool_choice": req.get("tool_choice", "auto"),
                "tools": req.get("tools") or [],
                "top_p": req.get("top_p", 1.0),
                "truncation": req.get("truncation", "disabled"),
                "usage": usage_obj,
                "user": req.get("user"),
                "metadata": req.get("metadata") or {},
            }
            if status == "completed":
                r["completed_at"] = created
            return r

        if not req.get("stream"):
            out = response("completed", [message], usage)
            if usage is None:
                del out["usage"]
            return _dumps(out)

        seq = 0

        def ev(obj: dict) -> bytes:
            nonlocal seq
            obj["sequence_number"] = seq
            seq += 1
            return b"event: " + obj["type"].encode() + b"\ndata: " + _dumps(obj) + b"\n\n"

        events = [
            ev({"type": "response.created", "response": response("in_progress", [], None)}),
            ev({"type": "response.in_progress", "response": response("in_progress", [], None)}),
            ev({
                "type": "response.output_item.added",
                "output_index": 0,
                "item": {"type": "message", "id": mid, "status": "in_progress", "role": "assistant", "content": []},
            }),
            ev({
                "type": "response.content_part.added",
                "item_id": mid,
                "output_index": 0,
                "content_index": 0,
                "part": {"type": "output_text", "text": "", "annotations": [], "logprobs": []},
            }),
        ]
        first = len(events)
        pieces = _pieces(reply)
        for p in pieces:
            events.append(ev({
                "type": "response.output_text.delta",
                "item_id": mid,
                "output_index": 0,
                "content_index": 0,
                "delta": p,
                "logprobs": [],
            }))
        events.append(ev({
            "type": "response.output_text.done",
            "item_id": mid,
            "output_index": 0,
            "content_index": 0,
            "text": reply,
            "logprobs": [],
        }))
        events.append(ev({
            "type": "response.content_part.done",
            "item_id": mid,
            "output_index": 0,
            "content_index": 0,
            "part": text_part,
        }))
        events.append(ev({"type": "response.output_item.done", "output_index": 0, "item": message}))
        final = response("completed", [message], usage)
        if usage is None:
            del final["usage"]
        events.append(ev({"type": "response.completed", "response": final}))
        return events, first, len(pieces)

    def _embeddings(self, req: dict, fake, path) -> bytes:
        model = self._model_of(req)
        inp = req.get("input")
        if isinstance(inp, str):
            inputs = [inp]
        elif isinstance(inp, list) and inp and all(isinstance(x, int) for x in inp):
            inputs = [" ".join(map(str, inp))]
        elif isinstance(inp, list):
            inputs = [x if isinstance(x, str) else " ".join(map(str, x)) if isinstance(x, list) else str(x)
                      for x in inp]
        else:
            raise _HTTPError(400, "Missing required parameter: 'input'.", param="input")
        b64 = req.get("encoding_format") == "base64"
        data = []
        tokens = 0
        for i, text in enumerate(inputs):
            tokens += _words(text)
            digest = hashlib.blake2b(text.encode(), digest_size=16).digest()
            vec = [round(v / 32767.5 - 1.0, 6) for v in struct.unpack("<8H", digest)]
            emb: Any = base64.b64encode(struct.pack("<8f", *vec)).decode() if b64 else vec
            data.append({"object": "embedding", "index": i, "embedding": emb})
        out: dict[str, Any] = {"object": "list", "data": data, "model": model}
        if self._usage_on(fake):
            out["usage"] = {"prompt_tokens": tokens, "total_tokens": tokens}
        return _dumps(out)


# ---------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m abproxy.simulation.provider", description=__doc__.split("\n\n")[0])
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
