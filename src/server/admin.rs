//! Operators' commands that work on the store directly: `pushmatch purge-tenant`.

use std::sync::Arc;

use crate::config::{Config, StoreBackend};
use crate::domain::ids::TenantId;
use crate::domain::time::{Clock, SystemClock};
use crate::store::TenantPurge;

/// Why a purge did not run.
#[derive(Debug, thiserror::Error)]
pub enum PurgeError {
    #[error(
        "tenant {0:?} is still in the configuration: remove its [[tenants]] (and reload or restart the servers) first, \
         so that no call of its finds its data going mid-sign-in"
    )]
    StillConfigured(String),
    #[error("{0:?} is not a tenant id (1 to 64 of [A-Za-z0-9_-])")]
    BadId(String),
    #[error("{0}; the embedded store is one process's: stop the server that uses it, then purge")]
    EmbeddedInUse(String),
    #[error(transparent)]
    Server(#[from] super::ServerError),
}

/// Counts what the store holds of `tenant` and, unless `dry_run`, removes it (see
/// `Store::purge_tenant`). Refuses a tenant that is still configured. The embedded
/// store is one process's: with a server running on it, opening it fails and says so.
pub async fn purge_tenant(config: &Config, tenant: &str, dry_run: bool) -> Result<TenantPurge, PurgeError> {
    let well_formed =
        !tenant.is_empty() && tenant.len() <= 64 && tenant.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
    if !well_formed {
        return Err(PurgeError::BadId(tenant.to_owned()));
    }
    if config.tenants.iter().any(|t| t.id == tenant) {
        return Err(PurgeError::StillConfigured(tenant.to_owned()));
    }
    let clock: Arc<dyn Clock> = Arc::new(SystemClock);
    let store = super::open_store(config, clock).await.map_err(|error| match config.store.backend {
        StoreBackend::Embedded => PurgeError::EmbeddedInUse(error.to_string()),
        StoreBackend::Redis => error.into(),
    })?;
    let purged = store.purge_tenant(&TenantId(tenant.to_owned()), dry_run).await.map_err(super::ServerError::Store)?;
    tracing::info!(
        tenant,
        dry_run,
        users = purged.users,
        devices = purged.devices,
        enrollments = purged.enrollments,
        challenges = purged.challenges,
        "tenant purge"
    );
    Ok(purged)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_malformed_or_still_configured_tenant_is_refused_before_the_store_is_opened() {
        let mut config = Config::default();
        config.store.path = "/nonexistent/never-opened".into();
        config.tenants.push(crate::config::TenantConfig { id: "live".into(), ..Default::default() });
        for bad in ["", "a b", "../x", &"t".repeat(65)] {
            assert!(matches!(purge_tenant(&config, bad, true).await, Err(PurgeError::BadId(_))), "{bad:?}");
        }
        assert!(matches!(purge_tenant(&config, "live", true).await, Err(PurgeError::StillConfigured(_))));
    }
}
