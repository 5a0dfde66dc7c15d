-- Compare-and-delete: deletes a claim only while it still names its holder, so a
-- late or repeated release never frees a claim someone else holds now.
--
-- KEYS[1]  the claim                             pm:pubkey:<fingerprint hex>
-- ARGV[1]  its holder (a device id)
-- Returns 1 when deleted, 0 when the key was gone or held by another.
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('DEL', KEYS[1])
  return 1
end
return 0
