"""The Redis layout: the one place that knows key names, and the Lua that updates them.

Every key of an experiment carries the hash tag ``{experiment}``, so one experiment lives in
one Redis Cluster slot and one script call per batch writes all of it atomically, request
records included (feedback, which arrives with a request id alone, looks in each experiment).

Per arm (``variant@hash``), hash ``a:<arm>`` holds integer counters (``requests``, ``errors``,
``cancelled``, ``units``) and, per metric ``m``, ``m|n`` (count), ``m|s`` (Σx), and about the
metric's shift ``m|k`` (the first batch's mean, fixed once chosen; 0 for data older than shifts)
``m|t`` (Σ(x − k), kept only when k ≠ 0) and ``m|q`` (Σ(x − k)²), so that variances of values
around 1e12 keep their digits; plus the per-unit sums the delta method needs for ``unit: user``
experiments (and, for the design effect, for the primary metric of ``unit: request`` ones),
with Y_u about the same shift: ``m|uk`` (units with the metric), ``m|uyy`` (Σ Y_u²), ``m|unn``
(Σ N_u²), ``m|uyn`` (Σ Y_u·N_u). Hash ``h:<arm>`` holds the histogram, field ``m|<bucket>``.

Between looks: hash ``seq`` holds each comparison's running always-valid state, hash ``verdict``
the declared winner and its generation (:data:`SAVE_STATE_LUA` merges a look into both).
"""

from __future__ import annotations

import functools
import hashlib
import math
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, TypeVar

from redis.exceptions import NoScriptError

from abproxy.errors import StoreUnavailable
from abproxy.recording import connection

from abproxy.stats.summary import Moments

PREFIX = "abproxy"
BATCH_DEDUPE_TTL_S = 3600
"""A batch is replayed only after its reply was lost, at the recorder's next successful round:
seconds later, or once Redis answers again. Kept an hour, not for as long as requests are."""
UNIT_TTL_S = 90 * 24 * 3600
"""Per-user totals of a ``unit: user`` experiment are kept this long after the user's last
request or score: its statistics (the delta method) need a returning user's earlier totals. A
user returning later starts afresh (and counts as a new unit). Those of a ``unit: request``
experiment (its design effect alone) are kept ``feedback_ttl_s`` after the user's last request."""


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


def unit_schemas_key(experiment: str) -> str:
    """The metric lists per-user totals are kept for, by a short id (:data:`_LUA_COMMON`)."""
    return f"{experiment_tag(experiment)}:us"


def feedback_key(experiment: str, request_id: str) -> str:
    return f"{experiment_tag(experiment)}:fb:{request_id}"


def sequential_key(experiment: str) -> str:
    """Running always-valid p-values, kept between looks so they never go back up."""
    return f"{experiment_tag(experiment)}:seq"


def promoted_key(experiment: str) -> str:
    """The variant ``abproxy promote`` made every replica serve to all new traffic."""
    return f"{experiment_tag(experiment)}:promoted"


def verdict_key(experiment: str) -> str:
    """The declared winner (``winner``: its arm), ``generation`` (bumped at each declaration) and
    ``context`` (what it was decided on: primary metric, control, guardrails, α, MDE)."""
    return f"{experiment_tag(experiment)}:verdict"


def runs_key(experiment: str) -> str:
    """MLflow ids: ``experiment_id``, ``summary`` and one run id per arm."""
    return f"{experiment_tag(experiment)}:runs"


def batch_key(experiment: str, batch_id: str) -> str:
    return f"{experiment_tag(experiment)}:batch:{batch_id}"


def request_key(experiment: str, request_id: str) -> str:
    return f"{experiment_tag(experiment)}:req:{request_id}"


def alias_prefix(experiment: str) -> str:
    """Hash buckets ``<prefix><hour>:<level>:<bucket>`` of the upstream's response ids: field and
    bucket from the id's hash (ids.response_hash); value, ids.alias_value, or '' when two requests
    got that response id. An hour's aliases fill 1, 4, 16... buckets (level 0, 1, 2...) as they
    grow in number, so each holds at most about 48 and stays a small listpack
    (``hash-max-listpack-entries``, 128 by default): a bucket key costs ~130 B, an entry ~60 B."""
    return f"{experiment_tag(experiment)}:r:"


