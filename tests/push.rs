//! The real push senders end to end: a pushmatch server whose `[push.apns]` and
//! `[push.fcm]` point at mock APNs and FCM servers (HTTP/2 over TLS, a CA made for
//! the run) and a mock OAuth token endpoint. Everything is awaited as an event with a
//! deadline: the mocks' recorded requests and the IdP's WatchChallenge stream.

// Tests: a failed expectation is a failed test.
#![allow(clippy::expect_used, clippy::unwrap_used, clippy::panic)]

mod support;

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use futures::StreamExt as _;
use pushmatch::config::Config;
use pushmatch::pb;
use support::mock_push::{FCM_CLIENT_EMAIL, FCM_KEY_ID, FCM_PROJECT, Recorded, Reply, form, verify_es256, verify_rs256};
use support::push_providers::*;
use support::*;
use tonic::Code;

/// Headers whose value the wire format fixes whatever the challenge, asserted by the
/// tests themselves: `apns-priority` is always "10", which is also one of the 90
/// numbers a challenge can show (a CI run drew it), so equality there means nothing.
const FIXED_HEADERS: &[&str] = &["apns-priority"];

/// Neither a header (apart from the fixed ones) nor any JSON value of the request is
/// the challenge's number.
fn assert_no_number(request: &Recorded, number: &str) {
    for (name, value) in request.headers.iter().filter(|(name, _)| !FIXED_HEADERS.contains(&name.as_str())) {
        assert_ne!(value.to_str().unwrap_or(""), number, "header {name} carries the number");
    }
    fn leaves(value: &serde_json::Value, out: &mut Vec<String>) {
        match value {
            serde_json::Value::Object(map) => {
                for (key, value) in map {
                    assert_ne!(key, "number", "a push has a \"number\" field");
                    leaves(value, out);
                }
            }
            serde_json::Value::Array(items) => items.iter().for_each(|v| leaves(v, out)),
            serde_json::Value::String(s) => out.push(s.clone()),
            other => out.push(other.to_string()),
        }
    }
    let mut values = Vec::new();
    leaves(&request.json(), &mut values);
    assert!(!values.iter().any(|v| v == number), "the push carries the number {number}: {values:?}");
}

#[tokio::test]
async fn apns_happy_path_every_header_the_jwt_and_the_body() {
    let providers = Providers::start().await;
    let server = providers.server(|_| {}).await;
    let phone = phone_with_token(&server, "jan", pb::Platform::Apns, APNS_TOKEN).await;

    let challenge = create(&server, "jan", 0).await.expect("create");
    let request = providers.apns.wait_for_requests(1).await.remove(0);

    assert_eq!(request.method, "POST");
    assert_eq!(request.path, format!("/3/device/{APNS_TOKEN}"));
    let expires_at = challenge.expires_at.expect("expiry").seconds;
    assert_eq!(request.header("apns-topic"), TOPIC);
    assert_eq!(request.header("apns-push-type"), "alert");
    assert_eq!(request.header("apns-priority"), "10");
    assert_eq!(request.header("apns-expiration"), expires_at.to_string());
    assert_eq!(request.header("apns-collapse-id"), challenge.challenge_id);

    let jwt = request.header("authorization").strip_prefix("bearer ").expect("a bearer token");
    let (header, claims) = verify_es256(jwt, &providers.apns_verifying_key);
    assert_eq!(header, serde_json::json!({"alg": "ES256", "kid": KEY_ID}));
    assert_eq!(claims["iss"], TEAM_ID);
    let iat = claims["iat"].as_i64().expect("iat");
    assert!((iat - unix_now()).abs() <= 60, "iat {iat} is now");

    let body = request.json();
    assert_eq!(
        body,
        serde_json::json!({
            "aps": {"alert": {"title": body["aps"]["alert"]["title"], "body": body["aps"]["alert"]["body"]},
                    "sound": "default", "category": "PUSHMATCH_CHALLENGE", "interruption-level": "time-sensitive"},
            "challenge_id": challenge.challenge_id,
            "expires_at": expires_at,
        })
    );
    assert!(body["aps"]["alert"]["title"].as_str().is_some_and(|t| !t.is_empty()));
    assert!(body["aps"]["alert"]["body"].as_str().is_some_and(|t| !t.is_empty()));
    assert_no_number(&request, &challenge.number);

    let done = deliveries_done(&server, &challenge.challenge_id).await;
    assert_eq!(done.deliveries.len(), 1);
    assert_eq!(done.deliveries[0].device_id, phone.device_id());
    assert_eq!((done.deliveries[0].state(), done.deliveries[0].attempts), (pb::DeliveryState::Sent, 1));
}

