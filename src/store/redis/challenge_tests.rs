//! What the conformance suite cannot see about challenges on Redis: what crosses
//! pub/sub (and that forging it changes nothing), Redis's clock deciding expiry
//! for a replica whose clock is behind, and records the pending list must not show.

#![allow(clippy::expect_used, clippy::unwrap_used, clippy::panic)]

use std::time::Duration;

use futures::StreamExt as _;

use super::RedisStore;
use super::challenges::AnswerText;
use super::keys::{Keys, shard_channel, user_tag};
use super::testing::{RedisCluster, RedisServer};
use super::tests::store_on;
use crate::domain::challenge::{Challenge, ChallengeState, Decision, PushRoom, Resolution};
use crate::domain::device::Device;
use crate::domain::device::ProofUse;
use crate::domain::ids::{ChallengeNumber, DeviceId, UserId};
use crate::domain::ports::{BlockReason, Refusal, UserBlock};
use crate::domain::time::{Clock, ManualClock, Millis, SystemClock};
use crate::store::conformance::{
    Scope, device_answer, enrolled_device, policy, sample_challenge, sample_delivery, sample_device,
};
use crate::store::{Answered, CreateFor, CreateOutcome, DeviceAnswer, PushesFrom, Store as _};

async fn created(store: &RedisStore, challenge: Challenge, now: Millis) -> Challenge {
    match store.create_challenge(challenge, &policy(), now).await.expect("create") {
        CreateOutcome::Created(challenge) => challenge,
        other => panic!("expected Created, got {other:?}"),
    }
}

/// A raw connection to `url`, as anyone who can reach the Redis has.
async fn raw(url: &str) -> redis::aio::MultiplexedConnection {
    redis::Client::open(url).expect("url").get_multiplexed_async_connection().await.expect("connect")
}

/// Someone with PUBLISH rights announces the challenge APPROVED (with a higher
/// version, the whole JSON, as the old format carried it), and sends garbage: the
/// watcher stays PENDING, and a real change after the forgeries still reaches it
/// (a forged version applied would have hidden it).
#[tokio::test]
async fn a_forged_announcement_leaves_the_watcher_pending() {
    let url = RedisServer::shared().await;
    let clock = ManualClock::starting_now();
    let store = store_on(vec![url.to_owned()], clock.clone()).await;
    let (tenant, user) = (Scope::unique().tenant("a"), UserId::parse("u").expect("user"));
    let challenge = created(&store, sample_challenge(&tenant, &user, clock.now(), None), clock.now()).await;
    let mut watch = store.watch_challenge(&tenant, &challenge.id, clock.now()).await.expect("watch").expect("found");
    assert_eq!(watch.borrow_and_update().state, ChallengeState::Pending);

    let mut forged = challenge.clone();
    let approval = Decision::Approve.resolve(Some(challenge.number), challenge.number, DeviceId::generate().expect("id"));
    assert!(forged.apply(&approval, clock.now()));
    let json = serde_json::to_string(&forged).expect("json");
    let channel = shard_channel(&challenge.id);
    let mut attacker = raw(url).await;
    for payload in [
        format!("{} 999 {json}", challenge.id),
        format!("{} 1000", challenge.id),
        format!("{} not-a-version", challenge.id),
        json.clone(),
        "garbage".to_owned(),
        String::new(),
    ] {
        let _: i64 = redis::cmd("PUBLISH").arg(&channel).arg(payload).query_async(&mut attacker).await.expect("publish");
    }

    // A real change, announced after the forgeries on the same channel.
    let delivery = sample_delivery();
    store.record_delivery(&challenge.id, delivery.clone()).await.expect("record");
    let seen = tokio::time::timeout(Duration::from_secs(5), watch.wait_for(|c| !c.deliveries.is_empty()))
        .await
        .expect("the real change reaches the watcher")
        .expect("open")
        .clone();
    assert_eq!(seen.state, ChallengeState::Pending, "the forged approval was not believed");
    assert_eq!(seen.deliveries, vec![delivery]);
    let read = store.get_challenge(&tenant, &challenge.id, clock.now()).await.expect("get").expect("found");
    assert_eq!(read.state, ChallengeState::Pending);
}

