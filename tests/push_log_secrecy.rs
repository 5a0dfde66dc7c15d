//! No push token, APNs JWT, FCM access token, OAuth assertion or key reaches the
//! logs, with every crate (hyper, h2, rustls included) at TRACE, through a push flow
//! that renews both providers' tokens and meets a dead device token. Its own binary:
//! it installs the process-wide subscriber.

// Tests: a failed expectation is a failed test.
#![allow(clippy::expect_used, clippy::unwrap_used, clippy::panic)]

mod support;

use pushmatch::pb;
use support::mock_push::{Reply, form};
use support::push_providers::*;
use support::*;

/// A log sink for one test.
#[derive(Clone, Default)]
struct Captured(std::sync::Arc<std::sync::Mutex<Vec<u8>>>);

impl std::io::Write for Captured {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        self.0.lock().expect("log buffer").extend_from_slice(bytes);
        Ok(bytes.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_token_jwt_or_access_token_reaches_the_logs_even_at_trace() {
    let captured = Captured::default();
    let writer = captured.clone();
    // The process-wide subscriber: this binary holds this one test.
    tracing_subscriber::fmt()
        .json()
        .with_env_filter(tracing_subscriber::EnvFilter::new("trace"))
        .with_writer(move || writer.clone())
        .init();

    let providers = Providers::start().await;
    let server = providers.server(|_| {}).await;
    let mut iphone = phone_with_token(&server, "jan", pb::Platform::Apns, APNS_TOKEN).await;
    let _android = phone_with_token(&server, "jan", pb::Platform::Fcm, FCM_TOKEN).await;
    // Renewals on both sides, and a dead token, so every path that touches a secret runs.
    providers.apns.script([Reply::apns_error(403, "ExpiredProviderToken")]);
    providers.fcm.script([Reply::fcm_error(401, "UNAUTHENTICATED", "THIRD_PARTY_AUTH_ERROR")]);
    let challenge = create(&server, "jan", 0).await.expect("create");
    deliveries_done(&server, &challenge.challenge_id).await;
    iphone.respond(&challenge.challenge_id, pb::Decision::Approve, &challenge.number).await.expect("approve");
    providers.fcm.wait_for_requests(3).await;
    providers.apns.script([Reply::apns_error(410, "Unregistered")]);
    let second = create(&server, "jan", 0).await.expect("create");
    deliveries_done(&server, &second.challenge_id).await;

    let logs = String::from_utf8(captured.0.lock().expect("log buffer").clone()).expect("utf8 logs");
    assert!(logs.contains("push token unregistered"), "the flow was logged at all");
    let mut secrets: Vec<String> = vec![APNS_TOKEN.into(), FCM_TOKEN.into(), "mock-access-token-".into()];
    for request in providers.apns.requests() {
        secrets.push(request.header("authorization").trim_start_matches("bearer ").to_owned());
    }
    for grant in providers.oauth.requests() {
        let fields = form(&grant.text());
        secrets.extend(fields.into_iter().filter(|(k, _)| k == "assertion").map(|(_, v)| v));
    }
    let key_line = support::mock_push::FCM_TEST_KEY_PEM.lines().nth(3).expect("a key line").to_owned();
    secrets.push(key_line);
    assert!(secrets.len() >= 6, "{secrets:?}");
    for secret in &secrets {
        // JWTs are checked by their signature part, which is what makes them usable.
        let needle = secret.rsplit('.').next().unwrap_or(secret);
        assert!(!logs.contains(needle), "a secret reached the logs: {needle}");
    }
}
