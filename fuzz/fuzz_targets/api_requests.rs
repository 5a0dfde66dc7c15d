//! Every request message of the gRPC API, decoded with prost from raw bytes and
//! converted into domain types the way its handler does (src/api/*.rs), then the
//! error mapped to a status. The first byte picks the message.
//!
//! Checked: no panic; a request the conversion refuses gets INVALID_ARGUMENT whose
//! message names a field (never UNKNOWN or INTERNAL).

#![no_main]

use libfuzzer_sys::fuzz_target;
use prost::Message;
use pushmatch::api::convert::{decision_from_pb, enrollment_kind_from_pb, proof_from_pb, push_token};
use pushmatch::api::enrollments::MAX_ACCOUNT_NAME_BYTES;
use pushmatch::broker::{ChallengeRequest, DeviceEnrollment};
use pushmatch::domain::challenge::Decision;
use pushmatch::domain::error::DomainError;
use pushmatch::domain::ids::{ChallengeId, ChallengeNumber, DeviceId, EnrollmentId, UserId, check_text};
use pushmatch::domain::time::Millis;
use pushmatch::domain::totp;
use pushmatch::pb;

/// The fields a refusal may name (the proto's, as API.md spells them).
const FIELDS: &[&str] = &[
    "user_id",
    "context.",
    "request_id",
    "challenge_id",
    "code",
    "account_name",
    "kind",
    "enrollment_id",
    "device_id",
    "enrollment_code",
    "platform",
    "push_token",
    "key_algorithm",
    "public_key",
    "display_name",
    "proof",
    "decision",
    "number",
];

/// What a handler's `?` makes of a refusal: INVALID_ARGUMENT naming the field.
fn refused(error: DomainError) {
    let status = tonic::Status::from(error);
    assert_eq!(status.code(), tonic::Code::InvalidArgument, "{status:?}");
    assert!(FIELDS.iter().any(|field| status.message().starts_with(field)), "names no field: {status:?}");
}

fn check<T>(result: Result<T, DomainError>) -> Option<T> {
    result.map_err(refused).ok()
}

fn decode<M: Message + Default>(bytes: &[u8]) -> Option<M> {
    M::decode(bytes).ok()
}

fn totp_code(code: &str) {
    if check(totp::check_code_shape(code)).is_some() {
        // A shaped code is compared against the credential's window.
        let _ = totp::matching_step(b"12345678901234567890", code, Millis(1_700_000_000_000));
    }
}

fn proof(proof: Option<pb::DeviceProof>, rpc: &str, fields: &[&str]) -> Option<()> {
    let proof = check(proof_from_pb(proof))?;
    // The bytes the device signed and the replay key, as authenticate_device makes them.
    let signed = proof.signing_string(rpc, fields);
    assert!(signed.starts_with("pushmatch/v1\n"));
    let _ = proof.use_key(rpc, fields);
    let _ = proof.replayable_until(std::time::Duration::from_secs(120));
    Some(())
}

fuzz_target!(|data: &[u8]| {
    let Some((&selector, bytes)) = data.split_first() else { return };
    match selector % 16 {
        0 => {
            let Some(request) = decode::<pb::CreateChallengeRequest>(bytes) else { return };
            check(ChallengeRequest::try_from(request));
        }
        1 => {
            let Some(request) = decode::<pb::GetChallengeRequest>(bytes) else { return };
            check(ChallengeId::parse(&request.challenge_id));
        }
        2 => {
            let Some(request) = decode::<pb::WatchChallengeRequest>(bytes) else { return };
            check(ChallengeId::parse(&request.challenge_id));
        }
        3 => {
            let Some(request) = decode::<pb::CancelChallengeRequest>(bytes) else { return };
            check(ChallengeId::parse(&request.challenge_id));
        }
        4 => {
            let Some(request) = decode::<pb::VerifyTotpRequest>(bytes) else { return };
            if check(UserId::parse(&request.user_id)).is_some() {
                totp_code(&request.code);
            }
        }
        5 => {
            let Some(request) = decode::<pb::BeginEnrollmentRequest>(bytes) else { return };
            if check(UserId::parse(&request.user_id)).is_some()
                && check(check_text("account_name", &request.account_name, MAX_ACCOUNT_NAME_BYTES)).is_some()
            {
                check(enrollment_kind_from_pb(request.kind));
            }
        }
        6 => {
            let Some(request) = decode::<pb::GetEnrollmentRequest>(bytes) else { return };
            check(EnrollmentId::parse(&request.enrollment_id));
        }
        7 => {
            let Some(request) = decode::<pb::ConfirmTotpEnrollmentRequest>(bytes) else { return };
            if check(EnrollmentId::parse(&request.enrollment_id)).is_some() {
                totp_code(&request.code);
            }
        }
        8 => {
            let Some(request) = decode::<pb::ListDevicesRequest>(bytes) else { return };
            check(UserId::parse(&request.user_id));
        }
        9 => {
            let Some(request) = decode::<pb::RemoveDeviceRequest>(bytes) else { return };
            check(DeviceId::parse(&request.device_id));
        }
        10 => {
            let Some(request) = decode::<pb::UnblockUserRequest>(bytes) else { return };
            check(UserId::parse(&request.user_id));
        }
        11 => {
            let Some(request) = decode::<pb::CompleteEnrollmentRequest>(bytes) else { return };
            if let Some(enrollment) = check(DeviceEnrollment::try_from(request)) {
                // A key the conversion accepted has an identity (the store indexes it).
                enrollment.public_key.fingerprint().expect("an accepted key has a fingerprint");
            }
        }
        12 => {
            let Some(request) = decode::<pb::UpdatePushTokenRequest>(bytes) else { return };
            if proof(request.proof, "UpdatePushToken", &[&request.push_token]).is_some() {
                if request.push_token.is_empty() {
                    return;
                }
                check(push_token(None, &request.push_token));
            }
        }
        13 => {
            let Some(request) = decode::<pb::ListPendingChallengesRequest>(bytes) else { return };
            proof(request.proof, "ListPendingChallenges", &[]);
        }
        14 => {
            let Some(request) = decode::<pb::RespondToChallengeRequest>(bytes) else { return };
            let Some(parsed) = check(proof_from_pb(request.proof.clone())) else { return };
            let Some(challenge_id) = check(ChallengeId::parse(&request.challenge_id)) else { return };
            let Some(decision) = check(decision_from_pb(request.decision)) else { return };
            let typed = ChallengeNumber::parse_typed(&request.number);
            if decision == Decision::Approve && typed.is_none() {
                return;
            }
            if request.number.len() > 2 || !request.number.bytes().all(|b| b.is_ascii_digit()) {
                return;
            }
            if let Some(number) = typed {
                assert_eq!(number.to_digits(), request.number, "a typed number reads back as typed");
            }
            let fields = [challenge_id.as_str(), decision.proto_name(), request.number.as_str()];
            let signed = parsed.signing_string("RespondToChallenge", &fields);
            assert!(signed.ends_with(&format!("\n{}", request.number)));
        }
        _ => {
            // The client certificate of a mutual-TLS call (verified by rustls first,
            // read here for the tenants its URI SANs name).
            let identity = pushmatch::tls::ClientIdentity::from_der(bytes);
            for tenant in &identity.tenants {
                assert!(identity.allows(&pushmatch::domain::ids::TenantId(tenant.clone())));
            }
        }
    }
});
