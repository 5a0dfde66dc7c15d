//! A simulated authenticator app: a real `DeviceService` client over gRPC with a
//! real device key. The demo, the end-to-end tests and the burst bench use it the
//! way the iOS and Android apps use the service.

pub mod cli;
mod qr;
mod state;

pub use qr::decode_qr_png;

use p256::ecdsa::signature::Signer as _;
use p256::elliptic_curve::rand_core::OsRng;
use p256::pkcs8::EncodePublicKey as _;
use tonic::Status;
use tonic::transport::Channel;

use crate::domain::time::{Clock as _, SystemClock};
use crate::pb;
use crate::pb::device_service_client::DeviceServiceClient;

/// How a P-256 phone encodes its public key at enrollment.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum P256Encoding {
    Sec1Uncompressed,
    Sec1Compressed,
    Spki,
}

#[derive(Clone)]
pub enum PhoneKey {
    /// `der_signatures`: sign in ASN.1 DER (as iOS does) instead of raw r||s.
    P256 {
        key: p256::ecdsa::SigningKey,
        encoding: P256Encoding,
        der_signatures: bool,
    },
    Ed25519(ed25519_dalek::SigningKey),
}

impl PhoneKey {
    pub fn p256(encoding: P256Encoding) -> Self {
        Self::P256 { key: p256::ecdsa::SigningKey::random(&mut OsRng), encoding, der_signatures: false }
    }

    pub fn ed25519() -> Self {
        Self::Ed25519(ed25519_dalek::SigningKey::generate(&mut OsRng))
    }

    pub fn algorithm(&self) -> pb::KeyAlgorithm {
        match self {
            Self::P256 { .. } => pb::KeyAlgorithm::EcdsaP256Sha256,
            Self::Ed25519(_) => pb::KeyAlgorithm::Ed25519,
        }
    }

    pub fn public_key(&self) -> Vec<u8> {
        match self {
            Self::P256 { key, encoding, .. } => {
                let verifying = key.verifying_key();
                match encoding {
                    P256Encoding::Sec1Uncompressed => verifying.to_encoded_point(false).as_bytes().to_vec(),
                    P256Encoding::Sec1Compressed => verifying.to_encoded_point(true).as_bytes().to_vec(),
                    // Encoding a valid key cannot fail; an empty key would be refused loudly by the server.
                    Spki => verifying.to_public_key_der().map(|der| der.as_bytes().to_vec()).unwrap_or_default(),
                }
            }
            Self::Ed25519(key) => key.verifying_key().to_bytes().to_vec(),
        }
    }

    pub fn sign(&self, message: &[u8]) -> Vec<u8> {
        match self {
            Self::P256 { key, der_signatures, .. } => {
                let signature: p256::ecdsa::Signature = key.sign(message);
                if *der_signatures { signature.to_der().as_bytes().to_vec() } else { signature.to_vec() }
            }
            Self::Ed25519(key) => ed25519_dalek::Signer::sign(key, message).to_bytes().to_vec(),
        }
    }
}

use P256Encoding::Spki;

/// The enrollment code inside a `pushmatch://enroll?...` URI.
pub fn enrollment_code_from_uri(uri: &str) -> Option<String> {
    let query = uri.strip_prefix("pushmatch://enroll?")?;
    query
        .split('&')
        .find_map(|pair| pair.strip_prefix("code="))
        .map(|code| percent_encoding::percent_decode_str(code).decode_utf8_lossy().into_owned())
}

/// The proof of one call, as docs/device-proofs.md describes it: `key` signs
/// "pushmatch/v1", the RPC name, the device id, the timestamp in decimal and the
/// call's fields, joined by "\n".
pub fn sign_proof(key: &PhoneKey, device_id: &str, rpc: &str, fields: &[&str], timestamp_ms: i64) -> pb::DeviceProof {
    let timestamp = timestamp_ms.to_string();
    let mut parts = vec!["pushmatch/v1", rpc, device_id, timestamp.as_str()];
    parts.extend_from_slice(fields);
    let signature = key.sign(parts.join("\n").as_bytes());
    pb::DeviceProof { device_id: device_id.to_owned(), timestamp_ms, signature }
}

pub struct SimulatedPhone {
    client: DeviceServiceClient<Channel>,
    key: PhoneKey,
    platform: pb::Platform,
    push_token: String,
    device_id: String,
    /// The newest proof timestamp used, so every proof differs.
    last_timestamp_ms: std::sync::atomic::AtomicI64,
}

impl SimulatedPhone {
    pub fn new(channel: Channel, key: PhoneKey, platform: pb::Platform, push_token: impl Into<String>) -> Self {
        Self {
            client: DeviceServiceClient::new(channel),
            key,
            platform,
            push_token: push_token.into(),
            device_id: String::new(),
            last_timestamp_ms: std::sync::atomic::AtomicI64::new(0),
        }
    }

