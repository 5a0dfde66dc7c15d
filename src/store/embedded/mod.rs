//! The embedded store, the default for one machine: what lasts minutes lives in
//! memory, what must outlast a restart is durable in a redb file under `store.path`.
//!
//! # Live, in memory (`live.rs`)
//!
//! Challenges last minutes, and a restart that forgets them is harmless (the IdP's
//! watchers see their streams end and start a new sign-in). A broker may hold
//! hundreds of thousands, so each is kept as one compact postcard record, with its
//! state and deadlines beside it so the frequent checks decode nothing. A deadline
//! task expires pending challenges on time, so watchers hear of it without polling,
//! and purges them after their retention.
//!
//! Beside the challenges, per user: the live challenges (to find a repeated
//! request_id and to count the pending ones), when recent challenges were created
//! (the rate window), the wrong numbers and wrong TOTP codes typed lately, and the
//! TOTP lock they lead to. They matter only within their windows, so a restart
//! forgets them too: strikes start afresh and a TOTP lock lifts. The block that
//! enough wrong numbers earn is durable.
//!
//! # Durable, in redb (`durable.rs`)
//!
//! Devices, enrollments (with an index from enrollment code digest to enrollment)
//! and user blocks: losing them would unenroll users or lift blocks.
//!
//! Why redb: it is pure Rust (no C toolchain, no system library), ACID with
//! copy-on-write B-trees and crash-safe commits, and made for exactly this: a small
//! embedded key-value file. SQLite would add a C build and a SQL layer we do not need.
//!
//! The durable maps are mirrored in memory (they are small: one record per device)
//! so proofs are checked without I/O; completed enrollments are not (they are read
//! from the file when asked, `finished.rs`). Durable writes take `write_gate`, commit to
//! redb on the blocking pool, then update the mirror: memory never shows what the
//! file does not hold. Enrollment writes (begin, complete, confirm TOTP) go through
//! one writer task that commits every one waiting in one transaction, one fsync for
//! the group, and answers each caller once the group is on disk (`writer.rs`). The one exception is a device's `last_used_at`, informational
//! and on every answer's path: it changes in the mirror at once and reaches the file
//! in batches every two seconds, so a crash can lose the last few seconds of it.
//!
//! # This file
//!
//! [`EmbeddedStore`]: opening the file, the background tasks, and the `Store`
//! trait, whose methods hand over to `Shared`: the challenge and per-user-count
//! operations are in `live.rs`, the device, enrollment and block ones in `durable.rs`
//! (enrollments decided and committed in groups by `writer.rs`), `purge_tenant` in
//! `purge.rs`.

mod device_record;
mod durable;
mod finished;
mod limits;
mod live;
mod purge;
mod touches;
mod writer;

use std::path::Path;
use std::sync::{Arc, Weak};

use async_trait::async_trait;
use parking_lot::{Mutex, MutexGuard, RwLock, RwLockReadGuard, RwLockWriteGuard};
use redb::Database;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use self::durable::{DurableMirror, load_mirror};
use self::live::ChallengeTable;
use self::touches::flush_touches;
use super::{
    AdmissionPolicy, ChallengeWatch, CompleteOutcome, CreateOutcome, EnrollmentLimits, InsertOutcome, ResolveOutcome, Store,
    StoreError, StrikePolicy, TenantPurge, TotpAttempt, TotpPolicy, UserBlock,
};
use crate::domain::challenge::{Challenge, Delivery, Resolution};
use crate::domain::device::{Device, ProofUse};
use crate::domain::enrollment::Enrollment;
use crate::domain::ids::{ChallengeId, CodeDigest, DeviceId, EnrollmentId, TenantId, UserId};
use crate::domain::time::{Clock, Millis};

const BACKEND: &str = "embedded";
/// Enrollment writes waiting for the writer (`writer.rs`) at most; past it callers
/// wait for room.
const ENROLLMENT_QUEUE: usize = 4_096;
/// The redb page cache (see `open_database`): 4 MiB. With 16 MiB the cache filled
/// while 111,885 phones enrolled, some 150 bytes a phone of the broker's memory, for
/// no gain in enrollment or sign-in speed (BENCHMARKS.md, issue 19).
const REDB_CACHE_BYTES: usize = 4 * 1024 * 1024;

