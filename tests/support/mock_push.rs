//! Mock APNs and FCM servers for end-to-end tests and the push benchmark: real HTTP/2
//! over TLS (ALPN h2) with a CA made at test time (rcgen), and a plain HTTP/1.1 OAuth
//! token endpoint on loopback. Each records every request (method, path, headers,
//! body, when, on which connection), counts TCP connections, and answers as the test
//! scripted: status, body, Retry-After, a delay, holding until released, or never.
//!
//! Self-contained (only the crate's dependencies and dev-dependencies), so
//! `benches/push_throughput.rs` includes it too.

#![allow(dead_code, clippy::expect_used, clippy::unwrap_used, clippy::panic)]

use std::collections::VecDeque;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt as _, Full};
use hyper::server::conn::{http1, http2};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use p256::ecdsa::signature::Verifier as _;
use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair, KeyUsagePurpose, SanType};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_rustls::TlsAcceptor;
use tokio_rustls::rustls;

/// How long a test waits for an awaited event before it fails.
const WAIT: Duration = Duration::from_secs(10);

/// A certificate authority made for one test run; it signs the mock servers' certificates.
pub struct TestCa {
    pub cert_pem: String,
    issuer: Issuer<'static, KeyPair>,
}

impl TestCa {
    pub fn new() -> Self {
        let key = KeyPair::generate().expect("CA key");
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("CA params");
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        params.distinguished_name.push(rcgen::DnType::CommonName, "pushmatch test CA");
        let cert = params.self_signed(&key).expect("CA certificate");
        Self { cert_pem: cert.pem(), issuer: Issuer::new(params, key) }
    }

    /// Writes the CA certificate into `dir` and returns its path (for `ca_cert_path`).
    pub fn write_pem(&self, dir: &std::path::Path) -> String {
        let path = dir.join("test-ca.pem");
        std::fs::write(&path, &self.cert_pem).expect("write CA");
        path.display().to_string()
    }

    /// A TLS server configuration for 127.0.0.1 and localhost, with the given ALPN.
    pub fn server_config(&self, alpn: &[&[u8]]) -> Arc<rustls::ServerConfig> {
        let key = KeyPair::generate().expect("server key");
        let mut params = CertificateParams::new(vec!["localhost".to_owned()]).expect("params");
        params.subject_alt_names.push(SanType::IpAddress(std::net::IpAddr::from([127, 0, 0, 1])));
        let cert = params.signed_by(&key, &self.issuer).expect("server certificate");
        let key_der = rustls::pki_types::PrivateKeyDer::Pkcs8(key.serialize_der().into());
        let mut config = rustls::ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()
            .expect("protocols")
            .with_no_client_auth()
            .with_single_cert(vec![cert.der().clone()], key_der)
            .expect("server config");
        config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
        Arc::new(config)
    }
}

impl Default for TestCa {
    fn default() -> Self {
        Self::new()
    }
}

/// How the mock answers one request.
#[derive(Clone, Debug)]
pub struct Reply {
    pub status: u16,
    /// `{n}` becomes the request's number (1, 2, ...): the token endpoint hands out
    /// a new token each time.
    pub body: String,
    pub retry_after: Option<u64>,
    pub delay: Duration,
    /// Waits until [`MockServer::release`].
    pub held: bool,
    /// Never answers (the client's timeout ends the stream).
    pub never: bool,
}

impl Reply {
    pub fn ok() -> Self {
        Self::status(200, "")
    }

    pub fn status(status: u16, body: &str) -> Self {
        Self { status, body: body.to_owned(), retry_after: None, delay: Duration::ZERO, held: false, never: false }
    }

    /// APNs's error body: `{"reason": ...}`.
    pub fn apns_error(status: u16, reason: &str) -> Self {
        Self::status(status, &serde_json::json!({ "reason": reason }).to_string())
    }

    /// FCM's error body with an FcmError detail.
    pub fn fcm_error(status: u16, grpc_status: &str, error_code: &str) -> Self {
        let body = serde_json::json!({"error": {"code": status, "message": "provider text that must not leak", "status": grpc_status,
            "details": [{"@type": "type.googleapis.com/google.firebase.fcm.v1.FcmError", "errorCode": error_code}]}});
        Self::status(status, &body.to_string())
    }

    pub fn never() -> Self {
        Self { never: true, ..Self::ok() }
    }

