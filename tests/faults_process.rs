//! Faults of the broker process itself, on the real `pushmatch serve` binary with
//! the embedded store, under a burst of sign-ins through real tonic clients:
//!
//! - `kill -9` mid-burst, then a restart on the same data: every acknowledged
//!   device, block and spent TOTP step is there; live challenges are gone (the
//!   documented loss); no watcher ever read a wrong final state.
//! - SIGTERM mid-burst (on the default runtime and on one thread): the answers in
//!   flight finish and their watchers read the final state before the process
//!   exits; new calls read UNAVAILABLE.
//!
//! Each ends with lost = 0 and double = 0 (see `faults/load.rs`).
//!
//! - SIGHUP: the tenants are reloaded from the file (a new tenant's key works); a
//!   file that does not load is refused and the tenants in force stay.

// Tests: a failed expectation is a failed test.
#![allow(clippy::expect_used, clippy::unwrap_used, clippy::panic)]

#[path = "faults/enroll.rs"]
mod enroll;
#[path = "faults/load.rs"]
mod load;
#[path = "faults/process.rs"]
mod process;

use enroll::{current_step, device_ids, enroll, enroll_many, enroll_totp, report_fraud, totp_code, verify_totp};
use load::{Load, OnError, challenges, sign_in};
use parking_lot::Mutex;
use process::{API_KEY, BrokerProcess, config};
use pushmatch::pb;
use pushmatch::phone::PhoneKey;
use tokio::sync::watch;
use tonic::Code;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

