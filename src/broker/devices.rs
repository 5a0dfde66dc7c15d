//! The app's side after enrollment (every call proven by the device's key), and
//! the IdP's device management.

use super::{AnswerOutcome, Broker, PendingForDevice};
use crate::domain::challenge::{Challenge, ChallengeState, Decision, DenyReason, Platform, Resolution};
use crate::domain::device::{Device, DeviceProof};
use crate::domain::error::DomainError;
use crate::domain::ids::{ChallengeId, ChallengeNumber, DeviceId, TenantId, UserId};
use crate::domain::ports::{Answered, BlockReason, DeviceAnswer, UserBlock};
use crate::domain::time::Millis;
use crate::push::redact_token;
use crate::push::webpush::guard;
use crate::push::webpush::subscription::Subscription;
use crate::telemetry::metrics::challenge_resolved;

impl Broker {
    pub async fn list_devices(&self, tenant: &TenantId, user: &UserId) -> Result<Vec<Device>, DomainError> {
        Ok(self.store.list_devices(tenant, user).await?)
    }

    #[tracing::instrument(skip_all, fields(tenant = %tenant, device_id = %id))]
    pub async fn remove_device(&self, tenant: &TenantId, id: &DeviceId) -> Result<(), DomainError> {
        if self.store.remove_device(tenant, id).await? {
            tracing::info!("device removed");
            Ok(())
        } else {
            Err(DomainError::NotFound("device"))
        }
    }

    #[tracing::instrument(skip_all, fields(tenant = %tenant))]
    pub async fn unblock_user(&self, tenant: &TenantId, user: &UserId) -> Result<(), DomainError> {
        self.store.unblock_user(tenant, user).await?;
        tracing::info!("user unblocked");
        Ok(())
    }

    /// Checks a device's proof for `rpc` over `fields`; returns the device. A proof
    /// works once: the store remembers each use (device, RPC, timestamp, fields)
    /// until its timestamp leaves the window, so a captured call cannot be replayed
    /// (an old push token put back, a pending list read again).
    pub async fn authenticate_device(&self, proof: &DeviceProof, rpc: &str, fields: &[&str]) -> Result<Device, DomainError> {
        let device = self.check_proof(proof, rpc, fields).await?;
        let first_use =
            self.store.spend_proof(proof.use_key(rpc, fields), proof.replayable_until(self.settings.max_clock_skew)).await?;
        if !first_use {
            return Err(replayed());
        }
        Ok(device)
    }

    /// [`Broker::authenticate_device`] but for spending the proof, which the
    /// caller does (RespondToChallenge: with the answer, in one store operation).
    async fn check_proof(&self, proof: &DeviceProof, rpc: &str, fields: &[&str]) -> Result<Device, DomainError> {
        let device = self.store.get_device(&proof.device_id).await?;
        self.check_proof_of(device, proof, rpc, fields)
    }

    /// [`Broker::check_proof`] against `device` as the caller read it.
    fn check_proof_of(
        &self,
        device: Option<Device>,
        proof: &DeviceProof,
        rpc: &str,
        fields: &[&str],
    ) -> Result<Device, DomainError> {
        let device = device.ok_or_else(unknown_device)?;
        proof.verify(&device, rpc, fields, self.clock.now(), self.settings.max_clock_skew)?;
        // A tenant removed from the configuration: its devices' calls are refused
        // like its API keys (its data stays until an operator purges it).
        if !self.serves(&device.tenant) {
            tracing::warn!(tenant = %device.tenant, "a device of a tenant no longer configured called: refused");
            return Err(DomainError::unauthenticated("proof.device_id: this device's service is no longer served here"));
        }
        Ok(device)
    }

