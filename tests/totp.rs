//! TOTP end to end: enrollment for any authenticator app, the push app's offline
//! codes, the window, replay, races, lockout, and secrets at rest. Codes are
//! computed here by an independent implementation (HMAC-SHA1 by hand, RFC 4226
//! dynamic truncation), not by the crate the server uses.

// Tests: a failed expectation is a failed test.
#![allow(clippy::expect_used, clippy::unwrap_used, clippy::panic)]

mod support;

use std::time::Duration;

use hmac::{Hmac, Mac};
use pushmatch::domain::time::Clock as _;
use pushmatch::pb;
use pushmatch::phone::PhoneKey;
use support::*;
use tonic::Code;

fn independent_code(secret: &[u8], unix_ms: i64) -> String {
    let counter = u64::try_from(unix_ms / 1000 / 30).expect("after 1970");
    let mut mac = Hmac::<sha1::Sha1>::new_from_slice(secret).expect("any key length");
    mac.update(&counter.to_be_bytes());
    let digest = mac.finalize().into_bytes();
    let offset = usize::from(digest[19] & 0x0f);
    let value = u32::from_be_bytes([digest[offset] & 0x7f, digest[offset + 1], digest[offset + 2], digest[offset + 3]]);
    format!("{:06}", value % 1_000_000)
}

async fn verify(server: &TestServer, user: &str, code: &str) -> Result<pb::VerifyTotpResponse, tonic::Status> {
    let request = pb::VerifyTotpRequest { user_id: user.into(), code: code.into() };
    server.challenges(KEY_A).verify_totp(request).await.map(tonic::Response::into_inner)
}

fn secret_from_uri(uri: &str) -> Vec<u8> {
    let secret = uri.split(['?', '&']).find_map(|p| p.strip_prefix("secret=")).expect("secret parameter");
    data_encoding::BASE32_NOPAD.decode(secret.as_bytes()).expect("base32")
}

fn decode_qr(png_bytes: &[u8]) -> String {
    let mut decoder = png::Decoder::new(std::io::Cursor::new(png_bytes));
    // One bit a pixel as the server writes it, read as 8-bit grey.
    decoder.set_transformations(png::Transformations::EXPAND);
    let mut reader = decoder.read_info().expect("png");
    let mut pixels = vec![0; reader.output_buffer_size()];
    let info = reader.next_frame(&mut pixels).expect("frame");
    let (width, height) = (info.width as usize, info.height as usize);
    let mut image = rqrr::PreparedImage::prepare_from_greyscale(width, height, |x, y| pixels[y * width + x]);
    let grids = image.detect_grids();
    assert_eq!(grids.len(), 1, "one QR code in the picture");
    grids[0].decode().expect("decodes").1
}

async fn begin_totp(server: &TestServer, user: &str) -> pb::Enrollment {
    server
        .enrollments(KEY_A)
        .begin_enrollment(pb::BeginEnrollmentRequest {
            user_id: user.into(),
            account_name: format!("{user}@gors.nl"),
            kind: pb::EnrollmentKind::Totp.into(),
        })
        .await
        .expect("begin totp enrollment")
        .into_inner()
}

async fn confirm(server: &TestServer, enrollment_id: &str, code: &str) -> Result<pb::Enrollment, tonic::Status> {
    let request = pb::ConfirmTotpEnrollmentRequest { enrollment_id: enrollment_id.into(), code: code.into() };
    server.enrollments(KEY_A).confirm_totp_enrollment(request).await.map(tonic::Response::into_inner)
}

#[tokio::test]
async fn any_authenticator_app_enrolls_from_the_otpauth_qr() {
    let server = TestServer::start().await;
    let enrollment = begin_totp(&server, "jan").await;
    assert!(enrollment.uri.starts_with("otpauth://totp/Gors:jan@gors.nl?secret="), "{}", enrollment.uri);
    assert!(enrollment.uri.ends_with("&issuer=Gors&algorithm=SHA1&digits=6&period=30"), "{}", enrollment.uri);
    assert_eq!(decode_qr(&enrollment.qr_png), enrollment.uri, "the QR code reads back as the URI");
    let secret = secret_from_uri(&enrollment.uri);
    assert!(secret.len() * 8 >= 160, "at least 160 bits");

    // Until confirmed, the credential does not verify.
    let code = independent_code(&secret, server.clock.now().0);
    assert!(!verify(&server, "jan", &code).await.expect("verify").valid);
    assert_code(confirm(&server, &enrollment.enrollment_id, &bump(&code)).await, Code::InvalidArgument, "code");

    let confirmed = confirm(&server, &enrollment.enrollment_id, &code).await.expect("confirm");
    assert_eq!(confirmed.state(), pb::EnrollmentState::Completed);
    assert!(!confirmed.device_id.is_empty());
    assert_code(confirm(&server, &enrollment.enrollment_id, &code).await, Code::FailedPrecondition, "confirmed already");

    let devices = server.enrollments(KEY_A).list_devices(pb::ListDevicesRequest { user_id: "jan".into() }).await.expect("list");
    let device = &devices.into_inner().devices[0];
    assert_eq!(
        (device.device_id.as_str(), device.platform(), device.has_totp),
        (confirmed.device_id.as_str(), pb::Platform::Unspecified, true)
    );

    // The confirming code is spent; the next step's code verifies and names the credential.
    assert!(!verify(&server, "jan", &code).await.expect("verify").valid, "the confirming code is spent");
    server.clock.advance(Duration::from_secs(30));
    let next = verify(&server, "jan", &independent_code(&secret, server.clock.now().0)).await.expect("verify");
    assert!(next.valid);
    assert_eq!(next.device_id, confirmed.device_id);
}

