//! `run(listener, config, shutdown)`: builds the broker over its store and
//! dispatcher, serves the three services plus health and reflection on `listener`,
//! and drains when `shutdown` resolves: health turns NOT_SERVING, watch streams end
//! with UNAVAILABLE, in-flight calls finish (up to the grace period).
//!
//! Tests call [`run_with`] on a port-0 listener with their own clock and fake push
//! senders.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio_stream::wrappers::TcpListenerStream;
use tokio_util::sync::CancellationToken;
use tonic::transport::Server;
use tonic_health::ServingStatus;

use crate::api::auth::TenantKeys;
use crate::api::challenges::ChallengeApi;
use crate::api::devices::DeviceApi;
use crate::api::enrollments::EnrollmentApi;
use crate::config::Config;
use crate::domain::broker::{Broker, DeliveryRecorder};
use crate::domain::secrets::SecretBox;
use crate::domain::time::{Clock, SystemClock};
use crate::pb;
use crate::pb::challenge_service_server::ChallengeServiceServer;
use crate::pb::device_service_server::DeviceServiceServer;
use crate::pb::enrollment_service_server::EnrollmentServiceServer;
use crate::push::PushSender;
use crate::push::dispatcher::{Dispatcher, DispatcherCounters};
use crate::store::Store;
use crate::store::embedded::EmbeddedStore;

/// The largest request the server decodes (API.md: 64 KiB); larger ones are refused
/// with OUT_OF_RANGE and the connection carries on.
pub const MAX_MESSAGE_BYTES: usize = 64 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("cannot open the store: {0}")]
    Store(#[from] crate::store::StoreError),
    #[error("cannot build server reflection: {0}")]
    Reflection(#[from] tonic_reflection::server::Error),
    #[error("the gRPC server failed: {0}")]
    Transport(#[from] tonic::transport::Error),
    #[error("secret key {path}: {message}")]
    SecretKey { path: String, message: String },
}

/// What the server is built from besides its configuration.
pub struct Dependencies {
    pub clock: Arc<dyn Clock>,
    pub push_senders: Vec<Arc<dyn PushSender>>,
    /// The dispatcher's counters, shared so tests and metrics can read them.
    pub push_counters: Arc<DispatcherCounters>,
}

impl Default for Dependencies {
    /// The system clock and no push providers (deliveries read FAILED / "not configured").
    fn default() -> Self {
        Self { clock: Arc::new(SystemClock), push_senders: Vec::new(), push_counters: Arc::default() }
    }
}

/// Serves until `shutdown` resolves, with the real clock and the configured providers.
pub async fn run(
    listener: TcpListener,
    config: Config,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), ServerError> {
    run_with(listener, config, Dependencies::default(), shutdown).await
}

pub async fn run_with(
    listener: TcpListener,
    config: Config,
    dependencies: Dependencies,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), ServerError> {
    let Dependencies { clock, push_senders, push_counters } = dependencies;
    let draining = CancellationToken::new();

    let store: Arc<dyn Store> = Arc::new(EmbeddedStore::open(&config.store.path, Arc::clone(&clock)).await?);
    tracing::info!(backend = store.backend(), path = %config.store.path.display(), "store open");

    let dispatcher = Dispatcher::start(
        push_senders,
        Arc::new(DeliveryRecorder::new(Arc::clone(&store))),
        Arc::clone(&clock),
        config.dispatcher_settings(),
        push_counters,
        draining.child_token(),
    );
    let secrets = SecretBox::new(&load_secret_key(&config).await?);
    let broker = Arc::new(Broker::new(store, dispatcher, clock, config.broker_settings(), config.domain_tenants(), secrets));
    let keys = Arc::new(TenantKeys::from_config(&config));

    let (health, health_service) = tonic_health::server::health_reporter();
    health.set_serving::<ChallengeServiceServer<ChallengeApi>>().await;
    health.set_serving::<EnrollmentServiceServer<EnrollmentApi>>().await;
    health.set_serving::<DeviceServiceServer<DeviceApi>>().await;
    health.set_service_status("", ServingStatus::Serving).await;

    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(pb::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()?;

    let challenges = ChallengeServiceServer::new(ChallengeApi::new(Arc::clone(&broker), Arc::clone(&keys), draining.clone()))
        .max_decoding_message_size(MAX_MESSAGE_BYTES);
    let enrollments =
        EnrollmentServiceServer::new(EnrollmentApi::new(Arc::clone(&broker), keys)).max_decoding_message_size(MAX_MESSAGE_BYTES);
    let devices = DeviceServiceServer::new(DeviceApi::new(broker)).max_decoding_message_size(MAX_MESSAGE_BYTES);

    let grace = Duration::from_secs(u64::from(config.server.shutdown_grace_seconds));
    let signal = {
        let draining = draining.clone();
        let health = health.clone();
        async move {
            shutdown.await;
            tracing::info!("shutting down: draining calls");
            health.set_service_status("", ServingStatus::NotServing).await;
            health.set_not_serving::<ChallengeServiceServer<ChallengeApi>>().await;
            health.set_not_serving::<EnrollmentServiceServer<EnrollmentApi>>().await;
            health.set_not_serving::<DeviceServiceServer<DeviceApi>>().await;
            draining.cancel();
        }
    };

    tracing::info!(addr = ?listener.local_addr().ok(), "serving gRPC");
    let serve = Server::builder()
        .timeout(Duration::from_secs(u64::from(config.server.request_timeout_seconds)))
        .concurrency_limit_per_connection(config.server.max_concurrent_requests_per_connection as usize)
        .http2_keepalive_interval(Some(Duration::from_secs(30)))
        .http2_keepalive_timeout(Some(Duration::from_secs(10)))
        .tcp_nodelay(true)
        .add_service(health_service)
        .add_service(reflection)
        .add_service(challenges)
        .add_service(enrollments)
        .add_service(devices)
        .serve_with_incoming_shutdown(TcpListenerStream::new(listener), signal);

    let grace_elapsed = async {
        draining.cancelled().await;
        tokio::time::sleep(grace).await;
    };
    tokio::select! {
        result = serve => result?,
        () = grace_elapsed => tracing::warn!(grace_seconds = grace.as_secs(), "calls still open after the grace period; closing"),
    }
    tracing::info!("stopped");
    Ok(())
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
