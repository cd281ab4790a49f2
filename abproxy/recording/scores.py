"""A score for one request, counted for its arm and unit: users' feedback and judges' scores
alike. Written with ``RECORD_FEEDBACK_LUA``: a score given again under the same name replaces the
earlier one inside the script, so the aggregates are corrected exactly, never counted twice."""

from __future__ import annotations

import logging
from typing import Any

from redis.exceptions import AskError, MovedError

from abproxy.catalog import ExperimentPlan
from abproxy.config import Config
from abproxy.errors import CorruptCounters, StoreUnavailable
from abproxy.logs import ThrottledLog
from abproxy.recording import connection, layout, scripts
from abproxy.recording.record import RequestRecord
from abproxy.stats.histogram import bucket_of

log = logging.getLogger("abproxy.recording.scores")

WARNING_EVERY_S = 60.0
"""A score refused for a broken key is logged at most this often per key (every score hits it)."""

RECORDED, UPDATED = 1, 2


def per_user_mode(plan: ExperimentPlan, metric: str) -> str:
    """The script's per-unit argument: every metric of a ``unit: user`` experiment ('1': sums
    and units); the primary metric of a ``unit: request`` one, for its design effect ('2': sums
    only); else none ('0')."""
    return "1" if plan.per_unit else "2" if metric in plan.per_user_metrics else "0"


class ScoreWriter:
    def __init__(self, redis: Any, config: Config):
        self._redis = redis
        self._config = config
        self._script = scripts.Script(scripts.RECORD_FEEDBACK_LUA)
        self._warnings = ThrottledLog(log, WARNING_EVERY_S)

    async def write(self, plan: ExperimentPlan, feedback_id: str, record: RequestRecord, field: str, metric: str, score: float) -> int:
        """Count ``score`` of ``metric`` for the request (:data:`RECORDED`, or :data:`UPDATED` when
        it replaced the score kept under ``field``). Raises what Redis raises when it is away,
        :class:`StoreUnavailable` when a cluster replica did not confirm it, and
        :class:`CorruptCounters` when a key it adds to is broken."""
        experiment, arm, unit = record.experiment, record.arm, record.unit
        per_user = per_user_mode(plan, metric)
        keys = [
            layout.feedback_key(experiment, feedback_id),
            layout.stats_key(experiment, arm),
            layout.hist_key(experiment, arm),
            layout.unit_key(experiment, arm, unit) if unit else "",
            layout.unit_schemas_key(experiment),
        ]
        args = [
            field,
            repr(score),
            bucket_of(score),
            self._config.feedback_ttl_s,
            "0" if record.forced else "1",
            per_user,
            layout.UNIT_TTL_S if per_user == "1" else self._config.feedback_ttl_s,
            plan.stored(metric),
            layout.agreement_prefix(experiment),
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
            self._warnings.warning(why, "score not recorded: %s; mend or delete that key in Redis", why)
            raise CorruptCounters(
                f"the score was not recorded: {why}; the proxy's operator must mend or delete that key in Redis"
            )
        return int(reply)
