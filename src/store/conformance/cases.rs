//! The conformance cases that every backend passed before the security rules:
//! challenges, enrollment, devices, blocks, TOTP steps.

use std::time::Duration;

use super::*;
use crate::domain::challenge::{Decision, DenyReason, Resolution};
use crate::store::{Answered, BlockReason, DeviceAnswer, StrikePolicy};

pub async fn totp_steps_are_spent_once<S: Store>(store: &S, clock: &ManualClock, scope: &Scope) {
    let (t, u) = (scope.tenant("a"), user("u"));
    let device = enrolled_device(store, &t, &u, clock.now()).await;

    let racing = (0..20).map(|_| store.spend_totp_step(&device.id, 1000));
    let spent = futures::future::join_all(racing).await.into_iter().filter(|r| *r.as_ref().expect("spend")).count();
    assert_eq!(spent, 1, "a step is accepted once, also when 20 uses race");
    assert!(!store.spend_totp_step(&device.id, 999).await.expect("spend"), "an older step is refused after a newer one");
    assert!(store.spend_totp_step(&device.id, 1001).await.expect("spend"));
    assert_eq!(store.get_device(&device.id).await.expect("get").expect("device").totp_last_step, Some(1001));
}

pub async fn totp_enrollments_confirm_once<S: Store>(store: &S, clock: &ManualClock, scope: &Scope) {
    let (t, u) = (scope.tenant("a"), user("u"));
    let enrollment = Enrollment { kind: EnrollmentKind::Totp, code_digest: None, ..sample_enrollment(&t, &u, clock.now()) };
    store.insert_enrollment(enrollment.clone(), &limits(), clock.now()).await.expect("insert");
    let credential = Device { platform: None, public_key: None, ..sample_device(&t, &u, clock.now()) };
    assert_eq!(
        store
            .confirm_totp_enrollment(&scope.tenant("b"), &enrollment.id, credential.clone(), &limits(), clock.now())
            .await
            .expect("confirm"),
        CompleteOutcome::UnknownCode,
        "another tenant's enrollment"
    );
    let outcome =
        store.confirm_totp_enrollment(&t, &enrollment.id, credential.clone(), &limits(), clock.now()).await.expect("confirm");
    assert!(matches!(outcome, CompleteOutcome::Completed(_)), "{outcome:?}");
    let again =
        store.confirm_totp_enrollment(&t, &enrollment.id, credential.clone(), &limits(), clock.now()).await.expect("confirm");
    assert_eq!(again, CompleteOutcome::AlreadyUsed);
    assert_eq!(store.get_device(&credential.id).await.expect("get"), Some(credential));

    let late = Enrollment { kind: EnrollmentKind::Totp, code_digest: None, ..sample_enrollment(&t, &u, clock.now()) };
    store.insert_enrollment(late.clone(), &limits(), clock.now()).await.expect("insert");
    clock.advance(Duration::from_secs(600));
    let credential = Device { platform: None, public_key: None, ..sample_device(&t, &u, clock.now()) };
    assert_eq!(
        store.confirm_totp_enrollment(&t, &late.id, credential, &limits(), clock.now()).await.expect("confirm"),
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

/// A device's answer (one store operation: device, proof, number, resolution,
/// last use) reaches only its own user's challenge, decided from the number the
/// store holds; a wrong guess at the owner changes nothing, not even where the
/// store later looks for the challenge. The user id has the characters a JSON
/// encoding escapes, the context too.
pub async fn a_device_answers_only_its_users_challenge<S: Store>(store: &S, clock: &ManualClock, scope: &Scope) {
    let now = clock.now();
    let (t, u, v) = (scope.tenant("a"), user("j\"an\\ \u{e9}"), user("v"));
    let mut odd = sample_challenge(&t, &u, now, None);
    odd.context.application = "\"state\":\"Pending\",\"deny_reason\":null,".into();
    let first = create(store, odd, now).await;
    let second = create(store, sample_challenge(&t, &u, now, None), now).await;
    let (phone, tablet) = (enrolled_device(store, &t, &u, now).await, enrolled_device(store, &t, &u, now).await);
    let stranger = enrolled_device(store, &t, &v, now).await;
    let elsewhere = enrolled_device(store, &scope.tenant("b"), &u, now).await;
    // `answer` signs an approval with a fresh proof; `run` gives it to the store.
    let run = async |answer: &DeviceAnswer<'_>, now: Millis| store.answer_challenge(answer, now).await.expect("answer");
    macro_rules! answer {
        ($device:expr, $challenge:expr, $typed:expr) => {
            device_answer($device, $challenge, Decision::Approve, $typed, now)
        };
    }
    let wrong_number = |challenge: &Challenge| {
        let shown = challenge.number.value();
        ChallengeNumber::parse_typed(&(if shown == 99 { 10 } else { shown + 1 }).to_string()).expect("two digits")
    };

    for (device, what) in [(&stranger, "another user's"), (&elsewhere, "another tenant's")] {
        assert_eq!(run(&answer!(device, &first.id, Some(first.number)), now).await, Answered::Unknown, "{what}");
    }
    let unknown = ChallengeId::generate().expect("id");
    assert_eq!(run(&answer!(&phone, &unknown, Some(first.number)), now).await, Answered::Unknown, "unknown");
    let still = store.get_challenge(&t, &first.id, now).await.expect("get").expect("still there");
    assert_eq!(still, first, "the wrong answers changed nothing");

    let right = answer!(&phone, &first.id, Some(first.number));
    let Answered::Done { resolution, outcome, devices } = run(&right, now).await else { panic!("answered") };
    assert_eq!(resolution.state, ChallengeState::Approved, "decided from the challenge's own number");
    assert!(outcome.accepted);
    let approved = Challenge {
        state: ChallengeState::Approved,
        resolved_at: Some(now),
        resolved_by: Some(phone.id.clone()),
        ..first.clone()
    };
    assert_eq!(outcome.challenge, approved, "only the resolution changed");
    assert_eq!(store.get_challenge(&t, &first.id, now).await.expect("get"), Some(approved.clone()));
    if let Some(devices) = devices {
        let ids: Vec<&DeviceId> = devices.iter().map(|d| &d.id).collect();
        assert!(ids.len() == 2 && ids.contains(&&phone.id) && ids.contains(&&tablet.id), "the user's devices: {ids:?}");
    }
    let used = store.get_device(&phone.id).await.expect("get").expect("device");
    assert_eq!(used, Device { last_used_at: Some(now), ..phone.clone() }, "the last use, and nothing else");
    assert_eq!(run(&right, now).await, Answered::Replayed, "a proof answers once");

    let later = now.plus(Duration::from_secs(1));
    let again = run(&answer!(&tablet, &first.id, Some(wrong_number(&first))), later).await;
    let Answered::Done { outcome: again, .. } = again else { panic!("found: {again:?}") };
    assert!(!again.accepted, "one resolution wins");
    assert_eq!(again.challenge, approved);

    let Answered::Done { resolution, outcome, .. } = run(&answer!(&tablet, &second.id, Some(wrong_number(&second))), later).await
    else {
        panic!("answered")
    };
    assert_eq!((resolution.state, resolution.deny_reason), (ChallengeState::Denied, Some(DenyReason::WrongNumber)));
    assert!(outcome.accepted);
    let denied = Challenge {
        state: ChallengeState::Denied,
        deny_reason: Some(DenyReason::WrongNumber),
        resolved_at: Some(later),
        resolved_by: Some(tablet.id.clone()),
        ..second.clone()
    };
    assert_eq!(store.get_challenge(&t, &second.id, later).await.expect("get"), Some(denied));
    assert_eq!(store.get_device(&tablet.id).await.expect("get").expect("device").last_used_at, Some(later));

    // No number typed: not a match.
    let third = create(store, sample_challenge(&t, &u, later, None), later).await;
    let Answered::Done { resolution, .. } = run(&answer!(&phone, &third.id, None), later).await else { panic!("answered") };
    assert_eq!(resolution.deny_reason, Some(DenyReason::WrongNumber));

    // A removed device answers nothing.
    let fourth = create(store, sample_challenge(&t, &u, later, None), later).await;
    assert!(store.remove_device(&t, &tablet.id).await.expect("remove"));
    let gone = answer!(&tablet, &fourth.id, Some(fourth.number));
    assert_eq!(run(&gone, later).await, Answered::DeviceGone);
    assert_eq!(store.get_challenge(&t, &fourth.id, later).await.expect("get").expect("there").state, ChallengeState::Pending);
}

/// What a device's answer meets besides a PENDING challenge in time: a block in
/// force (the approval cancels instead) and the expiry (the answer is refused and
/// the challenge reads EXPIRED).
pub async fn a_device_answer_meets_blocks_and_expiry<S: Store>(store: &S, clock: &ManualClock, scope: &Scope) {
    let now = clock.now();
    let (t, u) = (scope.tenant("a"), user("u"));
    let device = enrolled_device(store, &t, &u, now).await;
    let blocked = create(store, sample_challenge(&t, &u, now, None), now).await;
    let late = create(store, sample_challenge(&t, &u, now, None), now).await;
    let answer = async |challenge: &Challenge, at: Millis| {
        let answer = device_answer(&device, &challenge.id, Decision::Approve, Some(challenge.number), at);
        store.answer_challenge(&answer, at).await.expect("answer")
    };

    let block = UserBlock { reason: BlockReason::WrongNumbers, since: now, until: Some(now.plus(Duration::from_secs(60))) };
    store.block_user(&t, &u, block, now).await.expect("block");
    let Answered::Done { outcome, .. } = answer(&blocked, now).await else { panic!("found") };
    assert!(!outcome.accepted, "no approval while blocked");
    assert_eq!(outcome.challenge.state, ChallengeState::Cancelled);
    store.unblock_user(&t, &u).await.expect("unblock");

    let past = late.expires_at;
    let Answered::Done { outcome, .. } = answer(&late, past).await else { panic!("found") };
    assert!(!outcome.accepted, "no answer after the expiry");
    assert_eq!(outcome.challenge.state, ChallengeState::Expired);
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
    // policy(): an expired challenge is kept as long as a fraud report on it may
    // count (900 s past its expiry), then it is gone.
    clock.advance(Duration::from_secs(301));
    let kept = store.get_challenge(&challenge.tenant, &challenge.id, clock.now()).await.expect("get");
    assert_eq!(kept.map(|c| c.state), Some(ChallengeState::Expired), "kept past the shorter retention");
    clock.advance(Duration::from_secs(600));
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
    assert_eq!(watch.borrow_and_update().deliveries, vec![delivery.clone()]);
    // Two at once (the reports of a challenge's pushes, recorded together): the
    // watcher's next state holds both, the first updated in place.
    let first = Delivery { state: DeliveryState::Unregistered, error: "Unregistered".into(), ..delivery };
    let second = Delivery { platform: Platform::Fcm, ..sample_delivery() };
    store.record_deliveries(&challenge.id, vec![first.clone(), second.clone()]).await.expect("record both");
    tokio::time::timeout(Duration::from_secs(5), watch.changed()).await.expect("woken").expect("open");
    // (Deliveries the record was not created with come in no set order.)
    let by_device = |mut deliveries: Vec<Delivery>| {
        deliveries.sort_by(|a, b| a.device_id.as_str().cmp(b.device_id.as_str()));
        deliveries
    };
    let both = by_device(vec![first, second]);
    assert_eq!(by_device(watch.borrow().deliveries.clone()), both);
    let read = store.get_challenge(&challenge.tenant, &challenge.id, now).await.expect("get").expect("found");
    assert_eq!(by_device(read.deliveries), both);
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
    store.insert_enrollment(enrollment.clone(), &limits(), clock.now()).await.expect("insert");
    assert_eq!(store.get_enrollment(&t, &enrollment.id).await.expect("get"), Some(enrollment.clone()));
    assert_eq!(store.get_enrollment(&scope.tenant("b"), &enrollment.id).await.expect("get"), None);

    assert_eq!(store.enrollment_by_code(&code).await.expect("by code"), Some(enrollment.clone()));
    let device = sample_device(&t, &u, clock.now());
    let outcome = store.complete_enrollment(&code, device.clone(), &limits(), clock.now()).await.expect("complete");
    let CompleteOutcome::Completed(completed) = outcome else { panic!("expected Completed, got {outcome:?}") };
    assert_eq!(completed.device_id, Some(device.id.clone()));
    let again =
        store.complete_enrollment(&code, sample_device(&t, &u, clock.now()), &limits(), clock.now()).await.expect("complete");
    assert_eq!(again, CompleteOutcome::AlreadyUsed);
    assert_eq!(store.list_devices(&t, &u).await.expect("list").len(), 1, "a reused code adds no device");

    let unknown = EnrollmentCode::generate().expect("code").digest();
    let outcome =
        store.complete_enrollment(&unknown, sample_device(&t, &u, clock.now()), &limits(), clock.now()).await.expect("complete");
    assert_eq!(outcome, CompleteOutcome::UnknownCode);

    let late = sample_enrollment(&t, &u, clock.now());
    store.insert_enrollment(late.clone(), &limits(), clock.now()).await.expect("insert");
    clock.advance(Duration::from_secs(600));
    let outcome = store
        .complete_enrollment(late.code_digest.as_ref().expect("code"), sample_device(&t, &u, clock.now()), &limits(), clock.now())
        .await
        .expect("complete");
    assert_eq!(outcome, CompleteOutcome::Expired);

    // Concurrent completions of one code: exactly one device.
    let racing = sample_enrollment(&t, &user("racer"), clock.now());
    store.insert_enrollment(racing.clone(), &limits(), clock.now()).await.expect("insert");
    let limits = limits();
    let attempts = (0..10).map(|_| {
        store.complete_enrollment(
            racing.code_digest.as_ref().expect("code"),
            sample_device(&t, &user("racer"), clock.now()),
            &limits,
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
    assert_eq!(store.block_user(&t, &u, fraud.clone(), clock.now()).await.expect("block"), fraud);
    let now = clock.now();
    let refused = store.create_challenge(sample_challenge(&t, &u, now, None), &policy(), now).await.expect("create");
    assert_eq!(refused, CreateOutcome::Refused(Refusal::Blocked(fraud)));
    store.unblock_user(&t, &u).await.expect("unblock");
    assert_eq!(block_in_force(store, &t, &u, now).await, None, "unblocked");

    let wrong = StrikePolicy { limit: 3, window: Duration::from_secs(900), block_for: Duration::from_secs(900) };
    let other = user("w");
    assert_eq!(store.record_wrong_number(&t, &other, &wrong, clock.now()).await.expect("count"), None);
    clock.advance(Duration::from_secs(901));
    // The first one fell out of the window: two more do not block yet.
    assert_eq!(store.record_wrong_number(&t, &other, &wrong, clock.now()).await.expect("count"), None);
    assert_eq!(store.record_wrong_number(&t, &other, &wrong, clock.now()).await.expect("count"), None);
    let block = store.record_wrong_number(&t, &other, &wrong, clock.now()).await.expect("count").expect("third blocks");
    assert_eq!(block.reason, BlockReason::WrongNumbers);
    assert_eq!(block_in_force(store, &t, &other, clock.now()).await, Some(block));
    clock.advance(Duration::from_secs(900));
    assert_eq!(block_in_force(store, &t, &other, clock.now()).await, None, "the block ends by itself");
}

/// Past its retention a challenge is gone for every call at once, whether or not a
/// background task has purged it yet: the calls pass a `now` the clock has not
/// reached, so no task has run. An approved or fraud-reported one goes after the
/// shorter retention; one that ended otherwise is kept while a fraud report on it
/// may still count.
pub async fn a_challenge_past_its_retention_is_gone_at_once<S: Store>(store: &S, clock: &ManualClock, scope: &Scope) {
    let t = scope.tenant("a");
    let now = clock.now();
    let device = DeviceId::generate().expect("id");
    let mut kept_until = Vec::new();
    // policy(): expiry 60 s after creation; retention 300 s, for reports 900 s.
    for (name, decision, seconds) in [
        ("approved", Some(Decision::Approve), 360),
        ("fraud", Some(Decision::ReportFraud), 360),
        ("denied", Some(Decision::Deny), 960),
        ("expired", None, 960),
    ] {
        let challenge = create(store, sample_challenge(&t, &user(name), now, None), now).await;
        if let Some(decision) = decision {
            let resolution = decision.resolve(Some(challenge.number), challenge.number, device.clone());
            assert!(store.resolve_challenge(&t, &challenge.id, resolution, now).await.expect("resolve").expect("found").accepted);
        }
        kept_until.push((name, challenge, now.plus(Duration::from_secs(seconds))));
    }
    for (name, challenge, purge_at) in kept_until {
        let last = Millis(purge_at.0 - 1);
        let read = store.get_challenge(&t, &challenge.id, last).await.expect("get");
        assert!(read.is_some_and(|c| c.state.is_final()), "{name}: kept until its purge time");
        assert_eq!(store.get_challenge(&t, &challenge.id, purge_at).await.expect("get"), None, "{name}: gone then");
        assert!(store.watch_challenge(&t, &challenge.id, purge_at).await.expect("watch").is_none(), "{name}");
        let late = store.resolve_challenge(&t, &challenge.id, Resolution::cancelled(), purge_at).await.expect("resolve");
        assert!(late.is_none(), "{name}: {late:?}");
    }
}
