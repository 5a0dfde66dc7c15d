//! Pushes to phones. [`PushSender`] is one provider (APNs, FCM); the
//! [`dispatcher::Dispatcher`] queues jobs (each tenant's within its share of the
//! queue, `shares`), sends them with bounded concurrency, retries, and reports each
//! delivery's state back through [`DeliveryReporter`].
//! `push/` never touches the store: the broker implements the reporter.
//!
//! A push carries the challenge id and its expiry, never the number; a notice of a
//! new device carries that device's id, never its display name ([`PushKind`]).
//!
//! The providers: [`apns::ApnsSender`] and [`fcm::FcmSender`], both on the shared
//! HTTP/2-over-TLS client in [`transport`]; [`routes::PushRoutes`] builds the
//! configured ones and routes each push by its tenant (a tenant's own credentials,
//! else the global section); [`senders_from_config`] builds the global ones alone.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;

use crate::domain::challenge::{ChallengeState, DeliveryState, Platform};
use crate::domain::enrollment::EnrollmentKind;
use crate::domain::ids::{ChallengeId, DeviceId, TenantId};
use crate::domain::time::{Clock, Millis};

pub mod apns;
pub mod dispatcher;
pub mod fcm;
pub mod settings;
mod shares;
pub mod transport;
pub mod webpush;

use settings::{ApnsConfig, FcmConfig, PushConfig, WebPushConfig};

pub mod routes;

#[cfg(any(test, feature = "test-util"))]
pub mod recording;

/// How long a notice stays worth delivering (APNs and FCM hold it that long for a
/// phone that is off): a phone switched off overnight still hears of the new device
/// in the morning, and one back after a week is not woken by stale news (the
/// device itself stays in the account's device list, `ListDevices`).
pub const NOTICE_LIFETIME: Duration = Duration::from_secs(24 * 60 * 60);

/// What a push is for, and what it is about.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PushKind {
    /// "Someone is signing in": the app shows the prompt.
    Challenge {
        challenge_id: ChallengeId,
        /// How many devices the challenge is pushed to: their reports are recorded
        /// as one change ([`crate::broker::DeliveryRecorder`]).
        pushes: u32,
    },
    /// The challenge resolved elsewhere: the app takes its prompt down.
    Clear { challenge_id: ChallengeId, state: ChallengeState },
    /// A notice, "a new sign-in method was added to your account", to the user's
    /// other devices when a device enrolls or a TOTP credential is confirmed, so a
    /// method an attacker added does not go unnoticed. No challenge is involved, so
    /// nothing is recorded as a delivery.
    ///
    /// It carries what pushmatch decided (the new device's id, push or TOTP, when),
    /// never the new device's display name: that is text the enrolling party chose,
    /// so in a notice meant to alarm, a name like "IT security check, no action
    /// needed" would read as ours and could talk the user out of acting; and, like a
    /// challenge's sign-in context, it has no business passing through Apple's and
    /// Google's servers.
    NewDevice { new_device_id: DeviceId, method: EnrollmentKind, enrolled_at: Millis },
}

/// The notice's `kind` in its payload, and its `kind` label in the push metrics.
pub(crate) const NOTICE_KIND: &str = "new_device";

impl PushKind {
    /// Every `kind` label, for registering the push series at start.
    pub const LABELS: &[&str] = &["challenge", "clear", NOTICE_KIND];

    /// The `kind` label of the push metrics.
    pub fn label(&self) -> &'static str {
        match self {
            Self::Challenge { .. } => "challenge",
            Self::Clear { .. } => "clear",
            Self::NewDevice { .. } => NOTICE_KIND,
        }
    }
}

/// The notice's `method`: how the new sign-in method signs in.
pub(crate) fn method_name(method: EnrollmentKind) -> &'static str {
    match method {
        EnrollmentKind::Push => "push",
        EnrollmentKind::Totp => "totp",
    }
}

