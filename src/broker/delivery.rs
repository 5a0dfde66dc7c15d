//! [`DeliveryRecorder`]: the dispatcher's reports, written to the store.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use parking_lot::Mutex;
use tracing::Instrument as _;

use crate::domain::challenge::{Delivery, DeliveryState};
use crate::domain::ids::ChallengeId;
use crate::domain::ports::Store;
use crate::push::{DeliveryReporter, PushJob, PushKind};

/// The longest a push's report waits for the reports of the other pushes of its
/// challenge. A provider answers in tens of milliseconds; one that is slow or
/// retrying should not keep the watchers from the others for long.
pub const HOLD: Duration = Duration::from_millis(300);

/// Records the dispatcher's progress on the challenge (waking its watchers) and
/// turns pushes off for devices whose token is dead, whatever the push was.
///
/// A challenge pushed to several devices has its deliveries recorded as one change
/// once each push has reported: one store write (one Redis call) and one wake-up of
/// the watchers, where one per push would cost as many. A report waits at most
/// [`HOLD`] for the others; a retry's note (QUEUED with the provider's reason) is
/// recorded at once, with whatever waited, and the reports still to come keep
/// waiting for each other until the first report's hold is over (one that comes
/// later waits at most one hold more). When the server stops serving it records
/// the reports that wait at that moment ([`DeliveryRecorder::flush`]); a push still
/// being sent then is not waited for, as before.
pub struct DeliveryRecorder {
    store: Arc<dyn Store>,
    waiting: Arc<Mutex<HashMap<ChallengeId, Waiting>>>,
    hold: Duration,
}

/// Reports of one challenge's pushes that wait for the others.
struct Waiting {
    /// Pushes whose last word has not come yet.
    awaited: u32,
    deliveries: Vec<Delivery>,
}

impl DeliveryRecorder {
    pub fn new(store: Arc<dyn Store>) -> Self {
        Self::holding(store, HOLD)
    }

    /// A recorder whose reports wait at most `hold` for the others.
    pub fn holding(store: Arc<dyn Store>, hold: Duration) -> Self {
        Self { store, waiting: Arc::default(), hold }
    }

    /// Adds `delivery` to the challenge's waiting reports; returns them all when
    /// they are to be recorded now. The first to wait starts the timer that
    /// records them, at the latest, `hold` later.
    fn wait_or_take(&self, id: &ChallengeId, pushes: u32, delivery: Delivery) -> Option<Vec<Delivery>> {
        let last_word = delivery.state != DeliveryState::Queued;
        let mut waiting = self.waiting.lock();
        let first = !waiting.contains_key(id);
        let entry = waiting.entry(id.clone()).or_insert_with(|| Waiting { awaited: pushes, deliveries: Vec::new() });
        entry.deliveries.retain(|d| d.device_id != delivery.device_id);
        entry.deliveries.push(delivery);
        if last_word {
            entry.awaited = entry.awaited.saturating_sub(1);
        }
        if entry.awaited == 0 {
            return waiting.remove(id).map(|entry| entry.deliveries);
        }
        // A retry's note goes out now, with what waited; the entry stays, so the
        // reports still to come wait for each other as before.
        let now = (!last_word).then(|| std::mem::take(&mut entry.deliveries));
        if first {
            let (store, waiting, id, hold) = (Arc::clone(&self.store), Arc::clone(&self.waiting), id.clone(), self.hold);
            // In the push's span, so a failed write logs which push it was.
            let recording = async move {
                tokio::time::sleep(hold).await;
                let held = waiting.lock().remove(&id);
                if let Some(held) = held.filter(|held| !held.deliveries.is_empty()) {
                    record(store.as_ref(), &id, held.deliveries).await;
                }
            };
            tokio::spawn(recording.instrument(tracing::Span::current()));
        }
        now
    }

    /// Records every report that waits now, without waiting for the others: the
    /// server calls it once it has stopped serving, before the process ends.
    pub async fn flush(&self) {
        let held: Vec<(ChallengeId, Waiting)> = self.waiting.lock().drain().collect();
        for (id, held) in held.into_iter().filter(|(_, held)| !held.deliveries.is_empty()) {
            record(self.store.as_ref(), &id, held.deliveries).await;
        }
    }
}

async fn record(store: &dyn Store, id: &ChallengeId, deliveries: Vec<Delivery>) {
    if let Err(store_error) = store.record_deliveries(id, deliveries).await {
        tracing::warn!(error = %store_error, challenge_id = %id, "could not record a delivery");
    }
}

#[async_trait]
impl DeliveryReporter for DeliveryRecorder {
    async fn report(&self, job: &PushJob, state: DeliveryState, attempts: u32, error: &str) {
        if state == DeliveryState::Unregistered
            && let Err(store_error) = self.store.disable_push(&job.device_id, &job.push_token).await
        {
            tracing::warn!(error = %store_error, "could not turn pushes off for a dead token");
        }
        // Clears and notices have no delivery of their own to record.
        let PushKind::Challenge { challenge_id, pushes } = &job.kind else { return };
        let delivery =
            Delivery { device_id: job.device_id.clone(), platform: job.platform, state, attempts, error: error.to_owned() };
        let deliveries = if *pushes > 1 { self.wait_or_take(challenge_id, *pushes, delivery) } else { Some(vec![delivery]) };
        if let Some(deliveries) = deliveries {
            record(self.store.as_ref(), challenge_id, deliveries).await;
        }
    }
}
