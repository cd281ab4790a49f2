"""Sampled requests as MLflow traces, and feedback on them as MLflow assessments (SPEC §4a).

The recorder hands each sampled request over (:meth:`TraceWriter.offer`, O(1), never blocks);
every ``interval_s`` the writer writes what is queued, in a worker thread, in one batch per
experiment: one trace record each, then the spans in one call. Nothing here touches a request:
when MLflow is away or slow, or more is sampled than ``mlflow.max_traces_per_minute`` allows (paced
evenly over the minute, :class:`abproxy.pacing.Pace`), or the queue is full, traces are dropped and
counted (``abproxy_traces_dropped_total{reason}``). A request an LLM judge scores is traced
whatever the sample and the cap (the judges' own caps bound those), so its score has a trace.

A trace waits until its experiment's MLflow layout exists (the flusher creates it at its first
flush), so that it can be linked to its arm's LoggedModel. Trace ids are chosen when the request
is sampled, so feedback can name the trace before it is written; an assessment waits for its
trace the same way.

MLflow's own tracing pipeline is process-wide (one tracking URI, one tracer provider); this
writes through a tracing client of its own, so each experiment's store is the configured one.
With a local store (sqlite, a folder) MLflow's writes run in the Python that calls them — about
9 ms of CPU per trace on sqlite, which in the proxy's process would hold the GIL its requests
need — so they run in a child process of their own; a tracking server's are REST calls, made
from a worker thread.
"""

from __future__ import annotations

import asyncio
import base64
import collections
import json
import logging
import multiprocessing
import multiprocessing.connection
import time
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlparse

import orjson

from abproxy.catalog import Catalog
from abproxy.config import Config, redact_credentials
from abproxy.metrics import ProxyMetrics
from abproxy.pacing import Pace
from abproxy.tracking.registry import LINKED_PROMPTS_TAG, PromptRef
from abproxy.tracking.writer import check_store
from abproxy.recording import layout, store
from abproxy.recording.feedback import ScoredTrace
from abproxy.recording.outcome import TracedExchange

log = logging.getLogger("abproxy.tracking.traces")

MAX_QUEUED = 2000
MAX_QUEUED_BYTES = 64 * 1024 * 1024
"""Prompts and answers can be long: the queue is bounded by bytes too (a trace keeps about
``trim.TRACED_BYTES`` of each)."""
MAX_ATTEMPTS = 5
"""Writes an assessment is tried for (its trace may not be written yet)."""
PREVIEW_CHARS = 1000
CHILD_EXIT_S = 5.0
"""At shutdown, how long the writer process may take to finish the write it is in (a write
given up on still runs there: a slow store would otherwise hold the proxy's exit)."""

_SPAN_TYPES = {"chat": "CHAT_MODEL", "responses": "CHAT_MODEL", "completions": "LLM"}
_SPAN_NAMES = {"chat": "chat.completions", "responses": "responses", "completions": "completions"}


@dataclass
class _PendingScore:
    score: ScoredTrace
    attempts: int = 0


