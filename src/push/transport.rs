//! The HTTP/2-over-TLS client that both providers share.
//!
//! A [`ConnectionPool`] keeps a handful of long-lived HTTP/2 connections to one
//! endpoint and multiplexes pushes over them as concurrent streams: APNs asks for
//! exactly that (a connection per push gets a provider throttled and costs a TLS
//! handshake each), and FCM's HTTP v1 endpoint serves HTTP/2 as well. Requests go
//! round-robin over the slots; a slot whose connection closed (GOAWAY, a network
//! error, the provider's idle timeout) reconnects on its next request, one connect at
//! a time. When a connection has as many streams open as the server allows, hyper
//! holds further requests until a stream ends, so the provider's
//! `SETTINGS_MAX_CONCURRENT_STREAMS` is honoured without a limit of our own.
//!
//! TLS is rustls with the webpki roots (Mozilla's), plus one extra trusted root from
//! `ca_cert_path` when configured: tests point the senders at mock servers with a CA
//! made at test time, and operators behind a TLS-inspecting proxy add its root. ALPN
//! must agree on `h2`.
//!
//! [`post_once`] is the other half: a single HTTP/1.1 request on a fresh connection,
//! for the OAuth token endpoint that FCM needs about once an hour.

use std::net::IpAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, Request, StatusCode, Uri};
use http_body_util::{BodyExt as _, Full, Limited};
use hyper::client::conn::{http1, http2};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::{CertificateDer, ServerName};
use rustls::{ClientConfig, RootCertStore};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

/// A provider's answer is a small JSON object; anything larger is not worth reading.
const MAX_RESPONSE_BYTES: usize = 64 * 1024;

/// What the configuration of an endpoint got wrong. Each names what it is about.
#[derive(Debug, thiserror::Error)]
pub enum TransportSetupError {
    #[error("{path}: {message}")]
    CaCert { path: String, message: String },
    #[error("endpoint {endpoint:?}: {message}")]
    Endpoint { endpoint: String, message: String },
    #[error("TLS: {0}")]
    Tls(String),
}

/// Why a request brought no response. `reason()` is a fixed word that may reach a
/// delivery's `error`; the detail (addresses, OS errors) is only logged.
#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    #[error("no response in time")]
    Timeout,
    #[error("cannot connect: {0}")]
    Connect(String),
    #[error("HTTP error: {0}")]
    Http(#[from] hyper::Error),
    #[error("the response is larger than {MAX_RESPONSE_BYTES} bytes or broken")]
    Body,
}

impl TransportError {
    pub fn reason(&self) -> &'static str {
        match self {
            TransportError::Timeout => "timeout",
            TransportError::Connect(_) => "connection failed",
            TransportError::Http(_) => "connection error",
            TransportError::Body => "unreadable response",
        }
    }
}

