"""The Redis layout: the one place that knows key names, and the Lua that updates them.

Every key of an experiment carries the hash tag ``{experiment}``, so one experiment lives in
one Redis Cluster slot and one script call per batch writes all of it atomically, request
records included (feedback, which arrives with a request id alone, looks in each experiment).

Per arm (``variant@hash``), hash ``a:<arm>`` holds integer counters (``requests``, ``errors``,
``cancelled``, ``units``) and, per metric ``m``, ``m|n``, ``m|s``, ``m|q`` (count, sum, sum of
squares) plus the per-unit sums the delta method needs for ``unit: user`` experiments:
``m|uk`` (units with the metric), ``m|uyy`` (Σ Y_u²), ``m|unn`` (Σ N_u²), ``m|uyn`` (Σ Y_u·N_u).
Hash ``h:<arm>`` holds the histogram, field ``m|<bucket>``.
"""

from __future__ import annotations

import hashlib
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, TypeVar

from redis.exceptions import NoScriptError, RedisError

from abproxy.errors import StoreUnavailable

from abproxy.stats.summary import Moments

PREFIX = "abproxy"
BATCH_DEDUPE_TTL_S = 7 * 24 * 3600
UNIT_TTL_S = 90 * 24 * 3600
"""Per-unit totals are kept this long after a unit is first seen; a unit returning later starts
afresh (and counts as a new unit)."""


def experiment_tag(experiment: str) -> str:
    return f"{PREFIX}:{{{experiment}}}"


def arms_key(experiment: str) -> str:
    return f"{experiment_tag(experiment)}:arms"


def stats_key(experiment: str, arm: str) -> str:
    return f"{experiment_tag(experiment)}:a:{arm}"


def hist_key(experiment: str, arm: str) -> str:
    return f"{experiment_tag(experiment)}:h:{arm}"


def unit_key(experiment: str, arm: str, unit_hash: str) -> str:
    return f"{experiment_tag(experiment)}:u:{arm}:{unit_hash}"


def feedback_key(experiment: str, request_id: str) -> str:
    return f"{experiment_tag(experiment)}:fb:{request_id}"


def sequential_key(experiment: str) -> str:
    """Running always-valid p-values, kept between looks so they never go back up."""
    return f"{experiment_tag(experiment)}:seq"


def promoted_key(experiment: str) -> str:
    """The variant ``abproxy promote`` made every replica serve to all new traffic."""
    return f"{experiment_tag(experiment)}:promoted"


def runs_key(experiment: str) -> str:
    """MLflow ids: ``experiment_id``, ``summary`` and one run id per arm."""
    return f"{experiment_tag(experiment)}:runs"


def batch_key(experiment: str, batch_id: str) -> str:
    return f"{experiment_tag(experiment)}:batch:{batch_id}"


def request_key(experiment: str, request_id: str) -> str:
    return f"{experiment_tag(experiment)}:req:{request_id}"


def response_key(experiment: str, response_id: str) -> str:
    """An alias: the upstream's own response id (``chatcmpl-...``) → the request id."""
    return f"{experiment_tag(experiment)}:resp:{response_id}"


def sequential_field(arm: str, control_arm: str, metric: str) -> str:
    """Field of :func:`sequential_key` for one treatment arm against the control arm on one
    metric, so an edited arm (a new hash) starts afresh."""
    return f"{arm}|{control_arm}|{metric}"


# Flush coordination, shared by every experiment.
FLUSH_LOCK_KEY = f"{PREFIX}:flush:lock"
"""Held by the one flush running, with a TTL."""
FLUSH_INTERVAL_KEY = f"{PREFIX}:flush:interval"
"""Taken by the one replica that flushes in this interval."""
FLUSH_FENCE_KEY = f"{PREFIX}:flush:fence"
"""A counter: the fencing token of each flush, which is also MLflow's ``step``."""


@contextmanager
def reachable() -> Iterator[None]:
    """Redis failing inside the block becomes :class:`~abproxy.errors.StoreUnavailable`."""
    try:
        yield
    except (RedisError, OSError):
        raise StoreUnavailable("Redis is unavailable; retry later") from None


def hash_unit(unit_id: str) -> str:
    """Unit ids are the app's user ids: keep them out of key names."""
    return hashlib.sha256(unit_id.encode()).hexdigest()[:32]


