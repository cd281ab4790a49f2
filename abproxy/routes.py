"""abproxy's HTTP surface, a Starlette application: which endpoint answers which path and method,
and how errors are answered (in OpenAI's shape, 405s with ``Allow``).

The generation endpoints, the pass-through and the model list are raw ASGI callables
(:class:`abproxy.proxy.handler.Proxy`): they stream both ways and carry every request of the hot
path, where a Starlette ``Request``/``Response`` per call would cost more than the router does
(docs/reference.md, "Embedding"). Feedback, the admin API and the ops endpoints are ordinary
Starlette handlers. Everything routes by the path below ``root_path``, so the app answers the
same under a host's ``Mount("/llm", app=...)``.
"""

from __future__ import annotations

import os
from collections.abc import Awaitable, Callable, Mapping
from contextlib import AbstractAsyncContextManager
from typing import Any, Protocol

import orjson
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry
from redis.asyncio import Redis
from redis.asyncio.cluster import RedisCluster
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Match, Mount, NoMatchFound, Route, get_route_path
from starlette.types import ASGIApp, Receive, Scope, Send

from abproxy.analysis.live import experiment_results
from abproxy.analysis.stops import resume
from abproxy.catalog import Catalog, ExperimentPlan
from abproxy.config import Config
from abproxy.errors import Conflict, DomainError, InvalidRequest, InvalidValue, MlflowUnavailable, NotFound, StoreUnavailable
from abproxy.metrics import exposition
from abproxy.tracking.flusher import Flusher
from abproxy.tracking.promote import DEFAULT_ALIAS, promote, undo
from abproxy.proxy.auth import Authorizer
from abproxy.proxy.handler import GENERATION_PATHS, Proxy
from abproxy.proxy.models import ModelList
from abproxy.proxy.overrides import LiveOverrides
from abproxy.recording import store
from abproxy.recording.feedback import FeedbackService
from abproxy.recording.recorder import Recorder
from abproxy.stats.results import as_json
from abproxy.wire import ClientGone, HTTPError, error_body, parse_json_object, read_body, refuse_dot_segments


class Parts(Protocol):
    """What the routes answer from: the parts :class:`abproxy.app.ABProxyApp` starts and stops."""

    config: Config
    catalog: Catalog
    registry: CollectorRegistry
    redis: Redis | RedisCluster
    request_redis: Redis | RedisCluster
    auth: Authorizer
    proxy: Proxy
    model_list: ModelList
    feedback: FeedbackService
    overrides: LiveOverrides
    recorder: Recorder
    flusher: Flusher
    started: bool

    def lifespan(self, app: object = None) -> AbstractAsyncContextManager[None]: ...


SMALL_BODY_LIMIT = 64 * 1024
"""Feedback and promotion bodies: a few fields each."""

HTTP_STATUS: dict[type[DomainError], tuple[int, str]] = {
    InvalidRequest: (400, "invalid_request_error"),
    NotFound: (404, "invalid_request_error"),
    Conflict: (409, "invalid_request_error"),
    InvalidValue: (422, "invalid_request_error"),
    MlflowUnavailable: (502, "server_error"),
    StoreUnavailable: (503, "server_error"),
}
"""How each kind of domain error is answered: status and OpenAI error ``type``."""


class JSONAnswer(Response):
    media_type = "application/json"

    def render(self, content: Any) -> bytes:
        return orjson.dumps(content)


def error_answer(error: HTTPError, headers: Mapping[str, str] | None = None) -> Response:
    return Response(error.body(), error.status, headers, media_type="application/json")


def http_error(error: DomainError) -> HTTPError:
    status, error_type = next(HTTP_STATUS[kind] for kind in type(error).__mro__ if kind in HTTP_STATUS)
    return HTTPError(status, error.message, error.code, error_type, error.param)


# -- raw ASGI endpoints ------------------------------------------------------------------------


class _Generation:
    """``POST /v1/<endpoint>``. A callable object, not a function, so that Starlette's ``Route``
    calls it as an ASGI app rather than wrapping it in a ``Request``."""

    __slots__ = ("_proxy", "_endpoint")

    def __init__(self, proxy: Proxy, endpoint: str):
        self._proxy = proxy
        self._endpoint = endpoint

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self._proxy.generation(self._endpoint, scope, receive, send)


