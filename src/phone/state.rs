//! The `pushmatch phone` state file: the device's id and private key, its TOTP
//! secret and where its server is. The file holds secrets: it is written with
//! mode 0600 (through a temporary file, so a crash leaves the old state) and its
//! contents are never printed.

use std::path::{Path, PathBuf};

use anyhow::Context as _;
use serde::{Deserialize, Serialize};

use super::{P256Encoding, PhoneKey};
use crate::pb;

#[derive(Serialize, Deserialize)]
pub struct PhoneState {
    /// The server's gRPC address, http:// or https://.
    pub server: String,
    /// A PEM CA certificate to trust for an https:// server, if not the webpki roots.
    #[serde(default)]
    pub ca: Option<PathBuf>,
    pub device_id: String,
    /// `ECDSA_P256_SHA256` or `ED25519`.
    pub key_algorithm: String,
    /// P-256: the 32-byte scalar; Ed25519: the 32-byte seed.
    pub private_key_hex: String,
    /// P-256: `sec1_uncompressed`, `sec1_compressed` or `spki_der`.
    #[serde(default)]
    pub public_key_encoding: String,
    /// P-256: signs in ASN.1 DER rather than raw r||s.
    #[serde(default)]
    pub der_signatures: bool,
    /// `fcm` or `apns`.
    pub platform: String,
    pub push_token: String,
    pub account_name: String,
    pub issuer: String,
    /// The TOTP secret (base32), when the server gave one.
    #[serde(default)]
    pub totp_secret_base32: Option<String>,
}

impl PhoneState {
    pub fn from_key(key: &PhoneKey) -> (String, String, String, bool) {
        match key {
            PhoneKey::P256 { key, encoding, der_signatures } => {
                let encoding = match encoding {
                    P256Encoding::Sec1Uncompressed => "sec1_uncompressed",
                    P256Encoding::Sec1Compressed => "sec1_compressed",
                    P256Encoding::Spki => "spki_der",
                };
                ("ECDSA_P256_SHA256".into(), hex::encode(key.to_bytes()), encoding.into(), *der_signatures)
            }
            PhoneKey::Ed25519(key) => ("ED25519".into(), hex::encode(key.to_bytes()), String::new(), false),
        }
    }

    pub fn key(&self) -> anyhow::Result<PhoneKey> {
        let private = hex::decode(&self.private_key_hex).context("private_key_hex is not hex")?;
        match self.key_algorithm.as_str() {
            "ECDSA_P256_SHA256" => {
                let key = p256::ecdsa::SigningKey::from_slice(&private).context("private_key_hex is not a P-256 scalar")?;
                let encoding = match self.public_key_encoding.as_str() {
                    "sec1_compressed" => P256Encoding::Sec1Compressed,
                    "spki_der" => P256Encoding::Spki,
                    _ => P256Encoding::Sec1Uncompressed,
                };
                Ok(PhoneKey::P256 { key, encoding, der_signatures: self.der_signatures })
            }
            "ED25519" => {
                let seed = <[u8; 32]>::try_from(private.as_slice()).context("private_key_hex is not a 32-byte seed")?;
                Ok(PhoneKey::Ed25519(ed25519_dalek::SigningKey::from_bytes(&seed)))
            }
            other => anyhow::bail!("key_algorithm {other:?} is neither ECDSA_P256_SHA256 nor ED25519"),
        }
    }

    pub fn platform(&self) -> pb::Platform {
        if self.platform == "apns" { pb::Platform::Apns } else { pb::Platform::Fcm }
    }

    pub fn load(path: &Path) -> anyhow::Result<Self> {
        let text = match std::fs::read_to_string(path) {
            Ok(text) => text,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                anyhow::bail!("{} does not exist: enroll first (pushmatch phone enroll URI) or pass --state", path.display())
            }
            Err(e) => return Err(e).with_context(|| format!("cannot read {}", path.display())),
        };
        // serde_json's errors name the line and column, never the contents.
        serde_json::from_str(&text).with_context(|| format!("{} is not a pushmatch phone state file", path.display()))
    }

    /// Writes the state readable by its owner only.
    pub fn save(&self, path: &Path) -> anyhow::Result<()> {
        use std::io::Write as _;
        let mut text = serde_json::to_string_pretty(self).context("cannot encode the state")?;
        text.push('\n');
        let mut temporary = path.as_os_str().to_owned();
        temporary.push(".tmp");
        let temporary = PathBuf::from(temporary);
        let _ = std::fs::remove_file(&temporary);
        let mut options = std::fs::OpenOptions::new();
        options.write(true).create_new(true);
        #[cfg(unix)]
        std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
        let mut file = options.open(&temporary).with_context(|| format!("cannot create {}", temporary.display()))?;
        file.write_all(text.as_bytes())
            .and_then(|()| file.sync_all())
            .with_context(|| format!("cannot write {}", temporary.display()))?;
        std::fs::rename(&temporary, path).with_context(|| format!("cannot write {}", path.display()))
    }
}
