-- KEYS[1]: the experiment's `seq` hash, KEYS[2]: its `verdict` hash.
-- ARGV[1]: the winner's generation the look read; ARGV[2]: the winner it declares ('' for none);
-- ARGV[3]: what that winner was decided on (the decision's context); ARGV[4]: the look's
-- sample-ratio state, 'context|p' ('' for none); ARGV[5]: why the winner the look read is revoked
-- ('' when it is not); ARGV[6]: the arms' counters the declaring look read ('' for none), kept
-- beside the winner so that later looks can tell what came after the declaration; then pairs of field and state ('' when the look adds none) for every field
-- the look reads back.
-- A state is 'p|lower|upper' or 'p|lower|upper|lift lower|lift upper', then '|restarts' once the
-- sequence started again. Merging keeps the smaller p and the intersection of the intervals
-- (sequential.RunningState.merge), or, when the intersection is empty (the effect moved), the
-- look's own state as a new sequence; a later sequence replaces an earlier one. A winner is declared only against the generation the look read
-- (analysis/state.py), and revoked only against it, once. The sample-ratio state keeps the smaller p of looks on the same context (the
-- arms and weights checked); a look on another context replaces it. Returns {generation, winner,
-- context, the state of each field or false, the sample-ratio state or '', why the winner was
-- revoked or '', the counters read when the winner was declared or ''}.
local function parse(text)
  if not text then return nil end
  local parts, count = {}, 0
  for part in string.gmatch(text, '[^|]+') do
    local number = tonumber(part)
    if number == nil or number ~= number or number == math.huge or number == -math.huge then return nil end
    count = count + 1
    parts[count] = number
  end
  local restarts = 0
  if count == 4 or count == 6 then
    restarts = parts[count]
    if restarts < 0 or restarts ~= math.floor(restarts) then return nil end
    parts[count] = nil
    count = count - 1
  end
  if count ~= 3 and count ~= 5 then return nil end
  return {numbers = parts, restarts = restarts}
end
local function merge(a, b)
  if not a then return b end
  if not b then return a end
  if a.restarts ~= b.restarts then
    if a.restarts > b.restarts then return a end
    return b
  end
  local x, y = a.numbers, b.numbers
  local merged = {math.min(x[1], y[1]), math.max(x[2], y[2]), math.min(x[3], y[3])}
  if merged[2] > merged[3] then
    -- the looks contradict each other: the effect moved, the newer look starts the sequence again
    return {numbers = y, restarts = a.restarts + 1}
  end
  if x[4] and y[4] then
    merged[4], merged[5] = math.max(x[4], y[4]), math.min(x[5], y[5])
  elseif x[4] or y[4] then
    local lift = x[4] and x or y
    merged[4], merged[5] = lift[4], lift[5]
  end
  return {numbers = merged, restarts = a.restarts}
end
local reply = {}
for i = 7, #ARGV, 2 do
  local field = ARGV[i]
  local kept = redis.call('HGET', KEYS[1], field)
  local merged = merge(parse(kept or nil), parse(ARGV[i + 1] ~= '' and ARGV[i + 1] or nil))
  if merged then
    local shown = {}
    for j = 1, #merged.numbers do shown[j] = string.format('%.17g', merged.numbers[j]) end
    if merged.restarts > 0 then shown[#shown + 1] = string.format('%d', merged.restarts) end
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
  redis.call('HDEL', KEYS[2], 'revoked', 'since')
  if ARGV[6] ~= '' then redis.call('HSET', KEYS[2], 'since', ARGV[6]) end
elseif ARGV[5] ~= '' and generation == tonumber(ARGV[1]) then
  redis.call('HSETNX', KEYS[2], 'revoked', ARGV[5])
end
local kept = redis.call('HMGET', KEYS[2], 'winner', 'context', 'srm', 'revoked', 'since')
local srm = kept[3] or ''
local srm_context, srm_p = string.match(ARGV[4], '^([^|]+)|(.+)$')
srm_p = tonumber(srm_p)
if srm_context and srm_p and srm_p == srm_p and srm_p >= 0 and srm_p <= 1 then
  local kept_context, kept_p = string.match(srm, '^([^|]+)|(.+)$')
  kept_p = tonumber(kept_p)
  if kept_context == srm_context and kept_p and kept_p < srm_p then srm_p = kept_p end
  local shown = srm_context .. '|' .. string.format('%.17g', srm_p)
  if shown ~= srm then redis.call('HSET', KEYS[2], 'srm', shown) end
  srm = shown
end
return {tostring(generation), kept[1] or '', kept[2] or '', reply, srm, kept[4] or '', kept[5] or ''}
