//! Configuration: defaults, then the TOML file, then `PUSHMATCH_*` environment
//! variables (`PUSHMATCH_` + the key's path in capitals joined by `__`, e.g.
//! `PUSHMATCH_SERVER__LISTEN=0.0.0.0:50051`). Everything is validated before a port
//! opens. The environment is passed in, so tests need no process globals.
//! `validate` holds the checks, `settings` the translation into each module's
//! settings.
//!
//! The layering is written here by hand (about fifty lines over `toml::Value`)
//! rather than with figment or config-rs: those read the process environment
//! themselves, and we want the environment as an argument.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

pub use crate::push::settings::{ApnsConfig, FcmConfig, PushConfig, TenantPushConfig};
pub use crate::telemetry::{LogConfig, LogFormat, TracingConfig};

mod settings;
mod validate;

/// The environment variable that names the configuration file.
pub const CONFIG_FILE_VAR: &str = "PUSHMATCH_CONFIG";
const ENV_PREFIX: &str = "PUSHMATCH_";

/// The development tenant's API key, used only when no configuration file exists.
/// It is public (documented in the README): never run like that in production.
pub const DEVELOPMENT_API_KEY: &str = "pushmatch-dev-key";
pub const DEVELOPMENT_TENANT: &str = "dev";

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    pub server: ServerConfig,
    pub store: StoreConfig,
    pub challenge: ChallengeConfig,
    pub limits: LimitsConfig,
    pub enrollment: EnrollmentConfig,
    pub device: DeviceConfig,
    pub push: PushConfig,
    pub log: LogConfig,
    pub tracing: TracingConfig,
    pub secrets: SecretsConfig,
    pub tenants: Vec<TenantConfig>,
}

/// The key that seals TOTP secrets at rest (AES-256-GCM).
#[derive(Clone, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SecretsConfig {
    /// 64 hex digits. Empty: the key file is used.
    pub key_hex: String,
    /// Read, or created with mode 0600 on the first start. Empty: `<store.path>/secret.key`.
    pub key_file: String,
}

impl std::fmt::Debug for SecretsConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SecretsConfig")
            .field("key_hex", &if self.key_hex.is_empty() { "" } else { "<redacted>" })
            .field("key_file", &self.key_file)
            .finish()
    }
}

