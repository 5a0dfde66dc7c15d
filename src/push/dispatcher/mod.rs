//! The push dispatcher: a bounded queue per provider in front of the providers.
//!
//! CreateChallenge enqueues one job per device and returns at once. Each provider
//! (APNs, FCM) has a queue, a worker and a send limit of its own, so a provider that
//! hangs or answers 503 fills its own queue and its own sends, and the other
//! provider's pushes go out as before ([`lane`]). When a provider's queue is full,
//! enqueueing fails and the caller answers RESOURCE_EXHAUSTED: overload is refused
//! quickly instead of queueing without bound. Each tenant's jobs in each queue are
//! counted, and past its share (`push.queue_share_per_tenant`) that tenant's jobs
//! are refused while the others' still go in: one tenant's burst cannot fill a
//! queue for everyone.
//!
//! Concurrency: a provider has at most `push.max_in_flight` of its pushes out of
//! its queue (sending, waiting to send, or backing off before a retry), at most its
//! own `max_in_flight` sends at once, and all providers together at most
//! `push.max_in_flight` sends at once. A send takes its provider's place first and a
//! shared place second, and gives both back when the answer is in, before any
//! retry's backoff: a push waiting on a stuck provider, or sleeping before its
//! retry, holds nothing the other provider needs. Retryable failures back off
//! exponentially with jitter, honour the provider's Retry-After, and never retry
//! past the challenge's expiry. Every request sent to a provider is an attempt, the
//! one sent again at once with a renewed provider token too; each is counted and
//! timed per provider ([`crate::telemetry::metrics::names`], `PUSH_*`).

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::sync::{Semaphore, mpsc};
use tokio_util::sync::CancellationToken;

use super::shares::{ShareSlot, TenantShares};
use super::{DeliveryReporter, PushJob, PushKind, PushSender, SendOutcome};
use crate::domain::challenge::{DeliveryState, Platform, PushRoom};
use crate::domain::ids::TenantId;
use crate::domain::time::Clock;
use crate::telemetry::TraceOrigin;
use crate::telemetry::metrics::names;

mod lane;

use lane::{Lane, Shared};

/// Every provider, each with its own lane.
pub const PLATFORMS: [Platform; 3] = Platform::ALL;

#[derive(Clone, Debug)]
pub struct DispatcherSettings {
    /// Jobs waiting in each provider's queue at most.
    pub queue_capacity: usize,
    /// Sends at once, all providers together; and each provider's jobs out of its
    /// queue (sending, waiting to send, backing off) at most.
    pub max_in_flight: usize,
    pub max_attempts: u32,
    pub initial_backoff: Duration,
    pub max_backoff: Duration,
    /// The tenants whose jobs are counted, each with the most of its jobs that may
    /// wait in each provider's queue (at `queue_capacity` or more the tenant is not
    /// counted). A job of a tenant not listed counts against the whole queue only.
    pub tenants: Vec<(TenantId, usize)>,
}

impl Default for DispatcherSettings {
    fn default() -> Self {
        Self {
            queue_capacity: 10_000,
            max_in_flight: 512,
            max_attempts: 5,
            initial_backoff: Duration::from_millis(200),
            max_backoff: Duration::from_secs(5),
            tenants: Vec::new(),
        }
    }
}

/// Why a job found no room; the message names the setting that bounds it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum QueueFull {
    #[error("the push queue is full (push.queue_capacity)")]
    Queue,
    #[error("the push queue is full for this tenant: its pushes waiting fill its share (push.queue_share_per_tenant)")]
    TenantShare,
}

impl QueueFull {
    /// The configuration key of the limit that was reached (a metric label).
    pub fn setting(self) -> &'static str {
        match self {
            Self::Queue => "push.queue_capacity",
            Self::TenantShare => "push.queue_share_per_tenant",
        }
    }
}

/// Jobs accepted into the queue since start; the end-to-end tests read it to see
/// that a refused call queued nothing.
#[derive(Debug, Default)]
pub struct DispatcherCounters {
    pub enqueued: AtomicU64,
}

