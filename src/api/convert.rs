//! Conversions between the generated types and the domain's. Validation of request
//! fields lives here, in `TryFrom` impls whose errors name the proto field.

use prost_types::Timestamp;

use crate::broker::{ChallengeRequest, DeviceEnrollment};
use crate::domain::challenge::{Challenge, ChallengeState, Decision, DeliveryState, DenyReason, Platform, SignInContext};
use crate::domain::device::{Device, DeviceProof, DevicePublicKey, KeyAlgorithm};
use crate::domain::enrollment::{Enrollment, EnrollmentKind, EnrollmentState};
use crate::domain::error::DomainError;
use crate::domain::ids::{DeviceId, EnrollmentCode, UserId, check_text};
use crate::domain::time::Millis;
use crate::pb;

pub const MAX_REQUEST_ID_BYTES: usize = 128;
pub const MAX_PUSH_TOKEN_BYTES: usize = 4096;
pub const MAX_DISPLAY_NAME_BYTES: usize = 256;
pub const MAX_SIGNATURE_BYTES: usize = 512;

pub fn timestamp(at: Millis) -> Timestamp {
    Timestamp { seconds: at.0.div_euclid(1000), nanos: i32::try_from(at.0.rem_euclid(1000) * 1_000_000).unwrap_or(0) }
}

fn optional_timestamp(at: Option<Millis>) -> Option<Timestamp> {
    at.map(timestamp)
}

pub fn platform_to_pb(platform: Option<Platform>) -> pb::Platform {
    match platform {
        Some(Platform::Apns) => pb::Platform::Apns,
        Some(Platform::Fcm) => pb::Platform::Fcm,
        Some(Platform::WebPush) => pb::Platform::Webpush,
        None => pb::Platform::Unspecified,
    }
}

pub fn state_to_pb(state: ChallengeState) -> pb::ChallengeState {
    match state {
        ChallengeState::Pending => pb::ChallengeState::Pending,
        ChallengeState::Approved => pb::ChallengeState::Approved,
        ChallengeState::Denied => pb::ChallengeState::Denied,
        ChallengeState::Expired => pb::ChallengeState::Expired,
        ChallengeState::Cancelled => pb::ChallengeState::Cancelled,
        ChallengeState::FraudReported => pb::ChallengeState::FraudReported,
    }
}

pub fn deny_reason_to_pb(reason: Option<DenyReason>) -> pb::DenyReason {
    match reason {
        Some(DenyReason::UserDenied) => pb::DenyReason::UserDenied,
        Some(DenyReason::WrongNumber) => pb::DenyReason::WrongNumber,
        None => pb::DenyReason::Unspecified,
    }
}

fn delivery_state_to_pb(state: DeliveryState) -> pb::DeliveryState {
    match state {
        DeliveryState::Queued => pb::DeliveryState::Queued,
        DeliveryState::Sent => pb::DeliveryState::Sent,
        DeliveryState::Failed => pb::DeliveryState::Failed,
        DeliveryState::Unregistered => pb::DeliveryState::Unregistered,
    }
}

fn context_to_pb(context: &SignInContext) -> pb::SignInContext {
    pb::SignInContext {
        application: context.application.clone(),
        ip_address: context.ip_address.clone(),
        location: context.location.clone(),
        user_agent: context.user_agent.clone(),
    }
}

/// The IdP's view of a challenge, number included (the sign-in page shows it).
pub fn challenge_to_pb(challenge: &Challenge) -> pb::Challenge {
    pb::Challenge {
        challenge_id: challenge.id.to_string(),
        user_id: challenge.user_id.to_string(),
        number: challenge.number.to_digits(),
        state: state_to_pb(challenge.state).into(),
        deny_reason: deny_reason_to_pb(challenge.deny_reason).into(),
        context: Some(context_to_pb(&challenge.context)),
        created_at: Some(timestamp(challenge.created_at)),
        expires_at: Some(timestamp(challenge.expires_at)),
        resolved_at: optional_timestamp(challenge.resolved_at),
        resolved_by_device_id: challenge.resolved_by.as_ref().map(ToString::to_string).unwrap_or_default(),
        deliveries: challenge
            .deliveries
            .iter()
            .map(|d| pb::Delivery {
                device_id: d.device_id.to_string(),
                platform: platform_to_pb(Some(d.platform)).into(),
                state: delivery_state_to_pb(d.state).into(),
                attempts: d.attempts,
                error: d.error.clone(),
            })
            .collect(),
    }
}

