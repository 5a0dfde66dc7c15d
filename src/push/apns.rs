//! APNs over HTTP/2 with token authentication (API.md, "Push wire format").
//!
//! `POST {endpoint}/3/device/{token}` on a [`ConnectionPool`], authorised by an ES256
//! provider token (header `kid` = key id, claims `iss` = team id and `iat`). Apple
//! refuses tokens older than an hour and throttles tokens renewed more often than
//! every 20 minutes, so one token is shared by every push and renewed after 45
//! minutes, or at once when APNs answers 403 `ExpiredProviderToken` (the sender then
//! answers [`SendOutcome::TokenRefused`] and the dispatcher sends again: two attempts).
//!
//! A challenge is an alert (`apns-push-type: alert`, priority 10) that expires with
//! the challenge and collapses on its id; a clear is a background push
//! (`content-available`, priority 5) carrying the challenge id and its final state.
//! Neither carries the number: the job has none.
//!
//! A new-device notice is an alert too, so the user sees it even when the app is not
//! running: priority 10, because it is most useful while an attacker is still at
//! work and comes once per enrollment, so it costs no battery worth saving; the
//! default interruption level (not time-sensitive, as a challenge is: a notice can
//! wait for a Focus to end, and one that broke through every Focus would teach users
//! to switch off the time-sensitive notifications that challenges need). It expires
//! a day after the enrollment and collapses on the new device's id.

use std::sync::Arc;

use parking_lot::RwLock;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use bytes::Bytes;
use http::{HeaderValue, Request, StatusCode};
use http_body_util::Full;
use p256::ecdsa::SigningKey;
use p256::ecdsa::signature::Signer as _;
use p256::pkcs8::DecodePrivateKey as _;
use serde::Serialize;

use super::transport::{ConnectionPool, Response};
use super::{NOTICE_KIND, PushJob, PushKind, PushSender, SendOutcome, method_name, provider_reason, redact_token};
use crate::domain::challenge::Platform;
use crate::domain::enrollment::EnrollmentKind;
use crate::domain::time::Millis;
use crate::telemetry::metrics::names;

/// Renew the provider token after this long: inside Apple's hour, past its 20-minute
/// minimum between renewals.
const TOKEN_RENEW_AFTER: Duration = Duration::from_secs(45 * 60);

/// What a challenge alert says. Fixed text: the context (application, place) is
/// fetched by the app over the authenticated API, never put in a push.
const ALERT_TITLE: &str = "Sign-in request";
const ALERT_BODY: &str = "Open to review it, then type the number shown on the sign-in page.";
const CATEGORY: &str = "PUSHMATCH_CHALLENGE";

/// What a new-device notice says. Fixed text, the same for every user: the payload's
/// fields tell the app which account and what was added, for it to show in its own words.
const NOTICE_TITLE: &str = "New sign-in method added";
const NOTICE_BODY: &str = "A new sign-in method was added to your account. If this wasn't you, open the app now.";
const NOTICE_CATEGORY: &str = "PUSHMATCH_NEW_DEVICE";

pub struct ApnsSender {
    client: Arc<ApnsClient>,
    topic: HeaderValue,
    max_in_flight: usize,
}

/// What every app (topic) pushed with one key shares: the connections and the
/// provider token.
struct ApnsClient {
    pool: ConnectionPool,
    tokens: ProviderTokens,
}

impl ApnsSender {
    pub fn new(pool: ConnectionPool, topic: HeaderValue, tokens: ProviderTokens, max_in_flight: usize) -> Self {
        Self { client: Arc::new(ApnsClient { pool, tokens }), topic, max_in_flight }
    }

    /// A sender for another app (bundle id) on the same key and connections: a
    /// team's key signs pushes to all of its apps, so tenants whose apps share a key
    /// share one pool and one provider token.
    pub fn for_topic(&self, topic: HeaderValue) -> Self {
        Self { client: Arc::clone(&self.client), topic, max_in_flight: self.max_in_flight }
    }

