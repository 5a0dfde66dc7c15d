//! The durable half's own tests: records survive a reopen.

use std::sync::Arc;

use super::*;
use std::time::Duration;

use crate::domain::time::{Clock, ManualClock};
use crate::store::Store;
use crate::store::embedded::EmbeddedStore;

#[tokio::test]
async fn durable_records_survive_a_reopen() {
    let dir = tempfile::tempdir().expect("tempdir");
    let clock = ManualClock::starting_now();
    let tenant = TenantId("t".into());
    let user = UserId::parse("jan").expect("user");
    let device = crate::store::conformance::sample_device(&tenant, &user, clock.now());
    {
        let store = EmbeddedStore::open(dir.path(), Arc::new(clock.clone())).await.expect("open");
        let enrollment = crate::store::conformance::sample_enrollment(&tenant, &user, clock.now());
        let code = enrollment.code_digest.clone().expect("push enrollment");
        let limits = EnrollmentLimits { max_devices: 10, max_open_enrollments: 5 };
        assert_eq!(store.insert_enrollment(enrollment, &limits, clock.now()).await.expect("insert"), InsertOutcome::Inserted);
        assert!(matches!(
            store.complete_enrollment(&code, device.clone(), &limits, clock.now()).await.expect("complete"),
            CompleteOutcome::Completed(_)
        ));
        let block = UserBlock { reason: crate::store::BlockReason::FraudReported, since: clock.now(), until: None };
        store.block_user(&tenant, &user, block, clock.now()).await.expect("block");
        let totp = crate::store::TotpPolicy {
            strikes: crate::store::StrikePolicy { limit: 100, window: Duration::from_secs(1), block_for: Duration::from_secs(1) },
            max_consecutive: 1,
        };
        store.reserve_totp_attempt(&tenant, &user, &totp, clock.now()).await.expect("reserve");
        let locked = store.reserve_totp_attempt(&tenant, &user, &totp, clock.now()).await.expect("reserve");
        assert_eq!(locked, crate::store::TotpAttempt::Locked { until: None });
    }
    let store = EmbeddedStore::open(dir.path(), Arc::new(clock.clone())).await.expect("reopen");
    assert_eq!(store.get_device(&device.id).await.expect("get"), Some(device.clone()));
    assert_eq!(store.list_devices(&tenant, &user).await.expect("list"), vec![device]);
    let challenge = crate::store::conformance::sample_challenge(&tenant, &user, clock.now(), None);
    let policy = crate::store::conformance::policy();
    let refused = store.create_challenge(challenge, &policy, clock.now()).await.expect("create");
    assert!(matches!(refused, crate::store::CreateOutcome::Refused(crate::store::Refusal::Blocked(_))), "{refused:?}");
    let totp = crate::store::TotpPolicy {
        strikes: crate::store::StrikePolicy { limit: 100, window: Duration::from_secs(1), block_for: Duration::from_secs(1) },
        max_consecutive: 1,
    };
    let locked = store.reserve_totp_attempt(&tenant, &user, &totp, clock.now()).await.expect("reserve");
    assert_eq!(locked, crate::store::TotpAttempt::Locked { until: None }, "the hard TOTP lock survives a restart");
}

/// The sum of the sizes of the files in `dir`.
fn bytes_in(dir: &std::path::Path) -> u64 {
    std::fs::read_dir(dir).expect("read dir").map(|entry| entry.expect("entry").metadata().expect("metadata").len()).sum()
}

/// `count` users ("user0", "user1", ...) with one phone each, enrolled through the
/// store; their device ids in that order.
async fn enroll_users(store: &EmbeddedStore, tenant: &TenantId, count: usize, clock: &ManualClock) -> Vec<DeviceId> {
    let limits = EnrollmentLimits { max_devices: 10, max_open_enrollments: 5 };
    let mut devices = Vec::new();
    for n in 0..count {
        let user = UserId::parse(&format!("user{n}")).expect("user");
        let enrollment = crate::store::conformance::sample_enrollment(tenant, &user, clock.now());
        let code = enrollment.code_digest.clone().expect("push enrollment");
        store.insert_enrollment(enrollment, &limits, clock.now()).await.expect("insert");
        let device = crate::store::conformance::sample_device(tenant, &user, clock.now());
        store.complete_enrollment(&code, device.clone(), &limits, clock.now()).await.expect("complete");
        devices.push(device.id);
    }
    devices
}

