"""Writing the experiments into MLflow (SPEC §4): counters from Redis → statistics → one run
per variant arm plus a ``summary`` parent run, with the winner tagged.

Exactly one replica flushes at a time: a Redis lock with a TTL, and a fencing token (a Redis
counter) that is also the flush number, MLflow's ``step``. Every flush re-logs cumulative
numbers, so a crash mid-flush, a retry or MLflow being away loses nothing and doubles nothing.
MLflow's client is synchronous; its calls run in a worker thread, never on the event loop.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

from abproxy.errors import Conflict, DomainError, MlflowUnavailable, StoreUnavailable
from abproxy.recording import connection, layout, store
from abproxy.catalog import Catalog, ExperimentPlan
from abproxy.config import Config, redact_credentials
from abproxy.metrics import ProxyMetrics
from abproxy.analysis.live import Snapshot, experiment_results, take_snapshot
from abproxy.tracking.writer import MlflowWriter

log = logging.getLogger("abproxy.tracking.flusher")
T = TypeVar("T")

LOCK_TTL_MS = 5 * 60 * 1000
LOOK_EVERY_S = 60.0
"""The longest a replica goes without looking at its experiments (the contract: once a minute)."""
WRITE_GRACE_S = 4.0
"""A flush stopped (at shutdown) while MLflow is being written: how long the write, which runs
on in its thread whatever happens, keeps MLflow to itself before the trace writer's last write
may start. Within the app's bound on background tasks (5 s)."""

_RELEASE_LUA = "if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end return 0"
_RAISE_LUA = (
    "if (tonumber(redis.call('GET', KEYS[1])) or 0) < tonumber(ARGV[1]) then redis.call('SET', KEYS[1], ARGV[1]) end"
)


async def raise_flush_step(redis: Any, step: int) -> None:
    """Make the fencing token at least ``step``: the next flush then logs after it. For a step the
    MLflow side had to take past the token, because Redis lost its count."""
    await redis.eval(_RAISE_LUA, 1, layout.FLUSH_FENCE_KEY, step)


class FlushBusy(Conflict):
    """Another flush holds the lock."""

    code = "flush_in_progress"


@dataclass
class FlushReport:
    step: int
    experiments: dict[str, dict[str, Any]] = field(default_factory=dict)
    duration_s: float = 0.0

    def as_json(self) -> dict[str, Any]:
        return {"step": self.step, "duration_s": round(self.duration_s, 3), "experiments": self.experiments}


REASON_CHARS = 300
"""How much of an error a log line or an answer quotes. MLflow's messages run long and say what
went wrong at their end ("... Connection refused"): both ends are kept."""


def reason(error: BaseException, secret_uri: str = "") -> str:
    """``error`` in one line for a log or an answer, with the tracking URI's credentials masked."""
    text = " ".join(str(error).split())
    if secret_uri and secret_uri != redact_credentials(secret_uri):
        text = text.replace(secret_uri, redact_credentials(secret_uri))
    if len(text) > REASON_CHARS:
        half = REASON_CHARS // 2
        text = f"{text[:half]} … {text[-half:]}"
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


def _as_domain_error(error: Exception, tracking_uri: str = "") -> DomainError:
    """Why a flush wrote nothing, as the edge reports it: Redis, or else MLflow."""
    if isinstance(error, DomainError):
        return error
    if isinstance(error, connection.REDIS_FAILURES):
        return StoreUnavailable("Redis is unavailable; retry later")
    return MlflowUnavailable(f"flush to MLflow failed: {reason(error, tracking_uri)}")


