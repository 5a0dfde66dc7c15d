//! VAPID (RFC 8292): how pushmatch identifies itself to a push service. Each
//! request carries `Authorization: vapid t=<JWT>, k=<public key>`; the JWT is ES256,
//! signed with the key of `push.webpush.vapid_private_key_path`, with `aud` the
//! push service's origin, `exp` at most 24 hours ahead and `sub` the operator's
//! contact (`push.webpush.subject`). A browser ties its subscription to the public
//! key (the `applicationServerKey` the page subscribed with), so a push service
//! refuses another sender's pushes to it.
//!
//! Written here rather than taken from a crate: it is one JWT of three claims over
//! the P-256 key the APNs provider token already signs with (`p256`), and the
//! crates that do it bring a second JWT and crypto stack.

use std::collections::HashMap;

use http::HeaderValue;
use p256::ecdsa::SigningKey;
use p256::elliptic_curve::sec1::ToEncodedPoint as _;
use p256::pkcs8::DecodePrivateKey as _;
use parking_lot::Mutex;

/// How long a token is valid (RFC 8292 allows at most 24 hours).
const TOKEN_LIFETIME_SECONDS: u64 = 12 * 60 * 60;
/// A cached token is renewed when less than this is left of it.
const RENEW_BEFORE_SECONDS: u64 = 60 * 60;
/// Origins whose token is cached at most: the endpoints come from devices, so
/// their number is not ours to bound; past it the cache starts afresh.
const MAX_CACHED_ORIGINS: usize = 1_000;

/// The VAPID key and the tokens made with it, one per push service origin.
pub struct VapidKeys {
    key: SigningKey,
    /// `k=`: the public key, uncompressed, base64url.
    public_key: String,
    subject: String,
    tokens: Mutex<HashMap<String, (u64, HeaderValue)>>,
}

impl VapidKeys {
    /// From a PKCS#8 PEM P-256 key (`openssl genpkey -algorithm EC -pkeyopt
    /// ec_paramgen_curve:P-256`) and the contact, a `mailto:` or `https:` URI.
    pub fn from_pkcs8_pem(pem: &str, subject: &str) -> Result<Self, String> {
        let key = SigningKey::from_pkcs8_pem(pem).map_err(|e| format!("not a PKCS#8 P-256 private key: {e}"))?;
        let public_key =
            data_encoding::BASE64URL_NOPAD.encode(key.verifying_key().as_affine().to_encoded_point(false).as_bytes());
        Ok(Self { key, public_key, subject: subject.to_owned(), tokens: Mutex::new(HashMap::new()) })
    }

    /// The public key as browsers want it for `applicationServerKey` (base64url).
    pub fn public_key(&self) -> &str {
        &self.public_key
    }

    /// The `Authorization` header for a push to `origin` at `now` (Unix seconds).
    pub fn authorization(&self, origin: &str, now: u64) -> HeaderValue {
        let mut tokens = self.tokens.lock();
        if let Some((expires, header)) = tokens.get(origin)
            && now + RENEW_BEFORE_SECONDS < *expires
        {
            return header.clone();
        }
        if tokens.len() >= MAX_CACHED_ORIGINS {
            tokens.clear();
        }
        let expires = now + TOKEN_LIFETIME_SECONDS;
        let header = self.sign(origin, expires);
        tokens.insert(origin.to_owned(), (expires, header.clone()));
        header
    }

    fn sign(&self, origin: &str, expires: u64) -> HeaderValue {
        let header = serde_json::json!({ "typ": "JWT", "alg": "ES256" });
        let claims = serde_json::json!({ "aud": origin, "exp": expires, "sub": self.subject });
        let jwt = crate::push::apns::es256_jwt(&self.key, &header, &claims);
        // Base64url, dots, commas and spaces: always a valid header value.
        HeaderValue::from_str(&format!("vapid t={jwt}, k={}", self.public_key))
            .unwrap_or_else(|_| HeaderValue::from_static("vapid invalid"))
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use p256::ecdsa::VerifyingKey;
    use p256::ecdsa::signature::Verifier as _;
    use p256::pkcs8::{EncodePrivateKey as _, LineEnding};

    use super::*;

    #[test]
    fn the_token_is_an_es256_jwt_for_the_origin_and_is_reused() {
        let key = SigningKey::random(&mut p256::elliptic_curve::rand_core::OsRng);
        let pem = key.to_pkcs8_pem(LineEnding::LF).expect("pem");
        let keys = VapidKeys::from_pkcs8_pem(&pem, "mailto:ops@example.com").expect("key");
        let header = keys.authorization("https://push.example.net", 1_700_000_000);
        let value = header.to_str().expect("ascii");
        let (token, k) = value.strip_prefix("vapid t=").and_then(|rest| rest.split_once(", k=")).expect("vapid t=…, k=…");
        assert_eq!(k, keys.public_key());
        let public = data_encoding::BASE64URL_NOPAD.decode(k.as_bytes()).expect("base64url");
        let verifying = VerifyingKey::from_sec1_bytes(&public).expect("point");
        assert_eq!(verifying, *key.verifying_key());
        let (signed, signature) = token.rsplit_once('.').expect("three parts");
        let signature = p256::ecdsa::Signature::from_slice(&data_encoding::BASE64URL_NOPAD.decode(signature.as_bytes()).unwrap())
            .expect("signature");
        verifying.verify(signed.as_bytes(), &signature).expect("verifies");
        let claims = signed.split('.').nth(1).unwrap();
        let claims: serde_json::Value =
            serde_json::from_slice(&data_encoding::BASE64URL_NOPAD.decode(claims.as_bytes()).unwrap()).unwrap();
        assert_eq!(
            claims,
            serde_json::json!({"aud": "https://push.example.net", "exp": 1_700_000_000 + 12 * 3600, "sub": "mailto:ops@example.com"})
        );
        assert_eq!(keys.authorization("https://push.example.net", 1_700_000_000 + 3600), header, "cached");
        assert_ne!(keys.authorization("https://push.example.net", 1_700_000_000 + 11 * 3600 + 1), header, "renewed");
        assert_ne!(keys.authorization("https://other.example.net", 1_700_000_000), header, "per origin");
    }
}
