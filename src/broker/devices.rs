//! The app's side after enrollment (every call proven by the device's key), and
//! the IdP's device management.

use super::{AnswerOutcome, Broker, PendingForDevice};
use crate::domain::challenge::{ChallengeState, Decision, DenyReason, Platform};
use crate::domain::device::{Device, DeviceProof};
use crate::domain::error::DomainError;
use crate::domain::ids::{ChallengeId, ChallengeNumber, DeviceId, TenantId, UserId};
use crate::domain::ports::{BlockReason, UserBlock};
use crate::push::redact_token;
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

    /// Checks a device's proof for `rpc` over `fields`; returns the device.
    pub async fn authenticate_device(&self, proof: &DeviceProof, rpc: &str, fields: &[&str]) -> Result<Device, DomainError> {
        let device = self
            .store
            .get_device(&proof.device_id)
            .await?
            .ok_or_else(|| DomainError::unauthenticated("proof.device_id: unknown or removed device"))?;
        proof.verify(&device, rpc, fields, self.clock.now(), self.settings.max_clock_skew)?;
        Ok(device)
    }

    #[tracing::instrument(skip_all, fields(device_id = %proof.device_id))]
    pub async fn update_push_token(&self, proof: &DeviceProof, push_token: &str) -> Result<(), DomainError> {
        let device = self.authenticate_device(proof, "UpdatePushToken", &[push_token]).await?;
        if device.platform == Some(Platform::Apns) && !push_token.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(DomainError::invalid("push_token", "an APNs device token is hex"));
        }
        if !self.store.set_push_token(&device.id, push_token).await? {
            return Err(DomainError::unauthenticated("proof.device_id: unknown or removed device"));
        }
        tracing::info!(token = %redact_token(push_token), "push token updated");
        Ok(())
    }

    pub async fn pending_for_device(&self, proof: &DeviceProof) -> Result<PendingForDevice, DomainError> {
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
    ) -> Result<AnswerOutcome, DomainError> {
        let device = self
            .authenticate_device(proof, "RespondToChallenge", &[challenge_id.as_str(), decision.proto_name(), typed_number])
            .await?;
        let now = self.clock.now();
        let challenge = self
            .store
            .get_challenge(&device.tenant, challenge_id, now)
            .await?
            .filter(|c| c.user_id == device.user_id)
            .ok_or(DomainError::NotFound("challenge"))?;
        let typed = ChallengeNumber::parse_typed(typed_number);
        let resolution = decision.resolve(typed, challenge.number, device.id.clone());
        let outcome = self
            .store
            .resolve_challenge(&device.tenant, challenge_id, resolution.clone(), now)
            .await?
            .ok_or(DomainError::NotFound("challenge"))?;
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
            (_, Some(DenyReason::WrongNumber)) => {
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
}
