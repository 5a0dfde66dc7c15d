//! Bad inputs over the wire, black box: every missing or wrong credential, foreign
//! id, failing device proof, spent or malformed enrollment, malformed or oversize
//! field gets its documented gRPC code (API.md, "Rules that clients rely on"),
//! INVALID_ARGUMENT names the field, nothing answers UNKNOWN or INTERNAL, and the
//! server carries on serving afterwards.

// Test code, as in the other test files: `.expect("why")` is the failure report.
// clippy.toml allows it inside `#[test]` functions only; this extends it to the
// helpers here and in `support`.
#![allow(clippy::expect_used)]

mod support;

use std::time::Duration;

use pushmatch::domain::time::{Clock as _, SystemClock};
use pushmatch::pb;
use pushmatch::pb::challenge_service_client::ChallengeServiceClient;
use pushmatch::pb::device_service_client::DeviceServiceClient;
use pushmatch::pb::enrollment_service_client::EnrollmentServiceClient;
use pushmatch::phone::{P256Encoding, PhoneKey, SimulatedPhone, enrollment_code_from_uri};
use pushmatch::push::{PushJob, PushKind};
use support::*;
use tokio::time::timeout;
use tonic::metadata::{Ascii, MetadataValue};
use tonic::transport::Channel;
use tonic::{Code, Request, Status};
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

/// Ten minutes, in the milliseconds of a proof's timestamp: twice the allowed skew.
const TEN_MINUTES_MS: i64 = 10 * 60 * 1000;

/// A well-formed id (prefix and 32 hex digits) that no one was ever given.
fn unknown_id(prefix: &str) -> String {
    format!("{prefix}{}", "0".repeat(32))
}

/// The code is one a client may see for these inputs, never UNKNOWN or INTERNAL.
fn assert_not_opaque(status: &Status) {
    assert!(!matches!(status.code(), Code::Unknown | Code::Internal), "an opaque status: {status:?}");
}

/// The server answers health checks and a normal enrollment round trip.
async fn assert_serving(server: &TestServer) {
    let mut health = HealthClient::new(server.channel.clone());
    for service in ["", "pushmatch.v1.ChallengeService", "pushmatch.v1.EnrollmentService", "pushmatch.v1.DeviceService"] {
        let response = timeout(DEADLINE, health.check(HealthCheckRequest { service: service.into() }))
            .await
            .expect("the health check answers in time")
            .expect("the health check succeeds")
            .into_inner();
        assert_eq!(response.status(), ServingStatus::Serving, "health of {service:?}");
    }
    let begun = timeout(DEADLINE, server.begin_enrollment("still-serving")).await.expect("BeginEnrollment in time");
    let read = server
        .enrollments(KEY_A)
        .get_enrollment(pb::GetEnrollmentRequest { enrollment_id: begun.enrollment_id.clone() })
        .await
        .expect("GetEnrollment after the bad calls")
        .into_inner();
    assert_eq!(read.state(), pb::EnrollmentState::Pending);
}

/// A whole sign-in still works for `user`'s `phone`: create, get, approve, read APPROVED.
async fn assert_sign_in_works(server: &TestServer, user: &str, phone: &mut SimulatedPhone) {
    let created = timeout(DEADLINE, server.create_challenge(user)).await.expect("CreateChallenge in time");
    let mut challenges = server.challenges(KEY_A);
    let read = challenges
        .get_challenge(pb::GetChallengeRequest { challenge_id: created.challenge_id.clone() })
        .await
        .expect("GetChallenge")
        .into_inner();
    assert_eq!(read.state(), pb::ChallengeState::Pending);
    let answer = phone.respond(&created.challenge_id, pb::Decision::Approve, &created.number).await.expect("the approval");
    assert!(answer.accepted, "{answer:?}");
    assert_eq!(answer.state(), pb::ChallengeState::Approved);
    let read = challenges
        .get_challenge(pb::GetChallengeRequest { challenge_id: created.challenge_id })
        .await
        .expect("GetChallenge after the approval")
        .into_inner();
    assert_eq!(read.state(), pb::ChallengeState::Approved);
}

async fn challenge_state(server: &TestServer, challenge_id: &str) -> pb::ChallengeState {
    server
        .challenges(KEY_A)
        .get_challenge(pb::GetChallengeRequest { challenge_id: challenge_id.into() })
        .await
        .expect("GetChallenge")
        .into_inner()
        .state()
}

/// A request with `authorization` set to `value`, or with no `authorization` at all.
fn with_auth<T>(message: T, value: Option<&MetadataValue<Ascii>>) -> Request<T> {
    let mut request = Request::new(message);
    if let Some(value) = value {
        request.metadata_mut().insert("authorization", value.clone());
    }
    request
}