_LUA_COMMON = r"""
-- Numbers go to redis.call as they are: Redis formats them with %.17g, which round-trips.
-- This runs for every unit of every batch: plain arrays and inlined arithmetic, because Redis's
-- Lua 5.1 interpreter makes a function call or a table per metric cost more than the maths.

-- The running deltas of an arm's unit sums, one slot per metric of `names`: units with the
-- metric, Σ Y_u², Σ N_u², Σ Y_u·N_u.
local function new_sums(count)
  local uk, uyy, unn, uyn = {}, {}, {}, {}
  for i = 1, count do uk[i], uyy[i], unn[i], uyn[i] = 0, 0, 0, 0 end
  return {uk, uyy, unn, uyn}
end

-- Move slot i of the sums from a unit's old (Y_u, N_u) to its new one.
local function move_unit(sums, i, y0, n0, y1, n1)
  if n0 == 0 then
    if n1 > 0 then sums[1][i] = sums[1][i] + 1 end
  elseif n1 == 0 then
    sums[1][i] = sums[1][i] - 1
  end
  sums[2][i] = sums[2][i] + y1 * y1 - y0 * y0
  sums[3][i] = sums[3][i] + n1 * n1 - n0 * n0
  sums[4][i] = sums[4][i] + y1 * n1 - y0 * n0
end

-- Add deltas (dy[i], dn[i]) for metrics names[i] to a unit's running totals. They are kept as
-- one MessagePack string of three parallel arrays (metric names, Y_u, N_u): one GET and one SET
-- per unit however many metrics. Batches send every unit of an arm with the same names in the
-- same order, so the stored order usually matches and no lookup is needed.
-- Returns true when the unit was new; its key expires ttl after it was first seen.
local function add_to_unit(sums, ukey, names, dy, dn, ttl)
  local count = #names
  local packed = redis.call('GET', ukey)
  local stored, ys, ns
  if packed then
    stored, ys, ns = cmsgpack.unpack(packed)
  else
    stored, ys, ns = names, {}, {}
    for i = 1, count do ys[i], ns[i] = 0, 0 end
  end
  local same = #stored == count
  if same and stored ~= names then
    for i = 1, count do
      if stored[i] ~= names[i] then same = false; break end
    end
  end
  if same then
    local uk, uyy, unn, uyn = sums[1], sums[2], sums[3], sums[4]
    for i = 1, count do
      local d_y, d_n = dy[i], dn[i]
      if d_y ~= 0 or d_n ~= 0 then
        local y0, n0 = ys[i], ns[i]
        local y1, n1 = y0 + d_y, n0 + d_n
        ys[i], ns[i] = y1, n1
        if n0 == 0 then
          if n1 > 0 then uk[i] = uk[i] + 1 end
        elseif n1 == 0 then
          uk[i] = uk[i] - 1
        end
        uyy[i] = uyy[i] + y1 * y1 - y0 * y0
        unn[i] = unn[i] + n1 * n1 - n0 * n0
        uyn[i] = uyn[i] + y1 * n1 - y0 * n0
      end
    end
  else
    local position = {}
    for j, metric in ipairs(stored) do position[metric] = j end
    for i, metric in ipairs(names) do
      if dy[i] ~= 0 or dn[i] ~= 0 then
        local j = position[metric]
        if not j then
          j = #stored + 1
          stored[j], ys[j], ns[j], position[metric] = metric, 0, 0, j
        end
        local y0, n0 = ys[j], ns[j]
        ys[j], ns[j] = y0 + dy[i], n0 + dn[i]
        move_unit(sums, i, y0, n0, ys[j], ns[j])
      end
    end
  end
  if packed then
    redis.call('SET', ukey, cmsgpack.pack(stored, ys, ns), 'KEEPTTL')
    return false
  end
  redis.call('SET', ukey, cmsgpack.pack(stored, ys, ns), 'EX', ttl)
  return true
end

local function apply_unit_sums(stats, names, sums)
  local uk, uyy, unn, uyn = sums[1], sums[2], sums[3], sums[4]
  for i, metric in ipairs(names) do
    if uk[i] ~= 0 then redis.call('HINCRBY', stats, metric .. '|uk', uk[i]) end
    if uyy[i] ~= 0 or unn[i] ~= 0 or uyn[i] ~= 0 then
      redis.call('HINCRBYFLOAT', stats, metric .. '|uyy', uyy[i])
      redis.call('HINCRBYFLOAT', stats, metric .. '|unn', unn[i])
      redis.call('HINCRBYFLOAT', stats, metric .. '|uyn', uyn[i])
    end
  end
end
"""

