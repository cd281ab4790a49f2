"""The border to the upstreams: which headers cross it each way, how long an upstream may
take, and what a failure means for the client (status, error code) and for the metrics
(reason)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from abproxy.config import Config, UpstreamSettings
from abproxy.http import JSON_CONTENT_TYPE, Headers, HTTPError
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

    async def start(self) -> None:
        origins = {
            name: OriginSettings(s.base_url, s.api_key, _connect_timeout_s(s)) for name, s in self._settings.items()
        }
        options = {} if self._idle_keepalive_s is None else {"idle_keepalive_s": self._idle_keepalive_s}
        self._client = UpstreamClient(origins, max_response_bytes=self._max_response_bytes, **options)

    async def close(self) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None

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
        headers = [
            (key, value) for key, value in client_headers if key not in dropped and not key.startswith(_OWN_HEADER_PREFIX)
        ]
        if self._forward_client_authorization and not self._settings[upstream].api_key:
            headers += [(key, value) for key, value in client_headers if key == b"authorization"]
        return headers


def response_headers(raw: Iterable[tuple[bytes, bytes]]) -> Headers:
    """The upstream's response headers (names in lower case, as the client reads them) that
    the client may see."""
    return [
        (key, value)
        for key, value in raw
        if key not in _RESPONSE_HEADERS_DROPPED and not key.startswith(_OWN_HEADER_PREFIX)
    ]


def error_reason(status: int) -> str:
    if status == 429:
        return "rate_limited"
    return "http_5xx" if status >= 500 else "http_4xx"


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