/// Sign-ins only touch devices; with nobody enrolling, those touch flushes are the
/// only commits. redb frees replaced pages only at a durable commit, so flushes
/// without one grew the file for as long as the broker ran.
#[tokio::test]
async fn touching_devices_for_hours_does_not_grow_the_file() {
    let dir = tempfile::tempdir().expect("tempdir");
    let clock = ManualClock::starting_now();
    let tenant = TenantId("t".into());
    let store = EmbeddedStore::open(dir.path(), Arc::new(clock.clone())).await.expect("open");
    let devices = enroll_users(&store, &tenant, 200, &clock).await;
    // Each flush writes the 20 devices touched since the last one, as 400 sign-ins
    // a second over a population do.
    let flush = |round: usize| {
        for id in devices.iter().cycle().skip(round * 7).take(20) {
            clock.advance(Duration::from_millis(5));
            store.shared.touch_device(id, clock.now()).expect("touch");
        }
        store.shared.write_touches()
    };
    for round in 0..50 {
        flush(round).await.expect("flush");
    }
    let settled = bytes_in(dir.path());
    for round in 50..1_000 {
        flush(round).await.expect("flush");
    }
    let after = bytes_in(dir.path());
    assert!(after <= settled + settled / 10, "the file grew from {settled} to {after} bytes with only touches written");
    let touched = store.get_device(&devices[0]).await.expect("get").expect("device").last_used_at;
    drop(store);
    let reopened = EmbeddedStore::open(dir.path(), Arc::new(clock.clone())).await.expect("reopen");
    let last = reopened.get_device(&devices[0]).await.expect("get").expect("device");
    assert!(touched.is_some());
    assert_eq!(last.last_used_at, touched, "the touches reached the file");
}

/// A touch flush writes the device's last use to `DEVICE_LAST_USED`, not its whole
/// record again; loading takes the later of the two, and a removed device leaves no
/// row behind, whether it was removed before or after its touch was flushed.
#[tokio::test]
async fn a_touch_writes_the_last_use_alone_and_a_removal_takes_it_away() {
    let dir = tempfile::tempdir().expect("tempdir");
    let clock = ManualClock::starting_now();
    let tenant = TenantId("t".into());
    let store = EmbeddedStore::open(dir.path(), Arc::new(clock.clone())).await.expect("open");
    let devices = enroll_users(&store, &tenant, 3, &clock).await;
    let [kept, removed_after, removed_before] = [&devices[0], &devices[1], &devices[2]];
    clock.advance(Duration::from_secs(60));
    let used_at = clock.now();
    for id in &devices {
        store.touch_device(id, used_at).await.expect("touch");
    }
    store.shared.write_touches().await.expect("flush");
    assert!(store.remove_device(&tenant, removed_after).await.expect("remove"));
    clock.advance(Duration::from_secs(60));
    store.touch_device(removed_before, clock.now()).await.expect("touch");
    assert!(store.remove_device(&tenant, removed_before).await.expect("remove"));
    store.shared.write_touches().await.expect("flush");
    drop(store);

    let db = redb::Database::open(dir.path().join("pushmatch.redb")).expect("open the file");
    let txn = db.begin_read().expect("read");
    let record: Device =
        decode(txn.open_table(DEVICES).expect("devices").get(kept.to_string().as_str()).expect("get").expect("row").value())
            .expect("decode");
    assert_eq!(record.last_used_at, None, "the flush left the device's record as it was enrolled");
    let last_used = txn.open_table(DEVICE_LAST_USED).expect("last used");
    let rows: Vec<(String, i64)> = last_used
        .iter()
        .expect("iter")
        .map(|row| {
            let (id, at) = row.expect("row");
            (id.value().to_owned(), at.value())
        })
        .collect();
    assert_eq!(rows, vec![(kept.to_string(), used_at.0)], "one row, of the device still enrolled");
    drop((last_used, txn, db));

    let reopened = EmbeddedStore::open(dir.path(), Arc::new(clock.clone())).await.expect("reopen");
    assert_eq!(reopened.get_device(kept).await.expect("get").expect("device").last_used_at, Some(used_at));
    assert_eq!(reopened.get_device(removed_after).await.expect("get"), None);
    assert_eq!(reopened.get_device(removed_before).await.expect("get"), None);
}

#[test]
fn a_device_written_after_an_answer_touched_it_keeps_the_answer_s_last_use() {
    let tenant = TenantId("t".into());
    let user = UserId::parse("jan").expect("user");
    let mut device = crate::store::conformance::sample_device(&tenant, &user, Millis(1_000));
    device.last_used_at = Some(Millis(2_000));
    let mut mirror = DurableMirror::default();
    mirror.put_device(device.clone());
    // An answer touches the device while a token update, which read it before,
    // waits for its commit; then the update's copy is applied.
    mirror.devices.get_mut(&device.id).expect("record").set_last_used(Millis(5_000));
    device.push_token = "a-new-token".into();
    mirror.put_device(device.clone());
    let stored = mirror.device(&device.id).expect("device");
    assert_eq!((stored.last_used_at, stored.push_token.as_str()), (Some(Millis(5_000)), "a-new-token"));
    // A write that carries a later use than the mirror's keeps its own.
    device.last_used_at = Some(Millis(9_000));
    mirror.put_device(device.clone());
    assert_eq!(mirror.last_used(&device.id), Some(Millis(9_000)));
}
