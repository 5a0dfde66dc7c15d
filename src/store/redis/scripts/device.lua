-- A device read by its id alone, in one call, on a single Redis only: its index
-- names the owner's tag, and the record is read under it. (On a cluster the index
-- and the record are in different slots: the caller reads one, then the other.)
--
-- KEYS[1]  the device's index                    pm:didx:<id>
-- ARGV[1]  the device id
-- Returns {} when the index is gone, else {<tag>} or {<tag>, <record JSON>}.
local tag = redis.call('GET', KEYS[1])
if not tag then
  return {}
end
local record = redis.call('GET', 'pm:{' .. tag .. '}:dev:' .. ARGV[1])
if not record then
  return {tag}
end
return {tag, record}
