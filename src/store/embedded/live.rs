//! The live half of the embedded store, in memory only: the challenges, held as
//! compact records, and what is counted per user (live challenges, recent creates,
//! wrong numbers, wrong TOTP codes and the TOTP lock). A restart forgets all of it;
//! see the module documentation of `embedded` for why that is harmless.

use std::collections::{BTreeMap, BTreeSet, VecDeque};

use tokio::sync::watch;

use super::{BACKEND, Shared, UserKey};
use crate::domain::challenge::{Challenge, ChallengeState, Delivery, Resolution};
use crate::domain::ids::{ChallengeId, TenantId, UserId};
use crate::domain::time::Millis;
use crate::store::{AdmissionPolicy, ChallengeWatch, CreateOutcome, Refusal, ResolveOutcome, StoreError};
use crate::telemetry::metrics::{challenge_resolved, names};

/// The 128 random bits of a challenge id: the table's key (16 bytes instead of the
/// id's 35 characters, held three times per challenge).
type Key = [u8; 16];

/// One of a user's live challenges, with a tag of its request_id to find repeats.
struct LiveRef {
    key: Key,
    /// `request_tag` of the request_id, 0 for none.
    request: u32,
}

fn request_tag(request_id: Option<&str>) -> u32 {
    use std::hash::{Hash, Hasher};
    let Some(request_id) = request_id else { return 0 };
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    request_id.hash(&mut hasher);
    u32::try_from(hasher.finish() >> 32).unwrap_or_default() | 1
}

#[derive(Default)]
pub(super) struct UserActivity {
    /// Challenges of the user still held in memory (pending or retained), oldest first.
    live: Vec<LiveRef>,
    /// When the user's recent challenges were created, oldest first.
    created: VecDeque<Millis>,
    /// When the user's recent wrong numbers were typed, oldest first.
    pub(super) wrong_numbers: VecDeque<Millis>,
    /// VerifyTotp attempts reserved lately, oldest first: each counts as a wrong code
    /// unless its code was right.
    pub(super) totp_attempts: VecDeque<Millis>,
    pub(super) totp_locked_until: Option<Millis>,
    /// Wrong TOTP codes since the last accepted one.
    pub(super) totp_consecutive: u32,
    /// When every window counted above has passed: then, with nothing else held,
    /// the entry goes (see `forget_after`).
    forget_at: Option<Millis>,
}

impl UserActivity {
    /// Keeps the entry at least until `until` (a window entry's end).
    pub(super) fn forget_after(&mut self, until: Millis) {
        self.forget_at = Some(self.forget_at.map_or(until, |at| at.max(until)));
    }

    /// Whether nothing of the entry matters any more at `now`.
    pub(super) fn is_idle(&self, now: Millis) -> bool {
        self.live.is_empty()
            && self.forget_at.is_none_or(|at| at <= now)
            && self.totp_consecutive == 0
            && self.totp_locked_until.is_none_or(|until| until <= now)
    }
}

/// Encodes a challenge into one allocation of its exact size (growing a Vec instead
/// would leave a trail of freed smaller buffers behind each record).
fn pack(challenge: &Challenge) -> Result<Box<[u8]>, StoreError> {
    let mut buffer = [0u8; 2048];
    match postcard::to_slice(challenge, &mut buffer) {
        Ok(used) => Ok(Box::from(&*used)),
        // Long contexts and many devices: rare, and allowed.
        Err(postcard::Error::SerializeBufferFull) => {
            postcard::to_stdvec(challenge).map(Vec::into_boxed_slice).map_err(|e| StoreError::corrupt(BACKEND, e))
        }
        Err(error) => Err(StoreError::corrupt(BACKEND, error)),
    }
}

fn unpack(record: &[u8]) -> Result<Challenge, StoreError> {
    postcard::from_bytes(record).map_err(|e| StoreError::corrupt(BACKEND, e))
}

