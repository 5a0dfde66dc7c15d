//! The Redis key schema: every key and channel name the store uses is made here.
//!
//! One user's keys share a hash slot through the tag `{tu}`: the first 32 hex
//! digits (128 bits) of SHA-256("tenant\0user") ([`user_tag`]), so user ids with
//! braces or odd bytes cannot break the tag, and a script may touch several keys of
//! one user on a Redis Cluster. Keys that find a user's slot from an id are global
//! indexes; they hold the owner's `tu`.
//!
//! 128 bits, so that no two users share keys by chance or by a chosen user id (a
//! birthday search over 64-bit tags takes about 2^32 user ids; over 128 bits,
//! 2^64). Reads that list a user's records (devices, pending challenges) compare the
//! tenant and user id of each record as well, so even a tag shared by two users
//! would not show one user's records to the other. The tag used to be 64 bits (16
//! hex digits, the first half of today's): keys written then are not read under the
//! new tags. `deploy/README.md` ("Upgrading a Redis store written before 128-bit
//! user tags") says how to move them.
//!
//! | key | type | content | TTL |
//! | --- | --- | --- | --- |
//! | `pm:{tu}:ch:<challenge id>` | hash | `json` (the challenge), `v` (version), `state`, `expires_at`, `purge_at`, `purge_settled` (the purge time once APPROVED or FRAUD_REPORTED); `d:<device id>` (a delivery's latest state, JSON, laid over the deliveries in `json` on a read) | purge time + 1 min (expiry + the longer retention; brought forward when settled) |
//! | `pm:{tu}:pending` | zset | ids of PENDING challenges, scored by creation | as the newest challenge's record |
//! | `pm:{tu}:created` | zset | ids created in the rate window, scored by creation | the rate window |
//! | `pm:{tu}:req:<request_id>` | string | challenge id for an idempotency key | until the challenge expires |
//! | `pm:{tu}:block` | string | JSON `UserBlock` | none: durable (the logic ends timed blocks) |
//! | `pm:{tu}:wrong` | zset | times of wrong numbers (`<ms>-<nonce>`, scored by time) | the strike window |
//! | `pm:{tu}:totpatt` | zset | VerifyTotp attempts reserved in the strike window (`<ms>-<nonce>`, scored by time); a right code takes one back | the strike window + 1 min |
//! | `pm:{tu}:totplock` | string | VerifyTotp locked until (ms), after the window's limit | the lockout + 1 min |
//! | `pm:{tu}:totprow` | string | integer: reserved attempts in a row since the last right code | none: until a right code or UnblockUser |
//! | `pm:{tu}:totphard` | string | since when (ms) VerifyTotp is locked until UnblockUser (`max_consecutive` in a row) | none: until UnblockUser |
//! | `pm:{tu}:dev:<device id>` | string | JSON `Device` | none: durable |
//! | `pm:{tu}:devs` | set | the user's device ids (at most `max_devices`, added only by `enroll.lua`) | none: durable |
//! | `pm:{tu}:en:<enrollment id>` | string | JSON `Enrollment` | expiry + 7 days (from its creation) |
//! | `pm:{tu}:ens` | zset | ids of the user's open enrollments, scored by expiry; completed and expired ones are pruned by `insert_enrollment.lua` and `enroll.lua` | the latest expiry + 1 min |
//! | `pm:cidx:<challenge id>` | string | the owner's `tu` (set by `create.lua` with the record on one Redis; before it, on a cluster) | as the challenge's record |
//! | `pm:didx:<device id>` | string | the owner's `tu` (on one Redis, `device.lua` reads it and the record in one call) | none: durable |
//! | `pm:enidx:<enrollment id>` | string | the owner's `tu` | as the enrollment |
//! | `pm:code:<code digest>` | string | `<tu> <enrollment id>` | as the enrollment |
//! | `pm:pubkey:<key fingerprint hex>` | string | the id of the device that holds the public key (a key enrolls once, for any user) | none: until the device is removed |
//! | `pm:proof:<proof use hex>` | string | `1`: this device proof was used | until the proof's `keep_until` (at least 1 ms) |
//! | `pm:{tu}:proof:<proof use hex>` | string | `1`: this RespondToChallenge proof was used (spent by `answer.lua`, so in the user's slot) | as `pm:proof:*` |
//!
//! Updates by compare-and-set keep a key's TTL (`KEEPTTL`).
//!
//! The TOTP keys (`totpatt`, `totplock`, `totprow`, `totphard`) exist only for users
//! with a TOTP credential: the broker asks the store about VerifyTotp only then. The
//! two without a TTL go with a right code (`totprow`) or with UnblockUser (both).
//!
//! `pm:pubkey:*` lives in a slot of its own, not the user's: a key is claimed with
//! `SET NX` before `enroll.lua` adds the device and released (compare-and-delete,
//! `release.lua`) when the script refuses or the device is removed, so it never
//! names a second device. See `records.rs` (`spend_enrollment`) for why the two
//! steps are safe.
//!
//! Pub/sub: every change to a challenge is announced on one of [`SHARDS`] channels
//! `pm:ev:<n>` ([`shard_channel`], by challenge id) as `<challenge id> <version>`:
//! never the challenge itself (its number). A replica that watches the challenge
//! reads the record when the version is newer than what it has seen; a forged
//! message costs it one read and changes nothing.

