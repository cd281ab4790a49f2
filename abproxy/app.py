"""What abproxy runs on: the Redis clients, the upstream pool, the recorder, the flusher and the
trace writer, started and stopped together (:class:`ABProxyApp`), and :func:`create_app`, which
puts its HTTP surface (:mod:`abproxy.routes`) in front of them."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import os
import time
from collections.abc import AsyncIterator, Iterator, Mapping
from typing import Any

from prometheus_client import CollectorRegistry
from redis.asyncio import Redis
from redis.asyncio.cluster import RedisCluster
from starlette.applications import Starlette
from starlette.types import Scope

from abproxy import routes
from abproxy.assignment import Draw, random_draw
from abproxy.catalog import Catalog
from abproxy.config import Config
from abproxy.judging.runner import JudgeRunner
from abproxy.judging.sampler import JudgeSampler
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
from abproxy.recording.scores import ScoreWriter
from abproxy.serving import give_freed_heap_back, return_big_buffers_to_the_os
from abproxy.tracking.flusher import LOOK_EVERY_S, Flusher
from abproxy.tracking.traces import TraceWriter
from abproxy.upstream.policy import Upstreams

log = logging.getLogger("abproxy")

BACKGROUND_EXIT_S = 5.0

REFRESH_FAILURES: tuple[type[Exception], ...] = (*UNAVAILABLE, RuntimeError)
"""What refreshing the request id secrets may meet: Redis away, or the secret deleted while read."""

EMBEDDED_REDIS_ENV = "ABPROXY_EMBEDDED_REDIS_URL"
"""Set by ``abproxy serve`` for its workers when it started an embedded Redis."""

WORKERS_ENV = "ABPROXY_WORKERS"
"""Set by ``abproxy serve --workers N`` for its workers: they share the replica's per-minute caps."""

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
        judge_options: Mapping[str, Any] | None = None,
        ids_refresh_s: float = 10.0,
        look_every_s: float = LOOK_EVERY_S,
        tune_process: bool = False,
        processes: int = 1,
        draw: Draw = random_draw,
    ):
        """``redis`` (recorder, flusher) and ``request_redis`` (feedback, readiness, live
        results) default to clients of ``redis_url``; ``recorder_options`` go to the
        :class:`Recorder` (``interval_s``, ``max_batch``, ``max_buffered``), ``trace_options``
        to the :class:`TraceWriter` (``interval_s``, ``max_queued``), ``judge_options`` to the
        :class:`JudgeRunner` (``max_queued``, ``workers``, ``retry_s``, ``interval_s``); ``ids_refresh_s`` is how often
        the request id secrets are compared with Redis's (:class:`Signers`); ``look_every_s`` the
        longest this replica goes without looking at its experiments (:meth:`Flusher.run_periodically`).
        ``tune_process`` when the process is abproxy's alone (``abproxy serve``, its workers):
        the garbage collector and the allocator are set up for a proxy's load, which a host app
        that mounts abproxy would not want done to its process. ``processes``: how many worker
        processes the replica runs (``--workers``), which share its per-minute caps. ``draw``
        makes each request's random choices (:func:`abproxy.assignment.seeded_draw` replays them:
        the demo's ``--seed``)."""
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
            TraceWriter(
                self.redis, config, self.catalog, self.metrics, mlflow_lock=mlflow_lock, processes=processes, **(trace_options or {})
            )
            if tracing
            else None
        )
        self.judges = (
            JudgeRunner(
                config,
                self.catalog,
                self.upstreams,
                ScoreWriter(self.redis, config),
                self.metrics,
                self._write_measurements,
                on_scored_trace=self.traces.offer_score if self.traces else None,
                **(judge_options or {}),
            )
            if any(plan.settings.judges for plan in self.catalog.plans.values())
            else None
        )
        self.recorder = Recorder(
            self.redis,
            config,
            self.catalog,
            self.metrics,
            trace_sink=self.traces.offer if self.traces else None,
            judge_sink=self.judges.offer if self.judges else None,
            **(recorder_options or {}),
        )
        self.auth = Authorizer(config.server, open_relay_upstreams(config))
        self.overrides = LiveOverrides(self.catalog.plans)
        self.signers = Signers()
        self.proxy = Proxy(
            config,
            self.catalog,
            self.upstreams,
            self.recorder,
            self.auth,
            self.overrides,
            signers=self.signers,
            judges=JudgeSampler(config, self.metrics, processes, draw) if self.judges else None,
            draw=draw,
        )
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
        if self.judges is not None:
            self.judges.start()
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

    async def _write_measurements(self) -> bool:
        """For the judges, made before the recorder they hand their answers from."""
        return await self.recorder.write_now()

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
        with _said_if_slow("stopping the background tasks"):
            for task in self._background:
                task.cancel()
            # Let a flush in progress release its lock before Redis is closed; a task that does
            # not end within the bound is left behind, named, rather than holding the exit.
            if self._background:
                ended, stuck = await asyncio.wait(self._background, timeout=BACKGROUND_EXIT_S)
                for task in ended:
                    if not task.cancelled() and task.exception() is not None:
                        log.warning("shutdown: background task %s had failed: %r", task.get_name(), task.exception())
                for task in stuck:
                    log.warning("shutdown: background task %s did not stop within %gs", task.get_name(), BACKGROUND_EXIT_S)
        # Requests that outlived the grace period were cancelled just before this: each still
        # hands its outcome to the recorder, which then drains (sampled ones to the traces).
        with _said_if_slow("waiting for requests to hand over their outcomes"):
            await self.proxy.drained(timeout_s=5.0)
        if self.judges is not None:
            with _said_if_slow("writing the judges' scores"):
                await self.judges.stop()
        with _said_if_slow("writing the last measurements to Redis"):
            await self.recorder.stop()
        if self.traces is not None:
            with _said_if_slow("writing the last traces to MLflow"):
                await self.traces.stop()
        await self.upstreams.close()
        await self.redis.aclose()
        await self.request_redis.aclose()

    @contextlib.asynccontextmanager
    async def lifespan(self, app: object = None) -> AsyncIterator[None]:
        """Start-up and shutdown, as Starlette's ``lifespan``: a host app that mounts abproxy
        passes ``router.lifespan_context`` of :func:`create_app`'s app as its own."""
        try:
            await self.startup()
        except BaseException:  # what did start (tasks, connections) is stopped, not left behind
            await self.shutdown()
            raise
        try:
            yield
        finally:
            await self.shutdown()

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        await self.web(scope, receive, send)


@contextlib.contextmanager
def _said_if_slow(step: str, slow_s: float = 5.0) -> Iterator[None]:
    """Shutdown is bounded, step by step; a step near its bound is logged, so that a slow exit
    says where its time went."""
    started = time.monotonic()
    yield
    took = time.monotonic() - started
    if took >= slow_s:
        log.warning("shutdown: %s took %.1fs", step, took)


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

    processes = int(os.environ.get(WORKERS_ENV, "1"))
    return ABProxyApp(resolve_prompts(load_config()), tune_process=True, processes=processes).web