/// Durable writes acknowledged while the burst runs: the phones enrolled (user,
/// device id, key), and the users whose fraud report was accepted (blocked).
#[derive(Clone, Default)]
struct Acknowledged {
    devices: Vec<(String, String, PhoneKey)>,
    blocked: Vec<String>,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn kill_9_mid_burst_keeps_every_acknowledged_device_block_and_totp_step() {
    let dir = tempfile::tempdir().expect("temp dir");
    let data = dir.path().join("data");
    let broker = BrokerProcess::start(dir.path(), &config(&data, "")).await;
    let workers = enroll_many(&broker.channel, &broker.connection(), API_KEY, "burst", 16).await;
    let secret = enroll_totp(&broker.channel, API_KEY, "totp-user").await;
    // The next step's code is accepted now (one step either side) and spends it.
    let spent = totp_code(&secret, current_step() + 1);
    assert!(verify_totp(&broker.channel, API_KEY, "totp-user", &spent).await.expect("verify"));
    let mut load = Load::start(workers, API_KEY, OnError::Stop);

    // Beside the burst, durable writes: enrollments and fraud reports (blocks),
    // each noted once the broker acknowledged it.
    let (note, acknowledged) = watch::channel(Acknowledged::default());
    let writer = tokio::spawn({
        let (idp, phones) = (broker.connection(), broker.connection());
        async move {
            for i in 0.. {
                let Ok(worker) = enroll(&idp, &phones, API_KEY, &format!("durable-{i}")).await else { return };
                note.send_modify(|a| a.devices.push((worker.user.clone(), worker.device_id.clone(), worker.key.clone())));
                if i % 2 == 0 {
                    if report_fraud(&worker, API_KEY).await.is_err() {
                        return;
                    }
                    note.send_modify(|a| a.blocked.push(worker.user.clone()));
                }
            }
        }
    });
    load.wait_for_more(60).await;
    let mut waiting = acknowledged.clone();
    tokio::time::timeout(load::DEADLINE, waiting.wait_for(|a| a.blocked.len() >= 3)).await.expect("blocks").expect("open");
    broker.kill9().await;
    let tally = load.finish().await;
    writer.await.expect("the writer ends once the broker is gone");
    let acknowledged = acknowledged.borrow().clone();
    eprintln!("kill -9: {}; devices acknowledged during the burst {}", tally.summary(), acknowledged.devices.len());
    assert_eq!((tally.lost, tally.double), (0, 0), "{}", tally.summary());
    // A call in flight when the process died reads the client's "transport error";
    // later ones UNAVAILABLE. A watcher reads either, never a final state.
    let allowed = ["Unavailable", load::CONNECTION_LOST];
    assert!(tally.unexpected_codes(&allowed).is_empty(), "only UNAVAILABLE or a lost connection: {}", tally.summary());

    // Restart on the same data.
    let broker = BrokerProcess::start(dir.path(), &config(&data, "")).await;
    let idp = &broker.channel;
    for (user, device, _) in &acknowledged.devices {
        let listed = device_ids(idp, API_KEY, user).await.expect("list devices");
        assert_eq!(listed, std::slice::from_ref(device), "{user}'s device survived the crash");
    }
    for user in &acknowledged.blocked {
        let mut idp_challenges = challenges(idp, API_KEY);
        let refused = idp_challenges.create_challenge(pb::CreateChallengeRequest { user_id: user.clone(), ..Default::default() });
        let status = refused.await.expect_err("the block survived the crash");
        assert_eq!(status.code(), Code::FailedPrecondition, "{status:?}");
    }
    assert!(!verify_totp(idp, API_KEY, "totp-user", &spent).await.expect("verify"), "the spent TOTP step stays spent");
    // What a crash loses: the live challenges. Their watchers read NOT_FOUND now,
    // never a final state that no answer made.
    for (id, _) in tally.accepted_ids.iter().rev().take(20) {
        let read = challenges(idp, API_KEY).get_challenge(pb::GetChallengeRequest { challenge_id: id.clone() }).await;
        assert_eq!(read.expect_err("live challenges are in memory").code(), Code::NotFound);
    }
    // And sign-ins work again, with a phone enrolled before the crash.
    let (user, device_id, key) =
        acknowledged.devices.iter().find(|(user, ..)| !acknowledged.blocked.contains(user)).expect("an unblocked user");
    let phone = load::Worker {
        user: user.clone(),
        idp: idp.clone(),
        phone_channel: broker.connection(),
        key: key.clone(),
        device_id: device_id.clone(),
    };
    let after = Mutex::new(load::Tally::default());
    assert!(sign_in(&phone, API_KEY, &after, false).await, "a sign-in after the restart: {}", after.lock().summary());
    assert_eq!(after.lock().accepted, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sigterm_mid_burst_finishes_the_answers_in_flight_and_tells_their_watchers() {
    sigterm_mid_burst("").await;
}

/// The same drain with the broker on one thread (`server.worker_threads = 1`,
/// tokio's current-thread scheduler): nothing of the drain needs a second worker.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sigterm_mid_burst_drains_the_same_on_one_thread() {
    sigterm_mid_burst("worker_threads = 1").await;
}

async fn sigterm_mid_burst(server_extra: &str) {
    let dir = tempfile::tempdir().expect("temp dir");
    let data = dir.path().join("data");
    let server = format!("shutdown_grace_seconds = 3\n{server_extra}");
    let mut broker = BrokerProcess::start(dir.path(), &config(&data, &server)).await;
    let workers = enroll_many(&broker.channel, &broker.connection(), API_KEY, "burst", 24).await;
    // A health watch stays open through the drain (it ends with the grace period),
    // so the drain lasts long enough to call the broker while it drains.
    let mut health = HealthClient::new(broker.connection())
        .watch(tonic_health::pb::HealthCheckRequest { service: String::new() })
        .await
        .expect("health watch")
        .into_inner();
    assert_eq!(health.message().await.expect("health").expect("status").status(), ServingStatus::Serving);
    let mut load = Load::start(workers, API_KEY, OnError::Stop);
    load.wait_for_more(100).await;

    broker.sigterm();
    let draining = tokio::time::timeout(load::DEADLINE, health.message()).await.expect("health changes").expect("health");
    assert_eq!(draining.expect("status").status(), ServingStatus::NotServing);
    // A new call while it drains: UNAVAILABLE, on a new connection and on the
    // health watch's (which has the server's GOAWAY by now, or not yet).
    let on_new = challenges(&broker.connection(), API_KEY)
        .get_challenge(pb::GetChallengeRequest { challenge_id: "x".repeat(35) })
        .await
        .expect_err("refused while draining");
    assert_eq!(on_new.code(), Code::Unavailable, "{on_new:?}");
    let tally = load.finish().await;
    let status = broker.wait_exit().await;
    assert!(status.success(), "exits cleanly after the drain: {status:?}");
    broker.wait_log("stopped").await;
    // What the broker warned of goes with any failure below (a drain past its
    // grace says so).
    let context = format!("{}; the broker's warnings: {:?}", tally.summary(), broker.warnings());
    eprintln!("SIGTERM: {context}");
    assert_eq!((tally.lost, tally.double), (0, 0), "{context}");
    assert_eq!(tally.watcher_unavailable, 0, "every accepted answer's watcher read APPROVED: {context}");
    // Strictly UNAVAILABLE: the connections stay open (refusing) until every call
    // and watch stream has ended, so no call races their close (which read
    // CANCELLED when the server sent GOAWAY at the start of the drain).
    assert!(tally.unexpected_codes(&["Unavailable"]).is_empty(), "only UNAVAILABLE: {context}");
    assert!(tally.count("Unavailable") > 0, "the load met the drain: {context}");
}

#[tokio::test]
async fn sighup_reloads_the_tenants_and_a_bad_file_is_refused() {
    const NEW_KEY: &str = "faults-test-second-tenant-key-0123456789";
    let dir = tempfile::tempdir().expect("temp dir");
    let text = config(&dir.path().join("data"), "config_reload_interval_seconds = 0");
    let mut broker = BrokerProcess::start(dir.path(), &text).await;
    let channel = broker.connection();
    let create = |key: &'static str| {
        let mut client = challenges(&channel, key);
        async move { client.create_challenge(pb::CreateChallengeRequest { user_id: "nobody".into(), ..Default::default() }).await }
    };
    assert_eq!(create(NEW_KEY).await.expect_err("unknown").code(), Code::Unauthenticated);

    // A second tenant, then SIGHUP: its key works from the reload on.
    let second = format!(
        "{text}\n[[tenants]]\nid = \"c\"\ndisplay_name = \"C\"\napi_key_sha256 = [\"{}\"]\n",
        pushmatch::domain::api_key::api_key_digest_hex(NEW_KEY)
    );
    std::fs::write(dir.path().join("pushmatch.toml"), &second).expect("write");
    broker.sighup();
    broker.wait_log("configuration reloaded").await;
    // The user has no device: FAILED_PRECONDITION, past authentication.
    assert_eq!(create(NEW_KEY).await.expect_err("no device").code(), Code::FailedPrecondition);

    // A file that does not load: refused, logged, the tenants in force stay.
    std::fs::write(dir.path().join("pushmatch.toml"), format!("{second}\n[[tenants]]\nid = ")).expect("write");
    broker.sighup();
    let refused = broker.wait_log("configuration reload refused").await;
    assert!(refused["error"].as_str().is_some_and(|e| e.contains("pushmatch.toml")), "{refused}");
    assert_eq!(broker.count_logs("configuration reloaded"), 1);
    assert_eq!(create(NEW_KEY).await.expect_err("no device").code(), Code::FailedPrecondition, "c stays");
    assert_eq!(create(API_KEY).await.expect_err("no device").code(), Code::FailedPrecondition, "a stays");
}
