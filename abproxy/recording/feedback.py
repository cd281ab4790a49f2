"""``POST /v1/feedback``: join a score to an earlier response and update its arm's counters.

The join uses what a signed request id carries (:mod:`abproxy.recording.ids`), the alias of the
upstream's response id, or for ids not signed the request record the recorder wrote; a score posted again under the same
``(request_id, name)`` replaces the earlier one inside one Lua script, so the aggregates are
corrected exactly, never counted twice."""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from abproxy.catalog import Catalog
from abproxy.config import Config
from abproxy.errors import Conflict, InvalidRequest, InvalidValue, NotFound, StoreUnavailable
from abproxy.metrics import ProxyMetrics
from abproxy.recording import connection, ids, layout, scripts, store
from abproxy.recording.record import RequestRecord
from abproxy.recording.scores import UPDATED, ScoreWriter

log = logging.getLogger("abproxy.recording.feedback")


@dataclass(frozen=True, slots=True)
class ScoredTrace:
    """A score for a request that was sampled as an MLflow trace: a user's (``HUMAN``, by the
    trace's user) or a judge's (``LLM_JUDGE``, by the judge model, with its rationale)."""

    trace_id: str
    name: str
    score: float
    experiment: str
    source_type: str = "HUMAN"
    source_id: str | None = None
    """The judge model for a judge's score; a user's is the trace's user."""
    rationale: str | None = None
    metadata: dict[str, str] | None = None
    """A judge's version and prompt source, on its assessment."""


def parse_feedback(body: dict[str, Any]) -> tuple[str, str | None, float]:
    """(request id, metric name or None, score) from a feedback body."""
    request_id = body.get("request_id")
    if not isinstance(request_id, str) or not request_id or len(request_id) > ids.MAX_ID_LENGTH:
        raise InvalidRequest("'request_id' must be a non-empty string", param="request_id")
    name = body.get("name")
    if name is not None and not isinstance(name, str):
        raise InvalidRequest("'name' must be a string", param="name")
    if "score" not in body:
        raise InvalidRequest("'score' is required", param="score")
    score = body["score"]
    if isinstance(score, bool) or not isinstance(score, (int, float)) or not math.isfinite(score):
        raise InvalidValue("'score' must be a number", "invalid_score", param="score")
    return request_id, name, float(score)


