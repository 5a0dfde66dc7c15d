//! Validation: every section checked before a port opens; the error names the
//! first key at fault (`server.listen: not an address: ...`).

use std::collections::HashSet;
use std::net::SocketAddr;

use super::{Config, ConfigError, StoreBackend, invalid};

/// The most worker threads `server.worker_threads` asks for: far past any CPU count
/// the broker meets, and short of an operator's typo spawning tens of thousands.
const MAX_WORKER_THREADS: u16 = 1_024;

impl Config {
    /// Checks every section; the error names the first key at fault.
    pub fn validate(&self) -> Result<(), ConfigError> {
        self.validate_server()?;
        self.validate_tracing()?;
        self.validate_store()?;
        self.validate_limits()?;
        self.validate_tenants()
    }

    fn validate_server(&self) -> Result<(), ConfigError> {
        self.server.listen.parse::<SocketAddr>().map_err(|e| invalid("server.listen", format!("not an address: {e}")))?;
        if !(self.server.public_url.starts_with("http://") || self.server.public_url.starts_with("https://")) {
            return Err(invalid("server.public_url", "must start with http:// or https://"));
        }
        if !self.server.metrics_listen.is_empty() {
            self.server
                .metrics_listen
                .parse::<SocketAddr>()
                .map_err(|e| invalid("server.metrics_listen", format!("not an address: {e}")))?;
        }
        match (&self.server.tls_cert_path, &self.server.tls_key_path) {
            (Some(_), None) => return Err(invalid("server.tls_key_path", "is required with server.tls_cert_path")),
            (None, Some(_)) => return Err(invalid("server.tls_cert_path", "is required with server.tls_key_path")),
            _ => {}
        }
        if self.server.tls_client_ca_path.is_some() && self.server.tls_cert_path.is_none() {
            return Err(invalid("server.tls_client_ca_path", "mutual TLS needs TLS: set server.tls_cert_path and tls_key_path"));
        }
        if self.server.max_concurrent_requests_per_connection == 0 {
            return Err(invalid("server.max_concurrent_requests_per_connection", "must be at least 1"));
        }
        if self.server.max_creates_in_flight == 0 {
            return Err(invalid("server.max_creates_in_flight", "must be at least 1"));
        }
        check_share("server.creates_share_per_tenant", self.server.creates_share_per_tenant, "server.max_creates_in_flight")?;
        if self.server.request_timeout_seconds == 0 {
            return Err(invalid("server.request_timeout_seconds", "must be at least 1"));
        }
        if self.server.worker_threads > MAX_WORKER_THREADS {
            return Err(invalid("server.worker_threads", format!("must be at most {MAX_WORKER_THREADS} (0: one per CPU)")));
        }
        Ok(())
    }

    fn validate_tracing(&self) -> Result<(), ConfigError> {
        if !self.tracing.otlp_endpoint.is_empty() {
            if !cfg!(feature = "otlp") {
                return Err(invalid("tracing.otlp_endpoint", "this build has no OTLP exporter; build with `--features otlp`"));
            }
            if !(self.tracing.otlp_endpoint.starts_with("http://") || self.tracing.otlp_endpoint.starts_with("https://")) {
                return Err(invalid("tracing.otlp_endpoint", "must start with http:// or https://"));
            }
        }
        if !(0.0..=1.0).contains(&self.tracing.sample_ratio) {
            return Err(invalid("tracing.sample_ratio", "must be between 0.0 and 1.0"));
        }
        Ok(())
    }

    fn validate_store(&self) -> Result<(), ConfigError> {
        if !self.secrets.key_hex.is_empty() && (self.secrets.key_hex.len() != 64 || hex::decode(&self.secrets.key_hex).is_err()) {
            return Err(invalid("secrets.key_hex", "must be 64 hex digits (32 bytes)"));
        }
        if self.store.backend == StoreBackend::Redis {
            self.validate_redis()?;
            // Replicas must open each other's sealed TOTP secrets: one shared key.
            if self.secrets.key_hex.is_empty() && self.secrets.key_file.is_empty() {
                return Err(invalid(
                    "secrets.key_hex",
                    "with the redis store every replica needs the same secret key: set [secrets] key_hex or key_file",
                ));
            }
        }
        Ok(())
    }