/// A live challenge. A broker may hold hundreds of thousands (BENCHMARKS.md), so the
/// challenge is kept encoded with postcard: about 160 bytes for a pending one,
/// against about 750 as a struct with its strings and deliveries each on the heap.
/// Its state and times sit beside the record, so the frequent checks (is it
/// pending, is it due) decode nothing.
struct ChallengeEntry {
    record: Box<[u8]>,
    state: ChallengeState,
    expires_at: Millis,
    purge_at: Millis,
    /// `purge_at` once the challenge is APPROVED or FRAUD_REPORTED (nothing can be
    /// reported against it any more, so it need not wait out the fraud window).
    settled_purge_at: Millis,
    /// Carries every change to the watchers while there are any. Most challenges are
    /// not watched for most of their life and a channel costs several hundred bytes
    /// (it holds the whole challenge), so it is made by the first watcher and
    /// dropped once none is left, or once it has carried the final state: nothing a
    /// watcher follows comes after it (a watch ends on the final state), and a
    /// resolved challenge waits out its retention, the fraud window for some, long
    /// after its watchers have gone.
    watch: Option<watch::Sender<Challenge>>,
}

impl ChallengeEntry {
    fn new(challenge: &Challenge, policy: &AdmissionPolicy) -> Result<Self, StoreError> {
        let (settled_purge_at, purge_at) = policy.purge_times(challenge.expires_at);
        Ok(Self {
            record: pack(challenge)?,
            state: challenge.state,
            expires_at: challenge.expires_at,
            purge_at,
            settled_purge_at,
            watch: None,
        })
    }

    fn challenge(&self) -> Result<Challenge, StoreError> {
        unpack(&self.record)
    }

    /// Applies `change`; if it changed anything, stores the result and tells the
    /// watchers. Returns whether it changed, and the challenge as it now stands.
    fn update(&mut self, change: impl FnOnce(&mut Challenge) -> bool) -> Result<(bool, Challenge), StoreError> {
        let challenge = self.challenge()?;
        self.change(challenge, change)
    }

    /// `update` for a caller that has decoded the challenge already.
    fn change(
        &mut self,
        mut challenge: Challenge,
        change: impl FnOnce(&mut Challenge) -> bool,
    ) -> Result<(bool, Challenge), StoreError> {
        if !change(&mut challenge) {
            return Ok((false, challenge));
        }
        self.record = pack(&challenge)?;
        self.state = challenge.state;
        if matches!(self.state, ChallengeState::Approved | ChallengeState::FraudReported) {
            // The deadline set still holds the expiry, which comes first; there
            // the purge is scheduled at this time.
            self.purge_at = self.purge_at.min(self.settled_purge_at);
        }
        if let Some(sender) = &self.watch {
            if sender.receiver_count() > 0 {
                sender.send_replace(challenge.clone());
            }
            // A receiver still reads the final state (a watch's `changed` sees the
            // new version before it sees the channel closed).
            if sender.receiver_count() == 0 || self.state.is_final() {
                self.watch = None;
            }
        }
        Ok((true, challenge))
    }

    /// A watch of the challenge; `current` is what it holds now.
    fn subscribe(&mut self, current: Challenge) -> ChallengeWatch {
        if current.state.is_final() {
            // Nothing will follow: the receiver holds the final state, and the
            // entry keeps no channel for it.
            return watch::Sender::new(current).subscribe();
        }
        match &self.watch {
            Some(sender) => sender.subscribe(),
            None => {
                let sender = watch::Sender::new(current);
                let receiver = sender.subscribe();
                self.watch = Some(sender);
                receiver
            }
        }
    }

    /// Expires the challenge if its time is up, waking its watchers.
    fn refresh(&mut self, now: Millis) -> Result<(), StoreError> {
        if self.state != ChallengeState::Pending || now < self.expires_at {
            return Ok(());
        }
        let (expired, challenge) = self.update(|challenge| challenge.expire_if_due(now))?;
        if expired {
            challenge_resolved(&challenge.tenant, ChallengeState::Expired, None);
            metrics::gauge!(names::CHALLENGES_LIVE).decrement(1.0);
        }
        Ok(())
    }

    fn is_pending(&mut self, now: Millis) -> Result<bool, StoreError> {
        self.refresh(now)?;
        Ok(self.state == ChallengeState::Pending)
    }
}

