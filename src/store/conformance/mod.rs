// Test support: a failed expectation here is a failed test, so panicking is the point.
#![allow(clippy::expect_used, clippy::unwrap_used, clippy::panic)]

//! The store conformance suite: the behaviour every [`Store`] backend must show.
//!
//! Each case is a public async fn `(store, clock, scope)`. A backend runs them as one
//! `#[tokio::test]` per case, named after the case, with `conformance_suite!`:
//!
//! ```ignore
//! #[cfg(test)]
//! mod conformance {
//!     use std::sync::Arc;
//!
//!     use crate::domain::time::ManualClock;
//!
//!     /// A store for one case, on `clock`. Cases run in parallel; each names its
//!     /// tenants through its own `Scope`, so they may share one backend.
//!     async fn store(clock: ManualClock) -> (super::EmbeddedStore, tempfile::TempDir) {
//!         let dir = tempfile::tempdir().expect("tempdir");
//!         let store = super::EmbeddedStore::open(dir.path(), Arc::new(clock)).await.expect("store opens");
//!         (store, dir) // the temp dir lives as long as the case
//!     }
//!
//!     crate::store::conformance::conformance_suite!(store);
//! }
//! ```
//!
//! That expands, in the module it is invoked in, to `async fn challenges_are_tenant_scoped()`,
//! `async fn request_id_is_idempotent()`, ... (one per case, on a multi-thread runtime with
//! two workers), so invoke it once per module: two backends in one file take a module each
//! (see the Redis store's tests). The factory is any expression callable as
//! `factory(ManualClock) -> impl Future<Output = F>`, where `F` is the store itself or a
//! `(store, guard)` pair ([`Fixture`]). Each case gets a fresh [`ManualClock`] (which the
//! factory must give the store) and a fresh [`Scope`].
//!
//! [`run_all`] runs every case in sequence in one test (the first failure hides the rest).
//!
//! `model` (tests only) checks the same stores against a model of the rules with
//! random sequences of calls; each backend runs it as `model_matches_the_rules`.

use std::future::Future;
use std::time::Duration;

use super::{AdmissionPolicy, CompleteOutcome, CreateOutcome, EnrollmentLimits, Refusal, Store, UserBlock};
use crate::domain::challenge::{Challenge, ChallengeState, Delivery, DeliveryState, Platform, SignInContext};
use crate::domain::device::{Device, DevicePublicKey, KeyAlgorithm};
use crate::domain::enrollment::{Enrollment, EnrollmentKind};
use crate::domain::ids::{ChallengeId, ChallengeNumber, DeviceId, EnrollmentCode, EnrollmentId, TenantId, UserId, os_random};

mod cases;
mod choosing;
mod guards;
#[cfg(test)]
pub mod model;
mod operators;

use crate::domain::time::{Clock, ManualClock, Millis};
pub use cases::*;
pub use choosing::*;
pub use guards::*;
pub use operators::*;

/// The API's defaults: 10 devices and 5 open enrollments a user.
pub fn limits() -> EnrollmentLimits {
    EnrollmentLimits { max_devices: 10, max_open_enrollments: 5 }
}

pub fn policy() -> AdmissionPolicy {
    AdmissionPolicy {
        max_pending: 3,
        max_per_window: 10,
        window: Duration::from_secs(600),
        retention: Duration::from_secs(300),
        report_retention: Duration::from_secs(900),
    }
}

pub fn sample_challenge(tenant: &TenantId, user: &UserId, now: Millis, request_id: Option<&str>) -> Challenge {
    Challenge {
        id: ChallengeId::generate().expect("id"),
        tenant: tenant.clone(),
        user_id: user.clone(),
        number: ChallengeNumber::generate().expect("number"),
        state: ChallengeState::Pending,
        deny_reason: None,
        context: SignInContext::default(),
        created_at: now,
        expires_at: now.plus(Duration::from_secs(60)),
        resolved_at: None,
        resolved_by: None,
        deliveries: vec![],
        request_id: request_id.map(str::to_owned),
    }
}

