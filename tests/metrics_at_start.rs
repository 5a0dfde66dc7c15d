//! `/metrics` before the first call: every series of the catalogue is there at
//! zero, so that `rate()` and alerts see it from the start.
//!
//! A test binary of its own: the Prometheus recorder is process-wide, and here no
//! other server in the process has counted anything yet, so zero means zero.

// Tests: a failed expectation is a failed test.
#![allow(clippy::expect_used, clippy::unwrap_used, clippy::panic)]

mod support;

use pushmatch::telemetry::metrics::names;
use support::http::scrape;
use support::*;

/// Every sample `name{labels} value` as (name, labels, value).
fn samples(text: &str) -> Vec<(String, String, f64)> {
    text.lines()
        .filter(|line| !line.starts_with('#') && !line.is_empty())
        .map(|line| {
            let (series, value) = line.rsplit_once(' ').expect("a value");
            let (name, labels) = series.split_once('{').map_or((series, ""), |(name, rest)| (name, rest.trim_end_matches('}')));
            (name.to_owned(), labels.to_owned(), value.parse().expect("a number"))
        })
        .collect()
}

/// The value of the one series `name` with exactly these labels, in order.
fn value(samples: &[(String, String, f64)], name: &str, labels: &str) -> f64 {
    let found: Vec<f64> = samples.iter().filter(|(n, l, _)| n == name && l == labels).map(|(_, _, v)| *v).collect();
    assert_eq!(found.len(), 1, "one series {name}{{{labels}}}");
    found[0]
}

#[tokio::test]
async fn every_series_is_there_at_zero_before_the_first_call() {
    let server = TestServer::start_with(|config| config.server.metrics_listen = "127.0.0.1:0".into()).await;
    let text = scrape(server.metrics_addr.expect("metrics on")).await;
    let samples = samples(&text);

    // Every name of the catalogue has at least one series.
    // (The Redis store's own series appear when the Redis store is configured; this
    // server runs on the embedded store. The heap's appear where the binary
    // registered its allocator's probe: tests/binary_metrics.rs.)
    let elsewhere = [names::REDIS_CALLS, names::HEAP_ALLOCATED, names::HEAP_RESIDENT];
    for name in names::ALL.iter().filter(|name| !elsewhere.contains(name)) {
        let histogram = format!("{name}_count");
        assert!(
            samples.iter().any(|(n, _, _)| n == name || *n == histogram),
            "{name} has no series before the first event:\n{text}"
        );
    }

    // gRPC: per served method, started, each status code and the latency, all zero.
    let create = r#"grpc_service="pushmatch.v1.ChallengeService",grpc_method="CreateChallenge",grpc_type="unary""#;
    assert_eq!(value(&samples, names::GRPC_STARTED, create), 0.0);
    for code in ["OK", "InvalidArgument", "ResourceExhausted", "Unavailable", "Unauthenticated"] {
        assert_eq!(value(&samples, names::GRPC_HANDLED, &format!(r#"{create},grpc_code="{code}""#)), 0.0);
    }
    assert_eq!(value(&samples, "grpc_server_handling_seconds_count", create), 0.0);
    let watch = r#"grpc_service="pushmatch.v1.ChallengeService",grpc_method="WatchChallenge",grpc_type="server_stream""#;
    assert_eq!(value(&samples, names::GRPC_HANDLED, &format!(r#"{watch},grpc_code="OK""#)), 0.0);
    let respond =
        r#"grpc_service="pushmatch.v1.DeviceService",grpc_method="RespondToChallenge",grpc_type="unary",grpc_code="OK""#;
    assert_eq!(value(&samples, names::GRPC_HANDLED, respond), 0.0);
    assert_eq!(value(&samples, names::WATCH_STREAMS_OPEN, ""), 0.0);

    // Challenges: per configured tenant, and every final outcome.
    for tenant in ["a", "b"] {
        assert_eq!(value(&samples, names::CHALLENGES_CREATED, &format!(r#"tenant="{tenant}""#)), 0.0);
        let shed = format!(r#"tenant="{tenant}",limit="push.queue_capacity""#);
        assert_eq!(value(&samples, names::CHALLENGES_SHED, &shed), 0.0);
    }
    for labels in [
        r#"tenant="a",outcome="approved",deny_reason="""#,
        r#"tenant="b",outcome="denied",deny_reason="wrong_number""#,
        r#"tenant="a",outcome="expired",deny_reason="""#,
        r#"tenant="b",outcome="fraud_reported",deny_reason="""#,
    ] {
        assert_eq!(value(&samples, names::CHALLENGES_RESOLVED, labels), 0.0);
    }
    assert_eq!(value(&samples, names::CHALLENGES_LIVE, ""), 0.0);

    // Push: per provider, each attempt outcome, kind and final state, retries, latency.
    for provider in ["apns", "fcm"] {
        for outcome in ["sent", "retry", "failed", "unregistered", "token_refused"] {
            let labels = format!(r#"provider="{provider}",outcome="{outcome}""#);
            assert_eq!(value(&samples, names::PUSH_SENDS, &labels), 0.0);
        }
        for tenant in ["a", "b"] {
            let delivered = format!(r#"tenant="{tenant}",provider="{provider}",kind="challenge",state="sent""#);
            assert_eq!(value(&samples, names::PUSH_DELIVERIES, &delivered), 0.0);
        }
        let provider = format!(r#"provider="{provider}""#);
        assert_eq!(value(&samples, names::PUSH_RETRIES, &provider), 0.0);
        assert_eq!(value(&samples, names::PUSH_TOKEN_RENEWALS, &provider), 0.0);
        assert_eq!(value(&samples, "pushmatch_push_latency_seconds_count", &provider), 0.0);
        assert_eq!(value(&samples, names::PUSH_QUEUE_DEPTH, &provider), 0.0);
    }

    // The label sets stay bounded: no series for a tenant or method nobody configured.
    assert!(!text.contains(r#"grpc_method="unknown""#));
    let series = samples.len();
    assert!(series < 2_500, "{series} samples at start");
}
