-- KEYS: feedback hash of the request, arm stats hash, arm histogram hash, unit hash or '', the
-- experiment's unit schemas.
-- ARGV: name (the field of the feedback hash), score, bucket, ttl, counted ('1' or '0'), per-unit
-- ('0': no; '1': sums and units, for unit: user; '2': sums only, the design effect of a unit:
-- request experiment), unit ttl, the metric counted ('feedback.<name>', 'judge.<name>@<version>'),
-- the prefix of the experiment's agreement tables (layout.agreement_prefix).
-- Returns 1 when recorded, 2 when it replaced an earlier score for the same name, or {0, what
-- cannot be written} when nothing was written (a key of another type, a counter that is no
-- number: see common.lua).
local name, score, bucket = ARGV[1], tonumber(ARGV[2]), ARGV[3]
local metric = ARGV[8]
local stats, hist = KEYS[2], KEYS[3]
local why = wrong_type(KEYS[1], 'hash')
local old, old_score, old_bucket
if not why then
  old = redis.call('HGET', KEYS[1], name)
  if old then
    old_score, old_bucket = string.match(old, '^([^|]+)|([^|]+)$')
    old_score = tonumber(old_score)
    if not old_score then why = KEYS[1] .. ' field ' .. name .. ' is not a score' end
  end
end
if not why and ARGV[5] == '1' then
  why = wrong_type(stats, 'hash') or wrong_type(hist, 'hash')
  if not why then
    local field = broken_metrics(stats, {metric})[metric]
    if field then why = stats .. ' field ' .. field .. ' is not a number' end
  end
  if not why then
    local buckets = {metric .. '|' .. bucket}
    if old then buckets[2] = metric .. '|' .. old_bucket end
    local field = broken_integer(hist, buckets)
    if field then why = hist .. ' field ' .. field .. ' is not an integer' end
  end
  if not why and ARGV[6] == '1' and broken_integer(stats, {'units'}) then why = stats .. ' field units is not an integer' end
  if not why and ARGV[6] ~= '0' and KEYS[4] ~= '' then why = wrong_type(KEYS[5], 'hash') end
end
if why then return {0, why} end

-- Agreement between judges and users: per (judge, feedback name), how many requests got each
-- pair of scores. A judge's field carries its version ('@'); a user's feedback name cannot.
if ARGV[5] == '1' then
  local is_judge = string.find(name, '@', 1, true) ~= nil
  local fields = redis.call('HGETALL', KEYS[1])
  local new_value = ARGV[2]
  local old_value = old and string.match(old, '^([^|]+)|') or nil
  for i = 1, #fields, 2 do
    local other = fields[i]
    if other ~= name and (string.find(other, '@', 1, true) ~= nil) ~= is_judge then
      local other_value = string.match(fields[i + 1], '^([^|]+)|')
      if other_value then
        local table_key, before, after
        if is_judge then
          table_key = ARGV[9] .. name .. '|' .. other
          before, after = old_value and (old_value .. '|' .. other_value), new_value .. '|' .. other_value
        else
          table_key = ARGV[9] .. other .. '|' .. name
          before, after = old_value and (other_value .. '|' .. old_value), other_value .. '|' .. new_value
        end
        if before ~= after then
          if before and redis.call('HINCRBY', table_key, before, -1) <= 0 then redis.call('HDEL', table_key, before) end
          redis.call('HINCRBY', table_key, after, 1)
        end
      end
    end
  end
end

redis.call('HSET', KEYS[1], name, ARGV[2] .. '|' .. bucket)
redis.call('EXPIRE', KEYS[1], ARGV[4])
if ARGV[5] ~= '1' then return old and 2 or 1 end
local shift = shift_of(stats, metric, score)
if old then
  redis.call('HINCRBY', hist, metric .. '|' .. old_bucket, -1)
else
  old_score = 0
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
