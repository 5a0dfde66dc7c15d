//! FCM HTTP v1 (API.md, "Push wire format").
//!
//! `POST {endpoint}/v1/projects/{project_id}/messages:send` on a [`ConnectionPool`],
//! authorised by an OAuth2 access token that the service account's own `token_uri`
//! grants for a signed RS256 assertion (the JWT bearer grant, RFC 7523). The token is
//! cached until two minutes before it expires and renewed at once on a 401 (the
//! sender then answers [`SendOutcome::TokenRefused`] and the dispatcher sends again:
//! two attempts).
//!
//! The grant is written here (about a hundred lines) rather than taken from
//! `gcp_auth`: gcp_auth does read `token_uri` from the file, but it caches tokens
//! behind an API with no way to drop one that FCM refused (our 401 rule), and it
//! brings its own HTTP client and TLS roots, so the extra trusted root and the
//! loopback `http://` endpoint that the tests need would not apply to it.
//!
//! A challenge is a data-only message, priority HIGH, `ttl` the time left, collapsing
//! on the challenge id; a clear is a data message (priority NORMAL: nothing is shown)
//! with the challenge id and its final state, under the same collapse key, so a clear
//! also replaces a challenge message still waiting for an offline phone.
//!
//! A new-device notice is a data message too (the app posts the notification, as it
//! does for a challenge), told apart by its `kind` field; priority HIGH, because
//! NORMAL waits for the phone's next maintenance window in Doze, possibly hours,
//! while the notice matters most as the attacker is at work, and Android keeps HIGH
//! for messages that show the user something, which this one does. `ttl` is the
//! time left of its day; it collapses on the new device's id.

use std::sync::Arc;

use parking_lot::RwLock;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use bytes::Bytes;
use http::{HeaderValue, Request, StatusCode, Uri};
use http_body_util::Full;
use ring::rand::SystemRandom;
use ring::signature::{RSA_PKCS1_SHA256, RsaKeyPair};
use rustls::pki_types::PrivatePkcs8KeyDer;
use rustls::pki_types::pem::PemObject as _;
use serde::{Deserialize, Serialize};
use tokio::time::Instant;
use tokio_rustls::TlsConnector;

use super::transport::{ConnectionPool, Response, TransportError, post_once};
use super::{NOTICE_KIND, PushJob, PushKind, PushSender, SendOutcome, method_name, provider_reason, redact_token};
use crate::domain::challenge::Platform;
use crate::domain::time::Clock;
use crate::telemetry::metrics::names;

pub const FCM_SCOPE: &str = "https://www.googleapis.com/auth/firebase.messaging";
const GRANT_TYPE: &str = "urn:ietf:params:oauth:grant-type:jwt-bearer";
/// Renew this long before the access token expires.
const RENEW_MARGIN: Duration = Duration::from_secs(120);
/// How long an assertion is valid (Google's maximum).
const ASSERTION_LIFETIME_SECONDS: u64 = 3600;

/// The fields of a service-account key file that the grant needs.
#[derive(Deserialize)]
struct ServiceAccountFile {
    project_id: String,
    private_key_id: String,
    private_key: String,
    client_email: String,
    token_uri: String,
}

/// A service account, parsed and checked.
pub struct ServiceAccount {
    pub project_id: String,
    key_id: String,
    client_email: String,
    token_uri: Uri,
    key: RsaKeyPair,
}

impl std::fmt::Debug for ServiceAccount {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServiceAccount")
            .field("project_id", &self.project_id)
            .field("client_email", &self.client_email)
            .field("token_uri", &self.token_uri)
            .finish_non_exhaustive()
    }
}

impl ServiceAccount {
    /// Parses the JSON key file Google gives out. Errors say what is wrong, never
    /// quoting the key.
    pub fn from_json(json: &[u8]) -> Result<Self, String> {
        let file: ServiceAccountFile =
            serde_json::from_slice(json).map_err(|e| format!("not a service-account key file: {}", json_error(&e)))?;
        let der = PrivatePkcs8KeyDer::from_pem_slice(file.private_key.as_bytes())
            .map_err(|_| "private_key: not a PEM PKCS#8 private key".to_owned())?;
        let key =
            RsaKeyPair::from_pkcs8(der.secret_pkcs8_der()).map_err(|e| format!("private_key: not a usable RSA key ({e})"))?;
        let token_uri: Uri = file.token_uri.parse().map_err(|_| "token_uri: not a URL".to_owned())?;
        let loopback = token_uri.host().is_some_and(|h| {
            let h = h.trim_start_matches('[').trim_end_matches(']');
            h.eq_ignore_ascii_case("localhost") || h.parse::<std::net::IpAddr>().is_ok_and(|ip| ip.is_loopback())
        });
        match token_uri.scheme_str() {
            Some("https") => {}
            Some("http") if loopback => {}
            _ => return Err("token_uri: must be https:// (http:// only on loopback)".into()),
        }
        let segment_ok = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_.:".contains(&b));
        if !segment_ok(&file.project_id) {
            return Err("project_id: missing or not a project id".into());
        }
        Ok(Self { project_id: file.project_id, key_id: file.private_key_id, client_email: file.client_email, token_uri, key })
    }