/// A different six-digit code.
fn bump(code: &str) -> String {
    let value: u32 = code.parse().expect("digits");
    format!("{:06}", (value + 1) % 1_000_000)
}

#[tokio::test]
async fn an_unconfirmed_totp_enrollment_expires() {
    let server = TestServer::start().await;
    let enrollment = begin_totp(&server, "jan").await;
    let secret = secret_from_uri(&enrollment.uri);
    server.clock.advance(Duration::from_secs(600));
    let code = independent_code(&secret, server.clock.now().0);
    assert_code(confirm(&server, &enrollment.enrollment_id, &code).await, Code::FailedPrecondition, "expired");
    assert!(!verify(&server, "jan", &code).await.expect("verify").valid);
}

#[tokio::test]
async fn the_push_apps_secret_gives_offline_codes() {
    let server = TestServer::start().await;
    let enrollment = server.begin_enrollment("jan").await;
    let mut phone = server.phone(PhoneKey::ed25519(), pb::Platform::Fcm);
    let completed = phone.enroll(&enrollment.uri, "Jan's Pixel").await.expect("enroll");
    assert!(completed.totp_secret.len() * 8 >= 160);
    let code = independent_code(&completed.totp_secret, server.clock.now().0);
    let verdict = verify(&server, "jan", &code).await.expect("verify");
    assert!(verdict.valid);
    assert_eq!(verdict.device_id, completed.device_id);
    // Another tenant's user of the same name has no credential.
    let other =
        server.challenges(KEY_B).verify_totp(pb::VerifyTotpRequest { user_id: "jan".into(), code }).await.expect("verify");
    assert!(!other.into_inner().valid);
}

