//! Each tenant's own push credentials (`[tenants.push.apns]`, `[tenants.push.fcm]`,
//! `src/push/routes.rs`) against mock APNs and FCM servers over HTTP/2 and TLS:
//! two tenants' pushes reach two different endpoints with their own JWTs and
//! grants; a tenant without a section of its own falls back to the global one;
//! tenants on one Apple key share one connection; a reload moves a tenant to new
//! credentials and a reload with an unreadable key file is refused whole.

// Tests: a failed expectation is a failed test.
#![allow(clippy::expect_used, clippy::unwrap_used, clippy::panic)]

mod support;

use pushmatch::config::{ApnsConfig, Config, FcmConfig, TenantPushConfig};
use pushmatch::pb;
use support::mock_push::{FCM_PROJECT, Recorded, es256_signed_by, form, service_account_json, verify_es256, verify_rs256};
use support::push_providers::*;
use support::*;

const INITECH_TOPIC: &str = "com.initech.authenticator";
const INITECH_PROJECT: &str = "initech-auth";
const INITECH_EMAIL: &str = "push@initech-auth.iam.gserviceaccount.com";

/// A service-account file of another Firebase project, granted by `providers`' token endpoint.
fn other_project(providers: &Providers, dir: &std::path::Path) -> std::path::PathBuf {
    let mut account: serde_json::Value =
        serde_json::from_str(&service_account_json(&providers.oauth.token_uri())).expect("service account json");
    account["project_id"] = INITECH_PROJECT.into();
    account["client_email"] = INITECH_EMAIL.into();
    let path = dir.join("initech-service-account.json");
    std::fs::write(&path, account.to_string()).expect("write the service account");
    path
}

/// Tenant "b"'s own sections: `providers`' APNs with Initech's topic and its FCM
/// with Initech's project.
fn initech_push(providers: &Providers, account: std::path::PathBuf) -> TenantPushConfig {
    TenantPushConfig {
        apns: Some(ApnsConfig { topic: INITECH_TOPIC.into(), ..providers.apns_config() }),
        fcm: Some(FcmConfig { service_account_path: account, ..providers.fcm_config() }),
    }
}

async fn sign_in(server: &TestServer, key: &str, user: &str) -> pb::Challenge {
    let challenge = server
        .challenges(key)
        .create_challenge(pb::CreateChallengeRequest { user_id: user.into(), ..Default::default() })
        .await
        .expect("create")
        .into_inner();
    // Watched with the tenant's own key: every delivery final means every push was answered.
    let mut stream = server
        .challenges(key)
        .watch_challenge(pb::WatchChallengeRequest { challenge_id: challenge.challenge_id.clone(), ..Default::default() })
        .await
        .expect("watch")
        .into_inner();
    tokio::time::timeout(DEADLINE, async {
        while let Some(update) = stream.message().await.expect("stream") {
            let done = !update.deliveries.is_empty() && update.deliveries.iter().all(|d| d.state() != pb::DeliveryState::Queued);
            if done {
                assert!(update.deliveries.iter().all(|d| d.state() == pb::DeliveryState::Sent), "{update:#?}");
                return;
            }
        }
        panic!("the stream ended before the deliveries were done");
    })
    .await
    .expect("the deliveries are done before the deadline");
    challenge
}

/// The challenge pushes a mock received (not the notices of a new device, which
/// the second enrollment of a user sends to the first device).
fn challenge_pushes(mock: &support::mock_push::MockServer) -> Vec<Recorded> {
    let is_challenge = |r: &Recorded| {
        let body = r.json();
        body.get("challenge_id").is_some() || body["message"]["data"].get("challenge_id").is_some()
    };
    mock.requests().into_iter().filter(is_challenge).collect()
}

fn apns_jwt_claims(request: &Recorded, key: &p256::ecdsa::VerifyingKey) -> serde_json::Value {
    let jwt = request.header("authorization").strip_prefix("bearer ").expect("a bearer token");
    verify_es256(jwt, key).1
}

