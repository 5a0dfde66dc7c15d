//! Enrolled devices and the proofs that authenticate their calls.
//!
//! A device proves a call by signing its signing string (see `DeviceProof` in the
//! proto) with the key it made at enrollment. That signature, not the number, is
//! what authenticates: the number only binds the answer to the screen the user sees.

use std::time::Duration;

use p256::pkcs8::DecodePublicKey as _;
use serde::{Deserialize, Serialize};

use super::challenge::Platform;
use super::error::DomainError;
use super::ids::{DeviceId, TenantId, UserId};
use super::secrets::SealedSecret;
use super::time::Millis;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum KeyAlgorithm {
    EcdsaP256Sha256,
    Ed25519,
}

/// A device's public key, checked when it enrolled.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DevicePublicKey {
    pub algorithm: KeyAlgorithm,
    /// As the device sent it: SEC1 or SubjectPublicKeyInfo DER for P-256, 32 raw bytes for Ed25519.
    #[serde(with = "hex_bytes")]
    pub bytes: Vec<u8>,
}

enum ParsedKey {
    P256(p256::ecdsa::VerifyingKey),
    Ed25519(ed25519_dalek::VerifyingKey),
}

impl DevicePublicKey {
    /// Checks that `bytes` is a valid key of `algorithm` (a point on the curve).
    pub fn new(algorithm: KeyAlgorithm, bytes: Vec<u8>) -> Result<Self, DomainError> {
        let key = Self { algorithm, bytes };
        key.parse()?;
        Ok(key)
    }

    fn parse(&self) -> Result<ParsedKey, DomainError> {
        match self.algorithm {
            KeyAlgorithm::EcdsaP256Sha256 => {
                // Only the encodings the proto names: SEC1 compressed (33 bytes, tag 2 or 3),
                // uncompressed (65 bytes, tag 4), or SubjectPublicKeyInfo DER. The SEC1
                // parser would also take "compact" (tag 5) and hybrid points, which
                // could store a different key than the phone holds.
                let parsed = match (self.bytes.len(), self.bytes.first()) {
                    (33, Some(2 | 3)) | (65, Some(4)) => p256::ecdsa::VerifyingKey::from_sec1_bytes(&self.bytes).ok(),
                    (33 | 65, _) => None,
                    _ => p256::ecdsa::VerifyingKey::from_public_key_der(&self.bytes).ok(),
                };
                parsed.map(ParsedKey::P256).ok_or_else(|| {
                    DomainError::invalid("public_key", "is not a P-256 key (SEC1 point or SubjectPublicKeyInfo DER)")
                })
            }
            KeyAlgorithm::Ed25519 => {
                let key = <[u8; 32]>::try_from(self.bytes.as_slice())
                    .ok()
                    .and_then(|raw| ed25519_dalek::VerifyingKey::from_bytes(&raw).ok())
                    .ok_or_else(|| DomainError::invalid("public_key", "is not a 32-byte Ed25519 key"))?;
                // A small-order point (the identity, or one of the other seven of
                // order dividing 8) verifies signatures that no private key made.
                if key.is_weak() {
                    return Err(DomainError::invalid("public_key", "is a small-order (weak) Ed25519 key"));
                }
                Ok(ParsedKey::Ed25519(key))
            }
        }
    }

    /// The key's identity whatever its encoding: SHA-256 over the algorithm and the
    /// canonical bytes (an uncompressed SEC1 point for P-256, the 32 bytes for
    /// Ed25519), so one key sent compressed, uncompressed or as DER is one key.
    pub fn fingerprint(&self) -> Result<KeyFingerprint, DomainError> {
        use sha2::{Digest, Sha256};
        let (tag, canonical): (&[u8], Vec<u8>) = match self.parse()? {
            ParsedKey::P256(key) => (b"p256\n", key.to_encoded_point(false).as_bytes().to_vec()),
            ParsedKey::Ed25519(key) => (b"ed25519\n", key.to_bytes().to_vec()),
        };
        let mut hasher = Sha256::new();
        hasher.update(tag);
        hasher.update(&canonical);
        Ok(KeyFingerprint(hasher.finalize().into()))
    }