/// The app's view of a pending challenge: no number, ever.
pub fn pending_to_pb(challenge: &Challenge, account_name: &str, issuer: &str) -> pb::PendingChallenge {
    pb::PendingChallenge {
        challenge_id: challenge.id.to_string(),
        context: Some(context_to_pb(&challenge.context)),
        created_at: Some(timestamp(challenge.created_at)),
        expires_at: Some(timestamp(challenge.expires_at)),
        account_name: account_name.to_owned(),
        issuer: issuer.to_owned(),
    }
}

pub fn device_to_pb(device: &Device) -> pb::Device {
    pb::Device {
        device_id: device.id.to_string(),
        user_id: device.user_id.to_string(),
        display_name: device.display_name.clone(),
        platform: platform_to_pb(device.platform).into(),
        push_enabled: device.takes_pushes(),
        has_totp: device.has_totp(),
        enrolled_at: Some(timestamp(device.enrolled_at)),
        last_used_at: optional_timestamp(device.last_used_at),
    }
}

pub fn enrollment_to_pb(enrollment: &Enrollment, state: EnrollmentState, uri: String, qr_png: Vec<u8>) -> pb::Enrollment {
    pb::Enrollment {
        enrollment_id: enrollment.id.to_string(),
        user_id: enrollment.user_id.to_string(),
        kind: match enrollment.kind {
            EnrollmentKind::Push => pb::EnrollmentKind::Push,
            EnrollmentKind::Totp => pb::EnrollmentKind::Totp,
        }
        .into(),
        state: match state {
            EnrollmentState::Pending => pb::EnrollmentState::Pending,
            EnrollmentState::Completed => pb::EnrollmentState::Completed,
            EnrollmentState::Expired => pb::EnrollmentState::Expired,
        }
        .into(),
        uri,
        qr_png,
        expires_at: Some(timestamp(enrollment.expires_at)),
        device_id: enrollment.device_id.as_ref().map(ToString::to_string).unwrap_or_default(),
    }
}

pub fn enrollment_kind_from_pb(raw: i32) -> Result<EnrollmentKind, DomainError> {
    match pb::EnrollmentKind::try_from(raw) {
        Ok(pb::EnrollmentKind::Unspecified | pb::EnrollmentKind::Push) => Ok(EnrollmentKind::Push),
        Ok(pb::EnrollmentKind::Totp) => Ok(EnrollmentKind::Totp),
        Err(_) => Err(DomainError::invalid("kind", format!("unknown enrollment kind {raw}"))),
    }
}

pub fn decision_from_pb(raw: i32) -> Result<Decision, DomainError> {
    match pb::Decision::try_from(raw) {
        Ok(pb::Decision::Approve) => Ok(Decision::Approve),
        Ok(pb::Decision::Deny) => Ok(Decision::Deny),
        Ok(pb::Decision::ReportFraud) => Ok(Decision::ReportFraud),
        Ok(pb::Decision::Unspecified) => Err(DomainError::invalid("decision", "is required")),
        Err(_) => Err(DomainError::invalid("decision", format!("unknown decision {raw}"))),
    }
}

fn platform_from_pb(raw: i32) -> Result<Platform, DomainError> {
    match pb::Platform::try_from(raw) {
        Ok(pb::Platform::Apns) => Ok(Platform::Apns),
        Ok(pb::Platform::Fcm) => Ok(Platform::Fcm),
        Ok(pb::Platform::Webpush) => Ok(Platform::WebPush),
        Ok(pb::Platform::Unspecified) => {
            Err(DomainError::invalid("platform", "is required (PLATFORM_APNS, PLATFORM_FCM or PLATFORM_WEBPUSH)"))
        }
        Err(_) => Err(DomainError::invalid("platform", format!("unknown platform {raw}"))),
    }
}

fn key_algorithm_from_pb(raw: i32) -> Result<KeyAlgorithm, DomainError> {
    match pb::KeyAlgorithm::try_from(raw) {
        Ok(pb::KeyAlgorithm::EcdsaP256Sha256) => Ok(KeyAlgorithm::EcdsaP256Sha256),
        Ok(pb::KeyAlgorithm::Ed25519) => Ok(KeyAlgorithm::Ed25519),
        Ok(pb::KeyAlgorithm::Unspecified) => Err(DomainError::invalid("key_algorithm", "is required")),
        Err(_) => Err(DomainError::invalid("key_algorithm", format!("unknown algorithm {raw}"))),
    }
}

