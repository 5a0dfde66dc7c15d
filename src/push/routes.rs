//! Each tenant's pushes through its own provider credentials. A tenant may carry
//! `[tenants.push.apns]` and `[tenants.push.fcm]` (its app's bundle id and Apple
//! key, its Firebase project); a provider it leaves out uses the global section.
//!
//! The dispatcher still has one lane per provider; its sender there is a
//! [`RoutedSender`], which picks the tenant's sender for each push. Senders are
//! kept per credential ([`PushRoutes`]' cache, keyed by a digest of the section and
//! the files it names): a thousand tenants on one Apple key share one connection
//! pool and one provider token (each tenant's topic rides on the shared client,
//! [`super::apns::ApnsSender::for_topic`]), and tenants on one Firebase service
//! account share one sender and one access token. Each credential's own
//! `max_in_flight` bounds its sends, inside the provider lane's limit.
//!
//! [`PushRoutes::configure`] builds every sender a configuration needs first and
//! swaps them in only when all were built, so a reload with an unreadable key file
//! changes nothing. A credential that stays keeps its connections and tokens.

use std::collections::HashMap;
use std::collections::hash_map::Entry;
use std::sync::Arc;

use arc_swap::ArcSwap;
use async_trait::async_trait;
use sha2::{Digest, Sha256};
use tokio::sync::Semaphore;

use super::settings::{ApnsConfig, FcmConfig, PushConfig, TenantPushConfig};
use super::{PushJob, PushSender, PushSetupError, SendOutcome, apns_sender, fcm_sender};
use crate::domain::challenge::Platform;
use crate::domain::ids::TenantId;
use crate::domain::time::Clock;

/// One credential's sender and its own limit of sends at once.
#[derive(Clone)]
struct Route {
    sender: Arc<dyn PushSender>,
    sends: Arc<Semaphore>,
}

/// Where one provider's pushes go: the tenant's own route, else the global one.
#[derive(Clone, Default)]
struct Routes {
    global: Option<Route>,
    tenants: HashMap<TenantId, Route>,
}

impl Routes {
    fn of(&self, tenant: &TenantId) -> Option<&Route> {
        self.tenants.get(tenant).or(self.global.as_ref())
    }
}

/// One provider's sender in the dispatcher, routing each push by its tenant.
pub struct RoutedSender {
    platform: Platform,
    max_in_flight: usize,
    routes: ArcSwap<Routes>,
}

#[async_trait]
impl PushSender for RoutedSender {
    fn platform(&self) -> Platform {
        self.platform
    }

    fn max_in_flight(&self) -> Option<usize> {
        Some(self.max_in_flight)
    }

    fn serves(&self, tenant: &TenantId) -> bool {
        self.routes.load().of(tenant).is_some()
    }

    async fn send(&self, job: &PushJob) -> SendOutcome {
        let Some(route) = self.routes.load().of(&job.tenant).cloned() else {
            return SendOutcome::Failed { reason: "not configured".into() };
        };
        let Ok(_sending) = route.sends.acquire().await else {
            return SendOutcome::Failed { reason: "not configured".into() };
        };
        route.sender.send(job).await
    }
}

/// A built APNs client by credential, and its senders by topic.
struct ApnsEntry {
    base: Arc<super::apns::ApnsSender>,
    sends: Arc<Semaphore>,
    topics: HashMap<String, Arc<super::apns::ApnsSender>>,
}

#[derive(Default)]
struct Cache {
    apns: HashMap<[u8; 32], ApnsEntry>,
    fcm: HashMap<[u8; 32], Route>,
}

/// Both providers' routed senders and the senders behind them, by credential.
pub struct PushRoutes {
    clock: Arc<dyn Clock>,
    apns: Arc<RoutedSender>,
    fcm: Arc<RoutedSender>,
    /// `[push.webpush]`: global only, built at start (a reload does not change it).
    webpush: Option<Arc<super::webpush::WebPushSender>>,
    cache: tokio::sync::Mutex<Cache>,
}

impl PushRoutes {
    /// Routes for `global` and each tenant's own sections. The providers' lanes take
    /// at most the global section's `max_in_flight` sends at once (the default when
    /// there is none).
    pub async fn new(
        global: &PushConfig,
        tenants: &[(TenantId, TenantPushConfig)],
        clock: Arc<dyn Clock>,
    ) -> Result<Arc<Self>, PushSetupError> {
        let lane_limit = |limit: Option<u32>| limit.map_or(super::settings::DEFAULT_PROVIDER_IN_FLIGHT, |l| l) as usize;
        let routed = |platform, max_in_flight| {
            Arc::new(RoutedSender { platform, max_in_flight, routes: ArcSwap::from_pointee(Routes::default()) })
        };
        let webpush = match &global.webpush {
            Some(webpush) => Some(Arc::new(super::webpush_sender(global, webpush, Arc::clone(&clock)).await?)),
            None => None,
        };
        let this = Arc::new(Self {
            clock,
            apns: routed(Platform::Apns, lane_limit(global.apns.as_ref().map(|c| c.max_in_flight))),
            fcm: routed(Platform::Fcm, lane_limit(global.fcm.as_ref().map(|c| c.max_in_flight))),
            webpush,
            cache: tokio::sync::Mutex::default(),
        });
        this.configure(global, tenants).await?;
        Ok(this)
    }