#[tokio::test]
async fn the_window_is_one_step_either_side_and_steps_only_move_forward() {
    let server = TestServer::start().await;
    let enrollment = server.begin_enrollment("jan").await;
    let mut phone = server.phone(PhoneKey::ed25519(), pb::Platform::Fcm);
    let secret = phone.enroll(&enrollment.uri, "phone").await.expect("enroll").totp_secret;
    // Put the clock in the middle of a step so that edges are exact.
    let now = server.clock.now().0;
    server.clock.advance(Duration::from_millis(u64::try_from(30_000 - now.rem_euclid(30_000) + 15_000).expect("positive")));
    let now = server.clock.now().0;
    for (offset, valid) in [(-60_000, false), (60_000, false), (-30_000, true), (0, true), (30_000, true)] {
        let verdict = verify(&server, "jan", &independent_code(&secret, now + offset)).await.expect("verify");
        assert_eq!(verdict.valid, valid, "the code of the step at {offset:+} ms");
    }
    // A code of an older step than one already accepted is refused.
    assert!(!verify(&server, "jan", &independent_code(&secret, now - 30_000)).await.expect("verify").valid);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twenty_racing_uses_of_one_code_accept_exactly_one() {
    let server = TestServer::start_with(|config| config.limits.totp_failure_limit = 100).await;
    let enrollment = server.begin_enrollment("jan").await;
    let mut phone = server.phone(PhoneKey::ed25519(), pb::Platform::Fcm);
    let secret = phone.enroll(&enrollment.uri, "phone").await.expect("enroll").totp_secret;
    let code = independent_code(&secret, server.clock.now().0);
    let calls = (0..20).map(|_| {
        let mut client = server.challenges(KEY_A);
        let code = code.clone();
        tokio::spawn(async move { client.verify_totp(pb::VerifyTotpRequest { user_id: "jan".into(), code }).await })
    });
    let verdicts = futures::future::join_all(calls).await;
    let valid = verdicts.into_iter().filter(|v| v.as_ref().expect("task").as_ref().expect("verify").get_ref().valid).count();
    assert_eq!(valid, 1);
}

#[tokio::test]
async fn five_wrong_codes_lock_verification_for_five_minutes() {
    let server = TestServer::start().await;
    let enrollment = server.begin_enrollment("jan").await;
    let mut phone = server.phone(PhoneKey::ed25519(), pb::Platform::Fcm);
    let secret = phone.enroll(&enrollment.uri, "phone").await.expect("enroll").totp_secret;
    let right = independent_code(&secret, server.clock.now().0);
    for _ in 0..5 {
        assert!(!verify(&server, "jan", &bump(&right)).await.expect("verify").valid);
    }
    assert_code(verify(&server, "jan", &right).await, Code::ResourceExhausted, "locked");
    assert!(verify(&server, "piet", &right).await.is_ok(), "another user is not locked");
    server.clock.advance(Duration::from_secs(300));
    let fresh = independent_code(&secret, server.clock.now().0);
    assert!(verify(&server, "jan", &fresh).await.expect("verify").valid, "the lockout ended");
}

#[tokio::test]
async fn codes_must_be_six_digits_and_users_without_totp_read_invalid() {
    let server = TestServer::start().await;
    for bad in ["", "12345", "1234567", "12345a", "12 456"] {
        assert_code(verify(&server, "jan", bad).await, Code::InvalidArgument, "code");
    }
    assert!(!verify(&server, "nobody", "123456").await.expect("verify").valid);
}

#[tokio::test]
async fn no_secret_is_stored_in_clear() {
    let server = TestServer::start().await;
    let enrollment = server.begin_enrollment("jan").await;
    let mut phone = server.phone(PhoneKey::ed25519(), pb::Platform::Fcm);
    let push_secret = phone.enroll(&enrollment.uri, "phone").await.expect("enroll").totp_secret;
    let totp_enrollment = begin_totp(&server, "jan").await;
    let pending_secret = secret_from_uri(&totp_enrollment.uri);
    let dir = server.stop().await;

    let key_file = dir.path().join("secret.key");
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt as _;
        let mode = std::fs::metadata(&key_file).expect("key file").permissions().mode();
        assert_eq!(mode & 0o777, 0o600, "the key file is private");
    }
    let store = std::fs::read(dir.path().join("pushmatch.redb")).expect("store file");
    assert!(store.windows(11).any(|w| w == b"jan@gors.nl"), "the search would find clear text");
    for secret in [&push_secret, &pending_secret] {
        for form in [secret.clone(), hex::encode(secret).into_bytes(), data_encoding::BASE32_NOPAD.encode(secret).into_bytes()] {
            assert!(!store.windows(form.len()).any(|w| w == form.as_slice()), "a secret in clear in the store");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_parallel_wrong_codes_compare_at_most_five() {
    let server = TestServer::start().await;
    let enrollment = server.begin_enrollment("jan").await;
    let mut phone = server.phone(PhoneKey::ed25519(), pb::Platform::Fcm);
    let secret = phone.enroll(&enrollment.uri, "phone").await.expect("enroll").totp_secret;
    let wrong = bump(&independent_code(&secret, server.clock.now().0));
    let calls = (0..50).map(|_| {
        let mut client = server.challenges(KEY_A);
        let code = wrong.clone();
        tokio::spawn(async move { client.verify_totp(pb::VerifyTotpRequest { user_id: "jan".into(), code }).await })
    });
    let mut compared = 0;
    for answer in futures::future::join_all(calls).await {
        match answer.expect("task") {
            Ok(verdict) => {
                assert!(!verdict.get_ref().valid);
                compared += 1;
            }
            Err(status) => assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}"),
        }
    }
    assert_eq!(compared, 5, "a lock checked before and counted after the compare let all 50 through");
    let right = independent_code(&secret, server.clock.now().0);
    assert_code(verify(&server, "jan", &right).await, Code::ResourceExhausted, "locked");
}

#[tokio::test]
async fn twenty_wrong_codes_in_a_row_lock_verification_until_unblock() {
    let server = TestServer::start().await;
    let enrollment = server.begin_enrollment("jan").await;
    let mut phone = server.phone(PhoneKey::ed25519(), pb::Platform::Fcm);
    let secret = phone.enroll(&enrollment.uri, "phone").await.expect("enroll").totp_secret;
    // Four wrong codes every five minutes stay under the window's lock; before, that
    // went on forever (about 12 % a month to hit a code).
    for round in 0..5 {
        for _ in 0..4 {
            let wrong = bump(&independent_code(&secret, server.clock.now().0));
            assert!(!verify(&server, "jan", &wrong).await.expect("verify").valid, "round {round}");
        }
        server.clock.advance(Duration::from_secs(301));
    }
    // The 21st in a row is refused, even with the right code, and stays refused.
    let right = independent_code(&secret, server.clock.now().0);
    assert_code(verify(&server, "jan", &right).await, Code::ResourceExhausted, "until UnblockUser");
    server.clock.advance(Duration::from_secs(24 * 3600));
    let right = independent_code(&secret, server.clock.now().0);
    assert_code(verify(&server, "jan", &right).await, Code::ResourceExhausted, "until UnblockUser");
    server.enrollments(KEY_A).unblock_user(pb::UnblockUserRequest { user_id: "jan".into() }).await.expect("unblock");
    assert!(verify(&server, "jan", &right).await.expect("verify").valid, "UnblockUser lifts it");
}
