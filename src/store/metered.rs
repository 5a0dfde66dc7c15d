//! [`MeteredStore`]: any [`Store`] with its latency and errors measured.
//!
//! A decorator, so every backend (embedded, Redis) is measured the same way without
//! a line of metrics in it: `pushmatch_store_operation_seconds{backend, operation}`
//! and `pushmatch_store_errors_total{backend, operation, kind}`.

use std::future::Future;
use std::sync::Arc;
use std::time::Instant;

use async_trait::async_trait;

use crate::domain::challenge::{Challenge, Delivery, Resolution};
use crate::domain::device::{Device, ProofUse};
use crate::domain::enrollment::Enrollment;
use crate::domain::ids::{ChallengeId, CodeDigest, DeviceId, EnrollmentId, TenantId, UserId};
use crate::domain::time::Millis;
use crate::store::{
    AdmissionPolicy, Answered, ChallengeDevices, ChallengeWatch, CompleteOutcome, CreateFor, CreateOutcome, DeviceAnswer,
    EnrollmentLimits, InsertOutcome, PushesFrom, ResolveOutcome, Store, StoreError, StrikePolicy, TenantPurge, TotpAttempt,
    TotpPolicy, UserBlock,
};
use crate::telemetry::metrics::names;

pub struct MeteredStore {
    inner: Arc<dyn Store>,
    backend: &'static str,
}

impl MeteredStore {
    pub fn wrap(inner: Arc<dyn Store>) -> Arc<dyn Store> {
        let backend = inner.backend();
        Arc::new(Self { inner, backend })
    }

    async fn timed<T>(
        &self,
        operation: &'static str,
        call: impl Future<Output = Result<T, StoreError>>,
    ) -> Result<T, StoreError> {
        let started = Instant::now();
        let result = call.await;
        metrics::histogram!(names::STORE_OPERATION_SECONDS, "backend" => self.backend, "operation" => operation)
            .record(started.elapsed().as_secs_f64());
        if let Err(error) = &result {
            let kind = match error {
                StoreError::Unavailable { .. } => "unavailable",
                StoreError::Corrupt { .. } => "corrupt",
            };
            metrics::counter!(names::STORE_ERRORS, "backend" => self.backend, "operation" => operation, "kind" => kind)
                .increment(1);
        }
        result
    }
}

/// Every `operation` label: one per [`Store`] call.
pub const OPERATIONS: &[&str] = &[
    "health",
    "create_challenge",
    "challenge_devices",
    "create_challenge",
    "answering_device",
    "get_challenge",
    "watch_challenge",
    "resolve_challenge",
    "answer_challenge",
    "record_delivery",
    "pending_challenges",
    "insert_enrollment",
    "get_enrollment",
    "enrollment_by_code",
    "complete_enrollment",
    "get_device",
    "list_devices",
    "remove_device",
    "set_push_token",
    "disable_push",
    "touch_device",
    "block_user",
    "record_wrong_number",
    "unblock_user",
    "confirm_totp_enrollment",
    "spend_totp_step",
    "reserve_totp_attempt",
    "totp_attempt_succeeded",
    "spend_proof",
    "record_count",
    "purge_tenant",
];

/// Registers the store series of `backend` at zero (at start, so that `rate()` and
/// alerts see them before the first failure): per operation, the latency histogram
/// and the errors of each kind. Adding zero keeps what another server in the same
/// process counted already.
pub fn register_series(backend: &'static str) {
    for operation in OPERATIONS {
        let _registered = metrics::histogram!(names::STORE_OPERATION_SECONDS, "backend" => backend, "operation" => *operation);
        for kind in ["unavailable", "corrupt"] {
            metrics::counter!(names::STORE_ERRORS, "backend" => backend, "operation" => *operation, "kind" => kind).increment(0);
        }
    }
}