/// The challenges by key: an ordered map of 4-byte slot numbers beside a slab of
/// the entries. Under a steady stream of sign-ins, entries come and go at the same
/// rate. A hash table (hashbrown, std's) leaves a deleted marker for each removal
/// and, once the markers use up its spare room, rehashes at twice the size when it
/// is more than half full: a step of about 19 MB at 170,000 live challenges with
/// the entries in it, still about 5 MB with slot numbers, taken once some 27
/// minutes into the soak (BENCHMARKS.md). A B-tree has no markers: its nodes are
/// freed and reused as keys come and go, so its memory follows the live count.
/// The slab reuses freed slots, so it stays at the most entries held at once.
/// Lookups cost a few comparisons of 16-byte keys more than hashing; at the rates
/// a broker serves that is well under a microsecond a sign-in.
#[derive(Default)]
struct Entries {
    slots: BTreeMap<Key, u32>,
    slab: Vec<Option<ChallengeEntry>>,
    free: Vec<u32>,
}

impl Entries {
    fn len(&self) -> usize {
        self.slots.len()
    }

    fn get_mut(&mut self, key: &Key) -> Option<&mut ChallengeEntry> {
        let slot = *self.slots.get(key)?;
        self.slab.get_mut(slot as usize)?.as_mut()
    }

    fn insert(&mut self, key: Key, entry: ChallengeEntry) {
        if let Some(slot) = self.slots.get(&key).copied() {
            if let Some(place) = self.slab.get_mut(slot as usize) {
                *place = Some(entry);
            }
            return;
        }
        let slot = match self.free.pop() {
            Some(slot) => {
                if let Some(place) = self.slab.get_mut(slot as usize) {
                    *place = Some(entry);
                }
                slot
            }
            None => {
                // More than 4 billion challenges held at once cannot happen in memory.
                let slot = u32::try_from(self.slab.len()).unwrap_or(u32::MAX);
                self.slab.push(Some(entry));
                slot
            }
        };
        self.slots.insert(key, slot);
    }

    fn remove(&mut self, key: &Key) -> Option<ChallengeEntry> {
        let slot = self.slots.remove(key)?;
        let entry = self.slab.get_mut(slot as usize)?.take();
        self.free.push(slot);
        entry
    }

    fn iter(&self) -> impl Iterator<Item = (&Key, &ChallengeEntry)> {
        self.slots.iter().filter_map(|(key, slot)| Some((key, self.slab.get(*slot as usize)?.as_ref()?)))
    }
}

#[derive(Default)]
pub(super) struct ChallengeTable {
    entries: Entries,
    /// Ordered for the same reason as [`Entries`]: users come and go (idle ones
    /// are swept) without the hash table's deleted markers.
    pub(super) users: BTreeMap<UserKey, UserActivity>,
    /// (when, key): expiry of pending challenges, then their purge.
    deadlines: BTreeSet<(Millis, Key)>,
}

impl ChallengeTable {
    /// Challenges and per-user entries held.
    pub(super) fn record_count(&self) -> usize {
        self.entries.len() + self.users.len()
    }

    /// The entry of `id`, refreshed, with its challenge, if it belongs to `tenant` and
    /// its retention has not passed.
    fn get(
        &mut self,
        tenant: &TenantId,
        id: &ChallengeId,
        now: Millis,
    ) -> Result<Option<(&mut ChallengeEntry, Challenge)>, StoreError> {
        let Some(entry) = self.entries.get_mut(&id.bits()) else { return Ok(None) };
        entry.refresh(now)?;
        // Past its retention it is gone, whether or not the deadline task has purged
        // it yet (as in Redis): no read, answer or watch finds it.
        if now >= entry.purge_at {
            return Ok(None);
        }
        let challenge = entry.challenge()?;
        if challenge.tenant != *tenant {
            return Ok(None);
        }
        Ok(Some((entry, challenge)))
    }

