//! End to end over a real tonic client: enrollment, sign-in, every way a challenge
//! ends, the per-user rules, restarts and shutdown.

// Tests: a failed expectation is a failed test.
#![allow(clippy::expect_used, clippy::unwrap_used, clippy::panic)]

mod support;

use std::time::Duration;

use pushmatch::domain::challenge::ChallengeState;
use pushmatch::pb;
use pushmatch::phone::{P256Encoding, PhoneKey, SimulatedPhone};
use pushmatch::push::{PushJob, PushKind};
use support::*;
use tonic::Code;

async fn approve_flow(key: PhoneKey, platform: pb::Platform) {
    let server = TestServer::start().await;
    let enrollment = server.begin_enrollment("jan").await;
    assert!(
        enrollment.uri.starts_with("pushmatch://enroll?v=1&server=http%3A%2F%2F127.0.0.1%3A50051&code="),
        "{}",
        enrollment.uri
    );
    assert!(enrollment.uri.ends_with("&issuer=Gors&account=jan%40gors.nl"), "{}", enrollment.uri);
    assert_eq!(enrollment.state(), pb::EnrollmentState::Pending);
    assert_eq!(&enrollment.qr_png[..8], b"\x89PNG\r\n\x1a\n");

    let mut phone = server.phone(key, platform);
    let completed = phone.enroll(&enrollment.uri, "Jan's phone").await.expect("enrolls");
    assert_eq!((completed.account_name.as_str(), completed.issuer.as_str()), ("jan@gors.nl", "Gors"));
    let read = server
        .enrollments(KEY_A)
        .get_enrollment(pb::GetEnrollmentRequest { enrollment_id: enrollment.enrollment_id.clone() })
        .await
        .expect("get enrollment")
        .into_inner();
    assert_eq!(read.state(), pb::EnrollmentState::Completed);
    assert_eq!(read.device_id, completed.device_id);

    let challenge = server
        .challenges(KEY_A)
        .create_challenge(pb::CreateChallengeRequest {
            user_id: "jan".into(),
            context: Some(pb::SignInContext {
                application: "Citrix Workspace".into(),
                location: "Rotterdam, NL".into(),
                ..Default::default()
            }),
            ..Default::default()
        })
        .await
        .expect("create")
        .into_inner();
    let number: u8 = challenge.number.parse().expect("digits");
    assert!((10..=99).contains(&number));
    assert_eq!(challenge.state(), pb::ChallengeState::Pending);
    let lifetime = challenge.expires_at.expect("expiry").seconds - challenge.created_at.expect("created").seconds;
    assert_eq!(lifetime, 60, "the default TTL");
    let mut watch = server.watch(&challenge.challenge_id).await;

    // The push carries the challenge id; the job type has no number to carry.
    let recorder = if platform == pb::Platform::Apns { &server.apns } else { &server.fcm };
    let jobs = tokio::time::timeout(
        DEADLINE,
        recorder.wait_for(|job| job.challenge_id().is_some_and(|id| id.as_str() == challenge.challenge_id)),
    )
    .await
    .expect("pushed");
    assert_eq!(jobs.len(), 1);
    assert_eq!(jobs[0].device_id.as_str(), completed.device_id);

    let pending = phone.pending().await.expect("pending");
    assert_eq!(pending.len(), 1);
    assert_eq!(pending[0].challenge_id, challenge.challenge_id);
    assert_eq!(pending[0].context.as_ref().expect("context").application, "Citrix Workspace");
    assert_eq!((pending[0].issuer.as_str(), pending[0].account_name.as_str()), ("Gors", "jan@gors.nl"));

    let answer = phone.respond(&challenge.challenge_id, pb::Decision::Approve, &challenge.number).await.expect("respond");
    assert!(answer.accepted);
    assert_eq!(answer.state(), pb::ChallengeState::Approved);

    let seen = follow_to_final(&mut watch).await;
    assert_eq!(seen[0].state(), pb::ChallengeState::Pending, "the current state comes first");
    let last = seen.last().expect("final");
    assert_eq!(last.state(), pb::ChallengeState::Approved);
    assert_eq!(last.resolved_by_device_id, completed.device_id);
    assert!(last.resolved_at.is_some());

    let devices = server.enrollments(KEY_A).list_devices(pb::ListDevicesRequest { user_id: "jan".into() }).await.expect("list");
    let device = &devices.into_inner().devices[0];
    assert_eq!(device.platform(), platform);
    assert!(device.push_enabled);
    assert!(device.last_used_at.is_some(), "answering marks the device used");
    assert!(phone.pending().await.expect("pending").is_empty(), "nothing pending after approval");
}