def alias_counts_key(experiment: str) -> str:
    """Hash: hour → aliases written in it (which bucket levels a reader must try)."""
    return f"{experiment_tag(experiment)}:rc"


ALIAS_FIRST_BUCKET = 64
ALIAS_MAX_LEVEL = 8


def alias_level(count: int) -> int:
    """The level of an hour's ``count``-th alias: level L holds those past 64·4^(L−1) up to
    64·4^L, in 4^L buckets."""
    level, limit = 0, ALIAS_FIRST_BUCKET
    while count > limit and level < ALIAS_MAX_LEVEL:
        level += 1
        limit *= 4
    return level


def alias_key(experiment: str, hour: int | str, level: int, number: int) -> str:
    return f"{alias_prefix(experiment)}{hour}:{level}:{number % 4**level}"


def response_key(experiment: str, response_id: str) -> str:
    """An alias: the upstream's own response id (``chatcmpl-...``) → the request id."""
    return f"{experiment_tag(experiment)}:resp:{response_id}"


def sequential_field(arm: str, other_arm: str, metric: str) -> str:
    """Field of :func:`sequential_key` for ``arm`` − ``other_arm`` on one metric (the other arm
    is the control, or for head-to-head comparisons another treatment), so an edited arm (a new
    hash) starts afresh."""
    return f"{arm}|{other_arm}|{metric}"


# Flush coordination, shared by every experiment: one hash tag of its own, so that on a Redis
# Cluster the three keys live in one slot like an experiment's do.
FLUSH_TAG = f"{PREFIX}:{{flush}}"
FLUSH_LOCK_KEY = f"{FLUSH_TAG}:lock"
"""Held by the one flush running, with a TTL."""
FLUSH_INTERVAL_KEY = f"{FLUSH_TAG}:interval"
"""Taken by the one replica that flushes in this interval."""
FLUSH_FENCE_KEY = f"{FLUSH_TAG}:fence"
"""A counter: the fencing token of each flush, which is also MLflow's ``step``."""
LEGACY_FLUSH_FENCE_KEY = f"{PREFIX}:flush:fence"
"""Where the fencing token lived before the flush keys shared a hash tag: read once, by the
first flush that finds :data:`FLUSH_FENCE_KEY` absent, so that step numbers go on."""


@contextmanager
def reachable() -> Iterator[None]:
    """Redis failing inside the block becomes :class:`~abproxy.errors.StoreUnavailable`."""
    try:
        yield
    except connection.UNAVAILABLE:
        raise StoreUnavailable("Redis is unavailable; retry later") from None


@functools.lru_cache(maxsize=65_536)  # the request path (signed ids) and the recorder ask for each request
def hash_unit(unit_id: str) -> str:
    """Unit ids are the app's user ids: keep them out of key names."""
    return hashlib.sha256(unit_id.encode()).hexdigest()[:32]