/// A whole response: providers answer with a status, a few headers and a small body.
#[derive(Debug)]
pub struct Response {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl Response {
    /// `Retry-After` in delta-seconds (what APNs and FCM send); an HTTP-date is ignored
    /// and the dispatcher's own backoff applies.
    pub fn retry_after(&self) -> Option<Duration> {
        let value = self.headers.get(http::header::RETRY_AFTER)?.to_str().ok()?;
        value.trim().parse::<u64>().ok().map(Duration::from_secs)
    }
}

/// The trust store: the webpki roots plus, when given, the certificates of one PEM
/// file. `extra_root` is (path for messages, file contents).
pub fn client_tls_config(extra_root: Option<(&str, &[u8])>, alpn: &[&[u8]]) -> Result<Arc<ClientConfig>, TransportSetupError> {
    let mut roots = RootCertStore::empty();
    roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
    if let Some((path, pem)) = extra_root {
        let failed = |message: String| TransportSetupError::CaCert { path: path.to_owned(), message };
        let mut added = 0;
        for cert in CertificateDer::pem_slice_iter(pem) {
            let cert = cert.map_err(|e| failed(format!("not a PEM certificate file: {e}")))?;
            roots.add(cert).map_err(|e| failed(format!("not a usable CA certificate: {e}")))?;
            added += 1;
        }
        if added == 0 {
            return Err(failed("holds no PEM certificate".into()));
        }
    }
    // The provider is named explicitly: the process may link more than one, and
    // rustls then refuses to guess a default.
    let mut config = ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .map_err(|e| TransportSetupError::Tls(e.to_string()))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Ok(Arc::new(config))
}

/// Where a pool connects, parsed from the configured `endpoint`.
#[derive(Clone, Debug)]
struct Target {
    host: String,
    port: u16,
    server_name: ServerName<'static>,
    /// `https://host:port` plus the endpoint's path, without a trailing slash.
    base: String,
}

impl Target {
    fn parse(endpoint: &str) -> Result<Self, TransportSetupError> {
        let failed = |message: &str| TransportSetupError::Endpoint { endpoint: endpoint.to_owned(), message: message.to_owned() };
        let uri: Uri = endpoint.parse().map_err(|_| failed("not a URL"))?;
        if uri.scheme_str() != Some("https") {
            return Err(failed("must start with https://"));
        }
        let host = uri.host().ok_or_else(|| failed("has no host"))?.trim_start_matches('[').trim_end_matches(']').to_owned();
        let port = uri.port_u16().unwrap_or(443);
        let server_name = ServerName::try_from(host.clone()).map_err(|_| failed("the host is not a valid TLS server name"))?;
        let path = uri.path().trim_end_matches('/');
        let authority = uri.authority().map(|a| a.as_str().to_owned()).ok_or_else(|| failed("has no host"))?;
        Ok(Self { host, port, server_name, base: format!("https://{authority}{path}") })
    }
}

/// How a pool connects and how long a request may take.
#[derive(Clone, Debug)]
pub struct PoolSettings {
    pub endpoint: String,
    /// Long-lived connections; requests are spread over them round-robin.
    pub connections: usize,
    /// Connecting (when needed), sending and reading the response, all together.
    pub request_timeout: Duration,
}

type Sender = http2::SendRequest<Full<Bytes>>;

/// One connection's place in the pool.
struct Slot {
    ready: parking_lot::Mutex<Option<Sender>>,
    /// Held while connecting, so a burst on a cold slot opens one connection, not one per request.
    connecting: tokio::sync::Mutex<()>,
}

/// A few long-lived HTTP/2 connections to one endpoint.
pub struct ConnectionPool {
    target: Target,
    tls: TlsConnector,
    slots: Box<[Slot]>,
    next: AtomicUsize,
    request_timeout: Duration,
}

impl ConnectionPool {
    /// Connects lazily: the first request on each slot opens its connection.
    pub fn new(settings: &PoolSettings, tls: Arc<ClientConfig>) -> Result<Self, TransportSetupError> {
        let target = Target::parse(&settings.endpoint)?;
        if !tls.alpn_protocols.iter().any(|p| p == b"h2") {
            return Err(TransportSetupError::Tls("the TLS configuration must offer ALPN h2".into()));
        }
        let slots = (0..settings.connections.max(1))
            .map(|_| Slot { ready: parking_lot::Mutex::new(None), connecting: tokio::sync::Mutex::new(()) })
            .collect();
        Ok(Self {
            target,
            tls: TlsConnector::from(tls),
            slots,
            next: AtomicUsize::new(0),
            request_timeout: settings.request_timeout,
        })
    }

    /// The absolute URI of `path` (which starts with '/') on this endpoint.
    pub fn uri(&self, path: &str) -> Result<Uri, http::Error> {
        Ok(Uri::try_from(format!("{}{path}", self.target.base))?)
    }

    /// Sends `request` on one of the pool's connections and reads the whole response,
    /// within the request timeout.
    pub async fn send(&self, request: Request<Full<Bytes>>) -> Result<Response, TransportError> {
        tokio::time::timeout(self.request_timeout, self.exchange(request)).await.map_err(|_| TransportError::Timeout)?
    }

