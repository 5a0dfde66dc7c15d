//! The conformance case of a create that chooses its own pushes
//! ([`PushesFrom::Store`]): what a Redis replica asks for when it does not
//! remember the user's devices, so that the choice is made in `create.lua`.

use super::*;
use crate::domain::challenge::PushRoom;
use crate::store::{BlockReason, CreateFor, PushesFrom};

/// A device completed through an enrollment of its own.
async fn enroll<S: Store>(store: &S, device: Device, now: Millis) -> Device {
    let enrollment = sample_enrollment(&device.tenant, &device.user_id, now);
    store.insert_enrollment(enrollment.clone(), &limits(), now).await.expect("insert");
    let code = enrollment.code_digest.as_ref().expect("code");
    let outcome = store.complete_enrollment(code, device.clone(), &limits(), now).await.expect("complete");
    assert!(matches!(outcome, CompleteOutcome::Completed(_)), "{outcome:?}");
    device
}

const ROOM: PushRoom = PushRoom([100; Platform::ALL.len()]);

pub async fn a_create_chooses_its_pushes_from_the_devices_as_they_stand<S: Store>(store: &S, clock: &ManualClock, scope: &Scope) {
    let now = clock.now();
    let (tenant, u) = (scope.tenant("a"), user("u"));
    // Enrolled a second apart, in this order: each kind of device once.
    let at = |second: u64| now.plus(Duration::from_secs(second));
    let pushed_fcm = Device { enrolled_at: at(1), ..sample_device(&tenant, &u, now) };
    let pushed_apns = Device {
        platform: Some(Platform::Apns),
        push_token: "apns-token".into(),
        enrolled_at: at(2),
        ..sample_device(&tenant, &u, now)
    };
    let muted = Device { enrolled_at: at(3), ..sample_device(&tenant, &u, now) };
    let totp_only = Device { platform: None, public_key: None, enrolled_at: at(4), ..sample_device(&tenant, &u, now) };
    let tokenless = Device { push_token: String::new(), enrolled_at: at(5), ..sample_device(&tenant, &u, now) };
    // Enrolled in the same millisecond as another: the two go by their ids.
    let pushed_web = Device {
        platform: Some(Platform::WebPush),
        push_token: "https://push.example/endpoint".into(),
        enrolled_at: at(5),
        ..sample_device(&tenant, &u, now)
    };
    for device in [&pushed_fcm, &pushed_apns, &muted, &totp_only, &tokenless, &pushed_web] {
        enroll(store, device.clone(), now).await;
    }
    store.disable_push(&muted.id, &muted.push_token).await.expect("disable");
    let devices = store.list_devices(&tenant, &u).await.expect("list");
    let mut pushed = [&pushed_fcm, &pushed_apns, &pushed_web];
    pushed.sort_by(|a, b| a.enrolled_at.cmp(&b.enrolled_at).then_with(|| a.id.as_str().cmp(b.id.as_str())));
    let expected: Vec<(DeviceId, Platform)> = pushed.iter().map(|d| (d.id.clone(), d.platform.expect("platform"))).collect();
    let rust_choice = ROOM.choose(&devices).expect("a choice");
    assert_eq!(rust_choice.iter().map(|d| (d.device_id.clone(), d.platform)).collect::<Vec<_>>(), expected);

    let challenge = sample_challenge(&tenant, &u, now, Some("req-1"));
    let (created, from) = match store.create_challenge_for(challenge, &policy(), now, PushesFrom::Store(ROOM)).await {
        Ok(CreateFor::Chose(created, from)) => (created, from),
        other => panic!("expected a create that chose, got {other:?}"),
    };
    // The store chose what the broker would have, and wrote what it returned.
    assert_eq!(created.deliveries, rust_choice);
    assert!(created.deliveries.iter().all(|d| d.state == DeliveryState::Queued && d.attempts == 0));
    assert_eq!(from.devices, devices, "the devices it chose from, as they stand");
    let read = store.get_challenge(&tenant, &created.id, now).await.expect("get").expect("written");
    assert_eq!(read, created);
    // A retry with the same request_id meets the idempotency key as any create.
    let again = sample_challenge(&tenant, &u, now, Some("req-1"));
    match store.create_challenge_for(again, &policy(), now, PushesFrom::Store(ROOM)).await.expect("create") {
        CreateFor::Done(CreateOutcome::Existing(existing)) => assert_eq!(existing, created),
        other => panic!("expected the existing challenge, got {other:?}"),
    }

    // No room for one APNs push: nothing is written, the devices come back (the
    // broker then names the full queue from them).
    let mut no_apns = ROOM;
    no_apns.0[Platform::Apns.index()] = 0;
    let refused = sample_challenge(&tenant, &u, now, None);
    let id = refused.id.clone();
    match store.create_challenge_for(refused, &policy(), now, PushesFrom::Store(no_apns)).await.expect("create") {
        CreateFor::DevicesChanged(back) => assert_eq!(back.devices, devices),
        other => panic!("expected the devices back, got {other:?}"),
    }
    assert_eq!(store.get_challenge(&tenant, &id, now).await.expect("get"), None, "nothing was written");
    assert_eq!(store.pending_challenges(&tenant, &u, now).await.expect("pending").len(), 1);

    // A user whose devices cannot answer: nothing is written either.
    let v = user("v");
    enroll(store, Device { platform: None, public_key: None, ..sample_device(&tenant, &v, now) }, now).await;
    match store.create_challenge_for(sample_challenge(&tenant, &v, now, None), &policy(), now, PushesFrom::Store(ROOM)).await {
        Ok(CreateFor::DevicesChanged(back)) => assert_eq!(back.devices.len(), 1),
        other => panic!("expected the devices back, got {other:?}"),
    }
    assert!(store.pending_challenges(&tenant, &v, now).await.expect("pending").is_empty());

    // The rules hold as for any create: a blocked user is refused.
    let block = UserBlock { reason: BlockReason::WrongNumbers, since: now, until: None };
    store.block_user(&tenant, &u, block, now).await.expect("block");
    let blocked = sample_challenge(&tenant, &u, now, None);
    match store.create_challenge_for(blocked, &policy(), now, PushesFrom::Store(ROOM)).await.expect("create") {
        CreateFor::Done(CreateOutcome::Refused(Refusal::Blocked(found))) => assert_eq!(found.reason, BlockReason::WrongNumbers),
        other => panic!("expected Blocked, got {other:?}"),
    }
}