/// A whole challenge's life, listened to on every channel: each message is
/// `<id> <version>`, the versions count up, and nothing else crosses (no number,
/// no JSON).
#[tokio::test]
async fn announcements_carry_an_id_and_a_version_only() {
    let url = RedisServer::shared().await;
    let clock = ManualClock::starting_now();
    let store = store_on(vec![url.to_owned()], clock.clone()).await;
    let mut listener = redis::Client::open(url).expect("url").get_async_pubsub().await.expect("pubsub");
    listener.psubscribe("*").await.expect("psubscribe");
    let mut messages = listener.into_on_message();

    let (tenant, user) = (Scope::unique().tenant("a"), UserId::parse("u").expect("user"));
    let challenge = created(&store, sample_challenge(&tenant, &user, clock.now(), None), clock.now()).await;
    store.record_delivery(&challenge.id, sample_delivery()).await.expect("record");
    let approval = Decision::Approve.resolve(Some(challenge.number), challenge.number, DeviceId::generate().expect("id"));
    let outcome = store.resolve_challenge(&tenant, &challenge.id, approval, clock.now()).await.expect("resolve").expect("found");
    assert!(outcome.accepted);

    let mut versions = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), async {
        while versions.len() < 2 {
            let message = messages.next().await.expect("subscribed");
            let payload: String = message.get_payload().expect("text");
            let Some((id, version)) = payload.split_once(' ') else { panic!("not '<id> <version>': {payload:?}") };
            if id != challenge.id.as_str() {
                continue; // another test's challenge on the shared server
            }
            assert!(version.bytes().all(|b| b.is_ascii_digit()), "not '<id> <version>': {payload:?}");
            assert_eq!(message.get_channel_name(), shard_channel(&challenge.id));
            versions.push(version.parse::<u64>().expect("version"));
        }
    })
    .await
    .expect("both changes announced");
    assert_eq!(versions, vec![2, 3], "the delivery, then the approval");
}

/// A watch on the replica that created the challenge starts from what that
/// replica holds, without reading the record: an answer given on another replica
/// between the create and the watch still reaches it, as does one after it.
#[tokio::test]
async fn a_watch_where_the_challenge_was_created_sees_what_other_replicas_did() {
    let url = RedisServer::shared().await;
    let clock = ManualClock::starting_now();
    let (here, there) =
        (store_on(vec![url.to_owned()], clock.clone()).await, store_on(vec![url.to_owned()], clock.clone()).await);
    let (tenant, user) = (Scope::unique().tenant("a"), UserId::parse("u").expect("user"));
    let approve = |challenge: &Challenge| {
        Decision::Approve.resolve(Some(challenge.number), challenge.number, DeviceId::generate().expect("id"))
    };
    for answered_before_the_watch in [true, false] {
        let challenge = created(&here, sample_challenge(&tenant, &user, clock.now(), None), clock.now()).await;
        let answer = async || {
            let outcome =
                there.resolve_challenge(&tenant, &challenge.id, approve(&challenge), clock.now()).await.expect("resolve");
            assert!(outcome.expect("found").accepted);
        };
        if answered_before_the_watch {
            answer().await;
        }
        let mut watch = here.watch_challenge(&tenant, &challenge.id, clock.now()).await.expect("watch").expect("found");
        if !answered_before_the_watch {
            answer().await;
        }
        let seen = tokio::time::timeout(Duration::from_secs(5), watch.wait_for(|c| c.state != ChallengeState::Pending))
            .await
            .expect("the answer reaches the watch on the creating replica")
            .expect("open")
            .clone();
        assert_eq!(seen.state, ChallengeState::Approved, "answered before the watch: {answered_before_the_watch}");
    }
    // Another tenant's key gets nothing from what this replica holds.
    let challenge = created(&here, sample_challenge(&tenant, &user, clock.now(), None), clock.now()).await;
    let elsewhere = Scope::unique().tenant("b");
    assert!(here.watch_challenge(&elsewhere, &challenge.id, clock.now()).await.expect("watch").is_none());
}

