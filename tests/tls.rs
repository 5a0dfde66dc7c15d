//! gRPC over TLS and mutual TLS on loopback, with certificates made at test time
//! (rcgen): a whole sign-in over TLS; mutual TLS that refuses the IdP's services
//! without a client certificate while phones (no certificate) still enroll and
//! answer; tenant names in client certificates; certificate reload on file change
//! and on SIGHUP.

// Tests: a failed expectation is a failed test.
#![allow(clippy::expect_used, clippy::unwrap_used, clippy::panic)]

mod support;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use pushmatch::demo::{ApiKeyInterceptor, IdpChallenges, IdpEnrollments};
use pushmatch::pb;
use pushmatch::pb::challenge_service_client::ChallengeServiceClient;
use pushmatch::pb::enrollment_service_client::EnrollmentServiceClient;
use pushmatch::phone::{PhoneKey, SimulatedPhone};
use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair, KeyUsagePurpose,
    SanType,
};
use support::*;
use tonic::Code;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};
use tonic_health::pb::health_client::HealthClient;

/// A certificate authority made for one test.
struct TestCa {
    issuer: CertifiedIssuer<'static, KeyPair>,
}

impl TestCa {
    fn new(name: &str) -> Self {
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("params");
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, name);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
        Self { issuer: CertifiedIssuer::self_signed(params, KeyPair::generate().expect("key")).expect("CA") }
    }

    fn pem(&self) -> String {
        self.issuer.pem()
    }

    /// (certificate PEM, key PEM) for the server at localhost / 127.0.0.1.
    fn server(&self) -> (String, String) {
        let mut params = CertificateParams::new(vec!["localhost".to_owned()]).expect("params");
        params.subject_alt_names.push(SanType::IpAddress("127.0.0.1".parse().expect("ip")));
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        self.leaf(params)
    }

    /// A client certificate naming `tenants` (`urn:pushmatch:tenant:<id>` URI SANs).
    fn client(&self, tenants: &[&str]) -> Identity {
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("params");
        params.distinguished_name.push(DnType::CommonName, "idp backend");
        for tenant in tenants {
            let uri = format!("{}{tenant}", pushmatch::tls::TENANT_URI_PREFIX);
            params.subject_alt_names.push(SanType::URI(uri.try_into().expect("ia5")));
        }
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        let (cert, key) = self.leaf(params);
        Identity::from_pem(cert, key)
    }

    fn leaf(&self, params: CertificateParams) -> (String, String) {
        let key = KeyPair::generate().expect("key");
        let cert = params.signed_by(&key, &self.issuer).expect("sign");
        (cert.pem(), key.serialize_pem())
    }
}

/// The server's TLS files in a temporary folder.
struct TlsFiles {
    dir: tempfile::TempDir,
}

impl TlsFiles {
    fn new(ca: &TestCa) -> Self {
        let files = Self { dir: tempfile::tempdir().expect("dir") };
        files.install(ca.server());
        files
    }

    fn cert(&self) -> PathBuf {
        self.dir.path().join("tls.crt")
    }

    fn key(&self) -> PathBuf {
        self.dir.path().join("tls.key")
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// Writes a certificate and key the way a renewal does: new files renamed over
    /// the old ones.
    fn install(&self, (cert, key): (String, String)) {
        replace(&self.key(), &key);
        replace(&self.cert(), &cert);
    }
}

fn replace(path: &Path, contents: &str) {
    let staging = path.with_extension("new");
    std::fs::write(&staging, contents).expect("write");
    std::fs::rename(&staging, path).expect("rename");
}

async fn tls_server(files: &TlsFiles, client_ca: Option<&TestCa>, reload_interval_seconds: u32) -> TestServer {
    let client_ca_path = client_ca.map(|ca| {
        let path = files.path("client-ca.pem");
        std::fs::write(&path, ca.pem()).expect("write client CA");
        path
    });
    TestServer::start_with(|config| {
        config.server.tls_cert_path = Some(files.cert());
        config.server.tls_key_path = Some(files.key());
        config.server.tls_client_ca_path = client_ca_path;
        config.server.tls_reload_interval_seconds = reload_interval_seconds;
    })
    .await
}

fn endpoint(addr: SocketAddr, trusted: &TestCa, identity: Option<Identity>) -> Endpoint {
    let mut tls = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(trusted.pem())).domain_name("localhost");
    if let Some(identity) = identity {
        tls = tls.identity(identity);
    }
    Endpoint::from_shared(format!("https://{addr}")).expect("uri").tls_config(tls).expect("tls config").timeout(DEADLINE)
}

