//! The push sections of the configuration (`[push]`, `[push.apns]`, `[push.fcm]`,
//! `[push.webpush]`),
//! owned here: `crate::config` reads them from the file and the environment and
//! validates them; [`super::senders_from_config`] builds the senders from them.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PushConfig {
    /// Push jobs waiting to be sent, in each provider's queue; when the queue of a
    /// provider the user's devices need is full, CreateChallenge answers
    /// RESOURCE_EXHAUSTED (the other provider's queue is not affected).
    pub queue_capacity: u32,
    /// The share of each provider's queue one tenant's pushes may fill, above 0.0 and at
    /// most 1.0 (rounded up, at least one push); past it that tenant's CreateChallenge
    /// answers RESOURCE_EXHAUSTED while the others' pushes still go in. With a single
    /// tenant it limits nothing.
    pub queue_share_per_tenant: f64,
    /// Sends in flight at once, all providers together; also each provider's pushes
    /// out of its queue at most (sending, waiting to send, backing off to retry).
    pub max_in_flight: u32,
    /// Requests to the provider per push, each an attempt (the one sent again at
    /// once with a renewed provider token too).
    pub max_attempts: u32,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub apns: Option<ApnsConfig>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fcm: Option<FcmConfig>,
    /// Web Push (`PLATFORM_WEBPUSH` devices); global only, a tenant has no section
    /// of its own (its devices subscribe with this VAPID key).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub webpush: Option<WebPushConfig>,
}

impl Default for PushConfig {
    fn default() -> Self {
        Self {
            queue_capacity: 10_000,
            queue_share_per_tenant: 0.5,
            max_in_flight: 2_000,
            max_attempts: 5,
            apns: None,
            fcm: None,
            webpush: None,
        }
    }
}

impl PushConfig {
    /// Which Web Push endpoints devices may subscribe with: the section's rules, or
    /// any public host when there is no section (such a device's pushes then fail
    /// as "not configured", as for a provider without a section).
    pub fn webpush_endpoints(&self) -> super::webpush::guard::EndpointPolicy {
        match &self.webpush {
            Some(webpush) => super::webpush::guard::EndpointPolicy {
                allowed_hosts: webpush.allowed_hosts.iter().map(|host| host.to_ascii_lowercase()).collect(),
                allow_loopback: webpush.insecure_allow_loopback,
            },
            None => super::webpush::guard::EndpointPolicy::default(),
        }
    }
}

/// `[push.webpush]`: Web Push (RFC 8030) with VAPID (RFC 8292).
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WebPushConfig {
    /// The VAPID key: PKCS#8 PEM, P-256. Its public key is what clients subscribe
    /// with (`applicationServerKey`); `pushmatch webpush-key` prints it.
    pub vapid_private_key_path: PathBuf,
    /// The operator's contact for push services, a `mailto:` or `https:` URI (the
    /// VAPID token's `sub`).
    pub subject: String,
    /// Push service hosts devices may subscribe with: `push.example.net`, or
    /// `*.example.net` for any host under it. Empty: any public host.
    #[serde(default)]
    pub allowed_hosts: Vec<String>,
    /// An extra trusted root (PEM), for a TLS-inspecting proxy or tests.
    #[serde(default)]
    pub ca_cert_path: String,
    #[serde(default = "default_provider_in_flight")]
    pub max_in_flight: u32,
    /// Sends to one push service host at once: the host is the device's choice, so
    /// one that accepts and never answers holds at most this many of
    /// `max_in_flight`; a push past it waits a second and tries again.
    #[serde(default = "default_webpush_in_flight_per_host")]
    pub max_in_flight_per_host: u32,
    /// One attempt: resolving, connecting, sending, the answer. Short, as the
    /// endpoint is the device's choice.
    #[serde(default = "default_webpush_request_timeout_ms")]
    pub request_timeout_ms: u32,
    /// Tests only: lets endpoints on loopback addresses through (a mock push service
    /// on this machine). Never in production: it opens this host's own ports to
    /// whoever enrolls a device.
    #[serde(default)]
    pub insecure_allow_loopback: bool,
}

fn default_webpush_in_flight_per_host() -> u32 {
    100
}

fn default_webpush_request_timeout_ms() -> u32 {
    5_000
}

/// A tenant's own provider credentials (`[tenants.push.apns]`, `[tenants.push.fcm]`),
/// each in place of the global section for that tenant's devices; a provider the
/// tenant leaves out uses the global section.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TenantPushConfig {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub apns: Option<ApnsConfig>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fcm: Option<FcmConfig>,
}

impl TenantPushConfig {
    pub fn is_empty(&self) -> bool {
        self.apns.is_none() && self.fcm.is_none()
    }
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ApnsConfig {
    pub team_id: String,
    pub key_id: String,
    pub private_key_path: PathBuf,
    pub topic: String,
    #[serde(default = "default_apns_endpoint")]
    pub endpoint: String,
    #[serde(default)]
    pub ca_cert_path: String,
    /// Long-lived HTTP/2 connections; pushes are multiplexed over them as streams.
    #[serde(default = "default_push_connections")]
    pub connections: u32,
    /// Sends to this provider at once. A send takes its provider's place before one
    /// of `push.max_in_flight`, so a stuck provider holds at most this many of those.
    #[serde(default = "default_provider_in_flight")]
    pub max_in_flight: u32,
    /// One attempt (connecting, sending, the answer); past it the push is retried.
    #[serde(default = "default_push_request_timeout_ms")]
    pub request_timeout_ms: u32,
}

fn default_apns_endpoint() -> String {
    "https://api.push.apple.com".into()
}

fn default_push_connections() -> u32 {
    4
}

/// A provider's sends at once when its section does not say.
pub(crate) const DEFAULT_PROVIDER_IN_FLIGHT: u32 = 1_000;

fn default_provider_in_flight() -> u32 {
    DEFAULT_PROVIDER_IN_FLIGHT
}

fn default_push_request_timeout_ms() -> u32 {
    10_000
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FcmConfig {
    pub service_account_path: PathBuf,
    #[serde(default = "default_fcm_endpoint")]
    pub endpoint: String,
    #[serde(default)]
    pub ca_cert_path: String,
    #[serde(default = "default_push_connections")]
    pub connections: u32,
    #[serde(default = "default_provider_in_flight")]
    pub max_in_flight: u32,
    #[serde(default = "default_push_request_timeout_ms")]
    pub request_timeout_ms: u32,
}

fn default_fcm_endpoint() -> String {
    "https://fcm.googleapis.com".into()
}