    pub fn retry_after(mut self, seconds: u64) -> Self {
        self.retry_after = Some(seconds);
        self
    }

    pub fn after(mut self, delay: Duration) -> Self {
        self.delay = delay;
        self
    }

    pub fn held(mut self) -> Self {
        self.held = true;
        self
    }
}

/// One request as the mock saw it.
#[derive(Clone, Debug)]
pub struct Recorded {
    pub number: usize,
    pub method: String,
    pub path: String,
    pub headers: http::HeaderMap,
    pub body: Bytes,
    pub at: Instant,
    pub connection: usize,
}

impl Recorded {
    pub fn header(&self, name: &str) -> &str {
        self.headers.get(name).map(|v| v.to_str().expect("ascii header")).unwrap_or("")
    }

    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).expect("a JSON body")
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

struct State {
    recording: bool,
    requests: watch::Sender<Vec<Recorded>>,
    count: AtomicUsize,
    connections: AtomicUsize,
    script: Mutex<VecDeque<Reply>>,
    default: Mutex<Reply>,
    released: watch::Sender<bool>,
}

enum Protocol {
    /// HTTP/2 over TLS, as APNs and FCM speak it.
    H2(TlsAcceptor),
    /// Plain HTTP/1.1, for a loopback OAuth token endpoint.
    Http1,
    /// HTTP/1.1 over TLS, as Web Push services speak it.
    Https1(TlsAcceptor),
}

/// One mock server; stops accepting when dropped.
pub struct MockServer {
    pub addr: SocketAddr,
    state: Arc<State>,
    accept: JoinHandle<()>,
}

impl Drop for MockServer {
    fn drop(&mut self) {
        self.accept.abort();
    }
}

impl MockServer {
    /// A mock APNs or FCM endpoint: HTTP/2 over TLS, answering 200 unless scripted.
    pub async fn h2(ca: &TestCa) -> Self {
        Self::start(Protocol::H2(TlsAcceptor::from(ca.server_config(&[b"h2"]))), Reply::ok(), true).await
    }

    /// The same without keeping requests (the benchmark): only counts.
    pub async fn h2_counting(ca: &TestCa, reply: Reply) -> Self {
        Self::start(Protocol::H2(TlsAcceptor::from(ca.server_config(&[b"h2"]))), reply, false).await
    }

    /// A mock Web Push service: HTTP/1.1 over TLS, answering 201 unless scripted.
    pub async fn https1(ca: &TestCa) -> Self {
        Self::start(Protocol::Https1(TlsAcceptor::from(ca.server_config(&[b"http/1.1"]))), Reply::status(201, ""), true).await
    }

    /// A mock OAuth token endpoint on plain HTTP/1.1: grants `mock-access-token-{n}`.
    pub async fn token_endpoint() -> Self {
        let grant = Reply::status(200, r#"{"access_token":"mock-access-token-{n}","expires_in":3599,"token_type":"Bearer"}"#);
        Self::start(Protocol::Http1, grant, true).await
    }

    async fn start(protocol: Protocol, default: Reply, recording: bool) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind mock");
        let addr = listener.local_addr().expect("mock addr");
        let state = Arc::new(State {
            recording,
            requests: watch::Sender::new(Vec::new()),
            count: AtomicUsize::new(0),
            connections: AtomicUsize::new(0),
            script: Mutex::new(VecDeque::new()),
            default: Mutex::new(default),
            released: watch::Sender::new(false),
        });
        let protocol = Arc::new(protocol);
        let accept = tokio::spawn({
            let state = Arc::clone(&state);
            async move {
                loop {
                    let Ok((tcp, _)) = listener.accept().await else { return };
                    let connection = state.connections.fetch_add(1, Ordering::SeqCst) + 1;
                    let _ = tcp.set_nodelay(true);
                    let state = Arc::clone(&state);
                    let protocol = Arc::clone(&protocol);
                    tokio::spawn(async move {
                        let service = service_fn(move |request| answer(Arc::clone(&state), connection, request));
                        match protocol.as_ref() {
                            Protocol::H2(acceptor) => {
                                let Ok(tls) = acceptor.accept(tcp).await else { return };
                                let _ = http2::Builder::new(TokioExecutor::new())
                                    .timer(TokioTimer::new())
                                    // What APNs allows per connection.
                                    .max_concurrent_streams(1000)
                                    .serve_connection(TokioIo::new(tls), service)
                                    .await;
                            }
                            Protocol::Http1 => {
                                let _ = http1::Builder::new().serve_connection(TokioIo::new(tcp), service).await;
                            }
                            Protocol::Https1(acceptor) => {
                                let Ok(tls) = acceptor.accept(tcp).await else { return };
                                let _ = http1::Builder::new().serve_connection(TokioIo::new(tls), service).await;
                            }
                        }
                    });
                }
            }
        });
        Self { addr, state, accept }
    }

