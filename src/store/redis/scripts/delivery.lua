-- Records deliveries' latest states on a challenge, in one call: each in its own
-- hash field `d:<device id>`, which a read lays over the deliveries in `json` (the
-- compare-and-set never writes deliveries: they are never older in a field than
-- in `json`). Bumps the version once and announces it as challenge_cas.lua does. A
-- delivery decides nothing, so no expiry or block applies.
--
-- KEYS[1]  the challenge's hash                  pm:{tu}:ch:<id>
-- ARGV[1]  the change channel, pm:ev:<n>
-- ARGV[2]  the challenge id
-- ARGV[3], ARGV[4], ...  pairs: the field, d:<device id>, and the delivery, JSON
-- Publishes '<id> <new version>' on ARGV[1].
-- Returns the new version, or 0 when the record is gone or already says so.
if redis.call('EXISTS', KEYS[1]) == 0 then
  return 0
end
local changed = false
for i = 3, #ARGV - 1, 2 do
  if redis.call('HGET', KEYS[1], ARGV[i]) ~= ARGV[i + 1] then
    redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1])
    changed = true
  end
end
if not changed then
  return 0
end
local nv = redis.call('HINCRBY', KEYS[1], 'v', 1)
redis.call('PUBLISH', ARGV[1], ARGV[2] .. ' ' .. nv)
return nv
