//! Tenants' API keys: the configuration holds SHA-256 digests of the keys, never
//! the keys. A caller's key is hashed and compared in constant time against every
//! digest (no early exit), so timing reveals neither which tenant nor how much of a
//! digest matched. Reading the key from a request is the edge's work
//! (`crate::api::auth`); this is the part that decides.

use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use super::ids::TenantId;

/// Hex SHA-256 of an API key, as `[[tenants]] api_key_sha256` holds it.
pub fn api_key_digest_hex(key: &str) -> String {
    hex::encode(Sha256::digest(key.as_bytes()))
}

/// The fewest characters a key may have: 32 from `--generate`'s alphabet carry at
/// least 128 bits when they are random (32 hex digits do; base64url ones 192).
pub const MIN_KEY_CHARS: usize = 32;

/// Refuses a key that is too short, or has characters outside the URL-safe
/// base64 alphabet (`A-Z a-z 0-9 - _`) that `pushmatch hash-key --generate` uses:
/// an API key is a bearer secret, and a guessable one is no authentication.
pub fn check_key_strength(key: &str) -> Result<(), String> {
    if let Some(bad) = key.chars().find(|c| !(c.is_ascii_alphanumeric() || *c == '-' || *c == '_')) {
        return Err(format!(
            "the key has a character ({bad:?}) outside A-Z a-z 0-9 - _; make one with `pushmatch hash-key --generate`"
        ));
    }
    if key.len() < MIN_KEY_CHARS {
        return Err(format!(
            "the key has {} characters; at least {MIN_KEY_CHARS} are needed for 128 bits of entropy \
             (`pushmatch hash-key --generate` makes one with 256)",
            key.len()
        ));
    }
    Ok(())
}

/// Every accepted key digest with the tenant it belongs to.
#[derive(Clone, Debug, Default)]
pub struct TenantKeys {
    entries: Vec<([u8; 32], TenantId)>,
}

impl TenantKeys {
    /// From `(tenant, hex digests)` pairs; a digest that is not 64 hex digits is
    /// skipped (configuration validation refuses it before this runs).
    pub fn new<'a>(tenants: impl IntoIterator<Item = (TenantId, &'a [String])>) -> Self {
        let mut entries = Vec::new();
        for (tenant, digests) in tenants {
            for digest in digests {
                let mut bytes = [0u8; 32];
                if hex::decode_to_slice(digest, &mut bytes).is_ok() {
                    entries.push((bytes, tenant.clone()));
                }
            }
        }
        Self { entries }
    }

    /// The tenant whose key this is, if any.
    pub fn tenant_of(&self, key: &str) -> Option<TenantId> {
        let presented: [u8; 32] = Sha256::digest(key.as_bytes()).into();
        let mut tenant = None;
        for (digest, owner) in &self.entries {
            if bool::from(digest.ct_eq(&presented)) {
                tenant = Some(owner);
            }
        }
        tenant.cloned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn short_or_wordy_keys_are_weak_and_generated_ones_strong() {
        for weak in ["", "pushmatch-dev-key", "correct horse battery staple ok!", &"a".repeat(31), "é".repeat(20).as_str()] {
            assert!(check_key_strength(weak).is_err(), "{weak:?}");
        }
        for strong in ["0123456789abcdef0123456789abcdef", "kQ3v_8Zr-1mN0pXyT7wLbE4sHcJdF2gAaUe9oVtRi5M"] {
            check_key_strength(strong).expect(strong);
        }
    }

    #[test]
    fn keys_name_their_tenant_and_others_none() {
        let (a, b) = ([api_key_digest_hex("key-a")], [api_key_digest_hex("key-b")]);
        let keys = TenantKeys::new([(TenantId("a".into()), &a[..]), (TenantId("b".into()), &b[..])]);
        assert_eq!(keys.tenant_of("key-b"), Some(TenantId("b".into())));
        assert_eq!(keys.tenant_of("key-a"), Some(TenantId("a".into())));
        assert_eq!(keys.tenant_of("key-c"), None);
        assert_eq!(keys.tenant_of(""), None);
    }
}
