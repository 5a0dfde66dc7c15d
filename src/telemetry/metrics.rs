//! Prometheus metrics: the catalogue of names ([`names`], every one described in
//! [`describe`]) and the process-wide recorder.
//!
//! Everything in the crate records through the `metrics` facade (`counter!`,
//! `histogram!`, `gauge!`) by a name from [`names`]; every series with its known,
//! bounded label values is registered at zero when a server starts (the
//! `register_*series` functions, here and where each is recorded), so `/metrics`
//! shows it before its first event; [`install`] puts the Prometheus
//! recorder behind it once per process, and every server started in that process
//! renders the same registry at `GET /metrics` on `server.metrics_listen` (served
//! by `crate::server::ops`). Several servers in one process (the tests) therefore
//! share their counters: assert on increases.
//!
//! We use `metrics` with `metrics-exporter-prometheus` rather than
//! `prometheus-client`: the facade lets every module (push senders, stores) record
//! with a macro and no registry handed down to it, and the exporter renders the
//! standard text format without its HTTP listener (we serve it with axum, which
//! tonic brings in already).

use std::sync::OnceLock;

use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

use crate::domain::challenge::{ChallengeState, DenyReason};
use crate::domain::ids::TenantId;

/// The names every dashboard and alert relies on. Labels are listed beside each.
pub mod names {
    /// Counter {grpc_service, grpc_method, grpc_type}: calls that started.
    pub const GRPC_STARTED: &str = "grpc_server_started_total";
    /// Counter {grpc_service, grpc_method, grpc_type, grpc_code}: calls that ended
    /// (a stream when it ends), by status code as grpc-go spells it ("OK", "NotFound", ...).
    pub const GRPC_HANDLED: &str = "grpc_server_handled_total";
    /// Histogram {grpc_service, grpc_method, grpc_type}: from the request to the end
    /// of the response (for streams: to the stream's end).
    pub const GRPC_HANDLING_SECONDS: &str = "grpc_server_handling_seconds";
    /// Counter {tenant}: challenges created (not the idempotent repeats).
    pub const CHALLENGES_CREATED: &str = "pushmatch_challenges_created_total";
    /// Counter {tenant, limit}: CreateChallenge calls refused at once for overload,
    /// by the caller's tenant and the setting whose limit was reached (limit:
    /// server.max_creates_in_flight, server.creates_share_per_tenant,
    /// push.queue_capacity, push.queue_share_per_tenant).
    pub const CHALLENGES_SHED: &str = "pushmatch_challenges_shed_total";
    /// Counter {outcome, deny_reason}: challenges that reached a final state.
    /// outcome: approved, denied, expired, cancelled, fraud_reported;
    /// deny_reason: user_denied, wrong_number, or "" for the other outcomes. The
    /// broker counts the answers and cancellations (the one accepted resolution);
    /// the store backend counts expiries, where they happen.
    pub const CHALLENGES_RESOLVED: &str = "pushmatch_challenges_resolved_total";
    /// Gauge: PENDING challenges in this process's store, kept by the backend (the
    /// embedded store does; a shared backend may leave it out).
    pub const CHALLENGES_LIVE: &str = "pushmatch_challenges_live";
    /// Gauge: records the store holds (its `record_count`: entries in memory and
    /// in the file for the embedded store, keys for Redis), sampled at each scrape.
    /// What memory grows with; the burst bench's `--soak` reads it each minute.
    pub const STORE_RECORDS: &str = "pushmatch_store_records";
    /// Gauge: open WatchChallenge and CreateAndWatchChallenge streams on this replica.
    pub const WATCH_STREAMS_OPEN: &str = "pushmatch_watch_streams_open";
    /// Gauge {provider}: push jobs waiting in that provider's queue, sampled at each scrape.
    pub const PUSH_QUEUE_DEPTH: &str = "pushmatch_push_queue_depth";
    /// Gauge {provider}: the capacity of that provider's queue (`push.queue_capacity`).
    pub const PUSH_QUEUE_CAPACITY: &str = "pushmatch_push_queue_capacity";
    /// Histogram {backend, operation}: store calls, successful or not.
    pub const STORE_OPERATION_SECONDS: &str = "pushmatch_store_operation_seconds";
    /// Counter {backend, operation, kind}: store calls that failed (kind: unavailable, corrupt).
    pub const STORE_ERRORS: &str = "pushmatch_store_errors_total";
    /// Counter: calls this replica made to Redis (a script or a command; a pipeline
    /// counts its commands; pub/sub not included). The burst bench divides it by
    /// the sign-ins.
    pub const REDIS_CALLS: &str = "pushmatch_store_redis_calls_total";
    /// Counter {reason}: TLS handshakes that failed (reason: timeout, error).
    pub const TLS_HANDSHAKE_FAILURES: &str = "pushmatch_tls_handshake_failures_total";
    /// Counter {outcome}: certificate reloads (outcome: reloaded, failed).
    pub const TLS_RELOADS: &str = "pushmatch_tls_reloads_total";
    /// Counter {outcome}: configuration reloads (outcome: reloaded, failed).
    pub const CONFIG_RELOADS: &str = "pushmatch_config_reloads_total";
    /// Gauge {version}: always 1; the running version as a label.
    pub const BUILD_INFO: &str = "pushmatch_build_info";
    /// Gauge: bytes the program holds on the heap (the allocator's count of live
    /// allocations), sampled at each scrape; only where the binary registered a
    /// heap probe ([`super::set_heap_probe`]).
    pub const HEAP_ALLOCATED: &str = "pushmatch_heap_allocated_bytes";
    /// Gauge: bytes of memory the allocator keeps resident (live allocations, its
    /// metadata, and freed pages not yet returned), sampled with the one above. When
    /// RSS grows and this does not, the growth is outside the heap; when this grows
    /// and the allocated bytes do not, the allocator keeps what was freed.
    pub const HEAP_RESIDENT: &str = "pushmatch_heap_resident_bytes";

