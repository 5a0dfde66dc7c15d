//! Tenants changed without a restart (`src/server/reload.rs`): a reload adds a
//! tenant, rotates a key and changes a limit while a sign-in is in flight; a bad
//! file is refused whole; a removed tenant's key is refused at once; the file watch
//! picks a change up by itself.

// Tests: a failed expectation is a failed test.
#![allow(clippy::expect_used, clippy::unwrap_used, clippy::panic)]

mod support;

use std::path::Path;

use pushmatch::domain::api_key::api_key_digest_hex;
use pushmatch::pb;
use pushmatch::phone::{P256Encoding, PhoneKey};
use support::*;
use tonic::Code;

const KEY_A2: &str = "tenant-a-second-api-key";
const KEY_C: &str = "tenant-c-api-key";

/// A configuration file: the store in `store`, tenant "a" with `a_keys` and
/// `a_limits` (lines of its `[tenants.limits]`), and tenant "c" when `with_c`.
fn config_text(store: &Path, a_keys: &[&str], a_limits: &str, with_c: bool, reload_every: u32) -> String {
    let digests: Vec<String> = a_keys.iter().map(|key| format!("{:?}", api_key_digest_hex(key))).collect();
    let mut text = format!(
        "[server]\nlisten = \"127.0.0.1:0\"\nmetrics_listen = \"\"\nconfig_reload_interval_seconds = {reload_every}\n\
         [store]\npath = {:?}\n\n\
         [[tenants]]\nid = \"a\"\ndisplay_name = \"Gors\"\napi_key_sha256 = [{}]\n",
        store.display().to_string(),
        digests.join(", ")
    );
    if !a_limits.is_empty() {
        text.push_str(&format!("[tenants.limits]\n{a_limits}\n"));
    }
    if with_c {
        text.push_str(&format!(
            "\n[[tenants]]\nid = \"c\"\ndisplay_name = \"Initech\"\napi_key_sha256 = [{:?}]\n",
            api_key_digest_hex(KEY_C)
        ));
    }
    text
}

/// Writes the file whole, as an editor or a config-management tool does (a new
/// file renamed over the old one, so a reader never sees half of it).
fn write_config(file: &Path, text: &str) {
    let fresh = file.with_extension("new");
    std::fs::write(&fresh, text).expect("write the configuration");
    std::fs::rename(&fresh, file).expect("replace the configuration");
}

async fn create(server: &TestServer, key: &str, user: &str) -> Result<pb::Challenge, tonic::Status> {
    server
        .challenges(key)
        .create_challenge(pb::CreateChallengeRequest { user_id: user.into(), ..Default::default() })
        .await
        .map(tonic::Response::into_inner)
}

/// Calls GetChallenge with `key` over and over while `reload` runs (and once more
/// after it): a rotation must not fail a call. Returns how many calls were made.
async fn calls_across(
    server: &TestServer,
    key: &str,
    challenge_id: &str,
    reload: impl std::future::Future<Output = ()>,
) -> usize {
    let done = std::sync::atomic::AtomicBool::new(false);
    let calls = async {
        let mut client = server.challenges(key);
        let mut made = 0;
        loop {
            let finished = done.load(std::sync::atomic::Ordering::Acquire);
            let request = pb::GetChallengeRequest { challenge_id: challenge_id.into() };
            client.get_challenge(request).await.unwrap_or_else(|status| panic!("call {made} with {key} failed: {status:?}"));
            made += 1;
            if finished {
                return made;
            }
        }
    };
    let reload = async {
        reload.await;
        done.store(true, std::sync::atomic::Ordering::Release);
    };
    tokio::join!(calls, reload).0
}

