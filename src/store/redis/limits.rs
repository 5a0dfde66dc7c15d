//! What the Redis store counts against a user, and the guards against replays:
//! blocks (merged, never weakened), wrong numbers, VerifyTotp attempts and their
//! locks, and device proofs already used. Each decision is one script or one
//! command on one user's slot (a proof has a key of its own).

use super::RedisStore;
use super::connection::{corrupt, decode, encode};
use super::keys::{Keys, TTL_MARGIN, proof, ttl_ms, user_tag};
use crate::domain::device::ProofUse;
use crate::domain::ids::{TenantId, UserId, os_random};
use crate::domain::time::Millis;
use crate::store::{BlockReason, StoreError, StrikePolicy, TotpAttempt, TotpPolicy, UserBlock};

/// A duration in whole milliseconds for a script argument.
fn millis(duration: std::time::Duration) -> i64 {
    i64::try_from(duration.as_millis()).unwrap_or(i64::MAX)
}

/// A sorted-set member for one event at `now`, unique even among events of the
/// same millisecond: `<ms>-<nonce>`.
fn unique_member(now: Millis) -> Result<String, StoreError> {
    let mut nonce = [0u8; 8];
    os_random(&mut nonce).map_err(corrupt)?;
    Ok(format!("{}-{}", now.0, hex::encode(nonce)))
}

impl RedisStore {
    /// Counts a strike at `key`; true when it is the policy's limit-th in its window.
    async fn strike(&self, key: String, policy: &StrikePolicy, now: Millis) -> Result<bool, StoreError> {
        let member = unique_member(now)?;
        let window = millis(policy.window);
        let reached: i64 =
            self.connection.invoke(self.scripts.strike.key(key).arg(now.0).arg(window).arg(policy.limit).arg(member)).await?;
        Ok(reached == 1)
    }

    /// Merges `block` into the user's block by compare-and-set on its JSON
    /// (`value_cas.lua`): the merge is [`UserBlock::merge`] itself, and the write
    /// lands only if the block it merged with is still the one stored, so of racing
    /// blocks none is lost (a loser merges again with the winner's). Blocks are rare;
    /// the loop ends when no other block lands in between.
    pub(super) async fn block_user(
        &self,
        tenant: &TenantId,
        user: &UserId,
        block: UserBlock,
        now: Millis,
    ) -> Result<UserBlock, StoreError> {
        let tag = user_tag(tenant, user);
        let key = Keys(&tag).block();
        loop {
            let current: Option<String> = self.connection.query(redis::cmd("GET").arg(&key)).await?;
            let merged = match current.as_deref() {
                Some(text) => decode::<UserBlock>(text)?.merge(block.clone(), now),
                None => block.clone(),
            };
            let set: i64 = self
                .connection
                .invoke(self.scripts.value_cas.key(&key).arg(current.as_deref().unwrap_or("")).arg(encode(&merged)?))
                .await?;
            if set == 1 {
                return Ok(merged);
            }
        }
    }

    pub(super) async fn record_wrong_number(
        &self,
        tenant: &TenantId,
        user: &UserId,
        policy: &StrikePolicy,
        now: Millis,
    ) -> Result<Option<UserBlock>, StoreError> {
        let tag = user_tag(tenant, user);
        if !self.strike(Keys(&tag).wrong(), policy, now).await? {
            return Ok(None);
        }
        let block = UserBlock { reason: BlockReason::WrongNumbers, since: now, until: Some(now.plus(policy.block_for)) };
        Ok(Some(self.block_user(tenant, user, block, now).await?))
    }

    /// One DEL of keys in one slot: atomic.
    pub(super) async fn unblock_user(&self, tenant: &TenantId, user: &UserId) -> Result<(), StoreError> {
        let tag = user_tag(tenant, user);
        let keys = Keys(&tag);
        let mut del = redis::cmd("DEL");
        del.arg(keys.block())
            .arg(keys.wrong())
            .arg(keys.totp_attempts())
            .arg(keys.totp_lock())
            .arg(keys.totp_in_a_row())
            .arg(keys.totp_hard_lock());
        self.connection.query(&del).await
    }

    pub(super) async fn reserve_totp_attempt(
        &self,
        tenant: &TenantId,
        user: &UserId,
        policy: &TotpPolicy,
        now: Millis,
    ) -> Result<TotpAttempt, StoreError> {
        let tag = user_tag(tenant, user);
        let keys = Keys(&tag);
        let answer: i64 = self
            .connection
            .invoke(
                self.scripts
                    .reserve_totp
                    .key(keys.totp_attempts())
                    .key(keys.totp_lock())
                    .key(keys.totp_in_a_row())
                    .key(keys.totp_hard_lock())
                    .arg(now.0)
                    .arg(millis(policy.strikes.window))
                    .arg(policy.strikes.limit)
                    .arg(millis(policy.strikes.block_for))
                    .arg(policy.max_consecutive)
                    .arg(unique_member(now)?)
                    .arg(millis(TTL_MARGIN)),
            )
            .await?;
        match answer {
            0 => Ok(TotpAttempt::Allowed),
            -1 => Ok(TotpAttempt::Locked { until: None }),
            until if until > 0 => Ok(TotpAttempt::Locked { until: Some(Millis(until)) }),
            other => Err(corrupt(format!("unexpected TOTP reservation answer {other}"))),
        }
    }

    pub(super) async fn totp_attempt_succeeded(&self, tenant: &TenantId, user: &UserId) -> Result<(), StoreError> {
        let tag = user_tag(tenant, user);
        let keys = Keys(&tag);
        let _: i64 =
            self.connection.invoke(self.scripts.totp_succeeded.key(keys.totp_attempts()).key(keys.totp_in_a_row())).await?;
        Ok(())
    }

    /// `SET NX` with a TTL until `keep_until` on the store's clock (at least 1 ms):
    /// of racing uses exactly one sets it.
    pub(super) async fn spend_proof(&self, use_of: ProofUse, keep_until: Millis) -> Result<bool, StoreError> {
        let ttl = ttl_ms(self.clock.now(), keep_until);
        let set: Option<String> =
            self.connection.query(redis::cmd("SET").arg(proof(&use_of)).arg(1).arg("NX").arg("PX").arg(ttl)).await?;
        Ok(set.is_some())
    }

    /// DBSIZE: on a cluster, summed over its masters.
    pub(super) async fn record_count(&self) -> Result<u64, StoreError> {
        self.connection.sum_over_primaries(&redis::cmd("DBSIZE")).await
    }
}
