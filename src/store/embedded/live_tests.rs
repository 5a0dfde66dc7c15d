//! Unit tests of the live half of the embedded store (`live.rs`).

use std::sync::Arc;

use super::*;
use crate::domain::time::{Clock, ManualClock};
use crate::store::Store;
use crate::store::embedded::EmbeddedStore;

/// A resolved challenge waits out its retention (the fraud window, for some)
/// without the channel its watchers had, which holds a whole challenge: the
/// watcher still reads the final state, and a watch opened after it gets that
/// state without the entry keeping a channel.
#[tokio::test]
async fn a_resolved_challenge_keeps_no_channel_for_its_watchers() {
    let now = Millis(1_700_000_000_000);
    let challenge =
        crate::store::conformance::sample_challenge(&TenantId("t".into()), &UserId::parse("u").expect("user id"), now, None);
    let mut entry = ChallengeEntry::new(&challenge, &crate::store::conformance::policy()).expect("entry");
    let mut watcher = entry.subscribe(challenge.clone());
    assert!(entry.watch.is_some(), "a pending challenge's watcher is followed");
    let (changed, resolved) = entry.update(|c| c.apply(&Resolution::cancelled(), now)).expect("update");
    assert!(changed);
    assert!(entry.watch.is_none(), "no channel kept once the final state went out");
    // As the API's watch stream reads it: the change, then the state.
    assert!(watcher.changed().await.is_ok(), "the final state is there to read");
    assert_eq!(watcher.borrow_and_update().state, ChallengeState::Cancelled);
    assert!(watcher.changed().await.is_err(), "and then the channel is closed");
    let late = entry.subscribe(resolved);
    assert_eq!(late.borrow().state, ChallengeState::Cancelled);
    assert!(entry.watch.is_none(), "a watch of a resolved challenge keeps no channel");
}

/// A steady stream of challenges in and out keeps the slab at the most held at
/// once: freed slots are reused, and each key finds its own entry.
#[test]
fn the_slab_reuses_freed_slots() {
    let policy = crate::store::conformance::policy();
    let now = Millis(1_700_000_000_000);
    let tenant = TenantId("t".into());
    let mut entries = Entries::default();
    let mut keys = std::collections::VecDeque::new();
    for i in 0..5_000u32 {
        let challenge =
            crate::store::conformance::sample_challenge(&tenant, &UserId::parse(&format!("u{i}")).expect("user id"), now, None);
        let key = challenge.id.bits();
        entries.insert(key, ChallengeEntry::new(&challenge, &policy).expect("entry"));
        keys.push_back((key, challenge.user_id.clone()));
        if keys.len() > 100 {
            let (old, _) = keys.pop_front().expect("oldest");
            assert!(entries.remove(&old).is_some());
            assert!(entries.get_mut(&old).is_none(), "gone once removed");
        }
    }
    assert_eq!(entries.len(), 100);
    assert!(entries.slab.len() <= 101, "the slab holds {} slots for 100 entries", entries.slab.len());
    for (key, user) in &keys {
        let entry = entries.get_mut(key).expect("held");
        assert_eq!(entry.challenge().expect("decodes").user_id, *user, "each key finds its own entry");
    }
    assert_eq!(entries.iter().count(), 100);
}

/// The watch channel is made by the first watcher and dropped with the last; a
/// watcher that comes after that still sees every later change.
#[tokio::test]
async fn a_watcher_after_the_last_one_left_still_sees_changes() {
    use crate::domain::challenge::Resolution;
    let dir = tempfile::tempdir().expect("tempdir");
    let clock = ManualClock::starting_now();
    let store = EmbeddedStore::open(dir.path(), Arc::new(clock.clone())).await.expect("open");
    let tenant = TenantId("t".into());
    let user = UserId::parse("jan").expect("user");
    let policy = crate::store::conformance::policy();
    let challenge = crate::store::conformance::sample_challenge(&tenant, &user, clock.now(), None);
    let id = challenge.id.clone();
    store.create_challenge(challenge, &policy, clock.now()).await.expect("create");

    let first = store.watch_challenge(&tenant, &id, clock.now()).await.expect("watch").expect("found");
    drop(first);
    let delivery = crate::store::conformance::sample_delivery();
    // This change finds no watcher left, and drops the channel.
    store.record_delivery(&id, delivery.clone()).await.expect("delivery");

    let mut second = store.watch_challenge(&tenant, &id, clock.now()).await.expect("watch").expect("found");
    assert_eq!(second.borrow_and_update().deliveries, vec![delivery], "the new watcher starts from the current state");
    let resolution = Resolution { state: ChallengeState::Denied, deny_reason: None, device_id: None };
    assert!(store.resolve_challenge(&tenant, &id, resolution, clock.now()).await.expect("resolve").expect("found").accepted);
    tokio::time::timeout(std::time::Duration::from_secs(5), second.changed())
        .await
        .expect("the change arrives")
        .expect("the channel is open");
    assert_eq!(second.borrow().state, ChallengeState::Denied);
}
