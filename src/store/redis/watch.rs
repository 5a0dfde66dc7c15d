//! Watches across replicas: the registry of the challenges this replica watches,
//! the task that follows the change channels into it, and the task that expires
//! watched challenges at their deadline.
//!
//! A watch registers its interest first and reads second, and updates apply only
//! when their version is newer: no change slips through the gap. What crosses
//! pub/sub is a challenge id and a version, which anyone who can PUBLISH could
//! forge: a message only makes this replica read the record (when the version is
//! newer than what its watchers saw), and the watchers get what Redis holds. A
//! read that fails is tried again for about 3 s; after a pub/sub reconnect every
//! watched challenge is read again. Each replica expires the
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
use crate::domain::challenge::{Challenge, ChallengeState, Delivery};
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
    /// Changes this replica is making ([`WatchRegistry::begin_write`]): their
    /// announcements wait for the change's own answer, which may make a read needless.
    writing: u32,
    /// The newest version announced while a read or a write was under way.
    announced: u64,
    /// Made by this replica's create ([`WatchRegistry::created`]) and not asked
    /// for by a watch yet: dropped by the sweep after [`CREATED_KEEP`].
    created_here: bool,
}

/// How long a challenge this replica created is kept for a watch that may follow
/// (an IdP watches at once), when none has come.
const CREATED_KEEP: Duration = Duration::from_secs(10);

impl Watched {
    fn new() -> Self {
        Self { latest: None, sender: None, reading: false, read_again: false, writing: 0, announced: 0, created_here: false }
    }

    /// Whether the sweep keeps it at `now`: watched, or waiting for a watch (its
    /// read under way, or created here lately and still PENDING).
    fn kept(&self, now: Millis) -> bool {
        match (&self.sender, &self.latest) {
            (Some(sender), _) => sender.receiver_count() > 0,
            (None, Some((_, challenge))) if self.created_here => {
                challenge.state == ChallengeState::Pending
                    && now < challenge.expires_at
                    && now < challenge.created_at.plus(CREATED_KEEP)
            }
            (None, _) => true,
        }
    }

    fn seen(&self) -> u64 {
        self.latest.as_ref().map_or(0, |(seen, _)| *seen)
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
        self.lock().entry(id.clone()).or_insert(Watched::new()).created_here = false;
    }

    /// Notes a challenge this replica just created, at `version`, before its id
    /// leaves the replica: every change to it from now on is announced to this
    /// registry, so a watch that follows ([`WatchRegistry::known`]) starts from
    /// here without reading the record.
    pub(super) fn created(&self, version: u64, challenge: &Challenge) {
        let mut entry = Watched::new();
        entry.latest = Some((version, challenge.clone()));
        entry.created_here = true;
        self.lock().entry(challenge.id.clone()).or_insert(entry);
        self.changed.notify_one();
    }

    /// The challenge as `create.lua` wrote it, with the deliveries it chose, over
    /// what [`WatchRegistry::created`] noted before it knew them (a later version
    /// read meanwhile stays).
    pub(super) fn chosen(&self, challenge: &Challenge) {
        if let Some(entry) = self.lock().get_mut(&challenge.id)
            && let Some((1, latest)) = &mut entry.latest
        {
            *latest = challenge.clone();
            if let Some(sender) = &entry.sender {
                sender.send_replace(challenge.clone());
            }
        }
    }

