//! Prometheus metrics: the process-wide recorder and the operators' HTTP endpoint.
//!
//! Everything in the crate records through the `metrics` facade (`counter!`,
//! `histogram!`, `gauge!`); [`install`] puts the Prometheus recorder behind it
//! once per process, and every server started in that process renders the same
//! registry at `GET /metrics` on `server.metrics_listen`. Several servers in one
//! process (the tests) therefore share their counters: assert on increases.
//!
//! We use `metrics` with `metrics-exporter-prometheus` rather than
//! `prometheus-client`: the facade lets every module (push senders, stores) record
//! with a macro and no registry handed down to it, and the exporter renders the
//! standard text format without its HTTP listener (we serve it with axum, which
//! tonic brings in already).
//!
//! `GET /healthz` answers 200 while the server serves, 503 while it drains or while
//! the store does not answer. Load balancers and the container's HEALTHCHECK use
//! it; Kubernetes probes use gRPC health instead (deploy/k8s).

use std::future::Future;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::domain::challenge::{ChallengeState, DenyReason};
use crate::push::dispatcher::Dispatcher;
use crate::store::Store;

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
    /// Counter: CreateChallenge calls refused because `server.max_creates_in_flight`
    /// were being worked on already.
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
    /// Gauge: open WatchChallenge streams on this replica.
    pub const WATCH_STREAMS_OPEN: &str = "pushmatch_watch_streams_open";
    /// Gauge: push jobs waiting in the dispatcher's queue, sampled at each scrape.
    pub const PUSH_QUEUE_DEPTH: &str = "pushmatch_push_queue_depth";
    /// Gauge: the queue's capacity (`push.queue_capacity`).
    pub const PUSH_QUEUE_CAPACITY: &str = "pushmatch_push_queue_capacity";
    /// Histogram {backend, operation}: store calls, successful or not.
    pub const STORE_OPERATION_SECONDS: &str = "pushmatch_store_operation_seconds";
    /// Counter {backend, operation, kind}: store calls that failed (kind: unavailable, corrupt).
    pub const STORE_ERRORS: &str = "pushmatch_store_errors_total";
    /// Counter {reason}: TLS handshakes that failed (reason: timeout, error).
    pub const TLS_HANDSHAKE_FAILURES: &str = "pushmatch_tls_handshake_failures_total";
    /// Counter {outcome}: certificate reloads (outcome: reloaded, failed).
    pub const TLS_RELOADS: &str = "pushmatch_tls_reloads_total";
    /// Gauge {version}: always 1; the running version as a label.
    pub const BUILD_INFO: &str = "pushmatch_build_info";
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

fn describe() {
    use metrics::{describe_counter, describe_gauge, describe_histogram};
    describe_counter!(names::GRPC_STARTED, "gRPC calls started on the server");
    describe_counter!(names::GRPC_HANDLED, "gRPC calls completed on the server, by status code (streams when they end)");
    describe_histogram!(
        names::GRPC_HANDLING_SECONDS,
        metrics::Unit::Seconds,
        "gRPC call latency until the response (or stream) ended"
    );
    describe_counter!(names::CHALLENGES_CREATED, "challenges created");
    describe_counter!(names::CHALLENGES_SHED, "CreateChallenge calls shed: server.max_creates_in_flight reached");
    describe_counter!(names::CHALLENGES_RESOLVED, "challenges that reached a final state, by outcome");
    describe_gauge!(names::CHALLENGES_LIVE, "PENDING challenges in the store");
    describe_gauge!(names::WATCH_STREAMS_OPEN, "open WatchChallenge streams on this replica");
    describe_gauge!(names::PUSH_QUEUE_DEPTH, "push jobs waiting in the dispatcher's queue");
    describe_gauge!(names::PUSH_QUEUE_CAPACITY, "capacity of the dispatcher's queue");
    describe_histogram!(names::STORE_OPERATION_SECONDS, metrics::Unit::Seconds, "store call latency");
    describe_counter!(names::STORE_ERRORS, "store calls that failed");
    describe_counter!(names::TLS_HANDSHAKE_FAILURES, "TLS handshakes on the gRPC port that failed");
    describe_counter!(names::TLS_RELOADS, "TLS certificate reloads");
    describe_gauge!(names::BUILD_INFO, "the running version");
    metrics::gauge!(names::BUILD_INFO, "version" => env!("CARGO_PKG_VERSION")).set(1.0);
}

/// Counts a challenge that reached a final state (call it once per challenge: where
/// the resolution was accepted, or where the expiry happened).
pub fn challenge_resolved(state: ChallengeState, deny_reason: Option<DenyReason>) {
    let outcome = match state {
        ChallengeState::Pending => return,
        ChallengeState::Approved => "approved",
        ChallengeState::Denied => "denied",
        ChallengeState::Expired => "expired",
        ChallengeState::Cancelled => "cancelled",
        ChallengeState::FraudReported => "fraud_reported",
    };
    let deny_reason = match deny_reason {
        Some(DenyReason::UserDenied) => "user_denied",
        Some(DenyReason::WrongNumber) => "wrong_number",
        None => "",
    };
    metrics::counter!(names::CHALLENGES_RESOLVED, "outcome" => outcome, "deny_reason" => deny_reason).increment(1);
}