    /// How to reach Redis: URLs, TLS, credentials, Sentinel, WAIT.
    fn validate_redis(&self) -> Result<(), ConfigError> {
        let store = &self.store;
        let sentinel = !store.redis_sentinel_urls.is_empty();
        let (key, urls) = match (sentinel, store.redis_cluster_urls.is_empty()) {
            (true, false) => {
                return Err(invalid("store.redis_sentinel_urls", "Sentinel or a Cluster (redis_cluster_urls), not both"));
            }
            (true, true) => ("store.redis_sentinel_urls", &store.redis_sentinel_urls),
            (false, false) => ("store.redis_cluster_urls", &store.redis_cluster_urls),
            (false, true) => ("store.redis_url", &vec![store.redis_url.clone()]),
        };
        for url in urls {
            let shown = crate::store::redacted_url(url);
            if !(url.starts_with("redis://") || url.starts_with("rediss://")) {
                return Err(invalid(key, format!("{shown:?} is not a redis:// or rediss:// URL")));
            }
            if url.contains('#') {
                return Err(invalid(key, format!("{shown:?}: no #fragment (#insecure would skip the certificate check)")));
            }
            if !store.redis_password_file.is_empty()
                && !sentinel
                && url.split_once("://").and_then(|(_, rest)| rest.split_once('@')).is_some_and(|(user, _)| user.contains(':'))
            {
                return Err(invalid("store.redis_password_file", format!("{shown:?} carries a password too: keep one")));
            }
        }
        if sentinel && store.redis_sentinel_master.is_empty() {
            return Err(invalid("store.redis_sentinel_master", "is required with store.redis_sentinel_urls"));
        }
        if !store.redis_ca_cert_path.is_empty() && !urls.iter().any(|url| url.starts_with("rediss://")) {
            return Err(invalid("store.redis_ca_cert_path", format!("is for TLS, but no URL of {key} is rediss://")));
        }
        if store.operation_timeout_ms == 0 {
            return Err(invalid("store.operation_timeout_ms", "must be at least 1"));
        }
        if store.redis_wait_replicas > 0 && !(1..store.operation_timeout_ms).contains(&store.redis_wait_timeout_ms) {
            return Err(invalid("store.redis_wait_timeout_ms", "must be at least 1 and below store.operation_timeout_ms"));
        }
        Ok(())
    }

