//! Mock APNs, FCM and OAuth servers wired into a [`TestServer`]'s `[push.*]`
//! configuration, and the helpers the push tests share (tests/push.rs,
//! tests/push_log_secrecy.rs).

use std::time::{SystemTime, UNIX_EPOCH};

use pushmatch::config::{ApnsConfig, Config, FcmConfig};
use pushmatch::pb;
use pushmatch::phone::{PhoneKey, SimulatedPhone};

use super::mock_push::{MockServer, TestCa, apns_key, service_account_json};
use super::{DEADLINE, KEY_A, TestServer};

pub const TEAM_ID: &str = "ABCDE12345";
pub const KEY_ID: &str = "KEY1234567";
pub const TOPIC: &str = "nl.gors.authenticator";
pub const SECOND_APNS_TOKEN: &str = "b4e0d3f2e5c6b7089923bc45de67f089b4e0d3f2e5c6b7089923bc45de67f089";
pub const NEW_APNS_TOKEN: &str = "c5f1e4a3f6d7c819aa34cd56ef78a19ac5f1e4a3f6d7c819aa34cd56ef78a19a";

/// Mock APNs, FCM and OAuth servers, and the files a configuration points at.
pub struct Providers {
    pub apns: MockServer,
    pub fcm: MockServer,
    pub oauth: MockServer,
    pub apns_verifying_key: p256::ecdsa::VerifyingKey,
    pub ca_path: String,
    pub key_path: std::path::PathBuf,
    pub service_account_path: std::path::PathBuf,
    _files: tempfile::TempDir,
}

impl Providers {
    pub async fn start() -> Self {
        let ca = TestCa::new();
        let files = tempfile::tempdir().expect("temp dir");
        let (pem, apns_verifying_key) = apns_key();
        let key_path = files.path().join(format!("AuthKey_{KEY_ID}.p8"));
        std::fs::write(&key_path, pem).expect("write key");
        let oauth = MockServer::token_endpoint().await;
        let service_account_path = files.path().join("service-account.json");
        std::fs::write(&service_account_path, service_account_json(&oauth.token_uri())).expect("write service account");
        Self {
            apns: MockServer::h2(&ca).await,
            fcm: MockServer::h2(&ca).await,
            oauth,
            apns_verifying_key,
            ca_path: ca.write_pem(files.path()),
            key_path,
            service_account_path,
            _files: files,
        }
    }

    pub fn apns_config(&self) -> ApnsConfig {
        ApnsConfig {
            team_id: TEAM_ID.into(),
            key_id: KEY_ID.into(),
            private_key_path: self.key_path.clone(),
            topic: TOPIC.into(),
            endpoint: self.apns.endpoint(),
            ca_cert_path: self.ca_path.clone(),
            connections: 4,
            max_in_flight: 1_000,
            request_timeout_ms: 5_000,
        }
    }

    pub fn fcm_config(&self) -> FcmConfig {
        FcmConfig {
            service_account_path: self.service_account_path.clone(),
            endpoint: self.fcm.endpoint(),
            ca_cert_path: self.ca_path.clone(),
            connections: 4,
            max_in_flight: 1_000,
            request_timeout_ms: 5_000,
        }
    }

    pub fn configure(&self, config: &mut Config) {
        config.push.apns = Some(self.apns_config());
        config.push.fcm = Some(self.fcm_config());
    }

    pub async fn server(&self, adjust: impl FnOnce(&mut Config)) -> TestServer {
        TestServer::start_with(|config| {
            self.configure(config);
            adjust(config);
        })
        .await
    }
}

pub fn unix_now() -> i64 {
    i64::try_from(SystemTime::now().duration_since(UNIX_EPOCH).expect("after 1970").as_secs()).expect("fits")
}

/// Follows a challenge's watch stream until `condition` holds; returns that update.
pub async fn watch_until(server: &TestServer, challenge_id: &str, condition: impl Fn(&pb::Challenge) -> bool) -> pb::Challenge {
    let mut stream = server.watch(challenge_id).await;
    tokio::time::timeout(DEADLINE, async {
        let mut seen = Vec::new();
        while let Some(update) = stream.message().await.expect("stream message") {
            if condition(&update) {
                return update;
            }
            seen.push(update);
        }
        panic!("the stream ended before the expected update: {seen:#?}");
    })
    .await
    .expect("the expected update before the deadline")
}

/// Waits until every delivery of the challenge is final; returns the challenge.
pub async fn deliveries_done(server: &TestServer, challenge_id: &str) -> pb::Challenge {
    watch_until(server, challenge_id, |c| {
        !c.deliveries.is_empty() && c.deliveries.iter().all(|d| d.state() != pb::DeliveryState::Queued)
    })
    .await
}

pub async fn create(server: &TestServer, user: &str, ttl_seconds: u32) -> Result<pb::Challenge, tonic::Status> {
    server
        .challenges(KEY_A)
        .create_challenge(pb::CreateChallengeRequest { user_id: user.into(), ttl_seconds, ..Default::default() })
        .await
        .map(tonic::Response::into_inner)
}

pub async fn push_enabled(server: &TestServer, user: &str) -> Vec<bool> {
    let devices = server
        .enrollments(KEY_A)
        .list_devices(pb::ListDevicesRequest { user_id: user.into() })
        .await
        .expect("list devices")
        .into_inner()
        .devices;
    devices.iter().map(|d| d.push_enabled).collect()
}

pub async fn phone_with_token(server: &TestServer, user: &str, platform: pb::Platform, token: &str) -> SimulatedPhone {
    let enrollment = server.begin_enrollment(user).await;
    let mut phone = SimulatedPhone::new(server.channel.clone(), PhoneKey::ed25519(), platform, token);
    phone.enroll(&enrollment.uri, "test phone").await.expect("complete enrollment");
    phone
}
