//! The ports the domain needs from the outside, defined on the domain's side:
//! the [`Store`] trait with its error and outcomes, and the admission and strike
//! policies it enforces atomically. `crate::store` implements them (the embedded
//! backend and Redis); the broker uses them through `Arc<dyn Store>`.
//!
//! Every method that decides something (create with limits, resolve, complete an
//! enrollment) is one atomic step in the store, so two replicas (or two tasks)
//! can never both win. The conformance suite in `crate::store::conformance` runs
//! against every backend.

use std::time::Duration;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use super::challenge::{Challenge, Delivery, Resolution};
use super::device::Device;
use super::enrollment::Enrollment;
use super::ids::{ChallengeId, CodeDigest, DeviceId, EnrollmentId, TenantId, UserId};
use super::time::Millis;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The backend cannot be reached now; the request may be retried.
    #[error("{backend} unavailable: {detail}")]
    Unavailable { backend: &'static str, detail: String },
    /// The backend answered, but with data this version cannot read.
    #[error("corrupt record in {backend}: {detail}")]
    Corrupt { backend: &'static str, detail: String },
}

impl StoreError {
    pub fn unavailable(backend: &'static str, detail: impl ToString) -> Self {
        Self::Unavailable { backend, detail: detail.to_string() }
    }

    pub fn corrupt(backend: &'static str, detail: impl ToString) -> Self {
        Self::Corrupt { backend, detail: detail.to_string() }
    }
}

/// The per-user limits that CreateChallenge enforces atomically with the insert.
#[derive(Clone, Debug)]
pub struct AdmissionPolicy {
    /// At most this many PENDING challenges per user.
    pub max_pending: u32,
    /// At most this many challenges per user in any `window`.
    pub max_per_window: u32,
    pub window: Duration,
    /// How long a challenge stays readable after its expiry.
    pub retention: Duration,
}

/// Strikes against a user (wrong numbers, wrong TOTP codes): `limit` within
/// `window` block the user (or lock TOTP) for `block_for`.
#[derive(Clone, Debug)]
pub struct StrikePolicy {
    pub limit: u32,
    pub window: Duration,
    pub block_for: Duration,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum BlockReason {
    FraudReported,
    WrongNumbers,
}

/// A block on new challenges for one user. `until == None` lasts until UnblockUser.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct UserBlock {
    pub reason: BlockReason,
    pub since: Millis,
    pub until: Option<Millis>,
}

impl UserBlock {
    pub fn in_force(&self, now: Millis) -> bool {
        self.until.is_none_or(|until| now < until)
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CreateOutcome {
    Created(Challenge),
    /// The same request_id for the same user while that challenge lives.
    Existing(Challenge),
    Refused(Refusal),
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Refusal {
    Blocked(UserBlock),
    TooManyPending { limit: u32 },
    RateLimited { limit: u32, window: Duration },
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ResolveOutcome {
    /// True only for the one call that moved the challenge out of PENDING.
    pub accepted: bool,
    /// The challenge after the call.
    pub challenge: Challenge,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CompleteOutcome {
    Completed(Box<Enrollment>),
    UnknownCode,
    AlreadyUsed,
    Expired,
}

/// Follows one challenge: the receiver's current value is the latest state.
pub type ChallengeWatch = watch::Receiver<Challenge>;

#[async_trait]
pub trait Store: Send + Sync + 'static {
    /// The backend's name for logs and errors ("embedded", "redis").
    fn backend(&self) -> &'static str;

    /// Whether the store answers now (health checks: NOT_SERVING while it does not).
    async fn health(&self) -> Result<(), StoreError> {
        Ok(())
    }

    // ---- challenges: ephemeral ----

    /// Inserts `challenge` unless the user is blocked or over a limit; a request_id
    /// already used by a live challenge of the same user returns that challenge.
    async fn create_challenge(
        &self,
        challenge: Challenge,
        policy: &AdmissionPolicy,
        now: Millis,
    ) -> Result<CreateOutcome, StoreError>;

    /// The challenge, expired first if its time is up. Another tenant's is `None`.
    async fn get_challenge(&self, tenant: &TenantId, id: &ChallengeId, now: Millis) -> Result<Option<Challenge>, StoreError>;

    /// A watch on the challenge; every change (deliveries, resolution, expiry) is sent to it.
    async fn watch_challenge(
        &self,
        tenant: &TenantId,
        id: &ChallengeId,
        now: Millis,
    ) -> Result<Option<ChallengeWatch>, StoreError>;

    /// Compare-and-set from PENDING: exactly one resolution wins.
    async fn resolve_challenge(
        &self,
        tenant: &TenantId,
        id: &ChallengeId,
        resolution: Resolution,
        now: Millis,
    ) -> Result<Option<ResolveOutcome>, StoreError>;

    /// Records a delivery's latest state on the challenge and wakes its watchers.
    /// A challenge that is gone already is no error.
    async fn record_delivery(&self, id: &ChallengeId, delivery: Delivery) -> Result<(), StoreError>;

    /// The user's PENDING challenges, newest first.
    async fn pending_challenges(&self, tenant: &TenantId, user: &UserId, now: Millis) -> Result<Vec<Challenge>, StoreError>;

    // ---- enrollments and devices: durable ----

    async fn insert_enrollment(&self, enrollment: Enrollment) -> Result<(), StoreError>;

    async fn get_enrollment(&self, tenant: &TenantId, id: &EnrollmentId) -> Result<Option<Enrollment>, StoreError>;

    /// The enrollment whose code has this digest, whatever its state.
    async fn enrollment_by_code(&self, code: &CodeDigest) -> Result<Option<Enrollment>, StoreError>;

    /// Spends a one-time code and adds `device`, atomically: a code completes once.
    async fn complete_enrollment(&self, code: &CodeDigest, device: Device, now: Millis) -> Result<CompleteOutcome, StoreError>;

    async fn get_device(&self, id: &DeviceId) -> Result<Option<Device>, StoreError>;

    async fn list_devices(&self, tenant: &TenantId, user: &UserId) -> Result<Vec<Device>, StoreError>;

    /// Removes a device of `tenant`; false when there is none.
    async fn remove_device(&self, tenant: &TenantId, id: &DeviceId) -> Result<bool, StoreError>;

    /// Sets a new push token and turns pushes back on; false when the device is gone.
    async fn set_push_token(&self, id: &DeviceId, token: &str) -> Result<bool, StoreError>;

    /// Turns pushes off after the provider reported the token dead, unless the token
    /// changed in the meantime (`token` is the one that was found dead).
    async fn disable_push(&self, id: &DeviceId, token: &str) -> Result<(), StoreError>;

    /// Notes when the device last answered.
    async fn touch_device(&self, id: &DeviceId, now: Millis) -> Result<(), StoreError>;

    // ---- blocks ----

    async fn block_user(&self, tenant: &TenantId, user: &UserId, block: UserBlock) -> Result<(), StoreError>;

    /// Counts a wrong number; when it is the `limit`-th in the window, blocks the user
    /// and returns the block.
    async fn record_wrong_number(
        &self,
        tenant: &TenantId,
        user: &UserId,
        policy: &StrikePolicy,
        now: Millis,
    ) -> Result<Option<UserBlock>, StoreError>;

    /// Lifts any block and forgets counted wrong numbers.
    async fn unblock_user(&self, tenant: &TenantId, user: &UserId) -> Result<(), StoreError>;

    async fn user_block(&self, tenant: &TenantId, user: &UserId, now: Millis) -> Result<Option<UserBlock>, StoreError>;

    // ---- TOTP ----

    /// Completes a pending TOTP enrollment of `tenant` with `device` (its credential),
    /// atomically: an enrollment confirms once.
    async fn confirm_totp_enrollment(
        &self,
        tenant: &TenantId,
        id: &EnrollmentId,
        device: Device,
        now: Millis,
    ) -> Result<CompleteOutcome, StoreError>;

    /// Accepts TOTP `step` for the device if it is later than every step accepted
    /// before, atomically: of racing uses of one code exactly one returns true.
    async fn spend_totp_step(&self, id: &DeviceId, step: u64) -> Result<bool, StoreError>;

    /// Counts a wrong TOTP code; when it is the `limit`-th in the window, locks
    /// VerifyTotp for the user and returns until when.
    async fn record_totp_failure(
        &self,
        tenant: &TenantId,
        user: &UserId,
        policy: &StrikePolicy,
        now: Millis,
    ) -> Result<Option<Millis>, StoreError>;

    async fn totp_locked_until(&self, tenant: &TenantId, user: &UserId, now: Millis) -> Result<Option<Millis>, StoreError>;
}
