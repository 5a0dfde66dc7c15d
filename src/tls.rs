//! TLS for the gRPC port, optional mutual TLS for the IdP's services, and
//! certificate reload without a restart.
//!
//! tonic's own `ServerTlsConfig` cannot change its certificate once serving, so the
//! server takes its connections from [`incoming`]: a rustls acceptor over the
//! listener that reads the *current* [`rustls::ServerConfig`] for every new
//! connection. [`ReloadingTls::reload`] swaps that config after reading the files
//! again; it runs on SIGHUP and when a file's modification time or size changes
//! (polled every `server.tls_reload_interval_seconds`, which also catches the
//! symlink swap of a Kubernetes Secret volume). Established connections keep the
//! certificate they were made with. A reload that fails (a half-written file, a key
//! that does not match) keeps the old config and is retried at the next poll.
//!
//! Mutual TLS (`server.tls_client_ca_path`): phones call `DeviceService` and have no
//! client certificates, and the IdP's backend calls `ChallengeService` and
//! `EnrollmentService`. So the handshake *asks* every client for a certificate and
//! verifies one if sent (against the client CA only); each connection carries what
//! it verified ([`TlsConnectInfo`], with the tenants a certificate names in
//! [`ClientIdentity`]), and the one authentication layer (`crate::api::auth`)
//! decides which calls need it. This module only loads, reloads and accepts.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime};

use parking_lot::{Mutex, RwLock};
use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_rustls::TlsAcceptor;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::transport::server::Connected;

use crate::domain::ids::TenantId;
use crate::telemetry::metrics::names;

/// The URI SAN prefix by which a client certificate names a tenant.
pub const TENANT_URI_PREFIX: &str = "urn:pushmatch:tenant:";

/// A handshake that takes longer is dropped (slow or idle clients hold no task for long).
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("{key} {path}: {message}")]
    File { key: &'static str, path: String, message: String },
    #[error("TLS configuration: {0}")]
    Config(String),
}

/// Registers the TLS series at zero (at start, so that alerts see them before the
/// first failure): handshake failures by reason, reloads by outcome.
pub fn register_series() {
    for reason in ["error", "timeout"] {
        metrics::counter!(names::TLS_HANDSHAKE_FAILURES, "reason" => reason).increment(0);
    }
    for outcome in ["reloaded", "failed"] {
        metrics::counter!(names::TLS_RELOADS, "outcome" => outcome).increment(0);
    }
}

/// Where the certificate, key and client CA come from.
#[derive(Clone, Debug)]
pub struct TlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub client_ca: Option<PathBuf>,
    /// 0: no polling (SIGHUP only).
    pub reload_interval: Duration,
}

impl TlsFiles {
    fn paths(&self) -> Vec<&PathBuf> {
        [Some(&self.cert), Some(&self.key), self.client_ca.as_ref()].into_iter().flatten().collect()
    }
}

/// The current server config, swapped whole on reload.
pub struct ReloadingTls {
    files: TlsFiles,
    current: RwLock<Arc<rustls::ServerConfig>>,
    /// (modified, length) of each file when last loaded successfully.
    loaded: Mutex<Vec<Option<(SystemTime, u64)>>>,
}

impl ReloadingTls {
    /// Reads the files once; fails when they do not make a usable config.
    pub async fn load(files: TlsFiles) -> Result<Arc<Self>, TlsError> {
        let fingerprint = fingerprint(&files).await;
        let config = build_config(&files).await?;
        Ok(Arc::new(Self { files, current: RwLock::new(config), loaded: Mutex::new(fingerprint) }))
    }

    pub fn mutual(&self) -> bool {
        self.files.client_ca.is_some()
    }

    fn current(&self) -> Arc<rustls::ServerConfig> {
        Arc::clone(&self.current.read())
    }

    /// Reads the files again and, if they make a usable config, serves new
    /// connections with it.
    pub async fn reload(&self) -> Result<(), TlsError> {
        let fingerprint = fingerprint(&self.files).await;
        let result = build_config(&self.files).await;
        let outcome = if result.is_ok() { "reloaded" } else { "failed" };
        metrics::counter!(names::TLS_RELOADS, "outcome" => outcome).increment(1);
        let config = result?;
        *self.current.write() = config;
        *self.loaded.lock() = fingerprint;
        tracing::info!(cert = %self.files.cert.display(), "TLS certificate reloaded");
        Ok(())
    }

    async fn changed_on_disk(&self) -> bool {
        let now = fingerprint(&self.files).await;
        *self.loaded.lock() != now
    }

