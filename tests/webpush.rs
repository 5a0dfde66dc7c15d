//! Web Push devices (PLATFORM_WEBPUSH) end to end: the real broker and its real
//! Web Push sender against a mock push service over HTTPS (HTTP/1.1, a test CA),
//! which checks each request's VAPID token and decrypts its message with the
//! subscription's private key, as a browser would.

#![allow(clippy::expect_used, clippy::unwrap_used, clippy::panic)]

mod support;

use std::path::Path;
use std::time::Duration;

use p256::elliptic_curve::sec1::ToEncodedPoint as _;
use p256::pkcs8::{EncodePrivateKey as _, LineEnding};
use pushmatch::pb;
use pushmatch::phone::{PhoneKey, SimulatedPhone};
use pushmatch::push::settings::WebPushConfig;
use support::mock_push::{MockServer, Recorded, Reply, TestCa, verify_es256};
use support::{DEADLINE, KEY_A, TestServer, assert_code, follow_to_final};
use tonic::Code;

const SUBJECT: &str = "mailto:security@gors.nl";

/// A browser's side of a subscription: the key pair and secret it made, and where
/// its push service takes messages for it.
struct Browser {
    secret: p256::SecretKey,
    auth: [u8; 16],
    endpoint: String,
}

impl Browser {
    fn new(mock: &MockServer, name: &str) -> Self {
        let mut auth = [0u8; 16];
        getrandom::fill(&mut auth).expect("random");
        Self {
            secret: p256::SecretKey::random(&mut p256::elliptic_curve::rand_core::OsRng),
            auth,
            endpoint: format!("{}/wpush/v2/{name}", mock.endpoint()),
        }
    }

    /// `PushSubscription.toJSON()`, as the page hands it over.
    fn subscription(&self) -> String {
        let b64 = |bytes: &[u8]| data_encoding::BASE64URL_NOPAD.encode(bytes);
        serde_json::json!({
            "endpoint": self.endpoint,
            "expirationTime": null,
            "keys": {"p256dh": b64(self.secret.public_key().to_encoded_point(false).as_bytes()), "auth": b64(&self.auth)},
        })
        .to_string()
    }

    fn path(&self) -> String {
        self.endpoint.split_once("/wpush").map(|(_, rest)| format!("/wpush{rest}")).expect("path")
    }

    /// Decrypts a message the push service took for this browser.
    fn read(&self, request: &Recorded) -> serde_json::Value {
        assert_eq!(request.header("content-encoding"), "aes128gcm");
        let auth = web_push_native::Auth::from(self.auth);
        let plain = web_push_native::decrypt(request.body.to_vec(), &self.secret, &auth).expect("the message decrypts");
        serde_json::from_slice(&plain).expect("JSON")
    }
}

/// The VAPID key file, and the key to check tokens with.
fn vapid_key(dir: &Path) -> (std::path::PathBuf, p256::ecdsa::VerifyingKey) {
    let key = p256::ecdsa::SigningKey::random(&mut p256::elliptic_curve::rand_core::OsRng);
    let path = dir.join("vapid.pem");
    std::fs::write(&path, key.to_pkcs8_pem(LineEnding::LF).expect("pem").as_bytes()).expect("write key");
    (path, *key.verifying_key())
}

/// Checks a request's `Authorization: vapid t=…, k=…` as a push service does:
/// `k` is the key the subscription was made with, the token is signed by it, for
/// this origin, not yet expired and at most 24 hours ahead, with the contact.
fn check_vapid(request: &Recorded, mock: &MockServer, key: &p256::ecdsa::VerifyingKey) {
    let value = request.header("authorization");
    let (token, k) = value.strip_prefix("vapid t=").and_then(|rest| rest.split_once(", k=")).expect("vapid t=…, k=…");
    let public = data_encoding::BASE64URL_NOPAD.decode(k.as_bytes()).expect("k is base64url");
    assert_eq!(public.as_slice(), key.to_encoded_point(false).as_bytes(), "k is the configured key");
    let (header, claims) = verify_es256(token, key);
    assert_eq!(header["alg"], "ES256");
    assert_eq!(claims["aud"], mock.endpoint(), "aud is the push service's origin");
    assert_eq!(claims["sub"], SUBJECT);
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs();
    let exp = claims["exp"].as_u64().expect("exp");
    assert!(exp > now && exp <= now + 24 * 3600, "exp {exp} within 24 h of {now}");
}

#[test]
fn webpush_key_prints_the_public_key_clients_subscribe_with() {
    let dir = tempfile::tempdir().expect("dir");
    let (key_path, key) = vapid_key(dir.path());
    let config = dir.path().join("pushmatch.toml");
    let toml = format!(
        "[[tenants]]\nid = \"a\"\ndisplay_name = \"Gors\"\napi_key_sha256 = [\"{}\"]\n\n\
         [push.webpush]\nvapid_private_key_path = {:?}\nsubject = \"{SUBJECT}\"\n",
        "0".repeat(64),
        key_path.display().to_string()
    );
    std::fs::write(&config, toml).expect("write config");
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_pushmatch"))
        .args(["webpush-key", "--config"])
        .arg(&config)
        .env_clear()
        .output()
        .expect("run pushmatch");
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    let printed = String::from_utf8(output.stdout).expect("utf-8");
    assert_eq!(printed.trim(), data_encoding::BASE64URL_NOPAD.encode(key.to_encoded_point(false).as_bytes()));
}

