//! The embedded store, the default for one machine.
//!
//! Challenges live in memory: they last minutes, and a restart that forgets them is
//! harmless (the IdP's watchers see their streams end and start a new sign-in).
//! Devices, enrollments and blocks are durable in a redb file under `store.path`.
//!
//! Why redb: it is pure Rust (no C toolchain, no system library), ACID with
//! copy-on-write B-trees and crash-safe commits, and made for exactly this: a small
//! embedded key-value file. SQLite would add a C build and a SQL layer we do not need.
//!
//! The durable maps are mirrored in memory (they are small: one record per device)
//! so proofs are checked without I/O. Durable writes take `write_gate`, commit to
//! redb on the blocking pool, then update the mirror: memory never shows what the
//! file does not hold.

use std::collections::{BTreeSet, HashMap, VecDeque};
use std::path::Path;
use std::sync::{Arc, LockResult, Mutex, MutexGuard, PoisonError, RwLock, RwLockReadGuard, RwLockWriteGuard, Weak};

use async_trait::async_trait;
use redb::{Database, Durability, ReadableTable, TableDefinition};
use serde::Serialize;
use serde::de::DeserializeOwned;
use tokio::sync::{Notify, watch};
use tokio_util::sync::CancellationToken;

use super::{
    AdmissionPolicy, ChallengeWatch, CompleteOutcome, CreateOutcome, Refusal, ResolveOutcome, Store, StoreError, StrikePolicy,
    UserBlock,
};
use crate::domain::challenge::{Challenge, ChallengeState, Delivery, Resolution};
use crate::domain::device::Device;
use crate::domain::enrollment::{Enrollment, EnrollmentKind};
use crate::domain::ids::{ChallengeId, CodeDigest, DeviceId, EnrollmentId, TenantId, UserId};
use crate::domain::time::{Clock, Millis};
use crate::telemetry::metrics::{challenge_resolved, names};

const BACKEND: &str = "embedded";
/// The redb page cache (see `EmbeddedStore::open`).
const REDB_CACHE_BYTES: usize = 16 * 1024 * 1024;

const DEVICES: TableDefinition<&str, &[u8]> = TableDefinition::new("devices");
const ENROLLMENTS: TableDefinition<&str, &[u8]> = TableDefinition::new("enrollments");
/// Enrollment code digest -> enrollment id.
const ENROLLMENT_CODES: TableDefinition<&str, &str> = TableDefinition::new("enrollment_codes");
/// "tenant\0user" -> block.
const BLOCKS: TableDefinition<&str, &[u8]> = TableDefinition::new("blocks");

type UserKey = (TenantId, UserId);

fn block_key(tenant: &TenantId, user: &UserId) -> String {
    format!("{}\0{}", tenant.0, user.as_str())
}

fn encode<T: Serialize>(value: &T) -> Result<Vec<u8>, StoreError> {
    serde_json::to_vec(value).map_err(|e| StoreError::corrupt(BACKEND, e))
}

fn decode<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, StoreError> {
    serde_json::from_slice(bytes).map_err(|e| StoreError::corrupt(BACKEND, e))
}

fn io_error(error: impl std::fmt::Display) -> StoreError {
    StoreError::unavailable(BACKEND, error)
}

/// The durable records, mirrored in memory.
#[derive(Default)]
struct DurableMirror {
    devices: HashMap<DeviceId, Device>,
    user_devices: HashMap<UserKey, Vec<DeviceId>>,
    enrollments: HashMap<EnrollmentId, Enrollment>,
    codes: HashMap<CodeDigest, EnrollmentId>,
    blocks: HashMap<UserKey, UserBlock>,
}

impl DurableMirror {
    fn put_device(&mut self, device: Device) {
        let ids = self.user_devices.entry((device.tenant.clone(), device.user_id.clone())).or_default();
        if !ids.contains(&device.id) {
            ids.push(device.id.clone());
        }
        self.devices.insert(device.id.clone(), device);
    }

    fn put_enrollment(&mut self, enrollment: Enrollment) {
        if let Some(digest) = &enrollment.code_digest {
            self.codes.insert(digest.clone(), enrollment.id.clone());
        }
        self.enrollments.insert(enrollment.id.clone(), enrollment);
    }

