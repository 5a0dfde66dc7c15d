//! Translation: each module's settings from the configuration, so that no module
//! but `config/` (and the wiring in `server/`) reads a `Config`.

use std::collections::HashMap;
use std::time::Duration;

use super::{Config, TenantConfig};
use crate::broker::{BrokerSettings, Tenant, TenantLimits};
use crate::domain::api_key::TenantKeys;
use crate::domain::ids::TenantId;
use crate::domain::ports::{AdmissionPolicy, EnrollmentLimits, StrikePolicy, TotpPolicy};
use crate::push::dispatcher::DispatcherSettings;
use crate::tls::TlsFiles;

impl Config {
    pub fn broker_settings(&self) -> BrokerSettings {
        let seconds = |s: u32| Duration::from_secs(u64::from(s));
        BrokerSettings {
            default_ttl: seconds(self.challenge.default_ttl_seconds),
            max_ttl: seconds(self.challenge.max_ttl_seconds),
            admission: AdmissionPolicy {
                max_pending: self.limits.max_pending_per_user,
                max_per_window: self.limits.max_challenges_per_window,
                window: seconds(self.limits.challenge_window_seconds),
                retention: seconds(self.challenge.retention_seconds),
                // A fraud report may come for a challenge that ended (cancelled,
                // expired, denied) up to the fraud window ago: it must still be
                // there to be found. An approved one needs no more than retention.
                report_retention: seconds(self.challenge.retention_seconds.max(self.limits.fraud_report_window_seconds)),
            },
            wrong_numbers: StrikePolicy {
                limit: self.limits.wrong_number_limit,
                window: seconds(self.limits.wrong_number_window_seconds),
                block_for: seconds(self.limits.wrong_number_block_seconds),
            },
            totp_lockout: TotpPolicy {
                strikes: StrikePolicy {
                    limit: self.limits.totp_failure_limit,
                    window: seconds(self.limits.totp_failure_window_seconds),
                    block_for: seconds(self.limits.totp_lockout_seconds),
                },
                max_consecutive: self.limits.totp_max_consecutive_failures,
            },
            enrollment_limits: EnrollmentLimits {
                max_devices: self.limits.max_devices_per_user,
                max_open_enrollments: self.limits.max_open_enrollments_per_user,
            },
            fraud_report_window: seconds(self.limits.fraud_report_window_seconds),
            enrollment_ttl: seconds(self.enrollment.code_ttl_seconds),
            max_clock_skew: seconds(self.device.max_clock_skew_seconds),
            public_url: self.server.public_url.clone(),
            max_creates_in_flight: self.server.max_creates_in_flight as usize,
            max_creates_in_flight_per_tenant: self
                .tenant_part(self.server.max_creates_in_flight, self.server.creates_share_per_tenant),
            per_tenant: HashMap::new(),
            webpush_endpoints: self.push.webpush_endpoints(),
        }
        .with_tenant_limits(&self.tenants, self.server.max_creates_in_flight)
    }

    /// One tenant's part of a resource of `total` that all tenants share: `share` of
    /// it, rounded up so that every tenant gets at least one. All of it when a single
    /// tenant is configured: a share protects tenants from each other, and a lone
    /// tenant would only lose capacity to it.
    fn tenant_part(&self, total: u32, share: f64) -> usize {
        if self.tenants.len() <= 1 {
            return total as usize;
        }
        part_of(total, share)
    }

    pub fn redis_settings(&self) -> crate::store::redis::RedisSettings {
        let store = &self.store;
        let urls =
            if store.redis_cluster_urls.is_empty() { vec![store.redis_url.clone()] } else { store.redis_cluster_urls.clone() };
        let optional = |text: &str| (!text.is_empty()).then(|| text.to_owned());
        let sentinel = (!store.redis_sentinel_urls.is_empty()).then(|| crate::store::redis::SentinelSettings {
            urls: store.redis_sentinel_urls.clone(),
            master: store.redis_sentinel_master.clone(),
        });
        crate::store::redis::RedisSettings {
            urls,
            sentinel,
            ca_cert_path: optional(&store.redis_ca_cert_path).map(Into::into),
            username: optional(&store.redis_username),
            password_file: optional(&store.redis_password_file).map(Into::into),
            operation_timeout: Duration::from_millis(u64::from(store.operation_timeout_ms)),
            wait_replicas: store.redis_wait_replicas,
            wait_timeout: Duration::from_millis(u64::from(store.redis_wait_timeout_ms)),
        }
    }

