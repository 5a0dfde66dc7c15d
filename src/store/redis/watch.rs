//! Watches across replicas: the registry of the challenges this replica watches,
//! the task that follows the change channels into it, and the task that expires
//! watched challenges at their deadline.
//!
//! A watch registers its interest first and reads second, and updates apply only
//! when their version is newer: no change slips through the gap. What crosses
//! pub/sub is a challenge id and a version, which anyone who can PUBLISH could
//! forge: a message only makes this replica read the record (when the version is
//! newer than what its watchers saw), and the watchers get what Redis holds. After
//! a pub/sub reconnect every watched challenge is read again. Each replica expires the
//! challenges it watches at their deadline (a compare-and-set, so one replica wins
//! and publishes), which is how expiry reaches watchers everywhere.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt as _;
use parking_lot::{Mutex, MutexGuard};
use tokio::sync::{Notify, watch};
use tokio_util::sync::CancellationToken;

use super::challenges::Reader;
use super::keys;
use super::link::Subscriber;
use crate::domain::challenge::{Challenge, ChallengeState};
use crate::domain::ids::{ChallengeId, TenantId};
use crate::domain::time::{Clock, Millis};
use crate::store::ChallengeWatch;

struct Watched {
    /// The newest version seen and the challenge at it.
    latest: Option<(u64, Challenge)>,
    sender: Option<watch::Sender<Challenge>>,
    /// A read after an announcement is under way ([`WatchRegistry::start_read`]).
    reading: bool,
    /// Announced again meanwhile: read once more when it ends.
    read_again: bool,
}

impl Watched {
    fn new() -> Self {
        Self { latest: None, sender: None, reading: false, read_again: false }
    }
}

#[derive(Default)]
pub(super) struct WatchRegistry {
    entries: Mutex<HashMap<ChallengeId, Watched>>,
    /// Wakes the deadline task when a watch arrives.
    changed: Notify,
}

impl WatchRegistry {
    fn lock(&self) -> MutexGuard<'_, HashMap<ChallengeId, Watched>> {
        self.entries.lock()
    }

    /// Notes interest in a challenge before it is read, so a change published
    /// meanwhile is kept (and wins over the read by its version).
    pub(super) fn expect(&self, id: &ChallengeId) {
        self.lock().entry(id.clone()).or_insert(Watched::new());
    }

    /// Forgets the interest of [`WatchRegistry::expect`] when the read found nothing,
    /// unless someone watches the challenge already.
    pub(super) fn forget(&self, id: &ChallengeId) {
        let mut entries = self.lock();
        if entries.get(id).is_some_and(|entry| entry.sender.is_none()) {
            entries.remove(id);
        }
    }

    /// A watch on challenge `id`, read at `version`, starting from the newest version seen.
    pub(super) fn subscribe(&self, id: &ChallengeId, version: u64, challenge: &Challenge) -> ChallengeWatch {
        let receiver = {
            let mut entries = self.lock();
            let entry = entries.entry(id.clone()).or_insert(Watched::new());
            if entry.latest.as_ref().is_none_or(|(seen, _)| *seen < version) {
                entry.latest = Some((version, challenge.clone()));
            }
            let current = entry.latest.as_ref().map_or_else(|| challenge.clone(), |(_, c)| c.clone());
            match &entry.sender {
                Some(sender) => {
                    sender.send_replace(current);
                    sender.subscribe()
                }
                None => {
                    let sender = watch::Sender::new(current);
                    let receiver = sender.subscribe();
                    entry.sender = Some(sender);
                    receiver
                }
            }
        };
        self.changed.notify_one();
        receiver
    }

    /// Applies a version of a challenge if it is newer than what watchers saw.
    pub(super) fn apply(&self, version: u64, challenge: &Challenge) {
        let mut entries = self.lock();
        let Some(entry) = entries.get_mut(&challenge.id) else { return };
        if entry.latest.as_ref().is_some_and(|(seen, _)| *seen >= version) {
            return;
        }
        entry.latest = Some((version, challenge.clone()));
        if let Some(sender) = &entry.sender {
            sender.send_replace(challenge.clone());
        }
    }

    /// Whether to read challenge `id` now, announced at `version`: it is watched here,
    /// `version` is newer than what its watchers saw (or they saw nothing yet), and no
    /// read of it is under way. With one under way, it is noted to read once more
    /// when that one ends ([`WatchRegistry::end_read`]), so a flood of announcements,
    /// forged ones too, costs one read at a time per watched challenge.
    pub(super) fn start_read(&self, id: &ChallengeId, version: u64) -> bool {
        let mut entries = self.lock();
        let Some(entry) = entries.get_mut(id) else { return false };
        if entry.latest.as_ref().is_some_and(|(seen, _)| *seen >= version) {
            return false;
        }
        if entry.reading {
            entry.read_again = true;
            return false;
        }
        entry.reading = true;
        true
    }

    /// Ends a read of [`WatchRegistry::start_read`]; true when it is to be read again.
    pub(super) fn end_read(&self, id: &ChallengeId) -> bool {
        let mut entries = self.lock();
        let Some(entry) = entries.get_mut(id) else { return false };
        entry.reading = std::mem::take(&mut entry.read_again);
        entry.reading
    }

    /// Drops entries nobody watches any more; returns the earliest pending expiry.
    fn sweep(&self) -> Option<Millis> {
        let mut entries = self.lock();
        entries.retain(|_, entry| entry.sender.as_ref().is_none_or(|sender| sender.receiver_count() > 0));
        entries
            .values()
            .filter_map(|entry| entry.latest.as_ref())
            .filter(|(_, challenge)| challenge.state == ChallengeState::Pending)
            .map(|(_, challenge)| challenge.expires_at)
            .min()
    }

    fn watched(&self) -> Vec<(ChallengeId, TenantId)> {
        self.lock().iter().filter_map(|(id, entry)| entry.latest.as_ref().map(|(_, c)| (id.clone(), c.tenant.clone()))).collect()
    }
}