async fn server_with_webpush(dir: &Path, ca: &TestCa) -> (TestServer, p256::ecdsa::VerifyingKey) {
    let (key_path, key) = vapid_key(dir);
    let ca_path = ca.write_pem(dir);
    let server = TestServer::start_with(|config| {
        config.push.webpush = Some(WebPushConfig {
            vapid_private_key_path: key_path,
            subject: SUBJECT.into(),
            allowed_hosts: Vec::new(),
            ca_cert_path: ca_path,
            max_in_flight: 100,
            max_in_flight_per_host: 100,
            request_timeout_ms: 5_000,
            // The mock push service listens on 127.0.0.1.
            insecure_allow_loopback: true,
        });
        config.push.max_attempts = 2;
    })
    .await;
    (server, key)
}

async fn enroll_browser(server: &TestServer, user: &str, browser: &Browser) -> SimulatedPhone {
    server.enrolled_phone_as(KEY_A, user, pb::Platform::Webpush, &browser.subscription()).await
}

async fn delivery_of(server: &TestServer, challenge_id: &str, device_id: &str, state: pb::DeliveryState) -> pb::Delivery {
    tokio::time::timeout(DEADLINE, async {
        loop {
            let challenge = server
                .challenges(KEY_A)
                .get_challenge(pb::GetChallengeRequest { challenge_id: challenge_id.into() })
                .await
                .expect("get")
                .into_inner();
            if let Some(delivery) = challenge.deliveries.iter().find(|d| d.device_id == device_id && d.state() == state) {
                return delivery.clone();
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .unwrap_or_else(|_| panic!("no {state:?} delivery to {device_id} in time"))
}

#[tokio::test]
async fn a_web_push_device_approves_a_sign_in_and_the_other_hears_of_it() {
    let ca = TestCa::new();
    let mock = MockServer::https1(&ca).await;
    let dir = tempfile::tempdir().expect("dir");
    let (server, key) = server_with_webpush(dir.path(), &ca).await;
    let (laptop, desktop) = (Browser::new(&mock, "laptop"), Browser::new(&mock, "desktop"));

    let mut laptop_app = enroll_browser(&server, "ana", &laptop).await;
    let desktop_app = enroll_browser(&server, "ana", &desktop).await;
    // The notice of the new sign-in method reaches the laptop.
    let notice = mock.wait_until(|requests| requests.iter().any(|r| r.path == laptop.path())).await;
    let notice = notice.iter().find(|r| r.path == laptop.path()).expect("notice");
    check_vapid(notice, &mock, &key);
    let told = laptop.read(notice);
    assert_eq!(told["kind"], "new_device");
    assert_eq!(told["new_device_id"], desktop_app.device_id());
    assert_eq!(notice.header("urgency"), "normal");

    let challenge = server.create_challenge("ana").await;
    let mut watch = server.watch(&challenge.challenge_id).await;
    let pushes = mock
        .wait_until(|requests| {
            [&laptop, &desktop].iter().all(|b| requests.iter().any(|r| r.path == b.path() && r.header("urgency") == "high"))
        })
        .await;
    let pushed = pushes.iter().find(|r| r.path == laptop.path() && r.header("urgency") == "high").expect("push");
    assert_eq!(pushed.method, "POST");
    check_vapid(pushed, &mock, &key);
    let ttl: u64 = pushed.header("ttl").parse().expect("TTL in seconds");
    assert!((50..=60).contains(&ttl), "TTL {ttl}: the challenge's time left");
    let topic = pushed.header("topic");
    assert!(topic.len() <= 32 && topic.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_'), "{topic}");
    let message = laptop.read(pushed);
    assert_eq!(message["challenge_id"], challenge.challenge_id.as_str());
    assert!(message["expires_at"].as_i64().is_some());
    assert!(!serde_json::to_string(&message).unwrap().contains(&format!("\"{}\"", challenge.number)), "never the number");
    assert!(message.get("number").is_none(), "{message}");
    delivery_of(&server, &challenge.challenge_id, laptop_app.device_id(), pb::DeliveryState::Sent).await;

    let answer = laptop_app.respond(&challenge.challenge_id, pb::Decision::Approve, &challenge.number).await.expect("respond");
    assert!(answer.accepted);
    let seen = follow_to_final(&mut watch).await;
    assert_eq!(seen.last().expect("final").state(), pb::ChallengeState::Approved);

    // The desktop's prompt is taken down: a clear push under the same topic.
    let all =
        mock.wait_until(|requests| requests.iter().any(|r| r.path == desktop.path() && r.header("urgency") == "normal")).await;
    let clear = all.iter().rev().find(|r| r.path == desktop.path() && r.header("urgency") == "normal").expect("clear");
    let cleared = desktop.read(clear);
    assert_eq!(cleared["challenge_id"], challenge.challenge_id.as_str());
    assert_eq!(cleared["state"], "APPROVED");
    assert_eq!(clear.header("topic"), topic, "the clear replaces the prompt at the push service");
}

#[tokio::test]
async fn a_410_turns_pushes_off_until_a_new_subscription_comes() {
    let ca = TestCa::new();
    let mock = MockServer::https1(&ca).await;
    let dir = tempfile::tempdir().expect("dir");
    let (server, _) = server_with_webpush(dir.path(), &ca).await;
    let browser = Browser::new(&mock, "gone");
    let mut app = enroll_browser(&server, "bo", &browser).await;

    mock.answer_with(Reply::status(410, ""));
    let challenge = server.create_challenge("bo").await;
    let delivery = delivery_of(&server, &challenge.challenge_id, app.device_id(), pb::DeliveryState::Unregistered).await;
    assert_eq!(delivery.platform(), pb::Platform::Webpush);
    assert_eq!(delivery.attempts, 1, "a dead subscription is not retried");
    let devices = server
        .enrollments(KEY_A)
        .list_devices(pb::ListDevicesRequest { user_id: "bo".into() })
        .await
        .expect("list")
        .into_inner()
        .devices;
    assert!(!devices[0].push_enabled, "pushes to it are off");
    let sent_before = mock.count();
    let next = server.create_challenge("bo").await;
    let pending = server
        .challenges(KEY_A)
        .get_challenge(pb::GetChallengeRequest { challenge_id: next.challenge_id.clone() })
        .await
        .expect("get")
        .into_inner();
    assert!(pending.deliveries.is_empty(), "no push to a dead subscription: {:?}", pending.deliveries);
    assert_eq!(mock.count(), sent_before);

    // The browser subscribes again; its new subscription (pretty-printed JSON, as
    // some libraries send it) turns pushes back on.
    mock.answer_with(Reply::status(201, ""));
    let renewed = Browser::new(&mock, "renewed");
    let pretty =
        serde_json::to_string_pretty(&serde_json::from_str::<serde_json::Value>(&renewed.subscription()).unwrap()).unwrap();
    app.update_push_token(&pretty).await.expect("a new subscription");
    let third = server.create_challenge("bo").await;
    let pushed = mock.wait_until(|requests| requests.iter().any(|r| r.path == renewed.path())).await;
    let pushed = pushed.iter().find(|r| r.path == renewed.path()).expect("pushed to the new subscription");
    assert_eq!(renewed.read(pushed)["challenge_id"], third.challenge_id.as_str());
}

#[tokio::test]
async fn subscriptions_pointing_inside_the_network_are_refused() {
    // The default: no loopback switch, any public host.
    let server = TestServer::start().await;
    let browser_keys = {
        let secret = p256::SecretKey::random(&mut p256::elliptic_curve::rand_core::OsRng);
        data_encoding::BASE64URL_NOPAD.encode(secret.public_key().to_encoded_point(false).as_bytes())
    };
    let subscription = |endpoint: &str| {
        serde_json::json!({"endpoint": endpoint, "keys": {"p256dh": browser_keys, "auth": "AAECAwQFBgcICQoLDA0ODw"}}).to_string()
    };
    for (i, endpoint) in [
        "https://10.0.0.1/wpush/x",
        "https://169.254.169.254/latest/meta-data/",
        "http://push.example.net/wpush/x",
        "https://localhost/wpush/x",
        "https://127.0.0.1:6379/",
        "https://[::1]/x",
        "https://[::ffff:192.168.0.1]/x",
    ]
    .into_iter()
    .enumerate()
    {
        let enrollment = server.begin_enrollment(&format!("cy-{i}")).await;
        let mut app =
            SimulatedPhone::new(server.channel.clone(), PhoneKey::ed25519(), pb::Platform::Webpush, subscription(endpoint));
        assert_code(app.enroll(&enrollment.uri, "browser").await, Code::InvalidArgument, "push_token.endpoint");
    }
    let enrollment = server.begin_enrollment("cy").await;
    let mut app = SimulatedPhone::new(server.channel.clone(), PhoneKey::ed25519(), pb::Platform::Webpush, "not json");
    assert_code(app.enroll(&enrollment.uri, "browser").await, Code::InvalidArgument, "push_token");

    // A subscription changed later is held to the same rules.
    let enrollment = server.begin_enrollment("cy").await;
    let mut app = SimulatedPhone::new(server.channel.clone(), PhoneKey::ed25519(), pb::Platform::Webpush, "");
    app.enroll(&enrollment.uri, "browser").await.expect("a browser without a subscription yet");
    assert_code(app.update_push_token(&subscription("https://10.0.0.1/x")).await, Code::InvalidArgument, "push_token.endpoint");
}