async fn connect(addr: SocketAddr, trusted: &TestCa, identity: Option<Identity>) -> Result<Channel, tonic::transport::Error> {
    endpoint(addr, trusted, identity).connect().await
}

fn challenges(channel: &Channel, key: &str) -> IdpChallenges {
    ChallengeServiceClient::with_interceptor(channel.clone(), ApiKeyInterceptor::new(key).expect("key"))
}

fn enrollments(channel: &Channel, key: &str) -> IdpEnrollments {
    EnrollmentServiceClient::with_interceptor(channel.clone(), ApiKeyInterceptor::new(key).expect("key"))
}

/// Enrolls a phone over `phone_channel` from a setup page on `idp_channel`, signs in
/// and approves; returns the final state the IdP's watch saw.
async fn sign_in(idp_channel: &Channel, phone_channel: &Channel, user: &str) -> pb::ChallengeState {
    let enrollment = enrollments(idp_channel, KEY_A)
        .begin_enrollment(pb::BeginEnrollmentRequest {
            user_id: user.into(),
            account_name: format!("{user}@gors.nl"),
            kind: pb::EnrollmentKind::Push.into(),
        })
        .await
        .expect("begin enrollment")
        .into_inner();
    let mut phone = SimulatedPhone::new(phone_channel.clone(), PhoneKey::ed25519(), pb::Platform::Fcm, FCM_TOKEN);
    phone.enroll(&enrollment.uri, "phone without a client certificate").await.expect("the phone enrolls");
    let mut idp = challenges(idp_channel, KEY_A);
    let challenge = idp
        .create_challenge(pb::CreateChallengeRequest { user_id: user.into(), ..Default::default() })
        .await
        .expect("create")
        .into_inner();
    let mut watch = idp
        .watch_challenge(pb::WatchChallengeRequest { challenge_id: challenge.challenge_id.clone(), ..Default::default() })
        .await
        .expect("watch")
        .into_inner();
    let answer = phone.respond(&challenge.challenge_id, pb::Decision::Approve, &challenge.number).await.expect("respond");
    assert!(answer.accepted);
    follow_to_final(&mut watch).await.last().expect("final").state()
}

#[tokio::test]
async fn a_sign_in_over_tls() {
    let ca = TestCa::new("server CA");
    let files = TlsFiles::new(&ca);
    let server = tls_server(&files, None, 30).await;
    let channel = connect(server.addr, &ca, None).await.expect("TLS connects");
    assert_eq!(sign_in(&channel, &channel, "jan").await, pb::ChallengeState::Approved);

    // Plain text to the TLS port gets nowhere.
    let plain = Endpoint::from_shared(format!("http://{}", server.addr)).expect("uri").timeout(Duration::from_secs(2));
    let refused = match plain.connect().await {
        Err(_) => true,
        Ok(channel) => HealthClient::new(channel).check(tonic_health::pb::HealthCheckRequest::default()).await.is_err(),
    };
    assert!(refused, "a plain-text client is not served on the TLS port");
    // A client that trusts another CA refuses the server.
    assert!(connect(server.addr, &TestCa::new("stranger"), None).await.is_err());
}