    // The push path; every one has the label `provider` ("apns", "fcm").

    /// Counter {provider, outcome}: attempts to send (every request to the
    /// provider), by what they came to (outcome: sent, unregistered, retry, failed,
    /// token_refused).
    pub const PUSH_SENDS: &str = "pushmatch_push_sends_total";
    /// Counter {provider}: attempts that were retried after a backoff.
    pub const PUSH_RETRIES: &str = "pushmatch_push_retries_total";
    /// Histogram {provider}: seconds from sending to the provider's answer (or the
    /// timeout), per attempt.
    pub const PUSH_LATENCY: &str = "pushmatch_push_latency_seconds";
    /// Counter {provider, kind, state}: pushes done, by final state (sent, failed,
    /// unregistered) and kind (challenge, clear, new_device).
    pub const PUSH_DELIVERIES: &str = "pushmatch_push_deliveries_total";
    /// Counter {provider}: provider tokens made (APNs JWTs, FCM access tokens).
    pub const PUSH_TOKEN_RENEWALS: &str = "pushmatch_push_token_renewals_total";

    /// Every name above, for [`super::describe`]'s test.
    pub const ALL: &[&str] = &[
        GRPC_STARTED,
        GRPC_HANDLED,
        GRPC_HANDLING_SECONDS,
        CHALLENGES_CREATED,
        CHALLENGES_SHED,
        CHALLENGES_RESOLVED,
        CHALLENGES_LIVE,
        STORE_RECORDS,
        WATCH_STREAMS_OPEN,
        PUSH_QUEUE_DEPTH,
        PUSH_QUEUE_CAPACITY,
        STORE_OPERATION_SECONDS,
        STORE_ERRORS,
        REDIS_CALLS,
        TLS_HANDSHAKE_FAILURES,
        TLS_RELOADS,
        CONFIG_RELOADS,
        BUILD_INFO,
        HEAP_ALLOCATED,
        HEAP_RESIDENT,
        PUSH_SENDS,
        PUSH_RETRIES,
        PUSH_LATENCY,
        PUSH_DELIVERIES,
        PUSH_TOKEN_RENEWALS,
    ];
}

/// Buckets for every `*_seconds` histogram: 1 ms to 30 s. Store calls sit at the
/// low end, pushes in the middle, watch streams at the top.
const SECONDS_BUCKETS: &[f64] = &[0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0];

static RECORDER: OnceLock<Option<PrometheusHandle>> = OnceLock::new();

