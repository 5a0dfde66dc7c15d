//! [`DeliveryRecorder`]: the dispatcher's reports, written to the store.

use std::sync::Arc;

use async_trait::async_trait;

use crate::domain::challenge::{Delivery, DeliveryState};
use crate::domain::ports::Store;
use crate::push::{DeliveryReporter, PushJob, PushKind};

/// Records the dispatcher's progress on the challenge (waking its watchers) and
/// turns pushes off for devices whose token is dead, whatever the push was.
pub struct DeliveryRecorder {
    store: Arc<dyn Store>,
}

impl DeliveryRecorder {
    pub fn new(store: Arc<dyn Store>) -> Self {
        Self { store }
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
        let PushKind::Challenge { challenge_id } = &job.kind else { return };
        let delivery =
            Delivery { device_id: job.device_id.clone(), platform: job.platform, state, attempts, error: error.to_owned() };
        if let Err(store_error) = self.store.record_delivery(challenge_id, delivery).await {
            tracing::warn!(error = %store_error, %challenge_id, "could not record a delivery");
        }
    }
}