    /// Challenge lifetimes, per-user limits and the push queue.
    fn validate_limits(&self) -> Result<(), ConfigError> {
        if self.limits.totp_max_consecutive_failures > 100 {
            return Err(invalid(
                "limits.totp_max_consecutive_failures",
                "must be at most 100 (NIST SP 800-63B: no more than 100 consecutive failed attempts)",
            ));
        }
        let challenge = &self.challenge;
        if challenge.default_ttl_seconds == 0 || challenge.default_ttl_seconds > challenge.max_ttl_seconds {
            return Err(invalid("challenge.default_ttl_seconds", "must be between 1 and challenge.max_ttl_seconds"));
        }
        if challenge.max_ttl_seconds > 3_600 {
            return Err(invalid("challenge.max_ttl_seconds", "must be at most 3600"));
        }
        for (key, value) in [
            ("limits.max_pending_per_user", self.limits.max_pending_per_user),
            ("limits.max_challenges_per_window", self.limits.max_challenges_per_window),
            ("limits.challenge_window_seconds", self.limits.challenge_window_seconds),
            ("limits.wrong_number_limit", self.limits.wrong_number_limit),
            ("limits.wrong_number_window_seconds", self.limits.wrong_number_window_seconds),
            ("limits.totp_failure_limit", self.limits.totp_failure_limit),
            ("limits.totp_failure_window_seconds", self.limits.totp_failure_window_seconds),
            ("limits.totp_max_consecutive_failures", self.limits.totp_max_consecutive_failures),
            ("limits.max_devices_per_user", self.limits.max_devices_per_user),
            ("limits.max_open_enrollments_per_user", self.limits.max_open_enrollments_per_user),
            ("enrollment.code_ttl_seconds", self.enrollment.code_ttl_seconds),
            ("device.max_clock_skew_seconds", self.device.max_clock_skew_seconds),
            ("push.queue_capacity", self.push.queue_capacity),
            ("push.max_in_flight", self.push.max_in_flight),
            ("push.max_attempts", self.push.max_attempts),
            ("push.apns.connections", self.push.apns.as_ref().map_or(1, |p| p.connections)),
            ("push.apns.max_in_flight", self.push.apns.as_ref().map_or(1, |p| p.max_in_flight)),
            ("push.apns.request_timeout_ms", self.push.apns.as_ref().map_or(1, |p| p.request_timeout_ms)),
            ("push.fcm.connections", self.push.fcm.as_ref().map_or(1, |p| p.connections)),
            ("push.fcm.max_in_flight", self.push.fcm.as_ref().map_or(1, |p| p.max_in_flight)),
            ("push.fcm.request_timeout_ms", self.push.fcm.as_ref().map_or(1, |p| p.request_timeout_ms)),
            ("push.webpush.max_in_flight", self.push.webpush.as_ref().map_or(1, |p| p.max_in_flight)),
            ("push.webpush.max_in_flight_per_host", self.push.webpush.as_ref().map_or(1, |p| p.max_in_flight_per_host)),
            ("push.webpush.request_timeout_ms", self.push.webpush.as_ref().map_or(1, |p| p.request_timeout_ms)),
        ] {
            if value == 0 {
                return Err(invalid(key, "must be at least 1"));
            }
        }
        self.validate_webpush()?;
        check_share("push.queue_share_per_tenant", self.push.queue_share_per_tenant, "push.queue_capacity")
    }

    /// `[push.webpush]`: a contact push services can reach, and host names (or
    /// `*.domain`) in the allow-list.
    fn validate_webpush(&self) -> Result<(), ConfigError> {
        let Some(webpush) = &self.push.webpush else { return Ok(()) };
        let subject = webpush.subject.as_str();
        let contact = subject.strip_prefix("mailto:").or_else(|| subject.strip_prefix("https://"));
        if contact.is_none_or(|rest| rest.is_empty() || !rest.bytes().all(|b| b.is_ascii_graphic())) {
            return Err(invalid("push.webpush.subject", "must be a mailto: or https: URI (the operator's contact)"));
        }
        for host in &webpush.allowed_hosts {
            let name = host.strip_prefix("*.").unwrap_or(host);
            let plain = !name.is_empty() && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.');
            if !plain {
                return Err(invalid("push.webpush.allowed_hosts", format!("{host:?} is not a host name or *.domain")));
            }
        }
        Ok(())
    }

