"""Who may call what: client keys for ``/v1/*``, the admin key for ``/abproxy/*``, the metrics
key for ``/metrics``. Every comparison is constant-time and no key is ever echoed."""

from __future__ import annotations

import hmac
from typing import Any

from abproxy.config import ServerSettings
from abproxy.http import HTTPError, bearer_token

ADMIN_KEY_REQUIRED = (
    "the admin endpoints need server.admin_key: set it, and send it as 'Authorization: Bearer <admin_key>' "
    "(a client key from server.api_keys is never an admin key)"
)


def _matches(scope: dict[str, Any], keys: list[bytes]) -> bool:
    token = bearer_token(scope)
    presented = token.encode() if token else b""
    # Compare against every key so timing does not tell which one (or which prefix) matched.
    return any([hmac.compare_digest(presented, key) for key in keys])


class Authorizer:
    def __init__(self, server: ServerSettings):
        self._client_keys = [key.encode() for key in server.api_keys]
        self._admin_keys = [server.admin_key.encode()] if server.admin_key else []
        # Client keys but no admin key: results, flushes and promotions are for nobody, not for
        # every client (who could otherwise promote a variant to all traffic).
        self._admin_closed = not server.admin_key and bool(server.api_keys)
        metrics_keys = [key.encode() for key in (server.metrics_key, server.admin_key) if key]
        self._metrics_keys = metrics_keys or self._client_keys

    def client(self, scope: dict[str, Any]) -> None:
        if self._client_keys and not _matches(scope, self._client_keys):
            raise HTTPError(401, "missing or invalid API key for this proxy", "invalid_api_key")

    def admin(self, scope: dict[str, Any]) -> None:
        if self._admin_closed:
            raise HTTPError(403, ADMIN_KEY_REQUIRED, "admin_key_required")
        if self._admin_keys and not _matches(scope, self._admin_keys):
            raise HTTPError(401, "missing or invalid admin key", "invalid_admin_key")

    def metrics(self, scope: dict[str, Any]) -> None:
        if self._metrics_keys and not _matches(scope, self._metrics_keys):
            raise HTTPError(401, "missing or invalid metrics key", "invalid_metrics_key")
