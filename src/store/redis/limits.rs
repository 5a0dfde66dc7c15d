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

/// What the conformance suite cannot see: the keys, their TTLs, and the count.
#[cfg(test)]
mod tests {
    #![allow(clippy::expect_used, clippy::unwrap_used)]

    use std::time::Duration;

    use super::super::RedisStore;
    use super::super::keys::{Keys, proof, user_tag};
    use super::super::testing::{RedisCluster, RedisServer};
    use super::super::tests::store_on;
    use crate::domain::device::ProofUse;
    use crate::domain::ids::{TenantId, UserId, os_random};
    use crate::domain::time::{Clock, ManualClock};
    use crate::store::conformance::{Scope, totp_policy};
    use crate::store::{StrikePolicy, TotpAttempt, TotpPolicy};

    async fn pttl(store: &RedisStore, key: &str) -> i64 {
        store.connection.query(redis::cmd("PTTL").arg(key)).await.expect("pttl")
    }

    #[tokio::test]
    async fn totp_keys_expire_as_documented_and_unblock_clears_them() {
        let clock = ManualClock::starting_now();
        let store = store_on(vec![RedisServer::shared().await.to_owned()], clock.clone()).await;
        let (tenant, user) = (Scope::unique().tenant("a"), UserId::parse("u").expect("user"));
        let tag = user_tag(&tenant, &user);
        let keys = Keys(&tag);
        let policy = totp_policy();
        for _ in 0..5 {
            assert_eq!(
                store.reserve_totp_attempt(&tenant, &user, &policy, clock.now()).await.expect("reserve"),
                TotpAttempt::Allowed
            );
        }
        let until = clock.now().plus(Duration::from_secs(300));
        let locked = store.reserve_totp_attempt(&tenant, &user, &policy, clock.now()).await.expect("reserve");
        assert_eq!(locked, TotpAttempt::Locked { until: Some(until) });
        // The window and the timed lock go with their time, plus the margin.
        let margin = 60_000;
        for key in [keys.totp_attempts(), keys.totp_lock()] {
            let ttl = pttl(&store, &key).await;
            assert!(ttl > 300_000 && ttl <= 300_000 + margin, "{key}: {ttl}");
        }
        // The count in a row holds until a right code or UnblockUser.
        assert_eq!(pttl(&store, &keys.totp_in_a_row()).await, -1);
        let five: i64 = store.connection.query(redis::cmd("GET").arg(keys.totp_in_a_row())).await.expect("get");
        assert_eq!(five, 5);

        // One in a row too many: locked until UnblockUser, a key without a TTL.
        let strict = TotpPolicy { strikes: StrikePolicy { limit: 100, ..policy.strikes.clone() }, max_consecutive: 5 };
        clock.advance(Duration::from_secs(301));
        let hard = store.reserve_totp_attempt(&tenant, &user, &strict, clock.now()).await.expect("reserve");
        assert_eq!(hard, TotpAttempt::Locked { until: None });
        assert_eq!(pttl(&store, &keys.totp_hard_lock()).await, -1);

        store.unblock_user(&tenant, &user).await.expect("unblock");
        for key in [keys.totp_attempts(), keys.totp_lock(), keys.totp_in_a_row(), keys.totp_hard_lock()] {
            assert_eq!(pttl(&store, &key).await, -2, "{key} is gone");
        }
        assert_eq!(
            store.reserve_totp_attempt(&tenant, &user, &policy, clock.now()).await.expect("reserve"),
            TotpAttempt::Allowed
        );
    }

    #[tokio::test]
    async fn unblock_lifts_a_timed_totp_lock() {
        let clock = ManualClock::starting_now();
        let store = store_on(vec![RedisServer::shared().await.to_owned()], clock.clone()).await;
        let (tenant, user) = (Scope::unique().tenant("a"), UserId::parse("u").expect("user"));
        let policy = totp_policy();
        for _ in 0..6 {
            store.reserve_totp_attempt(&tenant, &user, &policy, clock.now()).await.expect("reserve");
        }
        assert!(matches!(
            store.reserve_totp_attempt(&tenant, &user, &policy, clock.now()).await.expect("reserve"),
            TotpAttempt::Locked { until: Some(_) }
        ));
        store.unblock_user(&tenant, &user).await.expect("unblock");
        assert_eq!(
            store.reserve_totp_attempt(&tenant, &user, &policy, clock.now()).await.expect("reserve"),
            TotpAttempt::Allowed
        );
    }

    #[tokio::test]
    async fn a_used_proof_is_kept_until_its_keep_time() {
        let clock = ManualClock::starting_now();
        let store = store_on(vec![RedisServer::shared().await.to_owned()], clock.clone()).await;
        let mut bytes = [0u8; 32];
        os_random(&mut bytes).expect("random");
        let used = ProofUse(bytes);
        assert!(store.spend_proof(used, clock.now().plus(Duration::from_secs(240))).await.expect("spend"));
        let ttl = pttl(&store, &proof(&used)).await;
        assert!(ttl > 230_000 && ttl <= 240_000, "{ttl}");
        // Past its keep time already: kept a millisecond, never without a TTL.
        let mut late = bytes;
        late[0] ^= 1;
        assert!(store.spend_proof(ProofUse(late), clock.now().minus(Duration::from_secs(1))).await.expect("spend"));
        assert!(pttl(&store, &proof(&ProofUse(late))).await < 2);
    }

    #[tokio::test]
    async fn record_count_is_the_number_of_keys() {
        let server = RedisServer::start().await;
        let clock = ManualClock::starting_now();
        let store = store_on(vec![server.url()], clock.clone()).await;
        assert_eq!(store.record_count().await.expect("count"), 0);
        let mut bytes = [0u8; 32];
        os_random(&mut bytes).expect("random");
        store.spend_proof(ProofUse(bytes), clock.now().plus(Duration::from_secs(60))).await.expect("spend");
        let tenant = TenantId("t".into());
        store.block_user(&tenant, &UserId::parse("u").expect("user"), fraud(clock.now()), clock.now()).await.expect("block");
        assert_eq!(store.record_count().await.expect("count"), 2);
    }

    /// On a cluster the count is every master's: keys spread over all the slots are
    /// all counted (one master alone holds about a third of them).
    #[tokio::test]
    async fn record_count_sums_the_cluster_masters() {
        const KEYS: usize = 1500;
        let store = store_on(RedisCluster::shared().await.to_vec(), ManualClock::starting_now()).await;
        let prefix = format!("pm:test:count:{}", Scope::unique().tenant("n").0);
        let names: Vec<String> = (0..KEYS).map(|i| format!("{prefix}:{i}")).collect();
        let run = |cmd: redis::Cmd| {
            let connection = store.connection.clone();
            async move { connection.query::<()>(&cmd).await.expect("query") }
        };
        futures::future::join_all(names.iter().map(|key| run(redis::cmd("SET").arg(key).arg(1).arg("PX").arg(60_000).clone())))
            .await;
        let count = store.record_count().await.expect("count");
        futures::future::join_all(names.iter().map(|key| run(redis::cmd("DEL").arg(key).clone()))).await;
        assert!(count >= KEYS as u64, "{count} keys counted, {KEYS} written");
    }

    fn fraud(now: crate::domain::time::Millis) -> crate::store::UserBlock {
        crate::store::UserBlock { reason: crate::store::BlockReason::FraudReported, since: now, until: None }
    }
}
