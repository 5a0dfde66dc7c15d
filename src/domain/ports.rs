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

use super::challenge::{Challenge, Delivery, PushRoom, Resolution};
use super::device::{Device, ProofUse};
use super::enrollment::Enrollment;
use super::ids::{ChallengeId, ChallengeNumber, CodeDigest, DeviceId, EnrollmentId, TenantId, UserId};
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
    /// How long an APPROVED or FRAUD_REPORTED challenge stays readable after its
    /// expiry: nothing can be reported against it any more.
    pub retention: Duration,
    /// How long any other challenge (PENDING, then CANCELLED, EXPIRED or DENIED)
    /// stays readable after its expiry: a fraud report on it may still count for
    /// that long. At least `retention`.
    pub report_retention: Duration,
}

impl AdmissionPolicy {
    /// When a challenge expiring at `expires_at` is purged: `(if it ends APPROVED
    /// or FRAUD_REPORTED, otherwise)`.
    pub fn purge_times(&self, expires_at: Millis) -> (Millis, Millis) {
        (expires_at.plus(self.retention), expires_at.plus(self.report_retention.max(self.retention)))
    }
}

/// Strikes against a user (wrong numbers, wrong TOTP codes): `limit` within
/// `window` block the user (or lock VerifyTotp) for `block_for`.
#[derive(Clone, Debug)]
pub struct StrikePolicy {
    pub limit: u32,
    pub window: Duration,
    pub block_for: Duration,
}

/// VerifyTotp's bounds on guessing: `strikes` wrong codes in its window lock it for
/// `strikes.block_for`; `max_consecutive` wrong codes since the last accepted one
/// lock it until UnblockUser (NIST SP 800-63B allows at most 100).
#[derive(Clone, Debug)]
pub struct TotpPolicy {
    pub strikes: StrikePolicy,
    pub max_consecutive: u32,
}

/// Whether a VerifyTotp attempt may compare its code.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TotpAttempt {
    /// Reserved: it counts as a wrong code unless `totp_attempt_succeeded` follows.
    Allowed,
    /// Locked until then; `None`: until UnblockUser.
    Locked { until: Option<Millis> },
}

/// How many credentials a user may gather (each a way in for whoever holds it).
#[derive(Clone, Debug)]
pub struct EnrollmentLimits {
    /// Devices and TOTP credentials of one user.
    pub max_devices: u32,
    /// Enrollments begun and neither completed nor expired.
    pub max_open_enrollments: u32,
}

/// Why a user is blocked, weakest first: a stronger reason is never replaced by a
/// weaker one.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub enum BlockReason {
    WrongNumbers,
    FraudReported,
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

    /// The block that stands when `self` (in force at `now`, or not) meets `new`:
    /// the stronger reason and the later end (no end beats any end), so a later
    /// wrong-number strike never shortens or weakens a fraud block.
    pub fn merge(&self, new: UserBlock, now: Millis) -> UserBlock {
        if !self.in_force(now) {
            return new;
        }
        let until = match (self.until, new.until) {
            (None, _) | (_, None) => None,
            (Some(a), Some(b)) => Some(a.max(b)),
        };
        UserBlock { reason: self.reason.max(new.reason), since: self.since.min(new.since), until }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CreateOutcome {
    Created(Challenge),
    /// The same request_id for the same user while that challenge lives.
    Existing(Challenge),
    Refused(Refusal),
}

/// A user's devices as read for a new challenge, with what lets the store check,
/// in the create's own step, that they are still the devices its pushes were
/// chosen from ([`Store::create_challenge_for`]).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ChallengeDevices {
    pub devices: Vec<Device>,
    /// The store's fingerprint of the devices as read; `None`: nothing to check
    /// (the store read them fresh and its create needs no check).
    pub seen: Option<String>,
}

/// What [`Store::create_challenge_for`] did. (Returned once per create and taken
/// apart at once: boxing the larger variant would only add an allocation.)
#[allow(clippy::large_enum_variant)]
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CreateFor {
    Done(CreateOutcome),
    /// [`PushesFrom::Store`]: created, with the deliveries the store chose from
    /// these devices (the user's in the create's own step).
    Chose(Challenge, ChallengeDevices),
    /// The user's devices are not the ones the challenge was made for, or (with
    /// [`PushesFrom::Store`]) the store could not choose its pushes: nothing was
    /// written; here they are as they stand, to choose the pushes from.
    DevicesChanged(ChallengeDevices),
}