/// Installs the Prometheus recorder for the whole process on the first call and
/// returns its handle; later calls return the same handle. `None` when another
/// recorder was installed first (an embedding program's own): then `/metrics`
/// serves an empty page and the embedder's recorder gets everything.
pub fn install() -> Option<PrometheusHandle> {
    RECORDER
        .get_or_init(|| {
            let builder =
                match PrometheusBuilder::new().set_buckets_for_metric(Matcher::Suffix("_seconds".into()), SECONDS_BUCKETS) {
                    Ok(builder) => builder,
                    Err(error) => {
                        tracing::warn!(%error, "metrics buckets refused; histograms render as summaries");
                        PrometheusBuilder::new()
                    }
                };
            match builder.install_recorder() {
                Ok(handle) => {
                    describe();
                    Some(handle)
                }
                Err(error) => {
                    tracing::warn!(%error, "another metrics recorder is installed; /metrics stays empty");
                    None
                }
            }
        })
        .clone()
}

/// Gives every name in [`names`] its help text (the `# HELP` line).
fn describe() {
    for (name, unit, help) in DESCRIPTIONS {
        match unit {
            Kind::Counter => metrics::describe_counter!(*name, *help),
            Kind::Gauge => metrics::describe_gauge!(*name, *help),
            Kind::Seconds => metrics::describe_histogram!(*name, metrics::Unit::Seconds, *help),
        }
    }
    metrics::gauge!(names::BUILD_INFO, "version" => env!("CARGO_PKG_VERSION")).set(1.0);
}

enum Kind {
    Counter,
    Gauge,
    Seconds,
}

/// The help text of every metric.
const DESCRIPTIONS: &[(&str, Kind, &str)] = &[
    (names::GRPC_STARTED, Kind::Counter, "gRPC calls started on the server"),
    (names::GRPC_HANDLED, Kind::Counter, "gRPC calls completed on the server, by status code (streams when they end)"),
    (names::GRPC_HANDLING_SECONDS, Kind::Seconds, "gRPC call latency until the response (or stream) ended"),
    (names::CHALLENGES_CREATED, Kind::Counter, "challenges created"),
    (names::CHALLENGES_SHED, Kind::Counter, "CreateChallenge calls shed for overload, by tenant and the limit reached"),
    (names::CHALLENGES_RESOLVED, Kind::Counter, "challenges that reached a final state, by tenant and outcome"),
    (names::CHALLENGES_LIVE, Kind::Gauge, "PENDING challenges in the store"),
    (names::STORE_RECORDS, Kind::Gauge, "records the store holds, sampled at each scrape"),
    (names::WATCH_STREAMS_OPEN, Kind::Gauge, "open WatchChallenge and CreateAndWatchChallenge streams on this replica"),
    (names::PUSH_QUEUE_DEPTH, Kind::Gauge, "push jobs waiting in each provider's queue"),
    (names::PUSH_QUEUE_CAPACITY, Kind::Gauge, "capacity of each provider's push queue"),
    (names::STORE_OPERATION_SECONDS, Kind::Seconds, "store call latency"),
    (names::STORE_ERRORS, Kind::Counter, "store calls that failed"),
    (names::REDIS_CALLS, Kind::Counter, "calls made to Redis (scripts and commands)"),
    (names::TLS_HANDSHAKE_FAILURES, Kind::Counter, "TLS handshakes on the gRPC port that failed"),
    (names::TLS_RELOADS, Kind::Counter, "TLS certificate reloads"),
    (names::CONFIG_RELOADS, Kind::Counter, "configuration reloads (the tenants), by outcome"),
    (names::BUILD_INFO, Kind::Gauge, "the running version"),
    (names::HEAP_ALLOCATED, Kind::Gauge, "bytes the program holds on the heap, sampled at each scrape"),
    (names::HEAP_RESIDENT, Kind::Gauge, "bytes the allocator keeps resident, sampled at each scrape"),
    (names::PUSH_SENDS, Kind::Counter, "attempts to send a push, by outcome"),
    (names::PUSH_RETRIES, Kind::Counter, "push attempts retried after a backoff"),
    (names::PUSH_LATENCY, Kind::Seconds, "seconds from sending a push to the provider's answer"),
    (names::PUSH_DELIVERIES, Kind::Counter, "pushes done, by tenant, final state and kind"),
    (names::PUSH_TOKEN_RENEWALS, Kind::Counter, "provider tokens made (APNs JWTs, FCM access tokens)"),
];

/// Where the process's heap stands, in bytes, as its allocator counts it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HeapStats {
    /// Live allocations.
    pub allocated: u64,
    /// Resident memory the allocator holds (at least `allocated`).
    pub resident: u64,
}

/// Reads the allocator's counters; `None` when it cannot.
pub type HeapProbe = fn() -> Option<HeapStats>;

static HEAP_PROBE: OnceLock<HeapProbe> = OnceLock::new();