#[async_trait]
impl Store for MeteredStore {
    fn backend(&self) -> &'static str {
        self.backend
    }

    async fn health(&self) -> Result<(), StoreError> {
        self.timed("health", self.inner.health()).await
    }

    async fn create_challenge(
        &self,
        challenge: Challenge,
        policy: &AdmissionPolicy,
        now: Millis,
    ) -> Result<CreateOutcome, StoreError> {
        self.timed("create_challenge", self.inner.create_challenge(challenge, policy, now)).await
    }

    async fn challenge_devices(&self, tenant: &TenantId, user: &UserId) -> Result<Option<ChallengeDevices>, StoreError> {
        self.timed("challenge_devices", self.inner.challenge_devices(tenant, user)).await
    }

    async fn create_challenge_for(
        &self,
        challenge: Challenge,
        policy: &AdmissionPolicy,
        now: Millis,
        pushes: PushesFrom<'_>,
    ) -> Result<CreateFor, StoreError> {
        self.timed("create_challenge", self.inner.create_challenge_for(challenge, policy, now, pushes)).await
    }

    async fn answering_device(&self, id: &DeviceId) -> Result<Option<Device>, StoreError> {
        self.timed("answering_device", self.inner.answering_device(id)).await
    }

    async fn get_challenge(&self, tenant: &TenantId, id: &ChallengeId, now: Millis) -> Result<Option<Challenge>, StoreError> {
        self.timed("get_challenge", self.inner.get_challenge(tenant, id, now)).await
    }

    async fn watch_challenge(
        &self,
        tenant: &TenantId,
        id: &ChallengeId,
        now: Millis,
    ) -> Result<Option<ChallengeWatch>, StoreError> {
        self.timed("watch_challenge", self.inner.watch_challenge(tenant, id, now)).await
    }

    async fn resolve_challenge(
        &self,
        tenant: &TenantId,
        id: &ChallengeId,
        resolution: Resolution,
        now: Millis,
    ) -> Result<Option<ResolveOutcome>, StoreError> {
        self.timed("resolve_challenge", self.inner.resolve_challenge(tenant, id, resolution, now)).await
    }

    async fn answer_challenge(&self, answer: &DeviceAnswer<'_>, now: Millis) -> Result<Answered, StoreError> {
        self.timed("answer_challenge", self.inner.answer_challenge(answer, now)).await
    }

    async fn record_deliveries(&self, id: &ChallengeId, deliveries: Vec<Delivery>) -> Result<(), StoreError> {
        self.timed("record_delivery", self.inner.record_deliveries(id, deliveries)).await
    }

    async fn pending_challenges(&self, tenant: &TenantId, user: &UserId, now: Millis) -> Result<Vec<Challenge>, StoreError> {
        self.timed("pending_challenges", self.inner.pending_challenges(tenant, user, now)).await
    }

    async fn insert_enrollment(
        &self,
        enrollment: Enrollment,
        limits: &EnrollmentLimits,
        now: Millis,
    ) -> Result<InsertOutcome, StoreError> {
        self.timed("insert_enrollment", self.inner.insert_enrollment(enrollment, limits, now)).await
    }

    async fn get_enrollment(&self, tenant: &TenantId, id: &EnrollmentId) -> Result<Option<Enrollment>, StoreError> {
        self.timed("get_enrollment", self.inner.get_enrollment(tenant, id)).await
    }

    async fn enrollment_by_code(&self, code: &CodeDigest) -> Result<Option<Enrollment>, StoreError> {
        self.timed("enrollment_by_code", self.inner.enrollment_by_code(code)).await
    }

    async fn complete_enrollment(
        &self,
        code: &CodeDigest,
        device: Device,
        limits: &EnrollmentLimits,
        now: Millis,
    ) -> Result<CompleteOutcome, StoreError> {
        self.timed("complete_enrollment", self.inner.complete_enrollment(code, device, limits, now)).await
    }

    async fn get_device(&self, id: &DeviceId) -> Result<Option<Device>, StoreError> {
        self.timed("get_device", self.inner.get_device(id)).await
    }

    async fn list_devices(&self, tenant: &TenantId, user: &UserId) -> Result<Vec<Device>, StoreError> {
        self.timed("list_devices", self.inner.list_devices(tenant, user)).await
    }

    async fn remove_device(&self, tenant: &TenantId, id: &DeviceId) -> Result<bool, StoreError> {
        self.timed("remove_device", self.inner.remove_device(tenant, id)).await
    }

    async fn set_push_token(&self, id: &DeviceId, token: &str) -> Result<bool, StoreError> {
        self.timed("set_push_token", self.inner.set_push_token(id, token)).await
    }

    async fn disable_push(&self, id: &DeviceId, token: &str) -> Result<(), StoreError> {
        self.timed("disable_push", self.inner.disable_push(id, token)).await
    }

    async fn touch_device(&self, id: &DeviceId, now: Millis) -> Result<(), StoreError> {
        self.timed("touch_device", self.inner.touch_device(id, now)).await
    }

    async fn block_user(&self, tenant: &TenantId, user: &UserId, block: UserBlock, now: Millis) -> Result<UserBlock, StoreError> {
        self.timed("block_user", self.inner.block_user(tenant, user, block, now)).await
    }

    async fn record_wrong_number(
        &self,
        tenant: &TenantId,
        user: &UserId,
        policy: &StrikePolicy,
        now: Millis,
    ) -> Result<Option<UserBlock>, StoreError> {
        self.timed("record_wrong_number", self.inner.record_wrong_number(tenant, user, policy, now)).await
    }

    async fn unblock_user(&self, tenant: &TenantId, user: &UserId) -> Result<(), StoreError> {
        self.timed("unblock_user", self.inner.unblock_user(tenant, user)).await
    }

    async fn confirm_totp_enrollment(
        &self,
        tenant: &TenantId,
        id: &EnrollmentId,
        device: Device,
        limits: &EnrollmentLimits,
        now: Millis,
    ) -> Result<CompleteOutcome, StoreError> {
        self.timed("confirm_totp_enrollment", self.inner.confirm_totp_enrollment(tenant, id, device, limits, now)).await
    }

    async fn spend_totp_step(&self, id: &DeviceId, step: u64) -> Result<bool, StoreError> {
        self.timed("spend_totp_step", self.inner.spend_totp_step(id, step)).await
    }

    async fn reserve_totp_attempt(
        &self,
        tenant: &TenantId,
        user: &UserId,
        policy: &TotpPolicy,
        now: Millis,
    ) -> Result<TotpAttempt, StoreError> {
        self.timed("reserve_totp_attempt", self.inner.reserve_totp_attempt(tenant, user, policy, now)).await
    }

    async fn totp_attempt_succeeded(&self, tenant: &TenantId, user: &UserId, now: Millis) -> Result<(), StoreError> {
        self.timed("totp_attempt_succeeded", self.inner.totp_attempt_succeeded(tenant, user, now)).await
    }

    async fn spend_proof(&self, proof: ProofUse, keep_until: Millis) -> Result<bool, StoreError> {
        self.timed("spend_proof", self.inner.spend_proof(proof, keep_until)).await
    }

    async fn record_count(&self) -> Result<u64, StoreError> {
        self.timed("record_count", self.inner.record_count()).await
    }

    async fn purge_tenant(&self, tenant: &TenantId, dry_run: bool) -> Result<TenantPurge, StoreError> {
        self.timed("purge_tenant", self.inner.purge_tenant(tenant, dry_run)).await
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn operations_lists_every_timed_call() {
        let source = include_str!("metered.rs");
        let timed: Vec<&str> = source.split("self.timed(\"").skip(1).filter_map(|rest| rest.split('"').next()).collect();
        assert_eq!(timed, super::OPERATIONS, "OPERATIONS lists each timed operation, in order");
    }
}