fn grant_issuer(grant: &Recorded) -> String {
    let fields = form(&grant.text());
    let assertion = fields.iter().find(|(k, _)| k == "assertion").map(|(_, v)| v.clone()).expect("assertion");
    verify_rs256(&assertion).1["iss"].as_str().expect("iss").to_owned()
}

#[tokio::test]
async fn each_tenant_pushes_through_its_own_endpoints_with_its_own_jwt_and_grant() {
    let (gors, initech) = (Providers::start().await, Providers::start().await);
    let files = tempfile::tempdir().expect("temp dir");
    let account = other_project(&initech, files.path());
    let server = gors
        .server(|config: &mut Config| {
            config.tenants[1].push = initech_push(&initech, account);
        })
        .await;
    let _jan = server.enrolled_phone_as(KEY_A, "jan", pb::Platform::Apns, APNS_TOKEN).await;
    let _jan_android = server.enrolled_phone_as(KEY_A, "jan", pb::Platform::Fcm, FCM_TOKEN).await;
    let _piet = server.enrolled_phone_as(KEY_B, "piet", pb::Platform::Apns, SECOND_APNS_TOKEN).await;
    let _piet_android = server.enrolled_phone_as(KEY_B, "piet", pb::Platform::Fcm, "initech-fcm-token").await;

    let a = sign_in(&server, KEY_A, "jan").await;
    let b = sign_in(&server, KEY_B, "piet").await;

    // Tenant a: the global sections' endpoints, key, topic and project.
    let apns = challenge_pushes(&gors.apns);
    assert_eq!(apns.len(), 1, "{apns:#?}");
    assert_eq!((apns[0].path.as_str(), apns[0].header("apns-topic")), (format!("/3/device/{APNS_TOKEN}").as_str(), TOPIC));
    assert_eq!(apns[0].header("apns-collapse-id"), a.challenge_id);
    assert_eq!(apns_jwt_claims(&apns[0], &gors.apns_verifying_key)["iss"], TEAM_ID);
    let fcm = challenge_pushes(&gors.fcm);
    assert_eq!(fcm.len(), 1, "{fcm:#?}");
    assert_eq!(fcm[0].path, format!("/v1/projects/{FCM_PROJECT}/messages:send"));
    assert_eq!(fcm[0].json()["message"]["token"], FCM_TOKEN);
    assert_eq!(gors.oauth.requests().len(), 1);

    // Tenant b: its own endpoints, its own topic, a JWT of its own key (which the
    // global key does not verify), its own project and grant.
    let apns = challenge_pushes(&initech.apns);
    assert_eq!(apns.len(), 1, "{apns:#?}");
    assert_eq!(apns[0].path, format!("/3/device/{SECOND_APNS_TOKEN}"));
    assert_eq!((apns[0].header("apns-topic"), apns[0].header("apns-collapse-id")), (INITECH_TOPIC, b.challenge_id.as_str()));
    apns_jwt_claims(&apns[0], &initech.apns_verifying_key);
    let jwt = apns[0].header("authorization").strip_prefix("bearer ").expect("bearer").to_owned();
    assert!(!es256_signed_by(&jwt, &gors.apns_verifying_key), "tenant b's JWT is not signed with the global key");
    let fcm = challenge_pushes(&initech.fcm);
    assert_eq!(fcm.len(), 1, "{fcm:#?}");
    assert_eq!(fcm[0].path, format!("/v1/projects/{INITECH_PROJECT}/messages:send"));
    assert_eq!(fcm[0].json()["message"]["token"], "initech-fcm-token");
    let grants = initech.oauth.requests();
    assert_eq!(grants.len(), 1);
    assert_eq!(grant_issuer(&grants[0]), INITECH_EMAIL);
    assert_ne!(grant_issuer(&gors.oauth.requests()[0]), INITECH_EMAIL);
}

