-- A reserved VerifyTotp attempt had the right code: it no longer counts as wrong
-- (one attempt leaves the window, the latest) and the count in a row starts again.
--
-- KEYS[1]  attempts in the window (zset)         pm:{tu}:totpatt
-- KEYS[2]  attempts in a row (integer)           pm:{tu}:totprow
-- Returns 1.
redis.call('ZPOPMAX', KEYS[1])
redis.call('DEL', KEYS[2])
return 1