    fn request(&self, job: &PushJob, authorization: HeaderValue) -> Result<Request<Full<Bytes>>, String> {
        let (push_type, priority, collapse_id, body) = match &job.kind {
            PushKind::Challenge { challenge_id, .. } => (
                "alert",
                "10",
                challenge_id.as_str(),
                serde_json::to_vec(&ChallengePayload::new(challenge_id.as_str(), job.expires_at)),
            ),
            PushKind::Clear { challenge_id, state } => (
                "background",
                "5",
                challenge_id.as_str(),
                serde_json::to_vec(&ClearPayload::new(challenge_id.as_str(), state.name())),
            ),
            PushKind::NewDevice { new_device_id, method, enrolled_at } => (
                "alert",
                "10",
                new_device_id.as_str(),
                serde_json::to_vec(&NoticePayload::new(job.device_id.as_str(), new_device_id.as_str(), *method, *enrolled_at)),
            ),
        };
        let body = body.map_err(|e| e.to_string())?;
        let uri = self.client.pool.uri(&format!("/3/device/{}", job.push_token)).map_err(|e| e.to_string())?;
        Request::post(uri)
            .header(http::header::AUTHORIZATION, authorization)
            .header("apns-topic", self.topic.clone())
            .header("apns-push-type", push_type)
            .header("apns-priority", priority)
            .header("apns-expiration", job.expires_at.as_unix_seconds().max(0).to_string())
            .header("apns-collapse-id", collapse_id)
            .body(Full::new(Bytes::from(body)))
            .map_err(|e| e.to_string())
    }
}

#[async_trait]
impl PushSender for ApnsSender {
    fn platform(&self) -> Platform {
        Platform::Apns
    }

    fn max_in_flight(&self) -> Option<usize> {
        Some(self.max_in_flight)
    }

    async fn send(&self, job: &PushJob) -> SendOutcome {
        // The token is a path segment: anything but hex could change the path, and is
        // no APNs token anyway (the API refuses such tokens for APNs devices).
        if job.push_token.is_empty() || !job.push_token.bytes().all(|b| b.is_ascii_hexdigit()) {
            return SendOutcome::Unregistered { reason: "BadDeviceToken".into() };
        }
        let token = self.client.tokens.current(unix_now());
        let request = match self.request(job, token.authorization.clone()) {
            Ok(request) => request,
            Err(error) => {
                tracing::error!(%error, "cannot build an APNs request");
                return SendOutcome::Failed { reason: "invalid request".into() };
            }
        };
        let response = match self.client.pool.send(request).await {
            Ok(response) => response,
            Err(error) => {
                tracing::debug!(%error, "apns request failed");
                return SendOutcome::Retry { reason: error.reason().into(), after: None };
            }
        };
        match classify(&response) {
            SendOutcome::Failed { reason } if reason == "ExpiredProviderToken" => {
                // The dispatcher sends again at once (one more attempt), with a new token.
                tracing::info!("apns provider token expired: renewing it");
                self.client.tokens.expire(&token);
                SendOutcome::TokenRefused { reason }
            }
            outcome => {
                if let SendOutcome::Failed { reason } = &outcome {
                    tracing::warn!(status = response.status.as_u16(), %reason, token = %redact_token(&job.push_token), "apns refused a push");
                }
                outcome
            }
        }
    }
}

/// API.md's mapping of APNs answers (public for the `push_responses` fuzz target).
#[doc(hidden)]
pub fn classify(response: &Response) -> SendOutcome {
    let status = response.status;
    if status.is_success() {
        return SendOutcome::Sent;
    }
    let reason = serde_json::from_slice::<ApnsError>(&response.body)
        .ok()
        .and_then(|e| provider_reason(&e.reason))
        .unwrap_or_else(|| format!("HTTP {}", status.as_u16()));
    match status {
        StatusCode::GONE => SendOutcome::Unregistered { reason },
        StatusCode::BAD_REQUEST if reason == "BadDeviceToken" || reason == "DeviceTokenNotForTopic" => {
            SendOutcome::Unregistered { reason }
        }
        StatusCode::TOO_MANY_REQUESTS => SendOutcome::Retry { reason, after: response.retry_after() },
        status if status.is_server_error() => SendOutcome::Retry { reason, after: response.retry_after() },
        _ => SendOutcome::Failed { reason },
    }
}

#[derive(serde::Deserialize)]
struct ApnsError {
    #[serde(default)]
    reason: String,
}

#[derive(Serialize)]
struct ChallengePayload<'a> {
    aps: ChallengeAps,
    challenge_id: &'a str,
    expires_at: i64,
}

#[derive(Serialize)]
struct ChallengeAps {
    alert: Alert,
    sound: &'static str,
    category: &'static str,
    #[serde(rename = "interruption-level")]
    interruption_level: &'static str,
}

#[derive(Serialize)]
struct Alert {
    title: &'static str,
    body: &'static str,
}

