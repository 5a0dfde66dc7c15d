//! TOTP: confirming an authenticator-app enrollment with its first code, and
//! checking codes at sign-in (the offline fallback).

use super::{Broker, TotpVerdict};
use crate::domain::device::Device;
use crate::domain::enrollment::{self, Enrollment, EnrollmentKind};
use crate::domain::error::DomainError;
use crate::domain::ids::{DeviceId, EnrollmentId, TenantId, UserId};
use crate::domain::ports::{CompleteOutcome, TotpAttempt};
use crate::domain::totp;

impl Broker {
    /// Activates a TOTP enrollment with the first code the user's app shows. That
    /// code's step is spent: it cannot be used again at VerifyTotp. The credential
    /// signs in as a phone does, so the user's devices that take pushes are told of
    /// it as of a new phone.
    #[tracing::instrument(skip_all, fields(tenant = %tenant, enrollment_id = %id))]
    pub async fn confirm_totp_enrollment(
        &self,
        tenant: &TenantId,
        id: &EnrollmentId,
        code: &str,
    ) -> Result<Enrollment, DomainError> {
        totp::check_code_shape(code)?;
        let now = self.clock.now();
        let enrollment = self.get_enrollment(tenant, id).await?;
        if enrollment.kind != EnrollmentKind::Totp {
            return Err(DomainError::FailedPrecondition("enrollment_id: a PUSH enrollment completes from the app".into()));
        }
        match enrollment.state(now) {
            enrollment::EnrollmentState::Completed => return Err(already_confirmed()),
            enrollment::EnrollmentState::Expired => {
                return Err(DomainError::FailedPrecondition("enrollment_id: this enrollment has expired".into()));
            }
            enrollment::EnrollmentState::Pending => {}
        }
        let sealed = enrollment.totp_secret.as_ref().ok_or_else(already_confirmed)?;
        let secret = self.secrets.open(sealed, enrollment.id.as_str())?;
        let step = totp::matching_step(&secret, code, now)
            .ok_or_else(|| DomainError::invalid("code", "is not the authenticator's current code"))?;
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
        match self
            .store
            .confirm_totp_enrollment(tenant, id, credential.clone(), &self.limits_of(tenant).enrollment_limits, now)
            .await?
        {
            CompleteOutcome::Completed(completed) => {
                tracing::info!(device_id = %credential.id, "totp enrollment confirmed");
                self.announce_new_device(&credential, EnrollmentKind::Totp).await;
                Ok(*completed)
            }
            CompleteOutcome::UnknownCode => Err(DomainError::NotFound("enrollment")),
            CompleteOutcome::AlreadyUsed => Err(already_confirmed()),
            CompleteOutcome::Expired => Err(DomainError::FailedPrecondition("enrollment_id: this enrollment has expired".into())),
            CompleteOutcome::TooManyDevices { limit } => Err(super::too_many_devices(limit)),
            // A TOTP credential has no device key.
            CompleteOutcome::KeyInUse => Err(DomainError::Internal("a TOTP credential refused for its key".into())),
        }
    }

    /// Checks a 6-digit code against the user's TOTP credentials: the current step
    /// and one either side, each step of a credential accepted once.
    ///
    /// Guessing is bounded in the store, before any code is compared: each attempt
    /// is reserved atomically (so parallel guesses count too) and counts as wrong
    /// unless it was right; `limits.totp_failure_limit` in the window lock VerifyTotp
    /// for a while, and `limits.totp_max_consecutive_failures` since the last right
    /// code lock it until UnblockUser. A user with no TOTP credential gets `valid =
    /// false` and nothing is stored for them, so random user ids cost no memory.
    #[tracing::instrument(skip_all, fields(tenant = %tenant))]
    pub async fn verify_totp(&self, tenant: &TenantId, user: &UserId, code: &str) -> Result<TotpVerdict, DomainError> {
        totp::check_code_shape(code)?;
        let now = self.clock.now();
        let credentials: Vec<Device> =
            self.store.list_devices(tenant, user).await?.into_iter().filter(|device| device.totp_secret.is_some()).collect();
        if credentials.is_empty() {
            tracing::info!("totp code for a user without a totp credential");
            return Ok(TotpVerdict { valid: false, device_id: None });
        }
        match self.store.reserve_totp_attempt(tenant, user, &self.settings.totp_lockout, now).await? {
            TotpAttempt::Allowed => {}
            TotpAttempt::Locked { until } => {
                tracing::warn!("totp attempt refused: verification locked for the user");
                let until = until.map_or_else(
                    || "until UnblockUser".to_owned(),
                    |until| format!("until {} (Unix s)", until.as_unix_seconds()),
                );
                return Err(DomainError::ResourceExhausted(format!(
                    "user_id: too many wrong codes; VerifyTotp is locked for the user {until}"
                )));
            }
        }
        for device in credentials {
            let Some(sealed) = &device.totp_secret else { continue };
            let secret = self.secrets.open(sealed, device.id.as_str())?;
            let Some(step) = totp::matching_step(&secret, code, now) else { continue };
            if self.store.spend_totp_step(&device.id, step).await? {
                self.store.totp_attempt_succeeded(tenant, user, now).await?;
                if let Err(error) = self.store.touch_device(&device.id, now).await {
                    tracing::warn!(%error, "could not record the credential's last use");
                }
                tracing::info!(device_id = %device.id, "totp code accepted");
                return Ok(TotpVerdict { valid: true, device_id: Some(device.id) });
            }
        }
        tracing::info!("totp code refused");
        Ok(TotpVerdict { valid: false, device_id: None })
    }
}

fn already_confirmed() -> DomainError {
    DomainError::FailedPrecondition("enrollment_id: this enrollment was confirmed already".into())
}
