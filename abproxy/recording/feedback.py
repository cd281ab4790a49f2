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

from redis.exceptions import AskError, MovedError

from abproxy.catalog import Catalog
from abproxy.config import Config
from abproxy.errors import Conflict, CorruptCounters, InvalidRequest, InvalidValue, NotFound, StoreUnavailable
from abproxy.logs import ThrottledLog
from abproxy.metrics import ProxyMetrics
from abproxy.recording import connection, ids, layout, scripts, store
from abproxy.recording.record import RequestRecord
from abproxy.stats.histogram import bucket_of

log = logging.getLogger("abproxy.recording.feedback")

WARNING_EVERY_S = 60.0
"""A score refused for a broken key is logged at most this often per key (every post hits it)."""


@dataclass(frozen=True, slots=True)
class ScoredTrace:
    """A score posted for a request that was sampled as an MLflow trace."""

    trace_id: str
    name: str
    score: float
    experiment: str


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
        self._script = scripts.Script(scripts.RECORD_FEEDBACK_LUA)
        self._warnings = ThrottledLog(log, WARNING_EVERY_S)

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
            # per-user sums: every metric of a unit: user experiment; the primary metric of a
            # unit: request one, for its design effect (without counting users as units)
            per_user = "1" if plan.per_unit else "2" if f"feedback.{name}" in plan.per_user_metrics else "0"
            result = await self._apply(feedback_id, record, per_user, name, score)
        self._metrics.feedback.labels(record.experiment, record.variant, name).inc()
        if record.trace_id and self._on_scored_trace is not None:
            self._on_scored_trace(ScoredTrace(record.trace_id, name, score, record.experiment))
        return {
            "status": "updated" if result == 2 else "recorded",
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

    async def _apply(self, feedback_id: str, record: RequestRecord, per_user: str, name: str, score: float) -> int:
        experiment, arm, unit = record.experiment, record.arm, record.unit
        keys = [
            layout.feedback_key(experiment, feedback_id),
            layout.stats_key(experiment, arm),
            layout.hist_key(experiment, arm),
            layout.unit_key(experiment, arm, unit) if unit else "",
            layout.unit_schemas_key(experiment),
        ]
        args = [
            name,
            repr(score),
            bucket_of(score),
            self._config.feedback_ttl_s,
            "0" if record.forced else "1",
            per_user,
            layout.UNIT_TTL_S if per_user == "1" else self._config.feedback_ttl_s,
        ]
        if not connection.clustered(self._redis):
            return self._applied(
                await self._script.run(self._redis, lambda sha: self._redis.evalsha(sha, len(keys), *keys, *args), keys[0])
            )

        async def confirmed(sha: str) -> int:
            pipe = self._redis.pipeline(transaction=False)
            pipe.execute_command("EVALSHA", sha, len(keys), *keys, *args)
            node = await connection.confirm_replicated(self._redis, pipe, keys[0], connection.FEEDBACK_WAIT_MS)
            try:
                result, acknowledged = await pipe.execute(allow_redirections=False)
            except (MovedError, AskError):
                await self._redis.nodes_manager.initialize()  # the slot moved: the next try goes there
                raise
            if not await connection.replicated(self._redis, node, int(acknowledged)):
                raise StoreUnavailable("Redis did not confirm the score in time; post it again")
            return self._applied(result)

        return await self._script.run(self._redis, confirmed, keys[0])

    def _applied(self, reply: Any) -> int:
        """1 recorded, 2 updated; a score the script could not write at all (RECORD_FEEDBACK_LUA's
        {0, why}) is refused, and said where an operator looks."""
        if isinstance(reply, list):
            why = reply[1]
            self._warnings.warning(why, "feedback not recorded: %s; mend or delete that key in Redis", why)
            raise CorruptCounters(
                f"the score was not recorded: {why}; the proxy's operator must mend or delete that key in Redis"
            )
        return int(reply)

