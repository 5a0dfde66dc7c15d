//! `purge_tenant` on Redis. Keys are named by user tag, not by tenant (`keys.rs`),
//! so the purge reads what names the tenant: it SCANs the device, enrollment and
//! challenge records (on every master of a cluster), keeps the tags of the
//! tenant's users, then SCANs once more for every key of those tags (their limit
//! state, pending lists, blocks) and deletes them with the global indexes that
//! point at the records. Walking the keyspace is an operator's command, never a
//! request's; SCAN keeps the server answering meanwhile.
//!
//! A user of the tenant with none of those records left (only a block, say) is not
//! found: nothing in their keys names the tenant. Records written while the purge
//! runs are not found either; purge a tenant after removing it from the
//! configuration, when nothing writes for it any more, and run it again to check.

use std::collections::HashSet;

use super::RedisStore;
use super::connection::decode;
use super::keys::{challenge_index, code_index, device_index, enrollment_index, public_key};
use crate::domain::challenge::Challenge;
use crate::domain::device::Device;
use crate::domain::enrollment::Enrollment;
use crate::domain::ids::TenantId;
use crate::store::{StoreError, TenantPurge};

/// The user tag of a key `pm:{tag}:...`.
fn tag_of(key: &str) -> Option<&str> {
    let rest = key.strip_prefix("pm:{")?;
    rest.split_once('}').map(|(tag, _)| tag)
}

/// What the first pass found of the tenant.
#[derive(Default)]
struct Found {
    tags: HashSet<String>,
    /// Global index keys to delete.
    indexes: Vec<String>,
    /// Public-key claims, released only if they still name the device.
    claims: Vec<(String, String)>,
    purge: TenantPurge,
}

impl RedisStore {
    pub(super) async fn purge_tenant(&self, tenant: &TenantId, dry_run: bool) -> Result<TenantPurge, StoreError> {
        let mut found = Found::default();
        for key in self.connection.scan("pm:{*}:dev:*").await? {
            let Some(device) = self.read_record::<Device>(&key, false).await? else { continue };
            if device.tenant != *tenant {
                continue;
            }
            found.purge.devices += 1;
            found.indexes.push(device_index(&device.id));
            if let Some(fingerprint) = device.public_key.as_ref().and_then(|key| key.fingerprint().ok()) {
                found.claims.push((public_key(&fingerprint), device.id.as_str().to_owned()));
            }
            found.tags.extend(tag_of(&key).map(str::to_owned));
        }
        for key in self.connection.scan("pm:{*}:en:*").await? {
            let Some(enrollment) = self.read_record::<Enrollment>(&key, false).await? else { continue };
            if enrollment.tenant != *tenant {
                continue;
            }
            found.purge.enrollments += 1;
            found.indexes.push(enrollment_index(&enrollment.id));
            found.indexes.extend(enrollment.code_digest.as_ref().map(code_index));
            found.tags.extend(tag_of(&key).map(str::to_owned));
        }
        for key in self.connection.scan("pm:{*}:ch:*").await? {
            let Some(challenge) = self.read_record::<Challenge>(&key, true).await? else { continue };
            if challenge.tenant != *tenant {
                continue;
            }
            found.purge.challenges += 1;
            found.indexes.push(challenge_index(&challenge.id));
            found.tags.extend(tag_of(&key).map(str::to_owned));
        }
        found.purge.users = found.tags.len() as u64;
        if dry_run {
            return Ok(found.purge);
        }
        // The tenant's users' keys share a slot per user: one DEL per user.
        let mut by_tag: std::collections::HashMap<String, Vec<String>> = std::collections::HashMap::new();
        for key in self.connection.scan("pm:{*}:*").await? {
            if let Some(tag) = tag_of(&key).filter(|tag| found.tags.contains(*tag)) {
                by_tag.entry(tag.to_owned()).or_default().push(key);
            }
        }
        for keys in by_tag.values() {
            let _: i64 = self.connection.query(redis::cmd("DEL").arg(keys)).await?;
        }
        for index in &found.indexes {
            let _: i64 = self.connection.query(redis::cmd("DEL").arg(index)).await?;
        }
        for (claim, device) in &found.claims {
            let _: i64 = self.connection.invoke(self.scripts.release.key(claim).arg(device)).await?;
        }
        Ok(found.purge)
    }

    /// A device or enrollment (a string) or a challenge (`json` of a hash) at `key`;
    /// `None` when it went meanwhile. A record this version cannot read is skipped
    /// with a warning rather than stopping the purge.
    async fn read_record<T: serde::de::DeserializeOwned>(&self, key: &str, hash: bool) -> Result<Option<T>, StoreError> {
        let cmd = if hash { redis::cmd("HGET").arg(key).arg("json").clone() } else { redis::cmd("GET").arg(key).clone() };
        let text: Option<String> = self.connection.query(&cmd).await?;
        let Some(text) = text else { return Ok(None) };
        match decode(&text) {
            Ok(record) => Ok(Some(record)),
            Err(error) => {
                tracing::warn!(%error, key, "purge: a record this version cannot read was skipped");
                Ok(None)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_tag_is_read_from_the_key() {
        assert_eq!(super::tag_of("pm:{0123abcd}:dev:xyz"), Some("0123abcd"));
        assert_eq!(super::tag_of("pm:didx:xyz"), None);
        assert_eq!(super::tag_of("pm:{open"), None);
    }
}
