"""The border to the upstreams: which headers cross it each way, how long an upstream may
take, and what a failure means for the client (status, error code) and for the metrics
(reason)."""

from __future__ import annotations

import logging
import socket
import time
from collections.abc import Callable, Iterable, Mapping
from urllib.parse import urlsplit

from abproxy.config import Config, UpstreamSettings
from abproxy.wire import JSON_CONTENT_TYPE, Headers, HTTPError
from abproxy.logs import ThrottledLog
from abproxy.upstream.client import Exchange, OriginSettings, StreamedBody, UpstreamClient
from abproxy.upstream.errors import UpstreamBadResponse, UpstreamResponseTooLarge

# Never forwarded upstream: hop-by-hop headers, what the client sets itself, the proxy's own.
_REQUEST_HEADERS_DROPPED = frozenset(
    {
        b"host",
        b"content-length",
        b"connection",
        b"keep-alive",
        b"proxy-authorization",
        b"proxy-connection",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
        b"accept-encoding",
        b"authorization",
        b"expect",
    }
)
_JSON_HEADERS_DROPPED = _REQUEST_HEADERS_DROPPED | {b"content-type"}
# Never passed back: hop-by-hop, and what no longer holds once the client decoded the body.
_RESPONSE_HEADERS_DROPPED = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"transfer-encoding",
        b"content-length",
        b"content-encoding",
        b"proxy-authenticate",
        b"trailer",
        b"upgrade",
    }
)
_OWN_HEADER_PREFIX = b"x-abproxy-"
"""The proxy's own headers: never taken from a client for the upstream, nor from an upstream
for the client (an upstream could otherwise claim another variant)."""

REASONS = ("http_4xx", "http_5xx", "rate_limited", "timeout", "unreachable", "bad_response", "too_large", "broken_stream")
"""Every value of ``abproxy_upstream_errors_total{reason}``."""

WARN_EVERY_S = 10.0

log = logging.getLogger("abproxy.upstream")

_FAILURE_WORDS = {
    "unreachable": "is unreachable",
    "timeout": "timed out",
    "bad_response": "sent a response the proxy cannot read",
    "too_large": "sent a response over server.max_response_bytes",
    "broken_stream": "broke off its answer",
}


def _describe(error: BaseException) -> str:
    """What went wrong, in words an operator can act on (never a key: only the exception)."""
    if isinstance(error, socket.gaierror):
        return f"DNS lookup failed ({error})"
    if isinstance(error, ConnectionRefusedError):
        return f"connection refused ({error})"
    text = str(error)
    if isinstance(error, TimeoutError | ConnectionError) and text:
        return text
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


class FailureLog:
    """The log's account of the upstream failures the clients get a 502 or 504 for: at most one
    warning per upstream and reason every ``every_s`` (a dead upstream fails every request, and
    a line each would bury the rest of the log), saying how many it left out since the last."""

    def __init__(
        self, hosts: Mapping[str, str], every_s: float = WARN_EVERY_S, clock: Callable[[], float] = time.monotonic
    ):
        self._hosts = hosts
        self._log = ThrottledLog(log, every_s, clock)

    def failed(self, upstream: str, reason: str, error: BaseException) -> None:
        words = _FAILURE_WORDS.get(reason, reason)
        host = self._hosts.get(upstream, "?")
        self._log.warning((upstream, reason), "upstream %r (%s) %s: %s", upstream, host, words, _describe(error))


def _host(base_url: str) -> str:
    """host[:port] of a base URL, without any user:password@."""
    return urlsplit(base_url).netloc.rpartition("@")[2]


def _connect_timeout_s(settings: UpstreamSettings) -> float:
    return min(10.0, settings.timeout_s)