    /// The newest version of challenge `id` that this replica holds for its
    /// watchers, when it is `tenant`'s and still PENDING before its expiry at
    /// `now`: what a read would give, as every change since is announced here
    /// and read (after [`WatchRegistry::expect`]).
    pub(super) fn known(&self, id: &ChallengeId, tenant: &TenantId, now: Millis) -> Option<(u64, Challenge)> {
        let entries = self.lock();
        let (version, challenge) = entries.get(id)?.latest.as_ref()?;
        let usable = challenge.tenant == *tenant && challenge.state == ChallengeState::Pending && now < challenge.expires_at;
        usable.then(|| (*version, challenge.clone()))
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

    /// Notes that this replica is recording a delivery on challenge `id`: until
    /// [`WatchRegistry::end_write`], announcements of it wait instead of starting a
    /// read (Redis may deliver the change's own announcement before its answer).
    pub(super) fn begin_write(&self, id: &ChallengeId) {
        if let Some(entry) = self.lock().get_mut(id) {
            entry.writing += 1;
        }
    }

    /// Ends [`WatchRegistry::begin_write`]. The deliveries recorded as `version` (none
    /// when the write failed or changed nothing) is applied without a read when
    /// the watchers here saw the version just before it: the record at `version` is
    /// then exactly that one with these deliveries. Returns whether to read the
    /// challenge now: something newer than what the watchers saw was announced
    /// meanwhile (the caller reads, then [`WatchRegistry::end_read`]).
    pub(super) fn end_write(&self, id: &ChallengeId, recorded: Option<(u64, Vec<Delivery>)>) -> bool {
        let mut entries = self.lock();
        let Some(entry) = entries.get_mut(id) else { return false };
        entry.writing = entry.writing.saturating_sub(1);
        if let Some((version, deliveries)) = recorded
            && let Some((seen, challenge)) = entry.latest.as_mut()
            && seen.checked_add(1) == Some(version)
        {
            *seen = version;
            for delivery in deliveries {
                challenge.record_delivery(delivery);
            }
            if let Some(sender) = &entry.sender {
                sender.send_replace(challenge.clone());
            }
        }
        if entry.writing > 0 || entry.reading || !entry.read_again {
            return false;
        }
        entry.read_again = false;
        entry.reading = entry.announced > entry.seen();
        entry.reading
    }

    /// Whether to read challenge `id` now, announced at `version`: it is watched here,
    /// `version` is newer than what its watchers saw (or they saw nothing yet), and no
    /// read of it is under way. With one under way, it is noted to read once more
    /// when that one ends ([`WatchRegistry::end_read`]), so a flood of announcements,
    /// forged ones too, costs one read at a time per watched challenge.
    pub(super) fn start_read(&self, id: &ChallengeId, version: u64) -> bool {
        let mut entries = self.lock();
        let Some(entry) = entries.get_mut(id) else { return false };
        if entry.seen() >= version && entry.latest.is_some() {
            return false;
        }
        if entry.reading || entry.writing > 0 {
            entry.read_again = true;
            entry.announced = entry.announced.max(version);
            return false;
        }
        entry.reading = true;
        true
    }

    /// Ends a read of [`WatchRegistry::start_read`]; true when it is to be read
    /// again: announced meanwhile past what the read found (the announcement of
    /// the version it read, arriving while it ran, needs none), and no write of
    /// this replica under way, whose end decides instead.
    pub(super) fn end_read(&self, id: &ChallengeId) -> bool {
        let mut entries = self.lock();
        let Some(entry) = entries.get_mut(id) else { return false };
        if entry.writing > 0 {
            entry.reading = false;
            return false;
        }
        entry.reading = std::mem::take(&mut entry.read_again) && entry.announced > entry.seen();
        entry.reading
    }

    /// Drops entries nobody watches any more; returns the earliest pending expiry.
    /// Drops entries nobody watches any more and created ones no watch came for;
    /// returns when the sweep is next due: the earliest expiry of a PENDING
    /// challenge watched here, or the time a created one goes.
    fn sweep(&self, now: Millis) -> Option<Millis> {
        let mut entries = self.lock();
        entries.retain(|_, entry| entry.kept(now));
        entries
            .values()
            .filter_map(|entry| entry.latest.as_ref().map(|(_, challenge)| (entry.created_here, challenge)))
            .filter(|(_, challenge)| challenge.state == ChallengeState::Pending)
            .map(|(created_here, challenge)| {
                if created_here {
                    challenge.expires_at.min(challenge.created_at.plus(CREATED_KEEP))
                } else {
                    challenge.expires_at
                }
            })
            .min()
    }

    /// Every challenge held here, to read again after a pub/sub reconnect.
    fn watched(&self) -> Vec<(ChallengeId, TenantId)> {
        self.lock().iter().filter_map(|(id, entry)| entry.latest.as_ref().map(|(_, c)| (id.clone(), c.tenant.clone()))).collect()
    }

    /// The watched challenges still PENDING whose expiry has come at `now`.
    fn due(&self, now: Millis) -> Vec<(ChallengeId, TenantId)> {
        self.lock()
            .iter()
            .filter(|(_, entry)| !entry.created_here)
            .filter_map(|(id, entry)| entry.latest.as_ref().map(|(_, c)| (id, c)))
            .filter(|(_, c)| c.state == ChallengeState::Pending && c.expires_at <= now)
            .map(|(id, c)| (id.clone(), c.tenant.clone()))
            .collect()
    }
}

/// Undoes [`WatchRegistry::expect`] or [`WatchRegistry::created`] when dropped,
/// unless [`Interest::keep`] was called: a call cancelled midway (a client that
/// hangs up, a deadline) leaves no entry behind that nobody would ever remove.
pub(super) struct Interest<'a> {
    registry: &'a WatchRegistry,
    id: &'a ChallengeId,
    armed: bool,
}

