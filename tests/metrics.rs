//! `/metrics` and `/healthz` on the metrics port: the counters move through a whole
//! sign-in with the names dashboards expect, and health follows the drain.
//!
//! The Prometheus recorder is process-wide, so the tests here compare before and
//! after rather than expect exact totals.

// Tests: a failed expectation is a failed test.
#![allow(clippy::expect_used, clippy::unwrap_used, clippy::panic)]

mod support;

use std::time::Duration;

use pushmatch::pb;
use pushmatch::phone::PhoneKey;
use pushmatch::server::ops::check_health;
use support::http::{http_get, scrape};
use support::*;
use tonic::Code;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

/// The value of the sample `name{labels...}` whose labels include all of `labels`
/// (the sum when several series match); 0 when none does.
fn sample(text: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    text.lines()
        .filter(|line| !line.starts_with('#'))
        .filter_map(|line| {
            let (series, value) = line.rsplit_once(' ')?;
            let (series_name, series_labels) = match series.split_once('{') {
                Some((series_name, rest)) => (series_name, rest.trim_end_matches('}')),
                None => (series, ""),
            };
            if series_name != name {
                return None;
            }
            let all = labels.iter().all(|(key, value)| series_labels.split(',').any(|pair| pair == format!("{key}=\"{value}\"")));
            all.then(|| value.parse::<f64>().ok()).flatten()
        })
        .sum()
}

fn has_series(text: &str, name: &str) -> bool {
    text.lines().any(|line| line.starts_with(&format!("{name}{{")) || line.starts_with(&format!("{name} ")))
}

const CHALLENGES: &str = "pushmatch.v1.ChallengeService";
const DEVICES: &str = "pushmatch.v1.DeviceService";

fn handled(
    service: &'static str,
    method: &'static str,
    kind: &'static str,
    code: &'static str,
) -> Vec<(&'static str, &'static str)> {
    vec![("grpc_service", service), ("grpc_method", method), ("grpc_type", kind), ("grpc_code", code)]
}