#[tokio::test]
async fn fcm_happy_path_the_token_grant_and_the_send_body() {
    let providers = Providers::start().await;
    let server = providers.server(|_| {}).await;
    let _phone = phone_with_token(&server, "jan", pb::Platform::Fcm, FCM_TOKEN).await;

    let challenge = create(&server, "jan", 0).await.expect("create");
    let grant = providers.oauth.wait_for_requests(1).await.remove(0);
    assert_eq!((grant.method.as_str(), grant.path.as_str()), ("POST", "/token"));
    assert_eq!(grant.header("content-type"), "application/x-www-form-urlencoded");
    let fields = form(&grant.text());
    let field = |name: &str| fields.iter().find(|(k, _)| k == name).map(|(_, v)| v.clone()).expect(name);
    assert_eq!(field("grant_type"), "urn:ietf:params:oauth:grant-type:jwt-bearer");
    let (header, claims) = verify_rs256(&field("assertion"));
    assert_eq!(header, serde_json::json!({"alg": "RS256", "typ": "JWT", "kid": FCM_KEY_ID}));
    assert_eq!(claims["iss"], FCM_CLIENT_EMAIL);
    assert_eq!(claims["scope"], "https://www.googleapis.com/auth/firebase.messaging");
    assert_eq!(claims["aud"], providers.oauth.token_uri());
    let iat = claims["iat"].as_i64().expect("iat");
    assert!((iat - unix_now()).abs() <= 60);
    assert_eq!(claims["exp"].as_i64(), Some(iat + 3600));

    let request = providers.fcm.wait_for_requests(1).await.remove(0);
    assert_eq!(request.method, "POST");
    assert_eq!(request.path, format!("/v1/projects/{FCM_PROJECT}/messages:send"));
    assert_eq!(request.header("authorization"), "Bearer mock-access-token-1");
    let expires_at = challenge.expires_at.expect("expiry").seconds;
    let body = request.json();
    let ttl = body["message"]["android"]["ttl"].as_str().expect("ttl").to_owned();
    let ttl_seconds: i64 = ttl.strip_suffix('s').expect("ttl in seconds").parse().expect("a number");
    assert!((55..=60).contains(&ttl_seconds), "ttl {ttl} is the time left");
    assert_eq!(
        body,
        serde_json::json!({"message": {
            "token": FCM_TOKEN,
            "data": {"challenge_id": challenge.challenge_id, "expires_at": expires_at.to_string()},
            "android": {"priority": "HIGH", "ttl": ttl, "collapse_key": challenge.challenge_id},
        }})
    );
    assert_no_number(&request, &challenge.number);
    let done = deliveries_done(&server, &challenge.challenge_id).await;
    assert_eq!(done.deliveries[0].state(), pb::DeliveryState::Sent);

    // The access token is cached: a second push asks for no new grant.
    let second = create(&server, "jan", 0).await.expect("create");
    let requests = providers.fcm.wait_for_requests(2).await;
    assert_eq!(requests[1].header("authorization"), "Bearer mock-access-token-1");
    deliveries_done(&server, &second.challenge_id).await;
    assert_eq!(providers.oauth.requests().len(), 1);
}

#[tokio::test]
async fn apns_410_and_bad_device_token_turn_pushes_off_until_a_new_token() {
    for (reply, reason) in [
        (Reply::apns_error(410, "Unregistered"), "Unregistered"),
        (Reply::apns_error(400, "BadDeviceToken"), "BadDeviceToken"),
        (Reply::apns_error(400, "DeviceTokenNotForTopic"), "DeviceTokenNotForTopic"),
    ] {
        let providers = Providers::start().await;
        let server = providers.server(|_| {}).await;
        let mut phone = phone_with_token(&server, "jan", pb::Platform::Apns, APNS_TOKEN).await;
        providers.apns.script([reply]);

        let first = create(&server, "jan", 0).await.expect("create");
        let done = deliveries_done(&server, &first.challenge_id).await;
        assert_eq!(done.deliveries[0].state(), pb::DeliveryState::Unregistered, "{reason}");
        assert_eq!(done.deliveries[0].error, reason);
        assert_eq!(push_enabled(&server, "jan").await, vec![false]);

        // Pushes are off: the next challenge pushes nothing, the app can still pull it.
        let second = create(&server, "jan", 0).await.expect("the device can still answer");
        assert!(second.deliveries.is_empty(), "{:?}", second.deliveries);
        assert_eq!(phone.pending().await.expect("pull").len(), 2);

        phone.update_push_token(NEW_APNS_TOKEN).await.expect("update token");
        assert_eq!(push_enabled(&server, "jan").await, vec![true]);
        let third = create(&server, "jan", 0).await.expect("create");
        let done = deliveries_done(&server, &third.challenge_id).await;
        assert_eq!(done.deliveries[0].state(), pb::DeliveryState::Sent);
        let requests = providers.apns.requests();
        assert_eq!(requests.len(), 2, "nothing was pushed while pushes were off");
        assert_eq!(requests[1].path, format!("/3/device/{NEW_APNS_TOKEN}"));
    }
}