    /// The signed assertion for the JWT bearer grant, issued at `now` (Unix s).
    fn assertion(&self, now: u64) -> Result<String, String> {
        let header = serde_json::json!({ "alg": "RS256", "typ": "JWT", "kid": self.key_id });
        let claims = serde_json::json!({
            "iss": self.client_email,
            "scope": FCM_SCOPE,
            "aud": self.token_uri.to_string(),
            "iat": now,
            "exp": now + ASSERTION_LIFETIME_SECONDS,
        });
        let mut jwt = format!(
            "{}.{}",
            data_encoding::BASE64URL_NOPAD.encode(header.to_string().as_bytes()),
            data_encoding::BASE64URL_NOPAD.encode(claims.to_string().as_bytes())
        );
        let mut signature = vec![0; self.key.public().modulus_len()];
        self.key
            .sign(&RSA_PKCS1_SHA256, &SystemRandom::new(), jwt.as_bytes(), &mut signature)
            .map_err(|_| "cannot sign the assertion".to_owned())?;
        jwt.push('.');
        jwt.push_str(&data_encoding::BASE64URL_NOPAD.encode(&signature));
        Ok(jwt)
    }
}

/// A JSON error without the values it may quote (a key file's values are secret).
fn json_error(error: &serde_json::Error) -> String {
    let text = error.to_string();
    if text.starts_with("missing field") {
        return text;
    }
    let kind = match error.classify() {
        serde_json::error::Category::Io => "unreadable",
        serde_json::error::Category::Syntax => "not JSON",
        serde_json::error::Category::Data => "a field of the wrong type",
        serde_json::error::Category::Eof => "cut short",
    };
    format!("{kind} at line {} column {}", error.line(), error.column())
}

/// One access token and when to stop using it.
pub struct AccessToken {
    authorization: HeaderValue,
    renew_at: Instant,
}

/// Why no access token could be had.
#[derive(Debug)]
pub enum GrantError {
    /// The endpoint is unreachable or overloaded: worth another try.
    Unavailable(&'static str),
    /// The endpoint refused the grant (a revoked key, a wrong account): retrying will not help.
    Refused,
}

/// The cached access token and the grant that renews it.
pub struct AccessTokens {
    account: ServiceAccount,
    tls: TlsConnector,
    timeout: Duration,
    current: RwLock<Option<Arc<AccessToken>>>,
    /// One grant at a time: a burst that finds no token waits for the same grant.
    granting: tokio::sync::Mutex<()>,
}

impl AccessTokens {
    /// `tls` is used for an `https://` token_uri and should offer ALPN `http/1.1`.
    pub fn new(account: ServiceAccount, tls: TlsConnector, timeout: Duration) -> Self {
        Self { account, tls, timeout, current: RwLock::new(None), granting: tokio::sync::Mutex::new(()) }
    }

    fn cached(&self) -> Option<Arc<AccessToken>> {
        let now = Instant::now();
        self.current.read().as_ref().filter(|t| t.renew_at > now).cloned()
    }

    async fn current(&self) -> Result<Arc<AccessToken>, GrantError> {
        if let Some(token) = self.cached() {
            return Ok(token);
        }
        let _granting = self.granting.lock().await;
        if let Some(token) = self.cached() {
            return Ok(token);
        }
        let token = Arc::new(self.grant().await?);
        *self.current.write() = Some(Arc::clone(&token));
        Ok(token)
    }

    /// FCM refused `used`: drop it, unless a newer one replaced it already.
    fn invalidate(&self, used: &Arc<AccessToken>) {
        let mut current = self.current.write();
        if current.as_ref().is_some_and(|t| Arc::ptr_eq(t, used)) {
            *current = None;
        }
    }