    /// A tenant's own limits: within the same bounds as the global ones, and its
    /// TTLs no longer than the global maximum.
    fn validate_tenant_limits(&self, tenant: &crate::config::TenantConfig) -> Result<(), ConfigError> {
        let limits = &tenant.limits;
        let named = |key: &'static str, message: &str| invalid(key, format!("tenant {:?}: {message}", tenant.id));
        for (key, value) in [
            ("tenants.limits.default_ttl_seconds", limits.default_ttl_seconds),
            ("tenants.limits.max_ttl_seconds", limits.max_ttl_seconds),
            ("tenants.limits.max_pending_per_user", limits.max_pending_per_user),
            ("tenants.limits.max_challenges_per_window", limits.max_challenges_per_window),
            ("tenants.limits.challenge_window_seconds", limits.challenge_window_seconds),
            ("tenants.limits.max_devices_per_user", limits.max_devices_per_user),
            ("tenants.limits.max_open_enrollments_per_user", limits.max_open_enrollments_per_user),
        ] {
            if value == Some(0) {
                return Err(named(key, "must be at least 1"));
            }
        }
        for (key, share, of) in [
            ("tenants.limits.creates_share", limits.creates_share, "server.max_creates_in_flight"),
            ("tenants.limits.push_queue_share", limits.push_queue_share, "push.queue_capacity"),
        ] {
            if let Some(share) = share {
                check_share(key, share, of)
                    .map_err(|_| named(key, &format!("{share} is not a fraction of {of} above 0.0 and at most 1.0")))?;
            }
        }
        let max_ttl = limits.max_ttl_seconds.unwrap_or(self.challenge.max_ttl_seconds);
        if max_ttl > self.challenge.max_ttl_seconds {
            return Err(named("tenants.limits.max_ttl_seconds", "must be at most challenge.max_ttl_seconds"));
        }
        let default_ttl = limits.default_ttl_seconds.unwrap_or(self.challenge.default_ttl_seconds);
        if default_ttl > max_ttl {
            return Err(named("tenants.limits.default_ttl_seconds", "must be at most the tenant's max_ttl_seconds"));
        }
        Ok(())
    }

    fn validate_tenants(&self) -> Result<(), ConfigError> {
        if self.tenants.is_empty() {
            return Err(invalid("tenants", "no [[tenants]]: nobody could call the identity-provider services"));
        }
        let mut ids = HashSet::new();
        let mut keys = HashSet::new();
        for tenant in &self.tenants {
            self.validate_tenant_limits(tenant)?;
            validate_tenant_push(tenant)?;
            let valid_id = !tenant.id.is_empty()
                && tenant.id.len() <= 64
                && tenant.id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
            if !valid_id {
                return Err(invalid("tenants.id", format!("{:?}: 1 to 64 of [A-Za-z0-9_-]", tenant.id)));
            }
            if !ids.insert(tenant.id.as_str()) {
                return Err(invalid("tenants.id", format!("{:?} appears twice", tenant.id)));
            }
            if tenant.api_key_sha256.is_empty() {
                return Err(invalid(
                    "tenants.api_key_sha256",
                    format!("tenant {:?} has no API key (api_key_sha256 or api_key_sha256_file)", tenant.id),
                ));
            }
            for digest in &tenant.api_key_sha256 {
                if digest.len() != 64 || !digest.bytes().all(|b| b.is_ascii_hexdigit()) {
                    return Err(invalid(
                        "tenants.api_key_sha256",
                        format!("tenant {:?}: not 64 hex digits (use `pushmatch hash-key`)", tenant.id),
                    ));
                }
                if !keys.insert(digest.to_ascii_lowercase()) {
                    return Err(invalid("tenants.api_key_sha256", format!("tenant {:?}: a key digest appears twice", tenant.id)));
                }
            }
        }
        Ok(())
    }
}

/// A tenant's share of a resource: a fraction above 0.0 (a tenant must be able to
/// sign anyone in) and at most 1.0 (all of it: no share). NaN fails both.
/// A tenant's own provider sections: the same bounds as the global ones.
fn validate_tenant_push(tenant: &crate::config::TenantConfig) -> Result<(), ConfigError> {
    let push = &tenant.push;
    for (key, value) in [
        ("tenants.push.apns.connections", push.apns.as_ref().map_or(1, |p| p.connections)),
        ("tenants.push.apns.max_in_flight", push.apns.as_ref().map_or(1, |p| p.max_in_flight)),
        ("tenants.push.apns.request_timeout_ms", push.apns.as_ref().map_or(1, |p| p.request_timeout_ms)),
        ("tenants.push.fcm.connections", push.fcm.as_ref().map_or(1, |p| p.connections)),
        ("tenants.push.fcm.max_in_flight", push.fcm.as_ref().map_or(1, |p| p.max_in_flight)),
        ("tenants.push.fcm.request_timeout_ms", push.fcm.as_ref().map_or(1, |p| p.request_timeout_ms)),
    ] {
        if value == 0 {
            return Err(invalid(key, format!("tenant {:?}: must be at least 1", tenant.id)));
        }
    }
    Ok(())
}