#[tokio::test]
async fn tenants_on_one_key_share_a_connection_and_a_provider_left_out_falls_back_to_the_global_one() {
    let providers = Providers::start().await;
    let server = providers
        .server(|config: &mut Config| {
            let global = config.push.apns.as_mut().expect("global apns");
            global.connections = 1;
            // Tenant b: the same key and endpoint, another app; no FCM section of its own.
            let own = ApnsConfig { topic: INITECH_TOPIC.into(), ..global.clone() };
            config.tenants[1].push = TenantPushConfig { apns: Some(own), fcm: None };
        })
        .await;
    let _jan = server.enrolled_phone_as(KEY_A, "jan", pb::Platform::Apns, APNS_TOKEN).await;
    let _piet = server.enrolled_phone_as(KEY_B, "piet", pb::Platform::Apns, SECOND_APNS_TOKEN).await;
    let _piet_android = server.enrolled_phone_as(KEY_B, "piet", pb::Platform::Fcm, FCM_TOKEN).await;

    sign_in(&server, KEY_A, "jan").await;
    sign_in(&server, KEY_B, "piet").await;
    sign_in(&server, KEY_A, "jan").await;

    let apns = challenge_pushes(&providers.apns);
    let topics: Vec<&str> = apns.iter().map(|r| r.header("apns-topic")).collect();
    assert_eq!(topics, [TOPIC, INITECH_TOPIC, TOPIC]);
    assert_eq!(providers.apns.connections(), 1, "one pool for the one key");
    let tokens: Vec<String> = providers.apns.requests().iter().map(|r| r.header("authorization").to_owned()).collect();
    assert!(tokens.iter().all(|t| *t == tokens[0]), "one provider token for the one key: {tokens:?}");
    let fcm = challenge_pushes(&providers.fcm);
    assert_eq!(fcm.len(), 1, "tenant b's FCM push went through the global section");
    assert_eq!(fcm[0].path, format!("/v1/projects/{FCM_PROJECT}/messages:send"));
}

#[tokio::test]
async fn a_reload_moves_a_tenant_to_new_credentials_and_an_unreadable_key_file_is_refused_whole() {
    let (gors, initech) = (Providers::start().await, Providers::start().await);
    let dir = tempfile::tempdir().expect("temp dir");
    let file = dir.path().join("pushmatch.toml");
    let mut config = support::test_config(&dir.path().join("store"));
    gors.configure(&mut config);
    config.server.config_reload_interval_seconds = 0;
    let write = |config: &Config| std::fs::write(&file, toml::to_string(config).expect("toml")).expect("write config");
    write(&config);
    let server = TestServer::start_from_file(&file).await;
    let _piet = server.enrolled_phone_as(KEY_B, "piet", pb::Platform::Apns, SECOND_APNS_TOKEN).await;

    sign_in(&server, KEY_B, "piet").await;
    assert_eq!((gors.apns.requests().len(), initech.apns.requests().len()), (1, 0), "the global section first");

    // A key file that cannot be read: the whole file is refused, b still pushes as before.
    let mut broken = initech_push(&initech, other_project(&initech, dir.path()));
    if let Some(apns) = broken.apns.as_mut() {
        apns.private_key_path = dir.path().join("missing.p8");
    }
    config.tenants[1].push = broken;
    config.tenants[0].display_name = "Renamed".into();
    write(&config);
    let error = server.reload().await.expect_err("an unreadable key file");
    assert!(error.contains("missing.p8") && error.contains("\"b\""), "{error}");
    let enrollment = server.begin_enrollment("kees").await;
    assert!(enrollment.uri.contains("issuer=Gors"), "nothing of the refused file applied: {}", enrollment.uri);
    sign_in(&server, KEY_B, "piet").await;
    assert_eq!((gors.apns.requests().len(), initech.apns.requests().len()), (2, 0));

    // Readable: b's next push goes through its own credentials.
    config.tenants[1].push = initech_push(&initech, other_project(&initech, dir.path()));
    write(&config);
    server.reload().await.expect("loads");
    sign_in(&server, KEY_B, "piet").await;
    assert_eq!((gors.apns.requests().len(), initech.apns.requests().len()), (2, 1));
    assert_eq!(initech.apns.requests()[0].header("apns-topic"), INITECH_TOPIC);
}