    async fn exchange(&self, request: Request<Full<Bytes>>) -> Result<Response, TransportError> {
        let index = self.next.fetch_add(1, Ordering::Relaxed) % self.slots.len();
        let slot = &self.slots[index];
        let mut sender = self.sender(slot).await?;
        let response = match sender.send_request(request).await {
            Ok(response) => response,
            Err(error) => {
                // A dead connection reports closed; the next request on the slot reconnects.
                if sender.is_closed() {
                    forget_closed(slot);
                }
                return Err(error.into());
            }
        };
        let (parts, body) = response.into_parts();
        let body = Limited::new(body, MAX_RESPONSE_BYTES).collect().await.map_err(|_| TransportError::Body)?.to_bytes();
        Ok(Response { status: parts.status, headers: parts.headers, body })
    }

    /// The slot's live connection, or a new one.
    async fn sender(&self, slot: &Slot) -> Result<Sender, TransportError> {
        if let Some(sender) = live(slot) {
            return Ok(sender);
        }
        let _connecting = slot.connecting.lock().await;
        if let Some(sender) = live(slot) {
            return Ok(sender);
        }
        let sender = self.connect().await?;
        *slot.ready.lock() = Some(sender.clone());
        Ok(sender)
    }

    async fn connect(&self) -> Result<Sender, TransportError> {
        let tcp = TcpStream::connect((self.target.host.as_str(), self.target.port))
            .await
            .map_err(|e| TransportError::Connect(format!("{}:{}: {e}", self.target.host, self.target.port)))?;
        tcp.set_nodelay(true).map_err(|e| TransportError::Connect(e.to_string()))?;
        let tls = self
            .tls
            .connect(self.target.server_name.clone(), tcp)
            .await
            .map_err(|e| TransportError::Connect(format!("TLS with {}: {e}", self.target.host)))?;
        if tls.get_ref().1.alpn_protocol() != Some(b"h2") {
            return Err(TransportError::Connect(format!("{} does not speak HTTP/2 (ALPN h2)", self.target.host)));
        }
        let (sender, connection) = http2::Builder::new(TokioExecutor::new())
            .timer(TokioTimer::new())
            // Pings keep idle connections open through NATs and notice dead ones.
            .keep_alive_interval(Some(Duration::from_secs(30)))
            .keep_alive_timeout(Duration::from_secs(10))
            .keep_alive_while_idle(true)
            .handshake(TokioIo::new(tls))
            .await?;
        let host = self.target.host.clone();
        tokio::spawn(async move {
            if let Err(error) = connection.await {
                tracing::debug!(%host, %error, "push connection closed");
            }
        });
        tracing::debug!(host = %self.target.host, "push connection open");
        Ok(sender)
    }
}

fn forget_closed(slot: &Slot) {
    let mut ready = slot.ready.lock();
    if ready.as_ref().is_some_and(Sender::is_closed) {
        *ready = None;
    }
}

fn live(slot: &Slot) -> Option<Sender> {
    slot.ready.lock().as_ref().filter(|sender| !sender.is_closed()).cloned()
}

/// One HTTP/1.1 request on a new connection: `https://` through `tls` (which must offer
/// ALPN `http/1.1` or none), `http://` only to a loopback address, since what is
/// posted (a signed grant) must not cross a network in clear.
pub async fn post_once(
    uri: &Uri,
    content_type: &'static str,
    body: Bytes,
    tls: &TlsConnector,
    timeout: Duration,
) -> Result<Response, TransportError> {
    tokio::time::timeout(timeout, post_once_inner(uri, content_type, body, tls)).await.map_err(|_| TransportError::Timeout)?
}

async fn post_once_inner(
    uri: &Uri,
    content_type: &'static str,
    body: Bytes,
    tls: &TlsConnector,
) -> Result<Response, TransportError> {
    let host = uri.host().ok_or_else(|| TransportError::Connect("the URL has no host".into()))?;
    let bare_host = host.trim_start_matches('[').trim_end_matches(']');
    let secure = match uri.scheme_str() {
        Some("https") => true,
        Some("http") if is_loopback(bare_host) => false,
        _ => return Err(TransportError::Connect("only https://, or http:// on loopback".into())),
    };
    let port = uri.port_u16().unwrap_or(if secure { 443 } else { 80 });
    let authority = uri.authority().map_or(host, |a| a.as_str());
    let path = uri.path_and_query().map_or("/", |p| p.as_str());
    let request = Request::post(path)
        .header(http::header::HOST, authority)
        .header(http::header::CONTENT_TYPE, content_type)
        .header(http::header::ACCEPT, "application/json")
        .body(Full::new(body))
        .map_err(|e| TransportError::Connect(e.to_string()))?;
    let tcp =
        TcpStream::connect((bare_host, port)).await.map_err(|e| TransportError::Connect(format!("{bare_host}:{port}: {e}")))?;
    if secure {
        let name = ServerName::try_from(bare_host.to_owned()).map_err(|e| TransportError::Connect(e.to_string()))?;
        let stream = tls.connect(name, tcp).await.map_err(|e| TransportError::Connect(format!("TLS with {bare_host}: {e}")))?;
        http1_exchange(stream, request).await
    } else {
        http1_exchange(tcp, request).await
    }
}

async fn http1_exchange<IO>(io: IO, request: Request<Full<Bytes>>) -> Result<Response, TransportError>
where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (mut sender, connection) = http1::handshake(TokioIo::new(io)).await?;
    // The connection task ends when `sender` is dropped after the response.
    tokio::spawn(async move {
        if let Err(error) = connection.await {
            tracing::debug!(%error, "token endpoint connection closed");
        }
    });
    let response = sender.send_request(request).await?;
    let (parts, body) = response.into_parts();
    let body = Limited::new(body, MAX_RESPONSE_BYTES).collect().await.map_err(|_| TransportError::Body)?.to_bytes();
    Ok(Response { status: parts.status, headers: parts.headers, body })
}