/// A queued job, the trace it was queued in (the CreateChallenge call), so the
/// push's span continues that call's trace, and its place in its tenant's share.
type QueuedJob = (PushJob, TraceOrigin, Option<ShareSlot>);

/// One provider's queue, as the enqueueing side sees it.
struct Queue {
    jobs: mpsc::Sender<QueuedJob>,
    shares: TenantShares,
}

/// Each provider's queue, in the order of [`Platform::index`].
struct Queues([Queue; PLATFORMS.len()]);

impl Queues {
    fn of(&self, platform: Platform) -> &Queue {
        &self.0[platform.index()]
    }
}

/// The handle that enqueues jobs; cheap to clone.
#[derive(Clone)]
pub struct Dispatcher {
    queues: Arc<Queues>,
    counters: Arc<DispatcherCounters>,
}

impl Dispatcher {
    /// Starts a worker per provider; they stop when `shutdown` fires. A platform
    /// without a sender gets a worker too: its deliveries read FAILED / "not configured".
    pub fn start(
        senders: Vec<Arc<dyn PushSender>>,
        reporter: Arc<dyn DeliveryReporter>,
        clock: Arc<dyn Clock>,
        settings: DispatcherSettings,
        counters: Arc<DispatcherCounters>,
        shutdown: CancellationToken,
    ) -> Self {
        warn_if_one_provider_can_starve_the_other(&senders, settings.max_in_flight);
        let shared = Arc::new(Shared {
            sends: Semaphore::new(settings.max_in_flight.max(1)),
            reporter,
            clock,
            settings: settings.clone(),
        });
        let queue = |platform: Platform| {
            let (jobs, receiver) = mpsc::channel(settings.queue_capacity.max(1));
            let sender = senders.iter().find(|sender| sender.platform() == platform).cloned();
            let lane = Lane::new(platform, sender, Arc::clone(&shared));
            tokio::spawn(lane.run(receiver, shutdown.clone()));
            let shares = TenantShares::new(&settings.tenants, settings.queue_capacity);
            Queue { jobs, shares }
        };
        let queues = Queues(PLATFORMS.map(queue));
        Self { queues: Arc::new(queues), counters }
    }