/// A delivery to a new device: SENT on the first attempt.
pub fn sample_delivery() -> Delivery {
    Delivery {
        device_id: DeviceId::generate().expect("id"),
        platform: Platform::Apns,
        state: DeliveryState::Sent,
        attempts: 1,
        error: String::new(),
    }
}

pub fn sample_device(tenant: &TenantId, user: &UserId, now: Millis) -> Device {
    // A key of its own: a public key enrolls once.
    let mut seed = [0u8; 32];
    os_random(&mut seed).expect("random bytes");
    let key = ed25519_dalek::SigningKey::from_bytes(&seed).verifying_key().to_bytes().to_vec();
    Device {
        id: DeviceId::generate().expect("id"),
        tenant: tenant.clone(),
        user_id: user.clone(),
        display_name: "Jan's phone".into(),
        account_name: "jan@gors.nl".into(),
        platform: Some(Platform::Fcm),
        push_token: "token-1".into(),
        push_enabled: true,
        public_key: Some(DevicePublicKey::new(KeyAlgorithm::Ed25519, key).expect("key")),
        totp_secret: None,
        totp_last_step: None,
        enrolled_at: now,
        last_used_at: None,
    }
}

pub fn sample_enrollment(tenant: &TenantId, user: &UserId, now: Millis) -> Enrollment {
    Enrollment {
        id: EnrollmentId::generate().expect("id"),
        tenant: tenant.clone(),
        user_id: user.clone(),
        account_name: "jan@gors.nl".into(),
        kind: EnrollmentKind::Push,
        code_digest: Some(EnrollmentCode::generate().expect("code").digest()),
        totp_secret: None,
        created_at: now,
        expires_at: now.plus(Duration::from_secs(600)),
        completed: false,
        device_id: None,
    }
}

/// The names of one run of a case: its tenants carry a suffix of their own, so
/// cases that share a backend (one Redis for many tests at once) never see each
/// other's records: every record belongs to a tenant's user or is found by a
/// random id.
pub struct Scope {
    suffix: String,
}

impl Scope {
    pub fn unique() -> Self {
        let mut bytes = [0u8; 8];
        os_random(&mut bytes).expect("random bytes");
        Self { suffix: hex::encode(bytes) }
    }

    /// This run's tenant called `name`: the same for the same name, distinct from
    /// every other run's.
    pub fn tenant(&self, name: &str) -> TenantId {
        TenantId(format!("{name}-{}", self.suffix))
    }
}

/// What a backend's factory returns: the store alone, or the store and something
/// that must live as long as the case does (a temp dir, say).
pub trait Fixture {
    type Store: Store;
    fn store(&self) -> &Self::Store;
}

impl<S: Store> Fixture for S {
    type Store = S;
    fn store(&self) -> &S {
        self
    }
}

impl<S: Store, G> Fixture for (S, G) {
    type Store = S;
    fn store(&self) -> &S {
        &self.0
    }
}

pub(super) fn user(name: &str) -> UserId {
    UserId::parse(name).expect("user")
}

/// A device enrolled through a fresh enrollment of `user`.
pub async fn enrolled_device<S: Store>(store: &S, tenant: &TenantId, user: &UserId, now: Millis) -> Device {
    let enrollment = sample_enrollment(tenant, user, now);
    store.insert_enrollment(enrollment.clone(), &limits(), now).await.expect("insert");
    let device = sample_device(tenant, user, now);
    let code = enrollment.code_digest.as_ref().expect("code");
    let outcome = store.complete_enrollment(code, device.clone(), &limits(), now).await.expect("complete");
    assert!(matches!(outcome, CompleteOutcome::Completed(_)), "{outcome:?}");
    device
}

