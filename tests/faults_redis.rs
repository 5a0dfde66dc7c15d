//! Redis killed (SIGKILL) and restarted mid-burst under two broker replicas: calls
//! fail closed with UNAVAILABLE while it is down, no answer is accepted without
//! its watcher told, and sign-ins succeed again within seconds of the restart
//! with no help (the replicas reconnect by themselves).
//!
//! The push queue full under a burst, with a stalled provider: CreateChallenge is
//! refused with RESOURCE_EXHAUSTED naming the setting, the sign-ins already
//! created finish (the app pulls), and creates succeed again once it drains.

// Tests: a failed expectation is a failed test.
#![allow(clippy::expect_used, clippy::unwrap_used, clippy::panic)]

#[path = "faults/load.rs"]
mod load;
mod support;

use std::sync::Arc;
use std::time::{Duration, Instant};

use load::{Load, OnError, Worker};
use pushmatch::config::{Config, StoreBackend};
use pushmatch::domain::time::ManualClock;
use pushmatch::pb;
use pushmatch::phone::PhoneKey;
use pushmatch::store::redis::testing::RedisServer;
use support::{KEY_A, TestServer};

const SHARED_KEY: &str = "00112233445566778899aabbccddeeff00112233445566778899aabbccddeeff";

/// Limits out of the way of a burst of one user's sign-ins after another.
fn burst_limits(config: &mut Config) {
    config.limits.max_challenges_per_window = 100_000;
    config.limits.max_pending_per_user = 10;
}

fn on_redis(url: String) -> impl Fn(&mut Config) {
    move |config| {
        config.store.backend = StoreBackend::Redis;
        config.store.redis_url = url.clone();
        config.store.operation_timeout_ms = 500;
        config.secrets.key_hex = SHARED_KEY.to_owned();
        burst_limits(config);
    }
}

/// `count` users, each with a phone; the IdP of user i calls `idp[i % 2]` and its
/// phone calls the other replica.
async fn workers(replicas: [&TestServer; 2], count: usize) -> Vec<Worker> {
    let mut workers = Vec::new();
    for i in 0..count {
        let (idp, phone_side) = (replicas[i % 2], replicas[(i + 1) % 2]);
        let user = format!("user-{i}");
        let phone = idp.enrolled_phone(&user, PhoneKey::ed25519(), pb::Platform::Fcm).await;
        workers.push(Worker {
            user,
            idp: idp.channel.clone(),
            phone_channel: phone_side.channel.clone(),
            key: phone.key().clone(),
            device_id: phone.device_id().to_owned(),
        });
    }
    workers
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn redis_killed_mid_burst_fails_closed_and_heals_by_itself() {
    let mut redis = RedisServer::start_durable().await;
    let clock = ManualClock::starting_now();
    let a = TestServer::start_on(Arc::new(tempfile::tempdir().expect("dir")), clock.clone(), on_redis(redis.url())).await;
    let b = TestServer::start_on(Arc::new(tempfile::tempdir().expect("dir")), clock, on_redis(redis.url())).await;
    let mut load = Load::start(workers([&a, &b], 16).await, KEY_A, OnError::Retry);
    load.wait_for_more(40).await;

    redis.kill().await;
    let refused_before = load.tally.lock().count("Unavailable");
    // Calls fail closed while it is down: many UNAVAILABLE, nothing else.
    load.wait_until(|tally| tally.count("Unavailable") >= refused_before + 50).await;
    let completed_while_down = load.tally.lock().completed;

    redis.restart().await;
    let restarted = Instant::now();
    load.wait_until(|tally| tally.completed > completed_while_down).await;
    let first_sign_in = restarted.elapsed();
    load.wait_for_more(40).await;
    let forty_sign_ins = restarted.elapsed();
    let tally = load.finish().await;
    eprintln!(
        "redis kill/restart: {}; first sign-in {first_sign_in:?} after the restart, 40 more by {forty_sign_ins:?}",
        tally.summary()
    );
    assert!(first_sign_in < Duration::from_secs(5), "sign-ins succeed within seconds: {first_sign_in:?}");
    assert_eq!((tally.lost, tally.double), (0, 0), "{}", tally.summary());
    // The watchers stayed open through the outage and read the final state after.
    assert_eq!(tally.watcher_unavailable, 0, "{}", tally.summary());
    assert!(tally.unexpected_codes(&["Unavailable"]).is_empty(), "only UNAVAILABLE: {}", tally.summary());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_full_push_queue_under_a_burst_sheds_creates_and_recovers() {
    let server = TestServer::start_with(|config| {
        burst_limits(config);
        config.push.queue_capacity = 8;
        config.push.max_in_flight = 2;
        config.push.queue_share_per_tenant = 1.0;
    })
    .await;
    let mut load = Load::start(workers([&server, &server], 16).await, KEY_A, OnError::Retry);
    load.wait_for_more(20).await;

    // The providers stall: the queue fills, and creates are shed at once.
    server.fcm.hold();
    load.wait_until(|tally| tally.count("ResourceExhausted") >= 30).await;
    let shed = load.tally.lock().messages.get("ResourceExhausted").cloned().unwrap_or_default();
    assert!(shed.contains("push.queue_capacity"), "the message names the setting: {shed}");

    // They answer again: the queue drains and sign-ins go through by themselves.
    server.fcm.release();
    let completed = load.tally.lock().completed;
    load.wait_until(|tally| tally.completed >= completed + 20).await;
    let tally = load.finish().await;
    eprintln!("push queue full: {}", tally.summary());
    assert_eq!((tally.lost, tally.double, tally.watcher_unavailable), (0, 0, 0), "{}", tally.summary());
    assert!(tally.unexpected_codes(&["ResourceExhausted"]).is_empty(), "only RESOURCE_EXHAUSTED: {}", tally.summary());
}
