-- Records one delivery's latest state on a challenge, in one call: its own hash
-- field `d:<device id>`, which a read lays over the deliveries in `json` (the
-- compare-and-set never writes deliveries: they are never older in a field than
-- in `json`). Bumps the version and announces it as challenge_cas.lua does. A
-- delivery decides nothing, so no expiry or block applies.
--
-- KEYS[1]  the challenge's hash                  pm:{tu}:ch:<id>
-- ARGV[1]  the field, d:<device id>
-- ARGV[2]  the delivery, JSON
-- ARGV[3]  the change channel, pm:ev:<n>
-- ARGV[4]  the challenge id
-- Publishes '<id> <new version>' on ARGV[3].
-- Returns the new version, or 0 when the record is gone or already says so.
if redis.call('EXISTS', KEYS[1]) == 0 then
  return 0
end
if redis.call('HGET', KEYS[1], ARGV[1]) == ARGV[2] then
  return 0
end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
local nv = redis.call('HINCRBY', KEYS[1], 'v', 1)
redis.call('PUBLISH', ARGV[3], ARGV[4] .. ' ' .. nv)
return nv
