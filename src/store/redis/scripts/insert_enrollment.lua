-- Inserts an enrollment unless its user has `max_open` open ones (neither
-- completed nor expired). The user's index of open enrollments is pruned first:
-- ids whose expiry has come, whose record is gone or completed, leave it. All keys
-- are one user's (one hash slot); other enrollments are read as ARGV[7] .. <id>.
--
-- KEYS[1]  the enrollment record                 pm:{tu}:en:<enrollment id>
-- KEYS[2]  the user's open enrollments (zset)    pm:{tu}:ens
-- ARGV[1]  the enrollment, JSON
-- ARGV[2]  the enrollment id
-- ARGV[3]  now (ms, the store's clock)
-- ARGV[4]  its expires_at (ms)
-- ARGV[5]  the record's TTL (ms)
-- ARGV[6]  max open enrollments per user
-- ARGV[7]  the prefix of the user's enrollment keys, pm:{tu}:en:
-- ARGV[8]  the TTL margin (ms) on KEYS[2] past its latest expiry
-- Returns 1 when inserted, 0 when the user has too many open.
local now = tonumber(ARGV[3])
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now)
for _, id in ipairs(redis.call('ZRANGE', KEYS[2], 0, -1)) do
  local record = redis.call('GET', ARGV[7] .. id)
  if not record or cjson.decode(record)['completed'] == true then
    redis.call('ZREM', KEYS[2], id)
  end
end
if redis.call('ZCARD', KEYS[2]) >= tonumber(ARGV[6]) then
  return 0
end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[5])
redis.call('ZADD', KEYS[2], ARGV[4], ARGV[2])
local latest = redis.call('ZRANGE', KEYS[2], -1, -1, 'WITHSCORES')[2]
redis.call('PEXPIRE', KEYS[2], math.max(1, tonumber(latest) - now) + tonumber(ARGV[8]))
return 1