/// A delivery call dropped midway (its request cancelled) holds nothing back:
/// an answer given on another replica afterwards still reaches the watch here.
#[tokio::test]
async fn a_delivery_dropped_midway_does_not_hold_the_watch_back() {
    let url = RedisServer::shared().await;
    let clock = ManualClock::starting_now();
    let (here, there) =
        (store_on(vec![url.to_owned()], clock.clone()).await, store_on(vec![url.to_owned()], clock.clone()).await);
    let (tenant, user) = (Scope::unique().tenant("a"), UserId::parse("u").expect("user"));
    let challenge = created(&here, sample_challenge(&tenant, &user, clock.now(), None), clock.now()).await;
    let mut watch = here.watch_challenge(&tenant, &challenge.id, clock.now()).await.expect("watch").expect("found");
    // First a change from elsewhere reaches the watch: the announcements flow
    // (else the subscription's first read, not an announcement, would deliver).
    there.record_delivery(&challenge.id, sample_delivery()).await.expect("record");
    tokio::time::timeout(Duration::from_secs(5), watch.wait_for(|c| !c.deliveries.is_empty()))
        .await
        .expect("announcements reach this replica")
        .expect("open");
    // Polled once (up to its Redis call), then dropped.
    {
        let mut call = std::pin::pin!(here.record_delivery(&challenge.id, sample_delivery()));
        assert!(futures::poll!(call.as_mut()).is_pending(), "the call was under way when dropped");
    }
    let approval = Decision::Approve.resolve(Some(challenge.number), challenge.number, DeviceId::generate().expect("id"));
    assert!(
        there.resolve_challenge(&tenant, &challenge.id, approval, clock.now()).await.expect("resolve").expect("found").accepted
    );
    let seen = tokio::time::timeout(Duration::from_secs(5), watch.wait_for(|c| c.state != ChallengeState::Pending))
        .await
        .expect("the answer reaches the watch")
        .expect("open")
        .clone();
    assert_eq!(seen.state, ChallengeState::Approved);
}

/// A replica whose clock is a minute behind Redis's: its challenge's expiry has
/// passed by Redis's clock (TIME) though not by its own, and an answer is refused
/// as EXPIRED, on one Redis and on a cluster. A challenge not yet expired by
/// either clock is answered as ever.
async fn a_slow_clock_cannot_answer_after_expiry(urls: Vec<String>) {
    let behind = ManualClock::new(SystemClock.now().minus(Duration::from_secs(60)));
    let store = store_on(urls, behind.clone()).await;
    let (tenant, user) = (Scope::unique().tenant("a"), UserId::parse("u").expect("user"));
    let now = behind.now();
    // 30 s by the slow clock: really 30 s ago.
    let mut late = sample_challenge(&tenant, &user, now, None);
    late.expires_at = now.plus(Duration::from_secs(30));
    let late = created(&store, late, now).await;
    behind.advance(Duration::from_secs(1));
    let answer = Decision::Approve.resolve(Some(late.number), late.number, DeviceId::generate().expect("id"));
    let outcome = store.resolve_challenge(&tenant, &late.id, answer, behind.now()).await.expect("resolve").expect("found");
    assert!(!outcome.accepted, "an answer after the real expiry is refused");
    assert_eq!(outcome.challenge.state, ChallengeState::Expired);
    assert_eq!(outcome.challenge.resolved_by, None);
    let read = store.get_challenge(&tenant, &late.id, behind.now()).await.expect("get").expect("found");
    assert_eq!(read.state, ChallengeState::Expired, "and the record says so");
    // A cancel is no way around it either.
    let cancel = store.resolve_challenge(&tenant, &late.id, Resolution::cancelled(), behind.now()).await.expect("cancel");
    assert!(!cancel.expect("found").accepted);

    // Two minutes by the slow clock: a minute ahead of Redis's. Answered.
    let mut fresh = sample_challenge(&tenant, &user, behind.now(), None);
    fresh.expires_at = behind.now().plus(Duration::from_secs(120));
    let fresh = created(&store, fresh, behind.now()).await;
    let answer = Decision::Approve.resolve(Some(fresh.number), fresh.number, DeviceId::generate().expect("id"));
    let outcome = store.resolve_challenge(&tenant, &fresh.id, answer, behind.now()).await.expect("resolve").expect("found");
    assert!(outcome.accepted);
    assert_eq!(outcome.challenge.state, ChallengeState::Approved);

    // The phone's way in (`answer.lua`, one call) holds to Redis's clock as well.
    let phone = enrolled_device(&store, &tenant, &user, behind.now()).await;
    let answer_by_phone = async |challenge: &Challenge| {
        let answer = device_answer(&phone, &challenge.id, Decision::Approve, Some(challenge.number), behind.now());
        match store.answer_challenge(&answer, behind.now()).await.expect("answer") {
            Answered::Done { outcome, devices, .. } => (outcome, devices),
            other => panic!("expected an answer, got {other:?}"),
        }
    };
    let mut late = sample_challenge(&tenant, &user, behind.now(), None);
    late.expires_at = behind.now().plus(Duration::from_secs(30));
    let late = created(&store, late, behind.now()).await;
    let (outcome, _) = answer_by_phone(&late).await;
    assert!(!outcome.accepted, "a phone's answer after the real expiry is refused");
    assert_eq!(outcome.challenge.state, ChallengeState::Expired);
    let mut fresh = sample_challenge(&tenant, &user, behind.now(), None);
    fresh.expires_at = behind.now().plus(Duration::from_secs(120));
    let fresh = created(&store, fresh, behind.now()).await;
    let (outcome, devices) = answer_by_phone(&fresh).await;
    assert!(outcome.accepted);
    assert_eq!(outcome.challenge.state, ChallengeState::Approved);
    // Read by the script with the answer: the one-call path, not the fallback.
    let devices = devices.expect("the user's devices came with the answer");
    assert_eq!(devices.iter().map(|d| &d.id).collect::<Vec<_>>(), vec![&phone.id]);
}