    async fn grant(&self) -> Result<AccessToken, GrantError> {
        let now = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
        let assertion = self.account.assertion(now).map_err(|error| {
            tracing::error!(%error, "fcm: cannot sign the token grant");
            GrantError::Refused
        })?;
        // The assertion is base64url with dots: nothing in it needs form encoding.
        let body = format!("grant_type={}&assertion={assertion}", GRANT_TYPE.replace(':', "%3A"));
        let started = Instant::now();
        let response =
            post_once(&self.account.token_uri, "application/x-www-form-urlencoded", Bytes::from(body), &self.tls, self.timeout)
                .await
                .map_err(|error: TransportError| {
                    tracing::warn!(%error, "fcm: the token endpoint did not answer");
                    GrantError::Unavailable("oauth token unavailable")
                })?;
        let (authorization, lifetime) = read_grant(&response)?;
        // Renew shortly before it expires; a very short-lived token is used for half its life.
        let usable_for = lifetime.checked_sub(RENEW_MARGIN).unwrap_or(lifetime / 2);
        tracing::info!(expires_in_seconds = lifetime.as_secs(), "fcm: access token granted");
        metrics::counter!(names::PUSH_TOKEN_RENEWALS, "provider" => "fcm").increment(1);
        Ok(AccessToken { authorization, renew_at: started + usable_for })
    }
}

/// Reads the token endpoint's answer: the `Authorization` value and the token's
/// lifetime, or why there is none. Pure, so the `push_responses` fuzz target feeds
/// it arbitrary answers.
#[doc(hidden)]
pub fn read_grant(response: &Response) -> Result<(HeaderValue, Duration), GrantError> {
    let status = response.status;
    if status == StatusCode::TOO_MANY_REQUESTS || status.is_server_error() {
        tracing::warn!(status = status.as_u16(), "fcm: the token endpoint is unavailable");
        return Err(GrantError::Unavailable("oauth token unavailable"));
    }
    if !status.is_success() {
        // Google's error body names the problem (invalid_grant, ...); it holds no secret.
        let error = serde_json::from_slice::<GrantRefusal>(&response.body).map(|r| r.error).unwrap_or_default();
        tracing::error!(status = status.as_u16(), %error, "fcm: the token endpoint refused the service account's grant");
        return Err(GrantError::Refused);
    }
    let granted: Granted = serde_json::from_slice(&response.body).map_err(|_| {
        tracing::warn!("fcm: the token endpoint's answer is not a token");
        GrantError::Unavailable("oauth token unavailable")
    })?;
    // Not marked sensitive, as the APNs token (apns.rs says why): HPACK indexes it.
    let authorization = HeaderValue::from_str(&format!("Bearer {}", granted.access_token))
        .map_err(|_| GrantError::Unavailable("oauth token unavailable"))?;
    Ok((authorization, Duration::from_secs(granted.expires_in.unwrap_or(3600))))
}

#[derive(Deserialize)]
struct Granted {
    access_token: String,
    expires_in: Option<u64>,
}

#[derive(Deserialize)]
struct GrantRefusal {
    #[serde(default)]
    error: String,
}

pub struct FcmSender {
    pool: ConnectionPool,
    send_path: String,
    tokens: AccessTokens,
    clock: Arc<dyn Clock>,
    max_in_flight: usize,
}

impl FcmSender {
    /// `clock` is the domain's: `ttl` is the time left until the challenge expires.
    pub fn new(pool: ConnectionPool, tokens: AccessTokens, clock: Arc<dyn Clock>, max_in_flight: usize) -> Self {
        let send_path = format!("/v1/projects/{}/messages:send", tokens.account.project_id);
        Self { pool, send_path, tokens, clock, max_in_flight }
    }