#[tokio::test]
async fn fcm_unregistered_and_sender_id_mismatch_turn_pushes_off() {
    for (reply, reason) in [
        (Reply::fcm_error(404, "NOT_FOUND", "UNREGISTERED"), "UNREGISTERED"),
        (Reply::fcm_error(403, "PERMISSION_DENIED", "SENDER_ID_MISMATCH"), "SENDER_ID_MISMATCH"),
    ] {
        let providers = Providers::start().await;
        let server = providers.server(|_| {}).await;
        let _phone = phone_with_token(&server, "jan", pb::Platform::Fcm, FCM_TOKEN).await;
        providers.fcm.script([reply]);
        let challenge = create(&server, "jan", 0).await.expect("create");
        let done = deliveries_done(&server, &challenge.challenge_id).await;
        assert_eq!(done.deliveries[0].state(), pb::DeliveryState::Unregistered);
        // The provider's reason code, never its free text.
        assert_eq!(done.deliveries[0].error, reason);
        assert_eq!(push_enabled(&server, "jan").await, vec![false]);
    }
}

#[tokio::test]
async fn a_503_twice_then_200_is_sent_after_three_attempts() {
    let providers = Providers::start().await;
    let server = providers.server(|_| {}).await;
    let _phone = phone_with_token(&server, "jan", pb::Platform::Apns, APNS_TOKEN).await;
    providers.apns.script([Reply::apns_error(503, "ServiceUnavailable"), Reply::apns_error(503, "ServiceUnavailable")]);

    let challenge = create(&server, "jan", 0).await.expect("create");
    let done = deliveries_done(&server, &challenge.challenge_id).await;
    assert_eq!((done.deliveries[0].state(), done.deliveries[0].attempts), (pb::DeliveryState::Sent, 3));
    assert_eq!(providers.apns.requests().len(), 3);
}

#[tokio::test]
async fn a_429_with_retry_after_is_honoured() {
    let providers = Providers::start().await;
    let server = providers.server(|_| {}).await;
    let _phone = phone_with_token(&server, "jan", pb::Platform::Fcm, FCM_TOKEN).await;
    providers.fcm.script([Reply::fcm_error(429, "RESOURCE_EXHAUSTED", "QUOTA_EXCEEDED").retry_after(1)]);

    let challenge = create(&server, "jan", 0).await.expect("create");
    let done = deliveries_done(&server, &challenge.challenge_id).await;
    assert_eq!((done.deliveries[0].state(), done.deliveries[0].attempts), (pb::DeliveryState::Sent, 2));
    let requests = providers.fcm.requests();
    let gap = requests[1].at - requests[0].at;
    // Without Retry-After the first backoff is at most 200 ms.
    assert!(gap >= Duration::from_millis(950), "the retry came {gap:?} after the 429, not after Retry-After: 1");
}

#[tokio::test]
async fn a_provider_that_never_answers_is_retried_then_failed_before_the_challenge_expires() {
    let providers = Providers::start().await;
    let server = providers
        .server(|config| {
            config.push.apns.as_mut().expect("apns").request_timeout_ms = 300;
        })
        .await;
    let _phone = phone_with_token(&server, "jan", pb::Platform::Apns, APNS_TOKEN).await;
    providers.apns.answer_with(Reply::never());

    // Five attempts of 300 ms with their backoffs end within 4.5 s, well inside the TTL.
    let challenge = create(&server, "jan", 6).await.expect("create");
    let failed = watch_until(&server, &challenge.challenge_id, |c| {
        c.deliveries.first().is_some_and(|d| d.state() == pb::DeliveryState::Failed)
    })
    .await;
    let expires_at = challenge.expires_at.expect("expiry");
    let now = SystemTime::now().duration_since(UNIX_EPOCH).expect("after 1970");
    let expires =
        Duration::new(u64::try_from(expires_at.seconds).expect("positive"), u32::try_from(expires_at.nanos).expect("nanos"));
    assert!(now < expires, "FAILED arrived before the expiry");
    assert_eq!(failed.state(), pb::ChallengeState::Pending, "the challenge is still pending when its push fails");
    let delivery = &failed.deliveries[0];
    assert!(delivery.attempts >= 2, "retried: {delivery:?}");
    assert_eq!(delivery.error, "timeout");
    assert_eq!(providers.apns.requests().len(), delivery.attempts as usize);
}

