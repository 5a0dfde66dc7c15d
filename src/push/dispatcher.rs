//! The push dispatcher: a bounded queue in front of the providers.
//!
//! CreateChallenge enqueues one job per device and returns at once. When the queue
//! is full, enqueueing fails and the caller answers RESOURCE_EXHAUSTED: overload is
//! refused quickly instead of queueing without bound. Jobs run concurrently up to a
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

use super::{DeliveryReporter, PushJob, PushKind, PushSender, SendOutcome, redact_token};
use crate::domain::challenge::{DeliveryState, Platform};
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
}

impl Default for DispatcherSettings {
    fn default() -> Self {
        Self {
            queue_capacity: 10_000,
            max_in_flight: 512,
            max_attempts: 5,
            initial_backoff: Duration::from_millis(200),
            max_backoff: Duration::from_secs(5),
        }
    }
}

#[derive(Debug, thiserror::Error)]
#[error("the push queue is full")]
pub struct QueueFull;

/// Jobs accepted into the queue since start; the end-to-end tests read it to see
/// that a refused call queued nothing.
#[derive(Debug, Default)]
pub struct DispatcherCounters {
    pub enqueued: AtomicU64,
}

/// A queued job and the trace it was queued in (the CreateChallenge call), so the
/// push's span continues that call's trace.
type QueuedJob = (PushJob, TraceOrigin);