#[tokio::test]
async fn a_slow_clock_cannot_answer_after_expiry_on_a_single_node() {
    a_slow_clock_cannot_answer_after_expiry(vec![RedisServer::shared().await.to_owned()]).await;
}

#[tokio::test]
async fn a_slow_clock_cannot_answer_after_expiry_on_a_cluster() {
    a_slow_clock_cannot_answer_after_expiry(RedisCluster::shared().await.to_vec()).await;
}

/// Deliveries live in fields of their own (`delivery.lua`), laid over the
/// challenge on every read: one recorded after the answer, or between a read and
/// the answer's compare-and-set, is kept, and the answer still lands.
#[tokio::test]
async fn deliveries_and_answers_both_land_whatever_their_order() {
    let clock = ManualClock::starting_now();
    let store = store_on(vec![RedisServer::shared().await.to_owned()], clock.clone()).await;
    let (tenant, user) = (Scope::unique().tenant("a"), UserId::parse("u").expect("user"));
    let challenge = created(&store, sample_challenge(&tenant, &user, clock.now(), None), clock.now()).await;
    let (first, second) = (sample_delivery(), sample_delivery());
    store.record_delivery(&challenge.id, first.clone()).await.expect("record");
    let answer = Decision::Approve.resolve(Some(challenge.number), challenge.number, DeviceId::generate().expect("id"));
    let racing = futures::future::join(
        store.resolve_challenge(&tenant, &challenge.id, answer, clock.now()),
        store.record_delivery(&challenge.id, second.clone()),
    );
    let (outcome, recorded) = racing.await;
    recorded.expect("record");
    assert!(outcome.expect("resolve").expect("found").accepted);
    let mut updated = first.clone();
    updated.attempts = 2;
    store.record_delivery(&challenge.id, updated.clone()).await.expect("record");
    let read = store.get_challenge(&tenant, &challenge.id, clock.now()).await.expect("get").expect("found");
    assert_eq!(read.state, ChallengeState::Approved);
    let mut expected = vec![updated, second];
    expected.sort_by(|a, b| a.device_id.as_str().cmp(b.device_id.as_str()));
    assert_eq!(read.deliveries, expected);
}