    /// Whether `signature` signs `message` under this key. P-256 takes ASN.1 DER or
    /// raw r||s, high-S signatures too (as some keystores make them). Ed25519 uses
    /// strict verification (no small-order keys, canonical S).
    ///
    /// P-256 is checked by ring (assembly; about five times faster than the pure-Rust
    /// p256 arithmetic, which took some 380 µs a check: the answer path's largest
    /// cost, see BENCHMARKS.md). p256 still parses and validates the key, in every
    /// encoding the proto allows, and hands ring the uncompressed point.
    pub fn verifies(&self, message: &[u8], signature: &[u8]) -> bool {
        match self.parse() {
            Ok(ParsedKey::P256(key)) => {
                let point = key.to_encoded_point(false);
                let algorithm = if signature.len() == 64 {
                    &ring::signature::ECDSA_P256_SHA256_FIXED
                } else {
                    &ring::signature::ECDSA_P256_SHA256_ASN1
                };
                ring::signature::UnparsedPublicKey::new(algorithm, point.as_bytes()).verify(message, signature).is_ok()
            }
            Ok(ParsedKey::Ed25519(key)) => match ed25519_dalek::Signature::from_slice(signature) {
                Ok(parsed) => key.verify_strict(message, &parsed).is_ok(),
                Err(_) => false,
            },
            Err(_) => false,
        }
    }
}

/// A device key's identity ([`DevicePublicKey::fingerprint`]): a key enrolls once.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct KeyFingerprint(pub [u8; 32]);

impl KeyFingerprint {
    pub fn to_hex(&self) -> String {
        hex::encode(self.0)
    }
}

/// What identifies one use of a proof: SHA-256 of the signed bytes (device, RPC,
/// timestamp and the call's fields), never of the signature, which an attacker can
/// re-encode (DER or raw, high or low S) without the key.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ProofUse(pub [u8; 32]);

impl ProofUse {
    pub fn to_hex(&self) -> String {
        hex::encode(self.0)
    }
}

/// An enrolled authenticator app (or, with no platform, a TOTP-only credential).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Device {
    pub id: DeviceId,
    pub tenant: TenantId,
    pub user_id: UserId,
    pub display_name: String,
    /// The label the user's app shows, from the enrollment.
    pub account_name: String,
    pub platform: Option<Platform>,
    /// APNs device token or FCM registration token; empty when the app has none.
    pub push_token: String,
    /// False once the provider reported the token dead, until a new token arrives.
    pub push_enabled: bool,
    pub public_key: Option<DevicePublicKey>,
    /// The TOTP secret, sealed; `None` for a device without TOTP.
    #[serde(default)]
    pub totp_secret: Option<SealedSecret>,
    /// The highest TOTP step accepted so far: a code is accepted only for a later
    /// step, so no code (nor an older one) works twice.
    #[serde(default)]
    pub totp_last_step: Option<u64>,
    pub enrolled_at: Millis,
    pub last_used_at: Option<Millis>,
}

impl Device {
    /// Whether the device can answer challenges (it holds a key): such a user can be
    /// challenged even when no push reaches the phone, thanks to the pull fallback.
    pub fn answers_challenges(&self) -> bool {
        self.public_key.is_some() && self.platform.is_some()
    }

    pub fn has_totp(&self) -> bool {
        self.totp_secret.is_some()
    }

    /// Whether a push should go to this device now.
    pub fn takes_pushes(&self) -> bool {
        self.answers_challenges() && self.push_enabled && !self.push_token.is_empty()
    }
}

/// The proof that accompanies every DeviceService call but CompleteEnrollment.
#[derive(Clone, Debug)]
pub struct DeviceProof {
    pub device_id: DeviceId,
    pub timestamp_ms: i64,
    pub signature: Vec<u8>,
}

impl DeviceProof {
    /// The exact bytes the device signed: "pushmatch/v1", the RPC name, the device
    /// id, the timestamp in decimal, then the call's own fields, joined by "\n".
    pub fn signing_string(&self, rpc: &str, fields: &[&str]) -> String {
        let timestamp = self.timestamp_ms.to_string();
        let mut parts = vec!["pushmatch/v1", rpc, self.device_id.as_str(), timestamp.as_str()];
        parts.extend_from_slice(fields);
        parts.join("\n")
    }

    /// This use of the proof, for refusing its replay.
    pub fn use_key(&self, rpc: &str, fields: &[&str]) -> ProofUse {
        use sha2::{Digest, Sha256};
        ProofUse(Sha256::digest(self.signing_string(rpc, fields).as_bytes()).into())
    }

    /// Until when a replay of this proof could still pass the timestamp check: past
    /// it, the store may forget that it was used.
    pub fn replayable_until(&self, max_skew: Duration) -> Millis {
        Millis(self.timestamp_ms).plus(max_skew)
    }

