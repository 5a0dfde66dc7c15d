-- Reserves one VerifyTotp attempt before its code is compared. All keys are one
-- user's (one hash slot). In order: the lock until UnblockUser, the timed lock,
-- `max_consecutive` in a row (which sets the lock until UnblockUser), the window's
-- limit (which sets the timed lock), else the attempt is recorded and counted in a
-- row: it is a wrong code unless `totp_succeeded.lua` takes it back.
--
-- KEYS[1]  attempts in the window (zset)         pm:{tu}:totpatt
-- KEYS[2]  locked until (ms)                     pm:{tu}:totplock
-- KEYS[3]  attempts in a row (integer)           pm:{tu}:totprow
-- KEYS[4]  locked until UnblockUser (since, ms)  pm:{tu}:totphard
-- ARGV[1]  now (ms, the store's clock)
-- ARGV[2]  the window (ms)
-- ARGV[3]  attempts allowed in the window
-- ARGV[4]  how long the window's limit locks (ms)
-- ARGV[5]  attempts allowed in a row (max_consecutive)
-- ARGV[6]  a member unique to this attempt, '<now>-<nonce>'
-- ARGV[7]  the TTL margin (ms) on KEYS[1] and KEYS[2]
-- Returns 0 when allowed, -1 when locked until UnblockUser, else the time (ms)
-- the lock ends.
local now = tonumber(ARGV[1])
if redis.call('EXISTS', KEYS[4]) == 1 then
  return -1
end
local locked = tonumber(redis.call('GET', KEYS[2]) or '0')
if now < locked then
  return locked
end
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - tonumber(ARGV[2]))
if tonumber(redis.call('GET', KEYS[3]) or '0') >= tonumber(ARGV[5]) then
  redis.call('SET', KEYS[4], ARGV[1])
  return -1
end
if redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[3]) then
  local block_for = tonumber(ARGV[4])
  local until_ms = now + block_for
  redis.call('SET', KEYS[2], string.format('%d', until_ms), 'PX', block_for + tonumber(ARGV[7]))
  return until_ms
end
redis.call('ZADD', KEYS[1], now, ARGV[6])
redis.call('PEXPIRE', KEYS[1], tonumber(ARGV[2]) + tonumber(ARGV[7]))
redis.call('INCR', KEYS[3])
return 0