/// Registers how to read the heap's counters, for [`names::HEAP_ALLOCATED`] and
/// [`names::HEAP_RESIDENT`]. The allocator is the binary's choice (a library does
/// not pick one), so the binary registers it; the first call wins.
pub fn set_heap_probe(probe: HeapProbe) {
    // A second registration (a second server in one process) keeps the first.
    let _ = HEAP_PROBE.set(probe);
}

/// Sets the heap gauges from the registered probe, if any (at each scrape).
pub fn sample_heap() {
    if let Some(stats) = HEAP_PROBE.get().and_then(|probe| probe()) {
        metrics::gauge!(names::HEAP_ALLOCATED).set(stats.allocated as f64);
        metrics::gauge!(names::HEAP_RESIDENT).set(stats.resident as f64);
    }
}

/// The `limit` label values of [`names::CHALLENGES_SHED`]: the settings whose
/// limits shed a CreateChallenge.
pub const SHED_LIMITS: &[&str] =
    &["server.max_creates_in_flight", "server.creates_share_per_tenant", "push.queue_capacity", "push.queue_share_per_tenant"];

/// Registers the challenge series at zero (at start, so that `rate()` and alerts
/// see them before the first sign-in): per configured tenant, challenges created,
/// shed by each limit and resolved in each final outcome; and, when `live_gauge` (the store keeps
/// [`names::CHALLENGES_LIVE`]), the live gauge. Adding zero keeps what another
/// server in the same process counted already. The gRPC, push, store and TLS series
/// are registered where they are recorded (`register_series` in each).
pub fn register_challenge_series<'a>(tenants: impl IntoIterator<Item = &'a str>, live_gauge: bool) {
    for tenant in tenants {
        metrics::counter!(names::CHALLENGES_CREATED, "tenant" => tenant.to_owned()).increment(0);
        for limit in SHED_LIMITS {
            metrics::counter!(names::CHALLENGES_SHED, "tenant" => tenant.to_owned(), "limit" => *limit).increment(0);
        }
        for (state, deny_reason) in [
            (ChallengeState::Approved, None),
            (ChallengeState::Denied, Some(DenyReason::UserDenied)),
            (ChallengeState::Denied, Some(DenyReason::WrongNumber)),
            (ChallengeState::Expired, None),
            (ChallengeState::Cancelled, None),
            (ChallengeState::FraudReported, None),
        ] {
            let (outcome, deny_reason) = resolved_labels(state, deny_reason);
            metrics::counter!(names::CHALLENGES_RESOLVED, "tenant" => tenant.to_owned(), "outcome" => outcome, "deny_reason" => deny_reason)
                .increment(0);
        }
    }
    if live_gauge {
        metrics::gauge!(names::CHALLENGES_LIVE).increment(0.0);
    }
}

fn resolved_labels(state: ChallengeState, deny_reason: Option<DenyReason>) -> (String, &'static str) {
    let deny_reason = match deny_reason {
        Some(DenyReason::UserDenied) => "user_denied",
        Some(DenyReason::WrongNumber) => "wrong_number",
        None => "",
    };
    (state.name().to_ascii_lowercase(), deny_reason)
}

/// Counts a challenge that reached a final state (call it once per challenge: where
/// the resolution was accepted, or where the expiry happened). `tenant` is the
/// challenge's: only configured tenants create challenges, so the label is bounded.
pub fn challenge_resolved(tenant: &TenantId, state: ChallengeState, deny_reason: Option<DenyReason>) {
    if !state.is_final() {
        return;
    }
    let (outcome, deny_reason) = resolved_labels(state, deny_reason);
    metrics::counter!(names::CHALLENGES_RESOLVED, "tenant" => tenant.0.clone(), "outcome" => outcome, "deny_reason" => deny_reason)
        .increment(1);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_name_is_described_once() {
        let described: Vec<&str> = DESCRIPTIONS.iter().map(|(name, _, _)| *name).collect();
        for name in names::ALL {
            assert_eq!(described.iter().filter(|d| *d == name).count(), 1, "{name} is described once");
        }
        assert_eq!(described.len(), names::ALL.len(), "nothing is described that is not in names::ALL");
        // And ALL lists every name the catalogue declares.
        let source = include_str!("metrics.rs");
        let catalogue = &source[..source.find("pub const ALL").unwrap_or(source.len())];
        assert_eq!(catalogue.matches(": &str = \"").count(), names::ALL.len(), "names::ALL lists every name");
    }
}
