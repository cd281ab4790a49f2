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
