-- Spends an enrollment (compare-and-set on its record, keeping its TTL) and adds
-- the device, in one step.
--
-- KEYS[1]  the enrollment record                 pm:{tu}:en:<enrollment id>
-- KEYS[2]  the device record                     pm:{tu}:dev:<device id>
-- KEYS[3]  the user's device ids (set)           pm:{tu}:devs
-- ARGV[1]  the enrollment JSON the caller read
-- ARGV[2]  the completed enrollment, JSON
-- ARGV[3]  the device, JSON
-- ARGV[4]  the device id
-- Returns 1 when spent, 0 when the enrollment had changed.
local current = redis.call('GET', KEYS[1])
if (current or '') ~= ARGV[1] then
  return 0
end
redis.call('SET', KEYS[1], ARGV[2], 'KEEPTTL')
redis.call('SET', KEYS[2], ARGV[3])
redis.call('SADD', KEYS[3], ARGV[4])
return 1