impl<'a> ChallengePayload<'a> {
    fn new(challenge_id: &'a str, expires_at: Millis) -> Self {
        Self {
            aps: ChallengeAps {
                alert: Alert { title: ALERT_TITLE, body: ALERT_BODY },
                sound: "default",
                category: CATEGORY,
                interruption_level: "time-sensitive",
            },
            challenge_id,
            expires_at: expires_at.as_unix_seconds(),
        }
    }
}

#[derive(Serialize)]
struct ClearPayload<'a> {
    aps: ClearAps,
    challenge_id: &'a str,
    state: &'static str,
}

#[derive(Serialize)]
struct ClearAps {
    #[serde(rename = "content-available")]
    content_available: u8,
}

impl<'a> ClearPayload<'a> {
    fn new(challenge_id: &'a str, state: &'static str) -> Self {
        Self { aps: ClearAps { content_available: 1 }, challenge_id, state }
    }
}

/// A new-device notice: the fixed alert, and for the app, `kind` (a challenge has no
/// such field), the device pushed to (`device_id`: an app holding several accounts
/// learns which one, as the notice has no server record to look up), the new
/// device's id, `method` ("push" or "totp") and when it enrolled (Unix s).
#[derive(Serialize)]
struct NoticePayload<'a> {
    aps: NoticeAps,
    kind: &'static str,
    device_id: &'a str,
    new_device_id: &'a str,
    method: &'static str,
    enrolled_at: i64,
}

#[derive(Serialize)]
struct NoticeAps {
    alert: Alert,
    sound: &'static str,
    category: &'static str,
}

impl<'a> NoticePayload<'a> {
    fn new(device_id: &'a str, new_device_id: &'a str, method: EnrollmentKind, enrolled_at: Millis) -> Self {
        Self {
            aps: NoticeAps {
                alert: Alert { title: NOTICE_TITLE, body: NOTICE_BODY },
                sound: "default",
                category: NOTICE_CATEGORY,
            },
            kind: NOTICE_KIND,
            device_id,
            new_device_id,
            method: method_name(method),
            enrolled_at: enrolled_at.as_unix_seconds(),
        }
    }
}

fn unix_now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

/// The ES256 provider token, shared by every push and renewed as Apple asks.
pub struct ProviderTokens {
    key_id: String,
    team_id: String,
    key: SigningKey,
    current: RwLock<Option<TokenState>>,
}

#[derive(Clone)]
struct TokenState {
    token: Arc<IssuedToken>,
    /// False once APNs said the token expired.
    usable: bool,
}

/// One signed token, ready to send.
pub struct IssuedToken {
    pub iat: u64,
    /// `bearer <JWT>`. Not marked sensitive: HPACK then indexes it, so each push on a
    /// connection sends a table index instead of the whole token again. HPACK matches
    /// whole values only, so indexing gives no byte-by-byte oracle on a 256-bit
    /// signature; the value only travels, over TLS, to the provider that checks it.
    pub authorization: HeaderValue,
}

#[derive(Debug, thiserror::Error)]
pub enum ProviderKeyError {
    #[error("not a PKCS#8 PEM P-256 private key (an AuthKey_*.p8 file): {0}")]
    Key(String),
    #[error("{0} must be printable ASCII")]
    Field(&'static str),
}

impl ProviderTokens {
    /// `pem` is the `.p8` file Apple gives out: PKCS#8, PEM, P-256.
    pub fn from_pkcs8_pem(key_id: &str, team_id: &str, pem: &str) -> Result<Self, ProviderKeyError> {
        let key = SigningKey::from_pkcs8_pem(pem).map_err(|e| ProviderKeyError::Key(e.to_string()))?;
        let printable = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_graphic());
        if !printable(key_id) {
            return Err(ProviderKeyError::Field("key_id"));
        }
        if !printable(team_id) {
            return Err(ProviderKeyError::Field("team_id"));
        }
        Ok(Self { key_id: key_id.to_owned(), team_id: team_id.to_owned(), key, current: RwLock::new(None) })
    }

    /// The token to send at `now` (Unix seconds): the cached one while it is young
    /// and usable, else a new one.
    pub fn current(&self, now: u64) -> Arc<IssuedToken> {
        let fresh = |state: &TokenState| state.usable && now.saturating_sub(state.token.iat) < TOKEN_RENEW_AFTER.as_secs();
        if let Some(state) = self.current.read().as_ref().filter(|s| fresh(s)) {
            return Arc::clone(&state.token);
        }
        let mut current = self.current.write();
        if let Some(state) = current.as_ref().filter(|s| fresh(s)) {
            return Arc::clone(&state.token);
        }
        // A renewed token is always later than the one it replaces, so it differs
        // from it even within the same second (ES256 here signs deterministically).
        let iat = current.as_ref().map_or(now, |state| now.max(state.token.iat + 1));
        let token = Arc::new(self.sign(iat));
        metrics::counter!(names::PUSH_TOKEN_RENEWALS, "provider" => "apns").increment(1);
        *current = Some(TokenState { token: Arc::clone(&token), usable: true });
        token
    }

