//! A fake provider for tests: records every job and answers `Sent` (or what the test
//! scripted), or holds its answers until released, the way a stalled provider does.
//! Jobs can be awaited, so tests wait on the event, not on a timer.

use std::sync::Arc;

use async_trait::async_trait;
use tokio::sync::watch;

use super::{PushJob, PushSender, SendOutcome};
use crate::domain::challenge::Platform;

#[derive(Clone)]
pub struct RecordingPushSender {
    platform: Platform,
    jobs: Arc<watch::Sender<Vec<PushJob>>>,
    outcome: Arc<parking_lot::Mutex<SendOutcome>>,
    /// While true, every send waits (after it is recorded) until it turns false.
    held: Arc<watch::Sender<bool>>,
}

impl RecordingPushSender {
    pub fn new(platform: Platform) -> Self {
        Self {
            platform,
            jobs: Arc::new(watch::Sender::new(Vec::new())),
            outcome: Arc::new(parking_lot::Mutex::new(SendOutcome::Sent)),
            held: Arc::new(watch::Sender::new(false)),
        }
    }

    /// Holds every later send, and those waiting, until [`Self::release`]: the
    /// dispatcher's sends stay in flight and its queue fills, as with a stalled provider.
    pub fn hold(&self) {
        self.held.send_replace(true);
    }

    /// Lets every held send answer.
    pub fn release(&self) {
        self.held.send_replace(false);
    }

    /// What every later send answers.
    pub fn answer_with(&self, outcome: SendOutcome) {
        *self.outcome.lock() = outcome;
    }

    pub fn jobs(&self) -> Vec<PushJob> {
        self.jobs.borrow().clone()
    }

    /// Waits until a recorded job satisfies `matches`, then returns every job so far.
    pub async fn wait_for(&self, matches: impl Fn(&PushJob) -> bool) -> Vec<PushJob> {
        self.wait_until(|jobs| jobs.iter().any(&matches)).await
    }

    /// Waits until the jobs recorded so far satisfy `condition`, then returns them.
    pub async fn wait_until(&self, condition: impl Fn(&[PushJob]) -> bool) -> Vec<PushJob> {
        let mut changes = self.jobs.subscribe();
        // The sender lives in `self`, so the channel cannot close while we wait.
        let _ = changes.wait_for(|jobs| condition(jobs)).await;
        self.jobs()
    }
}

#[async_trait]
impl PushSender for RecordingPushSender {
    fn platform(&self) -> Platform {
        self.platform
    }

    async fn send(&self, job: &PushJob) -> SendOutcome {
        let outcome = self.outcome.lock().clone();
        self.jobs.send_modify(|jobs| jobs.push(job.clone()));
        // The sender lives in `self`, so the channel cannot close while we wait.
        let _ = self.held.subscribe().wait_for(|held| !*held).await;
        outcome
    }
}
