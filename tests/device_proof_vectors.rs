//! `docs/device-proof-vectors.json`: the test vectors for app developers
//! (docs/device-proofs.md). This test is their generator and their check:
//!
//! - every vector's signing string is the one the broker builds from its `rpc`,
//!   `device_id`, `timestamp_ms` and `fields`, its public key is the one its private
//!   key gives in the stated encoding, and its signature passes the broker's own
//!   verifier (`DeviceProof::verify`, the check every DeviceService call goes through);
//! - regenerating the vectors (fixed keys, RFC 6979 deterministic P-256 nonces,
//!   Ed25519) gives the committed file byte for byte.
//!
//! After a deliberate change: `UPDATE_VECTORS=1 cargo test --test device_proof_vectors`
//! rewrites the file, then this test checks it as usual.

// Tests: a failed expectation is a failed test.
#![allow(clippy::expect_used, clippy::unwrap_used, clippy::panic)]

use std::time::Duration;

use p256::ecdsa::signature::Signer as _;
use p256::pkcs8::EncodePublicKey as _;
use pushmatch::domain::challenge::Platform;
use pushmatch::domain::device::{Device, DeviceProof, DevicePublicKey, KeyAlgorithm};
use pushmatch::domain::ids::{DeviceId, TenantId, UserId};
use pushmatch::domain::time::Millis;
use serde::{Deserialize, Serialize};

const FILE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/docs/device-proof-vectors.json");

/// The P-256 private scalar of RFC 6979 appendix A.2.5 (a published test key).
const P256_SCALAR: &str = "c9afa9d845ba75166b5c215767b1d6934e50c3db36e89b127b8a622b120f6721";
/// The Ed25519 seed of RFC 8032 section 7.1, TEST 1 (a published test key).
const ED25519_SEED: &str = "9d61b19deffd5a60ba844af492ec2cc44449c5697b326919703bac031cae7f60";
const P256_DEVICE: &str = "dv_0123456789abcdef0123456789abcdef";
const ED25519_DEVICE: &str = "dv_fedcba9876543210fedcba9876543210";
const CHALLENGE: &str = "ch_5f1c2a7e9b3d4c6a8e0f1b2c3d4e5f60";
/// 2026-01-01T00:00:00Z.
const TIMESTAMP_MS: i64 = 1_767_225_600_000;
const APNS_TOKEN: &str = "a3f9c2e1d4b5a6978812ab34cd56ef78a3f9c2e1d4b5a6978812ab34cd56ef78";
const FCM_TOKEN: &str = "fcm-registration-token:APA91bHun4MxP5egoKMwt2KZFBaFUH-1RYqx";

#[derive(Serialize, Deserialize, Debug, PartialEq)]
struct Vectors {
    vectors: Vec<Vector>,
}

#[derive(Serialize, Deserialize, Debug, PartialEq)]
struct Vector {
    name: String,
    key_algorithm: String,
    private_key_hex: String,
    /// `sec1_uncompressed`, `sec1_compressed`, `spki_der` (P-256) or `raw` (Ed25519).
    public_key_encoding: String,
    public_key_hex: String,
    rpc: String,
    device_id: String,
    timestamp_ms: i64,
    fields: Vec<String>,
    /// The signing string as text (lines joined by "\n"), for reading; the bytes are `signing_string_hex`.
    signing_string: String,
    signing_string_hex: String,
    signature_encoding: String,
    signature_hex: String,
}

#[derive(Clone, Copy)]
enum Key {
    P256 { encoding: P256Encoding, signature: P256Signature },
    Ed25519,
}

#[derive(Clone, Copy)]
enum P256Encoding {
    Uncompressed,
    Compressed,
    Spki,
}

#[derive(Clone, Copy)]
enum P256Signature {
    Raw,
    Der,
    /// Raw r||s with s replaced by n - s, the signature's other valid form (of the
    /// two, one is "high S"; keystores emit either): the broker accepts both.
    RawNegatedS,
}

