-- Spends an enrollment (compare-and-set on its record, keeping its TTL) and adds
-- the device, in one step, unless the user holds `max_devices` already or the
-- device's public key is another's. Device ids whose record is gone leave the
-- user's set first, so they do not count. All keys are one user's (one hash slot);
-- the user's devices are read as ARGV[8] .. <id>.
--
-- KEYS[1]  the enrollment record                 pm:{tu}:en:<enrollment id>
-- KEYS[2]  the device record                     pm:{tu}:dev:<device id>
-- KEYS[3]  the user's device ids (set)           pm:{tu}:devs
-- KEYS[4]  the user's open enrollments (zset)    pm:{tu}:ens
-- ARGV[1]  the enrollment JSON the caller read
-- ARGV[2]  the completed enrollment, JSON
-- ARGV[3]  the device, JSON
-- ARGV[4]  the device id
-- ARGV[5]  the enrollment id
-- ARGV[6]  max devices per user
-- ARGV[7]  '1' when the caller could not claim the device's public key, else '0'
-- ARGV[8]  the prefix of the user's device keys, pm:{tu}:dev:
-- Returns 'completed', 'changed' (the enrollment is no longer what the caller
-- read), 'too_many_devices' or 'key_in_use'. Only 'completed' spends the
-- enrollment or adds a device.
local current = redis.call('GET', KEYS[1])
if (current or '') ~= ARGV[1] then
  return 'changed'
end
for _, id in ipairs(redis.call('SMEMBERS', KEYS[3])) do
  if redis.call('EXISTS', ARGV[8] .. id) == 0 then
    redis.call('SREM', KEYS[3], id)
  end
end
if redis.call('SCARD', KEYS[3]) >= tonumber(ARGV[6]) then
  return 'too_many_devices'
end
if ARGV[7] == '1' then
  return 'key_in_use'
end
redis.call('SET', KEYS[1], ARGV[2], 'KEEPTTL')
redis.call('SET', KEYS[2], ARGV[3])
redis.call('SADD', KEYS[3], ARGV[4])
redis.call('ZREM', KEYS[4], ARGV[5])
return 'completed'
