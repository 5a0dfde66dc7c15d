//! The conformance cases of the rules an attacker runs into (SECURITY.md): TOTP
//! guesses reserved before they are compared and capped in a row, blocks that
//! merge, caps on devices and open enrollments, a public key that enrolls once, and
//! device proofs that work once. Each is atomic in the store, so each case also
//! races.

use std::time::Duration;

use super::*;
use crate::domain::challenge::Decision;
use crate::domain::device::ProofUse;
use crate::store::{BlockReason, InsertOutcome, StrikePolicy, TotpAttempt, TotpPolicy};

/// The API's defaults: 5 wrong codes in 5 minutes lock for 5 minutes; 20 in a row
/// lock until UnblockUser.
pub fn totp_policy() -> TotpPolicy {
    TotpPolicy {
        strikes: StrikePolicy { limit: 5, window: Duration::from_secs(300), block_for: Duration::from_secs(300) },
        max_consecutive: 20,
    }
}

pub async fn parallel_totp_guesses_are_reserved_before_the_compare<S: Store>(store: &S, clock: &ManualClock, scope: &Scope) {
    let (t, u) = (scope.tenant("a"), user("u"));
    let now = clock.now();
    let policy = totp_policy();
    let racing = (0..50).map(|_| store.reserve_totp_attempt(&t, &u, &policy, now));
    let attempts: Vec<TotpAttempt> = futures::future::join_all(racing).await.into_iter().map(|a| a.expect("reserve")).collect();
    let allowed = attempts.iter().filter(|a| **a == TotpAttempt::Allowed).count();
    assert_eq!(allowed, 5, "of 50 parallel guesses, at most the window's 5 compare a code");
    let until = now.plus(Duration::from_secs(300));
    assert!(
        attempts.iter().all(|a| *a == TotpAttempt::Allowed || *a == TotpAttempt::Locked { until: Some(until) }),
        "{attempts:?}"
    );
    assert_eq!(store.reserve_totp_attempt(&t, &user("other"), &totp_policy(), now).await.expect("reserve"), TotpAttempt::Allowed);

    // A right code refunds its attempt: the user is not locked out by their own login.
    let (v, policy) = (user("v"), totp_policy());
    for _ in 0..10 {
        assert_eq!(store.reserve_totp_attempt(&t, &v, &policy, now).await.expect("reserve"), TotpAttempt::Allowed);
        store.totp_attempt_succeeded(&t, &v, now).await.expect("succeeded");
    }
    // The lock ends by itself.
    clock.advance(Duration::from_secs(301));
    assert_eq!(store.reserve_totp_attempt(&t, &u, &totp_policy(), clock.now()).await.expect("reserve"), TotpAttempt::Allowed);
}

pub async fn consecutive_totp_failures_lock_until_unblock<S: Store>(store: &S, clock: &ManualClock, scope: &Scope) {
    let (t, u) = (scope.tenant("a"), user("u"));
    let policy = totp_policy();
    // Slower than the window's lock: 20 wrong codes, one every 70 s, never lock it...
    for attempt in 1..=20 {
        let reserved = store.reserve_totp_attempt(&t, &u, &policy, clock.now()).await.expect("reserve");
        assert_eq!(reserved, TotpAttempt::Allowed, "attempt {attempt}");
        clock.advance(Duration::from_secs(70));
    }
    // ...but the 21st in a row is refused, and stays refused however long one waits.
    assert_eq!(
        store.reserve_totp_attempt(&t, &u, &policy, clock.now()).await.expect("reserve"),
        TotpAttempt::Locked { until: None }
    );
    clock.advance(Duration::from_secs(24 * 3600));
    assert_eq!(
        store.reserve_totp_attempt(&t, &u, &policy, clock.now()).await.expect("reserve"),
        TotpAttempt::Locked { until: None }
    );
    store.unblock_user(&t, &u).await.expect("unblock");
    assert_eq!(store.reserve_totp_attempt(&t, &u, &policy, clock.now()).await.expect("reserve"), TotpAttempt::Allowed);

    // A right code starts the count again.
    let v = user("v");
    for _ in 0..19 {
        store.reserve_totp_attempt(&t, &v, &policy, clock.now()).await.expect("reserve");
        clock.advance(Duration::from_secs(70));
    }
    store.reserve_totp_attempt(&t, &v, &policy, clock.now()).await.expect("reserve");
    store.totp_attempt_succeeded(&t, &v, clock.now()).await.expect("succeeded");
    clock.advance(Duration::from_secs(70));
    assert_eq!(store.reserve_totp_attempt(&t, &v, &policy, clock.now()).await.expect("reserve"), TotpAttempt::Allowed);
}

