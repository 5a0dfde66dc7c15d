//! Pushes to phones. [`PushSender`] is one provider (APNs, FCM); the
//! [`dispatcher::Dispatcher`] queues jobs, sends them with bounded concurrency,
//! retries, and reports each delivery's state back through [`DeliveryReporter`].
//! `push/` never touches the store: the domain implements the reporter.
//!
//! A push carries the challenge id and its expiry, never the number.

use std::time::Duration;

use async_trait::async_trait;

use crate::domain::challenge::{ChallengeState, DeliveryState, Platform};
use crate::domain::ids::{ChallengeId, DeviceId};
use crate::domain::time::Millis;

pub mod dispatcher;

#[cfg(any(test, feature = "test-util"))]
pub mod recording;

/// What a push is for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PushKind {
    /// "Someone is signing in": the app shows the prompt.
    Challenge,
    /// The challenge resolved elsewhere: the app takes its prompt down.
    Clear { state: ChallengeState },
}

/// One push to one device.
#[derive(Clone, Debug)]
pub struct PushJob {
    pub kind: PushKind,
    pub challenge_id: ChallengeId,
    pub device_id: DeviceId,
    pub platform: Platform,
    pub push_token: String,
    /// The challenge's expiry: the provider may drop the push after it, and the
    /// dispatcher stops retrying before it.
    pub expires_at: Millis,
}

/// What one attempt to send came to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SendOutcome {
    Sent,
    /// The token is dead: turn pushes off for the device.
    Unregistered {
        reason: String,
    },
    /// Worth another try (429, 5xx, timeouts), after `after` if the provider said.
    Retry {
        reason: String,
        after: Option<Duration>,
    },
    /// No point in trying again.
    Failed {
        reason: String,
    },
}

/// One push provider.
#[async_trait]
pub trait PushSender: Send + Sync + 'static {
    fn platform(&self) -> Platform;
    async fn send(&self, job: &PushJob) -> SendOutcome;
}

/// Where the dispatcher reports each delivery's progress.
#[async_trait]
pub trait DeliveryReporter: Send + Sync + 'static {
    async fn report(&self, job: &PushJob, state: DeliveryState, attempts: u32, error: &str);
}

/// A push token in logs: the first six characters only, enough to tell tokens apart
/// when debugging, too few to push to.
pub fn redact_token(token: &str) -> String {
    let prefix: String = token.chars().take(6).collect();
    format!("{prefix}…")
}

#[cfg(test)]
mod tests {
    #[test]
    fn tokens_are_redacted() {
        let token = "a3f9c2e1d4b5a6978812ab34cd56ef78a3f9c2e1d4b5a6978812ab34cd56ef78";
        let shown = super::redact_token(token);
        assert!(shown.starts_with("a3f9c2"));
        assert!(!shown.contains(&token[6..20]));
    }
}
