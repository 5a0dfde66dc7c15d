-- A user's device records, in one call: the ids in the user's set, each record
-- read by the prefix. All keys are one user's (one hash slot).
--
-- KEYS[1]  the user's device ids (set)           pm:{tu}:devs
-- ARGV[1]  the prefix of the user's device keys, pm:{tu}:dev:
-- Returns the records' fingerprint (user_devices.lua), then the records (JSON) of
-- the ids whose record exists, in no set order.
local records, seen = user_devices(KEYS[1], ARGV[1])
table.insert(records, 1, seen)
return records
