//! What the embedded store counts against a user, and the guards against
//! replays: wrong numbers (which earn a durable block), VerifyTotp attempts and
//! their locks, and device proofs already used. The counts live in memory beside
//! the user's live challenges (`live.rs`), in the same lock, so each check-and-count
//! is one atomic step; the TOTP lock that only UnblockUser lifts is durable
//! (`durable.rs`). [`Shared::sweep`] forgets what no window holds any more.

use redb::Durability;

use super::durable::DurableWrite;
use super::live::prune_before;
use super::{Shared, UserKey};
use crate::domain::device::ProofUse;
use crate::domain::ids::{TenantId, UserId};
use crate::domain::time::Millis;
use crate::store::{BlockReason, StoreError, StrikePolicy, TotpAttempt, TotpPolicy, UserBlock};

impl Shared {
    pub(super) async fn record_wrong_number(
        &self,
        tenant: &TenantId,
        user: &UserId,
        policy: &StrikePolicy,
        now: Millis,
    ) -> Result<Option<UserBlock>, StoreError> {
        let key = (tenant.clone(), user.clone());
        let reached = {
            let mut table = self.challenges();
            let activity = table.users.entry(key.clone()).or_default();
            prune_before(&mut activity.wrong_numbers, now.minus(policy.window));
            activity.wrong_numbers.push_back(now);
            activity.forget_after(now.plus(policy.window));
            let reached = activity.wrong_numbers.len() >= policy.limit as usize;
            if reached {
                activity.wrong_numbers.clear();
            }
            reached
        };
        if !reached {
            return Ok(None);
        }
        let block = UserBlock { reason: BlockReason::WrongNumbers, since: now, until: Some(now.plus(policy.block_for)) };
        Ok(Some(self.block_user(tenant, user, block, now).await?))
    }

    pub(super) async fn unblock_user(&self, tenant: &TenantId, user: &UserId) -> Result<(), StoreError> {
        let key = (tenant.clone(), user.clone());
        if let Some(activity) = self.challenges().users.get_mut(&key) {
            activity.wrong_numbers.clear();
            activity.totp_attempts.clear();
            activity.totp_locked_until = None;
            activity.totp_consecutive = 0;
        }
        let _gate = self.write_gate.lock().await;
        let writes = {
            let mirror = self.durable();
            let mut writes = Vec::new();
            if mirror.blocks.contains_key(&key) {
                writes.push(DurableWrite::RemoveBlock(key.clone()));
            }
            if mirror.totp_locks.contains_key(&key) {
                writes.push(DurableWrite::RemoveTotpLock(key));
            }
            writes
        };
        if !writes.is_empty() {
            self.commit(writes, Durability::Immediate).await?;
        }
        Ok(())
    }

    /// See `Store::reserve_totp_attempt`. The count and the check are one step under
    /// the table's lock; reaching `max_consecutive` writes the durable lock.
    pub(super) async fn reserve_totp_attempt(
        &self,
        tenant: &TenantId,
        user: &UserId,
        policy: &TotpPolicy,
        now: Millis,
    ) -> Result<TotpAttempt, StoreError> {
        let key = (tenant.clone(), user.clone());
        if self.durable().totp_locks.contains_key(&key) {
            return Ok(TotpAttempt::Locked { until: None });
        }
        let attempt = {
            let mut table = self.challenges();
            let activity = table.users.entry(key.clone()).or_default();
            if let Some(until) = activity.totp_locked_until.filter(|until| now < *until) {
                return Ok(TotpAttempt::Locked { until: Some(until) });
            }
            prune_before(&mut activity.totp_attempts, now.minus(policy.strikes.window));
            if activity.totp_consecutive >= policy.max_consecutive {
                TotpAttempt::Locked { until: None }
            } else if activity.totp_attempts.len() >= policy.strikes.limit as usize {
                let until = now.plus(policy.strikes.block_for);
                activity.totp_locked_until = Some(until);
                activity.forget_after(until);
                TotpAttempt::Locked { until: Some(until) }
            } else {
                activity.totp_attempts.push_back(now);
                activity.totp_consecutive += 1;
                activity.forget_after(now.plus(policy.strikes.window));
                TotpAttempt::Allowed
            }
        };
        if attempt == (TotpAttempt::Locked { until: None }) {
            self.lock_totp(key, now).await?;
        }
        Ok(attempt)
    }