/// Who chooses a new challenge's pushes ([`Store::create_challenge_for`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PushesFrom<'a> {
    /// The caller did, from the devices of [`Store::challenge_devices`]: their
    /// fingerprint (`seen`), checked in the create's step; `None` checks nothing.
    Devices(Option<&'a str>),
    /// The store does, in the create's own step, from the user's devices as they
    /// stand ([`PushRoom::choose`]; the challenge comes without deliveries): what
    /// [`Store::challenge_devices`] asks for when it does not remember them, so
    /// that a first sign-in is one step, not a read and then a create.
    Store(PushRoom),
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
    /// The user has `EnrollmentLimits::max_devices` already.
    TooManyDevices {
        limit: u32,
    },
    /// The device's public key is enrolled already (for any user).
    KeyInUse,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum InsertOutcome {
    Inserted,
    /// The user has `EnrollmentLimits::max_open_enrollments` open already.
    TooManyOpen {
        limit: u32,
    },
}

/// What [`Store::purge_tenant`] found of a tenant (and removed, unless it was a dry run).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TenantPurge {
    /// The tenant's users with anything in the store (their limit state went too).
    pub users: u64,
    pub devices: u64,
    pub enrollments: u64,
    pub challenges: u64,
}

/// A device's signed answer to a challenge, all that [`Store::answer_challenge`]
/// does for it: the proof spent, the number compared with the challenge's, the
/// challenge resolved, the device's last use recorded.
pub struct DeviceAnswer<'a> {
    /// The device whose proof was checked (against this record's key).
    pub device: &'a Device,
    /// The proof's use, spent here: a second answer with it is refused.
    pub proof: ProofUse,
    /// How long the spent proof is remembered.
    pub proof_keep_until: Millis,
    pub challenge: &'a ChallengeId,
    /// The number the user typed; `None` when none (or not two digits) was typed.
    pub typed: Option<ChallengeNumber>,
    /// The resolution when `typed` is the challenge's number, and otherwise
    /// ([`crate::domain::challenge::Decision::resolutions`]).
    pub on_match: Resolution,
    pub otherwise: Resolution,
}

impl DeviceAnswer<'_> {
    /// The resolution this answer comes to for `challenge`.
    pub fn decide(&self, challenge: &Challenge) -> Resolution {
        if self.typed == Some(challenge.number) { self.on_match.clone() } else { self.otherwise.clone() }
    }
}

