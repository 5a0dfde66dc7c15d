-- Compare-and-set of a string by value; keeps the key's TTL.
--
-- KEYS[1]  the string: a device record           pm:{tu}:dev:<id>
--          or a user's block                     pm:{tu}:block
-- ARGV[1]  the value the caller read ('' expects no key)
-- ARGV[2]  the new value
-- Returns 1 when set, 0 when the value had changed.
local current = redis.call('GET', KEYS[1])
if (current or '') ~= ARGV[1] then
  return 0
end
redis.call('SET', KEYS[1], ARGV[2], 'KEEPTTL')
return 1
