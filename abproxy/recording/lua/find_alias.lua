-- KEYS[1]: an experiment's alias counts (hour -> aliases written). ARGV: the alias prefix, the
-- response id's bucket number and field (ids.response_hash). Returns the aliases found: one
-- bucket per level each hour reached (store.alias_level), read here rather than sent for.
-- A key of another type (a hand edit, which the recorder logs) holds no alias: it is passed over,
-- so the other hours' buckets still answer.
local counts = redis.pcall('HGETALL', KEYS[1])
local number, field, found = tonumber(ARGV[2]), ARGV[3], {}
if counts.err then return found end
for i = 1, #counts, 2 do
  local hour, count = counts[i], tonumber(counts[i + 1]) or 0
  local level, limit = 0, 64
  while true do
    local value = redis.pcall('HGET', ARGV[1] .. hour .. ':' .. level .. ':' .. (number % (4 ^ level)), field)
    if type(value) == 'string' then found[#found + 1] = value end
    if count <= limit or level >= 8 then break end
    level, limit = level + 1, limit * 4
  end
end
return found