impl<'a> Interest<'a> {
    pub(super) fn new(registry: &'a WatchRegistry, id: &'a ChallengeId) -> Self {
        Self { registry, id, armed: true }
    }

    pub(super) fn keep(mut self) {
        self.armed = false;
    }
}

impl Drop for Interest<'_> {
    fn drop(&mut self) {
        if self.armed {
            self.registry.forget(self.id);
        }
    }
}

/// A delivery this replica is recording ([`WatchRegistry::begin_write`]): ends
/// the write when dropped, so a call cancelled midway does not hold the
/// challenge's announcements back for good; reads it when the end says so.
pub(super) struct Writing {
    reader: Reader,
    clock: Arc<dyn Clock>,
    id: ChallengeId,
    /// What the write recorded, set when it answered.
    pub(super) recorded: Option<(u64, Vec<Delivery>)>,
}

impl Writing {
    pub(super) fn begin(reader: Reader, clock: Arc<dyn Clock>, id: ChallengeId) -> Self {
        reader.watchers.begin_write(&id);
        Self { reader, clock, id, recorded: None }
    }
}

impl Drop for Writing {
    fn drop(&mut self) {
        if self.reader.watchers.end_write(&self.id, self.recorded.take()) && tokio::runtime::Handle::try_current().is_ok() {
            spawn_reads(self.reader.clone(), Arc::clone(&self.clock), self.id.clone());
        }
    }
}

/// Reads challenge `id` for its watchers here, again as long as
/// [`WatchRegistry::end_read`] says: the caller won [`WatchRegistry::start_read`]
/// (or [`WatchRegistry::end_write`]).
pub(super) fn spawn_reads(reader: Reader, clock: Arc<dyn Clock>, id: ChallengeId) {
    tokio::spawn(async move {
        loop {
            // A read that fails is tried again a few times: no other announcement
            // may come (an answer is the last change), and the watchers would
            // otherwise wait for the deadline. A longer outage drops pub/sub too,
            // and its reconnect reads every watched challenge.
            for retry in READ_RETRIES {
                match reader.refresh(&id, clock.now()).await {
                    Ok(()) => break,
                    Err(error) => tracing::debug!(%error, "could not read a changed challenge"),
                }
                let Some(pause) = retry else {
                    tracing::warn!(challenge_id = %id, "a changed challenge could not be read; its watchers here wait");
                    break;
                };
                tokio::time::sleep(pause).await;
            }
            if !reader.watchers.end_read(&id) {
                break;
            }
        }
    });
}