/// The pending list shows the user's own challenges only, even if a record of
/// another user's were under the user's tag (as a tag shared by two users would
/// put it): it compares the user id, not only the tag.
#[tokio::test]
async fn the_pending_list_compares_the_user_id() {
    let url = RedisServer::shared().await;
    let clock = ManualClock::starting_now();
    let store = store_on(vec![url.to_owned()], clock.clone()).await;
    let tenant = Scope::unique().tenant("a");
    let (user, other) = (UserId::parse("u").expect("user"), UserId::parse("v").expect("user"));
    let own = created(&store, sample_challenge(&tenant, &user, clock.now(), None), clock.now()).await;
    let theirs = created(&store, sample_challenge(&tenant, &other, clock.now(), None), clock.now()).await;
    // Planted under `user`'s tag: `other`'s challenge record and its id in the pending set.
    let tag = user_tag(&tenant, &user);
    let keys = Keys(&tag);
    let mut connection = raw(url).await;
    let json = serde_json::to_string(&theirs).expect("json");
    let purge_at = theirs.expires_at.plus(Duration::from_secs(300)).0;
    let _: () = redis::cmd("HSET")
        .arg(keys.challenge(theirs.id.as_str()))
        .arg("json")
        .arg(&json)
        .arg("v")
        .arg(1)
        .arg("state")
        .arg("Pending")
        .arg("expires_at")
        .arg(theirs.expires_at.0)
        .arg("purge_at")
        .arg(purge_at)
        .query_async(&mut connection)
        .await
        .expect("hset");
    let _: () = redis::cmd("ZADD")
        .arg(keys.pending())
        .arg(clock.now().0 + 1)
        .arg(theirs.id.as_str())
        .query_async(&mut connection)
        .await
        .expect("zadd");
    // A fresh store, whose view of where challenges live comes from Redis alone.
    let fresh = store_on(vec![url.to_owned()], clock.clone()).await;
    let pending: Vec<_> = fresh.pending_challenges(&tenant, &user, clock.now()).await.expect("list").into_iter().collect();
    assert_eq!(pending.iter().map(|c| &c.id).collect::<Vec<_>>(), vec![&own.id]);
    let theirs_listed = fresh.pending_challenges(&tenant, &other, clock.now()).await.expect("list");
    assert_eq!(theirs_listed.iter().map(|c| &c.id).collect::<Vec<_>>(), vec![&theirs.id]);
}

/// `answer.lua` resolves a challenge and touches a device by replacing the text
/// fragments `AnswerText` makes: done here as the script does it (each found once,
/// plainly), the result is what serde writes for the resolved challenge and the
/// touched device, for a user id, a context and a device name with the characters
/// JSON escapes, and for both resolutions.
#[test]
fn answer_text_rewrites_as_serde_writes() {
    let now = SystemClock.now();
    let (tenant, user) = (Scope::unique().tenant("a"), UserId::parse("j\"an\\ \u{e9} \"state\":\"Pending\",").expect("user"));
    let mut challenge = sample_challenge(&tenant, &user, now, None);
    challenge.context.application = "\"resolved_at\":null,\"resolved_by\":null,".into();
    let mut device = sample_device(&tenant, &user, now);
    device.display_name = "\"last_used_at\":null}".into();
    let once = |text: &str, fragment: &str| {
        assert_eq!(text.matches(fragment).count(), 1, "{fragment} in {text}");
        text.find(fragment).expect("found")
    };
    let replace = |text: &str, fragment: &str, with: &str| {
        let at = once(text, fragment);
        format!("{}{with}{}", &text[..at], &text[at + fragment.len()..])
    };
    for typed_right in [true, false] {
        let typed = if typed_right { challenge.number } else { wrong(challenge.number) };
        let (on_match, otherwise) = Decision::Approve.resolutions(device.id.clone());
        let answer = DeviceAnswer {
            device: &device,
            proof: ProofUse([7; 32]),
            proof_keep_until: now,
            challenge: &challenge.id,
            typed: Some(typed),
            on_match: on_match.clone(),
            otherwise: otherwise.clone(),
        };
        let text = AnswerText::new(&answer, now).expect("text");
        let json = serde_json::to_string(&challenge).expect("json");
        once(&json, &text.owner);
        assert_eq!(json.contains(&text.number), typed_right, "the number fragment matches the right number only");
        let parts = if typed_right { &text.on_match } else { &text.otherwise };
        let resolved = replace(&replace(&json, &text.pending[0], &parts[1]), &text.pending[1], &parts[2]);
        let mut expected = challenge.clone();
        assert!(expected.apply(if typed_right { &on_match } else { &otherwise }, now));
        assert_eq!(resolved, serde_json::to_string(&expected).expect("json"));
        assert_eq!(parts[0], if typed_right { "Approved" } else { "Denied" });

        for last in [None, Some(now.minus(Duration::from_secs(5)))] {
            let before = serde_json::to_string(&Device { last_used_at: last, ..device.clone() }).expect("json");
            let tail = format!("\"last_used_at\":{}}}", serde_json::to_string(&last).expect("json"));
            assert!(before.ends_with(&tail), "the last use ends the device's JSON, as answer.lua's pattern expects");
            let touched = format!("{}{}", &before[..before.len() - tail.len()], text.touched);
            let expected = Device { last_used_at: Some(now), ..device.clone() };
            assert_eq!(touched, serde_json::to_string(&expected).expect("json"));
        }
    }
}