    fn purge(&mut self, key: &Key, now: Millis) {
        let Some(entry) = self.entries.remove(key) else { return };
        let challenge = match entry.challenge() {
            Ok(challenge) => challenge,
            Err(error) => {
                // Its user's list keeps a dangling key, skipped wherever it is read.
                tracing::error!(%error, "purged a challenge whose record does not decode");
                return;
            }
        };
        let user = (challenge.tenant, challenge.user_id);
        if let Some(activity) = self.users.get_mut(&user) {
            activity.live.retain(|other| other.key != *key);
            if activity.is_idle(now) {
                self.users.remove(&user);
            }
        }
    }

    /// The tenant's challenges (any state) and the users it has entries for here;
    /// unless `dry_run`, removes them (a watcher's stream then ends). Their
    /// deadlines stay in the set and are skipped when they come.
    pub(super) fn purge_tenant(&mut self, tenant: &TenantId, dry_run: bool) -> (u64, Vec<UserKey>) {
        let mine = |entry: &ChallengeEntry| entry.challenge().is_ok_and(|challenge| challenge.tenant == *tenant);
        let keys: Vec<Key> = self.entries.iter().filter(|(_, entry)| mine(entry)).map(|(key, _)| *key).collect();
        let users: Vec<UserKey> = self.users.keys().filter(|(owner, _)| owner == tenant).cloned().collect();
        if !dry_run {
            for key in &keys {
                if let Some(entry) = self.entries.remove(key)
                    && entry.state == ChallengeState::Pending
                {
                    metrics::gauge!(names::CHALLENGES_LIVE).decrement(1.0);
                }
            }
            for user in &users {
                self.users.remove(user);
            }
        }
        (keys.len() as u64, users)
    }

    /// Handles every deadline at or before `now`; returns the next one.
    pub(super) fn run_deadlines(&mut self, now: Millis) -> Option<Millis> {
        while let Some((when, key)) = self.deadlines.first().copied() {
            if when > now {
                return Some(when);
            }
            self.deadlines.pop_first();
            let Some(entry) = self.entries.get_mut(&key) else { continue };
            if let Err(error) = entry.refresh(now) {
                tracing::error!(%error, "could not expire a challenge");
            }
            let purge_at = entry.purge_at;
            if now >= purge_at {
                self.purge(&key, now);
            } else {
                self.deadlines.insert((purge_at, key));
            }
        }
        None
    }
}

pub(super) fn prune_before(times: &mut VecDeque<Millis>, cutoff: Millis) {
    while times.front().is_some_and(|t| *t <= cutoff) {
        times.pop_front();
    }
}

/// The `Store` operations on challenges and on the per-user counts.
impl Shared {
    pub(super) fn create_challenge(
        &self,
        challenge: Challenge,
        policy: &AdmissionPolicy,
        now: Millis,
    ) -> Result<CreateOutcome, StoreError> {
        let user = (challenge.tenant.clone(), challenge.user_id.clone());
        let block = self.durable().blocks.get(&user).filter(|block| block.in_force(now)).cloned();
        let mut table = self.challenges();
        let ChallengeTable { entries, users, deadlines } = &mut *table;

        // A repeated request_id: the user's newest live challenge made for it, if any.
        // A scan, not an index: a user holds only a handful of live challenges.
        let request = request_tag(challenge.request_id.as_deref());
        if request != 0
            && let Some(activity) = users.get(&user)
        {
            for live in activity.live.iter().rev().filter(|live| live.request == request) {
                let Some(entry) = entries.get_mut(&live.key) else { continue };
                entry.refresh(now)?;
                let existing = entry.challenge()?;
                if existing.request_id == challenge.request_id {
                    if now < existing.expires_at {
                        return Ok(CreateOutcome::Existing(existing));
                    }
                    break;
                }
            }
        }
        if let Some(block) = block {
            return Ok(CreateOutcome::Refused(Refusal::Blocked(block)));
        }

        let activity = users.entry(user).or_default();
        let mut pending = 0;
        for live in &activity.live {
            if let Some(entry) = entries.get_mut(&live.key)
                && entry.is_pending(now)?
            {
                pending += 1;
            }
        }
        if pending >= policy.max_pending {
            return Ok(CreateOutcome::Refused(Refusal::TooManyPending { limit: policy.max_pending }));
        }
        prune_before(&mut activity.created, now.minus(policy.window));
        if activity.created.len() >= policy.max_per_window as usize {
            return Ok(CreateOutcome::Refused(Refusal::RateLimited { limit: policy.max_per_window, window: policy.window }));
        }
        activity.forget_after(now.plus(policy.window));

        let key = challenge.id.bits();
        let entry = ChallengeEntry::new(&challenge, policy)?;
        activity.created.push_back(now);
        activity.live.push(LiveRef { key, request });
        let earliest = deadlines.first().map(|(when, _)| *when);
        deadlines.insert((challenge.expires_at, key));
        entries.insert(key, entry);
        if earliest.is_none_or(|earliest| challenge.expires_at < earliest) {
            self.deadline_changed.notify_one();
        }
        metrics::gauge!(names::CHALLENGES_LIVE).increment(1.0);
        Ok(CreateOutcome::Created(challenge))
    }

