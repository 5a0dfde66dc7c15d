//! One provider's lane: the worker that takes its jobs off its queue and delivers
//! them, with that provider's send limit. Lanes share only the reporter, the clock
//! and the shared send places (`push.max_in_flight`), and a push holds a shared
//! place only while its request is out: never while it waits for its provider's
//! place, never through a retry's backoff. So a provider that hangs or answers 503
//! stalls its own lane and leaves the other's alone.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{Semaphore, mpsc};
use tokio_util::sync::CancellationToken;
use tracing::Instrument as _;

use super::{DispatcherSettings, QueuedJob, record_attempt, record_delivery};
use crate::domain::challenge::{DeliveryState, Platform};
use crate::domain::time::Clock;
use crate::push::{DeliveryReporter, PushJob, PushKind, PushSender, SendOutcome, redact_token};
use crate::telemetry::metrics::names;

/// What every lane shares.
pub(super) struct Shared {
    /// Sends in flight at once, all providers together (`push.max_in_flight`).
    pub(super) sends: Semaphore,
    pub(super) reporter: Arc<dyn DeliveryReporter>,
    pub(super) clock: Arc<dyn Clock>,
    pub(super) settings: DispatcherSettings,
}

pub(super) struct Lane {
    platform: Platform,
    /// `None`: the provider is not configured; its deliveries read FAILED.
    sender: Option<Arc<dyn PushSender>>,
    /// This provider's sends in flight, when it sets a limit.
    sends: Option<Semaphore>,
    shared: Arc<Shared>,
}

impl Lane {
    pub(super) fn new(platform: Platform, sender: Option<Arc<dyn PushSender>>, shared: Arc<Shared>) -> Self {
        let sends = sender.as_ref().and_then(|sender| sender.max_in_flight()).map(|limit| Semaphore::new(limit.max(1)));
        Self { platform, sender, sends, shared }
    }

    /// Takes jobs off the lane's queue until `shutdown` fires, each into a task of
    /// its own, with at most `push.max_in_flight` of them out of the queue at once
    /// (sending, waiting to send, or backing off): past that the queue fills, and
    /// CreateChallenge is refused for this provider's pushes only.
    pub(super) async fn run(self, mut jobs: mpsc::Receiver<QueuedJob>, shutdown: CancellationToken) {
        let this = Arc::new(self);
        let out_of_queue = Arc::new(Semaphore::new(this.shared.settings.max_in_flight.max(1)));
        loop {
            let job = tokio::select! {
                job = jobs.recv() => job,
                () = shutdown.cancelled() => None,
            };
            let Some((job, origin, share)) = job else { return };
            // The job has left the queue: its tenant's share has room for another
            // (as the queue has), whether or not a place is free yet.
            drop(share);
            let Ok(place) = Arc::clone(&out_of_queue).acquire_owned().await else { return };
            let lane = Arc::clone(&this);
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
                    lane.deliver(job).await;
                    drop(place);
                }
                .instrument(span),
            );
        }
    }

    async fn deliver(&self, job: PushJob) {
        // Only a challenge has deliveries to record; any push can find a dead token.
        let reports = matches!(job.kind, PushKind::Challenge { .. });
        let Some(sender) = self.sender.as_ref().filter(|sender| sender.serves(&job.tenant)) else {
            if reports {
                self.shared.reporter.report(&job, DeliveryState::Failed, 0, "not configured").await;
            }
            return;
        };
        let settings = &self.shared.settings;
        let mut attempts = 0;
        let mut renewed_token = false;
        let mut backoff = settings.initial_backoff;
        let (state, error) = loop {
            attempts += 1;
            match self.send_once(sender.as_ref(), &job).await {
                SendOutcome::Sent => break (DeliveryState::Sent, String::new()),
                SendOutcome::Unregistered { reason } => {
                    tracing::info!(token = %redact_token(&job.push_token), %reason, "push token unregistered");
                    break (DeliveryState::Unregistered, reason);
                }
                SendOutcome::Failed { reason } => break (DeliveryState::Failed, reason),
                SendOutcome::TokenRefused { reason } => {
                    // Once per push: a renewed token refused too is not a matter of age.
                    if renewed_token || attempts >= settings.max_attempts {
                        tracing::warn!(%reason, attempts, "the provider refused its token again: push failed");
                        break (DeliveryState::Failed, reason);
                    }
                    renewed_token = true;
                    tracing::info!(%reason, "the provider refused its token: sending again with a new one");
                }
                SendOutcome::Retry { reason, after } => {
                    let wait = after.unwrap_or_else(|| jittered(backoff));
                    backoff = (backoff * 2).min(settings.max_backoff);
                    let retry_at = self.shared.clock.now().plus(wait);
                    if attempts >= settings.max_attempts || retry_at >= job.expires_at {
                        break (DeliveryState::Failed, reason);
                    }
                    metrics::counter!(names::PUSH_RETRIES, "provider" => self.platform.name()).increment(1);
                    tracing::debug!(attempts, %reason, wait_ms = u64::try_from(wait.as_millis()).unwrap_or(u64::MAX), "push retry");
                    if reports {
                        self.shared.reporter.report(&job, DeliveryState::Queued, attempts, &reason).await;
                    }
                    // No place held while waiting: send_once gave both back.
                    self.shared.clock.sleep_until(retry_at).await;
                }
            }
        };
        record_delivery(self.platform, &job, state);
        if reports || state == DeliveryState::Unregistered {
            self.shared.reporter.report(&job, state, attempts, &error).await;
        }
    }

    /// One request to the provider, counted and timed: the provider's place first,
    /// then a shared one, both given back when the answer is in.
    async fn send_once(&self, sender: &dyn PushSender, job: &PushJob) -> SendOutcome {
        let shutting_down = || SendOutcome::Failed { reason: "shutting down".into() };
        // The semaphores are never closed while the lane lives.
        let _provider_place = match &self.sends {
            Some(sends) => match sends.acquire().await {
                Ok(place) => Some(place),
                Err(_) => return shutting_down(),
            },
            None => None,
        };
        let Ok(_shared_place) = self.shared.sends.acquire().await else { return shutting_down() };
        let started = std::time::Instant::now();
        let outcome = sender.send(job).await;
        record_attempt(self.platform, &outcome, started.elapsed());
        outcome
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
