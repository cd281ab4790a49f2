"""Running an ASGI app (the simulated provider, or the proxy itself) under uvicorn in a thread
of this process: for the demo, the benchmarks and the tests."""

from __future__ import annotations

import logging
import socket
import threading
import time
from typing import Any

import uvicorn


class BrokenOnPurpose(Exception):
    """Raised by an app to make the server drop the connection mid-response (a broken stream);
    its traceback is kept out of the log."""

DEFAULTS: dict[str, Any] = dict(
    loop="uvloop", http="httptools", log_level="warning", lifespan="on", access_log=False, timeout_graceful_shutdown=1
)


class _BrokenStreamLogFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:  # noqa: A003
        exc = record.exc_info
        return not (exc and isinstance(exc[1], BrokenOnPurpose))


_LOG_FILTER = _BrokenStreamLogFilter()


def quiet_broken_streams() -> None:
    logger = logging.getLogger("uvicorn.error")
    if _LOG_FILTER not in logger.filters:
        logger.addFilter(_LOG_FILTER)


class RunningServer:
    """Handle for a uvicorn server running in a daemon thread."""

    def __init__(self, server: uvicorn.Server, thread: threading.Thread, host: str, port: int) -> None:
        self.server = server
        self.thread = thread
        self.host = host
        self.port = port

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def stop(self, timeout: float = 5.0) -> None:
        self.server.should_exit = True
        self.thread.join(timeout)
        if self.thread.is_alive():
            self.server.force_exit = True
            self.thread.join(timeout)

    def __enter__(self) -> RunningServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def serve_in_thread(app: Any, host: str = "127.0.0.1", port: int = 0, *, startup_timeout: float = 15.0,
                    **uvicorn_kwargs: Any) -> RunningServer:
    """Run ``app`` with uvicorn in a daemon thread; returns once it accepts connections. Extra
    keyword arguments are passed to ``uvicorn.Config`` (they override the defaults)."""
    config = uvicorn.Config(app, host=host, port=port, **{**DEFAULTS, **uvicorn_kwargs})
    quiet_broken_streams()
    server = uvicorn.Server(config)
    errors: list[BaseException] = []

    def run() -> None:
        try:
            server.run()
        except BaseException as error:  # noqa: BLE001 - reported to the caller
            errors.append(error)

    thread = threading.Thread(target=run, name=f"uvicorn-{type(app).__name__}", daemon=True)
    thread.start()
    deadline = time.monotonic() + startup_timeout
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            server.should_exit = True
            thread.join(2)
            raise RuntimeError(f"uvicorn failed to start: {errors[0] if errors else 'startup timeout/failure'}")
        time.sleep(0.005)
    real_port = server.servers[0].sockets[0].getsockname()[1]
    while True:  # make sure it accepts connections
        try:
            with socket.create_connection((host, real_port), timeout=1.0):
                break
        except OSError:
            if time.monotonic() > deadline:
                server.should_exit = True
                raise RuntimeError("uvicorn started but does not accept connections") from None
            time.sleep(0.01)
    return RunningServer(server, thread, host, real_port)


def serve_forever(app: Any, host: str, port: int) -> None:
    """Run ``app`` in the foreground until interrupted."""
    quiet_broken_streams()
    uvicorn.Server(uvicorn.Config(app, host=host, port=port, **DEFAULTS)).run()