type UserKey = (TenantId, UserId);

fn io_error(error: impl std::fmt::Display) -> StoreError {
    StoreError::unavailable(BACKEND, error)
}

struct Shared {
    challenges: Mutex<ChallengeTable>,
    durable: RwLock<DurableMirror>,
    /// Serialises durable writes so that check-then-commit steps are atomic.
    write_gate: tokio::sync::Mutex<()>,
    /// The open file; `None` after a failed write until the next commit reopens it
    /// (`durable.rs`: after an I/O error, such as a full disk, redb refuses every
    /// later write until the file is opened again).
    db: Mutex<Option<Arc<Database>>>,
    path: std::path::PathBuf,
    /// Wakes the deadline task when an earlier deadline arrives.
    deadline_changed: Arc<Notify>,
    /// Devices whose `last_used_at` changed in memory only, not yet in the file.
    touched: Mutex<std::collections::HashSet<DeviceId>>,
    /// Device proofs used, until their timestamp leaves the window (`limits.rs`).
    /// A B-tree, not a hash table: used proofs come and go at the sign-in rate, and
    /// a hash table's deleted markers would double it once (see `live.rs`, `Entries`).
    proofs: Mutex<std::collections::BTreeMap<ProofUse, Millis>>,
    /// Enrollment writes for the writer task, which commits them in groups (`writer.rs`).
    enrollment_ops: tokio::sync::mpsc::Sender<writer::EnrollmentOp>,
    groups: GroupStats,
    /// When the file is next scanned for completed enrollments past their keep
    /// time (`finished.rs`).
    next_file_sweep: Mutex<Millis>,
}

/// How the enrollment writer grouped: groups committed and the operations in them.
#[derive(Debug, Default)]
struct GroupStats {
    groups: std::sync::atomic::AtomicU64,
    operations: std::sync::atomic::AtomicU64,
}

impl GroupStats {
    fn record(&self, operations: usize) {
        use std::sync::atomic::Ordering::Relaxed;
        self.groups.fetch_add(1, Relaxed);
        self.operations.fetch_add(operations as u64, Relaxed);
    }
}

impl Shared {
    fn challenges(&self) -> MutexGuard<'_, ChallengeTable> {
        self.challenges.lock()
    }

    fn durable(&self) -> RwLockReadGuard<'_, DurableMirror> {
        self.durable.read()
    }

    fn durable_mut(&self) -> RwLockWriteGuard<'_, DurableMirror> {
        self.durable.write()
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
        let opening = path.clone();
        let (db, mirror) = tokio::task::spawn_blocking(move || -> Result<(Database, DurableMirror), StoreError> {
            std::fs::create_dir_all(&dir).map_err(|e| io_error(format!("cannot create {}: {e}", dir.display())))?;
            let db = open_database(&opening)?;
            let mirror = load_mirror(&db)?;
            Ok((db, mirror))
        })
        .await
        .map_err(io_error)??;

        let (enrollment_ops, enrollment_receiver) = tokio::sync::mpsc::channel(ENROLLMENT_QUEUE);
        let shared = Arc::new(Shared {
            challenges: Mutex::new(ChallengeTable::default()),
            durable: RwLock::new(mirror),
            write_gate: tokio::sync::Mutex::new(()),
            db: Mutex::new(Some(Arc::new(db))),
            path,
            deadline_changed: Arc::new(Notify::new()),
            touched: Mutex::new(std::collections::HashSet::new()),
            proofs: Mutex::new(std::collections::BTreeMap::new()),
            enrollment_ops,
            groups: GroupStats::default(),
            next_file_sweep: Mutex::new(Millis(0)),
        });
        tokio::spawn(writer::run(Arc::downgrade(&shared), enrollment_receiver));
        let closing = CancellationToken::new();
        let wake = Arc::clone(&shared.deadline_changed);
        tokio::spawn(run_deadlines(Arc::downgrade(&shared), wake, Arc::clone(&clock), closing.clone()));
        tokio::spawn(run_sweeps(Arc::downgrade(&shared), clock, closing.clone()));
        tokio::spawn(flush_touches(Arc::downgrade(&shared), closing.clone()));
        Ok(Self { shared, closing })
    }
}