    pub(super) fn get_challenge(
        &self,
        tenant: &TenantId,
        id: &ChallengeId,
        now: Millis,
    ) -> Result<Option<Challenge>, StoreError> {
        Ok(self.challenges().get(tenant, id, now)?.map(|(_, challenge)| challenge))
    }

    pub(super) fn watch_challenge(
        &self,
        tenant: &TenantId,
        id: &ChallengeId,
        now: Millis,
    ) -> Result<Option<ChallengeWatch>, StoreError> {
        Ok(self.challenges().get(tenant, id, now)?.map(|(entry, challenge)| entry.subscribe(challenge)))
    }

    pub(super) fn resolve_challenge(
        &self,
        tenant: &TenantId,
        id: &ChallengeId,
        resolution: Resolution,
        now: Millis,
    ) -> Result<Option<ResolveOutcome>, StoreError> {
        // No approval lands after a block (a fraud report, wrong numbers): the
        // challenge is cancelled instead and the approval not accepted. The blocks
        // are read under their lock while the change is made (durable, then the
        // table: the order create_challenge takes them in), so a block that commits
        // meanwhile waits for this change, and no approval slips in after it.
        let durable = self.durable();
        let mut table = self.challenges();
        let Some((entry, current)) = table.get(tenant, id, now)? else { return Ok(None) };
        let user = (current.tenant.clone(), current.user_id.clone());
        let refused =
            resolution.state == ChallengeState::Approved && durable.blocks.get(&user).is_some_and(|block| block.in_force(now));
        let resolution = if refused { Resolution::cancelled() } else { resolution };
        let (changed, challenge) = entry.change(current, |challenge| challenge.apply(&resolution, now))?;
        if changed {
            metrics::gauge!(names::CHALLENGES_LIVE).decrement(1.0);
        }
        Ok(Some(ResolveOutcome { accepted: changed && !refused, challenge }))
    }

    pub(super) fn record_deliveries(&self, id: &ChallengeId, deliveries: Vec<Delivery>) -> Result<(), StoreError> {
        if let Some(entry) = self.challenges().entries.get_mut(&id.bits()) {
            // One change for all of them: one wake-up of the watchers.
            entry.update(|challenge| deliveries.into_iter().fold(false, |changed, d| challenge.record_delivery(d) | changed))?;
        }
        Ok(())
    }

    pub(super) fn pending_challenges(&self, tenant: &TenantId, user: &UserId, now: Millis) -> Result<Vec<Challenge>, StoreError> {
        let mut table = self.challenges();
        let ChallengeTable { entries, users, .. } = &mut *table;
        let Some(activity) = users.get(&(tenant.clone(), user.clone())) else { return Ok(vec![]) };
        let mut pending = Vec::new();
        for live in &activity.live {
            if let Some(entry) = entries.get_mut(&live.key)
                && entry.is_pending(now)?
            {
                pending.push(entry.challenge()?);
            }
        }
        pending.sort_by_key(|c| std::cmp::Reverse(c.created_at));
        Ok(pending)
    }
}

#[cfg(test)]
#[path = "live_tests.rs"]
mod tests;