/// The handle that enqueues jobs; cheap to clone.
#[derive(Clone)]
pub struct Dispatcher {
    queue: mpsc::Sender<QueuedJob>,
    counters: Arc<DispatcherCounters>,
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
        let provider_limits = senders
            .iter()
            .filter_map(|sender| Some((sender.platform(), Arc::new(Semaphore::new(sender.max_in_flight()?.max(1))))))
            .collect();
        let senders = senders.into_iter().map(|sender| (sender.platform(), sender)).collect();
        let worker = Worker { senders, provider_limits, reporter, clock, settings: settings.clone() };
        tokio::spawn(worker.run(jobs, shutdown));
        Self { queue, counters }
    }

    /// Queues a job without waiting; fails at once when the queue is full.
    pub fn enqueue(&self, job: PushJob) -> Result<(), QueueFull> {
        self.queue.try_send((job, TraceOrigin::current())).map_err(|_| QueueFull)?;
        self.counters.enqueued.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    /// Whether `count` more jobs fit now (CreateChallenge checks before it creates).
    pub fn has_room_for(&self, count: usize) -> bool {
        self.queue.capacity() >= count
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
            let Some((job, origin)) = job else { return };
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
mod tests {
    use std::sync::Mutex;

    use async_trait::async_trait;

    use super::*;
    use crate::domain::ids::{ChallengeId, DeviceId};
    use crate::domain::time::{ManualClock, Millis};

    struct Scripted {
        outcomes: Mutex<Vec<SendOutcome>>,
    }

    #[async_trait]
    impl PushSender for Scripted {
        fn platform(&self) -> Platform {
            Platform::Fcm
        }
        async fn send(&self, _job: &PushJob) -> SendOutcome {
            let mut outcomes = self.outcomes.lock().expect("lock");
            if outcomes.is_empty() { SendOutcome::Sent } else { outcomes.remove(0) }
        }
    }

    /// Every report, in order, behind a watch so several waiters can follow it.
    struct Reports {
        seen: tokio::sync::watch::Sender<Vec<(DeliveryState, u32, String)>>,
    }

    impl Default for Reports {
        fn default() -> Self {
            Self { seen: tokio::sync::watch::Sender::new(vec![]) }
        }
    }

    #[async_trait]
    impl DeliveryReporter for Reports {
        async fn report(&self, _job: &PushJob, state: DeliveryState, attempts: u32, error: &str) {
            self.seen.send_modify(|seen| seen.push((state, attempts, error.to_owned())));
        }
    }

    fn job(platform: Platform, clock: &ManualClock) -> PushJob {
        PushJob {
            kind: PushKind::Challenge { challenge_id: ChallengeId::generate().expect("id") },
            device_id: DeviceId::generate().expect("id"),
            platform,
            push_token: "token".into(),
            expires_at: clock.now().plus(Duration::from_secs(60)),
        }
    }

    async fn final_report(reports: &Reports) -> (DeliveryState, u32, String) {
        let mut seen = reports.seen.subscribe();
        let last = tokio::time::timeout(
            Duration::from_secs(5),
            seen.wait_for(|seen| seen.last().is_some_and(|r| r.0 != DeliveryState::Queued)),
        )
        .await
        .expect("a final report in time")
        .expect("reporter alive");
        last.last().cloned().expect("a report")
    }

    fn start(outcomes: Vec<SendOutcome>, clock: &ManualClock, reports: &Arc<Reports>, capacity: usize) -> Dispatcher {
        let sender: Arc<dyn PushSender> = Arc::new(Scripted { outcomes: Mutex::new(outcomes) });
        let settings = DispatcherSettings { queue_capacity: capacity, ..DispatcherSettings::default() };
        Dispatcher::start(
            vec![sender],
            reports.clone(),
            Arc::new(clock.clone()),
            settings,
            Arc::default(),
            CancellationToken::new(),
        )
    }

    #[tokio::test]
    async fn a_platform_without_sender_reads_not_configured() {
        let clock = ManualClock::new(Millis(0));
        let reports = Arc::new(Reports::default());
        let dispatcher = start(vec![], &clock, &reports, 8);
        dispatcher.enqueue(job(Platform::Apns, &clock)).expect("room");
        assert_eq!(final_report(&reports).await, (DeliveryState::Failed, 0, "not configured".into()));
    }

    #[tokio::test]
    async fn retryable_failures_are_retried_until_sent() {
        let clock = ManualClock::new(Millis(0));
        let reports = Arc::new(Reports::default());
        let retry = || SendOutcome::Retry { reason: "503".into(), after: Some(Duration::from_millis(1)) };
        let dispatcher = start(vec![retry(), retry()], &clock, &reports, 8);
        dispatcher.enqueue(job(Platform::Fcm, &clock)).expect("room");
        let advancing = {
            let clock = clock.clone();
            let reports = reports.clone();
            async move {
                // Each retry sleeps on the manual clock: move it along as the queued reports appear.
                let mut seen = reports.seen.subscribe();
                while seen.changed().await.is_ok() {
                    clock.advance(Duration::from_millis(5));
                }
            }
        };
        let result = tokio::select! { r = final_report(&reports) => r, () = advancing => panic!("reporter gone") };
        assert_eq!(result, (DeliveryState::Sent, 3, String::new()));
    }

    #[tokio::test]
    async fn retries_stop_before_the_challenge_expires() {
        let clock = ManualClock::new(Millis(0));
        let reports = Arc::new(Reports::default());
        let retry = SendOutcome::Retry { reason: "429".into(), after: Some(Duration::from_secs(120)) };
        let dispatcher = start(vec![retry], &clock, &reports, 8);
        dispatcher.enqueue(job(Platform::Fcm, &clock)).expect("room");
        assert_eq!(final_report(&reports).await, (DeliveryState::Failed, 1, "429".into()));
    }

    #[tokio::test]
    async fn a_full_queue_refuses_at_once() {
        let clock = ManualClock::new(Millis(0));
        let reports = Arc::new(Reports::default());
        // Capacity 1 and a worker that may take one job off: at most two fit quickly,
        // and a burst of ten must see a refusal.
        let dispatcher = start(vec![], &clock, &reports, 1);
        let refused = (0..10).map(|_| dispatcher.enqueue(job(Platform::Apns, &clock))).filter(Result::is_err).count();
        assert!(refused > 0);
    }

    /// Holds every send until opened; follows how many are in flight.
    struct Gate {
        platform: Platform,
        limit: usize,
        in_flight: tokio::sync::watch::Sender<usize>,
        most: AtomicU64,
        open: tokio::sync::watch::Sender<bool>,
    }

    impl Gate {
        fn new(platform: Platform, limit: usize) -> Arc<Self> {
            Arc::new(Self {
                platform,
                limit,
                in_flight: tokio::sync::watch::Sender::new(0),
                most: AtomicU64::new(0),
                open: tokio::sync::watch::Sender::new(false),
            })
        }
    }

    #[async_trait]
    impl PushSender for Gate {
        fn platform(&self) -> Platform {
            self.platform
        }
        fn max_in_flight(&self) -> Option<usize> {
            Some(self.limit)
        }
        async fn send(&self, _job: &PushJob) -> SendOutcome {
            self.in_flight.send_modify(|n| *n += 1);
            self.most.fetch_max(*self.in_flight.borrow() as u64, Ordering::SeqCst);
            let _ = self.open.subscribe().wait_for(|open| *open).await;
            self.in_flight.send_modify(|n| *n -= 1);
            SendOutcome::Sent
        }
    }

    #[tokio::test]
    async fn each_provider_sends_at_most_its_own_limit_and_a_stuck_one_does_not_hold_the_other() {
        let clock = ManualClock::new(Millis(0));
        let reports = Arc::new(Reports::default());
        let (apns, fcm) = (Gate::new(Platform::Apns, 2), Gate::new(Platform::Fcm, 3));
        let dispatcher = Dispatcher::start(
            vec![apns.clone(), fcm.clone()],
            reports.clone(),
            Arc::new(clock.clone()),
            DispatcherSettings { queue_capacity: 64, ..DispatcherSettings::default() },
            Arc::default(),
            CancellationToken::new(),
        );
        for _ in 0..10 {
            dispatcher.enqueue(job(Platform::Apns, &clock)).expect("room");
        }
        for _ in 0..10 {
            dispatcher.enqueue(job(Platform::Fcm, &clock)).expect("room");
        }
        // APNs is stuck at its limit with eight more waiting, and FCM still fills its own.
        let reached = |gate: &Arc<Gate>| {
            let gate = Arc::clone(gate);
            async move {
                let mut in_flight = gate.in_flight.subscribe();
                let _ = in_flight.wait_for(|n| *n == gate.limit).await;
            }
        };
        tokio::time::timeout(Duration::from_secs(5), futures::future::join(reached(&apns), reached(&fcm)))
            .await
            .expect("both providers reach their limits");
        apns.open.send_replace(true);
        fcm.open.send_replace(true);
        let mut seen = reports.seen.subscribe();
        tokio::time::timeout(Duration::from_secs(5), seen.wait_for(|seen| seen.len() == 20))
            .await
            .expect("all sent")
            .expect("alive");
        assert_eq!(apns.most.load(Ordering::SeqCst), 2);
        assert_eq!(fcm.most.load(Ordering::SeqCst), 3);
    }

    fn notice(clock: &ManualClock) -> PushJob {
        PushJob {
            kind: PushKind::NewDevice {
                new_device_id: DeviceId::generate().expect("id"),
                method: crate::domain::enrollment::EnrollmentKind::Push,
                enrolled_at: clock.now(),
            },
            ..job(Platform::Fcm, clock)
        }
    }

    #[tokio::test]
    async fn a_notice_reports_a_dead_token_and_nothing_else() {
        let clock = ManualClock::new(Millis(0));
        let reports = Arc::new(Reports::default());
        let unregistered = SendOutcome::Unregistered { reason: "UNREGISTERED".into() };
        let sender: Arc<dyn PushSender> =
            Arc::new(Scripted { outcomes: Mutex::new(vec![SendOutcome::Sent, retry_now(), unregistered]) });
        // One job at a time: the first notice is done, reported or not, before the second starts.
        let settings = DispatcherSettings { max_in_flight: 1, ..DispatcherSettings::default() };
        let dispatcher = Dispatcher::start(
            vec![sender],
            reports.clone(),
            Arc::new(clock.clone()),
            settings,
            Arc::default(),
            CancellationToken::new(),
        );
        dispatcher.enqueue(notice(&clock)).expect("room");
        dispatcher.enqueue(notice(&clock)).expect("room");
        // Neither the first notice's SENT nor the second's retry is reported (a notice
        // has no delivery to record); its dead token is, so pushes go off for the device.
        assert_eq!(final_report(&reports).await, (DeliveryState::Unregistered, 2, "UNREGISTERED".into()));
        assert_eq!(reports.seen.borrow().len(), 1, "{:?}", reports.seen.borrow());
    }

    /// A retry due at once, so the manual clock need not move.
    fn retry_now() -> SendOutcome {
        SendOutcome::Retry { reason: "503".into(), after: Some(Duration::ZERO) }
    }

    #[test]
    fn deliveries_are_counted_by_kind() {
        let recorder = metrics_exporter_prometheus::PrometheusBuilder::new().build_recorder();
        let handle = recorder.handle();
        let clock = ManualClock::new(Millis(0));
        metrics::with_local_recorder(&recorder, || {
            record_delivery(Platform::Fcm, &job(Platform::Fcm, &clock).kind, DeliveryState::Sent);
            record_delivery(Platform::Apns, &notice(&clock).kind, DeliveryState::Sent);
            record_delivery(Platform::Apns, &notice(&clock).kind, DeliveryState::Unregistered);
        });
        let text = handle.render();
        for expected in [
            r#"pushmatch_push_deliveries_total{provider="fcm",kind="challenge",state="sent"} 1"#,
            r#"pushmatch_push_deliveries_total{provider="apns",kind="new_device",state="sent"} 1"#,
            r#"pushmatch_push_deliveries_total{provider="apns",kind="new_device",state="unregistered"} 1"#,
        ] {
            assert!(text.contains(expected), "{expected} in\n{text}");
        }
    }

    #[test]
    fn attempts_are_counted_and_timed_per_provider() {
        let recorder = metrics_exporter_prometheus::PrometheusBuilder::new().build_recorder();
        let handle = recorder.handle();
        metrics::with_local_recorder(&recorder, || {
            record_attempt(Platform::Apns, &SendOutcome::Sent, Duration::from_millis(12));
            record_attempt(Platform::Apns, &SendOutcome::Sent, Duration::from_millis(20));
            record_attempt(
                Platform::Fcm,
                &SendOutcome::Retry { reason: "HTTP 503".into(), after: None },
                Duration::from_millis(5),
            );
        });
        let text = handle.render();
        for expected in [
            r#"pushmatch_push_sends_total{provider="apns",outcome="sent"} 2"#,
            r#"pushmatch_push_sends_total{provider="fcm",outcome="retry"} 1"#,
            r#"pushmatch_push_latency_seconds_count{provider="apns"} 2"#,
        ] {
            assert!(text.contains(expected), "{expected} in\n{text}");
        }
    }
}
