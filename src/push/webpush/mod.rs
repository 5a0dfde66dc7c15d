//! Web Push: the third way to reach a device, with no Apple or Google in the path.
//! Browsers and UnifiedPush distributors (ntfy, NextPush, ...) all take the same
//! server-side protocol:
//!
//! - RFC 8030: POST the message to the subscription's endpoint, with `TTL` (the
//!   seconds left on the challenge), `Urgency: high` for a challenge (`normal` for
//!   a clear or a notice) and `Topic` (the challenge id's 128 bits, base64url) so a
//!   clear replaces its challenge's prompt if it has not been delivered yet;
//! - RFC 8291 and RFC 8188: the message encrypted to the subscription's P-256 key
//!   and auth secret (`Content-Encoding: aes128gcm`), by the `web-push-native`
//!   crate (RustCrypto's p256, hkdf and aes-gcm, which pushmatch uses already; the
//!   `ece` crate needs OpenSSL). Only its `encrypt` is used: VAPID is ours (`vapid`);
//! - RFC 8292: VAPID identifies pushmatch (`vapid`).
//!
//! The message is the same JSON as the APNs custom keys: `{"challenge_id":…,
//! "expires_at":<Unix s>}`, `{"challenge_id":…,"state":"APPROVED"}` for a clear, the
//! notice's fields for a new device; never the number.
//!
//! The endpoint comes from the device: `guard` keeps the requests on the public
//! internet. Answers: 2xx sent; 404 and 410 unregistered (pushes to the device are
//! turned off); 429 and 5xx retried (after `Retry-After` when given); anything else
//! failed. A response body is read up to 4 KiB and ignored.

pub mod guard;
pub mod subscription;
pub mod vapid;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use http::header::{AUTHORIZATION, CONTENT_ENCODING, CONTENT_TYPE, RETRY_AFTER};
use http::{Method, Request, StatusCode};
use http_body_util::{BodyExt as _, Full, Limited};
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use serde::Serialize;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use self::guard::{EndpointPolicy, PublicResolver};
use self::subscription::Subscription;
use self::vapid::VapidKeys;
use super::{NOTICE_KIND, PushJob, PushKind, PushSender, SendOutcome, method_name};
use crate::domain::challenge::Platform;
use crate::domain::time::Clock;

/// The most of a push service's answer that is read.
const MAX_RESPONSE_BYTES: usize = 4 * 1024;
/// Hosts whose send limit is kept; past it, those with no send in flight go.
const MAX_TRACKED_HOSTS: usize = 10_000;
/// How long a push waits when its host has `max_in_flight_per_host` sends out.
const HOST_BUSY_BACKOFF: Duration = Duration::from_secs(1);

type HttpsClient = Client<HttpsConnector<HttpConnector<PublicResolver>>, Full<Bytes>>;

/// Sends Web Push messages to any push service a subscription names.
pub struct WebPushSender {
    client: HttpsClient,
    vapid: VapidKeys,
    policy: Arc<EndpointPolicy>,
    clock: Arc<dyn Clock>,
    request_timeout: Duration,
    max_in_flight: usize,
    /// Sends in flight per endpoint host: the host is the device's choice, so one
    /// that accepts and never answers holds at most these of the lane's places.
    hosts: parking_lot::Mutex<HashMap<String, Arc<Semaphore>>>,
    max_in_flight_per_host: usize,
}

/// What the message says (encrypted; see the module doc).
#[derive(Serialize)]
#[serde(untagged)]
enum Message<'a> {
    Challenge { challenge_id: &'a str, expires_at: i64 },
    Clear { challenge_id: &'a str, state: &'static str },
    Notice { kind: &'static str, device_id: &'a str, new_device_id: &'a str, method: &'static str, enrolled_at: i64 },
}