use std::collections::HashMap;
use std::hash::Hash;
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use sha2::{Digest, Sha256};

use crate::domain::device::{KeyFingerprint, ProofUse};
use crate::domain::ids::{ChallengeId, CodeDigest, DeviceId, EnrollmentId, TenantId, UserId};
use crate::domain::time::Millis;

/// Pub/sub channels for challenge changes.
pub const SHARDS: u32 = 16;
/// Garbage-collection margin on top of the logical lifetime of ephemeral keys.
pub(super) const TTL_MARGIN: Duration = Duration::from_secs(60);
/// How long a finished or expired enrollment record is kept.
pub(super) const ENROLLMENT_KEEP: Duration = Duration::from_secs(7 * 24 * 3600);

/// A key's TTL in milliseconds from `now` to `until`, at least 1.
pub(super) fn ttl_ms(now: Millis, until: Millis) -> i64 {
    i64::try_from(now.until(until).as_millis()).unwrap_or(i64::MAX).max(1)
}

/// The slot tag of a user's keys.
pub(super) fn user_tag(tenant: &TenantId, user: &UserId) -> String {
    let digest = Sha256::digest(format!("{}\0{}", tenant.0, user.as_str()).as_bytes());
    hex::encode(&digest[..16])
}

/// Which user's slot holds a record, by the record's id (a challenge's, a
/// device's), as far as this replica has seen: a record's owner never changes, so
/// a hit saves the read of its global index (`pm:cidx:`, `pm:didx:`). A stale entry
/// (the record gone) only finds no record, as the index would have.
pub(super) type TagCache<K> = Recent<K, Arc<str>>;

/// What this replica read lately, by key, for the reads a later step in Redis
/// checks anyway (a tag: the record is found there or not; a device: the answer
/// script checks it is still enrolled; a user's devices: the create script checks
/// their fingerprint). Two generations bound its memory: when the current one holds
/// [`Recent::GENERATION`] entries, or its values the bytes it may hold, it becomes
/// the old one and the one before it is dropped. The bytes are what the caller
/// says a value weighs ([`Recent::put_sized`]): a user may have many devices with
/// long push tokens, so a count alone would not bound the memory.
pub(super) struct Recent<K, V> {
    generations: Mutex<Generations<K, V>>,
    /// The most bytes of values one generation holds.
    budget: usize,
}

struct Generations<K, V> {
    current: HashMap<K, V>,
    old: HashMap<K, V>,
    /// What the values of `current` weigh.
    bytes: usize,
}

impl<K, V> Recent<K, V> {
    /// A cache whose generations hold at most `budget` bytes of values each.
    pub(super) fn with_budget(budget: usize) -> Self {
        Self { generations: Mutex::new(Generations { current: HashMap::new(), old: HashMap::new(), bytes: 0 }), budget }
    }
}

