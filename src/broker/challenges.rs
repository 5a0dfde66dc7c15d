//! The IdP's side of a sign-in: create a challenge (limits, number, pushes), read
//! it, watch it, cancel it.

use std::time::Duration;

use super::{Broker, ChallengeRequest, PushJob, PushKind, TenantLimits};
use crate::domain::challenge::{Challenge, ChallengeState, Delivery, Platform, Resolution};
use crate::domain::device::Device;
use crate::domain::error::DomainError;
use crate::domain::ids::{ChallengeId, ChallengeNumber, DeviceId, TenantId};
use crate::domain::ports::{BlockReason, ChallengeWatch, CreateFor, CreateOutcome, PushesFrom, Refusal, StoreError, UserBlock};
use crate::domain::time::Millis;
use crate::telemetry::metrics::{challenge_resolved, names};

/// How many times a create chooses its pushes again when the user's devices
/// changed in between (each time, the store hands back the devices as they stand).
const MAX_DEVICE_CHANGES: u32 = 3;

impl Broker {
    /// Creates a challenge for the user and pushes it to every device that takes
    /// pushes. Refused at once (RESOURCE_EXHAUSTED) past the tenant's share of
    /// `max_creates_in_flight`, past `max_creates_in_flight` itself, or when the push
    /// queue (or the tenant's share of it) has no room; the store applies the
    /// per-user limits and the idempotency key in the same atomic step as the insert.
    #[tracing::instrument(skip_all, fields(tenant = %tenant))]
    pub async fn create_challenge(&self, tenant: &TenantId, request: ChallengeRequest) -> Result<Challenge, DomainError> {
        let limits = self.limits_of(tenant);
        let ttl = challenge_ttl(&limits, request.ttl_seconds)?;
        // The tenant's own permit first: a tenant past its share is refused without
        // touching the global permits, which stay for the other tenants. A tenant not
        // configured (none reaches here through the API) has the global cap only.
        let own_permits = self.tenancy.load().get(tenant).and_then(|entry| entry.creating.clone());
        let _tenant_creating = match own_permits.map(tokio::sync::Semaphore::try_acquire_owned) {
            Some(Err(_)) => {
                return Err(shed(
                    tenant,
                    "server.creates_share_per_tenant",
                    format!(
                        "tenant {tenant} is creating {} challenges already, its share of server.max_creates_in_flight \
                         (server.creates_share_per_tenant); retry with backoff",
                        limits.max_creates_in_flight
                    ),
                ));
            }
            Some(Ok(permit)) => Some(permit),
            None => None,
        };
        let Ok(_creating) = self.creating.try_acquire() else {
            return Err(shed(
                tenant,
                "server.max_creates_in_flight",
                format!(
                    "the broker is creating {} challenges already (server.max_creates_in_flight); retry with backoff",
                    self.settings.max_creates_in_flight
                ),
            ));
        };
        // The store may answer the devices from what it read lately; its create
        // checks them in the same step as the insert and, if they changed (a phone
        // enrolled, removed or given a new token meanwhile), writes nothing and
        // hands them back to choose the pushes again. When it does not remember
        // them (`None`), its create chooses the pushes itself, within the room the
        // push queues have now, or hands the devices back when it cannot.
        let mut devices = self.store.challenge_devices(tenant, &request.user_id).await?;
        let mut attempts = 0;
        let (created, targets) = loop {
            let now = self.clock.now();
            let (challenge, pushes, targets) = match &devices {
                Some(devices) => {
                    // Counted here only: the store's own choice, when it could
                    // not make it, leaves the three tries whole.
                    attempts += 1;
                    if !devices.devices.iter().any(Device::answers_challenges) {
                        return Err(DomainError::FailedPrecondition(
                            "user_id: the user has no enrolled device that can answer a challenge".into(),
                        ));
                    }
                    let targets: Vec<&Device> = devices.devices.iter().filter(|d| d.takes_pushes()).collect();
                    if let Err(full) = self.dispatcher.room_for(tenant, targets.iter().filter_map(|d| d.platform)) {
                        return Err(shed(tenant, full.setting(), format!("{full}; retry shortly")));
                    }
                    let challenge = new_challenge(tenant, request.clone(), &targets, now, ttl)?;
                    let targets: Vec<PushTarget> = targets.into_iter().filter_map(PushTarget::of).collect();
                    (challenge, PushesFrom::Devices(devices.seen.as_deref()), targets)
                }
                None => {
                    let challenge = new_challenge(tenant, request.clone(), &[], now, ttl)?;
                    (challenge, PushesFrom::Store(self.dispatcher.room(tenant)), Vec::new())
                }
            };
            let context = challenge.context.clone();
            let outcome = match self.store.create_challenge_for(challenge, &limits.admission, now, pushes).await? {
                CreateFor::Done(outcome) => outcome,
                CreateFor::Chose(created, from) => {
                    let targets = created
                        .deliveries
                        .iter()
                        .filter_map(|delivery| from.devices.iter().find(|device| device.id == delivery.device_id))
                        .filter_map(PushTarget::of)
                        .collect();
                    break (created, targets);
                }
                CreateFor::DevicesChanged(now_enrolled) if attempts < MAX_DEVICE_CHANGES => {
                    devices = Some(now_enrolled);
                    continue;
                }
                CreateFor::DevicesChanged(_) => {
                    return Err(DomainError::StoreUnavailable(StoreError::unavailable(
                        self.store.backend(),
                        "the user's devices kept changing while the challenge was created; retry",
                    )));
                }
            };
            match outcome {
                CreateOutcome::Created(created) => break (created, targets),
                // The same request_id is a retry of the same sign-in only if it carries the
                // same context: otherwise a caller (or an attacker replaying an id) would be
                // handed a challenge, perhaps APPROVED already, of another sign-in.
                CreateOutcome::Existing(existing) if existing.context == context => {
                    tracing::debug!(challenge_id = %existing.id, "request_id seen before: returning its challenge");
                    return Ok(existing);
                }
                CreateOutcome::Existing(existing) => {
                    tracing::warn!(challenge_id = %existing.id, "request_id seen before with another sign-in context: refused");
                    return Err(DomainError::AlreadyExists(
                        "request_id: used already for a sign-in with another context; use a new request_id for each sign-in"
                            .into(),
                    ));
                }
                CreateOutcome::Refused(refusal) => return Err(refusal_error(refusal)),
            }
        };
        let pushes = u32::try_from(created.deliveries.len()).unwrap_or(u32::MAX);
        for target in targets {
            self.push(PushJob {
                kind: PushKind::Challenge { challenge_id: created.id.clone(), pushes },
                tenant: tenant.clone(),
                device_id: target.device_id,
                platform: target.platform,
                push_token: target.push_token,
                expires_at: created.expires_at,
            })
            .await;
        }
        tracing::info!(challenge_id = %created.id, pushes = created.deliveries.len(), "challenge created");
        metrics::counter!(names::CHALLENGES_CREATED, "tenant" => tenant.0.clone()).increment(1);
        Ok(created)
    }