class FeedbackService:
    def __init__(
        self,
        redis: Any,
        config: Config,
        catalog: Catalog,
        flush_pending: Callable[[], Awaitable[bool]],
        metrics: ProxyMetrics,
        on_scored_trace: Callable[[ScoredTrace], None] | None = None,
        signers: ids.Signers | None = None,
    ):
        """``flush_pending`` writes the request records this replica still holds in memory (True
        when all of them reached Redis);
        ``on_scored_trace`` takes the scores of traced requests (it must not block)."""
        self._redis = redis
        self._config = config
        self._catalog = catalog
        self._flush_pending = flush_pending
        self._metrics = metrics
        self._on_scored_trace = on_scored_trace
        self._signers = signers or ids.Signers()
        self._scores = ScoreWriter(redis, config)

    async def submit(self, body: dict[str, Any]) -> dict[str, Any]:
        request_id, name, score = parse_feedback(body)
        with store.reachable():
            if ids.looks_signed(request_id):
                found = await self._verify(request_id)
            else:
                found = await self._find(request_id)
                if found is None:
                    # The response may be so recent that its record is still in this replica's
                    # batch (or was written while we looked): write what is pending, then look again.
                    written = await self._flush_pending()
                    found = await self._find(request_id)
                    if found is None and not written:
                        # Redis has not taken every measurement yet (it was away, or full): the
                        # response may be among them. A 404 would make the app drop the score.
                        raise StoreUnavailable(
                            f"response {request_id!r} is not known yet: measurements are waiting for Redis; post again"
                        )
        if found is None:
            raise NotFound(f"no response with id {request_id!r} (unknown or expired)", "request_not_found")
        canonical_id, feedback_id, record = found
        plan = self._catalog.plans.get(record.experiment)
        if plan is None:
            raise NotFound(f"no response with id {request_id!r} (its experiment {record.experiment!r} is gone)", "request_not_found")
        metrics = plan.settings.feedback
        if not metrics:
            raise InvalidValue(f"experiment {plan.name!r} defines no feedback metrics", "unknown_feedback_name")
        name = name if name is not None else next(iter(metrics))
        bounds = metrics.get(name)
        if bounds is None:
            raise InvalidValue(f"unknown feedback name {name!r}; one of {', '.join(metrics)}", "unknown_feedback_name")
        if not bounds.min <= score <= bounds.max:
            shown = int(score) if score.is_integer() else score
            raise InvalidValue(
                f"score {shown} is outside [{bounds.min:g}, {bounds.max:g}] for {name!r}", "score_out_of_range"
            )
        with store.reachable():
            result = await self._scores.write(plan, feedback_id, record, name, f"feedback.{name}", score)
        self._metrics.feedback.labels(record.experiment, record.variant, name).inc()
        if record.trace_id and self._on_scored_trace is not None:
            self._on_scored_trace(ScoredTrace(record.trace_id, name, score, record.experiment))
        return {
            "status": "updated" if result == UPDATED else "recorded",
            "experiment": record.experiment,
            "variant": record.variant,
            "request_id": canonical_id,
            "name": name,
        }

    async def _verify(self, request_id: str) -> tuple[str, str, RequestRecord] | None:
        """A signed id: everything is in it, once its MAC holds and it has not expired."""
        await self._signers.load(self._redis)
        signed = self._signers.verify(request_id)
        if signed is None:
            # signed by a replica that came up with another secret (Redis had lost it) since
            # this one last looked: learn the secrets Redis has now, once
            await self._signers.refresh(self._redis)
            signed = self._signers.verify(request_id)
        if signed is None:
            raise InvalidRequest(
                f"request id {request_id!r} was not issued by this proxy (altered, or signed with a secret that Redis and every running replica lost)",
                "invalid_request_id",
                param="request_id",
            )
        if signed.issued_at + self._config.feedback_ttl_s < time.time():
            return None
        return request_id, signed.feedback_id, RequestRecord.of_signed(signed)

    async def _find(self, request_id: str) -> tuple[str, str, RequestRecord] | None:
        """The request a request id or response id names (request ids not signed: records from
        before signing, or written while the secret could not be read), looked up in every
        experiment: one pipeline per cluster slot (all together on one Redis), one slot after
        another (see Recorder._write_pending). A slot that cannot be read fails the lookup only
        if the record is not found elsewhere."""
        experiments = list(self._catalog.plans)
        groups = connection.by_slot(self._redis, ((layout.experiment_tag(e), e) for e in experiments))
        replies: dict[str, tuple[str | None, str | None, list[str]]] = {}
        errors: list[BaseException] = []
        for group in groups:
            try:
                replies.update(zip(group, await self._look(group, request_id), strict=True))
            except connection.UNAVAILABLE as error:
                errors.append(error)
        ambiguous = Conflict(
            f"response id {request_id!r} was returned for more than one request; "
            "post feedback with the X-ABProxy-Request-Id header's value instead",
            "ambiguous_response_id",
        )
        found: list[tuple[str, str, RequestRecord]] = []
        for experiment in experiments:
            if experiment not in replies:
                continue
            record, aliased, aliases = replies[experiment]
            if (record is None and aliased == "") or "" in aliases:
                raise ambiguous
            if record is None and aliased is not None:
                record = await self._redis.get(layout.request_key(experiment, aliased))
                if record is not None:
                    found.append((aliased, aliased, RequestRecord.decode(record)))
            elif record is not None:
                found.append((request_id, request_id, RequestRecord.decode(record)))
            for value in dict.fromkeys(aliases):
                signed = await self._from_alias(experiment, value)
                if signed is not None:
                    canonical = (await self._signers.load(self._redis)).encode(signed)
                    found.append((canonical, signed.feedback_id, RequestRecord.of_signed(signed)))
        if len(found) > 1:
            raise ambiguous
        if found:
            return found[0]
        if errors:
            raise errors[0]
        return None

    async def _from_alias(self, experiment: str, value: str) -> ids.SignedId | None:
        plan = self._catalog.plans[experiment]
        known = [arm.arm_id for arm in plan.arms.values()]
        try:
            signed = ids.from_alias(experiment, value, known)
            if signed is None:  # an arm edited since: the experiment's arms hash knows them all
                signed = ids.from_alias(experiment, value, await self._redis.hkeys(layout.arms_key(experiment)))
        except (ValueError, IndexError):
            return None
        if signed is None or signed.issued_at + self._config.feedback_ttl_s < time.time():
            return None
        return signed

    async def _look(self, experiments: list[str], request_id: str) -> list[tuple[str | None, str | None, list[str]]]:
        """Per experiment: the request record, the old alias, and the aliases in hour buckets."""
        number, field = ids.response_hash(request_id)
        pipe = self._redis.pipeline(transaction=False)
        for experiment in experiments:
            pipe.get(layout.request_key(experiment, request_id))
            pipe.get(layout.response_key(experiment, request_id))
            # EVAL, not EVALSHA: a lookup by response id is rare, and never misses a script cache
            pipe.execute_command(
                "EVAL", scripts.FIND_ALIAS_LUA, 1, layout.alias_counts_key(experiment), layout.alias_prefix(experiment), number, field
            )
        replies = await pipe.execute()
        return [(replies[3 * i], replies[3 * i + 1], list(replies[3 * i + 2] or [])) for i in range(len(experiments))]