#[tokio::test]
async fn counters_move_through_a_sign_in() {
    let server = TestServer::start_with(|config| config.server.metrics_listen = "127.0.0.1:0".into()).await;
    let metrics = server.metrics_addr.expect("metrics on");
    assert_eq!(http_get(metrics, "/healthz").await.expect("healthz"), (200, "ok\n".to_owned()));
    let before = scrape(metrics).await;

    // A sign-in approved, one refused for want of a device, one left to expire.
    let mut phone = server.enrolled_phone("jan", PhoneKey::ed25519(), pb::Platform::Apns).await;
    let challenge = server.create_challenge("jan").await;
    let mut watch = server.watch(&challenge.challenge_id).await;
    let during = scrape(metrics).await;
    // No other test in this binary opens a challenge watch, so the gauge is exact.
    let open_watches = |text: &str| sample(text, "pushmatch_watch_streams_open", &[]);
    assert_eq!(open_watches(&during), 1.0, "an open watch shows");
    let answer = phone.respond(&challenge.challenge_id, pb::Decision::Approve, &challenge.number).await.expect("respond");
    assert!(answer.accepted);
    follow_to_final(&mut watch).await;
    assert_eq!(open_watches(&scrape(metrics).await), 0.0, "a watch that ended leaves the gauge");
    // CreateAndWatchChallenge's stream is a watch stream as well.
    let mut created_and_watched = server
        .challenges(KEY_A)
        .create_and_watch_challenge(pb::CreateChallengeRequest { user_id: "jan".into(), ..Default::default() })
        .await
        .expect("create and watch")
        .into_inner();
    let created = created_and_watched.message().await.expect("first message").expect("the challenge");
    assert_eq!(open_watches(&scrape(metrics).await), 1.0, "an open CreateAndWatchChallenge stream shows");
    let answer = phone.respond(&created.challenge_id, pb::Decision::Approve, &created.number).await.expect("respond");
    assert!(answer.accepted);
    follow_to_final(&mut created_and_watched).await;
    assert_eq!(open_watches(&scrape(metrics).await), 0.0, "and leaves when it ends");
    let refused = server
        .challenges(KEY_A)
        .create_challenge(pb::CreateChallengeRequest { user_id: "nobody".into(), ..Default::default() })
        .await;
    assert_code(refused, Code::FailedPrecondition, "user_id");
    let expiring = server.create_challenge("jan").await;
    server.clock.advance(Duration::from_secs(61));
    let expired = server
        .challenges(KEY_A)
        .get_challenge(pb::GetChallengeRequest { challenge_id: expiring.challenge_id.clone() })
        .await
        .expect("get")
        .into_inner();
    assert_eq!(expired.state(), pb::ChallengeState::Expired);
    let after = scrape(metrics).await;

    let moved = |name: &str, labels: &[(&str, &str)]| sample(&after, name, labels) - sample(&before, name, labels);
    let create_ok = handled(CHALLENGES, "CreateChallenge", "unary", "OK");
    assert!(moved("grpc_server_handled_total", &create_ok) >= 2.0, "{after}");
    assert!(moved("grpc_server_handled_total", &handled(CHALLENGES, "CreateChallenge", "unary", "FailedPrecondition")) >= 1.0);
    assert!(moved("grpc_server_handled_total", &handled(CHALLENGES, "WatchChallenge", "server_stream", "OK")) >= 1.0);
    assert!(moved("grpc_server_handled_total", &handled(DEVICES, "RespondToChallenge", "unary", "OK")) >= 1.0);
    assert!(moved("grpc_server_handled_total", &handled(DEVICES, "CompleteEnrollment", "unary", "OK")) >= 1.0);
    let create = [("grpc_service", CHALLENGES), ("grpc_method", "CreateChallenge"), ("grpc_type", "unary")];
    assert!(moved("grpc_server_started_total", &create) >= 3.0);
    assert!(moved("grpc_server_handling_seconds_count", &create) >= 3.0);
    assert!(
        sample(&after, "grpc_server_handling_seconds_bucket", &[("grpc_method", "CreateChallenge"), ("le", "+Inf")]) >= 3.0,
        "latencies are a histogram with buckets"
    );

    assert!(moved("pushmatch_challenges_created_total", &[("tenant", "a")]) >= 2.0);
    let approved = [("tenant", "a"), ("outcome", "approved"), ("deny_reason", "")];
    assert!(moved("pushmatch_challenges_resolved_total", &approved) >= 1.0);
    assert!(moved("pushmatch_challenges_resolved_total", &[("tenant", "a"), ("outcome", "expired")]) >= 1.0);
    let store_create = [("backend", "embedded"), ("operation", "create_challenge")];
    assert!(moved("pushmatch_store_operation_seconds_count", &store_create) >= 2.0);
    // The phone's answer reads and resolves the challenge in one store operation.
    assert!(moved("pushmatch_store_operation_seconds_count", &[("operation", "answer_challenge")]) >= 1.0, "{after}");
    // Sampled at each scrape: the challenges created since (none purged yet) count.
    assert!(moved("pushmatch_store_records", &[]) >= 2.0, "{after}");
    for gauge in
        ["pushmatch_push_queue_depth", "pushmatch_push_queue_capacity", "pushmatch_challenges_live", "pushmatch_build_info"]
    {
        assert!(has_series(&after, gauge), "{gauge} is exported");
    }
    assert_eq!(sample(&after, "pushmatch_push_queue_capacity", &[("provider", "apns")]), 10_000.0, "{after}");
    assert_eq!(sample(&after, "pushmatch_push_queue_capacity", &[("provider", "fcm")]), 10_000.0);
    assert!(after.contains("# TYPE grpc_server_handled_total counter"), "described with its type");
}

#[tokio::test]
async fn healthz_reads_503_while_draining_and_the_port_closes_after() {
    let server = TestServer::start_with(|config| {
        config.server.metrics_listen = "127.0.0.1:0".into();
        config.server.shutdown_grace_seconds = 2;
    })
    .await;
    let metrics = server.metrics_addr.expect("metrics on");
    assert_eq!(http_get(metrics, "/healthz").await.expect("healthz").0, 200);
    let probe = tokio::task::spawn_blocking(move || check_health(metrics, Duration::from_secs(3)));
    probe.await.expect("probe").expect("`pushmatch healthcheck` passes while serving");

    // A health watch stays open through the drain, so the drain lasts the grace period.
    let mut health = HealthClient::new(server.channel.clone());
    let mut statuses =
        health.watch(tonic_health::pb::HealthCheckRequest { service: String::new() }).await.expect("health watch").into_inner();
    let first = statuses.message().await.expect("status").expect("a status");
    assert_eq!(first.status(), ServingStatus::Serving);

    drop(server); // begins the drain
    let not_serving =
        tokio::time::timeout(DEADLINE, statuses.message()).await.expect("in time").expect("status").expect("a status");
    assert_eq!(not_serving.status(), ServingStatus::NotServing);
    let (status, body) = http_get(metrics, "/healthz").await.expect("healthz while draining");
    assert_eq!((status, body.as_str()), (503, "draining\n"));
    let probe = tokio::task::spawn_blocking(move || check_health(metrics, Duration::from_secs(3)));
    let failed = probe.await.expect("probe").expect_err("`pushmatch healthcheck` fails while draining");
    assert!(failed.to_string().contains("503"), "{failed}");

    tokio::time::timeout(DEADLINE, async {
        while http_get(metrics, "/healthz").await.is_ok() {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await
    .expect("the metrics port closes after the drain");
}
