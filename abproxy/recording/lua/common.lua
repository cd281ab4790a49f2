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
-- Returns true when the unit was new; its key expires ttl after the unit's last change. Totals
-- that cannot be read (a key of another type, bytes that are no such MessagePack, as many
-- values as names they are not) count as expired: the unit starts afresh, its key written anew.
local function add_to_unit(sums, ukey, schemas, names, id, dy, dn, offset, ttl)
  local count = #names
  local packed = redis.pcall('GET', ukey)
  local stored, ys, ns, kept
  local same = true
  if type(packed) == 'string' then
    local read
    read, kept, ys, ns = pcall(cmsgpack.unpack, packed)
    local kind = type(kept)
    if not (read and (kind == 'string' or kind == 'table') and type(ys) == 'table' and type(ns) == 'table') then
      packed = false
    end
  else
    packed = false
  end
  if packed then
    if kept ~= id then
      stored = schema_names(schemas, kept)
      if #stored == 0 then ys, ns = {}, {} end
      same = #stored == count
      for i = 1, count do
        if not same then break end
        if stored[i] ~= names[i] then same = false end
      end
    end
    local expected = same and count or #stored
    if #ys ~= expected or #ns ~= expected then packed, same = false, true end
  end
  if not packed then
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

-- What can be written. Redis stops a script at the first command that fails (a key of another
-- type, a counter that is no number: a hand edit, a script, a migration) and keeps what the
-- script wrote before it, so the recording scripts find what they cannot write first and leave
-- it alone, and only then write.

-- nil when `key` is absent or of type `wanted`, else what is wrong with it.
local function wrong_type(key, wanted)
  local kind = redis.call('TYPE', key)['ok']
  if kind == 'none' or kind == wanted then return nil end
  return key .. ' holds a ' .. kind .. ', not a ' .. wanted
end

-- HINCRBY takes a decimal integer, HINCRBYFLOAT a decimal number it can add to without
-- overflowing; false is an absent field (HMGET's nil).
local function is_integer(value)
  return value == false or value == '0' or (#value < 19 and string.find(value, '^%-?[1-9]%d*$') ~= nil)
end

local function is_number(value)
  if value == false then return true end
  if not (string.find(value, '^%-?%d*%.?%d*$') or string.find(value, '^%-?%d*%.?%d*[eE][%-+]?%d+$')) then
    return false
  end
  local number = tonumber(value)
  return number ~= nil and number > -1e300 and number < 1e300
end

-- The metric a counter belongs to: its name before the last '|' (metric names hold none), or
-- nil for an arm-wide counter ('requests').
local function metric_of(field)
  return string.match(field, '^(.*)|[^|]*$')
end

-- HMGET of any number of fields (Lua's unpack takes a few thousand values at most).
local function hmget(key, fields)
  local values = {}
  for first = 1, #fields, 1000 do
    local part = redis.call('HMGET', key, unpack(fields, first, math.min(first + 999, #fields)))
    for i = 1, #part do values[first + i - 1] = part[i] end
  end
  return values
end

-- The counters of `metrics` in an arm's `stats` hash that cannot be added to: integer parts
-- 'n' and 'uk', numbers otherwise. Returns metric -> its first such field.
local INTEGER_PARTS = {n = true, uk = true}
local METRIC_PARTS = {'n', 's', 'k', 't', 'q', 'uk', 'uyy', 'unn', 'uyn'}
local function broken_metrics(stats, metrics)
  local fields = {}
  for _, metric in ipairs(metrics) do
    for _, part in ipairs(METRIC_PARTS) do fields[#fields + 1] = metric .. '|' .. part end
  end
  local values, broken, i = hmget(stats, fields), {}, 0
  for _, metric in ipairs(metrics) do
    for _, part in ipairs(METRIC_PARTS) do
      i = i + 1
      local fits
      if INTEGER_PARTS[part] then fits = is_integer(values[i]) else fits = is_number(values[i]) end
      if not fits and not broken[metric] then broken[metric] = fields[i] end
    end
  end
  return broken
end

-- The first of `fields` of `key` that is no integer, or nil.
local function broken_integer(key, fields)
  local values = hmget(key, fields)
  for i, field in ipairs(fields) do
    if not is_integer(values[i]) then return field end
  end
  return nil
end
