//! Tenants changed without a restart. On SIGHUP, when the configuration file (or a
//! tenant's `api_key_sha256_file`) changed (checked every
//! `server.config_reload_interval_seconds`), or when asked in-process
//! ([`crate::reload::ReloadHandle`]), the file is loaded and validated again as at
//! start. A file that does not load, or whose tenants' push key files cannot be
//! read, is refused whole: the error is logged and the tenants in force stay. One
//! that loads replaces the tenants: ids, display names, API-key digests, limits,
//! shares and push credentials. Everything else in the file is read at start only;
//! a change there is logged as waiting for a restart.
//!
//! The order of a swap: the push routes (built whole first, the only step that can
//! fail), the broker's tenants and the push queue's shares, the API keys last, so that a call authenticated as a new tenant finds that
//! tenant's limits. Calls already running finish with what they started with; live
//! challenges and watch streams are the store's and are not touched. A removed
//! tenant's key reads UNAUTHENTICATED from the next call; its data stays in the
//! store until an operator purges it.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use sha2::{Digest, Sha256};
use tokio_util::sync::CancellationToken;

use crate::broker::Broker;
use crate::config::{Config, ConfigError};
use crate::domain::api_key::TenantKeys;
use crate::push::dispatcher::Dispatcher;
use crate::push::routes::PushRoutes;
use crate::reload::{ReloadRequests, Trigger, Triggers};

/// Where the running configuration came from, to be read again.
#[derive(Clone, Debug)]
pub struct ConfigSource {
    pub file: PathBuf,
    /// The `PUSHMATCH_*` variables as they were at start (they still override the
    /// file on every reload, as they did at start).
    pub env: Vec<(String, String)>,
}

/// What a reload swaps.
pub(super) struct Reloadable {
    pub(super) broker: Arc<Broker>,
    pub(super) dispatcher: Dispatcher,
    pub(super) keys: Arc<ArcSwap<TenantKeys>>,
    /// The tenants' push credentials, when the senders came from the configuration.
    pub(super) push_routes: Option<Arc<PushRoutes>>,
}

/// Reloads until `stop` fires; see the module docs.
///
/// The files' starting digest is taken here, before the server answers anything:
/// taken later (inside the task), a change written in between would become the
/// starting point and never be seen as a change.
pub(super) async fn spawn(
    source: ConfigSource,
    running: Config,
    targets: Reloadable,
    requests: Option<ReloadRequests>,
    stop: CancellationToken,
) {
    let interval = Duration::from_secs(u64::from(running.server.config_reload_interval_seconds));
    let seen = fingerprint(&source, &running).await;
    tokio::spawn(async move {
        let mut triggers = Triggers::new("the configuration", interval, requests);
        let mut reloader = Reloader { seen, source, running, targets };
        while let Some(trigger) = triggers.next(&stop).await {
            match trigger {
                Trigger::Signal => {
                    reloader.reload().await.ok();
                }
                Trigger::Tick => {
                    // A file that failed to load is reported once, not at every tick.
                    let now = fingerprint(&reloader.source, &reloader.running).await;
                    if now != reloader.seen {
                        reloader.seen = now;
                        reloader.reload().await.ok();
                    }
                }
                Trigger::Asked(answer) => {
                    let outcome = reloader.reload().await.map_err(|error| error.to_string());
                    answer.send(outcome).ok();
                }
            }
        }
    });
}

struct Reloader {
    source: ConfigSource,
    /// The configuration in force: the file as loaded at start, with the tenants of
    /// the last reload that succeeded.
    running: Config,
    /// The files' digest when last looked at.
    seen: [u8; 32],
    targets: Reloadable,
}

