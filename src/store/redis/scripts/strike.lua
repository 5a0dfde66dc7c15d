-- Counts a strike in a sliding window; at the limit-th it forgets the strikes.
--
-- KEYS[1]  the strikes (zset)                    pm:{tu}:wrong
-- ARGV[1]  now (ms, the store's clock)
-- ARGV[2]  the window (ms), also the key's TTL
-- ARGV[3]  the limit
-- ARGV[4]  a member unique to this strike
-- Returns 1 when this strike is the limit-th in the window, else 0.
local now = tonumber(ARGV[1])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - tonumber(ARGV[2]))
redis.call('ZADD', KEYS[1], now, ARGV[4])
redis.call('PEXPIRE', KEYS[1], ARGV[2])
if redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[3]) then
  redis.call('DEL', KEYS[1])
  return 1
end
return 0