pub async fn blocks_merge_and_the_stronger_longer_one_stands<S: Store>(store: &S, clock: &ManualClock, scope: &Scope) {
    let (t, u) = (scope.tenant("a"), user("u"));
    let now = clock.now();
    let fraud = UserBlock { reason: BlockReason::FraudReported, since: now, until: None };
    store.block_user(&t, &u, fraud.clone(), now).await.expect("block");
    // A wrong-number strike later must not turn the fraud block into 15 minutes.
    let wrong = StrikePolicy { limit: 1, window: Duration::from_secs(900), block_for: Duration::from_secs(900) };
    clock.advance(Duration::from_secs(1));
    let standing = store.record_wrong_number(&t, &u, &wrong, clock.now()).await.expect("count").expect("blocks");
    assert_eq!(standing, fraud, "the fraud block stands");
    clock.advance(Duration::from_secs(3600));
    assert_eq!(block_in_force(store, &t, &u, clock.now()).await, Some(fraud.clone()), "still blocked an hour later");

    // Two timed blocks: the later end stands, and a shorter one does not cut it.
    let v = user("v");
    let start = clock.now();
    let long = UserBlock { reason: BlockReason::WrongNumbers, since: start, until: Some(start.plus(Duration::from_secs(3600))) };
    let short = UserBlock { reason: BlockReason::WrongNumbers, since: start, until: Some(start.plus(Duration::from_secs(60))) };
    store.block_user(&t, &v, long.clone(), start).await.expect("block");
    assert_eq!(store.block_user(&t, &v, short, start).await.expect("block"), long);
    // A fraud block upgrades a timed one to one without end.
    let upgraded = store.block_user(&t, &v, fraud, start).await.expect("block");
    assert_eq!((upgraded.reason, upgraded.until), (BlockReason::FraudReported, None));
}

pub async fn devices_and_open_enrollments_are_capped<S: Store>(store: &S, clock: &ManualClock, scope: &Scope) {
    let (t, u) = (scope.tenant("a"), user("u"));
    let caps = EnrollmentLimits { max_devices: 3, max_open_enrollments: 2 };
    let now = clock.now();
    let first = sample_enrollment(&t, &u, now);
    assert_eq!(store.insert_enrollment(first.clone(), &caps, now).await.expect("insert"), InsertOutcome::Inserted);
    assert_eq!(
        store.insert_enrollment(sample_enrollment(&t, &u, now), &caps, now).await.expect("insert"),
        InsertOutcome::Inserted
    );
    let refused = store.insert_enrollment(sample_enrollment(&t, &u, now), &caps, now).await.expect("insert");
    assert_eq!(refused, InsertOutcome::TooManyOpen { limit: 2 });
    assert_eq!(
        store.insert_enrollment(sample_enrollment(&t, &user("v"), now), &caps, now).await.expect("insert"),
        InsertOutcome::Inserted
    );
    // A completed enrollment is no longer open.
    let code = first.code_digest.as_ref().expect("code");
    assert!(matches!(
        store.complete_enrollment(code, sample_device(&t, &u, now), &caps, now).await.expect("complete"),
        CompleteOutcome::Completed(_)
    ));
    assert_eq!(
        store.insert_enrollment(sample_enrollment(&t, &u, now), &caps, now).await.expect("insert"),
        InsertOutcome::Inserted
    );
    // Nor is an expired one.
    clock.advance(Duration::from_secs(600));
    let now = clock.now();
    assert_eq!(
        store.insert_enrollment(sample_enrollment(&t, &u, now), &caps, now).await.expect("insert"),
        InsertOutcome::Inserted
    );

    // Devices: ten codes raced for a user who has one device and may have three.
    let racer = user("racer");
    let codes: Vec<Enrollment> = (0..10).map(|_| sample_enrollment(&t, &racer, now)).collect();
    let generous = EnrollmentLimits { max_devices: 3, max_open_enrollments: 10 };
    for enrollment in &codes {
        store.insert_enrollment(enrollment.clone(), &generous, now).await.expect("insert");
    }
    let attempts = codes.iter().map(|e| {
        store.complete_enrollment(e.code_digest.as_ref().expect("code"), sample_device(&t, &racer, now), &generous, now)
    });
    let outcomes = futures::future::join_all(attempts).await;
    let completed = outcomes.iter().filter(|o| matches!(o, Ok(CompleteOutcome::Completed(_)))).count();
    let refused = outcomes.iter().filter(|o| matches!(o, Ok(CompleteOutcome::TooManyDevices { limit: 3 }))).count();
    assert_eq!((completed, refused), (3, 7), "{outcomes:?}");
    assert_eq!(store.list_devices(&t, &racer).await.expect("list").len(), 3);

    // A TOTP credential counts as a device too.
    let totp = Enrollment { kind: EnrollmentKind::Totp, code_digest: None, ..sample_enrollment(&t, &racer, now) };
    store.insert_enrollment(totp.clone(), &generous, now).await.expect("insert");
    let credential = Device { platform: None, public_key: None, ..sample_device(&t, &racer, now) };
    let outcome = store.confirm_totp_enrollment(&t, &totp.id, credential, &generous, now).await.expect("confirm");
    assert_eq!(outcome, CompleteOutcome::TooManyDevices { limit: 3 });
}