    /// Checks the timestamp window and the signature against `device`'s key.
    pub fn verify(
        &self,
        device: &Device,
        rpc: &str,
        fields: &[&str],
        now: Millis,
        max_skew: Duration,
    ) -> Result<(), DomainError> {
        let skew = now.0.abs_diff(self.timestamp_ms);
        if u128::from(skew) > max_skew.as_millis() {
            return Err(DomainError::unauthenticated(format!(
                "proof.timestamp_ms: more than {} s from the server's clock",
                max_skew.as_secs()
            )));
        }
        let Some(key) = &device.public_key else {
            return Err(DomainError::unauthenticated("proof.device_id: this credential has no device key"));
        };
        if key.verifies(self.signing_string(rpc, fields).as_bytes(), &self.signature) {
            Ok(())
        } else {
            Err(DomainError::unauthenticated("proof.signature: does not verify for this device and call"))
        }
    }
}

/// Serde helper: byte strings as hex in the stores' JSON, as bytes in a compact
/// format (the embedded store's in-memory postcard records, rebuilt from the file
/// at each start), where hex took twice the room and a string to decode on every
/// read of a device.
mod hex_bytes {
    use serde::de::{Error, Visitor};
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(bytes: &[u8], serializer: S) -> Result<S::Ok, S::Error> {
        if serializer.is_human_readable() {
            serializer.serialize_str(&hex::encode(bytes))
        } else {
            serializer.serialize_bytes(bytes)
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Vec<u8>, D::Error> {
        if !deserializer.is_human_readable() {
            return deserializer.deserialize_byte_buf(Bytes);
        }
        let text = <std::borrow::Cow<'de, str>>::deserialize(deserializer)?;
        hex::decode(text.as_bytes()).map_err(Error::custom)
    }

    struct Bytes;

    impl Visitor<'_> for Bytes {
        type Value = Vec<u8>;

        fn expecting(&self, formatter: &mut std::fmt::Formatter) -> std::fmt::Result {
            formatter.write_str("a byte string")
        }

        fn visit_bytes<E: Error>(self, bytes: &[u8]) -> Result<Vec<u8>, E> {
            Ok(bytes.to_vec())
        }

        fn visit_byte_buf<E: Error>(self, bytes: Vec<u8>) -> Result<Vec<u8>, E> {
            Ok(bytes)
        }
    }
}

#[cfg(test)]
mod tests {
    use p256::ecdsa::signature::Signer as _;
    use p256::elliptic_curve::rand_core::OsRng;
    use p256::pkcs8::EncodePublicKey as _;

    use super::*;

    fn device_with(key: DevicePublicKey) -> Device {
        Device {
            id: DeviceId::generate().expect("id"),
            tenant: TenantId("t".into()),
            user_id: UserId::parse("u").expect("user"),
            display_name: String::new(),
            account_name: String::new(),
            platform: Some(Platform::Apns),
            push_token: "aa".into(),
            push_enabled: true,
            public_key: Some(key),
            totp_secret: None,
            totp_last_step: None,
            enrolled_at: Millis(0),
            last_used_at: None,
        }
    }

    const NOW: Millis = Millis(1_700_000_000_000);
    const SKEW: Duration = Duration::from_secs(300);

    #[test]
    fn a_key_is_hex_in_json_and_bytes_in_postcard_and_comes_back_from_both() {
        let signing = ed25519_dalek::SigningKey::generate(&mut OsRng);
        let raw = signing.verifying_key().to_bytes().to_vec();
        let device = device_with(DevicePublicKey::new(KeyAlgorithm::Ed25519, raw.clone()).expect("key"));

        let json = serde_json::to_value(&device).expect("json");
        assert_eq!(json["public_key"]["bytes"], hex::encode(&raw), "the stores' JSON keeps hex");
        assert_eq!(serde_json::from_value::<Device>(json).expect("from json"), device);

        let packed = postcard::to_stdvec(&device).expect("postcard");
        assert!(packed.windows(raw.len()).any(|w| w == raw.as_slice()), "postcard holds the raw bytes");
        assert!(!packed.windows(8).any(|w| w == &hex::encode(&raw).as_bytes()[..8]), "and not their hex");
        assert_eq!(postcard::from_bytes::<Device>(&packed).expect("from postcard"), device);
    }

