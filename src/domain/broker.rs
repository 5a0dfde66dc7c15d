//! [`Broker`]: every use case of pushmatch, one method each. The gRPC edge turns a
//! request into these arguments (already well-formed) and the result back into a
//! response; everything that decides lives here or in the store's atomic steps.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;

use super::challenge::{Challenge, ChallengeState, Decision, Delivery, DeliveryState, Platform, Resolution, SignInContext};
use super::device::{Device, DeviceProof, DevicePublicKey};
use super::enrollment::{self, Enrollment, EnrollmentKind};
use super::ids::{ChallengeId, ChallengeNumber, DeviceId, EnrollmentCode, EnrollmentId, TenantId, UserId};
use super::secrets::SecretBox;
use super::time::Clock;
use super::totp;
use crate::error::BrokerError;
use crate::push::dispatcher::Dispatcher;
use crate::push::{DeliveryReporter, PushJob, PushKind, redact_token};
use crate::store::{
    AdmissionPolicy, BlockReason, ChallengeWatch, CompleteOutcome, CreateOutcome, Refusal, Store, StrikePolicy, UserBlock,
};
use crate::telemetry::metrics::{challenge_resolved, names};

/// The knobs of the rules, from the configuration.
#[derive(Clone, Debug)]
pub struct BrokerSettings {
    pub default_ttl: Duration,
    pub max_ttl: Duration,
    pub admission: AdmissionPolicy,
    pub wrong_numbers: StrikePolicy,
    /// Wrong TOTP codes that lock VerifyTotp for a user.
    pub totp_lockout: StrikePolicy,
    pub enrollment_ttl: Duration,
    pub max_clock_skew: Duration,
    /// Where enrollment QR codes send apps.
    pub public_url: String,
    /// CreateChallenge calls worked on at once; past it they are refused at once.
    pub max_creates_in_flight: usize,
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
    tenants: HashMap<TenantId, Tenant>,
    secrets: SecretBox,
    /// One permit per CreateChallenge in flight: in a burst past what the store and
    /// the push queue take, a caller hears RESOURCE_EXHAUSTED at once and backs off,
    /// instead of waiting in a queue that only grows (BENCHMARKS.md, the herd).
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
        let tenants = tenants.into_iter().map(|t| (t.id.clone(), t)).collect();
        let creating = tokio::sync::Semaphore::new(settings.max_creates_in_flight);
        Self { store, dispatcher, clock, settings, tenants, secrets, creating }
    }

    pub fn store(&self) -> &Arc<dyn Store> {
        &self.store
    }

    fn issuer(&self, tenant: &TenantId) -> String {
        self.tenants.get(tenant).map_or_else(|| tenant.0.clone(), |t| t.display_name.clone())
    }

    // ---- the IdP's side ----

    #[tracing::instrument(skip_all, fields(tenant = %tenant))]
    pub async fn create_challenge(&self, tenant: &TenantId, request: ChallengeRequest) -> Result<Challenge, BrokerError> {
        let ttl = match request.ttl_seconds {
            0 => self.settings.default_ttl,
            seconds => Duration::from_secs(u64::from(seconds)),
        };
        if ttl > self.settings.max_ttl {
            return Err(BrokerError::invalid(
                "ttl_seconds",
                format!("is above the maximum of {} seconds", self.settings.max_ttl.as_secs()),
            ));
        }
        let Ok(_creating) = self.creating.try_acquire() else {
            metrics::counter!(names::CHALLENGES_SHED).increment(1);
            return Err(BrokerError::ResourceExhausted(format!(
                "the broker is creating {} challenges already (server.max_creates_in_flight); retry with backoff",
                self.settings.max_creates_in_flight
            )));
        };
        let devices = self.store.list_devices(tenant, &request.user_id).await?;
        if !devices.iter().any(Device::answers_challenges) {
            return Err(BrokerError::FailedPrecondition(
                "user_id: the user has no enrolled device that can answer a challenge".into(),
            ));
        }
        let targets: Vec<&Device> = devices.iter().filter(|d| d.takes_pushes()).collect();
        if !self.dispatcher.has_room_for(targets.len()) {
            return Err(BrokerError::ResourceExhausted("the push queue is full; retry shortly".into()));
        }

        let now = self.clock.now();
        let challenge = Challenge {
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
            deliveries: targets
                .iter()
                .filter_map(|device| {
                    Some(Delivery {
                        device_id: device.id.clone(),
                        platform: device.platform?,
                        state: DeliveryState::Queued,
                        attempts: 0,
                        error: String::new(),
                    })
                })
                .collect(),
            request_id: request.request_id,
        };

        let created = match self.store.create_challenge(challenge, &self.settings.admission, now).await? {
            CreateOutcome::Created(created) => created,
            CreateOutcome::Existing(existing) => {
                tracing::debug!(challenge_id = %existing.id, "request_id seen before: returning its challenge");
                return Ok(existing);
            }
            CreateOutcome::Refused(refusal) => return Err(refusal_error(refusal)),
        };
        for device in targets {
            let Some(platform) = device.platform else { continue };
            self.push(PushJob {
                kind: PushKind::Challenge,
                challenge_id: created.id.clone(),
                device_id: device.id.clone(),
                platform,
                push_token: device.push_token.clone(),
                expires_at: created.expires_at,
            })
            .await;
        }
        tracing::info!(challenge_id = %created.id, pushes = created.deliveries.len(), "challenge created");
        metrics::counter!(names::CHALLENGES_CREATED, "tenant" => tenant.0.clone()).increment(1);
        Ok(created)
    }

    /// Hands a job to the dispatcher. Room was checked before the challenge was
    /// created; if a concurrent burst took it meanwhile, the delivery reads FAILED
    /// and the app's pull fallback still finds the challenge.
    async fn push(&self, job: PushJob) {
        if let Err(full) = self.dispatcher.enqueue(job.clone()) {
            tracing::warn!(challenge_id = %job.challenge_id, "{full}");
            if job.kind == PushKind::Challenge {
                let delivery = Delivery {
                    device_id: job.device_id,
                    platform: job.platform,
                    state: DeliveryState::Failed,
                    attempts: 0,
                    error: "push queue full".into(),
                };
                if let Err(error) = self.store.record_delivery(&job.challenge_id, delivery).await {
                    tracing::warn!(%error, "could not record a failed delivery");
                }
            }
        }
    }

    pub async fn get_challenge(&self, tenant: &TenantId, id: &ChallengeId) -> Result<Challenge, BrokerError> {
        self.store.get_challenge(tenant, id, self.clock.now()).await?.ok_or(BrokerError::NotFound("challenge"))
    }

    pub async fn watch_challenge(&self, tenant: &TenantId, id: &ChallengeId) -> Result<ChallengeWatch, BrokerError> {
        self.store.watch_challenge(tenant, id, self.clock.now()).await?.ok_or(BrokerError::NotFound("challenge"))
    }

    #[tracing::instrument(skip_all, fields(tenant = %tenant, challenge_id = %id))]
    pub async fn cancel_challenge(&self, tenant: &TenantId, id: &ChallengeId) -> Result<Challenge, BrokerError> {
        let outcome = self
            .store
            .resolve_challenge(tenant, id, Resolution::cancelled(), self.clock.now())
            .await?
            .ok_or(BrokerError::NotFound("challenge"))?;
        if outcome.accepted {
            tracing::info!("challenge cancelled");
            challenge_resolved(outcome.challenge.state, outcome.challenge.deny_reason);
            self.clear_other_devices(&outcome.challenge, None).await;
        }
        Ok(outcome.challenge)
    }

    #[tracing::instrument(skip_all, fields(tenant = %tenant))]
    pub async fn begin_enrollment(
        &self,
        tenant: &TenantId,
        user_id: UserId,
        account_name: String,
        kind: EnrollmentKind,
    ) -> Result<BegunEnrollment, BrokerError> {
        let now = self.clock.now();
        let id = EnrollmentId::generate()?;
        let issuer = self.issuer(tenant);
        let (uri, code_digest, totp_secret) = match kind {
            EnrollmentKind::Push => {
                let code = EnrollmentCode::generate()?;
                (
                    enrollment::push_enrollment_uri(&self.settings.public_url, &code, &issuer, &account_name),
                    Some(code.digest()),
                    None,
                )
            }
            EnrollmentKind::Totp => {
                let secret = totp::generate_secret()?;
                let sealed = self.secrets.seal(&secret, id.as_str())?;
                (totp::otpauth_uri(&issuer, &account_name, &secret), None, Some(sealed))
            }
        };
        let enrollment = Enrollment {
            id,
            tenant: tenant.clone(),
            user_id,
            account_name,
            kind,
            code_digest,
            totp_secret,
            created_at: now,
            expires_at: now.plus(self.settings.enrollment_ttl),
            completed: false,
            device_id: None,
        };
        let qr_png = enrollment::qr_png(&uri)?;
        self.store.insert_enrollment(enrollment.clone()).await?;
        tracing::info!(enrollment_id = %enrollment.id, "enrollment begun");
        Ok(BegunEnrollment { enrollment, uri, qr_png })
    }

    pub async fn get_enrollment(&self, tenant: &TenantId, id: &EnrollmentId) -> Result<Enrollment, BrokerError> {
        self.store.get_enrollment(tenant, id).await?.ok_or(BrokerError::NotFound("enrollment"))
    }

    pub fn enrollment_state(&self, enrollment: &Enrollment) -> enrollment::EnrollmentState {
        enrollment.state(self.clock.now())
    }

    pub async fn list_devices(&self, tenant: &TenantId, user: &UserId) -> Result<Vec<Device>, BrokerError> {
        Ok(self.store.list_devices(tenant, user).await?)
    }

    #[tracing::instrument(skip_all, fields(tenant = %tenant, device_id = %id))]
    pub async fn remove_device(&self, tenant: &TenantId, id: &DeviceId) -> Result<(), BrokerError> {
        if self.store.remove_device(tenant, id).await? {
            tracing::info!("device removed");
            Ok(())
        } else {
            Err(BrokerError::NotFound("device"))
        }
    }

    #[tracing::instrument(skip_all, fields(tenant = %tenant))]
    pub async fn unblock_user(&self, tenant: &TenantId, user: &UserId) -> Result<(), BrokerError> {
        self.store.unblock_user(tenant, user).await?;
        tracing::info!("user unblocked");
        Ok(())
    }

    /// Activates a TOTP enrollment with the first code the user's app shows. That
    /// code's step is spent: it cannot be used again at VerifyTotp.
    #[tracing::instrument(skip_all, fields(tenant = %tenant, enrollment_id = %id))]
    pub async fn confirm_totp_enrollment(
        &self,
        tenant: &TenantId,
        id: &EnrollmentId,
        code: &str,
    ) -> Result<Enrollment, BrokerError> {
        totp::check_code_shape(code)?;
        let now = self.clock.now();
        let enrollment = self.get_enrollment(tenant, id).await?;
        if enrollment.kind != EnrollmentKind::Totp {
            return Err(BrokerError::FailedPrecondition("enrollment_id: a PUSH enrollment completes from the app".into()));
        }
        match enrollment.state(now) {
            enrollment::EnrollmentState::Completed => return Err(already_confirmed()),
            enrollment::EnrollmentState::Expired => {
                return Err(BrokerError::FailedPrecondition("enrollment_id: this enrollment has expired".into()));
            }
            enrollment::EnrollmentState::Pending => {}
        }
        let sealed = enrollment.totp_secret.as_ref().ok_or_else(already_confirmed)?;
        let secret = self.secrets.open(sealed, enrollment.id.as_str())?;
        let step = totp::matching_step(&secret, code, now)
            .ok_or_else(|| BrokerError::invalid("code", "is not the authenticator's current code"))?;
        let device_id = DeviceId::generate()?;
        let credential = Device {
            totp_secret: Some(self.secrets.seal(&secret, device_id.as_str())?),
            totp_last_step: Some(step),
            id: device_id,
            tenant: tenant.clone(),
            user_id: enrollment.user_id.clone(),
            display_name: "Authenticator app".into(),
            account_name: enrollment.account_name.clone(),
            platform: None,
            push_token: String::new(),
            push_enabled: false,
            public_key: None,
            enrolled_at: now,
            last_used_at: None,
        };
        match self.store.confirm_totp_enrollment(tenant, id, credential, now).await? {
            CompleteOutcome::Completed(completed) => {
                tracing::info!("totp enrollment confirmed");
                Ok(*completed)
            }
            CompleteOutcome::UnknownCode => Err(BrokerError::NotFound("enrollment")),
            CompleteOutcome::AlreadyUsed => Err(already_confirmed()),
            CompleteOutcome::Expired => Err(BrokerError::FailedPrecondition("enrollment_id: this enrollment has expired".into())),
        }
    }

    /// Checks a 6-digit code against the user's TOTP credentials: the current step
    /// and one either side, each step of a credential accepted once. Wrong, stale and
    /// replayed codes count towards the lockout; once it is in force the call is
    /// refused with RESOURCE_EXHAUSTED until it ends.
    #[tracing::instrument(skip_all, fields(tenant = %tenant))]
    pub async fn verify_totp(&self, tenant: &TenantId, user: &UserId, code: &str) -> Result<TotpVerdict, BrokerError> {
        totp::check_code_shape(code)?;
        let now = self.clock.now();
        if let Some(until) = self.store.totp_locked_until(tenant, user, now).await? {
            return Err(BrokerError::ResourceExhausted(format!(
                "user_id: too many wrong codes; VerifyTotp is locked for the user until {} (Unix s)",
                until.as_unix_seconds()
            )));
        }
        for device in self.store.list_devices(tenant, user).await? {
            let Some(sealed) = &device.totp_secret else { continue };
            let secret = self.secrets.open(sealed, device.id.as_str())?;
            let Some(step) = totp::matching_step(&secret, code, now) else { continue };
            if self.store.spend_totp_step(&device.id, step).await? {
                if let Err(error) = self.store.touch_device(&device.id, now).await {
                    tracing::warn!(%error, "could not record the credential's last use");
                }
                tracing::info!(device_id = %device.id, "totp code accepted");
                return Ok(TotpVerdict { valid: true, device_id: Some(device.id) });
            }
        }
        if self.store.record_totp_failure(tenant, user, &self.settings.totp_lockout, now).await?.is_some() {
            tracing::warn!("too many wrong totp codes: verification locked for the user");
        } else {
            tracing::info!("totp code refused");
        }
        Ok(TotpVerdict { valid: false, device_id: None })
    }

    // ---- the app's side ----

    #[tracing::instrument(skip_all)]
    pub async fn complete_enrollment(&self, request: DeviceEnrollment) -> Result<CompletedEnrollment, BrokerError> {
        let now = self.clock.now();
        let digest = request.code.digest();
        let enrollment = self
            .store
            .enrollment_by_code(&digest)
            .await?
            .filter(|e| e.kind == EnrollmentKind::Push)
            .ok_or(BrokerError::NotFound("enrollment for this enrollment_code"))?;
        let device_id = DeviceId::generate()?;
        let totp_secret = totp::generate_secret()?;
        let device = Device {
            totp_secret: Some(self.secrets.seal(&totp_secret, device_id.as_str())?),
            id: device_id,
            tenant: enrollment.tenant.clone(),
            user_id: enrollment.user_id.clone(),
            display_name: request.display_name,
            account_name: enrollment.account_name.clone(),
            platform: Some(request.platform),
            push_enabled: !request.push_token.is_empty(),
            push_token: request.push_token,
            public_key: Some(request.public_key),
            totp_last_step: None,
            enrolled_at: now,
            last_used_at: None,
        };
        // The store spends the code and adds the device in one step, re-checking the
        // enrollment's state: of two racing completions exactly one adds a device.
        match self.store.complete_enrollment(&digest, device.clone(), now).await? {
            CompleteOutcome::Completed(enrollment) => {
                tracing::info!(enrollment_id = %enrollment.id, device_id = %device.id, token = %redact_token(&device.push_token), "device enrolled");
                Ok(CompletedEnrollment {
                    issuer: self.issuer(&enrollment.tenant),
                    account_name: enrollment.account_name,
                    device,
                    totp_secret,
                })
            }
            CompleteOutcome::UnknownCode => Err(BrokerError::NotFound("enrollment for this enrollment_code")),
            CompleteOutcome::AlreadyUsed => {
                Err(BrokerError::FailedPrecondition("enrollment_code: this enrollment was completed already".into()))
            }
            CompleteOutcome::Expired => {
                Err(BrokerError::FailedPrecondition("enrollment_code: this enrollment has expired".into()))
            }
        }
    }

    /// Checks a device's proof for `rpc` over `fields`; returns the device.
    pub async fn authenticate_device(&self, proof: &DeviceProof, rpc: &str, fields: &[&str]) -> Result<Device, BrokerError> {
        let device = self
            .store
            .get_device(&proof.device_id)
            .await?
            .ok_or_else(|| BrokerError::unauthenticated("proof.device_id: unknown or removed device"))?;
        proof.verify(&device, rpc, fields, self.clock.now(), self.settings.max_clock_skew)?;
        Ok(device)
    }

    #[tracing::instrument(skip_all, fields(device_id = %proof.device_id))]
    pub async fn update_push_token(&self, proof: &DeviceProof, push_token: &str) -> Result<(), BrokerError> {
        let device = self.authenticate_device(proof, "UpdatePushToken", &[push_token]).await?;
        if device.platform == Some(Platform::Apns) && !push_token.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(BrokerError::invalid("push_token", "an APNs device token is hex"));
        }
        if !self.store.set_push_token(&device.id, push_token).await? {
            return Err(BrokerError::unauthenticated("proof.device_id: unknown or removed device"));
        }
        tracing::info!(token = %redact_token(push_token), "push token updated");
        Ok(())
    }

    pub async fn pending_for_device(&self, proof: &DeviceProof) -> Result<PendingForDevice, BrokerError> {
        let device = self.authenticate_device(proof, "ListPendingChallenges", &[]).await?;
        let challenges = self.store.pending_challenges(&device.tenant, &device.user_id, self.clock.now()).await?;
        Ok(PendingForDevice { challenges, issuer: self.issuer(&device.tenant), account_name: device.account_name })
    }

    /// A device's answer. The proof is checked first; the store then resolves the
    /// challenge atomically, so of any number of racing answers exactly one is
    /// accepted. An approval with the wrong number denies (one try) and counts
    /// towards the wrong-number block; a fraud report blocks the user.
    #[tracing::instrument(skip_all, fields(device_id = %proof.device_id, challenge_id = %challenge_id))]
    pub async fn respond(
        &self,
        proof: &DeviceProof,
        challenge_id: &ChallengeId,
        decision: Decision,
        typed_number: &str,
    ) -> Result<AnswerOutcome, BrokerError> {
        let device = self
            .authenticate_device(proof, "RespondToChallenge", &[challenge_id.as_str(), decision.proto_name(), typed_number])
            .await?;
        let now = self.clock.now();
        let challenge = self
            .store
            .get_challenge(&device.tenant, challenge_id, now)
            .await?
            .filter(|c| c.user_id == device.user_id)
            .ok_or(BrokerError::NotFound("challenge"))?;
        let typed = ChallengeNumber::parse_typed(typed_number);
        let resolution = decision.resolve(typed, challenge.number, device.id.clone());
        let outcome = self
            .store
            .resolve_challenge(&device.tenant, challenge_id, resolution.clone(), now)
            .await?
            .ok_or(BrokerError::NotFound("challenge"))?;
        if let Err(error) = self.store.touch_device(&device.id, now).await {
            tracing::warn!(%error, "could not record the device's last use");
        }
        if !outcome.accepted {
            tracing::info!(state = ?outcome.challenge.state, "answer to a resolved challenge");
            return Ok(AnswerOutcome { accepted: false, challenge: outcome.challenge });
        }
        tracing::info!(state = ?resolution.state, deny_reason = ?resolution.deny_reason, "challenge resolved");
        challenge_resolved(resolution.state, resolution.deny_reason);
        match (resolution.state, resolution.deny_reason) {
            (ChallengeState::FraudReported, _) => {
                let block = UserBlock { reason: BlockReason::FraudReported, since: now, until: None };
                self.store.block_user(&device.tenant, &device.user_id, block).await?;
                tracing::warn!("fraud reported: new challenges for the user blocked until UnblockUser");
            }
            (_, Some(super::challenge::DenyReason::WrongNumber)) => {
                let blocked =
                    self.store.record_wrong_number(&device.tenant, &device.user_id, &self.settings.wrong_numbers, now).await?;
                if blocked.is_some() {
                    tracing::warn!("too many wrong numbers: new challenges for the user blocked");
                }
            }
            _ => {}
        }
        self.clear_other_devices(&outcome.challenge, Some(&device.id)).await;
        Ok(AnswerOutcome { accepted: true, challenge: outcome.challenge })
    }

    /// Tells the user's other phones that the challenge is over, so they take the
    /// prompt down. Only devices that were pushed the challenge get the message.
    async fn clear_other_devices(&self, challenge: &Challenge, answered_by: Option<&DeviceId>) {
        let devices = match self.store.list_devices(&challenge.tenant, &challenge.user_id).await {
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
                kind: PushKind::Clear { state: challenge.state },
                challenge_id: challenge.id.clone(),
                device_id: device.id.clone(),
                platform,
                push_token: device.push_token.clone(),
                expires_at: challenge.expires_at,
            })
            .await;
        }
    }
}

