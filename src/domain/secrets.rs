//! TOTP secrets at rest: sealed with AES-256-GCM under the server's secret key, a
//! fresh random 96-bit nonce each time, the owning record's id as associated data
//! (a sealed secret copied onto another record does not open). A dump of the store
//! shows no secret in clear; losing the key makes every stored TOTP secret useless
//! (users re-enroll their TOTP apps; push devices keep working).

use std::fmt;

use aes_gcm::aead::{Aead, KeyInit, Payload};
use aes_gcm::{Aes256Gcm, Key, Nonce};
use serde::{Deserialize, Serialize};

use super::error::DomainError;
use super::ids::os_random;

/// A secret as the stores keep it.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SealedSecret {
    nonce: String,
    ciphertext: String,
}

impl fmt::Debug for SealedSecret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("SealedSecret(..)")
    }
}

/// The server's secret key, 32 bytes.
#[derive(Clone)]
pub struct SecretBox {
    cipher: Aes256Gcm,
}

impl fmt::Debug for SecretBox {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("SecretBox(<key redacted>)")
    }
}

impl SecretBox {
    pub fn new(key: &[u8; 32]) -> Self {
        Self { cipher: Aes256Gcm::new(&Key::<Aes256Gcm>::from(*key)) }
    }

    pub fn seal(&self, secret: &[u8], owner: &str) -> Result<SealedSecret, DomainError> {
        let mut nonce = [0u8; 12];
        os_random(&mut nonce)?;
        let ciphertext = self
            .cipher
            .encrypt(&Nonce::from(nonce), Payload { msg: secret, aad: owner.as_bytes() })
            .map_err(|_| DomainError::Internal("sealing a secret failed".into()))?;
        Ok(SealedSecret { nonce: hex::encode(nonce), ciphertext: hex::encode(ciphertext) })
    }

    pub fn open(&self, sealed: &SealedSecret, owner: &str) -> Result<Vec<u8>, DomainError> {
        let corrupt = || DomainError::Internal("a stored secret does not open: wrong secret key or corrupt record".into());
        let mut nonce = [0u8; 12];
        hex::decode_to_slice(&sealed.nonce, &mut nonce).map_err(|_| corrupt())?;
        let ciphertext = hex::decode(&sealed.ciphertext).map_err(|_| corrupt())?;
        self.cipher.decrypt(&Nonce::from(nonce), Payload { msg: &ciphertext, aad: owner.as_bytes() }).map_err(|_| corrupt())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sealed_secrets_open_only_for_their_owner_and_key() {
        let key = SecretBox::new(&[7u8; 32]);
        let sealed = key.seal(b"12345678901234567890", "dv_1").expect("seal");
        assert!(!format!("{}{}", sealed.nonce, sealed.ciphertext).contains(&hex::encode(b"12345678901234567890")));
        assert_eq!(key.open(&sealed, "dv_1").expect("open"), b"12345678901234567890");
        assert!(key.open(&sealed, "dv_2").is_err(), "bound to its owner");
        assert!(SecretBox::new(&[8u8; 32]).open(&sealed, "dv_1").is_err(), "bound to the key");
        assert_ne!(key.seal(b"x", "dv_1").expect("seal"), key.seal(b"x", "dv_1").expect("seal"), "fresh nonces");
    }
}