    fn remove_device(&mut self, id: &DeviceId) {
        if let Some(device) = self.devices.remove(id) {
            let key = (device.tenant, device.user_id);
            if let Some(ids) = self.user_devices.get_mut(&key) {
                ids.retain(|other| other != id);
                if ids.is_empty() {
                    self.user_devices.remove(&key);
                }
            }
        }
    }

    /// Mirrors a write that is committed to the file.
    fn apply(&mut self, write: DurableWrite) {
        match write {
            DurableWrite::PutDevice(device) => self.put_device(device),
            DurableWrite::RemoveDevice(id) => self.remove_device(&id),
            DurableWrite::PutEnrollment(enrollment) => self.put_enrollment(enrollment),
            DurableWrite::PutBlock(key, block) => {
                self.blocks.insert(key, block);
            }
            DurableWrite::RemoveBlock(key) => {
                self.blocks.remove(&key);
            }
        }
    }
}

/// One change to the durable half, written in one redb transaction.
enum DurableWrite {
    PutDevice(Device),
    RemoveDevice(DeviceId),
    PutEnrollment(Enrollment),
    PutBlock(UserKey, UserBlock),
    RemoveBlock(UserKey),
}

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
struct UserActivity {
    /// Challenges of the user still held in memory (pending or retained), oldest first.
    live: Vec<LiveRef>,
    /// When the user's recent challenges were created, oldest first.
    created: VecDeque<Millis>,
    /// When the user's recent wrong numbers were typed, oldest first.
    wrong_numbers: VecDeque<Millis>,
    /// When the user's recent wrong TOTP codes were typed, oldest first.
    totp_failures: VecDeque<Millis>,
    totp_locked_until: Option<Millis>,
}

impl UserActivity {
    fn is_idle(&self) -> bool {
        self.live.is_empty()
            && self.created.is_empty()
            && self.wrong_numbers.is_empty()
            && self.totp_failures.is_empty()
            && self.totp_locked_until.is_none()
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
    /// Carries every change to the watchers while there are any. Most challenges are
    /// not watched for most of their life and a channel costs several hundred bytes,
    /// so it is made by the first watcher and dropped once none is left.
    watch: Option<watch::Sender<Challenge>>,
}

impl ChallengeEntry {
    fn new(challenge: &Challenge, purge_at: Millis) -> Result<Self, StoreError> {
        Ok(Self { record: pack(challenge)?, state: challenge.state, expires_at: challenge.expires_at, purge_at, watch: None })
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
        if let Some(sender) = &self.watch {
            if sender.receiver_count() == 0 {
                self.watch = None;
            } else {
                sender.send_replace(challenge.clone());
            }
        }
        Ok((true, challenge))
    }

    /// A watch of the challenge; `current` is what it holds now.
    fn subscribe(&mut self, current: Challenge) -> ChallengeWatch {
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
        if self.state == ChallengeState::Pending
            && now >= self.expires_at
            && self.update(|challenge| challenge.expire_if_due(now))?.0
        {
            challenge_resolved(ChallengeState::Expired, None);
            metrics::gauge!(names::CHALLENGES_LIVE).decrement(1.0);
        }
        Ok(())
    }

    fn is_pending(&mut self, now: Millis) -> Result<bool, StoreError> {
        self.refresh(now)?;
        Ok(self.state == ChallengeState::Pending)
    }
}

#[derive(Default)]
struct ChallengeTable {
    entries: HashMap<Key, ChallengeEntry>,
    users: HashMap<UserKey, UserActivity>,
    /// (when, key): expiry of pending challenges, then their purge.
    deadlines: BTreeSet<(Millis, Key)>,
}

impl ChallengeTable {
    /// The entry of `id`, refreshed, with its challenge, if it belongs to `tenant`.
    fn get(
        &mut self,
        tenant: &TenantId,
        id: &ChallengeId,
        now: Millis,
    ) -> Result<Option<(&mut ChallengeEntry, Challenge)>, StoreError> {
        let Some(entry) = self.entries.get_mut(&id.bits()) else { return Ok(None) };
        entry.refresh(now)?;
        let challenge = entry.challenge()?;
        if challenge.tenant != *tenant {
            return Ok(None);
        }
        Ok(Some((entry, challenge)))
    }

    fn purge(&mut self, key: &Key) {
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
            if activity.is_idle() {
                self.users.remove(&user);
            }
        }
    }

