//! Each tenant's share of the push queue: how many of its jobs wait in the queue,
//! against one limit for every tenant (`push.queue_share_per_tenant` of
//! `push.queue_capacity`), so that one tenant's burst cannot fill the queue for all.
//! The dispatcher takes a [`ShareSlot`] for each job it queues; the slot travels with
//! the job and gives its place back when the job leaves the queue.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use super::dispatcher::QueueFull;
use crate::domain::ids::TenantId;

/// Each tenant's jobs waiting in the queue, against the same limit. The map is
/// built once from the configured tenants and never changes, so counting is one
/// lookup and one atomic compare-and-swap: no lock on the CreateChallenge path.
#[derive(Debug, Default)]
pub(super) struct TenantShares {
    limit: usize,
    queued: HashMap<TenantId, Arc<AtomicUsize>>,
}

impl TenantShares {
    /// Counts the jobs of `tenants`, at most `limit` each in a queue of `capacity`.
    pub(super) fn new(tenants: &[TenantId], limit: usize, capacity: usize) -> Self {
        // A share as large as the queue bounds nothing the queue does not.
        if limit >= capacity {
            return Self::default();
        }
        let queued = tenants.iter().map(|tenant| (tenant.clone(), Arc::default())).collect();
        Self { limit, queued }
    }

    /// Whether `count` more jobs of `tenant` fit in its share now.
    pub(super) fn has_room(&self, tenant: &TenantId, count: usize) -> bool {
        self.queued.get(tenant).is_none_or(|queued| queued.load(Ordering::Acquire).saturating_add(count) <= self.limit)
    }

    /// Counts one more job of `tenant`, or refuses it past the tenant's share.
    /// `None`: the tenant is not counted.
    pub(super) fn take(&self, tenant: &TenantId) -> Result<Option<ShareSlot>, QueueFull> {
        let Some(queued) = self.queued.get(tenant) else { return Ok(None) };
        // Compare-and-swap, not add-then-check: a refused job never shows in the
        // count, so it cannot make a concurrent job of the same tenant fail too.
        queued
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| (n < self.limit).then_some(n + 1))
            .map_err(|_| QueueFull::TenantShare)?;
        Ok(Some(ShareSlot(Arc::clone(queued))))
    }
}

/// One job's place in its tenant's share, given back when dropped: when the worker
/// takes the job off the queue, or when the queue refuses it, or at shutdown with
/// the queue. Tied to the job so that no path can forget to give it back.
#[derive(Debug)]
pub(super) struct ShareSlot(Arc<AtomicUsize>);

impl Drop for ShareSlot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tenant(id: &str) -> TenantId {
        TenantId(id.into())
    }

    #[test]
    fn each_tenant_is_counted_up_to_its_share_and_a_dropped_slot_gives_its_place_back() {
        let shares = TenantShares::new(&[tenant("a"), tenant("b")], 3, 4);
        let slots: Vec<_> = (0..3).map(|_| shares.take(&tenant("a")).expect("room").expect("counted")).collect();
        assert_eq!(shares.take(&tenant("a")).map(|slot| slot.is_some()), Err(QueueFull::TenantShare));
        assert!(!shares.has_room(&tenant("a"), 1));
        assert!(shares.has_room(&tenant("b"), 3), "b has a share of its own");
        assert!(shares.take(&tenant("other")).expect("not counted").is_none(), "a tenant not configured is not counted");
        drop(slots);
        assert!(shares.has_room(&tenant("a"), 3));
    }

    #[test]
    fn a_share_as_large_as_the_queue_counts_nothing() {
        let shares = TenantShares::new(&[tenant("a")], 4, 4);
        assert!(shares.queued.is_empty());
        assert!((0..10).all(|_| shares.take(&tenant("a")).is_ok_and(|slot| slot.is_none())));
    }
}