class Flusher:
    def __init__(
        self,
        redis: Any,
        config: Config,
        catalog: Catalog,
        metrics: ProxyMetrics | None = None,
        writer_factory: Callable[[str], MlflowWriter] = MlflowWriter,
        mlflow_lock: asyncio.Lock | None = None,
    ):
        """``writer_factory`` builds the MLflow side from the tracking URI, on first use;
        ``mlflow_lock`` is held while writing (shared with the trace writer: a sqlite store
        takes one writer at a time)."""
        self._redis = redis
        self._config = config
        self._catalog = catalog
        self._metrics = metrics
        self._writer_factory = writer_factory
        self._mlflow_lock = mlflow_lock or asyncio.Lock()
        self._writer: MlflowWriter | None = None

    def _mlflow(self) -> MlflowWriter:
        if self._writer is None:
            self._writer = self._writer_factory(self._config.mlflow.tracking_uri)
        return self._writer

    async def flush(self) -> FlushReport:
        """One flush now; raises :class:`FlushBusy` while another flush is running."""
        report = await self._flush(periodic=False)
        assert report is not None
        return report

    async def flush_if_due(self) -> FlushReport | None:
        """The periodic flush: None when another replica has this interval, or another flush runs."""
        return await self._flush(periodic=True)

    async def _flush(self, *, periodic: bool) -> FlushReport | None:
        token = secrets.token_hex(16)
        with store.reachable():
            if periodic:
                interval_ms = max(1, int(self._config.mlflow.flush_interval_s * 1000 * 0.9))
                if not await self._redis.set(layout.FLUSH_INTERVAL_KEY, token, nx=True, px=interval_ms):
                    return None
            if not await self._redis.set(layout.FLUSH_LOCK_KEY, token, nx=True, px=LOCK_TTL_MS):
                if periodic:
                    return None
                raise FlushBusy("another flush is running; try again shortly")
        started = time.perf_counter()
        try:
            with store.reachable():
                step = await store.next_flush_step(self._redis)
            uri = self._config.mlflow.tracking_uri
            try:
                # Building the client opens the store (sqlite runs its migrations): not on the loop.
                writer = await asyncio.to_thread(self._mlflow)
            except Exception as error:  # a database driver missing, a store that cannot be opened
                raise _as_domain_error(error, uri) from error
            report = FlushReport(step)
            failures: dict[str, Exception] = {}
            for plan in self._catalog.plans.values():
                try:
                    report.experiments[plan.name], used = await self._flush_experiment(writer, plan, report.step, token)
                    await self._catch_up(report, used)
                except Exception as error:  # one experiment MLflow refuses must not block the others
                    report.experiments[plan.name] = {"error": reason(error, uri)}
                    failures[plan.name] = error
            report.duration_s = time.perf_counter() - started
            if failures and len(failures) == len(self._catalog.plans):
                first = next(iter(failures.values()))
                raise _as_domain_error(first, uri) from first  # MLflow away: one reason, said once
            for name, failure in failures.items():
                log.warning("flush of experiment %s failed: %s", name, reason(failure, uri))
            if self._metrics is not None:
                self._metrics.flush_duration.observe(report.duration_s)
                if not failures:
                    self._metrics.flush_last_success.set(time.time())
                else:
                    self._metrics.flush_errors.inc()
            return report
        except Exception:
            if self._metrics is not None:
                self._metrics.flush_errors.inc()
            raise
        finally:
            with store.reachable():
                await self._redis.eval(_RELEASE_LUA, 1, layout.FLUSH_LOCK_KEY, token)

    async def _catch_up(self, report: FlushReport, used: int) -> None:
        """An experiment logged past the flush's step, MLflow holding later steps than Redis's
        count: Redis lost it. The rest of this flush and every later one go on from there."""
        if used <= report.step:
            return
        log.warning(
            "flush step %d is behind the steps MLflow holds (Redis lost data?): going on from %d", report.step, used
        )
        with store.reachable():
            await raise_flush_step(self._redis, used)
        report.step = used

    async def _flush_experiment(
        self, writer: MlflowWriter, plan: ExperimentPlan, step: int, token: str
    ) -> tuple[dict[str, Any], int]:
        """What the flush of one experiment did, and the step it logged at."""
        snapshot: Snapshot = await take_snapshot(self._redis, self._config, plan)
        result = snapshot.result
        runs = await self._redis.hgetall(layout.runs_key(plan.name))
        async with self._mlflow_lock:
            updated, used = await _held_while_it_runs(asyncio.to_thread(writer.write, plan, result, runs, step))
        if await self._redis.get(layout.FLUSH_LOCK_KEY) != token:
            log.warning("flush %d lost its lock mid-way; its run ids are not kept", step)
            return {"status": result.status, "winner": result.winner, "kept": False}, used
        # The always-valid state was saved by the look itself (analysis/live.py), MLflow or not.
        await self._redis.hset(layout.runs_key(plan.name), mapping=updated)
        outcome = {
            "status": result.status,
            "winner": result.winner,
            "mlflow_experiment_id": updated["experiment_id"],
            "summary_run_id": updated["summary"],
            "runs": {name: updated[arm.arm_id] for name, arm in plan.arms.items()},
        }
        return outcome, used

    async def publish_gauges(self) -> None:
        """Every replica, every interval: the statistics as Prometheus gauges, so that any
        replica scraped shows the same numbers (they all read the same Redis)."""
        if self._metrics is None:
            return
        for plan in self._catalog.plans.values():
            self._metrics.publish_results(await experiment_results(self._redis, self._config, plan))

    async def run_periodically(self, look_every_s: float = LOOK_EVERY_S) -> None:
        """Every flush interval (at most ``look_every_s``, so that every replica looks at its
        experiments, and stops a harmful arm, whether anyone reads the results or not): the
        flush, when this replica has the interval, then a look that refreshes the gauges."""
        interval = self._config.mlflow.flush_interval_s
        tick = min(interval, look_every_s) if interval > 0 else look_every_s
        while True:
            await asyncio.sleep(tick)
            try:
                report = await self.flush_if_due() if interval > 0 else None
                if report is not None:
                    log.info("flushed %d experiment(s) to MLflow in %.2fs (step %d)", len(report.experiments), report.duration_s, report.step)
            except DomainError as error:  # MLflow or Redis away: warn, count, retry next interval
                log.warning("%s; retrying next interval", error.message)
            except Exception as error:
                log.warning(
                    "flush failed (%s); retrying next interval", reason(error, self._config.mlflow.tracking_uri)
                )
            try:
                await self.publish_gauges()
            except Exception as error:
                log.warning("could not refresh the statistics gauges (%s)", reason(error))


async def _held_while_it_runs(write: Awaitable[T]) -> T:
    """``write`` (a thread's work); cancelled, the caller waits up to :data:`WRITE_GRACE_S` for
    the thread to finish before it lets go of what it holds (MLflow's lock: a sqlite store written
    twice at once refuses one), then is cancelled."""
    task = asyncio.ensure_future(write)
    try:
        return await asyncio.shield(task)
    except asyncio.CancelledError:
        await asyncio.wait({task}, timeout=WRITE_GRACE_S)
        raise