_LUA_COMMON = r"""
-- Numbers go to redis.call as they are: Redis formats them with %.17g, which round-trips.
-- This runs for every unit of every batch: plain arrays and inlined arithmetic, because Redis's
-- Lua 5.1 interpreter makes a function call or a table per metric cost more than the maths.

-- The shift of an arm's metric (sums of squares are kept about it): kept once chosen. A new
-- metric takes `center`, its first batch's mean; one recorded before shifts existed keeps 0,
-- since its sums of squares are about 0.
local function shift_of(stats, metric, center)
  local kept = redis.call('HGET', stats, metric .. '|k')
  if kept then return tonumber(kept) end
  local shift = center
  if redis.call('HEXISTS', stats, metric .. '|n') == 1 then shift = 0 end
  redis.call('HSET', stats, metric .. '|k', shift)
  return shift
end

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

-- A unit's metric names are kept once per experiment, in the hash `schemas`, under the first 12
-- hex digits of their SHA-1: a user's key then holds that id instead of the names (~120 bytes for
-- the built-in metrics), its largest part. The hash only grows when an arm's metrics change.
local schema_ids = {}
local function schema_id(schemas, names)
  local joined = table.concat(names, '\0')
  local id = schema_ids[joined]
  if not id then
    id = string.sub(redis.sha1hex(joined), 1, 12)
    redis.call('HSETNX', schemas, id, joined)
    schema_ids[joined] = id
  end
  return id
end

-- The names a unit's totals were stored with: a schema id, or (keys written before schemas)
-- the names themselves. An id whose names are gone (the hash deleted by hand) reads as no
-- totals, as if the user's key had expired.
local function schema_names(schemas, stored)
  if type(stored) == 'table' then return stored end
  local joined = redis.call('HGET', schemas, stored)
  local names = {}
  if joined then
    for name in string.gmatch(joined, '[^%z]+') do names[#names + 1] = name end
  end
  return names
end

-- Add deltas (dy[i] + dn[i]·offset[i], dn[i]) for metrics names[i] to a unit's running totals:
-- dy[i] is taken about the batch's center of the metric, offset[i] moves it to the shift. Kept as
-- one MessagePack string (schema id, Y_u array, N_u array): one GET and one SET per unit however
-- many metrics. Batches send every unit of an arm with the same names in the same order, so the
-- stored schema usually matches and no lookup is needed.
-- id is schema_id(schemas, names), found once per arm by the caller.
-- Returns true when the unit was new; its key expires ttl after the unit's last change.
local function add_to_unit(sums, ukey, schemas, names, id, dy, dn, offset, ttl)
  local count = #names
  local packed = redis.call('GET', ukey)
  local stored, ys, ns
  local same = true
  if packed then
    local kept
    kept, ys, ns = cmsgpack.unpack(packed)
    if kept ~= id then
      stored = schema_names(schemas, kept)
      if #stored == 0 then ys, ns = {}, {} end
      same = #stored == count
      for i = 1, count do
        if not same then break end
        if stored[i] ~= names[i] then same = false end
      end
    end
  else
    ys, ns = {}, {}
    for i = 1, count do ys[i], ns[i] = 0, 0 end
  end
  if same then
    local uk, uyy, unn, uyn = sums[1], sums[2], sums[3], sums[4]
    for i = 1, count do
      local d_n = dn[i]
      local d_y = dy[i] + d_n * offset[i]
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
      local d_y = dy[i] + dn[i] * offset[i]
      if d_y ~= 0 or dn[i] ~= 0 then
        local j = position[metric]
        if not j then
          j = #stored + 1
          stored[j], ys[j], ns[j], position[metric] = metric, 0, 0, j
        end
        local y0, n0 = ys[j], ns[j]
        ys[j], ns[j] = y0 + d_y, n0 + dn[i]
        move_unit(sums, i, y0, n0, ys[j], ns[j])
      end
    end
    id = schema_id(schemas, stored)
  end
  redis.call('SET', ukey, cmsgpack.pack(id, ys, ns), 'EX', ttl)
  return not packed
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
-- KEYS[1]: this batch's dedupe key. ARGV: payload JSON, dedupe ttl, unit ttl (unit: user), record
-- ttl (also that of the per-user sums of a unit: request experiment).
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
-- payload.aliases: {bucket number, field, alias} of response ids (ids.response_hash), written in
-- payload.hour (unix s / 3600); the level of an hour's n-th alias as store.alias_level says.
local aliases = payload.aliases
if aliases and #aliases > 0 then
  local hour, ttl = tostring(payload.hour), tonumber(record_ttl) + 3600
  local counts = payload.alias_counts
  local seen = redis.call('HINCRBY', counts, hour, #aliases) - #aliases
  if seen == 0 then
    redis.call('EXPIRE', counts, ttl)
    local oldest = payload.hour - math.ceil(ttl / 3600)
    for _, h in ipairs(redis.call('HKEYS', counts)) do
      if tonumber(h) < oldest then redis.call('HDEL', counts, h) end
    end
  end
  local touched = {}
  for i, alias in ipairs(aliases) do
    local n, level, limit = seen + i, 0, 64
    while n > limit and level < 8 do level = level + 1; limit = limit * 4 end
    local key = payload.alias_prefix .. hour .. ':' .. level .. ':' .. (alias[1] % (4 ^ level))
    local field, value = alias[2], alias[3]
    if redis.call('HSETNX', key, field, value) == 0 and redis.call('HGET', key, field) ~= value then
      redis.call('HSET', key, field, '')  -- a response id reused: ambiguous, as for records
    end
    if not touched[key] then touched[key] = true; redis.call('EXPIRE', key, ttl) end
  end
end
for _, arm in ipairs(payload.arms) do
  local stats = arm.stats
  redis.call('HSETNX', arm.arms_key, arm.arm, arm.meta)
  -- arm.metrics: {metric, count, center, Σ(x − center), Σ(x − center)², and of the requests that
  -- are units of their own (per-unit sums only): count, Σ(x − center), Σ(x − center)²}. The shift
  -- is read before this batch's counts land, so that a new metric is told from an old one.
  local offsets = {}
  for _, m in ipairs(arm.metrics) do
    local metric, n, center, dev, sq = m[1], m[2], m[3], m[4], m[5]
    local shift = shift_of(stats, metric, center)
    local o = center - shift
    offsets[metric] = o
    if shift ~= 0 then redis.call('HINCRBYFLOAT', stats, metric .. '|t', dev + n * o) end
    redis.call('HINCRBYFLOAT', stats, metric .. '|q', sq + 2 * o * dev + n * o * o)
    local an = m[6]
    if an > 0 then
      local ad, aq = m[7], m[8]
      redis.call('HINCRBY', stats, metric .. '|uk', an)
      redis.call('HINCRBYFLOAT', stats, metric .. '|uyy', aq + 2 * o * ad + an * o * o)
      redis.call('HINCRBYFLOAT', stats, metric .. '|unn', an)
      redis.call('HINCRBYFLOAT', stats, metric .. '|uyn', ad + an * o)
    end
  end
  -- Raw sums arrive as exact decimal strings, so they are applied as they are.
  for f, v in pairs(arm.sums) do redis.call('HINCRBYFLOAT', stats, f, v) end
  for f, v in pairs(arm.hist) do redis.call('HINCRBY', arm.hist_key, f, v) end
  -- arm.units: {unit key, Y deltas about the centers, N deltas}, each aligned with arm.unit_metrics
  local names = arm.unit_metrics
  local new_units, sums = 0, new_sums(#names)
  if #arm.units > 0 then
    local offset = {}
    for i, metric in ipairs(names) do offset[i] = offsets[metric] or 0 end
    local ttl = arm.count_units and unit_ttl or tonumber(record_ttl)
    local schemas = payload.unit_schemas
    local id = schema_id(schemas, names)
    for _, unit in ipairs(arm.units) do
      if add_to_unit(sums, unit[1], schemas, names, id, unit[2], unit[3], offset, ttl) then new_units = new_units + 1 end
    end
  end
  -- a unit: request experiment keeps per-user sums for its design effect, but counts requests
  if not arm.count_units then new_units = 0 end
  for f, v in pairs(arm.ints) do
    if f == 'units' then v = v + new_units; new_units = 0 end
    redis.call('HINCRBY', stats, f, v)
  end
  if new_units > 0 then redis.call('HINCRBY', stats, 'units', new_units) end
  if #arm.units > 0 then apply_unit_sums(stats, names, sums) end
end
return 1
"""
)