fn p256_key() -> p256::ecdsa::SigningKey {
    let scalar = hex::decode(P256_SCALAR).expect("hex");
    p256::ecdsa::SigningKey::from_slice(&scalar).expect("valid scalar")
}

fn ed25519_key() -> ed25519_dalek::SigningKey {
    let seed: [u8; 32] = hex::decode(ED25519_SEED).expect("hex").try_into().expect("32 bytes");
    ed25519_dalek::SigningKey::from_bytes(&seed)
}

fn vector(name: &str, key: Key, rpc: &str, fields: &[&str]) -> Vector {
    let device_id = match key {
        Key::P256 { .. } => P256_DEVICE,
        Key::Ed25519 => ED25519_DEVICE,
    };
    let mut lines = vec!["pushmatch/v1".to_owned(), rpc.to_owned(), device_id.to_owned(), TIMESTAMP_MS.to_string()];
    lines.extend(fields.iter().map(|f| (*f).to_owned()));
    let message = lines.join("\n");
    let (key_algorithm, private_key, encoding, public_key, signature_encoding, signature) = match key {
        Key::P256 { encoding, signature } => {
            let signing = p256_key();
            let verifying = signing.verifying_key();
            let (encoding_name, public_key) = match encoding {
                P256Encoding::Uncompressed => ("sec1_uncompressed", verifying.to_encoded_point(false).as_bytes().to_vec()),
                P256Encoding::Compressed => ("sec1_compressed", verifying.to_encoded_point(true).as_bytes().to_vec()),
                P256Encoding::Spki => ("spki_der", verifying.to_public_key_der().expect("spki").as_bytes().to_vec()),
            };
            // p256's SigningKey signs with RFC 6979 deterministic nonces: the same bytes every run.
            let sig: p256::ecdsa::Signature = signing.sign(message.as_bytes());
            let (sig_name, sig_bytes) = match signature {
                P256Signature::Raw => ("raw", sig.to_vec()),
                P256Signature::Der => ("der", sig.to_der().as_bytes().to_vec()),
                P256Signature::RawNegatedS => {
                    use p256::elliptic_curve::ops::Neg as _;
                    let (r, s) = sig.split_scalars();
                    let other = p256::ecdsa::Signature::from_scalars(r.to_bytes(), s.as_ref().neg().to_bytes()).expect("n - s");
                    ("raw", other.to_vec())
                }
            };
            ("ECDSA_P256_SHA256", P256_SCALAR, encoding_name, public_key, sig_name, sig_bytes)
        }
        Key::Ed25519 => {
            let signing = ed25519_key();
            let sig = ed25519_dalek::Signer::sign(&signing, message.as_bytes());
            ("ED25519", ED25519_SEED, "raw", signing.verifying_key().to_bytes().to_vec(), "ed25519", sig.to_bytes().to_vec())
        }
    };
    Vector {
        name: name.to_owned(),
        key_algorithm: key_algorithm.to_owned(),
        private_key_hex: private_key.to_owned(),
        public_key_encoding: encoding.to_owned(),
        public_key_hex: hex::encode(public_key),
        rpc: rpc.to_owned(),
        device_id: device_id.to_owned(),
        timestamp_ms: TIMESTAMP_MS,
        fields: fields.iter().map(|f| (*f).to_owned()).collect(),
        signing_string_hex: hex::encode(message.as_bytes()),
        signing_string: message,
        signature_encoding: signature_encoding.to_owned(),
        signature_hex: hex::encode(signature),
    }
}

