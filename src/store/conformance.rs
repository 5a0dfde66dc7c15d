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

use std::future::Future;
use std::time::Duration;

use super::{AdmissionPolicy, BlockReason, CompleteOutcome, CreateOutcome, Refusal, Store, StrikePolicy, UserBlock};
use crate::domain::challenge::{
    Challenge, ChallengeState, Decision, Delivery, DeliveryState, Platform, Resolution, SignInContext,
};
use crate::domain::device::{Device, DevicePublicKey, KeyAlgorithm};
use crate::domain::enrollment::{Enrollment, EnrollmentKind};
use crate::domain::ids::{ChallengeId, ChallengeNumber, DeviceId, EnrollmentCode, EnrollmentId, TenantId, UserId, os_random};
use crate::domain::time::{Clock, ManualClock, Millis};

pub fn policy() -> AdmissionPolicy {
    AdmissionPolicy { max_pending: 3, max_per_window: 10, window: Duration::from_secs(600), retention: Duration::from_secs(300) }
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
    let key = ed25519_dalek::SigningKey::from_bytes(&[7u8; 32]).verifying_key().to_bytes().to_vec();
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

fn user(name: &str) -> UserId {
    UserId::parse(name).expect("user")
}

/// A device enrolled through a fresh enrollment of `user`.
async fn enrolled_device<S: Store>(store: &S, tenant: &TenantId, user: &UserId, now: Millis) -> Device {
    let enrollment = sample_enrollment(tenant, user, now);
    store.insert_enrollment(enrollment.clone()).await.expect("insert");
    let device = sample_device(tenant, user, now);
    store.complete_enrollment(enrollment.code_digest.as_ref().expect("code"), device.clone(), now).await.expect("complete");
    device
}

async fn create<S: Store>(store: &S, challenge: Challenge, now: Millis) -> Challenge {
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
            expiry_reaches_watchers,
            deliveries_reach_watchers,
            pending_lists_newest_first,
            enrollment_codes_complete_once,
            devices_are_tenant_scoped_and_push_toggles,
            blocks_and_wrong_numbers,
            totp_steps_are_spent_once_and_failures_lock,
            totp_enrollments_confirm_once
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

pub async fn totp_steps_are_spent_once_and_failures_lock<S: Store>(store: &S, clock: &ManualClock, scope: &Scope) {
    let (t, u) = (scope.tenant("a"), user("u"));
    let device = enrolled_device(store, &t, &u, clock.now()).await;

    let racing = (0..20).map(|_| store.spend_totp_step(&device.id, 1000));
    let spent = futures::future::join_all(racing).await.into_iter().filter(|r| *r.as_ref().expect("spend")).count();
    assert_eq!(spent, 1, "a step is accepted once, also when 20 uses race");
    assert!(!store.spend_totp_step(&device.id, 999).await.expect("spend"), "an older step is refused after a newer one");
    assert!(store.spend_totp_step(&device.id, 1001).await.expect("spend"));
    assert_eq!(store.get_device(&device.id).await.expect("get").expect("device").totp_last_step, Some(1001));

    let lockout = StrikePolicy { limit: 5, window: Duration::from_secs(300), block_for: Duration::from_secs(300) };
    for _ in 0..4 {
        assert_eq!(store.record_totp_failure(&t, &u, &lockout, clock.now()).await.expect("count"), None);
    }
    assert_eq!(store.totp_locked_until(&t, &u, clock.now()).await.expect("read"), None);
    let until = store.record_totp_failure(&t, &u, &lockout, clock.now()).await.expect("count").expect("fifth locks");
    assert_eq!(until, clock.now().plus(Duration::from_secs(300)));
    assert_eq!(store.totp_locked_until(&t, &u, clock.now()).await.expect("read"), Some(until));
    assert_eq!(store.totp_locked_until(&t, &user("other"), clock.now()).await.expect("read"), None);
    clock.advance(Duration::from_secs(300));
    assert_eq!(store.totp_locked_until(&t, &u, clock.now()).await.expect("read"), None, "the lockout ends");
}

pub async fn totp_enrollments_confirm_once<S: Store>(store: &S, clock: &ManualClock, scope: &Scope) {
    let (t, u) = (scope.tenant("a"), user("u"));
    let enrollment = Enrollment { kind: EnrollmentKind::Totp, code_digest: None, ..sample_enrollment(&t, &u, clock.now()) };
    store.insert_enrollment(enrollment.clone()).await.expect("insert");
    let credential = Device { platform: None, public_key: None, ..sample_device(&t, &u, clock.now()) };
    assert_eq!(
        store
            .confirm_totp_enrollment(&scope.tenant("b"), &enrollment.id, credential.clone(), clock.now())
            .await
            .expect("confirm"),
        CompleteOutcome::UnknownCode,
        "another tenant's enrollment"
    );
    let outcome = store.confirm_totp_enrollment(&t, &enrollment.id, credential.clone(), clock.now()).await.expect("confirm");
    assert!(matches!(outcome, CompleteOutcome::Completed(_)), "{outcome:?}");
    let again = store.confirm_totp_enrollment(&t, &enrollment.id, credential.clone(), clock.now()).await.expect("confirm");
    assert_eq!(again, CompleteOutcome::AlreadyUsed);
    assert_eq!(store.get_device(&credential.id).await.expect("get"), Some(credential));

    let late = Enrollment { kind: EnrollmentKind::Totp, code_digest: None, ..sample_enrollment(&t, &u, clock.now()) };
    store.insert_enrollment(late.clone()).await.expect("insert");
    clock.advance(Duration::from_secs(600));
    let credential = Device { platform: None, public_key: None, ..sample_device(&t, &u, clock.now()) };
    assert_eq!(
        store.confirm_totp_enrollment(&t, &late.id, credential, clock.now()).await.expect("confirm"),
        CompleteOutcome::Expired
    );
}

pub async fn challenges_are_tenant_scoped<S: Store>(store: &S, clock: &ManualClock, scope: &Scope) {
    let now = clock.now();
    let created = create(store, sample_challenge(&scope.tenant("a"), &user("u"), now, None), now).await;
    assert_eq!(store.get_challenge(&scope.tenant("a"), &created.id, now).await.expect("get"), Some(created.clone()));
    assert_eq!(store.get_challenge(&scope.tenant("b"), &created.id, now).await.expect("get"), None);
    assert!(store.watch_challenge(&scope.tenant("b"), &created.id, now).await.expect("watch").is_none());
    let resolution = Resolution::cancelled();
    assert!(store.resolve_challenge(&scope.tenant("b"), &created.id, resolution, now).await.expect("resolve").is_none());
}

pub async fn request_id_is_idempotent<S: Store>(store: &S, clock: &ManualClock, scope: &Scope) {
    let now = clock.now();
    let first = create(store, sample_challenge(&scope.tenant("a"), &user("u"), now, Some("req-1")), now).await;
    let again = store
        .create_challenge(sample_challenge(&scope.tenant("a"), &user("u"), now, Some("req-1")), &policy(), now)
        .await
        .expect("create");
    assert_eq!(again, CreateOutcome::Existing(first.clone()));
    // The same request_id for another user is another challenge.
    create(store, sample_challenge(&scope.tenant("a"), &user("v"), now, Some("req-1")), now).await;
    // Once the first challenge expired, the key is free again.
    clock.advance(Duration::from_secs(61));
    let later = clock.now();
    let fresh = create(store, sample_challenge(&scope.tenant("a"), &user("u"), later, Some("req-1")), later).await;
    assert_ne!(fresh.id, first.id);
}

pub async fn per_user_limits_refuse<S: Store>(store: &S, clock: &ManualClock, scope: &Scope) {
    let (t, u) = (scope.tenant("a"), user("u"));
    let mut ids = vec![];
    for _ in 0..3 {
        let now = clock.now();
        ids.push(create(store, sample_challenge(&t, &u, now, None), now).await.id);
    }
    let now = clock.now();
    let refused = store.create_challenge(sample_challenge(&t, &u, now, None), &policy(), now).await.expect("create");
    assert_eq!(refused, CreateOutcome::Refused(Refusal::TooManyPending { limit: 3 }));
    // Another user is not affected.
    create(store, sample_challenge(&t, &user("other"), now, None), now).await;
    // Resolving frees a pending slot, but the window still counts every creation.
    for _ in 0..7 {
        let resolved = ids.remove(0);
        store.resolve_challenge(&t, &resolved, Resolution::cancelled(), clock.now()).await.expect("resolve");
        let now = clock.now();
        ids.push(create(store, sample_challenge(&t, &u, now, None), now).await.id);
    }
    store.resolve_challenge(&t, &ids[0], Resolution::cancelled(), clock.now()).await.expect("resolve");
    let now = clock.now();
    let refused = store.create_challenge(sample_challenge(&t, &u, now, None), &policy(), now).await.expect("create");
    assert!(matches!(refused, CreateOutcome::Refused(Refusal::RateLimited { limit: 10, .. })), "{refused:?}");
    // The window slides.
    clock.advance(Duration::from_secs(601));
    let now = clock.now();
    create(store, sample_challenge(&t, &u, now, None), now).await;
}

pub async fn exactly_one_resolution_wins<S: Store>(store: &S, clock: &ManualClock, scope: &Scope) {
    let now = clock.now();
    let challenge = create(store, sample_challenge(&scope.tenant("a"), &user("u"), now, None), now).await;
    let device = DeviceId::generate().expect("id");
    let attempts = (0..50).map(|_| {
        let resolution = Decision::Approve.resolve(Some(challenge.number), challenge.number, device.clone());
        store.resolve_challenge(&challenge.tenant, &challenge.id, resolution, now)
    });
    let outcomes = futures::future::join_all(attempts).await;
    let accepted = outcomes.iter().filter(|o| o.as_ref().expect("ok").as_ref().expect("found").accepted).count();
    assert_eq!(accepted, 1);
    for outcome in outcomes {
        assert_eq!(outcome.expect("ok").expect("found").challenge.state, ChallengeState::Approved);
    }
}

pub async fn expiry_reaches_watchers<S: Store>(store: &S, clock: &ManualClock, scope: &Scope) {
    let now = clock.now();
    let challenge = create(store, sample_challenge(&scope.tenant("a"), &user("u"), now, None), now).await;
    let mut watch = store.watch_challenge(&challenge.tenant, &challenge.id, now).await.expect("watch").expect("found");
    assert_eq!(watch.borrow_and_update().state, ChallengeState::Pending);
    clock.advance(Duration::from_secs(60));
    let seen = tokio::time::timeout(Duration::from_secs(5), watch.wait_for(|c| c.state.is_final()))
        .await
        .expect("expiry reached the watcher in time")
        .expect("watch open")
        .clone();
    assert_eq!(seen.state, ChallengeState::Expired);
    let read = store.get_challenge(&challenge.tenant, &challenge.id, clock.now()).await.expect("get").expect("retained");
    assert_eq!(read.state, ChallengeState::Expired);
    let late = Decision::Deny.resolve(None, challenge.number, DeviceId::generate().expect("id"));
    let outcome = store.resolve_challenge(&challenge.tenant, &challenge.id, late, clock.now()).await.expect("ok").expect("found");
    assert!(!outcome.accepted);
    assert_eq!(outcome.challenge.state, ChallengeState::Expired);
    // After the retention period the challenge is gone.
    clock.advance(Duration::from_secs(301));
    let gone = async {
        loop {
            if store.get_challenge(&challenge.tenant, &challenge.id, clock.now()).await.expect("get").is_none() {
                return;
            }
            tokio::task::yield_now().await;
        }
    };
    tokio::time::timeout(Duration::from_secs(5), gone).await.expect("purged after retention");
}

pub async fn deliveries_reach_watchers<S: Store>(store: &S, clock: &ManualClock, scope: &Scope) {
    let now = clock.now();
    let challenge = create(store, sample_challenge(&scope.tenant("a"), &user("u"), now, None), now).await;
    let mut watch = store.watch_challenge(&challenge.tenant, &challenge.id, now).await.expect("watch").expect("found");
    watch.borrow_and_update();
    let delivery = sample_delivery();
    store.record_delivery(&challenge.id, delivery.clone()).await.expect("record");
    tokio::time::timeout(Duration::from_secs(5), watch.changed()).await.expect("woken").expect("open");
    assert_eq!(watch.borrow().deliveries, vec![delivery]);
    // An unknown challenge is no error.
    store
        .record_delivery(&ChallengeId::generate().expect("id"), watch.borrow().deliveries[0].clone())
        .await
        .expect("unknown challenge ignored");
}

pub async fn pending_lists_newest_first<S: Store>(store: &S, clock: &ManualClock, scope: &Scope) {
    let (t, u) = (scope.tenant("a"), user("u"));
    let first = create(store, sample_challenge(&t, &u, clock.now(), None), clock.now()).await;
    clock.advance(Duration::from_secs(1));
    let second = create(store, sample_challenge(&t, &u, clock.now(), None), clock.now()).await;
    clock.advance(Duration::from_secs(1));
    let third = create(store, sample_challenge(&t, &u, clock.now(), None), clock.now()).await;
    store.resolve_challenge(&t, &second.id, Resolution::cancelled(), clock.now()).await.expect("resolve");
    let pending: Vec<_> = store.pending_challenges(&t, &u, clock.now()).await.expect("list").into_iter().map(|c| c.id).collect();
    assert_eq!(pending, vec![third.id, first.id]);
    assert!(store.pending_challenges(&scope.tenant("b"), &u, clock.now()).await.expect("list").is_empty());
}

pub async fn enrollment_codes_complete_once<S: Store>(store: &S, clock: &ManualClock, scope: &Scope) {
    let (t, u) = (scope.tenant("a"), user("u"));
    let enrollment = sample_enrollment(&t, &u, clock.now());
    let code = enrollment.code_digest.clone().expect("push enrollment");
    store.insert_enrollment(enrollment.clone()).await.expect("insert");
    assert_eq!(store.get_enrollment(&t, &enrollment.id).await.expect("get"), Some(enrollment.clone()));
    assert_eq!(store.get_enrollment(&scope.tenant("b"), &enrollment.id).await.expect("get"), None);

    assert_eq!(store.enrollment_by_code(&code).await.expect("by code"), Some(enrollment.clone()));
    let device = sample_device(&t, &u, clock.now());
    let outcome = store.complete_enrollment(&code, device.clone(), clock.now()).await.expect("complete");
    let CompleteOutcome::Completed(completed) = outcome else { panic!("expected Completed, got {outcome:?}") };
    assert_eq!(completed.device_id, Some(device.id.clone()));
    let again = store.complete_enrollment(&code, sample_device(&t, &u, clock.now()), clock.now()).await.expect("complete");
    assert_eq!(again, CompleteOutcome::AlreadyUsed);
    assert_eq!(store.list_devices(&t, &u).await.expect("list").len(), 1, "a reused code adds no device");

    let unknown = EnrollmentCode::generate().expect("code").digest();
    let outcome = store.complete_enrollment(&unknown, sample_device(&t, &u, clock.now()), clock.now()).await.expect("complete");
    assert_eq!(outcome, CompleteOutcome::UnknownCode);

    let late = sample_enrollment(&t, &u, clock.now());
    store.insert_enrollment(late.clone()).await.expect("insert");
    clock.advance(Duration::from_secs(600));
    let outcome = store
        .complete_enrollment(late.code_digest.as_ref().expect("code"), sample_device(&t, &u, clock.now()), clock.now())
        .await
        .expect("complete");
    assert_eq!(outcome, CompleteOutcome::Expired);

    // Concurrent completions of one code: exactly one device.
    let racing = sample_enrollment(&t, &user("racer"), clock.now());
    store.insert_enrollment(racing.clone()).await.expect("insert");
    let attempts = (0..10).map(|_| {
        store.complete_enrollment(
            racing.code_digest.as_ref().expect("code"),
            sample_device(&t, &user("racer"), clock.now()),
            clock.now(),
        )
    });
    let outcomes = futures::future::join_all(attempts).await;
    let completed = outcomes.iter().filter(|o| matches!(o, Ok(CompleteOutcome::Completed(_)))).count();
    assert_eq!(completed, 1);
    assert_eq!(store.list_devices(&t, &user("racer")).await.expect("list").len(), 1);
}

pub async fn devices_are_tenant_scoped_and_push_toggles<S: Store>(store: &S, clock: &ManualClock, scope: &Scope) {
    let (t, u) = (scope.tenant("a"), user("u"));
    let device = enrolled_device(store, &t, &u, clock.now()).await;

    store.disable_push(&device.id, "some-older-token").await.expect("disable");
    assert!(store.get_device(&device.id).await.expect("get").expect("device").push_enabled, "a stale token report is ignored");
    store.disable_push(&device.id, &device.push_token).await.expect("disable");
    assert!(!store.get_device(&device.id).await.expect("get").expect("device").push_enabled);
    assert!(store.set_push_token(&device.id, "token-2").await.expect("set"));
    let updated = store.get_device(&device.id).await.expect("get").expect("device");
    assert!(updated.push_enabled);
    assert_eq!(updated.push_token, "token-2");

    store.touch_device(&device.id, clock.now()).await.expect("touch");
    assert_eq!(store.get_device(&device.id).await.expect("get").expect("device").last_used_at, Some(clock.now()));

    assert!(!store.remove_device(&scope.tenant("b"), &device.id).await.expect("remove"), "another tenant cannot remove it");
    assert!(store.remove_device(&t, &device.id).await.expect("remove"));
    assert_eq!(store.get_device(&device.id).await.expect("get"), None);
    assert!(store.list_devices(&t, &u).await.expect("list").is_empty());
    assert!(!store.set_push_token(&device.id, "token-3").await.expect("set"));
}

pub async fn blocks_and_wrong_numbers<S: Store>(store: &S, clock: &ManualClock, scope: &Scope) {
    let (t, u) = (scope.tenant("a"), user("u"));
    let fraud = UserBlock { reason: BlockReason::FraudReported, since: clock.now(), until: None };
    store.block_user(&t, &u, fraud.clone()).await.expect("block");
    let now = clock.now();
    let refused = store.create_challenge(sample_challenge(&t, &u, now, None), &policy(), now).await.expect("create");
    assert_eq!(refused, CreateOutcome::Refused(Refusal::Blocked(fraud)));
    store.unblock_user(&t, &u).await.expect("unblock");
    assert_eq!(store.user_block(&t, &u, now).await.expect("read"), None);
    create(store, sample_challenge(&t, &u, now, None), now).await;

    let wrong = StrikePolicy { limit: 3, window: Duration::from_secs(900), block_for: Duration::from_secs(900) };
    let other = user("w");
    assert_eq!(store.record_wrong_number(&t, &other, &wrong, clock.now()).await.expect("count"), None);
    clock.advance(Duration::from_secs(901));
    // The first one fell out of the window: two more do not block yet.
    assert_eq!(store.record_wrong_number(&t, &other, &wrong, clock.now()).await.expect("count"), None);
    assert_eq!(store.record_wrong_number(&t, &other, &wrong, clock.now()).await.expect("count"), None);
    let block = store.record_wrong_number(&t, &other, &wrong, clock.now()).await.expect("count").expect("third blocks");
    assert_eq!(block.reason, BlockReason::WrongNumbers);
    assert!(store.user_block(&t, &other, clock.now()).await.expect("read").is_some());
    clock.advance(Duration::from_secs(900));
    assert_eq!(store.user_block(&t, &other, clock.now()).await.expect("read"), None, "the block ends by itself");
}