impl SecretsConfig {
    pub fn key_file_path(&self, store_path: &Path) -> PathBuf {
        if self.key_file.is_empty() { store_path.join("secret.key") } else { PathBuf::from(&self.key_file) }
    }
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ServerConfig {
    /// gRPC listen address.
    pub listen: String,
    /// Where enrollment QR codes send apps.
    pub public_url: String,
    /// `/metrics` and `/healthz`; "" turns it off.
    pub metrics_listen: String,
    /// PEM certificate chain and private key: serve gRPC over TLS (reloaded on
    /// SIGHUP and when the files change).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tls_cert_path: Option<PathBuf>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tls_key_path: Option<PathBuf>,
    /// PEM CA certificates: ChallengeService and EnrollmentService then require a
    /// client certificate issued by them (mutual TLS); DeviceService does not.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tls_client_ca_path: Option<PathBuf>,
    /// How often the TLS files are checked for changes; 0: on SIGHUP only.
    pub tls_reload_interval_seconds: u32,
    /// How often the configuration file (and the tenants' key files) is checked for
    /// changes; a change reloads the tenants. 0: on SIGHUP only.
    pub config_reload_interval_seconds: u32,
    /// Connections older than this are asked to go away (HTTP/2 GOAWAY) so that
    /// clients reconnect and spread over new replicas; 0: never.
    pub max_connection_age_seconds: u32,
    /// After the GOAWAY, how long calls (watch streams) may still run before the
    /// connection is closed; 0: until they end.
    pub max_connection_age_grace_seconds: u32,
    /// Concurrent requests per HTTP/2 connection (past it, calls wait their turn).
    pub max_concurrent_requests_per_connection: u32,
    /// CreateChallenge calls this replica works on at once; past it a call is refused
    /// at once with RESOURCE_EXHAUSTED instead of queueing (load shedding in a burst).
    pub max_creates_in_flight: u32,
    /// The share of `max_creates_in_flight` one tenant may hold, above 0.0 and at most
    /// 1.0 (rounded up, at least one call); past it that tenant is refused at once
    /// while the others still get the rest. With a single tenant it limits nothing.
    pub creates_share_per_tenant: f64,
    /// Deadline for a unary call (watch streams are not bound by it).
    pub request_timeout_seconds: u32,
    /// How long shutdown waits for calls to finish.
    pub shutdown_grace_seconds: u32,
    /// The threads that run the broker (read at start, not on reload). 0: tokio's
    /// multi-threaded scheduler with one worker per CPU (`TOKIO_WORKER_THREADS`
    /// overrides the count); 1: everything on one thread (tokio's current-thread
    /// scheduler), which spends less CPU per sign-in by not waking other threads
    /// but uses one core at most; N: N worker threads (at most 1,024).
    pub worker_threads: u16,
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            listen: "127.0.0.1:50051".into(),
            public_url: "http://127.0.0.1:50051".into(),
            metrics_listen: "127.0.0.1:9464".into(),
            tls_cert_path: None,
            tls_key_path: None,
            tls_client_ca_path: None,
            tls_reload_interval_seconds: 30,
            config_reload_interval_seconds: 30,
            max_connection_age_seconds: 0,
            max_connection_age_grace_seconds: 0,
            max_concurrent_requests_per_connection: 256,
            max_creates_in_flight: 256,
            creates_share_per_tenant: 0.5,
            request_timeout_seconds: 30,
            shutdown_grace_seconds: 10,
            worker_threads: 0,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum StoreBackend {
    Embedded,
    Redis,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct StoreConfig {
    pub backend: StoreBackend,
    /// Embedded: the folder that holds the durable file.
    pub path: PathBuf,
    pub redis_url: String,
    /// Seed nodes of a Redis Cluster; when given, `redis_url` is not used.
    pub redis_cluster_urls: Vec<String>,
    /// Redis Sentinel (then neither URL above is used) and its master's name.
    pub redis_sentinel_urls: Vec<String>,
    pub redis_sentinel_master: String,
    /// TLS (rediss://): the PEM CA(s) of the servers; "": the webpki roots.
    pub redis_ca_cert_path: String,
    /// ACL user, and a file holding its password; "": the URL's.
    pub redis_username: String,
    pub redis_password_file: String,
    /// Replicas that must hold each write (`WAIT`) before it is acknowledged, and
    /// how long a write waits for them (then UNAVAILABLE); 0: none.
    pub redis_wait_replicas: u32,
    pub redis_wait_timeout_ms: u32,
    /// The deadline of one Redis call; past it the request fails with UNAVAILABLE.
    pub operation_timeout_ms: u32,
}

impl Default for StoreConfig {
    fn default() -> Self {
        Self {
            backend: StoreBackend::Embedded,
            path: "./pushmatch-data".into(),
            redis_url: "redis://127.0.0.1:6379".into(),
            redis_cluster_urls: Vec::new(),
            redis_sentinel_urls: Vec::new(),
            redis_sentinel_master: String::new(),
            redis_ca_cert_path: String::new(),
            redis_username: String::new(),
            redis_password_file: String::new(),
            redis_wait_replicas: 0,
            redis_wait_timeout_ms: 500,
            operation_timeout_ms: 2_000,
        }
    }
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ChallengeConfig {
    pub default_ttl_seconds: u32,
    pub max_ttl_seconds: u32,
    /// How long after its expiry an approved or fraud-reported challenge stays
    /// readable. One that ended otherwise (cancelled, expired, denied) stays at
    /// least `limits.fraud_report_window_seconds` after its expiry, so that a fraud
    /// report on it can still count.
    pub retention_seconds: u32,
}

impl Default for ChallengeConfig {
    fn default() -> Self {
        Self { default_ttl_seconds: 60, max_ttl_seconds: 300, retention_seconds: 300 }
    }
}

/// Per-user limits against push bombing and number guessing.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LimitsConfig {
    pub max_pending_per_user: u32,
    pub max_challenges_per_window: u32,
    pub challenge_window_seconds: u32,
    pub wrong_number_limit: u32,
    pub wrong_number_window_seconds: u32,
    pub wrong_number_block_seconds: u32,
    /// Wrong TOTP codes in the window that lock VerifyTotp for the user.
    pub totp_failure_limit: u32,
    pub totp_failure_window_seconds: u32,
    pub totp_lockout_seconds: u32,
    /// Wrong TOTP codes since the last right one that lock VerifyTotp until
    /// UnblockUser (NIST SP 800-63B: at most 100).
    pub totp_max_consecutive_failures: u32,
    /// Devices and TOTP credentials per user.
    pub max_devices_per_user: u32,
    /// Enrollments begun, not completed and not expired, per user.
    pub max_open_enrollments_per_user: u32,
    /// How long after a challenge ended (cancelled, expired, denied) a signed fraud
    /// report on it still blocks the user; challenges are retained at least as long.
    pub fraud_report_window_seconds: u32,
}

impl Default for LimitsConfig {
    fn default() -> Self {
        Self {
            max_pending_per_user: 3,
            max_challenges_per_window: 10,
            challenge_window_seconds: 600,
            wrong_number_limit: 3,
            wrong_number_window_seconds: 900,
            wrong_number_block_seconds: 900,
            totp_failure_limit: 5,
            totp_failure_window_seconds: 300,
            totp_lockout_seconds: 300,
            totp_max_consecutive_failures: 20,
            max_devices_per_user: 10,
            max_open_enrollments_per_user: 5,
            fraud_report_window_seconds: 900,
        }
    }
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct EnrollmentConfig {
    /// How long an enrollment QR code stays valid.
    pub code_ttl_seconds: u32,
}

impl Default for EnrollmentConfig {
    fn default() -> Self {
        Self { code_ttl_seconds: 600 }
    }
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DeviceConfig {
    /// How far a proof's timestamp may be from the server's clock. Each proof works
    /// once; the store remembers used ones this long, either side.
    pub max_clock_skew_seconds: u32,
}

impl Default for DeviceConfig {
    fn default() -> Self {
        Self { max_clock_skew_seconds: 120 }
    }
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TenantConfig {
    pub id: String,
    pub display_name: String,
    /// Hex SHA-256 digests of the tenant's API keys (`pushmatch hash-key` makes them).
    /// Several allow rotation without downtime.
    #[serde(default)]
    pub api_key_sha256: Vec<String>,
    /// A file of more digests, one a line (`#` comments and blank lines skipped):
    /// a secret the operator mounts, so no key ships in a configuration file. Read
    /// when the configuration loads.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub api_key_sha256_file: Option<PathBuf>,
    /// This tenant's own limits (`[tenants.limits]`); each left out is the global one.
    #[serde(default, skip_serializing_if = "TenantLimitsConfig::is_empty")]
    pub limits: TenantLimitsConfig,
    /// This tenant's own push credentials (`[tenants.push.apns]`, `[tenants.push.fcm]`);
    /// a provider left out uses the global `[push.*]` section.
    #[serde(default, skip_serializing_if = "TenantPushConfig::is_empty")]
    pub push: TenantPushConfig,
}

/// The limits one tenant may set for itself, each overriding the global key of
/// the same name (`challenge.*_ttl_seconds`, `limits.*`). A tenant's TTLs may only be
/// shorter than the global maximum: stores keep challenges by the global one.
/// `creates_share` and `push_queue_share` are the tenant's part of
/// `server.max_creates_in_flight` and of each push queue, in place of
/// `server.creates_share_per_tenant` and `push.queue_share_per_tenant`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TenantLimitsConfig {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub default_ttl_seconds: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_ttl_seconds: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_pending_per_user: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_challenges_per_window: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub challenge_window_seconds: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_devices_per_user: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_open_enrollments_per_user: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub creates_share: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub push_queue_share: Option<f64>,
}

impl TenantLimitsConfig {
    pub fn is_empty(&self) -> bool {
        *self == Self::default()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read the configuration file {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("{origin}: {message}")]
    Parse { origin: String, message: String },
    #[error("{key}: {message}")]
    Invalid { key: &'static str, message: String },
}

fn invalid(key: &'static str, message: impl Into<String>) -> ConfigError {
    ConfigError::Invalid { key, message: message.into() }
}

/// A loaded, validated configuration.
#[derive(Clone, Debug)]
pub struct LoadedConfig {
    pub config: Config,
    /// No file was given: the development tenant is in use.
    pub development: bool,
}

impl Config {
    /// Layers defaults, the file (if any) and the `PUSHMATCH_*` entries of `env`, then
    /// validates. With no file and no tenants, adds the development tenant.
    pub fn load(file: Option<&Path>, env: impl IntoIterator<Item = (String, String)>) -> Result<LoadedConfig, ConfigError> {
        let file = match file {
            Some(path) => Some((
                path.display().to_string(),
                std::fs::read_to_string(path).map_err(|source| ConfigError::Read { path: path.to_owned(), source })?,
            )),
            None => None,
        };
        Self::load_text(file.as_ref().map(|(origin, text)| (origin.as_str(), text.as_str())), env)
    }

    /// [`Config::load`] with the file already read: its name (for messages) and its
    /// text. The `config` fuzz target calls it with arbitrary text and variables.
    pub fn load_text(
        file: Option<(&str, &str)>,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<LoadedConfig, ConfigError> {
        let mut merged = toml::Value::try_from(Config::default())
            .map_err(|e| ConfigError::Parse { origin: "defaults".into(), message: e.to_string() })?;
        if let Some((origin, text)) = file {
            let table: toml::Table =
                toml::from_str(text).map_err(|e| ConfigError::Parse { origin: origin.to_owned(), message: e.to_string() })?;
            merge(&mut merged, toml::Value::Table(table));
        }
        let mut env: Vec<(String, String)> =
            env.into_iter().filter(|(key, _)| key.starts_with(ENV_PREFIX) && key != CONFIG_FILE_VAR).collect();
        env.sort();
        for (key, value) in env {
            let path: Vec<String> = key[ENV_PREFIX.len()..].split("__").map(str::to_lowercase).collect();
            set_path(&mut merged, &path, &value).map_err(|message| ConfigError::Parse { origin: key.clone(), message })?;
        }
        let mut config: Config = serde_path_to_error::deserialize(merged)
            .map_err(|e| ConfigError::Parse { origin: e.path().to_string(), message: e.into_inner().message().to_owned() })?;
        let development = file.is_none();
        if development && config.tenants.is_empty() {
            config.tenants.push(TenantConfig {
                id: DEVELOPMENT_TENANT.into(),
                display_name: "pushmatch (development)".into(),
                api_key_sha256: vec![crate::domain::api_key::api_key_digest_hex(DEVELOPMENT_API_KEY)],
                api_key_sha256_file: None,
                limits: TenantLimitsConfig::default(),
                push: TenantPushConfig::default(),
            });
        }
        for tenant in &mut config.tenants {
            read_key_digests(tenant)?;
        }
        config.validate()?;
        if development {
            config.refuse_development_off_loopback()?;
        }
        Ok(LoadedConfig { config, development })
    }

    /// Development mode serves a tenant whose API key is public (the README's): with
    /// it, anyone who reaches the port can enroll a phone for any user and approve.
    /// So it listens on loopback addresses only, and refuses to start otherwise.
    fn refuse_development_off_loopback(&self) -> Result<(), ConfigError> {
        for (key, addr) in [("server.listen", &self.server.listen), ("server.metrics_listen", &self.server.metrics_listen)] {
            let loopback = addr.is_empty() || addr.parse::<SocketAddr>().is_ok_and(|addr| addr.ip().is_loopback());
            if !loopback {
                return Err(invalid(
                    key,
                    format!(
                        "{addr} is not a loopback address, and without a configuration file pushmatch runs in development \
                         mode with a public API key: it listens on 127.0.0.1 or ::1 only. To serve the network, write a \
                         configuration file with your own [[tenants]] (`pushmatch hash-key --generate` makes a key) and \
                         pass it with --config or {CONFIG_FILE_VAR}"
                    ),
                ));
            }
        }
        Ok(())
    }

    pub fn listen_addr(&self) -> Result<SocketAddr, ConfigError> {
        self.server.listen.parse().map_err(|e| invalid("server.listen", format!("not an address: {e}")))
    }
}

/// Deep-merges `overlay` into `base`: tables merge key by key, anything else replaces.
fn merge(base: &mut toml::Value, overlay: toml::Value) {
    match (base, overlay) {
        (toml::Value::Table(base), toml::Value::Table(overlay)) => {
            for (key, value) in overlay {
                match base.get_mut(&key) {
                    Some(existing) => merge(existing, value),
                    None => {
                        base.insert(key, value);
                    }
                }
            }
        }
        (base, overlay) => *base = overlay,
    }
}

/// Sets `path` to `raw`. Where the key holds a string already, `raw` stays a string;
/// elsewhere it is read as a TOML value (numbers, booleans, arrays, inline tables)
/// and falls back to a string.
/// Adds the digests in the tenant's `api_key_sha256_file`, if it names one.
fn read_key_digests(tenant: &mut TenantConfig) -> Result<(), ConfigError> {
    let Some(path) = &tenant.api_key_sha256_file else { return Ok(()) };
    let text = std::fs::read_to_string(path).map_err(|error| {
        invalid("tenants.api_key_sha256_file", format!("tenant {:?}: cannot read {}: {error}", tenant.id, path.display()))
    })?;
    let digests = text.lines().map(str::trim).filter(|line| !line.is_empty() && !line.starts_with('#')).map(str::to_owned);
    tenant.api_key_sha256.extend(digests);
    Ok(())
}

fn set_path(root: &mut toml::Value, path: &[String], raw: &str) -> Result<(), String> {
    let Some((last, parents)) = path.split_last() else { return Err("empty key".into()) };
    let mut node = root;
    for key in parents {
        let toml::Value::Table(table) = node else { return Err(format!("{key} is not a table")) };
        node = table.entry(key.clone()).or_insert_with(|| toml::Value::Table(toml::Table::new()));
    }
    let toml::Value::Table(table) = node else { return Err(format!("{last} is not inside a table")) };
    let value = match table.get(last) {
        Some(toml::Value::String(_)) => toml::Value::String(raw.to_owned()),
        _ => toml::from_str::<toml::Table>(&format!("v = {raw}"))
            .ok()
            .and_then(|mut parsed| parsed.remove("v"))
            .unwrap_or_else(|| toml::Value::String(raw.to_owned())),
    };
    table.insert(last.clone(), value);
    Ok(())
}

#[cfg(test)]
mod tests;