class Upstreams:
    """The one client every upstream is called with, and the rules of each call."""

    def __init__(self, config: Config, *, forward_client_authorization: bool, idle_keepalive_s: float | None = None):
        self._settings: Mapping[str, UpstreamSettings] = dict(config.upstreams)
        self._forward_client_authorization = forward_client_authorization
        self._max_response_bytes = config.server.max_response_bytes
        self._idle_keepalive_s = idle_keepalive_s
        self._client: UpstreamClient | None = None
        self._failures = FailureLog({name: _host(s.base_url) for name, s in self._settings.items()})

    async def start(self) -> None:
        origins = {
            name: OriginSettings(s.base_url, s.api_key, _connect_timeout_s(s), s.max_connections)
            for name, s in self._settings.items()
        }
        options = {} if self._idle_keepalive_s is None else {"idle_keepalive_s": self._idle_keepalive_s}
        self._client = UpstreamClient(origins, max_response_bytes=self._max_response_bytes, **options)

    async def close(self) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None

    def failed(self, upstream: str, reason: str, error: BaseException) -> None:
        """A call that failed on the proxy's side of the answer (``reason`` as counted): logged,
        rate-limited."""
        self._failures.failed(upstream, reason, error)

    def post_json(
        self, upstream: str, path: str, query: bytes, client_headers: Iterable[tuple[bytes, bytes]], body: bytes, streaming: bool
    ) -> Exchange:
        """POST a JSON body the proxy may have rewritten: ``async with`` it for the response.
        A whole response must arrive within ``timeout_s``; a stream may run longer, as long as
        it never goes silent for ``timeout_s``."""
        headers = self._forwarded(upstream, client_headers, _JSON_HEADERS_DROPPED)
        headers.append(JSON_CONTENT_TYPE)
        return self._call(upstream, "POST", path, query, headers, body, streaming)

    def forward(
        self,
        upstream: str,
        method: str,
        path: str,
        query: bytes,
        client_headers: Iterable[tuple[bytes, bytes]],
        body: bytes | StreamedBody | None,
        *,
        streaming: bool = True,
    ) -> Exchange:
        """Any other call, as the client made it. Read as a stream by default: a pass-through
        answer (a file, say) may be long, and only silence is a timeout."""
        headers = self._forwarded(upstream, client_headers, _REQUEST_HEADERS_DROPPED)
        return self._call(upstream, method, path, query, headers, body, streaming)

    def _call(
        self,
        upstream: str,
        method: str,
        path: str,
        query: bytes,
        headers: Headers,
        body: bytes | StreamedBody | None,
        streaming: bool,
    ) -> Exchange:
        assert self._client is not None, "Upstreams.start() was not awaited"
        return self._client.request(upstream, method, path, query, headers, body, self._settings[upstream].timeout_s, streaming)

    def _forwarded(self, upstream: str, client_headers: Iterable[tuple[bytes, bytes]], dropped: frozenset[bytes]) -> Headers:
        """The client's headers the upstream may see. The client's own ``authorization`` only
        when the proxy forwards it and the upstream has no key of its own (which the client adds)."""
        dropped = dropped | named_by_connection(client_headers)
        headers = [
            (key, value) for key, value in client_headers if key not in dropped and not key.startswith(_OWN_HEADER_PREFIX)
        ]
        if self._forward_client_authorization and not self._settings[upstream].api_key:
            headers += [(key, value) for key, value in client_headers if key == b"authorization"]
        return headers


def named_by_connection(headers: Iterable[tuple[bytes, bytes]]) -> frozenset[bytes]:
    """Header names a ``Connection`` header lists: hop-by-hop for this message alone, never passed
    on by a proxy (RFC 9110, section 7.6.1)."""
    named: set[bytes] = set()
    for key, value in headers:
        if key == b"connection":
            named.update(option.strip().lower() for option in value.split(b","))
    named.discard(b"")
    return frozenset(named)


def response_headers(raw: Iterable[tuple[bytes, bytes]]) -> Headers:
    """The upstream's response headers (names in lower case, as the client reads them) that
    the client may see."""
    dropped = _RESPONSE_HEADERS_DROPPED | named_by_connection(raw)
    return [(key, value) for key, value in raw if key not in dropped and not key.startswith(_OWN_HEADER_PREFIX)]


_BLANK = b" \t\r\n"


def check_generation_answer(status: int, content_type: str, streaming: bool) -> None:
    """A generation's status and type that no client could use: a redirect (the SDK would
    follow it, to wherever the upstream says), or a success that is not the event stream a
    stream request asked for (the SDK would return an empty stream as a whole answer)."""
    if 300 <= status < 400:
        raise UpstreamBadResponse(f"a redirect ({status}) where a generation was expected")
    if streaming and status < 300 and content_type != "text/event-stream":
        kind = content_type or "no content-type"
        raise UpstreamBadResponse(f"a {status} of {kind} to a stream request, not an event stream")


def check_generation_body(status: int, body: bytes) -> None:
    """A whole generation's success must be a JSON object. Only its first and last non-blank
    bytes are looked at, so the request path pays O(1); the recorder parses it later."""
    if status >= 300:
        return
    start, end = 0, len(body)
    while start < end and body[start] in _BLANK:
        start += 1
    while end > start and body[end - 1] in _BLANK:
        end -= 1
    if end - start < 2 or body[start] != 0x7B or body[end - 1] != 0x7D:  # { ... }
        raise UpstreamBadResponse(f"a {status} whose body is not JSON")


def error_reason(status: int) -> str:
    if status == 429:
        return "rate_limited"
    return "http_5xx" if status >= 500 else "http_4xx"


UPSTREAM_FAILURES = (TimeoutError, OSError)
"""What calling an upstream raises when it fails (``ConnectionError`` is an ``OSError``):
what :func:`translate_failure` turns into the client's error."""


def translate_failure(error: BaseException, upstream: str) -> tuple[HTTPError, str]:
    """An exception from calling an upstream, as (the client's error, the metric's reason)."""
    if isinstance(error, TimeoutError):
        return HTTPError(504, f"upstream {upstream!r} timed out", "upstream_timeout", "upstream_error"), "timeout"
    if isinstance(error, UpstreamResponseTooLarge):
        return HTTPError(502, f"upstream {upstream!r}: {error}", "upstream_response_too_large", "upstream_error"), "too_large"
    if isinstance(error, UpstreamBadResponse):
        return (
            HTTPError(502, f"upstream {upstream!r} sent a response the proxy cannot read: {error}", "upstream_bad_response", "upstream_error"),
            "bad_response",
        )
    return (
        HTTPError(502, f"upstream {upstream!r} is unreachable ({type(error).__name__})", "upstream_unreachable", "upstream_error"),
        "unreachable",
    )