/// Opens (or creates) the redb file. redb caches up to 1 GiB by default; every
/// record is mirrored in memory already, so the file's cache only needs to serve
/// writes: keep it small.
fn open_database(path: &Path) -> Result<Database, StoreError> {
    Database::builder()
        .set_cache_size(REDB_CACHE_BYTES)
        .create(path)
        .map_err(|e| io_error(format!("cannot open {}: {e}", path.display())))
}

impl Drop for EmbeddedStore {
    fn drop(&mut self) {
        self.closing.cancel();
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

/// Sweeps every few seconds (of the store's clock): idle per-user counts, used
/// proofs and old enrollments go, so the store's size follows its real users, not
/// the strangers who called it.
async fn run_sweeps(shared: Weak<Shared>, clock: Arc<dyn Clock>, closing: CancellationToken) {
    const EVERY: std::time::Duration = std::time::Duration::from_secs(10);
    loop {
        let next = clock.sleep_until(clock.now().plus(EVERY));
        tokio::select! {
            () = next => {}
            () = closing.cancelled() => return,
        }
        let Some(strong) = shared.upgrade() else { return };
        if let Err(error) = strong.sweep(clock.now()).await {
            tracing::warn!(%error, "could not purge old enrollments; retrying at the next sweep");
        }
    }
}

/// Each operation is a method of `Shared`: on challenges and per-user counts in
/// `live.rs`, on devices, enrollments and blocks in `durable.rs`.
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
        self.shared.create_challenge(challenge, policy, now)
    }

    async fn get_challenge(&self, tenant: &TenantId, id: &ChallengeId, now: Millis) -> Result<Option<Challenge>, StoreError> {
        self.shared.get_challenge(tenant, id, now)
    }

    async fn watch_challenge(
        &self,
        tenant: &TenantId,
        id: &ChallengeId,
        now: Millis,
    ) -> Result<Option<ChallengeWatch>, StoreError> {
        self.shared.watch_challenge(tenant, id, now)
    }

    async fn resolve_challenge(
        &self,
        tenant: &TenantId,
        id: &ChallengeId,
        resolution: Resolution,
        now: Millis,
    ) -> Result<Option<ResolveOutcome>, StoreError> {
        self.shared.resolve_challenge(tenant, id, resolution, now)
    }

    async fn record_deliveries(&self, id: &ChallengeId, deliveries: Vec<Delivery>) -> Result<(), StoreError> {
        self.shared.record_deliveries(id, deliveries)
    }

    async fn pending_challenges(&self, tenant: &TenantId, user: &UserId, now: Millis) -> Result<Vec<Challenge>, StoreError> {
        self.shared.pending_challenges(tenant, user, now)
    }

    async fn insert_enrollment(
        &self,
        enrollment: Enrollment,
        limits: &EnrollmentLimits,
        now: Millis,
    ) -> Result<InsertOutcome, StoreError> {
        self.shared.insert_enrollment(enrollment, limits, now).await
    }

    async fn get_enrollment(&self, tenant: &TenantId, id: &EnrollmentId) -> Result<Option<Enrollment>, StoreError> {
        self.shared.get_enrollment(tenant, id).await
    }

    async fn enrollment_by_code(&self, code: &CodeDigest) -> Result<Option<Enrollment>, StoreError> {
        self.shared.enrollment_by_code(code).await
    }

    async fn complete_enrollment(
        &self,
        code: &CodeDigest,
        device: Device,
        limits: &EnrollmentLimits,
        now: Millis,
    ) -> Result<CompleteOutcome, StoreError> {
        self.shared.complete_enrollment(code, device, limits, now).await
    }

    async fn get_device(&self, id: &DeviceId) -> Result<Option<Device>, StoreError> {
        self.shared.get_device(id)
    }

    async fn list_devices(&self, tenant: &TenantId, user: &UserId) -> Result<Vec<Device>, StoreError> {
        self.shared.list_devices(tenant, user)
    }