    /// Reloads on SIGHUP and when the files change, until `stop` fires.
    pub fn spawn_reloader(self: &Arc<Self>, stop: CancellationToken) {
        let this = Arc::clone(self);
        tokio::spawn(async move {
            let mut triggers = crate::reload::Triggers::new("TLS certificates", this.files.reload_interval, None);
            while let Some(trigger) = triggers.next(&stop).await {
                let forced = !matches!(trigger, crate::reload::Trigger::Tick);
                if (forced || this.changed_on_disk().await)
                    && let Err(error) = this.reload().await
                {
                    tracing::warn!(%error, "TLS reload failed; still serving the previous certificate");
                }
            }
        });
    }
}

async fn fingerprint(files: &TlsFiles) -> Vec<Option<(SystemTime, u64)>> {
    let mut marks = Vec::new();
    for path in files.paths() {
        let mark = tokio::fs::metadata(path).await.ok().and_then(|meta| Some((meta.modified().ok()?, meta.len())));
        marks.push(mark);
    }
    marks
}

async fn read(key: &'static str, path: &Path) -> Result<Vec<u8>, TlsError> {
    tokio::fs::read(path).await.map_err(|e| TlsError::File { key, path: path.display().to_string(), message: e.to_string() })
}

fn certificates(key: &'static str, path: &Path, pem: &[u8]) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let failed = |message: String| TlsError::File { key, path: path.display().to_string(), message };
    let certs = CertificateDer::pem_slice_iter(pem).collect::<Result<Vec<_>, _>>().map_err(|e| failed(e.to_string()))?;
    if certs.is_empty() {
        return Err(failed("holds no PEM certificate".into()));
    }
    Ok(certs)
}

async fn build_config(files: &TlsFiles) -> Result<Arc<rustls::ServerConfig>, TlsError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let chain = certificates("server.tls_cert_path", &files.cert, &read("server.tls_cert_path", &files.cert).await?)?;
    // The key's text never reaches an error message: only the parser's verdict does.
    let key = PrivateKeyDer::from_pem_slice(&read("server.tls_key_path", &files.key).await?).map_err(|e| TlsError::File {
        key: "server.tls_key_path",
        path: files.key.display().to_string(),
        message: format!("no usable PEM private key ({e})"),
    })?;
    let builder = rustls::ServerConfig::builder_with_provider(Arc::clone(&provider))
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError::Config(e.to_string()))?;
    let builder = match &files.client_ca {
        None => builder.with_no_client_auth(),
        Some(path) => {
            let mut roots = rustls::RootCertStore::empty();
            for cert in certificates("server.tls_client_ca_path", path, &read("server.tls_client_ca_path", path).await?)? {
                roots.add(cert).map_err(|e| TlsError::File {
                    key: "server.tls_client_ca_path",
                    path: path.display().to_string(),
                    message: e.to_string(),
                })?;
            }
            // Asked, verified if sent, not required: phones have no certificate.
            // The auth layer (`crate::api::auth`) requires one for the IdP's services.
            let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                .allow_unauthenticated()
                .build()
                .map_err(|e| TlsError::Config(format!("client CA: {e}")))?;
            builder.with_client_cert_verifier(verifier)
        }
    };
    let mut config = builder.with_single_cert(chain, key).map_err(|e| TlsError::File {
        key: "server.tls_key_path",
        path: files.key.display().to_string(),
        message: format!("does not go with the certificate: {e}"),
    })?;
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(Arc::new(config))
}

/// What the server knows about a TLS connection; in every request's extensions.
#[derive(Clone, Debug)]
pub struct TlsConnectInfo {
    pub remote_addr: Option<SocketAddr>,
    /// The verified client certificate, if the client sent one.
    pub client: Option<Arc<ClientIdentity>>,
}

/// A verified client certificate, as far as pushmatch reads it.
#[derive(Debug, Default)]
pub struct ClientIdentity {
    /// The tenants its `urn:pushmatch:tenant:` URI SANs name; empty: any tenant.
    pub tenants: HashSet<String>,
}

impl ClientIdentity {
    /// Reads the tenant names from a (verified) DER certificate.
    pub fn from_der(der: &[u8]) -> Self {
        use x509_cert::der::Decode as _;
        use x509_cert::der::oid::AssociatedOid as _;
        use x509_cert::ext::pkix::SubjectAltName;
        use x509_cert::ext::pkix::name::GeneralName;

        let mut tenants = HashSet::new();
        let Ok(cert) = x509_cert::Certificate::from_der(der) else { return Self { tenants } };
        for extension in cert.tbs_certificate.extensions.iter().flatten() {
            if extension.extn_id != SubjectAltName::OID {
                continue;
            }
            let Ok(names) = SubjectAltName::from_der(extension.extn_value.as_bytes()) else { continue };
            for name in names.0 {
                if let GeneralName::UniformResourceIdentifier(uri) = name
                    && let Some(tenant) = uri.as_str().strip_prefix(TENANT_URI_PREFIX)
                {
                    tenants.insert(tenant.to_owned());
                }
            }
        }
        Self { tenants }
    }

