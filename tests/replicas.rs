//! Stateless replicas on one Redis: what one replica does, the other sees at once;
//! exactly one answer wins across both; an outage fails closed and heals by itself.

// Tests: a failed expectation is a failed test.
#![allow(clippy::expect_used, clippy::unwrap_used, clippy::panic)]

mod support;

use std::sync::Arc;
use std::time::Duration;

use pushmatch::config::{Config, StoreBackend};
use pushmatch::domain::time::ManualClock;
use pushmatch::pb;
use pushmatch::phone::{PhoneKey, SimulatedPhone};
use pushmatch::store::redis::testing::RedisServer;
use support::*;
use tonic::Code;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

const SHARED_KEY: &str = "8c0f5b1e2d3a4f6071829304a5b6c7d8e9f00112233445566778899aabbccddee";

fn on_redis(url: String) -> impl FnOnce(&mut Config) {
    move |config| {
        config.store.backend = StoreBackend::Redis;
        config.store.redis_url = url;
        // Short enough that an outage fails well within DEADLINE, long enough that
        // fifty racing answers on a loaded 2-core CI machine are not cut off.
        config.store.operation_timeout_ms = 3_000;
        config.secrets.key_hex = SHARED_KEY[..64].to_owned();
    }
}

/// Two replicas on one Redis, sharing one clock (the clock of "the store").
async fn two_replicas(redis: &RedisServer) -> (TestServer, TestServer) {
    let clock = ManualClock::starting_now();
    let a = TestServer::start_on(Arc::new(tempfile::tempdir().expect("dir")), clock.clone(), on_redis(redis.url())).await;
    let b = TestServer::start_on(Arc::new(tempfile::tempdir().expect("dir")), clock, on_redis(redis.url())).await;
    (a, b)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_watcher_on_one_replica_sees_an_answer_made_on_the_other() {
    let redis = RedisServer::start().await;
    let (a, b) = two_replicas(&redis).await;
    // Enrolled through A; the phone talks to B.
    let enrollment = a.begin_enrollment("jan").await;
    let mut phone = b.phone(PhoneKey::ed25519(), pb::Platform::Fcm);
    phone.enroll(&enrollment.uri, "phone").await.expect("enroll on B with A's code");
    let challenge = a.create_challenge("jan").await;
    let mut watch_a = a.watch(&challenge.challenge_id).await;
    let mut watch_b = b.watch(&challenge.challenge_id).await;
    assert_eq!(phone.pending().await.expect("pending on B")[0].challenge_id, challenge.challenge_id);
    let answer = phone.respond(&challenge.challenge_id, pb::Decision::Approve, &challenge.number).await.expect("answer on B");
    assert!(answer.accepted);
    for watch in [&mut watch_a, &mut watch_b] {
        let last = follow_to_final(watch).await.pop().expect("final");
        assert_eq!(last.state(), pb::ChallengeState::Approved);
        assert_eq!(last.resolved_by_device_id, phone.device_id());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expiry_reaches_watchers_on_both_replicas() {
    let redis = RedisServer::start().await;
    let (a, b) = two_replicas(&redis).await;
    a.enrolled_phone("jan", PhoneKey::ed25519(), pb::Platform::Fcm).await;
    let challenge = a
        .challenges(KEY_A)
        .create_challenge(pb::CreateChallengeRequest { user_id: "jan".into(), ttl_seconds: 30, ..Default::default() })
        .await
        .expect("create")
        .into_inner();
    let mut watch_a = a.watch(&challenge.challenge_id).await;
    let mut watch_b = b.watch(&challenge.challenge_id).await;
    for watch in [&mut watch_a, &mut watch_b] {
        assert_eq!(watch.message().await.expect("first").expect("state").state(), pb::ChallengeState::Pending);
    }
    a.clock.advance(Duration::from_secs(30));
    for watch in [&mut watch_a, &mut watch_b] {
        assert_eq!(follow_to_final(watch).await.pop().expect("final").state(), pb::ChallengeState::Expired);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_approvals_spread_over_both_replicas_accept_exactly_one() {
    let redis = RedisServer::start().await;
    let (a, b) = two_replicas(&redis).await;
    let phone = a.enrolled_phone("jan", PhoneKey::ed25519(), pb::Platform::Fcm).await;
    let challenge = a.create_challenge("jan").await;
    let mut watch = b.watch(&challenge.challenge_id).await;
    // Fifty answers, each with a proof of its own (a proof works once), sent at once.
    let fields = [challenge.challenge_id.as_str(), "DECISION_APPROVE", challenge.number.as_str()];
    let now = pushmatch::domain::time::Clock::now(&a.clock).0;
    let answers = (0..50i64).map(|i| {
        let channel = if i % 2 == 0 { a.channel.clone() } else { b.channel.clone() };
        let mut replica_phone = SimulatedPhone::new(channel, phone.key().clone(), pb::Platform::Fcm, FCM_TOKEN);
        replica_phone.impersonate(phone.device_id());
        let proof = phone.proof_at("RespondToChallenge", &fields, now + i);
        let (id, number) = (challenge.challenge_id.clone(), challenge.number.clone());
        tokio::spawn(async move { replica_phone.respond_with(proof, &id, pb::Decision::Approve, &number).await })
    });
    let mut accepted = 0;
    for answer in futures::future::join_all(answers).await {
        let answer = answer.expect("task").expect("answered");
        assert_eq!(answer.state(), pb::ChallengeState::Approved);
        accepted += usize::from(answer.accepted);
    }
    assert_eq!(accepted, 1);
    assert_eq!(follow_to_final(&mut watch).await.pop().expect("final").state(), pb::ChallengeState::Approved);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_proof_used_on_one_replica_is_refused_on_the_other() {
    let redis = RedisServer::start().await;
    let (a, b) = two_replicas(&redis).await;
    let mut phone = a.enrolled_phone("jan", PhoneKey::ed25519(), pb::Platform::Fcm).await;
    a.create_challenge("jan").await;
    let proof = phone.proof("ListPendingChallenges", &[]);
    assert_eq!(phone.pending_with(proof.clone()).await.expect("first use, on replica a").len(), 1);
    let mut on_b = SimulatedPhone::new(b.channel.clone(), phone.key().clone(), pb::Platform::Fcm, FCM_TOKEN);
    on_b.impersonate(phone.device_id());
    let replay = on_b.pending_with(proof).await.expect_err("the replay, on replica b");
    assert_eq!(replay.code(), tonic::Code::Unauthenticated, "{replay:?}");
}

async fn wait_for_health(server: &TestServer, wanted: ServingStatus) {
    let mut health = HealthClient::new(server.channel.clone());
    let mut updates =
        health.watch(tonic_health::pb::HealthCheckRequest { service: String::new() }).await.expect("health watch").into_inner();
    tokio::time::timeout(DEADLINE, async {
        while let Some(update) = updates.message().await.expect("health update") {
            if update.status() == wanted {
                return;
            }
        }
        panic!("health stream ended");
    })
    .await
    .unwrap_or_else(|_| panic!("health reads {wanted:?} in time"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_outage_fails_closed_and_heals_by_itself() {
    let mut redis = RedisServer::start_durable().await;
    let server =
        TestServer::start_on(Arc::new(tempfile::tempdir().expect("dir")), ManualClock::starting_now(), on_redis(redis.url()))
            .await;
    let mut phone = server.enrolled_phone("jan", PhoneKey::ed25519(), pb::Platform::Fcm).await;
    let pending = server.create_challenge("jan").await;

    redis.kill().await;
    let mut challenges = server.challenges(KEY_A);
    let started = std::time::Instant::now();
    let refused = challenges.create_challenge(pb::CreateChallengeRequest { user_id: "jan".into(), ..Default::default() }).await;
    assert_code(refused, Code::Unavailable, "redis store");
    assert!(started.elapsed() < DEADLINE, "fails within the deadline, no hang");
    let read = challenges.get_challenge(pb::GetChallengeRequest { challenge_id: pending.challenge_id.clone() }).await;
    assert_code(read, Code::Unavailable, "redis store");
    assert_code(phone.pending().await, Code::Unavailable, "redis store");
    wait_for_health(&server, ServingStatus::NotServing).await;

    redis.restart().await;
    wait_for_health(&server, ServingStatus::Serving).await;
    // The pending challenge survived (AOF) and did not approve itself.
    let read = challenges
        .get_challenge(pb::GetChallengeRequest { challenge_id: pending.challenge_id.clone() })
        .await
        .expect("readable again")
        .into_inner();
    assert!(matches!(read.state(), pb::ChallengeState::Pending | pb::ChallengeState::Expired), "{:?}", read.state());
    // And the whole flow works again without restarting pushmatch.
    challenges.cancel_challenge(pb::CancelChallengeRequest { challenge_id: pending.challenge_id }).await.expect("cancel");
    let challenge = server.create_challenge("jan").await;
    let mut watch = server.watch(&challenge.challenge_id).await;
    phone.respond(&challenge.challenge_id, pb::Decision::Approve, &challenge.number).await.expect("answer");
    assert_eq!(follow_to_final(&mut watch).await.pop().expect("final").state(), pb::ChallengeState::Approved);
}

/// Past `server.max_creates_in_flight`, CreateChallenge is refused at once instead of
/// queueing behind a slow store; the call in flight completes once the store answers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn creates_past_the_in_flight_cap_are_shed_at_once() {
    use futures::StreamExt as _;
    let redis = RedisServer::start().await;
    let server = TestServer::start_on(Arc::new(tempfile::tempdir().expect("dir")), ManualClock::starting_now(), |config| {
        on_redis(redis.url())(config);
        config.server.max_creates_in_flight = 1;
        // Longer than the test waits: the call in flight hangs until Redis thaws.
        config.store.operation_timeout_ms = 60_000;
    })
    .await;
    server.enrolled_phone("jan", PhoneKey::ed25519(), pb::Platform::Fcm).await;

    // Redis stops answering; of three creates at once, one takes the only slot and
    // waits for Redis, the other two are shed without touching it.
    redis.freeze(true).await;
    let mut calls: futures::stream::FuturesUnordered<_> = (0..3)
        .map(|i| {
            let mut challenges = server.challenges(KEY_A);
            tokio::spawn(async move {
                let request =
                    pb::CreateChallengeRequest { user_id: "jan".into(), request_id: format!("r{i}"), ..Default::default() };
                challenges.create_challenge(request).await
            })
        })
        .collect();
    for _ in 0..2 {
        let shed = tokio::time::timeout(DEADLINE, calls.next()).await.expect("shed at once").expect("a call").expect("joins");
        let status = shed.expect_err("shed");
        assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
        assert!(status.message().contains("server.max_creates_in_flight"), "{status:?}");
    }

    redis.freeze(false).await;
    let admitted = tokio::time::timeout(DEADLINE, calls.next()).await.expect("answered").expect("a call").expect("joins");
    let created = admitted.expect("the call in flight completes once Redis answers").into_inner();
    assert_eq!(created.state(), pb::ChallengeState::Pending);
    // The slot is free again.
    server.create_challenge("jan").await;
}

/// The device ids a new challenge of `user` on `server` is pushed to; the
/// challenge is cancelled again (a user holds at most 3 pending).
async fn pushed_to(server: &TestServer, user: &str) -> Vec<String> {
    let challenge = server.create_challenge(user).await;
    server
        .challenges(KEY_A)
        .cancel_challenge(pb::CancelChallengeRequest { challenge_id: challenge.challenge_id.clone() })
        .await
        .expect("cancel");
    let mut ids: Vec<String> = challenge.deliveries.iter().map(|d| d.device_id.clone()).collect();
    ids.sort();
    ids
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_that_remembers_a_users_devices_sees_every_change_made_on_the_other() {
    let redis = RedisServer::start().await;
    let (a, b) = two_replicas(&redis).await;
    // A reads jan's one phone for its first challenge and remembers it.
    let first = a.enrolled_phone("jan", PhoneKey::ed25519(), pb::Platform::Fcm).await;
    assert_eq!(pushed_to(&a, "jan").await, vec![first.device_id().to_owned()]);
    // A second phone, enrolled on B, is pushed to by A's next challenge.
    let enrollment = b.begin_enrollment("jan").await;
    let mut second = b.phone(PhoneKey::ed25519(), pb::Platform::Apns);
    second.enroll(&enrollment.uri, "second phone").await.expect("enroll on B");
    let mut both = vec![first.device_id().to_owned(), second.device_id().to_owned()];
    both.sort();
    assert_eq!(pushed_to(&a, "jan").await, both);
    // An answer (on B) records the phone's last use: that changes nothing A must
    // choose its pushes by, and its next challenge still goes to both.
    let challenge = a.create_challenge("jan").await;
    second.respond(&challenge.challenge_id, pb::Decision::Approve, &challenge.number).await.expect("answer");
    assert_eq!(pushed_to(&a, "jan").await, both);
    // The first phone removed on B: A pushes to the second only.
    b.enrollments(KEY_A)
        .remove_device(pb::RemoveDeviceRequest { device_id: first.device_id().into() })
        .await
        .expect("remove on B");
    assert_eq!(pushed_to(&a, "jan").await, vec![second.device_id().to_owned()]);
    // The last one removed on B: A refuses, naming the field.
    b.enrollments(KEY_A)
        .remove_device(pb::RemoveDeviceRequest { device_id: second.device_id().into() })
        .await
        .expect("remove on B");
    let refused = a
        .challenges(KEY_A)
        .create_challenge(pb::CreateChallengeRequest { user_id: "jan".into(), ..Default::default() })
        .await
        .expect_err("no device left");
    assert_eq!(refused.code(), Code::FailedPrecondition);
    assert!(refused.message().starts_with("user_id:"), "{}", refused.message());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_phone_removed_on_one_replica_cannot_answer_on_the_other_that_remembers_it() {
    let redis = RedisServer::start().await;
    let (a, b) = two_replicas(&redis).await;
    let enrollment = a.begin_enrollment("jan").await;
    let mut phone = b.phone(PhoneKey::ed25519(), pb::Platform::Fcm);
    phone.enroll(&enrollment.uri, "phone").await.expect("enroll on B");
    a.enrolled_phone("jan", PhoneKey::ed25519(), pb::Platform::Apns).await;
    // The phone answers on B, which remembers it.
    let challenge = a.create_challenge("jan").await;
    phone.respond(&challenge.challenge_id, pb::Decision::Approve, &challenge.number).await.expect("answer on B");
    // Removed on A (a stolen phone), it cannot answer on B.
    let challenge = a.create_challenge("jan").await;
    a.enrollments(KEY_A).remove_device(pb::RemoveDeviceRequest { device_id: phone.device_id().into() }).await.expect("remove");
    let refused =
        phone.respond(&challenge.challenge_id, pb::Decision::Approve, &challenge.number).await.expect_err("a removed phone");
    assert_eq!(refused.code(), Code::Unauthenticated);
    assert!(refused.message().starts_with("proof.device_id:"), "{}", refused.message());
    let still = a
        .challenges(KEY_A)
        .get_challenge(pb::GetChallengeRequest { challenge_id: challenge.challenge_id.clone() })
        .await
        .expect("get")
        .into_inner();
    assert_eq!(still.state(), pb::ChallengeState::Pending);
}

/// A replica that never met the user lets `create.lua` choose the pushes within
/// the room its queue has. With the provider stalled and its queue full, a first
/// create is shed naming the setting and writes nothing, as a create from devices
/// read first would be; a user without a device that can answer is refused
/// naming the field.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_first_create_on_a_replica_is_refused_as_one_from_devices_read_first() {
    let redis = RedisServer::start().await;
    let clock = ManualClock::starting_now();
    let server = TestServer::start_on(Arc::new(tempfile::tempdir().expect("dir")), clock.clone(), |config| {
        on_redis(redis.url())(config);
        config.push.queue_capacity = 2;
        config.push.max_in_flight = 1;
        config.push.queue_share_per_tenant = 1.0;
    })
    .await;
    // The phones enroll on another replica: this one never read their users' devices.
    let enrolling = TestServer::start_on(Arc::new(tempfile::tempdir().expect("dir")), clock, on_redis(redis.url())).await;
    let refused = server
        .challenges(KEY_A)
        .create_challenge(pb::CreateChallengeRequest { user_id: "nobody".into(), ..Default::default() })
        .await
        .expect_err("no device");
    assert_eq!(refused.code(), Code::FailedPrecondition);
    assert!(refused.message().starts_with("user_id:"), "{}", refused.message());

    server.fcm.hold();
    let mut shed = None;
    for i in 0..8 {
        let user = format!("user-{i}");
        let mut phone = enrolling.enrolled_phone(&user, PhoneKey::ed25519(), pb::Platform::Fcm).await;
        let request = pb::CreateChallengeRequest { user_id: user.clone(), ..Default::default() };
        match server.challenges(KEY_A).create_challenge(request).await {
            Ok(created) => assert_eq!(created.into_inner().deliveries.len(), 1, "pushed to the phone"),
            Err(status) => {
                shed = Some((status, phone.pending().await.expect("pending")));
                break;
            }
        }
    }
    let (status, pending) = shed.expect("the held provider's queue fills within eight creates");
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    assert!(status.message().contains("push.queue_capacity"), "{status:?}");
    assert!(pending.is_empty(), "nothing was written for the shed create: {pending:?}");
    server.fcm.release();
}
