-- Compare-and-set of a challenge by version; announces the change. Every change
-- to a challenge goes through here.
--
-- KEYS[1]  the challenge's hash                  pm:{tu}:ch:<id>
-- KEYS[2]  the user's PENDING ids (zset)         pm:{tu}:pending
-- KEYS[3]  the user's block                      pm:{tu}:block
-- ARGV[1]  the version the caller read
-- ARGV[2]  the new challenge, JSON
-- ARGV[3]  its state ('Pending', 'Approved', ...); leaving 'Pending' drops the id from KEYS[2]
-- ARGV[4]  the change channel, pm:ev:<n>
-- ARGV[5]  the challenge id
-- ARGV[6]  now (ms, the store's clock)
-- ARGV[7]  '1' when this change approves the challenge, else '0'
-- ARGV[8]  how long the key outlives its purge time (ms); the key's TTL is set
--          relative to ARGV[6], as everywhere (the store's clock, not Redis's)
-- A change to APPROVED or FRAUD_REPORTED brings the purge time forward to
-- `purge_settled` (nothing can be reported against the challenge any more, so it
-- need not wait out the fraud window), and the key's expiry with it.
-- Publishes '<id> <new version>' on ARGV[4]: never the challenge (its number), and
-- the watchers read the record before they believe anything (see watch.rs).
-- Returns {new version}; {0} when the record is gone or at another version; {-1}
-- when it would approve while the user is blocked (a fraud report or wrong numbers
-- came first: no approval may land after a block, however close the race); or
-- {-2, <Redis time, ms>} when the challenge is PENDING and its expiry has come by
-- the later of the store's clock and Redis's own (TIME): a replica whose clock is
-- behind cannot answer, or keep alive, a challenge past its expiry. Only the
-- change to EXPIRED itself passes then.
-- (expiry_has_come, blocked and commit: challenge_common.lua.)
local now = tonumber(ARGV[6])
local h = redis.call('HMGET', KEYS[1], 'v', 'state', 'expires_at', 'purge_at', 'purge_settled')
local v = h[1]
if not v or v ~= ARGV[1] then
  return {0}
end
if h[2] == 'Pending' and ARGV[3] ~= 'Expired' then
  local due, redis_now = expiry_has_come(h[3], now)
  if due then
    return {-2, redis_now}
  end
end
if ARGV[7] == '1' and blocked(KEYS[3], now) then
  return {-1}
end
local nv = tonumber(v) + 1
commit(KEYS[1], KEYS[2], ARGV[5], nv, ARGV[2], ARGV[3], h[4], h[5], now, tonumber(ARGV[8]), ARGV[4])
return {nv}