class UpstreamPassthrough(BaseRoute):
    """Every other path under ``/v1``, any method, forwarded to the default upstream. Paths abproxy
    answers itself never match here, so that a method they do not take is a 405 rather than a call
    forwarded with the proxy's key."""

    def __init__(self, proxy: Proxy, owned: set[str]):
        self._proxy = proxy
        self._owned = owned

    def matches(self, scope: Scope) -> tuple[Match, Scope]:
        if scope["type"] == "http":
            path = get_route_path(scope)
            if path.startswith("/v1/") and path not in self._owned:
                return Match.FULL, {}
        return Match.NONE, {}

    async def handle(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self._proxy.passthrough(scope, receive, send)

    def url_path_for(self, name: str, /, **path_params: Any) -> Any:
        raise NoMatchFound(name, path_params)


# -- the admin API's gate ----------------------------------------------------------------------


class AdminGate:
    """In front of everything under ``/abproxy``: the admin key first (so an unknown admin path
    tells nothing to a caller without it), then no dot segments; a trailing slash is ignored."""

    def __init__(self, app: ASGIApp, authorizer: Authorizer):
        self._app = app
        self._authorizer = authorizer

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            self._authorizer.admin(scope)
            refuse_dot_segments(get_route_path(scope))
            path = scope["path"]
            if len(path) > 1 and path.endswith("/"):
                scope = {**scope, "path": path.rstrip("/") or "/"}
        await self._app(scope, receive, send)


# -- Starlette handlers ------------------------------------------------------------------------


class Endpoints:
    """The Starlette handlers, answering from one app's :class:`Parts`."""

    def __init__(self, core: Parts):
        self._core = core

    def _plan(self, request: Request) -> ExperimentPlan:
        name = request.path_params["name"]
        plan = self._core.catalog.plans.get(name)
        if plan is None:
            raise HTTPError(404, f"unknown experiment {name!r}", "experiment_not_found")
        return plan

    async def feedback(self, request: Request) -> Response:
        self._core.auth.client(request.scope)
        body = parse_json_object(await read_body(request.scope, request.receive, SMALL_BODY_LIMIT))
        return JSONAnswer(await self._core.feedback.submit(body))

    async def all_results(self, request: Request) -> Response:
        core = self._core
        results = [await experiment_results(core.request_redis, core.config, plan) for plan in core.catalog.plans.values()]
        return JSONAnswer({"experiments": [as_json(result) for result in results]})

    async def results(self, request: Request) -> Response:
        plan = self._plan(request)
        return JSONAnswer(as_json(await experiment_results(self._core.request_redis, self._core.config, plan)))

    async def promote(self, request: Request) -> Response:
        plan, core = self._plan(request), self._core
        if request.method == "DELETE":
            undone = await undo(core.redis, core.config, plan)
            core.overrides.set_promoted(plan.name, None)
            return JSONAnswer(undone.as_json())  # the traffic is back either way; "problem" says what is not
        raw = await read_body(request.scope, request.receive, SMALL_BODY_LIMIT)
        body = parse_json_object(raw) if raw else {}
        variant, alias = body.get("variant"), body.get("alias", DEFAULT_ALIAS)
        if variant is not None and not isinstance(variant, str):
            raise HTTPError(400, "'variant' must be a string", "invalid_request", param="variant")
        if not isinstance(alias, str) or not alias:
            raise HTTPError(400, "'alias' must be a non-empty string", "invalid_request", param="alias")
        promotion = await promote(core.redis, core.config, plan, variant, alias)
        core.overrides.set_promoted(plan.name, promotion.variant)
        return JSONAnswer(promotion.as_json())

    async def resume(self, request: Request) -> Response:
        plan, variant = self._plan(request), request.path_params["variant"]
        resumed = await resume(self._core.redis, plan, variant)
        self._core.overrides.set_stop(plan.name, plan.arms[variant].arm_id, resumed)
        return JSONAnswer({"experiment": plan.name, "resumed": variant, "stopped_for": resumed.reason})

    async def flush(self, request: Request) -> Response:
        core = self._core
        await core.recorder.flush()
        report = await core.flusher.flush()
        await core.flusher.publish_gauges()
        return JSONAnswer(report.as_json())

    async def metrics(self, request: Request) -> Response:
        self._core.auth.metrics(request.scope)
        return Response(exposition(self._core.registry), headers={"content-type": CONTENT_TYPE_LATEST})

    async def healthz(self, request: Request) -> Response:
        return JSONAnswer({"status": "ok", "pid": os.getpid()})

    async def readyz(self, request: Request) -> Response:
        core = self._core
        try:
            with store.reachable():
                await core.request_redis.ping()
        except StoreUnavailable:
            return JSONAnswer({"status": "unavailable", "redis": False}, 503)
        return JSONAnswer({"status": "ready", "redis": True, "experiments": list(core.catalog.plans)})


def generation_routes(proxy: Proxy) -> list[Route]:
    return [
        Route(f"/v1{path}", _Generation(proxy, endpoint), methods=["POST"], name=endpoint)
        for endpoint, path in GENERATION_PATHS.items()
    ]


def routes(core: Parts, generation: list[Route]) -> list[BaseRoute]:
    proxy, endpoints = core.proxy, Endpoints(core)
    admin = [
        Route("/experiments", endpoints.all_results, methods=["GET"]),
        Route("/experiments/{name}", endpoints.results, methods=["GET"]),
        Route("/experiments/{name}/promote", endpoints.promote, methods=["POST", "DELETE"]),
        Route("/experiments/{name}/stopped/{variant}", endpoints.resume, methods=["DELETE"]),
        Route("/flush", endpoints.flush, methods=["POST"]),
    ]
    own = [
        Route("/v1/feedback", endpoints.feedback, methods=["POST"]),
        Route("/v1/models", core.model_list, methods=["GET"], name="models"),
    ]
    owned = {route.path for route in (*generation, *own)}
    return [
        *generation,
        *own,
        UpstreamPassthrough(proxy, owned),
        Mount("/abproxy", routes=admin, middleware=[Middleware(AdminGate, core.auth)]),
        Route("/metrics", endpoints.metrics),
        Route("/healthz", endpoints.healthz),
        Route("/readyz", endpoints.readyz),
    ]


# -- errors ------------------------------------------------------------------------------------


async def _own_error(request: Request, error: Exception) -> Response:
    assert isinstance(error, HTTPError)
    return error_answer(error)


async def _domain_error(request: Request, error: Exception) -> Response:
    assert isinstance(error, DomainError)
    return error_answer(http_error(error))


async def _routing_error(request: Request, error: Exception) -> Response:
    """Starlette's own 404 and 405 (and any other ``HTTPException``), in OpenAI's shape."""
    assert isinstance(error, HTTPException)
    method, path = request.method, request.scope["path"]  # as the client asked for it
    if error.status_code == 404:
        answer = HTTPError(404, f"no route for {method} {path}", "not_found")
    elif error.status_code == 405:
        allowed = (error.headers or {}).get("Allow", "")
        answer = HTTPError(405, f"{method} is not allowed on {path}; use {allowed}", "method_not_allowed")
    else:
        answer = HTTPError(error.status_code, error.detail, "http_error")
    return error_answer(answer, error.headers)


async def _client_gone(request: Request, error: Exception) -> Response:
    """The client left while its body was read: nobody will read the answer."""
    return Response(error_body("client disconnected", "invalid_request_error", "client_gone"), 400)


EXCEPTION_HANDLERS: dict[Any, Callable[[Request, Exception], Awaitable[Response]]] = {
    HTTPError: _own_error,
    DomainError: _domain_error,
    HTTPException: _routing_error,
    ClientGone: _client_gone,
}


NOT_STARTED = HTTPError(
    503,
    "abproxy has not started: a host app that mounts it must run its lifespan "
    "(Starlette(..., lifespan=abproxy_app.router.lifespan_context))",
    "not_started",
    "server_error",
)


class ABProxyStarlette(Starlette):
    """Starlette, with two things in front of its middleware and router:

    - a 503 ``not_started`` rather than an obscure failure when the lifespan has not run (a host
      app that mounted abproxy without passing it on);
    - the hot path: ``POST`` to a generation endpoint goes straight to it. Starlette's router
      would send it to the same endpoint (its routes come first), but its two default
      middlewares and route matching cost ~12 µs per request, each streamed chunk passing
      through two more ``send`` wrappers (`bench/cpu.py`: 126.8 against 112.5 µs of proxy CPU
      per request, 0.92× the throughput; docs/reference.md, "Embedding"). The endpoints answer
      their own errors, so nothing the middlewares would do is skipped."""

    def __init__(self, core: Parts, hot: dict[str, ASGIApp], **options: Any):
        super().__init__(**options)
        self._core = core
        self._hot = hot

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            if not self._core.started:
                await error_answer(NOT_STARTED)(scope, receive, send)
                return
            if scope["method"] == "POST":
                endpoint = self._hot.get(get_route_path(scope) if scope.get("root_path") else scope["path"])
                if endpoint is not None:
                    await endpoint(scope, receive, send)
                    return
        await super().__call__(scope, receive, send)


def build(core: Parts) -> Starlette:
    generation = generation_routes(core.proxy)
    hot = {route.path: route.app for route in generation}
    app = ABProxyStarlette(
        core, hot, routes=routes(core, generation), exception_handlers=EXCEPTION_HANDLERS, lifespan=core.lifespan
    )
    # A redirect's Location is built from the client's Host header; an API client gets a 404
    # for a path that is not one, as OpenAI's API answers.
    app.router.redirect_slashes = False
    app.state.abproxy = core
    return app
