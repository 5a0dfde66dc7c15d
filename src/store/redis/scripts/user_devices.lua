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
