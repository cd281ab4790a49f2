"""Off-path recording: outcomes are queued by the request path in O(1), then interpreted,
aggregated and written to Redis in batches by one background task.

Each batch becomes one pipeline (one round trip) of one script call per experiment, which
writes the batch's request records and applies its pre-aggregated deltas under a dedupe key. A batch whose
reply was lost is replayed and changes nothing the second time. While Redis is unreachable the
batches wait in memory (bounded: past ``max_buffered`` measurements new ones are dropped and
counted) and are replayed, oldest first, once it is back.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import secrets
import time
from dataclasses import dataclass, field
from typing import Any

import orjson
from redis.exceptions import NoScriptError, RedisError

from abproxy import store
from abproxy.catalog import Catalog
from abproxy.config import Config
from abproxy.metrics import ProxyMetrics
from abproxy.outcome import Outcome, ResponseFacts, response_facts
from abproxy.stats.histogram import bucket_of

log = logging.getLogger("abproxy.recorder")


@dataclass(slots=True)
class _ArmDelta:
    """One arm's changes in one batch, accumulated in plain lists and turned into Redis hash
    fields once per batch."""

    meta: str
    counters: dict[str, int] = field(default_factory=dict)
    moments: dict[str, list[float]] = field(default_factory=dict)
    """metric → [n, Σy, Σy²]"""
    anonymous_units: dict[str, list[float]] = field(default_factory=dict)
    """metric → [units, Σy², Σ1, Σy] for units of one request each (N_u = 1)."""
    hist: dict[tuple[str, str], int] = field(default_factory=dict)
    units: dict[str, dict[str, list[float]]] = field(default_factory=dict)

    def count(self, name: str) -> None:
        self.counters[name] = self.counters.get(name, 0) + 1

    def add_value(self, metric: str, value: float) -> None:
        moments = self.moments.get(metric)
        if moments is None:
            moments = self.moments[metric] = [0, 0.0, 0.0]
        moments[0] += 1
        moments[1] += value
        moments[2] += value * value
        key = (metric, bucket_of(value))
        self.hist[key] = self.hist.get(key, 0) + 1

    def add_anonymous_unit_value(self, metric: str, value: float) -> None:
        sums = self.anonymous_units.get(metric)
        if sums is None:
            sums = self.anonymous_units[metric] = [0, 0.0, 0.0, 0.0]
        sums[0] += 1
        sums[1] += value * value
        sums[2] += 1.0
        sums[3] += value

    def integer_fields(self) -> dict[str, int]:
        fields = dict(self.counters)
        for metric, (n, _, _) in self.moments.items():
            fields[f"{metric}|n"] = int(n)
        for metric, sums in self.anonymous_units.items():
            fields[f"{metric}|uk"] = int(sums[0])
        return fields

    def sum_fields(self) -> dict[str, str]:
        """Sums as exact decimal strings (``repr`` round-trips a float)."""
        fields = {}
        for metric, (_, total, squares) in self.moments.items():
            fields[f"{metric}|s"] = repr(total)
            fields[f"{metric}|q"] = repr(squares)
        for metric, (_, yy, nn, yn) in self.anonymous_units.items():
            fields[f"{metric}|uyy"] = repr(yy)
            fields[f"{metric}|unn"] = repr(nn)
            fields[f"{metric}|uyn"] = repr(yn)
        return fields


@dataclass(slots=True)
class _Batch:
    batch_id: str
    events: int
    payloads: dict[str, str]


class Recorder:
    def __init__(
        self,
        redis: Any,
        config: Config,
        catalog: Catalog,
        metrics: ProxyMetrics,
        *,
        interval_s: float = 0.05,
        max_batch: int = 5000,
        max_buffered: int = 100_000,
    ):
        self._redis = redis
        self._config = config
        self._catalog = catalog
        self._metrics = metrics
        self._interval_s = interval_s
        self._max_batch = max_batch
        self._max_buffered = max_buffered
        self._queue: collections.deque[Outcome] = collections.deque()
        self._pending: collections.deque[_Batch] = collections.deque()
        self._pending_events = 0
        self._wakeup = asyncio.Event()
        self._write_lock = asyncio.Lock()
        self._task: asyncio.Task[None] | None = None
        self._script_sha: str | None = None
        self._backoff_s = 0.0

    # -- request path ------------------------------------------------------------------

    def record(self, outcome: Outcome) -> None:
        """Queue an outcome; never blocks, never raises."""
        if len(self._queue) + self._pending_events >= self._max_buffered:
            self._metrics.recorder_dropped.inc()
            return
        self._queue.append(outcome)
        if len(self._queue) >= self._max_batch:
            self._wakeup.set()

    # -- lifecycle -----------------------------------------------------------------------

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name="abproxy-recorder")

    async def stop(self, timeout_s: float = 10.0) -> bool:
        """Stop the loop and drain everything to Redis; False if some of it could not be written."""
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
            self._task = None
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if await self.flush():
                return True
            await asyncio.sleep(0.1)
        log.error("recorder stopped with %d measurements not written to Redis", self.buffered)
        return False

    @property
    def buffered(self) -> int:
        return len(self._queue) + self._pending_events

    async def flush(self) -> bool:
        """Interpret what is queued and write every pending batch; True when nothing is left."""
        async with self._write_lock:
            while self._queue:
                self._prepare_batch()
            ok = await self._write_pending()
        self._metrics.recorder_buffered.set(self.buffered)
        return ok

    async def _run(self) -> None:
        while True:
            try:
                await asyncio.wait_for(self._wakeup.wait(), timeout=self._interval_s + self._backoff_s)
            except TimeoutError:
                pass
            self._wakeup.clear()
            try:
                ok = await self.flush()
            except Exception:  # a bug here must not stop recording for good
                log.exception("recorder batch failed")
                ok = False
            self._backoff_s = 0.0 if ok else min(1.0, max(0.05, self._backoff_s * 2))

    # -- interpretation (off the request path) ------------------------------------------------

    def _prepare_batch(self) -> None:
        arms: dict[tuple[str, str], _ArmDelta] = {}
        records: dict[str, list[list[str]]] = {}
        count = 0
        while self._queue and count < self._max_batch:
            outcome = self._queue.popleft()
            count += 1
            facts = response_facts(outcome) if outcome.status < 400 and not outcome.error_reason else None
            cost = self._cost(outcome, facts)
            self._observe_prometheus(outcome, facts, cost)
            route = outcome.route
            if route is None:
                continue
            response_id = facts.response_id if facts else outcome.response_id
            unit = store.hash_unit(route.unit) if route.unit is not None else None
            record = {
                "e": route.experiment,
                "v": route.variant,
                "a": route.arm,
                "u": unit,
                "f": route.forced,
                "t": outcome.started_at,
                "s": outcome.status,
            }
            records.setdefault(route.experiment, []).append(
                [
                    store.request_key(route.experiment, outcome.request_id),
                    orjson.dumps(record).decode(),
                    store.response_key(route.experiment, response_id) if response_id else "",
                    outcome.request_id,
                ]
            )
            if route.forced:
                continue
            plan = self._catalog.plans[route.experiment]
            arm = plan.arms[route.variant]
            delta = arms.get((route.experiment, route.arm))
            if delta is None:
                delta = arms[(route.experiment, route.arm)] = _ArmDelta(meta=arm.metadata_json())
            self._add_outcome(delta, outcome, facts, cost, unit if plan.per_unit else None, plan.per_unit)
        if count == 0:
            return
        payloads: dict[str, dict[str, Any]] = {
            experiment: {"records": experiment_records, "arms": []} for experiment, experiment_records in records.items()
        }
        for (experiment, arm_id), delta in arms.items():
            payloads[experiment]["arms"].append(
                {
                    "arm": arm_id,
                    "meta": delta.meta,
                    "arms_key": store.arms_key(experiment),
                    "stats": store.stats_key(experiment, arm_id),
                    "hist_key": store.hist_key(experiment, arm_id),
                    "ints": delta.integer_fields(),
                    "sums": delta.sum_fields(),
                    "hist": {f"{metric}|{bucket}": count for (metric, bucket), count in delta.hist.items()},
                    "units": [
                        {
                            "key": store.unit_key(experiment, arm_id, unit),
                            "names": list(metrics),
                            "dy": [running[0] for running in metrics.values()],
                            "dn": [running[1] for running in metrics.values()],
                        }
                        for unit, metrics in delta.units.items()
                    ],
                }
            )
        batch = _Batch(
            batch_id=secrets.token_hex(12),
            events=count,
            payloads={experiment: orjson.dumps(payload).decode() for experiment, payload in payloads.items()},
        )
        self._pending.append(batch)
        self._pending_events += count

    def _cost(self, outcome: Outcome, facts: ResponseFacts | None) -> float | None:
        if facts is None or facts.prompt_tokens is None or facts.completion_tokens is None:
            return None
        price = self._config.prices.get(outcome.model)
        if price is None:
            return None
        return (facts.prompt_tokens * price.input + facts.completion_tokens * price.output) / 1_000_000

    @staticmethod
    def _values(outcome: Outcome, facts: ResponseFacts | None, cost: float | None) -> dict[str, float]:
        """The per-request metric values of §3 (errors: 0/1; the rest only for successes)."""
        if outcome.cancelled:
            return {}
        values: dict[str, float] = {"error_rate": 1.0 if outcome.failed else 0.0}
        if outcome.failed:
            return values
        values["latency_ms"] = outcome.latency_s * 1000.0
        if outcome.ttft_s is not None:
            values["ttft_ms"] = outcome.ttft_s * 1000.0
        if facts is not None:
            for name in ("chars", "words"):
                value = getattr(facts, name)
                if value is not None:
                    values[f"response_{name}"] = float(value)
            for name in ("prompt_tokens", "completion_tokens", "total_tokens"):
                value = getattr(facts, name)
                if value is not None:
                    values[name] = float(value)
        if cost is not None:
            values["cost_usd"] = cost
        return values

    def _add_outcome(
        self,
        delta: _ArmDelta,
        outcome: Outcome,
        facts: ResponseFacts | None,
        cost: float | None,
        unit: str | None,
        per_unit: bool,
    ) -> None:
        delta.count("requests")
        if outcome.cancelled:
            delta.count("cancelled")
        elif outcome.failed:
            delta.count("errors")
        values = self._values(outcome, facts, cost)
        for metric, value in values.items():
            delta.add_value(metric, value)
        if unit is None:
            delta.count("units")
            if per_unit:
                for metric, value in values.items():
                    delta.add_anonymous_unit_value(metric, value)
            return
        unit_metrics = delta.units.setdefault(unit, {})
        for metric, value in values.items():
            running = unit_metrics.setdefault(metric, [0.0, 0])
            running[0] += value
            running[1] += 1

    def _observe_prometheus(self, outcome: Outcome, facts: ResponseFacts | None, cost: float | None) -> None:
        metrics = self._metrics
        experiment, variant = (outcome.route.experiment, outcome.route.variant) if outcome.route else ("", "")
        metrics.count_request(experiment, variant, outcome.status)
        if outcome.error_reason is not None:
            metrics.upstream_errors.labels(outcome.upstream, outcome.error_reason).inc()
        if outcome.cancelled or outcome.failed:
            return
        series = metrics.series(experiment, variant)
        series.duration.observe(outcome.latency_s)
        if outcome.ttft_s is not None:
            series.ttft.observe(outcome.ttft_s)
        if facts is not None:
            if facts.prompt_tokens:
                series.prompt_tokens.inc(facts.prompt_tokens)
            if facts.completion_tokens:
                series.completion_tokens.inc(facts.completion_tokens)
        if cost:
            series.cost.inc(cost)

    # -- writing ---------------------------------------------------------------------------

    async def _write_pending(self) -> bool:
        while self._pending:
            batch = self._pending[0]
            try:
                await self._write(batch)
            except (RedisError, OSError) as error:
                self._metrics.recorder_write_errors.inc()
                log.warning("Redis write failed (%s); %d measurements buffered", type(error).__name__, self.buffered)
                return False
            self._pending.popleft()
            self._pending_events -= batch.events
        return True

    async def _write(self, batch: _Batch) -> None:
        for attempt in range(2):
            if self._script_sha is None:
                self._script_sha = await self._redis.script_load(store.RECORD_BATCH_LUA)
            try:
                await self._pipeline(batch).execute()
                return
            except NoScriptError:
                # Redis restarted without its script cache; batches are idempotent, so replay.
                self._script_sha = None
                if attempt:
                    raise

    def _pipeline(self, batch: _Batch) -> Any:
        pipe = self._redis.pipeline(transaction=False)
        for experiment, payload in batch.payloads.items():
            pipe.evalsha(
                self._script_sha,
                1,
                store.batch_key(experiment, batch.batch_id),
                payload,
                store.BATCH_DEDUPE_TTL_S,
                store.UNIT_TTL_S,
                self._config.feedback_ttl_s,
            )
        return pipe