impl<K, V> Default for Recent<K, V> {
    /// Bounded by the count alone: for values of a fixed, small size (tags).
    fn default() -> Self {
        Self::with_budget(usize::MAX)
    }
}

impl<K: Clone + Eq + Hash, V: Clone> Recent<K, V> {
    const GENERATION: usize = 20_000;

    pub(super) fn get(&self, id: &K) -> Option<V> {
        let generations = self.generations.lock();
        generations.current.get(id).or_else(|| generations.old.get(id)).cloned()
    }

    pub(super) fn put(&self, id: &K, value: V) {
        self.put_sized(id, value, 0);
    }

    /// Keeps `value`, which weighs `bytes`; one heavier than a whole generation's
    /// budget is not kept, and what was kept for `id` before goes.
    pub(super) fn put_sized(&self, id: &K, value: V, bytes: usize) {
        let mut generations = self.generations.lock();
        if bytes > self.budget {
            generations.current.remove(id);
            generations.old.remove(id);
            return;
        }
        if generations.current.len() >= Self::GENERATION || generations.bytes.saturating_add(bytes) > self.budget {
            generations.old = std::mem::take(&mut generations.current);
            generations.bytes = 0;
        }
        generations.current.insert(id.clone(), value);
        generations.bytes = generations.bytes.saturating_add(bytes);
    }

    pub(super) fn forget(&self, id: &K) {
        let mut generations = self.generations.lock();
        generations.current.remove(id);
        generations.old.remove(id);
    }

    /// Entries held, in both generations.
    #[cfg(test)]
    pub(super) fn len(&self) -> usize {
        let generations = self.generations.lock();
        generations.current.len() + generations.old.len()
    }
}

/// The channel that carries a challenge's changes.
pub(super) fn shard_channel(id: &ChallengeId) -> String {
    let digest = Sha256::digest(id.as_str().as_bytes());
    channel(u32::from(digest[0]) % SHARDS)
}

/// Every change channel, for the subscriber.
pub(super) fn all_channels() -> impl Iterator<Item = String> {
    (0..SHARDS).map(channel)
}

fn channel(shard: u32) -> String {
    format!("pm:ev:{shard}")
}

/// The keys of one user, by its tag.
pub(super) struct Keys<'a>(pub(super) &'a str);

impl Keys<'_> {
    pub(super) fn challenge(&self, id: &str) -> String {
        format!("pm:{{{}}}:ch:{id}", self.0)
    }
    /// What [`Keys::challenge`] puts before the id; the create script appends ids to it.
    pub(super) fn challenge_prefix(&self) -> String {
        format!("pm:{{{}}}:ch:", self.0)
    }
    pub(super) fn pending(&self) -> String {
        format!("pm:{{{}}}:pending", self.0)
    }
    pub(super) fn created(&self) -> String {
        format!("pm:{{{}}}:created", self.0)
    }
    pub(super) fn request(&self, request_id: &str) -> String {
        format!("pm:{{{}}}:req:{request_id}", self.0)
    }
    pub(super) fn block(&self) -> String {
        format!("pm:{{{}}}:block", self.0)
    }
    pub(super) fn wrong(&self) -> String {
        format!("pm:{{{}}}:wrong", self.0)
    }
    pub(super) fn totp_attempts(&self) -> String {
        format!("pm:{{{}}}:totpatt", self.0)
    }
    pub(super) fn totp_lock(&self) -> String {
        format!("pm:{{{}}}:totplock", self.0)
    }
    pub(super) fn totp_in_a_row(&self) -> String {
        format!("pm:{{{}}}:totprow", self.0)
    }
    pub(super) fn totp_hard_lock(&self) -> String {
        format!("pm:{{{}}}:totphard", self.0)
    }
    pub(super) fn device(&self, id: &str) -> String {
        format!("pm:{{{}}}:dev:{id}", self.0)
    }
    /// What [`Keys::device`] puts before the id; `enroll.lua` appends ids to it.
    pub(super) fn device_prefix(&self) -> String {
        format!("pm:{{{}}}:dev:", self.0)
    }
    pub(super) fn devices(&self) -> String {
        format!("pm:{{{}}}:devs", self.0)
    }
    /// A used proof of RespondToChallenge, in the user's slot so that the answer
    /// spends it in the same script.
    pub(super) fn proof(&self, proof: &ProofUse) -> String {
        format!("pm:{{{}}}:proof:{}", self.0, proof.to_hex())
    }
    pub(super) fn enrollment(&self, id: &str) -> String {
        format!("pm:{{{}}}:en:{id}", self.0)
    }
    /// What [`Keys::enrollment`] puts before the id; the enrollment scripts append ids to it.
    pub(super) fn enrollment_prefix(&self) -> String {
        format!("pm:{{{}}}:en:", self.0)
    }
    pub(super) fn open_enrollments(&self) -> String {
        format!("pm:{{{}}}:ens", self.0)
    }
}

