-- Shared by challenge_cas.lua and answer.lua: Scripts::new puts it before each.
-- The rules every change to a challenge obeys, written once.

-- Whether a PENDING challenge's expiry (ms) has come by the later of `now` (the
-- store's clock, ms) and Redis's own (TIME); returns that and Redis's time.
local function expiry_has_come(expires_at, now)
  local t = redis.call('TIME')
  local redis_now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
  return math.max(now, redis_now) >= tonumber(expires_at), redis_now
end

-- Whether the user's block (the JSON at `block_key`) is in force at `now`.
local function blocked(block_key, now)
  local block = redis.call('GET', block_key)
  if not block then
    return false
  end
  local b = cjson.decode(block)
  return b['until'] == cjson.null or now < tonumber(b['until'])
end

-- Writes the challenge's new JSON and state as version `nv`, drops it from the
-- user's PENDING ids when it leaves PENDING, brings the purge time forward to
-- `purge_settled` once APPROVED or FRAUD_REPORTED (nothing can be reported
-- against it any more, so it need not wait out the fraud window) and announces
-- '<id> <version>' on `channel`: never the challenge (its number), and the
-- watchers read the record before they believe anything (see watch.rs).
local function commit(key, pending_key, id, nv, json, state, purge_at, purge_settled, now, margin, channel)
  redis.call('HSET', key, 'json', json, 'v', nv, 'state', state)
  if state ~= 'Pending' then
    redis.call('ZREM', pending_key, id)
  end
  if (state == 'Approved' or state == 'FraudReported') and purge_settled and tonumber(purge_settled) < tonumber(purge_at) then
    redis.call('HSET', key, 'purge_at', purge_settled)
    redis.call('PEXPIRE', key, math.max(1, tonumber(purge_settled) - now + margin))
  end
  redis.call('PUBLISH', channel, id .. ' ' .. nv)
end

