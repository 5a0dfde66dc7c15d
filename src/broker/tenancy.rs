//! The tenants the broker serves, with what may differ between them: the name
//! shown as the issuer, their limits, and their own permits of the create cap.
//!
//! A [`Tenancy`] is replaced whole when the configuration is reloaded
//! ([`super::Broker::set_tenants`]); each call reads the snapshot current when it
//! starts, so a reload never shows a call half of one and half of the other, and a
//! call in flight keeps the permit it took. A tenant that stays keeps its permit
//! counter across a reload while its share is unchanged, so its calls in flight
//! still count against it.

use std::collections::HashMap;
use std::sync::Arc;

use tokio::sync::Semaphore;

use super::{BrokerSettings, Tenant, TenantLimits};
use crate::domain::ids::TenantId;

/// Every configured tenant, looked up by id.
#[derive(Debug, Default)]
pub(super) struct Tenancy {
    entries: HashMap<TenantId, Entry>,
}

#[derive(Debug)]
pub(super) struct Entry {
    pub(super) display_name: String,
    /// Its own limits where it has them, else the global ones.
    pub(super) limits: TenantLimits,
    /// Its part of `max_creates_in_flight`; `None` when that part is the whole cap.
    pub(super) creating: Option<Arc<Semaphore>>,
}

impl Tenancy {
    /// The tenants with their limits from `settings`; a tenant of `previous` whose
    /// part of the create cap is the same keeps its permit counter.
    pub(super) fn build(settings: &BrokerSettings, tenants: Vec<Tenant>, previous: Option<&Tenancy>) -> Self {
        let entries = tenants
            .into_iter()
            .map(|tenant| {
                let limits = settings.limits_of(&tenant.id);
                let cap = limits.max_creates_in_flight;
                let creating = (cap < settings.max_creates_in_flight).then(|| {
                    previous
                        .and_then(|previous| previous.entries.get(&tenant.id))
                        .filter(|kept| kept.limits.max_creates_in_flight == cap)
                        .and_then(|kept| kept.creating.clone())
                        .unwrap_or_else(|| Arc::new(Semaphore::new(cap)))
                });
                (tenant.id, Entry { display_name: tenant.display_name, limits, creating })
            })
            .collect();
        Self { entries }
    }

    pub(super) fn get(&self, tenant: &TenantId) -> Option<&Entry> {
        self.entries.get(tenant)
    }

    pub(super) fn len(&self) -> usize {
        self.entries.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tenants(ids: &[&str]) -> Vec<Tenant> {
        ids.iter().map(|id| Tenant { id: TenantId((*id).into()), display_name: id.to_uppercase() }).collect()
    }

    fn settings_with_cap(cap_of_globex: usize) -> BrokerSettings {
        let mut settings = super::super::tests::settings();
        let mut own = settings.global_limits();
        own.max_creates_in_flight = cap_of_globex;
        settings.per_tenant.insert(TenantId("globex".into()), own);
        settings
    }

    #[test]
    fn a_tenant_that_stays_with_the_same_share_keeps_its_permits_and_a_changed_share_starts_afresh() {
        let first = Tenancy::build(&settings_with_cap(3), tenants(&["acme", "globex"]), None);
        let acme = TenantId("acme".into());
        let globex = TenantId("globex".into());
        let held = first.get(&acme).and_then(|e| e.creating.clone()).expect("acme has a part of the cap");
        let _in_flight = held.clone().try_acquire_owned().expect("a permit");

        let second = Tenancy::build(&settings_with_cap(1), tenants(&["acme", "globex", "initech"]), Some(&first));
        let kept = second.get(&acme).and_then(|e| e.creating.clone()).expect("acme's part");
        assert!(Arc::ptr_eq(&kept, &held), "acme's share did not change: its call in flight still counts");
        assert_eq!(kept.available_permits(), 1, "2 permits, one held");
        let changed = second.get(&globex).and_then(|e| e.creating.clone()).expect("globex's part");
        assert_eq!(changed.available_permits(), 1, "globex's new share");
        assert_eq!(second.get(&TenantId("initech".into())).map(|e| e.display_name.as_str()), Some("INITECH"));
        assert_eq!(second.len(), 3);

        let third = Tenancy::build(&settings_with_cap(1), tenants(&["globex"]), Some(&second));
        assert!(third.get(&acme).is_none(), "a removed tenant is gone");
    }
}
