//! The conformance cases of operators' commands: purging a tenant.

use super::*;
use crate::store::{BlockReason, TenantPurge};

pub async fn purging_a_tenant_removes_its_records_and_nothing_else<S: Store>(store: &S, clock: &ManualClock, scope: &Scope) {
    let now = clock.now();
    let (gone, kept) = (scope.tenant("gone"), scope.tenant("kept"));
    // The tenant to purge: a user with a device (and its completed enrollment), a
    // pending challenge and a block; a second user with an open enrollment only.
    let device = enrolled_device(store, &gone, &user("u"), now).await;
    let challenge = create(store, sample_challenge(&gone, &user("u"), now, Some("req-1")), now).await;
    let block = UserBlock { reason: BlockReason::FraudReported, since: now, until: None };
    store.block_user(&gone, &user("u"), block, now).await.expect("block");
    let open = sample_enrollment(&gone, &user("v"), now);
    store.insert_enrollment(open.clone(), &limits(), now).await.expect("insert");
    // The tenant that stays: a user of the same id, with a device and a challenge.
    let other_device = enrolled_device(store, &kept, &user("u"), now).await;
    let other_challenge = create(store, sample_challenge(&kept, &user("u"), now, Some("req-1")), now).await;

    let expected = TenantPurge { users: 2, devices: 1, enrollments: 2, challenges: 1 };
    assert_eq!(store.purge_tenant(&gone, true).await.expect("dry run"), expected);
    assert!(store.get_device(&device.id).await.expect("get").is_some(), "a dry run removes nothing");
    assert!(store.get_challenge(&gone, &challenge.id, now).await.expect("get").is_some(), "a dry run removes nothing");

    assert_eq!(store.purge_tenant(&gone, false).await.expect("purge"), expected);
    assert_eq!(store.get_device(&device.id).await.expect("get"), None);
    assert!(store.list_devices(&gone, &user("u")).await.expect("list").is_empty());
    assert_eq!(store.get_challenge(&gone, &challenge.id, now).await.expect("get"), None);
    assert!(store.pending_challenges(&gone, &user("u"), now).await.expect("pending").is_empty());
    assert_eq!(store.get_enrollment(&gone, &open.id).await.expect("get"), None);
    let code = open.code_digest.as_ref().expect("code");
    assert_eq!(store.enrollment_by_code(code).await.expect("by code"), None, "the code's index went too");
    assert_eq!(store.purge_tenant(&gone, true).await.expect("again"), TenantPurge::default(), "nothing is left");

    // The tenant that stays is untouched, its user of the same id included.
    assert_eq!(store.get_device(&other_device.id).await.expect("get"), Some(other_device.clone()));
    assert_eq!(store.list_devices(&kept, &user("u")).await.expect("list").len(), 1);
    let read = store.get_challenge(&kept, &other_challenge.id, now).await.expect("get").expect("kept");
    assert_eq!(read.state, ChallengeState::Pending);

    // The purged device's key is free again (its claim went with it), and the
    // purged user is no longer blocked: a new challenge is created, not refused.
    let enrollment = sample_enrollment(&kept, &user("w"), now);
    store.insert_enrollment(enrollment.clone(), &limits(), now).await.expect("insert");
    let reused = Device { public_key: device.public_key.clone(), ..sample_device(&kept, &user("w"), now) };
    let code = enrollment.code_digest.as_ref().expect("code");
    let outcome = store.complete_enrollment(code, reused, &limits(), now).await.expect("complete");
    assert!(matches!(outcome, CompleteOutcome::Completed(_)), "{outcome:?}");
    assert_eq!(block_in_force(store, &gone, &user("u"), now).await, None);
}