/// One push to one device.
#[derive(Clone, Debug)]
pub struct PushJob {
    pub kind: PushKind,
    /// Whose user: the dispatcher counts each tenant's jobs in the queue against its
    /// share (`push.queue_share_per_tenant`).
    pub tenant: TenantId,
    /// The device pushed to.
    pub device_id: DeviceId,
    pub platform: Platform,
    pub push_token: String,
    /// When the push stops being worth delivering (the challenge's expiry; for a
    /// notice, [`NOTICE_LIFETIME`] after the enrollment): the provider may drop the
    /// push after it, and the dispatcher stops retrying before it.
    pub expires_at: Millis,
}

impl PushJob {
    /// The challenge the push is about; `None` for a notice.
    pub fn challenge_id(&self) -> Option<&ChallengeId> {
        match &self.kind {
            PushKind::Challenge { challenge_id, .. } | PushKind::Clear { challenge_id, .. } => Some(challenge_id),
            PushKind::NewDevice { .. } => None,
        }
    }
}

/// What one attempt to send came to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SendOutcome {
    Sent,
    /// The token is dead: turn pushes off for the device.
    Unregistered {
        reason: String,
    },
    /// Worth another try (429, 5xx, timeouts), after `after` if the provider said.
    Retry {
        reason: String,
        after: Option<Duration>,
    },
    /// No point in trying again.
    Failed {
        reason: String,
    },
    /// The provider refused our credentials (APNs 403 `ExpiredProviderToken`, an FCM
    /// 401) and the sender dropped them, so the next request carries new ones: the
    /// dispatcher sends again at once, once per push (a renewed token refused as
    /// well fails the push with `reason`). Each request is an attempt.
    TokenRefused {
        reason: String,
    },
}

impl SendOutcome {
    /// Every `outcome` label of `pushmatch_push_sends_total`.
    pub const LABELS: &[&str] = &["sent", "unregistered", "retry", "failed", "token_refused"];

    /// The `outcome` label of `pushmatch_push_sends_total`.
    pub fn label(&self) -> &'static str {
        match self {
            Self::Sent => "sent",
            Self::Unregistered { .. } => "unregistered",
            Self::Retry { .. } => "retry",
            Self::Failed { .. } => "failed",
            Self::TokenRefused { .. } => "token_refused",
        }
    }
}

/// One push provider.
#[async_trait]
pub trait PushSender: Send + Sync + 'static {
    fn platform(&self) -> Platform;
    /// At most this many sends to the provider at once (the dispatcher enforces it).
    fn max_in_flight(&self) -> Option<usize> {
        None
    }
    /// Whether it has credentials for `tenant`'s pushes; the dispatcher records a
    /// push of a tenant it does not serve as FAILED / "not configured" without
    /// sending it.
    fn serves(&self, _tenant: &TenantId) -> bool {
        true
    }
    async fn send(&self, job: &PushJob) -> SendOutcome;
}

/// Where the dispatcher reports each delivery's progress.
#[async_trait]
pub trait DeliveryReporter: Send + Sync + 'static {
    async fn report(&self, job: &PushJob, state: DeliveryState, attempts: u32, error: &str);
}

/// A push token in logs: the first six characters only, enough to tell tokens apart
/// when debugging, too few to push to.
pub fn redact_token(token: &str) -> String {
    let prefix: String = token.chars().take(6).collect();
    format!("{prefix}…")
}

/// A provider's reason code ("BadDeviceToken", "UNREGISTERED") when it looks like
/// one: a short word of letters, digits and underscores. Anything else the provider
/// says stays out of deliveries (and so out of gRPC answers).
pub(crate) fn provider_reason(raw: &str) -> Option<String> {
    let plain = !raw.is_empty() && raw.len() <= 64 && raw.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_');
    plain.then(|| raw.to_owned())
}

