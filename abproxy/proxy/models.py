"""``GET /v1/models``: the default upstream's model list, plus one entry per experiment, so that
an SDK or a UI that lists models offers the experiments by name."""

from __future__ import annotations

import time
from typing import Any

import orjson
from starlette.types import Scope

from abproxy.catalog import Catalog
from abproxy.config import Config
from abproxy.proxy.auth import Authorizer
from abproxy.upstream.policy import UPSTREAM_FAILURES, Upstreams, translate_failure
from abproxy.wire import JSON_CONTENT_TYPE, HTTPError, RequestIds, send_bytes, send_error


class ModelList:
    """A raw ASGI endpoint (Starlette's ``Route`` calls an object, not a function, as one)."""

    def __init__(self, config: Config, catalog: Catalog, upstreams: Upstreams, authorizer: Authorizer):
        self._upstream = config.default_upstream
        self._catalog = catalog
        self._upstreams = upstreams
        self._authorize = authorizer.client
        self._ids = RequestIds()

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        id_header = (b"x-abproxy-request-id", self._ids.next().encode())
        upstream = self._upstream
        try:
            self._authorize(scope)
            async with self._upstreams.forward(upstream, "GET", "/models", b"", scope["headers"], None, streaming=False) as response:
                data = await response.read()
                status = response.status
        except HTTPError as error:
            await send_error(send, error, [id_header])
            return
        except UPSTREAM_FAILURES as error:
            http_error, reason = translate_failure(error, upstream)
            self._upstreams.failed(upstream, reason, error)
            await send_error(send, http_error, [id_header])
            return
        if status < 400:
            data = self._with_experiments(data)
        await send_bytes(send, status, data, [JSON_CONTENT_TYPE, id_header])

    def _with_experiments(self, data: bytes) -> bytes:
        try:
            listing = orjson.loads(data)
            models = listing.get("data")
        except (orjson.JSONDecodeError, AttributeError):
            return data
        if not isinstance(models, list):
            return data
        known = {model.get("id") for model in models if isinstance(model, dict)}
        created = int(time.time())
        for name in self._catalog.plans:
            if name not in known:
                models.append({"id": name, "object": "model", "created": created, "owned_by": "abproxy"})
        return orjson.dumps(listing)