    #[tracing::instrument(skip_all, fields(device_id = %proof.device_id))]
    pub async fn update_push_token(&self, proof: &DeviceProof, push_token: &str) -> Result<(), DomainError> {
        let device = self.authenticate_device(proof, "UpdatePushToken", &[push_token]).await?;
        if device.platform != Some(Platform::WebPush) && !push_token.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(DomainError::invalid("push_token", "must be printable ASCII"));
        }
        if device.platform == Some(Platform::Apns) && !push_token.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(DomainError::invalid("push_token", "an APNs device token is hex"));
        }
        let push_token = match device.platform {
            Some(Platform::WebPush) => {
                let subscription = self.web_push_subscription(push_token)?;
                self.vet_web_push_endpoint(&subscription).await?;
                subscription.to_token()
            }
            _ => push_token.to_owned(),
        };
        if !self.store.set_push_token(&device.id, &push_token).await? {
            return Err(unknown_device());
        }
        tracing::info!(token = %redact_token(&push_token), "push token updated");
        Ok(())
    }

    /// A Web Push subscription's form (see `push::webpush`): INVALID_ARGUMENT naming
    /// the part (`push_token.endpoint`, `push_token.keys.auth`, ...) when it is wrong.
    pub(super) fn web_push_subscription(&self, raw: &str) -> Result<Subscription, DomainError> {
        Subscription::parse(raw, &self.settings.webpush_endpoints)
            .map_err(|error| DomainError::invalid(error.field, error.reason))
    }

    /// Where the subscription's endpoint resolves to: only public addresses pass.
    pub(super) async fn vet_web_push_endpoint(&self, subscription: &Subscription) -> Result<(), DomainError> {
        guard::resolve(&subscription.endpoint, &self.settings.webpush_endpoints)
            .await
            .map(drop)
            .map_err(|reason| DomainError::invalid("push_token.endpoint", reason))
    }

    pub async fn pending_for_device(&self, proof: &DeviceProof) -> Result<PendingForDevice, DomainError> {
        let device = self.authenticate_device(proof, "ListPendingChallenges", &[]).await?;
        let challenges = self.store.pending_challenges(&device.tenant, &device.user_id, self.clock.now()).await?;
        Ok(PendingForDevice { challenges, issuer: self.issuer(&device.tenant), account_name: device.account_name })
    }

    /// A device's answer. The proof is checked first; the store then resolves the
    /// challenge atomically, so of any number of racing answers exactly one is
    /// accepted. An approval with the wrong number denies (one try) and counts
    /// towards the wrong-number block; a fraud report blocks the user, also for a
    /// challenge that ended (cancelled, expired, denied) within
    /// `fraud_report_window`: the user saw a prompt they did not start, whatever
    /// became of it.
    #[tracing::instrument(skip_all, fields(device_id = %proof.device_id, challenge_id = %challenge_id))]
    pub async fn respond(
        &self,
        proof: &DeviceProof,
        challenge_id: &ChallengeId,
        decision: Decision,
        typed_number: &str,
    ) -> Result<AnswerOutcome, DomainError> {
        let (rpc, fields) = ("RespondToChallenge", [challenge_id.as_str(), decision.proto_name(), typed_number]);
        // The device as the store may remember it: its key and owner never change,
        // and the answer's own step refuses a device removed since (DeviceGone).
        let device = self.store.answering_device(&proof.device_id).await?;
        let device = self.check_proof_of(device, proof, rpc, &fields)?;
        let now = self.clock.now();
        let (on_match, otherwise) = decision.resolutions(device.id.clone());
        let answer = DeviceAnswer {
            device: &device,
            proof: proof.use_key(rpc, &fields),
            proof_keep_until: proof.replayable_until(self.settings.max_clock_skew),
            challenge: challenge_id,
            typed: ChallengeNumber::parse_typed(typed_number),
            on_match,
            otherwise,
        };
        let (resolution, outcome, devices) = match self.store.answer_challenge(&answer, now).await? {
            Answered::Done { resolution, outcome, devices } => (resolution, outcome, devices),
            Answered::Replayed => return Err(replayed()),
            Answered::DeviceGone => return Err(unknown_device()),
            Answered::Unknown => return Err(DomainError::NotFound("challenge")),
        };
        if !outcome.accepted {
            tracing::info!(state = ?outcome.challenge.state, "answer to a resolved challenge");
            if decision == Decision::ReportFraud && self.fraud_report_counts(&outcome.challenge, now) {
                tracing::warn!("fraud reported on an ended challenge: the user is blocked");
                self.block(&device.tenant, &device.user_id, fraud_block(now), now).await?;
            }
            return Ok(AnswerOutcome { accepted: false, challenge: outcome.challenge });
        }
        tracing::info!(state = ?resolution.state, deny_reason = ?resolution.deny_reason, "challenge resolved");
        challenge_resolved(&device.tenant, resolution.state, resolution.deny_reason);
        match (resolution.state, resolution.deny_reason) {
            (ChallengeState::FraudReported, _) => {
                self.block(&device.tenant, &device.user_id, fraud_block(now), now).await?;
                tracing::warn!("fraud reported: new challenges for the user blocked until UnblockUser");
            }
            (_, Some(DenyReason::WrongNumber)) => {
                let blocked =
                    self.store.record_wrong_number(&device.tenant, &device.user_id, &self.settings.wrong_numbers, now).await?;
                if blocked.is_some() {
                    tracing::warn!("too many wrong numbers: new challenges for the user blocked");
                    self.cancel_pending(&device.tenant, &device.user_id, now).await?;
                }
            }
            _ => {}
        }
        self.clear_other_devices(&outcome.challenge, Some(&device.id), devices).await;
        Ok(AnswerOutcome { accepted: true, challenge: outcome.challenge })
    }

    /// Whether a fraud report on a challenge that did not accept it still counts: it
    /// ended otherwise than approved (an approval the user gave stands) within the
    /// window.
    fn fraud_report_counts(&self, challenge: &Challenge, now: Millis) -> bool {
        let ended_otherwise =
            matches!(challenge.state, ChallengeState::Cancelled | ChallengeState::Expired | ChallengeState::Denied);
        let recent = challenge.resolved_at.is_some_and(|at| now < at.plus(self.settings.fraud_report_window));
        ended_otherwise && recent
    }

    /// Blocks the user (merged with a block in force by the store) and cancels
    /// their pending challenges, so that no other prompt of the attack can still be
    /// approved ("approve the other one, it's 42"); their watchers see CANCELLED.
    async fn block(&self, tenant: &TenantId, user: &UserId, block: UserBlock, now: Millis) -> Result<(), DomainError> {
        self.store.block_user(tenant, user, block, now).await?;
        self.cancel_pending(tenant, user, now).await
    }

    /// Cancels every pending challenge of the user. The block is in the store
    /// already, so no new challenge can appear meanwhile.
    async fn cancel_pending(&self, tenant: &TenantId, user: &UserId, now: Millis) -> Result<(), DomainError> {
        for pending in self.store.pending_challenges(tenant, user, now).await? {
            let cancelled = self.store.resolve_challenge(tenant, &pending.id, Resolution::cancelled(), now).await?;
            if let Some(outcome) = cancelled.filter(|outcome| outcome.accepted) {
                tracing::info!(challenge_id = %outcome.challenge.id, "pending challenge cancelled: the user is blocked");
                challenge_resolved(tenant, outcome.challenge.state, outcome.challenge.deny_reason);
                self.clear_other_devices(&outcome.challenge, None, None).await;
            }
        }
        Ok(())
    }
}

fn replayed() -> DomainError {
    tracing::warn!("device proof replayed: refused");
    DomainError::unauthenticated("proof: this proof was used already; sign every call afresh")
}

fn unknown_device() -> DomainError {
    DomainError::unauthenticated("proof.device_id: unknown or removed device")
}

fn fraud_block(now: Millis) -> UserBlock {
    UserBlock { reason: BlockReason::FraudReported, since: now, until: None }
}
