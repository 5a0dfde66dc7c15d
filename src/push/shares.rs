//! Each tenant's share of the push queue: how many of its jobs wait in the queue,
//! against its limit (`push.queue_share_per_tenant` of `push.queue_capacity`, or the
//! tenant's own `push_queue_share`), so that one tenant's burst cannot fill the
//! queue for all.
//! The dispatcher takes a [`ShareSlot`] for each job it queues; the slot travels with
//! the job and gives its place back when the job leaves the queue.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use arc_swap::ArcSwap;

use super::dispatcher::QueueFull;
use crate::domain::ids::TenantId;

/// Each tenant's jobs waiting in the queue, each against its own limit. The map is
/// swapped whole when the tenants change ([`TenantShares::set`]) and read without a
/// lock, so counting is one lookup and one atomic compare-and-swap on the
/// CreateChallenge path.
#[derive(Debug, Default)]
pub(super) struct TenantShares {
    queued: ArcSwap<HashMap<TenantId, Counter>>,
}

#[derive(Clone, Debug)]
struct Counter {
    limit: usize,
    queued: Arc<AtomicUsize>,
}

impl TenantShares {
    /// Counts the jobs of each of `tenants`, at most its limit each in a queue of `capacity`.
    pub(super) fn new(tenants: &[(TenantId, usize)], capacity: usize) -> Self {
        let shares = Self::default();
        shares.set(tenants, capacity);
        shares
    }

    /// Counts the jobs of `tenants` from now on. A tenant that stays keeps its count
    /// (its jobs in the queue still hold their places); a share as large as the
    /// queue bounds nothing the queue does not, so it is not counted.
    pub(super) fn set(&self, tenants: &[(TenantId, usize)], capacity: usize) {
        let previous = self.queued.load();
        let queued = tenants
            .iter()
            .filter(|(_, limit)| *limit < capacity)
            .map(|(tenant, limit)| {
                let queued = previous.get(tenant).map_or_else(Arc::default, |kept| Arc::clone(&kept.queued));
                (tenant.clone(), Counter { limit: *limit, queued })
            })
            .collect();
        self.queued.store(Arc::new(queued));
    }

    /// Whether `count` more jobs of `tenant` fit in its share now.
    pub(super) fn has_room(&self, tenant: &TenantId, count: usize) -> bool {
        count <= self.room(tenant)
    }

    /// How many more jobs of `tenant` fit in its share now (`usize::MAX`: the
    /// tenant is not counted).
    pub(super) fn room(&self, tenant: &TenantId) -> usize {
        self.queued
            .load()
            .get(tenant)
            .map_or(usize::MAX, |counter| counter.limit.saturating_sub(counter.queued.load(Ordering::Acquire)))
    }

    /// Counts one more job of `tenant`, or refuses it past the tenant's share.
    /// `None`: the tenant is not counted.
    pub(super) fn take(&self, tenant: &TenantId) -> Result<Option<ShareSlot>, QueueFull> {
        let map = self.queued.load();
        let Some(counter) = map.get(tenant) else { return Ok(None) };
        // Compare-and-swap, not add-then-check: a refused job never shows in the
        // count, so it cannot make a concurrent job of the same tenant fail too.
        counter
            .queued
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| (n < counter.limit).then_some(n + 1))
            .map_err(|_| QueueFull::TenantShare)?;
        Ok(Some(ShareSlot(Arc::clone(&counter.queued))))
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
        let shares = TenantShares::new(&[(tenant("a"), 3), (tenant("b"), 3)], 4);
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
        let shares = TenantShares::new(&[(tenant("a"), 4)], 4);
        assert!(shares.queued.load().is_empty());
        assert!((0..10).all(|_| shares.take(&tenant("a")).is_ok_and(|slot| slot.is_none())));
    }

    #[test]
    fn new_tenants_are_counted_after_a_change_and_a_staying_tenant_keeps_its_count() {
        let shares = TenantShares::new(&[(tenant("a"), 2)], 10);
        let held = shares.take(&tenant("a")).expect("room").expect("counted");
        assert!(shares.take(&tenant("b")).expect("not counted yet").is_none());
        shares.set(&[(tenant("a"), 2), (tenant("b"), 1)], 10);
        let _b = shares.take(&tenant("b")).expect("room").expect("b is counted now");
        assert_eq!(shares.take(&tenant("b")).map(|slot| slot.is_some()), Err(QueueFull::TenantShare), "b's own limit");
        let _second = shares.take(&tenant("a")).expect("room").expect("a's second");
        assert_eq!(
            shares.take(&tenant("a")).map(|slot| slot.is_some()),
            Err(QueueFull::TenantShare),
            "the held job still counts"
        );
        drop(held);
        assert!(shares.has_room(&tenant("a"), 1), "the job queued before the change gives its place back");
    }
}
