-- KEYS[1]: this batch's dedupe key. ARGV: payload JSON, dedupe ttl, unit ttl (unit: user), record
-- ttl (also that of the per-user sums of a unit: request experiment).
-- Returns {status, problem, ...}. status 1: written; 0: written before (a batch replayed after a
-- lost reply changes nothing); -1: an earlier attempt was stopped by Redis partway. Each problem
-- is {arm ('' for the experiment), what could not be written, measurements dropped, response-id
-- aliases dropped}: what the checks below found, left alone while everything else is written.
-- The dedupe key holds '0' while the batch is written and '1' once it is: a script stopped
-- partway by something the checks did not foresee leaves '0', and its replay says so (-1)
-- instead of writing twice or skipping without a word.
local done = redis.call('GET', KEYS[1])
if done == '1' then return {0} end
if done == '0' then
  redis.call('SET', KEYS[1], '1', 'KEEPTTL')
  return {-1}
end
local payload = cjson.decode(ARGV[1])
local unit_ttl, record_ttl = tonumber(ARGV[3]), ARGV[4]
local problems = {}

-- 1. What cannot be written: reads only.
local arms_key_wrong
local schemas_wrong = wrong_type(payload.unit_schemas, 'hash')
-- per arm: false when none of it can be written, else metric -> what breaks that metric
local writable = {}
for i, arm in ipairs(payload.arms) do
  arms_key_wrong = arms_key_wrong or wrong_type(arm.arms_key, 'hash')
  local why = wrong_type(arm.stats, 'hash') or wrong_type(arm.hist_key, 'hash')
  if not why and #arm.units > 0 then why = schemas_wrong end
  if not why then
    local field = broken_integer(arm.stats, {'requests', 'errors', 'cancelled', 'units'})
    if field then why = arm.stats .. ' field ' .. field .. ' is not an integer' end
  end
  if why then
    writable[i] = false
    problems[#problems + 1] = {arm.arm, why, arm.ints.requests or 0, 0}
  else
    local names = {}
    for _, m in ipairs(arm.metrics) do names[#names + 1] = m[1] end
    local broken = {}
    for metric, field in pairs(broken_metrics(arm.stats, names)) do
      broken[metric] = arm.stats .. ' field ' .. field .. ' is not a number'
    end
    for metric, why_metric in pairs(broken) do
      problems[#problems + 1] = {arm.arm, why_metric, arm.ints[metric .. '|n'] or 0, 0}
    end
    writable[i] = broken
  end
end
if arms_key_wrong then problems[#problems + 1] = {'', arms_key_wrong, 0, 0} end
local aliases = payload.aliases
local aliases_wrong
if aliases and #aliases > 0 then
  aliases_wrong = wrong_type(payload.alias_counts, 'hash')
  if not aliases_wrong and not is_integer(redis.call('HGET', payload.alias_counts, tostring(payload.hour)) or false) then
    aliases_wrong = payload.alias_counts .. ' field ' .. payload.hour .. ' is not an integer'
  end
  if aliases_wrong then problems[#problems + 1] = {'', aliases_wrong, 0, #aliases} end
end

-- 2. Writing.
redis.call('SET', KEYS[1], '0', 'EX', ARGV[2])
for _, record in ipairs(payload.records) do
  redis.call('SET', record[1], record[2], 'EX', record_ttl)
  if record[3] ~= '' then
    -- Some servers reuse response ids (Ollama draws them from 1,000): a second request under
    -- the same id makes the alias ambiguous ('') rather than silently pointing elsewhere; so
    -- does an alias key of another type, which SET replaces.
    if not redis.call('SET', record[3], record[4], 'NX', 'EX', record_ttl) then
      if redis.pcall('GET', record[3]) ~= record[4] then redis.call('SET', record[3], '', 'EX', record_ttl) end
    end
  end
end
-- payload.aliases: {bucket number, field, alias} of response ids (ids.response_hash), written in
-- payload.hour (unix s / 3600); the level of an hour's n-th alias as store.alias_level says.
if aliases and #aliases > 0 and not aliases_wrong then
  local hour, ttl = tostring(payload.hour), tonumber(record_ttl) + 3600
  local counts = payload.alias_counts
  local seen = redis.call('HINCRBY', counts, hour, #aliases) - #aliases
  if seen == 0 then
    redis.call('EXPIRE', counts, ttl)
    local oldest = payload.hour - math.ceil(ttl / 3600)
    for _, h in ipairs(redis.call('HKEYS', counts)) do
      if tonumber(h) == nil or tonumber(h) < oldest then redis.call('HDEL', counts, h) end
    end
  end
  -- A bucket of another type (a hand edit) refuses its aliases, found as they are written: a
  -- batch touches hundreds of buckets, and looking at each first would double the commands.
  local touched, refused = {}, {}
  for i, alias in ipairs(aliases) do
    local n, level, limit = seen + i, 0, 64
    while n > limit and level < 8 do level = level + 1; limit = limit * 4 end
    local key = payload.alias_prefix .. hour .. ':' .. level .. ':' .. (alias[1] % (4 ^ level))
    if refused[key] then
      refused[key] = refused[key] + 1
    else
      local field, value = alias[2], alias[3]
      local added = redis.pcall('HSETNX', key, field, value)
      if type(added) == 'table' then
        refused[key] = 1
      else
        if added == 0 and redis.call('HGET', key, field) ~= value then
          redis.call('HSET', key, field, '')  -- a response id reused: ambiguous, as for records
        end
        if not touched[key] then touched[key] = true; redis.call('EXPIRE', key, ttl) end
      end
    end
  end
  for key, count in pairs(refused) do problems[#problems + 1] = {'', key .. ' is not a hash', 0, count} end
end
for i, arm in ipairs(payload.arms) do
  local broken = writable[i]
  if broken then
    local stats = arm.stats
    local whole = next(broken) == nil  -- nothing of the arm is broken: no counter needs looking at
    -- The histogram first, each count on its own (reading its hundreds of buckets beforehand
    -- would cost the script a tenth of its time): a bucket that is no integer marks its metric
    -- broken, and the rest of that metric is left alone.
    for f, v in pairs(arm.hist) do
      if whole or not broken[metric_of(f)] then
        local added = redis.pcall('HINCRBY', arm.hist_key, f, v)
        if type(added) == 'table' then
          local metric = metric_of(f)
          broken[metric], whole = arm.hist_key .. ' field ' .. f .. ' is not an integer', false
          problems[#problems + 1] = {arm.arm, broken[metric], arm.ints[metric .. '|n'] or 0, 0}
        end
      end
    end
    if not arms_key_wrong then redis.call('HSETNX', arm.arms_key, arm.arm, arm.meta) end
    -- arm.metrics: {metric, count, center, Σ(x − center), Σ(x − center)², and of the requests
    -- that are units of their own (per-unit sums only): count, Σ(x − center), Σ(x − center)²}.
    -- The shift is read before this batch's counts land, so that a new metric is told from an
    -- old one.
    local offsets = {}
    for _, m in ipairs(arm.metrics) do
      local metric, n, center, dev, sq = m[1], m[2], m[3], m[4], m[5]
      if not broken[metric] then
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
    end
    -- Raw sums arrive as exact decimal strings, so they are applied as they are.
    for f, v in pairs(arm.sums) do
      if whole or not broken[metric_of(f)] then redis.call('HINCRBYFLOAT', stats, f, v) end
    end
    -- arm.units: {unit key, Y deltas about the centers, N deltas}, each aligned with arm.unit_metrics
    local names = arm.unit_metrics
    local new_units, sums = 0, new_sums(#names)
    if #arm.units > 0 then
      local offset = {}
      for j, metric in ipairs(names) do
        offset[j] = offsets[metric] or 0
        if broken[metric] then
          for _, unit in ipairs(arm.units) do unit[2][j], unit[3][j] = 0, 0 end
        end
      end
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
      if whole or not broken[metric_of(f) or ''] then
        if f == 'units' then v = v + new_units; new_units = 0 end
        redis.call('HINCRBY', stats, f, v)
      end
    end
    if new_units > 0 then redis.call('HINCRBY', stats, 'units', new_units) end
    if #arm.units > 0 then apply_unit_sums(stats, names, sums) end
  end
end
redis.call('SET', KEYS[1], '1', 'EX', ARGV[2])
local reply = {1}
for _, problem in ipairs(problems) do reply[#reply + 1] = problem end
return reply