RECORD_FEEDBACK_LUA = (
    _LUA_COMMON
    + r"""
-- KEYS: feedback hash of the request, arm stats hash, arm histogram hash, unit hash or '', the
-- experiment's unit schemas.
-- ARGV: name, score, bucket, ttl, counted ('1' or '0'), per-unit ('0': no; '1': sums and units,
-- for unit: user; '2': sums only, the design effect of a unit: request experiment), unit ttl.
-- Returns 1 when recorded, 2 when it replaced an earlier score for the same name.
local name, score, bucket = ARGV[1], tonumber(ARGV[2]), ARGV[3]
local old = redis.call('HGET', KEYS[1], name)
redis.call('HSET', KEYS[1], name, ARGV[2] .. '|' .. bucket)
redis.call('EXPIRE', KEYS[1], ARGV[4])
if ARGV[5] ~= '1' then return old and 2 or 1 end
local metric = 'feedback.' .. name
local stats, hist = KEYS[2], KEYS[3]
local shift = shift_of(stats, metric, score)
local old_score = 0
if old then
  local sep = string.find(old, '|', 1, true)
  old_score = tonumber(string.sub(old, 1, sep - 1))
  redis.call('HINCRBY', hist, metric .. '|' .. string.sub(old, sep + 1), -1)
else
  redis.call('HINCRBY', stats, metric .. '|n', 1)
end
-- the score and the one it replaces, about the shift
local y1, y0 = score - shift, 0
if old then y0 = old_score - shift end
redis.call('HINCRBYFLOAT', stats, metric .. '|s', score - old_score)
if shift ~= 0 then redis.call('HINCRBYFLOAT', stats, metric .. '|t', y1 - y0) end
redis.call('HINCRBYFLOAT', stats, metric .. '|q', y1 * y1 - y0 * y0)
redis.call('HINCRBY', hist, metric .. '|' .. bucket, 1)
if ARGV[6] ~= '0' then
  local names, sums = {metric}, new_sums(1)
  if KEYS[4] ~= '' then
    local id = schema_id(KEYS[5], names)
    if add_to_unit(sums, KEYS[4], KEYS[5], names, id, {y1 - y0}, {old and 0 or 1}, {0}, tonumber(ARGV[7])) and ARGV[6] == '1' then
      redis.call('HINCRBY', stats, 'units', 1)  -- the unit's key had expired: it starts afresh
    end
  else
    -- A request without a unit id is a unit of its own.
    move_unit(sums, 1, y0, old and 1 or 0, y1, 1)
  end
  apply_unit_sums(stats, names, sums)
end
return old and 2 or 1
"""
)