/// The pauses before each new try of a failed read (about 3 s in all); `None`
/// ends the tries.
const READ_RETRIES: [Option<Duration>; 7] = [
    Some(Duration::from_millis(50)),
    Some(Duration::from_millis(100)),
    Some(Duration::from_millis(200)),
    Some(Duration::from_millis(400)),
    Some(Duration::from_millis(800)),
    Some(Duration::from_millis(1_600)),
    None,
];

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
                    spawn_reads(reader.clone(), Arc::clone(&clock), id);
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
        let now = clock.now();
        let next = reader.watchers.sweep(now);
        if next.is_some_and(|when| when <= now) {
            for (id, tenant) in reader.watchers.due(now) {
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
    use crate::domain::challenge::Challenge;
    use crate::domain::ids::{ChallengeId, TenantId, UserId};
    use crate::domain::time::Millis;
    use crate::store::conformance::{sample_challenge, sample_delivery};

    /// An empty registry and a challenge it does not know yet.
    fn a_registry_and_a_challenge() -> (WatchRegistry, Challenge, ChallengeId) {
        let challenge = sample_challenge(&TenantId("t".into()), &UserId::parse("u").expect("user"), Millis(1_000), None);
        let id = challenge.id.clone();
        (WatchRegistry::default(), challenge, id)
    }

    /// Announcements start a read only for a watched challenge, only past the
    /// version its watchers saw, and one at a time: a flood while a read is under
    /// way comes to one more read, not one per message.
    #[test]
    fn announcements_start_one_read_at_a_time() {
        let (registry, challenge, id) = a_registry_and_a_challenge();
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

    /// A read that found the version announced while it ran is not repeated:
    /// announced at 3 and again at 4 (say, another replica's answer, then this
    /// replica's delivery, whose own write could not be applied over the gap), the
    /// read finds 4 and is done; a version past what it found is read again.
    #[test]
    fn a_read_that_found_what_was_announced_meanwhile_is_not_repeated() {
        let (registry, challenge, id) = a_registry_and_a_challenge();
        let _watch = registry.subscribe(&id, 2, &challenge);
        assert!(registry.start_read(&id, 3));
        assert!(!registry.start_read(&id, 4), "a read is under way");
        registry.apply(4, &challenge);
        assert!(!registry.end_read(&id), "the read found version 4");
        assert!(registry.start_read(&id, 5));
        assert!(!registry.start_read(&id, 6));
        registry.apply(5, &challenge);
        assert!(registry.end_read(&id), "6 is past what the read found");
        registry.apply(6, &challenge);
        assert!(!registry.end_read(&id));
    }

    /// A delivery this replica recorded reaches its watchers here without a read
    /// when they saw the version just before it, even when its announcement came
    /// first; after a gap (a change they have not read) the write's end asks for a
    /// read.
    #[test]
    fn a_delivery_recorded_here_needs_no_read_when_it_follows_what_was_seen() {
        let (registry, challenge, id) = a_registry_and_a_challenge();
        let watch = registry.subscribe(&id, 3, &challenge);
        let delivery = sample_delivery();
        registry.begin_write(&id);
        assert!(!registry.start_read(&id, 4), "its own announcement, first: waits for the write");
        assert!(!registry.end_write(&id, Some((4, vec![delivery.clone()]))), "covered by the write: no read");
        assert_eq!(watch.borrow().deliveries, vec![delivery.clone()]);
        assert!(!registry.start_read(&id, 4), "a late copy of the announcement: no read");

        let mut sent = delivery.clone();
        sent.attempts = 2;
        registry.begin_write(&id);
        assert!(!registry.start_read(&id, 5), "someone else's change, announced during the write");
        assert!(registry.end_write(&id, Some((6, vec![sent]))), "version 5 was not seen: read");
        assert_eq!(watch.borrow().deliveries, vec![delivery.clone()], "and 6 not applied over the gap");
        assert!(!registry.start_read(&id, 7), "a read is under way");
        assert!(registry.end_read(&id), "announced meanwhile: once more");
        assert!(!registry.end_read(&id));

        registry.begin_write(&id);
        assert!(!registry.start_read(&id, 7));
        assert!(registry.end_write(&id, None), "a failed write: the announcement is read");
        assert!(!registry.end_read(&id));
    }

    /// A challenge created here is held for a watch that follows (this tenant's
    /// only), no longer than `CREATED_KEEP` when none comes, and for good once a
    /// watch asked for it.
    #[test]
    fn a_challenge_created_here_waits_a_while_for_its_watch() {
        let registry = WatchRegistry::default();
        let (tenant, user) = (TenantId("t".into()), UserId::parse("u").expect("user"));
        let now = Millis(1_000_000);
        let (waited, unwatched) = (sample_challenge(&tenant, &user, now, None), sample_challenge(&tenant, &user, now, None));
        registry.created(1, &waited);
        registry.created(1, &unwatched);
        assert_eq!(registry.known(&waited.id, &tenant, now), Some((1, waited.clone())));
        assert_eq!(registry.known(&waited.id, &TenantId("other".into()), now), None, "another tenant's");
        assert_eq!(registry.known(&waited.id, &tenant, waited.expires_at), None, "past its expiry: read instead");
        assert!(registry.start_read(&unwatched.id, 2), "changes to it are read");
        assert!(!registry.end_read(&unwatched.id));

        let keep_until = now.plus(super::CREATED_KEEP);
        assert_eq!(registry.sweep(now), Some(keep_until.min(waited.expires_at)));
        registry.expect(&waited.id);
        let _watch = registry.subscribe(&waited.id, 1, &waited);
        registry.sweep(keep_until);
        assert_eq!(registry.known(&unwatched.id, &tenant, now), None, "no watch came: dropped");
        assert!(!registry.start_read(&unwatched.id, 3), "and no longer read");
        assert!(registry.known(&waited.id, &tenant, now).is_some(), "watched: kept");
        assert!(registry.due(waited.expires_at).iter().any(|(id, _)| *id == waited.id), "and expired at its deadline");
    }

    /// An interest dropped before it was kept (a watch call cancelled between its
    /// `expect` and its subscription) leaves no entry behind; a kept one stays.
    #[test]
    fn an_interest_not_kept_is_forgotten() {
        let (registry, challenge, id) = a_registry_and_a_challenge();
        registry.expect(&id);
        drop(super::Interest::new(&registry, &id));
        assert!(!registry.start_read(&id, 2), "forgotten: not read");
        registry.expect(&id);
        let interest = super::Interest::new(&registry, &id);
        let _watch = registry.subscribe(&id, 1, &challenge);
        interest.keep();
        assert!(registry.start_read(&id, 2), "kept: read");
    }
}
