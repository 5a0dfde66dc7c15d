-- Creates a challenge: the devices its pushes were chosen from, idempotency key,
-- block, pending and window limits, insert.
-- All keys are one user's (one hash slot); other challenges of the user are read
-- as ARGV[10] .. <id>.
--
-- KEYS[1]  the challenge's hash                  pm:{tu}:ch:<id>
-- KEYS[2]  the user's PENDING ids (zset)         pm:{tu}:pending
-- KEYS[3]  the user's ids in the rate window     pm:{tu}:created
-- KEYS[4]  the idempotency key                   pm:{tu}:req:<request_id>
-- KEYS[5]  the user's block                      pm:{tu}:block
-- ARGV[1]  the challenge, JSON
-- ARGV[2]  the challenge id
-- ARGV[3]  now (ms, the store's clock)
-- ARGV[4]  expires_at (ms)
-- ARGV[5]  TTL of the record and the pending set (ms)
-- ARGV[6]  max PENDING challenges per user
-- ARGV[7]  max challenges per window
-- ARGV[8]  the window (ms)
-- ARGV[9]  '1' when the challenge has a request_id (KEYS[4] applies), else '0'
-- ARGV[10] the prefix of the user's challenge keys, pm:{tu}:ch:
-- ARGV[11] purge_at (ms): readable until then
-- ARGV[12] the user's tag, for the index (KEYS[7])
-- ARGV[13] purge_at once APPROVED or FRAUD_REPORTED (ms; see challenge_cas.lua)
-- ARGV[14] the fingerprint of the user's devices the pushes were chosen from
--          (user_devices.lua), '' to skip the check, or '*' to choose the
--          pushes here (below)
-- ARGV[15] the prefix of the user's device keys, pm:{tu}:dev:
-- KEYS[6]  the user's device ids (set)           pm:{tu}:devs
-- KEYS[7]  optional, on a single Redis only: the challenge's index pm:cidx:<id>,
--          set to ARGV[12] (the user's tag) with the record, so creating is one
--          call (on a cluster it is another slot: the caller sets it first)
--
-- With ARGV[14] = '*' the pushes are chosen here, from the user's devices as
-- they stand (the replica did not remember them: one call instead of a read and
-- a create). Then ARGV[1] is the challenge's JSON up to and including
-- '"deliveries":[' and:
-- ARGV[16] the rest of it, from the ']' that closes the deliveries
-- ARGV[17], ARGV[18], ARGV[19]  how many more pushes the APNs, FCM and Web Push
--          queues take now (PushRoom)
-- ARGV[20], ARGV[21]  the tenant and the user id: a record that is not theirs
--          is passed over, as the replica's read does
--
-- Returns {'created'} ({'created', <deliveries JSON>, <fingerprint>, <device
-- records>...} when chosen here), {'existing', <id>}, {'blocked', <UserBlock
-- JSON>}, {'too_many_pending'}, {'rate_limited'} or, when the user's devices are
-- not the ones the pushes were chosen from (or, chosen here, none can answer or
-- the pushes do not fit), {'devices_changed', <fingerprint>, <device
-- records>...} and nothing is written.
local now = tonumber(ARGV[3])
local json = ARGV[1]
local chosen
-- The devices first: a create chosen from devices that are no longer the user's
-- must end as one chosen from a fresh read would (the broker checks that some
-- device can answer before anything else), not on a limit or a block it reached
-- with the old list.
if ARGV[14] == '*' then
  local records, seen = user_devices(KEYS[6], ARGV[15])
  local deliveries = choose_pushes(records, ARGV[20], ARGV[21],
    {Apns = tonumber(ARGV[17]), Fcm = tonumber(ARGV[18]), WebPush = tonumber(ARGV[19])})
  table.insert(records, 1, seen)
  if not deliveries then
    table.insert(records, 1, 'devices_changed')
    return records
  end
  json = ARGV[1] .. deliveries .. ARGV[16]
  table.insert(records, 1, '[' .. deliveries .. ']')
  table.insert(records, 1, 'created')
  chosen = records
elseif ARGV[14] ~= '' then
  local records, seen = user_devices(KEYS[6], ARGV[15])
  if seen ~= ARGV[14] then
    table.insert(records, 1, seen)
    table.insert(records, 1, 'devices_changed')
    return records
  end
end
if ARGV[9] == '1' then
  local existing = redis.call('GET', KEYS[4])
  if existing then
    local h = redis.call('HMGET', ARGV[10] .. existing, 'json', 'expires_at')
    if h[1] and tonumber(h[2]) > now then
      return {'existing', existing}
    end
  end
end
local block = redis.call('GET', KEYS[5])
if block then
  local b = cjson.decode(block)
  if b['until'] == cjson.null or now < tonumber(b['until']) then
    return {'blocked', block}
  end
end
local ids = redis.call('ZRANGE', KEYS[2], 0, -1)
local pending = 0
for _, cid in ipairs(ids) do
  local h = redis.call('HMGET', ARGV[10] .. cid, 'state', 'expires_at')
  if h[1] == 'Pending' and tonumber(h[2]) > now then
    pending = pending + 1
  else
    redis.call('ZREM', KEYS[2], cid)
  end
end
if pending >= tonumber(ARGV[6]) then
  return {'too_many_pending'}
end
redis.call('ZREMRANGEBYSCORE', KEYS[3], '-inf', now - tonumber(ARGV[8]))
if redis.call('ZCARD', KEYS[3]) >= tonumber(ARGV[7]) then
  return {'rate_limited'}
end
redis.call('HSET', KEYS[1], 'json', json, 'v', 1, 'state', 'Pending', 'expires_at', ARGV[4], 'purge_at', ARGV[11],
  'purge_settled', ARGV[13])
redis.call('PEXPIRE', KEYS[1], ARGV[5])
redis.call('ZADD', KEYS[2], now, ARGV[2])
redis.call('PEXPIRE', KEYS[2], ARGV[5])
redis.call('ZADD', KEYS[3], now, ARGV[2])
redis.call('PEXPIRE', KEYS[3], ARGV[8])
if ARGV[9] == '1' then
  redis.call('SET', KEYS[4], ARGV[2], 'PX', math.max(1, tonumber(ARGV[4]) - now))
end
if KEYS[7] then
  redis.call('SET', KEYS[7], ARGV[12], 'PX', ARGV[5])
end
return chosen or {'created'}
