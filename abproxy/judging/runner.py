"""LLM judges at work, off the request path (docs/reference.md, "LLM judges").

The recorder hands each sampled, successful answer over (:meth:`JudgeRunner.offer`: O(1), never
blocks; past ``max_queued`` answers waiting, a new one is dropped and counted). A few workers
call the judges through abproxy's own upstream client, one call each, never retried: a judge
that is down, slow or answers something else is counted in ``abproxy_judge_failures_total`` and
no score is recorded. A score is counted in Redis like a user's feedback for the request it
judged (idempotent per request and judge), after the request's own measurement was written;
while Redis is away scores wait in memory (bounded) and are written once it is back. A judged
request's trace gets the score as an ``LLM_JUDGE`` assessment.
"""

from __future__ import annotations

import asyncio
import collections
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from abproxy.catalog import Catalog
from abproxy.config import Config
from abproxy.errors import CorruptCounters, StoreUnavailable
from abproxy.judging.prompt import BadAnswer, Judgement, cost_usd, read_answer, render, request_body
from abproxy.logs import ThrottledLog
from abproxy.metrics import ProxyMetrics
from abproxy.recording import connection
from abproxy.recording.feedback import ScoredTrace
from abproxy.recording.interpret import loads_or_none
from abproxy.recording.outcome import JudgeJob
from abproxy.recording.scores import ScoreWriter
from abproxy.upstream.policy import UPSTREAM_FAILURES, Upstreams, error_reason, translate_failure

log = logging.getLogger("abproxy.judging")

MAX_QUEUED = 1000
"""Answers waiting for a judge, per process."""
MAX_UNWRITTEN = 10_000
"""Scores waiting for Redis, per process."""
WORKERS = 8
"""Judge calls in flight at once, per process."""
WARNING_EVERY_S = 60.0
CHAT_PATH = "/chat/completions"
WAITING_FOR_REDIS: tuple[type[Exception], ...] = (*connection.UNAVAILABLE, StoreUnavailable)
"""A score not written for these is kept and written again later."""


@dataclass(frozen=True, slots=True)
class _Score:
    job: JudgeJob
    judge: str
    judgement: Judgement