    /// APNs refused `used` as expired: the next push signs a new token, unless
    /// another push renewed it already.
    pub fn expire(&self, used: &Arc<IssuedToken>) {
        let mut current = self.current.write();
        if let Some(state) = current.as_mut().filter(|s| Arc::ptr_eq(&s.token, used)) {
            state.usable = false;
        }
    }

    fn sign(&self, iat: u64) -> IssuedToken {
        let header = serde_json::json!({ "alg": "ES256", "kid": self.key_id });
        let claims = serde_json::json!({ "iss": self.team_id, "iat": iat });
        let jwt = es256_jwt(&self.key, &header, &claims);
        // Base64url and dots only: always a valid header value.
        let authorization =
            HeaderValue::from_str(&format!("bearer {jwt}")).unwrap_or_else(|_| HeaderValue::from_static("bearer invalid"));
        IssuedToken { iat, authorization }
    }
}

/// A compact JWT signed with ES256 (base64url header and claims, raw r||s
/// signature): the APNs provider token and the VAPID token (`webpush::vapid`).
pub(crate) fn es256_jwt(key: &SigningKey, header: &serde_json::Value, claims: &serde_json::Value) -> String {
    let mut jwt = format!(
        "{}.{}",
        data_encoding::BASE64URL_NOPAD.encode(header.to_string().as_bytes()),
        data_encoding::BASE64URL_NOPAD.encode(claims.to_string().as_bytes())
    );
    let signature: p256::ecdsa::Signature = key.sign(jwt.as_bytes());
    jwt.push('.');
    jwt.push_str(&data_encoding::BASE64URL_NOPAD.encode(&signature.to_bytes()));
    jwt
}

#[cfg(test)]
mod tests {
    use p256::ecdsa::VerifyingKey;
    use p256::ecdsa::signature::Verifier as _;
    use p256::pkcs8::{EncodePrivateKey as _, LineEnding};

    use super::*;
    use crate::domain::challenge::ChallengeState;
    use crate::domain::ids::{ChallengeId, DeviceId};
    use crate::domain::time::Millis;

    fn tokens() -> (ProviderTokens, VerifyingKey) {
        let key = SigningKey::random(&mut p256::elliptic_curve::rand_core::OsRng);
        let pem = key.to_pkcs8_pem(LineEnding::LF).expect("pem");
        (ProviderTokens::from_pkcs8_pem("KEY1234567", "ABCDE12345", &pem).expect("key"), *key.verifying_key())
    }

    fn decode_part(part: &str) -> serde_json::Value {
        serde_json::from_slice(&data_encoding::BASE64URL_NOPAD.decode(part.as_bytes()).expect("base64url")).expect("json")
    }

    #[test]
    fn the_token_is_es256_with_kid_iss_and_iat() {
        let (tokens, verifying) = tokens();
        let token = tokens.current(1_700_000_000);
        let value = token.authorization.to_str().expect("ascii");
        let jwt = value.strip_prefix("bearer ").expect("bearer");
        let parts: Vec<&str> = jwt.split('.').collect();
        assert_eq!(decode_part(parts[0]), serde_json::json!({"alg": "ES256", "kid": "KEY1234567"}));
        assert_eq!(decode_part(parts[1]), serde_json::json!({"iss": "ABCDE12345", "iat": 1_700_000_000}));
        let signature =
            p256::ecdsa::Signature::from_slice(&data_encoding::BASE64URL_NOPAD.decode(parts[2].as_bytes()).expect("b64"))
                .expect("r||s");
        verifying.verify(format!("{}.{}", parts[0], parts[1]).as_bytes(), &signature).expect("valid signature");
    }

    #[test]
    fn the_token_is_reused_then_renewed_before_fifty_minutes() {
        let (tokens, _) = tokens();
        let first = tokens.current(1_000);
        assert!(Arc::ptr_eq(&first, &tokens.current(1_000 + 44 * 60)));
        let renewed = tokens.current(1_000 + 45 * 60);
        assert!(!Arc::ptr_eq(&first, &renewed));
        assert_eq!(renewed.iat, 1_000 + 45 * 60);
    }