/// What the endpoint samples at scrape time and asks for `/healthz`.
#[derive(Clone)]
pub struct ScrapeSources {
    pub handle: Option<PrometheusHandle>,
    /// The store without the metrics decorator: health probes are not store traffic.
    pub store: Arc<dyn Store>,
    pub dispatcher: Dispatcher,
    /// Cancelled when the server starts to drain.
    pub draining: CancellationToken,
}

/// How long `/healthz` waits for the store before it calls it down.
const STORE_PROBE_TIMEOUT: Duration = Duration::from_secs(2);
/// How often histogram samples are folded into buckets between scrapes.
const UPKEEP_INTERVAL: Duration = Duration::from_secs(5);

/// Serves `/metrics` and `/healthz` on `listener` until `shutdown` resolves. The
/// gRPC server ends its drain first, so `/healthz` reads 503 throughout the drain.
pub async fn serve(
    listener: TcpListener,
    sources: ScrapeSources,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    if let Some(handle) = sources.handle.clone() {
        let stop = sources.draining.clone();
        tokio::spawn(async move {
            let mut ticks = tokio::time::interval(UPKEEP_INTERVAL);
            loop {
                tokio::select! {
                    _ = ticks.tick() => handle.run_upkeep(),
                    () = stop.cancelled() => return,
                }
            }
        });
    }
    let app = Router::new().route("/metrics", get(metrics_page)).route("/healthz", get(healthz)).with_state(sources);
    tracing::info!(addr = ?listener.local_addr().ok(), "serving /metrics and /healthz");
    axum::serve(listener, app).with_graceful_shutdown(shutdown).await
}

async fn metrics_page(State(sources): State<ScrapeSources>) -> impl IntoResponse {
    let depth = sources.dispatcher.queue_depth();
    metrics::gauge!(names::PUSH_QUEUE_DEPTH).set(depth as f64);
    metrics::gauge!(names::PUSH_QUEUE_CAPACITY).set(sources.dispatcher.queue_capacity() as f64);
    let body = sources.handle.as_ref().map(PrometheusHandle::render).unwrap_or_default();
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")], body)
}

async fn healthz(State(sources): State<ScrapeSources>) -> (StatusCode, &'static str) {
    if sources.draining.is_cancelled() {
        return (StatusCode::SERVICE_UNAVAILABLE, "draining\n");
    }
    match tokio::time::timeout(STORE_PROBE_TIMEOUT, sources.store.health()).await {
        Ok(Ok(_)) => (StatusCode::OK, "ok\n"),
        Ok(Err(error)) => {
            tracing::warn!(%error, "health check: store unavailable");
            (StatusCode::SERVICE_UNAVAILABLE, "store unavailable\n")
        }
        Err(_) => (StatusCode::SERVICE_UNAVAILABLE, "store too slow\n"),
    }
}

#[derive(Debug, thiserror::Error)]
pub enum HealthcheckError {
    #[error("cannot reach {addr}: {source}")]
    Unreachable { addr: SocketAddr, source: std::io::Error },
    #[error("{addr} answered {status_line:?}")]
    Unhealthy { addr: SocketAddr, status_line: String },
}

/// Asks `GET /healthz` at `addr` (a wildcard address means this host) and succeeds
/// on 200. Blocking, for the `pushmatch healthcheck` command.
pub fn check_health(addr: SocketAddr, timeout: Duration) -> Result<(), HealthcheckError> {
    use std::io::{Read as _, Write as _};

    let mut addr = addr;
    if addr.ip().is_unspecified() {
        addr.set_ip(if addr.is_ipv4() { Ipv4Addr::LOCALHOST.into() } else { Ipv6Addr::LOCALHOST.into() });
    }
    let unreachable = |source| HealthcheckError::Unreachable { addr, source };
    let mut stream = std::net::TcpStream::connect_timeout(&addr, timeout).map_err(unreachable)?;
    stream.set_read_timeout(Some(timeout)).map_err(unreachable)?;
    stream.set_write_timeout(Some(timeout)).map_err(unreachable)?;
    stream.write_all(format!("GET /healthz HTTP/1.0\r\nHost: {addr}\r\n\r\n").as_bytes()).map_err(unreachable)?;
    let mut response = Vec::new();
    stream.take(4096).read_to_end(&mut response).map_err(unreachable)?;
    let response = String::from_utf8_lossy(&response);
    let status_line = response.lines().next().unwrap_or_default().to_owned();
    if status_line.split_whitespace().nth(1) == Some("200") {
        Ok(())
    } else {
        Err(HealthcheckError::Unhealthy { addr, status_line })
    }
}
