//! The operators' HTTP port (`server.metrics_listen`): `GET /metrics` renders the
//! process's Prometheus registry (`crate::telemetry::metrics`), sampling the push
//! queues and the store's record count at each scrape; `GET /healthz` answers 200 while the server serves, 503
//! while it drains or while the store does not answer. Load balancers and the
//! container's HEALTHCHECK use it; Kubernetes probes use gRPC health instead
//! (deploy/k8s). [`check_health`] is the client the `pushmatch healthcheck`
//! command uses.

use std::future::Future;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use metrics_exporter_prometheus::PrometheusHandle;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::domain::ports::Store;
use crate::push::dispatcher::{Dispatcher, PLATFORMS};
use crate::telemetry::metrics::{names, sample_heap};

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
    for platform in PLATFORMS {
        let depth = sources.dispatcher.queue_depth(platform);
        metrics::gauge!(names::PUSH_QUEUE_DEPTH, "provider" => platform.name()).set(depth as f64);
        metrics::gauge!(names::PUSH_QUEUE_CAPACITY, "provider" => platform.name())
            .set(sources.dispatcher.queue_capacity() as f64);
    }
    // A store that does not answer in time leaves the gauge at its last value;
    // `/healthz` is where an unavailable store shows.
    if let Ok(Ok(records)) = tokio::time::timeout(STORE_PROBE_TIMEOUT, sources.store.record_count()).await {
        metrics::gauge!(names::STORE_RECORDS).set(records as f64);
    }
    sample_heap();
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