    /// Makes the consecutive-failures lock durable (once).
    async fn lock_totp(&self, key: UserKey, now: Millis) -> Result<(), StoreError> {
        let _gate = self.write_gate.lock().await;
        if self.durable().totp_locks.contains_key(&key) {
            return Ok(());
        }
        self.commit(vec![DurableWrite::PutTotpLock(key, now)], Durability::Immediate).await
    }

    pub(super) fn totp_attempt_succeeded(&self, tenant: &TenantId, user: &UserId) {
        if let Some(activity) = self.challenges().users.get_mut(&(tenant.clone(), user.clone())) {
            activity.totp_attempts.pop_back();
            activity.totp_consecutive = 0;
        }
    }

    /// True the first time; each use is kept until `keep_until`, when a replay
    /// would fail the timestamp check anyway.
    pub(super) fn spend_proof(&self, proof: ProofUse, keep_until: Millis) -> bool {
        let mut proofs = self.proofs.lock();
        match proofs.entry(proof) {
            std::collections::btree_map::Entry::Occupied(_) => false,
            std::collections::btree_map::Entry::Vacant(slot) => {
                slot.insert(keep_until);
                true
            }
        }
    }

    /// Forgets what no longer matters at `now`: idle users' counts, used proofs past
    /// their window, enrollments past their keep time. Runs every few seconds.
    pub(super) async fn sweep(&self, now: Millis) -> Result<(), StoreError> {
        self.challenges().users.retain(|_, activity| !activity.is_idle(now));
        self.proofs.lock().retain(|_, keep_until| now < *keep_until);
        self.purge_enrollments(now).await?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::time::Duration;

    use crate::domain::time::{Clock, ManualClock};
    use crate::store::conformance::{Scope, limits, sample_enrollment, totp_policy};
    use crate::store::embedded::EmbeddedStore;
    use crate::store::{Store, StrikePolicy};

    /// What strangers leave behind goes with the sweep: counts whose windows passed,
    /// used proofs past their window, enrollments past their keep time.
    #[tokio::test]
    async fn the_sweep_forgets_what_no_window_holds() {
        let dir = tempfile::tempdir().expect("tempdir");
        let clock = ManualClock::starting_now();
        let store = EmbeddedStore::open(dir.path(), Arc::new(clock.clone())).await.expect("open");
        let scope = Scope::unique();
        let tenant = scope.tenant("a");
        let empty = store.record_count().await.expect("count");

        let user = crate::domain::ids::UserId::parse("stranger").expect("user");
        let now = clock.now();
        store.insert_enrollment(sample_enrollment(&tenant, &user, now), &limits(), now).await.expect("insert");
        let wrong = StrikePolicy { limit: 3, window: Duration::from_secs(900), block_for: Duration::from_secs(900) };
        store.record_wrong_number(&tenant, &user, &wrong, now).await.expect("strike");
        let other = crate::domain::ids::UserId::parse("guesser").expect("user");
        store.reserve_totp_attempt(&tenant, &other, &totp_policy(), now).await.expect("reserve");
        store.totp_attempt_succeeded(&tenant, &other, now).await.expect("right code");
        let proof = crate::domain::device::ProofUse([7; 32]);
        store.spend_proof(proof, now.plus(Duration::from_secs(240))).await.expect("spend");
        assert!(store.record_count().await.expect("count") > empty);

        // Within the windows nothing goes.
        store.shared.sweep(clock.now()).await.expect("sweep");
        assert!(store.record_count().await.expect("count") > empty);
        // A week after the enrollment expired, everything has.
        clock.advance(Duration::from_secs(600) + super::super::durable::ENROLLMENT_KEEP);
        store.shared.sweep(clock.now()).await.expect("sweep");
        assert_eq!(store.record_count().await.expect("count"), empty);
        assert!(store.spend_proof(proof, clock.now().plus(Duration::from_secs(1))).await.expect("spend"), "forgotten");
    }
}