RECORD_BATCH_LUA = (
    _LUA_COMMON
    + r"""
-- KEYS[1]: this batch's dedupe key. ARGV: payload JSON, dedupe ttl, unit ttl, record ttl.
-- A batch replayed after a lost reply finds its dedupe key and changes nothing.
if not redis.call('SET', KEYS[1], '1', 'NX', 'EX', ARGV[2]) then return 0 end
local payload = cjson.decode(ARGV[1])
local unit_ttl, record_ttl = tonumber(ARGV[3]), ARGV[4]
for _, record in ipairs(payload.records) do
  redis.call('SET', record[1], record[2], 'EX', record_ttl)
  if record[3] ~= '' then
    -- Some servers reuse response ids (Ollama draws them from 1,000): a second request under
    -- the same id makes the alias ambiguous ('') rather than silently pointing elsewhere.
    if not redis.call('SET', record[3], record[4], 'NX', 'EX', record_ttl) then
      if redis.call('GET', record[3]) ~= record[4] then redis.call('SET', record[3], '', 'EX', record_ttl) end
    end
  end
end
for _, arm in ipairs(payload.arms) do
  redis.call('HSETNX', arm.arms_key, arm.arm, arm.meta)
  -- Sums arrive as exact decimal strings, so they are applied as they are.
  for f, v in pairs(arm.sums) do redis.call('HINCRBYFLOAT', arm.stats, f, v) end
  for f, v in pairs(arm.hist) do redis.call('HINCRBY', arm.hist_key, f, v) end
  -- arm.units: {unit key, Y deltas, N deltas}, each aligned with arm.unit_metrics
  local names = arm.unit_metrics
  local new_units, sums = 0, new_sums(#names)
  for _, unit in ipairs(arm.units) do
    if add_to_unit(sums, unit[1], names, unit[2], unit[3], unit_ttl) then new_units = new_units + 1 end
  end
  for f, v in pairs(arm.ints) do
    if f == 'units' then v = v + new_units; new_units = 0 end
    redis.call('HINCRBY', arm.stats, f, v)
  end
  if new_units > 0 then redis.call('HINCRBY', arm.stats, 'units', new_units) end
  if #arm.units > 0 then apply_unit_sums(arm.stats, names, sums) end
end
return 1
"""
)

RECORD_FEEDBACK_LUA = (
    _LUA_COMMON
    + r"""
-- KEYS: feedback hash of the request, arm stats hash, arm histogram hash, unit hash or ''.
-- ARGV: name, score, bucket, ttl, counted ('1' or '0'), per-unit ('1' or '0'), unit ttl.
-- Returns 1 when recorded, 2 when it replaced an earlier score for the same name.
local name, score, bucket = ARGV[1], tonumber(ARGV[2]), ARGV[3]
local old = redis.call('HGET', KEYS[1], name)
redis.call('HSET', KEYS[1], name, ARGV[2] .. '|' .. bucket)
redis.call('EXPIRE', KEYS[1], ARGV[4])
if ARGV[5] ~= '1' then return old and 2 or 1 end
local metric = 'feedback.' .. name
local stats, hist = KEYS[2], KEYS[3]
local old_score = 0
if old then
  local sep = string.find(old, '|', 1, true)
  old_score = tonumber(string.sub(old, 1, sep - 1))
  redis.call('HINCRBY', hist, metric .. '|' .. string.sub(old, sep + 1), -1)
else
  redis.call('HINCRBY', stats, metric .. '|n', 1)
end
redis.call('HINCRBYFLOAT', stats, metric .. '|s', score - old_score)
redis.call('HINCRBYFLOAT', stats, metric .. '|q', score * score - old_score * old_score)
redis.call('HINCRBY', hist, metric .. '|' .. bucket, 1)
if ARGV[6] == '1' then
  local names, sums = {metric}, new_sums(1)
  if KEYS[4] ~= '' then
    if add_to_unit(sums, KEYS[4], names, {score - old_score}, {old and 0 or 1}, tonumber(ARGV[7])) then
      redis.call('HINCRBY', stats, 'units', 1)  -- the unit's key had expired: it starts afresh
    end
  else
    -- A request without a unit id is a unit of its own.
    move_unit(sums, 1, old_score, old and 1 or 0, score, 1)
  end
  apply_unit_sums(stats, names, sums)
end
return old and 2 or 1
"""
)


