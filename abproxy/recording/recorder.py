"""Off-path recording: outcomes are queued by the request path in O(1), then interpreted,
aggregated and written to Redis in batches by one background task.

Each batch becomes one script call per experiment, which writes the batch's request records
and applies its pre-aggregated deltas under a dedupe key; the calls go in one pipeline (one
round trip) per Redis Cluster slot, or for all experiments on one Redis. A batch whose reply was
lost is replayed and changes nothing the second time. Each experiment waits in its own queue:
while its Redis (or its cluster slot) is unreachable its batches wait in memory (bounded: past
``max_buffered`` measurements new ones are dropped and counted) and are replayed, oldest first,
once it is back, and the other experiments' batches go on meanwhile. On a cluster a batch
leaves memory only once a replica has it too (``WAIT``), so a master that dies cannot take it.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import orjson
from redis.exceptions import (
    AskError,
    ClusterDownError,
    MovedError,
    NoScriptError,
    OutOfMemoryError,
    ReadOnlyError,
    RedisError,
    ResponseError,
    TryAgainError,
)

from abproxy.catalog import Catalog
from abproxy.config import BUILTIN_METRICS, Config
from abproxy.logs import ThrottledLog
from abproxy.metrics import DROP_REASONS, ProxyMetrics
from abproxy.recording import connection, ids, layout, scripts, trim
from abproxy.recording.record import RequestRecord
from abproxy.recording.aggregate import ArmBatch, metric_row
from abproxy.recording.interpret import ResponseFacts, response_facts
from abproxy.recording.outcome import (
    MAX_JUDGED_CHARS,
    ExperimentRoute,
    JudgeJob,
    Judging,
    Outcome,
    TracedExchange,
)
from abproxy.recording.tally import PrometheusTally

log = logging.getLogger("abproxy.recording.recorder")

WARNING_EVERY_S = 60.0
"""The same problem with Redis (a corrupt key hit by every batch) is logged at most this often."""
WRITE_WARNING_EVERY_S = 10.0
"""A failing write (Redis away, full) is logged at most this often per experiment and error."""


_OUTCOMES_PER_SLICE = 64
"""Outcomes interpreted between two yields to the event loop: a batch of thousands would
otherwise hold up every request for milliseconds (visible in p99 latency)."""


REFUSALS_BEFORE_DROPPING = 3
"""Attempts at a batch that Redis refuses with an error no retry mends (anything but Redis being
away, busy, loading, read-only or out of memory) before it is dropped and counted."""

_PASSING_REFUSALS = (OutOfMemoryError, ReadOnlyError, ClusterDownError, TryAgainError, MovedError, AskError)
"""Refusals of a Redis that will take the batch later: full, a replica, a cluster re-forming."""
_PASSING_CODES = ("OOM", "BUSY", "LOADING", "READONLY", "MASTERDOWN", "CLUSTERDOWN", "TRYAGAIN", "NOREPLICAS")
"""Their error codes: redis-py has no class for some, and Redis 6 reports an error inside a
script as ``ERR Error running script ...: OOM ...``, so the code is looked for in the text."""


def _passing(error: Exception) -> bool:
    """Whether writing again later may succeed: Redis away or slow, or refusing for a while."""
    if not isinstance(error, ResponseError) or isinstance(error, _PASSING_REFUSALS):
        return True
    text = str(error)
    return any(code in text for code in _PASSING_CODES)


@dataclass(slots=True)
class _Part:
    """One experiment's share of a batch: one script call, in the experiment's slot."""

    batch_id: str
    experiment: str
    events: int
    payload: str
    refusals: int = 0
    accounted: bool = False
    """What the script said it could not write has been counted (a replay says nothing more)."""

    @property
    def key(self) -> str:
        return layout.batch_key(self.experiment, self.batch_id)


def _traced(outcome: Outcome, route: ExperimentRoute, facts: ResponseFacts | None) -> TracedExchange:
    assert outcome.trace_id is not None and outcome.sent_body is not None
    sent_body, inputs_cut = trim.trimmed_json(outcome.sent_body)
    response_body, body_cut = (None, False) if outcome.streamed or outcome.body is None else trim.trimmed_json(outcome.body)
    answer, answer_cut = trim.trimmed_text(facts.text) if facts and facts.text is not None else (None, False)
    outputs_cut = body_cut if response_body is not None else answer_cut
    return TracedExchange(
        trace_id=outcome.trace_id,
        request_id=outcome.request_id,
        experiment=route.experiment,
        variant=route.variant,
        arm=route.arm,
        unit=route.unit,
        forced=route.forced,
        endpoint=outcome.endpoint,
        started_at=outcome.started_at,
        latency_s=outcome.latency_s,
        status=outcome.status,
        failed=outcome.failed or outcome.cancelled,
        error_reason=outcome.error_reason,
        sent_body=sent_body,
        answer=answer,
        response_body=response_body,
        prompt_tokens=facts.prompt_tokens if facts else None,
        completion_tokens=facts.completion_tokens if facts else None,
        total_tokens=facts.total_tokens if facts else None,
        judged=outcome.judging is not None,
        cut=tuple(side for side, cut in (("inputs", inputs_cut), ("outputs", outputs_cut)) if cut),
    )


def _judge_job(outcome: Outcome, judging: Judging, answer: str, record: RequestRecord | None) -> JudgeJob:
    if outcome.signed is not None:
        feedback_id, record = outcome.signed.feedback_id, RequestRecord.of_signed(outcome.signed)
    else:
        assert record is not None
        feedback_id = outcome.request_id
    return JudgeJob(feedback_id, record, judging.judges, judging.input[:MAX_JUDGED_CHARS], answer[:MAX_JUDGED_CHARS])


class Recorder:
    def __init__(
        self,
        redis: Any,
        config: Config,
        catalog: Catalog,
        metrics: ProxyMetrics,
        *,
        interval_s: float = 0.2,
        max_batch: int = 1000,
        max_buffered: int = 100_000,
        trace_sink: Callable[[TracedExchange], None] | None = None,
        judge_sink: Callable[[JudgeJob], None] | None = None,
    ):
        """``trace_sink`` takes the requests sampled to become MLflow traces, ``judge_sink`` the
        answers sampled for LLM judges (neither may block)."""
        # A batch is one Lua script, and Redis runs nothing else while it does: 1,000 outcomes
        # of a `unit: user` experiment hold it about 20-30 ms, 5,000 about 65-125 ms. Replaying
        # a backlog after an outage goes through the same cap.
        self._redis = redis
        self._config = config
        self._catalog = catalog
        self._metrics = metrics
        self._interval_s = interval_s
        self._max_batch = max_batch
        self._max_buffered = max_buffered
        self._trace_sink = trace_sink
        self._judge_sink = judge_sink
        self._queue: collections.deque[Outcome] = collections.deque()
        self._pending: dict[str, collections.deque[_Part]] = {}
        """Per experiment, its batches not yet confirmed written, oldest first."""
        self._failing: set[str] = set()
        """Experiments whose last write failed."""
        self._pending_events = 0
        self._in_preparation = 0
        self._wakeup = asyncio.Event()
        self._write_lock = asyncio.Lock()
        self._task: asyncio.Task[None] | None = None
        self._stopping = False
        self._script = scripts.Script(scripts.RECORD_BATCH_LUA)
        self._backoff_s = 0.0
        self._dropped = {reason: metrics.recorder_dropped.labels(reason) for reason in DROP_REASONS}
        self._warnings = ThrottledLog(log, WARNING_EVERY_S)
        self._write_warnings = ThrottledLog(log, WRITE_WARNING_EVERY_S)
        self._retry_at = 0.0
        """While some experiment's writes fail: when the loop tries again (see :meth:`write_now`)."""

    # -- request path ------------------------------------------------------------------

    def record(self, outcome: Outcome) -> None:
        """Queue an outcome; never blocks, never raises."""
        if self.buffered >= self._max_buffered:
            self._dropped["buffer_full"].inc()
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
            # Asked to stop rather than cancelled: the loop ends between batches, never mid-write.
            self._stopping = True
            self._wakeup.set()
            await asyncio.wait({self._task}, timeout=timeout_s)
            self._task = None
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if await self.flush() and not self.buffered:
                return True
            await asyncio.sleep(0.1)
        log.error("recorder stopped with %d measurements not written to Redis", self.buffered)
        return False

    @property
    def buffered(self) -> int:
        return len(self._queue) + self._in_preparation + self._pending_events

    async def flush(self) -> bool:
        """Interpret what is queued now and write every pending batch; True when all of it
        reached Redis (outcomes queued meanwhile wait for the next call)."""
        # Shielded: a caller cancelled halfway (a feedback request whose client left, a judge
        # writer stopped at shutdown) must not take outcomes off the queue and never write them.
        return await asyncio.shield(self._flush())

    async def _flush(self) -> bool:
        async with self._write_lock:
            # Only what is queued now: outcomes arriving while a batch is prepared (it yields to
            # the loop) wait for the next interval instead of becoming many tiny batches.
            remaining = len(self._queue)
            while remaining > 0 and self._queue:
                try:
                    remaining -= await self._prepare_batch(remaining)
                finally:
                    self._in_preparation = 0  # a batch that raised is gone: it must not look pending
            ok = await self._write_pending()
        self._metrics.recorder_buffered.set(self.buffered)
        return ok

    async def write_now(self) -> bool:
        """:meth:`flush` for a lookup that must see every measurement taken so far, unless writes
        are failing and the loop's next try is not due (Redis away or full: trying at every
        lookup would only add load). True when nothing is left unwritten."""
        if self._failing and time.monotonic() < self._retry_at:
            return False
        return await self.flush()

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while not self._stopping:
            timer = loop.call_later(self._interval_s + self._backoff_s, self._wakeup.set)
            try:
                await self._wakeup.wait()
            finally:
                timer.cancel()
            self._wakeup.clear()
            if self._stopping:
                return
            try:
                ok = await self.flush()
            except Exception:  # a bug here must not stop recording for good
                log.exception("recorder batch failed")
                ok = False
            self._backoff_s = 0.0 if ok else min(1.0, max(0.05, self._backoff_s * 2))

    # -- interpretation (off the request path) ------------------------------------------------

    async def _prepare_batch(self, limit: int) -> int:
        """Interpret up to ``limit`` queued outcomes into one pending batch; returns how many."""
        arms: dict[tuple[str, str], ArmBatch] = {}
        records: dict[str, tuple[list[list[str]], list[list[Any]]]] = {}
        """Per experiment: request records (ids not signed), aliases of response ids (signed)."""
        tally = PrometheusTally()
        events: collections.Counter[str] = collections.Counter()
        count = 0
        limit = min(limit, self._max_batch)
        while self._queue and count < limit:
            if count % _OUTCOMES_PER_SLICE == 0 and count:
                await asyncio.sleep(0)
            outcome = self._queue.popleft()
            count += 1
            self._in_preparation = count
            try:
                facts = response_facts(outcome) if outcome.status < 400 and not outcome.error_reason else None
            except Exception:  # an upstream body nobody foresaw must not cost the batch
                log.exception("could not read the response of request %s; recorded without its facts", outcome.request_id)
                facts = None
            cost = self._cost(outcome, facts)
            tally.add(outcome, facts, cost)
            route = outcome.route
            if route is None:
                continue
            if outcome.trace_id is not None and self._trace_sink is not None:
                self._trace_sink(_traced(outcome, route, facts))
            response_id = facts.response_id if facts else None
            events[route.experiment] += 1
            user = route.unit if route.unit is not None else route.user
            unit = layout.hash_unit(user) if user is not None else None
            record = None
            if outcome.signed is not None:
                # the id carries what feedback needs: only the response id's alias is kept
                kept = records.setdefault(route.experiment, ([], []))
                if response_id:
                    number, alias_field = ids.response_hash(response_id)
                    kept[1].append([number, alias_field, ids.alias_value(outcome.signed)])
            else:
                record = RequestRecord(
                    route.experiment, route.variant, route.arm, unit, route.forced,
                    outcome.trace_id,  # feedback on it becomes the trace's assessment
                    outcome.started_at, outcome.status,
                )  # fmt: skip
                records.setdefault(route.experiment, ([], []))[0].append(
                    [
                        layout.request_key(route.experiment, outcome.request_id),
                        record.encode(),
                        layout.response_key(route.experiment, response_id) if response_id else "",
                        outcome.request_id,
                    ]
                )
            if outcome.judging is not None and self._judge_sink is not None and facts is not None and facts.text is not None:
                self._judge_sink(_judge_job(outcome, outcome.judging, facts.text, record))
            if route.forced:
                continue
            arm_batch = arms.get((route.experiment, route.arm))
            if arm_batch is None:
                plan = self._catalog.plans[route.experiment]
                arm_batch = arms[(route.experiment, route.arm)] = ArmBatch(
                    plan.arms[route.variant].metadata_json(),
                    counts_units=plan.per_unit,
                    unit_metrics=tuple(m for m in plan.per_user_metrics if m in BUILTIN_METRICS),
                )
            arm_batch.add(metric_row(outcome, facts, cost), unit)
        tally.apply(self._metrics)
        if count == 0 or not records:
            return count
        hour = int(time.time() // 3600)
        payloads: dict[str, dict[str, Any]] = {
            experiment: {
                "records": kept,
                "aliases": aliases,
                "hour": hour,
                "alias_prefix": layout.alias_prefix(experiment),
                "alias_counts": layout.alias_counts_key(experiment),
                "unit_schemas": layout.unit_schemas_key(experiment),
                "arms": [],
            }
            for experiment, (kept, aliases) in records.items()
        }
        for (experiment, arm_id), arm_batch in arms.items():
            await asyncio.sleep(0)
            payloads[experiment]["arms"].append(arm_batch.payload(experiment, arm_id))
        batch_id = secrets.token_hex(12)
        for experiment, payload in payloads.items():
            part = _Part(batch_id, experiment, events[experiment], orjson.dumps(payload).decode())
            self._pending.setdefault(experiment, collections.deque()).append(part)
            self._pending_events += part.events
        return count

    def _cost(self, outcome: Outcome, facts: ResponseFacts | None) -> float | None:
        if facts is None or facts.prompt_tokens is None or facts.completion_tokens is None:
            return None
        price = self._config.prices.get(outcome.model)
        if price is None:
            return None
        return (facts.prompt_tokens * price.input + facts.completion_tokens * price.output) / 1_000_000

    # -- writing ---------------------------------------------------------------------------

    async def _write_pending(self) -> bool:
        """Write every experiment's pending batches, oldest first, each slot on its own: an
        experiment whose write fails keeps its batches for the next round, the others go on.
        Slots are written one after another, those that failed last time last: redis-py's
        cluster client drops every connection when one node fails, which would cut short a
        write to a healthy node made at the same moment."""
        failed: set[str] = set()
        while True:
            heads = [(queue[0].key, queue[0]) for experiment, queue in self._pending.items() if experiment not in failed]
            if not heads:
                break
            groups = connection.by_slot(self._redis, heads)
            groups.sort(key=lambda group: any(part.experiment in self._failing for part in group))
            for group in groups:
                for part, outcome in zip(group, await self._write_group(group), strict=True):
                    if isinstance(outcome, Exception):
                        self._metrics.recorder_write_errors.inc()
                        if not self._refused_for_good(part, outcome):
                            failed.add(part.experiment)
                            continue
                    else:
                        self._account(part, outcome)
                    self._failing.discard(part.experiment)
                    queue = self._pending[part.experiment]
                    queue.popleft()
                    self._pending_events -= part.events
                    if not queue:
                        del self._pending[part.experiment]
        self._failing.update(failed)
        if failed:
            self._retry_at = time.monotonic() + max(0.05, self._backoff_s)
        return not failed

    def _refused_for_good(self, part: _Part, error: Exception) -> bool:
        """Whether a part that failed is given up (dropped and counted) rather than kept for
        the next round: Redis refused it, the same way, too often for a retry to mend it."""
        if not _passing(error):
            part.refusals += 1
        if part.refusals < REFUSALS_BEFORE_DROPPING:
            self._write_warnings.warning(
                (part.experiment, type(error)),
                "Redis write for experiment %s failed (%s: %.200s); %d measurements buffered",
                part.experiment, type(error).__name__, error, self.buffered,
            )  # fmt: skip
            return False
        self._dropped["redis_refused"].inc(part.events)
        log.error(
            "Redis refused a batch of experiment %s %d times (%s: %.300s); its %d measurements are dropped",
            part.experiment, part.refusals, type(error).__name__, error, part.events,
        )  # fmt: skip
        return True

    def _account(self, part: _Part, reply: Any) -> None:
        """What the batch script says it could not write (RECORD_BATCH_LUA's reply): counted
        and logged, never silent."""
        if part.accounted:
            return
        part.accounted = True
        status, *problems = reply if isinstance(reply, list) else [reply]
        if int(status) == -1:
            self._dropped["partly_written"].inc(part.events)
            log.error(
                "an earlier attempt at a batch of experiment %s was stopped by Redis partway: "
                "some of its %d measurements may be missing from the counters",
                part.experiment, part.events,
            )  # fmt: skip
        for arm, why, measurements, aliases in problems:
            if measurements:
                self._dropped["corrupt_counters"].inc(int(measurements))
            lost = " and ".join(
                f"{count} {what}" for count, what in ((measurements, "measurements"), (aliases, "response-id aliases")) if count
            ) or "the arms' descriptions"  # the arms hash: no measurement depends on it
            where = f"arm {arm} of experiment {part.experiment}" if arm else f"experiment {part.experiment}"
            self._warnings.warning((part.experiment, why), "%s: %s; %s not written; mend or delete that key", where, why, lost)

    async def _write_group(self, parts: list[_Part]) -> list[Any]:
        """One pipeline for parts of one slot (or of one Redis): per part, the script's reply
        once it is written (and, on a cluster, held by a replica), else the error. Written
        twice, a part changes nothing."""
        try:
            return await self._script.run(self._redis, lambda sha: self._try_group(parts, sha), parts[0].key)
        except connection.UNAVAILABLE as error:
            return [error] * len(parts)

    async def _try_group(self, parts: list[_Part], sha: str) -> list[Any]:
        cluster = connection.clustered(self._redis)
        pipe = self._redis.pipeline(transaction=False)
        for part in parts:
            # execute_command: redis-py's cluster pipeline blocks its evalsha() helper, not EVALSHA
            pipe.execute_command(
                "EVALSHA", sha, 1, part.key, part.payload, layout.BATCH_DEDUPE_TTL_S, layout.UNIT_TTL_S, self._config.feedback_ttl_s
            )
        node = await connection.confirm_replicated(self._redis, pipe, parts[0].key) if cluster else None
        # No redirections: a call sent on to another node would escape the WAIT queued here.
        replies = await (pipe.execute(raise_on_error=False, allow_redirections=False) if cluster else pipe.execute(raise_on_error=False))
        if any(isinstance(reply, NoScriptError) for reply in replies):
            raise NoScriptError("script not loaded")  # load it there and try again
        if any(isinstance(reply, (MovedError, AskError)) for reply in replies):
            await self._redis.nodes_manager.initialize()  # the slot moved: learn where to, retry later
        outcomes: list[Any] = list(replies[: len(parts)])
        if node is not None:
            acknowledged = replies[-1]
            if isinstance(acknowledged, Exception) or not await connection.replicated(self._redis, node, int(acknowledged)):
                unconfirmed = acknowledged if isinstance(acknowledged, Exception) else RedisError("no replica acknowledged the batch in time")
                for part, outcome in zip(parts, outcomes, strict=True):
                    if not isinstance(outcome, Exception):
                        self._account(part, outcome)  # a replay finds the batch written and says no more
                outcomes = [outcome if isinstance(outcome, Exception) else unconfirmed for outcome in outcomes]
        return outcomes