/// Every RPC that takes a proof (and every decision), each signed with every
/// signature form; the three P-256 key encodings rotate over them.
fn generate() -> Vectors {
    use P256Encoding::{Compressed, Spki, Uncompressed};
    use P256Signature::{Der, Raw, RawNegatedS};
    let calls: [(&str, &str, Vec<&str>); 5] = [
        ("list-pending", "ListPendingChallenges", vec![]),
        ("update-push-token-apns", "UpdatePushToken", vec![APNS_TOKEN]),
        ("respond-approve", "RespondToChallenge", vec![CHALLENGE, "DECISION_APPROVE", "42"]),
        ("respond-deny", "RespondToChallenge", vec![CHALLENGE, "DECISION_DENY", ""]),
        ("respond-report-fraud", "RespondToChallenge", vec![CHALLENGE, "DECISION_REPORT_FRAUD", ""]),
    ];
    let encodings = [Uncompressed, Compressed, Spki];
    let mut vectors = Vec::new();
    for (index, (name, rpc, fields)) in calls.iter().enumerate() {
        let raw_encoding = encodings[index % 3];
        let der_encoding = encodings[(index + 1) % 3];
        let p256_name = |encoding: P256Encoding, signature: &str| {
            let encoding = match encoding {
                Uncompressed => "sec1-uncompressed",
                Compressed => "sec1-compressed",
                Spki => "spki",
            };
            format!("p256-{encoding}-{signature}-{name}")
        };
        vectors.push(vector(&p256_name(raw_encoding, "raw"), Key::P256 { encoding: raw_encoding, signature: Raw }, rpc, fields));
        vectors.push(vector(&p256_name(der_encoding, "der"), Key::P256 { encoding: der_encoding, signature: Der }, rpc, fields));
        vectors.push(vector(&format!("ed25519-{name}"), Key::Ed25519, rpc, fields));
    }
    vectors.push(vector("ed25519-update-push-token-fcm", Key::Ed25519, "UpdatePushToken", &[FCM_TOKEN]));
    vectors.push(vector(
        "p256-sec1-uncompressed-raw-negated-s-respond-approve",
        Key::P256 { encoding: Uncompressed, signature: RawNegatedS },
        "RespondToChallenge",
        &[CHALLENGE, "DECISION_APPROVE", "42"],
    ));
    Vectors { vectors }
}

/// The generator's P-256 signer is RFC 6979's: with the RFC's own key it signs
/// "sample" as appendix A.2.5 prints (SHA-256), so the vectors' nonces are the
/// standard deterministic ones any RFC 6979 implementation reproduces.
#[test]
fn the_p256_signer_is_rfc6979_deterministic() {
    let signature: p256::ecdsa::Signature = p256_key().sign(b"sample");
    assert_eq!(
        hex::encode(signature.to_vec()),
        "efd48b2aacb6a8fd1140dd9cd45e81d69d2c877b56aaf991c34d0ea84eaf3716\
         f7cb1c942d657c41d436c7a1b6e29f65f3e900dbb9aff4064dc4ab2f843acda8"
    );
}

fn render(vectors: &Vectors) -> String {
    let mut text = serde_json::to_string_pretty(vectors).expect("json");
    text.push('\n');
    text
}

/// The committed file; with UPDATE_VECTORS=1 rewritten first (once, before any
/// test of this binary reads it).
fn file_text() -> String {
    static UPDATED: std::sync::OnceLock<()> = std::sync::OnceLock::new();
    UPDATED.get_or_init(|| {
        if std::env::var_os("UPDATE_VECTORS").is_some_and(|v| v == "1") {
            std::fs::write(FILE, render(&generate())).expect("write the vectors file");
        }
    });
    std::fs::read_to_string(FILE).expect("docs/device-proof-vectors.json is readable")
}

fn committed() -> Vectors {
    serde_json::from_str(&file_text()).expect("the vectors file is JSON in the documented shape")
}

#[test]
fn regenerating_the_vectors_gives_the_committed_file_byte_for_byte() {
    let generated = render(&generate());
    let text = file_text();
    assert!(
        text == generated,
        "docs/device-proof-vectors.json differs from what the generator makes; if the change is deliberate, \
         rerun with UPDATE_VECTORS=1"
    );
}

fn algorithm(name: &str) -> KeyAlgorithm {
    match name {
        "ECDSA_P256_SHA256" => KeyAlgorithm::EcdsaP256Sha256,
        "ED25519" => KeyAlgorithm::Ed25519,
        other => panic!("unknown key_algorithm {other:?}"),
    }
}