impl Reloader {
    async fn reload(&mut self) -> Result<(), ConfigError> {
        let source = self.source.clone();
        let loaded = tokio::task::spawn_blocking(move || Config::load(Some(&source.file), source.env))
            .await
            .map_err(|error| ConfigError::Parse { origin: "reload".into(), message: error.to_string() })
            .and_then(|loaded| loaded);
        let next = loaded.and_then(|loaded| {
            let mut next = self.running.clone();
            let waiting = sections_changed(&self.running, &loaded.config);
            next.tenants = loaded.config.tenants;
            // The tenants checked against the settings in force (a tenant's TTL
            // against the running maximum, not a new one that waits for a restart).
            next.validate()?;
            Ok((next, waiting))
        });
        let next = match next {
            Ok((next, waiting)) => self.route_pushes(&next).await.map(|()| (next, waiting)),
            Err(error) => Err(error),
        };
        let (next, waiting) = match next {
            Ok(next) => next,
            Err(error) => {
                metrics::counter!(crate::telemetry::metrics::names::CONFIG_RELOADS, "outcome" => "failed").increment(1);
                tracing::error!(%error, file = %self.source.file.display(), "configuration reload refused");
                return Err(error);
            }
        };
        if !waiting.is_empty() {
            tracing::warn!(sections = ?waiting, "these sections changed in the file and take effect at the next restart");
        }
        self.apply(&next);
        let (before, after) = (self.running.tenants.len(), next.tenants.len());
        self.seen = fingerprint(&self.source, &next).await;
        self.running = next;
        metrics::counter!(crate::telemetry::metrics::names::CONFIG_RELOADS, "outcome" => "reloaded").increment(1);
        tracing::info!(tenants_before = before, tenants = after, "configuration reloaded");
        Ok(())
    }

    /// The tenants' pushes routed by `next`'s credentials (built first, swapped
    /// only if every one was: an unreadable key file refuses the reload whole).
    async fn route_pushes(&self, next: &Config) -> Result<(), ConfigError> {
        let Some(routes) = &self.targets.push_routes else { return Ok(()) };
        routes
            .configure(&next.push, &next.tenant_push())
            .await
            .map_err(|error| ConfigError::Parse { origin: "tenants.push".into(), message: error.to_string() })
    }

    fn apply(&self, next: &Config) {
        let targets = &self.targets;
        targets.broker.set_tenants(&next.broker_settings(), next.domain_tenants());
        targets.dispatcher.set_tenants(&next.tenant_queue_shares());
        super::register_tenant_series(next);
        targets.keys.store(Arc::new(next.tenant_keys()));
    }
}

/// The top-level sections, other than `[[tenants]]`, that differ between the
/// configuration in force and the one just loaded.
fn sections_changed(running: &Config, loaded: &Config) -> Vec<String> {
    let table = |config: &Config| {
        let mut config = config.clone();
        config.tenants.clear();
        match toml::Value::try_from(config) {
            Ok(toml::Value::Table(table)) => table,
            _ => toml::Table::new(),
        }
    };
    let (old, new) = (table(running), table(loaded));
    let mut changed: Vec<String> = old.keys().chain(new.keys()).filter(|key| old.get(*key) != new.get(*key)).cloned().collect();
    changed.sort();
    changed.dedup();
    changed
}

/// A digest of the configuration file and of every tenant's key file; a file that
/// cannot be read counts as empty (the reload then says why).
async fn fingerprint(source: &ConfigSource, running: &Config) -> [u8; 32] {
    let mut digest = Sha256::new();
    let push_files = running.tenants.iter().flat_map(|tenant| {
        let apns = tenant.push.apns.iter().flat_map(|c| [c.private_key_path.clone(), c.ca_cert_path.clone().into()]);
        let fcm = tenant.push.fcm.iter().flat_map(|c| [c.service_account_path.clone(), c.ca_cert_path.clone().into()]);
        apns.chain(fcm).collect::<Vec<PathBuf>>()
    });
    let files = std::iter::once(source.file.clone())
        .chain(running.tenants.iter().filter_map(|tenant| tenant.api_key_sha256_file.clone()))
        .chain(push_files.filter(|path| !path.as_os_str().is_empty()));
    for file in files {
        let bytes = tokio::fs::read(&file).await.unwrap_or_default();
        digest.update((bytes.len() as u64).to_le_bytes());
        digest.update(&bytes);
    }
    digest.finalize().into()
}