/// Push tokens: at most 4 KiB; printable ASCII, and hex for APNs. A Web Push
/// subscription (JSON, which may have spaces) is checked by the broker, which knows
/// the allowed endpoints (`push::webpush::subscription`).
pub fn push_token(platform: Option<Platform>, raw: &str) -> Result<String, DomainError> {
    if raw.len() > MAX_PUSH_TOKEN_BYTES {
        return Err(DomainError::invalid("push_token", format!("is longer than {MAX_PUSH_TOKEN_BYTES} bytes")));
    }
    // Unknown yet (UpdatePushToken) or Web Push: the broker checks it by platform.
    if platform.is_none_or(|platform| platform == Platform::WebPush) {
        return Ok(raw.to_owned());
    }
    if !raw.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(DomainError::invalid("push_token", "must be printable ASCII"));
    }
    if platform == Some(Platform::Apns) && !raw.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(DomainError::invalid("push_token", "an APNs device token is hex"));
    }
    Ok(raw.to_owned())
}

pub fn proof_from_pb(proof: Option<pb::DeviceProof>) -> Result<DeviceProof, DomainError> {
    let proof = proof.ok_or_else(|| DomainError::invalid("proof", "is required"))?;
    let device_id = DeviceId::parse_field(&proof.device_id, "proof.device_id")?;
    if proof.signature.is_empty() {
        return Err(DomainError::invalid("proof.signature", "is required"));
    }
    if proof.signature.len() > MAX_SIGNATURE_BYTES {
        return Err(DomainError::invalid("proof.signature", format!("is longer than {MAX_SIGNATURE_BYTES} bytes")));
    }
    Ok(DeviceProof { device_id, timestamp_ms: proof.timestamp_ms, signature: proof.signature })
}

impl TryFrom<pb::CreateChallengeRequest> for ChallengeRequest {
    type Error = DomainError;

    fn try_from(request: pb::CreateChallengeRequest) -> Result<Self, DomainError> {
        let user_id = UserId::parse(&request.user_id)?;
        let context = request.context.unwrap_or_default();
        let context = SignInContext::new(context.application, context.ip_address, context.location, context.user_agent)?;
        check_text("request_id", &request.request_id, MAX_REQUEST_ID_BYTES)?;
        let request_id = (!request.request_id.is_empty()).then_some(request.request_id);
        Ok(ChallengeRequest { user_id, context, ttl_seconds: request.ttl_seconds, request_id })
    }
}

impl TryFrom<pb::CompleteEnrollmentRequest> for DeviceEnrollment {
    type Error = DomainError;

    fn try_from(request: pb::CompleteEnrollmentRequest) -> Result<Self, DomainError> {
        let code = EnrollmentCode::from_request(&request.enrollment_code)?;
        let platform = platform_from_pb(request.platform)?;
        let push_token = push_token(Some(platform), &request.push_token)?;
        let algorithm = key_algorithm_from_pb(request.key_algorithm)?;
        if request.public_key.is_empty() {
            return Err(DomainError::invalid("public_key", "is required"));
        }
        let public_key = DevicePublicKey::new(algorithm, request.public_key)?;
        check_text("display_name", &request.display_name, MAX_DISPLAY_NAME_BYTES)?;
        Ok(DeviceEnrollment { code, platform, push_token, public_key, display_name: request.display_name })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamps_split_milliseconds() {
        assert_eq!(timestamp(Millis(1_700_000_000_123)), Timestamp { seconds: 1_700_000_000, nanos: 123_000_000 });
    }

    #[test]
    fn create_request_fields_are_checked_by_name() {
        let base = pb::CreateChallengeRequest { user_id: "jan".into(), ..Default::default() };
        assert!(ChallengeRequest::try_from(base.clone()).is_ok());
        let cases = [
            (pb::CreateChallengeRequest { user_id: String::new(), ..base.clone() }, "user_id"),
            (pb::CreateChallengeRequest { user_id: "u".repeat(257), ..base.clone() }, "user_id"),
            (pb::CreateChallengeRequest { request_id: "r".repeat(129), ..base.clone() }, "request_id"),
            (
                pb::CreateChallengeRequest {
                    context: Some(pb::SignInContext { application: "a\u{0}".into(), ..Default::default() }),
                    ..base.clone()
                },
                "context.application",
            ),
        ];
        for (request, field) in cases {
            let error = ChallengeRequest::try_from(request).expect_err(field);
            assert!(error.to_string().starts_with(field), "{error}");
        }
    }

    #[test]
    fn apns_tokens_must_be_hex() {
        assert!(push_token(Some(Platform::Apns), "a3f9").is_ok());
        assert!(push_token(Some(Platform::Apns), "not-hex").is_err());
        assert!(push_token(Some(Platform::Fcm), "fcm:token-1_x").is_ok());
        assert!(push_token(Some(Platform::Fcm), "two words").is_err());
    }
}