pub(super) fn challenge_index(id: &ChallengeId) -> String {
    format!("pm:cidx:{id}")
}
pub(super) fn device_index(id: &DeviceId) -> String {
    format!("pm:didx:{id}")
}
pub(super) fn enrollment_index(id: &EnrollmentId) -> String {
    format!("pm:enidx:{id}")
}
pub(super) fn code_index(code: &CodeDigest) -> String {
    format!("pm:code:{}", code.0)
}
pub(super) fn public_key(fingerprint: &KeyFingerprint) -> String {
    format!("pm:pubkey:{}", fingerprint.to_hex())
}
pub(super) fn proof(proof: &ProofUse) -> String {
    format!("pm:proof:{}", proof.to_hex())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The part of a key that Redis Cluster hashes: between the first `{` and the next `}`.
    fn hash_tag(key: &str) -> &str {
        let open = key.find('{').expect("a tag");
        let close = key[open + 1..].find('}').expect("closed") + open + 1;
        &key[open + 1..close]
    }

    #[test]
    fn one_users_keys_share_a_slot() {
        let tag = user_tag(&TenantId("t".into()), &UserId::parse("jan{x}").expect("user"));
        let keys = Keys(&tag);
        let user_keys = [
            keys.challenge("ch_1"),
            keys.pending(),
            keys.created(),
            keys.request("r}{"),
            keys.block(),
            keys.wrong(),
            keys.totp_attempts(),
            keys.totp_lock(),
            keys.totp_in_a_row(),
            keys.totp_hard_lock(),
            keys.device("dev_1"),
            keys.devices(),
            keys.enrollment("en_1"),
            keys.open_enrollments(),
        ];
        for key in user_keys {
            assert_eq!(hash_tag(&key), tag, "{key}");
        }
        assert_eq!(tag.len(), 32, "128 bits, in hex");
        assert!(tag.bytes().all(|b| b.is_ascii_hexdigit()));
        assert_ne!(tag, user_tag(&TenantId("t".into()), &UserId::parse("piet").expect("user")));
    }

    /// The bytes a generation may hold bound the cache whatever its values weigh:
    /// heavy values turn the generations over long before the count would, and one
    /// heavier than a generation is not kept at all.
    #[test]
    fn recent_holds_at_most_two_generations_of_its_budget() {
        let cache: Recent<u32, u32> = Recent::with_budget(1_000);
        for key in 0..100 {
            cache.put_sized(&key, key, 300);
        }
        // 3 values of 300 bytes fit a generation of 1,000: the last two generations.
        assert_eq!(cache.len(), 4, "two generations: 3 + the current 1");
        assert_eq!(cache.get(&99), Some(99));
        assert_eq!(cache.get(&96), Some(96), "the old generation still answers");
        assert_eq!(cache.get(&95), None, "older ones are gone");
        cache.put_sized(&1_000, 1_000, 1_001);
        assert_eq!(cache.get(&1_000), None, "heavier than a generation: not kept");
        cache.put_sized(&99, 0, 1_001);
        assert_eq!(cache.get(&99), None, "nor what was kept for it before");
        let counted: Recent<u32, u32> = Recent::default();
        for key in 0..50_000 {
            counted.put(&key, key);
        }
        assert!(counted.len() <= 2 * 20_000, "the count bounds a cache without a budget");
        assert_eq!(counted.get(&49_999), Some(49_999));
    }
}