FIND_ALIAS_LUA = r"""
-- KEYS[1]: an experiment's alias counts (hour -> aliases written). ARGV: the alias prefix, the
-- response id's bucket number and field (ids.response_hash). Returns the aliases found: one
-- bucket per level each hour reached (store.alias_level), read here rather than sent for.
local counts = redis.call('HGETALL', KEYS[1])
local number, field, found = tonumber(ARGV[2]), ARGV[3], {}
for i = 1, #counts, 2 do
  local hour, count = counts[i], tonumber(counts[i + 1])
  local level, limit = 0, 64
  while true do
    local value = redis.call('HGET', ARGV[1] .. hour .. ':' .. level .. ':' .. (number % (4 ^ level)), field)
    if value then found[#found + 1] = value end
    if count <= limit or level >= 8 then break end
    level, limit = level + 1, limit * 4
  end
end
return found
"""


SAVE_STATE_LUA = r"""
-- KEYS[1]: the experiment's `seq` hash, KEYS[2]: its `verdict` hash.
-- ARGV[1]: the winner's generation the look read; ARGV[2]: the winner it declares ('' for none);
-- ARGV[3]: what that winner was decided on (the decision's context); then pairs of field and
-- state ('' when the look adds none) for every field the look reads back.
-- A state is 'p|lower|upper' or 'p|lower|upper|lift lower|lift upper'. Merging keeps the smaller
-- p and the intersection of the intervals (sequential.RunningState.merge): any order of looks
-- gives the same state. A winner is declared only against the generation the look read
-- (analysis/state.py). Returns {generation, winner, context, the state of each field or false}.
local function parse(text)
  if not text then return nil end
  local parts, count = {}, 0
  for part in string.gmatch(text, '[^|]+') do
    local number = tonumber(part)
    if number == nil or number ~= number or number == math.huge or number == -math.huge then return nil end
    count = count + 1
    parts[count] = number
  end
  if count ~= 3 and count ~= 5 then return nil end
  return parts
end
local function merge(a, b)
  if not a then return b end
  if not b then return a end
  local merged = {math.min(a[1], b[1]), math.max(a[2], b[2]), math.min(a[3], b[3])}
  if a[4] and b[4] then
    merged[4], merged[5] = math.max(a[4], b[4]), math.min(a[5], b[5])
  elseif a[4] or b[4] then
    local lift = a[4] and a or b
    merged[4], merged[5] = lift[4], lift[5]
  end
  return merged
end
local reply = {}
for i = 4, #ARGV, 2 do
  local field = ARGV[i]
  local kept = redis.call('HGET', KEYS[1], field)
  local merged = merge(parse(kept or nil), parse(ARGV[i + 1] ~= '' and ARGV[i + 1] or nil))
  if merged then
    local shown = {}
    for j = 1, #merged do shown[j] = string.format('%.17g', merged[j]) end
    shown = table.concat(shown, '|')
    if shown ~= kept then redis.call('HSET', KEYS[1], field, shown) end
    reply[#reply + 1] = shown
  else
    reply[#reply + 1] = false
  end
end
local generation = tonumber(redis.call('HGET', KEYS[2], 'generation') or '0') or 0
if ARGV[2] ~= '' and generation == tonumber(ARGV[1]) then
  generation = generation + 1
  redis.call('HSET', KEYS[2], 'winner', ARGV[2], 'generation', generation, 'context', ARGV[3])
end
local kept = redis.call('HMGET', KEYS[2], 'winner', 'context')
return {tostring(generation), kept[1] or '', kept[2] or '', reply}
"""


