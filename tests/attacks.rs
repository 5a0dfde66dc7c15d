//! What an attacker of a push-MFA service tries first, over the wire, each test
//! named for the attack it stops (SECURITY.md lists them as "defended"). The rules
//! that live in the store are proven on both stores by the conformance suite
//! (`src/store/conformance/`); these tests show the whole path through gRPC.

#![allow(clippy::expect_used)]

mod support;

use std::sync::atomic::Ordering;

use pushmatch::domain::enrollment::EnrollmentKind;
use pushmatch::domain::ids::DeviceId;
use pushmatch::domain::time::Clock as _;
use pushmatch::pb;
use pushmatch::pb::device_service_client::DeviceServiceClient;
use pushmatch::phone::{P256Encoding, PhoneKey, SimulatedPhone};
use pushmatch::push::{NOTICE_LIFETIME, PushJob, PushKind};
use support::*;
use tonic::Code;

/// Characters that make a prompt read other than it is: a bidi override, zero-width
/// characters, line and paragraph separators, a byte-order mark, a soft hyphen.
const SPOOFING: [&str; 7] = ["\u{202E}", "\u{200B}", "\u{200D}", "\u{2028}", "\u{2029}", "\u{FEFF}", "\u{AD}"];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bidi_override_or_invisible_character_cannot_spoof_the_prompt() {
    let server = TestServer::start().await;
    let mut phone = server.enrolled_phone("jan", PhoneKey::ed25519(), pb::Platform::Fcm).await;
    let mut challenges = server.challenges(KEY_A);
    for (n, bad) in SPOOFING.into_iter().enumerate() {
        // "Rotterdam" with a right-to-left override reads as an invented place.
        let location = format!("Amsterdam{bad}LN ,madrettoR");
        let context = pb::SignInContext { location, ..Default::default() };
        let request = pb::CreateChallengeRequest { user_id: "jan".into(), context: Some(context), ..Default::default() };
        assert_code(challenges.create_challenge(request).await, Code::InvalidArgument, "context.location");

        let request = pb::BeginEnrollmentRequest {
            user_id: "jan".into(),
            account_name: format!("jan{bad}@gors.nl"),
            kind: pb::EnrollmentKind::Push.into(),
        };
        assert_code(server.enrollments(KEY_A).begin_enrollment(request).await, Code::InvalidArgument, "account_name");

        // (A user of its own each time: a user holds at most five open enrollments.)
        let enrollment = server.begin_enrollment(&format!("user-{n}")).await;
        let mut other = server.phone(PhoneKey::ed25519(), pb::Platform::Fcm);
        assert_code(other.enroll(&enrollment.uri, &format!("Jan{bad}s phone")).await, Code::InvalidArgument, "display_name");
    }
    assert!(phone.pending().await.expect("pending").is_empty(), "no refused request made a challenge");

    // Letters of any script, and emoji without joiners, are fine.
    let context = pb::SignInContext { location: "Zürich, 東京, Kraków 🚀".into(), ..Default::default() };
    let request = pb::CreateChallengeRequest { user_id: "jan".into(), context: Some(context.clone()), ..Default::default() };
    let created = challenges.create_challenge(request).await.expect("plain text of any script").into_inner();
    assert_eq!(created.context, Some(context));
}

/// Runs `pushmatch hash-key` with `key` on standard input.
fn hash_key(key: &str) -> std::process::Output {
    use std::io::Write as _;
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_pushmatch"))
        .arg("hash-key")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("run pushmatch");
    child.stdin.take().expect("stdin").write_all(key.as_bytes()).expect("write the key");
    child.wait_with_output().expect("pushmatch ends")
}