    /// `https://127.0.0.1:PORT`, for `endpoint`.
    pub fn endpoint(&self) -> String {
        format!("https://127.0.0.1:{}", self.addr.port())
    }

    /// `http://127.0.0.1:PORT/token`, for a service account's `token_uri`.
    pub fn token_uri(&self) -> String {
        format!("http://127.0.0.1:{}/token", self.addr.port())
    }

    /// The next requests get these replies, in order; then the default again.
    pub fn script(&self, replies: impl IntoIterator<Item = Reply>) {
        self.state.script.lock().unwrap().extend(replies);
    }

    /// What every request gets once the script is used up.
    pub fn answer_with(&self, reply: Reply) {
        *self.state.default.lock().unwrap() = reply;
    }

    /// Lets held replies go.
    pub fn release(&self) {
        self.state.released.send_replace(true);
    }

    pub fn requests(&self) -> Vec<Recorded> {
        self.state.requests.borrow().clone()
    }

    /// Requests seen (recorded or not).
    pub fn count(&self) -> usize {
        self.state.count.load(Ordering::SeqCst)
    }

    /// TCP connections accepted so far.
    pub fn connections(&self) -> usize {
        self.state.connections.load(Ordering::SeqCst)
    }

    /// Waits (up to a deadline) until `n` requests were recorded; returns them all.
    pub async fn wait_for_requests(&self, n: usize) -> Vec<Recorded> {
        self.wait_until(|requests| requests.len() >= n).await
    }

    /// Waits (up to a deadline) until the recorded requests satisfy `condition`.
    pub async fn wait_until(&self, condition: impl Fn(&[Recorded]) -> bool) -> Vec<Recorded> {
        let mut changes = self.state.requests.subscribe();
        tokio::time::timeout(WAIT, changes.wait_for(|requests| condition(requests)))
            .await
            .unwrap_or_else(|_| panic!("the mock did not see the expected requests in time: {:#?}", self.requests()))
            .expect("mock alive")
            .clone()
    }
}

async fn answer(
    state: Arc<State>,
    connection: usize,
    request: http::Request<hyper::body::Incoming>,
) -> Result<http::Response<Full<Bytes>>, Infallible> {
    let (parts, body) = request.into_parts();
    let body = body.collect().await.map(|b| b.to_bytes()).unwrap_or_default();
    let number = state.count.fetch_add(1, Ordering::SeqCst) + 1;
    let reply = state.script.lock().unwrap().pop_front().unwrap_or_else(|| state.default.lock().unwrap().clone());
    if state.recording {
        let recorded = Recorded {
            number,
            method: parts.method.to_string(),
            path: parts.uri.path().to_owned(),
            headers: parts.headers,
            body,
            at: Instant::now(),
            connection,
        };
        state.requests.send_modify(|requests| requests.push(recorded));
    }
    if reply.never {
        std::future::pending::<()>().await;
    }
    if reply.held {
        let mut released = state.released.subscribe();
        let _ = released.wait_for(|released| *released).await;
    }
    if !reply.delay.is_zero() {
        tokio::time::sleep(reply.delay).await;
    }
    let mut response = http::Response::builder().status(reply.status);
    if let Some(seconds) = reply.retry_after {
        response = response.header("retry-after", seconds.to_string());
    }
    if !reply.body.is_empty() {
        response = response.header("content-type", "application/json");
    }
    Ok(response.body(Full::new(Bytes::from(reply.body.replace("{n}", &number.to_string())))).expect("response"))
}

// ---- keys and the tokens made with them ----

