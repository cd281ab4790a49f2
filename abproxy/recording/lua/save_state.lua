-- KEYS[1]: the experiment's `seq` hash, KEYS[2]: its `verdict` hash.
-- ARGV[1]: the winner's generation the look read; ARGV[2]: the winner it declares ('' for none);
-- ARGV[3]: what that winner was decided on (the decision's context); ARGV[4]: the look's
-- sample-ratio state, 'context|p' ('' for none); ARGV[5]: why the winner the look read is revoked
-- ('' when it is not); then pairs of field and state ('' when the look adds none) for every field
-- the look reads back.
-- A state is 'p|lower|upper' or 'p|lower|upper|lift lower|lift upper'. Merging keeps the smaller
-- p and the intersection of the intervals (sequential.RunningState.merge): any order of looks
-- gives the same state. A winner is declared only against the generation the look read
-- (analysis/state.py), and revoked only against it, once. The sample-ratio state keeps the smaller p of looks on the same context (the
-- arms and weights checked); a look on another context replaces it. Returns {generation, winner,
-- context, the state of each field or false, the sample-ratio state or '', why the winner was
-- revoked or ''}.
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
for i = 6, #ARGV, 2 do
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
  redis.call('HDEL', KEYS[2], 'revoked')
elseif ARGV[5] ~= '' and generation == tonumber(ARGV[1]) then
  redis.call('HSETNX', KEYS[2], 'revoked', ARGV[5])
end
local kept = redis.call('HMGET', KEYS[2], 'winner', 'context', 'srm', 'revoked')
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
return {tostring(generation), kept[1] or '', kept[2] or '', reply, srm, kept[4] or ''}