impl WebPushSender {
    /// `tls`: rustls with the webpki roots (plus `ca_cert_path`'s, for tests and
    /// TLS-inspecting proxies), without ALPN protocols (the connector sets `http/1.1`).
    pub fn new(
        vapid: VapidKeys,
        policy: EndpointPolicy,
        tls: Arc<rustls::ClientConfig>,
        clock: Arc<dyn Clock>,
        request_timeout: Duration,
        max_in_flight: usize,
        max_in_flight_per_host: usize,
    ) -> Self {
        let policy = Arc::new(policy);
        let mut http = HttpConnector::new_with_resolver(PublicResolver { policy: Arc::clone(&policy) });
        http.enforce_http(false);
        http.set_nodelay(true);
        http.set_connect_timeout(Some(request_timeout));
        let https = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config((*tls).clone())
            .https_only()
            .enable_http1()
            .wrap_connector(http);
        let client = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(90))
            .pool_max_idle_per_host(64)
            .build(https);
        Self {
            client,
            vapid,
            policy,
            clock,
            request_timeout,
            max_in_flight,
            hosts: parking_lot::Mutex::new(HashMap::new()),
            max_in_flight_per_host: max_in_flight_per_host.max(1),
        }
    }

    /// A place among `host`'s sends in flight, if one is free.
    fn host_place(&self, host: &str) -> Option<OwnedSemaphorePermit> {
        let mut hosts = self.hosts.lock();
        if hosts.len() >= MAX_TRACKED_HOSTS && !hosts.contains_key(host) {
            let limit = self.max_in_flight_per_host;
            hosts.retain(|_, sends| sends.available_permits() < limit);
        }
        let sends = hosts.entry(host.to_owned()).or_insert_with(|| Arc::new(Semaphore::new(self.max_in_flight_per_host)));
        Arc::clone(sends).try_acquire_owned().ok()
    }

    /// The VAPID public key, base64url: the `applicationServerKey` clients subscribe with.
    pub fn public_key(&self) -> &str {
        self.vapid.public_key()
    }

    /// The request for `job`, or why there is none (a failed push).
    fn request(&self, job: &PushJob, subscription: &Subscription) -> Result<Request<Full<Bytes>>, &'static str> {
        let now = self.clock.now();
        let (message, urgency, topic) = match &job.kind {
            PushKind::Challenge { challenge_id, .. } => (
                Message::Challenge { challenge_id: challenge_id.as_str(), expires_at: job.expires_at.as_unix_seconds() },
                "high",
                Some(challenge_id.bits()),
            ),
            PushKind::Clear { challenge_id, state } => {
                (Message::Clear { challenge_id: challenge_id.as_str(), state: state.name() }, "normal", Some(challenge_id.bits()))
            }
            PushKind::NewDevice { new_device_id, method, enrolled_at } => (
                Message::Notice {
                    kind: NOTICE_KIND,
                    device_id: job.device_id.as_str(),
                    new_device_id: new_device_id.as_str(),
                    method: method_name(*method),
                    enrolled_at: enrolled_at.as_unix_seconds(),
                },
                "normal",
                None,
            ),
        };
        let plain = serde_json::to_vec(&message).map_err(|_| "encoding")?;
        let auth = web_push_native::Auth::from(subscription.auth);
        let body = web_push_native::encrypt(plain, &subscription.p256dh, &auth).map_err(|_| "encryption")?;
        let ttl = job.expires_at.0.saturating_sub(now.0).max(0) / 1000;
        let mut request = Request::builder()
            .method(Method::POST)
            .uri(subscription.endpoint.clone())
            .header("ttl", ttl)
            .header("urgency", urgency)
            .header(CONTENT_ENCODING, "aes128gcm")
            .header(CONTENT_TYPE, "application/octet-stream")
            .header(
                AUTHORIZATION,
                self.vapid.authorization(&subscription.origin(), u64::try_from(now.as_unix_seconds()).unwrap_or(0)),
            );
        if let Some(bits) = topic {
            // 22 characters of the URL-safe alphabet: within RFC 8030's 32.
            request = request.header("topic", data_encoding::BASE64URL_NOPAD.encode(&bits));
        }
        request.body(Full::new(Bytes::from(body))).map_err(|_| "request")
    }

    async fn exchange(&self, request: Request<Full<Bytes>>) -> Result<(StatusCode, Option<Duration>), SendOutcome> {
        let response = match self.client.request(request).await {
            Ok(response) => response,
            Err(error) => {
                let refused = std::iter::successors(Some(&error as &(dyn std::error::Error + 'static)), |e| e.source())
                    .any(|e| e.downcast_ref::<guard::Refused>().is_some());
                if refused {
                    tracing::warn!(%error, "web push endpoint refused: not a public address");
                    return Err(SendOutcome::Failed { reason: "EndpointRefused".into() });
                }
                tracing::debug!(%error, "web push request failed");
                return Err(SendOutcome::Retry { reason: "connect".into(), after: None });
            }
        };
        let status = response.status();
        let retry_after = response
            .headers()
            .get(RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<u64>().ok())
            .map(Duration::from_secs);
        // Read (a little of) the body so the connection can serve the next push.
        let _ = Limited::new(response.into_body(), MAX_RESPONSE_BYTES).collect().await;
        Ok((status, retry_after))
    }
}

/// What a push service's status means.
fn outcome_of(status: StatusCode, retry_after: Option<Duration>) -> SendOutcome {
    match status.as_u16() {
        200..=299 => SendOutcome::Sent,
        404 => SendOutcome::Unregistered { reason: "NotFound".into() },
        410 => SendOutcome::Unregistered { reason: "Gone".into() },
        429 => SendOutcome::Retry { reason: "TooManyRequests".into(), after: retry_after },
        500..=599 => SendOutcome::Retry { reason: "ServerError".into(), after: retry_after },
        400 => SendOutcome::Failed { reason: "BadRequest".into() },
        401 | 403 => SendOutcome::Failed { reason: "VapidRefused".into() },
        413 => SendOutcome::Failed { reason: "PayloadTooLarge".into() },
        other => SendOutcome::Failed { reason: format!("HTTP{other}") },
    }
}

#[async_trait]
impl PushSender for WebPushSender {
    fn platform(&self) -> Platform {
        Platform::WebPush
    }

    fn max_in_flight(&self) -> Option<usize> {
        Some(self.max_in_flight)
    }

    async fn send(&self, job: &PushJob) -> SendOutcome {
        // Checked at enrollment; again here, as the allow-list may have changed.
        let subscription = match Subscription::parse(&job.push_token, &self.policy) {
            Ok(subscription) => subscription,
            Err(error) => {
                tracing::warn!(field = error.field, reason = %error.reason, "stored web push subscription refused");
                return SendOutcome::Failed { reason: "EndpointRefused".into() };
            }
        };
        let Some(_place) = self.host_place(subscription.host()) else {
            return SendOutcome::Retry { reason: "HostBusy".into(), after: Some(HOST_BUSY_BACKOFF) };
        };
        let request = match self.request(job, &subscription) {
            Ok(request) => request,
            Err(reason) => return SendOutcome::Failed { reason: reason.into() },
        };
        match tokio::time::timeout(self.request_timeout, self.exchange(request)).await {
            Err(_) => SendOutcome::Retry { reason: "timeout".into(), after: None },
            Ok(Err(outcome)) => outcome,
            Ok(Ok((status, retry_after))) => {
                tracing::debug!(host = subscription.host(), status = status.as_u16(), "web push answered");
                outcome_of(status, retry_after)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;

    /// RFC 8291 section 5: the user agent's private key and auth secret decrypt the
    /// example message to its plaintext, by the same key derivation (`WebPush:
    /// info`, HKDF over the ECDH secret) and `aes128gcm` record format the sender
    /// encrypts with.
    #[test]
    fn the_rfc_8291_example_decrypts() {
        let b64 = |s: &str| data_encoding::BASE64URL_NOPAD.decode(s.as_bytes()).expect("base64url");
        let ua_private = p256::SecretKey::from_slice(&b64("q1dXpw3UpT5VOmu_cf_v6ih07Aems3njxI-JWgLcM94")).expect("key");
        let ua_public = b64("BCVxsr7N_eNgVRqvHtD0zTZsEc6-VV-JvLexhqUzORcxaOzi6-AYWXvTBHm4bjyPjs7Vd8pZGH6SRpkNtoIAiw4");
        use p256::elliptic_curve::sec1::ToEncodedPoint as _;
        assert_eq!(ua_private.public_key().to_encoded_point(false).as_bytes(), ua_public.as_slice());
        let auth = <[u8; 16]>::try_from(b64("BTBZMqHH6r4Tts7J_aSIgg")).expect("16 bytes");
        let auth = web_push_native::Auth::from(auth);
        let message = b64(
            "DGv6ra1nlYgDCS1FRnbzlwAAEABBBP4z9KsN6nGRTbVYI_c7VJSPQTBtkgcy27mlmlMoZIIgDll6e3vCYLocInmYWAmS6TlzAC8wEqKK6PBru3jl7A_yl95bQpu6cVPTpK4Mqgkf1CXztLVBSt2Ks3oZwbuwXPXLWyouBWLVWGNWQexSgSxsj_Qulcy4a-fN",
        );
        let plain = web_push_native::decrypt(message, &ua_private, &auth).expect("decrypts");
        assert_eq!(plain, b"When I grow up, I want to be a watermelon");
    }

    #[test]
    fn one_host_holds_at_most_its_places() {
        use p256::pkcs8::{EncodePrivateKey as _, LineEnding};
        let key = p256::SecretKey::random(&mut p256::elliptic_curve::rand_core::OsRng);
        let vapid = VapidKeys::from_pkcs8_pem(&key.to_pkcs8_pem(LineEnding::LF).unwrap(), "mailto:ops@example.com").unwrap();
        let tls = crate::push::transport::client_tls_config(None, &[]).expect("tls");
        let clock: Arc<dyn Clock> = Arc::new(crate::domain::time::SystemClock);
        let sender = WebPushSender::new(vapid, EndpointPolicy::default(), tls, clock, Duration::from_secs(5), 10, 2);
        let first = sender.host_place("push.example.net").expect("a place");
        let _second = sender.host_place("push.example.net").expect("a second place");
        assert!(sender.host_place("push.example.net").is_none(), "the host's two places are taken");
        assert!(sender.host_place("other.example.net").is_some(), "another host is not held up");
        drop(first);
        assert!(sender.host_place("push.example.net").is_some(), "a place given back is free again");
    }

    #[test]
    fn statuses_map_to_outcomes() {
        assert_eq!(outcome_of(StatusCode::CREATED, None), SendOutcome::Sent);
        assert!(matches!(outcome_of(StatusCode::GONE, None), SendOutcome::Unregistered { .. }));
        assert!(matches!(outcome_of(StatusCode::NOT_FOUND, None), SendOutcome::Unregistered { .. }));
        let later = Some(Duration::from_secs(7));
        assert_eq!(
            outcome_of(StatusCode::TOO_MANY_REQUESTS, later),
            SendOutcome::Retry { reason: "TooManyRequests".into(), after: later }
        );
        assert!(matches!(outcome_of(StatusCode::BAD_GATEWAY, None), SendOutcome::Retry { .. }));
        assert!(matches!(outcome_of(StatusCode::FORBIDDEN, None), SendOutcome::Failed { .. }));
        assert!(matches!(outcome_of(StatusCode::FOUND, None), SendOutcome::Failed { .. }), "redirects are not followed");
    }
}