/// What became of a [`DeviceAnswer`].
// Returned once per answer and taken apart at once, never stored: boxing the
// large variant would only add an allocation.
#[allow(clippy::large_enum_variant)]
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Answered {
    /// The proof was spent already: nothing else was done.
    Replayed,
    /// The device was removed after it was read: nothing else was done.
    DeviceGone,
    /// The challenge is unknown, past its retention, or another user's (the
    /// proof is spent).
    Unknown,
    /// The challenge was answered: `accepted` in the outcome says whether this
    /// answer is the one that resolved it.
    Done {
        /// The resolution the answer came to (whether or not it was accepted).
        resolution: Resolution,
        outcome: ResolveOutcome,
        /// The user's devices, read with the answer when it was accepted (the
        /// broker clears the others' prompts); `None` when not read.
        devices: Option<Vec<Device>>,
    },
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

    /// The user's devices for a new challenge. A backend may answer from what it
    /// read lately (Redis: each replica remembers a user's devices) when its
    /// [`Store::create_challenge_for`] checks them in the same step as the insert;
    /// `None` when it does not remember them: the create then chooses the pushes
    /// itself ([`PushesFrom::Store`]), which saves a read.
    async fn challenge_devices(&self, tenant: &TenantId, user: &UserId) -> Result<Option<ChallengeDevices>, StoreError> {
        Ok(Some(ChallengeDevices { devices: self.list_devices(tenant, user).await?, seen: None }))
    }

    /// [`Store::create_challenge`] for a challenge whose pushes were chosen from the
    /// devices of [`Store::challenge_devices`] (`seen`, their fingerprint): if the
    /// user's devices changed since, nothing is written and they are returned. With
    /// [`PushesFrom::Store`], the store chooses them from the user's devices
    /// ([`PushRoom::choose`]; Redis in the insert's own step, this default from a
    /// read just before it, as the default [`Store::challenge_devices`] does); when
    /// it cannot (no device answers, no room), nothing is written and the devices
    /// are returned.
    async fn create_challenge_for(
        &self,
        mut challenge: Challenge,
        policy: &AdmissionPolicy,
        now: Millis,
        pushes: PushesFrom<'_>,
    ) -> Result<CreateFor, StoreError> {
        let PushesFrom::Store(room) = pushes else {
            return Ok(CreateFor::Done(self.create_challenge(challenge, policy, now).await?));
        };
        let devices = ChallengeDevices { devices: self.list_devices(&challenge.tenant, &challenge.user_id).await?, seen: None };
        let Some(deliveries) = room.choose(&devices.devices) else { return Ok(CreateFor::DevicesChanged(devices)) };
        challenge.deliveries = deliveries;
        Ok(match self.create_challenge(challenge, policy, now).await? {
            CreateOutcome::Created(created) => CreateFor::Chose(created, devices),
            other => CreateFor::Done(other),
        })
    }

    /// The device whose proof an answer carries. A backend may answer from what it
    /// read lately (Redis: each replica remembers the devices that answered): a
    /// device's id, owner and key never change, and [`Store::answer_challenge`]
    /// checks in its own step that the device is still enrolled. Only for that.
    async fn answering_device(&self, id: &DeviceId) -> Result<Option<Device>, StoreError> {
        self.get_device(id).await
    }

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

    /// A device's answer ([`DeviceAnswer`]) as one step: the device still there
    /// (removed since it was read: nothing is done), the proof spent (a replay
    /// does nothing else), the challenge of the device's user decided
    /// from its number as read and set as [`Store::resolve_challenge`] sets it,
    /// the device's last use recorded when the challenge was found. A backend may
    /// do it in one round trip (Redis: one script); this default composes the
    /// other operations.
    async fn answer_challenge(&self, answer: &DeviceAnswer<'_>, now: Millis) -> Result<Answered, StoreError> {
        let device = answer.device;
        if self.get_device(&device.id).await?.is_none() {
            return Ok(Answered::DeviceGone);
        }
        if !self.spend_proof(answer.proof, answer.proof_keep_until).await? {
            return Ok(Answered::Replayed);
        }
        let Some(challenge) =
            self.get_challenge(&device.tenant, answer.challenge, now).await?.filter(|c| c.user_id == device.user_id)
        else {
            return Ok(Answered::Unknown);
        };
        let resolution = answer.decide(&challenge);
        let Some(outcome) = self.resolve_challenge(&device.tenant, answer.challenge, resolution.clone(), now).await? else {
            return Ok(Answered::Unknown);
        };
        if let Err(error) = self.touch_device(&device.id, now).await {
            tracing::warn!(%error, "could not record the device's last use");
        }
        Ok(Answered::Done { resolution, outcome, devices: None })
    }

    /// Records a delivery's latest state on the challenge and wakes its watchers.
    /// A challenge that is gone already is no error.
    async fn record_delivery(&self, id: &ChallengeId, delivery: Delivery) -> Result<(), StoreError> {
        self.record_deliveries(id, vec![delivery]).await
    }

    /// [`Store::record_delivery`] for several deliveries of one challenge, as one
    /// change: one version, one wake-up of its watchers.
    async fn record_deliveries(&self, id: &ChallengeId, deliveries: Vec<Delivery>) -> Result<(), StoreError>;

    /// The user's PENDING challenges, newest first.
    async fn pending_challenges(&self, tenant: &TenantId, user: &UserId, now: Millis) -> Result<Vec<Challenge>, StoreError>;

    // ---- enrollments and devices: durable ----

    /// Inserts the enrollment unless its user has too many open ones, atomically.
    /// Enrollments are kept a while after their expiry (GetEnrollment reads them
    /// EXPIRED or COMPLETED), then purged.
    async fn insert_enrollment(
        &self,
        enrollment: Enrollment,
        limits: &EnrollmentLimits,
        now: Millis,
    ) -> Result<InsertOutcome, StoreError>;

    async fn get_enrollment(&self, tenant: &TenantId, id: &EnrollmentId) -> Result<Option<Enrollment>, StoreError>;

    /// The enrollment whose code has this digest, whatever its state.
    async fn enrollment_by_code(&self, code: &CodeDigest) -> Result<Option<Enrollment>, StoreError>;

    /// Spends a one-time code and adds `device`, atomically: a code completes once,
    /// a user holds at most `limits.max_devices`, and a public key enrolls once.
    async fn complete_enrollment(
        &self,
        code: &CodeDigest,
        device: Device,
        limits: &EnrollmentLimits,
        now: Millis,
    ) -> Result<CompleteOutcome, StoreError>;

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

    /// Blocks the user, merged atomically with a block in force ([`UserBlock::merge`]);
    /// returns the block that stands.
    async fn block_user(&self, tenant: &TenantId, user: &UserId, block: UserBlock, now: Millis) -> Result<UserBlock, StoreError>;

    /// Counts a wrong number; when it is the `limit`-th in the window, blocks the user
    /// (merged as `block_user` does) and returns the block that stands.
    async fn record_wrong_number(
        &self,
        tenant: &TenantId,
        user: &UserId,
        policy: &StrikePolicy,
        now: Millis,
    ) -> Result<Option<UserBlock>, StoreError>;

    /// Lifts any block and VerifyTotp lock, and forgets counted wrong numbers and
    /// wrong codes.
    async fn unblock_user(&self, tenant: &TenantId, user: &UserId) -> Result<(), StoreError>;

    // ---- TOTP ----

    /// Completes a pending TOTP enrollment of `tenant` with `device` (its credential),
    /// atomically: an enrollment confirms once, and a user holds at most
    /// `limits.max_devices`.
    async fn confirm_totp_enrollment(
        &self,
        tenant: &TenantId,
        id: &EnrollmentId,
        device: Device,
        limits: &EnrollmentLimits,
        now: Millis,
    ) -> Result<CompleteOutcome, StoreError>;

    /// Accepts TOTP `step` for the device if it is later than every step accepted
    /// before, atomically: of racing uses of one code exactly one returns true.
    async fn spend_totp_step(&self, id: &DeviceId, step: u64) -> Result<bool, StoreError>;

    /// Reserves one VerifyTotp attempt before its code is compared, atomically: of
    /// any number of racing attempts at most as many as the policy has left are
    /// `Allowed`. An allowed attempt counts as a wrong code (in the window, and
    /// towards `max_consecutive`) unless `totp_attempt_succeeded` follows.
    async fn reserve_totp_attempt(
        &self,
        tenant: &TenantId,
        user: &UserId,
        policy: &TotpPolicy,
        now: Millis,
    ) -> Result<TotpAttempt, StoreError>;

    /// The reserved attempt's code was right: it no longer counts as a wrong code,
    /// and the consecutive count starts again.
    async fn totp_attempt_succeeded(&self, tenant: &TenantId, user: &UserId, now: Millis) -> Result<(), StoreError>;

    // ---- device proofs ----

    /// Records a use of a device proof; false when it was used before. `keep_until`:
    /// past it the proof's timestamp is out of the window and the record may go.
    async fn spend_proof(&self, proof: ProofUse, keep_until: Millis) -> Result<bool, StoreError>;

    /// How many records the store holds now (entries in memory and in the file;
    /// keys in Redis): what its size grows with.
    async fn record_count(&self) -> Result<u64, StoreError>;

    // ---- operators ----

    /// Counts everything the store holds of `tenant` (its users' devices,
    /// enrollments, challenges, blocks and limit state, and the indexes that find
    /// them) and, unless `dry_run`, removes it. For a tenant removed from the
    /// configuration (`pushmatch purge-tenant`); nothing of another tenant is touched,
    /// even a user of the same id.
    async fn purge_tenant(&self, tenant: &TenantId, dry_run: bool) -> Result<TenantPurge, StoreError>;
}
