//! [`Broker`]: every use case of pushmatch, one method each. The gRPC edge turns a
//! request into these arguments (already well-formed) and the result back into a
//! response; the broker puts the domain's rules to work over the store port
//! (`crate::domain::ports::Store`) and the push dispatcher. Everything that decides
//! lives in the domain's types or in the store's atomic steps; the broker orders
//! the steps and records what happened (logs, metrics, deliveries).
//!
//! - [`challenges`]: the IdP's side of a sign-in (create, get, watch, cancel).
//! - [`enrollment`]: begin and complete an enrollment (the user's other devices get
//!   a notice push of the new one).
//! - [`totp`]: confirm a TOTP enrollment (announced the same way), verify codes.
//! - [`devices`]: the app's calls after enrollment (answers, pending list, token
//!   updates) and the IdP's device management.
//! - [`delivery`]: [`DeliveryRecorder`], the dispatcher's reports written to the store.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;

use crate::domain::challenge::{Challenge, Delivery, DeliveryState, Platform, SignInContext};
use crate::domain::device::{Device, DevicePublicKey};
use crate::domain::enrollment::{Enrollment, EnrollmentKind};
use crate::domain::error::DomainError;
use crate::domain::ids::{DeviceId, EnrollmentCode, TenantId, UserId};
use crate::domain::ports::{AdmissionPolicy, EnrollmentLimits, Store, StrikePolicy, TotpPolicy};
use crate::domain::secrets::SecretBox;
use crate::domain::time::Clock;
use crate::push::dispatcher::Dispatcher;
use crate::push::{NOTICE_LIFETIME, PushJob, PushKind};

mod challenges;
mod delivery;
mod devices;
mod enrollment;
mod tenancy;
#[cfg(test)]
mod tests;
mod totp;

pub use delivery::DeliveryRecorder;
use tenancy::Tenancy;

/// The knobs of the rules, from the configuration.
#[derive(Clone, Debug)]
pub struct BrokerSettings {
    pub default_ttl: Duration,
    pub max_ttl: Duration,
    pub admission: AdmissionPolicy,
    pub wrong_numbers: StrikePolicy,
    /// Wrong TOTP codes that lock VerifyTotp for a user.
    pub totp_lockout: TotpPolicy,
    /// Devices and open enrollments per user.
    pub enrollment_limits: EnrollmentLimits,
    /// How long after a challenge ended a signed fraud report on it still blocks
    /// the user (challenges are retained at least this long).
    pub fraud_report_window: Duration,
    pub enrollment_ttl: Duration,
    pub max_clock_skew: Duration,
    /// Where enrollment QR codes send apps.
    pub public_url: String,
    /// CreateChallenge calls worked on at once; past it they are refused at once.
    pub max_creates_in_flight: usize,
    /// Of those, the most one tenant may hold (its share, `server.creates_share_per_tenant`);
    /// past it that tenant is refused at once while the others still get permits.
    /// At `max_creates_in_flight` or more, no tenant is limited beyond the global cap.
    pub max_creates_in_flight_per_tenant: usize,
    /// Tenants with limits of their own (`[tenants.limits]`); the others use the
    /// global ones above.
    pub per_tenant: HashMap<TenantId, TenantLimits>,
    /// Which Web Push endpoints a device may subscribe with (`[push.webpush]`).
    pub webpush_endpoints: crate::push::webpush::guard::EndpointPolicy,
}

/// The limits that may differ between tenants.
#[derive(Clone, Debug)]
pub struct TenantLimits {
    pub default_ttl: Duration,
    pub max_ttl: Duration,
    pub admission: AdmissionPolicy,
    pub enrollment_limits: EnrollmentLimits,
    /// CreateChallenge calls of the tenant at once (its part of
    /// `max_creates_in_flight`); past it the tenant is refused at once.
    pub max_creates_in_flight: usize,
}

impl BrokerSettings {
    /// The global limits, as a tenant without its own has them.
    pub fn global_limits(&self) -> TenantLimits {
        TenantLimits {
            default_ttl: self.default_ttl,
            max_ttl: self.max_ttl,
            admission: self.admission.clone(),
            enrollment_limits: self.enrollment_limits.clone(),
            max_creates_in_flight: self.max_creates_in_flight_per_tenant,
        }
    }