fn device(id: &DeviceId, key: DevicePublicKey) -> Device {
    Device {
        id: id.clone(),
        tenant: TenantId("t".into()),
        user_id: UserId::parse("jan").expect("user"),
        display_name: String::new(),
        account_name: String::new(),
        platform: Some(Platform::Fcm),
        push_token: String::new(),
        push_enabled: true,
        public_key: Some(key),
        totp_secret: None,
        totp_last_step: None,
        enrolled_at: Millis(0),
        last_used_at: None,
    }
}

/// Checks the committed file itself (not the generator's output), as an app
/// developer will use it.
#[test]
fn every_committed_vector_passes_the_brokers_verifier() {
    let file = committed();
    let mut covered = std::collections::BTreeSet::new();
    for v in &file.vectors {
        let fields: Vec<&str> = v.fields.iter().map(String::as_str).collect();
        let id = DeviceId::parse(&v.device_id).expect("device_id is a device id");
        let signature = hex::decode(&v.signature_hex).expect("signature hex");
        let proof = DeviceProof { device_id: id.clone(), timestamp_ms: v.timestamp_ms, signature: signature.clone() };
        let signing_string = proof.signing_string(&v.rpc, &fields);
        assert_eq!(hex::encode(signing_string.as_bytes()), v.signing_string_hex, "{}: signing string", v.name);
        assert_eq!(signing_string, v.signing_string, "{}: readable signing string", v.name);

        // The public key is the one the private key makes, in the stated encoding.
        let private = hex::decode(&v.private_key_hex).expect("private key hex");
        let expected_public = match (v.key_algorithm.as_str(), v.public_key_encoding.as_str()) {
            ("ECDSA_P256_SHA256", encoding) => {
                let key = p256::ecdsa::SigningKey::from_slice(&private).expect("scalar");
                let point = key.verifying_key();
                match encoding {
                    "sec1_uncompressed" => point.to_encoded_point(false).as_bytes().to_vec(),
                    "sec1_compressed" => point.to_encoded_point(true).as_bytes().to_vec(),
                    "spki_der" => point.to_public_key_der().expect("spki").as_bytes().to_vec(),
                    other => panic!("{}: unknown P-256 encoding {other}", v.name),
                }
            }
            ("ED25519", "raw") => {
                let seed: [u8; 32] = private.as_slice().try_into().expect("32-byte seed");
                ed25519_dalek::SigningKey::from_bytes(&seed).verifying_key().to_bytes().to_vec()
            }
            (algorithm, encoding) => panic!("{}: {algorithm} with {encoding}", v.name),
        };
        assert_eq!(hex::encode(&expected_public), v.public_key_hex, "{}: public key", v.name);

        // The signature's stated form is what its bytes are.
        match v.signature_encoding.as_str() {
            "raw" => assert!(signature.len() == 64 && v.key_algorithm == "ECDSA_P256_SHA256", "{}", v.name),
            "der" => {
                assert_eq!(signature.first(), Some(&0x30), "{}: DER SEQUENCE", v.name);
                p256::ecdsa::Signature::from_der(&signature).expect("valid DER");
            }
            "ed25519" => assert!(signature.len() == 64 && v.key_algorithm == "ED25519", "{}", v.name),
            other => panic!("{}: unknown signature_encoding {other}", v.name),
        }

        // The broker's verifier accepts it at its timestamp...
        let key = DevicePublicKey::new(algorithm(&v.key_algorithm), expected_public).expect("the broker takes the key");
        let device = device(&id, key);
        let now = Millis(v.timestamp_ms);
        let skew = Duration::from_secs(300);
        proof.verify(&device, &v.rpc, &fields, now, skew).unwrap_or_else(|e| panic!("{}: {e}", v.name));
        // ...and refuses it for another field, RPC or device.
        let mut other_fields = fields.clone();
        other_fields.push("x");
        assert!(proof.verify(&device, &v.rpc, &other_fields, now, skew).is_err(), "{}: bound to the fields", v.name);
        assert!(proof.verify(&device, "OtherRpc", &fields, now, skew).is_err(), "{}: bound to the RPC", v.name);
        let other_id = DeviceId::parse("dv_00000000000000000000000000000000").expect("id");
        let moved = DeviceProof { device_id: other_id, timestamp_ms: v.timestamp_ms, signature };
        assert!(moved.verify(&device, &v.rpc, &fields, now, skew).is_err(), "{}: bound to the device", v.name);

        let key_form = format!("{}/{}", v.key_algorithm, v.public_key_encoding);
        covered.insert(format!("rpc {}", v.rpc));
        covered.insert(format!("key {key_form}"));
        covered.insert(format!("signature {}", v.signature_encoding));
        covered.insert(format!("{key_form} {} {}", v.rpc, v.signature_encoding));
    }
    // Every RPC that takes a proof, every key encoding and every signature form the broker accepts.
    for needed in [
        "rpc ListPendingChallenges",
        "rpc UpdatePushToken",
        "rpc RespondToChallenge",
        "key ECDSA_P256_SHA256/sec1_uncompressed",
        "key ECDSA_P256_SHA256/sec1_compressed",
        "key ECDSA_P256_SHA256/spki_der",
        "key ED25519/raw",
        "signature raw",
        "signature der",
        "signature ed25519",
    ] {
        assert!(covered.contains(needed), "no vector covers {needed}");
    }
    for rpc in ["ListPendingChallenges", "UpdatePushToken", "RespondToChallenge"] {
        for algorithm in ["ECDSA_P256_SHA256", "ED25519"] {
            let signatures: &[&str] = if algorithm == "ED25519" { &["ed25519"] } else { &["raw", "der"] };
            for signature in signatures {
                assert!(
                    covered.iter().any(|c| c.starts_with(algorithm) && c.ends_with(&format!(" {rpc} {signature}"))),
                    "no {algorithm} {signature} vector for {rpc}"
                );
            }
        }
    }
}

