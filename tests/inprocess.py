"""An ASGI app called in process, for tests where the socket is not the point: the app runs on an
event loop in a thread of its own (its lifespan run, as a server would), and clients — the
openai SDK, or :func:`helpers.http` — reach it through httpx's ASGI transport instead of TCP.

What the socket adds (uvicorn's HTTP parsing, its limits on headers and body time, streaming a
response while it is written) is tested over a socket; the rest needs none. Starting and
stopping an app this way costs milliseconds against uvicorn's ~0.3 s (its shutdown polls
every 0.1 s).

An in-process app has a URL, ``http://in-process-N``: :func:`transport_for` finds the app
behind it, so helpers that take a URL work unchanged."""

from __future__ import annotations

import asyncio
import gc
import itertools
import sys
import threading
import traceback
from contextlib import AbstractAsyncContextManager
from typing import Any
from urllib.parse import urlsplit

import httpx2

SHUTDOWN_S = 60.0
"""The app's shutdown bounds each of its steps (together under 50 s, abproxy/app.py): waiting
longer than that is a hang, not a slow machine."""
CLIENT_ADDRESS = ("127.0.0.1", 50_000)
"""The peer address the app sees: loopback, as for a test's client over TCP."""

_RUNNING: dict[str, InProcessServer] = {}
_NUMBERS = itertools.count(1)


class InProcessServer:
    """``app`` on its own event loop in a daemon thread, lifespan entered; :meth:`stop` exits it."""

    def __init__(self, app: Any, timeout_s: float = 300.0):
        self.app = app
        self.timeout_s = timeout_s
        self.url = f"http://in-process-{next(_NUMBERS)}"
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="in-process-app", daemon=True)
        self._thread.start()
        self._lifespan: AbstractAsyncContextManager[Any] = app.router.lifespan_context(app)
        try:
            self.run(self._lifespan.__aenter__())
        except BaseException:
            self._stop_loop()
            raise
        self._asgi = httpx2.ASGITransport(app=app, client=CLIENT_ADDRESS)
        _RUNNING[urlsplit(self.url).netloc] = self

    def run(self, coro: Any, timeout_s: float | None = None) -> Any:
        """Run ``coro`` on the app's loop and wait for its result."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout_s or self.timeout_s)

    async def call(self, request: httpx2.Request) -> tuple[int, list[tuple[bytes, bytes]], bytes]:
        """One request, on the app's loop: status, raw headers and the whole body."""
        response = await self._asgi.handle_async_request(request)
        body = await response.aread()
        return response.status_code, response.headers.raw, body

    def stop(self, timeout: float | None = None) -> None:
        """Exits the lifespan and ends the loop; a second call does nothing, as for a server.
        (``timeout``, a server's grace period for requests, has no meaning here.)"""
        if self.loop.is_closed():
            return
        _RUNNING.pop(urlsplit(self.url).netloc, None)
        try:
            self.run(self._lifespan.__aexit__(None, None, None), SHUTDOWN_S)
        except TimeoutError:
            raise TimeoutError(f"the app's shutdown hung; where its tasks wait:\n{self._where_tasks_wait()}") from None
        finally:
            self._stop_loop()

    def _where_tasks_wait(self) -> str:
        tasks = "\n".join(f"{task.get_name()}:\n{_awaits(task.get_coro())}" for task in asyncio.all_tasks(self.loop))
        state = f"loop running: {self.loop.is_running()}, its thread alive: {self._thread.is_alive()}"
        threads = []
        for thread in threading.enumerate():
            frame = sys._current_frames().get(thread.ident or -1)
            if frame is not None:
                threads.append(f"thread {thread.name}:\n" + "".join(traceback.format_stack(frame, limit=-10)))
        return f"{state}\n{tasks}\n\nthreads:\n" + "\n".join(threads)

    def _stop_loop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)
        if not self._thread.is_alive():
            self.loop.close()


def _awaits(coro: Any) -> str:
    """The chain of awaits a suspended coroutine is in, outermost first."""
    lines = []
    while coro is not None:
        frame = getattr(coro, "cr_frame", None) or getattr(coro, "ag_frame", None) or getattr(coro, "gi_frame", None)
        if frame is not None:
            lines.append(f"  {frame.f_code.co_filename}:{frame.f_lineno} in {frame.f_code.co_name}")
        awaited = getattr(coro, "cr_await", None) or getattr(coro, "ag_await", None) or getattr(coro, "gi_yieldfrom", None)
        if type(awaited).__name__ == "async_generator_asend":  # anext(generator): go into it
            awaited = next((g for g in gc.get_referents(awaited) if hasattr(g, "ag_frame")), None)
        coro = awaited
    return "\n".join(lines)


def _copy(request: httpx2.Request, body: bytes) -> httpx2.Request:
    return httpx2.Request(request.method, request.url, headers=request.headers, content=body)


def _answer(request: httpx2.Request, answer: tuple[int, list[tuple[bytes, bytes]], bytes]) -> httpx2.Response:
    status, headers, body = answer
    return httpx2.Response(status, headers=headers, stream=httpx2.ByteStream(body), request=request)


class InProcessTransport(httpx2.BaseTransport):
    """For synchronous clients (``openai.OpenAI``, ``httpx2.Client``)."""

    def __init__(self, server: InProcessServer):
        self._server = server

    def handle_request(self, request: httpx2.Request) -> httpx2.Response:
        # The client's own read timeout bounds the wait (a first flush into a new MLflow store
        # can take a while on a busy machine); the server's bound only when it gave none.
        timeout_s = (request.extensions.get("timeout") or {}).get("read")
        return _answer(request, self._server.run(self._server.call(_copy(request, request.read())), timeout_s))


class AsyncInProcessTransport(httpx2.AsyncBaseTransport):
    """For asynchronous clients (``openai.AsyncOpenAI``) on any loop: the app still runs on its own."""

    def __init__(self, server: InProcessServer):
        self._server = server

    async def handle_async_request(self, request: httpx2.Request) -> httpx2.Response:
        body = await request.aread()
        future = asyncio.run_coroutine_threadsafe(self._server.call(_copy(request, body)), self._server.loop)
        return _answer(request, await asyncio.wrap_future(future))


def transport_for(url: str) -> InProcessTransport | None:
    """The transport to the in-process app ``url`` points at, if it points at one."""
    server = _RUNNING.get(urlsplit(url).netloc)
    return InProcessTransport(server) if server is not None else None