    /// The certificate files of the gRPC port; `None` serves plain gRPC (validation
    /// made sure that the certificate and key come together).
    pub fn tls_files(&self) -> Option<TlsFiles> {
        let server = &self.server;
        let (cert, key) = (server.tls_cert_path.clone()?, server.tls_key_path.clone()?);
        Some(TlsFiles {
            cert,
            key,
            client_ca: server.tls_client_ca_path.clone(),
            reload_interval: Duration::from_secs(u64::from(server.tls_reload_interval_seconds)),
        })
    }

    /// Every tenant's accepted API-key digests.
    pub fn tenant_keys(&self) -> TenantKeys {
        TenantKeys::new(self.tenants.iter().map(|t| (TenantId(t.id.clone()), t.api_key_sha256.as_slice())))
    }

    pub fn dispatcher_settings(&self) -> DispatcherSettings {
        DispatcherSettings {
            queue_capacity: self.push.queue_capacity as usize,
            max_in_flight: self.push.max_in_flight as usize,
            max_attempts: self.push.max_attempts,
            tenants: self.tenant_queue_shares(),
            ..DispatcherSettings::default()
        }
    }

    /// Each tenant with the most of its pushes that may wait in a provider's queue:
    /// its own `push_queue_share`, else its part by `push.queue_share_per_tenant`.
    pub fn tenant_queue_shares(&self) -> Vec<(TenantId, usize)> {
        let default = self.tenant_part(self.push.queue_capacity, self.push.queue_share_per_tenant);
        let own = |t: &TenantConfig| t.limits.push_queue_share.map(|share| part_of(self.push.queue_capacity, share));
        self.tenants.iter().map(|t| (TenantId(t.id.clone()), own(t).unwrap_or(default))).collect()
    }

    /// Each tenant's own push sections (`[tenants.push.*]`), for the tenants that have any.
    pub fn tenant_push(&self) -> Vec<(TenantId, crate::push::settings::TenantPushConfig)> {
        self.tenants.iter().filter(|t| !t.push.is_empty()).map(|t| (TenantId(t.id.clone()), t.push.clone())).collect()
    }

    pub fn domain_tenants(&self) -> Vec<Tenant> {
        self.tenants.iter().map(|t| Tenant { id: TenantId(t.id.clone()), display_name: t.display_name.clone() }).collect()
    }
}

/// `share` of `total`, rounded up so that it is at least one. Validation keeps
/// `share` in (0, 1], so the product is in (0, total].
fn part_of(total: u32, share: f64) -> usize {
    let total = total as usize;
    ((total as f64 * share).ceil() as usize).clamp(1, total)
}

impl BrokerSettings {
    /// Each tenant with a `[tenants.limits]` of its own gets its limits: the global
    /// ones with the tenant's keys put over them.
    fn with_tenant_limits(mut self, tenants: &[TenantConfig], max_creates_in_flight: u32) -> Self {
        let seconds = |s: u32| Duration::from_secs(u64::from(s));
        for tenant in tenants.iter().filter(|t| !t.limits.is_empty()) {
            let own = &tenant.limits;
            let mut limits: TenantLimits = self.global_limits();
            if let Some(ttl) = own.default_ttl_seconds {
                limits.default_ttl = seconds(ttl);
            }
            if let Some(ttl) = own.max_ttl_seconds {
                limits.max_ttl = seconds(ttl);
            }
            if let Some(pending) = own.max_pending_per_user {
                limits.admission.max_pending = pending;
            }
            if let Some(per_window) = own.max_challenges_per_window {
                limits.admission.max_per_window = per_window;
            }
            if let Some(window) = own.challenge_window_seconds {
                limits.admission.window = seconds(window);
            }
            if let Some(devices) = own.max_devices_per_user {
                limits.enrollment_limits.max_devices = devices;
            }
            if let Some(open) = own.max_open_enrollments_per_user {
                limits.enrollment_limits.max_open_enrollments = open;
            }
            if let Some(share) = own.creates_share {
                limits.max_creates_in_flight = part_of(max_creates_in_flight, share);
            }
            self.per_tenant.insert(TenantId(tenant.id.clone()), limits);
        }
        self
    }
}
