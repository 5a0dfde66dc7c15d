//! The Redis key schema: every key and channel name the store uses is made here.
//!
//! One user's keys share a hash slot through the tag `{tu}`: the first 16 hex
//! digits of SHA-256("tenant\0user") ([`user_tag`]), so user ids with braces or odd
//! bytes cannot break the tag, and a script may touch several keys of one user on a
//! Redis Cluster. Keys that find a user's slot from an id are global indexes; they
//! hold the owner's `tu`.
//!
//! | key | type | content | TTL |
//! | --- | --- | --- | --- |
//! | `pm:{tu}:ch:<challenge id>` | hash | `json` (the challenge), `v` (version), `state`, `expires_at`, `purge_at` | purge time (expiry + retention) + 1 min |
//! | `pm:{tu}:pending` | zset | ids of PENDING challenges, scored by creation | as the newest challenge's record |
//! | `pm:{tu}:created` | zset | ids created in the rate window, scored by creation | the rate window |
//! | `pm:{tu}:req:<request_id>` | string | challenge id for an idempotency key | until the challenge expires |
//! | `pm:{tu}:block` | string | JSON `UserBlock` | none: durable (the logic ends timed blocks) |
//! | `pm:{tu}:wrong` | zset | times of wrong numbers (`<ms>-<nonce>`, scored by time) | the strike window |
//! | `pm:{tu}:totpfail` | zset | times of wrong TOTP codes (`<ms>-<nonce>`, scored by time) | the strike window |
//! | `pm:{tu}:totplock` | string | VerifyTotp locked until (ms) | the lockout + 1 min |
//! | `pm:{tu}:dev:<device id>` | string | JSON `Device` | none: durable |
//! | `pm:{tu}:devs` | set | the user's device ids | none: durable |
//! | `pm:{tu}:en:<enrollment id>` | string | JSON `Enrollment` | expiry + 7 days (from its creation) |
//! | `pm:cidx:<challenge id>` | string | the owner's `tu` | as the challenge's record |
//! | `pm:didx:<device id>` | string | the owner's `tu` | none: durable |
//! | `pm:enidx:<enrollment id>` | string | the owner's `tu` | as the enrollment |
//! | `pm:code:<code digest>` | string | `<tu> <enrollment id>` | as the enrollment |
//!
//! Updates by compare-and-set keep a key's TTL (`KEEPTTL`).
//!
//! Pub/sub: every change to a challenge is published on one of [`SHARDS`] channels
//! `pm:ev:<n>` ([`shard_channel`], by challenge id) as `<challenge id> <version> <json>`.

use std::time::Duration;

use sha2::{Digest, Sha256};

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
    hex::encode(&digest[..8])
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
    pub(super) fn totp_failures(&self) -> String {
        format!("pm:{{{}}}:totpfail", self.0)
    }
    pub(super) fn totp_lock(&self) -> String {
        format!("pm:{{{}}}:totplock", self.0)
    }
    pub(super) fn device(&self, id: &str) -> String {
        format!("pm:{{{}}}:dev:{id}", self.0)
    }
    pub(super) fn devices(&self) -> String {
        format!("pm:{{{}}}:devs", self.0)
    }
    pub(super) fn enrollment(&self, id: &str) -> String {
        format!("pm:{{{}}}:en:{id}", self.0)
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
        for key in [keys.challenge("ch_1"), keys.pending(), keys.created(), keys.request("r}{"), keys.devices(), keys.block()] {
            assert_eq!(hash_tag(&key), tag, "{key}");
        }
        assert_ne!(tag, user_tag(&TenantId("t".into()), &UserId::parse("piet").expect("user")));
    }
}