#[test]
fn a_guessable_api_key_is_refused_by_hash_key() {
    for weak in ["letmein", "pushmatch-dev-key", "Summer2026!Summer2026!Summer2026!", "0123456789abcdef0123456789abcde"] {
        let output = hash_key(weak);
        assert!(!output.status.success(), "{weak:?} was hashed");
        assert!(output.stdout.is_empty(), "no digest printed for {weak:?}");
        let said = String::from_utf8_lossy(&output.stderr);
        assert!(said.contains("refused") && said.contains("--generate"), "{said}");
        assert!(!said.contains(weak), "the key is not echoed: {said}");
    }
    let strong = "0123456789abcdef0123456789abcdef";
    let output = hash_key(strong);
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    let digest = pushmatch::domain::api_key::api_key_digest_hex(strong);
    assert_eq!(String::from_utf8_lossy(&output.stdout).trim(), format!("api_key_sha256: {digest}"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replayed_request_id_cannot_hand_an_approved_challenge_to_another_sign_in() {
    let server = TestServer::start().await;
    let mut phone = server.enrolled_phone("jan", PhoneKey::ed25519(), pb::Platform::Fcm).await;
    let mut challenges = server.challenges(KEY_A);
    let context = |ip: &str| Some(pb::SignInContext { ip_address: ip.into(), ..Default::default() });
    let genuine = pb::CreateChallengeRequest {
        user_id: "jan".into(),
        request_id: "login-7f3a".into(),
        context: context("198.51.100.7"),
        ..Default::default()
    };
    let first = challenges.create_challenge(genuine.clone()).await.expect("the genuine sign-in").into_inner();
    assert!(phone.respond(&first.challenge_id, pb::Decision::Approve, &first.number).await.expect("approve").accepted);

    // The attacker's sign-in, from elsewhere, reuses the id: it must not get the approval.
    let replay = pb::CreateChallengeRequest { context: context("203.0.113.66"), ..genuine.clone() };
    assert_code(challenges.create_challenge(replay).await, Code::AlreadyExists, "request_id");
    let no_context = pb::CreateChallengeRequest { context: None, ..genuine.clone() };
    assert_code(challenges.create_challenge(no_context).await, Code::AlreadyExists, "request_id");

    // A true retry of the same sign-in still gets its own challenge back.
    let retry = challenges.create_challenge(genuine).await.expect("a retry").into_inner();
    assert_eq!((retry.state(), retry.challenge_id), (pb::ChallengeState::Approved, first.challenge_id));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_small_order_ed25519_key_that_verifies_forged_signatures_cannot_enroll() {
    let server = TestServer::start().await;
    let mut devices = pushmatch::pb::device_service_client::DeviceServiceClient::new(server.channel.clone());
    let enrollment = server.begin_enrollment("jan").await;
    let code = pushmatch::phone::enrollment_code_from_uri(&enrollment.uri).expect("code");
    let mut identity = [0u8; 32];
    identity[0] = 1;
    // The identity point, and a point of order 4: each "verifies" signatures nobody made.
    for weak in [identity, [0u8; 32]] {
        let request = pb::CompleteEnrollmentRequest {
            enrollment_code: code.clone(),
            platform: pb::Platform::Fcm.into(),
            push_token: FCM_TOKEN.into(),
            public_key: weak.to_vec(),
            key_algorithm: pb::KeyAlgorithm::Ed25519.into(),
            display_name: "Attacker".into(),
        };
        assert_code(devices.complete_enrollment(request).await, Code::InvalidArgument, "public_key");
    }
    // The code was not spent: the real phone enrolls with it.
    server.phone(PhoneKey::ed25519(), pb::Platform::Fcm).enroll(&enrollment.uri, "Jan's phone").await.expect("enrolls");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_captured_device_proof_cannot_be_replayed() {
    let server = TestServer::start().await;
    let mut phone = server.enrolled_phone("jan", PhoneKey::p256(P256Encoding::Sec1Uncompressed), pb::Platform::Fcm).await;
    let mut devices = DeviceServiceClient::new(server.channel.clone());

    // A captured UpdatePushToken would put an old (attacker-held) token back.
    let proof = phone.proof("UpdatePushToken", &["old-token"]);
    let request = pb::UpdatePushTokenRequest { proof: Some(proof.clone()), push_token: "old-token".into() };
    devices.update_push_token(request.clone()).await.expect("the first use");
    phone.update_push_token("new-token").await.expect("the app moves on");
    assert_code(devices.update_push_token(request).await, Code::Unauthenticated, "proof");

    // The same signed bytes with the signature re-encoded (raw r||s as DER) are the same proof.
    let signature = p256::ecdsa::Signature::from_slice(&proof.signature).expect("raw signature");
    let der = pb::DeviceProof { signature: signature.to_der().as_bytes().to_vec(), ..proof };
    let request = pb::UpdatePushTokenRequest { proof: Some(der), push_token: "old-token".into() };
    assert_code(devices.update_push_token(request).await, Code::Unauthenticated, "proof");

    // A captured ListPendingChallenges shows the contexts once, not again.
    server.create_challenge("jan").await;
    let proof = phone.proof("ListPendingChallenges", &[]);
    assert_eq!(phone.pending_with(proof.clone()).await.expect("the first use").len(), 1);
    assert_code(phone.pending_with(proof).await, Code::Unauthenticated, "proof");
    assert_eq!(phone.pending().await.expect("a fresh proof").len(), 1);
}

/// A fraud report signed at the server's (manual) clock.
async fn report_fraud(
    server: &TestServer,
    phone: &mut pushmatch::phone::SimulatedPhone,
    challenge_id: &str,
) -> Result<pb::RespondToChallengeResponse, tonic::Status> {
    let decision = pb::Decision::ReportFraud;
    let proof = phone.proof_at("RespondToChallenge", &[challenge_id, decision.as_str_name(), ""], server.clock.now().0);
    phone.respond_with(proof, challenge_id, decision, "").await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fraud_report_after_the_sign_in_was_cancelled_still_blocks_the_user() {
    let server = TestServer::start().await;
    let mut phone = server.enrolled_phone("jan", PhoneKey::ed25519(), pb::Platform::Fcm).await;
    let mut challenges = server.challenges(KEY_A);
    let bombed = server.create_challenge("jan").await;
    // The attacker gave up; the user reports it anyway, a few minutes later.
    let request = pb::CancelChallengeRequest { challenge_id: bombed.challenge_id.clone() };
    challenges.cancel_challenge(request).await.expect("cancel");
    server.clock.advance(std::time::Duration::from_secs(600));
    let report = report_fraud(&server, &mut phone, &bombed.challenge_id).await.expect("report");
    assert_eq!((report.accepted, report.state()), (false, pb::ChallengeState::Cancelled));
    let request = pb::CreateChallengeRequest { user_id: "jan".into(), ..Default::default() };
    assert_code(challenges.create_challenge(request.clone()).await, Code::FailedPrecondition, "fraud");

    // Past the window, an old challenge no longer blocks anyone.
    server.enrollments(KEY_A).unblock_user(pb::UnblockUserRequest { user_id: "jan".into() }).await.expect("unblock");
    let old = server.create_challenge("jan").await;
    challenges.cancel_challenge(pb::CancelChallengeRequest { challenge_id: old.challenge_id.clone() }).await.expect("cancel");
    server.clock.advance(std::time::Duration::from_secs(901));
    let _ = report_fraud(&server, &mut phone, &old.challenge_id).await;
    challenges.create_challenge(request).await.expect("not blocked");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_fraud_report_the_other_pending_prompt_cannot_be_approved() {
    let server = TestServer::start().await;
    let mut phone = server.enrolled_phone("jan", PhoneKey::ed25519(), pb::Platform::Fcm).await;
    let first = server.create_challenge("jan").await;
    let second = server.create_challenge("jan").await;
    let mut watch = server.watch(&second.challenge_id).await;
    assert!(phone.respond(&first.challenge_id, pb::Decision::ReportFraud, "").await.expect("report").accepted);
    // "Approve the other one, it's 42": it was cancelled with the block.
    let seen = follow_to_final(&mut watch).await;
    assert_eq!(seen.last().map(pb::Challenge::state), Some(pb::ChallengeState::Cancelled));
    let answer = phone.respond(&second.challenge_id, pb::Decision::Approve, &second.number).await.expect("answer");
    assert_eq!((answer.accepted, answer.state()), (false, pb::ChallengeState::Cancelled));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stolen_enrollment_key_cannot_enroll_a_second_device() {
    let server = TestServer::start().await;
    let key = PhoneKey::p256(P256Encoding::Sec1Uncompressed);
    server
        .phone(key.clone(), pb::Platform::Fcm)
        .enroll(&server.begin_enrollment("jan").await.uri, "Jan's")
        .await
        .expect("enroll");
    // The same key, compressed this time, for another user.
    let copy = match &key {
        PhoneKey::P256 { key, der_signatures, .. } => {
            PhoneKey::P256 { key: key.clone(), encoding: P256Encoding::Sec1Compressed, der_signatures: *der_signatures }
        }
        other => other.clone(),
    };
    let enrollment = server.begin_enrollment("mallory").await;
    let mut thief = server.phone(copy, pb::Platform::Fcm);
    assert_code(thief.enroll(&enrollment.uri, "Mallory's").await, Code::AlreadyExists, "public_key");
    // The code was not spent.
    server.phone(PhoneKey::ed25519(), pb::Platform::Fcm).enroll(&enrollment.uri, "Mallory's own").await.expect("enroll");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_user_cannot_gather_devices_or_open_enrollments_without_bound() {
    let server = TestServer::start_with(|config| {
        config.limits.max_devices_per_user = 3;
        config.limits.max_open_enrollments_per_user = 2;
    })
    .await;
    let open = [server.begin_enrollment("jan").await, server.begin_enrollment("jan").await];
    let request = pb::BeginEnrollmentRequest {
        user_id: "jan".into(),
        account_name: "jan@gors.nl".into(),
        kind: pb::EnrollmentKind::Push.into(),
    };
    assert_code(server.enrollments(KEY_A).begin_enrollment(request).await, Code::ResourceExhausted, "open enrollments");
    for enrollment in &open {
        server.phone(PhoneKey::ed25519(), pb::Platform::Fcm).enroll(&enrollment.uri, "phone").await.expect("enroll");
    }
    let third = server.begin_enrollment("jan").await;
    server.phone(PhoneKey::ed25519(), pb::Platform::Fcm).enroll(&third.uri, "phone").await.expect("the third");
    let fourth = server.begin_enrollment("jan").await;
    let refused = server.phone(PhoneKey::ed25519(), pb::Platform::Fcm).enroll(&fourth.uri, "phone").await;
    assert_code(refused, Code::ResourceExhausted, "devices");
    let devices = server.enrollments(KEY_A).list_devices(pb::ListDevicesRequest { user_id: "jan".into() }).await.expect("list");
    assert_eq!(devices.into_inner().devices.len(), 3);
}

/// A tenant's herd (its IdP in a retry storm, or whoever holds a stolen API key)
/// fills at most its share of the push queue (`push.queue_share_per_tenant`): past it
/// that tenant is shed at once, and another tenant's sign-ins still go through. The
/// share of creates in flight (`server.creates_share_per_tenant`) works the same
/// way; `src/broker/tests.rs` shows it with the permits held.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_tenants_herd_is_shed_while_another_tenants_sign_ins_go_through() {
    let server = TestServer::start_with(|config| {
        // Two tenants at the default share of one half: two pushes each.
        config.push.queue_capacity = 4;
        config.push.max_in_flight = 1;
        // The herd retries one user's sign-in: the per-user limits are not what stops it.
        config.limits.max_pending_per_user = 100;
        config.limits.max_challenges_per_window = 100;
    })
    .await;
    server.enrolled_phone("jan", PhoneKey::ed25519(), pb::Platform::Fcm).await;
    let enrollment = server
        .enrollments(KEY_B)
        .begin_enrollment(pb::BeginEnrollmentRequest {
            user_id: "piet".into(),
            account_name: "piet@other.example".into(),
            kind: pb::EnrollmentKind::Push.into(),
        })
        .await
        .expect("tenant b begins an enrollment")
        .into_inner();
    let mut piet = server.phone(PhoneKey::ed25519(), pb::Platform::Fcm);
    piet.enroll(&enrollment.uri, "Piet's phone").await.expect("enrolls with tenant b");

    // The provider stalls, so tenant a's pushes pile up in the queue. The dispatcher
    // takes at most two off it (one sending, one waiting to send), so the herd meets
    // its share of two within four sign-ins, however fast the dispatcher is.
    server.fcm.hold();
    let mut herd = server.challenges(KEY_A);
    let retry = || pb::CreateChallengeRequest { user_id: "jan".into(), ..Default::default() };
    let mut created = 0;
    let shed = loop {
        match herd.create_challenge(retry()).await {
            Ok(_) => created += 1,
            Err(status) => break status,
        }
        assert!(created <= 4, "tenant a's herd filled more than its share of the push queue");
    };
    assert_eq!(shed.code(), Code::ResourceExhausted, "{shed:?}");
    assert!(shed.message().contains("push.queue_share_per_tenant"), "{shed:?}");

    // Tenant b's sign-in is created, pushed and approved meanwhile.
    let mut challenges = server.challenges(KEY_B);
    let request = pb::CreateChallengeRequest { user_id: "piet".into(), ..Default::default() };
    let challenge = challenges.create_challenge(request).await.expect("tenant b is not shed").into_inner();
    let mut watch = challenges
        .watch_challenge(pb::WatchChallengeRequest { challenge_id: challenge.challenge_id.clone(), ..Default::default() })
        .await
        .expect("watch")
        .into_inner();
    server.fcm.release();
    tokio::time::timeout(
        DEADLINE,
        server.fcm.wait_for(|job| job.challenge_id().is_some_and(|id| id.as_str() == challenge.challenge_id)),
    )
    .await
    .expect("tenant b's push is sent");
    let answer = piet.respond(&challenge.challenge_id, pb::Decision::Approve, &challenge.number).await.expect("respond");
    assert!(answer.accepted);
    let last = follow_to_final(&mut watch).await.pop().expect("a final state");
    assert_eq!(last.state(), pb::ChallengeState::Approved);

    // Once the stall is over and its pushes have left the queue, tenant a signs in again.
    tokio::time::timeout(DEADLINE, server.fcm.wait_until(|jobs| jobs.len() > created)).await.expect("every queued push is sent");
    herd.create_challenge(retry()).await.expect("tenant a's share is free again");
}

#[tokio::test]
async fn a_redis_password_never_appears_in_an_error() {
    const PASSWORD: &str = "s3cret-redis-password";
    // A URL of the wrong scheme: refused by validation, naming the key, not the password.
    let env = [
        ("PUSHMATCH_STORE__BACKEND".to_owned(), "redis".to_owned()),
        ("PUSHMATCH_STORE__REDIS_URL".to_owned(), format!("http://app:{PASSWORD}@cache:6379")),
        ("PUSHMATCH_SECRETS__KEY_HEX".to_owned(), "ab".repeat(32)),
    ];
    let dir = tempfile::tempdir().expect("temp dir");
    let file = dir.path().join("pushmatch.toml");
    let tenant = pushmatch::domain::api_key::api_key_digest_hex(KEY_A);
    std::fs::write(&file, format!("[[tenants]]\nid = \"a\"\ndisplay_name = \"A\"\napi_key_sha256 = [\"{tenant}\"]\n"))
        .expect("write");
    let error = pushmatch::config::Config::load(Some(&file), env.clone()).expect_err("not a redis URL").to_string();
    assert!(error.starts_with("store.redis_url: ") && !error.contains(PASSWORD), "{error}");

    // A Redis that is not there: the server stops before it listens, without the password.
    let mut env = env;
    env[1].1 = format!("redis://app:{PASSWORD}@127.0.0.1:1");
    let config = pushmatch::config::Config::load(Some(&file), env).expect("loads").config;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let error = pushmatch::server::run(listener, config, std::future::pending()).await.expect_err("no Redis").to_string();
    assert!(error.contains("redis") && !error.contains(PASSWORD), "{error}");
}

/// The FCM pushes sent, once there are `count`.
async fn fcm_jobs(server: &TestServer, count: usize) -> Vec<PushJob> {
    let jobs =
        tokio::time::timeout(DEADLINE, server.fcm.wait_until(|jobs| jobs.len() >= count)).await.expect("the pushes are sent");
    assert_eq!(jobs.len(), count, "{jobs:#?}");
    jobs
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_attacker_enrolling_a_phone_or_an_authenticator_app_is_announced_to_the_users_other_devices() {
    let server = TestServer::start().await;
    // Pushes are queued before the enrolling call returns: after each call, this is
    // every push it caused, so "none" is a count, not a wait.
    let queued = || server.push_counters.enqueued.load(Ordering::SeqCst);
    let notice_of = |new_device_id: &str, method| PushKind::NewDevice {
        new_device_id: DeviceId::parse(new_device_id).expect("a device id"),
        method,
        enrolled_at: server.clock.now(),
    };

    // Jan's phone is the first device: there is no one to tell.
    let phone = server.enrolled_phone("jan", PhoneKey::ed25519(), pb::Platform::Fcm).await;
    assert_eq!(queued(), 0, "a user's first device is announced to no one");
    // Jan's tablet has pushes off (no push token): it is announced, and told nothing later.
    let mut tablet = SimulatedPhone::new(server.channel.clone(), PhoneKey::ed25519(), pb::Platform::Fcm, "");
    tablet.enroll(&server.begin_enrollment("jan").await.uri, "Jan's tablet").await.expect("the tablet enrolls");
    assert_eq!(queued(), 1);
    assert_eq!(fcm_jobs(&server, 1).await[0].kind, notice_of(tablet.device_id(), EnrollmentKind::Push));

    // The attacker completes an enrollment code phished from Jan, naming the phone to reassure.
    let mut attacker = SimulatedPhone::new(server.channel.clone(), PhoneKey::ed25519(), pb::Platform::Fcm, "attacker-token");
    let lure = "IT security check - no action needed";
    attacker.enroll(&server.begin_enrollment("jan").await.uri, lure).await.expect("the attacker's phone enrolls");
    assert_eq!(queued(), 2, "exactly one notice: not to the tablet, whose pushes are off, nor to the new phone");
    let notice: PushJob = fcm_jobs(&server, 2).await.remove(1);
    assert_eq!(
        (notice.device_id.as_str(), notice.push_token.as_str(), &notice.kind),
        (phone.device_id(), FCM_TOKEN, &notice_of(attacker.device_id(), EnrollmentKind::Push))
    );
    assert_eq!(notice.expires_at, server.clock.now().plus(NOTICE_LIFETIME));
    assert!(!format!("{notice:?}").contains(lure), "the attacker's text is not in the push: {notice:?}");

    // An authenticator app (TOTP) is a sign-in method too: both push devices hear of it.
    let totp = server
        .enrollments(KEY_A)
        .begin_enrollment(pb::BeginEnrollmentRequest {
            user_id: "jan".into(),
            account_name: "jan@gors.nl".into(),
            kind: pb::EnrollmentKind::Totp.into(),
        })
        .await
        .expect("a TOTP enrollment")
        .into_inner();
    let secret = totp.uri.split(['?', '&']).find_map(|p| p.strip_prefix("secret=")).expect("secret");
    let secret = data_encoding::BASE32_NOPAD.decode(secret.as_bytes()).expect("base32");
    let code = pushmatch::domain::totp::code_for_step(&secret, pushmatch::domain::totp::step_at(server.clock.now()));
    let confirmed = server
        .enrollments(KEY_A)
        .confirm_totp_enrollment(pb::ConfirmTotpEnrollmentRequest { enrollment_id: totp.enrollment_id, code })
        .await
        .expect("the TOTP credential is confirmed")
        .into_inner();
    assert_eq!(queued(), 4, "one notice each to the phone and the attacker's phone, none to the tablet");
    let mut told: Vec<(String, PushKind)> =
        fcm_jobs(&server, 4).await.split_off(2).into_iter().map(|job| (job.device_id.as_str().to_owned(), job.kind)).collect();
    told.sort_by(|a, b| a.0.cmp(&b.0));
    let mut expected: Vec<(String, PushKind)> = [phone.device_id(), attacker.device_id()]
        .into_iter()
        .map(|to| (to.to_owned(), notice_of(&confirmed.device_id, EnrollmentKind::Totp)))
        .collect();
    expected.sort_by(|a, b| a.0.cmp(&b.0));
    assert_eq!(told, expected);
    assert!(server.apns.jobs().is_empty());
}