    /// The dispatcher's senders: one per provider.
    pub fn senders(&self) -> Vec<Arc<dyn PushSender>> {
        let mut senders = vec![Arc::clone(&self.apns) as Arc<dyn PushSender>, Arc::clone(&self.fcm) as Arc<dyn PushSender>];
        if let Some(webpush) = &self.webpush {
            senders.push(Arc::clone(webpush) as Arc<dyn PushSender>);
        }
        senders
    }

    /// Routes pushes by `global` and the tenants' own sections from now on; on an
    /// error (a key file unreadable, a bad topic) nothing changes. The error names the
    /// file or key, and the tenant.
    pub async fn configure(&self, global: &PushConfig, tenants: &[(TenantId, TenantPushConfig)]) -> Result<(), PushSetupError> {
        let mut cache = self.cache.lock().await;
        let mut next = Cache::default();
        let mut apns = Routes::default();
        let mut fcm = Routes::default();
        if let Some(config) = &global.apns {
            apns.global = Some(self.apns_route(config, "push", &mut cache, &mut next).await?);
        }
        if let Some(config) = &global.fcm {
            fcm.global = Some(self.fcm_route(config, &mut cache, &mut next).await?);
        }
        for (tenant, own) in tenants {
            if let Some(config) = &own.apns {
                let route = self.apns_route(config, "tenants.push", &mut cache, &mut next).await;
                apns.tenants.insert(tenant.clone(), route.map_err(|e| e.of_tenant(tenant))?);
            }
            if let Some(config) = &own.fcm {
                let route = self.fcm_route(config, &mut cache, &mut next).await;
                fcm.tenants.insert(tenant.clone(), route.map_err(|e| e.of_tenant(tenant))?);
            }
        }
        tracing::info!(
            apns_credentials = next.apns.len(),
            fcm_credentials = next.fcm.len(),
            tenants_with_own_apns = apns.tenants.len(),
            tenants_with_own_fcm = fcm.tenants.len(),
            "push routes ready"
        );
        self.apns.routes.store(Arc::new(apns));
        self.fcm.routes.store(Arc::new(fcm));
        *cache = next;
        Ok(())
    }

    async fn apns_route(
        &self,
        config: &ApnsConfig,
        scope: &str,
        cache: &mut Cache,
        next: &mut Cache,
    ) -> Result<Route, PushSetupError> {
        let mut credential = config.clone();
        credential.topic = String::new();
        let digest = credential_digest(&credential, &[&config.private_key_path, config.ca_cert_path.as_ref()]).await;
        let entry = match next.apns.entry(digest) {
            Entry::Occupied(kept) => kept.into_mut(),
            Entry::Vacant(slot) => {
                let entry = match cache.apns.remove(&digest) {
                    Some(entry) => entry,
                    None => {
                        let base = Arc::new(apns_sender(config, scope).await?);
                        let sends = Arc::new(Semaphore::new(config.max_in_flight.max(1) as usize));
                        ApnsEntry { base, sends, topics: HashMap::new() }
                    }
                };
                slot.insert(entry)
            }
        };
        let topic = match entry.topics.get(&config.topic) {
            Some(sender) => Arc::clone(sender),
            None => {
                let header = super::topic_header(&config.topic, scope)?;
                let sender = Arc::new(entry.base.for_topic(header));
                entry.topics.insert(config.topic.clone(), Arc::clone(&sender));
                sender
            }
        };
        Ok(Route { sender: topic, sends: Arc::clone(&entry.sends) })
    }

    async fn fcm_route(&self, config: &FcmConfig, cache: &mut Cache, next: &mut Cache) -> Result<Route, PushSetupError> {
        let digest = credential_digest(config, &[&config.service_account_path, config.ca_cert_path.as_ref()]).await;
        if let Some(route) = next.fcm.get(&digest) {
            return Ok(route.clone());
        }
        let route = match cache.fcm.remove(&digest) {
            Some(route) => route,
            None => Route {
                sender: Arc::new(fcm_sender(config, Arc::clone(&self.clock)).await?),
                sends: Arc::new(Semaphore::new(config.max_in_flight.max(1) as usize)),
            },
        };
        next.fcm.insert(digest, route.clone());
        Ok(route)
    }
}

/// A digest of a provider section and of the files it names, so that a changed
/// key file (a renewed Apple key under the same name) makes a new sender.
async fn credential_digest(section: &impl serde::Serialize, files: &[&std::path::Path]) -> [u8; 32] {
    let mut digest = Sha256::new();
    digest.update(serde_json::to_vec(section).unwrap_or_default());
    for file in files.iter().filter(|path| !path.as_os_str().is_empty()) {
        let bytes = tokio::fs::read(file).await.unwrap_or_default();
        digest.update((bytes.len() as u64).to_le_bytes());
        digest.update(&bytes);
    }
    digest.finalize().into()
}