/// The vectors sign the same bytes the library's simulated phone (and so the
/// `pushmatch phone` CLI) signs: the docs describe what the code does.
#[test]
fn the_simulated_phone_signs_the_documented_bytes() {
    use pushmatch::phone::{P256Encoding as Encoding, PhoneKey};
    let file = committed();
    let mut checked = 0;
    // The negated-S vector is a re-encoding no RFC 6979 signer makes on its own.
    for v in file.vectors.iter().filter(|v| !v.name.contains("negated-s")) {
        let private = hex::decode(&v.private_key_hex).expect("hex");
        let key = match v.key_algorithm.as_str() {
            "ED25519" => {
                let seed: [u8; 32] = private.as_slice().try_into().expect("32 bytes");
                PhoneKey::Ed25519(ed25519_dalek::SigningKey::from_bytes(&seed))
            }
            _ => PhoneKey::P256 {
                key: p256::ecdsa::SigningKey::from_slice(&private).expect("scalar"),
                encoding: match v.public_key_encoding.as_str() {
                    "sec1_uncompressed" => Encoding::Sec1Uncompressed,
                    "sec1_compressed" => Encoding::Sec1Compressed,
                    _ => Encoding::Spki,
                },
                der_signatures: v.signature_encoding == "der",
            },
        };
        assert_eq!(hex::encode(key.public_key()), v.public_key_hex, "{}", v.name);
        let fields: Vec<&str> = v.fields.iter().map(String::as_str).collect();
        let proof = pushmatch::phone::sign_proof(&key, &v.device_id, &v.rpc, &fields, v.timestamp_ms);
        assert_eq!(hex::encode(&proof.signature), v.signature_hex, "{}", v.name);
        assert_eq!((proof.device_id.as_str(), proof.timestamp_ms), (v.device_id.as_str(), v.timestamp_ms));
        checked += 1;
    }
    assert!(checked >= 15, "only {checked} vectors checked");
}