#[tokio::test]
async fn an_expired_provider_token_gets_a_new_jwt() {
    let providers = Providers::start().await;
    let server = providers.server(|_| {}).await;
    let _phone = phone_with_token(&server, "jan", pb::Platform::Apns, APNS_TOKEN).await;
    providers.apns.script([Reply::apns_error(403, "ExpiredProviderToken")]);

    let challenge = create(&server, "jan", 0).await.expect("create");
    let done = deliveries_done(&server, &challenge.challenge_id).await;
    // Two requests went to APNs: two attempts.
    assert_eq!((done.deliveries[0].state(), done.deliveries[0].attempts), (pb::DeliveryState::Sent, 2));
    let requests = providers.apns.wait_for_requests(2).await;
    assert_eq!(requests.len(), 2);
    let jwt = |r: &Recorded| r.header("authorization").strip_prefix("bearer ").expect("bearer").to_owned();
    let (first, renewed) = (jwt(&requests[0]), jwt(&requests[1]));
    assert_ne!(first, renewed, "a new JWT after ExpiredProviderToken");
    let (_, first_claims) = verify_es256(&first, &providers.apns_verifying_key);
    let (_, renewed_claims) = verify_es256(&renewed, &providers.apns_verifying_key);
    assert!(renewed_claims["iat"].as_i64() > first_claims["iat"].as_i64());

    // The new token is the one reused from now on.
    let second = create(&server, "jan", 0).await.expect("create");
    deliveries_done(&server, &second.challenge_id).await;
    assert_eq!(jwt(&providers.apns.wait_for_requests(3).await[2]), renewed);
}

#[tokio::test]
async fn an_fcm_401_gets_a_new_access_token() {
    let providers = Providers::start().await;
    let server = providers.server(|_| {}).await;
    let _phone = phone_with_token(&server, "jan", pb::Platform::Fcm, FCM_TOKEN).await;
    providers.fcm.script([Reply::fcm_error(401, "UNAUTHENTICATED", "THIRD_PARTY_AUTH_ERROR")]);

    let challenge = create(&server, "jan", 0).await.expect("create");
    let done = deliveries_done(&server, &challenge.challenge_id).await;
    assert_eq!((done.deliveries[0].state(), done.deliveries[0].attempts), (pb::DeliveryState::Sent, 2));
    let requests = providers.fcm.wait_for_requests(2).await;
    assert_eq!(requests.len(), 2);
    assert_eq!(requests[0].header("authorization"), "Bearer mock-access-token-1");
    assert_eq!(requests[1].header("authorization"), "Bearer mock-access-token-2");
    assert_eq!(providers.oauth.requests().len(), 2);
}

#[tokio::test]
async fn a_token_refused_twice_fails_after_two_attempts() {
    let providers = Providers::start().await;
    let server = providers.server(|_| {}).await;
    let _phone = phone_with_token(&server, "jan", pb::Platform::Apns, APNS_TOKEN).await;
    providers.apns.answer_with(Reply::apns_error(403, "ExpiredProviderToken"));

    let challenge = create(&server, "jan", 0).await.expect("create");
    let done = deliveries_done(&server, &challenge.challenge_id).await;
    let delivery = &done.deliveries[0];
    assert_eq!(
        (delivery.state(), delivery.attempts, delivery.error.as_str()),
        (pb::DeliveryState::Failed, 2, "ExpiredProviderToken")
    );
    assert_eq!(providers.apns.requests().len(), 2, "renewed once, not without end");
}