    /// A phone that enrolled earlier (the `pushmatch phone` CLI's saved state).
    pub fn enrolled(
        channel: Channel,
        key: PhoneKey,
        platform: pb::Platform,
        push_token: impl Into<String>,
        device_id: &str,
    ) -> Self {
        let mut phone = Self::new(channel, key, platform, push_token);
        phone.device_id = device_id.to_owned();
        phone
    }

    pub fn device_id(&self) -> &str {
        &self.device_id
    }

    pub fn key(&self) -> &PhoneKey {
        &self.key
    }

    /// Scans the QR's URI and completes the enrollment with this phone's key.
    pub async fn enroll(&mut self, uri: &str, display_name: &str) -> Result<pb::CompleteEnrollmentResponse, Status> {
        let code = enrollment_code_from_uri(uri).ok_or_else(|| Status::invalid_argument("not a pushmatch enrollment URI"))?;
        self.enroll_with_code(&code, display_name).await
    }

    pub async fn enroll_with_code(&mut self, code: &str, display_name: &str) -> Result<pb::CompleteEnrollmentResponse, Status> {
        let response = self
            .client
            .complete_enrollment(pb::CompleteEnrollmentRequest {
                enrollment_code: code.to_owned(),
                platform: self.platform.into(),
                push_token: self.push_token.clone(),
                public_key: self.key.public_key(),
                key_algorithm: self.key.algorithm().into(),
                display_name: display_name.to_owned(),
            })
            .await?
            .into_inner();
        self.device_id.clone_from(&response.device_id);
        Ok(response)
    }

    /// Acts as another device: signs as this phone but claims `device_id`.
    pub fn impersonate(&mut self, device_id: &str) {
        self.device_id = device_id.to_owned();
    }

    /// A proof for `rpc` over `fields`, timestamped now. A proof works once, so
    /// two calls of one kind within one millisecond take the next millisecond,
    /// as a real app must too.
    pub fn proof(&self, rpc: &str, fields: &[&str]) -> pb::DeviceProof {
        let now = SystemClock.now().0;
        let previous = self.last_timestamp_ms.fetch_max(now, std::sync::atomic::Ordering::Relaxed);
        let timestamp =
            if previous >= now { self.last_timestamp_ms.fetch_add(1, std::sync::atomic::Ordering::Relaxed) + 1 } else { now };
        self.proof_at(rpc, fields, timestamp)
    }

    pub fn proof_at(&self, rpc: &str, fields: &[&str], timestamp_ms: i64) -> pb::DeviceProof {
        sign_proof(&self.key, &self.device_id, rpc, fields, timestamp_ms)
    }

    pub async fn pending(&mut self) -> Result<Vec<pb::PendingChallenge>, Status> {
        let proof = self.proof("ListPendingChallenges", &[]);
        self.pending_with(proof).await
    }

    pub async fn pending_with(&mut self, proof: pb::DeviceProof) -> Result<Vec<pb::PendingChallenge>, Status> {
        let request = pb::ListPendingChallengesRequest { proof: Some(proof) };
        Ok(self.client.list_pending_challenges(request).await?.into_inner().challenges)
    }

    pub async fn respond(
        &mut self,
        challenge_id: &str,
        decision: pb::Decision,
        number: &str,
    ) -> Result<pb::RespondToChallengeResponse, Status> {
        let proof = self.proof("RespondToChallenge", &[challenge_id, decision.as_str_name(), number]);
        self.respond_with(proof, challenge_id, decision, number).await
    }

    pub async fn respond_with(
        &mut self,
        proof: pb::DeviceProof,
        challenge_id: &str,
        decision: pb::Decision,
        number: &str,
    ) -> Result<pb::RespondToChallengeResponse, Status> {
        let request = pb::RespondToChallengeRequest {
            proof: Some(proof),
            challenge_id: challenge_id.to_owned(),
            decision: decision.into(),
            number: number.to_owned(),
        };
        Ok(self.client.respond_to_challenge(request).await?.into_inner())
    }

    pub async fn update_push_token(&mut self, token: &str) -> Result<(), Status> {
        let proof = self.proof("UpdatePushToken", &[token]);
        let request = pb::UpdatePushTokenRequest { proof: Some(proof), push_token: token.to_owned() };
        self.client.update_push_token(request).await?;
        self.push_token = token.to_owned();
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_code_is_read_from_the_uri() {
        let uri = "pushmatch://enroll?v=1&server=http%3A%2F%2Fx&code=00ff&issuer=Gors&account=jan";
        assert_eq!(super::enrollment_code_from_uri(uri).as_deref(), Some("00ff"));
        assert_eq!(super::enrollment_code_from_uri("otpauth://totp/x"), None);
    }
}