#[tokio::test]
async fn mutual_tls_guards_the_idp_services_and_leaves_phones_alone() {
    let server_ca = TestCa::new("server CA");
    let client_ca = TestCa::new("client CA");
    let files = TlsFiles::new(&server_ca);
    let server = tls_server(&files, Some(&client_ca), 30).await;

    // Without a client certificate: the IdP's services refuse, health answers.
    let anonymous = connect(server.addr, &server_ca, None).await.expect("TLS without a client certificate connects");
    let refused = challenges(&anonymous, KEY_A)
        .create_challenge(pb::CreateChallengeRequest { user_id: "jan".into(), ..Default::default() })
        .await;
    assert_code(refused, Code::Unauthenticated, "client certificate");
    let refused = enrollments(&anonymous, KEY_A)
        .begin_enrollment(pb::BeginEnrollmentRequest {
            user_id: "jan".into(),
            account_name: "jan@gors.nl".into(),
            kind: pb::EnrollmentKind::Push.into(),
        })
        .await;
    assert_code(refused, Code::Unauthenticated, "client certificate");
    let health = HealthClient::new(anonymous.clone()).check(tonic_health::pb::HealthCheckRequest::default()).await;
    assert!(health.is_ok(), "health needs no certificate: {health:?}");

    // With a certificate for tenant "a": the whole flow, the phone still without one.
    let idp = connect(server.addr, &server_ca, Some(client_ca.client(&["a"]))).await.expect("mutual TLS connects");
    assert_eq!(sign_in(&idp, &anonymous, "jan").await, pb::ChallengeState::Approved);

    // A certificate that names tenant "b" does not carry tenant "a"'s key.
    let other = connect(server.addr, &server_ca, Some(client_ca.client(&["b"]))).await.expect("connects");
    let refused = challenges(&other, KEY_A)
        .get_challenge(pb::GetChallengeRequest { challenge_id: "ch_00000000000000000000000000000000".into() })
        .await;
    assert_code(refused, Code::Unauthenticated, "does not name");
    let allowed = challenges(&other, KEY_B)
        .get_challenge(pb::GetChallengeRequest { challenge_id: "ch_00000000000000000000000000000000".into() })
        .await;
    assert_code(allowed, Code::NotFound, "challenge");

    // A certificate that names no tenant serves any tenant's key.
    let shared = connect(server.addr, &server_ca, Some(client_ca.client(&[]))).await.expect("connects");
    let allowed = challenges(&shared, KEY_A)
        .get_challenge(pb::GetChallengeRequest { challenge_id: "ch_00000000000000000000000000000000".into() })
        .await;
    assert_code(allowed, Code::NotFound, "challenge");

    // A certificate from another CA is refused in the handshake.
    let stranger = TestCa::new("stranger");
    let refused = match connect(server.addr, &server_ca, Some(stranger.client(&["a"]))).await {
        Err(_) => true,
        Ok(channel) => HealthClient::new(channel).check(tonic_health::pb::HealthCheckRequest::default()).await.is_err(),
    };
    assert!(refused, "a client certificate from an unknown CA is refused");
}

/// Waits until a fresh connection that trusts `ca` answers a health check.
async fn served_with(addr: SocketAddr, ca: &TestCa) {
    tokio::time::timeout(DEADLINE, async {
        loop {
            if let Ok(channel) = connect(addr, ca, None).await
                && HealthClient::new(channel).check(tonic_health::pb::HealthCheckRequest::default()).await.is_ok()
            {
                return;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await
    .expect("the server presents the new certificate in time");
}

#[tokio::test]
async fn the_certificate_reloads_when_its_files_change() {
    let first = TestCa::new("first CA");
    let files = TlsFiles::new(&first);
    let server = tls_server(&files, None, 1).await;
    let old_connection = connect(server.addr, &first, None).await.expect("connects");

    let second = TestCa::new("second CA");
    files.install(second.server());
    served_with(server.addr, &second).await;
    assert!(connect(server.addr, &first, None).await.is_err(), "new connections get the new certificate");
    let still = HealthClient::new(old_connection).check(tonic_health::pb::HealthCheckRequest::default()).await;
    assert!(still.is_ok(), "an established connection keeps going: {still:?}");

    // A broken file is not loaded: the last good certificate stays.
    replace(&files.cert(), "not a certificate");
    tokio::time::sleep(Duration::from_millis(2_500)).await;
    served_with(server.addr, &second).await;
}

#[cfg(unix)]
#[tokio::test]
async fn the_certificate_reloads_on_sighup() {
    // Make sure the process has a SIGHUP handler before any signal is sent (the
    // server installs its own in a task that may not have run yet).
    let mut hangups = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()).expect("SIGHUP handler");
    let first = TestCa::new("first CA");
    let files = TlsFiles::new(&first);
    let server = tls_server(&files, None, 0).await; // no polling: SIGHUP only
    connect(server.addr, &first, None).await.expect("connects");

    let second = TestCa::new("second CA");
    files.install(second.server());
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(connect(server.addr, &second, None).await.is_err(), "no reload before the signal");
    let status = std::process::Command::new("kill").args(["-HUP", &std::process::id().to_string()]).status().expect("run kill");
    assert!(status.success());
    hangups.recv().await;
    served_with(server.addr, &second).await;
}
