//! Device-proof verification (src/domain/device.rs): public keys and signatures in
//! every encoding the proto allows (P-256 as SEC1 compressed, uncompressed or
//! SubjectPublicKeyInfo DER, signatures DER or raw r||s, high or low S; Ed25519 raw).
//!
//! The first byte picks a mode:
//! - 0, 1: arbitrary key bytes (P-256, Ed25519), signature, message and timestamps
//!   through `DevicePublicKey::new`, `fingerprint`, `verifies`, `DeviceProof::verify`;
//!   checked: no panic, an accepted key has a fingerprint, a refusal names `public_key`.
//! - 2, 3: a real key pair made from the input (P-256, Ed25519) signs the input's
//!   message; checked: every encoding of the key is accepted with one fingerprint,
//!   every signature form verifies, and one flipped bit in the signature or the
//!   message does not.

#![no_main]

use std::time::Duration;

use libfuzzer_sys::fuzz_target;
use p256::ecdsa::signature::Signer as _;
use p256::elliptic_curve::ops::Neg as _;
use p256::pkcs8::EncodePublicKey as _;
use pushmatch::domain::challenge::Platform;
use pushmatch::domain::device::{Device, DeviceProof, DevicePublicKey, KeyAlgorithm};
use pushmatch::domain::ids::{DeviceId, TenantId, UserId};
use pushmatch::domain::time::Millis;

const SKEW: Duration = Duration::from_secs(120);

/// `len` bytes (the next byte says how many) off the front of `data`.
fn take<'a>(data: &mut &'a [u8]) -> &'a [u8] {
    let Some((&len, rest)) = data.split_first() else { return &[] };
    let len = usize::from(len).min(rest.len());
    let (taken, rest) = rest.split_at(len);
    *data = rest;
    taken
}

fn i64_of(data: &mut &[u8]) -> i64 {
    let mut raw = [0u8; 8];
    let n = data.len().min(8);
    raw[..n].copy_from_slice(&data[..n]);
    *data = &data[n..];
    i64::from_le_bytes(raw)
}

fn device(key: DevicePublicKey) -> Device {
    Device {
        id: DeviceId::parse("dv_00112233445566778899aabbccddeeff").expect("a device id"),
        tenant: TenantId("t".into()),
        user_id: UserId::parse("u").expect("a user id"),
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

fn arbitrary_key(algorithm: KeyAlgorithm, mut data: &[u8]) {
    let key = take(&mut data).to_vec();
    let signature = take(&mut data).to_vec();
    let timestamp_ms = i64_of(&mut data);
    let now = i64_of(&mut data);
    let message = data;
    match DevicePublicKey::new(algorithm, key) {
        Ok(key) => {
            key.fingerprint().expect("an accepted key has a fingerprint");
            let _ = key.verifies(message, &signature);
            let device = device(key);
            let proof = DeviceProof { device_id: device.id.clone(), timestamp_ms, signature };
            let fields = [String::from_utf8_lossy(message).into_owned()];
            let fields: Vec<&str> = fields.iter().map(String::as_str).collect();
            if let Err(error) = proof.verify(&device, "RespondToChallenge", &fields, Millis(now), SKEW) {
                assert!(error.to_string().starts_with("proof."), "{error}");
            }
            let _ = proof.replayable_until(SKEW);
        }
        Err(error) => assert!(error.to_string().starts_with("public_key"), "{error}"),
    }
}

fn flip(bytes: &[u8], at: u8) -> Vec<u8> {
    let mut flipped = bytes.to_vec();
    if !flipped.is_empty() {
        let bit = usize::from(at) % (flipped.len() * 8);
        flipped[bit / 8] ^= 1 << (bit % 8);
    }
    flipped
}

fn p256_pair(data: &[u8]) {
    if data.len() < 33 {
        return;
    }
    let (secret, rest) = data.split_at(32);
    let (at, message) = (rest[0], &rest[1..]);
    let Ok(signing) = p256::ecdsa::SigningKey::from_slice(secret) else { return };
    let verifying = signing.verifying_key();
    let encodings = [
        verifying.to_encoded_point(false).as_bytes().to_vec(),
        verifying.to_encoded_point(true).as_bytes().to_vec(),
        verifying.to_public_key_der().expect("spki").as_bytes().to_vec(),
    ];
    let low: p256::ecdsa::Signature = signing.sign(message);
    let (r, s) = low.split_scalars();
    let high = p256::ecdsa::Signature::from_scalars(r.to_bytes(), s.as_ref().neg().to_bytes()).expect("high-S form");
    let forms = [low.to_vec(), low.to_der().as_bytes().to_vec(), high.to_vec(), high.to_der().as_bytes().to_vec()];
    let mut fingerprints = Vec::new();
    for bytes in encodings {
        let key = DevicePublicKey::new(KeyAlgorithm::EcdsaP256Sha256, bytes).expect("a real key is accepted");
        fingerprints.push(key.fingerprint().expect("fingerprint"));
        for form in &forms {
            assert!(key.verifies(message, form), "a real signature verifies");
            assert!(!key.verifies(message, &flip(form, at)), "a flipped signature does not verify");
            if !message.is_empty() {
                assert!(!key.verifies(&flip(message, at), form), "a flipped message does not verify");
            }
        }
    }
    assert!(fingerprints.windows(2).all(|pair| pair[0] == pair[1]), "one key, one fingerprint");
}

fn ed25519_pair(data: &[u8]) {
    if data.len() < 33 {
        return;
    }
    let (secret, rest) = data.split_at(32);
    let (at, message) = (rest[0], &rest[1..]);
    let signing = ed25519_dalek::SigningKey::from_bytes(secret.try_into().expect("32 bytes"));
    let key =
        DevicePublicKey::new(KeyAlgorithm::Ed25519, signing.verifying_key().to_bytes().to_vec()).expect("a real key is accepted");
    key.fingerprint().expect("fingerprint");
    let signature = ed25519_dalek::Signer::sign(&signing, message).to_bytes();
    assert!(key.verifies(message, &signature), "a real signature verifies");
    assert!(!key.verifies(message, &flip(&signature, at)), "a flipped signature does not verify");
    if !message.is_empty() {
        assert!(!key.verifies(&flip(message, at), &signature), "a flipped message does not verify");
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else { return };
    match mode % 4 {
        0 => arbitrary_key(KeyAlgorithm::EcdsaP256Sha256, rest),
        1 => arbitrary_key(KeyAlgorithm::Ed25519, rest),
        2 => p256_pair(rest),
        _ => ed25519_pair(rest),
    }
});