/// Calls every IdP RPC with the given `authorization` (clients without the API-key
/// interceptor) on real ids of tenant "a"; returns each RPC's outcome.
async fn every_idp_call(
    channel: &Channel,
    auth: Option<&MetadataValue<Ascii>>,
    challenge_id: &str,
    enrollment_id: &str,
    device_id: &str,
    user: &str,
) -> Vec<(&'static str, Result<(), Status>)> {
    let mut challenges = ChallengeServiceClient::new(channel.clone());
    let mut enrollments = EnrollmentServiceClient::new(channel.clone());
    let create = pb::CreateChallengeRequest { user_id: user.into(), ..Default::default() };
    vec![
        ("CreateChallenge", challenges.create_challenge(with_auth(create, auth)).await.map(drop)),
        (
            "GetChallenge",
            challenges
                .get_challenge(with_auth(pb::GetChallengeRequest { challenge_id: challenge_id.into() }, auth))
                .await
                .map(drop),
        ),
        (
            "WatchChallenge",
            challenges
                .watch_challenge(with_auth(
                    pb::WatchChallengeRequest { challenge_id: challenge_id.into(), ..Default::default() },
                    auth,
                ))
                .await
                .map(drop),
        ),
        (
            "CancelChallenge",
            challenges
                .cancel_challenge(with_auth(pb::CancelChallengeRequest { challenge_id: challenge_id.into() }, auth))
                .await
                .map(drop),
        ),
        (
            "VerifyTotp",
            challenges
                .verify_totp(with_auth(pb::VerifyTotpRequest { user_id: user.into(), code: "123456".into() }, auth))
                .await
                .map(drop),
        ),
        (
            "BeginEnrollment",
            enrollments
                .begin_enrollment(with_auth(
                    pb::BeginEnrollmentRequest { user_id: user.into(), account_name: "x".into(), kind: 1 },
                    auth,
                ))
                .await
                .map(drop),
        ),
        (
            "GetEnrollment",
            enrollments
                .get_enrollment(with_auth(pb::GetEnrollmentRequest { enrollment_id: enrollment_id.into() }, auth))
                .await
                .map(drop),
        ),
        (
            "ConfirmTotpEnrollment",
            enrollments
                .confirm_totp_enrollment(with_auth(
                    pb::ConfirmTotpEnrollmentRequest { enrollment_id: enrollment_id.into(), code: "123456".into() },
                    auth,
                ))
                .await
                .map(drop),
        ),
        (
            "ListDevices",
            enrollments.list_devices(with_auth(pb::ListDevicesRequest { user_id: user.into() }, auth)).await.map(drop),
        ),
        (
            "RemoveDevice",
            enrollments.remove_device(with_auth(pb::RemoveDeviceRequest { device_id: device_id.into() }, auth)).await.map(drop),
        ),
        (
            "UnblockUser",
            enrollments.unblock_user(with_auth(pb::UnblockUserRequest { user_id: user.into() }, auth)).await.map(drop),
        ),
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missing_malformed_and_wrong_api_keys_are_unauthenticated() {
    let server = TestServer::start().await;
    let enrollment = server.begin_enrollment("alice").await;
    let mut phone = server.phone(PhoneKey::p256(P256Encoding::Sec1Uncompressed), pb::Platform::Apns);
    phone.enroll(&enrollment.uri, "Alice's iPhone").await.expect("enrollment");
    let challenge = server.create_challenge("alice").await;

    let header = |text: &str| MetadataValue::<Ascii>::try_from(text).expect("an ASCII header value");
    let mut credentials: Vec<(&str, Option<MetadataValue<Ascii>>)> = vec![
        ("no authorization header", None),
        ("the key without the Bearer scheme", Some(header(KEY_A))),
        ("Bearer with no key", Some(header("Bearer"))),
        ("Bearer and a blank key", Some(header("Bearer    "))),
        ("the Basic scheme", Some(header("Basic dGVuYW50LWEtYXBpLWtleTo="))),
        ("a token scheme", Some(header(&format!("Token {KEY_A}")))),
        ("an unknown key", Some(header("Bearer wrong-api-key-0123456789"))),
        ("a key with a suffix", Some(header(&format!("Bearer {KEY_A}x")))),
        ("a key with trailing words", Some(header(&format!("Bearer {KEY_A} {KEY_B}")))),
        ("an empty header", Some(header(""))),
    ];
    let opaque = MetadataValue::<Ascii>::try_from(&b"Bearer \xfftenant-a-api-key"[..]).expect("an opaque header value");
    credentials.push(("a key with non-ASCII bytes", Some(opaque)));

    for (what, value) in &credentials {
        let outcomes = every_idp_call(
            &server.channel,
            value.as_ref(),
            &challenge.challenge_id,
            &enrollment.enrollment_id,
            phone.device_id(),
            "alice",
        )
        .await;
        for (rpc, outcome) in outcomes {
            let status = outcome.expect_err(&format!("{rpc} with {what} must fail"));
            assert_eq!(status.code(), Code::Unauthenticated, "{rpc} with {what}: {status:?}");
            assert!(!status.message().contains("wrong-api-key"), "{rpc} echoes the presented key: {status:?}");
            assert!(!status.message().contains(KEY_A), "{rpc} echoes the presented key: {status:?}");
        }
    }

    // The interceptor clients with a wrong key, as an IdP with a stale secret calls.
    for key in ["not-a-tenant-key", KEY_A.to_uppercase().as_str()] {
        assert_code(
            server.challenges(key).get_challenge(pb::GetChallengeRequest { challenge_id: challenge.challenge_id.clone() }).await,
            Code::Unauthenticated,
            "",
        );
        assert_code(
            server.enrollments(key).list_devices(pb::ListDevicesRequest { user_id: "alice".into() }).await,
            Code::Unauthenticated,
            "",
        );
    }

    // None of the refused calls changed anything: the challenge was not cancelled, the
    // device was not removed, and no extra challenge or enrollment went out.
    assert_eq!(challenge_state(&server, &challenge.challenge_id).await, pb::ChallengeState::Pending);
    let devices = server
        .enrollments(KEY_A)
        .list_devices(pb::ListDevicesRequest { user_id: "alice".into() })
        .await
        .expect("ListDevices")
        .into_inner()
        .devices;
    assert_eq!(devices.iter().map(|d| d.device_id.as_str()).collect::<Vec<_>>(), [phone.device_id()]);
    let pending = phone.pending().await.expect("the phone's pending list");
    assert_eq!(pending.iter().map(|p| p.challenge_id.as_str()).collect::<Vec<_>>(), [challenge.challenge_id.as_str()]);

    // The right key, through the same channel, still works.
    let answer = phone.respond(&challenge.challenge_id, pb::Decision::Approve, &challenge.number).await.expect("approval");
    assert!(answer.accepted);
    assert_serving(&server).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_tenants_ids_are_not_found() {
    let server = TestServer::start().await;
    let enrollment = server.begin_enrollment("alice").await;
    let mut phone = server.phone(PhoneKey::ed25519(), pb::Platform::Fcm);
    phone.enroll(&enrollment.uri, "Alice's Pixel").await.expect("enrollment");
    let challenge = server.create_challenge("alice").await;
    let id = challenge.challenge_id.clone();

    let mut foreign_challenges = server.challenges(KEY_B);
    let mut foreign_enrollments = server.enrollments(KEY_B);
    assert_code(foreign_challenges.get_challenge(pb::GetChallengeRequest { challenge_id: id.clone() }).await, Code::NotFound, "");
    assert_code(
        foreign_challenges.watch_challenge(pb::WatchChallengeRequest { challenge_id: id.clone(), ..Default::default() }).await,
        Code::NotFound,
        "",
    );
    assert_code(
        foreign_challenges.cancel_challenge(pb::CancelChallengeRequest { challenge_id: id.clone() }).await,
        Code::NotFound,
        "",
    );
    assert_code(
        foreign_enrollments.get_enrollment(pb::GetEnrollmentRequest { enrollment_id: enrollment.enrollment_id.clone() }).await,
        Code::NotFound,
        "",
    );
    assert_code(
        foreign_enrollments.remove_device(pb::RemoveDeviceRequest { device_id: phone.device_id().into() }).await,
        Code::NotFound,
        "",
    );
    let foreign_view = foreign_enrollments
        .list_devices(pb::ListDevicesRequest { user_id: "alice".into() })
        .await
        .expect("ListDevices for tenant b")
        .into_inner();
    assert!(foreign_view.devices.is_empty(), "tenant b sees tenant a's devices: {foreign_view:?}");
    assert_code(
        foreign_challenges.create_challenge(pb::CreateChallengeRequest { user_id: "alice".into(), ..Default::default() }).await,
        Code::FailedPrecondition,
        "",
    );

    // Unknown but well-formed ids read the same way in the owner's tenant.
    let mut challenges = server.challenges(KEY_A);
    let mut enrollments = server.enrollments(KEY_A);
    assert_code(challenges.get_challenge(pb::GetChallengeRequest { challenge_id: unknown_id("ch_") }).await, Code::NotFound, "");
    assert_code(
        challenges.watch_challenge(pb::WatchChallengeRequest { challenge_id: unknown_id("ch_"), ..Default::default() }).await,
        Code::NotFound,
        "",
    );
    assert_code(
        challenges.cancel_challenge(pb::CancelChallengeRequest { challenge_id: unknown_id("ch_") }).await,
        Code::NotFound,
        "",
    );
    assert_code(
        enrollments.get_enrollment(pb::GetEnrollmentRequest { enrollment_id: unknown_id("en_") }).await,
        Code::NotFound,
        "",
    );
    assert_code(enrollments.remove_device(pb::RemoveDeviceRequest { device_id: unknown_id("dv_") }).await, Code::NotFound, "");

    // A device of tenant b answering tenant a's challenge finds nothing to answer.
    let foreign_enrollment = foreign_enrollments
        .begin_enrollment(pb::BeginEnrollmentRequest {
            user_id: "alice".into(),
            account_name: "alice@other".into(),
            kind: pb::EnrollmentKind::Push.into(),
        })
        .await
        .expect("tenant b's enrollment")
        .into_inner();
    let mut foreign_phone = server.phone(PhoneKey::p256(P256Encoding::Spki), pb::Platform::Apns);
    foreign_phone.enroll(&foreign_enrollment.uri, "Other phone").await.expect("tenant b's enrollment completes");
    assert_code(foreign_phone.respond(&id, pb::Decision::Approve, &challenge.number).await, Code::NotFound, "");
    assert_code(foreign_phone.respond(&id, pb::Decision::ReportFraud, "").await, Code::NotFound, "");
    assert!(foreign_phone.pending().await.expect("tenant b's pending list").is_empty());

    // Tenant a's state is untouched and its sign-in goes on.
    assert_eq!(challenge_state(&server, &id).await, pb::ChallengeState::Pending);
    let devices = enrollments
        .list_devices(pb::ListDevicesRequest { user_id: "alice".into() })
        .await
        .expect("ListDevices")
        .into_inner()
        .devices;
    assert_eq!(devices.len(), 1, "the device survived tenant b's RemoveDevice: {devices:?}");
    let read = enrollments
        .get_enrollment(pb::GetEnrollmentRequest { enrollment_id: enrollment.enrollment_id.clone() })
        .await
        .expect("GetEnrollment")
        .into_inner();
    assert_eq!(read.state(), pb::EnrollmentState::Completed);
    let answer = phone.respond(&id, pb::Decision::Approve, &challenge.number).await.expect("approval");
    assert!(answer.accepted);
    assert_eq!(answer.state(), pb::ChallengeState::Approved);
    assert_sign_in_works(&server, "alice", &mut phone).await;
    assert_serving(&server).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn device_proofs_that_do_not_verify_are_unauthenticated() {
    let server = TestServer::start().await;
    let mut phone = server.enrolled_phone("carol", PhoneKey::p256(P256Encoding::Sec1Compressed), pb::Platform::Apns).await;
    let other = server.enrolled_phone("carol", PhoneKey::ed25519(), pb::Platform::Fcm).await;
    let challenge = server.create_challenge("carol").await;
    let id = challenge.challenge_id.as_str();
    let number = challenge.number.as_str();
    let approve = pb::Decision::Approve;
    let fields = [id, approve.as_str_name(), number];
    let now = SystemClock.now().0;

    // A flipped byte anywhere in the signature.
    for index in [0, 17, 63] {
        let mut proof = phone.proof("RespondToChallenge", &fields);
        proof.signature[index] ^= 0x01;
        assert_code(phone.respond_with(proof, id, approve, number).await, Code::Unauthenticated, "");
    }
    // A stranger's key claiming this phone's id.
    let mut stranger = server.phone(PhoneKey::p256(P256Encoding::Sec1Compressed), pb::Platform::Apns);
    stranger.impersonate(phone.device_id());
    assert_code(stranger.respond(id, approve, number).await, Code::Unauthenticated, "");
    assert_code(stranger.pending().await, Code::Unauthenticated, "");
    // This phone's key claiming the user's other device.
    let mut imposter = server.phone(phone.key().clone(), pb::Platform::Apns);
    imposter.impersonate(other.device_id());
    assert_code(imposter.respond(id, approve, number).await, Code::Unauthenticated, "");
    assert_code(imposter.pending().await, Code::Unauthenticated, "");
    assert_code(imposter.update_push_token("a3f9").await, Code::Unauthenticated, "");
    // A device id no one has.
    let mut ghost = server.phone(PhoneKey::ed25519(), pb::Platform::Fcm);
    ghost.impersonate(&unknown_id("dv_"));
    assert_code(ghost.respond(id, approve, number).await, Code::Unauthenticated, "");
    // Timestamps ten minutes off, either way.
    for timestamp in [now - TEN_MINUTES_MS, now + TEN_MINUTES_MS, 0, i64::MAX, i64::MIN] {
        let proof = phone.proof_at("RespondToChallenge", &fields, timestamp);
        assert_code(phone.respond_with(proof, id, approve, number).await, Code::Unauthenticated, "");
        let proof = phone.proof_at("ListPendingChallenges", &[], timestamp);
        assert_code(phone.pending_with(proof).await, Code::Unauthenticated, "");
    }
    // A valid signature over something else: another RPC, another decision, another number.
    let proof = phone.proof("ListPendingChallenges", &[]);
    assert_code(phone.respond_with(proof, id, approve, number).await, Code::Unauthenticated, "");
    let proof = phone.proof("RespondToChallenge", &[id, pb::Decision::Deny.as_str_name(), number]);
    assert_code(phone.respond_with(proof, id, approve, number).await, Code::Unauthenticated, "");
    let typo = if number == "42" { "43" } else { "42" };
    let proof = phone.proof("RespondToChallenge", &[id, approve.as_str_name(), typo]);
    assert_code(phone.respond_with(proof, id, approve, number).await, Code::Unauthenticated, "");
    let proof = phone.proof("RespondToChallenge", &fields);
    let mut retimed = proof.clone();
    retimed.timestamp_ms += 1;
    assert_code(phone.respond_with(retimed, id, approve, number).await, Code::Unauthenticated, "");

    // None of it touched the challenge; the real answer still resolves it.
    assert_eq!(challenge_state(&server, id).await, pb::ChallengeState::Pending);
    let answer = phone.respond_with(proof, id, approve, number).await.expect("the genuine approval");
    assert!(answer.accepted, "{answer:?}");
    assert_eq!(answer.state(), pb::ChallengeState::Approved);
    assert_sign_in_works(&server, "carol", &mut phone).await;
    assert_serving(&server).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_removed_device_is_locked_out_and_gets_no_push() {
    let server = TestServer::start().await;
    let mut removed = server.enrolled_phone("dave", PhoneKey::p256(P256Encoding::Sec1Uncompressed), pb::Platform::Apns).await;
    let mut kept = server.enrolled_phone("dave", PhoneKey::ed25519(), pb::Platform::Fcm).await;
    let removed_id = removed.device_id().to_owned();
    let before = server.create_challenge("dave").await;
    assert_eq!(before.deliveries.len(), 2, "{before:?}");

    let mut enrollments = server.enrollments(KEY_A);
    enrollments.remove_device(pb::RemoveDeviceRequest { device_id: removed_id.clone() }).await.expect("RemoveDevice");
    assert_code(enrollments.remove_device(pb::RemoveDeviceRequest { device_id: removed_id.clone() }).await, Code::NotFound, "");

    // At once, every proof of the removed device fails, for a challenge it was pushed too.
    assert_code(removed.pending().await, Code::Unauthenticated, "");
    assert_code(removed.respond(&before.challenge_id, pb::Decision::Approve, &before.number).await, Code::Unauthenticated, "");
    assert_code(removed.respond(&before.challenge_id, pb::Decision::ReportFraud, "").await, Code::Unauthenticated, "");
    assert_code(removed.update_push_token(APNS_TOKEN).await, Code::Unauthenticated, "");
    assert_eq!(challenge_state(&server, &before.challenge_id).await, pb::ChallengeState::Pending);

    let devices = enrollments
        .list_devices(pb::ListDevicesRequest { user_id: "dave".into() })
        .await
        .expect("ListDevices")
        .into_inner()
        .devices;
    assert_eq!(devices.iter().map(|d| d.device_id.as_str()).collect::<Vec<_>>(), [kept.device_id()]);

    // A later challenge goes to the remaining device only.
    let after = server.create_challenge("dave").await;
    let targets: Vec<&str> = after.deliveries.iter().map(|d| d.device_id.as_str()).collect();
    assert_eq!(targets, [kept.device_id()], "deliveries of the later challenge");
    let kept_id = kept.device_id().to_owned();
    let after_id = after.challenge_id.clone();
    timeout(
        DEADLINE,
        server
            .fcm
            .wait_for(|job| job.challenge_id().is_some_and(|id| id.as_str() == after_id) && job.device_id.as_str() == kept_id),
    )
    .await
    .expect("the remaining device gets its push");
    // Queued before the removal: the first challenge, and the notice that `kept` enrolled.
    let queued_before = |job: &PushJob| match &job.kind {
        PushKind::NewDevice { new_device_id, .. } => new_device_id.as_str() == kept_id,
        _ => job.challenge_id().is_some_and(|id| id.as_str() == before.challenge_id),
    };
    let to_removed: Vec<_> = server
        .apns
        .jobs()
        .into_iter()
        .chain(server.fcm.jobs())
        .filter(|job| job.device_id.as_str() == removed_id && !queued_before(job))
        .collect();
    assert!(to_removed.is_empty(), "pushes to the removed device: {to_removed:?}");

    // The remaining device answers both; the removed one still cannot.
    assert_code(removed.respond(&after.challenge_id, pb::Decision::Approve, &after.number).await, Code::Unauthenticated, "");
    assert!(kept.respond(&after.challenge_id, pb::Decision::Approve, &after.number).await.expect("approval").accepted);
    assert!(kept.respond(&before.challenge_id, pb::Decision::Deny, "").await.expect("denial").accepted);

    // With its last device removed, the user cannot be challenged at all.
    enrollments.remove_device(pb::RemoveDeviceRequest { device_id: kept_id }).await.expect("RemoveDevice");
    assert_code(kept.pending().await, Code::Unauthenticated, "");
    assert_code(
        server
            .challenges(KEY_A)
            .create_challenge(pb::CreateChallengeRequest { user_id: "dave".into(), ..Default::default() })
            .await,
        Code::FailedPrecondition,
        "",
    );
    assert_serving(&server).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_user_without_a_device_is_failed_precondition() {
    let server = TestServer::start().await;
    let mut challenges = server.challenges(KEY_A);
    assert_code(
        challenges.create_challenge(pb::CreateChallengeRequest { user_id: "nobody".into(), ..Default::default() }).await,
        Code::FailedPrecondition,
        "",
    );
    // A begun but not completed enrollment is no device either.
    server.begin_enrollment("halfway").await;
    assert_code(
        challenges.create_challenge(pb::CreateChallengeRequest { user_id: "halfway".into(), ..Default::default() }).await,
        Code::FailedPrecondition,
        "",
    );
    // The longest valid user id passes validation and meets the same precondition.
    assert_code(
        challenges.create_challenge(pb::CreateChallengeRequest { user_id: "u".repeat(256), ..Default::default() }).await,
        Code::FailedPrecondition,
        "",
    );
    assert!(server.apns.jobs().is_empty() && server.fcm.jobs().is_empty(), "nothing was pushed");
    let mut phone = server.enrolled_phone("now-enrolled", PhoneKey::ed25519(), pb::Platform::Fcm).await;
    assert_sign_in_works(&server, "now-enrolled", &mut phone).await;
    assert_serving(&server).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spent_unknown_and_malformed_enrollment_codes() {
    let server = TestServer::start().await;
    let enrollment = server.begin_enrollment("erin").await;
    let mut first = server.phone(PhoneKey::ed25519(), pb::Platform::Fcm);
    let completed = first.enroll(&enrollment.uri, "Erin's first phone").await.expect("the first completion");

    // The code is single use, whoever presents it again.
    let mut second = server.phone(PhoneKey::p256(P256Encoding::Spki), pb::Platform::Apns);
    assert_code(second.enroll(&enrollment.uri, "Erin's second phone").await, Code::FailedPrecondition, "");
    let mut again = server.phone(first.key().clone(), pb::Platform::Fcm);
    assert_code(again.enroll(&enrollment.uri, "the same phone again").await, Code::FailedPrecondition, "");
    let read = server
        .enrollments(KEY_A)
        .get_enrollment(pb::GetEnrollmentRequest { enrollment_id: enrollment.enrollment_id.clone() })
        .await
        .expect("GetEnrollment")
        .into_inner();
    assert_eq!(read.state(), pb::EnrollmentState::Completed);
    assert_eq!(read.device_id, completed.device_id, "the enrollment belongs to the first phone");

    // Unknown codes of the right shape.
    let mut stranger = server.phone(PhoneKey::ed25519(), pb::Platform::Fcm);
    for code in ["0".repeat(32), "f".repeat(32), "deadbeef".into()] {
        assert_code(stranger.enroll_with_code(&code, "stranger").await, Code::NotFound, "");
    }
    // Codes that are not codes at all.
    for code in ["", "not a code", "abc-def", "%00", "c\u{0}de", "é".repeat(16).as_str(), "a".repeat(129).as_str()] {
        assert_code(stranger.enroll_with_code(code, "stranger").await, Code::InvalidArgument, "enrollment_code");
    }

    let devices = server
        .enrollments(KEY_A)
        .list_devices(pb::ListDevicesRequest { user_id: "erin".into() })
        .await
        .expect("ListDevices")
        .into_inner()
        .devices;
    assert_eq!(devices.len(), 1, "exactly one device from one code: {devices:?}");
    assert_sign_in_works(&server, "erin", &mut first).await;
    assert_serving(&server).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expired_enrollment_code_is_failed_precondition() {
    let server = TestServer::start().await;
    let expiring = server.begin_enrollment("frank").await;
    let on_time = server.begin_enrollment("frank").await;
    let mut early = server.phone(PhoneKey::ed25519(), pb::Platform::Fcm);
    early.enroll(&on_time.uri, "early").await.expect("an enrollment completed in time");

    server.clock.advance(Duration::from_secs(601));
    let mut late = server.phone(PhoneKey::p256(P256Encoding::Sec1Uncompressed), pb::Platform::Apns);
    assert_code(late.enroll(&expiring.uri, "too late").await, Code::FailedPrecondition, "");
    let mut enrollments = server.enrollments(KEY_A);
    let read = enrollments
        .get_enrollment(pb::GetEnrollmentRequest { enrollment_id: expiring.enrollment_id.clone() })
        .await
        .expect("GetEnrollment")
        .into_inner();
    assert_eq!(read.state(), pb::EnrollmentState::Expired);
    // A completed enrollment stays COMPLETED and spent past its expiry.
    let read = enrollments
        .get_enrollment(pb::GetEnrollmentRequest { enrollment_id: on_time.enrollment_id.clone() })
        .await
        .expect("GetEnrollment")
        .into_inner();
    assert_eq!(read.state(), pb::EnrollmentState::Completed);
    assert_code(late.enroll(&on_time.uri, "too late").await, Code::FailedPrecondition, "");

    // Only the in-time phone was added, and a new code works at the new time.
    let devices = enrollments
        .list_devices(pb::ListDevicesRequest { user_id: "frank".into() })
        .await
        .expect("ListDevices")
        .into_inner()
        .devices;
    assert_eq!(devices.iter().map(|d| d.device_id.as_str()).collect::<Vec<_>>(), [early.device_id()]);
    let fresh = server.begin_enrollment("frank").await;
    late.enroll(&fresh.uri, "in time now").await.expect("a fresh code completes");
    // Proofs are signed with the wall clock, which the manual clock has left behind:
    // the health check here is the IdP's side.
    let challenge = server.create_challenge("frank").await;
    assert_eq!(challenge.deliveries.len(), 2, "{challenge:?}");
    let read = server
        .challenges(KEY_A)
        .get_challenge(pb::GetChallengeRequest { challenge_id: challenge.challenge_id.clone() })
        .await
        .expect("GetChallenge")
        .into_inner();
    assert_eq!(read.state(), pb::ChallengeState::Pending);
    assert_serving(&server).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_complete_enrollment_fields_are_named_and_do_not_spend_the_code() {
    let server = TestServer::start().await;
    let enrollment = server.begin_enrollment("gina").await;
    let code = enrollment_code_from_uri(&enrollment.uri).expect("the URI carries a code");
    let key = PhoneKey::p256(P256Encoding::Sec1Uncompressed);
    let valid = pb::CompleteEnrollmentRequest {
        enrollment_code: code,
        platform: pb::Platform::Apns.into(),
        push_token: APNS_TOKEN.into(),
        public_key: key.public_key(),
        key_algorithm: key.algorithm().into(),
        display_name: "Gina's iPhone".into(),
    };
    let p256 = pb::KeyAlgorithm::EcdsaP256Sha256 as i32;
    let ed25519 = pb::KeyAlgorithm::Ed25519 as i32;
    let ed25519_key = PhoneKey::ed25519().public_key();
    let mut spki_garbage = vec![0x30, 0x59];
    spki_garbage.resize(91, 0x00);
    // Deterministically not a P-256 point: y of a real key changed, x beyond the field,
    // a length that does not match the tag, tags that SEC1 keys do not use.
    let mut off_curve = valid.public_key.clone();
    off_curve[64] ^= 0x01;
    let mut x_beyond_the_field = vec![0x02];
    x_beyond_the_field.extend([0xff; 32]);
    let mut uncompressed_tagged_compressed = valid.public_key.clone();
    uncompressed_tagged_compressed[0] = 0x02;
    let mut hybrid = valid.public_key.clone();
    hybrid[0] = 0x06;
    let cases = [
        (pb::CompleteEnrollmentRequest { platform: 0, ..valid.clone() }, "platform"),
        (pb::CompleteEnrollmentRequest { platform: 7, ..valid.clone() }, "platform"),
        (pb::CompleteEnrollmentRequest { key_algorithm: 0, ..valid.clone() }, "key_algorithm"),
        (pb::CompleteEnrollmentRequest { key_algorithm: 9, ..valid.clone() }, "key_algorithm"),
        (pb::CompleteEnrollmentRequest { public_key: Vec::new(), ..valid.clone() }, "public_key"),
        (pb::CompleteEnrollmentRequest { public_key: vec![0x04; 65], ..valid.clone() }, "public_key"),
        (pb::CompleteEnrollmentRequest { public_key: vec![0x07; 33], ..valid.clone() }, "public_key"),
        (pb::CompleteEnrollmentRequest { public_key: vec![0x00; 33], ..valid.clone() }, "public_key"),
        (pb::CompleteEnrollmentRequest { public_key: vec![0x00], ..valid.clone() }, "public_key"),
        (pb::CompleteEnrollmentRequest { public_key: off_curve, ..valid.clone() }, "public_key"),
        (pb::CompleteEnrollmentRequest { public_key: x_beyond_the_field, ..valid.clone() }, "public_key"),
        (pb::CompleteEnrollmentRequest { public_key: uncompressed_tagged_compressed, ..valid.clone() }, "public_key"),
        (pb::CompleteEnrollmentRequest { public_key: hybrid, ..valid.clone() }, "public_key"),
        (pb::CompleteEnrollmentRequest { public_key: vec![0x04; 64], ..valid.clone() }, "public_key"),
        (pb::CompleteEnrollmentRequest { public_key: spki_garbage, ..valid.clone() }, "public_key"),
        (pb::CompleteEnrollmentRequest { public_key: ed25519_key.clone(), key_algorithm: p256, ..valid.clone() }, "public_key"),
        (pb::CompleteEnrollmentRequest { public_key: vec![0x01; 31], key_algorithm: ed25519, ..valid.clone() }, "public_key"),
        (pb::CompleteEnrollmentRequest { public_key: vec![0x01; 33], key_algorithm: ed25519, ..valid.clone() }, "public_key"),
        (pb::CompleteEnrollmentRequest { key_algorithm: ed25519, ..valid.clone() }, "public_key"),
        (pb::CompleteEnrollmentRequest { push_token: "not-hex".into(), ..valid.clone() }, "push_token"),
        (
            pb::CompleteEnrollmentRequest { platform: pb::Platform::Fcm.into(), push_token: "two words".into(), ..valid.clone() },
            "push_token",
        ),
        (pb::CompleteEnrollmentRequest { push_token: "a".repeat(4097), ..valid.clone() }, "push_token"),
        (pb::CompleteEnrollmentRequest { display_name: "d".repeat(257), ..valid.clone() }, "display_name"),
        (pb::CompleteEnrollmentRequest { display_name: "Gina\u{1b}[31m".into(), ..valid.clone() }, "display_name"),
        (pb::CompleteEnrollmentRequest { display_name: "Gina\nAdmin".into(), ..valid.clone() }, "display_name"),
        (pb::CompleteEnrollmentRequest { enrollment_code: String::new(), ..valid.clone() }, "enrollment_code"),
    ];
    let mut client = DeviceServiceClient::new(server.channel.clone());
    for (request, field) in cases {
        let described = format!("{field} in {request:?}");
        let status = client.complete_enrollment(request).await.expect_err(&described);
        assert_not_opaque(&status);
        assert_code(Err::<(), _>(status), Code::InvalidArgument, field);
    }

    // None of that spent the code: the well-formed request completes with it.
    let read = server
        .enrollments(KEY_A)
        .get_enrollment(pb::GetEnrollmentRequest { enrollment_id: enrollment.enrollment_id.clone() })
        .await
        .expect("GetEnrollment")
        .into_inner();
    assert_eq!(read.state(), pb::EnrollmentState::Pending);
    let completed = client.complete_enrollment(valid).await.expect("the valid request completes").into_inner();
    assert!(!completed.device_id.is_empty(), "{completed:?}");
    assert_serving(&server).await;
}

/// The proto lists the P-256 encodings a device may send: a 65-byte uncompressed or
/// 33-byte compressed SEC1 point, or SubjectPublicKeyInfo DER. SEC1's "compact" form
/// (tag 0x05, x only) is none of them, even when x is a real key's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn p256_keys_in_undocumented_encodings_are_invalid_argument() {
    let server = TestServer::start().await;
    let enrollment = server.begin_enrollment("gus").await;
    let code = enrollment_code_from_uri(&enrollment.uri).expect("the URI carries a code");
    let key = PhoneKey::p256(P256Encoding::Sec1Compressed);
    let mut compact = key.public_key();
    assert_eq!(compact.len(), 33);
    compact[0] = 0x05;
    let request = pb::CompleteEnrollmentRequest {
        enrollment_code: code,
        platform: pb::Platform::Apns.into(),
        push_token: APNS_TOKEN.into(),
        public_key: compact,
        key_algorithm: key.algorithm().into(),
        display_name: "compact key".into(),
    };
    let mut client = DeviceServiceClient::new(server.channel.clone());
    assert_code(client.complete_enrollment(request).await, Code::InvalidArgument, "public_key");
    assert_serving(&server).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn create_challenge_fields_are_checked_by_name() {
    let server = TestServer::start().await;
    let mut phone = server.enrolled_phone("hana", PhoneKey::ed25519(), pb::Platform::Fcm).await;
    let valid = pb::CreateChallengeRequest { user_id: "hana".into(), ..Default::default() };
    let context = |field: &str, value: String| {
        let mut context = pb::SignInContext::default();
        match field {
            "context.application" => context.application = value,
            "context.ip_address" => context.ip_address = value,
            "context.location" => context.location = value,
            _ => context.user_agent = value,
        }
        Some(context)
    };

    let mut cases = Vec::new();
    for bad in [
        String::new(),
        "u".repeat(257),
        "€".repeat(86),
        "hana\n".into(),
        "ha\u{0}na".into(),
        "hana\u{7f}".into(),
        "\u{85}hana".into(),
        "\u{1b}[2Jhana".into(),
    ] {
        cases.push((pb::CreateChallengeRequest { user_id: bad, ..valid.clone() }, "user_id"));
    }
    for field in ["context.application", "context.ip_address", "context.location", "context.user_agent"] {
        for bad in [
            "x".repeat(257),
            "é".repeat(129),
            "Rotterdam\r\nApproved: yes".into(),
            "tab\there".into(),
            "nul\u{0}".into(),
            "\u{9b}31m".into(),
        ] {
            cases.push((pb::CreateChallengeRequest { context: context(field, bad), ..valid.clone() }, field));
        }
    }
    for bad in ["r".repeat(129), "req\n1".into(), "req\u{0}".into()] {
        cases.push((pb::CreateChallengeRequest { request_id: bad, ..valid.clone() }, "request_id"));
    }
    for ttl in [301, 3600, u32::MAX] {
        cases.push((pb::CreateChallengeRequest { ttl_seconds: ttl, ..valid.clone() }, "ttl_seconds"));
    }

    let mut challenges = server.challenges(KEY_A);
    for (request, field) in cases {
        let described = format!("{field} in {request:?}");
        let status = challenges.create_challenge(request).await.expect_err(&described);
        assert_not_opaque(&status);
        assert_code(Err::<(), _>(status), Code::InvalidArgument, field);
    }
    assert!(phone.pending().await.expect("the phone's pending list").is_empty(), "a refused request made a challenge");
    assert!(server.fcm.jobs().is_empty(), "a refused request pushed");

    // Every limit itself is fine: 256 bytes (multi-byte characters too), 128 bytes, 300 s.
    let at_the_limits = pb::SignInContext {
        application: "a".repeat(256),
        ip_address: "é".repeat(128),
        location: "Rotterdam, NL ".repeat(18) + "....",
        user_agent: "€".repeat(85) + "x",
    };
    assert_eq!(at_the_limits.location.len(), 256);
    assert_eq!(at_the_limits.user_agent.len(), 256);
    let created = challenges
        .create_challenge(pb::CreateChallengeRequest {
            user_id: "hana".into(),
            context: Some(at_the_limits.clone()),
            ttl_seconds: 300,
            request_id: "r".repeat(128),
            final_state_only: false,
        })
        .await
        .expect("a request at every limit")
        .into_inner();
    assert_eq!(created.context.as_ref(), Some(&at_the_limits));
    let pending = phone.pending().await.expect("the phone's pending list");
    assert_eq!(pending.len(), 1);
    assert_eq!(pending[0].context.as_ref(), Some(&at_the_limits));
    assert!(phone.respond(&created.challenge_id, pb::Decision::Approve, &created.number).await.expect("approval").accepted);
    assert_sign_in_works(&server, "hana", &mut phone).await;
    assert_serving(&server).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn enrollment_service_fields_are_checked_by_name() {
    let server = TestServer::start().await;
    let phone = server.enrolled_phone("ines", PhoneKey::ed25519(), pb::Platform::Fcm).await;
    let challenge = server.create_challenge("ines").await;
    let mut enrollments = server.enrollments(KEY_A);
    let bad_users = [String::new(), "u".repeat(257), "ines\n".into(), "in\u{0}es".into(), "\u{1b}ines".into()];

    for user in &bad_users {
        let begin = pb::BeginEnrollmentRequest { user_id: user.clone(), account_name: "ok".into(), kind: 1 };
        assert_code(enrollments.begin_enrollment(begin).await, Code::InvalidArgument, "user_id");
        let list = pb::ListDevicesRequest { user_id: user.clone() };
        assert_code(enrollments.list_devices(list).await, Code::InvalidArgument, "user_id");
        let unblock = pb::UnblockUserRequest { user_id: user.clone() };
        assert_code(enrollments.unblock_user(unblock).await, Code::InvalidArgument, "user_id");
    }
    for account in ["a".repeat(257), "é".repeat(129), "ines@gors.nl\n".into(), "ines\u{0}".into(), "\u{8}ines".into()] {
        let begin = pb::BeginEnrollmentRequest { user_id: "ines".into(), account_name: account, kind: 1 };
        assert_code(enrollments.begin_enrollment(begin).await, Code::InvalidArgument, "account_name");
    }
    let begin = pb::BeginEnrollmentRequest { user_id: "ines".into(), account_name: "ines".into(), kind: 9 };
    assert_code(enrollments.begin_enrollment(begin).await, Code::InvalidArgument, "kind");

    let enrollment_hex = "0123456789abcdef0123456789abcdef";
    for id in [
        String::new(),
        "en_".into(),
        "en_123".into(),
        format!("en_{}", enrollment_hex.to_uppercase()),
        format!("en_{enrollment_hex}0"),
        format!("en_{}", &enrollment_hex[1..]),
        format!(" en_{enrollment_hex}"),
        challenge.challenge_id.clone(),
        phone.device_id().to_owned(),
        "en_\u{0}".repeat(9),
    ] {
        let described = format!("enrollment_id {id:?}");
        let status = enrollments.get_enrollment(pb::GetEnrollmentRequest { enrollment_id: id }).await.expect_err(&described);
        assert_code(Err::<(), _>(status), Code::InvalidArgument, "enrollment_id");
    }
    for id in [
        String::new(),
        "dv_".into(),
        "dv_xyz".into(),
        format!("dv_{}", enrollment_hex.to_uppercase()),
        format!("dv_{enrollment_hex}\n"),
        challenge.challenge_id.clone(),
        unknown_id("en_"),
    ] {
        let described = format!("device_id {id:?}");
        let status = enrollments.remove_device(pb::RemoveDeviceRequest { device_id: id }).await.expect_err(&described);
        assert_code(Err::<(), _>(status), Code::InvalidArgument, "device_id");
    }

    // The device is still there and the challenge still pending.
    let devices = enrollments
        .list_devices(pb::ListDevicesRequest { user_id: "ines".into() })
        .await
        .expect("ListDevices")
        .into_inner()
        .devices;
    assert_eq!(devices.len(), 1);
    assert_eq!(challenge_state(&server, &challenge.challenge_id).await, pb::ChallengeState::Pending);
    assert_serving(&server).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_challenge_ids_are_invalid_argument() {
    let server = TestServer::start().await;
    let phone = server.enrolled_phone("jack", PhoneKey::ed25519(), pb::Platform::Fcm).await;
    let challenge = server.create_challenge("jack").await;
    let hex = challenge.challenge_id.trim_start_matches("ch_").to_owned();
    let malformed = [
        String::new(),
        "ch_".into(),
        "ch_0123".into(),
        format!("ch_{}", &hex[1..]),
        format!("ch_{hex}0"),
        format!("ch_{}", hex.to_uppercase().replace(|c: char| c.is_ascii_digit(), "A")),
        format!("CH_{hex}"),
        format!("dv_{hex}"),
        format!(" {}", challenge.challenge_id),
        format!("{}\n", challenge.challenge_id),
        format!("{}\u{0}", challenge.challenge_id),
        "ch_".to_owned() + &"é".repeat(16),
        phone.device_id().to_owned(),
        "c".repeat(1000),
    ];
    let mut challenges = server.challenges(KEY_A);
    for id in &malformed {
        let described = format!("challenge_id {id:?}");
        let result = challenges.get_challenge(pb::GetChallengeRequest { challenge_id: id.clone() }).await;
        assert_code(result, Code::InvalidArgument, "challenge_id");
        let result =
            challenges.watch_challenge(pb::WatchChallengeRequest { challenge_id: id.clone(), ..Default::default() }).await;
        assert_code(result.map(drop), Code::InvalidArgument, "challenge_id");
        let result = challenges.cancel_challenge(pb::CancelChallengeRequest { challenge_id: id.clone() }).await;
        let status = result.expect_err(&described);
        assert_code(Err::<(), _>(status), Code::InvalidArgument, "challenge_id");
    }
    assert_eq!(challenge_state(&server, &challenge.challenge_id).await, pb::ChallengeState::Pending);
    // The genuine id still watches: the current state at once.
    let mut stream = server.watch(&challenge.challenge_id).await;
    let first = timeout(DEADLINE, stream.message()).await.expect("the first message in time").expect("a message");
    assert_eq!(first.map(|c| c.state()), Some(pb::ChallengeState::Pending));
    assert_serving(&server).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn respond_to_challenge_fields_are_checked_by_name() {
    let server = TestServer::start().await;
    let mut phone = server.enrolled_phone("kim", PhoneKey::p256(P256Encoding::Spki), pb::Platform::Apns).await;
    let challenge = server.create_challenge("kim").await;
    let id = challenge.challenge_id.as_str();
    let number = challenge.number.as_str();
    let mut client = DeviceServiceClient::new(server.channel.clone());
    let respond = |proof: Option<pb::DeviceProof>, challenge_id: &str, decision: i32, number: &str| {
        pb::RespondToChallengeRequest { proof, challenge_id: challenge_id.into(), decision, number: number.into() }
    };
    let signed = |phone: &SimulatedPhone, challenge_id: &str, decision: &str, number: &str| {
        Some(phone.proof("RespondToChallenge", &[challenge_id, decision, number]))
    };
    let approve = pb::Decision::Approve as i32;
    let deny = pb::Decision::Deny as i32;
    let good = signed(&phone, id, "DECISION_APPROVE", number);
    let with_proof = |edit: &dyn Fn(&mut pb::DeviceProof)| {
        let mut proof = good.clone().expect("a proof");
        edit(&mut proof);
        Some(proof)
    };

    let cases = vec![
        (respond(None, id, approve, number), "proof"),
        (respond(with_proof(&|p| p.device_id.clear()), id, approve, number), "proof.device_id"),
        (respond(with_proof(&|p| p.device_id = "dv_nope".into()), id, approve, number), "proof.device_id"),
        (respond(with_proof(&|p| p.device_id = challenge.challenge_id.clone()), id, approve, number), "proof.device_id"),
        (respond(with_proof(&|p| p.signature.clear()), id, approve, number), "proof.signature"),
        (respond(with_proof(&|p| p.signature = vec![0x30; 513]), id, approve, number), "proof.signature"),
        (respond(signed(&phone, "", "DECISION_APPROVE", number), "", approve, number), "challenge_id"),
        (respond(signed(&phone, "bogus", "DECISION_APPROVE", number), "bogus", approve, number), "challenge_id"),
        (respond(signed(&phone, id, "DECISION_UNSPECIFIED", number), id, 0, number), "decision"),
        (respond(signed(&phone, id, "DECISION_UNSPECIFIED", ""), id, 0, ""), "decision"),
        (respond(good.clone(), id, 42, number), "decision"),
        (respond(good.clone(), id, -1, number), "decision"),
        (respond(signed(&phone, id, "DECISION_APPROVE", ""), id, approve, ""), "number"),
        (respond(signed(&phone, id, "DECISION_APPROVE", "4"), id, approve, "4"), "number"),
        (respond(signed(&phone, id, "DECISION_APPROVE", "123"), id, approve, "123"), "number"),
        (respond(signed(&phone, id, "DECISION_APPROVE", "4a"), id, approve, "4a"), "number"),
        (respond(signed(&phone, id, "DECISION_APPROVE", " 42"), id, approve, " 42"), "number"),
        (respond(signed(&phone, id, "DECISION_APPROVE", "٤٢"), id, approve, "٤٢"), "number"),
        (respond(signed(&phone, id, "DECISION_DENY", "no"), id, deny, "no"), "number"),
    ];
    for (request, field) in cases {
        let described = format!("{field} in {request:?}");
        let status = client.respond_to_challenge(request).await.expect_err(&described);
        assert_not_opaque(&status);
        assert_code(Err::<(), _>(status), Code::InvalidArgument, field);
    }

    // The other proof-carrying calls check their proof and fields the same way.
    assert_code(
        client.list_pending_challenges(pb::ListPendingChallengesRequest { proof: None }).await,
        Code::InvalidArgument,
        "proof",
    );
    let bare = pb::DeviceProof { device_id: phone.device_id().into(), timestamp_ms: SystemClock.now().0, signature: Vec::new() };
    assert_code(
        client.list_pending_challenges(pb::ListPendingChallengesRequest { proof: Some(bare) }).await,
        Code::InvalidArgument,
        "proof.signature",
    );
    assert_code(
        client.update_push_token(pb::UpdatePushTokenRequest { proof: None, push_token: APNS_TOKEN.into() }).await,
        Code::InvalidArgument,
        "proof",
    );
    let proof = Some(phone.proof("UpdatePushToken", &[""]));
    assert_code(
        client.update_push_token(pb::UpdatePushTokenRequest { proof, push_token: String::new() }).await,
        Code::InvalidArgument,
        "push_token",
    );
    let proof = Some(phone.proof("UpdatePushToken", &["two words"]));
    assert_code(
        client.update_push_token(pb::UpdatePushTokenRequest { proof, push_token: "two words".into() }).await,
        Code::InvalidArgument,
        "push_token",
    );

    // Nothing resolved the challenge; a correct answer does.
    assert_eq!(challenge_state(&server, id).await, pb::ChallengeState::Pending);
    let answer = phone.respond(id, pb::Decision::Approve, number).await.expect("the approval");
    assert!(answer.accepted, "{answer:?}");
    assert_eq!(answer.state(), pb::ChallengeState::Approved);
    assert_sign_in_works(&server, "kim", &mut phone).await;
    assert_serving(&server).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn empty_requests_name_their_first_required_field() {
    let server = TestServer::start().await;
    let mut challenges = server.challenges(KEY_A);
    let mut enrollments = server.enrollments(KEY_A);
    let mut devices = DeviceServiceClient::new(server.channel.clone());

    assert_code(challenges.create_challenge(pb::CreateChallengeRequest::default()).await, Code::InvalidArgument, "user_id");
    assert_code(challenges.get_challenge(pb::GetChallengeRequest::default()).await, Code::InvalidArgument, "challenge_id");
    assert_code(
        challenges.watch_challenge(pb::WatchChallengeRequest::default()).await.map(drop),
        Code::InvalidArgument,
        "challenge_id",
    );
    assert_code(challenges.cancel_challenge(pb::CancelChallengeRequest::default()).await, Code::InvalidArgument, "challenge_id");
    assert_code(enrollments.begin_enrollment(pb::BeginEnrollmentRequest::default()).await, Code::InvalidArgument, "user_id");
    assert_code(enrollments.get_enrollment(pb::GetEnrollmentRequest::default()).await, Code::InvalidArgument, "enrollment_id");
    assert_code(enrollments.list_devices(pb::ListDevicesRequest::default()).await, Code::InvalidArgument, "user_id");
    assert_code(enrollments.remove_device(pb::RemoveDeviceRequest::default()).await, Code::InvalidArgument, "device_id");
    assert_code(enrollments.unblock_user(pb::UnblockUserRequest::default()).await, Code::InvalidArgument, "user_id");
    assert_code(
        devices.complete_enrollment(pb::CompleteEnrollmentRequest::default()).await,
        Code::InvalidArgument,
        "enrollment_code",
    );
    assert_code(devices.update_push_token(pb::UpdatePushTokenRequest::default()).await, Code::InvalidArgument, "proof");
    assert_code(
        devices.list_pending_challenges(pb::ListPendingChallengesRequest::default()).await,
        Code::InvalidArgument,
        "proof",
    );
    assert_code(devices.respond_to_challenge(pb::RespondToChallengeRequest::default()).await, Code::InvalidArgument, "proof");

    // The TOTP calls are outside this suite; they may refuse, but never opaquely.
    let totp = [
        challenges.verify_totp(pb::VerifyTotpRequest::default()).await.map(drop),
        enrollments.confirm_totp_enrollment(pb::ConfirmTotpEnrollmentRequest::default()).await.map(drop),
    ];
    for outcome in totp {
        if let Err(status) = outcome {
            assert_not_opaque(&status);
        }
    }
    assert_serving(&server).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversize_requests_are_refused_and_the_channel_carries_on() {
    let server = TestServer::start().await;
    let mut phone = server.enrolled_phone("lena", PhoneKey::p256(P256Encoding::Sec1Uncompressed), pb::Platform::Apns).await;
    let challenge = server.create_challenge("lena").await;
    let mut challenges = server.challenges(KEY_A);
    let mut enrollments = server.enrollments(KEY_A);
    let mut devices = DeviceServiceClient::new(server.channel.clone());
    let huge = "u".repeat(70_000);
    let refused = |outcome: Result<(), Status>, what: &str| {
        let status = outcome.expect_err(what);
        assert!(
            matches!(status.code(), Code::OutOfRange | Code::ResourceExhausted),
            "{what}: OUT_OF_RANGE or RESOURCE_EXHAUSTED, got {status:?}"
        );
    };

    for round in 0..3 {
        let outcome = timeout(
            DEADLINE,
            challenges.create_challenge(pb::CreateChallengeRequest { user_id: huge.clone(), ..Default::default() }),
        )
        .await
        .expect("an answer in time");
        refused(outcome.map(drop), &format!("CreateChallenge with a 70 000-byte user_id, round {round}"));
        let context = pb::SignInContext { user_agent: huge.clone(), ..Default::default() };
        let outcome = timeout(
            DEADLINE,
            challenges.create_challenge(pb::CreateChallengeRequest {
                user_id: "lena".into(),
                context: Some(context),
                ..Default::default()
            }),
        )
        .await
        .expect("an answer in time");
        refused(outcome.map(drop), "CreateChallenge with a 70 000-byte user agent");
        let outcome = timeout(
            DEADLINE,
            enrollments.begin_enrollment(pb::BeginEnrollmentRequest {
                user_id: "lena".into(),
                account_name: huge.clone(),
                kind: 1,
            }),
        )
        .await
        .expect("an answer in time");
        refused(outcome.map(drop), "BeginEnrollment with a 70 000-byte account_name");
        let outcome = timeout(
            DEADLINE,
            devices.complete_enrollment(pb::CompleteEnrollmentRequest {
                enrollment_code: "0".repeat(32),
                platform: 1,
                public_key: vec![0x04; 70_000],
                key_algorithm: 1,
                ..Default::default()
            }),
        )
        .await
        .expect("an answer in time");
        refused(outcome.map(drop), "CompleteEnrollment with a 70 000-byte public key");
        let mut proof =
            phone.proof("RespondToChallenge", &[challenge.challenge_id.as_str(), "DECISION_APPROVE", challenge.number.as_str()]);
        proof.signature = vec![0x30; 70_000];
        let outcome = timeout(
            DEADLINE,
            devices.respond_to_challenge(pb::RespondToChallengeRequest {
                proof: Some(proof),
                challenge_id: challenge.challenge_id.clone(),
                decision: pb::Decision::Approve.into(),
                number: challenge.number.clone(),
            }),
        )
        .await
        .expect("an answer in time");
        refused(outcome.map(drop), "RespondToChallenge with a 70 000-byte signature");
    }

    // Just under the limit the message decodes, and the field rule answers by name.
    assert_code(
        challenges.create_challenge(pb::CreateChallengeRequest { user_id: "u".repeat(60_000), ..Default::default() }).await,
        Code::InvalidArgument,
        "user_id",
    );

    // The same channel and clients carry on.
    assert_eq!(challenge_state(&server, &challenge.challenge_id).await, pb::ChallengeState::Pending);
    let answer = phone.respond(&challenge.challenge_id, pb::Decision::Approve, &challenge.number).await.expect("approval");
    assert!(answer.accepted);
    assert_sign_in_works(&server, "lena", &mut phone).await;
    enrollments
        .begin_enrollment(pb::BeginEnrollmentRequest { user_id: "lena".into(), account_name: "lena".into(), kind: 1 })
        .await
        .expect("BeginEnrollment on the same client");
    assert_serving(&server).await;
}