fn wrong(number: ChallengeNumber) -> ChallengeNumber {
    let shown = number.value();
    ChallengeNumber::parse_typed(&(if shown == 99 { 10 } else { shown + 1 }).to_string()).expect("two digits")
}

/// A new challenge's pushes are chosen from the user's devices as a replica read
/// them, perhaps a while ago; the create checks their fingerprint in its own
/// step. A device's last use and TOTP step leave the fingerprint as it was (a
/// replica's memory of the devices outlives every sign-in), a new push token
/// changes it, and a create for the devices as they were writes nothing and
/// hands back the devices as they are.
#[tokio::test]
async fn the_create_checks_the_devices_its_pushes_were_chosen_from() {
    let url = RedisServer::shared().await;
    let clock = ManualClock::starting_now();
    let store = store_on(vec![url.to_owned()], clock.clone()).await;
    let (tenant, user) = (Scope::unique().tenant("a"), UserId::parse("u").expect("user"));
    let now = clock.now();
    let device = enrolled_device(&store, &tenant, &user, now).await;
    let read = store.read_user_devices(&tenant, &user).await.expect("devices");
    assert_eq!(read.devices, vec![device.clone()]);

    store.touch_device(&device.id, now.plus(Duration::from_secs(1))).await.expect("touch");
    assert!(store.spend_totp_step(&device.id, 7).await.expect("step"));
    let used = store.list_devices(&tenant, &user).await.expect("devices");
    assert_ne!(used, read.devices, "the record changed");
    let challenge = sample_challenge(&tenant, &user, now, None);
    match store.create_for(challenge, &policy(), now, PushesFrom::Devices(read.seen.as_deref())).await.expect("create") {
        CreateFor::Done(CreateOutcome::Created(_)) => {}
        other => panic!("a last use changes nothing a push depends on, got {other:?}"),
    }

    assert!(store.set_push_token(&device.id, "a-new-token").await.expect("token"));
    let challenge = sample_challenge(&tenant, &user, now, None);
    let id = challenge.id.clone();
    let now_enrolled =
        match store.create_for(challenge, &policy(), now, PushesFrom::Devices(read.seen.as_deref())).await.expect("create") {
            CreateFor::DevicesChanged(devices) => devices,
            other => panic!("a new token changes the pushes, got {other:?}"),
        };
    assert!(store.get_challenge(&tenant, &id, now).await.expect("get").is_none(), "nothing was written");
    assert_eq!(now_enrolled.devices.iter().map(|d| d.push_token.as_str()).collect::<Vec<_>>(), ["a-new-token"]);
    assert_ne!(now_enrolled.seen, read.seen);
    // The replica remembers the devices as handed back.
    assert_eq!(store.challenge_devices(&tenant, &user), Some(now_enrolled.clone()));

    // The devices are compared before the block (and every other limit): the
    // broker decides on the devices as they are first, as on a fresh read.
    let block = UserBlock { reason: BlockReason::WrongNumbers, since: now, until: None };
    store.block_user(&tenant, &user, block, now).await.expect("block");
    let challenge = sample_challenge(&tenant, &user, now, None);
    match store.create_for(challenge, &policy(), now, PushesFrom::Devices(read.seen.as_deref())).await.expect("create") {
        CreateFor::DevicesChanged(devices) => assert_eq!(devices, now_enrolled),
        other => panic!("stale devices are handed back before the block is read, got {other:?}"),
    }
    let challenge = sample_challenge(&tenant, &user, now, None);
    match store.create_for(challenge, &policy(), now, PushesFrom::Devices(now_enrolled.seen.as_deref())).await.expect("create") {
        CreateFor::Done(CreateOutcome::Refused(Refusal::Blocked(found))) => assert_eq!(found.reason, BlockReason::WrongNumbers),
        other => panic!("the block refuses a create chosen from the devices as they are, got {other:?}"),
    }
    store.unblock_user(&tenant, &user).await.expect("unblock");
    let challenge = sample_challenge(&tenant, &user, now, None);
    match store.create_for(challenge, &policy(), now, PushesFrom::Devices(now_enrolled.seen.as_deref())).await.expect("create") {
        CreateFor::Done(CreateOutcome::Created(_)) => {}
        other => panic!("expected Created for the devices as they are, got {other:?}"),
    }
}

