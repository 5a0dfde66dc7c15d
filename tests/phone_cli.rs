//! `pushmatch phone`, the command-line authenticator, run as the real binary
//! against a real server: enroll from the URI and from the QR PNG, pending,
//! approve (the IdP's watcher reads APPROVED), deny, fraud, code (VerifyTotp takes
//! it), remove; and its errors: non-zero exit with the gRPC status message.

// Tests: a failed expectation is a failed test.
#![allow(clippy::expect_used, clippy::unwrap_used, clippy::panic)]

mod support;

use std::path::Path;
use std::time::Instant;

use pushmatch::pb;
use support::{DEADLINE, KEY_A, TestServer, follow_to_final};

struct Run {
    ok: bool,
    stdout: String,
    stderr: String,
}

/// Runs `pushmatch phone --state STATE ARGS…` (asynchronously: the server runs on this runtime).
async fn phone(state: &Path, args: &[&str]) -> Run {
    let output = tokio::time::timeout(
        DEADLINE,
        tokio::process::Command::new(env!("CARGO_BIN_EXE_pushmatch"))
            .arg("phone")
            .arg("--state")
            .arg(state)
            .args(args)
            .env_remove("PUSHMATCH_API_KEY")
            .kill_on_drop(true)
            .output(),
    )
    .await
    .expect("the phone command ends before the deadline")
    .expect("the binary runs");
    Run {
        ok: output.status.success(),
        stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
    }
}

async fn ok(state: &Path, args: &[&str]) -> String {
    let run = phone(state, args).await;
    assert!(run.ok, "pushmatch phone {args:?} failed:\n{}{}", run.stdout, run.stderr);
    run.stdout
}

async fn fails(state: &Path, args: &[&str]) -> String {
    let run = phone(state, args).await;
    assert!(!run.ok, "pushmatch phone {args:?} must fail, printed:\n{}", run.stdout);
    run.stderr
}

fn saved(state: &Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(state).expect("state file")).expect("state JSON")
}

async fn final_state(challenge_id: &str, watch: &mut tonic::Streaming<pb::Challenge>) -> pb::Challenge {
    let seen = follow_to_final(watch).await;
    let last = seen.last().cloned().expect("a final state");
    assert_eq!(last.challenge_id, challenge_id);
    last
}

