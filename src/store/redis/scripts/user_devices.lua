-- What devices.lua and create.lua share: a user's device records and their
-- fingerprint. The fingerprint is the SHA-1 of the records, sorted, without the two
-- fields a sign-in changes and nothing about a push depends on ("last_used_at",
-- "totp_last_step"). A replica that remembers a user's devices keeps the
-- fingerprint it read with them and passes it to create.lua, which compares it
-- with the records as they are in the same step as the insert: a device enrolled,
-- removed or given a new token since is never missed.
local function user_devices(set_key, prefix)
  local records, bare = {}, {}
  for _, id in ipairs(redis.call('SMEMBERS', set_key)) do
    local record = redis.call('GET', prefix .. id)
    if record then
      records[#records + 1] = record
      -- Field names inside a string value are escaped (\"), so only the fields
      -- themselves match; their values are numbers or null.
      local stripped = string.gsub(record, '"last_used_at":[^,}]*', '')
      stripped = string.gsub(stripped, '"totp_last_step":[^,}]*', '')
      bare[#bare + 1] = stripped
    end
  end
  table.sort(bare)
  return records, redis.sha1hex(table.concat(bare, '\n'))
end

-- The deliveries of a new challenge, chosen from the user's device `records`
-- as PushRoom::choose does in Rust (a test holds the two to the same choice):
-- one QUEUED for each device of `tenant` and `user` that takes pushes (a key,
-- a platform, pushes enabled, a token), in the order of enrollment, then id.
-- Returns them as JSON without the brackets, or nil when no device can answer,
-- a platform's pushes are more than `room` (by platform) takes, or a device
-- names a platform `room` does not (a newer replica's: the caller, which could
-- not read that record, must fail before anything is written, not after).
local function choose_pushes(records, tenant, user, room)
  local function present(value)
    return value ~= nil and value ~= cjson.null
  end
  local answers, targets = false, {}
  for _, record in ipairs(records) do
    local device = cjson.decode(record)
    if device.tenant == tenant and device.user_id == user and present(device.public_key)
        and present(device.platform) then
      if room[device.platform] == nil then
        return nil
      end
      answers = true
      if device.push_enabled == true and device.push_token ~= '' then
        targets[#targets + 1] = device
      end
    end
  end
  if not answers then
    return nil
  end
  -- Ids are 'dv_' and lowercase hex, so Lua's `<` (strcoll: Redis takes the
  -- collation from its locale) orders them as Rust's byte order does.
  table.sort(targets, function(a, b)
    if a.enrolled_at ~= b.enrolled_at then
      return a.enrolled_at < b.enrolled_at
    end
    return a.id < b.id
  end)
  local deliveries = {}
  for _, device in ipairs(targets) do
    local left = room[device.platform]
    if left < 1 then
      return nil
    end
    room[device.platform] = left - 1
    deliveries[#deliveries + 1] = '{"device_id":' .. cjson.encode(device.id) .. ',"platform":'
      .. cjson.encode(device.platform) .. ',"state":"Queued","attempts":0,"error":""}'
  end
  return table.concat(deliveries, ',')
end