/// A device's answer as the broker makes one: `decision` with `typed`, signed
/// by a fresh proof (kept 5 minutes from `now`).
pub fn device_answer<'a>(
    device: &'a Device,
    challenge: &'a ChallengeId,
    decision: crate::domain::challenge::Decision,
    typed: Option<ChallengeNumber>,
    now: Millis,
) -> crate::store::DeviceAnswer<'a> {
    let (on_match, otherwise) = decision.resolutions(device.id.clone());
    let mut proof = [0u8; 32];
    os_random(&mut proof).expect("random");
    crate::store::DeviceAnswer {
        device,
        proof: crate::domain::device::ProofUse(proof),
        proof_keep_until: now.plus(Duration::from_secs(300)),
        challenge,
        typed,
        on_match,
        otherwise,
    }
}

/// The block in force for the user, read the way the broker meets it: a create
/// refused as Blocked (a create that is not refused makes a challenge).
pub(super) async fn block_in_force<S: Store>(store: &S, tenant: &TenantId, user: &UserId, now: Millis) -> Option<UserBlock> {
    match store.create_challenge(sample_challenge(tenant, user, now, None), &policy(), now).await.expect("create") {
        CreateOutcome::Refused(Refusal::Blocked(block)) => Some(block),
        _ => None,
    }
}

pub(super) async fn create<S: Store>(store: &S, challenge: Challenge, now: Millis) -> Challenge {
    match store.create_challenge(challenge, &policy(), now).await.expect("create") {
        CreateOutcome::Created(c) => c,
        other => panic!("expected Created, got {other:?}"),
    }
}

/// Runs every case in sequence against fresh stores from `make`; prefer
/// `conformance_suite!`, which runs each case as a test of its own.
pub async fn run_all<S, F, Fut>(make: F)
where
    S: Store,
    F: Fn(ManualClock) -> Fut,
    Fut: Future<Output = S>,
{
    crate::store::conformance::conformance_suite!(@cases in_sequence make);
}

/// One `#[tokio::test]` per conformance case, named after it; see the module
/// documentation for how a backend invokes it.
macro_rules! conformance_suite {
    ($factory:expr $(,)?) => {
        $crate::store::conformance::conformance_suite!(@cases tests $factory);
    };
    // The one list of cases.
    (@cases $mode:ident $factory:expr) => {
        $crate::store::conformance::conformance_suite!(@$mode $factory;
            challenges_are_tenant_scoped,
            request_id_is_idempotent,
            per_user_limits_refuse,
            exactly_one_resolution_wins,
            a_device_answers_only_its_users_challenge,
            a_device_answer_meets_blocks_and_expiry,
            expiry_reaches_watchers,
            deliveries_reach_watchers,
            pending_lists_newest_first,
            enrollment_codes_complete_once,
            devices_are_tenant_scoped_and_push_toggles,
            blocks_and_wrong_numbers,
            totp_steps_are_spent_once,
            totp_enrollments_confirm_once,
            parallel_totp_guesses_are_reserved_before_the_compare,
            consecutive_totp_failures_lock_until_unblock,
            blocks_merge_and_the_stronger_longer_one_stands,
            devices_and_open_enrollments_are_capped,
            a_public_key_enrolls_once,
            a_device_proof_is_spent_once,
            no_approval_lands_after_a_block,
            a_challenge_past_its_retention_is_gone_at_once,
            purging_a_tenant_removes_its_records_and_nothing_else,
            a_create_chooses_its_pushes_from_the_devices_as_they_stand
        );
    };
    (@tests $factory:expr; $($case:ident),+) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $case() {
                $crate::store::conformance::conformance_suite!(@run $factory, $case);
            }
        )+
    };
    (@in_sequence $factory:expr; $($case:ident),+) => {
        $( $crate::store::conformance::conformance_suite!(@run $factory, $case); )+
    };
    // One case on a fresh clock, scope and store; the store goes when the case ends.
    (@run $factory:expr, $case:ident) => {{
        let clock = $crate::domain::time::ManualClock::starting_now();
        let scope = $crate::store::conformance::Scope::unique();
        let fixture = ($factory)(clock.clone()).await;
        let store = $crate::store::conformance::Fixture::store(&fixture);
        $crate::store::conformance::$case(store, &clock, &scope).await;
    }};
}
// Used by the backends' unit tests only; a `test-util` build without them leaves it unused.
#[allow(unused_imports)]
pub(crate) use conformance_suite;
