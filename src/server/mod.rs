//! `run(listener, config, shutdown)`: builds the broker over its store and
//! dispatcher, serves the three services plus health and reflection on `listener`,
//! and drains when `shutdown` resolves (`src/api/drain.rs`): health turns NOT_SERVING, new
//! calls are refused with UNAVAILABLE, calls in flight finish, then each watch
//! stream sends the final state those calls reached, or ends with UNAVAILABLE (all
//! within the grace period).
//!
//! Tests call [`run_with`] on a port-0 listener with their own clock and fake push
//! senders.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use tokio::net::TcpListener;
use tokio_stream::StreamExt as _;
use tokio_stream::wrappers::TcpListenerStream;
use tokio_util::sync::CancellationToken;
use tonic::server::NamedService;
use tonic::transport::Server;
use tonic_health::ServingStatus;
use tonic_health::pb::health_server::HealthServer;
use tonic_health::server::{HealthReporter, HealthService};

use crate::api::auth::TenantAuthLayer;
use crate::api::challenges::ChallengeApi;
use crate::api::devices::DeviceApi;
use crate::api::drain::{self, Drain};
use crate::api::enrollments::EnrollmentApi;
use crate::broker::{Broker, DeliveryRecorder};
use crate::config::{Config, StoreBackend};
use crate::domain::ports::{Store, StoreError};
use crate::domain::secrets::SecretBox;
use crate::domain::time::{Clock, SystemClock};
use crate::pb;
use crate::pb::challenge_service_server::ChallengeServiceServer;
use crate::pb::device_service_server::DeviceServiceServer;
use crate::pb::enrollment_service_server::EnrollmentServiceServer;
use crate::push::PushSender;
use crate::push::dispatcher::{Dispatcher, DispatcherCounters};
use crate::push::routes::PushRoutes;
use crate::reload::ReloadRequests;
use crate::store::embedded::EmbeddedStore;
use crate::store::metered::MeteredStore;
use crate::store::redis::RedisStore;
use crate::telemetry::grpc::GrpcTelemetryLayer;
use crate::tls::ReloadingTls;
use ops::ScrapeSources;
pub use reload::ConfigSource;

pub mod admin;
pub mod ops;
pub mod reload;