    /// Handles every deadline at or before `now`; returns the next one.
    fn run_deadlines(&mut self, now: Millis) -> Option<Millis> {
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
                self.purge(&key);
            } else {
                self.deadlines.insert((purge_at, key));
            }
        }
        None
    }
}

/// Takes a lock whether or not it is poisoned: a panic while holding one of the
/// store's locks would be a bug, and what the lock guards stays usable.
trait Recover<Guard> {
    fn recover(self) -> Guard;
}

impl<Guard> Recover<Guard> for LockResult<Guard> {
    fn recover(self) -> Guard {
        self.unwrap_or_else(PoisonError::into_inner)
    }
}

fn prune_before(times: &mut VecDeque<Millis>, cutoff: Millis) {
    while times.front().is_some_and(|t| *t <= cutoff) {
        times.pop_front();
    }
}

struct Shared {
    challenges: Mutex<ChallengeTable>,
    durable: RwLock<DurableMirror>,
    /// Serialises durable writes so that check-then-commit steps are atomic.
    write_gate: tokio::sync::Mutex<()>,
    db: Arc<Database>,
    /// Wakes the deadline task when an earlier deadline arrives.
    deadline_changed: Arc<Notify>,
    /// Devices whose `last_used_at` changed in memory only, not yet in the file.
    touched: Mutex<std::collections::HashSet<DeviceId>>,
}

impl Shared {
    fn challenges(&self) -> MutexGuard<'_, ChallengeTable> {
        self.challenges.lock().recover()
    }

    fn durable(&self) -> RwLockReadGuard<'_, DurableMirror> {
        self.durable.read().recover()
    }

    fn durable_mut(&self) -> RwLockWriteGuard<'_, DurableMirror> {
        self.durable.write().recover()
    }

    /// Commits `writes` in one transaction on the blocking pool, then mirrors them.
    /// Callers hold `write_gate`.
    async fn commit(&self, writes: Vec<DurableWrite>, durability: Durability) -> Result<(), StoreError> {
        let db = Arc::clone(&self.db);
        let writes = tokio::task::spawn_blocking(move || -> Result<Vec<DurableWrite>, StoreError> {
            let mut txn = db.begin_write().map_err(io_error)?;
            txn.set_durability(durability);
            {
                let mut devices = txn.open_table(DEVICES).map_err(io_error)?;
                let mut enrollments = txn.open_table(ENROLLMENTS).map_err(io_error)?;
                let mut codes = txn.open_table(ENROLLMENT_CODES).map_err(io_error)?;
                let mut blocks = txn.open_table(BLOCKS).map_err(io_error)?;
                for write in &writes {
                    match write {
                        DurableWrite::PutDevice(device) => {
                            devices.insert(device.id.to_string().as_str(), encode(device)?.as_slice()).map_err(io_error)?;
                        }
                        DurableWrite::RemoveDevice(id) => {
                            devices.remove(id.to_string().as_str()).map_err(io_error)?;
                        }
                        DurableWrite::PutEnrollment(enrollment) => {
                            let id = enrollment.id.to_string();
                            enrollments.insert(id.as_str(), encode(enrollment)?.as_slice()).map_err(io_error)?;
                            if let Some(digest) = &enrollment.code_digest {
                                codes.insert(digest.0.as_str(), id.as_str()).map_err(io_error)?;
                            }
                        }
                        DurableWrite::PutBlock((tenant, user), block) => {
                            blocks.insert(block_key(tenant, user).as_str(), encode(block)?.as_slice()).map_err(io_error)?;
                        }
                        DurableWrite::RemoveBlock((tenant, user)) => {
                            blocks.remove(block_key(tenant, user).as_str()).map_err(io_error)?;
                        }
                    }
                }
            }
            txn.commit().map_err(io_error)?;
            Ok(writes)
        })
        .await
        .map_err(io_error)??;

        let mut mirror = self.durable_mut();
        for write in writes {
            mirror.apply(write);
        }
        Ok(())
    }
}

/// See the module documentation.
pub struct EmbeddedStore {
    shared: Arc<Shared>,
    /// Stops the deadline task when the store is dropped.
    closing: CancellationToken,
}