class TraceWriter:
    def __init__(
        self,
        redis: Any,
        config: Config,
        catalog: Catalog,
        metrics: ProxyMetrics,
        *,
        interval_s: float = 2.0,
        max_queued: int = MAX_QUEUED,
        mlflow_lock: asyncio.Lock | None = None,
        processes: int = 1,
    ):
        """``mlflow_lock`` is held while writing (shared with the flusher); ``processes`` share
        ``max_traces_per_minute`` (the replica's workers)."""
        self._redis = redis
        self._config = config
        self._catalog = catalog
        self._metrics = metrics
        self._interval_s = interval_s
        self._max_queued = max_queued
        self._mlflow_lock = mlflow_lock or asyncio.Lock()
        self._budget = Pace(config.mlflow.max_traces_per_minute, processes)
        self._traces: collections.deque[TracedExchange] = collections.deque()
        self._queued_bytes = 0
        self._scores: collections.deque[_PendingScore] = collections.deque()
        self._child: ProcessPoolExecutor | None = None
        """The process MLflow's writes run in, for a local store."""
        self._writing = 0
        self._shown_uri = redact_credentials(config.mlflow.tracking_uri)
        self.written = 0
        """Traces written so far (for tests and logs)."""

    # -- fed off the request path --------------------------------------------------------------

    def offer(self, exchange: TracedExchange) -> None:
        """Take a sampled request; never blocks, never raises."""
        if not exchange.judged and not self._budget.take():
            self._drop("rate_limited")
        elif len(self._traces) >= self._max_queued or self._queued_bytes + exchange.size > MAX_QUEUED_BYTES:
            self._drop("queue_full")
        else:
            self._traces.append(exchange)
            self._queued_bytes += exchange.size

    @property
    def queued(self) -> int:
        """Traces and scores waiting to be written, or being written."""
        return len(self._traces) + len(self._scores) + self._writing

    def offer_score(self, score: ScoredTrace) -> None:
        if len(self._scores) >= self._max_queued:
            self._metrics.assessments_dropped.inc()
            return
        self._scores.append(_PendingScore(score))

    def _drop(self, reason: str, count: int = 1) -> None:
        self._metrics.traces_dropped.labels(reason).inc(count)

    # -- writing -------------------------------------------------------------------------------

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self._interval_s)
            try:
                await self.write_pending()
            except Exception as error:  # never let the loop die; what failed was counted
                log.warning("writing traces to MLflow failed (%s: %s)", type(error).__name__, error)

    async def stop(self, timeout_s: float = 10.0) -> None:
        """Write what is queued and ready, once, within ``timeout_s``; the writer process then
        gets ``CHILD_EXIT_S`` to finish a write still running before it is ended."""
        try:
            async with asyncio.timeout(timeout_s):
                await self.write_pending()
        except Exception as error:
            log.warning("traces left unwritten at shutdown (%s: %s)", type(error).__name__, error)
        if self._child is not None:
            await asyncio.to_thread(_end_child, self._child, CHILD_EXIT_S)
            self._child = None

    async def write_pending(self) -> int:
        """Write every queued trace whose experiment is laid out in MLflow, then the scores of
        written traces; returns how many traces were written."""
        if not self._traces and not self._scores:
            return 0
        layouts = await self._layouts({t.experiment for t in self._traces} | {p.score.experiment for p in self._scores})
        ready: list[TracedExchange] = []
        waiting: collections.deque[TracedExchange] = collections.deque()
        for exchange in self._traces:
            layout = layouts.get(exchange.experiment)
            (ready if layout is not None and f"model:{exchange.arm}" in layout else waiting).append(exchange)
        self._traces = waiting
        self._queued_bytes = sum(t.size for t in waiting)
        # A score waits, like its trace, for its experiment's layout: nothing here touches MLflow
        # before the flusher has (a store both would create at once races its schema migration).
        pending = [p for p in self._scores if p.score.experiment in layouts]
        self._scores = collections.deque(p for p in self._scores if p.score.experiment not in layouts)
        if not ready and not pending:
            return 0  # every trace waits for its experiment's layout: nothing for MLflow yet
        batch = Batch(self._config.mlflow.tracking_uri, ready, layouts, [p.score for p in pending])
        self._writing = len(ready) + len(pending)
        writing = False
        try:
            async with self._mlflow_lock:
                writing = True
                done = await self._run(batch)
        except asyncio.CancelledError:
            if not writing:  # stopped while a flush held MLflow: nothing was written, so keep them
                self._traces.extendleft(reversed(ready))
                self._queued_bytes += sum(t.size for t in ready)
                self._scores.extendleft(reversed(pending))
            raise
        finally:
            self._writing = 0
        for experiment, count, problem in done.failed_experiments:
            self._drop("mlflow_unavailable", count)
            log.warning("could not write %d trace(s) of %s to MLflow (%s)", count, experiment, problem)
        for index, problem in done.failed_scores:
            score = pending[index]
            score.attempts += 1
            if score.attempts < MAX_ATTEMPTS:
                self._scores.append(score)  # its trace may still be waiting in the queue
            else:
                self._metrics.assessments_dropped.inc()
                log.warning("feedback on trace %s not written to MLflow (%s)", score.score.trace_id, problem)
        self.written += done.written
        return done.written

    async def _run(self, batch: Batch) -> Written:
        if not _local_store(batch.tracking_uri):
            return await asyncio.to_thread(write_batch, batch)
        if self._child is None:
            self._child = ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn"))
        try:
            return await asyncio.get_running_loop().run_in_executor(self._child, write_batch, batch)
        except BrokenProcessPool:  # the child died (killed, out of memory): a new one next time
            self._child.shutdown(wait=False)
            self._child = None
            problem = "the MLflow writer process died"
            return Written(
                0,
                [(name, n, problem) for name, n in collections.Counter(t.experiment for t in batch.traces).items()],
                [(index, problem) for index in range(len(batch.scores))],
            )

    async def _layouts(self, experiments: set[str]) -> dict[str, dict[str, str]]:
        """The MLflow ids the flusher keeps in Redis, for experiments laid out in this store."""
        layouts = {}
        with store.reachable():
            for name in experiments:
                runs = await self._redis.hgetall(layout.runs_key(name))
                if runs.get("tracking_uri") == self._shown_uri and "experiment_id" in runs:
                    layouts[name] = runs
        return layouts