fn already_confirmed() -> BrokerError {
    BrokerError::FailedPrecondition("enrollment_id: this enrollment was confirmed already".into())
}

fn refusal_error(refusal: Refusal) -> BrokerError {
    match refusal {
        Refusal::Blocked(UserBlock { reason: BlockReason::FraudReported, .. }) => BrokerError::FailedPrecondition(
            "user_id: the user reported a sign-in as fraud; new challenges are blocked until UnblockUser".into(),
        ),
        Refusal::Blocked(UserBlock { reason: BlockReason::WrongNumbers, until, .. }) => {
            let until = until.map_or_else(String::new, |u| format!(" until {} (Unix s)", u.as_unix_seconds()));
            BrokerError::FailedPrecondition(format!(
                "user_id: too many wrong numbers; new challenges are blocked{until} or until UnblockUser"
            ))
        }
        Refusal::TooManyPending { limit } => {
            BrokerError::ResourceExhausted(format!("user_id: the user has {limit} pending challenges already"))
        }
        Refusal::RateLimited { limit, window } => BrokerError::ResourceExhausted(format!(
            "user_id: more than {limit} challenges for the user in {} seconds",
            window.as_secs()
        )),
    }
}

/// Records the dispatcher's progress on the challenge (waking its watchers) and
/// turns pushes off for devices whose token is dead.
pub struct DeliveryRecorder {
    store: Arc<dyn Store>,
}

impl DeliveryRecorder {
    pub fn new(store: Arc<dyn Store>) -> Self {
        Self { store }
    }
}

#[async_trait]
impl DeliveryReporter for DeliveryRecorder {
    async fn report(&self, job: &PushJob, state: DeliveryState, attempts: u32, error: &str) {
        if state == DeliveryState::Unregistered
            && let Err(store_error) = self.store.disable_push(&job.device_id, &job.push_token).await
        {
            tracing::warn!(error = %store_error, "could not turn pushes off for a dead token");
        }
        if job.kind != PushKind::Challenge {
            return;
        }
        let delivery =
            Delivery { device_id: job.device_id.clone(), platform: job.platform, state, attempts, error: error.to_owned() };
        if let Err(store_error) = self.store.record_delivery(&job.challenge_id, delivery).await {
            tracing::warn!(error = %store_error, challenge_id = %job.challenge_id, "could not record a delivery");
        }
    }
}