pub async fn a_public_key_enrolls_once<S: Store>(store: &S, clock: &ManualClock, scope: &Scope) {
    let now = clock.now();
    let (a, b) = (scope.tenant("a"), scope.tenant("b"));
    let device = enrolled_device(store, &a, &user("u"), now).await;
    // The same key again, for another user of another tenant, even re-encoded.
    for tenant in [&a, &b] {
        let enrollment = sample_enrollment(tenant, &user("mallory"), now);
        store.insert_enrollment(enrollment.clone(), &limits(), now).await.expect("insert");
        let copy = Device { public_key: device.public_key.clone(), ..sample_device(tenant, &user("mallory"), now) };
        let code = enrollment.code_digest.as_ref().expect("code");
        assert_eq!(store.complete_enrollment(code, copy, &limits(), now).await.expect("complete"), CompleteOutcome::KeyInUse);
        // The code was not spent: the user's own key still enrolls with it.
        let own = sample_device(tenant, &user("mallory"), now);
        assert!(matches!(
            store.complete_enrollment(code, own, &limits(), now).await.expect("complete"),
            CompleteOutcome::Completed(_)
        ));
    }
    // Removing the device frees its key.
    assert!(store.remove_device(&a, &device.id).await.expect("remove"));
    let enrollment = sample_enrollment(&a, &user("u"), now);
    store.insert_enrollment(enrollment.clone(), &limits(), now).await.expect("insert");
    let again = Device { public_key: device.public_key.clone(), ..sample_device(&a, &user("u"), now) };
    let code = enrollment.code_digest.as_ref().expect("code");
    assert!(matches!(
        store.complete_enrollment(code, again, &limits(), now).await.expect("complete"),
        CompleteOutcome::Completed(_)
    ));
}

pub async fn a_device_proof_is_spent_once<S: Store>(store: &S, clock: &ManualClock, _scope: &Scope) {
    let mut bytes = [0u8; 32];
    os_random(&mut bytes).expect("random bytes");
    let proof = ProofUse(bytes);
    let keep_until = clock.now().plus(Duration::from_secs(240));
    let racing = (0..20).map(|_| store.spend_proof(proof, keep_until));
    let first_uses = futures::future::join_all(racing).await.into_iter().filter(|r| *r.as_ref().expect("spend")).count();
    assert_eq!(first_uses, 1, "of 20 racing uses of one proof exactly one passes");
    assert!(!store.spend_proof(proof, keep_until).await.expect("spend"), "a replay later is refused");
    bytes[0] ^= 1;
    assert!(store.spend_proof(ProofUse(bytes), keep_until).await.expect("spend"), "another proof is its own");
}

pub async fn no_approval_lands_after_a_block<S: Store>(store: &S, clock: &ManualClock, scope: &Scope) {
    let (t, u) = (scope.tenant("a"), user("u"));
    let now = clock.now();
    let first = create(store, sample_challenge(&t, &u, now, None), now).await;
    let second = create(store, sample_challenge(&t, &u, now, None), now).await;
    let mut watch = store.watch_challenge(&t, &second.id, now).await.expect("watch").expect("found");
    let device = DeviceId::generate().expect("id");
    // "Approve the other one, it's 42": the block is in, the approval must not land.
    let fraud = UserBlock { reason: BlockReason::FraudReported, since: now, until: None };
    store.block_user(&t, &u, fraud, now).await.expect("block");
    let approval = Decision::Approve.resolve(Some(second.number), second.number, device.clone());
    let outcome = store.resolve_challenge(&t, &second.id, approval, now).await.expect("resolve").expect("found");
    assert!(!outcome.accepted, "an approval after the block is not accepted");
    assert_eq!(outcome.challenge.state, ChallengeState::Cancelled);
    let seen = tokio::time::timeout(Duration::from_secs(5), watch.wait_for(|c| c.state.is_final()))
        .await
        .expect("the watcher hears of it")
        .expect("open")
        .clone();
    assert_eq!(seen.state, ChallengeState::Cancelled);
    // A denial (or a fraud report) is still taken.
    let deny = Decision::Deny.resolve(None, first.number, device.clone());
    assert!(store.resolve_challenge(&t, &first.id, deny, now).await.expect("resolve").expect("found").accepted);

    // A block that has ended stops nobody.
    let v = user("v");
    let short = UserBlock { reason: BlockReason::WrongNumbers, since: now, until: Some(now.plus(Duration::from_secs(60))) };
    store.block_user(&t, &v, short, now).await.expect("block");
    clock.advance(Duration::from_secs(61));
    let later = clock.now();
    let challenge = create(store, sample_challenge(&t, &v, later, None), later).await;
    let approval = Decision::Approve.resolve(Some(challenge.number), challenge.number, device);
    let outcome = store.resolve_challenge(&t, &challenge.id, approval, later).await.expect("resolve").expect("found");
    assert!(outcome.accepted);
    assert_eq!(outcome.challenge.state, ChallengeState::Approved);
}