def _local_store(tracking_uri: str) -> bool:
    """sqlite or a folder: MLflow's writes run in the caller's Python."""
    return urlparse(tracking_uri).scheme in ("", "file", "sqlite")


@dataclass
class Batch:
    """One write to MLflow: what the writer process (or thread) is given."""

    tracking_uri: str
    traces: list[TracedExchange]
    layouts: dict[str, dict[str, str]]
    scores: list[ScoredTrace]


@dataclass
class Written:
    written: int
    failed_experiments: list[tuple[str, int, str]] = field(default_factory=list)
    """(experiment, traces dropped, why)"""
    failed_scores: list[tuple[int, str]] = field(default_factory=list)
    """(index in the batch's scores, why)"""


_clients: dict[str, Any] = {}


def _tracing(tracking_uri: str) -> Any:
    if tracking_uri not in _clients:
        from mlflow.tracing.client import TracingClient

        check_store(tracking_uri)
        _clients[tracking_uri] = TracingClient(tracking_uri)
    return _clients[tracking_uri]


def _problem(error: Exception) -> str:
    return f"{type(error).__name__}: {error}"


def write_batch(batch: Batch) -> Written:
    """Write a batch's traces, one experiment at a time, then its scores; never raises."""
    done = Written(0)
    by_experiment: dict[str, list[TracedExchange]] = collections.defaultdict(list)
    for exchange in batch.traces:
        by_experiment[exchange.experiment].append(exchange)
    for experiment, exchanges in by_experiment.items():
        layout = batch.layouts[experiment]
        try:
            done.written += _write_traces(_tracing(batch.tracking_uri), layout["experiment_id"], exchanges, layout)
        except Exception as error:
            done.failed_experiments.append((experiment, len(exchanges), _problem(error)))
    for index, score in enumerate(batch.scores):
        try:
            _write_score(_tracing(batch.tracking_uri), score)
        except Exception as error:
            done.failed_scores.append((index, _problem(error)))
    return done


