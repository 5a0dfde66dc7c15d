//! A Web Push subscription as a device hands it over: the `push_token` of a
//! `PLATFORM_WEBPUSH` device is the JSON that `PushSubscription.toJSON()` gives in a
//! browser (UnifiedPush connectors hand over the same three values):
//!
//! ```json
//! {"endpoint":"https://push.example.net/wpush/v2/gAAAA…","keys":{"p256dh":"BOr…","auth":"Xx…"}}
//! ```
//!
//! [`Subscription::parse`] checks it and its endpoint's form (`guard`); it is kept
//! in the store in the compact form [`Subscription::to_token`] writes, so a device
//! that sends the same subscription twice stores the same token.

use http::Uri;
use serde::{Deserialize, Serialize};

use super::guard::{self, EndpointPolicy};

/// The longest endpoint URL taken (push services' are a few hundred bytes).
pub const MAX_ENDPOINT_BYTES: usize = 2048;

/// A subscription that failed a check: the field (`push_token.endpoint`, ...) and why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {reason}")]
pub struct SubscriptionError {
    pub field: &'static str,
    pub reason: String,
}

impl SubscriptionError {
    pub(super) fn new(field: &'static str, reason: impl Into<String>) -> Self {
        Self { field, reason: reason.into() }
    }
}

/// The subscription, checked. Its `Debug` shows the host only: the endpoint's path
/// and the auth secret are the subscription's secrets.
#[derive(Clone, PartialEq, Eq)]
pub struct Subscription {
    /// The push resource: where the encrypted message is POSTed.
    pub endpoint: Uri,
    /// The client's P-256 public key, uncompressed (65 bytes, `0x04 || X || Y`).
    pub p256dh: p256::PublicKey,
    /// The client's authentication secret (RFC 8291 section 3.2).
    pub auth: [u8; 16],
}

#[derive(Deserialize)]
struct Raw {
    endpoint: Option<String>,
    keys: Option<RawKeys>,
}

#[derive(Deserialize)]
struct RawKeys {
    p256dh: Option<String>,
    auth: Option<String>,
}

#[derive(Serialize)]
struct Stored<'a> {
    endpoint: &'a str,
    keys: StoredKeys,
}

#[derive(Serialize)]
struct StoredKeys {
    p256dh: String,
    auth: String,
}

/// Browsers write the keys base64url without padding; some libraries pad, or use
/// the standard alphabet. All of them are taken.
fn base64(value: &str) -> Option<Vec<u8>> {
    let trimmed = value.trim_end_matches('=');
    data_encoding::BASE64URL_NOPAD
        .decode(trimmed.as_bytes())
        .or_else(|_| data_encoding::BASE64_NOPAD.decode(trimmed.as_bytes()))
        .ok()
}

impl std::fmt::Debug for Subscription {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Subscription").field("host", &self.host()).finish_non_exhaustive()
    }
}

impl Subscription {
    /// Parses and checks a subscription: JSON of the shape above, an `https` endpoint
    /// that `policy` allows by its form (`guard::check_form`: no private, loopback
    /// or link-local address, no `localhost`, an allowed host), a P-256 key and a
    /// 16-byte secret. Where the endpoint's name resolves to is checked apart
    /// (`guard::resolve`), at enrollment and at each send.
    pub fn parse(raw: &str, policy: &EndpointPolicy) -> Result<Self, SubscriptionError> {
        let parsed: Raw = serde_json::from_str(raw).map_err(|_| {
            SubscriptionError::new(
                "push_token",
                "a Web Push subscription is JSON: {\"endpoint\":…,\"keys\":{\"p256dh\":…,\"auth\":…}}",
            )
        })?;
        let endpoint = parsed.endpoint.ok_or_else(|| SubscriptionError::new("push_token.endpoint", "is required"))?;
        if endpoint.len() > MAX_ENDPOINT_BYTES {
            return Err(SubscriptionError::new("push_token.endpoint", format!("is longer than {MAX_ENDPOINT_BYTES} bytes")));
        }
        let endpoint: Uri = endpoint.parse().map_err(|_| SubscriptionError::new("push_token.endpoint", "is not a valid URL"))?;
        guard::check_form(&endpoint, policy).map_err(|reason| SubscriptionError::new("push_token.endpoint", reason))?;
        let keys = parsed.keys.ok_or_else(|| SubscriptionError::new("push_token.keys", "is required"))?;
        let p256dh = keys.p256dh.ok_or_else(|| SubscriptionError::new("push_token.keys.p256dh", "is required"))?;
        let p256dh = base64(&p256dh)
            .filter(|bytes| bytes.len() == 65 && bytes[0] == 4)
            .and_then(|bytes| p256::PublicKey::from_sec1_bytes(&bytes).ok())
            .ok_or_else(|| {
                SubscriptionError::new("push_token.keys.p256dh", "must be an uncompressed P-256 point (65 bytes), base64url")
            })?;
        let auth = keys.auth.ok_or_else(|| SubscriptionError::new("push_token.keys.auth", "is required"))?;
        let auth = base64(&auth)
            .and_then(|bytes| <[u8; 16]>::try_from(bytes.as_slice()).ok())
            .ok_or_else(|| SubscriptionError::new("push_token.keys.auth", "must be 16 bytes, base64url"))?;
        Ok(Self { endpoint, p256dh, auth })
    }