/// The largest request the server decodes (API.md: 64 KiB); larger ones are refused
/// with OUT_OF_RANGE and the connection carries on.
pub const MAX_MESSAGE_BYTES: usize = 64 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("cannot open the store: {0}")]
    Store(#[from] StoreError),
    #[error("cannot build server reflection: {0}")]
    Reflection(#[from] tonic_reflection::server::Error),
    #[error("the gRPC server failed: {0}")]
    Transport(#[from] tonic::transport::Error),
    #[error("secret key {path}: {message}")]
    SecretKey { path: String, message: String },
    #[error("push provider: {0}")]
    Push(#[from] crate::push::PushSetupError),
    #[error(transparent)]
    Tls(#[from] crate::tls::TlsError),
    #[error("server.metrics_listen {addr}: {source}")]
    Metrics { addr: String, source: std::io::Error },
}

/// What the server is built from besides its configuration.
pub struct Dependencies {
    pub clock: Arc<dyn Clock>,
    pub push_senders: Vec<Arc<dyn PushSender>>,
    /// The dispatcher's counters, shared so tests and metrics can read them.
    pub push_counters: Arc<DispatcherCounters>,
    /// Where `/metrics` and `/healthz` listen; `None`: bind `server.metrics_listen`
    /// (tests pass a port-0 listener to learn the port).
    pub metrics_listener: Option<TcpListener>,
    /// The file the configuration was loaded from: its tenants are reloaded on
    /// SIGHUP and when it changes ([`reload`]). `None`: never reloaded.
    pub config_source: Option<ConfigSource>,
    /// Reloads asked for in-process (tests), answered with the outcome.
    pub reload_requests: Option<ReloadRequests>,
    /// The senders behind `push_senders` by tenant, when they came from the
    /// configuration: a reload routes the tenants' pushes anew.
    pub push_routes: Option<Arc<PushRoutes>>,
}

impl Default for Dependencies {
    /// The system clock and no push providers (deliveries read FAILED / "not configured").
    fn default() -> Self {
        Self {
            clock: Arc::new(SystemClock),
            push_senders: Vec::new(),
            push_counters: Arc::default(),
            metrics_listener: None,
            config_source: None,
            reload_requests: None,
            push_routes: None,
        }
    }
}

impl Dependencies {
    /// The system clock and the push senders of the configured `[push.*]` and
    /// `[tenants.push.*]` sections, routed by tenant. Fails, naming the file, when a
    /// key, service-account or CA file is unreadable or malformed: `serve` stops
    /// before it listens.
    pub async fn from_config(config: &Config) -> Result<Self, ServerError> {
        let clock: Arc<dyn Clock> = Arc::new(SystemClock);
        let routes = PushRoutes::new(&config.push, &config.tenant_push(), Arc::clone(&clock)).await?;
        Ok(Self { clock, push_senders: routes.senders(), push_routes: Some(routes), ..Self::default() })
    }
}

/// The runtime `pushmatch serve` runs on, as `server.worker_threads` says: 0, the
/// multi-threaded scheduler with tokio's default worker count; 1, the
/// current-thread scheduler (no other thread to wake for each message: about a
/// sixth less CPU per sign-in in BENCHMARKS.md, on one core at most); N, N workers.
/// Blocking work (the embedded store's disk reads) goes to tokio's blocking pool in
/// every case.
pub fn runtime(config: &crate::config::ServerConfig) -> std::io::Result<tokio::runtime::Runtime> {
    let mut builder = match config.worker_threads {
        1 => tokio::runtime::Builder::new_current_thread(),
        _ => tokio::runtime::Builder::new_multi_thread(),
    };
    if config.worker_threads > 1 {
        builder.worker_threads(usize::from(config.worker_threads));
    }
    builder.enable_all().build()
}

/// Serves until `shutdown` resolves, with the real clock and the configured providers.
pub async fn run(
    listener: TcpListener,
    config: Config,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), ServerError> {
    let dependencies = Dependencies::from_config(&config).await?;
    run_with(listener, config, dependencies, shutdown).await
}

pub async fn run_with(
    listener: TcpListener,
    config: Config,
    dependencies: Dependencies,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), ServerError> {
    let Dependencies { clock, push_senders, push_counters, metrics_listener, config_source, reload_requests, push_routes } =
        dependencies;
    let draining = CancellationToken::new();
    // Everything records through the `metrics` facade; install its recorder first.
    let metrics_handle = crate::telemetry::metrics::install();
    let metrics_listener = bind_metrics(metrics_listener, &config).await?;
    let tls = match config.tls_files() {
        Some(files) => Some(ReloadingTls::load(files).await?),
        None => None,
    };

    let store = open_store(&config, Arc::clone(&clock)).await?;
    let metered = MeteredStore::wrap(Arc::clone(&store));
    let recorder = Arc::new(DeliveryRecorder::new(Arc::clone(&metered)));
    let dispatcher = Dispatcher::start(
        push_senders,
        Arc::clone(&recorder) as Arc<dyn crate::push::DeliveryReporter>,
        Arc::clone(&clock),
        config.dispatcher_settings(),
        push_counters,
        draining.child_token(),
    );
    let secrets = SecretBox::new(&load_secret_key(&config).await?);
    let broker =
        Arc::new(Broker::new(metered, dispatcher.clone(), clock, config.broker_settings(), config.domain_tenants(), secrets));
    let keys = Arc::new(ArcSwap::from_pointee(config.tenant_keys()));
    let auth = TenantAuthLayer::new(Arc::clone(&keys), tls.as_ref().is_some_and(|tls| tls.mutual()));
    if let Some(source) = config_source {
        let targets = reload::Reloadable { broker: Arc::clone(&broker), dispatcher: dispatcher.clone(), keys, push_routes };
        reload::spawn(source, config.clone(), targets, reload_requests, draining.child_token()).await;
    }

    let health = start_health(Arc::clone(&store), &draining).await;
    register_series(&config, store.backend());
    let metrics_stop = CancellationToken::new();
    let metrics_task = metrics_listener.map(|listener| {
        let sources = ScrapeSources { handle: metrics_handle, store, dispatcher, draining: draining.clone() };
        tokio::spawn(ops::serve(listener, sources, metrics_stop.clone().cancelled_owned()))
    });
    if let Some(tls) = &tls {
        tls.spawn_reloader(draining.child_token());
    }

    let grace = Duration::from_secs(u64::from(config.server.shutdown_grace_seconds));
    let drain = Drain::default();
    let listener_closed = CancellationToken::new();
    let signal = drain_on(shutdown, health.clone(), draining.clone(), listener_closed.clone(), drain.clone(), grace);
    let accepting = (draining.clone(), listener_closed);
    let serve = serve_grpc(listener, &config, tls, auth, health, broker, drain, accepting, signal)?;
    let grace_elapsed = async {
        draining.cancelled().await;
        tokio::time::sleep(grace).await;
    };
    tokio::select! {
        result = serve => result?,
        () = grace_elapsed => tracing::warn!(grace_seconds = grace.as_secs(), "calls still open after the grace period; closing"),
    }
    // The push reports that wait for their challenge's other pushes are written
    // now: watchers elsewhere (other replicas, GetChallenge) would read QUEUED.
    if tokio::time::timeout(Duration::from_secs(2), recorder.flush()).await.is_err() {
        tracing::warn!("the waiting push reports were not all recorded within 2 s");
    }
    // /healthz answered 503 throughout the drain; now the metrics port closes too.
    metrics_stop.cancel();
    if let Some(task) = metrics_task
        && let Ok(Ok(Err(error))) = tokio::time::timeout(Duration::from_secs(2), task).await
    {
        tracing::warn!(%error, "the metrics endpoint failed");
    }
    tracing::info!("stopped");
    Ok(())
}

/// Every series of the catalogue (`crate::telemetry::metrics::names`) at zero, with
/// its known, bounded label values, before `/metrics` first answers: `rate()` and
/// alerts see a series from the start, not from its first event.
fn register_series(config: &Config, backend: &'static str) {
    crate::telemetry::grpc::register_series();
    register_tenant_series(config);
    for outcome in ["reloaded", "failed"] {
        metrics::counter!(crate::telemetry::metrics::names::CONFIG_RELOADS, "outcome" => outcome).increment(0);
    }
    crate::store::metered::register_series(backend);
    crate::tls::register_series();
    if config.store.backend != StoreBackend::Embedded {
        // Only the Redis store makes Redis calls.
        metrics::counter!(crate::telemetry::metrics::names::REDIS_CALLS).increment(0);
    }
}

/// The series with a `tenant` label, at zero for each configured tenant (at start,
/// and for a tenant a reload adds).
fn register_tenant_series(config: &Config) {
    let embedded = config.store.backend == StoreBackend::Embedded;
    let tenants = config.tenants.iter().map(|t| t.id.as_str());
    crate::telemetry::metrics::register_challenge_series(tenants.clone(), embedded);
    crate::push::dispatcher::register_series(tenants);
}

/// The listener of `/metrics` and `/healthz`: the one passed in, else
/// `server.metrics_listen` bound now; `None` when that is empty.
async fn bind_metrics(passed: Option<TcpListener>, config: &Config) -> Result<Option<TcpListener>, ServerError> {
    Ok(match (passed, config.server.metrics_listen.as_str()) {
        (Some(listener), _) => Some(listener),
        (None, "") => None,
        (None, addr) => {
            Some(TcpListener::bind(addr).await.map_err(|source| ServerError::Metrics { addr: addr.to_owned(), source })?)
        }
    })
}

/// Every service SERVING, then following the store (see [`follow_store_health`]).
async fn start_health(store: Arc<dyn Store>, draining: &CancellationToken) -> HealthReporter {
    let (reporter, _) = tonic_health::server::health_reporter();
    set_health(&reporter, ServingStatus::Serving).await;
    tokio::spawn(follow_store_health(store, reporter.clone(), draining.child_token()));
    reporter
}

/// The names gRPC health reports on: the server as a whole ("") and each service.
const SERVICE_NAMES: [&str; 4] = [
    "",
    <ChallengeServiceServer<ChallengeApi> as NamedService>::NAME,
    <EnrollmentServiceServer<EnrollmentApi> as NamedService>::NAME,
    <DeviceServiceServer<DeviceApi> as NamedService>::NAME,
];

async fn set_health(reporter: &HealthReporter, status: ServingStatus) {
    for name in SERVICE_NAMES {
        reporter.set_service_status(name, status).await;
    }
}

/// Resolves after `shutdown` has, health has turned NOT_SERVING, new calls have been
/// refused, the calls in flight have returned and the watch streams have sent their
/// last word (see `src/api/drain.rs`), or the grace period is over: only then does the
/// HTTP/2 server send GOAWAY and close its connections.
async fn drain_on(
    shutdown: impl Future<Output = ()>,
    health: HealthReporter,
    draining: CancellationToken,
    listener_closed: CancellationToken,
    drain: Drain,
    grace: Duration,
) {
    shutdown.await;
    tracing::info!("shutting down: draining calls");
    drain.start();
    draining.cancel();
    // Health says NOT_SERVING once the listener is gone (`accept_until`): a client
    // that reads it and connects anew is refused, not accepted and then reset (on
    // one worker thread the health update used to go out first).
    if tokio::time::timeout(Duration::from_secs(1), listener_closed.cancelled()).await.is_err() {
        tracing::warn!("the listener did not close within 1 s of the drain");
    }
    set_health(&health, ServingStatus::NotServing).await;
    if !drain.finish(grace).await {
        tracing::warn!(grace_seconds = grace.as_secs(), "calls still running after the grace period");
    }
}

/// The tonic server with its limits and layers, serving the three services,
/// health and reflection on `listener` (over TLS when configured) until `signal`.
#[allow(clippy::too_many_arguments)]
fn serve_grpc(
    listener: TcpListener,
    config: &Config,
    tls: Option<Arc<ReloadingTls>>,
    auth: TenantAuthLayer,
    health: HealthReporter,
    broker: Arc<Broker>,
    drain: Drain,
    (stop_accepting, listener_closed): (CancellationToken, CancellationToken),
    signal: impl Future<Output = ()> + Send + 'static,
) -> Result<impl Future<Output = Result<(), tonic::transport::Error>>, ServerError> {
    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(pb::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()?;
    let challenges = ChallengeServiceServer::new(ChallengeApi::new(Arc::clone(&broker), drain.clone()))
        .max_decoding_message_size(MAX_MESSAGE_BYTES);
    let enrollments =
        EnrollmentServiceServer::new(EnrollmentApi::new(Arc::clone(&broker))).max_decoding_message_size(MAX_MESSAGE_BYTES);
    let devices = DeviceServiceServer::new(DeviceApi::new(broker)).max_decoding_message_size(MAX_MESSAGE_BYTES);

    let server = &config.server;
    tracing::info!(addr = ?listener.local_addr().ok(), tls = tls.is_some(), mutual_tls = tls.as_ref().is_some_and(|t| t.mutual()), "serving gRPC");
    let mut builder = Server::builder();
    if server.max_connection_age_seconds > 0 {
        builder = builder.max_connection_age(Duration::from_secs(u64::from(server.max_connection_age_seconds)));
    }
    if server.max_connection_age_grace_seconds > 0 {
        builder = builder.max_connection_age_grace(Duration::from_secs(u64::from(server.max_connection_age_grace_seconds)));
    }
    let router = builder
        .timeout(Duration::from_secs(u64::from(server.request_timeout_seconds)))
        .concurrency_limit_per_connection(server.max_concurrent_requests_per_connection as usize)
        .http2_keepalive_interval(Some(Duration::from_secs(30)))
        .http2_keepalive_timeout(Some(Duration::from_secs(10)))
        .tcp_nodelay(true)
        .layer(GrpcTelemetryLayer::new(crate::telemetry::spans_exported()))
        .layer(drain.layer())
        .layer(auth)
        .add_service(HealthServer::new(HealthService::from_health_reporter(health)))
        .add_service(reflection)
        .add_service(challenges)
        .add_service(enrollments)
        .add_service(devices);
    Ok(async move {
        match tls {
            Some(tls) => {
                // The accept task closes the listener and tells `listener_closed`;
                // `accept_until` only drops the stream that stops it.
                let incoming = crate::tls::incoming(listener, tls, listener_closed);
                let incoming = drain::accept_until(incoming, stop_accepting, CancellationToken::new());
                router.serve_with_incoming_shutdown(incoming, signal).await
            }
            None => {
                // tonic's own `tcp_nodelay` applies only to listeners it binds itself: set it
                // on each accepted socket, or Nagle's algorithm and delayed ACKs hold small
                // watch-stream messages back by tens of milliseconds.
                let incoming = TcpListenerStream::new(listener).map(|accepted| {
                    accepted.inspect(|tcp| {
                        if let Err(error) = tcp.set_nodelay(true) {
                            tracing::debug!(%error, "could not set TCP_NODELAY");
                        }
                    })
                });
                router.serve_with_incoming_shutdown(drain::accept_until(incoming, stop_accepting, listener_closed), signal).await
            }
        }
    })
}

/// The key that seals TOTP secrets: `[secrets] key_hex`, or the key file, which is
/// created (32 random bytes as hex, mode 0600) on the first start. Losing it makes
/// stored TOTP secrets unreadable; back it up with the store.
async fn load_secret_key(config: &Config) -> Result<[u8; 32], ServerError> {
    let path = config.secrets.key_file_path(&config.store.path);
    let failed = |message: String| ServerError::SecretKey { path: path.display().to_string(), message };
    let text = if !config.secrets.key_hex.is_empty() {
        config.secrets.key_hex.clone()
    } else {
        match tokio::fs::read_to_string(&path).await {
            Ok(text) => text,
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => {
                let mut key = [0u8; 32];
                crate::domain::ids::os_random(&mut key).map_err(|e| failed(e.to_string()))?;
                if let Some(folder) = path.parent() {
                    tokio::fs::create_dir_all(folder).await.map_err(|e| failed(format!("cannot create its folder: {e}")))?;
                }
                let mut options = tokio::fs::OpenOptions::new();
                options.write(true).create_new(true);
                #[cfg(unix)]
                options.mode(0o600);
                let mut file = options.open(&path).await.map_err(|e| failed(format!("cannot create it: {e}")))?;
                tokio::io::AsyncWriteExt::write_all(&mut file, hex::encode(key).as_bytes())
                    .await
                    .map_err(|e| failed(format!("cannot write it: {e}")))?;
                file.sync_all().await.map_err(|e| failed(format!("cannot write it: {e}")))?;
                tracing::info!(path = %path.display(), "created a new secret key for TOTP secrets; back it up with the store");
                return Ok(key);
            }
            Err(error) => return Err(failed(format!("cannot read it: {error}"))),
        }
    };
    let mut key = [0u8; 32];
    hex::decode_to_slice(text.trim(), &mut key).map_err(|_| failed("must hold 64 hex digits".into()))?;
    Ok(key)
}

/// Opens the configured store: the embedded one, or Redis (one node, or a cluster
/// when `[store] redis_cluster_urls` lists its seed nodes).
async fn open_store(config: &Config, clock: Arc<dyn Clock>) -> Result<Arc<dyn Store>, ServerError> {
    let store: Arc<dyn Store> = match config.store.backend {
        StoreBackend::Embedded => {
            let store = EmbeddedStore::open(&config.store.path, clock).await?;
            tracing::info!(backend = "embedded", path = %config.store.path.display(), "store open");
            Arc::new(store)
        }
        StoreBackend::Redis => {
            let settings = config.redis_settings();
            let store = RedisStore::connect(settings.clone(), clock).await?;
            tracing::info!(backend = "redis", nodes = settings.urls.len(), "store open");
            Arc::new(store)
        }
    };
    Ok(store)
}

/// Health follows the store: NOT_SERVING while it does not answer (load balancers
/// then send sign-ins to a replica that can serve them), SERVING again when it
/// does. Stops when the server drains (which sets NOT_SERVING for good).
async fn follow_store_health(store: Arc<dyn Store>, health: HealthReporter, draining: CancellationToken) {
    const EVERY: Duration = Duration::from_secs(1);
    let mut serving = true;
    let mut ticks = tokio::time::interval(EVERY);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = draining.cancelled() => return,
            _ = ticks.tick() => {}
        }
        let healthy = match store.health().await {
            Ok(()) => true,
            Err(error) => {
                if serving {
                    tracing::warn!(%error, "store unreachable: health NOT_SERVING");
                }
                false
            }
        };
        if healthy == serving || draining.is_cancelled() {
            continue;
        }
        serving = healthy;
        let status = if healthy { ServingStatus::Serving } else { ServingStatus::NotServing };
        if healthy {
            tracing::info!("store reachable again: health SERVING");
        }
        set_health(&health, status).await;
    }
}

#[cfg(test)]
mod tests {
    use tokio::runtime::RuntimeFlavor;

    use crate::config::ServerConfig;

    fn shape(worker_threads: u16) -> (RuntimeFlavor, usize) {
        let runtime = super::runtime(&ServerConfig { worker_threads, ..ServerConfig::default() }).expect("a runtime");
        // A task spawned on it runs (the current-thread runtime drives it in block_on).
        let ran = runtime.block_on(async { tokio::spawn(async { 7 }).await.expect("the task ran") });
        assert_eq!(ran, 7);
        (runtime.handle().runtime_flavor(), runtime.metrics().num_workers())
    }

    #[test]
    fn worker_threads_chooses_the_scheduler_and_its_threads() {
        assert_eq!(shape(1), (RuntimeFlavor::CurrentThread, 1));
        assert_eq!(shape(3), (RuntimeFlavor::MultiThread, 3));
        let (flavor, workers) = shape(0);
        assert_eq!(flavor, RuntimeFlavor::MultiThread);
        assert!(workers >= 1, "{workers}");
    }
}