def _write_traces(client: Any, experiment_id: str, exchanges: list[TracedExchange], layout: dict[str, str]) -> int:
    spans, infos, prompts = [], [], []
    for exchange in exchanges:
        version = layout.get(f"prompt:{exchange.arm}")
        prompt = PromptRef(exchange.experiment, int(version)) if version else None
        span, info = trace_of(exchange, experiment_id, layout.get(f"model:{exchange.arm}"), prompt)
        spans.append(span)
        infos.append(info)
        prompts.append(prompt)
    # The records first: a span logged for a trace with no record makes the store create a
    # bare one, which start_trace then has to merge into (4x the CPU on sqlite).
    for info, prompt in zip(infos, prompts):
        client.start_trace(info)
        if prompt is not None:  # what the prompt version's page lists as its traces
            client.store.link_prompts_to_trace(info.trace_id, [prompt])
    client.log_spans(experiment_id, spans)
    return len(infos)


def _write_score(client: Any, score: ScoredTrace) -> None:
    """The score as the trace's feedback, from a human or an LLM judge; a second score of the
    same name from the same kind of source replaces it."""
    from mlflow.entities import AssessmentSource
    from mlflow.entities.assessment import Feedback

    info = client.get_trace_info(score.trace_id)
    source_id = score.source_id or info.trace_metadata.get("mlflow.trace.user") or "anonymous"
    source = AssessmentSource(source_type=score.source_type, source_id=source_id)
    feedback = Feedback(name=score.name, value=score.score, source=source, rationale=score.rationale, metadata=score.metadata)
    earlier = [
        assessment
        for assessment in info.assessments
        if assessment.name == score.name and assessment.source.source_type == score.source_type
    ]
    if earlier:
        client.update_assessment(score.trace_id, earlier[-1].assessment_id, feedback)
    else:
        client.log_assessment(score.trace_id, feedback)


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _loads(data: bytes | None) -> Any:
    if data is None:
        return None
    try:
        return orjson.loads(data)
    except orjson.JSONDecodeError:
        return data.decode("utf-8", "replace")


def _outputs(exchange: TracedExchange) -> Any:
    """What the answer looks like in MLflow's trace view: the upstream's own JSON, or for a
    stream the assembled answer in the same shape."""
    if exchange.response_body is not None:
        return _loads(exchange.response_body)
    if exchange.answer is None:
        return None
    if exchange.endpoint == "chat":
        return {"choices": [{"index": 0, "message": {"role": "assistant", "content": exchange.answer}}]}
    return exchange.answer