    /// Queues a job on its provider's queue without waiting; fails at once when that
    /// queue is full or the job's tenant has its share of it waiting already.
    pub fn enqueue(&self, job: PushJob) -> Result<(), QueueFull> {
        let queue = self.queues.of(job.platform);
        let slot = queue.shares.take(&job.tenant)?;
        // A refused job comes back with its slot, which is dropped here: given back.
        queue.jobs.try_send((job, TraceOrigin::current(), slot)).map_err(|_| QueueFull::Queue)?;
        self.counters.enqueued.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    /// Counts the jobs of `tenants` (each with its limit) from now on, in every
    /// provider's queue; jobs queued before keep their places.
    pub fn set_tenants(&self, tenants: &[(TenantId, usize)]) {
        for queue in &self.queues.0 {
            queue.shares.set(tenants, queue.jobs.max_capacity());
        }
    }

    /// Whether jobs of `tenant` to these `platforms` (one per push) fit now
    /// (CreateChallenge checks before it creates); the tenant's shares are checked
    /// first, so a tenant past one hears so.
    pub fn room_for(&self, tenant: &TenantId, platforms: impl IntoIterator<Item = Platform>) -> Result<(), QueueFull> {
        let mut counts = [0; PLATFORMS.len()];
        for platform in platforms {
            counts[platform.index()] += 1;
        }
        let wanted = self.queues.0.iter().zip(counts);
        let wanted = wanted.filter(|(_, count)| *count > 0);
        if wanted.clone().any(|(queue, count)| !queue.shares.has_room(tenant, count)) {
            return Err(QueueFull::TenantShare);
        }
        if wanted.clone().any(|(queue, count)| queue.jobs.capacity() < count) {
            return Err(QueueFull::Queue);
        }
        Ok(())
    }

    /// How many more pushes of `tenant` each queue takes now: what
    /// [`Dispatcher::room_for`] checks, for a store that chooses the pushes itself.
    pub fn room(&self, tenant: &TenantId) -> PushRoom {
        PushRoom(Platform::ALL.map(|platform| {
            let queue = self.queues.of(platform);
            queue.shares.room(tenant).min(queue.jobs.capacity())
        }))
    }

    /// Jobs waiting in `platform`'s queue now (the metrics endpoint samples it).
    pub fn queue_depth(&self, platform: Platform) -> usize {
        let jobs = &self.queues.of(platform).jobs;
        jobs.max_capacity().saturating_sub(jobs.capacity())
    }

    /// The capacity of each provider's queue.
    pub fn queue_capacity(&self) -> usize {
        self.queues.0[0].jobs.max_capacity()
    }
}

/// A send takes its provider's place before a shared one, so a stuck provider holds
/// at most its own `max_in_flight` of the shared `push.max_in_flight`; when the
/// providers' limits together exceed it, a stuck provider leaves the other fewer
/// sends than its own limit. Said once at start.
fn warn_if_one_provider_can_starve_the_other(senders: &[Arc<dyn PushSender>], max_in_flight: usize) {
    let limits: Vec<usize> = senders.iter().map(|sender| sender.max_in_flight().unwrap_or(max_in_flight)).collect();
    let together: usize = limits.iter().sum();
    if limits.len() > 1 && together > max_in_flight {
        tracing::warn!(
            providers_together = together,
            max_in_flight,
            "push.max_in_flight is below the providers' max_in_flight together: a stuck provider can hold sends the other needs"
        );
    }
}

/// Counts and times one attempt.
fn record_attempt(platform: Platform, outcome: &SendOutcome, latency: Duration) {
    metrics::counter!(names::PUSH_SENDS, "provider" => platform.name(), "outcome" => outcome.label()).increment(1);
    metrics::histogram!(names::PUSH_LATENCY, "provider" => platform.name()).record(latency.as_secs_f64());
}

/// Counts a push done, by its tenant, kind and final state (only configured
/// tenants' jobs are queued, so the tenant label is bounded).
fn record_delivery(platform: Platform, job: &PushJob, state: DeliveryState) {
    metrics::counter!(names::PUSH_DELIVERIES, "tenant" => job.tenant.0.clone(), "provider" => platform.name(), "kind" => job.kind.label(), "state" => delivery_state_label(state))
        .increment(1);
}

fn delivery_state_label(state: DeliveryState) -> &'static str {
    match state {
        DeliveryState::Sent => "sent",
        DeliveryState::Unregistered => "unregistered",
        _ => "failed",
    }
}

/// Registers every push series at zero (at start, so that `rate()` and alerts see
/// them before the first push): per provider, each attempt outcome, each kind and
/// final state (per tenant of `tenants`), the retries, the latency histogram and the
/// token renewals. Adding zero keeps what another server in the same process
/// counted already.
pub fn register_series<'a>(tenants: impl IntoIterator<Item = &'a str> + Clone) {
    for platform in PLATFORMS {
        let provider = platform.name();
        for outcome in SendOutcome::LABELS {
            metrics::counter!(names::PUSH_SENDS, "provider" => provider, "outcome" => *outcome).increment(0);
        }
        for tenant in tenants.clone() {
            for kind in PushKind::LABELS {
                for state in [DeliveryState::Sent, DeliveryState::Failed, DeliveryState::Unregistered] {
                    let state = delivery_state_label(state);
                    metrics::counter!(names::PUSH_DELIVERIES, "tenant" => tenant.to_owned(), "provider" => provider, "kind" => *kind, "state" => state)
                        .increment(0);
                }
            }
        }
        metrics::counter!(names::PUSH_RETRIES, "provider" => provider).increment(0);
        metrics::counter!(names::PUSH_TOKEN_RENEWALS, "provider" => provider).increment(0);
        let _registered = metrics::histogram!(names::PUSH_LATENCY, "provider" => provider);
        metrics::gauge!(names::PUSH_QUEUE_DEPTH, "provider" => provider).increment(0.0);
        metrics::gauge!(names::PUSH_QUEUE_CAPACITY, "provider" => provider).increment(0.0);
    }
}

#[cfg(test)]
mod tests;