/// Follows the change channels and applies what arrives to local watchers.
/// Reconnects by itself; after each (re)subscription, reads every watched
/// challenge again so nothing published while disconnected is missed.
pub(super) async fn follow_changes(subscriber: Subscriber, reader: Reader, clock: Arc<dyn Clock>, closing: CancellationToken) {
    let mut backoff = Duration::from_millis(50);
    loop {
        let subscribed = async {
            let mut pubsub = subscriber.pubsub().await?;
            for channel in keys::all_channels() {
                pubsub.subscribe(channel).await?;
            }
            Ok::<_, redis::RedisError>(pubsub)
        };
        let pubsub = tokio::select! {
            () = closing.cancelled() => return,
            result = tokio::time::timeout(reader.connection.timeout(), subscribed) => result,
        };
        match pubsub {
            Ok(Ok(pubsub)) => {
                backoff = Duration::from_millis(50);
                for (id, tenant) in reader.watchers.watched() {
                    if let Err(error) = reader.current(&tenant, &id, clock.now()).await {
                        tracing::debug!(%error, "could not refresh a watched challenge");
                    }
                }
                let mut messages = pubsub.into_on_message();
                loop {
                    let message = tokio::select! {
                        () = closing.cancelled() => return,
                        message = messages.next() => message,
                    };
                    let Some(message) = message else { break };
                    let Ok(payload) = message.get_payload::<String>() else { continue };
                    // '<id> <version>': a hint where to look, never what to report. What
                    // else a message carries (an older replica's JSON) is not read.
                    let mut parts = payload.splitn(3, ' ');
                    let (Some(id), Some(version)) = (parts.next(), parts.next()) else { continue };
                    let (Ok(id), Ok(version)) = (ChallengeId::parse(id), version.parse::<u64>()) else { continue };
                    if !reader.watchers.start_read(&id, version) {
                        continue;
                    }
                    let (reader, clock) = (reader.clone(), Arc::clone(&clock));
                    tokio::spawn(async move {
                        loop {
                            if let Err(error) = reader.refresh(&id, clock.now()).await {
                                tracing::debug!(%error, "could not read a changed challenge");
                            }
                            if !reader.watchers.end_read(&id) {
                                break;
                            }
                        }
                    });
                }
                tracing::warn!("redis pub/sub connection lost; reconnecting");
            }
            Ok(Err(error)) => tracing::warn!(%error, "redis pub/sub subscribe failed; retrying"),
            Err(_) => tracing::warn!("redis pub/sub subscribe timed out; retrying"),
        }
        tokio::select! {
            () = closing.cancelled() => return,
            () = tokio::time::sleep(backoff) => {}
        }
        backoff = (backoff * 2).min(Duration::from_secs(2));
    }
}

/// Expires watched challenges at their deadline (by the store's clock).
pub(super) async fn expire_watched(reader: Reader, clock: Arc<dyn Clock>, closing: CancellationToken) {
    loop {
        let changed = reader.watchers.changed.notified();
        let next = reader.watchers.sweep();
        let now = clock.now();
        if next.is_some_and(|when| when <= now) {
            for (id, tenant) in reader.watchers.watched() {
                if let Err(error) = reader.current(&tenant, &id, now).await {
                    tracing::debug!(%error, "could not expire a watched challenge; retrying");
                }
            }
        }
        let sleep = match next {
            Some(when) if when > now => clock.sleep_until(when),
            // Due now but the store failed: try again shortly.
            Some(_) => Box::pin(tokio::time::sleep(Duration::from_millis(200))),
            None => Box::pin(std::future::pending()),
        };
        tokio::select! {
            () = closing.cancelled() => return,
            () = sleep => {}
            () = changed => {}
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::expect_used)]

    use super::WatchRegistry;
    use crate::domain::ids::{TenantId, UserId};
    use crate::domain::time::Millis;
    use crate::store::conformance::sample_challenge;

    /// Announcements start a read only for a watched challenge, only past the
    /// version its watchers saw, and one at a time: a flood while a read is under
    /// way comes to one more read, not one per message.
    #[test]
    fn announcements_start_one_read_at_a_time() {
        let registry = WatchRegistry::default();
        let challenge = sample_challenge(&TenantId("t".into()), &UserId::parse("u").expect("user"), Millis(1_000), None);
        let id = challenge.id.clone();
        assert!(!registry.start_read(&id, 5), "not watched here");
        let _watch = registry.subscribe(&id, 2, &challenge);
        assert!(!registry.start_read(&id, 2), "seen already");
        assert!(registry.start_read(&id, 3));
        for version in 4..1_000 {
            assert!(!registry.start_read(&id, version), "a read is under way");
        }
        assert!(registry.end_read(&id), "announced meanwhile: once more");
        assert!(!registry.end_read(&id), "and then done");
        assert!(registry.start_read(&id, 1_000));
        assert!(!registry.end_read(&id));
    }
}