fn check_share(key: &'static str, share: f64, of: &str) -> Result<(), ConfigError> {
    if share > 0.0 && share <= 1.0 {
        return Ok(());
    }
    Err(invalid(key, format!("{share} is not a fraction of {of} above 0.0 and at most 1.0 (0.5: half)")))
}

#[cfg(test)]
mod tests {
    use super::super::{Config, StoreBackend};

    fn redis(adjust: impl FnOnce(&mut Config)) -> Result<(), String> {
        let mut config = Config::default();
        config.store.backend = StoreBackend::Redis;
        adjust(&mut config);
        config.validate_redis().map_err(|error| error.to_string())
    }

    #[test]
    fn redis_tls_credentials_sentinel_and_wait_are_checked_and_named() {
        assert_eq!(redis(|_| {}), Ok(()));
        let managed = |c: &mut Config| {
            c.store.redis_url = "rediss://cache.example.com:6380".into();
            c.store.redis_ca_cert_path = "/etc/pushmatch/redis-ca.pem".into();
            c.store.redis_username = "pushmatch".into();
            c.store.redis_password_file = "/run/secrets/redis-password".into();
        };
        assert_eq!(redis(managed), Ok(()));
        for (adjust, starts) in [
            (
                Box::new(|c: &mut Config| c.store.redis_ca_cert_path = "/ca.pem".into()) as Box<dyn FnOnce(&mut Config)>,
                "store.redis_ca_cert_path: is for TLS",
            ),
            (Box::new(|c: &mut Config| c.store.redis_url = "rediss://h:6380/#insecure".into()), "store.redis_url: "),
            (
                Box::new(|c: &mut Config| {
                    c.store.redis_url = "rediss://app:s3cret@h:6380".into();
                    c.store.redis_password_file = "/run/secrets/p".into();
                }),
                "store.redis_password_file: ",
            ),
            (
                Box::new(|c: &mut Config| c.store.redis_sentinel_urls = vec!["redis://s1:26379".into()]),
                "store.redis_sentinel_master: is required",
            ),
            (
                Box::new(|c: &mut Config| {
                    c.store.redis_sentinel_urls = vec!["redis://s1:26379".into()];
                    c.store.redis_sentinel_master = "m".into();
                    c.store.redis_cluster_urls = vec!["redis://a:6379".into(), "redis://b:6379".into()];
                }),
                "store.redis_sentinel_urls: ",
            ),
            (
                Box::new(|c: &mut Config| c.store.redis_sentinel_urls = vec!["tcp://s1:26379".into()]),
                "store.redis_sentinel_urls: ",
            ),
            (
                Box::new(|c: &mut Config| {
                    c.store.redis_wait_replicas = 1;
                    c.store.redis_wait_timeout_ms = 2_000;
                }),
                "store.redis_wait_timeout_ms: ",
            ),
        ] {
            let error = redis(adjust).expect_err(starts);
            assert!(error.starts_with(starts) && !error.contains("s3cret"), "{error}");
        }
        let sentinel = |c: &mut Config| {
            c.store.redis_sentinel_urls = vec!["redis://s1:26379".into(), "redis://s2:26379".into()];
            c.store.redis_sentinel_master = "pushmatch".into();
            c.store.redis_wait_replicas = 1;
        };
        assert_eq!(redis(sentinel), Ok(()));
    }
}
