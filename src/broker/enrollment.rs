//! Enrollment: the setup page begins it (a QR code for a push device, or an
//! otpauth URI for any authenticator app), and the app completes it with the
//! one-time code, its push token and its public key.

use super::{BegunEnrollment, Broker, CompletedEnrollment, DeviceEnrollment};
use crate::domain::challenge::Platform;
use crate::domain::device::Device;
use crate::domain::enrollment::{self, Enrollment, EnrollmentKind};
use crate::domain::error::DomainError;
use crate::domain::ids::{DeviceId, EnrollmentCode, EnrollmentId, TenantId, UserId};
use crate::domain::ports::{CompleteOutcome, InsertOutcome};
use crate::domain::totp;
use crate::push::redact_token;

impl Broker {
    #[tracing::instrument(skip_all, fields(tenant = %tenant))]
    pub async fn begin_enrollment(
        &self,
        tenant: &TenantId,
        user_id: UserId,
        account_name: String,
        kind: EnrollmentKind,
    ) -> Result<BegunEnrollment, DomainError> {
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
        match self.store.insert_enrollment(enrollment.clone(), &self.limits_of(tenant).enrollment_limits, now).await? {
            InsertOutcome::Inserted => {}
            InsertOutcome::TooManyOpen { limit } => {
                return Err(DomainError::ResourceExhausted(format!(
                    "user_id: the user has {limit} open enrollments already; complete one or let it expire"
                )));
            }
        }
        tracing::info!(enrollment_id = %enrollment.id, "enrollment begun");
        Ok(BegunEnrollment { enrollment, uri, qr_png })
    }

    pub async fn get_enrollment(&self, tenant: &TenantId, id: &EnrollmentId) -> Result<Enrollment, DomainError> {
        self.store.get_enrollment(tenant, id).await?.ok_or(DomainError::NotFound("enrollment"))
    }

    pub fn enrollment_state(&self, enrollment: &Enrollment) -> enrollment::EnrollmentState {
        enrollment.state(self.clock.now())
    }

    /// The app's side: spends the code and adds the device, then tells the user's
    /// other devices that take pushes (a notice push) that a device was added.
    #[tracing::instrument(skip_all)]
    pub async fn complete_enrollment(&self, mut request: DeviceEnrollment) -> Result<CompletedEnrollment, DomainError> {
        let now = self.clock.now();
        // The subscription's form first; where its endpoint resolves to only once
        // the code is known good, so a made-up code sets off no DNS lookup.
        let subscription = match request.platform {
            Platform::WebPush if !request.push_token.is_empty() => Some(self.web_push_subscription(&request.push_token)?),
            _ => None,
        };
        let digest = request.code.digest();
        let enrollment = self
            .store
            .enrollment_by_code(&digest)
            .await?
            .filter(|e| e.kind == EnrollmentKind::Push)
            .ok_or(DomainError::NotFound("enrollment for this enrollment_code"))?;
        if !self.serves(&enrollment.tenant) {
            return Err(DomainError::FailedPrecondition(
                "enrollment_code: the service this enrollment was for no longer takes enrollments here".into(),
            ));
        }
        if let Some(subscription) = subscription {
            self.vet_web_push_endpoint(&subscription).await?;
            request.push_token = subscription.to_token();
        }
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
        match self
            .store
            .complete_enrollment(&digest, device.clone(), &self.limits_of(&device.tenant).enrollment_limits, now)
            .await?
        {
            CompleteOutcome::Completed(enrollment) => {
                tracing::info!(enrollment_id = %enrollment.id, device_id = %device.id, token = %redact_token(&device.push_token), "device enrolled");
                self.announce_new_device(&device, EnrollmentKind::Push).await;
                Ok(CompletedEnrollment {
                    issuer: self.issuer(&enrollment.tenant),
                    account_name: enrollment.account_name,
                    device,
                    totp_secret,
                })
            }
            CompleteOutcome::UnknownCode => Err(DomainError::NotFound("enrollment for this enrollment_code")),
            CompleteOutcome::AlreadyUsed => {
                Err(DomainError::FailedPrecondition("enrollment_code: this enrollment was completed already".into()))
            }
            CompleteOutcome::Expired => {
                Err(DomainError::FailedPrecondition("enrollment_code: this enrollment has expired".into()))
            }
            CompleteOutcome::TooManyDevices { limit } => Err(super::too_many_devices(limit)),
            CompleteOutcome::KeyInUse => {
                Err(DomainError::AlreadyExists("public_key: this key is enrolled already; make a new key pair".into()))
            }
        }
    }
}