    fn request(&self, job: &PushJob, authorization: HeaderValue) -> Result<Request<Full<Bytes>>, String> {
        let ttl = format!("{}s", self.clock.now().until(job.expires_at).as_secs());
        let expires_at = job.expires_at.as_unix_seconds().to_string();
        let enrolled_at;
        let (data, priority, collapse_key) = match &job.kind {
            PushKind::Challenge { challenge_id, .. } => {
                let challenge_id = challenge_id.as_str();
                (Data::Challenge { challenge_id, expires_at: &expires_at }, "HIGH", challenge_id)
            }
            PushKind::Clear { challenge_id, state } => {
                let challenge_id = challenge_id.as_str();
                (Data::Clear { challenge_id, state: state.name() }, "NORMAL", challenge_id)
            }
            PushKind::NewDevice { new_device_id, method, enrolled_at: at } => {
                enrolled_at = at.as_unix_seconds().to_string();
                let data = Data::Notice {
                    kind: NOTICE_KIND,
                    device_id: job.device_id.as_str(),
                    new_device_id: new_device_id.as_str(),
                    method: method_name(*method),
                    enrolled_at: &enrolled_at,
                };
                (data, "HIGH", new_device_id.as_str())
            }
        };
        let body = SendRequest {
            message: Message { token: &job.push_token, data, android: Android { priority, ttl: &ttl, collapse_key } },
        };
        let body = serde_json::to_vec(&body).map_err(|e| e.to_string())?;
        let uri = self.pool.uri(&self.send_path).map_err(|e| e.to_string())?;
        Request::post(uri)
            .header(http::header::AUTHORIZATION, authorization)
            .header(http::header::CONTENT_TYPE, "application/json")
            .body(Full::new(Bytes::from(body)))
            .map_err(|e| e.to_string())
    }
}

#[async_trait]
impl PushSender for FcmSender {
    fn platform(&self) -> Platform {
        Platform::Fcm
    }

    fn max_in_flight(&self) -> Option<usize> {
        Some(self.max_in_flight)
    }

    async fn send(&self, job: &PushJob) -> SendOutcome {
        let token = match self.tokens.current().await {
            Ok(token) => token,
            Err(GrantError::Unavailable(reason)) => return SendOutcome::Retry { reason: reason.into(), after: None },
            Err(GrantError::Refused) => return SendOutcome::Failed { reason: "oauth token refused".into() },
        };
        let request = match self.request(job, token.authorization.clone()) {
            Ok(request) => request,
            Err(error) => {
                tracing::error!(%error, "cannot build an FCM request");
                return SendOutcome::Failed { reason: "invalid request".into() };
            }
        };
        let response = match self.pool.send(request).await {
            Ok(response) => response,
            Err(error) => {
                tracing::debug!(%error, "fcm request failed");
                return SendOutcome::Retry { reason: error.reason().into(), after: None };
            }
        };
        let outcome = classify(&response);
        if response.status == StatusCode::UNAUTHORIZED {
            // The dispatcher sends again at once (one more attempt), with a new token.
            tracing::info!("fcm refused the access token: renewing it");
            self.tokens.invalidate(&token);
            let reason = match outcome {
                SendOutcome::Sent => "HTTP 401".to_owned(),
                SendOutcome::Unregistered { reason }
                | SendOutcome::Retry { reason, .. }
                | SendOutcome::Failed { reason }
                | SendOutcome::TokenRefused { reason } => reason,
            };
            return SendOutcome::TokenRefused { reason };
        }
        if let SendOutcome::Failed { reason } = &outcome {
            tracing::warn!(status = response.status.as_u16(), %reason, token = %redact_token(&job.push_token), "fcm refused a push");
        }
        outcome
    }
}

/// API.md's mapping of FCM answers. The reason is FCM's `errorCode` (or the status
/// name), never its free-text message. Public for the `push_responses` fuzz target.
#[doc(hidden)]
pub fn classify(response: &Response) -> SendOutcome {
    let status = response.status;
    if status.is_success() {
        return SendOutcome::Sent;
    }
    let error = serde_json::from_slice::<ErrorBody>(&response.body).ok().map(|b| b.error);
    let code = error
        .as_ref()
        .and_then(|e| e.details.iter().find_map(|d| d.error_code.as_deref()).or(e.status.as_deref()).and_then(provider_reason));
    let reason = code.clone().unwrap_or_else(|| format!("HTTP {}", status.as_u16()));
    let about_the_token = error.as_ref().is_some_and(|e| {
        e.details.iter().flat_map(|d| &d.field_violations).any(|v| v.field == "message.token")
            || e.message.as_deref().is_some_and(|m| m.contains("registration token"))
    });
    match (status, code.as_deref()) {
        (_, Some("UNREGISTERED" | "SENDER_ID_MISMATCH")) => SendOutcome::Unregistered { reason },
        (StatusCode::BAD_REQUEST, _) if about_the_token => SendOutcome::Unregistered { reason },
        (StatusCode::TOO_MANY_REQUESTS, _) => SendOutcome::Retry { reason, after: response.retry_after() },
        (status, _) if status.is_server_error() => SendOutcome::Retry { reason, after: response.retry_after() },
        _ => SendOutcome::Failed { reason },
    }
}

#[derive(Deserialize)]
struct ErrorBody {
    error: ErrorDetail,
}

#[derive(Deserialize)]
struct ErrorDetail {
    #[serde(default)]
    message: Option<String>,
    #[serde(default)]
    status: Option<String>,
    #[serde(default)]
    details: Vec<ErrorDetailEntry>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct ErrorDetailEntry {
    #[serde(default)]
    error_code: Option<String>,
    #[serde(default)]
    field_violations: Vec<FieldViolation>,
}

#[derive(Deserialize)]
struct FieldViolation {
    #[serde(default)]
    field: String,
}

#[derive(Serialize)]
struct SendRequest<'a> {
    message: Message<'a>,
}

#[derive(Serialize)]
struct Message<'a> {
    token: &'a str,
    data: Data<'a>,
    android: Android<'a>,
}

