//! TLS and ACL users against real `redis-server` processes that serve TLS only
//! (`--port 0 --tls-port`), with certificates made here (rcgen): a sign-in works
//! with the right CA, server name and credentials, on one node and on a cluster;
//! a wrong CA, a wrong server name, the public roots, a plain connection, a missing
//! or wrong password each fail with UNAVAILABLE and a message that says why, and no
//! password appears in any of them.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair, KeyUsagePurpose, SanType};
use tokio::process::Command;

use super::testing::RedisServer;
use super::{RedisSettings, RedisStore};
use crate::domain::challenge::{ChallengeState, Decision};
use crate::domain::ids::{DeviceId, TenantId, UserId};
use crate::domain::time::{Clock, ManualClock};
use crate::store::conformance::{policy, sample_challenge};
use crate::store::{CreateOutcome, Store as _, StoreError};

const PASSWORD: &str = "s3cret-acl-password";
const WRONG_PASSWORD: &str = "wr0ng-acl-password";
/// The ACL rules deploy/README.md gives the store's user.
const APP_ACL: &str = "~pm:* &pm:* +@read +@write +@scripting +@pubsub +@connection +@transaction -@dangerous +wait +time +cluster|slots +cluster|shards";

/// A CA and a server certificate it issued, as PEM files in a folder of their own.
pub(super) struct TlsFiles {
    pub(super) dir: tempfile::TempDir,
    pub(super) ca: PathBuf,
    pub(super) cert: PathBuf,
    pub(super) key: PathBuf,
}

fn ca(name: &str) -> (String, Issuer<'static, KeyPair>) {
    let key = KeyPair::generate().expect("CA key");
    let mut params = CertificateParams::new(Vec::<String>::new()).expect("CA params");
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    params.distinguished_name.push(rcgen::DnType::CommonName, name);
    let cert = params.self_signed(&key).expect("CA certificate");
    (cert.pem(), Issuer::new(params, key))
}

impl TlsFiles {
    /// A server certificate for `names` (and 127.0.0.1 when `loopback_ip`).
    pub(super) fn new(names: &[&str], loopback_ip: bool) -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        let (ca_pem, issuer) = ca("pushmatch redis test CA");
        let key = KeyPair::generate().expect("server key");
        let mut params = CertificateParams::new(names.iter().map(|n| (*n).to_owned()).collect::<Vec<_>>()).expect("params");
        if loopback_ip {
            params.subject_alt_names.push(SanType::IpAddress(std::net::IpAddr::from([127, 0, 0, 1])));
        }
        let cert = params.signed_by(&key, &issuer).expect("server certificate");
        let write = |name: &str, text: &str| {
            let path = dir.path().join(name);
            std::fs::write(&path, text).expect("write PEM");
            path
        };
        let ca = write("ca.pem", &ca_pem);
        let cert = write("server.pem", &cert.pem());
        let key = write("server.key", &key.serialize_pem());
        Self { dir, ca, cert, key }
    }

    /// Another CA's certificate: one that did not issue the server's.
    pub(super) fn other_ca(&self) -> PathBuf {
        let path = self.dir.path().join("other-ca.pem");
        std::fs::write(&path, ca("some other CA").0).expect("write PEM");
        path
    }

    /// A file holding `password` as operators mount it (with a trailing newline).
    pub(super) fn password_file(&self, password: &str) -> PathBuf {
        let path = self.dir.path().join(format!("password-{}", password.len()));
        std::fs::write(&path, format!("{password}\n")).expect("write password");
        path
    }

    /// redis-server arguments: TLS only on `port`, no client certificates asked,
    /// the `default` user off, the ACL user `app` on with [`PASSWORD`] and
    /// [`APP_ACL`], and `admin` for `redis-cli --cluster create`.
    pub(super) fn server_args(&self, port: u16) -> Vec<String> {
        let path = |p: &Path| p.display().to_string();
        let mut args: Vec<String> =
            ["--port", "0", "--tls-port", &port.to_string(), "--tls-auth-clients", "no"].map(str::to_owned).to_vec();
        args.extend(["--tls-cert-file".into(), path(&self.cert), "--tls-key-file".into(), path(&self.key)]);
        args.extend(["--tls-ca-cert-file".into(), path(&self.ca)]);
        args.extend(["--user", "default", "off"].map(str::to_owned));
        // The ACL of deploy/README.md: the store's keys and channels, no more.
        args.extend(["--user", "app", "on", &format!(">{PASSWORD}")].map(str::to_owned));
        args.extend(APP_ACL.split(' ').map(str::to_owned));
        // Who sets the cluster up.
        args.extend(["--user", "admin", "on", &format!(">{PASSWORD}"), "~*", "&*", "+@all"].map(str::to_owned));
        args
    }
}