    pub async fn get_challenge(&self, tenant: &TenantId, id: &ChallengeId) -> Result<Challenge, DomainError> {
        self.store.get_challenge(tenant, id, self.clock.now()).await?.ok_or(DomainError::NotFound("challenge"))
    }

    pub async fn watch_challenge(&self, tenant: &TenantId, id: &ChallengeId) -> Result<ChallengeWatch, DomainError> {
        self.store.watch_challenge(tenant, id, self.clock.now()).await?.ok_or(DomainError::NotFound("challenge"))
    }

    #[tracing::instrument(skip_all, fields(tenant = %tenant, challenge_id = %id))]
    pub async fn cancel_challenge(&self, tenant: &TenantId, id: &ChallengeId) -> Result<Challenge, DomainError> {
        let outcome = self
            .store
            .resolve_challenge(tenant, id, Resolution::cancelled(), self.clock.now())
            .await?
            .ok_or(DomainError::NotFound("challenge"))?;
        if outcome.accepted {
            tracing::info!("challenge cancelled");
            challenge_resolved(tenant, outcome.challenge.state, outcome.challenge.deny_reason);
            self.clear_other_devices(&outcome.challenge, None, None).await;
        }
        Ok(outcome.challenge)
    }
}

/// Where one push of a new challenge goes.
struct PushTarget {
    device_id: DeviceId,
    platform: Platform,
    push_token: String,
}

impl PushTarget {
    fn of(device: &Device) -> Option<Self> {
        Some(Self { device_id: device.id.clone(), platform: device.platform?, push_token: device.push_token.clone() })
    }
}

/// A new PENDING challenge with a fresh id and number, and a QUEUED delivery for
/// each device it will be pushed to.
fn new_challenge(
    tenant: &TenantId,
    request: ChallengeRequest,
    targets: &[&Device],
    now: Millis,
    ttl: Duration,
) -> Result<Challenge, DomainError> {
    Ok(Challenge {
        id: ChallengeId::generate()?,
        tenant: tenant.clone(),
        user_id: request.user_id,
        number: ChallengeNumber::generate()?,
        state: ChallengeState::Pending,
        deny_reason: None,
        context: request.context,
        created_at: now,
        expires_at: now.plus(ttl),
        resolved_at: None,
        resolved_by: None,
        deliveries: targets.iter().filter_map(|device| Delivery::queued(device)).collect(),
        request_id: request.request_id,
    })
}

/// A CreateChallenge refused for overload, counted by tenant and by the setting
/// whose limit was reached (the message names it too).
fn shed(tenant: &TenantId, setting: &'static str, message: String) -> DomainError {
    metrics::counter!(names::CHALLENGES_SHED, "tenant" => tenant.0.clone(), "limit" => setting).increment(1);
    tracing::debug!(limit = setting, "CreateChallenge shed");
    DomainError::ResourceExhausted(message)
}

fn refusal_error(refusal: Refusal) -> DomainError {
    match refusal {
        Refusal::Blocked(UserBlock { reason: BlockReason::FraudReported, .. }) => DomainError::FailedPrecondition(
            "user_id: the user reported a sign-in as fraud; new challenges are blocked until UnblockUser".into(),
        ),
        Refusal::Blocked(UserBlock { reason: BlockReason::WrongNumbers, until, .. }) => {
            let until = until.map_or_else(String::new, |u| format!(" until {} (Unix s)", u.as_unix_seconds()));
            DomainError::FailedPrecondition(format!(
                "user_id: too many wrong numbers; new challenges are blocked{until} or until UnblockUser"
            ))
        }
        Refusal::TooManyPending { limit } => {
            DomainError::ResourceExhausted(format!("user_id: the user has {limit} pending challenges already"))
        }
        Refusal::RateLimited { limit, window } => DomainError::ResourceExhausted(format!(
            "user_id: more than {limit} challenges for the user in {} seconds",
            window.as_secs()
        )),
    }
}

/// The challenge's lifetime: the tenant's default for 0, at most its maximum.
fn challenge_ttl(limits: &TenantLimits, ttl_seconds: u32) -> Result<Duration, DomainError> {
    let ttl = match ttl_seconds {
        0 => limits.default_ttl,
        seconds => Duration::from_secs(u64::from(seconds)),
    };
    if ttl > limits.max_ttl {
        return Err(DomainError::invalid("ttl_seconds", format!("is above the maximum of {} seconds", limits.max_ttl.as_secs())));
    }
    Ok(ttl)
}
