//! Pub/sub between replicas on one Redis, seen by someone else who can reach that
//! Redis: what crosses the channels during a whole sign-in (an id and a version,
//! never the number or the challenge), and what a forged message does to the IdP's
//! watch stream (nothing).

// Tests: a failed expectation is a failed test.
#![allow(clippy::expect_used, clippy::unwrap_used, clippy::panic)]

mod support;

use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt as _;
use pushmatch::config::{Config, StoreBackend};
use pushmatch::domain::time::ManualClock;
use pushmatch::pb;
use pushmatch::phone::PhoneKey;
use pushmatch::store::redis::SHARDS;
use pushmatch::store::redis::testing::RedisServer;
use support::*;

const SHARED_KEY: &str = "8c0f5b1e2d3a4f6071829304a5b6c7d8e9f00112233445566778899aabbccddee";

fn on_redis(url: String) -> impl FnOnce(&mut Config) {
    move |config| {
        config.store.backend = StoreBackend::Redis;
        config.store.redis_url = url;
        config.store.operation_timeout_ms = 500;
        config.secrets.key_hex = SHARED_KEY[..64].to_owned();
    }
}

/// Two replicas on one Redis, sharing one clock.
async fn two_replicas(redis: &RedisServer) -> (TestServer, TestServer) {
    let clock = ManualClock::starting_now();
    let a = TestServer::start_on(Arc::new(tempfile::tempdir().expect("dir")), clock.clone(), on_redis(redis.url())).await;
    let b = TestServer::start_on(Arc::new(tempfile::tempdir().expect("dir")), clock, on_redis(redis.url())).await;
    (a, b)
}

async fn raw(redis: &RedisServer) -> redis::aio::MultiplexedConnection {
    redis::Client::open(redis.url()).expect("url").get_multiplexed_async_connection().await.expect("connect")
}

/// A sign-in across two replicas (created and watched on A, answered on B), with a
/// raw client subscribed to every channel of the Redis all along: each message is
/// `<challenge id> <version>`; the number and the challenge never cross.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_number_crosses_pub_sub_during_a_sign_in() {
    let redis = RedisServer::start().await;
    let mut listener = redis::Client::open(redis.url()).expect("url").get_async_pubsub().await.expect("pubsub");
    listener.psubscribe("*").await.expect("psubscribe");
    let mut messages = listener.into_on_message();
    let (a, b) = two_replicas(&redis).await;
    let enrollment = a.begin_enrollment("jan").await;
    let mut phone = b.phone(PhoneKey::ed25519(), pb::Platform::Fcm);
    phone.enroll(&enrollment.uri, "phone").await.expect("enroll");
    let challenge = a.create_challenge("jan").await;
    let mut watch_a = a.watch(&challenge.challenge_id).await;
    let mut watch_b = b.watch(&challenge.challenge_id).await;
    let pending = phone.pending().await.expect("pending");
    assert_eq!(pending[0].challenge_id, challenge.challenge_id);
    let answer = phone.respond(&challenge.challenge_id, pb::Decision::Approve, &challenge.number).await.expect("answer");
    assert!(answer.accepted);
    for watch in [&mut watch_a, &mut watch_b] {
        assert_eq!(follow_to_final(watch).await.pop().expect("final").state(), pb::ChallengeState::Approved);
    }
    // Everything published so far comes before this marker.
    let mut connection = raw(&redis).await;
    let _: i64 = redis::cmd("PUBLISH").arg("test:end").arg("end").query_async(&mut connection).await.expect("publish");

    let mut announcements = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            let message = messages.next().await.expect("subscribed");
            let payload: String = message.get_payload().expect("text");
            if message.get_channel_name() == "test:end" {
                return;
            }
            announcements.push((message.get_channel_name().to_owned(), payload));
        }
    })
    .await
    .expect("the marker arrives");
    assert!(!announcements.is_empty(), "the sign-in's changes were announced");
    let mut versions = Vec::new();
    for (channel, payload) in &announcements {
        assert!(channel.starts_with("pm:ev:"), "{channel}");
        let (id, version) = payload.split_once(' ').unwrap_or_else(|| panic!("not '<id> <version>': {payload:?}"));
        assert_eq!(id, challenge.challenge_id, "{payload:?}");
        versions.push(version.parse::<u64>().unwrap_or_else(|_| panic!("not '<id> <version>': {payload:?}")));
        assert!(!payload.contains('{') && !payload.contains("number"), "{payload:?}");
    }
    assert!(versions.windows(2).all(|pair| pair[0] < pair[1]), "{versions:?}");
}

/// Someone who can PUBLISH announces the challenge APPROVED on every channel
/// (a higher version and the record's JSON with its state changed, the old
/// format), and garbage besides. The IdP's watch on the other replica goes on
/// showing PENDING, and the first final state it shows is the real one: the
/// phone's denial.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forged_approval_on_pub_sub_does_not_reach_the_idp() {
    let redis = RedisServer::start().await;
    let (a, b) = two_replicas(&redis).await;
    let enrollment = a.begin_enrollment("jan").await;
    let mut phone = b.phone(PhoneKey::ed25519(), pb::Platform::Fcm);
    phone.enroll(&enrollment.uri, "phone").await.expect("enroll");
    let challenge = a.create_challenge("jan").await;
    let mut watch = a.watch(&challenge.challenge_id).await;
    assert_eq!(watch.message().await.expect("first").expect("state").state(), pb::ChallengeState::Pending);

    let mut attacker = raw(&redis).await;
    let keys: Vec<String> =
        redis::cmd("KEYS").arg(format!("pm:{{*}}:ch:{}", challenge.challenge_id)).query_async(&mut attacker).await.expect("keys");
    let json: String = redis::cmd("HGET").arg(&keys[0]).arg("json").query_async(&mut attacker).await.expect("hget");
    let approved = json.replacen(r#""state":"Pending""#, r#""state":"Approved""#, 1);
    assert_ne!(approved, json, "the forgery says APPROVED");
    for shard in 0..SHARDS {
        for payload in [
            format!("{} 999 {approved}", challenge.challenge_id),
            format!("{} 1000", challenge.challenge_id),
            "garbage".to_owned(),
        ] {
            let _: i64 = redis::cmd("PUBLISH")
                .arg(format!("pm:ev:{shard}"))
                .arg(payload)
                .query_async(&mut attacker)
                .await
                .expect("publish");
        }
    }

    let answer = phone.respond(&challenge.challenge_id, pb::Decision::Deny, "").await.expect("answer");
    assert!(answer.accepted, "the challenge was still open for the phone");
    let seen = follow_to_final(&mut watch).await;
    assert!(seen[..seen.len() - 1].iter().all(|c| c.state() == pb::ChallengeState::Pending), "{seen:?}");
    assert_eq!(seen.last().expect("final").state(), pb::ChallengeState::Denied);
    let read = a
        .challenges(KEY_A)
        .get_challenge(pb::GetChallengeRequest { challenge_id: challenge.challenge_id.clone() })
        .await
        .expect("get")
        .into_inner();
    assert_eq!(read.state(), pb::ChallengeState::Denied);
}
