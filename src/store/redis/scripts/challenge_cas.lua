-- Compare-and-set of a challenge by version; publishes the new state. Every
-- change to a challenge goes through here.
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
-- Publishes '<id> <new version> <JSON>' on ARGV[4].
-- Returns the new version, 0 when the record is gone or at another version, or -1
-- when it would approve while the user is blocked (a fraud report or wrong numbers
-- came first: no approval may land after a block, however close the race).
local v = redis.call('HGET', KEYS[1], 'v')
if not v or v ~= ARGV[1] then
  return 0
end
if ARGV[7] == '1' then
  local block = redis.call('GET', KEYS[3])
  if block then
    local b = cjson.decode(block)
    if b['until'] == cjson.null or tonumber(ARGV[6]) < tonumber(b['until']) then
      return -1
    end
  end
end
local nv = tonumber(v) + 1
redis.call('HSET', KEYS[1], 'json', ARGV[2], 'v', nv, 'state', ARGV[3])
if ARGV[3] ~= 'Pending' then
  redis.call('ZREM', KEYS[2], ARGV[5])
end
redis.call('PUBLISH', ARGV[4], ARGV[5] .. ' ' .. nv .. ' ' .. ARGV[2])
return nv