    /// The compact JSON kept as the device's push token.
    pub fn to_token(&self) -> String {
        use p256::elliptic_curve::sec1::ToEncodedPoint as _;
        let endpoint = self.endpoint.to_string();
        let stored = Stored {
            endpoint: &endpoint,
            keys: StoredKeys {
                p256dh: data_encoding::BASE64URL_NOPAD.encode(self.p256dh.to_encoded_point(false).as_bytes()),
                auth: data_encoding::BASE64URL_NOPAD.encode(&self.auth),
            },
        };
        // Strings and a fixed shape: serialising cannot fail.
        serde_json::to_string(&stored).unwrap_or_default()
    }

    /// `scheme://host[:port]` of the endpoint, the host in lower case: the VAPID
    /// token's audience.
    pub fn origin(&self) -> String {
        let host = self.endpoint.host().unwrap_or_default().to_ascii_lowercase();
        match self.endpoint.port_u16() {
            Some(port) if port != 443 => format!("https://{host}:{port}"),
            _ => format!("https://{host}"),
        }
    }

    /// The endpoint's host, for logs (the path is the subscription's secret).
    pub fn host(&self) -> &str {
        self.endpoint.host().unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use p256::elliptic_curve::sec1::ToEncodedPoint as _;

    use super::*;

    fn keys() -> (String, String) {
        let secret = p256::SecretKey::random(&mut p256::elliptic_curve::rand_core::OsRng);
        let public = data_encoding::BASE64URL_NOPAD.encode(secret.public_key().to_encoded_point(false).as_bytes());
        (public, data_encoding::BASE64URL_NOPAD.encode(&[7u8; 16]))
    }

    fn subscription(endpoint: &str) -> String {
        let (p256dh, auth) = keys();
        serde_json::json!({"endpoint": endpoint, "expirationTime": null, "keys": {"p256dh": p256dh, "auth": auth}}).to_string()
    }

    fn field_of(raw: &str) -> &'static str {
        Subscription::parse(raw, &EndpointPolicy::default()).expect_err("refused").field
    }

    #[test]
    fn a_browsers_subscription_parses_and_is_stored_compactly() {
        let raw = subscription("https://fcm.googleapis.com/fcm/send/abc:def");
        let parsed = Subscription::parse(&raw, &EndpointPolicy::default()).expect("parses");
        assert_eq!(parsed.origin(), "https://fcm.googleapis.com");
        assert_eq!(parsed.host(), "fcm.googleapis.com");
        let token = parsed.to_token();
        assert!(!token.contains("expirationTime") && !token.contains(' '), "{token}");
        assert_eq!(Subscription::parse(&token, &EndpointPolicy::default()).expect("again"), parsed);
        let shown = format!("{parsed:?}");
        assert!(shown.contains("fcm.googleapis.com") && !shown.contains("abc:def") && !shown.contains("auth"), "{shown}");
        let upper = Subscription::parse(&subscription("https://Push.Example.NET:8443/x"), &EndpointPolicy::default()).unwrap();
        assert_eq!(upper.origin(), "https://push.example.net:8443", "the audience is the origin, in lower case");
    }

    #[test]
    fn each_bad_part_names_its_field() {
        assert_eq!(field_of("not json"), "push_token");
        assert_eq!(field_of(r#"{"keys":{}}"#), "push_token.endpoint");
        assert_eq!(field_of(&subscription("http://push.example.net/x")), "push_token.endpoint");
        assert_eq!(field_of(&subscription("https://10.0.0.1/x")), "push_token.endpoint");
        assert_eq!(field_of(r#"{"endpoint":"https://push.example.net/x"}"#), "push_token.keys");
        let (p256dh, _) = keys();
        let short_auth =
            serde_json::json!({"endpoint": "https://push.example.net/x", "keys": {"p256dh": p256dh, "auth": "AAAA"}});
        assert_eq!(field_of(&short_auth.to_string()), "push_token.keys.auth");
        let bad_key = serde_json::json!({"endpoint": "https://push.example.net/x", "keys": {"p256dh": "BAAA", "auth": "AAAAAAAAAAAAAAAAAAAAAA"}});
        assert_eq!(field_of(&bad_key.to_string()), "push_token.keys.p256dh");
    }
}
