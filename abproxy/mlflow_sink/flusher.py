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
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from abproxy.errors import Conflict, DomainError, MlflowUnavailable, StoreUnavailable
from abproxy.recording import connection, store
from abproxy.catalog import Catalog, ExperimentPlan
from abproxy.config import Config
from abproxy.metrics import ProxyMetrics
from abproxy.analysis.live import Snapshot, experiment_results, take_snapshot
from abproxy.mlflow_sink.writer import MlflowWriter

log = logging.getLogger("abproxy.mlflow_sink.flusher")

LOCK_TTL_MS = 5 * 60 * 1000

_RELEASE_LUA = "if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end return 0"

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


def _as_domain_error(error: Exception) -> DomainError:
    """Why a flush wrote nothing, as the edge reports it: Redis, or else MLflow."""
    if isinstance(error, DomainError):
        return error
    if isinstance(error, connection.REDIS_FAILURES):
        return StoreUnavailable("Redis is unavailable; retry later")
    detail = str(error).splitlines()[0][:200] if str(error) else ""
    return MlflowUnavailable(f"flush to MLflow failed: {type(error).__name__}: {detail}")


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
                if not await self._redis.set(store.FLUSH_INTERVAL_KEY, token, nx=True, px=interval_ms):
                    return None
            if not await self._redis.set(store.FLUSH_LOCK_KEY, token, nx=True, px=LOCK_TTL_MS):
                if periodic:
                    return None
                raise FlushBusy("another flush is running; try again shortly")
        started = time.perf_counter()
        try:
            with store.reachable():
                step = await store.next_flush_step(self._redis)
            # Building the client opens the store (sqlite runs its migrations): not on the loop.
            writer = await asyncio.to_thread(self._mlflow)
            report = FlushReport(step)
            failures = []
            for plan in self._catalog.plans.values():
                try:
                    report.experiments[plan.name] = await self._flush_experiment(writer, plan, step, token)
                except Exception as error:  # one experiment MLflow refuses must not block the others
                    log.warning("flush of experiment %s failed: %s: %s", plan.name, type(error).__name__, error)
                    report.experiments[plan.name] = {"error": f"{type(error).__name__}: {str(error)[:200]}"}
                    failures.append(error)
            report.duration_s = time.perf_counter() - started
            if failures and len(failures) == len(self._catalog.plans):
                raise _as_domain_error(failures[0]) from failures[0]
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
                await self._redis.eval(_RELEASE_LUA, 1, store.FLUSH_LOCK_KEY, token)

    async def _flush_experiment(self, writer: MlflowWriter, plan: ExperimentPlan, step: int, token: str) -> dict[str, Any]:
        snapshot: Snapshot = await take_snapshot(self._redis, self._config, plan)
        result = snapshot.result
        runs = await self._redis.hgetall(store.runs_key(plan.name))
        async with self._mlflow_lock:
            updated = await asyncio.to_thread(writer.write, plan, result, runs, step)
        if await self._redis.get(store.FLUSH_LOCK_KEY) != token:
            log.warning("flush %d lost its lock mid-way; its run ids are not kept", step)
            return {"status": result.status, "winner": result.winner, "kept": False}
        # The always-valid state was saved by the look itself (analysis/live.py), MLflow or not.
        await self._redis.hset(store.runs_key(plan.name), mapping=updated)
        return {
            "status": result.status,
            "winner": result.winner,
            "mlflow_experiment_id": updated["experiment_id"],
            "summary_run_id": updated["summary"],
            "runs": {name: updated[arm.arm_id] for name, arm in plan.arms.items()},
        }

    async def publish_gauges(self) -> None:
        """Every replica, every interval: the statistics as Prometheus gauges, so that any
        replica scraped shows the same numbers (they all read the same Redis)."""
        if self._metrics is None:
            return
        for plan in self._catalog.plans.values():
            self._metrics.publish_results(await experiment_results(self._redis, self._config, plan))

    async def run_periodically(self) -> None:
        interval = self._config.mlflow.flush_interval_s
        while True:
            await asyncio.sleep(interval)
            try:
                report = await self.flush_if_due()
                if report is not None:
                    log.info("flushed %d experiment(s) to MLflow in %.2fs (step %d)", len(report.experiments), report.duration_s, report.step)
            except Exception as error:  # MLflow or Redis away: warn, count, retry next interval
                log.warning("flush to MLflow failed (%s: %s); retrying next interval", type(error).__name__, error)
            try:
                await self.publish_gauges()
            except Exception as error:
                log.warning("could not refresh the statistics gauges (%s: %s)", type(error).__name__, error)