    #[test]
    fn an_expired_token_is_replaced_once_by_a_later_one() {
        let (tokens, _) = tokens();
        let first = tokens.current(5_000);
        tokens.expire(&first);
        let second = tokens.current(5_000);
        assert_eq!(second.iat, 5_001, "a new token differs even within the same second");
        assert_ne!(first.authorization, second.authorization);
        // A late report about the old token does not throw the new one away.
        tokens.expire(&first);
        assert!(Arc::ptr_eq(&second, &tokens.current(5_001)));
    }

    #[test]
    fn a_key_that_is_not_p256_pkcs8_is_refused() {
        assert!(
            ProviderTokens::from_pkcs8_pem("K", "T", "-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n").is_err()
        );
    }

    fn response(status: u16, body: &str) -> Response {
        Response {
            status: StatusCode::from_u16(status).expect("status"),
            headers: http::HeaderMap::new(),
            body: Bytes::from(body.to_owned()),
        }
    }

    #[test]
    fn answers_map_as_api_md_says() {
        assert_eq!(classify(&response(200, "")), SendOutcome::Sent);
        assert_eq!(
            classify(&response(410, r#"{"reason":"Unregistered","timestamp":1}"#)),
            SendOutcome::Unregistered { reason: "Unregistered".into() }
        );
        assert_eq!(
            classify(&response(400, r#"{"reason":"BadDeviceToken"}"#)),
            SendOutcome::Unregistered { reason: "BadDeviceToken".into() }
        );
        assert_eq!(
            classify(&response(400, r#"{"reason":"DeviceTokenNotForTopic"}"#)),
            SendOutcome::Unregistered { reason: "DeviceTokenNotForTopic".into() }
        );
        assert_eq!(classify(&response(400, r#"{"reason":"BadTopic"}"#)), SendOutcome::Failed { reason: "BadTopic".into() });
        assert_eq!(
            classify(&response(503, r#"{"reason":"ServiceUnavailable"}"#)),
            SendOutcome::Retry { reason: "ServiceUnavailable".into(), after: None }
        );
        assert_eq!(classify(&response(500, "<html>")), SendOutcome::Retry { reason: "HTTP 500".into(), after: None });
        assert_eq!(
            classify(&response(403, r#"{"reason":"ExpiredProviderToken"}"#)),
            SendOutcome::Failed { reason: "ExpiredProviderToken".into() }
        );
        // Provider text that is not a plain reason word never reaches a delivery.
        assert_eq!(
            classify(&response(400, r#"{"reason":"<script>alert(1)</script>"}"#)),
            SendOutcome::Failed { reason: "HTTP 400".into() }
        );
    }

    #[test]
    fn payloads_carry_the_id_and_expiry_never_a_number() {
        let challenge_id = ChallengeId::generate().expect("id");
        let body = serde_json::to_value(ChallengePayload::new(challenge_id.as_str(), Millis(1_700_000_060_000))).expect("json");
        assert_eq!(
            body,
            serde_json::json!({
                "aps": {"alert": {"title": ALERT_TITLE, "body": ALERT_BODY}, "sound": "default",
                        "category": "PUSHMATCH_CHALLENGE", "interruption-level": "time-sensitive"},
                "challenge_id": challenge_id.as_str(),
                "expires_at": 1_700_000_060,
            })
        );
        let clear =
            serde_json::to_value(ClearPayload::new(challenge_id.as_str(), ChallengeState::Approved.name())).expect("json");
        assert_eq!(
            clear,
            serde_json::json!({"aps": {"content-available": 1}, "challenge_id": challenge_id.as_str(), "state": "APPROVED"})
        );
    }

    #[test]
    fn a_totp_notice_names_its_method_and_no_challenge() {
        let (device_id, new_device_id) = (DeviceId::generate().expect("id"), DeviceId::generate().expect("id"));
        let notice =
            NoticePayload::new(device_id.as_str(), new_device_id.as_str(), EnrollmentKind::Totp, Millis(1_700_000_000_999));
        assert_eq!(
            serde_json::to_value(notice).expect("json"),
            serde_json::json!({
                "aps": {"alert": {"title": NOTICE_TITLE, "body": NOTICE_BODY}, "sound": "default",
                        "category": "PUSHMATCH_NEW_DEVICE"},
                "kind": "new_device",
                "device_id": device_id.as_str(),
                "new_device_id": new_device_id.as_str(),
                "method": "totp",
                "enrolled_at": 1_700_000_000,
            })
        );
    }
}
