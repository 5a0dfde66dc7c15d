-- A user's device records, in one call: the ids in the user's set, each record
-- read by the prefix. All keys are one user's (one hash slot).
--
-- KEYS[1]  the user's device ids (set)           pm:{tu}:devs
-- ARGV[1]  the prefix of the user's device keys, pm:{tu}:dev:
-- Returns the records (JSON) of the ids whose record exists, in no set order.
local records = {}
for _, id in ipairs(redis.call('SMEMBERS', KEYS[1])) do
  local record = redis.call('GET', ARGV[1] .. id)
  if record then
    records[#records + 1] = record
  end
end
return records