/// APNs hangs with more pushes than it may have in flight, and more than the
/// dispatcher's shared send places: an Android sign-in is pushed meanwhile.
#[tokio::test]
async fn a_hung_apns_filled_past_its_limit_does_not_delay_fcm() {
    let providers = Providers::start().await;
    let server = providers
        .server(|config| {
            config.push.max_in_flight = 2;
            let apns = config.push.apns.as_mut().expect("apns");
            apns.max_in_flight = 1;
            // Longer than the test waits: APNs stays stuck until released.
            apns.request_timeout_ms = 60_000;
            config.push.fcm.as_mut().expect("fcm").max_in_flight = 1;
            config.limits.max_pending_per_user = 100;
            config.limits.max_challenges_per_window = 100;
        })
        .await;
    let _iphone = phone_with_token(&server, "ann", pb::Platform::Apns, APNS_TOKEN).await;
    let _android = phone_with_token(&server, "bob", pb::Platform::Fcm, FCM_TOKEN).await;
    providers.apns.answer_with(Reply::ok().held());

    let mut stuck = Vec::new();
    for _ in 0..4 {
        stuck.push(create(&server, "ann", 0).await.expect("create").challenge_id);
    }
    providers.apns.wait_for_requests(1).await;

    let android = create(&server, "bob", 0).await.expect("create");
    let done = deliveries_done(&server, &android.challenge_id).await;
    assert_eq!((done.deliveries[0].state(), done.deliveries[0].attempts), (pb::DeliveryState::Sent, 1));
    // Delivered while APNs is still stuck on its first push, the others waiting.
    assert_eq!(providers.apns.requests().len(), 1);
    let ann = server
        .challenges(KEY_A)
        .get_challenge(pb::GetChallengeRequest { challenge_id: stuck[0].clone() })
        .await
        .expect("get")
        .into_inner();
    assert_eq!(ann.deliveries[0].state(), pb::DeliveryState::Queued, "APNs has not answered");

    providers.apns.release();
    for challenge_id in &stuck {
        let done = deliveries_done(&server, challenge_id).await;
        assert_eq!(done.deliveries[0].state(), pb::DeliveryState::Sent);
    }
}

#[tokio::test]
async fn three_devices_on_both_platforms_are_pushed_at_once_and_the_others_cleared() {
    let providers = Providers::start().await;
    let server = providers.server(|_| {}).await;
    let mut iphone = phone_with_token(&server, "ann", pb::Platform::Apns, APNS_TOKEN).await;
    let ipad = phone_with_token(&server, "ann", pb::Platform::Apns, SECOND_APNS_TOKEN).await;
    let android = phone_with_token(&server, "ann", pb::Platform::Fcm, FCM_TOKEN).await;
    // The iPhone heard of the iPad and the Android phone, the iPad of the Android phone.
    const NOTICES: usize = 3;
    let notices = providers.apns.wait_for_requests(NOTICES).await;
    assert!(notices.iter().all(|r| r.json()["kind"] == "new_device"), "{notices:#?}");
    // The mocks hold every answer until all three pushes arrived: pushes sent one
    // after another would never get there.
    providers.apns.answer_with(Reply::ok().held());
    providers.fcm.answer_with(Reply::ok().held());

    let challenge = create(&server, "ann", 0).await.expect("create");
    let apns_requests = providers.apns.wait_for_requests(NOTICES + 2).await.split_off(NOTICES);
    providers.fcm.wait_for_requests(1).await;
    let mut paths: Vec<&str> = apns_requests.iter().map(|r| r.path.as_str()).collect();
    paths.sort_unstable();
    let mut expected = vec![format!("/3/device/{APNS_TOKEN}"), format!("/3/device/{SECOND_APNS_TOKEN}")];
    expected.sort_unstable();
    assert_eq!(paths, expected);
    providers.apns.release();
    providers.fcm.release();
    let done = deliveries_done(&server, &challenge.challenge_id).await;
    assert_eq!(done.deliveries.len(), 3);
    assert!(done.deliveries.iter().all(|d| d.state() == pb::DeliveryState::Sent), "{:?}", done.deliveries);

    let answer = iphone.respond(&challenge.challenge_id, pb::Decision::Approve, &challenge.number).await.expect("approve");
    assert!(answer.accepted);

    // The iPad gets a background push, the Android phone a data message; the iPhone
    // that answered gets nothing more.
    let apns_requests = providers.apns.wait_for_requests(NOTICES + 3).await;
    let clear = &apns_requests[NOTICES + 2];
    assert_eq!(clear.path, format!("/3/device/{SECOND_APNS_TOKEN}"));
    assert_eq!(clear.header("apns-push-type"), "background");
    assert_eq!(clear.header("apns-priority"), "5");
    assert_eq!(clear.header("apns-collapse-id"), challenge.challenge_id);
    assert_eq!(clear.header("apns-topic"), TOPIC);
    assert_eq!(
        clear.json(),
        serde_json::json!({"aps": {"content-available": 1}, "challenge_id": challenge.challenge_id, "state": "APPROVED"})
    );
    let fcm_clear = providers.fcm.wait_for_requests(2).await.remove(1);
    let body = fcm_clear.json();
    assert_eq!(body["message"]["token"], FCM_TOKEN);
    assert_eq!(body["message"]["data"], serde_json::json!({"challenge_id": challenge.challenge_id, "state": "APPROVED"}));
    assert_eq!(body["message"]["android"]["collapse_key"], challenge.challenge_id.as_str());
    for request in [clear, &fcm_clear] {
        assert_no_number(request, &challenge.number);
    }
    assert_eq!(providers.apns.requests().len(), NOTICES + 3);
    let _ = (ipad, android);
}

