//! Tenant authentication by API key: `authorization: Bearer <key>`.
//!
//! The configuration holds SHA-256 digests of the keys, never the keys. A caller's
//! key is hashed and compared in constant time against every digest (no early
//! exit), so timing reveals neither which tenant nor how much of a digest matched.

use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;
use tonic::metadata::MetadataMap;

use crate::config::Config;
use crate::domain::ids::TenantId;
use crate::error::BrokerError;

/// Hex SHA-256 of an API key, as `[[tenants]] api_key_sha256` holds it.
pub fn api_key_digest_hex(key: &str) -> String {
    hex::encode(Sha256::digest(key.as_bytes()))
}

pub struct TenantKeys {
    entries: Vec<([u8; 32], TenantId)>,
}

impl TenantKeys {
    /// From a validated configuration (digests are 64 hex digits).
    pub fn from_config(config: &Config) -> Self {
        let mut entries = Vec::new();
        for tenant in &config.tenants {
            for digest in &tenant.api_key_sha256 {
                let mut bytes = [0u8; 32];
                if hex::decode_to_slice(digest, &mut bytes).is_ok() {
                    entries.push((bytes, TenantId(tenant.id.clone())));
                }
            }
        }
        Self { entries }
    }

    /// The tenant whose key the call carries.
    pub fn authenticate(&self, metadata: &MetadataMap) -> Result<TenantId, BrokerError> {
        let header = metadata
            .get("authorization")
            .ok_or_else(|| BrokerError::unauthenticated("authorization: missing; send `authorization: Bearer <API key>`"))?;
        let key = header
            .to_str()
            .ok()
            .and_then(|value| value.strip_prefix("Bearer ").or_else(|| value.strip_prefix("bearer ")))
            .map(str::trim)
            .filter(|key| !key.is_empty())
            .ok_or_else(|| BrokerError::unauthenticated("authorization: expected `Bearer <API key>`"))?;
        let presented: [u8; 32] = Sha256::digest(key.as_bytes()).into();
        let mut tenant = None;
        for (digest, owner) in &self.entries {
            if bool::from(digest.ct_eq(&presented)) {
                tenant = Some(owner);
            }
        }
        tenant.cloned().ok_or_else(|| BrokerError::unauthenticated("authorization: unknown API key"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::TenantConfig;

    fn keys() -> TenantKeys {
        let mut config = Config::default();
        for (id, key) in [("a", "key-a"), ("b", "key-b")] {
            config.tenants.push(TenantConfig {
                id: id.into(),
                display_name: id.into(),
                api_key_sha256: vec![api_key_digest_hex(key)],
            });
        }
        TenantKeys::from_config(&config)
    }

    fn metadata(value: &str) -> MetadataMap {
        let mut map = MetadataMap::new();
        map.insert("authorization", value.parse().expect("ascii"));
        map
    }

    #[test]
    fn keys_name_their_tenant() {
        assert_eq!(keys().authenticate(&metadata("Bearer key-b")).expect("known"), TenantId("b".into()));
        assert_eq!(keys().authenticate(&metadata("Bearer key-a")).expect("known"), TenantId("a".into()));
    }

    #[test]
    fn missing_malformed_and_unknown_keys_are_unauthenticated() {
        for value in ["key-a", "Bearer ", "Basic a2V5LWE=", "Bearer key-c"] {
            let error = keys().authenticate(&metadata(value)).expect_err(value);
            assert_eq!(error.code(), tonic::Code::Unauthenticated);
            assert!(!error.to_string().contains("key-"), "the key is not echoed back");
        }
        assert!(keys().authenticate(&MetadataMap::new()).is_err());
    }
}