    async fn remove_device(&self, tenant: &TenantId, id: &DeviceId) -> Result<bool, StoreError> {
        self.shared.remove_device(tenant, id).await
    }

    async fn set_push_token(&self, id: &DeviceId, token: &str) -> Result<bool, StoreError> {
        self.shared.set_push_token(id, token).await
    }

    async fn disable_push(&self, id: &DeviceId, token: &str) -> Result<(), StoreError> {
        self.shared.disable_push(id, token).await
    }

    async fn touch_device(&self, id: &DeviceId, now: Millis) -> Result<(), StoreError> {
        self.shared.touch_device(id, now)
    }

    async fn block_user(&self, tenant: &TenantId, user: &UserId, block: UserBlock, now: Millis) -> Result<UserBlock, StoreError> {
        self.shared.block_user(tenant, user, block, now).await
    }

    async fn record_wrong_number(
        &self,
        tenant: &TenantId,
        user: &UserId,
        policy: &StrikePolicy,
        now: Millis,
    ) -> Result<Option<UserBlock>, StoreError> {
        self.shared.record_wrong_number(tenant, user, policy, now).await
    }

    async fn unblock_user(&self, tenant: &TenantId, user: &UserId) -> Result<(), StoreError> {
        self.shared.unblock_user(tenant, user).await
    }

    async fn confirm_totp_enrollment(
        &self,
        tenant: &TenantId,
        id: &EnrollmentId,
        device: Device,
        limits: &EnrollmentLimits,
        now: Millis,
    ) -> Result<CompleteOutcome, StoreError> {
        self.shared.confirm_totp_enrollment(tenant, id, device, limits, now).await
    }

    async fn spend_totp_step(&self, id: &DeviceId, step: u64) -> Result<bool, StoreError> {
        self.shared.spend_totp_step(id, step).await
    }

    async fn reserve_totp_attempt(
        &self,
        tenant: &TenantId,
        user: &UserId,
        policy: &TotpPolicy,
        now: Millis,
    ) -> Result<TotpAttempt, StoreError> {
        self.shared.reserve_totp_attempt(tenant, user, policy, now).await
    }

    async fn totp_attempt_succeeded(&self, tenant: &TenantId, user: &UserId, _now: Millis) -> Result<(), StoreError> {
        self.shared.totp_attempt_succeeded(tenant, user);
        Ok(())
    }

    async fn spend_proof(&self, proof: ProofUse, keep_until: Millis) -> Result<bool, StoreError> {
        Ok(self.shared.spend_proof(proof, keep_until))
    }

    async fn record_count(&self) -> Result<u64, StoreError> {
        let live = self.shared.challenges().record_count();
        let durable = self.shared.durable().record_count();
        let proofs = self.shared.proofs.lock().len();
        Ok(u64::try_from(live + durable + proofs).unwrap_or(u64::MAX))
    }

    async fn purge_tenant(&self, tenant: &TenantId, dry_run: bool) -> Result<TenantPurge, StoreError> {
        self.shared.purge_tenant(tenant, dry_run).await
    }
}

#[cfg(test)]
mod conformance {
    use std::sync::Arc;

    use crate::domain::time::ManualClock;

    /// A store of its own for each case, in a temporary folder that lives as long.
    async fn store(clock: ManualClock) -> (super::EmbeddedStore, tempfile::TempDir) {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = super::EmbeddedStore::open(dir.path(), Arc::new(clock)).await.expect("store opens");
        (store, dir)
    }

    crate::store::conformance::conformance_suite!(store);

    /// Random sequences against the rules' model (`conformance::model`), each on a
    /// store of its own in memory-backed storage where there is some (/dev/shm): the
    /// model checks the rules, and hundreds of stores' fsyncs would only slow it.
    #[test]
    fn model_matches_the_rules() {
        crate::store::conformance::model::check("embedded", 128, |clock: ManualClock| async move {
            let shm = std::path::Path::new("/dev/shm");
            let dir = if shm.is_dir() { tempfile::tempdir_in(shm) } else { tempfile::tempdir() }.expect("tempdir");
            let store = super::EmbeddedStore::open(dir.path(), Arc::new(clock)).await.expect("store opens");
            (store, dir)
        });
    }
}