/// The replica that enrolls a phone remembers it for the phone's first answer,
/// as if it had read it: the proof is checked without a read. It remembers only
/// what it wrote; another replica reads the device (a removal made elsewhere is
/// refused by `answer.lua` all the same: `tests/replicas.rs`,
/// `a_phone_removed_on_one_replica_cannot_answer_on_the_other_that_remembers_it`).
#[tokio::test]
async fn the_enrolling_replica_remembers_the_phone_it_enrolled() {
    let url = RedisServer::shared().await;
    let clock = ManualClock::starting_now();
    let enrolling = store_on(vec![url.to_owned()], clock.clone()).await;
    let other = store_on(vec![url.to_owned()], clock.clone()).await;
    let (tenant, user) = (Scope::unique().tenant("a"), UserId::parse("u").expect("user"));
    let device = enrolled_device(&enrolling, &tenant, &user, clock.now()).await;
    // The record goes behind both replicas' backs: only a replica's memory has it now.
    let key = Keys(&user_tag(&tenant, &user)).device(device.id.as_str());
    let _: i64 = redis::cmd("DEL").arg(&key).query_async(&mut raw(url).await).await.expect("del");
    assert_eq!(enrolling.answering_device(&device.id).await.expect("device"), Some(device.clone()));
    assert_eq!(other.answering_device(&device.id).await.expect("device"), None, "another replica reads it");
}

/// A replica loads every script when it connects: the first calls of a burst
/// find them, instead of each getting NOSCRIPT, loading and calling again.
#[tokio::test]
async fn a_replica_loads_its_scripts_when_it_connects() {
    let server = RedisServer::start().await;
    let store = store_on(vec![server.url()], ManualClock::starting_now()).await;
    let hashes: Vec<&str> = store.scripts.all().iter().map(|script| script.get_hash()).collect();
    let mut exists = redis::cmd("SCRIPT");
    exists.arg("EXISTS").arg(&hashes);
    let loaded: Vec<i64> = exists.query_async(&mut raw(&server.url()).await).await.expect("script exists");
    assert_eq!(loaded, vec![1; hashes.len()], "every script is loaded, before any call");
}