@dataclass(slots=True)
class MetricCounters:
    """One metric of one arm as read back from Redis."""

    moments: Moments = Moments()
    histogram: dict[str, int] = field(default_factory=dict)
    units: int = 0
    unit_yy: float = 0.0
    """Σ Y_u², with Y_u about ``moments.shift``; likewise the other two."""
    unit_nn: float = 0.0
    unit_yn: float = 0.0
    corrupt: bool = False
    """Some counter of it is not a finite number: nothing may be concluded from it."""


@dataclass(slots=True)
class ArmCounters:
    arm: str
    requests: int = 0
    errors: int = 0
    cancelled: int = 0
    units: int = 0
    metrics: dict[str, MetricCounters] = field(default_factory=dict)
    corrupt: list[str] = field(default_factory=list)
    """Every counter of the arm that is not a finite number (``requests``, ``latency_ms|q``, …)."""


def _finite(value: str) -> float | None:
    try:
        number = float(value)
    except ValueError:
        return None
    return number if math.isfinite(number) else None


def parse_arm(arm: str, stats: dict[str, str], hist: dict[str, str]) -> ArmCounters:
    """The counters of one arm; a counter that is not a finite number (a hand edit, a bug) is
    listed in ``corrupt`` and counts as 0, and its metric is marked corrupt."""
    corrupt: list[str] = []

    def count(name: str) -> int:
        value = _finite(stats.get(name, "0"))
        if value is None:
            corrupt.append(name)
            return 0
        return int(value)

    counters = ArmCounters(
        arm=arm, requests=count("requests"), errors=count("errors"), cancelled=count("cancelled"), units=count("units")
    )
    raw: dict[str, dict[str, Any]] = {}
    for key, value in stats.items():
        metric, sep, part = key.rpartition("|")
        if sep:
            parts = raw.setdefault(metric, {})
            number = _finite(value)
            if number is None:
                corrupt.append(key)
                parts["corrupt"] = True
            else:
                parts[part] = number
    for key, value in hist.items():
        metric, sep, bucket = key.partition("|")
        if not sep:
            continue
        number = _finite(value)
        if number is None:
            corrupt.append(f"{metric}|h:{bucket}")
            raw.setdefault(metric, {})["corrupt"] = True
        elif number != 0:
            raw.setdefault(metric, {}).setdefault("hist", {})[bucket] = int(number)
    for metric, parts in raw.items():
        shift = parts.get("k", 0.0)
        total = parts.get("t", 0.0) if shift != 0 else parts.get("s", 0.0)
        counters.metrics[metric] = MetricCounters(
            moments=Moments(parts.get("n", 0.0), total, parts.get("q", 0.0), shift),
            histogram=parts.get("hist", {}),
            units=int(parts.get("uk", 0)),
            unit_yy=parts.get("uyy", 0.0),
            unit_nn=parts.get("unn", 0.0),
            unit_yn=parts.get("uyn", 0.0),
            corrupt=bool(parts.get("corrupt")),
        )
    counters.corrupt = corrupt
    return counters


async def read_arms(redis: Any, experiment: str, arms: list[str]) -> dict[str, ArmCounters]:
    """The counters of the given arms, in one round trip."""
    counters, _, _ = await read_experiment(redis, experiment, arms)
    return counters