fn is_loopback(host: &str) -> bool {
    host.eq_ignore_ascii_case("localhost") || host.parse::<IpAddr>().is_ok_and(|ip| ip.is_loopback())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints_are_parsed_and_checked() {
        let target = Target::parse("https://api.push.apple.com").expect("valid");
        assert_eq!(
            (target.host.as_str(), target.port, target.base.as_str()),
            ("api.push.apple.com", 443, "https://api.push.apple.com")
        );
        let target = Target::parse("https://127.0.0.1:8443/prefix/").expect("valid");
        assert_eq!((target.port, target.base.as_str()), (8443, "https://127.0.0.1:8443/prefix"));
        assert!(Target::parse("http://api.push.apple.com").is_err());
        assert!(Target::parse("not a url").is_err());
    }

    #[test]
    fn a_ca_file_without_certificates_is_named() {
        let error = client_tls_config(Some(("/etc/ca.pem", b"nothing here")), &[b"h2"]).expect_err("no certificate");
        assert!(error.to_string().contains("/etc/ca.pem"), "{error}");
    }

    #[test]
    fn plain_http_is_for_loopback_only() {
        assert!(is_loopback("127.0.0.1"));
        assert!(is_loopback("::1"));
        assert!(is_loopback("localhost"));
        assert!(!is_loopback("oauth2.googleapis.com"));
        assert!(!is_loopback("10.0.0.1"));
    }

    #[test]
    fn retry_after_reads_delta_seconds() {
        let mut headers = HeaderMap::new();
        headers.insert(http::header::RETRY_AFTER, http::HeaderValue::from_static("7"));
        let response = Response { status: StatusCode::TOO_MANY_REQUESTS, headers, body: Bytes::new() };
        assert_eq!(response.retry_after(), Some(Duration::from_secs(7)));
    }
}