/// When `device_id` of `user` enrolled, in Unix seconds (from ListDevices).
async fn enrolled_at(server: &TestServer, user: &str, device_id: &str) -> i64 {
    let devices = server
        .enrollments(KEY_A)
        .list_devices(pb::ListDevicesRequest { user_id: user.into() })
        .await
        .expect("list devices")
        .into_inner()
        .devices;
    let device = devices.iter().find(|d| d.device_id == device_id).expect("the device is listed");
    device.enrolled_at.expect("enrolled_at").seconds
}

#[tokio::test]
async fn a_new_device_notice_every_header_and_the_body_on_apns_and_fcm() {
    const DAY: i64 = 24 * 60 * 60;
    let providers = Providers::start().await;
    let server = providers.server(|_| {}).await;
    let iphone = phone_with_token(&server, "jan", pb::Platform::Apns, APNS_TOKEN).await;

    // The Android phone enrolls: the iPhone gets an alert about it.
    let android = phone_with_token(&server, "jan", pb::Platform::Fcm, FCM_TOKEN).await;
    let android_enrolled = enrolled_at(&server, "jan", android.device_id()).await;
    let request = providers.apns.wait_for_requests(1).await.remove(0);
    assert_eq!(request.method, "POST");
    assert_eq!(request.path, format!("/3/device/{APNS_TOKEN}"));
    assert_eq!(request.header("apns-topic"), TOPIC);
    assert_eq!(request.header("apns-push-type"), "alert");
    assert_eq!(request.header("apns-priority"), "10");
    assert_eq!(request.header("apns-expiration"), (android_enrolled + DAY).to_string());
    assert_eq!(request.header("apns-collapse-id"), android.device_id());
    let jwt = request.header("authorization").strip_prefix("bearer ").expect("a bearer token");
    verify_es256(jwt, &providers.apns_verifying_key);
    let body = request.json();
    assert_eq!(
        body,
        serde_json::json!({
            "aps": {"alert": {"title": body["aps"]["alert"]["title"], "body": body["aps"]["alert"]["body"]},
                    "sound": "default", "category": "PUSHMATCH_NEW_DEVICE"},
            "kind": "new_device",
            "device_id": iphone.device_id(),
            "new_device_id": android.device_id(),
            "method": "push",
            "enrolled_at": android_enrolled,
        })
    );
    assert!(body["aps"]["alert"]["title"].as_str().is_some_and(|t| !t.is_empty()));
    assert!(body["aps"]["alert"]["body"].as_str().is_some_and(|t| !t.is_empty()));

    // An iPad enrolls: the Android phone gets a data message, the iPhone a second alert.
    let ipad = phone_with_token(&server, "jan", pb::Platform::Apns, SECOND_APNS_TOKEN).await;
    let ipad_enrolled = enrolled_at(&server, "jan", ipad.device_id()).await;
    let request = providers.fcm.wait_for_requests(1).await.remove(0);
    assert_eq!(request.method, "POST");
    assert_eq!(request.path, format!("/v1/projects/{FCM_PROJECT}/messages:send"));
    assert_eq!(request.header("authorization"), "Bearer mock-access-token-1");
    assert_eq!(request.header("content-type"), "application/json");
    let body = request.json();
    let ttl = body["message"]["android"]["ttl"].as_str().expect("ttl").to_owned();
    let ttl_seconds: i64 = ttl.strip_suffix('s').expect("ttl in seconds").parse().expect("a number");
    assert!((DAY - 60..=DAY).contains(&ttl_seconds), "ttl {ttl} is the rest of a day");
    assert_eq!(
        body,
        serde_json::json!({"message": {
            "token": FCM_TOKEN,
            "data": {"kind": "new_device", "device_id": android.device_id(), "new_device_id": ipad.device_id(),
                     "method": "push", "enrolled_at": ipad_enrolled.to_string()},
            "android": {"priority": "HIGH", "ttl": ttl, "collapse_key": ipad.device_id()},
        }})
    );
    let second = providers.apns.wait_for_requests(2).await.remove(1);
    assert_eq!(second.path, format!("/3/device/{APNS_TOKEN}"), "the new iPad hears nothing of itself");
    assert_eq!(second.header("apns-collapse-id"), ipad.device_id());
    assert_eq!(second.json()["new_device_id"], ipad.device_id());

    // The notices were pushes like any other: a challenge reaches all three after them.
    let challenge = create(&server, "jan", 0).await.expect("create");
    assert_eq!(deliveries_done(&server, &challenge.challenge_id).await.deliveries.len(), 3);
    let apns = providers.apns.wait_for_requests(4).await;
    let collapse_ids: Vec<&str> = apns.iter().map(|r| r.header("apns-collapse-id")).collect();
    assert_eq!(collapse_ids[..2], [android.device_id(), ipad.device_id()]);
    assert_eq!(collapse_ids[2..], [challenge.challenge_id.as_str(), challenge.challenge_id.as_str()]);
    assert_eq!(providers.fcm.requests().len(), 2, "one notice and the challenge");
}