    pub fn allows(&self, tenant: &TenantId) -> bool {
        self.tenants.is_empty() || self.tenants.contains(&tenant.0)
    }
}

/// A connection after its handshake.
pub struct TlsConnection {
    stream: tokio_rustls::server::TlsStream<TcpStream>,
    info: TlsConnectInfo,
}

impl Connected for TlsConnection {
    type ConnectInfo = TlsConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.info.clone()
    }
}

impl AsyncRead for TlsConnection {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.stream).poll_read(cx, buf)
    }
}

impl AsyncWrite for TlsConnection {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }
}

/// Accepts TCP connections on `listener` and completes their TLS handshakes
/// concurrently (one slow client does not hold up the others); yields the finished
/// ones. It stops accepting when the server drops the stream (at shutdown): the
/// listener is closed first, then `closed` fires.
pub fn incoming(
    listener: TcpListener,
    tls: Arc<ReloadingTls>,
    closed: CancellationToken,
) -> ReceiverStream<Result<TlsConnection, std::io::Error>> {
    let (ready, connections) = mpsc::channel(64);
    tokio::spawn(async move {
        loop {
            let accepted = tokio::select! {
                // The stop first: no connection is accepted once the stream is gone.
                biased;
                () = ready.closed() => {
                    drop(listener);
                    closed.cancel();
                    return;
                }
                accepted = listener.accept() => accepted,
            };
            let (tcp, remote_addr) = match accepted {
                Ok(accepted) => accepted,
                Err(error) => {
                    // EMFILE and friends: say so, breathe, and keep accepting.
                    tracing::warn!(%error, "cannot accept a connection");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            let _ = tcp.set_nodelay(true);
            let acceptor = TlsAcceptor::from(tls.current());
            let ready = ready.clone();
            tokio::spawn(async move {
                let stream = match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                    Ok(Ok(stream)) => stream,
                    Ok(Err(error)) => {
                        metrics::counter!(names::TLS_HANDSHAKE_FAILURES, "reason" => "error").increment(1);
                        tracing::debug!(%error, %remote_addr, "TLS handshake failed");
                        return;
                    }
                    Err(_) => {
                        metrics::counter!(names::TLS_HANDSHAKE_FAILURES, "reason" => "timeout").increment(1);
                        tracing::debug!(%remote_addr, "TLS handshake timed out");
                        return;
                    }
                };
                let client = stream
                    .get_ref()
                    .1
                    .peer_certificates()
                    .and_then(|chain| chain.first())
                    .map(|leaf| Arc::new(ClientIdentity::from_der(leaf)));
                let info = TlsConnectInfo { remote_addr: Some(remote_addr), client };
                let _ = ready.send(Ok(TlsConnection { stream, info })).await;
            });
        }
    });
    ReceiverStream::new(connections)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::expect_used)]

    use std::time::Duration;

    use futures::StreamExt as _;
    use tokio_util::sync::CancellationToken;

    use super::{ReloadingTls, TlsFiles};

    /// At shutdown the server drops the stream: the accept task closes the
    /// listener before it says so, so a client told the server is going (health
    /// NOT_SERVING follows `closed`) is refused, never accepted and then reset.
    #[tokio::test]
    async fn dropping_the_stream_closes_the_listener_then_says_so() {
        let dir = tempfile::tempdir().expect("dir");
        let certified = rcgen::generate_simple_self_signed(vec!["localhost".into()]).expect("certificate");
        let (cert, key) = (dir.path().join("tls.crt"), dir.path().join("tls.key"));
        std::fs::write(&cert, certified.cert.pem()).expect("cert");
        std::fs::write(&key, certified.signing_key.serialize_pem()).expect("key");
        let files = TlsFiles { cert, key, client_ca: None, reload_interval: Duration::ZERO };
        let tls = ReloadingTls::load(files).await.expect("tls");
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let closed = CancellationToken::new();
        let mut incoming = super::incoming(listener, tls, closed.clone());
        assert!(futures::poll!(incoming.next()).is_pending(), "nothing accepted yet");
        assert!(!closed.is_cancelled());
        drop(incoming);
        tokio::time::timeout(Duration::from_secs(10), closed.cancelled()).await.expect("the accept task says so");
        let refused = tokio::net::TcpStream::connect(addr).await;
        assert!(refused.is_err(), "the port is closed once it is said: {refused:?}");
    }
}
