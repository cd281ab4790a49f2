-- KEYS[1]: the marker. ARGV: node, run_id, server time (µs), evicted_keys, commands processed,
-- now (s), then what this process remembers: the node's reading (or ''), the count (0 if none),
-- its first_seen.
local marker, field = KEYS[1], 'node:' .. ARGV[1]
local run_id, at, evicted, commands = ARGV[2], tonumber(ARGV[3]), tonumber(ARGV[4]), tonumber(ARGV[5])
local count = tonumber(redis.call('HGET', marker, 'count') or 0)
if count == 0 and tonumber(ARGV[8]) > 0 then
  -- the marker was lost (evicted itself, deleted): put back what this process counted
  count = tonumber(ARGV[8])
  redis.call('HSET', marker, 'count', count, 'first_seen', ARGV[9])
end
local kept = redis.call('HGET', marker, field)
local restored = false
if not kept and ARGV[7] ~= '' then kept, restored = ARGV[7], true end
local added, reading = 0, table.concat({run_id, ARGV[3], ARGV[4], ARGV[5]}, ' ')
if not kept then
  redis.call('HSET', marker, field, reading)  -- the first look at this master: its count so far is not ours
else
  local kept_run, kept_at, kept_evicted, kept_commands = string.match(kept, '^(%S+) (%S+) (%S+) (%S+)$')
  kept_at, kept_evicted, kept_commands = tonumber(kept_at), tonumber(kept_evicted), tonumber(kept_commands)
  if at <= kept_at then
    reading = kept  -- taken before the reading kept: counted already
  elseif kept_run ~= run_id or evicted < kept_evicted or commands < kept_commands then
    added = evicted  -- restarted, or CONFIG RESETSTAT: the count began again at 0
  else
    added = evicted - kept_evicted
  end
  -- Unchanged, it stays as it is: a look costs no write.
  if added > 0 or restored then redis.call('HSET', marker, field, reading) end
end
if added > 0 then
  count = redis.call('HINCRBY', marker, 'count', added)
  redis.call('HSETNX', marker, 'first_seen', ARGV[6])
end
return {count, redis.call('HGET', marker, 'first_seen') or '', added}