#[tokio::test]
async fn p256_sec1_uncompressed_device_approves() {
    approve_flow(PhoneKey::p256(P256Encoding::Sec1Uncompressed), pb::Platform::Apns).await;
}

#[tokio::test]
async fn p256_sec1_compressed_device_approves() {
    approve_flow(PhoneKey::p256(P256Encoding::Sec1Compressed), pb::Platform::Fcm).await;
}

#[tokio::test]
async fn p256_spki_device_with_der_signatures_approves() {
    let PhoneKey::P256 { key, encoding, .. } = PhoneKey::p256(P256Encoding::Spki) else { unreachable!() };
    approve_flow(PhoneKey::P256 { key, encoding, der_signatures: true }, pb::Platform::Apns).await;
}

#[tokio::test]
async fn ed25519_device_approves() {
    approve_flow(PhoneKey::ed25519(), pb::Platform::Fcm).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_concurrent_approvals_accept_exactly_one() {
    let server = TestServer::start().await;
    let phone = server.enrolled_phone("jan", PhoneKey::ed25519(), pb::Platform::Fcm).await;
    let challenge = server.create_challenge("jan").await;
    let mut watch = server.watch(&challenge.challenge_id).await;
    // Fifty answers, each with a proof of its own (a proof works once), sent at once.
    let fields = [challenge.challenge_id.as_str(), "DECISION_APPROVE", challenge.number.as_str()];
    let now = pushmatch::domain::time::Clock::now(&server.clock).0;
    let proofs: Vec<_> = (0..50).map(|i| phone.proof_at("RespondToChallenge", &fields, now + i)).collect();
    let answers = proofs.into_iter().map(|proof| {
        let mut phone = SimulatedPhone::new(server.channel.clone(), phone.key().clone(), pb::Platform::Fcm, FCM_TOKEN);
        phone.impersonate(phone_id(&proof));
        let (id, number) = (challenge.challenge_id.clone(), challenge.number.clone());
        tokio::spawn(async move { phone.respond_with(proof, &id, pb::Decision::Approve, &number).await })
    });
    let answers = futures::future::join_all(answers).await;
    let mut accepted = 0;
    for answer in answers {
        let answer = answer.expect("task").expect("answered");
        assert_eq!(answer.state(), pb::ChallengeState::Approved);
        accepted += usize::from(answer.accepted);
    }
    assert_eq!(accepted, 1);
    assert_eq!(follow_to_final(&mut watch).await.last().expect("final").state(), pb::ChallengeState::Approved);
}

fn phone_id(proof: &pb::DeviceProof) -> &str {
    &proof.device_id
}

async fn respond_and_watch(
    server: &TestServer,
    phone: &mut SimulatedPhone,
    decision: pb::Decision,
    number: &str,
) -> (pb::Challenge, pb::RespondToChallengeResponse, pb::Challenge) {
    let challenge = server.create_challenge("jan").await;
    let mut watch = server.watch(&challenge.challenge_id).await;
    let number = if number == "right" { challenge.number.clone() } else { number.to_owned() };
    let answer = phone.respond(&challenge.challenge_id, decision, &number).await.expect("respond");
    let last = follow_to_final(&mut watch).await.pop().expect("final");
    (challenge, answer, last)
}

fn another_number(number: &str) -> String {
    if number == "10" { "11".into() } else { "10".into() }
}

#[tokio::test]
async fn a_wrong_number_denies_with_one_try() {
    let server = TestServer::start().await;
    let mut phone = server.enrolled_phone("jan", PhoneKey::p256(P256Encoding::Sec1Uncompressed), pb::Platform::Apns).await;
    let challenge = server.create_challenge("jan").await;
    let mut watch = server.watch(&challenge.challenge_id).await;
    let wrong = another_number(&challenge.number);
    let answer = phone.respond(&challenge.challenge_id, pb::Decision::Approve, &wrong).await.expect("respond");
    assert!(answer.accepted);
    assert_eq!((answer.state(), answer.deny_reason()), (pb::ChallengeState::Denied, pb::DenyReason::WrongNumber));
    let last = follow_to_final(&mut watch).await.pop().expect("final");
    assert_eq!((last.state(), last.deny_reason()), (pb::ChallengeState::Denied, pb::DenyReason::WrongNumber));
    // No second guess: the right number now reads the final state, not accepted.
    let retry = phone.respond(&challenge.challenge_id, pb::Decision::Approve, &challenge.number).await.expect("respond");
    assert!(!retry.accepted);
    assert_eq!(retry.state(), pb::ChallengeState::Denied);
}

#[tokio::test]
async fn deny_resolves_as_user_denied() {
    let server = TestServer::start().await;
    let mut phone = server.enrolled_phone("jan", PhoneKey::ed25519(), pb::Platform::Apns).await;
    let (_, answer, last) = respond_and_watch(&server, &mut phone, pb::Decision::Deny, "").await;
    assert!(answer.accepted);
    assert_eq!((last.state(), last.deny_reason()), (pb::ChallengeState::Denied, pb::DenyReason::UserDenied));
}

#[tokio::test]
async fn cancel_reaches_the_watcher_and_later_answers_are_not_accepted() {
    let server = TestServer::start().await;
    let mut phone = server.enrolled_phone("jan", PhoneKey::ed25519(), pb::Platform::Apns).await;
    let challenge = server.create_challenge("jan").await;
    let mut watch = server.watch(&challenge.challenge_id).await;
    let cancelled = server
        .challenges(KEY_A)
        .cancel_challenge(pb::CancelChallengeRequest { challenge_id: challenge.challenge_id.clone() })
        .await
        .expect("cancel")
        .into_inner();
    assert_eq!(cancelled.state(), pb::ChallengeState::Cancelled);
    assert_eq!(follow_to_final(&mut watch).await.pop().expect("final").state(), pb::ChallengeState::Cancelled);
    let late = phone.respond(&challenge.challenge_id, pb::Decision::Approve, &challenge.number).await.expect("respond");
    assert!(!late.accepted);
    assert_eq!(late.state(), pb::ChallengeState::Cancelled);
    // Cancelling again reads the final state.
    let again = server
        .challenges(KEY_A)
        .cancel_challenge(pb::CancelChallengeRequest { challenge_id: challenge.challenge_id.clone() })
        .await
        .expect("cancel again")
        .into_inner();
    assert_eq!(again.state(), pb::ChallengeState::Cancelled);
}

#[tokio::test]
async fn a_fraud_report_blocks_until_unblocked() {
    let server = TestServer::start().await;
    let mut phone = server.enrolled_phone("jan", PhoneKey::ed25519(), pb::Platform::Fcm).await;
    let (_, answer, last) = respond_and_watch(&server, &mut phone, pb::Decision::ReportFraud, "").await;
    assert!(answer.accepted);
    assert_eq!(last.state(), pb::ChallengeState::FraudReported);
    let mut challenges = server.challenges(KEY_A);
    let blocked = challenges.create_challenge(pb::CreateChallengeRequest { user_id: "jan".into(), ..Default::default() }).await;
    assert_code(blocked, Code::FailedPrecondition, "fraud");
    // Time alone does not lift a fraud block.
    server.clock.advance(Duration::from_secs(24 * 3600));
    let blocked = challenges.create_challenge(pb::CreateChallengeRequest { user_id: "jan".into(), ..Default::default() }).await;
    assert_code(blocked, Code::FailedPrecondition, "UnblockUser");
    server.enrollments(KEY_A).unblock_user(pb::UnblockUserRequest { user_id: "jan".into() }).await.expect("unblock");
    server.create_challenge("jan").await;
}

#[tokio::test]
async fn three_wrong_numbers_block_new_challenges() {
    let server = TestServer::start().await;
    let mut phone = server.enrolled_phone("jan", PhoneKey::ed25519(), pb::Platform::Fcm).await;
    for _ in 0..3 {
        let challenge = server.create_challenge("jan").await;
        let answer = phone.respond(&challenge.challenge_id, pb::Decision::Approve, &another_number(&challenge.number)).await;
        assert_eq!(answer.expect("respond").deny_reason(), pb::DenyReason::WrongNumber);
    }
    let mut challenges = server.challenges(KEY_A);
    let request = || pb::CreateChallengeRequest { user_id: "jan".into(), ..Default::default() };
    assert_code(challenges.create_challenge(request()).await, Code::FailedPrecondition, "wrong numbers");
    // UnblockUser lifts it early ...
    server.enrollments(KEY_A).unblock_user(pb::UnblockUserRequest { user_id: "jan".into() }).await.expect("unblock");
    challenges.create_challenge(request()).await.expect("unblocked");
    // ... and otherwise it ends after 15 minutes.
    for _ in 0..3 {
        let challenge = server.create_challenge("jan").await;
        phone.respond(&challenge.challenge_id, pb::Decision::Approve, &another_number(&challenge.number)).await.expect("respond");
    }
    assert_code(challenges.create_challenge(request()).await, Code::FailedPrecondition, "wrong numbers");
    server.clock.advance(Duration::from_secs(15 * 60));
    challenges.create_challenge(request()).await.expect("the block ended by itself");
}

#[tokio::test]
async fn expiry_reaches_the_watcher_without_polling() {
    let server = TestServer::start().await;
    let mut phone = server.enrolled_phone("jan", PhoneKey::ed25519(), pb::Platform::Fcm).await;
    let challenge = server
        .challenges(KEY_A)
        .create_challenge(pb::CreateChallengeRequest { user_id: "jan".into(), ttl_seconds: 30, ..Default::default() })
        .await
        .expect("create")
        .into_inner();
    let mut watch = server.watch(&challenge.challenge_id).await;
    assert_eq!(watch.message().await.expect("first").expect("current state").state(), pb::ChallengeState::Pending);
    server.clock.advance(Duration::from_secs(30));
    let last = follow_to_final(&mut watch).await.pop().expect("final");
    assert_eq!(last.state(), pb::ChallengeState::Expired);
    let read = server
        .challenges(KEY_A)
        .get_challenge(pb::GetChallengeRequest { challenge_id: challenge.challenge_id.clone() })
        .await
        .expect("get")
        .into_inner();
    assert_eq!(read.state(), pb::ChallengeState::Expired);
    let late = phone.respond(&challenge.challenge_id, pb::Decision::Approve, &challenge.number).await.expect("respond");
    assert!(!late.accepted);
    assert_eq!(late.state(), pb::ChallengeState::Expired);
    assert!(phone.pending().await.expect("pending").is_empty());
}

#[tokio::test]
async fn a_repeated_request_id_gives_one_challenge_and_one_push() {
    let server = TestServer::start().await;
    server.enrolled_phone("jan", PhoneKey::ed25519(), pb::Platform::Fcm).await;
    let mut challenges = server.challenges(KEY_A);
    let request = pb::CreateChallengeRequest { user_id: "jan".into(), request_id: "login-7f3a".into(), ..Default::default() };
    let first = challenges.create_challenge(request.clone()).await.expect("first").into_inner();
    let again = challenges.create_challenge(request.clone()).await.expect("again").into_inner();
    assert_eq!(first.challenge_id, again.challenge_id);
    assert_eq!(first.number, again.number);
    let enqueued = server.push_counters.enqueued.load(std::sync::atomic::Ordering::Relaxed);
    assert_eq!(enqueued, 1, "one push job for one device, however often the request repeats");
    // Another user may use the same request_id.
    server.enrolled_phone("piet", PhoneKey::ed25519(), pb::Platform::Fcm).await;
    let other = challenges
        .create_challenge(pb::CreateChallengeRequest { user_id: "piet".into(), ..request })
        .await
        .expect("other user")
        .into_inner();
    assert_ne!(other.challenge_id, first.challenge_id);
}

#[tokio::test]
async fn per_user_limits_refuse_push_bombing() {
    let server = TestServer::start().await;
    server.enrolled_phone("jan", PhoneKey::ed25519(), pb::Platform::Fcm).await;
    server.enrolled_phone("piet", PhoneKey::ed25519(), pb::Platform::Fcm).await;
    let mut challenges = server.challenges(KEY_A);
    let request = |user: &str| pb::CreateChallengeRequest { user_id: user.into(), ..Default::default() };
    let mut ids = Vec::new();
    for _ in 0..3 {
        ids.push(challenges.create_challenge(request("jan")).await.expect("within limits").into_inner().challenge_id);
    }
    assert_code(challenges.create_challenge(request("jan")).await, Code::ResourceExhausted, "pending");
    challenges.create_challenge(request("piet")).await.expect("another user is not affected");
    // Cancelling frees pending slots; the 10-per-10-minutes window still counts.
    for _ in 0..7 {
        let oldest = ids.remove(0);
        challenges.cancel_challenge(pb::CancelChallengeRequest { challenge_id: oldest }).await.expect("cancel");
        ids.push(challenges.create_challenge(request("jan")).await.expect("within limits").into_inner().challenge_id);
    }
    challenges.cancel_challenge(pb::CancelChallengeRequest { challenge_id: ids.remove(0) }).await.expect("cancel");
    assert_code(challenges.create_challenge(request("jan")).await, Code::ResourceExhausted, "600 seconds");
    server.clock.advance(Duration::from_secs(601));
    challenges.create_challenge(request("jan")).await.expect("the window slid");
}

#[tokio::test]
async fn a_restart_keeps_devices_and_blocks() {
    let server = TestServer::start().await;
    let mut phone = server.enrolled_phone("jan", PhoneKey::p256(P256Encoding::Spki), pb::Platform::Apns).await;
    let (_, _, last) = respond_and_watch(&server, &mut phone, pb::Decision::ReportFraud, "").await;
    assert_eq!(last.state(), pb::ChallengeState::FraudReported);
    let clock = server.clock.clone();
    let dir = server.stop().await;

    let server = TestServer::start_on(dir, clock, |_| {}).await;
    let devices = server.enrollments(KEY_A).list_devices(pb::ListDevicesRequest { user_id: "jan".into() }).await.expect("list");
    assert_eq!(devices.into_inner().devices.len(), 1, "the device survived the restart");
    let blocked = server
        .challenges(KEY_A)
        .create_challenge(pb::CreateChallengeRequest { user_id: "jan".into(), ..Default::default() })
        .await;
    assert_code(blocked, Code::FailedPrecondition, "fraud");
    server.enrollments(KEY_A).unblock_user(pb::UnblockUserRequest { user_id: "jan".into() }).await.expect("unblock");
    // The same phone, with the key it enrolled before the restart, still answers.
    let mut phone = SimulatedPhone::new(server.channel.clone(), phone.key().clone(), pb::Platform::Apns, APNS_TOKEN);
    let enrolled_id = last.resolved_by_device_id.clone();
    phone.impersonate(&enrolled_id);
    let (_, answer, last) = respond_and_watch(&server, &mut phone, pb::Decision::Approve, "right").await;
    assert!(answer.accepted);
    assert_eq!(last.state(), pb::ChallengeState::Approved);
}

#[tokio::test]
async fn deliveries_reach_the_watcher_and_every_device_is_pushed() {
    let server = TestServer::start().await;
    let mut iphone = server.enrolled_phone("jan", PhoneKey::p256(P256Encoding::Sec1Uncompressed), pb::Platform::Apns).await;
    server.enrolled_phone("jan", PhoneKey::ed25519(), pb::Platform::Fcm).await;
    server.enrolled_phone("jan", PhoneKey::ed25519(), pb::Platform::Fcm).await;
    let challenge = server.create_challenge("jan").await;
    assert_eq!(challenge.deliveries.len(), 3);
    assert!(challenge.deliveries.iter().all(|d| d.state() == pb::DeliveryState::Queued));
    let mut watch = server.watch(&challenge.challenge_id).await;
    let all_sent = tokio::time::timeout(DEADLINE, async {
        while let Some(update) = watch.message().await.expect("message") {
            if update.deliveries.iter().all(|d| d.state() == pb::DeliveryState::Sent && d.attempts == 1) {
                return update;
            }
        }
        panic!("stream ended");
    })
    .await
    .expect("every delivery SENT");
    assert_eq!(all_sent.deliveries.len(), 3);

    // The first answer wins; the other phones are told to take the prompt down.
    iphone.respond(&challenge.challenge_id, pb::Decision::Approve, &challenge.number).await.expect("respond");
    let clears = |jobs: &[PushJob]| {
        jobs.iter()
            .filter(|j| j.challenge_id().is_some_and(|id| id.as_str() == challenge.challenge_id))
            .filter(|j| matches!(j.kind, PushKind::Clear { state: ChallengeState::Approved, .. }))
            .count()
    };
    let fcm =
        tokio::time::timeout(DEADLINE, server.fcm.wait_until(|jobs| clears(jobs) == 2)).await.expect("both FCM phones cleared");
    let cleared: Vec<_> = fcm.iter().filter(|j| matches!(j.kind, PushKind::Clear { .. })).map(|j| j.device_id.clone()).collect();
    assert_ne!(cleared[0], cleared[1], "one clear message per other phone");
    assert_eq!(clears(&server.apns.jobs()), 0, "the phone that answered gets no clear message");
}

#[tokio::test]
async fn a_dead_token_turns_pushes_off_until_a_new_token_arrives() {
    let server = TestServer::start().await;
    let mut phone = server.enrolled_phone("jan", PhoneKey::ed25519(), pb::Platform::Fcm).await;
    server.fcm.answer_with(pushmatch::push::SendOutcome::Unregistered { reason: "UNREGISTERED".into() });
    let challenge = server.create_challenge("jan").await;
    let mut watch = server.watch(&challenge.challenge_id).await;
    let unregistered = tokio::time::timeout(DEADLINE, async {
        while let Some(update) = watch.message().await.expect("message") {
            if let Some(d) = update.deliveries.first().filter(|d| d.state() == pb::DeliveryState::Unregistered) {
                return d.clone();
            }
        }
        panic!("stream ended");
    })
    .await
    .expect("UNREGISTERED");
    assert_eq!(unregistered.error, "UNREGISTERED");
    let list = || async {
        server
            .enrollments(KEY_A)
            .list_devices(pb::ListDevicesRequest { user_id: "jan".into() })
            .await
            .expect("list")
            .into_inner()
            .devices
    };
    assert!(!list().await[0].push_enabled);
    // The app can still answer through the pull fallback; the next challenge pushes nothing.
    phone.respond(&challenge.challenge_id, pb::Decision::Deny, "").await.expect("respond");
    let next = server.create_challenge("jan").await;
    assert!(next.deliveries.is_empty());
    assert_eq!(phone.pending().await.expect("pending")[0].challenge_id, next.challenge_id);

    server.fcm.answer_with(pushmatch::push::SendOutcome::Sent);
    phone.update_push_token("fcm-new-token").await.expect("update token");
    assert!(list().await[0].push_enabled);
    phone.respond(&next.challenge_id, pb::Decision::Deny, "").await.expect("respond");
    let third = server.create_challenge("jan").await;
    assert_eq!(third.deliveries.len(), 1);
    let jobs = tokio::time::timeout(
        DEADLINE,
        server.fcm.wait_for(|j| j.challenge_id().is_some_and(|id| id.as_str() == third.challenge_id)),
    )
    .await
    .expect("pushed");
    assert_eq!(jobs.last().expect("job").push_token, "fcm-new-token");
}

#[tokio::test]
async fn shutdown_ends_watch_streams_cleanly() {
    let server = TestServer::start().await;
    server.enrolled_phone("jan", PhoneKey::ed25519(), pb::Platform::Fcm).await;
    let challenge = server.create_challenge("jan").await;
    let mut watch = server.watch(&challenge.challenge_id).await;
    assert_eq!(watch.message().await.expect("first").expect("state").state(), pb::ChallengeState::Pending);
    let stopping = tokio::spawn(server.stop());
    let end = tokio::time::timeout(DEADLINE, watch.message()).await.expect("the stream ends before the deadline");
    let status = end.expect_err("ends with a status");
    assert_eq!(status.code(), Code::Unavailable);
    tokio::time::timeout(DEADLINE, stopping).await.expect("server drained").expect("stop task");
}

#[tokio::test]
async fn health_and_reflection_answer() {
    use tonic_health::pb::health_check_response::ServingStatus;
    use tonic_health::pb::health_client::HealthClient;
    use tonic_reflection::pb::v1::ServerReflectionRequest;
    use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
    use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
    use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;
    let server = TestServer::start().await;
    let mut health = HealthClient::new(server.channel.clone());
    for service in ["", "pushmatch.v1.ChallengeService", "pushmatch.v1.DeviceService", "pushmatch.v1.EnrollmentService"] {
        let status = health.check(tonic_health::pb::HealthCheckRequest { service: service.into() }).await.expect("health");
        assert_eq!(status.into_inner().status(), ServingStatus::Serving, "{service:?}");
    }
    let request =
        ServerReflectionRequest { host: String::new(), message_request: Some(MessageRequest::ListServices(String::new())) };
    let mut responses = ServerReflectionClient::new(server.channel.clone())
        .server_reflection_info(futures::stream::iter([request]))
        .await
        .expect("reflection")
        .into_inner();
    let response = responses.message().await.expect("message").expect("a response");
    let Some(MessageResponse::ListServicesResponse(list)) = response.message_response else { panic!("{response:?}") };
    let names: Vec<_> = list.service.into_iter().map(|s| s.name).collect();
    for service in
        ["pushmatch.v1.ChallengeService", "pushmatch.v1.DeviceService", "pushmatch.v1.EnrollmentService", "grpc.health.v1.Health"]
    {
        assert!(names.iter().any(|n| n == service), "{service} in {names:?}");
    }
}

/// CreateAndWatchChallenge: one call, whose first message is the challenge just
/// made (its number for the sign-in page), then every change to the final state,
/// where the stream ends. A retry with the same request_id streams the same
/// challenge; a refused create fails the call as CreateChallenge would, naming
/// the field.
#[tokio::test]
async fn create_and_watch_is_one_call_from_the_number_to_the_outcome() {
    let server = TestServer::start().await;
    let mut phone = server.enrolled_phone("jan", PhoneKey::ed25519(), pb::Platform::Fcm).await;
    let request = pb::CreateChallengeRequest {
        user_id: "jan".into(),
        context: Some(pb::SignInContext { application: "VPN".into(), ..Default::default() }),
        request_id: "sign-in-1".into(),
        ..Default::default()
    };
    let mut stream =
        server.challenges(KEY_A).create_and_watch_challenge(request.clone()).await.expect("create and watch").into_inner();
    let first = tokio::time::timeout(DEADLINE, stream.message()).await.expect("in time").expect("message").expect("first");
    assert_eq!(first.state(), pb::ChallengeState::Pending);
    assert_eq!(first.context.as_ref().expect("context").application, "VPN");
    let number: u8 = first.number.parse().expect("two digits");
    assert!((10..=99).contains(&number));
    let pending = phone.pending().await.expect("pending");
    assert_eq!(pending.iter().map(|p| &p.challenge_id).collect::<Vec<_>>(), vec![&first.challenge_id], "one challenge made");

    let answer = phone.respond(&first.challenge_id, pb::Decision::Approve, &first.number).await.expect("respond");
    assert!(answer.accepted);
    let rest = follow_to_final(&mut stream).await;
    let last = rest.last().expect("final");
    assert_eq!((last.challenge_id.as_str(), last.state()), (first.challenge_id.as_str(), pb::ChallengeState::Approved));
    assert_eq!(last.resolved_by_device_id, phone.device_id());

    let mut again = server.challenges(KEY_A).create_and_watch_challenge(request).await.expect("retry").into_inner();
    let seen = follow_to_final(&mut again).await;
    assert_eq!(seen.len(), 1, "final already: one message, then the end");
    assert_eq!((seen[0].challenge_id.as_str(), seen[0].state()), (first.challenge_id.as_str(), pb::ChallengeState::Approved));

    let create = |user: &str| pb::CreateChallengeRequest { user_id: user.into(), ..Default::default() };
    assert_code(server.challenges(KEY_A).create_and_watch_challenge(create("")).await, Code::InvalidArgument, "user_id");
    assert_code(server.challenges(KEY_A).create_and_watch_challenge(create("nobody")).await, Code::FailedPrecondition, "user_id");
    let long_ttl = pb::CreateChallengeRequest { ttl_seconds: 3_600, ..create("jan") };
    assert_code(server.challenges(KEY_A).create_and_watch_challenge(long_ttl).await, Code::InvalidArgument, "ttl_seconds");
}
