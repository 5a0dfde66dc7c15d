//! What an attacker of a push-MFA service tries first, over the wire, each test
//! named for the attack it stops (SECURITY.md lists them as "defended"). The rules
//! that live in the store are proven on both stores by the conformance suite
//! (`src/store/conformance.rs`); these tests show the whole path through gRPC.

#![allow(clippy::expect_used)]

mod support;

use std::sync::atomic::Ordering;

use pushmatch::domain::enrollment::EnrollmentKind;
use pushmatch::domain::ids::DeviceId;
use pushmatch::domain::time::Clock as _;
use pushmatch::pb;
use pushmatch::phone::{PhoneKey, SimulatedPhone};
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
    for bad in SPOOFING {
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

        let enrollment = server.begin_enrollment("jan").await;
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