class JudgeRunner:
    def __init__(
        self,
        config: Config,
        catalog: Catalog,
        upstreams: Upstreams,
        scores: ScoreWriter,
        metrics: ProxyMetrics,
        flush_pending: Callable[[], Awaitable[bool]],
        on_scored_trace: Callable[[ScoredTrace], None] | None = None,
        *,
        max_queued: int = MAX_QUEUED,
        workers: int = WORKERS,
        retry_s: float = 1.0,
        interval_s: float = 0.2,
    ):
        """``flush_pending`` writes the measurements this replica still holds (True when all of
        them reached Redis): a score is written after its request's measurement. Scores are
        written every ``interval_s``, together, and retried every ``retry_s`` while Redis is away."""
        self._config = config
        self._catalog = catalog
        self._upstreams = upstreams
        self._scores = scores
        self._metrics = metrics
        self._flush_pending = flush_pending
        self._on_scored_trace = on_scored_trace
        self._workers = workers
        self._retry_s = retry_s
        self._interval_s = interval_s
        self._queue: asyncio.Queue[JudgeJob] = asyncio.Queue(max_queued)
        self._unwritten: collections.deque[_Score] = collections.deque()
        self._written = asyncio.Event()
        self._writing = asyncio.Lock()
        self._tasks: list[asyncio.Task[None]] = []
        self._judging = 0
        self._warnings = ThrottledLog(log, WARNING_EVERY_S)
        self.scored = 0
        """Scores recorded in Redis so far (for tests and logs)."""

    @property
    def unwritten(self) -> int:
        """Scores waiting for Redis."""
        return len(self._unwritten)

    @property
    def busy(self) -> int:
        """Answers queued or being judged, and scores not yet written: 0 once all is recorded."""
        return self._queue.qsize() + self._judging + len(self._unwritten)

    # -- fed by the recorder -------------------------------------------------------------------

    def offer(self, job: JudgeJob) -> None:
        """Take an answer to judge; never blocks, never raises."""
        try:
            self._queue.put_nowait(job)
        except asyncio.QueueFull:
            for judge in job.judges:
                self._failed(judge, "queue_full")

    # -- lifecycle -----------------------------------------------------------------------------

    def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._tasks = [loop.create_task(self._judge_loop(), name=f"abproxy-judge-{i}") for i in range(self._workers)]
        self._tasks.append(loop.create_task(self._write_loop(), name="abproxy-judge-scores"))

    async def stop(self, timeout_s: float = 5.0) -> None:
        """Stop judging and the periodic writes; write the scores already given, within
        ``timeout_s``. (A write cut short is written again: the score replaces itself.)"""
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks = []
        try:
            async with asyncio.timeout(timeout_s):
                while self._unwritten and await self.write_pending():
                    pass
        except TimeoutError:
            pass
        if self._unwritten or not self._queue.empty():
            log.warning(
                "at shutdown, %d judges' scores were not written to Redis and %d answers not judged",
                len(self._unwritten), self._queue.qsize(),
            )  # fmt: skip

    # -- judging -------------------------------------------------------------------------------

    async def _judge_loop(self) -> None:
        while True:
            job = await self._queue.get()
            self._judging += 1
            try:
                for name in job.judges:
                    try:
                        judgement = await self.judge(name, job.input, job.output)
                    except Exception:  # a bug here must not stop the judges for good
                        log.exception("judge %s failed unexpectedly", name)
                        judgement = None
                    if judgement is not None:
                        self._keep(_Score(job, name, judgement))
            finally:
                self._judging -= 1

    async def judge(self, name: str, judged_input: str, output: str) -> Judgement | None:
        """One call to the judge; None (and counted) when it gave no valid score."""
        judge = self._config.judges[name]
        upstream = judge.upstream or self._config.default_upstream
        body = request_body(judge, render(judge.prompt, judged_input, output))
        try:
            async with asyncio.timeout(judge.timeout_s):
                async with self._upstreams.post_json(upstream, CHAT_PATH, b"", (), body, False) as response:
                    status = response.status
                    data = await response.read()
        except UPSTREAM_FAILURES as error:
            _, reason = translate_failure(error, upstream)
            reason = reason if reason in ("timeout", "unreachable") else "bad_answer"  # unreadable, too large
            self._call_failed(name, reason, f"{type(error).__name__}: {error}")
            return None
        if status >= 400:
            self._call_failed(name, error_reason(status), f"the judge's upstream answered {status}")
            return None
        payload = loads_or_none(data)
        cost = cost_usd(payload, self._config.prices.get(judge.model))
        if cost:
            self._metrics.judge_cost.labels(name).inc(cost)
        try:
            judgement = read_answer(judge, payload)
        except BadAnswer as error:
            self._call_failed(name, error.reason, str(error))
            return None
        self._metrics.judge_requests.labels(name, "scored").inc()
        return judgement

    def _call_failed(self, judge: str, reason: str, detail: str) -> None:
        self._metrics.judge_requests.labels(judge, "failed").inc()
        self._failed(judge, reason, detail)

    def _failed(self, judge: str, reason: str, detail: str = "") -> None:
        self._metrics.judge_failures.labels(judge, reason).inc()
        if detail:
            self._warnings.warning((judge, reason), "judge %s gave no score (%s): %s", judge, reason, detail)

    # -- recording -----------------------------------------------------------------------------

    def _keep(self, score: _Score) -> None:
        if len(self._unwritten) >= MAX_UNWRITTEN:
            self._failed(score.judge, "not_recorded", "too many scores wait for Redis")
            return
        self._unwritten.append(score)
        self._written.set()

    async def _write_loop(self) -> None:
        while True:
            await self._written.wait()
            await asyncio.sleep(self._interval_s)  # the scores of the interval together: one flush of the recorder
            self._written.clear()
            try:
                done = await self.write_pending()
            except Exception:
                log.exception("writing judges' scores failed")
                done = False
            if not done:
                await asyncio.sleep(self._retry_s)
                self._written.set()

    async def write_pending(self) -> bool:
        """Write the scores waiting, oldest first; True when none is left (False: Redis is away,
        they wait for the next try). One writer at a time: each pops the head it wrote."""
        async with self._writing:
            return await self._write_pending()

    async def _write_pending(self) -> bool:
        if not self._unwritten:
            return True
        if not await self._flush_pending():
            return False  # the requests' measurements first
        while self._unwritten:
            score = self._unwritten[0]
            job = score.job
            plan = self._catalog.plans[job.record.experiment]
            try:
                await self._scores.write(
                    plan, job.feedback_id, job.record, plan.stored(f"judge.{score.judge}"), f"judge.{score.judge}", score.judgement.score
                )
            except WAITING_FOR_REDIS as error:
                self._warnings.warning("redis", "judges' scores wait for Redis (%s: %s)", type(error).__name__, error)
                return False
            except CorruptCounters as error:
                self._failed(score.judge, "not_recorded", str(error))
            else:
                self.scored += 1
                self._trace(score)
            self._unwritten.popleft()
        return True

    def _trace(self, score: _Score) -> None:
        trace_id = score.job.record.trace_id
        if trace_id is None or self._on_scored_trace is None:
            return
        judge = self._config.judges[score.judge]
        plan = self._catalog.plans[score.job.record.experiment]
        metadata = {"abproxy.judge_version": plan.judge_version(score.judge)}
        if judge.prompt_source:
            metadata["abproxy.judge_prompt"] = judge.prompt_source
        self._on_scored_trace(
            ScoredTrace(
                trace_id,
                score.judge,
                score.judgement.score,
                score.job.record.experiment,
                source_type="LLM_JUDGE",
                source_id=judge.model,
                rationale=score.judgement.rationale,
                metadata=metadata,
            )
        )
