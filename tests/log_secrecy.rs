//! Nothing secret reaches the logs: the whole flow runs with pushmatch logging at
//! TRACE (everything else at DEBUG) into a buffer, which is then searched for the
//! API key, the enrollment code, the full push tokens, TOTP secrets and codes, and
//! the numbers.

// Tests: a failed expectation is a failed test.
#![allow(clippy::expect_used, clippy::unwrap_used, clippy::panic)]

mod support;

use std::io::Write;
use std::sync::{Arc, Mutex};

use pushmatch::domain::time::{Clock as _, SystemClock};
use pushmatch::domain::totp::{code_for_step, step_at};
use pushmatch::pb;
use pushmatch::phone::{P256Encoding, PhoneKey};
use support::*;

#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl Write for Captured {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        self.0.lock().expect("log buffer").extend_from_slice(bytes);
        Ok(bytes.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Every string value of every pushmatch JSON log line but the timestamp, with its
/// key. (Other crates' DEBUG lines carry HTTP/2 stream ids and the like, where two
/// digits appear by chance; the secrets above are searched for in every line.)
fn string_fields(logs: &str) -> Vec<(String, String)> {
    fn walk(prefix: &str, value: &serde_json::Value, out: &mut Vec<(String, String)>) {
        match value {
            serde_json::Value::String(text) => out.push((prefix.to_owned(), text.clone())),
            serde_json::Value::Object(map) => map.iter().for_each(|(k, v)| walk(k, v, out)),
            serde_json::Value::Array(items) => items.iter().for_each(|v| walk(prefix, v, out)),
            _ => {}
        }
    }
    let mut out = Vec::new();
    for line in logs.lines() {
        let value: serde_json::Value = serde_json::from_str(line).expect("every log line is JSON");
        if value["target"].as_str().is_some_and(|target| target.starts_with("pushmatch")) {
            walk("", &value, &mut out);
        }
    }
    out.retain(|(key, _)| key != "timestamp");
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_secret_reaches_the_logs() {
    let captured = Captured::default();
    let writer = captured.clone();
    tracing_subscriber::fmt()
        .json()
        .with_env_filter(tracing_subscriber::EnvFilter::new("pushmatch=trace,debug"))
        .with_writer(move || writer.clone())
        .init();

    let server = TestServer::start().await;
    let enrollment = server.begin_enrollment("jan").await;
    let code = pushmatch::phone::enrollment_code_from_uri(&enrollment.uri).expect("code");
    let mut phone = server.phone(PhoneKey::p256(P256Encoding::Sec1Uncompressed), pb::Platform::Apns);
    let totp_secret = phone.enroll(&enrollment.uri, "Jan's iPhone").await.expect("enroll").totp_secret;
    // The TOTP fallback: a right code, the same code again, a wrong one.
    let totp_code = code_for_step(&totp_secret, step_at(SystemClock.now()));
    for code in [totp_code.as_str(), totp_code.as_str(), "000000"] {
        let request = pb::VerifyTotpRequest { user_id: "jan".into(), code: code.into() };
        server.challenges(KEY_A).verify_totp(request).await.expect("verify");
    }
    let app_enrollment = server
        .enrollments(KEY_A)
        .begin_enrollment(pb::BeginEnrollmentRequest {
            user_id: "jan".into(),
            account_name: String::new(),
            kind: pb::EnrollmentKind::Totp.into(),
        })
        .await
        .expect("totp enrollment")
        .into_inner();
    let app_secret = app_enrollment.uri.split(['?', '&']).find_map(|p| p.strip_prefix("secret=")).expect("secret").to_owned();
    let mut numbers = Vec::new();
    for decision in [pb::Decision::Approve, pb::Decision::Deny, pb::Decision::Approve] {
        let challenge = server.create_challenge("jan").await;
        let mut watch = server.watch(&challenge.challenge_id).await;
        tokio::time::timeout(
            DEADLINE,
            server.apns.wait_for(|j| j.challenge_id().is_some_and(|id| id.as_str() == challenge.challenge_id)),
        )
        .await
        .expect("pushed");
        let typed = if numbers.len() == 2 { "00".to_owned() } else { challenge.number.clone() };
        phone
            .respond(&challenge.challenge_id, decision, if decision == pb::Decision::Deny { "" } else { &typed })
            .await
            .expect("respond");
        follow_to_final(&mut watch).await;
        numbers.push(challenge.number);
    }
    phone.update_push_token("b3f9c2e1d4b5a6978812ab34cd56ef78a3f9c2e1d4b5a6978812ab34cd56ef79").await.expect("update");
    // A failed API key attempt is logged by nobody with the key in it either.
    let _ =
        server.challenges("wrong-key-0123456789").get_challenge(pb::GetChallengeRequest { challenge_id: "ch_x".into() }).await;
    server.stop().await;

    let totp_forms = [hex::encode(&totp_secret), data_encoding::BASE32_NOPAD.encode(&totp_secret), app_secret];
    let logs = String::from_utf8(captured.0.lock().expect("log buffer").clone()).expect("utf-8 logs");
    assert!(logs.contains("challenge resolved"), "the capture works: {logs}");
    for secret in [
        KEY_A,
        "wrong-key-0123456789",
        code.as_str(),
        APNS_TOKEN,
        "b3f9c2e1d4b5a6978812ab34cd56ef78a3f9c2e1d4b5a6978812ab34cd56ef79",
    ]
    .into_iter()
    .chain(totp_forms.iter().map(String::as_str))
    {
        assert!(!logs.contains(secret), "a secret reached the logs");
    }
    for (key, text) in string_fields(&logs) {
        assert_ne!(key, "number", "no field carries the number");
        for word in text.split(|c: char| !c.is_ascii_alphanumeric()) {
            assert!(!numbers.iter().any(|n| n == word), "the number appears in {key}: {text}");
            assert_ne!(word, totp_code, "the TOTP code appears in {key}: {text}");
        }
    }
}