/// A configured provider that cannot start. The message names the file or key.
#[derive(Debug, thiserror::Error)]
pub enum PushSetupError {
    #[error("{path}: {message}")]
    File { path: String, message: String },
    #[error("{key}: {message}")]
    Invalid { key: String, message: String },
    #[error(transparent)]
    Transport(#[from] transport::TransportSetupError),
}

impl PushSetupError {
    /// The error of a tenant's own section: it names the tenant.
    fn of_tenant(self, tenant: &TenantId) -> Self {
        match self {
            Self::File { path, message } => Self::File { path, message: format!("{message} (tenant {:?})", tenant.0) },
            Self::Invalid { key, message } => Self::Invalid { key, message: format!("tenant {:?}: {message}", tenant.0) },
            Self::Transport(error) => {
                Self::Invalid { key: "tenants.push".into(), message: format!("tenant {:?}: {error}", tenant.0) }
            }
        }
    }
}

/// The senders of the providers that have a `[push.*]` section. Reads the key files
/// and the CA files now, so a missing or malformed one stops `serve` before it
/// listens. `clock` is the domain's (FCM's `ttl` is the time left on it).
pub async fn senders_from_config(config: &PushConfig, clock: Arc<dyn Clock>) -> Result<Vec<Arc<dyn PushSender>>, PushSetupError> {
    let mut senders: Vec<Arc<dyn PushSender>> = Vec::new();
    if let Some(apns) = &config.apns {
        senders.push(Arc::new(apns_sender(apns, "push").await?));
    }
    if let Some(fcm) = &config.fcm {
        senders.push(Arc::new(fcm_sender(fcm, Arc::clone(&clock)).await?));
    }
    if let Some(webpush) = &config.webpush {
        senders.push(Arc::new(webpush_sender(config, webpush, clock).await?));
    }
    Ok(senders)
}

/// The Web Push sender of `[push.webpush]`.
pub async fn webpush_sender(
    push: &PushConfig,
    config: &WebPushConfig,
    clock: Arc<dyn Clock>,
) -> Result<webpush::WebPushSender, PushSetupError> {
    let path = &config.vapid_private_key_path;
    let pem = read_file(path).await?;
    let pem = String::from_utf8(pem)
        .map_err(|_| PushSetupError::File { path: path.display().to_string(), message: "not a PEM file".into() })?;
    let vapid = webpush::vapid::VapidKeys::from_pkcs8_pem(&pem, &config.subject)
        .map_err(|message| PushSetupError::File { path: path.display().to_string(), message })?;
    // No ALPN here: the connector offers http/1.1 itself.
    let tls = tls_for(&config.ca_cert_path, &[]).await?;
    let timeout = Duration::from_millis(u64::from(config.request_timeout_ms.max(1)));
    if config.insecure_allow_loopback {
        tracing::warn!("push.webpush.insecure_allow_loopback is on: devices may make pushmatch send to this host's own ports");
    }
    tracing::info!(public_key = vapid.public_key(), allowed_hosts = ?config.allowed_hosts, "web push sender ready");
    Ok(webpush::WebPushSender::new(
        vapid,
        push.webpush_endpoints(),
        tls,
        clock,
        timeout,
        config.max_in_flight as usize,
        config.max_in_flight_per_host as usize,
    ))
}

async fn read_file(path: &Path) -> Result<Vec<u8>, PushSetupError> {
    tokio::fs::read(path)
        .await
        .map_err(|e| PushSetupError::File { path: path.display().to_string(), message: format!("cannot read it: {e}") })
}

async fn tls_for(ca_cert_path: &str, alpn: &[&[u8]]) -> Result<Arc<rustls::ClientConfig>, PushSetupError> {
    if ca_cert_path.is_empty() {
        return Ok(transport::client_tls_config(None, alpn)?);
    }
    let pem = read_file(Path::new(ca_cert_path)).await?;
    Ok(transport::client_tls_config(Some((ca_cert_path, &pem)), alpn)?)
}

fn pool_settings(endpoint: &str, connections: u32, request_timeout_ms: u32) -> transport::PoolSettings {
    transport::PoolSettings {
        endpoint: endpoint.to_owned(),
        connections: connections.max(1) as usize,
        request_timeout: Duration::from_millis(u64::from(request_timeout_ms.max(1))),
    }
}

/// The `apns-topic` header of a bundle id; `scope` is where the section is
/// (`push`, or `tenants.push` with the tenant), for the error.
fn topic_header(topic: &str, scope: &str) -> Result<http::HeaderValue, PushSetupError> {
    http::HeaderValue::from_str(topic)
        .ok()
        .filter(|_| !topic.is_empty())
        .ok_or_else(|| PushSetupError::Invalid { key: format!("{scope}.apns.topic"), message: "must be a bundle id".into() })
}

/// An APNs sender for the section at `scope` (`push`, or `tenants.push` with the
/// tenant: the errors name it).
async fn apns_sender(config: &ApnsConfig, scope: &str) -> Result<apns::ApnsSender, PushSetupError> {
    let path = &config.private_key_path;
    let pem = read_file(path).await?;
    let pem = String::from_utf8(pem)
        .map_err(|_| PushSetupError::File { path: path.display().to_string(), message: "not a PEM file".into() })?;
    let tokens = apns::ProviderTokens::from_pkcs8_pem(&config.key_id, &config.team_id, &pem).map_err(|e| match e {
        apns::ProviderKeyError::Field(field) => PushSetupError::Invalid {
            key: format!("{scope}.apns.{}", if field == "key_id" { "key_id" } else { "team_id" }),
            message: "must be printable ASCII".into(),
        },
        apns::ProviderKeyError::Key(_) => PushSetupError::File { path: path.display().to_string(), message: e.to_string() },
    })?;
    let topic = topic_header(&config.topic, scope)?;
    let tls = tls_for(&config.ca_cert_path, &[b"h2"]).await?;
    let pool =
        transport::ConnectionPool::new(&pool_settings(&config.endpoint, config.connections, config.request_timeout_ms), tls)?;
    tracing::info!(endpoint = %config.endpoint, connections = config.connections, "apns sender ready");
    Ok(apns::ApnsSender::new(pool, topic, tokens, config.max_in_flight as usize))
}

async fn fcm_sender(config: &FcmConfig, clock: Arc<dyn Clock>) -> Result<fcm::FcmSender, PushSetupError> {
    let path = &config.service_account_path;
    let json = read_file(path).await?;
    let account = fcm::ServiceAccount::from_json(&json)
        .map_err(|message| PushSetupError::File { path: path.display().to_string(), message })?;
    let tls = tls_for(&config.ca_cert_path, &[b"h2"]).await?;
    let grant_tls = tls_for(&config.ca_cert_path, &[b"http/1.1"]).await?;
    let pool =
        transport::ConnectionPool::new(&pool_settings(&config.endpoint, config.connections, config.request_timeout_ms), tls)?;
    let timeout = Duration::from_millis(u64::from(config.request_timeout_ms.max(1)));
    tracing::info!(endpoint = %config.endpoint, project_id = %account.project_id, connections = config.connections, "fcm sender ready");
    let tokens = fcm::AccessTokens::new(account, tokio_rustls::TlsConnector::from(grant_tls), timeout);
    Ok(fcm::FcmSender::new(pool, tokens, clock, config.max_in_flight as usize))
}

#[cfg(test)]
mod tests {
    #[test]
    fn provider_reasons_are_plain_words() {
        assert_eq!(super::provider_reason("BadDeviceToken").as_deref(), Some("BadDeviceToken"));
        assert_eq!(super::provider_reason("SENDER_ID_MISMATCH").as_deref(), Some("SENDER_ID_MISMATCH"));
        assert_eq!(super::provider_reason("Requested entity was not found."), None);
        assert_eq!(super::provider_reason(""), None);
    }

    #[test]
    fn tokens_are_redacted() {
        let token = "a3f9c2e1d4b5a6978812ab34cd56ef78a3f9c2e1d4b5a6978812ab34cd56ef78";
        let shown = super::redact_token(token);
        assert!(shown.starts_with("a3f9c2"));
        assert!(!shown.contains(&token[6..20]));
    }
}