#[tokio::test]
async fn a_thousand_pushes_arrive_over_a_handful_of_connections() {
    const PUSHES: usize = 1_000;
    let providers = Providers::start().await;
    let server = providers
        .server(|config| {
            config.limits.max_pending_per_user = 2_000;
            config.limits.max_challenges_per_window = 2_000;
        })
        .await;
    let _phone = phone_with_token(&server, "jan", pb::Platform::Apns, APNS_TOKEN).await;

    let created: Vec<pb::Challenge> = futures::stream::iter(0..PUSHES)
        .map(|_| async { create(&server, "jan", 0).await.expect("create") })
        .buffer_unordered(32)
        .collect()
        .await;
    let requests = providers.apns.wait_for_requests(PUSHES).await;
    let mut pushed: Vec<&str> = requests.iter().map(|r| r.header("apns-collapse-id")).collect();
    pushed.sort_unstable();
    let mut expected: Vec<&str> = created.iter().map(|c| c.challenge_id.as_str()).collect();
    expected.sort_unstable();
    assert_eq!(pushed, expected, "every challenge pushed exactly once");
    let connections = providers.apns.connections();
    assert!((1..=4).contains(&connections), "{connections} connections for {PUSHES} pushes (the pool has 4)");
}

#[tokio::test]
async fn a_full_push_queue_answers_resource_exhausted() {
    let providers = Providers::start().await;
    let server = providers
        .server(|config| {
            config.push.queue_capacity = 2;
            config.push.max_in_flight = 1;
            config.limits.max_pending_per_user = 100;
            config.limits.max_challenges_per_window = 100;
        })
        .await;
    let _phone = phone_with_token(&server, "jan", pb::Platform::Apns, APNS_TOKEN).await;
    // The provider hangs: one push is in flight, the rest wait in the queue.
    providers.apns.answer_with(Reply::never());

    let mut refused = None;
    for attempt in 0..20 {
        match create(&server, "jan", 0).await {
            Ok(_) => continue,
            Err(status) => {
                refused = Some((attempt, status));
                break;
            }
        }
    }
    let (attempt, status) = refused.expect("a full queue refuses");
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    assert!(status.message().contains("queue"), "{status:?}");
    assert!(attempt <= 5, "refused after {attempt} challenges with room for about four");
}

#[tokio::test]
async fn a_platform_without_its_section_reads_not_configured() {
    let providers = Providers::start().await;
    let server = providers.server(|config| config.push.fcm = None).await;
    let _phone = phone_with_token(&server, "jan", pb::Platform::Fcm, FCM_TOKEN).await;
    let challenge = create(&server, "jan", 0).await.expect("create");
    let done = deliveries_done(&server, &challenge.challenge_id).await;
    assert_eq!((done.deliveries[0].state(), done.deliveries[0].error.as_str()), (pb::DeliveryState::Failed, "not configured"));
}