/// The fixture RSA key of the mock service account (made once with openssl for
/// these tests; it grants nothing anywhere).
pub const FCM_TEST_KEY_PEM: &str = include_str!("fcm_test_service_account_key.pem");
pub const FCM_PROJECT: &str = "pushmatch-test";
pub const FCM_CLIENT_EMAIL: &str = "pushmatch@pushmatch-test.iam.gserviceaccount.com";
pub const FCM_KEY_ID: &str = "test-key-id-1";

/// A service-account key file whose `token_uri` is `token_uri`.
pub fn service_account_json(token_uri: &str) -> String {
    serde_json::json!({
        "type": "service_account",
        "project_id": FCM_PROJECT,
        "private_key_id": FCM_KEY_ID,
        "private_key": FCM_TEST_KEY_PEM,
        "client_email": FCM_CLIENT_EMAIL,
        "client_id": "1",
        "auth_uri": "https://accounts.google.com/o/oauth2/auth",
        "token_uri": token_uri,
    })
    .to_string()
}

/// An APNs auth key made now: the `.p8` PEM and the key that verifies its tokens.
pub fn apns_key() -> (String, p256::ecdsa::VerifyingKey) {
    use p256::pkcs8::EncodePrivateKey as _;
    let key = p256::ecdsa::SigningKey::random(&mut p256::elliptic_curve::rand_core::OsRng);
    let pem = key.to_pkcs8_pem(p256::pkcs8::LineEnding::LF).expect("pem").to_string();
    (pem, *key.verifying_key())
}

fn split_jwt(jwt: &str) -> (serde_json::Value, serde_json::Value, String, Vec<u8>) {
    let parts: Vec<&str> = jwt.split('.').collect();
    assert_eq!(parts.len(), 3, "a JWT has three parts: {jwt}");
    let decode = |part: &str| data_encoding::BASE64URL_NOPAD.decode(part.as_bytes()).expect("base64url");
    let header = serde_json::from_slice(&decode(parts[0])).expect("header JSON");
    let claims = serde_json::from_slice(&decode(parts[1])).expect("claims JSON");
    (header, claims, format!("{}.{}", parts[0], parts[1]), decode(parts[2]))
}

/// Checks an ES256 JWT's signature; returns its header and claims.
/// Whether `key` verifies the ES256 JWT's signature.
pub fn es256_signed_by(jwt: &str, key: &p256::ecdsa::VerifyingKey) -> bool {
    let (_, _, signed, signature) = split_jwt(jwt);
    p256::ecdsa::Signature::from_slice(&signature).is_ok_and(|signature| key.verify(signed.as_bytes(), &signature).is_ok())
}

pub fn verify_es256(jwt: &str, key: &p256::ecdsa::VerifyingKey) -> (serde_json::Value, serde_json::Value) {
    let (header, claims, signed, signature) = split_jwt(jwt);
    let signature = p256::ecdsa::Signature::from_slice(&signature).expect("a raw r||s signature");
    key.verify(signed.as_bytes(), &signature).expect("the ES256 signature verifies");
    (header, claims)
}

/// Checks an RS256 JWT's signature against the fixture service account's key;
/// returns its header and claims.
pub fn verify_rs256(jwt: &str) -> (serde_json::Value, serde_json::Value) {
    use rustls::pki_types::pem::PemObject as _;
    let (header, claims, signed, signature) = split_jwt(jwt);
    let der = rustls::pki_types::PrivatePkcs8KeyDer::from_pem_slice(FCM_TEST_KEY_PEM.as_bytes()).expect("fixture key");
    let pair = ring::signature::RsaKeyPair::from_pkcs8(der.secret_pkcs8_der()).expect("RSA key");
    let public = ring::signature::UnparsedPublicKey::new(
        &ring::signature::RSA_PKCS1_2048_8192_SHA256,
        ring::signature::KeyPair::public_key(&pair).as_ref().to_vec(),
    );
    public.verify(signed.as_bytes(), &signature).expect("the RS256 signature verifies");
    (header, claims)
}

/// Reads an `application/x-www-form-urlencoded` body into pairs.
pub fn form(body: &str) -> Vec<(String, String)> {
    body.split('&')
        .filter_map(|pair| pair.split_once('='))
        .map(|(k, v)| {
            let decode =
                |s: &str| percent_encoding::percent_decode_str(&s.replace('+', " ")).decode_utf8().expect("utf8").into_owned();
            (decode(k), decode(v))
        })
        .collect()
}