/// FCM data values are strings.
#[derive(Serialize)]
#[serde(untagged)]
enum Data<'a> {
    Challenge {
        challenge_id: &'a str,
        expires_at: &'a str,
    },
    Clear {
        challenge_id: &'a str,
        state: &'static str,
    },
    /// The same fields as the APNs notice (apns.rs says what each is for).
    Notice {
        kind: &'static str,
        device_id: &'a str,
        new_device_id: &'a str,
        method: &'static str,
        enrolled_at: &'a str,
    },
}

#[derive(Serialize)]
struct Android<'a> {
    priority: &'static str,
    ttl: &'a str,
    collapse_key: &'a str,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn response(status: u16, body: &str) -> Response {
        Response {
            status: StatusCode::from_u16(status).expect("status"),
            headers: http::HeaderMap::new(),
            body: Bytes::from(body.to_owned()),
        }
    }

    fn fcm_error(code: u16, status: &str, error_code: &str) -> String {
        serde_json::json!({"error": {"code": code, "message": "Requested entity was not found.", "status": status,
            "details": [{"@type": "type.googleapis.com/google.firebase.fcm.v1.FcmError", "errorCode": error_code}]}})
        .to_string()
    }

    #[test]
    fn answers_map_as_api_md_says() {
        assert_eq!(classify(&response(200, r#"{"name":"projects/p/messages/1"}"#)), SendOutcome::Sent);
        assert_eq!(
            classify(&response(404, &fcm_error(404, "NOT_FOUND", "UNREGISTERED"))),
            SendOutcome::Unregistered { reason: "UNREGISTERED".into() }
        );
        assert_eq!(
            classify(&response(403, &fcm_error(403, "PERMISSION_DENIED", "SENDER_ID_MISMATCH"))),
            SendOutcome::Unregistered { reason: "SENDER_ID_MISMATCH".into() }
        );
        let bad_token = serde_json::json!({"error": {"code": 400, "status": "INVALID_ARGUMENT",
            "message": "The registration token is not a valid FCM registration token",
            "details": [{"errorCode": "INVALID_ARGUMENT"},
                        {"@type": "type.googleapis.com/google.rpc.BadRequest", "fieldViolations": [{"field": "message.token"}]}]}});
        assert_eq!(
            classify(&response(400, &bad_token.to_string())),
            SendOutcome::Unregistered { reason: "INVALID_ARGUMENT".into() }
        );
        let bad_payload = serde_json::json!({"error": {"code": 400, "status": "INVALID_ARGUMENT", "message": "Invalid value at 'message.android.ttl'",
            "details": [{"errorCode": "INVALID_ARGUMENT"}]}});
        assert_eq!(classify(&response(400, &bad_payload.to_string())), SendOutcome::Failed { reason: "INVALID_ARGUMENT".into() });
        assert_eq!(
            classify(&response(429, &fcm_error(429, "RESOURCE_EXHAUSTED", "QUOTA_EXCEEDED"))),
            SendOutcome::Retry { reason: "QUOTA_EXCEEDED".into(), after: None }
        );
        assert_eq!(classify(&response(503, "")), SendOutcome::Retry { reason: "HTTP 503".into(), after: None });
    }

    #[test]
    fn a_malformed_service_account_is_refused_without_quoting_it() {
        let error = ServiceAccount::from_json(br#"{"project_id":"p","private_key_id":"k","private_key":"secret-material","client_email":"a@b","token_uri":"https://oauth2.googleapis.com/token"}"#)
            .expect_err("no key");
        assert!(error.starts_with("private_key"), "{error}");
        assert!(!error.contains("secret-material"));
        assert!(ServiceAccount::from_json(b"{}").is_err());
    }
}