    /// `tenant`'s limits: its own where it has them, else the global ones.
    pub fn limits_of(&self, tenant: &TenantId) -> TenantLimits {
        self.per_tenant.get(tenant).cloned().unwrap_or_else(|| self.global_limits())
    }
}

/// A tenant as the domain sees it.
#[derive(Clone, Debug)]
pub struct Tenant {
    pub id: TenantId,
    pub display_name: String,
}

/// What the IdP asks for in CreateChallenge, validated.
#[derive(Clone, Debug)]
pub struct ChallengeRequest {
    pub user_id: UserId,
    pub context: SignInContext,
    /// 0 means the configured default.
    pub ttl_seconds: u32,
    pub request_id: Option<String>,
}

/// What the app sends in CompleteEnrollment, validated.
#[derive(Debug)]
pub struct DeviceEnrollment {
    pub code: EnrollmentCode,
    pub platform: Platform,
    pub push_token: String,
    pub public_key: DevicePublicKey,
    pub display_name: String,
}

/// A begun enrollment: the record and what the setup page shows (once).
pub struct BegunEnrollment {
    pub enrollment: Enrollment,
    pub uri: String,
    pub qr_png: Vec<u8>,
}

pub struct CompletedEnrollment {
    pub device: Device,
    pub account_name: String,
    pub issuer: String,
    /// The raw TOTP secret for the app's offline codes; sent once, stored sealed.
    pub totp_secret: Vec<u8>,
}

/// What VerifyTotp answers.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TotpVerdict {
    pub valid: bool,
    pub device_id: Option<DeviceId>,
}

/// A device's answer, as RespondToChallenge reports it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AnswerOutcome {
    pub accepted: bool,
    pub challenge: Challenge,
}

/// What ListPendingChallenges shows the app.
pub struct PendingForDevice {
    pub challenges: Vec<Challenge>,
    pub account_name: String,
    pub issuer: String,
}

pub struct Broker {
    store: Arc<dyn Store>,
    dispatcher: Dispatcher,
    clock: Arc<dyn Clock>,
    settings: BrokerSettings,
    /// The configured tenants with their limits and permits; replaced whole on a
    /// reload ([`Broker::set_tenants`]). Reading it takes no lock.
    tenancy: ArcSwap<Tenancy>,
    secrets: SecretBox,
    /// One permit per CreateChallenge in flight: in a burst past what the store and
    /// the push queue take, a caller hears RESOURCE_EXHAUSTED at once and backs off,
    /// instead of waiting in a queue that only grows (BENCHMARKS.md, the herd).
    /// Each tenant also has permits of its own ([`Tenancy`]), taken before a global
    /// one: a tenant's herd (its IdP in a retry storm, or a stolen key) holds at most
    /// its share of these, and the other tenants' sign-ins still find permits.
    creating: tokio::sync::Semaphore,
}

impl Broker {
    pub fn new(
        store: Arc<dyn Store>,
        dispatcher: Dispatcher,
        clock: Arc<dyn Clock>,
        settings: BrokerSettings,
        tenants: Vec<Tenant>,
        secrets: SecretBox,
    ) -> Self {
        let creating = tokio::sync::Semaphore::new(settings.max_creates_in_flight);
        let tenancy = ArcSwap::from_pointee(Tenancy::build(&settings, tenants, None));
        Self { store, dispatcher, clock, settings, tenancy, secrets, creating }
    }

    /// Serves `tenants` from now on, each with its limits from `tenant_settings`
    /// (its `per_tenant` limits and the tenants' part of the create cap; the global
    /// limits stay those the broker started with). Calls already running finish
    /// with the tenants they started with; a tenant that is gone is no longer
    /// found, and one that stays keeps its permits in use.
    pub fn set_tenants(&self, tenant_settings: &BrokerSettings, tenants: Vec<Tenant>) {
        let previous = self.tenancy.load();
        let next = Tenancy::build(tenant_settings, tenants, Some(&previous));
        tracing::info!(tenants = next.len(), "tenants updated");
        self.tenancy.store(Arc::new(next));
    }

    /// Whether `tenant` is configured now (a reload may have removed it).
    fn serves(&self, tenant: &TenantId) -> bool {
        self.tenancy.load().get(tenant).is_some()
    }