#[tokio::test]
async fn a_developer_enrolls_answers_and_removes_a_command_line_phone() {
    let server = TestServer::start_with(|config| config.server.public_url = "http://{addr}".into()).await;
    let started = Instant::now();
    let dir = tempfile::tempdir().expect("temp dir");
    let state = dir.path().join("phone.json");

    // Enroll from the URI: the server address comes from the URI itself.
    let enrollment = server.begin_enrollment("jan").await;
    assert!(enrollment.uri.contains(&format!("server=http%3A%2F%2F127.0.0.1%3A{}", server.addr.port())));
    let printed = ok(&state, &["enroll", &enrollment.uri]).await;
    let file = saved(&state);
    let device_id = file["device_id"].as_str().expect("device_id").to_owned();
    assert!(printed.contains(&device_id), "{printed}");
    assert_eq!(file["key_algorithm"], "ECDSA_P256_SHA256", "P-256 by default");
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt as _;
        let mode = std::fs::metadata(&state).expect("metadata").permissions().mode();
        assert_eq!(mode & 0o777, 0o600, "the state file holds the private key");
    }
    let secret = file["private_key_hex"].as_str().expect("key").to_owned();
    let totp_secret = file["totp_secret_base32"].as_str().expect("a push enrollment gets TOTP").to_owned();
    let completed = server
        .enrollments(KEY_A)
        .get_enrollment(pb::GetEnrollmentRequest { enrollment_id: enrollment.enrollment_id.clone() })
        .await
        .expect("get enrollment")
        .into_inner();
    assert_eq!(completed.state(), pb::EnrollmentState::Completed);
    assert_eq!(completed.device_id, device_id);

    // A second enrollment would overwrite the key: refused.
    let again = server.begin_enrollment("jan").await;
    assert!(fails(&state, &["enroll", &again.uri]).await.contains("exists"));

    // Nothing pending yet: approve says so and exits non-zero.
    assert!(fails(&state, &["approve", "42"]).await.contains("no pending challenge"));

    // Sign-in 1: pending lists it, approve with the page's number, the IdP's watcher reads APPROVED.
    let challenge = server.create_challenge("jan").await;
    let mut watch = server.watch(&challenge.challenge_id).await;
    let listed = ok(&state, &["pending"]).await;
    assert!(listed.contains(&challenge.challenge_id), "{listed}");
    let answered = ok(&state, &["approve", &challenge.number]).await;
    assert!(answered.contains("APPROVED"), "{answered}");
    let last = final_state(&challenge.challenge_id, &mut watch).await;
    assert_eq!(last.state(), pb::ChallengeState::Approved);
    assert_eq!(last.resolved_by_device_id, device_id);

    // Sign-in 2: denied (by --challenge ID).
    let challenge = server.create_challenge("jan").await;
    let mut watch = server.watch(&challenge.challenge_id).await;
    ok(&state, &["deny", "--challenge", &challenge.challenge_id]).await;
    let last = final_state(&challenge.challenge_id, &mut watch).await;
    assert_eq!(last.state(), pb::ChallengeState::Denied);
    assert_eq!(last.deny_reason(), pb::DenyReason::UserDenied);
    // Answering it again changes nothing, and says so.
    let stderr = fails(&state, &["approve", &challenge.number, "--challenge", &challenge.challenge_id]).await;
    assert!(stderr.contains("ended already"), "{stderr}");

    // The TOTP code: VerifyTotp takes it. (The server's clock is a manual one that
    // started with the server; bring it to the wall time the CLI reads.)
    server.clock.advance(started.elapsed());
    let code = ok(&state, &["code"]).await.trim().to_owned();
    assert!(code.len() == 6 && code.bytes().all(|b| b.is_ascii_digit()), "{code:?}");
    let verified = server
        .challenges(KEY_A)
        .verify_totp(pb::VerifyTotpRequest { user_id: "jan".into(), code: code.clone() })
        .await
        .expect("verify totp")
        .into_inner();
    assert!(verified.valid, "the CLI's code is the server's");
    assert_eq!(verified.device_id, device_id);

    // A wrong number: the challenge is denied, and the command says so and fails.
    let challenge = server.create_challenge("jan").await;
    let mut watch = server.watch(&challenge.challenge_id).await;
    let wrong = if challenge.number == "10" { "11" } else { "10" };
    let stderr = fails(&state, &["approve", wrong]).await;
    assert!(stderr.contains("not approved: DENIED (WRONG_NUMBER)"), "{stderr}");
    assert_eq!(final_state(&challenge.challenge_id, &mut watch).await.deny_reason(), pb::DenyReason::WrongNumber);

    // Enroll a second phone from the QR PNG, with Ed25519 and --server; it reports fraud.
    let piet_state = dir.path().join("piet.json");
    let enrollment = server.begin_enrollment("piet").await;
    let png = dir.path().join("qr.png");
    std::fs::write(&png, &enrollment.qr_png).expect("write the PNG");
    let server_url = format!("http://{}", server.addr);
    ok(&piet_state, &["enroll", "--qr", png.to_str().expect("utf-8 path"), "--ed25519", "--server", &server_url]).await;
    let piet = saved(&piet_state);
    assert_eq!(piet["key_algorithm"], "ED25519");
    assert_eq!(piet["server"], server_url.as_str());
    let challenge = server.create_challenge("piet").await;
    let mut watch = server.watch(&challenge.challenge_id).await;
    ok(&piet_state, &["fraud"]).await;
    let last = final_state(&challenge.challenge_id, &mut watch).await;
    assert_eq!(last.state(), pb::ChallengeState::FraudReported);

    // A server refusal reaches the user as its gRPC code and message, exit non-zero:
    // the IdP removed piet's device.
    let piet_id = piet["device_id"].as_str().expect("id").to_owned();
    server.enrollments(KEY_A).remove_device(pb::RemoveDeviceRequest { device_id: piet_id }).await.expect("remove piet's device");
    let stderr = fails(&piet_state, &["pending"]).await;
    assert!(stderr.contains("Unauthenticated") && stderr.contains("proof.device_id: unknown or removed device"), "{stderr}");
    // An unreachable server: named in the error.
    let stderr = fails(&state, &["pending", "--server", "http://127.0.0.1:1"]).await;
    assert!(stderr.contains("cannot reach http://127.0.0.1:1"), "{stderr}");

    // Remove: with the API key the device goes on the server too, and the key file goes.
    let run = phone(&state, &["remove", "--api-key", KEY_A]).await;
    assert!(run.ok, "{}{}", run.stdout, run.stderr);
    assert!(!state.exists(), "the state file is deleted");
    let devices = server
        .enrollments(KEY_A)
        .list_devices(pb::ListDevicesRequest { user_id: "jan".into() })
        .await
        .expect("list devices")
        .into_inner()
        .devices;
    assert!(devices.iter().all(|d| d.device_id != device_id), "removed on the server: {devices:?}");
    assert!(fails(&state, &["pending"]).await.contains("enroll first"));

    // Nothing the CLI printed in any of this held its secrets.
    for text in [printed, listed, answered, run.stdout, run.stderr] {
        assert!(!text.contains(&secret) && !text.contains(&totp_secret), "a secret was printed: {text}");
    }
}

