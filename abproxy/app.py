"""What abproxy runs on: the Redis clients, the upstream pool, the recorder, the flusher and the
trace writer, started and stopped together (:class:`ABProxyApp`), and :func:`create_app`, which
puts its HTTP surface (:mod:`abproxy.routes`) in front of them."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import os
from collections.abc import AsyncIterator, Mapping
from typing import Any

from prometheus_client import CollectorRegistry
from redis.asyncio import Redis
from redis.asyncio.cluster import RedisCluster
from starlette.applications import Starlette
from starlette.types import Scope

from abproxy import routes
from abproxy.catalog import Catalog
from abproxy.config import Config
from abproxy.metrics import ProxyMetrics
from abproxy.proxy.auth import Authorizer, open_relay_upstreams
from abproxy.proxy.handler import Proxy
from abproxy.proxy.models import ModelList
from abproxy.proxy.overrides import LiveOverrides
from abproxy.recording.connection import UNAVAILABLE, detect_cluster, discover, open_redis
from abproxy.recording.eviction import watch_evictions
from abproxy.recording.feedback import FeedbackService
from abproxy.recording.ids import Signers
from abproxy.recording.recorder import Recorder
from abproxy.serving import give_freed_heap_back, return_big_buffers_to_the_os
from abproxy.tracking.flusher import LOOK_EVERY_S, Flusher
from abproxy.tracking.traces import TraceWriter
from abproxy.upstream.policy import Upstreams

log = logging.getLogger("abproxy")

REFRESH_FAILURES: tuple[type[Exception], ...] = (*UNAVAILABLE, RuntimeError)
"""What refreshing the request id secrets may meet: Redis away, or the secret deleted while read."""

EMBEDDED_REDIS_ENV = "ABPROXY_EMBEDDED_REDIS_URL"
"""Set by ``abproxy serve`` for its workers when it started an embedded Redis."""

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
        tune_process: bool = False,
    ):
        """``redis`` (recorder, flusher) and ``request_redis`` (feedback, readiness, live
        results) default to clients of ``redis_url``; ``recorder_options`` go to the
        :class:`Recorder` (``interval_s``, ``max_batch``, ``max_buffered``), ``trace_options``
        to the :class:`TraceWriter` (``interval_s``, ``max_queued``); ``ids_refresh_s`` is how often
        the request id secrets are compared with Redis's (:class:`Signers`); ``look_every_s`` the
        longest this replica goes without looking at its experiments (:meth:`Flusher.run_periodically`).
        ``tune_process`` when the process is abproxy's alone (``abproxy serve``, its workers):
        the garbage collector and the allocator are set up for a proxy's load, which a host app
        that mounts abproxy would not want done to its process."""
        url = redis_url or config.redis_url or os.environ.get(EMBEDDED_REDIS_ENV, "")
        if not url:
            raise ValueError("no Redis URL: set redis_url, or run through `abproxy serve` for an embedded Redis")
        self.config = config
        self.redis_url = url
        self._ids_refresh_s = ids_refresh_s
        self._look_every_s = look_every_s
        self._tune_process = tune_process
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
        self.model_list = ModelList(config, self.catalog, self.upstreams, self.auth)
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
        self.started = False
        self.web = routes.build(self)

    async def startup(self) -> None:
        loop = asyncio.get_running_loop()
        if self._tune_process:
            # Everything loaded so far lives as long as the process: keep it out of the cyclic
            # collector's scans, and collect the young generation less often (requests allocate a
            # lot of short-lived, acyclic objects).
            gc.collect()
            gc.freeze()
            gc.set_threshold(GC_YOUNG_THRESHOLD, *gc.get_threshold()[1:])
            return_big_buffers_to_the_os()
            self._background.append(loop.create_task(give_freed_heap_back(), name="abproxy-heap"))
        await self.upstreams.start()
        for client in (self.redis, self.request_redis):
            await discover(client)
        self.recorder.start()
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
        self.started = True

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

    @contextlib.asynccontextmanager
    async def lifespan(self, app: object = None) -> AsyncIterator[None]:
        """Start-up and shutdown, as Starlette's ``lifespan``: a host app that mounts abproxy
        passes ``router.lifespan_context`` of :func:`create_app`'s app as its own."""
        await self.startup()
        try:
            yield
        finally:
            await self.shutdown()

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        await self.web(scope, receive, send)


def create_app(config: Config | str | os.PathLike[str], **options: Any) -> Starlette:
    """abproxy's HTTP surface as a Starlette application, for uvicorn or for a host app to mount
    (docs/reference.md, "Embedding"). ``config`` is a path to a YAML file or a loaded
    :class:`Config`; ``options`` go to :class:`ABProxyApp` (``redis_url``, …). The parts it runs
    on are ``app.state.abproxy``."""
    if not isinstance(config, Config):
        from abproxy.config import load_config
        from abproxy.tracking.prompts import resolve_prompts

        config = resolve_prompts(load_config(os.fspath(config)))
    return ABProxyApp(config, **options).web


def app_from_env() -> Starlette:
    """The factory each ``--workers`` process calls: config from ``$ABPROXY_CONFIG``; this
    process is abproxy's own, so it is tuned as ``abproxy serve`` tunes its own."""
    from abproxy.config import load_config
    from abproxy.tracking.prompts import resolve_prompts

    return ABProxyApp(resolve_prompts(load_config()), tune_process=True).web
