//! The push dispatcher: a bounded queue in front of the providers.
//!
//! CreateChallenge enqueues one job per device and returns at once. When the queue
//! is full, enqueueing fails and the caller answers RESOURCE_EXHAUSTED: overload is
//! refused quickly instead of queueing without bound. Each tenant's jobs in the queue
//! are counted, and past its share (`push.queue_share_per_tenant`) that tenant's
//! jobs are refused while the others' still go in: one tenant's burst cannot fill
//! the queue for everyone. Jobs run concurrently up to a
//! limit, and each provider's sends up to that provider's own limit (a slow provider
//! holds its own permits, not the other's sends); retryable failures back off
//! exponentially with jitter, honour the provider's Retry-After, and never retry
//! past the challenge's expiry. Every attempt is counted and timed per provider
//! ([`crate::telemetry::metrics::names`], `PUSH_*`).

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::sync::{Semaphore, mpsc};
use tokio_util::sync::CancellationToken;
use tracing::Instrument as _;

use super::shares::{ShareSlot, TenantShares};
use super::{DeliveryReporter, PushJob, PushKind, PushSender, SendOutcome, redact_token};
use crate::domain::challenge::{DeliveryState, Platform};
use crate::domain::ids::TenantId;
use crate::domain::time::Clock;
use crate::telemetry::TraceOrigin;
use crate::telemetry::metrics::names;

#[derive(Clone, Debug)]
pub struct DispatcherSettings {
    pub queue_capacity: usize,
    pub max_in_flight: usize,
    pub max_attempts: u32,
    pub initial_backoff: Duration,
    pub max_backoff: Duration,
    /// The tenants whose jobs are counted, each against `max_queued_per_tenant`. A
    /// job of a tenant not listed counts against the whole queue only.
    pub tenants: Vec<TenantId>,
    /// Jobs of one tenant waiting in the queue at most; at `queue_capacity` or more
    /// nothing is counted per tenant.
    pub max_queued_per_tenant: usize,
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
            max_queued_per_tenant: usize::MAX,
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

/// The handle that enqueues jobs; cheap to clone.
#[derive(Clone)]
pub struct Dispatcher {
    queue: mpsc::Sender<QueuedJob>,
    counters: Arc<DispatcherCounters>,
    shares: Arc<TenantShares>,
}

impl Dispatcher {
    /// Starts the dispatcher's task; it stops when `shutdown` fires.
    pub fn start(
        senders: Vec<Arc<dyn PushSender>>,
        reporter: Arc<dyn DeliveryReporter>,
        clock: Arc<dyn Clock>,
        settings: DispatcherSettings,
        counters: Arc<DispatcherCounters>,
        shutdown: CancellationToken,
    ) -> Self {
        let (queue, jobs) = mpsc::channel(settings.queue_capacity.max(1));
        let shares = Arc::new(TenantShares::new(&settings.tenants, settings.max_queued_per_tenant, settings.queue_capacity));
        let provider_limits = senders
            .iter()
            .filter_map(|sender| Some((sender.platform(), Arc::new(Semaphore::new(sender.max_in_flight()?.max(1))))))
            .collect();
        let senders = senders.into_iter().map(|sender| (sender.platform(), sender)).collect();
        let worker = Worker { senders, provider_limits, reporter, clock, settings: settings.clone() };
        tokio::spawn(worker.run(jobs, shutdown));
        Self { queue, counters, shares }
    }

    /// Queues a job without waiting; fails at once when the queue is full or the
    /// job's tenant has its share of it waiting already.
    pub fn enqueue(&self, job: PushJob) -> Result<(), QueueFull> {
        let slot = self.shares.take(&job.tenant)?;
        // A refused job comes back with its slot, which is dropped here: given back.
        self.queue.try_send((job, TraceOrigin::current(), slot)).map_err(|_| QueueFull::Queue)?;
        self.counters.enqueued.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    /// Whether `count` more jobs of `tenant` fit now (CreateChallenge checks before
    /// it creates); the tenant's share is checked first, so a tenant past it hears so.
    pub fn room_for(&self, tenant: &TenantId, count: usize) -> Result<(), QueueFull> {
        if !self.shares.has_room(tenant, count) {
            return Err(QueueFull::TenantShare);
        }
        if self.queue.capacity() < count {
            return Err(QueueFull::Queue);
        }
        Ok(())
    }

    /// Jobs waiting in the queue now (the metrics endpoint samples it).
    pub fn queue_depth(&self) -> usize {
        self.queue.max_capacity().saturating_sub(self.queue.capacity())
    }

    pub fn queue_capacity(&self) -> usize {
        self.queue.max_capacity()
    }
}

struct Worker {
    senders: HashMap<Platform, Arc<dyn PushSender>>,
    /// Sends in flight per provider, for the providers that set a limit.
    provider_limits: HashMap<Platform, Arc<Semaphore>>,
    reporter: Arc<dyn DeliveryReporter>,
    clock: Arc<dyn Clock>,
    settings: DispatcherSettings,
}

impl Worker {
    async fn run(self, mut jobs: mpsc::Receiver<QueuedJob>, shutdown: CancellationToken) {
        let this = Arc::new(self);
        let in_flight = Arc::new(Semaphore::new(this.settings.max_in_flight.max(1)));
        loop {
            let job = tokio::select! {
                job = jobs.recv() => job,
                () = shutdown.cancelled() => None,
            };
            let Some((job, origin, share)) = job else { return };
            // The job has left the queue: its tenant's share has room for another
            // (as the queue has), whether or not a send slot is free yet.
            drop(share);
            let Ok(permit) = Arc::clone(&in_flight).acquire_owned().await else { return };
            let worker = Arc::clone(&this);
            let span = tracing::info_span!(
                "push",
                kind = job.kind.label(),
                challenge_id = job.challenge_id().map(tracing::field::display),
                device_id = %job.device_id,
                platform = job.platform.name()
            );
            origin.adopt(&span);
            tokio::spawn(
                async move {
                    worker.deliver(job).await;
                    drop(permit);
                }
                .instrument(span),
            );
        }
    }

