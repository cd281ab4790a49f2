"""The ASGI application: a pure-ASGI router over the proxy, feedback, admin and ops endpoints,
and a lifespan that owns the Redis client, the upstream pool and the recorder."""

from __future__ import annotations

import asyncio
import gc
import logging
import os
from collections.abc import Mapping
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry
from redis.asyncio import Redis
from redis.asyncio.cluster import RedisCluster

from abproxy.proxy.auth import Authorizer, open_relay_upstreams
from abproxy.proxy.overrides import LiveOverrides
from abproxy.catalog import Catalog
from abproxy.config import Config
from abproxy.recording.feedback import FeedbackService
from abproxy.mlflow_sink.flusher import LOOK_EVERY_S, Flusher
from abproxy.mlflow_sink.promote import DEFAULT_ALIAS, promote, undo
from abproxy.mlflow_sink.traces import TraceWriter
from abproxy.recording import store
from abproxy.recording.connection import UNAVAILABLE, detect_cluster, discover, open_redis
from abproxy.recording.eviction import watch_evictions
from abproxy.recording.ids import Signers
from abproxy.errors import Conflict, DomainError, InvalidRequest, InvalidValue, MlflowUnavailable, NotFound, StoreUnavailable
from abproxy.http import (
    ClientGone,
    HTTPError,
    parse_json_object,
    read_body,
    refuse_dot_segments,
    send_bytes,
    send_error,
    send_json,
)
from abproxy.metrics import ProxyMetrics, exposition
from abproxy.proxy.handler import Proxy
from abproxy.recording.recorder import Recorder
from abproxy.serving import give_freed_heap_back, return_big_buffers_to_the_os
from abproxy.analysis.live import experiment_results
from abproxy.analysis.stops import resume
from abproxy.stats.results import as_json
from abproxy.upstream.policy import Upstreams

log = logging.getLogger("abproxy")

REFRESH_FAILURES: tuple[type[Exception], ...] = (*UNAVAILABLE, RuntimeError)
"""What refreshing the request id secrets may meet: Redis away, or the secret deleted while read."""

EMBEDDED_REDIS_ENV = "ABPROXY_EMBEDDED_REDIS_URL"
"""Set by ``abproxy serve`` for its workers when it started an embedded Redis."""

_GENERATION_PATHS = {
    "/v1/chat/completions": "chat",
    "/v1/completions": "completions",
    "/v1/responses": "responses",
}
_FEEDBACK_BODY_LIMIT = 64 * 1024
GC_YOUNG_THRESHOLD = 20_000


REQUEST_FACING_REDIS_TIMEOUT_S = 0.4
"""Feedback, readiness and live results answer 503 within about a second (two tries) when
Redis hangs; the recorder and the flusher, which nobody waits on, keep longer timeouts."""