async def read_experiment(
    redis: Any, experiment: str, arms: list[str]
) -> tuple[dict[str, ArmCounters], dict[str, str], dict[str, str]]:
    """The counters of the given arms, the running states and the declared winner, in one round trip."""
    pipe = redis.pipeline(transaction=False)
    for arm in arms:
        pipe.hgetall(stats_key(experiment, arm))
        pipe.hgetall(hist_key(experiment, arm))
    pipe.hgetall(sequential_key(experiment))
    pipe.hgetall(verdict_key(experiment))
    replies = await pipe.execute()
    counters = {arm: parse_arm(arm, replies[2 * i], replies[2 * i + 1]) for i, arm in enumerate(arms)}
    return counters, replies[-2], replies[-1]


async def read_promotions(redis: Any, experiments: list[str]) -> dict[str, str]:
    """Experiment → promoted variant, for the experiments that have one: one pipeline per
    cluster slot (all together on one Redis)."""

    async def read(group: list[str]) -> list[str | None]:
        pipe = redis.pipeline(transaction=False)
        for experiment in group:
            pipe.get(promoted_key(experiment))
        return list(await pipe.execute())

    groups = connection.by_slot(redis, ((experiment_tag(e), e) for e in experiments))
    promoted: dict[str, str] = {}
    for group in groups:
        replies = await read(group)
        promoted.update((experiment, variant) for experiment, variant in zip(group, replies, strict=True) if variant)
    return promoted


T = TypeVar("T")


class Script:
    """A Lua script called by its SHA, loaded where it is missing: on first use, after a Redis
    restart emptied the script cache, on a cluster node that never ran it (a replica that took
    over, say)."""

    def __init__(self, source: str):
        self.source = source
        self.sha = hashlib.sha1(source.encode()).hexdigest()

    async def run(self, redis: Any, call: Callable[[str], Awaitable[T]], key: str | None = None) -> T:
        """``call(sha)`` once, or twice if Redis had forgotten the script; ``key`` is one the
        call touches, to find the cluster node that needs the script."""
        try:
            return await call(self.sha)
        except NoScriptError:
            await self.load(redis, key)
            return await call(self.sha)

    async def load(self, redis: Any, key: str | None) -> None:
        if key is not None and connection.clustered(redis):
            await redis.initialize()
            await redis.execute_command("SCRIPT", "LOAD", self.source, target_nodes=redis.get_node_from_key(key))
        else:
            await redis.script_load(self.source)


_SAVE_STATE = Script(SAVE_STATE_LUA)


async def save_state(
    redis: Any,
    experiment: str,
    states: list[tuple[str, str]],
    expected_generation: int,
    winner: str | None,
    context: str = "",
) -> tuple[dict[str, str], dict[str, str]]:
    """Merge a look's running states (field, encoded state or '') and its winner into Redis
    (:data:`SAVE_STATE_LUA`); returns what Redis keeps now, as :func:`read_experiment` reads it:
    the states of the given fields, and the winner's hash."""
    keys = [sequential_key(experiment), verdict_key(experiment)]
    args: list[Any] = [expected_generation, winner or "", context]
    for name, encoded in states:
        args += [name, encoded]
    reply = await _SAVE_STATE.run(redis, lambda sha: redis.evalsha(sha, len(keys), *keys, *args), keys[0])
    generation, kept_winner, kept_context, merged = reply
    kept = {name: value for (name, _), value in zip(states, merged, strict=True) if value}
    return kept, {"generation": str(generation), "winner": kept_winner, "context": kept_context}


async def next_flush_step(redis: Any) -> int:
    """The next fencing token; called under the flush lock. The first flush after an upgrade
    carries the count on from :data:`LEGACY_FLUSH_FENCE_KEY` (each key touched alone: on a
    cluster the two live in different slots, and there the legacy key never held anything)."""
    step = int(await redis.incr(FLUSH_FENCE_KEY))
    if step == 1:
        legacy = await redis.get(LEGACY_FLUSH_FENCE_KEY)
        if legacy:
            step = int(await redis.incrby(FLUSH_FENCE_KEY, int(legacy)))
            await redis.delete(LEGACY_FLUSH_FENCE_KEY)
    return step