impl EmbeddedStore {
    /// Opens (or creates) the store under `dir` and starts its deadline task on the
    /// current tokio runtime. `clock` drives expiry.
    pub async fn open(dir: &Path, clock: Arc<dyn Clock>) -> Result<Self, StoreError> {
        let dir = dir.to_owned();
        let path = dir.join("pushmatch.redb");
        let (db, mirror) = tokio::task::spawn_blocking(move || -> Result<(Database, DurableMirror), StoreError> {
            std::fs::create_dir_all(&dir).map_err(|e| io_error(format!("cannot create {}: {e}", dir.display())))?;
            // redb caches up to 1 GiB by default. Every record is mirrored in memory
            // already, so the file's cache only needs to serve writes: keep it small.
            let db = Database::builder()
                .set_cache_size(REDB_CACHE_BYTES)
                .create(&path)
                .map_err(|e| io_error(format!("cannot open {}: {e}", path.display())))?;
            let mirror = load_mirror(&db)?;
            Ok((db, mirror))
        })
        .await
        .map_err(io_error)??;

        let shared = Arc::new(Shared {
            challenges: Mutex::new(ChallengeTable::default()),
            durable: RwLock::new(mirror),
            write_gate: tokio::sync::Mutex::new(()),
            db: Arc::new(db),
            deadline_changed: Arc::new(Notify::new()),
            touched: Mutex::new(std::collections::HashSet::new()),
        });
        let closing = CancellationToken::new();
        let wake = Arc::clone(&shared.deadline_changed);
        tokio::spawn(run_deadlines(Arc::downgrade(&shared), wake, clock, closing.clone()));
        tokio::spawn(flush_touches(Arc::downgrade(&shared), closing.clone()));
        Ok(Self { shared, closing })
    }
}

impl Drop for EmbeddedStore {
    fn drop(&mut self) {
        self.closing.cancel();
    }
}

fn load_mirror(db: &Database) -> Result<DurableMirror, StoreError> {
    // Create the tables on first open so that reads find them.
    let txn = db.begin_write().map_err(io_error)?;
    {
        txn.open_table(DEVICES).map_err(io_error)?;
        txn.open_table(ENROLLMENTS).map_err(io_error)?;
        txn.open_table(ENROLLMENT_CODES).map_err(io_error)?;
        txn.open_table(BLOCKS).map_err(io_error)?;
    }
    txn.commit().map_err(io_error)?;

    let mut mirror = DurableMirror::default();
    let txn = db.begin_read().map_err(io_error)?;
    for row in txn.open_table(DEVICES).map_err(io_error)?.iter().map_err(io_error)? {
        let (_, value) = row.map_err(io_error)?;
        mirror.put_device(decode(value.value())?);
    }
    for row in txn.open_table(ENROLLMENTS).map_err(io_error)?.iter().map_err(io_error)? {
        let (_, value) = row.map_err(io_error)?;
        mirror.put_enrollment(decode(value.value())?);
    }
    for row in txn.open_table(BLOCKS).map_err(io_error)?.iter().map_err(io_error)? {
        let (key, value) = row.map_err(io_error)?;
        let Some((tenant, user)) = key.value().split_once('\0') else {
            return Err(StoreError::corrupt(BACKEND, "block key without separator"));
        };
        let user = UserId::parse(user).map_err(|e| StoreError::corrupt(BACKEND, e))?;
        mirror.blocks.insert((TenantId(tenant.to_owned()), user), decode(value.value())?);
    }
    Ok(mirror)
}

/// Writes batched `last_used_at` changes every few seconds, one transaction each
/// time, without an fsync of its own (the next durable commit carries it to disk).
async fn flush_touches(shared: Weak<Shared>, closing: CancellationToken) {
    const EVERY: std::time::Duration = std::time::Duration::from_secs(2);
    loop {
        tokio::select! {
            () = closing.cancelled() => return,
            () = tokio::time::sleep(EVERY) => {}
        }
        let Some(shared) = shared.upgrade() else { return };
        let touched: Vec<DeviceId> = shared.touched.lock().recover().drain().collect();
        if touched.is_empty() {
            continue;
        }
        let _gate = shared.write_gate.lock().await;
        let writes: Vec<DurableWrite> = {
            let mirror = shared.durable();
            touched.iter().filter_map(|id| mirror.devices.get(id)).cloned().map(DurableWrite::PutDevice).collect()
        };
        if let Err(error) = shared.commit(writes, Durability::None).await {
            tracing::warn!(%error, "could not write devices' last use; retrying");
            shared.touched.lock().recover().extend(touched);
        }
    }
}