    /// `tenant`'s limits: its own where it has them, else the global ones (also for
    /// a tenant not configured, which the API never lets through).
    fn limits_of(&self, tenant: &TenantId) -> TenantLimits {
        self.tenancy.load().get(tenant).map_or_else(|| self.settings.global_limits(), |entry| entry.limits.clone())
    }

    fn issuer(&self, tenant: &TenantId) -> String {
        self.tenancy.load().get(tenant).map_or_else(|| tenant.0.clone(), |t| t.display_name.clone())
    }

    /// Hands a job to the dispatcher. Room was checked before the challenge was
    /// created; if a concurrent burst took it meanwhile, the delivery reads FAILED
    /// and the app's pull fallback still finds the challenge.
    async fn push(&self, job: PushJob) {
        if let Err(full) = self.dispatcher.enqueue(job.clone()) {
            tracing::warn!(kind = job.kind.label(), challenge_id = job.challenge_id().map(tracing::field::display), "{full}");
            if let PushKind::Challenge { challenge_id, .. } = &job.kind {
                let delivery = Delivery {
                    device_id: job.device_id.clone(),
                    platform: job.platform,
                    state: DeliveryState::Failed,
                    attempts: 0,
                    error: "push queue full".into(),
                };
                if let Err(error) = self.store.record_delivery(challenge_id, delivery).await {
                    tracing::warn!(%error, "could not record a failed delivery");
                }
            }
        }
    }

    /// Tells the user's other devices that take pushes that `added` was enrolled
    /// (a push app, or a TOTP credential: either signs in), so that a method an
    /// attacker added with a phished enrollment code or setup page does not go
    /// unnoticed. The enrollment stands whatever happens here: it is committed
    /// already, and failing the call would only make the app retry a spent code. So
    /// a failure is logged, not returned.
    ///
    /// Called after the store committed `added`: of two devices enrolling at once,
    /// each lists the other and each is announced to the other.
    async fn announce_new_device(&self, added: &Device, method: EnrollmentKind) {
        let devices = match self.store.list_devices(&added.tenant, &added.user_id).await {
            Ok(devices) => devices,
            Err(error) => {
                tracing::warn!(%error, device_id = %added.id, "could not list devices to tell them of the new one");
                return;
            }
        };
        let mut notices = 0;
        for device in devices {
            if device.id == added.id || !device.takes_pushes() {
                continue;
            }
            let Some(platform) = device.platform else { continue };
            self.push(PushJob {
                kind: PushKind::NewDevice { new_device_id: added.id.clone(), method, enrolled_at: added.enrolled_at },
                tenant: added.tenant.clone(),
                device_id: device.id,
                platform,
                push_token: device.push_token,
                expires_at: added.enrolled_at.plus(NOTICE_LIFETIME),
            })
            .await;
            notices += 1;
        }
        tracing::info!(device_id = %added.id, notices, "new device announced to the user's other devices");
    }

    /// Tells the user's other phones that the challenge is over, so they take the
    /// prompt down. Only devices that were pushed the challenge get the message.
    /// `known`: the user's devices when the caller has them already (read with the
    /// answer), else they are listed here.
    async fn clear_other_devices(&self, challenge: &Challenge, answered_by: Option<&DeviceId>, known: Option<Vec<Device>>) {
        let listed = match known {
            Some(devices) => Ok(devices),
            None => self.store.list_devices(&challenge.tenant, &challenge.user_id).await,
        };
        let devices = match listed {
            Ok(devices) => devices,
            Err(error) => {
                tracing::warn!(%error, "could not list devices to clear their prompts");
                return;
            }
        };
        for device in devices {
            let pushed = challenge.deliveries.iter().any(|d| d.device_id == device.id);
            if !pushed || Some(&device.id) == answered_by || !device.takes_pushes() {
                continue;
            }
            let Some(platform) = device.platform else { continue };
            self.push(PushJob {
                kind: PushKind::Clear { challenge_id: challenge.id.clone(), state: challenge.state },
                tenant: challenge.tenant.clone(),
                device_id: device.id.clone(),
                platform,
                push_token: device.push_token.clone(),
                expires_at: challenge.expires_at,
            })
            .await;
        }
    }
}

fn too_many_devices(limit: u32) -> DomainError {
    DomainError::ResourceExhausted(format!("user_id: the user has {limit} devices already; remove one first"))
}
