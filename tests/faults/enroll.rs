//! Enrolling the load's users, TOTP credentials and blocks through the real API.

#![allow(dead_code)] // each test file uses part of the harness

use hmac::{Hmac, Mac as _};
use pushmatch::demo::ApiKeyInterceptor;
use pushmatch::pb;
use pushmatch::pb::enrollment_service_client::EnrollmentServiceClient;
use pushmatch::phone::{PhoneKey, SimulatedPhone};
use tonic::transport::Channel;

use super::load::{FCM_TOKEN, Worker, challenges};

pub fn enrollments(channel: &Channel, api_key: &str) -> pushmatch::demo::IdpEnrollments {
    EnrollmentServiceClient::with_interceptor(channel.clone(), ApiKeyInterceptor::new(api_key).expect("ascii key"))
}

/// Enrolls a phone for `user`; the worker signs in as that user.
pub async fn enroll(idp: &Channel, phones: &Channel, api_key: &str, user: &str) -> Result<Worker, tonic::Status> {
    let enrollment = enrollments(idp, api_key)
        .begin_enrollment(pb::BeginEnrollmentRequest {
            user_id: user.into(),
            account_name: format!("{user}@gors.nl"),
            kind: pb::EnrollmentKind::Push.into(),
        })
        .await?
        .into_inner();
    let key = PhoneKey::ed25519();
    let mut phone = SimulatedPhone::new(phones.clone(), key.clone(), pb::Platform::Fcm, FCM_TOKEN);
    phone.enroll(&enrollment.uri, "phone").await?;
    Ok(Worker {
        user: user.to_owned(),
        idp: idp.clone(),
        phone_channel: phones.clone(),
        key,
        device_id: phone.device_id().to_owned(),
    })
}

pub async fn enroll_many(idp: &Channel, phones: &Channel, api_key: &str, prefix: &str, count: usize) -> Vec<Worker> {
    let mut workers = Vec::new();
    for i in 0..count {
        workers.push(enroll(idp, phones, api_key, &format!("{prefix}-{i}")).await.expect("enroll"));
    }
    workers
}

/// The device ids the store lists for `user`.
pub async fn device_ids(idp: &Channel, api_key: &str, user: &str) -> Result<Vec<String>, tonic::Status> {
    let listed = enrollments(idp, api_key).list_devices(pb::ListDevicesRequest { user_id: user.into() }).await?.into_inner();
    Ok(listed.devices.into_iter().map(|device| device.device_id).collect())
}

/// A sign-in the phone reports as fraud: the user is blocked once this returns Ok.
pub async fn report_fraud(worker: &Worker, api_key: &str) -> Result<(), tonic::Status> {
    let challenge = challenges(&worker.idp, api_key)
        .create_challenge(pb::CreateChallengeRequest { user_id: worker.user.clone(), ..Default::default() })
        .await?
        .into_inner();
    let mut phone = SimulatedPhone::new(worker.phone_channel.clone(), worker.key.clone(), pb::Platform::Fcm, FCM_TOKEN);
    phone.impersonate(&worker.device_id);
    let answer = phone.respond(&challenge.challenge_id, pb::Decision::ReportFraud, "").await?;
    assert!(answer.accepted, "the fraud report resolved the challenge");
    Ok(())
}

/// The RFC 6238 code of `secret` for 30-second step `step`.
pub fn totp_code(secret: &[u8], step: u64) -> String {
    let mut mac = Hmac::<sha1::Sha1>::new_from_slice(secret).expect("any key length");
    mac.update(&step.to_be_bytes());
    let digest = mac.finalize().into_bytes();
    let offset = usize::from(digest[19] & 0x0f);
    let value = u32::from_be_bytes([digest[offset] & 0x7f, digest[offset + 1], digest[offset + 2], digest[offset + 3]]);
    format!("{:06}", value % 1_000_000)
}

pub fn current_step() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).expect("after 1970").as_secs() / 30
}

/// Enrolls and confirms a TOTP credential for `user` (the confirming code's step is
/// spent); returns its secret.
pub async fn enroll_totp(idp: &Channel, api_key: &str, user: &str) -> Vec<u8> {
    let enrollment = enrollments(idp, api_key)
        .begin_enrollment(pb::BeginEnrollmentRequest {
            user_id: user.into(),
            account_name: format!("{user}@gors.nl"),
            kind: pb::EnrollmentKind::Totp.into(),
        })
        .await
        .expect("begin a TOTP enrollment")
        .into_inner();
    let secret = enrollment.uri.split(['?', '&']).find_map(|p| p.strip_prefix("secret=")).expect("secret parameter");
    let secret = data_encoding::BASE32_NOPAD.decode(secret.as_bytes()).expect("base32");
    let request =
        pb::ConfirmTotpEnrollmentRequest { enrollment_id: enrollment.enrollment_id, code: totp_code(&secret, current_step()) };
    enrollments(idp, api_key).confirm_totp_enrollment(request).await.expect("confirm TOTP");
    secret
}

pub async fn verify_totp(idp: &Channel, api_key: &str, user: &str, code: &str) -> Result<bool, tonic::Status> {
    let request = pb::VerifyTotpRequest { user_id: user.into(), code: code.into() };
    Ok(challenges(idp, api_key).verify_totp(request).await?.into_inner().valid)
}
