"""The pooled HTTP client to OpenAI-compatible upstreams, and the header rules at that border."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Iterable

import aiohttp

from abproxy.config import Config, UpstreamSettings
from abproxy.http import JSON_CONTENT_TYPE, Headers, HTTPError
from abproxy.upstream_http import Exchange, UpstreamClient

# Never forwarded upstream: hop-by-hop headers, what aiohttp sets itself, the proxy's own.
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
# Never passed back: hop-by-hop, and what no longer holds once aiohttp has decoded the body.
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


_JSON_POST_HEADERS_DROPPED = _REQUEST_HEADERS_DROPPED | {b"content-type"}


def _connect_timeout_s(settings: UpstreamSettings) -> float:
    return min(10.0, settings.timeout_s)


class Upstreams:
    """The clients every upstream is called with: the lean keep-alive client for the
    generation POSTs on the hot path, one aiohttp session for everything else."""

    def __init__(self, config: Config, *, forward_client_authorization: bool):
        self._settings: dict[str, UpstreamSettings] = dict(config.upstreams)
        self._forward_client_authorization = forward_client_authorization
        # A whole JSON response must arrive within timeout_s; a stream may run longer,
        # as long as it never goes silent for timeout_s.
        self._timeouts = {
            name: aiohttp.ClientTimeout(total=s.timeout_s, connect=_connect_timeout_s(s))
            for name, s in self._settings.items()
        }
        self._stream_timeouts = {
            name: aiohttp.ClientTimeout(total=None, connect=_connect_timeout_s(s), sock_read=s.timeout_s)
            for name, s in self._settings.items()
        }
        self._session: aiohttp.ClientSession | None = None
        self._client: UpstreamClient | None = None

    async def start(self) -> None:
        self._client = UpstreamClient(
            {name: (s.base_url, s.api_key, _connect_timeout_s(s)) for name, s in self._settings.items()}
        )
        connector = aiohttp.TCPConnector(
            limit=0, ttl_dns_cache=300, keepalive_timeout=30, family=socket.AF_UNSPEC, enable_cleanup_closed=True
        )
        self._session = aiohttp.ClientSession(
            connector=connector, auto_decompress=True, skip_auto_headers=("User-Agent",), cookie_jar=aiohttp.DummyCookieJar()
        )

    async def close(self) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None
        if self._session is not None:
            await self._session.close()
            self._session = None

    @property
    def session(self) -> aiohttp.ClientSession:
        assert self._session is not None, "Upstreams.start() was not awaited"
        return self._session

    def post_json(
        self, upstream: str, path: str, query: bytes, client_headers: Iterable[tuple[bytes, bytes]], body: bytes, streaming: bool
    ) -> Exchange:
        """POST a JSON body to ``path`` under the upstream's base URL: ``async with`` it for the
        response. A whole response must arrive within ``timeout_s``; a stream may run longer,
        as long as it never goes silent for ``timeout_s``."""
        assert self._client is not None, "Upstreams.start() was not awaited"
        headers = self._forwarded(upstream, client_headers, _JSON_POST_HEADERS_DROPPED)
        headers.append(JSON_CONTENT_TYPE)
        return self._client.post(upstream, path, query, headers, body, self._settings[upstream].timeout_s, streaming)

    def url(self, upstream: str, path_after_v1: str, query: bytes = b"") -> str:
        url = f"{self._settings[upstream].base_url}{path_after_v1}"
        return f"{url}?{query.decode('latin-1')}" if query else url

    def timeout(self, upstream: str, streaming: bool = False) -> aiohttp.ClientTimeout:
        return (self._stream_timeouts if streaming else self._timeouts)[upstream]

    def request_headers(self, upstream: str, client_headers: Iterable[tuple[bytes, bytes]]) -> dict[str, str]:
        """The headers of an aiohttp call, the upstream's own API key included."""
        headers = {
            key.decode("latin-1"): value.decode("latin-1")
            for key, value in self._forwarded(upstream, client_headers, _REQUEST_HEADERS_DROPPED)
        }
        api_key = self._settings[upstream].api_key
        if api_key:
            headers["authorization"] = f"Bearer {api_key}"
        return headers

    def _forwarded(self, upstream: str, client_headers: Iterable[tuple[bytes, bytes]], dropped: frozenset[bytes]) -> Headers:
        """The client's headers the upstream may see. The client's own ``authorization`` only
        when the proxy forwards it and the upstream has no key of its own (which the caller adds)."""
        headers = [(key, value) for key, value in client_headers if key not in dropped and not key.startswith(b"x-abproxy-")]
        if self._forward_client_authorization and not self._settings[upstream].api_key:
            headers += [(key, value) for key, value in client_headers if key == b"authorization"]
        return headers


def response_headers(raw: Iterable[tuple[bytes, bytes]]) -> Headers:
    return [(key.lower(), value) for key, value in raw if key.lower() not in _RESPONSE_HEADERS_DROPPED]


def error_reason(status: int) -> str:
    if status == 429:
        return "rate_limited"
    return "http_5xx" if status >= 500 else "http_4xx"


def translate_failure(error: BaseException, upstream: str) -> tuple[HTTPError, str]:
    """An exception from calling an upstream, as (the client's error, the metric's reason)."""
    if isinstance(error, asyncio.TimeoutError):
        return HTTPError(504, f"upstream {upstream!r} timed out", "upstream_timeout", "upstream_error"), "timeout"
    return (
        HTTPError(502, f"upstream {upstream!r} is unreachable ({type(error).__name__})", "upstream_unreachable", "upstream_error"),
        "unreachable",
    )