    async fn deliver(&self, job: PushJob) {
        // Only a challenge has deliveries to record; any push can find a dead token.
        let reports = matches!(job.kind, PushKind::Challenge { .. });
        let Some(sender) = self.senders.get(&job.platform) else {
            if reports {
                self.reporter.report(&job, DeliveryState::Failed, 0, "not configured").await;
            }
            return;
        };
        let mut attempts = 0;
        let mut backoff = self.settings.initial_backoff;
        let (state, error) = loop {
            attempts += 1;
            let outcome = self.send_once(sender.as_ref(), &job).await;
            match outcome {
                SendOutcome::Sent => break (DeliveryState::Sent, String::new()),
                SendOutcome::Unregistered { reason } => {
                    tracing::info!(token = %redact_token(&job.push_token), %reason, "push token unregistered");
                    break (DeliveryState::Unregistered, reason);
                }
                SendOutcome::Failed { reason } => break (DeliveryState::Failed, reason),
                SendOutcome::Retry { reason, after } => {
                    let wait = after.unwrap_or_else(|| jittered(backoff));
                    backoff = (backoff * 2).min(self.settings.max_backoff);
                    let out_of_time = self.clock.now().plus(wait) >= job.expires_at;
                    if attempts >= self.settings.max_attempts || out_of_time {
                        break (DeliveryState::Failed, reason);
                    }
                    let retry_at = self.clock.now().plus(wait);
                    metrics::counter!(names::PUSH_RETRIES, "provider" => job.platform.name()).increment(1);
                    tracing::debug!(attempts, %reason, wait_ms = u64::try_from(wait.as_millis()).unwrap_or(u64::MAX), "push retry");
                    if reports {
                        self.reporter.report(&job, DeliveryState::Queued, attempts, &reason).await;
                    }
                    self.clock.sleep_until(retry_at).await;
                }
            }
        };
        record_delivery(job.platform, &job.kind, state);
        if reports || state == DeliveryState::Unregistered {
            self.reporter.report(&job, state, attempts, &error).await;
        }
    }

    /// One attempt, within the provider's concurrency limit, counted and timed.
    async fn send_once(&self, sender: &dyn PushSender, job: &PushJob) -> SendOutcome {
        let _permit = match self.provider_limits.get(&job.platform) {
            Some(limit) => match limit.acquire().await {
                Ok(permit) => Some(permit),
                // Never closed while the worker lives.
                Err(_) => return SendOutcome::Failed { reason: "shutting down".into() },
            },
            None => None,
        };
        let started = std::time::Instant::now();
        let outcome = sender.send(job).await;
        record_attempt(job.platform, &outcome, started.elapsed());
        outcome
    }
}

/// Counts and times one attempt.
fn record_attempt(platform: Platform, outcome: &SendOutcome, latency: Duration) {
    let outcome = match outcome {
        SendOutcome::Sent => "sent",
        SendOutcome::Unregistered { .. } => "unregistered",
        SendOutcome::Retry { .. } => "retry",
        SendOutcome::Failed { .. } => "failed",
    };
    metrics::counter!(names::PUSH_SENDS, "provider" => platform.name(), "outcome" => outcome).increment(1);
    metrics::histogram!(names::PUSH_LATENCY, "provider" => platform.name()).record(latency.as_secs_f64());
}

/// Counts a push done, by its kind and final state.
fn record_delivery(platform: Platform, kind: &PushKind, state: DeliveryState) {
    metrics::counter!(names::PUSH_DELIVERIES, "provider" => platform.name(), "kind" => kind.label(), "state" => delivery_state_label(state))
        .increment(1);
}

fn delivery_state_label(state: DeliveryState) -> &'static str {
    match state {
        DeliveryState::Sent => "sent",
        DeliveryState::Unregistered => "unregistered",
        _ => "failed",
    }
}

/// Full jitter: a uniform wait between half and all of `backoff`, so retries from
/// many devices do not arrive at the provider in lockstep.
fn jittered(backoff: Duration) -> Duration {
    let mut byte = [0u8; 2];
    let fraction = match getrandom::fill(&mut byte) {
        Ok(()) => f64::from(u16::from_le_bytes(byte)) / f64::from(u16::MAX),
        Err(_) => 1.0,
    };
    backoff.mul_f64(0.5 + fraction / 2.0)
}

#[cfg(test)]
mod tests;