class ABProxyApp:
    def __init__(
        self,
        config: Config,
        *,
        redis_url: str | None = None,
        registry: CollectorRegistry | None = None,
        redis: Redis | RedisCluster | None = None,
        request_redis: Redis | RedisCluster | None = None,
        recorder_options: Mapping[str, Any] | None = None,
        trace_options: Mapping[str, Any] | None = None,
        ids_refresh_s: float = 10.0,
        look_every_s: float = LOOK_EVERY_S,
    ):
        """``redis`` (recorder, flusher) and ``request_redis`` (feedback, readiness, live
        results) default to clients of ``redis_url``; ``recorder_options`` go to the
        :class:`Recorder` (``interval_s``, ``max_batch``, ``max_buffered``), ``trace_options``
        to the :class:`TraceWriter` (``interval_s``, ``max_queued``); ``ids_refresh_s`` is how often
        the request id secrets are compared with Redis's (:class:`Signers`); ``look_every_s`` the
        longest this replica goes without looking at its experiments (:meth:`Flusher.run_periodically`)."""
        url = redis_url or config.redis_url or os.environ.get(EMBEDDED_REDIS_ENV, "")
        if not url:
            raise ValueError("no Redis URL: set redis_url, or run through `abproxy serve` for an embedded Redis")
        self.config = config
        self.redis_url = url
        self._ids_refresh_s = ids_refresh_s
        self._look_every_s = look_every_s
        self.catalog = Catalog(config)
        self.registry = registry if registry is not None else CollectorRegistry()
        self.metrics = ProxyMetrics(self.registry)
        # A cluster node or one Redis: asked once, here (SPEC §7: no setting says which).
        cluster = detect_cluster(url) if redis is None or request_redis is None else None
        self.redis = redis if redis is not None else open_redis(url, cluster=cluster)
        self.request_redis = (
            request_redis
            if request_redis is not None
            else open_redis(url, REQUEST_FACING_REDIS_TIMEOUT_S, cluster=cluster)
        )
        self.upstreams = Upstreams(config, forward_client_authorization=not config.server.api_keys)
        mlflow_lock = asyncio.Lock()  # one MLflow writer at a time in this process (sqlite stores)
        tracing = config.mlflow.trace_sample_rate > 0 and bool(self.catalog.plans)
        self.traces = (
            TraceWriter(self.redis, config, self.catalog, self.metrics, mlflow_lock=mlflow_lock, **(trace_options or {}))
            if tracing
            else None
        )
        self.recorder = Recorder(
            self.redis,
            config,
            self.catalog,
            self.metrics,
            trace_sink=self.traces.offer if self.traces else None,
            **(recorder_options or {}),
        )
        self.auth = Authorizer(config.server, open_relay_upstreams(config))
        self.overrides = LiveOverrides(self.catalog.plans)
        self.signers = Signers()
        self.proxy = Proxy(config, self.catalog, self.upstreams, self.recorder, self.auth, self.overrides, signers=self.signers)
        self.feedback = FeedbackService(
            self.request_redis,
            config,
            self.catalog,
            self.recorder.write_now,
            self.metrics,
            on_scored_trace=self.traces.offer_score if self.traces else None,
            signers=self.signers,
        )
        self.flusher = Flusher(self.redis, config, self.catalog, self.metrics, mlflow_lock=mlflow_lock)
        self._background: list[asyncio.Task[None]] = []

    async def startup(self) -> None:
        # Everything loaded so far lives as long as the process: keep it out of the cyclic
        # collector's scans, and collect the young generation less often (requests allocate a
        # lot of short-lived, acyclic objects).
        gc.collect()
        gc.freeze()
        gc.set_threshold(GC_YOUNG_THRESHOLD, *gc.get_threshold()[1:])
        return_big_buffers_to_the_os()
        await self.upstreams.start()
        for client in (self.redis, self.request_redis):
            await discover(client)
        self.recorder.start()
        loop = asyncio.get_running_loop()
        self._background.append(loop.create_task(give_freed_heap_back(), name="abproxy-heap"))
        if self.catalog.plans:
            looks = self.flusher.run_periodically(self._look_every_s)
            self._background.append(loop.create_task(looks, name="abproxy-flusher"))
        if self.traces is not None:
            self._background.append(loop.create_task(self.traces.run(), name="abproxy-traces"))
        if self.catalog.plans:
            self._background.append(loop.create_task(self.overrides.watch(self.redis), name="abproxy-overrides"))
            self._background.append(loop.create_task(watch_evictions(self.redis), name="abproxy-evictions"))
            try:
                await self.signers.load(self.redis)
            except UNAVAILABLE:
                pass
            self._background.append(loop.create_task(self._keep_request_ids(), name="abproxy-request-ids"))

    async def _keep_request_ids(self) -> None:
        """The request id secret, read from Redis (created there by the first replica), then kept
        in step with it (:meth:`Signers.refresh`). Until it is read, requests get random ids and
        records, as before ids were signed."""
        while True:
            await asyncio.sleep(self._ids_refresh_s if self.signers.signer is not None else 1.0)
            try:
                await self.signers.refresh(self.redis)
            except REFRESH_FAILURES as error:
                log.debug("request id secrets not refreshed (%s)", error)

    async def shutdown(self) -> None:
        for task in self._background:
            # Let a flush in progress release its lock before Redis is closed.
            task.cancel()
            try:
                await task
            except asyncio.CancelledError:
                pass
        # Requests that outlived the grace period were cancelled just before this: each still
        # hands its outcome to the recorder, which then drains (sampled ones to the traces).
        await self.proxy.drained(timeout_s=5.0)
        await self.recorder.stop()
        if self.traces is not None:
            await self.traces.stop()
        await self.upstreams.close()
        await self.redis.aclose()
        await self.request_redis.aclose()

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            await self._http(scope, receive, send)
        elif scope["type"] == "lifespan":
            await self._lifespan(receive, send)

    async def _lifespan(self, receive: Any, send: Any) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                try:
                    await self.startup()
                except Exception as error:
                    log.exception("start-up failed")
                    await send({"type": "lifespan.startup.failed", "message": str(error)})
                    return
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await self.shutdown()
                await send({"type": "lifespan.shutdown.complete"})
                return

    async def _http(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        path: str = scope["path"]
        method: str = scope["method"]
        endpoint = _GENERATION_PATHS.get(path)
        if endpoint is not None and method == "POST":
            await self.proxy.generation(endpoint, scope, receive, send)
            return
        try:
            if path.startswith("/v1/"):
                if path == "/v1/feedback":
                    await self._feedback(scope, receive, send)
                elif path == "/v1/models" and method == "GET":
                    await self.proxy.models(scope, receive, send)
                elif endpoint is not None:
                    raise HTTPError(405, f"{method} is not allowed on {path}", "method_not_allowed")
                else:
                    await self.proxy.passthrough(scope, receive, send)
            elif path.startswith("/abproxy/"):
                await self._admin(scope, receive, send)
            elif path == "/metrics" and method == "GET":
                self.auth.metrics(scope)
                await send_bytes(send, 200, exposition(self.registry), [(b"content-type", CONTENT_TYPE_LATEST.encode())])
            elif path == "/healthz":
                await send_json(send, 200, {"status": "ok", "pid": os.getpid()})
            elif path == "/readyz":
                await self._ready(send)
            else:
                raise HTTPError(404, f"no route for {method} {path}", "not_found")
        except HTTPError as error:
            await send_error(send, error)
        except DomainError as error:
            await send_error(send, http_error(error))
        except ClientGone:
            return

    async def _feedback(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["method"] != "POST":
            raise HTTPError(405, "use POST /v1/feedback", "method_not_allowed")
        self.auth.client(scope)
        body = parse_json_object(await read_body(scope, receive, _FEEDBACK_BODY_LIMIT))
        await send_json(send, 200, await self.feedback.submit(body))

    async def _admin(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        self.auth.admin(scope)
        refuse_dot_segments(scope["path"])
        path, method = scope["path"].rstrip("/"), scope["method"]
        if path == "/abproxy/experiments" and method == "GET":
            results = [await experiment_results(self.request_redis, self.config, plan) for plan in self.catalog.plans.values()]
            await send_json(send, 200, {"experiments": [as_json(result) for result in results]})
        elif path.startswith("/abproxy/experiments/") and path.endswith("/promote") and method in ("POST", "DELETE"):
            await self._promote(path.removeprefix("/abproxy/experiments/").removesuffix("/promote"), scope, receive, send)
        elif path.startswith("/abproxy/experiments/") and "/stopped/" in path and method == "DELETE":
            name, _, variant = path.removeprefix("/abproxy/experiments/").partition("/stopped/")
            plan = self.catalog.plans.get(name)
            if plan is None:
                raise HTTPError(404, f"unknown experiment {name!r}", "experiment_not_found")
            resumed = await resume(self.redis, plan, variant)
            self.overrides.set_stop(plan.name, plan.arms[variant].arm_id, resumed)
            await send_json(send, 200, {"experiment": plan.name, "resumed": variant, "stopped_for": resumed.reason})
        elif path.startswith("/abproxy/experiments/") and method == "GET":
            name = path.removeprefix("/abproxy/experiments/")
            plan = self.catalog.plans.get(name)
            if plan is None:
                raise HTTPError(404, f"unknown experiment {name!r}", "experiment_not_found")
            await send_json(send, 200, as_json(await experiment_results(self.request_redis, self.config, plan)))
        elif path == "/abproxy/flush" and method == "POST":
            await self.recorder.flush()
            report = await self.flusher.flush()
            await self.flusher.publish_gauges()
            await send_json(send, 200, report.as_json())
        else:
            raise HTTPError(404, f"no route for {method} {path}", "not_found")

    async def _promote(self, name: str, scope: dict[str, Any], receive: Any, send: Any) -> None:
        plan = self.catalog.plans.get(name)
        if plan is None:
            raise HTTPError(404, f"unknown experiment {name!r}", "experiment_not_found")
        if scope["method"] == "DELETE":
            await undo(self.redis, plan)
            self.overrides.set_promoted(plan.name, None)
            await send_json(send, 200, {"experiment": plan.name, "promoted": None})
            return
        raw = await read_body(scope, receive, _FEEDBACK_BODY_LIMIT)
        body = parse_json_object(raw) if raw else {}
        variant, alias = body.get("variant"), body.get("alias", DEFAULT_ALIAS)
        if variant is not None and not isinstance(variant, str):
            raise HTTPError(400, "'variant' must be a string", "invalid_request", param="variant")
        if not isinstance(alias, str) or not alias:
            raise HTTPError(400, "'alias' must be a non-empty string", "invalid_request", param="alias")
        promotion = await promote(self.redis, self.config, plan, variant, alias)
        self.overrides.set_promoted(plan.name, promotion.variant)
        await send_json(send, 200, promotion.as_json())

    async def _ready(self, send: Any) -> None:
        try:
            with store.reachable():
                await self.request_redis.ping()
        except StoreUnavailable:
            await send_json(send, 503, {"status": "unavailable", "redis": False})
            return
        await send_json(send, 200, {"status": "ready", "redis": True, "experiments": list(self.catalog.plans)})


HTTP_STATUS: dict[type[DomainError], tuple[int, str]] = {
    InvalidRequest: (400, "invalid_request_error"),
    NotFound: (404, "invalid_request_error"),
    Conflict: (409, "invalid_request_error"),
    InvalidValue: (422, "invalid_request_error"),
    MlflowUnavailable: (502, "server_error"),
    StoreUnavailable: (503, "server_error"),
}
"""How each kind of domain error is answered: status and OpenAI error ``type``."""


def http_error(error: DomainError) -> HTTPError:
    status, error_type = next(HTTP_STATUS[kind] for kind in type(error).__mro__ if kind in HTTP_STATUS)
    return HTTPError(status, error.message, error.code, error_type, error.param)


def app_from_env() -> ABProxyApp:
    """The factory each ``--workers`` process calls: config from ``$ABPROXY_CONFIG``."""
    from abproxy.config import load_config
    from abproxy.mlflow_sink.prompts import resolve_prompts

    return ABProxyApp(resolve_prompts(load_config()))