@dataclass(slots=True)
class MetricCounters:
    """One metric of one arm as read back from Redis."""

    moments: Moments = Moments()
    histogram: dict[str, int] = field(default_factory=dict)
    units: int = 0
    unit_yy: float = 0.0
    unit_nn: float = 0.0
    unit_yn: float = 0.0


@dataclass(slots=True)
class ArmCounters:
    arm: str
    requests: int = 0
    errors: int = 0
    cancelled: int = 0
    units: int = 0
    metrics: dict[str, MetricCounters] = field(default_factory=dict)


def parse_arm(arm: str, stats: dict[str, str], hist: dict[str, str]) -> ArmCounters:
    counters = ArmCounters(
        arm=arm,
        requests=int(stats.get("requests", 0)),
        errors=int(stats.get("errors", 0)),
        cancelled=int(stats.get("cancelled", 0)),
        units=int(stats.get("units", 0)),
    )
    raw: dict[str, dict[str, Any]] = {}
    for key, value in stats.items():
        metric, sep, part = key.rpartition("|")
        if sep:
            raw.setdefault(metric, {})[part] = float(value)
    for key, value in hist.items():
        metric, sep, bucket = key.partition("|")
        if sep and int(value) != 0:
            raw.setdefault(metric, {}).setdefault("hist", {})[bucket] = int(value)
    for metric, parts in raw.items():
        counters.metrics[metric] = MetricCounters(
            moments=Moments(parts.get("n", 0.0), parts.get("s", 0.0), parts.get("q", 0.0)),
            histogram=parts.get("hist", {}),
            units=int(parts.get("uk", 0)),
            unit_yy=parts.get("uyy", 0.0),
            unit_nn=parts.get("unn", 0.0),
            unit_yn=parts.get("uyn", 0.0),
        )
    return counters


async def read_arms(redis: Any, experiment: str, arms: list[str]) -> dict[str, ArmCounters]:
    """The counters of the given arms, in one round trip."""
    counters, _ = await read_experiment(redis, experiment, arms)
    return counters


async def read_experiment(redis: Any, experiment: str, arms: list[str]) -> tuple[dict[str, ArmCounters], dict[str, str]]:
    """The counters of the given arms and the sequential state, in one round trip."""
    pipe = redis.pipeline(transaction=False)
    for arm in arms:
        pipe.hgetall(stats_key(experiment, arm))
        pipe.hgetall(hist_key(experiment, arm))
    pipe.hgetall(sequential_key(experiment))
    replies = await pipe.execute()
    counters = {arm: parse_arm(arm, replies[2 * i], replies[2 * i + 1]) for i, arm in enumerate(arms)}
    return counters, replies[-1]


async def read_promotions(redis: Any, experiments: list[str]) -> dict[str, str]:
    """Experiment → promoted variant, for the experiments that have one."""
    pipe = redis.pipeline(transaction=False)
    for experiment in experiments:
        pipe.get(promoted_key(experiment))
    replies = await pipe.execute()
    return {experiment: variant for experiment, variant in zip(experiments, replies, strict=True) if variant}


T = TypeVar("T")


class Script:
    """A Lua script called by its SHA, loaded on first use and again after a Redis restart
    emptied the script cache."""

    def __init__(self, source: str):
        self.source = source
        self._sha: str | None = None

    async def run(self, redis: Any, call: Callable[[str], Awaitable[T]]) -> T:
        """``call(sha)`` once, or twice if Redis had forgotten the script."""
        for attempt in range(2):
            if self._sha is None:
                self._sha = await redis.script_load(self.source)
            try:
                return await call(self._sha)
            except NoScriptError:
                self._sha = None
                if attempt:
                    raise
        raise AssertionError("unreachable")