/// Over TLS: the phone trusts the server through --ca, remembers it in its state,
/// and refuses a server its roots do not vouch for.
#[tokio::test]
async fn the_command_line_phone_talks_tls_with_its_own_ca() {
    use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, IsCa, KeyPair, SanType};
    let dir = tempfile::tempdir().expect("temp dir");
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).expect("params");
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca = CertifiedIssuer::self_signed(ca_params, KeyPair::generate().expect("key")).expect("CA");
    let mut leaf_params = CertificateParams::new(vec!["localhost".to_owned()]).expect("params");
    leaf_params.subject_alt_names.push(SanType::IpAddress("127.0.0.1".parse().expect("ip")));
    let leaf_key = KeyPair::generate().expect("key");
    let leaf = leaf_params.signed_by(&leaf_key, &ca).expect("sign");
    let (cert_path, key_path, ca_path) = (dir.path().join("tls.crt"), dir.path().join("tls.key"), dir.path().join("ca.pem"));
    std::fs::write(&cert_path, leaf.pem()).expect("write");
    std::fs::write(&key_path, leaf_key.serialize_pem()).expect("write");
    std::fs::write(&ca_path, ca.pem()).expect("write");
    let server = TestServer::start_with(|config| {
        config.server.public_url = "https://{addr}".into();
        config.server.tls_cert_path = Some(cert_path.clone());
        config.server.tls_key_path = Some(key_path.clone());
    })
    .await;
    let ca_arg = ca_path.to_str().expect("utf-8 path");
    // The IdP's clients over TLS (the harness's own channel is plain text).
    let tls = tonic::transport::ClientTlsConfig::new()
        .ca_certificate(tonic::transport::Certificate::from_pem(ca.pem()))
        .domain_name("localhost");
    let channel = tonic::transport::Endpoint::from_shared(format!("https://{}", server.addr))
        .expect("uri")
        .tls_config(tls)
        .expect("tls")
        .connect()
        .await
        .expect("TLS connects");
    let interceptor = || pushmatch::demo::ApiKeyInterceptor::new(KEY_A).expect("key");
    let mut enrollments =
        pb::enrollment_service_client::EnrollmentServiceClient::with_interceptor(channel.clone(), interceptor());
    let mut challenges = pb::challenge_service_client::ChallengeServiceClient::with_interceptor(channel, interceptor());

    // Without the CA: the public roots do not vouch for this server.
    let stranger = dir.path().join("stranger.json");
    let enrollment = enrollments
        .begin_enrollment(pb::BeginEnrollmentRequest {
            user_id: "jan".into(),
            account_name: "jan@gors.nl".into(),
            kind: pb::EnrollmentKind::Push.into(),
        })
        .await
        .expect("begin enrollment")
        .into_inner();
    let stderr = fails(&stranger, &["enroll", &enrollment.uri]).await;
    assert!(stderr.contains("cannot reach https://127.0.0.1"), "{stderr}");
    assert!(!stranger.exists());

    // With it: enroll, then pending and approve with the CA remembered.
    let state = dir.path().join("phone.json");
    ok(&state, &["enroll", &enrollment.uri, "--ca", ca_arg, "--key-encoding", "spki", "--der"]).await;
    let challenge = challenges
        .create_challenge(pb::CreateChallengeRequest { user_id: "jan".into(), ..Default::default() })
        .await
        .expect("create challenge")
        .into_inner();
    let mut watch = challenges
        .watch_challenge(pb::WatchChallengeRequest { challenge_id: challenge.challenge_id.clone(), ..Default::default() })
        .await
        .expect("watch")
        .into_inner();
    assert!(ok(&state, &["pending"]).await.contains(&challenge.challenge_id));
    ok(&state, &["approve", &challenge.number]).await;
    assert_eq!(final_state(&challenge.challenge_id, &mut watch).await.state(), pb::ChallengeState::Approved);
}