/// Expires pending challenges at their deadline and purges old ones, so watchers
/// learn of expiry without anyone polling. It holds the store only weakly while it
/// waits, so dropping the store closes the database file at once.
async fn run_deadlines(shared: Weak<Shared>, wake: Arc<Notify>, clock: Arc<dyn Clock>, closing: CancellationToken) {
    loop {
        // Register for wake-ups before reading the next deadline, so none is missed.
        let changed = wake.notified();
        let next = match shared.upgrade() {
            Some(strong) => strong.challenges().run_deadlines(clock.now()),
            None => return,
        };
        let sleep = match next {
            Some(when) => clock.sleep_until(when),
            None => Box::pin(std::future::pending()),
        };
        tokio::select! {
            () = sleep => {}
            () = changed => {}
            () = closing.cancelled() => return,
        }
    }
}

#[async_trait]
impl Store for EmbeddedStore {
    fn backend(&self) -> &'static str {
        BACKEND
    }

    async fn create_challenge(
        &self,
        challenge: Challenge,
        policy: &AdmissionPolicy,
        now: Millis,
    ) -> Result<CreateOutcome, StoreError> {
        let user = (challenge.tenant.clone(), challenge.user_id.clone());
        let block = self.shared.durable().blocks.get(&user).filter(|block| block.in_force(now)).cloned();
        let mut table = self.shared.challenges();
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

        let key = challenge.id.bits();
        let entry = ChallengeEntry::new(&challenge, challenge.expires_at.plus(policy.retention))?;
        activity.created.push_back(now);
        activity.live.push(LiveRef { key, request });
        let earliest = deadlines.first().map(|(when, _)| *when);
        deadlines.insert((challenge.expires_at, key));
        entries.insert(key, entry);
        if earliest.is_none_or(|earliest| challenge.expires_at < earliest) {
            self.shared.deadline_changed.notify_one();
        }
        metrics::gauge!(names::CHALLENGES_LIVE).increment(1.0);
        Ok(CreateOutcome::Created(challenge))
    }

    async fn get_challenge(&self, tenant: &TenantId, id: &ChallengeId, now: Millis) -> Result<Option<Challenge>, StoreError> {
        Ok(self.shared.challenges().get(tenant, id, now)?.map(|(_, challenge)| challenge))
    }

    async fn watch_challenge(
        &self,
        tenant: &TenantId,
        id: &ChallengeId,
        now: Millis,
    ) -> Result<Option<ChallengeWatch>, StoreError> {
        Ok(self.shared.challenges().get(tenant, id, now)?.map(|(entry, challenge)| entry.subscribe(challenge)))
    }

    async fn resolve_challenge(
        &self,
        tenant: &TenantId,
        id: &ChallengeId,
        resolution: Resolution,
        now: Millis,
    ) -> Result<Option<ResolveOutcome>, StoreError> {
        let mut table = self.shared.challenges();
        let Some((entry, current)) = table.get(tenant, id, now)? else { return Ok(None) };
        let (accepted, challenge) = entry.change(current, |challenge| challenge.apply(&resolution, now))?;
        if accepted {
            metrics::gauge!(names::CHALLENGES_LIVE).decrement(1.0);
        }
        Ok(Some(ResolveOutcome { accepted, challenge }))
    }

    async fn record_delivery(&self, id: &ChallengeId, delivery: Delivery) -> Result<(), StoreError> {
        if let Some(entry) = self.shared.challenges().entries.get_mut(&id.bits()) {
            entry.update(|challenge| challenge.record_delivery(delivery))?;
        }
        Ok(())
    }

    async fn pending_challenges(&self, tenant: &TenantId, user: &UserId, now: Millis) -> Result<Vec<Challenge>, StoreError> {
        let mut table = self.shared.challenges();
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

    async fn insert_enrollment(&self, enrollment: Enrollment) -> Result<(), StoreError> {
        let _gate = self.shared.write_gate.lock().await;
        self.shared.commit(vec![DurableWrite::PutEnrollment(enrollment)], Durability::Immediate).await
    }

    async fn get_enrollment(&self, tenant: &TenantId, id: &EnrollmentId) -> Result<Option<Enrollment>, StoreError> {
        Ok(self.shared.durable().enrollments.get(id).filter(|e| e.tenant == *tenant).cloned())
    }

    async fn enrollment_by_code(&self, code: &CodeDigest) -> Result<Option<Enrollment>, StoreError> {
        let mirror = self.shared.durable();
        Ok(mirror.codes.get(code).and_then(|id| mirror.enrollments.get(id)).cloned())
    }

    async fn complete_enrollment(&self, code: &CodeDigest, device: Device, now: Millis) -> Result<CompleteOutcome, StoreError> {
        let _gate = self.shared.write_gate.lock().await;
        let enrollment = {
            let mirror = self.shared.durable();
            let found = mirror.codes.get(code).and_then(|id| mirror.enrollments.get(id));
            match found {
                None => return Ok(CompleteOutcome::UnknownCode),
                Some(e) if e.kind != EnrollmentKind::Push => return Ok(CompleteOutcome::UnknownCode),
                Some(e) if e.completed => return Ok(CompleteOutcome::AlreadyUsed),
                Some(e) if now >= e.expires_at => return Ok(CompleteOutcome::Expired),
                Some(e) => e.clone(),
            }
        };
        let completed = Enrollment { completed: true, device_id: Some(device.id.clone()), ..enrollment };
        self.shared
            .commit(vec![DurableWrite::PutEnrollment(completed.clone()), DurableWrite::PutDevice(device)], Durability::Immediate)
            .await?;
        Ok(CompleteOutcome::Completed(Box::new(completed)))
    }

    async fn get_device(&self, id: &DeviceId) -> Result<Option<Device>, StoreError> {
        Ok(self.shared.durable().devices.get(id).cloned())
    }

    async fn list_devices(&self, tenant: &TenantId, user: &UserId) -> Result<Vec<Device>, StoreError> {
        let mirror = self.shared.durable();
        let ids = mirror.user_devices.get(&(tenant.clone(), user.clone()));
        Ok(ids.into_iter().flatten().filter_map(|id| mirror.devices.get(id)).cloned().collect())
    }

    async fn remove_device(&self, tenant: &TenantId, id: &DeviceId) -> Result<bool, StoreError> {
        let _gate = self.shared.write_gate.lock().await;
        let owned = self.shared.durable().devices.get(id).is_some_and(|device| device.tenant == *tenant);
        if owned {
            self.shared.commit(vec![DurableWrite::RemoveDevice(id.clone())], Durability::Immediate).await?;
        }
        Ok(owned)
    }

    async fn set_push_token(&self, id: &DeviceId, token: &str) -> Result<bool, StoreError> {
        let _gate = self.shared.write_gate.lock().await;
        let Some(device) = self.shared.durable().devices.get(id).cloned() else { return Ok(false) };
        let updated = Device { push_token: token.to_owned(), push_enabled: !token.is_empty(), ..device };
        self.shared.commit(vec![DurableWrite::PutDevice(updated)], Durability::Immediate).await?;
        Ok(true)
    }

    async fn disable_push(&self, id: &DeviceId, token: &str) -> Result<(), StoreError> {
        let _gate = self.shared.write_gate.lock().await;
        let device = self.shared.durable().devices.get(id).filter(|d| d.push_token == token && d.push_enabled).cloned();
        if let Some(device) = device {
            let updated = Device { push_enabled: false, ..device };
            self.shared.commit(vec![DurableWrite::PutDevice(updated)], Durability::Immediate).await?;
        }
        Ok(())
    }

    /// Informational only, and on every answer's path: the mirror changes at once and
    /// the file follows in batches (`flush_touches`), so answers never queue behind a
    /// disk write for it. A crash can lose the last few seconds of `last_used_at`.
    async fn touch_device(&self, id: &DeviceId, now: Millis) -> Result<(), StoreError> {
        if let Some(device) = self.shared.durable_mut().devices.get_mut(id) {
            device.last_used_at = Some(now);
            self.shared.touched.lock().recover().insert(id.clone());
        }
        Ok(())
    }

    async fn block_user(&self, tenant: &TenantId, user: &UserId, block: UserBlock) -> Result<(), StoreError> {
        let _gate = self.shared.write_gate.lock().await;
        self.shared.commit(vec![DurableWrite::PutBlock((tenant.clone(), user.clone()), block)], Durability::Immediate).await
    }

    async fn record_wrong_number(
        &self,
        tenant: &TenantId,
        user: &UserId,
        policy: &StrikePolicy,
        now: Millis,
    ) -> Result<Option<UserBlock>, StoreError> {
        let key = (tenant.clone(), user.clone());
        let reached = {
            let mut table = self.shared.challenges();
            let activity = table.users.entry(key.clone()).or_default();
            prune_before(&mut activity.wrong_numbers, now.minus(policy.window));
            activity.wrong_numbers.push_back(now);
            let reached = activity.wrong_numbers.len() >= policy.limit as usize;
            if reached {
                activity.wrong_numbers.clear();
            }
            reached
        };
        if !reached {
            return Ok(None);
        }
        let block = UserBlock { reason: super::BlockReason::WrongNumbers, since: now, until: Some(now.plus(policy.block_for)) };
        self.block_user(tenant, user, block.clone()).await?;
        Ok(Some(block))
    }

    async fn unblock_user(&self, tenant: &TenantId, user: &UserId) -> Result<(), StoreError> {
        let key = (tenant.clone(), user.clone());
        if let Some(activity) = self.shared.challenges().users.get_mut(&key) {
            activity.wrong_numbers.clear();
        }
        let _gate = self.shared.write_gate.lock().await;
        if self.shared.durable().blocks.contains_key(&key) {
            self.shared.commit(vec![DurableWrite::RemoveBlock(key)], Durability::Immediate).await?;
        }
        Ok(())
    }

    async fn user_block(&self, tenant: &TenantId, user: &UserId, now: Millis) -> Result<Option<UserBlock>, StoreError> {
        let key = (tenant.clone(), user.clone());
        Ok(self.shared.durable().blocks.get(&key).filter(|block| block.in_force(now)).cloned())
    }

    async fn confirm_totp_enrollment(
        &self,
        tenant: &TenantId,
        id: &EnrollmentId,
        device: Device,
        now: Millis,
    ) -> Result<CompleteOutcome, StoreError> {
        let _gate = self.shared.write_gate.lock().await;
        let enrollment = {
            let mirror = self.shared.durable();
            match mirror.enrollments.get(id).filter(|e| e.tenant == *tenant && e.kind == EnrollmentKind::Totp) {
                None => return Ok(CompleteOutcome::UnknownCode),
                Some(e) if e.completed => return Ok(CompleteOutcome::AlreadyUsed),
                Some(e) if now >= e.expires_at => return Ok(CompleteOutcome::Expired),
                Some(e) => e.clone(),
            }
        };
        // The pending secret moves onto the device: the enrollment keeps no copy.
        let completed = Enrollment { completed: true, device_id: Some(device.id.clone()), totp_secret: None, ..enrollment };
        self.shared
            .commit(vec![DurableWrite::PutEnrollment(completed.clone()), DurableWrite::PutDevice(device)], Durability::Immediate)
            .await?;
        Ok(CompleteOutcome::Completed(Box::new(completed)))
    }

    async fn spend_totp_step(&self, id: &DeviceId, step: u64) -> Result<bool, StoreError> {
        let _gate = self.shared.write_gate.lock().await;
        let Some(device) = self.shared.durable().devices.get(id).cloned() else { return Ok(false) };
        if device.totp_last_step.is_some_and(|last| last >= step) {
            return Ok(false);
        }
        let updated = Device { totp_last_step: Some(step), ..device };
        self.shared.commit(vec![DurableWrite::PutDevice(updated)], Durability::Immediate).await?;
        Ok(true)
    }

    async fn record_totp_failure(
        &self,
        tenant: &TenantId,
        user: &UserId,
        policy: &StrikePolicy,
        now: Millis,
    ) -> Result<Option<Millis>, StoreError> {
        let mut table = self.shared.challenges();
        let activity = table.users.entry((tenant.clone(), user.clone())).or_default();
        prune_before(&mut activity.totp_failures, now.minus(policy.window));
        activity.totp_failures.push_back(now);
        if activity.totp_failures.len() < policy.limit as usize {
            return Ok(None);
        }
        activity.totp_failures.clear();
        let until = now.plus(policy.block_for);
        activity.totp_locked_until = Some(until);
        Ok(Some(until))
    }

    async fn totp_locked_until(&self, tenant: &TenantId, user: &UserId, now: Millis) -> Result<Option<Millis>, StoreError> {
        let mut table = self.shared.challenges();
        let key = (tenant.clone(), user.clone());
        let Some(activity) = table.users.get_mut(&key) else { return Ok(None) };
        if activity.totp_locked_until.is_some_and(|until| now >= until) {
            activity.totp_locked_until = None;
        }
        let locked = activity.totp_locked_until;
        if activity.is_idle() {
            table.users.remove(&key);
        }
        Ok(locked)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::time::ManualClock;

    #[tokio::test]
    async fn embedded_store_passes_the_conformance_suite() {
        let dir = tempfile::tempdir().expect("tempdir");
        let opened = std::sync::atomic::AtomicUsize::new(0);
        super::super::conformance::run_all(|clock| {
            let n = opened.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let path = dir.path().join(format!("store-{n}"));
            async move { EmbeddedStore::open(&path, Arc::new(clock)).await.expect("store opens") }
        })
        .await;
    }

    /// The watch channel is made by the first watcher and dropped with the last; a
    /// watcher that comes after that still sees every later change.
    #[tokio::test]
    async fn a_watcher_after_the_last_one_left_still_sees_changes() {
        use crate::domain::challenge::Resolution;
        let dir = tempfile::tempdir().expect("tempdir");
        let clock = ManualClock::starting_now();
        let store = EmbeddedStore::open(dir.path(), Arc::new(clock.clone())).await.expect("open");
        let tenant = TenantId("t".into());
        let user = UserId::parse("jan").expect("user");
        let policy = super::super::conformance::policy();
        let challenge = super::super::conformance::sample_challenge(&tenant, &user, clock.now(), None);
        let id = challenge.id.clone();
        store.create_challenge(challenge, &policy, clock.now()).await.expect("create");

        let first = store.watch_challenge(&tenant, &id, clock.now()).await.expect("watch").expect("found");
        drop(first);
        let delivery = super::super::conformance::sample_delivery();
        // This change finds no watcher left, and drops the channel.
        store.record_delivery(&id, delivery.clone()).await.expect("delivery");

        let mut second = store.watch_challenge(&tenant, &id, clock.now()).await.expect("watch").expect("found");
        assert_eq!(second.borrow_and_update().deliveries, vec![delivery], "the new watcher starts from the current state");
        let resolution = Resolution { state: ChallengeState::Denied, deny_reason: None, device_id: None };
        assert!(store.resolve_challenge(&tenant, &id, resolution, clock.now()).await.expect("resolve").expect("found").accepted);
        tokio::time::timeout(std::time::Duration::from_secs(5), second.changed())
            .await
            .expect("the change arrives")
            .expect("the channel is open");
        assert_eq!(second.borrow().state, ChallengeState::Denied);
    }

    #[tokio::test]
    async fn durable_records_survive_a_reopen() {
        let dir = tempfile::tempdir().expect("tempdir");
        let clock = ManualClock::starting_now();
        let tenant = TenantId("t".into());
        let user = UserId::parse("jan").expect("user");
        let device = super::super::conformance::sample_device(&tenant, &user, clock.now());
        {
            let store = EmbeddedStore::open(dir.path(), Arc::new(clock.clone())).await.expect("open");
            let enrollment = super::super::conformance::sample_enrollment(&tenant, &user, clock.now());
            let code = enrollment.code_digest.clone().expect("push enrollment");
            store.insert_enrollment(enrollment).await.expect("insert");
            assert!(matches!(
                store.complete_enrollment(&code, device.clone(), clock.now()).await.expect("complete"),
                CompleteOutcome::Completed(_)
            ));
            let block = UserBlock { reason: super::super::BlockReason::FraudReported, since: clock.now(), until: None };
            store.block_user(&tenant, &user, block).await.expect("block");
        }
        let store = EmbeddedStore::open(dir.path(), Arc::new(clock.clone())).await.expect("reopen");
        assert_eq!(store.get_device(&device.id).await.expect("get"), Some(device.clone()));
        assert_eq!(store.list_devices(&tenant, &user).await.expect("list"), vec![device]);
        assert!(store.user_block(&tenant, &user, clock.now()).await.expect("block").is_some());
    }
}