#[tokio::test]
async fn serve_refuses_unreadable_or_malformed_key_files_and_names_them() {
    let providers = Providers::start().await;
    let dir = tempfile::tempdir().expect("temp dir");
    let garbage = dir.path().join("garbage.p8");
    std::fs::write(&garbage, "-----BEGIN PRIVATE KEY-----\nbm90IGEga2V5\n-----END PRIVATE KEY-----\n").expect("write");
    let bad_json = dir.path().join("bad-service-account.json");
    std::fs::write(&bad_json, r#"{"project_id": "p", "private_key": "nope"}"#).expect("write");
    let missing = dir.path().join("AuthKey_MISSING.p8");

    type Adjust<'a> = Box<dyn Fn(&mut Config) + 'a>;
    let cases: Vec<(Adjust<'_>, String)> = vec![
        (
            Box::new(|c: &mut Config| c.push.apns.as_mut().unwrap().private_key_path = missing.clone()),
            missing.display().to_string(),
        ),
        (
            Box::new(|c: &mut Config| c.push.apns.as_mut().unwrap().private_key_path = garbage.clone()),
            garbage.display().to_string(),
        ),
        (
            Box::new(|c: &mut Config| c.push.fcm.as_mut().unwrap().service_account_path = bad_json.clone()),
            bad_json.display().to_string(),
        ),
        (
            Box::new(|c: &mut Config| c.push.fcm.as_mut().unwrap().ca_cert_path = "/nonexistent/ca.pem".into()),
            "/nonexistent/ca.pem".into(),
        ),
    ];
    for (adjust, named) in cases {
        let store = tempfile::tempdir().expect("store dir");
        let mut config = test_config(store.path());
        providers.configure(&mut config);
        adjust(&mut config);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let result = tokio::time::timeout(DEADLINE, pushmatch::server::run(listener, config, std::future::pending()))
            .await
            .expect("refuses at once");
        let error = result.expect_err("serve refuses to start").to_string();
        assert!(error.contains(&named), "{error:?} names {named}");
        assert!(!error.contains("bm90IGEga2V5"), "the key's contents stay out of the message");
    }
}

/// `final_state_only`, on CreateAndWatchChallenge and on WatchChallenge: the
/// current state, then the final state alone. A push's result that lands between
/// the two goes to the other watchers, not to these streams; CreateChallenge, which
/// has no stream, refuses the field.
#[tokio::test]
async fn a_final_state_only_watch_leaves_out_the_delivery_updates() {
    let providers = Providers::start().await;
    let server = providers.server(|_| {}).await;
    let mut phone = phone_with_token(&server, "jan", pb::Platform::Apns, APNS_TOKEN).await;
    providers.apns.answer_with(Reply::ok().held());

    let request = pb::CreateChallengeRequest { user_id: "jan".into(), final_state_only: true, ..Default::default() };
    let mut created_and_watched =
        server.challenges(KEY_A).create_and_watch_challenge(request.clone()).await.expect("create and watch").into_inner();
    let first =
        tokio::time::timeout(DEADLINE, created_and_watched.message()).await.expect("in time").expect("ok").expect("first");
    assert_eq!(first.deliveries[0].state(), pb::DeliveryState::Queued, "APNs holds its answer");
    let mut every = server.watch(&first.challenge_id).await;
    let mut final_only = server
        .challenges(KEY_A)
        .watch_challenge(pb::WatchChallengeRequest { challenge_id: first.challenge_id.clone(), final_state_only: true })
        .await
        .expect("watch")
        .into_inner();
    for stream in [&mut every, &mut final_only] {
        let current = tokio::time::timeout(DEADLINE, stream.message()).await.expect("in time").expect("ok").expect("current");
        assert_eq!(current.deliveries[0].state(), pb::DeliveryState::Queued);
    }

    // The push's result lands while the challenge is pending: the plain watch says so.
    providers.apns.release();
    let sent = tokio::time::timeout(DEADLINE, every.message()).await.expect("in time").expect("ok").expect("update");
    assert_eq!((sent.state(), sent.deliveries[0].state()), (pb::ChallengeState::Pending, pb::DeliveryState::Sent));

    assert!(phone.respond(&first.challenge_id, pb::Decision::Approve, &first.number).await.expect("respond").accepted);
    assert_eq!(follow_to_final(&mut every).await.last().expect("final").state(), pb::ChallengeState::Approved);
    for stream in [&mut created_and_watched, &mut final_only] {
        let rest = follow_to_final(stream).await;
        assert_eq!(rest.len(), 1, "the final state alone: {rest:?}");
        assert_eq!((rest[0].state(), rest[0].deliveries[0].state()), (pb::ChallengeState::Approved, pb::DeliveryState::Sent));
    }

    let refused = server.challenges(KEY_A).create_challenge(request).await;
    assert_code(refused, Code::InvalidArgument, "final_state_only");
}