#[tokio::test]
async fn a_reload_adds_a_tenant_rotates_a_key_and_changes_a_limit_while_a_sign_in_is_in_flight() {
    let dir = tempfile::tempdir().expect("temp dir");
    let (store, file) = (dir.path().join("store"), dir.path().join("pushmatch.toml"));
    write_config(&file, &config_text(&store, &[KEY_A], "", false, 0));
    let server = TestServer::start_from_file(&file).await;
    let mut phone = server.enrolled_phone("jan", PhoneKey::p256(P256Encoding::Spki), pb::Platform::Apns).await;
    assert_code(server.begin_enrollment_as(KEY_C, "piet").await, Code::Unauthenticated, "unknown API key");

    // A sign-in in flight: created, pushed, watched.
    let in_flight = server.create_challenge("jan").await;
    let mut watch = server.watch(&in_flight.challenge_id).await;
    let first = watch.message().await.expect("watch").expect("the current state");
    assert_eq!(first.state(), pb::ChallengeState::Pending);

    // Step one of a rotation (both keys of "a"), a tighter limit for "a", and a new tenant.
    write_config(&file, &config_text(&store, &[KEY_A, KEY_A2], "max_pending_per_user = 1", true, 0));
    let calls = calls_across(&server, KEY_A, &in_flight.challenge_id, async {
        server.reload().await.expect("the new file loads");
    })
    .await;
    assert!(calls >= 1);

    // The sign-in in flight is untouched: the phone approves, the watch hears it.
    let answer = phone.respond(&in_flight.challenge_id, pb::Decision::Approve, &in_flight.number).await.expect("respond");
    assert!(answer.accepted);
    let updates = follow_to_final(&mut watch).await;
    assert_eq!(updates.last().map(pb::Challenge::state), Some(pb::ChallengeState::Approved));

    // Both keys of "a" work; the new tenant's key works and its name is its issuer.
    for key in [KEY_A, KEY_A2] {
        server
            .challenges(key)
            .get_challenge(pb::GetChallengeRequest { challenge_id: in_flight.challenge_id.clone() })
            .await
            .expect(key);
    }
    let initech = server.begin_enrollment_as(KEY_C, "piet").await.expect("the added tenant begins an enrollment");
    assert!(initech.uri.contains("issuer=Initech"), "{}", initech.uri);
    let kees = server.begin_enrollment_as(KEY_C, "kees").await.expect("begin");
    let mut initech_phone = server.phone(PhoneKey::p256(P256Encoding::Spki), pb::Platform::Fcm);
    initech_phone.enroll(&kees.uri, "kees's phone").await.expect("a phone of the added tenant enrolls");

    // The new limit: one pending challenge per user of "a" (three before the reload).
    create(&server, KEY_A2, "jan").await.expect("the first pending challenge");
    let refused = create(&server, KEY_A2, "jan").await.expect_err("a second one is past the new limit");
    assert_eq!(refused.code(), Code::ResourceExhausted, "{refused:?}");
    assert!(refused.message().contains("1 pending challenge"), "{refused:?}");

    // Step two of the rotation, and "c" removed: their keys are refused from the next call.
    write_config(&file, &config_text(&store, &[KEY_A2], "max_pending_per_user = 1", false, 0));
    calls_across(&server, KEY_A2, &in_flight.challenge_id, async { server.reload().await.expect("loads") }).await;
    assert_code(create(&server, KEY_A, "jan").await, Code::Unauthenticated, "unknown API key");
    assert_code(server.begin_enrollment_as(KEY_C, "piet").await, Code::Unauthenticated, "unknown API key");
    // The removed tenant's phones and open enrollment codes are refused too.
    assert_code(initech_phone.pending().await, Code::Unauthenticated, "proof.device_id");
    let mut late = server.phone(PhoneKey::p256(P256Encoding::Spki), pb::Platform::Fcm);
    assert_code(late.enroll(&initech.uri, "late phone").await, Code::FailedPrecondition, "enrollment_code");
    let read =
        server.challenges(KEY_A2).get_challenge(pb::GetChallengeRequest { challenge_id: in_flight.challenge_id.clone() }).await;
    assert_eq!(read.expect("the new key reads the data of before").into_inner().state(), pb::ChallengeState::Approved);
}

#[tokio::test]
async fn a_bad_file_is_refused_whole_and_the_tenants_in_force_stay() {
    let dir = tempfile::tempdir().expect("temp dir");
    let (store, file) = (dir.path().join("store"), dir.path().join("pushmatch.toml"));
    write_config(&file, &config_text(&store, &[KEY_A], "", false, 0));
    let server = TestServer::start_from_file(&file).await;
    server.enrolled_phone("jan", PhoneKey::p256(P256Encoding::Spki), pb::Platform::Fcm).await;

    // Each bad file: its error names the key or place, and nothing of it applies,
    // not even the parts that were fine (the new tenant "c", the rotated key).
    let good_rest = |a_limits: &str| config_text(&store, &[KEY_A2], a_limits, true, 0);
    let bad_files = [
        (format!("{}\n[[tenants]]\nid = ", good_rest("")), "pushmatch.toml"),
        (good_rest("max_pending_per_user = 0"), "tenants.limits.max_pending_per_user"),
        (good_rest("max_ttl_seconds = 100000"), "tenants.limits.max_ttl_seconds"),
        (good_rest("creates_share = 1.5"), "tenants.limits.creates_share"),
        (good_rest("unknown_limit = 1"), "unknown_limit"),
        (config_text(&store, &[KEY_A, KEY_C], "", true, 0), "tenants.api_key_sha256"),
    ];
    for (text, named) in bad_files {
        write_config(&file, &text);
        let error = server.reload().await.expect_err("refused");
        assert!(error.contains(named), "{error:?} should name {named}");
        assert_code(server.begin_enrollment_as(KEY_C, "piet").await, Code::Unauthenticated, "unknown API key");
        assert_code(create(&server, KEY_A2, "jan").await, Code::Unauthenticated, "unknown API key");
    }
    // The tenants of the start still serve, with their limits.
    for _ in 0..3 {
        create(&server, KEY_A, "jan").await.expect("the old key and the old limit of three pending");
    }
    assert_eq!(create(&server, KEY_A, "jan").await.expect_err("a fourth").code(), Code::ResourceExhausted);

    // A good file after bad ones applies.
    write_config(&file, &good_rest(""));
    server.reload().await.expect("loads");
    server.begin_enrollment_as(KEY_C, "piet").await.expect("c is in");
}

#[tokio::test]
async fn the_file_watch_reloads_a_changed_file_by_itself() {
    let dir = tempfile::tempdir().expect("temp dir");
    let (store, file) = (dir.path().join("store"), dir.path().join("pushmatch.toml"));
    write_config(&file, &config_text(&store, &[KEY_A], "", false, 1));
    let server = TestServer::start_from_file(&file).await;
    assert_code(server.begin_enrollment_as(KEY_C, "piet").await, Code::Unauthenticated, "unknown API key");

    write_config(&file, &config_text(&store, &[KEY_A], "", true, 1));
    // Nothing to wait on but the effect: ask until the watch (polling every second)
    // has applied it, within the deadline.
    let added = tokio::time::timeout(DEADLINE, async {
        loop {
            match server.begin_enrollment_as(KEY_C, "piet").await {
                Ok(enrollment) => return enrollment,
                Err(status) => assert_eq!(status.code(), Code::Unauthenticated, "{status:?}"),
            }
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
    })
    .await
    .expect("the changed file is picked up within the deadline");
    assert!(added.uri.contains("issuer=Initech"));
}
