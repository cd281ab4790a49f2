"""Who may call what: client keys for ``/v1/*``, the admin key for ``/abproxy/*``, the metrics
key for ``/metrics``. Every comparison is constant-time and no key is ever echoed.

A proxy that holds an upstream's API key and asks its clients for none would spend that key for
anyone who can reach it (an open relay). ``abproxy serve`` refuses to listen beyond loopback
then; whatever else serves the app (``uvicorn abproxy.app:app_from_env --factory``, or
``create_app`` inside another application) is held to the same rule per request: only loopback
clients are answered, unless ``server.allow_open_relay``."""

from __future__ import annotations

import hmac
import ipaddress

from starlette.types import Scope

from abproxy.config import Config, ServerSettings
from abproxy.wire import HTTPError, bearer_token

ADMIN_KEY_REQUIRED = (
    "the admin endpoints need server.admin_key: set it, and send it as 'Authorization: Bearer <admin_key>' "
    "(a client key from server.api_keys is never an admin key)"
)


def _matches(scope: Scope, keys: list[bytes]) -> bool:
    token = bearer_token(scope)
    presented = token.encode() if token else b""
    # Compare against every key so timing does not tell which one (or which prefix) matched.
    return any([hmac.compare_digest(presented, key) for key in keys])


def open_relay_upstreams(config: Config) -> tuple[str, ...]:
    """The upstreams whose API key an unauthenticated client could spend: none once the proxy
    has client keys, or when ``server.allow_open_relay`` says the operator means it."""
    if config.server.api_keys or config.server.allow_open_relay:
        return ()
    return tuple(name for name, upstream in config.upstreams.items() if upstream.api_key)


def is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def open_relay_refusal(upstreams: tuple[str, ...], where: str) -> str:
    return (
        f"{where}: upstream(s) {', '.join(upstreams)} hold an API key and server.api_keys is empty, so anyone who "
        "can reach this proxy could spend it. Set server.api_keys, bind 127.0.0.1, or set server.allow_open_relay: true."
    )


class Authorizer:
    def __init__(self, server: ServerSettings, relay_upstreams: tuple[str, ...] = ()):
        """``relay_upstreams`` (:func:`open_relay_upstreams`): while any, clients must be local."""
        self._relay_refusal = open_relay_refusal(relay_upstreams, "refused: not a loopback client") if relay_upstreams else ""
        self._local_clients: dict[str, bool] = {}
        self._client_keys = [key.encode() for key in server.api_keys]
        self._admin_keys = [server.admin_key.encode()] if server.admin_key else []
        # Client keys but no admin key: results, flushes and promotions are for nobody, not for
        # every client (who could otherwise promote a variant to all traffic).
        self._admin_closed = not server.admin_key and bool(server.api_keys)
        metrics_keys = [key.encode() for key in (server.metrics_key, server.admin_key) if key]
        self._metrics_keys = metrics_keys or self._client_keys

    def client(self, scope: Scope) -> None:
        if self._client_keys and not _matches(scope, self._client_keys):
            raise HTTPError(401, "missing or invalid API key for this proxy", "invalid_api_key")
        if self._relay_refusal and not self._local(scope):
            raise HTTPError(403, self._relay_refusal, "open_relay_refused")

    def _local(self, scope: Scope) -> bool:
        """A client on loopback, or on a Unix socket (no address)."""
        client = scope.get("client")
        if not client:
            return True
        host = client[0]
        local = self._local_clients.get(host)
        if local is None:
            if len(self._local_clients) > 1024:
                self._local_clients.clear()
            local = self._local_clients[host] = is_loopback(host)
        return local

    def admin(self, scope: Scope) -> None:
        if self._admin_closed:
            raise HTTPError(403, ADMIN_KEY_REQUIRED, "admin_key_required")
        if self._admin_keys and not _matches(scope, self._admin_keys):
            raise HTTPError(401, "missing or invalid admin key", "invalid_admin_key")

    def metrics(self, scope: Scope) -> None:
        if self._metrics_keys and not _matches(scope, self._metrics_keys):
            raise HTTPError(401, "missing or invalid metrics key", "invalid_metrics_key")