def trace_of(
    exchange: TracedExchange, experiment_id: str, model_id: str | None, prompt: PromptRef | None = None
) -> tuple[Any, Any]:
    """One span and its trace record, in MLflow's V3 trace schema, linked to the arm's
    LoggedModel and Prompt Registry version when the flusher has made them."""
    from mlflow.entities import Span, TraceInfo, TraceLocation, TraceState

    inputs = _loads(exchange.sent_body)
    outputs = _outputs(exchange)
    start_ns = int(exchange.started_at * 1e9)
    duration_ms = max(0, int(exchange.latency_s * 1000))
    trace_hex = exchange.trace_id.removeprefix("tr-")
    usage = {
        key: value
        for key, value in (
            ("input_tokens", exchange.prompt_tokens),
            ("output_tokens", exchange.completion_tokens),
            ("total_tokens", exchange.total_tokens),
        )
        if value is not None
    }
    attributes = {
        "mlflow.traceRequestId": json.dumps(exchange.trace_id),
        "mlflow.spanType": json.dumps(_SPAN_TYPES[exchange.endpoint]),
        "mlflow.spanInputs": json.dumps(inputs, ensure_ascii=False),
        "mlflow.spanOutputs": json.dumps(outputs, ensure_ascii=False),
        "abproxy.status": json.dumps(exchange.status),
    }
    if usage:
        attributes["mlflow.chat.tokenUsage"] = json.dumps(usage)
    if exchange.error_reason:
        attributes["abproxy.error_reason"] = json.dumps(exchange.error_reason)
    name = _SPAN_NAMES[exchange.endpoint]
    span = Span.from_dict(
        {
            "trace_id": _b64(bytes.fromhex(trace_hex)),
            "span_id": _b64(bytes.fromhex(trace_hex[:16])),
            "parent_span_id": None,
            "name": name,
            "start_time_unix_nano": start_ns,
            "end_time_unix_nano": start_ns + duration_ms * 1_000_000,
            "events": [],
            "status": {
                "code": "STATUS_CODE_ERROR" if exchange.failed else "STATUS_CODE_OK",
                "message": exchange.error_reason or "",
            },
            "attributes": attributes,
            "links": [],
        }
    )
    metadata = {
        "mlflow.trace_schema.version": "3",
        "mlflow.traceInputs": json.dumps(inputs, ensure_ascii=False)[:PREVIEW_CHARS],
        "mlflow.traceOutputs": json.dumps(outputs, ensure_ascii=False)[:PREVIEW_CHARS],
    }
    if usage:
        metadata["mlflow.trace.tokenUsage"] = json.dumps(usage)
    if exchange.unit is not None:
        metadata["mlflow.trace.user"] = exchange.unit
    if model_id is not None:
        metadata["mlflow.modelId"] = model_id
    info = TraceInfo(
        trace_id=exchange.trace_id,
        trace_location=TraceLocation.from_experiment_id(experiment_id),
        request_time=start_ns // 1_000_000,
        state=TraceState.ERROR if exchange.failed else TraceState.OK,
        execution_duration=duration_ms,
        request_preview=_preview(inputs),
        response_preview=(exchange.answer or "")[:PREVIEW_CHARS] or None,
        trace_metadata=metadata,
        tags={
            # what MLflow's trace list shows as the trace's name: which arm answered
            "mlflow.traceName": f"{exchange.experiment}/{exchange.variant}",
            "abproxy.experiment": exchange.experiment,
            "abproxy.variant": exchange.variant,
            "abproxy.arm": exchange.arm,
            "abproxy.request_id": exchange.request_id,
            **({"abproxy.forced": "true"} if exchange.forced else {}),
            **({"abproxy.cut": ",".join(exchange.cut)} if exchange.cut else {}),
            **({LINKED_PROMPTS_TAG: json.dumps([prompt.linked])} if prompt is not None else {}),
        },
    )
    return span, info


def _preview(inputs: Any) -> str | None:
    """The last user message, as MLflow's trace list shows a request."""
    if isinstance(inputs, dict):
        messages = inputs.get("messages")
        if isinstance(messages, list):
            for message in reversed(messages):
                if isinstance(message, dict) and message.get("role") == "user":
                    content = message.get("content")
                    return (content if isinstance(content, str) else json.dumps(content))[:PREVIEW_CHARS]
        for key in ("input", "prompt"):
            if isinstance(inputs.get(key), str):
                return str(inputs[key])[:PREVIEW_CHARS]
    return None


def _end_child(child: ProcessPoolExecutor, timeout_s: float) -> None:
    """Shut the writer process down: it finishes its write within ``timeout_s`` or is ended
    (an SQL store rolls the unfinished transaction back; the traces in it are lost, as any
    trace is when MLflow is away)."""
    # Python 3.11 has no public way to end an executor's workers (3.14's terminate_workers).
    processes = list((getattr(child, "_processes", None) or {}).values())
    child.shutdown(wait=False, cancel_futures=True)
    deadline = time.monotonic() + timeout_s
    for process in processes:
        if not _exited(process, max(0.0, deadline - time.monotonic())):
            log.warning("the MLflow trace writer did not finish within %gs of shutdown: ended", timeout_s)
            process.terminate()
            _exited(process, 2.0)


def _exited(process: Any, timeout_s: float) -> bool:
    """Whether ``process`` ends within ``timeout_s``. Told by its sentinel, not ``is_alive()``:
    the executor's own thread joins its workers too, and a process it reaped first reads as
    alive to everyone else (``waitpid`` fails, so ``poll`` answers "not yet")."""
    return bool(multiprocessing.connection.wait([process.sentinel], timeout_s))