fn settings(urls: Vec<String>) -> RedisSettings {
    RedisSettings::new(urls, Duration::from_secs(2))
}

/// One sign-in through the store: a challenge created and approved with its number.
async fn sign_in(store: &RedisStore, clock: &ManualClock) -> Result<(), StoreError> {
    let now = clock.now();
    let tenant = TenantId("tls".to_owned());
    let user = UserId::parse(&format!("u{}", DeviceId::generate().expect("id").as_str())).expect("user");
    let created = match store.create_challenge(sample_challenge(&tenant, &user, now, None), &policy(), now).await? {
        CreateOutcome::Created(challenge) => challenge,
        other => panic!("expected Created, got {other:?}"),
    };
    let answer = Decision::Approve.resolve(Some(created.number), created.number, DeviceId::generate().expect("id"));
    let outcome = store.resolve_challenge(&tenant, &created.id, answer, now).await?.expect("the challenge is there");
    assert!(outcome.accepted && outcome.challenge.state == ChallengeState::Approved, "{outcome:?}");
    Ok(())
}

async fn connect(settings: RedisSettings) -> Result<RedisStore, StoreError> {
    RedisStore::connect(settings, Arc::new(ManualClock::starting_now())).await
}

/// The error of a store that must not open; it never carries a password.
async fn refused(settings: RedisSettings) -> String {
    let error = match connect(settings).await {
        Ok(_) => panic!("the store opened"),
        Err(error) => error,
    };
    assert!(matches!(error, StoreError::Unavailable { .. }), "{error:?}");
    let text = error.to_string();
    assert!(!text.contains(PASSWORD) && !text.contains(WRONG_PASSWORD), "a password in {text}");
    text
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_with_an_acl_user_signs_in_and_every_wrong_setting_is_refused_clearly() {
    let tls = TlsFiles::new(&["localhost"], true);
    let server = RedisServer::start_with_args(|port| tls.server_args(port)).await;
    let port = server.port();
    let with = |url: String| {
        let mut settings = settings(vec![url]);
        settings.ca_cert_path = Some(tls.ca.clone());
        settings
    };

    // The user and a password in the URL, the server named by its IP address.
    let clock = ManualClock::starting_now();
    let store = RedisStore::connect(with(format!("rediss://app:{PASSWORD}@127.0.0.1:{port}")), Arc::new(clock.clone()))
        .await
        .expect("TLS with the user in the URL");
    sign_in(&store, &clock).await.expect("a sign-in over TLS");
    // The user from its own setting and the password from a file, the server by name.
    let mut by_file = with(format!("rediss://localhost:{port}"));
    by_file.username = Some("app".into());
    by_file.password_file = Some(tls.password_file(PASSWORD));
    let clock = ManualClock::starting_now();
    let store = RedisStore::connect(by_file.clone(), Arc::new(clock.clone())).await.expect("TLS with a password file");
    sign_in(&store, &clock).await.expect("a sign-in over TLS");
    // Pub/sub goes over TLS with the same credentials: a watch sees the answer.
    let now = clock.now();
    let tenant = TenantId("tls-watch".to_owned());
    let user = UserId::parse("watched").expect("user");
    let CreateOutcome::Created(challenge) =
        store.create_challenge(sample_challenge(&tenant, &user, now, None), &policy(), now).await.expect("create")
    else {
        panic!("not created")
    };
    let mut watch = store.watch_challenge(&tenant, &challenge.id, now).await.expect("watch").expect("found");
    let other = connect(by_file.clone()).await.expect("a second replica");
    let answer = Decision::Approve.resolve(Some(challenge.number), challenge.number, DeviceId::generate().expect("id"));
    assert!(other.resolve_challenge(&tenant, &challenge.id, answer, now).await.expect("resolve").expect("found").accepted);
    tokio::time::timeout(Duration::from_secs(10), watch.wait_for(|c| c.state == ChallengeState::Approved))
        .await
        .expect("the watcher hears of the answer over TLS pub/sub")
        .expect("watch open");

    // A CA that did not issue the server's certificate.
    let mut wrong_ca = by_file.clone();
    wrong_ca.ca_cert_path = Some(tls.other_ca());
    let error = refused(wrong_ca).await;
    assert!(error.contains("TLS refused the Redis server's certificate") && error.contains("UnknownIssuer"), "{error}");
    // No CA configured: the public roots do not know the test CA either.
    let mut public_roots = by_file.clone();
    public_roots.ca_cert_path = None;
    let error = refused(public_roots).await;
    assert!(error.contains("UnknownIssuer"), "{error}");
    // A file that is not a CA certificate.
    let mut not_a_ca = by_file.clone();
    not_a_ca.ca_cert_path = Some(tls.password_file(PASSWORD));
    let error = refused(not_a_ca).await;
    assert!(error.contains("holds no PEM certificate"), "{error}");
    // Plain Redis protocol to the TLS port.
    let mut plain = by_file.clone();
    plain.urls = vec![format!("redis://127.0.0.1:{port}")];
    plain.ca_cert_path = None;
    refused(plain).await;
    // A wrong password (from the file), and none at all.
    let mut wrong = by_file.clone();
    wrong.password_file = Some(tls.password_file(WRONG_PASSWORD));
    let error = refused(wrong).await;
    assert!(error.contains("Redis refused the credentials"), "{error}");
    let mut anonymous = by_file.clone();
    anonymous.username = None;
    anonymous.password_file = None;
    let error = refused(anonymous).await;
    assert!(error.contains("Redis refused the credentials"), "{error}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_certificate_for_another_name_is_refused() {
    // Issued by the trusted CA, but to another host: the name is checked.
    let tls = TlsFiles::new(&["redis.internal.example"], false);
    let server = RedisServer::start_with_args(|port| tls.server_args(port)).await;
    let mut settings = settings(vec![format!("rediss://app:{PASSWORD}@127.0.0.1:{}", server.port())]);
    settings.ca_cert_path = Some(tls.ca.clone());
    let error = refused(settings).await;
    assert!(error.contains("TLS refused the Redis server's certificate") && error.contains("not valid for name"), "{error}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tls_cluster_with_an_acl_user_signs_in() {
    let tls = TlsFiles::new(&["localhost"], true);
    let mut nodes = Vec::new();
    for _ in 0..3 {
        let config = format!("nodes-{}.conf", DeviceId::generate().expect("id").as_str());
        let node = RedisServer::start_with_args(|port| {
            let mut args = tls.server_args(port);
            args.extend(
                ["--tls-cluster", "yes", "--cluster-enabled", "yes", "--cluster-node-timeout", "5000"].map(str::to_owned),
            );
            args.extend(["--cluster-config-file".to_owned(), config]);
            args
        })
        .await;
        nodes.push(node);
    }
    let addresses: Vec<String> = nodes.iter().map(|n| format!("127.0.0.1:{}", n.port())).collect();
    let output = Command::new("redis-cli")
        .args(["--tls", "--cacert"])
        .arg(&tls.ca)
        .args(["--user", "admin", "--pass", PASSWORD, "--no-auth-warning", "--cluster", "create"])
        .args(&addresses)
        .args(["--cluster-replicas", "0", "--cluster-yes"])
        .output()
        .await
        .expect("redis-cli");
    assert!(output.status.success(), "redis-cli --cluster create: {}", String::from_utf8_lossy(&output.stdout));

    let mut settings = settings(nodes.iter().map(|n| format!("rediss://localhost:{}", n.port())).collect());
    settings.ca_cert_path = Some(tls.ca.clone());
    settings.username = Some("app".into());
    settings.password_file = Some(tls.password_file(PASSWORD));
    // The slots are agreed a moment after the create: until then a sign-in fails
    // (UNAVAILABLE), after it every sign-in works.
    let clock = ManualClock::starting_now();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    let store = loop {
        match RedisStore::connect(settings.clone(), Arc::new(clock.clone())).await {
            Ok(store) if sign_in(&store, &clock).await.is_ok() => break store,
            Ok(_) | Err(_) if tokio::time::Instant::now() < deadline => tokio::time::sleep(Duration::from_millis(100)).await,
            Ok(_) => panic!("no sign-in on the TLS cluster in time"),
            Err(error) => panic!("the TLS cluster refused the store: {error}"),
        }
    };
    // Users spread over the three masters' slots.
    for _ in 0..30 {
        sign_in(&store, &clock).await.expect("a sign-in on the TLS cluster");
    }
    assert!(store.connection.is_cluster());
}

/// Every conformance case over TLS, as the ACL user of deploy/README.md: the store
/// needs no command or key outside it (enrollments, blocks, TOTP, pub/sub).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_conformance_cases_pass_over_tls_as_the_documented_acl_user() {
    let tls = TlsFiles::new(&["localhost"], true);
    let server = RedisServer::start_with_args(|port| tls.server_args(port)).await;
    let mut settings = settings(vec![format!("rediss://localhost:{}", server.port())]);
    settings.ca_cert_path = Some(tls.ca.clone());
    settings.username = Some("app".into());
    settings.password_file = Some(tls.password_file(PASSWORD));
    crate::store::conformance::run_all(|clock| {
        let settings = settings.clone();
        async move { RedisStore::connect(settings, Arc::new(clock)).await.expect("store over TLS") }
    })
    .await;
}