    #[test]
    fn p256_keys_in_every_encoding_and_both_signature_forms_verify() {
        let signing = p256::ecdsa::SigningKey::random(&mut OsRng);
        let verifying = signing.verifying_key();
        let encodings = [
            verifying.to_encoded_point(false).as_bytes().to_vec(),
            verifying.to_encoded_point(true).as_bytes().to_vec(),
            verifying.to_public_key_der().expect("spki").as_bytes().to_vec(),
        ];
        for bytes in encodings {
            let device = device_with(DevicePublicKey::new(KeyAlgorithm::EcdsaP256Sha256, bytes).expect("valid key"));
            let mut proof = DeviceProof { device_id: device.id.clone(), timestamp_ms: NOW.0, signature: vec![] };
            let message = proof.signing_string("ListPendingChallenges", &[]);
            let signature: p256::ecdsa::Signature = signing.sign(message.as_bytes());
            for form in [signature.to_vec(), signature.to_der().as_bytes().to_vec()] {
                proof.signature = form;
                proof.verify(&device, "ListPendingChallenges", &[], NOW, SKEW).expect("verifies");
                assert!(proof.verify(&device, "UpdatePushToken", &[], NOW, SKEW).is_err(), "bound to the rpc name");
            }
        }
    }

    #[test]
    fn high_s_p256_signatures_verify_too() {
        use p256::elliptic_curve::ops::Neg as _;
        let signing = p256::ecdsa::SigningKey::random(&mut OsRng);
        let key = DevicePublicKey::new(
            KeyAlgorithm::EcdsaP256Sha256,
            signing.verifying_key().to_encoded_point(false).as_bytes().to_vec(),
        )
        .expect("key");
        let message = b"pushmatch/v1\nListPendingChallenges\ndv_x\n1";
        let low: p256::ecdsa::Signature = signing.sign(message);
        let (r, s) = low.split_scalars();
        let high = p256::ecdsa::Signature::from_scalars(r.to_bytes(), s.as_ref().neg().to_bytes()).expect("high-S form");
        assert_ne!(high, low);
        for form in [low.to_vec(), high.to_vec(), high.to_der().as_bytes().to_vec()] {
            assert!(key.verifies(message, &form));
        }
        assert!(!key.verifies(b"another message", &high.to_vec()));
    }

    #[test]
    fn ed25519_verifies_and_rejects_other_fields() {
        let signing = ed25519_dalek::SigningKey::generate(&mut OsRng);
        let key = DevicePublicKey::new(KeyAlgorithm::Ed25519, signing.verifying_key().to_bytes().to_vec()).expect("key");
        let device = device_with(key);
        let mut proof = DeviceProof { device_id: device.id.clone(), timestamp_ms: NOW.0, signature: vec![] };
        let fields = ["ch_x", "DECISION_APPROVE", "42"];
        proof.signature = ed25519_dalek::Signer::sign(&signing, proof.signing_string("RespondToChallenge", &fields).as_bytes())
            .to_bytes()
            .to_vec();
        proof.verify(&device, "RespondToChallenge", &fields, NOW, SKEW).expect("verifies");
        let tampered = ["ch_x", "DECISION_APPROVE", "43"];
        assert!(proof.verify(&device, "RespondToChallenge", &tampered, NOW, SKEW).is_err());
    }

    #[test]
    fn stale_and_future_timestamps_are_refused() {
        let signing = ed25519_dalek::SigningKey::generate(&mut OsRng);
        let device =
            device_with(DevicePublicKey::new(KeyAlgorithm::Ed25519, signing.verifying_key().to_bytes().to_vec()).expect("key"));
        for offset in [-301_000i64, 301_000] {
            let mut proof = DeviceProof { device_id: device.id.clone(), timestamp_ms: NOW.0 + offset, signature: vec![] };
            proof.signature =
                ed25519_dalek::Signer::sign(&signing, proof.signing_string("ListPendingChallenges", &[]).as_bytes())
                    .to_bytes()
                    .to_vec();
            let err = proof.verify(&device, "ListPendingChallenges", &[], NOW, SKEW).expect_err("outside the window");
            assert!(err.to_string().contains("timestamp_ms"));
        }
    }

    #[test]
    fn malformed_keys_are_refused_by_field() {
        for (algorithm, bytes) in [
            (KeyAlgorithm::EcdsaP256Sha256, vec![4u8; 65]),
            (KeyAlgorithm::EcdsaP256Sha256, vec![1, 2, 3]),
            (KeyAlgorithm::Ed25519, vec![0u8; 31]),
        ] {
            let err = DevicePublicKey::new(algorithm, bytes).expect_err("malformed");
            assert!(err.to_string().starts_with("public_key"), "{err}");
        }
    }
}
