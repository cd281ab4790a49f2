"""Who may call what: client keys for ``/v1/*``, the admin key for ``/abproxy/*``, the metrics
key for ``/metrics``. Every comparison is constant-time and no key is ever echoed."""

from __future__ import annotations

import hmac
from typing import Any

from abproxy.config import ServerSettings
from abproxy.http import HTTPError, bearer_token


def _matches(scope: dict[str, Any], keys: list[bytes]) -> bool:
    token = bearer_token(scope)
    presented = token.encode() if token else b""
    # Compare against every key so timing does not tell which one (or which prefix) matched.
    return any([hmac.compare_digest(presented, key) for key in keys])


class Authorizer:
    def __init__(self, server: ServerSettings):
        self._client_keys = [key.encode() for key in server.api_keys]
        self._admin_keys = [server.admin_key.encode()] if server.admin_key else self._client_keys
        """No admin key, but client keys: results and flushes are for clients, not for anyone."""
        metrics_keys = [key.encode() for key in (server.metrics_key, server.admin_key) if key]
        self._metrics_keys = metrics_keys or self._client_keys

    def client(self, scope: dict[str, Any]) -> None:
        if self._client_keys and not _matches(scope, self._client_keys):
            raise HTTPError(401, "missing or invalid API key for this proxy", "invalid_api_key")

    def admin(self, scope: dict[str, Any]) -> None:
        if self._admin_keys and not _matches(scope, self._admin_keys):
            raise HTTPError(401, "missing or invalid admin key", "invalid_admin_key")

    def metrics(self, scope: dict[str, Any]) -> None:
        if self._metrics_keys and not _matches(scope, self._metrics_keys):
            raise HTTPError(401, "missing or invalid metrics key", "invalid_metrics_key")
