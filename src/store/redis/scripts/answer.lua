-- A device's answer to a challenge in one call: the device still enrolled, the
-- proof spent, the number compared, the challenge resolved from what this script
-- reads, the device's last use recorded. All keys are one user's (one hash slot).
--
-- KEYS[1]  the challenge's hash                  pm:{tu}:ch:<id>
-- KEYS[2]  the user's PENDING ids (zset)         pm:{tu}:pending
-- KEYS[3]  the user's block                      pm:{tu}:block
-- KEYS[4]  the proof's use                       pm:{tu}:proof:<proof use hex>
-- KEYS[5]  the device                            pm:{tu}:dev:<device id>
-- KEYS[6]  the user's device ids (set)           pm:{tu}:devs
-- ARGV[1]  how long the spent proof is kept (ms, at least 1)
-- ARGV[2]  now (ms, the store's clock)
-- ARGV[3]  how long the key outlives its purge time (ms)
-- ARGV[4]  the change channel, pm:ev:<n>
-- ARGV[5]  the challenge id
-- ARGV[6]  the owner as the challenge's JSON spells it: '"tenant":<t>,"user_id":<u>,'
-- ARGV[7]  the typed number as the JSON spells it: '"number":42,'; '' when none
-- ARGV[8]  a PENDING challenge's state in its JSON: '"state":"Pending","deny_reason":null,'
-- ARGV[9]  a PENDING challenge's resolution in its JSON: '"resolved_at":null,"resolved_by":null,'
-- ARGV[10] the state the answer comes to when the number matches ('Approved', ...)
-- ARGV[11] ... its text in place of ARGV[8]
-- ARGV[12] ... its text in place of ARGV[9]
-- ARGV[13..15] the same three when the number does not match
-- ARGV[16] the prefix of the user's device keys, pm:{tu}:dev:
-- ARGV[17] the device's last use as the end of its JSON: '"last_used_at":<ms>}'
--
-- Why text: the challenge's JSON is serde's, whose field order and spelling are
-- fixed, and a quote inside a string value is escaped, so each fragment above
-- occurs once, at its field; `DeviceAnswer`'s fragments are made by serde too
-- (challenges.rs, tested against serde's own output). Redis's cjson does not give
-- serde's JSON back (an empty list becomes an object, numbers are printed as
-- floats), so decoding and encoding here would not do.
--
-- Returns
--   {'device_gone'}   the device is removed: nothing done
--   {'replayed'}      the proof was spent already: nothing else done
--   {'unknown'}       no such challenge of this user (or past its retention)
--   {'final', <n>, <the record's n fields and values>}       not PENDING: unchanged
--   {'answered', <m|o>, <n>, <fields and values>, <the user's device records>...}
--                     resolved by this answer ('m': the number matched)
--   {'fallback', <m|o>}  not decided here (expired by either clock, an approval
--                     while blocked, or a JSON that does not read as expected):
--                     the caller settles it with a read and a compare-and-set
-- In every case but the first three the device's last use is recorded.
-- (expiry_has_come, blocked and commit: challenge_common.lua.)
local now = tonumber(ARGV[2])
local device = redis.call('GET', KEYS[5])
if not device then
  return {'device_gone'}
end
if not redis.call('SET', KEYS[4], '1', 'NX', 'PX', ARGV[1]) then
  return {'replayed'}
end
local h = redis.call('HMGET', KEYS[1], 'v', 'state', 'expires_at', 'purge_at', 'purge_settled', 'json')
local v, state, json = h[1], h[2], h[6]
if not v or not json or now >= tonumber(h[4]) or not string.find(json, ARGV[6], 1, true) then
  return {'unknown'}
end
local touched, n = string.gsub(device, '"last_used_at":[%dnul]+}$', ARGV[17])
if n == 1 then
  redis.call('SET', KEYS[5], touched, 'KEEPTTL')
end
local function record(tag)
  local fields = redis.call('HGETALL', KEYS[1])
  local answer = {tag, tostring(#fields)}
  for _, value in ipairs(fields) do
    answer[#answer + 1] = value
  end
  return answer
end
if state ~= 'Pending' then
  local answer = record('final')
  table.insert(answer, 2, 'o')
  return answer
end
local m = ARGV[7] ~= '' and string.find(json, ARGV[7], 1, true) ~= nil
local base = m and 10 or 13
local which = m and 'm' or 'o'
local new_state = ARGV[base]
local s1, e1 = string.find(json, ARGV[8], 1, true)
local s2, e2 = string.find(json, ARGV[9], 1, true)
if not s1 or not s2 or e1 >= s2 or expiry_has_come(h[3], now)
    or (new_state == 'Approved' and blocked(KEYS[3], now)) then
  return {'fallback', which}
end
local resolved = string.sub(json, 1, s1 - 1) .. ARGV[base + 1] .. string.sub(json, e1 + 1, s2 - 1)
    .. ARGV[base + 2] .. string.sub(json, e2 + 1)
local nv = tonumber(v) + 1
commit(KEYS[1], KEYS[2], ARGV[5], nv, resolved, new_state, h[4], h[5], now, tonumber(ARGV[3]), ARGV[4])
local answer = record('answered')
table.insert(answer, 2, which)
for _, id in ipairs(redis.call('SMEMBERS', KEYS[6])) do
  local other = redis.call('GET', ARGV[16] .. id)
  if other then
    answer[#answer + 1] = other
  end
end
return answer