/// A watcher's read that Redis refuses once (here an ACL that takes HGETALL away
/// for a moment; in production a timeout or a blip) is tried again: the change
/// reaches the watcher without another announcement, not at the deadline.
#[tokio::test]
async fn a_failed_read_after_an_announcement_is_tried_again() {
    let server = RedisServer::start().await;
    let clock = ManualClock::starting_now();
    let (watching, changing) =
        (store_on(vec![server.url()], clock.clone()).await, store_on(vec![server.url()], clock.clone()).await);
    let (tenant, user) = (Scope::unique().tenant("a"), UserId::parse("u").expect("user"));
    let challenge = created(&changing, sample_challenge(&tenant, &user, clock.now(), None), clock.now()).await;
    let mut watch = watching.watch_challenge(&tenant, &challenge.id, clock.now()).await.expect("watch").expect("found");
    assert!(watch.borrow_and_update().deliveries.is_empty());

    let mut admin = raw(&server.url()).await;
    let _: () = redis::cmd("ACL").arg(&["SETUSER", "default", "-hgetall"][..]).query_async(&mut admin).await.expect("deny");
    let delivery = sample_delivery();
    changing.record_delivery(&challenge.id, delivery.clone()).await.expect("record");
    // Wait for the watching replica's read to be refused, then allow it again.
    tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            let stats: String = redis::cmd("INFO").arg("commandstats").query_async(&mut admin).await.expect("info");
            if stats.lines().any(|line| line.starts_with("cmdstat_hgetall:") && !line.contains("rejected_calls=0")) {
                break;
            }
            tokio::task::yield_now().await;
        }
    })
    .await
    .expect("the read was refused");
    let _: () = redis::cmd("ACL").arg(&["SETUSER", "default", "+hgetall"][..]).query_async(&mut admin).await.expect("allow");

    let seen = tokio::time::timeout(Duration::from_secs(10), watch.wait_for(|c| !c.deliveries.is_empty()))
        .await
        .expect("the change reaches the watcher after the refused read")
        .expect("open")
        .clone();
    assert_eq!(seen.deliveries, vec![delivery]);
}

/// A replica that does not remember the user's devices (the IdP's replica, on
/// the user's first sign-in since it started) creates in one call: `create.lua`
/// chooses the pushes from the devices as they stand, and the replica remembers
/// them for the next sign-in, which is one call too. Its watchers meet the
/// challenge as written, deliveries and all.
#[tokio::test]
async fn a_first_sign_in_on_a_replica_is_one_call() {
    let server = RedisServer::start().await;
    let clock = ManualClock::starting_now();
    let (enrolling, idp) = (store_on(vec![server.url()], clock.clone()).await, store_on(vec![server.url()], clock.clone()).await);
    let (tenant, user) = (Scope::unique().tenant("a"), UserId::parse("u").expect("user"));
    let now = clock.now();
    let device = enrolled_device(&enrolling, &tenant, &user, now).await;
    assert_eq!(idp.challenge_devices(&tenant, &user), None, "never read here");
    let mut admin = raw(&server.url()).await;
    let room = PushRoom([10; 3]);

    let before = evalsha_calls(&mut admin).await;
    let challenge = sample_challenge(&tenant, &user, now, None);
    let (created, from) = match idp.create_for(challenge, &policy(), now, PushesFrom::Store(room)).await.expect("create") {
        CreateFor::Chose(created, from) => (created, from),
        other => panic!("expected the script to choose, got {other:?}"),
    };
    assert_eq!(evalsha_calls(&mut admin).await - before, 1, "one script call, no read before it");
    assert_eq!(created.deliveries.iter().map(|d| &d.device_id).collect::<Vec<_>>(), [&device.id]);
    assert_eq!(from.devices, vec![device.clone()]);
    let watch = idp.watch_challenge(&tenant, &created.id, now).await.expect("watch").expect("found");
    assert_eq!(*watch.borrow(), created, "the watchers start from the challenge as written");

    // Remembered: the next sign-in's pushes are chosen here, and checked there.
    let remembered = idp.challenge_devices(&tenant, &user).expect("remembered");
    assert_eq!(remembered, from);
    let before = evalsha_calls(&mut admin).await;
    let next = sample_challenge(&tenant, &user, now, None);
    let pushes = PushesFrom::Devices(remembered.seen.as_deref());
    assert!(matches!(
        idp.create_for(next, &policy(), now, pushes).await.expect("create"),
        CreateFor::Done(CreateOutcome::Created(_))
    ));
    assert_eq!(evalsha_calls(&mut admin).await - before, 1);
}

async fn evalsha_calls(admin: &mut redis::aio::MultiplexedConnection) -> u64 {
    let stats: String = redis::cmd("INFO").arg("commandstats").query_async(admin).await.expect("info");
    stats
        .lines()
        .find_map(|line| line.strip_prefix("cmdstat_evalsha:calls="))
        .and_then(|rest| rest.split(',').next())
        .map_or(0, |calls| calls.parse().expect("a count"))
}
